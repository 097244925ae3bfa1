"""``lopt.torch``: the ``mlp`` and ``adafac_mlp`` learned optimizers as ``torch.optim.Optimizer``s.

A learned optimizer meta-trained in JAX and exported with :func:`lopt.export.save` trains a
PyTorch model with the usual loop (``pip install 'lopt[torch]'``):

    import lopt.torch
    opt = lopt.torch.load("optimizer.safetensors", model.parameters())
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

:func:`load` returns an :class:`MLPLOptTorch` (``mlp``: Metz et al. 2019, "Understanding and
correcting pathologies in the training of learned optimizers", App. D.1) or an
:class:`AdafacMLPLOptTorch` (``adafac_mlp``: Metz et al. 2022, "Practical tradeoffs between
memory, compute, and performance in learned optimizers", the small_fc_lopt architecture of
learned_optimization). Other architectures (``lstm_dm``, ``rnnprop``, ``hyper_adam``) raise
:class:`UnsupportedArchitectureError`.

Same numbers as JAX. Each class computes, per parameter tensor and in float32, exactly the
update of its JAX module (``lopt/mlp.py``, ``lopt/adafac.py``, whose docstrings list the
features): the same accumulators and decays, the features normalised by
``x / sqrt(mean(x^2) + 1e-8)`` over the tensor's own elements, the time features
``tanh(t / x - 1)`` of the number of steps taken before this one, adafac's reciprocal-sqrt
epsilons (1e-6 for the second moment, 1e-8 for the factored accumulators) and its
normalisation folded into the first layer, the ReLU MLP ``x @ w + b`` with the exported weights,
and the update ``p <- p - d * exp(m * exp_mult) * lr`` with ``lr`` the export's ``step_mult``.
Only float rounding differs (reduction order, library ``exp``/``tanh``/``rsqrt``);
``tests/lopt/test_torch.py`` trains one model with both for 100 steps on the CPU and bounds the
difference. (On accelerators, compare with full-float32 matmuls on both sides: a framework's
default there may be a lower-precision mode such as TF32.)

Layouts. The optimizer sees each parameter tensor with the shape it has; nothing is transposed.
The ``mlp`` optimizer is elementwise apart from the per-tensor normalisation, so a tensor's
layout does not matter to it. ``adafac_mlp`` factors its second moments over the two largest
axes of the tensor, in axis order (:func:`lopt.adafac.factored_axes`), so a torch ``Linear``
weight (out, in) is factored over its two axes just as a flax kernel (in, out) is; its "row"
accumulator then averages over the input axis and belongs to an output unit, where a flax
kernel's belongs to an input unit. The features are the same set; their order in the MLP's input
(rows before columns) follows the tensor's axis order. A torch ``Conv2d`` weight (out, in, kh, kw)
is factored over (out, in) when those are its two largest axes.

Param groups carry one option, ``lr`` (default: the export's ``step_mult``), which scales the
step exactly as ``step_mult`` does, so torch learning-rate schedulers apply. Parameters whose
``.grad`` is None are skipped (their accumulators and step count do not advance; the JAX
optimizer has one step count for all parameters, which agrees while every parameter gets a
gradient every step). Gradients and parameters of any float dtype are read as float32, the
update is cast to the parameter's dtype, and the state is kept in float32.

``state_dict()`` holds the per-parameter state (``step`` and the accumulators) and the groups'
``lr``, not the meta-params: load it into an optimizer built from the same export.
"""

from __future__ import annotations

import os
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

try:
    import torch
except ImportError as e:  # torch is an optional extra
    raise ImportError(
        "lopt.torch needs PyTorch, an optional extra of lopt: pip install 'lopt[torch]' "
        f"(importing torch failed: {e})"
    ) from e

from lopt import export as export_lib
from lopt.adafac import (
    _NORM_EPS as _ADAFAC_NORM_EPS,
    _RSQRT_EPS_FACTORED,
    _RSQRT_EPS_RMS,
    AdafacMLPLOpt,
    factored_axes,
)
from lopt.mlp import MLPLOpt

__all__ = [
    "AdafacMLPLOptTorch",
    "MLPLOptTorch",
    "UnsupportedArchitectureError",
    "load",
]

# lopt.base.tensor_rms_normalize's epsilon (the mlp optimizer's feature normalisation).
_MLP_NORM_EPS = 1e-8


class UnsupportedArchitectureError(ValueError):
    """The export holds a learned optimizer that lopt.torch does not implement."""


# --- float32 building blocks, the torch twins of lopt.base's ----------------------------------


def _tensor_mean(x: torch.Tensor, ndim: int, keepdim: bool) -> torch.Tensor:
    """Mean over the first ``ndim`` axes (a parameter tensor's own axes; the trailing feature
    axis is kept). With ``ndim == 0`` (a scalar parameter) it is the identity, as
    ``jnp.mean(x, axis=())`` is; torch's ``mean(dim=())`` would reduce every axis instead."""
    if ndim == 0:
        return x
    return x.mean(dim=tuple(range(ndim)), keepdim=keepdim)


def _rms_normalize(x: torch.Tensor, ndim: int, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the tensor (Metz et al. 2019, App. D.1)."""
    return x * torch.rsqrt(_tensor_mean(x.square(), ndim, keepdim=True) + eps)


def _dense(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """ReLU MLP over the last axis: ``x @ w + b`` per layer, ReLU between layers."""
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x


def _as_float32(x: Any) -> torch.Tensor:
    """A float32 CPU copy of an array (numpy, JAX or torch)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32, copy=True)
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def _mlp_layers(meta_params: Any, num_features: int, name: str) -> list[tuple[torch.Tensor, ...]]:
    """The exported MLP's (w, b) pairs as float32 tensors, with their shapes checked."""
    try:
        layers = [(_as_float32(lay["w"]), _as_float32(lay["b"])) for lay in meta_params["mlp"]]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{name}: meta_params must hold 'mlp': [{{'w', 'b'}}, ...] ({e!r})"
        ) from None
    fan_in = num_features
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or w.shape[0] != fan_in or b.shape != (w.shape[1],):
            raise ValueError(
                f"{name}: meta-param layer {i} has w{list(w.shape)} and b{list(b.shape)}, "
                f"expected w[{fan_in}, n] and b[n]"
            )
        fan_in = w.shape[1]
    if fan_in != 2:
        raise ValueError(
            f"{name}: the MLP must output 2 values (direction, magnitude), not {fan_in}"
        )
    return layers


class _LearnedOptimizerTorch(torch.optim.Optimizer):
    """Shared machinery: param groups with ``lr``, per-device copies of the constants, the step
    loop, and a ``load_state_dict`` that keeps the state in float32."""

    architecture: ClassVar[str]

    def __init__(self, params: Iterable, learned_opt: Any, lr: float | None):
        if lr is None:
            lr = float(learned_opt.step_mult)
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"{type(self).__name__}: lr must be a number >= 0, got {lr!r}")
        super().__init__(params, {"lr": float(lr)})
        self.learned_opt = learned_opt
        self._constants: dict[torch.device, dict[str, Any]] = {}

    # Subclasses: the CPU float32 constants, the fresh state of a parameter, one update.
    def _cpu_constants(self) -> dict[str, Any]:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update(self, p, grad, state, consts, lr: float) -> torch.Tensor:
        raise NotImplementedError

    def _on(self, device: torch.device) -> dict[str, Any]:
        """The constants (meta-params, decays, timescales) on ``device``, copied once."""
        if device not in self._constants:
            cpu = self._cpu_constants()
            self._constants[device] = {
                k: (
                    [tuple(t.to(device) for t in layer) for layer in v]
                    if isinstance(v, list)
                    else v.to(device)
                )
                for k, v in cpu.items()
            }
        return self._constants[device]

    def _time_features(self, step: torch.Tensor, consts: dict) -> torch.Tensor:
        """tanh(t / x - 1) for the timescales x, t the steps taken before this one
        (lopt.base.time_features with offset 1)."""
        t = step.to(device=consts["timescales"].device, dtype=torch.float32)
        return torch.tanh(t / consts["timescales"] - 1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not p.is_floating_point():
                    raise RuntimeError(f"{type(self).__name__} updates float parameters only")
                state = self.state[p]
                if len(state) == 0:
                    state.update(self._init_state(p))
                update = self._update(p, p.grad, state, self._on(p.device), group["lr"])
                p.add_(update.to(p.dtype))
                state["step"] += 1
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, checking that each parameter's saved state has this
        optimizer's keys and shapes, and keeping the accumulators in float32 (torch would cast
        them to each parameter's dtype)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state_dict has {len(saved_ids)} "
                f"parameters, this optimizer {len(params)}"
            )
        saved_state = state_dict["state"]
        for i, p in zip(saved_ids, params):
            if i not in saved_state:
                continue
            want = {k: tuple(v.shape) for k, v in self._init_state(p).items()}
            got = {
                k: tuple(v.shape) if torch.is_tensor(v) else None
                for k, v in saved_state[i].items()
            }
            if got != want:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved state of parameter {i} "
                    f"has {got}, but a {self.architecture} optimizer keeps {want} for a "
                    f"parameter of shape {list(p.shape)}; is it another optimizer's state_dict?"
                )
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            for k, v in saved_state.get(i, {}).items():
                if k != "step":
                    self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
                else:
                    self.state[p][k] = v.detach().to(device="cpu", dtype=torch.int64, copy=True)


class MLPLOptTorch(_LearnedOptimizerTorch):
    """The ``mlp`` learned optimizer (Metz et al. 2019, App. D.1; ``lopt/mlp.py``) in torch.

    Per parameter tensor ``p`` with gradient ``g`` and step count ``t``: momenta
    ``m_k <- b_k m_k + (1 - b_k) g`` at the export's decays b_k; features ``g``, ``p`` and the
    ``m_k``, each divided by ``sqrt(mean(x^2) + 1e-8)`` over the tensor, and the time features
    ``tanh(t / x - 1)``; the MLP gives a direction ``d`` and a log-magnitude ``s``; the update is
    ``p <- p - d * exp(s * exp_mult) * lr``.

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
        g = grad.to(torch.float32)
        w = p.to(torch.float32)
        nd = g.ndim
        m = state["momenta"]
        m.mul_(consts["decays"]).add_(consts["one_minus_decays"] * g[..., None])
        t_feats = self._time_features(state["step"], consts)
        feats = torch.cat(
            [
                _rms_normalize(g[..., None], nd, _MLP_NORM_EPS),
                _rms_normalize(w[..., None], nd, _MLP_NORM_EPS),
                _rms_normalize(m, nd, _MLP_NORM_EPS),
                t_feats.expand(g.shape + t_feats.shape),
            ],
            dim=-1,
        )
        out = _dense(consts["layers"], feats)
        direction, magnitude = out[..., 0], out[..., 1]
        return -(direction * torch.exp(magnitude * self.learned_opt.exp_mult) * lr)


class AdafacMLPLOptTorch(_LearnedOptimizerTorch):
    """The ``adafac_mlp`` learned optimizer (small_fc_lopt; Metz et al. 2022, arXiv:2203.11860;
    ``lopt/adafac.py``, whose docstring tables the accumulators and the 39 features) in torch.

    Per parameter tensor: momenta ``m`` (3 decays), second moment ``rms``, and Adafactor's
    (Shazeer & Stern 2018, Sec. 3) row and column means of g^2 over the two largest axes,
    ``v_hat = row * col / (mean(row) + 1e-8)`` (a full ``v`` for tensors under 2-D); the features
    g, p, m, rms, m/sqrt(rms), 1/sqrt(rms), g/sqrt(v_hat), m/sqrt(v_hat), row, col, 1/sqrt(row),
    1/sqrt(col), each normalised over the tensor by ``sqrt(mean(x^2) + 1e-8)`` folded into the
    first layer's weights, and the time features folded into its bias; the update is
    ``p <- p - d * exp(s * exp_mult) * lr``.

    State per parameter: ``step`` (int64), ``m``, ``rms`` and either ``row`` and ``col`` (the
    tensor's shape with the column, resp. row, axis reduced to 1, + the factored decays) or ``v``.
    """

    architecture = "adafac_mlp"

    def __init__(
        self,
        params: Iterable,
        learned_opt: AdafacMLPLOpt,
        meta_params: Any,
        *,
        lr: float | None = None,
    ):
        if not isinstance(learned_opt, AdafacMLPLOpt):
            raise TypeError(
                f"AdafacMLPLOptTorch needs an lopt.adafac.AdafacMLPLOpt, got "
                f"{type(learned_opt).__name__}"
            )
        self._layers = _mlp_layers(meta_params, learned_opt.num_features, "adafac_mlp")
        if learned_opt.learnable_decays:
            try:
                logits = meta_params["decay_logits"]
                decays = [
                    torch.sigmoid(_as_float32(logits[k])) for k in ("momentum", "rms", "factored")
                ]
            except (KeyError, TypeError) as e:
                raise ValueError(
                    f"adafac_mlp: learnable decays need meta_params['decay_logits'] ({e!r})"
                ) from None
        else:
            lo = learned_opt
            decays = [
                torch.tensor(d, dtype=torch.float32)
                for d in (lo.momentum_decays, lo.rms_decays, lo.factored_decays)
            ]
        self._decays = decays
        super().__init__(params, learned_opt, lr)

    def _cpu_constants(self) -> dict[str, Any]:
        b_m, b_rms, b_fac = self._decays
        return {
            "layers": self._layers,
            "b_m": b_m,
            "b_rms": b_rms,
            "b_fac": b_fac,
            "one_minus_b_m": 1.0 - b_m,
            "one_minus_b_rms": 1.0 - b_rms,
            "one_minus_b_fac": 1.0 - b_fac,
            "timescales": torch.tensor(self.learned_opt.timescales, dtype=torch.float32),
        }

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        lo = self.learned_opt
        nm, nr, nf = len(lo.momentum_decays), len(lo.rms_decays), len(lo.factored_decays)
        shape = tuple(p.shape)

        def zeros(s):
            return torch.zeros(s, dtype=torch.float32, device=p.device)

        state = {
            "step": torch.zeros((), dtype=torch.int64),
            "m": zeros(shape + (nm,)),
            "rms": zeros(shape + (nr,)),
        }
        axes = factored_axes(shape)
        if axes is None:
            state["v"] = zeros(shape + (nf,))
        else:
            r, c = axes
            state["row"] = zeros(tuple(1 if i == c else d for i, d in enumerate(shape)) + (nf,))
            state["col"] = zeros(tuple(1 if i == r else d for i, d in enumerate(shape)) + (nf,))
        return state

    def _update(self, p, grad, state, consts, lr):
        g = grad.to(torch.float32)[..., None]
        w = p.to(torch.float32)[..., None]
        g2 = g.square()
        full = tuple(p.shape)
        nd = len(full)
        m = state["m"].mul_(consts["b_m"]).add_(consts["one_minus_b_m"] * g)
        rms = state["rms"].mul_(consts["b_rms"]).add_(consts["one_minus_b_rms"] * g2)
        b_fac, one_minus_b_fac = consts["b_fac"], consts["one_minus_b_fac"]
        axes = factored_axes(full)
        if axes is None:  # under 2-D: Adafactor's unfactored accumulator
            v = state["v"].mul_(b_fac).add_(one_minus_b_fac * g2)
            row = col = v_hat = v
        else:  # Adafactor Sec. 3: V_hat = R C / 1^T R, as means
            r, c = axes
            row = state["row"].mul_(b_fac).add_(one_minus_b_fac * g2.mean(dim=c, keepdim=True))
            col = state["col"].mul_(b_fac).add_(one_minus_b_fac * g2.mean(dim=r, keepdim=True))
            v_hat = row * col / (row.mean(dim=r, keepdim=True) + _RSQRT_EPS_FACTORED)
        nf = b_fac.shape[0]
        rsqrt_rms = torch.rsqrt(rms + _RSQRT_EPS_RMS)
        rsqrt_v = torch.rsqrt(v_hat + _RSQRT_EPS_FACTORED)
        m_div_rms = (m[..., :, None] * rsqrt_rms[..., None, :]).reshape(full + (-1,))
        feats = torch.cat(
            [
                g,
                w,
                m,
                rms,
                m_div_rms,
                rsqrt_rms,
                g * rsqrt_v,
                m * rsqrt_v,
                row.expand(full + (nf,)),
                col.expand(full + (nf,)),
                torch.rsqrt(row + _RSQRT_EPS_FACTORED).expand(full + (nf,)),
                torch.rsqrt(col + _RSQRT_EPS_FACTORED).expand(full + (nf,)),
            ],
            dim=-1,
        )
        # The per-feature normalisation over the tensor and the time features are folded into
        # the first layer, as lopt/adafac.py does:
        #   norm(f) @ W[:n] + t @ W[n:] + b  =  f @ (s * W[:n]) + (t @ W[n:] + b).
        s = torch.rsqrt(_tensor_mean(feats.square(), nd, keepdim=False) + _ADAFAC_NORM_EPS)
        (w0, b0), rest = consts["layers"][0], consts["layers"][1:]
        n = feats.shape[-1]
        t_feats = self._time_features(state["step"], consts)
        layer0 = (s[:, None] * w0[:n], t_feats @ w0[n:] + b0)
        out = _dense([layer0, *rest], feats)
        direction, magnitude = out[..., 0], out[..., 1]
        return -(direction * torch.exp(magnitude * self.learned_opt.exp_mult) * lr)


_CLASSES: dict[str, type[_LearnedOptimizerTorch]] = {
    "mlp": MLPLOptTorch,
    "adafac_mlp": AdafacMLPLOptTorch,
}


def load(
    path: str | os.PathLike, params: Iterable, *, lr: float | None = None
) -> MLPLOptTorch | AdafacMLPLOptTorch:
    """The torch optimizer an export defines, over ``params`` (tensors or param-group dicts).

    ``path`` is any export :func:`lopt.export.load` reads, with all its checks and errors. ``lr`` (default: the export's ``step_mult``) becomes the
    param groups' default. Raises :class:`UnsupportedArchitectureError` for an architecture
    other than ``mlp`` and ``adafac_mlp``.
    """
    path = os.fspath(path)
    name = export_lib.read_metadata(path)["architecture"]["name"]
    if name not in _CLASSES:
        raise UnsupportedArchitectureError(
            f"export {path} holds a '{name}' learned optimizer, which lopt.torch does not "
            f"implement (it has {', '.join(repr(k) for k in _CLASSES)}); use it from JAX with "
            "lopt.export.load_optimizer"
        )
    learned_opt, meta_params = export_lib.load(path)
    return _CLASSES[name](params, learned_opt, meta_params, lr=lr)
