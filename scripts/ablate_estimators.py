"""Ablate the meta-gradient estimators: same experiment, same seeds, same inner-step budget.

    python scripts/ablate_estimators.py --config=configs/ablate_estimators.py \
        --workdir=runs/ablate_estimators

Every estimator of ``--estimators`` (default: all sections of the config file's
``get_ablation().estimators``) meta-trains the config's experiment for ``--inner_steps`` inner
steps and is evaluated on the same held-out instances (``lopt/experiments/estimators.py`` says
how). Rerunning resumes each run from its checkpoint. Outputs in --workdir: ``table.md`` (also
printed), ``results.json`` and ``meta_loss.png`` (meta-loss against cumulative inner steps, one
line per estimator).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lopt.cli.common import define_config, parse_flags  # noqa: E402
from lopt.experiments import estimators  # noqa: E402
from lopt.experiments.harness import UsageError  # noqa: E402

_CONFIG = define_config(
    "config", estimators.DEFAULT_CONFIG, "Experiment config with get_config() and get_ablation(): "
    "a file's path or a shipped config's name."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablate_estimators", "Output directory.")
_INNER_STEPS = flags.DEFINE_integer(
    "inner_steps", None, "Inner-step budget per estimator (default: the config's ablation)."
)
_ESTIMATORS = flags.DEFINE_string(
    "estimators", None, "Comma-separated estimators to run (default: all in the config's ablation)."
)
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Steps per held-out task instance.")
_EVAL_SEEDS = flags.DEFINE_integer("eval_seeds", None, "Number of held-out task instances.")
_SEED = flags.DEFINE_integer("seed", None, "Meta-training seed, shared by every estimator "
                             "(default: the config's seed).")
_ADAM = flags.DEFINE_bool("adam_baseline", True, "Add tuned Adam on the held-out instances.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per estimator.")


def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    from tasks.registry import ConfigError

    try:
        ablation = estimators.load_ablation(config_flags.get_config_filename(flags.FLAGS["config"]))
        s = estimators.settings(ablation, _ESTIMATORS.value, _INNER_STEPS.value, _EVAL_STEPS.value,
                                _EVAL_SEEDS.value)
        base = _CONFIG.value
        if _SEED.value is not None:
            base.seed = _SEED.value
        _, failed = estimators.ablate(base, ablation, s, _WORKDIR.value, _ADAM.value, _PROGRESS.value)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
