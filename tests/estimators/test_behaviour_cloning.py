"""ELO behaviour cloning: the fused Adam/LO trajectory, the fused meta-loss, the a_t schedules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
import tasks
from estimators import schedules
from estimators.imitation import BehaviourCloning, Ramp, SelfImproving
from estimators.unroll import Unroller
from tests.estimators.toys import TeacherAsLearnedOptimizer

TASK = tasks.get("quadratic", dim=4, noise_std=0.1, condition_number=10.0)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)
ADAM_LR = 3e-2
P, T = 3, 6
# a_t = 0, 1/2, 1 at outer steps 0, 1, 2: one compiled unroll covers every case.
BC = BehaviourCloning(
    teacher={"name": "adam", "learning_rate": ADAM_LR}, schedule=Ramp("linear", steps=2)
)
# Self-improving mixing (test_imitation.py) shares this file's compiled plain-LO unroll.
SI = SelfImproving(teachers=("adam", "sgd", "rmsprop"), schedule=Ramp("linear", steps=2), initial_prob=0.25)


def _unroller(learned_opt=LOPT, bc=None, si=None):
    return Unroller(TASK, learned_opt, P, T, schedules.constant(100), stagger=False,
                    behaviour_cloning=bc, self_improving=si)


# Bit-for-bit comparisons of two *different* programs: XLA's LLVM backend may schedule the
# same float arithmetic differently in each (1-ulp differences), so they are compiled without
# backend optimisation, where identical operations give identical bits.
EXACT = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _run(kind: str):
    """jitted (init, unroll) for the fused, plain-LO and plain-Adam unrollers."""
    unroller = {
        "bc": _unroller(bc=BC),
        "lo": _unroller(),
        "adam": _unroller(TeacherAsLearnedOptimizer("adam", ADAM_LR)),
        "si": _unroller(si=SI),
    }[kind]
    init = jax.jit(unroller.init, compiler_options=EXACT)
    unroll = jax.jit(unroller.unroll, compiler_options=EXACT)
    return unroller, init, unroll


THETA = LOPT.init(jax.random.PRNGKey(0))
KEYS0 = jax.random.split(jax.random.PRNGKey(1), P)
KEYS1 = jax.random.split(jax.random.PRNGKey(2), P)


def _truncation(kind: str, outer_step: int, theta=THETA):
    _, init, unroll = _run(kind)
    state = init(theta, KEYS0)
    state = state._replace(outer_step=jnp.asarray(outer_step, jnp.int32))
    return state, *unroll(theta, state, KEYS1)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_schedules():
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
    assert float(BehaviourCloning(schedule={"kind": "cosine", "steps": 4}).alpha(2)) == pytest.approx(0.5)


def test_alpha_zero_is_adams_trajectory_exactly():
    start, bc_state, bc_out = _truncation("bc", 0)
    _, adam_state, adam_out = _truncation("adam", 0)
    assert float(BC.alpha(0)) == 0.0
    _assert_trees_equal(bc_state.particles.params, adam_state.particles.params)
    _assert_trees_equal(bc_state.particles.aux, adam_state.particles.opt_state)  # Adam state carried
    np.testing.assert_array_equal(bc_out.raw_losses, adam_out.raw_losses)
    # The LO's own state advanced along the way (its accumulators saw Adam's trajectory).
    assert int(bc_state.particles.opt_state.step[0]) == T
    assert not np.allclose(bc_state.particles.params["x"], start.particles.params["x"])


def test_alpha_one_is_the_learned_optimizers_trajectory_and_loss_exactly():
    _, bc_state, bc_out = _truncation("bc", 2)
    _, lo_state, lo_out = _truncation("lo", 2)
    assert float(BC.alpha(2)) == 1.0
    _assert_trees_equal(bc_state.particles.params, lo_state.particles.params)
    _assert_trees_equal(bc_state.particles.opt_state, lo_state.particles.opt_state)
    np.testing.assert_array_equal(bc_out.losses, lo_out.losses)  # fused loss = task loss


def _reference(alpha: float):
    """Python loop over one particle: both updates from theta_n, fused step, L_bc and L_task."""
    ps = jax.tree.map(lambda x: x[0], _run("bc")[1](THETA, KEYS0).particles)
    step_keys = jax.random.split(KEYS1[0], T)
    lo, adam = LOPT.optimizer(THETA), optax.adam(ADAM_LR)
    params, lo_state, adam_state = ps.params, ps.opt_state, adam.init(ps.params)
    out = []
    for k in step_keys:
        k_batch, k_meta, _ = jax.random.split(k, 3)
        batch = TASK.batch(ps.spec, k_batch, "train")
        loss, g = jax.value_and_grad(lambda p: TASK.loss(ps.spec, p, batch)[0])(params)
        u_lo, lo_state = lo.update(g, lo_state, params, loss=loss)
        u_adam, adam_state = adam.update(g, adam_state, params)
        bc = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(u_lo), jax.tree.leaves(u_adam)))
        bc /= sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(u_adam))
        params = jax.tree.map(lambda p, a, b: p + (1 - alpha) * a + alpha * b, params, u_adam, u_lo)
        # The task term scores the fused update: the loss of the new params on a fresh batch
        # (the default meta-loss: no normalisation, no clip).
        task_term = float(TASK.loss(ps.spec, params, TASK.batch(ps.spec, k_meta, "train"))[0])
        out.append((1 - alpha) * bc + alpha * task_term)
    return np.asarray(out), params


@pytest.mark.parametrize("outer_step,alpha", [(0, 0.0), (1, 0.5)])
def test_fused_loss_and_update_match_the_definition(outer_step, alpha):
    """(1 - a) L_bc + a L_task per step, L_bc = ||u_LO - u_Adam||^2 / ||u_Adam||^2, and
    theta_{n+1} = theta_n + (1 - a) u_Adam + a u_LO."""
    _, state, out = _truncation("bc", outer_step)
    want_loss, want_params = _reference(alpha)
    np.testing.assert_allclose(np.asarray(out.losses[0]), want_loss, rtol=2e-5)
    np.testing.assert_allclose(state.particles.params["x"][0], want_params["x"], rtol=1e-5, atol=1e-7)
    assert want_loss[0] > 0.1  # the untrained LO is far from Adam: the BC term is not trivial
