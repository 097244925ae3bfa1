"""A learned optimizer of one's own: SGD with momentum whose learning rate and momentum are the
meta-params, written as an optax transformation (init, update, a NamedTuple state).

    lopt-train --config=docs/examples/momentum_lopt.py --workdir=runs/momentum
    lopt-eval --export=runs/momentum/export/optimizer.safetensors --task=quadratic

(docs/extending.md, "A learned optimizer").
"""

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lopt


class MomentumState(NamedTuple):
    momentum: optax.Params  # like the params


@lopt.register("learned_momentum")
@dataclasses.dataclass(frozen=True)  # its fields are what an export records and rebuilds
class LearnedMomentum:
    init_learning_rate: float = 0.01
    init_momentum: float = 0.5
    name: ClassVar[str] = "learned_momentum"

    def init(self, key):  # meta-params: float arrays (unconstrained: a log and a logit)
        del key
        return {"log_lr": jnp.log(jnp.float32(self.init_learning_rate)),
                "logit_beta": jax.scipy.special.logit(jnp.float32(self.init_momentum))}

    def optimizer(self, meta_params):
        lr = jnp.exp(meta_params["log_lr"])
        beta = jax.nn.sigmoid(meta_params["logit_beta"])

        def init_fn(params):
            return MomentumState(jax.tree.map(jnp.zeros_like, params))

        def update_fn(grads, state, params=None, **extra_args):  # extra: loss, key, outer_step
            del params, extra_args
            momentum = jax.tree.map(lambda m, g: beta * m + g, state.momentum, grads)
            updates = jax.tree.map(lambda m: -lr * m, momentum)  # the params' structure
            return updates, MomentumState(momentum)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def get_config():
    """PES meta-training of this optimizer on the shipped quadratic task family."""
    from ml_collections import ConfigDict

    from lopt.experiments.inputs import load_config

    c = load_config("quickstart")
    c.task = ConfigDict(dict(name="quadratic", dim=10))
    c.lopt = ConfigDict(dict(name="learned_momentum", init_learning_rate=0.01))
    c.meta_optimizer.learning_rate = 1e-2
    c.num_outer_steps = 300
    c.unroll.horizon.length = 50
    return c
