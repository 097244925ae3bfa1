"""What ``lopt.torch``'s optimizers share: float32 copies of the meta-params, the torch
optimizer's step loop and state handling, and the MLP run over chunks of rows with its first
layer folded with the feature normalisation and time features (docs/performance.md, "One
lopt.torch update", says why each is shaped as it is)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch


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
