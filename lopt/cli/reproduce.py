"""Reproduce each paper's qualitative claim at a stated scale: one command per claim, writing the
table, the plots and how they were made.

    python scripts/reproduce.py --experiment=quickstart --budget=cpu

Experiments (``--experiment``; ``all`` runs them in turn), each a paper's claim, our setting,
and the measured outcome, written to ``OUT/NAME.md`` with its PNGs and ``OUT/NAME.json``:

* ``quickstart``: the quickstart's learned optimizer (``configs/quickstart.py``) beats Adam tuned
  for the objective it was meta-trained on: the mean normalised training loss over the horizon.
* ``metz2019``: Metz et al. 2019 (ICML), Sec. 4-5: the MLP optimizer meta-trained with the merged
  reparameterization + ES gradient on the validation meta-objective beats learning-rate-tuned
  Adam in held-out test loss at the meta-training horizon; and Sec. 3.1 / Fig. 3: the
  reparameterization gradient's variance explodes on long unrolls, so the merged estimator's
  ES share (``es_share``, the mean inverse-variance weight of the ES gradient) rises with the
  truncation length.
* ``chen2020``: Chen et al. 2020 (NeurIPS), Sec. 5.3 / Table 2: L2O-DM trained with the
  curriculum (Alg. 1) and imitation of analytical optimizers (Alg. 2) reaches a lower final
  training loss than L2O-DM trained naively, on unseen ``mlp_orig`` MNIST optimizees run well
  past the training length; Adam (tuned) beside them.
* ``elo``: ELO's Table 1 shape (AdamW / LO naive / LO + curriculum / ELO-LO at H and 10 H on an
  MLP on MNIST, ``scripts/ablate.py``): ELO holds up at 10 H where the naive optimizer degrades.

Budgets (``--budget``): ``smoke`` runs every step of an experiment on tiny shapes (seconds of
work after compiling; the test suite runs it: it checks the pipeline, not the claim); ``cpu`` is
the committed scale (a 2-core CPU, at most ~30 minutes an experiment); ``gpu`` the same
experiments at a larger scale for a machine with an accelerator. The settings of each budget are
in ``BUDGETS`` below and are printed into the report.

Honesty rules every table follows: Adam's learning rate is tuned (over ``lrs``, a log grid) on
task instances ``PRNGKey(3,000,000 + i)``, separate from the evaluation instances
``PRNGKey(1,000,000 + i)``, for the criterion the experiment compares on; a best rate at the edge
of the grid is flagged; numbers are mean ± std over evaluation instances x meta-training seeds;
compared methods run the same number of inner steps; nothing is tuned on the evaluation
instances; the outcome line is computed from the numbers (no method is asserted to win).

Meta-training runs live in ``--runs`` (``runs/reproduce/<budget>/<experiment>/<method>/seed<k>``):
a rerun reuses finished runs and resumes unfinished ones. MNIST experiments read the prepared
``mnist`` dataset and prepare it from ``../shared/data`` (the checkout's sibling) when missing.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags, logging

from lopt.experiments import chen2020, elo, metz2019, quickstart
from lopt.experiments.harness import UsageError

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPERIMENTS = ("quickstart", "metz2019", "chen2020", "elo")

_EXPERIMENT = flags.DEFINE_string("experiment", None, f"One of {', '.join(EXPERIMENTS)}, or all.")
_BUDGET = flags.DEFINE_enum("budget", "cpu", ["smoke", "cpu", "gpu"], "Scale of the experiment.")
_OUT = flags.DEFINE_string("out", None, "Where NAME.md, NAME.json and the PNGs go (default: "
                           "docs/results for cpu, docs/results/gpu for gpu, "
                           "runs/reproduce/smoke/results for smoke).")
_RUNS = flags.DEFINE_string("runs", None, "Meta-training workdirs (default runs/reproduce/<budget>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on meta-training runs.")

MODULES = {"quickstart": quickstart, "metz2019": metz2019, "chen2020": chen2020, "elo": elo}
BUDGETS = {name: module.BUDGETS for name, module in MODULES.items()}
RUNNERS = {name: module.run for name, module in MODULES.items()}


def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    name = _EXPERIMENT.value
    if name is None or (name != "all" and name not in EXPERIMENTS):
        print(f"error: --experiment must be one of {', '.join(EXPERIMENTS)} or all, got {name!r}",
              file=sys.stderr)
        return 2
    budget = _BUDGET.value
    names = list(EXPERIMENTS) if name == "all" else [name]
    default_out = {"cpu": "docs/results", "gpu": "docs/results/gpu",
                   "smoke": "runs/reproduce/smoke/results"}[budget]
    out = _OUT.value or os.path.join(_CHECKOUT, default_out)
    runs_root = _RUNS.value or os.path.join(_CHECKOUT, "runs", "reproduce", budget)
    os.makedirs(out, exist_ok=True)
    for exp in names:
        t0 = time.perf_counter()
        command = f"python scripts/reproduce.py --experiment={exp} --budget={budget}"
        try:
            report = RUNNERS[exp](BUDGETS[exp][budget], os.path.join(runs_root, exp), out,
                                  _PROGRESS.value)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        path = report.write(out, command, time.perf_counter() - t0, budget)
        print(f"[{exp}] wrote {path}", flush=True)
        for line in report.outcome:
            print(f"    {line}", flush=True)
    return 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-reproduce`` command."""
    from lopt.cli.common import run_app

    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
