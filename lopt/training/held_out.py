"""Meta-params run on held-out task instances: one compiled program per (task family, learned
optimizer, length), vmapped over the instances, with the meta-params an argument, so every
validation or evaluation at a length after the first reuses its compile.

Used by the curriculum's validation (``lopt.training.curriculum.Validator``, Chen et al. 2020
Algorithm 1's "val. loss with phi0 and N_valid") and by the evaluation during meta-training
(``lopt.training.continuous_eval``). Each instance trains as ``lopt.training.evaluation``'s
``train_curves`` trains it; instance i of a set is drawn from ``PRNGKey(offset + i)``
(:func:`instance_keys`), each set's offset far from the others' and from the keys meta-training
derives from ``config.seed``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lopt.base import LearnedOptimizer, build_optimizer
from lopt.training import evaluation
from tasks.base import TaskFamily, bind_data

__all__ = ["instance_keys", "program"]


def instance_keys(offset: int, num: int) -> jax.Array:
    """``[num, 2]`` raw keys, instance i from ``PRNGKey(offset + i)``."""
    return jnp.stack([jax.random.PRNGKey(int(offset) + i) for i in range(int(num))])


@functools.lru_cache(maxsize=64)
def program(task: TaskFamily, learned_opt: LearnedOptimizer, num_steps: int):
    """``fn(meta_params, keys, arrays) -> {metric: [instances]}``, jitted once per (task, learned
    optimizer, length): ``final_train_loss`` (mean of the last ``evaluation.FINAL_WINDOW``
    training-batch losses), ``mean_train_loss`` (over all ``num_steps``), ``test_loss`` and,
    when the task's aux reports one, ``test_accuracy`` of the final parameters. ``arrays`` is
    the task's dataset (``tasks.base.data_arrays``), an argument rather than a constant.
    (``evaluation.train_curves`` caches on the optimizer object, i.e. on the meta-params; this
    does not.)"""

    def run(meta_params, keys, arrays):
        one = functools.partial(
            evaluation._run_one, bind_data(task, arrays), build_optimizer(learned_opt, meta_params, num_steps), num_steps
        )
        out = jax.vmap(one)(keys)
        result = {
            "final_train_loss": out["final_train_loss"],
            "mean_train_loss": jnp.mean(out["train_loss"], axis=1),
            "test_loss": out["test_loss"],
        }
        if "test_accuracy" in out:
            result["test_accuracy"] = out["test_accuracy"]
        return result

    return jax.jit(run)
