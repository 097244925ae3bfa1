"""A reset policy of one's own: each truncation, a particle continues from the newest state any
particle offered (with probability ``p``), else its own trajectory; a one-state replay buffer.
Its five methods are the reset-policy contract (estimators/resets.py):

* ``segment_reset``: False, particles that are not restored continue their own trajectory;
* ``init(example)``: the policy's state, replicated on every device;
* ``draw(state, keys, outer_step)``: which particles restore, and the states they restore;
* ``push_index(keys, n_steps)``: after which inner step each particle offers its state;
* ``observe(state, offered, valid, shard_axis, num_shards)``: the state after the offers.

    lopt-train --config=docs/examples/latest_replay.py --workdir=runs/latest_replay

(docs/extending.md, "A reset policy").
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from estimators import resets


class LatestState(NamedTuple):
    entry: Any  # one particle's state
    full: jax.Array  # bool: an entry is stored


@resets.register("latest_replay")
@dataclasses.dataclass(frozen=True)
class LatestReplay:
    p: float = 0.25

    segment_reset = False

    def init(self, example):  # the same on every device: built from shapes, not values
        entry = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), example)
        return LatestState(entry, jnp.zeros([], bool))

    def draw(self, state, keys, outer_step):
        restore = jax.vmap(lambda k: jax.random.uniform(k) < self.p)(keys)
        restore = restore & state.full & (outer_step > 0)
        restored = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(keys),) + x.shape), state.entry)
        return restore, restored

    def push_index(self, keys, n_steps):  # every particle offers its state after the last step
        return jnp.full(keys.shape[:1], n_steps - 1, jnp.int32)

    def observe(self, state, offered, valid, shard_axis, num_shards=1):
        if shard_axis is not None:  # every device's offers, so every device keeps the same entry
            offered, valid = resets.gather_replicated((offered, valid), shard_axis, num_shards)
        last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[0]), -1))  # the newest valid offer
        entry = jax.tree.map(lambda x, old: jnp.where(last >= 0, x[jnp.maximum(last, 0)], old),
                             offered, state.entry)
        return LatestState(entry, state.full | (last >= 0))


def get_config():
    """The quickstart's optimizer on quadratics, every truncation drawing from this policy."""
    from ml_collections import ConfigDict

    from lopt.experiments.inputs import load_config

    c = load_config("quickstart")
    c.task = ConfigDict(dict(name="quadratic", dim=10))
    c.estimator = ConfigDict(dict(name="tbptt"))
    c.unroll.reset = ConfigDict(dict(name="latest_replay", p=0.25))
    c.num_outer_steps = 300
    c.unroll.horizon.length = 50
    return c
