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
``x / sqrt(mean(x^2) + norm_eps)`` over the tensor's own elements, the time features
``tanh(t / x - 1)`` of the number of steps taken before this one, adafac's reciprocal-sqrt
epsilons (1e-6 for the second moment, 1e-8 for the factored accumulators), the ReLU MLP
``x @ w + b`` with the exported weights, and the update ``p <- p - d * exp(m * exp_mult) * lr``
with ``lr`` the export's ``step_mult``; also the options an import from learned_optimization
sets (``lopt.importer``: ``norm_eps``, adafac's ``factored_order``, ``preconditioner``,
``factored_grad_eps``, ``decay_param``). Only float rounding differs (reduction order, library
``exp``/``tanh``/``rsqrt``); ``tests/lopt/test_torch.py`` trains one model with both for 100
steps on the CPU and bounds the difference, ``tests/lopt/test_import.py`` compares an imported
optimizer with learned_optimization's own steps.

Speed (issue 25; ``scripts/benchmark_optimizers.py --framework=torch``). The normalisation and
the time features are folded into the first layer's weights and bias; the MLP runs over
:data:`CHUNK_ROWS` rows at a time with ``addmm`` and in-place ReLU into reused buffers, so its
activations stay in cache, and its 2-wide output layer is computed transposed; adafac's 28
features are written feature-major, a slab of :data:`SLAB_ROWS` entries at a time, with
``out=`` arithmetic and no [numel, 39] matrix. (On accelerators, compare with full-float32 matmuls on both sides: a framework's
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
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

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


class UnsupportedArchitectureError(ValueError):
    """The export holds a learned optimizer that lopt.torch does not implement."""


# --- float32 building blocks, the torch twins of lopt.base's ----------------------------------


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

    def _mlp(self, consts: dict, n_in: int, device) -> _ChunkedMLP:
        """The MLP's buffers on ``device``, made once."""
        if "mlp_buffers" not in consts:
            consts["mlp_buffers"] = _ChunkedMLP(consts["layers"], n_in, device)
        return consts["mlp_buffers"]

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


# --- the per-coordinate MLP over chunks of rows -------------------------------------------------

#: Rows the MLP takes at a time: its activations ([rows, hidden] float32) then stay in the CPU's
#: caches instead of making one [numel, hidden] round trip to memory per layer (which, with the
#: bias add and ReLU as separate passes, was most of an update's time before).
CHUNK_ROWS = 8192
#: Entries of a tensor whose features adafac_mlp builds at once (28 x 131072 float32, 15 MB):
#: few enough Python-level operations per entry, and small enough to be read back from cache.
SLAB_ROWS = 1 << 17


class _ChunkedMLP:
    """Buffers for one ReLU MLP: the features feature-major (``xt``: [n_in, rows], so writing
    one feature of a tensor is a contiguous copy), and the activations of ``CHUNK_ROWS`` rows
    at a time, computed with ``addmm`` (bias and matmul in one pass) and in-place ReLU; then the
    update ``-d * exp(s * exp_mult) * lr`` of the two outputs (lopt/mlp.py, lopt/adafac.py)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], n_in: int, device):
        self.n_in, self.device = n_in, device
        self.h = [torch.empty((CHUNK_ROWS, w.shape[1]), dtype=torch.float32, device=device)
                  for w, _ in layers[:-1]]
        self.out = torch.empty((2, CHUNK_ROWS), dtype=torch.float32, device=device)
        self.xt = torch.empty((n_in, 0), dtype=torch.float32, device=device)

    def row_major(self, rows: int) -> torch.Tensor:
        """A [rows, n_in] buffer (rows <= CHUNK_ROWS), for features copied from tensors that
        are row-major already (mlp's momenta); ``__call__`` takes its transpose."""
        if getattr(self, "x", None) is None:
            self.x = torch.empty((CHUNK_ROWS, self.n_in), dtype=torch.float32, device=self.device)
        return self.x[:rows]

    def features(self, rows: int) -> torch.Tensor:
        """The [n_in, rows] feature buffer (grown when a block needs more)."""
        if self.xt.shape[1] < rows:
            self.xt = torch.empty((self.n_in, rows), dtype=torch.float32, device=self.device)
        return self.xt[:, :rows]

    def __call__(self, xt: torch.Tensor, layers, exp_mult: float, lr: float,
                 out: torch.Tensor) -> None:
        """``out`` [rows] <- the update of the features ``xt`` [n_in, rows]; ``layers[0]``
        already holds the per-tensor normalisation and the time features."""
        rows = xt.shape[1]
        (w_out, b_out), hidden = layers[-1], layers[:-1]
        for i in range(0, rows, CHUNK_ROWS):
            j = min(rows, i + CHUNK_ROWS)
            x = xt[:, i:j].t()
            for k, (w, b) in enumerate(hidden):
                h = self.h[k][: j - i]
                torch.addmm(b, x, w, out=h)
                h.relu_()
                x = h
            # The 2-wide output layer as [2, rows] = W^T x^T: a [rows, 2] result is a GEMM shape
            # BLAS runs ~6x slower per row. Its bias is added to each output row after, as
            # x @ w + b adds it after the dot products.
            o = self.out[:, : j - i]
            torch.mm(w_out.t(), x.t(), out=o)
            magnitude = o[1].add_(b_out[1]).mul_(exp_mult).exp_()
            torch.add(o[0], b_out[0], out=out[i:j]).mul_(magnitude).mul_(-lr)


def _first_layer(layers, scale: torch.Tensor, t_feats: torch.Tensor) -> list:
    """The MLP with the per-feature normalisation ``scale`` folded into the first layer's weights
    and the time features ``t_feats`` into its bias: norm(f) @ W[:n] + t @ W[n:] + b =
    f @ (scale * W[:n]) + (t @ W[n:] + b), as lopt/adafac.py folds them."""
    (w0, b0), rest = layers[0], layers[1:]
    n = scale.shape[0]
    return [(scale[:, None] * w0[:n], t_feats @ w0[n:] + b0), *rest]


def _sum_squares(xt: torch.Tensor) -> torch.Tensor:
    """Sum of x^2 per feature of an [n, rows] block: float32 squares summed in float32 (torch's
    cascade sum; squares and sum rounded as JAX's mean of squares is) a ``CHUNK_ROWS`` piece at
    a time, the pieces added in float64. (A float64 reduction costs ~5x as much, and
    ``vector_norm``'s float32 one is off by ~1e-6.)"""
    total = torch.zeros(xt.shape[0], dtype=torch.float64, device=xt.device)
    for i in range(0, xt.shape[1], CHUNK_ROWS):
        total += xt[:, i : i + CHUNK_ROWS].square().sum(dim=1)
    return total


def _rsqrt_mean(sum_sq: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) per feature from the sums of squares, in float32 from the mean
    on (lopt.base.tensor_rms_scale's arithmetic)."""
    mean = (sum_sq / max(count, 1)).to(torch.float32)
    return torch.rsqrt(mean + eps)


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
