"""The ``adafac_mlp`` learned optimizer's fused update on a CPU: a C++ XLA FFI kernel
(``lopt/kernels/adafac_update_cpu.cc``), run by ``lopt.get("adafac_mlp")`` (``fused="auto"``,
the default) or ``fused=True`` when JAX runs on the CPU.

What it computes is :meth:`lopt.adafac.AdafacMLPLOpt.leaf_updates` (small_fc_lopt, Metz et al.
2022, arXiv:2203.11860, with Adafactor's factored second moments, Shazeer & Stern 2018,
Sec. 3; the accumulators, the 39 features and the update equation are in ``lopt/adafac.py``'s
docstring), all of it but the last elementwise step in one call for all leaves. Per leaf and
batch entry it makes three passes (the kernel's header says how): the factored row and column
accumulators (sums of g^2 over a tensor's column and row axes in double), then the momenta,
second moments and the per-coordinate features with the sums of their squares behind the
per-tensor normalisation (float32 partial sums of at most 16 terms, added in double in a fixed
order, as ``lopt/mlp_cpu.py``), then the features again and the MLP, 16 coordinates at a time
with the hidden activations in registers and L1. XLA takes the step
-o_1 exp(o_2 exp_mult) step_mult from the kernel's two outputs and computes the time features'
part of the first layer (the same for every coordinate) once per step.

Departures from the unfused update, all at float32 rounding (tests/lopt/test_adafac_fused.py
bounds them): means over the tensor are summed in double and rounded once, where XLA rounds its
own float32 reductions; the MLP's sums run in another order (for blocks of 16 coordinates
inside one row, the row and column features' part of the first layer is summed once per
accumulator entry and added as a bias); reciprocal square roots are 1 / sqrt(x) (two correctly
rounded operations). The new state overwrites the old in place (``input_output_aliases``).

Speed (scripts/benchmark_optimizers.py --fused, 2 loaded AMD EPYC cores with AVX-512): about
14x, 24-36x and 22-25x optax.adam's update at 1e5, 1e6 and 1e7 parameters, against 47-218x
unfused. The floor is the MLP: 1600 multiply-adds a coordinate (1984 off the fast path), 100
cycles at one 16-lane FMA per cycle, against Adam's ~24 bytes of memory traffic (about 18x at
1e6 on one core here); the features' two passes and the accumulator pass add about a third.

Gradients: :func:`fused_leaf_updates` is a ``jax.custom_vjp`` whose backward pass is the VJP of
the unfused :meth:`AdafacMLPLOpt.leaf_updates` on the same inputs (recomputed), as
``lopt/mlp_fused.py`` does for ``mlp``: meta-gradients through the fused update are the unfused
update's. No forward-mode rule.

Building: as ``lopt/mlp_cpu.py`` (its compiler, flags and cache directory), on first use, into
``$LOPT_CACHE_DIR/adafac_update_cpu-<key>.so``, the key hashing the source and its header
(``lopt/kernels/adafac_update_cpu.h``). Where it cannot be built or does not take the
architecture (:func:`unsupported`), ``fused`` computes the unfused update with a one-line notice
naming the reason.

Supported: ``preconditioner="adafactor"`` (the default), either ``factored_order``, any
``norm_eps`` and ``factored_grad_eps``, learnable decays of either parameterisation (they are
operands), ``hidden_layers >= 1`` with ``hidden_size`` a multiple of 16 up to 256, up to 8 decays
of each kind; leaves of any float dtype (the update computes in float32, as the unfused one).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lopt import execution, mlp_cpu

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels",
                      "adafac_update_cpu.cc")
HEADER = SOURCE[:-3] + ".h"  # included by SOURCE; part of the build key
TARGET = "lopt_adafac_update_cpu"


@functools.lru_cache(maxsize=None)
def _build() -> tuple[str | None, str]:
    """(path of the built library or None, why not): ``lopt/mlp_cpu.py``'s build of this
    source (the header is part of the key)."""
    return mlp_cpu.build((SOURCE, HEADER, mlp_cpu.PARALLEL_FOR), "adafac_update_cpu")


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(whether the kernel is built and registered with XLA, why not)."""
    return mlp_cpu.register(_build(), "LoptAdafacUpdate", TARGET)


def unsupported(learned_opt) -> str:
    """Why this architecture cannot use the kernel ('' when it can)."""
    lo = learned_opt
    if lo.preconditioner != "adafactor":
        return f"preconditioner={lo.preconditioner!r} is not in the kernel"
    if lo.hidden_layers < 1:
        return "hidden_layers=0 (a linear model) is not in the kernel"
    if lo.hidden_layers > 17:
        return f"hidden_layers={lo.hidden_layers} (the kernel takes up to 17)"
    if lo.hidden_size % 16 or lo.hidden_size > 256:
        return f"hidden_size={lo.hidden_size} is not a multiple of 16 up to 256"
    counts = (len(lo.momentum_decays), len(lo.rms_decays), len(lo.factored_decays))
    if max(counts) > 8:
        return f"{counts} momentum, rms, factored decays (the kernel takes up to 8 of each)"
    if lo.num_features - len(lo.timescales) > 64:
        return f"{lo.num_features - len(lo.timescales)} features (the kernel takes up to 64)"
    return ""


def usable(learned_opt) -> bool:
    """Whether ``fused`` runs this kernel here; a one-line notice, once per reason, when not."""
    reason = unsupported(learned_opt) or available()[1]
    if reason:
        execution.notice(f"adafac_mlp fused={learned_opt.fused!r}: the C++ CPU kernel is not "
                         f"used ({reason}); computing the unfused update instead (same numbers, "
                         "slower)")
    return not reason


def geometry(shape: tuple[int, ...], axes: tuple[int, int] | None) -> tuple[int, ...]:
    """(factored, swap, A, X, B, Y, D): a tensor of rank >= 2 as (A, X, B, Y, D) with X, Y its
    factored axes ``axes`` (``lopt.adafac.factored_axes``: row, column) in axis order (``swap``:
    the row axis is the later one); under 2-D (``axes`` None) (0, 0, 1, 1, 1, n, 1)."""
    if axes is None:
        return (0, 0, 1, 1, 1, int(np.prod(shape, dtype=np.int64)), 1)
    lo, hi = sorted(axes)
    size = lambda dims: int(np.prod(dims, dtype=np.int64))
    return (1, int(axes[0] > axes[1]), size(shape[:lo]), int(shape[lo]),
            size(shape[lo + 1:hi]), int(shape[hi]), size(shape[hi + 1:]))


def _leaves(learned_opt, layers, decays, grads, params, accs) -> tuple[list, list]:
    """Non-empty leaves: (updates, new accumulators) from one kernel call."""
    nm, nr, nf = (len(learned_opt.momentum_decays), len(learned_opt.rms_decays),
                  len(learned_opt.factored_decays))
    sizes = [int(np.size(g)) for g in grads]
    # The factored axes come from the optimizer (lopt/adafac.py), which imports this module.
    geo = [geometry(jnp.shape(g), learned_opt.factored_axes_of(jnp.shape(g))) for g in grads]
    state, shapes = [], []
    for acc, gm in zip(accs, geo):
        names = ("m", "rms", "row", "col") if gm[0] else ("m", "rms", "v")
        for name in names:
            # In the state's own shape (the kernel reads only sizes): a reshape here costs a
            # copy of the whole state on each side of the call.
            x = jnp.asarray(acc[name], jnp.float32)
            shapes.append((name, jnp.shape(x)))
            state.append(x)
    weights = [jnp.asarray(x, jnp.float32) for layer in layers for x in (layer["w"], layer["b"])]
    k = len(grads)
    results = jax.ffi.ffi_call(
        TARGET,
        [jax.ShapeDtypeStruct((n, 2), jnp.float32) for n in sizes]
        + [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in state],
        vmap_method="broadcast_all",
        input_output_aliases={2 * k + i: k + i for i in range(len(state))},
    )(*[jnp.asarray(g, jnp.float32).reshape(n) for g, n in zip(grads, sizes)],
      *[jnp.asarray(p, jnp.float32).reshape(n) for p, n in zip(params, sizes)],
      *state, jnp.concatenate([jnp.asarray(d, jnp.float32).reshape(-1) for d in decays]),
      *weights,
      geometry=np.asarray(geo, np.int64).reshape(-1), nm=np.int32(nm), nr=np.int32(nr),
      nf=np.int32(nf), norm_eps=np.float32(learned_opt.norm_eps),
      grad_eps=np.float32(learned_opt.factored_grad_eps))
    steps, new_accs, i = [], [], k
    for g, gm, out in zip(grads, geo, results[:k]):
        step = out[:, 0] * jnp.exp(out[:, 1] * learned_opt.exp_mult) * learned_opt.step_mult
        steps.append((-step).reshape(jnp.shape(g)).astype(jnp.result_type(g)))
        acc = {}
        for _ in range(4 if gm[0] else 3):
            name, shape = shapes[i - k]
            acc[name] = results[i].reshape(shape)
            i += 1
        new_accs.append(acc)
    return steps, new_accs


def forward(learned_opt, layers, decays, grads, params, accs) -> tuple[list, list]:
    """(updates, new accumulators) per leaf: one kernel call for all non-empty leaves."""
    full = [i for i, g in enumerate(grads) if np.size(g) > 0]
    steps, new_accs = list(grads), list(accs)
    for i, g in enumerate(grads):
        if np.size(g) == 0:
            s, a = learned_opt.leaf_updates(layers, decays, [g], [params[i]], [accs[i]])
            steps[i], new_accs[i] = s[0], a[0]
    if full:
        picked = ([x[i] for i in full] for x in (grads, params, accs))
        s, a = _leaves(learned_opt, layers, decays, *picked)
        for i, si, ai in zip(full, s, a):
            steps[i], new_accs[i] = si, ai
    return steps, new_accs


def fused_leaf_updates(learned_opt, layers, decays, grads, params, accs) -> tuple[list, list]:
    """:meth:`AdafacMLPLOpt.leaf_updates` computed by the kernel, or by itself (with the notice
    of :func:`usable`) where the kernel cannot run. Differentiable (reverse mode): the backward
    pass is the unfused update's VJP."""
    if not usable(learned_opt):
        return learned_opt.leaf_updates(layers, decays, grads, params, accs)

    @jax.custom_vjp
    def run(layers, decays, grads, params, accs):
        return forward(learned_opt, layers, decays, grads, params, accs)

    def run_fwd(*args):
        return forward(learned_opt, *args), args

    def run_bwd(residuals, cotangents):
        outputs, vjp = jax.vjp(learned_opt.leaf_updates, *residuals)
        # As lopt/mlp_fused.py: inside shard_map a cotangent can arrive device-invariant where
        # the reference's VJP wants its output's type; adding a zero of that type gives it.
        return vjp(jax.tree.map(lambda c, o: c + jnp.zeros_like(o), cotangents, outputs))

    run.defvjp(run_fwd, run_bwd)
    return run(list(layers), tuple(decays), list(grads), list(params), list(accs))
