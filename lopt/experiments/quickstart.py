"""The quickstart's claim: its learned optimizer (``configs/quickstart.py``) beats Adam tuned for
the objective it was meta-trained on, the mean normalised training loss over the horizon."""

from __future__ import annotations

import os

from lopt.experiments.harness import (
    COST_COLUMNS,
    LRS,
    TINY_MLP,
    Report,
    adam_label,
    cost_cells,
    metric_cells,
    metric_values,
    stacked,
    table,
    train_seeds,
    tuned_adam,
    verdict,
    without_curves,
)

BUDGETS: dict[str, dict] = {
    "smoke": dict(meta_seeds=1, instances=2, lrs=(1e-3, 1e-2),
                  set={**TINY_MLP, "num_outer_steps": 2, "unroll.trunc_length": 4,
                       "unroll.horizon.length": 8}),
    "cpu": dict(meta_seeds=3, instances=16, lrs=LRS, set={}),
    "gpu": dict(meta_seeds=5, instances=64, lrs=LRS, set={"num_outer_steps": 3000}),
}


def run(b: dict, runs: str, out: str, progress: bool = True) -> Report:
    from lopt.training import evaluation

    config, task, H, n, records, curves = train_seeds("quickstart", b, runs, "lo", progress)
    print("[quickstart] tuning Adam", flush=True)
    adam = tuned_adam(task, H, b["lrs"], n, "mean_normalized_train_loss")
    label = adam_label(adam)
    metrics = [("mean_normalized_train_loss", f"mean L_t/L_0 over {H} steps", ".4f"),
               ("final_train_loss", "final train loss", ".4f"), ("test_loss", "test loss", ".4f"),
               ("test_accuracy", "test accuracy", ".3f")]
    header = ["method", *(column for _, column, _ in metrics), *COST_COLUMNS]
    results = table(header, {"learned optimizer": {**metric_cells(curves, metrics), **cost_cells(records)},
                             label: metric_cells([adam["curves"]], metrics)})
    lo = metric_values(curves, "mean_normalized_train_loss")
    ad = metric_values([adam["curves"]], "mean_normalized_train_loss")[0]
    outcome = [verdict(lo, ad, "the learned optimizer", "tuned Adam") +
               " (criterion: mean L_t/L_0, the meta-objective)."]
    for key, name in (("final_train_loss", "final train loss"), ("test_loss", "test loss")):
        outcome.append(f"{name}: " + verdict(metric_values(curves, key),
                                             metric_values([adam["curves"]], key)[0],
                                             "the learned optimizer", "tuned Adam"))
    outcome.append("test accuracy: " + verdict(metric_values(curves, "test_accuracy"),
                                              metric_values([adam["curves"]], "test_accuracy")[0],
                                              "the learned optimizer", "tuned Adam",
                                              lower_is_better=False))
    fig = "quickstart.png"
    evaluation.plot_curves(
        {"learned optimizer": stacked(curves, "train_loss"), label: adam["curves"]["train_loss"]},
        os.path.join(out, fig), f"{task.name}: training loss on held-out instances", smooth=0.1)
    return Report(
        name="quickstart",
        title="Quickstart: the learned optimizer against Adam tuned for its own objective",
        claim=("The quickstart's learned optimizer (a per-parameter MLP optimizer after Metz "
               f"et al. 2019, {config.estimator.name.upper()}, configs/quickstart.py) minimises the objective it was meta-trained for better "
               "than Adam tuned for that same objective: the mean, over the horizon, of the "
               "training loss normalised by the initial loss."),
        setting=(f"configs/quickstart.py with {b['set'] or 'no overrides'}; {b['meta_seeds']} "
                 f"meta-training seeds; evaluation on {n} held-out instances of {task.name} for "
                 f"H={H} steps; Adam's learning rate tuned over {len(b['lrs'])} rates "
                 f"({min(b['lrs']):g}..{max(b['lrs']):g}) for mean L_t/L_0 on {n} separate "
                 "instances."),
        outcome=outcome,
        tables=[(f"Held-out instances, mean ± std over {n} instances x meta-seeds (Adam: over "
                 "instances; its rate was tuned on other instances).", results)],
        figures=[("Training loss on the held-out instances (mean ± 1 std, trailing 10% "
                  "smoothing)", fig)],
        notes=["Adam's sweep (mean L_t/L_0 on the tuning instances): "
               + ", ".join(f"{lr:.3g}: {v:.4f}" for lr, v in adam["sweep"].items())],
        record=dict(config=config.to_dict(), runs=records, adam_best_lr=adam["best_lr"],
                    adam_sweep=adam["sweep"], horizon=H,
                    lo=[without_curves(c) for c in curves], adam=without_curves(adam["curves"])),
    )
