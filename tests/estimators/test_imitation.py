"""Imitation episodes (Chen et al. 2020 Alg. 2), self-improving mixing, and every technique
composed with tbptt, pes and merged inside one compiled outer step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.imitation import Imitation
from estimators.resets import ELOReplay
from estimators.unroll import Unroller
from lopt import teachers
from lopt.hyper import HyperAdam
from lopt.training import MetaTrainer
from lopt.wrappers import BehaviourCloning, Ramp, SelfImproving
from tests.estimators import test_behaviour_cloning as bc_tests

TASK = tasks.get("quadratic", dim=4, noise_std=0.1, condition_number=10.0)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)
EXACT = {"xla_backend_optimization_level": 0}  # see test_behaviour_cloning.py


# --- imitation ---------------------------------------------------------------------------------

HYPER = HyperAdam()
IMITATION = Imitation(
    estimators.get("tbptt"),
    teachers=({"name": "adam", "learning_rate": 1e-2}, {"name": "sgd", "learning_rate": 0.1}),
    length=8,
)
IL_UNROLLER = Unroller(TASK, HYPER, 4, 8, schedules.constant(100))
_il_grad = jax.jit(
    lambda theta, teacher: IMITATION.imitation_grad(IL_UNROLLER, theta, jax.random.PRNGKey(3), teacher),
    compiler_options=EXACT,
)


def test_imitation_loss_is_zero_when_hyper_adam_equals_the_adam_teacher():
    loss, grad = _il_grad(HyperAdam.meta_params_for(1e-2, 0.9, 0.999), 0)
    assert float(loss) < 1e-10  # float32 rounding only (hyper_adam mirrors optax's arithmetic)
    assert max(abs(float(g)) for g in jax.tree.leaves(grad)) < 1e-4


def test_imitation_loss_and_its_autodiff_gradient_otherwise():
    # Twice the teacher's learning rate: u_LO = 2 u_T, so the normalised loss is
    # sum_t w_t |u_t|^2 (r - 1)^2 / sum_t w_t |u_t|^2 = (r - 1)^2 with r = lr / lr_T, and
    # d loss / d log_lr = 2 (r - 1) r = 4.
    loss, grad = _il_grad(HyperAdam.meta_params_for(2e-2, 0.9, 0.999), 0)
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-4)
    np.testing.assert_allclose(float(grad["log_lr"]), 4.0, rtol=1e-3)
    loss_sgd, grad_sgd = _il_grad(HyperAdam.meta_params_for(1e-2, 0.9, 0.999), 1)  # other teacher
    assert float(loss_sgd) > 1e-3 and all(np.isfinite(np.asarray(g)) for g in jax.tree.leaves(grad_sgd))


def test_teacher_specs_are_checked():
    assert teachers.spec("sgd") == ("sgd", (("learning_rate", 0.1),))
    assert teachers.spec({"name": "adam", "learning_rate": 3e-4, "b1": 0.8})[1] == (
        ("b1", 0.8), ("learning_rate", 3e-4))
    with pytest.raises(ValueError, match="unknown teacher"):
        teachers.spec("adamax")
    with pytest.raises(ValueError):
        teachers.spec({"name": "adam", "learning_rat": 1e-3})
    with pytest.raises(ValueError, match="prob"):
        Imitation(estimators.get("pes"), prob=1.5)


def test_chen_defaults_and_episode_length():
    """Chen et al. 2020: teachers Adam, SGD and Adagrad (Sec. 5.3); an episode as long as a
    trajectory, N_train (Alg. 2), so under the curriculum it follows the stage's length."""
    il = Imitation(estimators.get("tbptt"))
    assert [t[0] for t in il.teachers] == ["adam", "sgd", "adagrad"]
    assert il.episode_length(Unroller(TASK, LOPT, 2, 20, schedules.constant(160))) == 160
    assert Imitation(estimators.get("tbptt"), length=8).episode_length(IL_UNROLLER) == 8


# --- self-improving mixing -----------------------------------------------------------------------

SI = bc_tests.SI  # teachers adam, sgd, rmsprop; p = 1/4 at outer step 0, 1 from step 2


def test_self_improving_probabilities_anneal_to_the_learned_optimizer():
    np.testing.assert_allclose(SI.probs(0), [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(SI.probs(1), [0.625, 0.125, 0.125, 0.125])
    np.testing.assert_allclose(SI.probs(2), [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(SI.probs(10**6), [1.0, 0.0, 0.0, 0.0])
    assert float(SelfImproving(LOPT, teachers=("adam",)).learned_prob(0)) == pytest.approx(0.5)  # uniform
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    choose = jax.jit(jax.vmap(SI.choose, in_axes=(0, None)))
    for step in (0, 1):
        counts = np.bincount(np.asarray(choose(keys, step)), minlength=4)
        p = np.asarray(SI.probs(step))
        n = len(keys)
        assert (np.abs(counts - n * p) < 4.5 * np.sqrt(n * p * (1 - p))).all(), (counts, n * p)
    assert (np.asarray(choose(keys, 2)) == 0).all()


def test_self_improving_at_probability_one_is_the_learned_optimizers_trajectory():
    """One compiled unroll: outer step 0 mixes (p = 1/4), outer step 2 has p = 1; the plain
    learned optimizer's unroll is shared with test_behaviour_cloning.py."""
    out = {}
    for name in ("si", "lo"):
        for step in (0, 2):
            out[name, step] = jax.device_get(bc_tests._truncation(name, step))[1:]
    si, lo = out["si", 2][0].particles, out["lo", 2][0].particles
    for a, b in zip(jax.tree.leaves((si.params, si.opt_state.inner)), jax.tree.leaves((lo.params, lo.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert float(out["si", 2][1].extras["learned_share"]) == 1.0
    np.testing.assert_array_equal(out["si", 2][1].losses, out["lo", 2][1].losses)
    # While mixing, the teachers' steps (lr 1e-3 .. 0.1) change the trajectory.
    assert not np.allclose(out["si", 0][0].particles.params["x"], out["lo", 0][0].particles.params["x"])


# --- composition with tbptt, pes and merged -------------------------------------------------------


def _trainer(name: str, mixing: str) -> MetaTrainer:
    teacher = {"name": "adam", "learning_rate": 1e-2}
    estimator = estimators.get(name)
    if mixing == "bc":  # imitation episodes are tested with each estimator once, here
        estimator = Imitation(estimator, prob=0.0, teachers=(teacher,), length=3)
        inner = BehaviourCloning(LOPT, teacher, Ramp("linear", steps=3))
    else:
        inner = SelfImproving(LOPT, (teacher, "sgd"), Ramp("linear", steps=3), initial_prob=0.5)
    trainer = MetaTrainer.create(
        task_family=tasks.get("quadratic", dim=3),
        learned_opt=inner,
        estimator=estimator,
        meta_optimizer=optax.adam(1e-3),
        num_particles=4,
        trunc_length=3,
        horizon=schedules.constant(4),
        reset=ELOReplay(capacity=2, p_threshold=0.3),
    )
    # The trainer's own compiled outer step, compiled without backend optimisation (the test
    # is about composition and recompilation, and this halves the compile time on CPU).
    specs = (trainer.state_specs, jax.sharding.PartitionSpec())
    trainer.__dict__["_step_fn"] = jax.jit(
        trainer._shard(trainer._step, specs, specs), donate_argnums=0, compiler_options=EXACT
    )
    trainer.__dict__["_init_fn"] = jax.jit(trainer._init_fn.__wrapped__, compiler_options=EXACT)
    return trainer


# PES composes through the same truncation code as tbptt (forward) and merged (its ES half);
# self-improving mixing is one draw per step whichever estimator differentiates it, so the fast
# suite runs it with tbptt and behaviour cloning with tbptt and merged.
@pytest.mark.parametrize("name, mixing", [
    ("tbptt", "bc"), ("tbptt", "si"), ("merged", "bc"),
    pytest.param("merged", "si", marks=pytest.mark.slow),
    pytest.param("pes", "bc", marks=pytest.mark.slow), pytest.param("pes", "si", marks=pytest.mark.slow)])
def test_techniques_compose_with_every_estimator_in_one_compiled_step(name, mixing):
    """Replay buffer + behaviour cloning (+ imitation episodes) or self-improving mixing, in
    MetaTrainer.step: r, a_t, the mixing probabilities and the buffer change from step to step,
    the compiled program does not."""
    trainer = _trainer(name, mixing)
    state = trainer.init(jax.random.PRNGKey(0))
    imitation = mixing == "bc"
    rows = []
    for prob in (1.0, 0.0, 0.0, 0.0):  # one imitation episode, then meta-loss steps
        if imitation:
            est = state.estimator_state
            state = state._replace(estimator_state=est._replace(prob=jnp.asarray(prob, jnp.float32)))
        state, metrics = trainer.step(state)
        rows.append(jax.device_get(metrics))
    for m in rows:
        assert all(np.isfinite(v) for v in m.values()), m
        assert bool(m["grad_finite"])
    assert max(float(m["grad_norm"]) for m in rows[1:]) > 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.meta_params))
    est_state = state.estimator_state.base if imitation else state.estimator_state
    rb = est_state.unroll.reset_state
    steps = 3 if imitation else 4  # an imitation step leaves the particles (and buffer) alone
    offers = 4 if name == "tbptt" else 2  # one per particle, or per antithetic pair
    # (a state at its trajectory's end, horizon 4, is not pushed)
    assert int(rb.size) == 2 and offers <= int(rb.pushes) <= offers * steps
    if imitation:
        assert [float(m["imitation"]) for m in rows] == [1.0, 0.0, 0.0, 0.0]
        assert float(rows[0]["imitation_loss"]) > 0 and float(rows[0]["grad_norm"]) > 0
        assert [round(float(m["bc_alpha"]), 3) for m in rows[1:]] == [0.333, 0.667, 1.0]
    assert trainer._step_fn._cache_size() == 1
