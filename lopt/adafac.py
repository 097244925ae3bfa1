"""``adafac_mlp``: the factored per-parameter MLP learned optimizer ("small_fc_lopt").

L. Metz, C. D. Freeman, J. Harrison, N. Maheswaranathan, J. Sohl-Dickstein, "Practical
tradeoffs between memory, compute, and performance in learned optimizers", CoLLAs 2022
(arXiv:2203.11860): the "small_fc_lopt" architecture, a per-parameter MLP on momentum,
second-moment and Adafactor-style factored features. The same architecture ships in PyLO
(Therien et al. 2025) as ``small_fc_lopt``, whose documentation lists the 39 inputs reproduced
below. The factored second moments are those of Adafactor: N. Shazeer, M. Stern, "Adafactor:
Adaptive learning rates with sublinear memory cost", ICML 2018, Sec. 3 (factored second-moment
estimation, ``V_hat = R C / (1^T R)`` from row sums R and column sums C of the squared gradient).

Accumulators, per parameter tensor (``g`` its gradient, every one an exponential moving average
``a <- b a + (1 - b) x``):

======================  =================================  =====================================
accumulator             decays b                           shape
======================  =================================  =====================================
momentum ``m``          0.9, 0.99, 0.999                   leaf.shape + (3,)
second moment ``rms``   0.999                              leaf.shape + (1,)
row factor ``r``        0.9, 0.99, 0.999 (of mean g^2      leaf.shape, column axis -> 1, + (3,)
                        over the column axis)
column factor ``c``     0.9, 0.99, 0.999 (of mean g^2      leaf.shape, row axis -> 1, + (3,)
                        over the row axis)
full ``v`` (< 2-D)      0.9, 0.99, 0.999 (of g^2)          leaf.shape + (3,)
======================  =================================  =====================================

Rows and columns are the two largest axes of a tensor of rank >= 2 (as Adafactor's and
learned_optimization's ``factored_dims``: "factor the largest 2 dims"; among equal sizes the
later axis counts as larger), row before column in axis order: dense kernels in/out, an HWIO
conv kernel (3, 3, 16, 32) its channels, a (3, 3, 2, 4) kernel its axes 1 and 3. The factored
estimate of the second moment is Adafactor's ``v_hat = r c / mean(r)`` (``R C / 1^T R`` with
means instead of sums); a tensor under 2-D keeps the full accumulator ``v`` and uses
``v_hat = r = c = v``.

Input features, per scalar parameter (28 + 11 = 39):

====  ==============================================  =====
 #    feature                                         count
====  ==============================================  =====
 1    gradient g                                        1
 2    parameter value p                                 1
 3    momenta m                                         3
 4    second moment rms                                 1
 5    m / sqrt(rms)                                     3
 6    1 / sqrt(rms)                                     1
 7    factored-preconditioned gradient g / sqrt(v_hat)  3
 8    factored-preconditioned momentum m / sqrt(v_hat)  3
 9    row factor r (broadcast over the tensor)          3
10    column factor c (broadcast over the tensor)       3
11    1 / sqrt(r)                                       3
12    1 / sqrt(c)                                       3
13    time features tanh(t / x - 1), x = 1, 3, ..., 1e5 11
====  ==============================================  =====

The time features are tanh(t / x - 1), as in learned_optimization's small_fc_lopt
(``tanh_embedding``) and Metz et al. 2019 App. D.1; PyLO's background page writes the
simplified tanh(t / x). Reciprocal square roots add an epsilon inside the root, as
learned_optimization's small_fc_lopt does: 1e-6 for the second moment ``rms`` (feature 5, 6)
and 1e-8 for the factored accumulators (features 7, 8, 11, 12). An all-zero accumulator (a
weight whose gradient has been exactly zero, e.g. an always-black pixel's) then gives 1e3 or
1e4, not the 1e10 of a 1e-20 epsilon that, after the normalisation below, squashed every live
entry's feature to ~1e-5.

Features 1-12 are each divided by ``sqrt(mean(x^2) + 1e-8)`` over the tensor (Metz et al.
2019, App. D.1; learned_optimization's ``second_moment_normalizer`` adds 1e-5, which would
attenuate features below ~3e-3, such as the reciprocal square roots of large second moments),
which makes the optimizer invariant to the gradient's scale once the second moments dwarf the
reciprocal-sqrt epsilons. An MLP (2 hidden
layers of 32, ReLU) maps the 39 inputs to a direction ``d`` and a log-magnitude ``s``; the
normalisation and the time features are folded into its first layer's weights and bias, which
is the same function with less memory traffic. The update is

    dp = -d * exp(s * 1e-3) * 1e-3

(the output parameterisation of Metz et al. 2019, App. D.1, kept by Metz et al. 2022).

With ``learnable_decays=True`` the decays become meta-params too, as sigmoid(logit).

Options for optimizers meta-trained elsewhere (``lopt.importer``; defaults are the above, so
existing exports keep their numbers). learned_optimization's ``AdafacMLPLOpt`` is
``norm_eps=1e-5, factored_order="size", preconditioner="learned_optimization",
factored_grad_eps=1e-30, learnable_decays=True, decay_param="log1m"``:

* ``norm_eps``: the epsilon of the per-tensor feature normalisation.
* ``factored_order="size"``: the row accumulator averages over the larger of the two factored
  axes (its ``factored_dims``), not over the later one; this swaps row and column features of a
  tensor whose larger axis comes first.
* ``preconditioner="learned_optimization"``: features 7 and 8 use
  ``rsqrt(max(r / (mean(r) + 1e-9), 1e-9)) * rsqrt(max(c, 1e-9))``; under 2-D, g uses
  ``rsqrt(max(v + 1e-9, 1e-9))`` and m ``rsqrt(v + 1e-6)``.
* ``factored_grad_eps``: added to g^2 before it enters the factored accumulators.
* ``decay_param="log1m"``: a learnable decay is ``1 - exp(10 (log(1 - b0) / 10 + o))`` with
  the offset ``o`` the meta-param (``decay_offsets``, zero at init) and ``b0`` the option's
  decay; the rms and factored decays are clipped to [0, 1].

The order of the features in the MLP's input is this module's; an importer permutes the first
layer's rows.

``fused`` (an execution option, as ``mlp``'s; ``lopt/execution.py``): on a CPU the update runs
as one C++ XLA FFI kernel per update for all leaves (``lopt/adafac_cpu.py``), built on first
use; on by default (``fused="auto"``), with a one-line notice naming the reason and the unfused
update where it cannot be built or does not take the options (``preconditioner=
"learned_optimization"``, hidden widths not a multiple of 16, ...); 24-36x optax.adam's update
at 1e6 parameters on two loaded CPU cores, against 150-220x unfused. Same meta-params, same
numbers up to float32 rounding, meta-gradients those of the unfused update; exports leave it
out. No GPU kernel: on a GPU the unfused update runs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt import execution
from lopt.base import EXECUTION_OPTION, dense_apply, dense_init, time_features

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
FACTORED_DECAYS = (0.9, 0.99, 0.999)
TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)
# Added under the reciprocal square roots (module docstring): of the second moment, and of the
# factored accumulators; learned_optimization's small_fc_lopt uses the same values.
_RSQRT_EPS_RMS = 1e-6
_RSQRT_EPS_FACTORED = 1e-8
# Added to mean(x^2) in the per-tensor feature normalisation (module docstring).
_NORM_EPS = 1e-8
FACTORED_ORDERS = ("axis", "size")
PRECONDITIONERS = ("adafactor", "learned_optimization")
DECAY_PARAMS = ("sigmoid", "log1m")


class AdafacMLPState(NamedTuple):
    accumulators: optax.Params  # per leaf a dict: m, rms and (row, col) or v; all float32
    step: jax.Array  # int32 scalar: updates taken so far


def factored_axes(shape: tuple[int, ...], order: str = "axis") -> tuple[int, int] | None:
    """(row axis, column axis) of a factored accumulator: the two largest axes in axis order
    (ties: the later axis counts as larger), or None under 2-D. The row accumulator averages
    over the column axis and the column accumulator over the row axis.

    With flax's layouts these are (in, out) of a dense kernel, the (in, out) channels of an HWIO
    conv kernel with at least 3 of each and (vocabulary, features) of an embedding table.
    ``order="size"`` gives them as (second largest, largest), learned_optimization's
    ``factored_dims`` (a stable argsort of the sizes).
    """
    if len(shape) < 2:
        return None
    by_size = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
    row, col = by_size[-2:] if order == "size" else sorted(by_size[-2:])
    return row, col


def _keep(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` reduced to 1 (an accumulator that averaged over ``axis``)."""
    return tuple(1 if i == axis else d for i, d in enumerate(shape))


def _logit(p: tuple[float, ...]) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


@lopt.register("adafac_mlp")
@dataclasses.dataclass(frozen=True)
class AdafacMLPLOpt:
    """small_fc_lopt (Metz et al. 2022, arXiv:2203.11860; accumulators, the 39 features and the
    update equation in the module docstring)."""

    hidden_size: int = 32
    hidden_layers: int = 2
    momentum_decays: tuple[float, ...] = MOMENTUM_DECAYS
    rms_decays: tuple[float, ...] = RMS_DECAYS
    factored_decays: tuple[float, ...] = FACTORED_DECAYS
    timescales: tuple[float, ...] = TIMESCALES
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    learnable_decays: bool = False
    norm_eps: float = _NORM_EPS
    factored_order: str = "axis"
    preconditioner: str = "adafactor"
    factored_grad_eps: float = 0.0
    decay_param: str = "sigmoid"
    fused: bool | str = dataclasses.field(default=execution.AUTO, metadata=EXECUTION_OPTION)
    name: ClassVar[str] = "adafac_mlp"

    def __post_init__(self):
        for field in ("momentum_decays", "rms_decays", "factored_decays", "timescales"):
            object.__setattr__(self, field, tuple(float(x) for x in getattr(self, field)))
        for field in ("momentum_decays", "rms_decays", "factored_decays"):
            decays = getattr(self, field)
            if not decays or not all(0.0 < d < 1.0 for d in decays):
                raise ValueError(f"adafac_mlp: {field} must be non-empty and in (0, 1), got {decays}")
        if len(self.factored_decays) != len(self.momentum_decays):
            raise ValueError(
                "adafac_mlp: factored_decays and momentum_decays must have the same length (the "
                "factored-preconditioned momentum pairs them), got "
                f"{self.factored_decays} and {self.momentum_decays}"
            )
        if self.hidden_layers < 0 or self.hidden_size < 1:
            raise ValueError("adafac_mlp: hidden_size must be >= 1 and hidden_layers >= 0")
        for field, allowed in (("factored_order", FACTORED_ORDERS),
                               ("preconditioner", PRECONDITIONERS), ("decay_param", DECAY_PARAMS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"adafac_mlp: {field} must be one of {allowed}, got "
                                 f"{getattr(self, field)!r}")
        for field in ("norm_eps", "factored_grad_eps"):
            object.__setattr__(self, field, float(getattr(self, field)))
            if not getattr(self, field) >= 0.0:
                raise ValueError(f"adafac_mlp: {field} must be >= 0, got {getattr(self, field)}")
        object.__setattr__(self, "fused", execution.fused_option("adafac_mlp", self.fused))
        if self.decay_param != "sigmoid" and not self.learnable_decays:
            raise ValueError(f"adafac_mlp: decay_param={self.decay_param!r} parameterises "
                             "learnable decays: it needs learnable_decays=True")

    @property
    def num_features(self) -> int:
        """Inputs of the MLP (39 with the defaults)."""
        nm, nr, nf = len(self.momentum_decays), len(self.rms_decays), len(self.factored_decays)
        return 2 + nm + nr + nm * nr + nr + 2 * nf + 4 * nf + len(self.timescales)

    def init(self, key: jax.Array) -> dict:
        sizes = (self.num_features, *([self.hidden_size] * self.hidden_layers), 2)
        meta_params = {"mlp": dense_init(key, sizes)}
        if self.learnable_decays and self.decay_param == "log1m":
            meta_params["decay_offsets"] = {
                k: jnp.zeros([len(d)], jnp.float32)
                for k, d in (("momentum", self.momentum_decays), ("rms", self.rms_decays),
                             ("factored", self.factored_decays))
            }
        elif self.learnable_decays:
            meta_params["decay_logits"] = {
                "momentum": jnp.asarray(_logit(self.momentum_decays), jnp.float32),
                "rms": jnp.asarray(_logit(self.rms_decays), jnp.float32),
                "factored": jnp.asarray(_logit(self.factored_decays), jnp.float32),
            }
        return meta_params

    def decays(self, meta_params: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(momentum, rms, factored) decays the meta-params define."""
        if self.learnable_decays and self.decay_param == "log1m":
            offsets = meta_params["decay_offsets"]
            out = []
            for k, b0 in (("momentum", self.momentum_decays), ("rms", self.rms_decays),
                          ("factored", self.factored_decays)):
                base = jnp.log(1.0 - jnp.asarray(b0, jnp.float32)) / 10.0
                b = 1.0 - jnp.exp((base + jnp.asarray(offsets[k], jnp.float32)) * 10.0)
                out.append(b if k == "momentum" else jnp.clip(b, 0.0, 1.0))
            return tuple(out)  # type: ignore[return-value]
        if self.learnable_decays:
            logits = meta_params["decay_logits"]
            return tuple(
                jax.nn.sigmoid(jnp.asarray(logits[k], jnp.float32))
                for k in ("momentum", "rms", "factored")
            )  # type: ignore[return-value]
        return tuple(
            jnp.asarray(d, jnp.float32)
            for d in (self.momentum_decays, self.rms_decays, self.factored_decays)
        )  # type: ignore[return-value]

    def optimizer(self, meta_params: dict) -> optax.GradientTransformationExtraArgs:
        nm, nr, nf = len(self.momentum_decays), len(self.rms_decays), len(self.factored_decays)

        def init_leaf(p):
            shape = jnp.shape(p)
            acc = {
                "m": jnp.zeros(shape + (nm,), jnp.float32),
                "rms": jnp.zeros(shape + (nr,), jnp.float32),
            }
            axes = factored_axes(shape, self.factored_order)
            if axes is None:
                acc["v"] = jnp.zeros(shape + (nf,), jnp.float32)
            else:
                r, c = axes
                acc["row"] = jnp.zeros(_keep(shape, c) + (nf,), jnp.float32)
                acc["col"] = jnp.zeros(_keep(shape, r) + (nf,), jnp.float32)
            return acc

        def init_fn(params):
            return AdafacMLPState(
                accumulators=jax.tree.map(init_leaf, params), step=jnp.zeros([], jnp.int32)
            )

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args
            if params is None:
                raise ValueError("the adafac_mlp learned optimizer needs `params` in update()")
            decays = self.decays(meta_params)
            layers = self.step_layers(meta_params, state.step)
            leaves, treedef = jax.tree.flatten(updates)
            args = (layers, decays, leaves, treedef.flatten_up_to(params),
                    treedef.flatten_up_to(state.accumulators))
            if sum(int(np.size(g)) for g in leaves) > 0 and execution.kernel_platform(self):
                from lopt import adafac_cpu  # the C++ kernel (kernel_platform is "cpu")

                steps, accs = adafac_cpu.fused_leaf_updates(self, *args)
            else:
                steps, accs = self.leaf_updates(*args)
            return treedef.unflatten(steps), AdafacMLPState(
                accumulators=treedef.unflatten(accs), step=state.step + 1)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    @property
    def num_normalized_features(self) -> int:
        """Features normalised per tensor (28 with the defaults); the time features follow."""
        return self.num_features - len(self.timescales)

    def step_layers(self, meta_params: dict, step: jax.Array) -> list[dict]:
        """The MLP of this step: the time features (equal for every coordinate) are folded
        into the first layer's bias, x @ W = x[:n] @ W[:n] + (t @ W[n:] + b)."""
        n = self.num_normalized_features
        t_feats = time_features(step, self.timescales, offset=1.0)
        first, rest = meta_params["mlp"][0], meta_params["mlp"][1:]
        return [{"w": first["w"][:n], "b": t_feats @ first["w"][n:] + first["b"]}, *rest]

    def factored_axes_of(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """:func:`factored_axes` of a leaf's shape in this optimizer's ``factored_order``."""
        return factored_axes(tuple(shape), self.factored_order)

    def leaf_updates(self, layers, decays, grads, params, accs) -> tuple[list, list]:
        """(updates, new accumulators), one per leaf of the flat lists ``grads``, ``params``
        and ``accs`` (a dict per leaf), with the MLP ``layers`` of :meth:`step_layers` and the
        ``decays`` of :meth:`decays`: the unfused reference computation."""
        steps, new_accs = [], []
        for g, p, acc in zip(grads, params, accs):
            feats, new_acc = self.features(g, p, acc, decays)
            # Per-feature normalisation over the tensor (Metz et al. 2019, App. D.1) is folded
            # into the first layer, so no normalised copy of the features is built:
            #   norm(f) @ W[:n] + b  =  f @ (s * W[:n]) + b.
            axes = tuple(range(feats.ndim - 1))
            s = jax.lax.rsqrt(jnp.mean(jnp.square(feats), axis=axes) + self.norm_eps)  # [n]
            layer0 = {"w": s[:, None] * layers[0]["w"], "b": layers[0]["b"]}
            out = dense_apply([layer0, *layers[1:]], feats)
            direction, magnitude = out[..., 0], out[..., 1]
            step = direction * jnp.exp(magnitude * self.exp_mult) * self.step_mult
            steps.append((-step).astype(jnp.result_type(g)))
            new_accs.append(new_acc)
        return steps, new_accs

    def features(self, g, p, acc: dict, decays) -> tuple[jax.Array, dict]:
        """(the 28 unnormalised features of the module docstring's table, leaf.shape + (28,),
        with the defaults; the updated accumulators) of one leaf."""
        b_m, b_rms, b_fac = decays
        nm, nr = len(self.momentum_decays), len(self.rms_decays)
        g32 = jnp.asarray(g, jnp.float32)[..., None]
        p32 = jnp.asarray(p, jnp.float32)[..., None]
        g2 = jnp.square(g32)
        g2_fac = g2 + self.factored_grad_eps if self.factored_grad_eps else g2
        m = b_m * acc["m"] + (1.0 - b_m) * g32
        rms = b_rms * acc["rms"] + (1.0 - b_rms) * g2
        axes = factored_axes(jnp.shape(g), self.factored_order)
        lopt_style = self.preconditioner == "learned_optimization"
        if axes is None:  # under 2-D: Adafactor's unfactored accumulator for vectors
            v = b_fac * acc["v"] + (1.0 - b_fac) * g2_fac
            new_acc = {"m": m, "rms": rms, "v": v}
            row = col = v
            if lopt_style:
                g_pre = g32 * jax.lax.rsqrt(jnp.maximum(v + 1e-9, 1e-9))
                m_pre = m * jax.lax.rsqrt(v + 1e-6)
            else:
                rsqrt_v = jax.lax.rsqrt(v + _RSQRT_EPS_FACTORED)
                g_pre, m_pre = g32 * rsqrt_v, m * rsqrt_v
        else:  # Adafactor Sec. 3: R, C and V_hat = R C / 1^T R (as means)
            r, c = axes
            row = b_fac * acc["row"] + (1.0 - b_fac) * jnp.mean(g2_fac, axis=c, keepdims=True)
            col = b_fac * acc["col"] + (1.0 - b_fac) * jnp.mean(g2_fac, axis=r, keepdims=True)
            new_acc = {"m": m, "rms": rms, "row": row, "col": col}
            row_mean = jnp.mean(row, axis=r, keepdims=True)
            if lopt_style:
                row_f = jax.lax.rsqrt(jnp.maximum(row / (row_mean + 1e-9), 1e-9))
                col_f = jax.lax.rsqrt(jnp.maximum(col, 1e-9))
                g_pre, m_pre = g32 * row_f * col_f, m * row_f * col_f
            else:
                rsqrt_v = jax.lax.rsqrt(row * col / (row_mean + _RSQRT_EPS_FACTORED)
                                        + _RSQRT_EPS_FACTORED)
                g_pre, m_pre = g32 * rsqrt_v, m * rsqrt_v
        full = jnp.shape(g32)[:-1]
        nf = jnp.shape(row)[-1]
        rsqrt_rms = jax.lax.rsqrt(rms + _RSQRT_EPS_RMS)  # [..., nr]
        m_div_rms = (m[..., :, None] * rsqrt_rms[..., None, :]).reshape(full + (nm * nr,))
        feats = jnp.concatenate(
            [
                g32,
                p32,
                m,
                rms,
                m_div_rms,
                rsqrt_rms,
                jnp.broadcast_to(g_pre, full + (nf,)),
                jnp.broadcast_to(m_pre, full + (nf,)),
                jnp.broadcast_to(row, full + (nf,)),
                jnp.broadcast_to(col, full + (nf,)),
                jnp.broadcast_to(jax.lax.rsqrt(row + _RSQRT_EPS_FACTORED), full + (nf,)),
                jnp.broadcast_to(jax.lax.rsqrt(col + _RSQRT_EPS_FACTORED), full + (nf,)),
            ],
            axis=-1,
        )
        return feats, new_acc
