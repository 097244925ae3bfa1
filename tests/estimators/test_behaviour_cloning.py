"""ELO behaviour cloning (lopt.wrappers.BehaviourCloning) inside the unroll: the fused Adam/LO
trajectory and meta-loss at a_t = 0, 1/2, 1, a_t read from the run's clock, and an L_bc that
keeps its gradient however far the learned optimizer is from the teacher."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.unroll import Unroller
from lopt.hyper import HyperAdam
from lopt.wrappers import BehaviourCloning, Ramp, SelfImproving
from tests.estimators.toys import TeacherAsLearnedOptimizer

TASK = tasks.get("quadratic", dim=4, noise_std=0.1, condition_number=10.0)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)
ADAM_LR = 3e-2
P, T = 3, 6
TEACHER = {"name": "adam", "learning_rate": ADAM_LR}
# a_t = 0, 1/2, 1 at outer steps 0, 1, 2: one compiled unroll covers every case.
BC = BehaviourCloning(LOPT, teacher=TEACHER, schedule=Ramp("linear", steps=2))
# Self-improving mixing (test_imitation.py) shares this file's compiled plain-LO unroll.
SI = SelfImproving(LOPT, teachers=("adam", "sgd", "rmsprop"), schedule=Ramp("linear", steps=2),
                   initial_prob=0.25)


def _unroller(inner):
    return Unroller(TASK, inner, P, T, schedules.constant(100), stagger=False)


# Bit-for-bit comparisons of two *different* programs: XLA's LLVM backend may schedule the
# same float arithmetic differently in each (1-ulp differences), so they are compiled without
# backend optimisation, where identical operations give identical bits.
EXACT = {"xla_backend_optimization_level": 0}
INNER = {"bc": BC, "lo": LOPT, "adam": TeacherAsLearnedOptimizer("adam", ADAM_LR), "si": SI}


@functools.lru_cache(maxsize=None)
def _run(kind: str):
    """jitted (init, unroll) for the fused, plain-LO, plain-Adam and self-improving unrollers."""
    unroller = _unroller(INNER[kind])
    init = jax.jit(unroller.init, compiler_options=EXACT)
    unroll = jax.jit(unroller.unroll, compiler_options=EXACT)
    return unroller, init, unroll


THETA = LOPT.init(jax.random.PRNGKey(0))
KEY0, KEY1 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)


def _truncation(kind: str, outer_step: int, theta=THETA):
    _, init, unroll = _run(kind)
    state = init(theta, KEY0)
    return state, *unroll(theta, state, KEY1, outer_step)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ramps():
    steps = np.array([0, 5, 10, 15, 20, 25, 30])
    lin = Ramp("linear", steps=20, start=5)
    np.testing.assert_allclose([float(lin(s)) for s in steps], [0, 0, 0.25, 0.5, 0.75, 1, 1])
    cos = Ramp("cosine", steps=20, start=5)
    np.testing.assert_allclose(
        [float(cos(s)) for s in steps],
        [0, 0, 0.5 - 0.5 * np.cos(np.pi / 4), 0.5, 0.5 + 0.5 * np.cos(np.pi / 4), 1, 1],
        atol=1e-6,
    )
    assert [float(Ramp("step", steps=20, start=5)(s)) for s in steps] == [0, 0, 0, 0, 0, 1, 1]
    two = Ramp("step", steps=20, levels=2)
    assert [float(two(s)) for s in steps] == [0, 0, 0.5, 0.5, 1, 1, 1]
    assert float(Ramp("constant", value=0.3)(123)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="kind"):
        Ramp("exponential")
    bc = BehaviourCloning(LOPT, schedule={"kind": "cosine", "steps": 4})
    assert float(bc.alpha(2)) == pytest.approx(0.5)


def test_alpha_zero_is_adams_trajectory_exactly():
    start, bc_state, bc_out = _truncation("bc", 0)
    _, adam_state, adam_out = _truncation("adam", 0)
    assert float(BC.alpha(0)) == 0.0 and float(bc_out.extras["bc_alpha"]) == 0.0
    _assert_trees_equal(bc_state.particles.params, adam_state.particles.params)
    _assert_trees_equal(bc_state.particles.opt_state.teacher, adam_state.particles.opt_state)
    np.testing.assert_array_equal(bc_out.raw_losses, adam_out.raw_losses)
    # The LO's own state advanced along the way (its accumulators saw Adam's trajectory).
    assert int(bc_state.particles.opt_state.inner.step[0]) == T
    assert not np.allclose(bc_state.particles.params["x"], start.particles.params["x"])


def test_alpha_one_is_the_learned_optimizers_trajectory_and_loss_exactly():
    _, bc_state, bc_out = _truncation("bc", 2)
    _, lo_state, lo_out = _truncation("lo", 2)
    assert float(bc_out.extras["bc_alpha"]) == 1.0
    _assert_trees_equal(bc_state.particles.params, lo_state.particles.params)
    _assert_trees_equal(bc_state.particles.opt_state.inner, lo_state.particles.opt_state)
    np.testing.assert_array_equal(bc_out.losses, lo_out.losses)  # fused loss = task loss


def _reference(alpha: float):
    """A Python loop over particle 0: both updates from theta_n, the fused step, L_bc and the
    task term: the training loss of the new params on the next step's (fresh) batch, or for
    the truncation's last update on a batch of its own."""
    from estimators import keys as keys_lib

    unroller, init, _ = _run("bc")
    state = init(THETA, KEY0)
    trunc = unroller.begin(state, KEY1, 0)
    ps = jax.tree.map(lambda x: x[0], state.particles)
    step_keys = jax.random.split(jax.random.split(trunc.start.keys[0])[1], T)
    batch_keys = [jax.random.split(k, 3)[0] for k in step_keys]
    batch_keys.append(keys_lib.salted(batch_keys[-1], keys_lib.FRESH))  # the last update's
    lo, adam = LOPT.optimizer(THETA), optax.adam(ADAM_LR)
    params, lo_state, adam_state = ps.params, ps.opt_state.inner, adam.init(ps.params)
    out = []
    for t in range(T):
        batch = TASK.batch(ps.spec, batch_keys[t], "train")
        loss, g = jax.value_and_grad(lambda p: TASK.loss(ps.spec, p, batch)[0])(params)
        u_lo, lo_state = lo.update(g, lo_state, params, value=loss)
        u_adam, adam_state = adam.update(g, adam_state, params)
        dist = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(u_lo), jax.tree.leaves(u_adam)))
        bc = np.log1p(dist / sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(u_adam)))
        params = jax.tree.map(lambda p, a, b: p + (1 - alpha) * a + alpha * b, params, u_adam, u_lo)
        task_term = float(TASK.loss(ps.spec, params, TASK.batch(ps.spec, batch_keys[t + 1], "train"))[0])
        out.append((1 - alpha) * bc + alpha * task_term)
    return np.asarray(out), params


@pytest.mark.parametrize("outer_step,alpha", [(0, 0.0), (1, 0.5)])
def test_fused_loss_and_update_match_the_definition(outer_step, alpha):
    """ELO Alg. 1 lines 10-13: theta_{n+1} = theta_n + (1 - a) u_Adam + a u_LO and
    L_meta = (1 - a) L_bc + a L_task, with L_bc = log(1 + ||u_LO - u_Adam||^2 / ||u_Adam||^2)."""
    _, state, out = _truncation("bc", outer_step)
    want_loss, want_params = _reference(alpha)
    np.testing.assert_allclose(np.asarray(out.losses[0]), want_loss, rtol=2e-5)
    np.testing.assert_allclose(state.particles.params["x"][0], want_params["x"], rtol=1e-5, atol=1e-7)
    assert want_loss[0] > 0.1  # the untrained LO is far from Adam: the BC term is not trivial


def test_behaviour_cloning_loss_keeps_its_gradient_far_from_the_teacher():
    """A learned optimizer 10x more aggressive than its teacher (hyper_adam at lr 10 lr_T):
    ||u_LO - u_T||^2 / ||u_T||^2 = 81, far past where a clipped squared error (clip 2) had no
    gradient. L_bc = log(1 + 81) still has one, pulling the learning rate down (at a_t = 0 the
    meta-loss is L_bc alone)."""
    hyper = HyperAdam()
    bc = BehaviourCloning(hyper, teacher=TEACHER, schedule=Ramp("constant", value=0.0))
    unroller = _unroller(bc)
    tb = estimators.get("tbptt")
    theta = HyperAdam.meta_params_for(10 * ADAM_LR, 0.9, 0.999)
    state = tb.init(unroller, KEY0, theta)
    grad, _, metrics = jax.jit(lambda t: tb.grad(unroller, t, state, KEY1, 0))(theta)
    assert float(metrics["meta_loss"]) == pytest.approx(np.log1p(81.0), rel=0.05)
    assert float(grad["log_lr"]) > 0.1  # descending it lowers the learning rate


def test_wrappers_wrap_one_plain_learned_optimizer():
    from tasks.registry import ConfigError

    with pytest.raises(ConfigError, match="enable one"):
        BehaviourCloning(SI)


def test_fused_trajectory_keeps_the_teachers_path_for_second_order_gradients():
    """ELO Alg. 1 line 12 differentiated as written: theta_{n+1} = theta_n + (1 - a) u_T(theta_n)
    + a u_LO(theta_n), where the teacher's update depends on the meta-params through theta_n.
    The directional derivative of the final params along v, by autodiff through the unroll
    (what TBPTT with first_order=False and merged's reparameterization half take), equals the
    central finite difference of the unroll itself. With the teacher's update stopped in the
    fused step it misses d u_T / d theta_n: off by up to 166% of the finite difference here
    (SGD teacher, a = 1/2; measured with the stop restored)."""
    from tests.estimators.toys import FixedQuadratic

    hyper = HyperAdam()
    bc = BehaviourCloning(hyper, teacher={"name": "sgd", "learning_rate": 0.5},
                          schedule=Ramp("constant", value=0.5))
    unroller = Unroller(FixedQuadratic(), bc, 2, 12, schedules.constant(100), stagger=False)
    theta = HyperAdam.meta_params_for(0.05, 0.9, 0.999)
    state = unroller.init(theta, KEY0)

    def final_x(th):
        new, _ = unroller.unroll(th, state, KEY1, jnp.asarray(0))
        return new.particles.params["x"][0]

    v = {k: jnp.asarray(s, jnp.float32) for k, s in zip(sorted(theta), (1.0, 0.5, -0.3))}
    _, jvp = jax.jit(lambda th: jax.jvp(final_x, (th,), (v,)))(theta)
    h = 1e-2
    f = jax.jit(final_x)
    plus = f(jax.tree.map(lambda t, d: t + h * d, theta, v))
    minus = f(jax.tree.map(lambda t, d: t - h * d, theta, v))
    fd = (plus - minus) / (2 * h)
    assert float(jnp.linalg.norm(fd)) > 1e-3  # the meta-params move the trajectory
    np.testing.assert_allclose(np.asarray(jvp), np.asarray(fd), rtol=5e-3, atol=1e-5)
