"""``lopt.get("mlp", fused=True)``: both of its kernels give the unfused update's numbers
(eager, jitted, vmapped, differentiated): the C++ CPU kernel of lopt/mlp_cpu.py (what the option
runs on a CPU) and the Pallas kernel of lopt/mlp_fused.py (interpreted here; it lowers to Triton
IR for a GPU). Architectures or machines the CPU kernel cannot serve fall back to the unfused
update with a warning. The option is an execution option that exports leave out unless set.

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
  7). Measured: about 3e-7 of it (a few ulps). The C++ kernel sums the squares behind the
  per-tensor scales in float32 partial sums of at most 16 terms added in double, where XLA
  rounds its own float32 reduction; over the leaves here (up to 1000 coordinates) the measured
  worst differences went from 2.7e-7 and 3.3e-7 of the largest update (scales from XLA) to
  3.6e-7 and 3.3e-7.
* ``bf16_hidden`` (CPU kernel only): not float32 rounding but bfloat16 products in the middle
  layers; its own test computes the bound of lopt/mlp_cpu.py per coordinate.

Shapes are tiny and the Pallas block is 128 coordinates (interpret mode runs the grid as a
loop): leaves of 221, 40, 1 and 128 coordinates, three of them not a multiple of the block (nor,
but 128, of the CPU kernel's 16).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt
from lopt import execution, export, mlp_cpu, mlp_fused
from lopt.base import config_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS = float(np.finfo(np.float32).eps)
BLOCK = 128
STEPS = 4


@pytest.fixture(autouse=True, params=["pallas", "cpu"])
def kernel(request, monkeypatch):
    """Every test runs with each kernel ``fused=True`` can run on this CPU."""
    monkeypatch.setattr(mlp_fused, "DEFAULT_BLOCK_SIZE", BLOCK)
    monkeypatch.setattr(mlp_fused, "CPU_KERNEL", request.param)
    if request.param == "cpu" and not mlp_cpu.available()[0]:
        pytest.skip(f"the CPU kernel is not built here: {mlp_cpu.available()[1]}")
    _run_jit.clear_cache()  # its cache key does not see CPU_KERNEL
    return request.param


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
    ref_lo = lopt.get("mlp", fused=False)
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


@pytest.mark.parametrize("hidden_size,hidden_layers", [(32, 1), (5, 2), (4, 0), (48, 3)])
def test_jitted_steps_match_unfused(kernel, hidden_size, hidden_layers):
    """The default MLP; two hidden layers of a width that is padded (5 -> 16) with a middle
    matmul; no hidden layer (a linear model of the features); three hidden layers of 48 (two
    middle layers, three 16-wide output groups in the CPU kernel). The CPU kernel serves
    multiples of 16: for 5 and 0 it falls back to the unfused update, so it must match that
    exactly."""
    ref_lo = lopt.get("mlp", hidden_size=hidden_size, hidden_layers=hidden_layers, fused=False)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    if kernel == "pallas" and hidden_layers == 3:
        pytest.skip("interpreting Pallas adds nothing here that (5, 2) does not test")
    meta_params = _meta_params(ref_lo)
    params = _params()
    ref = _run_jit(ref_lo, meta_params, params, STEPS)
    fus = _run_jit(fus_lo, meta_params, params, STEPS)
    worst = _assert_close(ref_lo, ref, fus, _max_abs_grad(params, STEPS), STEPS)
    if kernel == "cpu" and mlp_cpu.unsupported(ref_lo):
        assert worst == 0.0
    else:
        assert worst < 2e-6  # what it measures (~3e-7), well inside the derived bound


def test_vmap_over_two_param_sets():
    ref_lo = lopt.get("mlp", fused=False)
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
    # Two vmap levels ([1, 2] leading axes: the CPU kernel flattens them) give the same run.
    nested = jax.tree.map(lambda x: x[None], stacked)
    twice = jax.jit(jax.vmap(jax.vmap(lambda p: _run(fus_lo, meta_params, p))))(nested)
    for a, b in zip(jax.tree.leaves(fus), jax.tree.leaves(twice)):
        np.testing.assert_allclose(a, b[0], rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(a))) + 1e-30)


def test_meta_gradient_is_the_unfused_one():
    """The custom VJP's backward pass is the unfused reference's: same meta-gradient."""
    ref_lo = lopt.get("mlp", fused=False)
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


def test_cpu_kernel_is_what_runs(kernel):
    """On a CPU, fused=True compiles to the C++ kernel's custom call (one per update, for all
    leaves), not the interpreted Pallas loop."""
    if kernel != "cpu":
        pytest.skip("a property of the CPU kernel")
    fus_lo = lopt.get("mlp", fused=True)
    params = _params()
    hlo = _run_jit.lower(fus_lo, _meta_params(fus_lo), params, 1).as_text()
    assert len(jax.tree.leaves(params)) > 1 and hlo.count(mlp_cpu.TARGET) == 1
    plain = lopt.get("mlp", fused=False)
    assert mlp_cpu.TARGET not in _run_jit.lower(plain, _meta_params(plain), params, 1).as_text()


def test_cpu_kernel_scales_span_segments(kernel):
    """The CPU kernel sums a leaf's squares for its per-tensor scales in segments of 256
    coordinates, added in order: a leaf of 1000 (four segments, the last and its last block
    partial) whose segments differ in magnitude by up to 1e4 gives the unfused update, so no
    segment is dropped or counted twice (batch entries kept apart: the vmap test)."""
    if kernel != "cpu":
        pytest.skip("a property of the CPU kernel")
    ref_lo = lopt.get("mlp", fused=False)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    magnitude = jnp.repeat(jnp.asarray([1e-2, 1.0, 1e2, 3.0]), jnp.asarray([256, 256, 256, 232]),
                           total_repeat_length=1000)
    params = {"w": magnitude * jax.random.normal(jax.random.PRNGKey(3), (1000,)),
              "v": jnp.flip(magnitude) * jax.random.normal(jax.random.PRNGKey(4), (1000,))}
    meta_params = _meta_params(ref_lo)
    ref = _run_jit(ref_lo, meta_params, params, STEPS)
    fus = _run_jit(fus_lo, meta_params, params, STEPS)
    assert _assert_close(ref_lo, ref, fus, _max_abs_grad(params, STEPS), STEPS) < 2e-6


def test_bf16_hidden_needs_the_fused_kernel_and_a_middle_layer():
    for kwargs in (dict(fused=False, hidden_layers=2), dict(fused=True, hidden_layers=1)):
        with pytest.raises(ValueError, match="bf16_hidden=True is an option of the fused kernel"):
            lopt.get("mlp", bf16_hidden=True, **kwargs)


def test_bf16_hidden_where_it_cannot_run_warns_and_computes_float32(kernel, monkeypatch):
    """A CPU without AVX512-BF16, or the Pallas kernel: bf16_hidden=True says so once and
    computes the float32 fused update, exactly."""
    lo32 = lopt.get("mlp", hidden_layers=2, fused=True)
    lo16 = dataclasses.replace(lo32, bf16_hidden=True)
    if kernel == "cpu":
        monkeypatch.setattr(mlp_cpu, "bf16_supported", lambda: False)
        match = "bf16_hidden=True: this CPU has no AVX512-BF16"
    else:
        match = "bf16_hidden=True: the bfloat16 middle layers are in the CPU kernel only"
    mlp_cpu._warn_bf16_once.cache_clear()
    meta_params, params = _meta_params(lo32), _params()
    o16, o32 = lo16.optimizer(meta_params), lo32.optimizer(meta_params)
    with pytest.warns(UserWarning, match=match):
        u16, _ = o16.update(_grads(params, 0), o16.init(params), params)
    u32, _ = o32.update(_grads(params, 0), o32.init(params), params)
    for a, b in zip(jax.tree.leaves(u32), jax.tree.leaves(u16)):
        np.testing.assert_array_equal(a, b)
    mlp_cpu._warn_bf16_once.cache_clear()


def _bf16_bound(learned_opt, layers, x, g_dim):
    """float64 reference updates of rows ``x`` (normalised features) through ``layers``, and the
    per-coordinate bound on the bf16_hidden kernel's error (lopt/mlp_cpu.py's docstring):
    every middle layer adds ((1 + u)^2 - 1) sum_i |h_i W_ic| (bf16 products, u = 2^-9, taken
    at the perturbed |h| + err), every layer carries the error in through |W| (relu is
    1-Lipschitz) and adds float32 summation, (fan_in + 1) eps of its absolute terms; the step
    -o_1 exp(o_2 exp_mult) step_mult turns output errors d_1, d_2 into
    step_mult exp(exp_mult (o_2 + d_2)) (d_1 + (|o_1| + d_1)(exp(exp_mult d_2) - 1)), plus a few
    float32 ulps of the update for the exponential."""
    u = 2.0 ** -9
    ws = [np.asarray(l["w"], np.float64) for l in layers]
    bs = [np.asarray(l["b"], np.float64) for l in layers]
    h, err = np.asarray(x, np.float64), np.zeros_like(np.asarray(x, np.float64))
    for i, (w, b) in enumerate(zip(ws, bs)):
        terms = (np.abs(h) + err) @ np.abs(w) + np.abs(b)
        err = err @ np.abs(w) + (w.shape[0] + 1) * EPS * terms
        if 0 < i < len(ws) - 1:  # a middle layer: bf16 products
            err = err + ((1 + u) ** 2 - 1) * terms
        h = h @ w + b
        if i < len(ws) - 1:
            h = np.maximum(h, 0.0)
    o1, o2 = h[:, 0], h[:, 1]
    em, sm = learned_opt.exp_mult, learned_opt.step_mult
    update = -o1 * np.exp(o2 * em) * sm
    bound = (sm * np.exp(em * (o2 + err[:, 1]))
             * (err[:, 0] + (np.abs(o1) + err[:, 0]) * np.expm1(em * err[:, 1])))
    return update.reshape(g_dim), (bound + 4 * EPS * np.abs(update)).reshape(g_dim)


def test_cpu_kernel_bf16_hidden_within_its_bound(kernel):
    """bf16_hidden=True: the CPU kernel's update lies within the derived bound of a float64
    reference at every coordinate (two middle layers, 700 coordinates) and within 1% of the
    largest update, the option really changes the numbers, and the momenta are the float32
    kernel's exactly."""
    if kernel != "cpu":
        pytest.skip("a property of the CPU kernel")
    if not mlp_cpu.bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16")
    lo32 = lopt.get("mlp", hidden_layers=3, fused=True)
    lo16 = dataclasses.replace(lo32, bf16_hidden=True)
    assert mlp_cpu.usable(lo16)
    layers = lo32.step_layers(_meta_params(lo32), jnp.asarray(7))
    k = jax.random.split(jax.random.PRNGKey(11), 3)
    n = 700
    g, p = jax.random.normal(k[0], (n,)), 0.5 * jax.random.normal(k[1], (n,))
    m = 0.3 * jax.random.normal(k[2], (n, len(lo32.decays)))
    u16, m16 = jax.jit(lambda *a: mlp_cpu._leaf(lo16, layers, *a))(g, p, m)
    u32, m32 = jax.jit(lambda *a: mlp_cpu._leaf(lo32, layers, *a))(g, p, m)
    np.testing.assert_array_equal(m16, m32)
    # The normalised features in float64, as leaf_updates defines them.
    d = np.asarray(lo32.decays, np.float64)
    m_new = d * np.asarray(m, np.float64) + (1 - d) * np.asarray(g, np.float64)[:, None]
    cols = np.concatenate([np.asarray(g, np.float64)[:, None], np.asarray(p, np.float64)[:, None],
                           m_new], axis=1)
    x = cols / np.sqrt(np.mean(cols ** 2, axis=0) + 1e-8)
    ref, bound = _bf16_bound(lo32, layers, x, (n,))
    err16 = np.abs(np.asarray(u16, np.float64) - ref)
    assert np.all(err16 <= bound), float(np.max(err16 / bound))
    # What a user sees (measured: 0.24% median relative error, 0.37% of the largest update;
    # the bound is worst-case, about 50x the largest error seen): within 1% of the largest update.
    assert np.max(err16) < 1e-2 * np.max(np.abs(ref))
    assert float(jnp.max(jnp.abs(u16 - u32))) > 0  # the option is not silently ignored
    # float32 for comparison: its error is far inside the same bound.
    assert np.max(np.abs(np.asarray(u32, np.float64) - ref) / bound) < 0.01


def test_cpu_kernel_unavailable_falls_back_with_its_reason(kernel, monkeypatch, tmp_path):
    """No compiler, or a failing one: a one-line reason; fused=True then warns with it and
    computes the unfused update, exactly."""
    if kernel != "cpu":
        pytest.skip("a property of the CPU kernel")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    path, why = mlp_cpu._build.__wrapped__()
    assert path is None and why == "no C++ compiler ($CXX=/nonexistent/c++ not found)"
    monkeypatch.setenv("CXX", "false")  # exits 1 without output
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path))
    path, why = mlp_cpu._build.__wrapped__()
    assert path is None and why.startswith("compiling ") and why.endswith("failed: (no output)")
    monkeypatch.setattr(mlp_cpu, "available", lambda: (False, why))
    execution.notice.cache_clear()
    ref_lo = lopt.get("mlp", fused=False)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    meta_params, params = _meta_params(ref_lo), _params()
    ref, fus = ref_lo.optimizer(meta_params), fus_lo.optimizer(meta_params)
    with pytest.warns(UserWarning, match="CPU kernel is not used .compiling .* unfused update"):
        u_fus, _ = fus.update(_grads(params, 0), fus.init(params), params)
    u_ref, _ = ref.update(_grads(params, 0), ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_fus)):
        np.testing.assert_array_equal(a, b)
    execution.notice.cache_clear()


def test_gpu_path_lowers_to_triton(kernel):
    """The compiled (non-interpreted) kernel lowers to a Triton custom call for CUDA, checked
    on the CPU by cross-platform lowering (nothing is compiled or run)."""
    if kernel != "pallas":
        pytest.skip("a property of the Pallas kernel")
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


def test_option_config_and_export(kernel, tmp_path):
    if kernel != "pallas":
        pytest.skip("runs no kernel")
    plain, fused = lopt.get("mlp"), lopt.get("mlp", fused=True)
    assert plain.fused == "auto" and fused.fused is True and plain != fused
    assert lopt.get("mlp", fused="False").fused is False  # a command-line override's string
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
    unfused = lopt.get("mlp", fused=False)
    assert config_of(unfused)["fused"] is False and export.load(path, unfused)[0] is unfused
    with pytest.raises(export.ArchitectureMismatchError, match="hidden_size"):
        export.load(path, lopt.get("mlp", hidden_size=8, fused=True))


STRESS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import lopt
from lopt import mlp_cpu
assert jax.device_count() == 2 and mlp_cpu.available()[0]
lo = lopt.get("mlp", hidden_size=16)
layers = lo.step_layers(lo.init(jax.random.PRNGKey(0)), jnp.int32(1))
update = lambda g, p, m: jax.vmap(lambda *a: mlp_cpu._leaf(lo, layers, *a))(g, p, m)
mesh = Mesh(np.asarray(jax.devices()), ("p",))
f = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=P("p"), out_specs=P("p")))
g, m = jnp.ones((4, 8192)), jnp.zeros((4, 8192, 5))
for _ in range(5000):
    u, m = f(g, g, m)
    jax.block_until_ready(m)
print("DONE")
"""


def test_cpu_kernel_on_two_devices_does_not_hang(kernel, tmp_path):
    """XLA:CPU runs the devices' programs on the intra-op pool the kernel splits its work
    over. A first version waited for its queued helper tasks (and freed its wait state while a
    helper could still touch it): 5,000 calls on 2 devices hung within 60 s; the kernel now
    waits only for helpers inside a chunk (about 4 s here)."""
    if kernel != "cpu":
        pytest.skip("a property of the CPU kernel")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    try:
        proc = subprocess.run([sys.executable, "-c", STRESS], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("5,000 fused updates on 2 CPU devices did not finish in 180 s (a hang)")
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-3000:]


def test_tbptt_through_the_fused_update_in_the_trainer(kernel):
    """TBPTT differentiates inside the trainer's shard_map, where a cotangent of the fused
    update can arrive device-invariant while the reference's VJP wants it varying over the
    particle axis (it raised before the backward pass gave it that type): the meta-gradient
    and meta-loss equal the unfused ones."""
    if kernel != "cpu":
        pytest.skip("the custom VJP is shared; the interpreted kernel would only be slower")
    import optax

    import estimators
    import tasks
    from estimators import schedules
    from lopt.training import MetaTrainer

    def first_step(fused):
        trainer = MetaTrainer.create(
            task_family=tasks.get("digits_mlp", hidden_sizes=(8,), batch_size=16),
            learned_opt=lopt.get("mlp", hidden_size=16, fused=fused),
            estimator=estimators.get("tbptt"), meta_optimizer=optax.adam(1e-3),
            num_particles=2, trunc_length=3, horizon=schedules.constant(6))
        _, metrics = trainer.step(trainer.init(jax.random.PRNGKey(0)))
        return metrics

    ref, fus = first_step(False), first_step(True)
    assert float(ref["grad_norm"]) > 0
    np.testing.assert_allclose(fus["grad_norm"], ref["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(fus["meta_loss"], ref["meta_loss"], rtol=1e-5)
