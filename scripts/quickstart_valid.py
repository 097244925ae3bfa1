"""The quickstart meta-trained on L_valid instead of L_train, against Adam tuned for each criterion.

    python scripts/quickstart_valid.py [--split=valid] [--meta_seeds=3] [--runs=runs/quickstart_valid]

Issue 28's item 4: the quickstart (configs/quickstart.py: PES, 5,000 outer steps) meta-trains on
the training loss, and its report (docs/results/quickstart.md) shows tuned Adam ahead on held-out
test loss. This meta-trains the same config with ``unroll.meta_loss.split`` = ``--split`` for
``--meta_seeds`` seeds (runs reused when finished, as ``scripts/reproduce.py`` does), evaluates
each on the quickstart report's 16 held-out instances at H = 200, tunes Adam over the same 13
rates on separate instances for test loss and for the quickstart's own criterion (mean
L_t / L_0), and prints the paired verdict of every metric against each tuned Adam. The quickstart's
default would change to L_valid only if the test loss came out level with or below Adam's.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

_SPLIT = flags.DEFINE_enum("split", "valid", ["train", "valid"], "The meta-loss's data split.")
_META_SEEDS = flags.DEFINE_integer("meta_seeds", 3, "Meta-training seeds.")
_RUNS = flags.DEFINE_string("runs", os.path.join("runs", "quickstart_valid"), "Meta-training workdirs.")

METRICS = ("test_loss", "test_accuracy", "final_train_loss", "mean_normalized_train_loss")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from lopt.experiments import harness as h

    t0 = time.perf_counter()
    b = dict(meta_seeds=_META_SEEDS.value, instances=16, lrs=h.LRS,
             set={"unroll.meta_loss.split": _SPLIT.value})
    _, task, H, n, records, curves = h.train_seeds("quickstart", b, os.path.join(_RUNS.value, _SPLIT.value),
                                                   "lo", progress=True)
    for criterion in ("test_loss", "mean_normalized_train_loss"):
        adam = h.tuned_adam(task, H, b["lrs"], n, criterion)
        print(f"\nAdam tuned for {criterion}: lr {adam['best_lr']:.3g}")
        for metric in METRICS:
            lo, ad = h.metric_values(curves, metric), h.metric_values([adam["curves"]], metric)[0]
            print(f"  {metric}: learned {lo.mean():.4f}, Adam {ad.mean():.4f}; "
                  + h.verdict(lo, ad, "the learned optimizer", "Adam",
                              lower_is_better=metric != "test_accuracy"))
    walls = ", ".join(h.fmt(r["train_wall_s"], ".0f") for r in records)
    print(f"\nmeta-training s per seed: {walls}; wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
