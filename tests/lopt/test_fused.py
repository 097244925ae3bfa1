"""``lopt.get("mlp", fused=True)``: the Pallas kernel of lopt/mlp_fused.py, interpreted on the
CPU, gives the unfused update's numbers (eager, jitted, vmapped, differentiated), lowers to
Triton IR for a GPU, and is an execution option that exports leave out unless it is set.

Tolerances (float32, eps = 2^-23 ~ 1.19e-7):

* momenta: m <- d m + (1 - d) g is the same expression on both paths; they may differ only by
  XLA contracting a multiply-add into an FMA on one side, at most 2 roundings of at most
  eps * max|g| each per step (|m| <= max|g|), not amplified by the recurrence (d < 1):
  ``2 * steps * eps * max|g|``.
* updates: the features and scales are the same expressions too (to the ulps above); what
  differs is the summation order inside the MLP (the kernel's multiply-adds and row sums
  against XLA's reductions and matmuls). Two orders of a K-term sum each lie within K * eps of
  the exact sum (times the sum of the terms' magnitudes), and the sums chain through the first
  layer (n_in + 1 terms: features and the time bias) and the output layer (H + 1 terms), so we
  allow ``2 * (H + n_in + 2) * eps`` of the largest update magnitude (9.8e-6 for H = 32, n_in =
  7). Measured: about 3e-7 of it (a few ulps).

Shapes are tiny and the block is 128 coordinates (interpret mode runs the grid as a loop):
leaves of 221, 40, 1 and 128 coordinates, three of them not a multiple of the block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt
from lopt import export, mlp_fused
from lopt.base import config_of

EPS = float(np.finfo(np.float32).eps)
BLOCK = 128
STEPS = 4


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(mlp_fused, "DEFAULT_BLOCK_SIZE", BLOCK)


def _params(key=jax.random.PRNGKey(2), scale=1.0):
    k = jax.random.split(key, 4)
    return {
        "dense": {"kernel": scale * jax.random.normal(k[0], (13, 17)),
                  "bias": scale * jax.random.normal(k[1], (40,))},
        "scale": jnp.asarray(0.3 * scale),
        "block": scale * jax.random.normal(k[2], (BLOCK,)),  # exactly one block
    }


def _grads(params, step):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p + 1.0 + 0.7 * step) * (1.0 + 0.5 * step), params)


def _meta_params(learned_opt, key=jax.random.PRNGKey(1)):
    """Random meta-params (not the init): nonzero biases, O(1) outputs, so steps vary."""
    template = learned_opt.init(jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        jax.random.normal(k, x.shape) * (1.0 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.5)
        for k, x in zip(keys, leaves)
    ])


def _run(learned_opt, meta_params, params, steps=STEPS):
    """(stacked updates, final state) of ``steps`` updates at fixed params."""
    opt = learned_opt.optimizer(meta_params)

    def body(state, i):
        updates, state = opt.update(_grads(params, i), state, params)
        return state, updates

    state, updates = jax.lax.scan(body, opt.init(params), jnp.arange(steps, dtype=jnp.float32))
    return updates, state


_run_jit = jax.jit(_run, static_argnums=(0, 3))


def _assert_close(learned_opt, ref, fused, max_abs_g, steps):
    """Updates and state of the two paths within the tolerances of the module docstring;
    returns the largest update difference relative to the largest update."""
    (u_ref, s_ref), (u_fus, s_fus) = ref, fused
    assert jax.tree.structure(u_ref) == jax.tree.structure(u_fus)
    u_scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u_ref))
    assert u_scale > 0
    u_tol = 2 * (learned_opt.hidden_size + learned_opt.num_normalized_features + 2) * EPS * u_scale
    worst = 0.0
    for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_fus)):
        assert a.shape == b.shape and a.dtype == b.dtype
        diff = float(jnp.max(jnp.abs(a - b)))
        assert diff <= u_tol, (diff, u_tol)
        worst = max(worst, diff / u_scale)
    np.testing.assert_array_equal(s_ref.step, s_fus.step)
    m_tol = 2 * steps * EPS * max_abs_g
    for a, b in zip(jax.tree.leaves(s_ref.momenta), jax.tree.leaves(s_fus.momenta)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert float(jnp.max(jnp.abs(a - b))) <= m_tol
    return worst


def _max_abs_grad(params, steps):
    return max(float(jnp.max(jnp.abs(x)))
               for i in range(steps) for x in jax.tree.leaves(_grads(params, i)))


def test_eager_steps_match_unfused():
    ref_lo = lopt.get("mlp")
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    meta_params = _meta_params(ref_lo)
    params = _params()
    ref, fus = ref_lo.optimizer(meta_params), fus_lo.optimizer(meta_params)
    s_ref, s_fus = ref.init(params), fus.init(params)
    steps = 3
    for i in range(steps):
        u_ref, s_ref = ref.update(_grads(params, i), s_ref, params)
        u_fus, s_fus = fus.update(_grads(params, i), s_fus, params)
        _assert_close(ref_lo, (u_ref, s_ref), (u_fus, s_fus), _max_abs_grad(params, steps), i + 1)
    assert int(s_fus.step) == steps


@pytest.mark.parametrize("hidden_size,hidden_layers", [(32, 1), (5, 2), (4, 0)])
def test_jitted_steps_match_unfused(hidden_size, hidden_layers):
    """The default MLP; two hidden layers of a width that is padded (5 -> 16) with a middle
    matmul; no hidden layer (a linear model of the features)."""
    ref_lo = lopt.get("mlp", hidden_size=hidden_size, hidden_layers=hidden_layers)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    meta_params = _meta_params(ref_lo)
    params = _params()
    ref = _run_jit(ref_lo, meta_params, params, STEPS)
    fus = _run_jit(fus_lo, meta_params, params, STEPS)
    worst = _assert_close(ref_lo, ref, fus, _max_abs_grad(params, STEPS), STEPS)
    assert worst < 2e-6  # what it measures (~3e-7), well inside the derived bound


def test_vmap_over_two_param_sets():
    ref_lo = lopt.get("mlp")
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    meta_params = _meta_params(ref_lo)
    p1, p2 = _params(), _params(jax.random.PRNGKey(5), scale=0.1)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p1, p2)
    run = lambda lo: jax.jit(jax.vmap(lambda p: _run(lo, meta_params, p)))(stacked)
    ref, fus = run(ref_lo), run(fus_lo)
    for i, p in enumerate((p1, p2)):
        pick = lambda tree: jax.tree.map(lambda x: x[i], tree)
        _assert_close(ref_lo, pick(ref), pick(fus), _max_abs_grad(p, STEPS), STEPS)
    # The vmapped fused run is the fused run of each set alone.
    alone = _run_jit(fus_lo, meta_params, p2, STEPS)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(jax.tree.map(lambda x: x[1], fus))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(a))) + 1e-30)


def test_meta_gradient_is_the_unfused_one():
    """The custom VJP's backward pass is the unfused reference's: same meta-gradient."""
    ref_lo = lopt.get("mlp")
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    params = _params()

    def loss(meta_params, lo):
        updates, _ = _run(lo, meta_params, params, steps=2)
        return sum(jnp.sum(jnp.square(u)) for u in jax.tree.leaves(updates))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    meta_params = _meta_params(ref_lo)
    g_ref, g_fus = grad(meta_params, ref_lo), grad(meta_params, fus_lo)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fus)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_gpu_path_lowers_to_triton():
    """The compiled (non-interpreted) kernel lowers to a Triton custom call for CUDA, checked
    on the CPU by cross-platform lowering (nothing is compiled or run)."""
    learned_opt = lopt.get("mlp")
    layers = learned_opt.step_layers(_meta_params(learned_opt), jnp.int32(3))
    n, d = 2 * BLOCK, len(learned_opt.decays)
    g, m, scales = jnp.zeros((n,)), jnp.zeros((d, n)), jnp.ones((n // BLOCK, 8))
    call = lambda *a: mlp_fused.fused_call(learned_opt, *a, BLOCK, interpret=False)
    try:
        lowered = jax.jit(call).trace(layers, g, g, m, scales).lower(lowering_platforms=("cuda",))
    except (ImportError, NotImplementedError) as e:  # a jaxlib without the Triton lowering
        pytest.skip(f"no Triton lowering here: {e}")
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_option_config_and_export(tmp_path):
    plain, fused = lopt.get("mlp"), lopt.get("mlp", fused=True)
    assert plain.fused is False and fused.fused is True and plain != fused
    with pytest.raises(ValueError, match="fused"):
        lopt.get("mlp", fused="yes")
    # Left out of the config at its default (exports unchanged), written when set.
    assert "fused" not in config_of(plain)
    assert config_of(fused)["fused"] is True
    assert "fused" not in config_of(fused, architecture_only=True)
    meta_params = _meta_params(plain)
    path = export.save(tmp_path / "fused.safetensors", fused, meta_params)
    loaded, mp = export.load(path)
    assert loaded == fused
    path = export.save(tmp_path / "plain.safetensors", plain, meta_params)
    assert "fused" not in export.read_metadata(path)["architecture"]["config"]
    assert export.load(path)[0] == plain
    # An export loads into the same architecture fused or not (not an architecture difference).
    assert export.load(path, fused)[0] is fused
    with pytest.raises(export.ArchitectureMismatchError, match="hidden_size"):
        export.load(path, lopt.get("mlp", hidden_size=8, fused=True))
