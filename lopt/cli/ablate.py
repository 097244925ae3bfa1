"""Ablate the training techniques, in the shape of ELO's Table 1: tuned AdamW, the naive learned
optimizer, the learned optimizer with Chen et al.'s curriculum, and ELO, each evaluated at the
meta-training horizon H and at 10 H on held-out task instances.

    python scripts/ablate.py --out=runs/ablate

The methods, what they share and how they are evaluated: ``lopt/experiments/elo.py``. Every
meta-training run is ``lopt.training.train`` in ``OUT/<method>/seed<k>``, so rerunning resumes
unfinished runs and reuses finished ones. Outputs in ``--out``: ``table.md`` (also printed),
``results.json`` (every number, per seed, the command line) and ``curves.png`` (training loss
over 10 H steps; the horizon marked). ``--module`` imports a module of your own first, so the
configs may name the task or optimizer it registers (docs/extending.md).
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from typing import Any

from absl import flags, logging

from lopt.cli.common import make_dir, parse_lrs
from lopt.experiments import elo
from lopt.experiments.harness import UsageError

_DEFAULTS = elo.Options()

_OUT = flags.DEFINE_string("out", "runs/ablate", "Output directory (runs, table, results, plot).")
_METHODS = flags.DEFINE_string("methods", ",".join(elo.METHODS),
                               f"Comma-separated subset of {elo.METHODS}.")
_NAIVE_CONFIG = flags.DEFINE_string(
    "naive_config", _DEFAULTS.naive_config, "Config of the naive learned optimizer (also the "
    "base of the curriculum run): a shipped config's name or a config file's path.")
_ELO_CONFIG = flags.DEFINE_string(
    "elo_config", _DEFAULTS.elo_config, "Config of the ELO run: a shipped config's name or a "
    "config file's path.")
_SET = flags.DEFINE_multi_string(
    "set", [], "key=value applied to every learned-optimizer config, e.g. "
    "--set unroll.num_particles=4 (value parsed as a Python literal, else a string).")
_OUTER_STEPS = flags.DEFINE_integer(
    "outer_steps", None, "Outer-step budget of every meta-training run (default: the configs').")
_META_SEEDS = flags.DEFINE_integer("meta_seeds", _DEFAULTS.meta_seeds, "Meta-training runs per "
                                   "learned optimizer (config seeds 0 .. meta_seeds - 1).")
_SEEDS = flags.DEFINE_integer("seeds", _DEFAULTS.seeds, "Held-out task instances in the evaluation.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", _DEFAULTS.seed_offset,
                                    "Instance i is PRNGKey(seed_offset + i).")
_TUNE_SEED_OFFSET = flags.DEFINE_integer(
    "tune_seed_offset", _DEFAULTS.tune_seed_offset, "AdamW is tuned on instances "
    "PRNGKey(tune_seed_offset + i), i < --seeds, never on the evaluation instances.")
_FACTOR = flags.DEFINE_integer("factor", _DEFAULTS.factor, "The long evaluation runs factor x H steps.")
_LRS = flags.DEFINE_string("lrs", "1e-4,3.16e-4,1e-3,3.16e-3,1e-2,3.16e-2,1e-1",
                           "AdamW learning rates to tune over.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "AdamW's decoupled weight decay.")
_CL_STAGES = flags.DEFINE_string("cl_stages", None, "Curriculum stages N_train, comma-separated "
                                 "(default: H/4, H/2, H).")
_CL_PERIOD = flags.DEFINE_integer("cl_period", None, "Curriculum T_period in epochs (one "
                                  "N_train-step trajectory per particle; with N_train <= N one "
                                  "outer step; default: an eighth of the outer-step budget).")
_CL_MIN_PERIODS = flags.DEFINE_integer("cl_min_periods", _DEFAULTS.cl_min_periods, "Curriculum N_period.")
_CL_MAX_PERIODS = flags.DEFINE_integer("cl_max_periods", _DEFAULTS.cl_max_periods, "Our cap on a "
                                       "stage's periods (not in Chen et al.'s Algorithm 1), so the "
                                       "three stages fit the budget.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per meta-training run.")


def parse_value(text: str) -> Any:
    """A ``--set`` value: a Python literal (``4``, ``(32,)``, ``False``, ``1e-3``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def options() -> elo.Options:
    """The flags as the ablation's options; a malformed flag is a UsageError."""
    overrides = []
    for item in _SET.value:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set wants key=value, got {item!r}")
        overrides.append((key.strip(), parse_value(value)))
    stages = None
    if _CL_STAGES.value:
        try:
            stages = tuple(int(x) for x in _CL_STAGES.value.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--cl_stages must be comma-separated integers, got {_CL_STAGES.value!r}") from None
    return elo.Options(
        elo_config=_ELO_CONFIG.value, naive_config=_NAIVE_CONFIG.value,
        methods=tuple(m.strip() for m in _METHODS.value.split(",") if m.strip()),
        meta_seeds=_META_SEEDS.value, seeds=_SEEDS.value, factor=_FACTOR.value,
        outer_steps=_OUTER_STEPS.value, overrides=tuple(overrides),
        lrs=tuple(parse_lrs(_LRS.value) or elo.DEFAULT_LRS), seed_offset=_SEED_OFFSET.value,
        tune_seed_offset=_TUNE_SEED_OFFSET.value, weight_decay=_WEIGHT_DECAY.value,
        cl_stages=stages, cl_period=_CL_PERIOD.value, cl_min_periods=_CL_MIN_PERIODS.value,
        cl_max_periods=_CL_MAX_PERIODS.value)


def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    from lopt.cli.common import import_user_modules
    from tasks.registry import ConfigError

    try:
        modules = import_user_modules()  # before the configs load: they may name its components
        s = elo.settings(dataclasses.replace(options(), modules=modules))
        make_dir(_OUT.value, "--out")
        _, failed = elo.ablate(s, _OUT.value, ["scripts/ablate.py", *sys.argv[1:]], _PROGRESS.value)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-ablate`` command."""
    from lopt.cli.common import run_app

    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
