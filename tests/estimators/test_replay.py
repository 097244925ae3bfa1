"""ELO's replay buffer (ELO Algorithm 1; estimators/resets.py): one FIFO buffer of M states,
the P_th and t > 0 gates, segments that continue a stored state from its own position (so
positions grow over outer steps), one push per segment after 1..N-1 of its updates, the
horizon cap, and PES refusing the buffer (with it, PES would be truncated ES)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.resets import ELOReplay
from estimators.unroll import Unroller

TASK = tasks.get("quadratic", dim=3, noise_std=0.1)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)
THETA = LOPT.init(jax.random.PRNGKey(0))
EXACT = {"xla_backend_optimization_level": 0}  # bit-exact comparisons of two programs


def _entry(i: int):
    return {"a": jnp.full((2,), float(i)), "k": jnp.asarray(i, jnp.int32)}


def _batch(values, valid):
    return {"a": jnp.asarray([[float(v)] * 2 for v in values]),
            "k": jnp.asarray(values, jnp.int32)}, jnp.asarray(valid)


def test_one_fifo_buffer_of_capacity_m():
    """Every particle's valid offer is enqueued in particle order; when full the oldest are
    dequeued; of more than M offers at once the last M survive."""
    buf = ELOReplay(capacity=3, p_threshold=0.5)
    state = buf.init(_entry(0))
    assert int(state.size) == 0

    def stored(s):
        slots = np.asarray(buf.fifo_slots(s))[: int(s.size)]
        return [int(s.entries["k"][i]) for i in slots]

    state = buf.observe(state, *_batch([1, 2], [True, False]), None)
    assert stored(state) == [1] and int(state.pushes) == 1
    state = buf.observe(state, *_batch([3, 4], [True, True]), None)
    assert stored(state) == [1, 3, 4]
    state = buf.observe(state, *_batch([5, 6], [True, True]), None)
    assert stored(state) == [4, 5, 6] and int(state.size) == 3
    state = buf.observe(state, *_batch([7, 8, 9, 10, 11], [True, True, False, True, True]), None)
    assert stored(state) == [8, 10, 11] and int(state.pushes) == 9
    with pytest.raises(ValueError, match="capacity"):
        ELOReplay(capacity=0)
    with pytest.raises(ValueError, match="p_threshold"):
        ELOReplay(p_threshold=1.5)


def test_draws_respect_p_threshold_and_the_first_outer_step():
    """Restore iff u > P_th, t > 0 and B is not empty; the slot is uniform over the m stored."""
    buf = ELOReplay(capacity=4, p_threshold=0.3)
    full = buf.observe(buf.init(_entry(0)), *_batch([1, 2, 3], [True] * 3), None)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draw = jax.jit(buf.draw)
    assert not np.asarray(draw(full, keys, 0)[0]).any()  # t = 0: never
    assert not np.asarray(draw(buf.init(_entry(0)), keys, 5)[0]).any()  # empty B: never
    restore, entries = draw(full, keys, 5)
    n, k, p = len(keys), int(np.sum(restore)), 1 - 0.3
    assert abs(k - n * p) < 4.0 * np.sqrt(n * p * (1 - p)), (k, n * p)  # binomial, 4 sigma
    counts = np.bincount(np.asarray(entries["k"])[np.asarray(restore)], minlength=4)[1:]
    assert counts.min() > 0.8 * counts.mean()  # uniform over the 3 stored entries


# One compiled unroll: 8 particles, segments of N = 2 steps, P_th = 0 (every particle restores
# from t = 1 on), a buffer of 6 states.
N = 2
UNROLLER = Unroller(TASK, LOPT, 8, N, schedules.constant(50), stagger=False,
                    reset=ELOReplay(capacity=6, p_threshold=0.0))


@functools.lru_cache(maxsize=None)
def _history(unroller: Unroller = UNROLLER, steps: int = 12):
    """[(state before, state after, output)] of consecutive outer steps, as numpy."""
    unroll = jax.jit(unroller.unroll, compiler_options=EXACT)
    state = jax.jit(unroller.init, compiler_options=EXACT)(THETA, jax.random.PRNGKey(1))
    out = []
    for t in range(steps):
        new, o = unroll(THETA, state, jax.random.PRNGKey(100 + t), t)
        out.append(jax.device_get((state, new, o)))
        state = new
    return out


def test_restored_segments_continue_from_their_position_and_positions_grow():
    history = _history()
    first = history[0][2]
    assert not first.info.restored.any() and (first.info.start_position == 0).all()
    assert first.reset[:, 0].all()  # every segment starts afresh (restored or fresh): no carry
    for t, (old, new, out) in enumerate(history[1:], start=1):
        assert out.info.restored.all()  # P_th = 0 and B not empty
        stored = set(np.asarray(old.reset_state.entries.step)[: int(old.reset_state.size)].tolist())
        assert set(out.info.start_position.tolist()) <= stored
        # Each particle ran N steps from ITS position K, not from 0.
        np.testing.assert_array_equal(out.position, out.info.start_position + N)
    positions = [out.position.max() for _, _, out in history]
    assert positions[-1] > 4 * N and positions[-1] > positions[1], positions


def test_each_segment_pushes_the_state_after_one_to_n_minus_one_updates():
    for old, new, out in _history():
        n_new = int(new.reset_state.pushes - old.reset_state.pushes)
        assert n_new == 8  # every particle offered one valid state
        slots = (int(old.reset_state.head) + np.arange(n_new)) % 6
        pushed = np.asarray(new.reset_state.entries.step)[slots]
        # N = 2: the pushed state had t = 1 update of its segment (t in 1..N-1).
        np.testing.assert_array_equal(pushed, out.info.start_position + 1)


def test_restored_state_equals_the_stored_one_bit_for_bit():
    """A segment that restores a state continues exactly that state: its first step from the
    stored params equals a step from the stored params taken directly."""
    old, new, out = _history()[3]
    entries = old.reset_state.entries
    trunc = jax.jit(UNROLLER.begin)(jax.device_put(old), jax.random.PRNGKey(103), 3)
    restored = jax.device_get(trunc.start.restored)
    for i in range(8):
        match = [s for s in range(int(old.reset_state.size))
                 if all(np.array_equal(np.asarray(a)[s], np.asarray(b)[i])
                        for a, b in zip(jax.tree.leaves(entries), jax.tree.leaves(restored)))]
        assert match, i
    assert out.info.restored.all()


def test_the_horizon_caps_a_chain():
    """Chains end at the trajectory length (here 5): positions never exceed it and a state at
    its length is never stored."""
    capped = Unroller(TASK, LOPT, 8, N, schedules.constant(5), stagger=False,
                      reset=ELOReplay(capacity=6, p_threshold=0.0))
    history = _history(capped, 12)
    for _, new, out in history:
        assert out.position.max() <= 5
        size = int(new.reset_state.size)
        steps = np.asarray(new.reset_state.entries.step)[:size]
        assert (steps < 5).all()
    assert max(out.position.max() for *_, out in history) == 5


def test_pes_refuses_the_buffer_whose_segments_make_it_truncated_es():
    """With the buffer every segment starts restored or fresh, so PES's perturbation sums would
    restart every truncation: its estimate would be truncated ES's. Naming pes there is an error
    that says so, in the estimator and, before anything is built, in a config."""
    from ml_collections import ConfigDict

    from lopt.training import config as config_lib
    from tasks.registry import ConfigError

    unroller = Unroller(TASK, LOPT, 4, N, schedules.constant(50), stagger=False,
                        reset=ELOReplay(capacity=4, p_threshold=0.0))
    with pytest.raises(ValueError, match="PES with a replay buffer .* is truncated ES"):
        estimators.get("pes").init(unroller, jax.random.PRNGKey(1), THETA)
    estimators.get("es").init(unroller, jax.random.PRNGKey(1), THETA)  # the honest name works
    c = ConfigDict(dict(
        seed=0, num_outer_steps=1, log_every=1, checkpoint_every=1,
        task=dict(name="quadratic", dim=2), lopt=dict(name="hyper_adam"),
        estimator=dict(name="pes"), meta_optimizer=dict(name="adam", learning_rate=1e-3),
        unroll=dict(num_particles=2, trunc_length=2, horizon=dict(name="constant", length=4),
                    replay=dict(capacity=4))))
    with pytest.raises(ConfigError, match="config.estimator: PES with a replay buffer"):
        config_lib.build(c)
    c.estimator.name = "es"
    config_lib.build(c)