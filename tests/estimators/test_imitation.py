"""Imitation episodes (Chen et al. 2020 Alg. 2), self-improving mixing, and every technique
composed with tbptt, pes and merged inside one compiled outer step."""

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
from estimators.imitation import Imitation
from estimators.resets import ELOReplay
from estimators.unroll import Unroller
from lopt import teachers
from lopt.hyper import HyperAdam
from lopt.training import MetaTrainer
from lopt.wrappers import BehaviourCloning, Ramp, SelfImproving
from tests.estimators import test_behaviour_cloning as bc_tests
from tests.estimators.toys import FixedQuadratic

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
IL_UNROLLER = Unroller(TASK, HYPER, 4, 8, schedules.constant(100))  # one truncation: the episode


@jax.jit
def _il_grad(theta, teacher):
    key = jax.random.PRNGKey(3)
    episode = IMITATION.fresh_episode(IL_UNROLLER, key, theta)
    loss, grad, _, teacher_sq, _ = IMITATION.imitation_grad(IL_UNROLLER, theta, episode, key, teacher, 0)
    return loss, grad, teacher_sq


def test_imitation_loss_is_zero_when_hyper_adam_equals_the_adam_teacher():
    loss, grad, _ = _il_grad(HyperAdam.meta_params_for(1e-2, 0.9, 0.999), 0)
    assert float(loss) < 1e-10  # float32 rounding only (hyper_adam mirrors optax's arithmetic)
    assert max(abs(float(g)) for g in jax.tree.leaves(grad)) < 1e-4


def test_imitation_loss_is_eq_1_and_its_autodiff_gradient():
    """eq. (1) as written: L_O = sum_t w_t ||u_LO - u_T||^2, w_t = 1/T. At twice the teacher's
    learning rate u_LO = 2 u_T, so L_O = (r - 1)^2 S with r = lr / lr_T and S = sum_t w_t
    ||u_T||^2, and d L_O / d log_lr = 2 (r - 1) r S = 4 S."""
    loss, grad, teacher_sq = _il_grad(HyperAdam.meta_params_for(2e-2, 0.9, 0.999), 0)
    assert float(teacher_sq) > 0
    np.testing.assert_allclose(float(loss), float(teacher_sq), rtol=1e-4)
    np.testing.assert_allclose(float(grad["log_lr"]), 4.0 * float(teacher_sq), rtol=1e-3)
    loss_sgd, grad_sgd, _ = _il_grad(HyperAdam.meta_params_for(1e-2, 0.9, 0.999), 1)  # other teacher
    assert float(loss_sgd) > 1e-10 and all(np.isfinite(np.asarray(g)) for g in jax.tree.leaves(grad_sgd))


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
    trajectory, N_train (Alg. 2), so under the curriculum it follows the stage's length, run as
    ceil(N_train / trunc_length) truncations; eq. (1)'s raw squared error by default."""
    il = Imitation(estimators.get("tbptt"))
    assert [t[0] for t in il.teachers] == ["adam", "sgd", "adagrad"]
    assert il.normalize == "none" and il.weights == "uniform"
    unroller = Unroller(TASK, LOPT, 2, 20, schedules.constant(160))
    assert il.episode_length(unroller) == 160 and il.epoch_steps(unroller) == 8
    assert il.epoch_steps(Unroller(TASK, LOPT, 2, 20, schedules.constant(50))) == 3
    assert Imitation(estimators.get("tbptt"), length=8).episode_length(IL_UNROLLER) == 8
    assert il.objectives == ("meta_loss", "imitation")


# An imitation wrapper inside a trainer: episodes of 5 steps in truncations of 2 (3 outer steps,
# the last one step long), teacher SGD, the learned optimizer hyper_adam, on a noise-free
# quadratic (the teacher's trajectory has a closed form).
EPISODE_TEACHER_LR = 0.1


@functools.lru_cache(maxsize=None)
def _il_trainer(prob: float = 0.5) -> MetaTrainer:
    est = Imitation(estimators.get("tbptt"), prob=prob,
                    teachers=({"name": "sgd", "learning_rate": EPISODE_TEACHER_LR},))
    return MetaTrainer.create(
        task_family=FixedQuadratic(), learned_opt=HYPER, estimator=est,
        meta_optimizer=optax.adam(1e-2), num_particles=2, trunc_length=2,
        horizon=schedules.constant(5))


def test_the_coin_is_flipped_once_per_trajectory():
    """Alg. 2 chooses per trajectory (the code: once per epoch): every outer step of an epoch
    (ceil(5 / 2) = 3 here) is of one kind, and imitation's share of epochs is r."""
    trainer = _il_trainer()
    state = trainer.init(jax.random.PRNGKey(0))
    flags = []
    for _ in range(3 * 120):
        state, metrics = trainer.step(state)
        flags.append(float(metrics["imitation"]))
    epochs = np.asarray(flags).reshape(120, 3)
    assert (epochs == epochs[:, :1]).all()  # one kind per epoch
    n, share = len(epochs), epochs[:, 0].mean()
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / n), share  # binomial, 4 standard errors


def test_an_episode_follows_the_teachers_trajectory_across_truncations():
    """An imitation epoch trains its instances with the teacher for all 5 steps over its 3
    truncations (2 + 2 + 1 steps), each a meta-update of the imitation objective: the episode's
    params are SGD's after 5 steps, the learned optimizer's state has seen the same 5 gradients
    (its first moment is their EMA), the next epoch starts from fresh instances, and only the
    imitation objective's meta-optimizer state moved."""
    trainer = _il_trainer(prob=1.0)
    state = trainer.init(jax.random.PRNGKey(0))
    meta_state0 = jax.device_get(state.meta_opt_state.inner_state)
    b1s = []  # hyper_adam's b1 during each truncation (2, 2, 1 steps): each is a meta-update
    for steps in (2, 2, 1):
        b1s += [1.0 - np.exp(float(jax.device_get(state.meta_params)["log_one_minus_b1"]))] * steps
        state, metrics = trainer.step(state)
        assert float(metrics["imitation"]) == 1.0 and float(metrics["imitation_loss"]) > 0
        assert np.isnan(float(metrics["meta_loss"]))  # not a meta-loss step
    episode = jax.device_get(state.estimator_state.episode)
    quad = FixedQuadratic()
    h, c = np.asarray(quad.h), np.asarray(quad.c)
    x, grads = np.asarray(quad.x0, np.float64), []
    for _ in range(5):
        g = h * (x - c) / h.size
        grads.append(g)
        x = x - EPISODE_TEACHER_LR * g
    for p in range(2):
        np.testing.assert_allclose(episode.params["x"][p], x, rtol=1e-5)
    mu = np.zeros(3)
    for g, b1 in zip(grads, b1s):
        mu = b1 * mu + (1 - b1) * g
    assert int(episode.lo_state.count[0]) == 5
    np.testing.assert_allclose(episode.lo_state.mu["x"][0], mu, rtol=1e-4)
    meta_state = jax.device_get(state.meta_opt_state.inner_state)
    assert int(meta_state[0][0].count) == 0 and int(meta_state[1][0].count) == 3  # optax.adam's
    for a, b in zip(jax.tree.leaves(meta_state[0]), jax.tree.leaves(meta_state0[0]), strict=True):
        np.testing.assert_array_equal(a, b)  # the meta-loss objective's Adam state is untouched
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(meta_state[1]), jax.tree.leaves(meta_state0[1])))
    state, _ = trainer.step(state)  # the next epoch's first step: fresh instances
    fresh = jax.device_get(state.estimator_state.episode)
    assert not np.allclose(fresh.params["x"], episode.params["x"])


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


# ES and PES compose through the same truncation code as tbptt (forward) and merged (its ES
# half); PES refuses the replay buffer these trainers use, so es runs here;
# self-improving mixing is one draw per step whichever estimator differentiates it, so the fast
# suite runs it with tbptt and behaviour cloning with merged (whose reparameterization half
# differentiates the unroll as tbptt does).
@pytest.mark.parametrize("name, mixing", [
    pytest.param("tbptt", "bc", marks=pytest.mark.slow), ("tbptt", "si"), ("merged", "bc"),
    pytest.param("merged", "si", marks=pytest.mark.slow),
    pytest.param("es", "bc", marks=pytest.mark.slow), pytest.param("es", "si", marks=pytest.mark.slow)])
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
    for i, m in enumerate(rows):
        # A metric that does not apply to a step's kind is NaN (the loop's rows skip it there).
        assert not any(np.isinf(v) for v in m.values()), m
        own = "imitation_loss" if imitation and i == 0 else "meta_loss"
        other = "meta_loss" if own == "imitation_loss" else "imitation_loss"
        assert np.isfinite(m[own]) and (other not in m or np.isnan(m[other])), m
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
