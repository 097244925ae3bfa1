"""``pes``: Persistent Evolution Strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each antithetic pair i keeps the running sum xi_i of the perturbations that shaped its
current inner trajectory. For the truncation with fresh eps_i ~ N(0, s^2 I), the pair's
trajectories unroll with theta + eps_i and theta - eps_i, and (Vicol et al. 2021, eq. 8 / Alg. 2)

    g = 1 / (2 s^2 N) * sum_i  (L(theta + eps_i) - L(theta - eps_i)) * (xi_i + eps_i) .

Here L is the mean over the truncation of the per-step meta-loss terms, and the accumulated
sum is attributed *per step*: a trajectory that ends inside the truncation is credited with
xi_i + eps_i for its steps up to the reset, while the new trajectory after the reset is
credited with eps_i alone (its state owes nothing to earlier perturbations). After the
truncation xi_i becomes xi_i + eps_i, or eps_i if the pair reset mid-truncation, or 0 if it
reset at the truncation's last step (a fresh state has seen no perturbation).

With the ELO replay buffer (``Unroller.replay``) a reset may restore a stored state instead of
a fresh one. That state was shaped by the perturbations of the trajectory that pushed it, so
PES keeps, aligned with the buffer's slots, each entry's perturbation sum S (the pair's sum
at the push: xi_i + eps_i of that truncation, or whatever base the pushed trajectory had).
Every step is credited with (base + eps_i), where the base of a trajectory segment is xi_i
for the segment carried into the truncation, S_slot for a segment restored from ``slot``,
and 0 for a fresh one; the gradient is

    g = sum_i c(sum_t d_it) eps_i + c(sum_{t carried} d_it) xi_i
        + sum_slot c(sum_{t restored from slot} d_it) S_i,slot ,

with d_it the per-step loss differences and c(.) the ES coefficient (``es_coefficients``,
the clip/sign options applied per part). After the truncation xi_i is the base of the final
state (+ eps_i if it took a step of this truncation) and the pushed entry's S is computed the
same way at the push step. Restored states owe their dependence on the meta-params to
earlier meta-params, the same approximation PES makes for every carried state.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

import estimators
from estimators.base import (
    ESOptions,
    antithetic_unroll,
    num_pairs,
    pair_keys,
    split_signs,
    weighted_sum,
)
from estimators.unroll import Unroller, UnrollState, unroll_metrics
from lopt.base import MetaParams


class PESState(NamedTuple):
    unroll: UnrollState  # 2N interleaved particles: 2i positive, 2i + 1 negative
    accum: MetaParams  # [N, ...] perturbation sums xi_i
    replay_sums: MetaParams | None = None  # [N, M, ...] sums S of the replay buffer's entries


@estimators.register("pes")
@dataclasses.dataclass(frozen=True)
class PES(ESOptions):
    """Persistent ES; options ``std``, ``loss_diff_clip``, ``sign`` as in :class:`ESOptions`."""

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> PESState:
        n = num_pairs(unroller, "pes")
        unroll = unroller.init(meta_params, pair_keys(unroller, key))
        accum = jax.tree.map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.float32), meta_params)
        sums = None
        if unroller.replay is not None:
            m = unroller.replay.capacity
            sums = jax.tree.map(lambda x: jnp.zeros((n, m) + jnp.shape(x), jnp.float32), meta_params)
        return PESState(unroll, accum, sums)

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: PESState, key: jax.Array
    ) -> tuple[MetaParams, PESState, dict]:
        n = num_pairs(unroller, "pes")
        eps, unroll, out = antithetic_unroll(unroller, meta_params, state.unroll, key, self.std)
        pos, neg = split_signs(out.losses * out.step_weights())  # per-step share of the loss
        diff = pos - neg  # [N, T]
        done = split_signs(out.done)[0]  # partners share tasks and lengths: their masks agree
        before_reset = jnp.cumsum(done, axis=1) - done == 0  # step t belongs to the old trajectory
        coef_eps = self.es_coefficients(diff.sum(axis=1))
        coef_acc = self.es_coefficients(jnp.where(before_reset, diff, 0.0).sum(axis=1))
        grad = jax.tree.map(
            lambda a, b: a + b, weighted_sum(coef_eps, eps), weighted_sum(coef_acc, state.accum)
        )
        any_done = done.any(axis=1)
        last_ran = jnp.argmax(jnp.cumsum(split_signs(out.mask)[0], axis=1), axis=1)  # index of last step run
        reset_at_end = jnp.take_along_axis(done, last_ran[:, None], axis=1)[:, 0]

        def new_sum(acc, e):
            shape = (n,) + (1,) * (acc.ndim - 1)
            fresh = jnp.where(reset_at_end.reshape(shape), 0.0, e)
            return jnp.where(any_done.reshape(shape), fresh, acc + e)

        if unroller.replay is None:
            accum, sums = jax.tree.map(new_sum, state.accum, eps), None
        else:
            g_replay, accum, sums = self._replay_terms(unroller, out, diff, done, eps, state)
            grad = jax.tree.map(lambda a, b: a + b, grad, g_replay)
        metrics = {
            "meta_loss": out.step_mean().mean(),
            **unroll_metrics(unroller, out, unroll.particles, pairs=True),
        }
        return grad, PESState(unroll, accum, sums), metrics

    def _replay_terms(self, unroller, out, diff, done, eps, state):
        """Replay-buffer bookkeeping (module docstring): the restored segments' gradient
        term, the new sums xi_i, and the buffer's sums with this truncation's push written."""
        n, t_len = done.shape
        m = unroller.replay.capacity
        restored = split_signs(out.restored)[0]  # [N, T] slot restored by step t's reset, or -1
        steps = jnp.arange(t_len)
        latest = jax.lax.cummax(jnp.where(done, steps, -1), axis=1)  # last reset at or before t
        prev = jnp.concatenate([jnp.full((n, 1), -1), latest[:, :-1]], axis=1)  # strictly before
        prev_slot = jnp.take_along_axis(restored, jnp.maximum(prev, 0), axis=1)
        src = jnp.where(prev >= 0, prev_slot, -1)  # step t's segment restored from src (or -1)
        onehot = (src[..., None] == jnp.arange(m)).astype(diff.dtype)  # [N, T, M]
        coef = self.es_coefficients((onehot * diff[..., None]).sum(axis=1))  # [N, M]
        g_replay = jax.tree.map(
            lambda s: jnp.tensordot(coef, s, axes=([0, 1], [0, 1])), state.replay_sums
        )
        rows = jnp.arange(n)

        def sum_after(t):
            """Perturbation sum of the state after step t[i] of pair i."""
            d = done[rows, t]
            slot = jnp.where(d, restored[rows, t], src[rows, t])
            carried = ~d & (prev[rows, t] < 0)

            def leaf(acc, s, e):
                shape = (n,) + (1,) * (acc.ndim - 1)
                stored = s[rows, jnp.maximum(slot, 0)]
                base = jnp.where(carried.reshape(shape), acc,
                                 jnp.where((slot >= 0).reshape(shape), stored, 0.0))
                return base + jnp.where(d.reshape(shape), 0.0, e)

            return jax.tree.map(leaf, state.accum, state.replay_sums, eps)

        last_ran = jnp.argmax(jnp.cumsum(split_signs(out.mask)[0], axis=1), axis=1)
        accum = sum_after(last_ran)
        pushed = sum_after(split_signs(out.push_index)[0])
        slot = split_signs(out.push_slot)[0]
        sums = jax.tree.map(lambda s, p: s.at[rows, slot].set(p), state.replay_sums, pushed)
        return g_replay, accum, sums
