"""The ELO replay buffer: FIFO ring buffer, capacity, restore frequency against P_th, exact
restores, antithetic partners, and PES's perturbation sums for restored states."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.base import pair_keys
from estimators.replay import ReplayBuffer
from estimators.unroll import Unroller

TASK = tasks.get("quadratic", dim=3, noise_std=0.1)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)
THETA = LOPT.init(jax.random.PRNGKey(0))
EXACT = {"xla_backend_optimization_level": 0}  # see test_behaviour_cloning.py


def _entry(i: int):
    return {"a": jnp.full((2,), float(i)), "k": jnp.asarray(i, jnp.int32)}


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_ring_buffer_is_fifo_with_capacity():
    buf = ReplayBuffer(capacity=3, p_threshold=0.5)
    state = buf.init(_entry(0))
    assert int(state.size) == 0
    for i in range(1, 8):
        state = buf.push(state, _entry(i))
        slots = np.asarray(buf.fifo_slots(state))[: int(state.size)]
        stored = [int(buf.lookup(state, s)["k"]) for s in slots]
        assert stored == list(range(max(1, i - 2), i + 1))  # oldest first; the oldest dequeued
        assert int(state.size) == min(i, 3)
    assert int(state.pushes) == 7
    assert _leaves_equal(buf.lookup(state, (int(state.head) - 1) % 3), _entry(7))
    # No restore before the first outer step or from an empty buffer, whatever u is.
    never = ReplayBuffer(capacity=3, p_threshold=0.0)
    assert not bool(never.draw(state, jax.random.PRNGKey(0), jnp.asarray(0))[0])
    assert not bool(never.draw(never.init(_entry(0)), jax.random.PRNGKey(0), jnp.asarray(5))[0])
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)


# One compiled unroll for the statistics and exactness tests: N_PAIRS antithetic-style pairs
# (partners share keys), one-step truncations, trajectories of 2 steps: a particle resets every
# other truncation, and with one-step truncations the pushed state is the truncation's final
# state, so every push and every restore can be checked bit for bit.
N_PAIRS, CAPACITY, P_TH = 64, 3, 0.3
UNROLLER = Unroller(TASK, LOPT, 2 * N_PAIRS, 1, schedules.constant(2), stagger=False,
                    replay=ReplayBuffer(CAPACITY, P_TH))


@functools.lru_cache(maxsize=None)
def _unroll_run(num_truncations: int = 8):
    """[(state before, state after, output)] of consecutive truncations, as numpy."""
    init = jax.jit(UNROLLER.init, compiler_options=EXACT)
    unroll = jax.jit(UNROLLER.unroll, compiler_options=EXACT)
    state = init(THETA, pair_keys(UNROLLER, jax.random.PRNGKey(1)))
    history = []
    for i in range(num_truncations):
        new, out = unroll(THETA, state, pair_keys(UNROLLER, jax.random.PRNGKey(100 + i)))
        history.append(jax.device_get((state, new, out)))
        state = new
    return history


def _at(tree, *index):
    return jax.tree.map(lambda x: x[index], tree)


def test_pushes_are_fifo_and_restores_equal_the_stored_states_exactly():
    for outer, (old, new, out) in enumerate(_unroll_run()):
        rb_old, rb_new = old.replay, new.replay
        np.testing.assert_array_equal(rb_new.size, np.minimum(outer + 1, CAPACITY))
        np.testing.assert_array_equal(out.push_slot, outer % CAPACITY)
        head = outer % CAPACITY
        # The truncation's (final) state was enqueued at the head, over the oldest entry.
        assert _leaves_equal(_at(rb_new.entries, slice(None), head), new.particles)
        # Older entries are untouched.
        keep = [s for s in range(CAPACITY) if s != head]
        assert _leaves_equal(_at(rb_old.entries, slice(None), keep), _at(rb_new.entries, slice(None), keep))
        restored = out.restored[:, 0]
        for i in np.flatnonzero(restored >= 0):  # equal to the entry stored before the truncation
            assert _leaves_equal(_at(new.particles, i), _at(rb_old.entries, i, restored[i]))
        fresh = out.done[:, 0] & (restored < 0)
        assert (new.particles.step[fresh] == 0).all()
    # Restored states carry their inner step K > 0 (pushed mid-trajectory), not a fresh 0.
    steps = [new.particles.step[i] for _, new, out in _unroll_run()
             for i in np.flatnonzero(out.restored[:, 0] >= 0)]
    assert steps and max(steps) == 1


def test_restore_frequency_matches_p_threshold_and_partners_agree():
    history = _unroll_run()
    assert (history[0][2].restored == -1).all()  # outer step 0 never restores
    done = np.concatenate([out.done[0::2] for _, _, out in history[1:]])
    restored = np.concatenate([out.restored[0::2] for _, _, out in history[1:]])
    n, k = int(done.sum()), int((restored >= 0).sum())
    p = 1.0 - P_TH
    assert n > 200
    assert abs(k - n * p) < 4.0 * np.sqrt(n * p * (1 - p)), (k, n)  # binomial, 4 sigma
    assert (restored[~done] == -1).all()
    for _, _, out in history:  # antithetic partners restore the same slot
        np.testing.assert_array_equal(out.restored[0::2], out.restored[1::2])
    # Slots are drawn uniformly over the stored entries.
    counts = np.bincount(restored[restored >= 0], minlength=CAPACITY)
    assert counts.min() > 0.2 * counts.sum() / CAPACITY


def test_pes_keeps_perturbation_sums_with_the_buffer():
    """PES with the buffer: the pushed entry's sum is the pushed state's sum, and a pair that
    restores an entry at the end of a truncation takes that entry's sum (one-step truncations:
    the pushed state is the final one, and a reset is always the truncation's last step)."""
    unroller = Unroller(TASK, LOPT, 4, 1, schedules.constant(2), stagger=False,
                        replay=ReplayBuffer(capacity=2, p_threshold=0.0))
    pes = estimators.get("pes", std=0.1)
    state = pes.init(unroller, jax.random.PRNGKey(1), THETA)
    step = jax.jit(lambda s, k: pes.grad(unroller, THETA, s, k), compiler_options=EXACT)
    # Before anything is restored, the buffer's bookkeeping reproduces plain PES exactly.
    plain = dataclasses.replace(unroller, replay=None)
    plain_state = pes.init(plain, jax.random.PRNGKey(1), THETA)
    plain_grad, plain_new, _ = jax.jit(lambda s, k: pes.grad(plain, THETA, s, k), compiler_options=EXACT)(
        plain_state, jax.random.PRNGKey(10))
    restores = 0
    for i in range(6):
        grad, new_dev, _ = step(state, jax.random.PRNGKey(10 + i))
        if i == 0:
            assert _leaves_equal(grad, plain_grad) and _leaves_equal(new_dev.accum, plain_new.accum)
        old, new = jax.device_get((state, new_dev))
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.device_get(grad)))
        np.testing.assert_array_equal(new.unroll.replay.head[0::2], new.unroll.replay.head[1::2])
        for pair in range(2):
            head = (new.unroll.replay.head[2 * pair] - 1) % 2
            assert _leaves_equal(_at(new.replay_sums, pair, head), _at(new.accum, pair))
            if i == 0 or old.unroll.particles.step[2 * pair] != 1:
                continue  # no reset in this truncation (P_th = 0: every later reset restores)
            for sign in (0, 1):  # each partner restored its own copy of the same slot
                final = _at(new.unroll.particles, 2 * pair + sign)
                slots = [s for s in range(int(old.unroll.replay.size[2 * pair]))
                         if _leaves_equal(final, _at(old.unroll.replay.entries, 2 * pair + sign, s))]
                assert slots
            assert any(_leaves_equal(_at(new.accum, pair), _at(old.replay_sums, pair, s)) for s in slots)
            restores += 1
        state = new_dev
    assert restores > 0
