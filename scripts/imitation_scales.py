"""Gradient and update scales of Chen et al. 2020's two objectives (imitation and meta-loss).

    python scripts/imitation_scales.py [--outer_steps=300] [--shared_meta_state]
    python scripts/imitation_scales.py --checkout=OLD   # the same measurement of another checkout

Steps a ``MetaTrainer`` built from ``configs/chen2020_dm_cl_il.py`` on MNIST 14x14 (MNIST from
``$LOPT_MNIST_SOURCE`` or ``../shared/data``), curriculum off (N_train = 160), imitation with
probability r = ``--prob`` per epoch, 4 particles, and prints per objective the median
meta-gradient norm, and the median norm of the meta-loss steps' meta-parameter updates before
and after the first imitation step (measured on the host from the meta-params).
``--shared_meta_state`` gives both objectives ONE meta-optimizer state, the defect of the first
implementation, which collapsed CL+IL to chance: the larger imitation gradients then own Adam's
second moments and the meta-loss steps shrink. ``--checkout`` measures another checkout of this
project (e.g. ``git worktree add OLD 0eb7c7e``, the code before the fix).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_STEPS = flags.DEFINE_integer("outer_steps", 300, "Outer steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Meta-seed.")
_PROB = flags.DEFINE_float("prob", 0.2, "r: the probability that an epoch is an imitation episode.")
_SHARED = flags.DEFINE_bool("shared_meta_state", False, "One meta-optimizer state for both objectives.")
_CHECKOUT = flags.DEFINE_string("checkout", None, "Measure this checkout's code (default: this one).")


def main(argv) -> None:
    del argv
    root = _CHECKOUT.value or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(root))
    import jax
    import numpy as np
    from ml_collections import ConfigDict

    try:
        from lopt.experiments.harness import configured, ensure_mnist
    except ImportError:  # a checkout from before lopt/experiments
        from lopt.cli.reproduce import configured, ensure_mnist
    from lopt.training import config as config_lib

    config = configured("chen2020_dm_cl_il", {"task.dataset": "mnist", "task.resize": 14,
                                              "unroll.num_particles": 4})
    config.curriculum.enabled = False
    config.imitation = ConfigDict({**config.imitation.to_dict(), "prob": _PROB.value})
    config.seed = _SEED.value
    ensure_mnist(config)
    trainer = config_lib.build(config)
    if _SHARED.value:  # one state: the trainer applies every gradient with it
        type(trainer.estimator).objectives = ("meta_loss",)
    state = trainer.init(jax.random.PRNGKey(_SEED.value))
    rows = []
    for _ in range(_STEPS.value):
        before = jax.device_get(state.meta_params)
        state, metrics = trainer.step(state)
        after, metrics = jax.device_get((state.meta_params, metrics))
        update = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                             for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))))
        rows.append((float(metrics["imitation"]), float(metrics["grad_norm"]), float(update)))
    rows = np.asarray(rows)
    imitation = rows[:, 0] == 1
    first = int(np.argmax(imitation)) if imitation.any() else len(rows)
    meta = rows[~imitation]
    print(f"{os.path.abspath(root)}: {len(rows)} outer steps, seed {_SEED.value}, r = {_PROB.value}"
          f"{', one shared meta-optimizer state' if _SHARED.value else ''}; "
          f"{int(imitation.sum())} imitation steps (the first at {first})")
    if imitation.any() and len(meta):
        g_meta, g_imit = np.median(meta[:, 1]), np.median(rows[imitation, 1])
        print(f"  median |grad|: meta-loss {g_meta:.4g}, imitation {g_imit:.4g} ({g_imit / g_meta:.0f}x)")
    pre, post = rows[:first][~imitation[:first]], rows[first:][~imitation[first:]]
    fmt = lambda x: f"{np.median(x[:, 2]):.4g} ({len(x)} steps)" if len(x) else "-"  # noqa: E731
    print(f"  median |update| of meta-loss steps: before the first imitation step {fmt(pre)}, "
          f"after {fmt(post)}")


if __name__ == "__main__":
    app.run(main)
