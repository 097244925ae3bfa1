"""The ``mlp`` learned optimizer's update as one Pallas kernel (``lopt.get("mlp", fused=True)``).

What it fuses. Per coordinate, :meth:`lopt.mlp.MLPLOpt.leaf_updates` (the default, unfused
path) updates the momenta ``m_d <- decay_d m_d + (1 - decay_d) g``, builds the features
``[g, p, m_1 .. m_D]``, each times its tensor's ``1 / sqrt(mean(x^2) + 1e-8)``, runs the ReLU
MLP whose first layer carries the time features as a per-step bias (:meth:`step_layers`), and
returns ``-o_1 exp(o_2 exp_mult) step_mult``. Under XLA that writes the features (2 + D floats
per coordinate) and every hidden layer (``hidden_size`` floats per coordinate, 32 by default) to
memory and reads them back. The kernel below does all of it for a block of coordinates in
registers: it reads g, p and the old momenta of the block, writes the new momenta and the
update, and nothing else touches memory; the weights (a few KB) are whole-array inputs of every
block.

What stays outside the kernel (plain jnp): the per-tensor normalisation scales, which are
reductions over a whole leaf (XLA fuses the momentum update into that reduction, so it is one
read of g, p and m); the time-feature bias of the first layer; and the packing of the leaves
into flat, block-padded buffers (and back). Each leaf is padded to a multiple of the block
size, so every block lies in one leaf and gets that leaf's scales from a per-block table
[num_blocks, 2 + D]; padding coordinates are zeros whose outputs are sliced away. Momenta are
packed feature-major, [D, coordinates], so a block reads D contiguous rows.

Where it runs. On a GPU (``jax.default_backend() == "gpu"``) the kernel is compiled with
Triton (array shapes are powers of two there: the hidden width is zero-padded to a power of two
>= 16, which changes no number). On a CPU ``fused=True`` runs the C++ kernel of
``lopt/mlp_cpu.py`` instead (same split of the work, no packing); with ``CPU_KERNEL = "pallas"``
this kernel runs there with Pallas' ``interpret=True``: correct, for tests, and far slower than
the unfused path. GPU timing::

    python scripts/benchmark_optimizers.py --optimizers=mlp --fused --sizes=1e7,1e8

Gradients. The update is a ``jax.custom_vjp``: the forward pass is the kernel, the backward
pass is the VJP of the unfused reference on the same inputs (recomputed), so meta-gradients
(TBPTT, merged estimators) through a fused optimizer equal those of the unfused one. There is
no forward-mode (JVP) rule.

Numbers. Same operations in the same order as the unfused path except the order of the sums
inside the MLP layers (the reference uses XLA reductions and matmuls), so results agree to
float32 rounding (tests/lopt/test_fused.py bounds the difference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lopt.base import tensor_rms_scale

#: Coordinates per kernel instance (a power of two; Triton needs one). 256 coordinates x 32
#: hidden units is 64 float32 registers per thread at 4 warps. Not tuned.
DEFAULT_BLOCK_SIZE = 256
#: Triton launch parameters on a GPU (not tuned).
NUM_WARPS = 4
NUM_STAGES = 1
#: Hidden widths are zero-padded to a power of two at least this (Triton's dot needs >= 16).
MIN_HIDDEN = 16
#: The kernel ``fused=True`` runs when JAX's default backend is the CPU: "cpu", the C++ kernel
#: of lopt/mlp_cpu.py (fast); "pallas", the kernel below interpreted (a correctness check of the
#: GPU kernel, far slower than the unfused update; tests/lopt/test_fused.py sets it).
CPU_KERNEL = "cpu"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _kernel(*refs, decays, num_mid, has_hidden, exp_mult, step_mult):
    """The fused ``mlp`` update of one block of B coordinates (see the module docstring).

    Fuses, per coordinate and in registers: the momentum update m_d <- decay_d m_d +
    (1 - decay_d) g (stored), the features [g, p, m_1 .. m_D] times their tensor's scales, the
    ReLU MLP (first layer with the time features already folded into its bias) and the step
    -o_1 exp(o_2 exp_mult) step_mult (stored); no activation goes to memory. Compiled with
    Triton on a GPU (time it with ``python scripts/benchmark_optimizers.py --optimizers=mlp
    --fused --sizes=1e7,1e8``); on a CPU it runs with ``interpret=True``, for correctness
    only, far slower than the unfused update.

    Refs, in order: g [B], p [B], m [D, B], scales [1, S] (this block's leaf: g, p, m_1..m_D,
    zero-padded to S), w0 [n_in, H] (or [n_in, 2] with no hidden layer), b0 [H], then per
    middle layer w^T [H, H] and b [H], then (with hidden layers) the output layer's w [H, 2]
    and b [2]; outputs: update [B], new momenta [D, B]."""
    g_ref, p_ref, m_ref, s_ref, w0_ref, b0_ref = refs[:6]
    mid_refs = refs[6 : 6 + 2 * num_mid]
    upd_ref, m_out_ref = refs[-2:]
    g = g_ref[...]
    p = p_ref[...]
    # Features in registers: the same products, in the same order, as the unfused path.
    feats = [g * s_ref[0, 0], p * s_ref[0, 1]]
    for d, decay in enumerate(decays):
        dec = np.float32(decay)
        m = dec * m_ref[d, :] + (np.float32(1.0) - dec) * g
        m_out_ref[d, :] = m
        feats.append(m * s_ref[0, 2 + d])

    if has_hidden:
        # First layer as elementwise multiply-adds over the few features: [H, B].
        acc = None
        for k, f in enumerate(feats):
            term = f[None, :] * w0_ref[k, :][:, None]
            acc = term if acc is None else acc + term
        h = jnp.maximum(acc + b0_ref[...][:, None], 0.0)
        for i in range(num_mid):
            w_t, b = mid_refs[2 * i], mid_refs[2 * i + 1]
            h = jnp.dot(w_t[...], h, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
            h = jnp.maximum(h + b[...][:, None], 0.0)
        wl_ref, bl_ref = refs[6 + 2 * num_mid], refs[7 + 2 * num_mid]
        out = [jnp.sum(h * wl_ref[:, j][:, None], axis=0) + bl_ref[j] for j in range(2)]
    else:  # a linear model of the features
        out = []
        for j in range(2):
            acc = None
            for k, f in enumerate(feats):
                term = f * w0_ref[k, j]
                acc = term if acc is None else acc + term
            out.append(acc + b0_ref[j])
    step = out[0] * jnp.exp(out[1] * exp_mult) * step_mult
    upd_ref[...] = -step


def _full(x: jax.Array) -> pl.BlockSpec:
    """A whole-array input of every block."""
    return pl.BlockSpec(x.shape, lambda i, n=x.ndim: (0,) * n)


def _padded_weights(layers: list[dict], hidden: bool) -> list[jax.Array]:
    """The kernel's weight inputs (see :func:`_kernel`), hidden width zero-padded to a power
    of two >= MIN_HIDDEN: the padded units are ReLU(0) = 0 with zero outgoing weights."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    if not hidden:
        return [f32(layers[0]["w"]), f32(layers[0]["b"])]
    h = layers[0]["w"].shape[1]
    pad = max(MIN_HIDDEN, _next_pow2(h)) - h
    out = [jnp.pad(f32(layers[0]["w"]), ((0, 0), (0, pad))), jnp.pad(f32(layers[0]["b"]), (0, pad))]
    for layer in layers[1:-1]:
        w_t = jnp.pad(f32(layer["w"]).T, ((0, pad), (0, pad)))
        out += [w_t, jnp.pad(f32(layer["b"]), (0, pad))]
    out += [jnp.pad(f32(layers[-1]["w"]), ((0, pad), (0, 0))), f32(layers[-1]["b"])]
    return out


def fused_call(
    learned_opt, layers, g, p, m, scales, block_size: int, interpret: bool | None = None
):
    """The kernel over packed buffers: ``g``, ``p`` [N] and ``m`` [D, N] float32 with N a
    multiple of ``block_size``, ``scales`` [N / block_size, S] (S >= 2 + D), ``layers`` those of
    :meth:`MLPLOpt.step_layers`. Returns (update [N], new momenta [D, N]). ``interpret``: None
    chooses from ``jax.default_backend()`` (compiled on "gpu", interpreted otherwise)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    num_dec = len(learned_opt.decays)
    n = g.shape[0]
    if block_size < 1 or block_size & (block_size - 1) or n % block_size:
        raise ValueError(f"block_size must be a power of two dividing {n}, got {block_size}")
    hidden = learned_opt.hidden_layers > 0
    weights = _padded_weights(layers, hidden)
    kernel = functools.partial(
        _kernel,
        decays=learned_opt.decays,
        num_mid=max(0, learned_opt.hidden_layers - 1),
        has_hidden=hidden,
        exp_mult=learned_opt.exp_mult,
        step_mult=learned_opt.step_mult,
    )
    coords = pl.BlockSpec((block_size,), lambda i: (i,))
    rows = pl.BlockSpec((num_dec, block_size), lambda i: (0, i))
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        extra["compiler_params"] = pltriton.CompilerParams(
            num_warps=NUM_WARPS, num_stages=NUM_STAGES
        )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((n,), jnp.float32),
            jax.ShapeDtypeStruct((num_dec, n), jnp.float32),
        ),
        grid=(n // block_size,),
        in_specs=[coords, coords, rows, pl.BlockSpec((1, scales.shape[1]), lambda i: (i, 0))]
        + [_full(w) for w in weights],
        out_specs=(coords, rows),
        interpret=interpret,
        name="mlp_lopt_fused_update",
        **extra,
    )(g, p, m, scales, *weights)


def _forward(learned_opt, block_size, layers, grads, params, momenta):
    """Pack the leaves, compute the per-tensor scales, run the kernel, unpack."""
    num_dec = len(learned_opt.decays)
    decays = jnp.asarray(learned_opt.decays, jnp.float32)
    width = _next_pow2(2 + num_dec)  # the scale table's row (a power of two for Triton)
    gs, ps, ms, table, blocks = [], [], [], [], []
    for g, p, m in zip(grads, params, momenta):
        g32 = jnp.asarray(g, jnp.float32)
        p32 = jnp.asarray(p, jnp.float32)
        m32 = jnp.asarray(m, jnp.float32)
        n = int(np.size(g))
        nb = -(-n // block_size)
        blocks.append(nb)
        if nb == 0:
            continue
        axes = tuple(range(g32.ndim))
        # The reductions over the whole tensor, as the unfused path computes them; the new
        # momenta here only feed their reduction (the kernel recomputes and stores them).
        m_new = decays * m32 + (1.0 - decays) * g32[..., None]
        scale = jnp.concatenate([
            tensor_rms_scale(g32[..., None], axes).reshape(1),
            tensor_rms_scale(p32[..., None], axes).reshape(1),
            tensor_rms_scale(m_new, axes).reshape(num_dec),
        ])
        pad = nb * block_size - n
        gs.append(jnp.pad(g32.reshape(n), (0, pad)))
        ps.append(jnp.pad(p32.reshape(n), (0, pad)))
        ms.append(jnp.pad(m32.reshape(n, num_dec).T, ((0, 0), (0, pad))))
        table.append(jnp.broadcast_to(jnp.pad(scale, (0, width - 2 - num_dec)), (nb, width)))
    upd, m_out = fused_call(
        learned_opt, layers, jnp.concatenate(gs), jnp.concatenate(ps),
        jnp.concatenate(ms, axis=1), jnp.concatenate(table), block_size,
    )
    steps, new_momenta, start = [], [], 0
    for g, nb in zip(grads, blocks):
        n, shape = int(np.size(g)), jnp.shape(g)
        steps.append(upd[start : start + n].reshape(shape).astype(jnp.result_type(g)))
        new_momenta.append(m_out[:, start : start + n].T.reshape(shape + (num_dec,)))
        start += nb * block_size
    return steps, new_momenta


def fused_leaf_updates(learned_opt, layers, grads, params, momenta, block_size: int | None = None):
    """:meth:`lopt.mlp.MLPLOpt.leaf_updates` computed by a fused kernel: (updates, new momenta)
    per leaf. On a CPU (``CPU_KERNEL == "cpu"``) the C++ kernel of ``lopt/mlp_cpu.py``, or the
    unfused update with a warning where that kernel cannot be built or does not take this
    architecture; elsewhere the Pallas kernel above. Differentiable (reverse mode): the backward
    pass is the unfused reference's VJP."""
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if jax.default_backend() == "cpu" and CPU_KERNEL == "cpu":
        from lopt import mlp_cpu

        if not mlp_cpu.usable(learned_opt):
            return learned_opt.leaf_updates(layers, grads, params, momenta)
        forward = functools.partial(mlp_cpu.forward, learned_opt)
    else:
        if learned_opt.bf16_hidden:
            from lopt import mlp_cpu

            mlp_cpu._warn_bf16_once("the bfloat16 middle layers are in the CPU kernel only, "
                                    "not in the Pallas kernel")
        forward = functools.partial(_forward, learned_opt, block_size)

    @jax.custom_vjp
    def run(layers, grads, params, momenta):
        return forward(layers, grads, params, momenta)

    def run_fwd(layers, grads, params, momenta):
        out = forward(layers, grads, params, momenta)
        return out, (layers, grads, params, momenta)

    def run_bwd(residuals, cotangents):
        outputs, vjp = jax.vjp(learned_opt.leaf_updates, *residuals)
        # Inside shard_map (TBPTT differentiates there) a cotangent can arrive device-invariant
        # (e.g. a zero one) where the reference's VJP wants its output's type, varying over the
        # particle axis: adding a zero of that type gives it.
        return vjp(jax.tree.map(lambda c, o: c + jnp.zeros_like(o), cotangents, outputs))

    run.defvjp(run_fwd, run_bwd)
    return run(list(layers), list(grads), list(params), list(momenta))
