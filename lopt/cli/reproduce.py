"""Reproduce each paper's qualitative claim at a stated scale: one command per claim, writing the
table, the plots and how they were made.

    python scripts/reproduce.py --experiment=quickstart --budget=cpu

Experiments (``--experiment``; ``all`` runs them in turn), one module of ``lopt/experiments/``
each, whose docstring states the paper's claim: ``quickstart`` (the quickstart's learned
optimizer against Adam tuned for its objective), ``metz2019`` (the merged estimator's optimizer
against tuned Adam; its ES share against the truncation length), ``chen2020`` (L2O-DM with
curriculum and imitation against naive training) and ``elo`` (ELO Table 1's shape, the
``lopt-ablate`` ablation). Each writes ``OUT/NAME.md`` with its PNGs and ``OUT/NAME.json``; a
report's hand-written section "What was tried before" is kept when it is regenerated.

Budgets (``--budget``), each module's ``BUDGETS``, printed into the report: ``smoke`` runs every
step of an experiment on tiny shapes (the test suite runs it: it checks the pipeline, not the
claim); ``cpu`` is the committed scale (a 2-core CPU, at most ~45 minutes an experiment, except
``chen2020``, whose curriculum runs to its stop rule: hours, and ``elo``, ~55 minutes: its
naive optimizer degrades at 10 H only after 3,000 outer steps); ``gpu`` the same experiments at a
larger scale for a machine with an accelerator.

Everything is written under the current directory unless asked otherwise, in a checkout and
installed alike: meta-training runs in ``--runs`` (default ``runs/reproduce/<budget>``, as
``<experiment>/<method>/seed<k>``; a rerun reuses finished runs and resumes unfinished ones),
reports in ``--out`` (default ``runs/reproduce/<budget>/results``; ``--out=docs/results``
regenerates a checkout's committed reports). MNIST experiments read the prepared ``mnist``
dataset and prepare it when missing from ``$LOPT_MNIST_SOURCE`` (a directory of MNIST's IDX
files; in a checkout, else ``../shared/data``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from absl import flags, logging

from lopt.cli.common import make_dir
from lopt.experiments.harness import UsageError

EXPERIMENTS = ("quickstart", "metz2019", "chen2020", "elo")
#: The module of ``lopt/experiments/`` that reproduces each experiment, where not its name (elo's
#: ablation is ``lopt.experiments.elo``, the ``lopt-ablate`` command's; its reproduction, the
#: horizon search and Figure 2 around it, is ``elo_reproduce``).
MODULES = {"elo": "elo_reproduce"}
BUDGETS = ("smoke", "cpu", "gpu")

_EXPERIMENT = flags.DEFINE_string("experiment", None, f"One of {', '.join(EXPERIMENTS)}, or all.")
_BUDGET = flags.DEFINE_enum("budget", "cpu", list(BUDGETS), "Scale of the experiment.")
_OUT = flags.DEFINE_string("out", None, "Where NAME.md, NAME.json and the PNGs go (default: "
                           "runs/reproduce/<budget>/results under the current directory; "
                           "docs/results in a checkout regenerates the committed reports).")
_RUNS = flags.DEFINE_string("runs", None, "Meta-training workdirs (default: runs/reproduce/<budget> "
                            "under the current directory).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on meta-training runs.")


def reproduce(name: str, budget: str, runs_root: str, out: str) -> None:
    """Run experiment ``name`` at ``budget`` and write its report into ``out``."""
    module = importlib.import_module(f"lopt.experiments.{MODULES.get(name, name)}")
    t0 = time.perf_counter()
    report = module.run(module.BUDGETS[budget], os.path.join(runs_root, name), out, _PROGRESS.value)
    command = f"python scripts/reproduce.py --experiment={name} --budget={budget}"
    path = report.write(out, command, time.perf_counter() - t0, budget)
    print(f"[{name}] wrote {path}", flush=True)
    for line in report.outcome:
        print(f"    {line}", flush=True)


def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    name = _EXPERIMENT.value
    if name is None or (name != "all" and name not in EXPERIMENTS):
        print(f"error: --experiment must be one of {', '.join(EXPERIMENTS)} or all, got {name!r}",
              file=sys.stderr)
        return 2
    budget = _BUDGET.value
    runs_root = _RUNS.value or os.path.join("runs", "reproduce", budget)
    out = _OUT.value or os.path.join("runs", "reproduce", budget, "results")
    try:
        make_dir(out, "--out")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lopt.cli.common import import_user_modules
    from tasks.registry import ConfigError

    try:
        import_user_modules()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for exp in EXPERIMENTS if name == "all" else (name,):
        try:
            reproduce(exp, budget, runs_root, out)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ConfigError as e:
            print(f"config error ({exp}): {e}", file=sys.stderr)
            return 2
    return 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-reproduce`` command."""
    from lopt.cli.common import run_app

    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
