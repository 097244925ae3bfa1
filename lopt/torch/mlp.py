"""``mlp`` (Metz et al. 2019, App. D.1; ``lopt/mlp.py``) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lopt.mlp import MLPLOpt
from lopt.torch.base import (
    CHUNK_ROWS,
    _first_layer,
    _LearnedOptimizerTorch,
    _mlp_layers,
    _rsqrt_mean,
)


class MLPLOptTorch(_LearnedOptimizerTorch):
    """The ``mlp`` learned optimizer (Metz et al. 2019, App. D.1; ``lopt/mlp.py``) in torch.

    Per parameter tensor ``p`` with gradient ``g`` and step count ``t``: momenta
    ``m_k <- b_k m_k + (1 - b_k) g`` at the export's decays b_k; features ``g``, ``p`` and the
    ``m_k``, each divided by ``sqrt(mean(x^2) + norm_eps)`` over the tensor, and the time
    features ``tanh(t / x - 1)``; the MLP gives a direction ``d`` and a log-magnitude ``s``; the
    update is ``p <- p - d * exp(s * exp_mult) * lr``. The normalisation and the time features
    are folded into the first layer (:func:`_first_layer`), and the MLP runs over chunks of
    rows (:class:`_ChunkedMLP`).

    State per parameter: ``step`` (int64) and ``momenta`` (``p.shape + (len(decays),)``).
    """

    architecture = "mlp"

    def __init__(
        self, params: Iterable, learned_opt: MLPLOpt, meta_params: Any, *, lr: float | None = None
    ):
        if not isinstance(learned_opt, MLPLOpt):
            raise TypeError(
                f"MLPLOptTorch needs an lopt.mlp.MLPLOpt, got {type(learned_opt).__name__}"
            )
        self._layers = _mlp_layers(meta_params, learned_opt.num_features, "mlp")
        super().__init__(params, learned_opt, lr)

    def _cpu_constants(self) -> dict[str, Any]:
        decays = torch.tensor(self.learned_opt.decays, dtype=torch.float32)
        return {
            "layers": self._layers,
            "decays": decays,
            "one_minus_decays": 1.0 - decays,
            "timescales": torch.tensor(self.learned_opt.timescales, dtype=torch.float32),
        }

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        k = len(self.learned_opt.decays)
        return {
            "step": torch.zeros((), dtype=torch.int64),
            "momenta": torch.zeros(p.shape + (k,), dtype=torch.float32, device=p.device),
        }

    def _update(self, p, grad, state, consts, lr):
        lo = self.learned_opt
        n = p.numel()
        g = grad.to(torch.float32).reshape(1, n)
        w = p.to(torch.float32).reshape(1, n)
        k = len(lo.decays)
        m = state["momenta"].view(n, k)
        m.mul_(consts["decays"]).add_(consts["one_minus_decays"] * g.view(n, 1))
        sum_sq = torch.zeros(2 + k, dtype=torch.float64, device=p.device)
        for i in range(0, n, CHUNK_ROWS):  # as _sum_squares: float32 pieces, added in float64
            j = min(n, i + CHUNK_ROWS)
            sum_sq[0:1] += g[:, i:j].square().sum(dim=1)
            sum_sq[1:2] += w[:, i:j].square().sum(dim=1)
            sum_sq[2:] += m[i:j].square().sum(dim=0)
        scale = _rsqrt_mean(sum_sq, n, lo.norm_eps)
        layers = _first_layer(consts["layers"], scale, self._time_features(state["step"], consts))
        mlp = self._mlp(consts, 2 + k, p.device)
        update = torch.empty(n, dtype=torch.float32, device=p.device)
        for i in range(0, n, CHUNK_ROWS):
            j = min(n, i + CHUNK_ROWS)
            x = mlp.row_major(j - i)  # momenta are [n, k] row-major: copy rows, not columns
            x[:, 0] = g[0, i:j]
            x[:, 1] = w[0, i:j]
            x[:, 2:] = m[i:j]
            mlp(x.t(), layers, lo.exp_mult, lr, update[i:j])
        return update.view(p.shape)
