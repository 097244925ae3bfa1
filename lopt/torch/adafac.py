"""``adafac_mlp`` (the small_fc_lopt architecture; ``lopt/adafac.py``) as a
``torch.optim.Optimizer``: its factored accumulators and features per block of a tensor."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from lopt.adafac import (
    _RSQRT_EPS_FACTORED,
    _RSQRT_EPS_RMS,
    AdafacMLPLOpt,
    factored_axes,
)
from lopt.torch.base import (
    SLAB_ROWS,
    _as_float32,
    _first_layer,
    _LearnedOptimizerTorch,
    _mlp_layers,
    _rsqrt_mean,
    _sum_squares,
)


def _factored_layout(shape: tuple[int, ...], axes: tuple[int, int] | None):
    """How :class:`AdafacMLPLOptTorch` walks a tensor: (the two factored axes in axis order, or
    None; the tensor's size as (L, A0, A1) once those two axes are moved last and the others
    merged in front). A tensor under 2-D is (1, numel, 1)."""
    if axes is None:
        return None, (1, int(np.prod(shape, dtype=np.int64)), 1)
    a0, a1 = sorted(axes)
    rest = [d for i, d in enumerate(shape) if i not in (a0, a1)]
    return (a0, a1), (int(np.prod(rest, dtype=np.int64)), shape[a0], shape[a1])


def _as_layout(x: torch.Tensor, pair, lam: tuple[int, int, int]) -> torch.Tensor:
    """``x`` (a tensor's shape + a trailing feature axis, or with axes reduced to 1) as
    (L, A0, A1, features): the factored axes moved last before the features (a view when they
    already are, as for a dense kernel, a flax HWIO kernel or an embedding table)."""
    if pair is None:
        return x.reshape(1, lam[1], 1, x.shape[-1])
    moved = x.movedim((pair[0], pair[1]), (-3, -2))
    return moved.reshape(-1, *moved.shape[-3:])


def _blocks(lam: tuple[int, int, int], size: int):
    """(l0, l1, a0, a1): slices of the (L, A0, A1) layout of about ``size`` entries each (more
    when one line of A1 entries is longer)."""
    big_l, a0_size, a1_size = lam
    per_l = a0_size * a1_size
    if per_l <= size:
        step = max(1, size // max(per_l, 1))
        for l0 in range(0, big_l, step):
            yield l0, min(big_l, l0 + step), 0, a0_size
    else:
        step = max(1, size // max(a1_size, 1))
        for l0 in range(big_l):
            for a0 in range(0, a0_size, step):
                yield l0, l0 + 1, a0, min(a0_size, a0 + step)


def _block(x: torch.Tensor, l0: int, l1: int, a0: int, a1: int) -> torch.Tensor:
    """A block of a layout tensor; axes of size 1 (the reduced axis of a factored accumulator)
    are kept whole, to broadcast."""
    rows = slice(l0, l1) if x.shape[0] > 1 else slice(None)
    cols = slice(a0, a1) if x.shape[1] > 1 else slice(None)
    return x[rows, cols]


class AdafacMLPLOptTorch(_LearnedOptimizerTorch):
    """The ``adafac_mlp`` learned optimizer (small_fc_lopt; Metz et al. 2022, arXiv:2203.11860;
    ``lopt/adafac.py``, whose docstring tables the accumulators and the 39 features) in torch.

    Per parameter tensor: momenta ``m`` (3 decays), second moment ``rms``, and Adafactor's
    (Shazeer & Stern 2018, Sec. 3) row and column means of g^2 over the two largest axes,
    ``v_hat = row * col / (mean(row) + 1e-8)`` (a full ``v`` for tensors under 2-D); the features
    g, p, m, rms, m/sqrt(rms), 1/sqrt(rms), g/sqrt(v_hat), m/sqrt(v_hat), row, col, 1/sqrt(row),
    1/sqrt(col), each normalised over the tensor by ``sqrt(mean(x^2) + norm_eps)`` folded into
    the first layer's weights, and the time features folded into its bias; the update is
    ``p <- p - d * exp(s * exp_mult) * lr``. The options of :class:`lopt.adafac.AdafacMLPLOpt`
    (``norm_eps``, ``factored_order``, ``preconditioner``, ``factored_grad_eps``,
    ``decay_param``) mean what they mean there.

    The features are written feature-major ([28, entries]), a block of at most
    :data:`SLAB_ROWS` entries at a time; a tensor larger than that has them built twice, once to
    sum their squares (the normalisation) and once to run the MLP, so no [numel, 28] matrix is
    ever held.

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
        lo = learned_opt
        initial = (lo.momentum_decays, lo.rms_decays, lo.factored_decays)
        if learned_opt.learnable_decays and learned_opt.decay_param == "log1m":
            try:
                offsets = meta_params["decay_offsets"]
                offsets = [_as_float32(offsets[k]) for k in ("momentum", "rms", "factored")]
            except (KeyError, TypeError) as e:
                raise ValueError(
                    f"adafac_mlp: decay_param='log1m' needs meta_params['decay_offsets'] ({e!r})"
                ) from None
            # lopt/adafac.py's AdafacMLPLOpt.decays: 1 - exp(10 (log(1 - b0) / 10 + offset)).
            decays = []
            for i, (b0, o) in enumerate(zip(initial, offsets)):
                base = torch.log(1.0 - torch.tensor(b0, dtype=torch.float32)) / 10.0
                b = 1.0 - torch.exp((base + o) * 10.0)
                decays.append(b if i == 0 else b.clamp(0.0, 1.0))
        elif learned_opt.learnable_decays:
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
            decays = [torch.tensor(d, dtype=torch.float32) for d in initial]
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
        axes = factored_axes(shape, lo.factored_order)
        if axes is None:
            state["v"] = zeros(shape + (nf,))
        else:
            r, c = axes
            state["row"] = zeros(tuple(1 if i == c else d for i, d in enumerate(shape)) + (nf,))
            state["col"] = zeros(tuple(1 if i == r else d for i, d in enumerate(shape)) + (nf,))
        return state

    def _accumulate(self, g, state, consts):
        """Update the accumulators in place (lopt/adafac.py's ``features``, first half); returns
        the factored axes (row, column) or None. ``b * a + (1 - b) * x`` is computed as JAX
        writes it (a multiply, then an add), not with a fused ``addcmul_``: a momentum near zero
        is a difference of nearly equal terms, and a fused multiply-add rounds it differently
        enough to move an update by 1e-5 of itself."""
        lo = self.learned_opt
        full = tuple(g.shape[:-1])
        g2 = g.square()
        g2_fac = g2 + lo.factored_grad_eps if lo.factored_grad_eps else g2
        state["m"].mul_(consts["b_m"]).add_(consts["one_minus_b_m"] * g)
        state["rms"].mul_(consts["b_rms"]).add_(consts["one_minus_b_rms"] * g2)
        b_fac, one_minus = consts["b_fac"], consts["one_minus_b_fac"]
        axes = factored_axes(full, lo.factored_order)
        if axes is None:
            state["v"].mul_(b_fac).add_(one_minus * g2_fac)
        else:
            r, c = axes
            state["row"].mul_(b_fac).add_(one_minus * g2_fac.mean(dim=c, keepdim=True))
            state["col"].mul_(b_fac).add_(one_minus * g2_fac.mean(dim=r, keepdim=True))
        return axes

    def _factors(self, state, axes, pair, lam):
        """What the features broadcast over a tensor, each in the (L, A0, A1, nf) layout: row,
        col, 1/sqrt(row + 1e-8), 1/sqrt(col + 1e-8) and the preconditioner's pieces: the row
        mean (Adafactor's v_hat, built per block), or learned_optimization's two factors."""
        lo = self.learned_opt
        lopt_style = lo.preconditioner == "learned_optimization"
        if axes is None:
            v = state["v"]
            rv = _as_layout(torch.rsqrt(v + _RSQRT_EPS_FACTORED), pair, lam)
            v = _as_layout(v, pair, lam)
            pre = None
            if lopt_style:  # g and m have factors of their own under 2-D
                pre = (_as_layout(torch.rsqrt(torch.clamp_min(state["v"] + 1e-9, 1e-9)), pair, lam),
                       _as_layout(torch.rsqrt(state["v"] + 1e-6), pair, lam))
            return v, v, rv, rv, pre
        r, _ = axes
        row, col = state["row"], state["col"]
        row_mean = row.mean(dim=r, keepdim=True)
        if lopt_style:
            pre = (_as_layout(torch.rsqrt(torch.clamp_min(row / (row_mean + 1e-9), 1e-9)), pair, lam),
                   _as_layout(torch.rsqrt(torch.clamp_min(col, 1e-9)), pair, lam))
        else:
            pre = _as_layout(row_mean + _RSQRT_EPS_FACTORED, pair, lam)
        return (_as_layout(row, pair, lam), _as_layout(col, pair, lam),
                _as_layout(torch.rsqrt(row + _RSQRT_EPS_FACTORED), pair, lam),
                _as_layout(torch.rsqrt(col + _RSQRT_EPS_FACTORED), pair, lam), pre)

    def _features(self, xt, blk, src, factors, axes) -> None:
        """Write the 28 features of one block (lopt/adafac.py's table, in its order) into
        ``xt`` [28, entries], each with the arithmetic of lopt/adafac.py's ``features``."""
        lo = self.learned_opt
        nm, nr, nf = len(lo.momentum_decays), len(lo.rms_decays), len(lo.factored_decays)
        g, w, m, rms = (_block(t, *blk).movedim(-1, 0) for t in src)  # [k, block...]
        row, col, rrow, rcol, pre = factors
        row, col, rrow, rcol = (_block(t, *blk).movedim(-1, 0) for t in (row, col, rrow, rcol))
        shape = g.shape[1:]

        def slot(i: int, width: int) -> torch.Tensor:
            return xt[i : i + width].view(width, *shape)

        i = 0
        for part, width in ((g, 1), (w, 1), (m, nm), (rms, nr)):
            slot(i, width).copy_(part)
            i += width
        m_div_rms, i = slot(i, nm * nr).view(nm, nr, *shape), i + nm * nr
        rsqrt_rms, i = slot(i, nr), i + nr
        torch.add(rms, _RSQRT_EPS_RMS, out=rsqrt_rms).rsqrt_()
        torch.mul(m[:, None], rsqrt_rms[None], out=m_div_rms)
        g_pre, m_pre, i = slot(i, nf), slot(i + nf, nf), i + 2 * nf
        if isinstance(pre, tuple) and axes is None:  # learned_optimization's, under 2-D
            torch.mul(g, _block(pre[0], *blk).movedim(-1, 0), out=g_pre)
            torch.mul(m, _block(pre[1], *blk).movedim(-1, 0), out=m_pre)
        elif isinstance(pre, tuple):  # learned_optimization's: g * rsqrt(row / mean) * rsqrt(col)
            f_row, f_col = (_block(t, *blk).movedim(-1, 0) for t in pre)
            torch.mul(g, f_row, out=g_pre).mul_(f_col)
            torch.mul(m, f_row, out=m_pre).mul_(f_col)
        else:  # Adafactor's: x / sqrt(v_hat + 1e-8), v_hat = row col / (mean(row) + 1e-8)
            if axes is None:
                torch.add(row, _RSQRT_EPS_FACTORED, out=m_pre)
            else:
                torch.mul(row, col, out=m_pre).div_(_block(pre, *blk).movedim(-1, 0))
                m_pre.add_(_RSQRT_EPS_FACTORED)
            m_pre.rsqrt_()
            torch.mul(g, m_pre, out=g_pre)
            m_pre.mul_(m)
        for part in (row, col, rrow, rcol):
            slot(i, nf).copy_(part)
            i += nf

    def _update(self, p, grad, state, consts, lr):
        lo = self.learned_opt
        full = tuple(p.shape)
        g = grad.to(torch.float32)[..., None]
        w = p.to(torch.float32)[..., None]
        axes = self._accumulate(g, state, consts)
        pair, lam = _factored_layout(full, axes)
        src = [_as_layout(t, pair, lam) for t in (g, w, state["m"], state["rms"])]
        factors = self._factors(state, axes, pair, lam)
        n = self._layers[0][0].shape[0] - len(lo.timescales)
        mlp = self._mlp(consts, n, p.device)
        blocks = [(blk, (blk[1] - blk[0]) * (blk[3] - blk[2]) * lam[2])
                  for blk in _blocks(lam, SLAB_ROWS)]
        # The per-feature sums of squares over the tensor (the normalisation)...
        sum_sq = torch.zeros(n, dtype=torch.float64, device=p.device)
        for blk, rows in blocks:
            self._features(mlp.features(rows), blk, src, factors, axes)
            sum_sq += _sum_squares(mlp.features(rows))
        scale = _rsqrt_mean(sum_sq, p.numel(), lo.norm_eps)
        layers = _first_layer(consts["layers"], scale, self._time_features(state["step"], consts))
        # ... then the MLP, into the update in the (L, A0, A1) layout.
        update = torch.empty(lam, dtype=torch.float32, device=p.device)
        for blk, rows in blocks:
            if len(blocks) > 1:  # one block: its features are still in the buffer
                self._features(mlp.features(rows), blk, src, factors, axes)
            l0, l1, a0, a1 = blk
            mlp(mlp.features(rows), layers, lo.exp_mult, lr, update[l0:l1, a0:a1].view(-1))
        if pair is None:
            return update.view(full)
        moved = [d for i, d in enumerate(full) if i not in pair] + [full[pair[0]], full[pair[1]]]
        return update.view(moved).movedim((-2, -1), pair)
