"""``lopt.get("adafac_mlp", fused=True)`` and its default ``fused="auto"`` on a CPU: the C++
kernel of lopt/adafac_cpu.py gives the unfused update's numbers (jitted over several steps,
vmapped, differentiated, inside the meta-trainer), runs by default where it builds, and
architectures it does not take fall back to the unfused update with the reason.

Tolerances (float32, eps = 2^-23 ~ 1.19e-7):

* m, rms, v: the same expression on both paths (b a + (1 - b) x); they may differ only by a
  multiply-add contracted into an FMA on one side, at most 2 roundings of eps * max|x| per
  step, not amplified by the recurrence (b < 1): ``2 * steps * eps * max|x|``.
* row, col: also a mean over an axis, which the kernel sums in double and XLA in float32 (a sum
  of N terms within N eps of its terms' magnitude): ``(N + 2) * steps * eps * max|acc|`` with N
  the largest axis reduced.
* updates: the features are the same expressions up to those accumulator differences and the
  reciprocal square roots (1 / sqrt, a few ulps); the scales' means are sums in double; the MLP
  sums in another order. As tests/lopt/test_fused.py derives for ``mlp``, two orders of the
  first layer's (F + 1 terms) and the output layer's (H + 1) sums each lie within K eps of the
  exact sum's magnitude, so we allow ``2 * (H + F + 2) * eps`` of the largest update (1.5e-5
  for H = 32, F = 28); measured 4e-7 to 1.5e-6 (the last with three hidden layers of 48), and
  the tests also check < 3e-6.

Leaves: 0-d, 1-d, 2-d of 13 x 17 (blocks crossing rows), 40 x 32 (whole blocks within rows),
3-d with a trailing axis past the factored two (4, 20, 3), HWIO conv kernels (3, 3, 5, 7) and
(3, 3, 2, 4) (factored axes 1 and 3); most sizes are not a multiple of the 16-coordinate block.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt
from lopt import adafac_cpu, execution, export
from lopt.base import config_of

EPS = float(np.finfo(np.float32).eps)
STEPS = 3


@pytest.fixture(autouse=True)
def _built():
    if not adafac_cpu.available()[0]:
        pytest.skip(f"the CPU kernel is not built here: {adafac_cpu.available()[1]}")


def _params(key=jax.random.PRNGKey(2), scale=1.0):
    k = jax.random.split(key, 7)
    shapes = {"scale": (), "bias": (37,), "dense": (13, 17), "rows": (40, 32),
              "seq": (4, 20, 3), "conv": (3, 3, 5, 7), "thin": (3, 3, 2, 4)}
    return {name: scale * jax.random.normal(kk, shape)
            for kk, (name, shape) in zip(k, shapes.items())}


def _grads(params, step):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p + 1.0 + 0.7 * step) * (1.0 + 0.5 * step), params)


def _meta_params(learned_opt, key=jax.random.PRNGKey(1)):
    """Random meta-params (not the init): nonzero biases, O(1) outputs, so steps vary;
    learnable decays moved a little from their init."""
    template = learned_opt.init(jax.random.PRNGKey(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = jax.random.split(key, len(paths))
    return treedef.unflatten([
        x + 0.05 * jax.random.normal(k, x.shape) if "decay" in jax.tree_util.keystr(path)
        else jax.random.normal(k, x.shape) * (1.0 / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.5)
        for k, (path, x) in zip(keys, paths)
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


def _max_abs(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def _assert_close(learned_opt, params, ref, fused, steps=STEPS):
    """The module docstring's tolerances; returns the largest update difference relative to
    the largest update."""
    (u_ref, s_ref), (u_fus, s_fus) = ref, fused
    assert jax.tree.structure(u_ref) == jax.tree.structure(u_fus)
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_fus)
    u_scale = _max_abs(u_ref)
    assert u_scale > 0
    u_tol = 2 * (learned_opt.hidden_size + learned_opt.num_normalized_features + 2) * EPS * u_scale
    worst = 0.0
    for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_fus)):
        assert a.shape == b.shape and a.dtype == b.dtype
        diff = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        assert diff <= u_tol, (diff, u_tol)
        worst = max(worst, diff / u_scale)
    np.testing.assert_array_equal(s_ref.step, s_fus.step)
    max_g = max(_max_abs(_grads(params, i)) for i in range(steps))
    biggest_axis = max(max(x.shape, default=1) for x in jax.tree.leaves(params))
    for path, a in jax.tree_util.tree_leaves_with_path(s_ref.accumulators):
        b = _pick(s_fus.accumulators, path)
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
        name = path[-1].key
        if name in ("row", "col"):
            tol = (biggest_axis + 2) * steps * EPS * float(jnp.max(jnp.abs(a)))
        else:
            tol = 2 * steps * EPS * (max_g if name == "m" else max_g ** 2 + 1e-30)
        assert float(jnp.max(jnp.abs(a - b))) <= tol, (jax.tree_util.keystr(path), tol)
    return worst


def _pick(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


OPTIONS = {
    "default": {},
    "size_order": dict(factored_order="size"),
    "sigmoid_decays": dict(learnable_decays=True),
    "imported_eps": dict(learnable_decays=True, decay_param="log1m", factored_order="size",
                         norm_eps=1e-5, factored_grad_eps=1e-30),
    "narrow": dict(hidden_size=16, hidden_layers=1),
    "deep": dict(hidden_size=48, hidden_layers=3, momentum_decays=(0.5, 0.9),
                 factored_decays=(0.9, 0.99), rms_decays=(0.99, 0.999)),
}


#: Option sets another fast case covers run with the slow tests (suite time): "imported_eps"
#: has factored_order="size" and learnable decays, "deep" other widths and decay counts.
SLOW_OPTIONS = {"size_order", "sigmoid_decays", "narrow"}


@pytest.mark.parametrize("options", [
    pytest.param(o, marks=pytest.mark.slow) if o in SLOW_OPTIONS else o for o in sorted(OPTIONS)])
def test_jitted_steps_match_unfused(options):
    """Every option the kernel takes: the default small_fc_lopt; factored_order="size" (row and
    column swapped where the larger axis comes first); learnable decays (operands of the
    kernel); learned_optimization's epsilons and log1m decays; one hidden layer of 16; three
    of 48 with other decay counts (2 momenta, 2 second moments)."""
    ref_lo = lopt.get("adafac_mlp", fused=False, **OPTIONS[options])
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    assert not adafac_cpu.unsupported(fus_lo)
    meta_params, params = _meta_params(ref_lo), _params()
    ref = _run_jit(ref_lo, meta_params, params, STEPS)
    fus = _run_jit(fus_lo, meta_params, params, STEPS)
    assert _assert_close(ref_lo, params, ref, fus) < 3e-6


@pytest.mark.slow  # eager dispatch is the slowest case here (~25 s cold); jit covers the kernel
def test_eager_and_low_precision_leaves():
    """Eager updates one at a time; bfloat16 leaves (both paths compute in float32 and return
    the leaf's dtype: the same float32 update, rounded once)."""
    ref_lo = lopt.get("adafac_mlp", fused=False)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    meta_params = _meta_params(ref_lo)
    params = dict(_params(), half=jax.random.normal(jax.random.PRNGKey(9), (6, 33), jnp.bfloat16))
    ref, fus = ref_lo.optimizer(meta_params), fus_lo.optimizer(meta_params)
    s_ref, s_fus = ref.init(params), fus.init(params)
    for i in range(2):
        u_ref, s_ref = ref.update(_grads(params, i), s_ref, params)
        u_fus, s_fus = fus.update(_grads(params, i), s_fus, params)
        _assert_close(ref_lo, params, (u_ref, s_ref), (u_fus, s_fus), i + 1)
    assert u_fus["half"].dtype == jnp.bfloat16
    assert int(s_fus.step) == 2


def test_vmap_over_two_param_sets():
    """Leading batch axes (vmapped particles, each with its own state) and vmapped meta-params
    (each entry its own weights and decays): each entry is its own run."""
    ref_lo = lopt.get("adafac_mlp", fused=False, learnable_decays=True)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    p1, p2 = _params(), _params(jax.random.PRNGKey(5), scale=0.1)
    m1, m2 = _meta_params(ref_lo), _meta_params(ref_lo, jax.random.PRNGKey(7))
    stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    run = lambda lo: jax.jit(jax.vmap(lambda m, p: _run(lo, m, p)))(stack(m1, m2), stack(p1, p2))
    ref, fus = run(ref_lo), run(fus_lo)
    for i, p in enumerate((p1, p2)):
        pick = lambda tree: jax.tree.map(lambda x: x[i], tree)
        assert _assert_close(ref_lo, p, pick(ref), pick(fus)) < 3e-6


def test_meta_gradient_is_the_unfused_one():
    """The custom VJP's backward pass is the unfused update's: the same meta-gradient, decays
    included. (The second step's VJP is taken at the fused first step's state, equal to float32
    rounding; the decay logits' gradients are sums of terms of both signs, where that rounding
    shows as up to 4e-4 of an element 40x below the leaf's largest: hence atol of the leaf's
    largest element.)"""
    ref_lo = lopt.get("adafac_mlp", fused=False, learnable_decays=True)
    fus_lo = dataclasses.replace(ref_lo, fused=True)
    params = _params()

    def loss(meta_params, lo):
        updates, _ = _run(lo, meta_params, params, steps=2)
        return sum(jnp.sum(jnp.square(u)) for u in jax.tree.leaves(updates))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    meta_params = _meta_params(ref_lo)
    g_ref, g_fus = grad(meta_params, ref_lo), grad(meta_params, fus_lo)
    assert set(g_fus) == {"mlp", "decay_logits"}
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fus)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(a))))


def _update_hlo(learned_opt, params=None) -> str:
    params = _params() if params is None else params
    meta_params = learned_opt.init(jax.random.PRNGKey(0))

    def update(meta_params, params):
        opt = learned_opt.optimizer(meta_params)
        return opt.update(params, opt.init(params), params)

    return jax.jit(update).lower(meta_params, params).as_text()


def test_default_runs_the_kernel_silently():
    """fused="auto" (the default) on a CPU where the kernel builds: the update is one custom
    call of the kernel for all leaves, and nothing is said (a silent fallback to the unfused
    update fails here); fused=False has no custom call."""
    execution.notice.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hlo = _update_hlo(lopt.get("adafac_mlp"))
    assert lopt.get("adafac_mlp").fused == "auto"
    assert hlo.count(adafac_cpu.TARGET) == 1
    assert adafac_cpu.TARGET not in _update_hlo(lopt.get("adafac_mlp", fused=False))


def test_on_a_gpu_the_unfused_update_runs_with_a_notice(monkeypatch):
    """No GPU kernel for adafac_mlp: "auto" and True both say so once and run unfused."""
    monkeypatch.setattr(execution, "backend", lambda: "gpu")
    for fused, match in (("auto", "fused='auto': on gpu the unfused update runs .its fused "
                                  "kernel is a CPU one"),
                         (True, "fused=True: no fused kernel for the gpu backend")):
        execution.notice.cache_clear()
        with pytest.warns(UserWarning, match=match):
            assert execution.kernel_platform(lopt.get("adafac_mlp", fused=fused)) is None
    execution.notice.cache_clear()


@pytest.mark.parametrize("options,reason", [
    (dict(preconditioner="learned_optimization"), "preconditioner='learned_optimization'"),
    (dict(hidden_size=20), "hidden_size=20 is not a multiple of 16"),
    (dict(hidden_layers=0), "hidden_layers=0"),
])
def test_what_the_kernel_does_not_take_is_unfused_with_its_reason(options, reason):
    """Options outside the kernel, default or fused=True: a one-line notice naming the reason,
    and exactly the unfused update."""
    for fused in ("auto", True):
        execution.notice.cache_clear()
        fus_lo = lopt.get("adafac_mlp", fused=fused, **options)
        ref_lo = dataclasses.replace(fus_lo, fused=False)
        with pytest.warns(UserWarning, match=f"C\\+\\+ CPU kernel is not used \\({reason}"):
            hlo = _update_hlo(fus_lo)
        assert adafac_cpu.TARGET not in hlo
        meta_params, params = _meta_params(ref_lo), _params()
        ref, fus = _run_jit(ref_lo, meta_params, params, 2), _run_jit(fus_lo, meta_params, params, 2)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fus)):
            np.testing.assert_array_equal(a, b)
    execution.notice.cache_clear()


def test_kernel_unavailable_falls_back_with_its_reason(monkeypatch, tmp_path):
    """No compiler, or a failing one: the reason in one line, and the unfused update."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    path, why = adafac_cpu._build.__wrapped__()
    assert path is None and why == "no C++ compiler ($CXX=/nonexistent/c++ not found)"
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path))
    path, why = adafac_cpu._build.__wrapped__()
    assert path is None and why.endswith("failed: (no output)")
    monkeypatch.setattr(adafac_cpu, "available", lambda: (False, why))
    execution.notice.cache_clear()
    with pytest.warns(UserWarning, match="CPU kernel is not used .compiling .* unfused update"):
        hlo = _update_hlo(lopt.get("adafac_mlp"))
    assert adafac_cpu.TARGET not in hlo
    execution.notice.cache_clear()


def test_option_config_and_export(tmp_path):
    plain, fused = lopt.get("adafac_mlp"), lopt.get("adafac_mlp", fused=True)
    assert plain.fused == "auto" and fused.fused is True and plain != fused
    assert lopt.get("adafac_mlp", fused="false").fused is False
    with pytest.raises(ValueError, match="fused"):
        lopt.get("adafac_mlp", fused="yes")
    assert "fused" not in config_of(plain) and config_of(fused)["fused"] is True
    assert "fused" not in config_of(fused, architecture_only=True)
    path = export.save(tmp_path / "plain.safetensors", plain, plain.init(jax.random.PRNGKey(0)))
    assert "fused" not in export.read_metadata(path)["architecture"]["config"]
    assert export.load(path)[0] == plain
    assert export.load(path, fused)[0] is fused


def test_tbptt_through_the_fused_update_in_the_trainer():
    """TBPTT meta-training (inside the trainer's shard_map, vmapped particles): the first
    step's meta-gradient norm and meta-loss equal the unfused update's."""
    import optax

    import estimators
    import tasks
    from estimators import schedules
    from lopt.training import MetaTrainer

    def first_step(fused):
        trainer = MetaTrainer.create(
            task_family=tasks.get("digits_mlp", hidden_sizes=(8,), batch_size=16),
            learned_opt=lopt.get("adafac_mlp", hidden_size=16, fused=fused),
            estimator=estimators.get("tbptt"), meta_optimizer=optax.adam(1e-3),
            num_particles=2, trunc_length=3, horizon=schedules.constant(6))
        _, metrics = trainer.step(trainer.init(jax.random.PRNGKey(0)))
        return metrics

    ref, fus = first_step(False), first_step(True)
    assert float(ref["grad_norm"]) > 0
    np.testing.assert_allclose(fus["grad_norm"], ref["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(fus["meta_loss"], ref["meta_loss"], rtol=1e-5)
