"""Gradient and update scales of Chen et al. 2020's two objectives in one CL+IL run.

    python scripts/imitation_scales.py --outer_steps=200 [--shared_meta_state] [--normalize=teacher]

Meta-trains ``configs/chen2020_dm_cl_il.py`` on MNIST 14x14 (``../shared/data``, as the chen2020
experiment's cpu budget) with one log row per outer step, and prints, per objective, the median
meta-gradient norm and the median norm of the meta-optimizer's update. ``--shared_meta_state``
gives both objectives ONE meta-optimizer state (the defect of the first implementation, which
collapsed CL+IL to chance): the imitation gradients, orders of magnitude larger, then own Adam's
second moments and the meta-loss steps' updates shrink. Without it each objective keeps its own
state (``lopt.training.trainer.per_objective``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEPS = flags.DEFINE_integer("outer_steps", 160, "Outer steps of the CL+IL run.")
_SEED = flags.DEFINE_integer("seed", 0, "Meta-seed.")
_SHARED = flags.DEFINE_bool("shared_meta_state", False, "One meta-optimizer state for both objectives.")
_NORMALIZE = flags.DEFINE_enum("normalize", "none", ["none", "teacher"],
                               "imitation.normalize (the first implementation's default was teacher).")
_PROB = flags.DEFINE_float("prob", 0.3, "r at every curriculum stage (the config's stage 0 has "
                           "r = 0, so a short run would see no imitation step).")


def main(argv) -> None:
    del argv
    from estimators.imitation import Imitation
    from lopt.experiments.harness import configured, ensure_mnist
    from lopt.training import loop

    if _SHARED.value:  # the trainer then keeps one state and applies every gradient with it
        Imitation.objectives = ("meta_loss",)
    config = configured("chen2020_dm_cl_il", {"task.dataset": "mnist", "task.resize": 14,
                                              "unroll.num_particles": 4, "curriculum.period": 20})
    config.imitation.normalize = _NORMALIZE.value
    config.imitation.prob = (_PROB.value,)  # every stage (the last value repeats)
    config.num_outer_steps = _STEPS.value
    config.log_every = 1
    config.seed = _SEED.value
    ensure_mnist(config)
    with tempfile.TemporaryDirectory() as workdir:
        loop.train(config, workdir, progress=False)
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "grad_norm" in r]
    kinds = {"meta-loss": [r for r in rows if r.get("imitation", 0.0) == 0.0],
             "imitation": [r for r in rows if r.get("imitation", 0.0) == 1.0]}
    state = "one shared meta-optimizer state" if _SHARED.value else "one meta-optimizer state per objective"
    print(f"{state}, imitation.normalize={_NORMALIZE.value}; {len(rows)} outer steps, seed {_SEED.value}")
    for name, rs in kinds.items():
        if not rs:
            print(f"  {name}: no steps")
            continue
        g = np.median([r["grad_norm"] for r in rs])
        u = np.median([r["update_norm"] for r in rs])
        print(f"  {name:9s} steps {len(rs):4d}  median |grad| {g:.4g}  median |update| {u:.4g}")
    late = [r for r in kinds["meta-loss"] if any(q.get("imitation") == 1.0 and q["step"] < r["step"] for q in kinds["imitation"])]
    if late:
        print(f"  meta-loss steps after the first imitation step: median |update| "
              f"{np.median([r['update_norm'] for r in late]):.4g} ({len(late)} steps)")


if __name__ == "__main__":
    app.run(main)
