"""``velo`` as a ``torch.optim.Optimizer``: the update of ``lopt/velo.py`` in torch, float32.

    opt = lopt.torch.load("velo.safetensors", model.parameters(), num_steps=10_000)
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)          # or: loss.backward(); opt.step(loss=loss)

VeLO reads the whole parameter list at once (one LSTM row per tensor, a max over tensors) and
the loss at every step, so ``step`` needs the loss: from ``closure()`` (torch's convention) or
``loss=``. Every parameter must have a gradient at every step. The tensors are the LSTM's rows
in param-group order; each is optimised with the shape it has (the factored accumulators use
its two largest axes, as in JAX: a torch ``Linear`` weight (out, in) is the transpose of a flax
kernel, so its row and column accumulators swap roles, which VeLO's features treat alike).

The arithmetic follows ``lopt/velo.py`` (see its docstring for the paper and the code it
follows) operation by operation; the loss buffer's decays are taken from the JAX module so
their rounding is the code's. ``state_dict()`` holds the per-parameter accumulators and, under
the key ``"velo"``, the step count, horizon, LSTM state and loss buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from lopt import velo as velo_jax


#: Coordinates whose features are built at once ([SLAB, 30] float32, 7.5 MB).
SLAB = 1 << 16


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def _clip_log_abs(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.log(1e-8 + torch.abs(v * 10.0)), -5.0, 5.0) * 0.5


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def _factors(row, col, d1, d0):
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_factor = _safe_rsqrt(row / (row.mean(dim=reduced_d1, keepdim=True) + 1e-9))
    return row_factor.unsqueeze(d0), _safe_rsqrt(col).unsqueeze(d1)


class VeloTorch(torch.optim.Optimizer):
    """VeLO over ``params`` with ``meta_params`` of ``learned_opt`` (a ``lopt.velo.Velo``) for a
    training of ``num_steps`` updates."""

    architecture = "velo"

    def __init__(self, params: Iterable, learned_opt: Any, meta_params: Any, num_steps: int):
        if num_steps is None or int(num_steps) < 1:
            raise ValueError("velo needs the training horizon: lopt.torch.load(path, params, "
                             f"num_steps=N) with N >= 1, got num_steps={num_steps!r}")
        super().__init__(params, {})
        self.learned_opt = learned_opt
        self.num_steps = int(num_steps)
        mp = meta_params
        lin = lambda d: (_t(d["w"]), _t(d["b"]))
        self._mix = {k: lin(v) for k, v in mp["mix"].items()}
        self._lstm = lin(mp["lstm"])
        self._controls = lin(mp["controls"])
        self._step_size = lin(mp["step_size"])
        self._lstm_init = (_t(mp["lstm_init"]["hidden"]), _t(mp["lstm_init"]["cell"]))
        bank = mp["mlp_bank"]
        self._w0 = [_t(w) for w in bank["w0"]]
        self._layers = [(_t(bank[f"w{i}"]), _t(bank[f"b{i}"]))
                        for i in range(1, learned_opt.ff_hidden_layers + 1)]
        self._b0 = _t(bank["b0"])
        self._decays = _t(velo_jax._loss_decays(np.float32(self.num_steps)))
        self._frac_points = _t(velo_jax.FRACTION_POINTS)

    def state_dict(self) -> dict[str, Any]:
        """torch's, with the step count, horizon, LSTM state and loss buffer under
        ``"velo"``, copied (torch packs the live dict, which the next step would change)."""
        sd = super().state_dict()
        if "velo" in sd["state"]:
            sd["state"]["velo"] = {k: v.clone() for k, v in sd["state"]["velo"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"].get("velo")
        if saved is not None:
            t = len(self._params())
            if tuple(saved["lstm_hidden"].shape) != (t, self._lstm_init[0].shape[-1]):
                raise ValueError(f"VeloTorch.load_state_dict: the saved LSTM state has shape "
                                 f"{list(saved['lstm_hidden'].shape)}, this optimizer needs "
                                 f"[{t}, {self._lstm_init[0].shape[-1]}]")
        super().load_state_dict(state_dict)
        if saved is not None:
            self.state["velo"] = {k: v.clone() for k, v in saved.items()}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _global_state(self) -> dict:
        st = self.state["velo"]
        if not st:
            t = len(self._params())
            n = velo_jax.NUM_LOSS_DECAYS
            st.update(iteration=torch.zeros((), dtype=torch.int64),
                      num_steps=torch.tensor(float(self.num_steps)),
                      lstm_hidden=self._lstm_init[0].repeat(t, 1),
                      lstm_cell=self._lstm_init[1].repeat(t, 1),
                      loss_means=torch.zeros(n), loss_min=torch.full((n,), 999999999999.0),
                      loss_decays=self._decays.clone())
        return st

    def _param_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            shape = tuple(p.shape)
            z = lambda s: torch.zeros(s, dtype=torch.float32, device=p.device)
            st["mom"] = z(shape + (3,))
            st["rms"] = z(shape + (1,))
            dims = velo_jax.factored_dims(shape)
            if dims is None:
                st["fac_row"], st["fac_col"], st["fac_full"] = z((1,)), z((1,)), z(shape + (3,))
            else:
                d1, d0 = dims
                st["fac_row"] = z(tuple(np.delete(shape, d0)) + (3,))
                st["fac_col"] = z(tuple(np.delete(shape, d1)) + (3,))
                st["fac_full"] = z((1,))
        return st

    # -- the pieces, as in lopt/velo.py ------------------------------------------------------

    def _loss_features(self, st: dict, loss: torch.Tensor) -> torch.Tensor:
        d, it = st["loss_decays"], st["iteration"]
        bias = 1 - d ** (it + 1).to(torch.float32)
        corrected = st["loss_means"] / bias
        cap = loss if int(it) == 0 else corrected.max()
        loss = torch.minimum(cap.abs() * 2, loss)
        means = st["loss_means"] * d + loss * (1.0 - d)
        running_min = torch.minimum(st["loss_min"], means / bias)
        st["loss_means"], st["loss_min"] = means, running_min
        corrected = means / bias
        den = torch.clamp(corrected[1:] - running_min[:-1], min=1e-8)
        feats = torch.clamp((corrected[:-1] - running_min[:-1]) / den - 1.0, -1.0, 1.0)
        return feats * 0 if int(it) + 1 <= 2 else feats

    def _tensor_features(self, p, m, rms) -> torch.Tensor:
        norm = torch.rsqrt(torch.clamp((p * p).mean(), min=1e-9))
        m, rms = m * norm, rms * norm
        axes = tuple(range(p.dim()))
        mean = lambda x, keep: x.mean(dim=axes, keepdim=keep) if axes else x
        mean_m = mean(m, True)
        var_m = mean(torch.square(m - mean_m), False)
        mean_rms = mean(rms, True)
        centre = mean_m if self.learned_opt.var_rms_of_momentum_mean else mean_rms
        var_rms = mean(torch.square(rms - centre), False)
        rank = torch.zeros(5)
        n_rank = int(np.sum(np.asarray(p.shape) > 1))
        if n_rank < 5:
            rank[n_rank] = 1.0
        return torch.cat([_clip_log_abs(mean_rms.reshape(-1)), rank, _clip_log_abs(var_m),
                          _clip_log_abs(var_rms)])

    def _lstm_step(self, x, hidden, cell):
        lin = lambda layer, v: v @ layer[0] + layer[1]
        if self.learned_opt.paper_mixing:
            mixed = torch.relu(lin(self._mix["second"], torch.relu(lin(self._mix["first"], x))))
        else:
            mixed = torch.relu(lin(self._mix["second"], x))
        x = lin(self._mix["input"], x) + mixed.max(dim=0, keepdim=True).values
        gates = lin(self._lstm, torch.cat([x, hidden], dim=-1))
        i, g, f, o = torch.chunk(gates, 4, dim=-1)
        cell = torch.sigmoid(f + 1.0) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        return lin(self._controls, hidden), lin(self._step_size, hidden)[:, 0], hidden, cell

    def _accumulate(self, g, st) -> dict:
        """Update the accumulators with ``g``; the Adafactor terms the features use, each with
        the tensor's rank + 1 axes (size 1 where they broadcast)."""
        mom_d = torch.tensor(velo_jax.MOMENTUM_DECAYS, dtype=torch.float32)
        rms_d = torch.tensor(velo_jax.RMS_DECAYS, dtype=torch.float32)
        d = torch.tensor(velo_jax.FACTORED_DECAYS, dtype=torch.float32)
        st["mom"] = st["mom"] * mom_d + (1 - mom_d) * g[..., None]
        st["rms"] = st["rms"] * rms_d + (1 - rms_d) * (g * g)[..., None]
        sq = (g * g + 1e-30)[..., None]
        dims = velo_jax.factored_dims(tuple(g.shape))
        if dims is None:
            st["fac_full"] = d * st["fac_full"] + (1 - d) * sq
            return {"full": st["fac_full"]}
        d1, d0 = dims
        st["fac_row"] = d * st["fac_row"] + (1 - d) * sq.mean(dim=d0)
        st["fac_col"] = d * st["fac_col"] + (1 - d) * sq.mean(dim=d1)
        row_f, col_f = _factors(st["fac_row"], st["fac_col"], d1, d0)
        return {"row": st["fac_row"].unsqueeze(d0), "col": st["fac_col"].unsqueeze(d1),
                "row_f": row_f, "col_f": col_f}

    @staticmethod
    def _slab_inputs(p, g, m, rms, fac, sl) -> torch.Tensor:
        """The 30 input channels (``lopt.velo.FEATURE_GROUPS``) of the coordinates ``sl`` (a
        slice of the tensor's first axis) as a [coordinates, 30] matrix."""
        cut = lambda t: t if t.shape[0] == 1 else t[sl]
        p, g, m, rms = p[sl], g[sl], m[sl], rms[sl]
        g1 = g[..., None]
        rsqrt = torch.rsqrt(rms + 1e-6)
        if "full" in fac:
            full = fac["full"][sl]
            row = col = full
            fac_g, m_fac = g1 * _safe_rsqrt(full + 1e-9), m * full ** -0.5
        else:
            row, col = cut(fac["row"]).expand(m.shape), cut(fac["col"]).expand(m.shape)
            row_f, col_f = cut(fac["row_f"]), cut(fac["col_f"])
            fac_g, m_fac = g1 * row_f * col_f, m * row_f * col_f
        groups = [g1, torch.clamp(g1, -0.1, 0.1), p[..., None], m, rms, m * rsqrt, rsqrt, fac_g,
                  g1 * rsqrt, row, col, torch.rsqrt(row + 1e-8), torch.rsqrt(col + 1e-8), m_fac]
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in groups], dim=1)

    def _mixw(self, w, control):
        return 100.0 * (w * control.reshape((-1,) + (1,) * (w.dim() - 1))).mean(dim=0)

    def _tensor_step(self, control, lr_mult, p, g, st, fac) -> torch.Tensor:
        """The step of one tensor. The features are built a slab of ``SLAB`` coordinates at a
        time (cache-resident) twice: once for their per-channel second moments, once for the
        MLP, whose first layer has the normalisation folded into its weights; each layer is
        one BLAS call per slab."""
        shape = p.shape
        if p.dim() == 0:  # as the code, a scalar runs as shape (1,)
            p, g = p.reshape(1), g.reshape(1)
            st = {"mom": st["mom"].reshape(1, -1), "rms": st["rms"].reshape(1, -1)}
            fac = {"full": fac["full"].reshape(1, -1)}
        per_row = max(1, int(np.prod(p.shape[1:])))
        rows = max(1, SLAB // per_row)
        slabs = [slice(a, min(a + rows, p.shape[0])) for a in range(0, p.shape[0], rows)]
        sum_sq = 0.0
        for sl in slabs:
            x = self._slab_inputs(p, g, st["mom"], st["rms"], fac, sl)
            sum_sq = sum_sq + torch.mm(torch.ones(1, x.shape[0]), x * x)[0]
        scale = torch.rsqrt(1e-5 + sum_sq / p.numel())
        w0 = torch.cat([self._mixw(w, control) for w in self._w0], dim=0) * scale[:, None]
        b0 = self._mixw(self._b0, control)
        layers = [(self._mixw(w, control), self._mixw(b, control)) for w, b in self._layers]
        if layers:
            layers[-1] = (layers[-1][0][:, :2], layers[-1][1][:2])
        lo = self.learned_opt
        p_scale = torch.sqrt((p * p).mean() + 1e-9)
        out = torch.empty(p.shape, dtype=torch.float32)
        for sl in slabs:
            o = torch.addmm(b0, self._slab_inputs(p, g, st["mom"], st["rms"], fac, sl), w0)
            for w, b in layers:
                o = torch.addmm(b, torch.relu_(o), w)
            step = o[:, 0] * (p_scale * torch.exp(o[:, 1] * lo.exp_mult)) * lo.step_mult
            out[sl] = (lr_mult * step).reshape(out[sl].shape)
        return out.reshape(shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One VeLO update of every parameter; the loss from ``closure()`` or ``loss=``.
        Returns the loss."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ValueError("velo's step needs the loss: opt.step(closure) with a closure that "
                             "returns it, or opt.step(loss=loss)")
        params = self._params()
        for i, p in enumerate(params):
            if p.grad is None:
                raise ValueError(f"velo updates every tensor together: parameter {i} "
                                 f"(shape {list(p.shape)}) has no gradient; pass only the "
                                 "parameters you train")
        gst = self._global_state()
        loss_t = torch.as_tensor(loss.detach() if torch.is_tensor(loss) else loss).to(torch.float32).reshape(())
        loss_feats = self._loss_features(gst, loss_t)
        frac = gst["iteration"].to(torch.float32) / gst["num_steps"]
        frac_feats = torch.tanh((frac - self._frac_points) * 10.0)
        ps = [p.detach().to(torch.float32) for p in params]
        gs = [torch.clamp(p.grad.detach().to(torch.float32), -velo_jax.GRAD_CLIP, velo_jax.GRAD_CLIP)
              for p in params]
        sts = [self._param_state(p) for p in params]
        rows = [torch.cat([frac_feats, loss_feats, self._tensor_features(p, st["mom"], st["rms"])])
                for p, st in zip(ps, sts)]
        controls, lr_mult, hidden, cell = self._lstm_step(
            torch.stack(rows), gst["lstm_hidden"], gst["lstm_cell"])
        gst["lstm_hidden"], gst["lstm_cell"] = hidden, cell
        for i, (param, p, g, st) in enumerate(zip(params, ps, gs, sts)):
            fac = self._accumulate(g, st)
            param.sub_(self._tensor_step(controls[i], lr_mult[i], p, g, st, fac).to(param.dtype))
        gst["iteration"] = gst["iteration"] + 1
        return loss
