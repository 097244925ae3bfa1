"""ELO's Table 1 shape (AdamW / LO naive / LO + curriculum / ELO-LO at H and 10 H on an MLP on
MNIST): ELO holds up at 10 H where the naive optimizer degrades. Also the pieces of the
``lopt-ablate`` command that runs that ablation."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from typing import Any

from ml_collections import ConfigDict

from lopt.experiments.harness import (
    CHECKOUT,
    LRS,
    Report,
    UsageError,
    ensure_mnist,
    COST_COLUMNS,
    cost_cells,
    load_config,
    override,
    pm,
    stats,
    table,
    verdict,
)

#: Every method, in table order.
METHODS = ("adamw", "naive", "curriculum", "elo")

BUDGETS: dict[str, dict] = {
    "smoke": dict(args=["--elo_config=configs/elo.py", "--naive_config=configs/naive.py",
                        "--outer_steps=2", "--seeds=2", "--factor=2", "--lrs=1e-3,1e-2",
                        "--meta_seeds=1", "--cl_period=1", "--cl_max_periods=2",
                        "--set=task.hidden_sizes=(4,)", "--set=task.batch_size=8",
                        "--set=lopt.hidden_size=4", "--set=lopt.hidden_layers=1",
                        "--set=unroll.num_particles=2", "--set=unroll.trunc_length=4",
                        "--set=unroll.replay.capacity=2",
                        "--set=unroll.behaviour_cloning.schedule.steps=2"]),
    "cpu": dict(args=["--elo_config=configs/elo_mnist.py", "--naive_config=configs/naive_mnist.py",
                      "--meta_seeds=3", "--seeds=16", "--factor=10", "--lrs=" + ",".join(map(str, LRS))]),
    "gpu": dict(args=["--elo_config=configs/elo_mnist.py", "--naive_config=configs/naive_mnist.py",
                      "--meta_seeds=5", "--seeds=64", "--factor=10", "--outer_steps=3000",
                      "--set=unroll.num_particles=32", "--lrs=" + ",".join(map(str, LRS))]),
}


def parse_value(text: str) -> Any:
    """A ``--set`` value: a Python literal (``4``, ``(32,)``, ``False``, ``1e-3``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ConfigDict, assignments: list[str]) -> ConfigDict:
    """``config`` with every ``dotted.key=value`` of ``assignments`` set (:func:`override`)."""
    items = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set wants key=value, got {item!r}")
        items.append((key.strip(), parse_value(value)))
    return override(config, items)


def horizon_of(config: ConfigDict) -> int:
    """H: the meta-training trajectory length of a config with a constant horizon."""
    horizon = config.unroll.horizon
    if horizon.get("name") != "constant":
        raise UsageError(
            f"the ablation needs a constant meta-training horizon (unroll.horizon.name="
            f"'constant'), got {horizon.get('name')!r}"
        )
    return int(horizon.length)


def curriculum_stages(text: str | None, horizon: int) -> tuple[int, ...]:
    """``--cl_stages``, or H/4, H/2, H: the last stage trains (and validates) at the horizon
    the other methods meta-train at."""
    if text:
        try:
            stages = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--cl_stages must be comma-separated integers, got {text!r}") from None
    else:
        stages = tuple(sorted({max(1, horizon // 4), max(1, horizon // 2), horizon}))
    if not stages or min(stages) < 1 or any(b <= a for a, b in zip(stages, stages[1:])):
        raise UsageError(f"--cl_stages must be positive and increasing, got {stages}")
    return stages


def _task(config: ConfigDict):
    import tasks

    options = config.task.to_dict()
    return tasks.get(options.pop("name"), **options)


def _eval_summary(curves: dict) -> dict:
    return {k: curves.get(k) for k in ("final_train_loss", "test_loss", "test_accuracy", "train_loss")}


def evaluate_export(export_path: str, task: Any, keys: Any, lengths: tuple[int, int]) -> dict:
    from lopt import export
    from lopt.training import evaluation

    learned_opt, meta_params = export.load(export_path)
    opt = learned_opt.optimizer(meta_params)
    return {n: _eval_summary(evaluation.train_curves(task, opt, keys, n)) for n in lengths}


def combine(evals: list[dict], lengths: tuple[int, int]) -> dict:
    """Per evaluation length, the statistics over instances x meta-seeds and the mean curve."""
    import numpy as np

    out = {}
    for n in lengths:
        parts = [e[n] for e in evals]
        row = {}
        for k in ("final_train_loss", "test_loss", "test_accuracy"):
            vals = [p[k] for p in parts if p.get(k) is not None]
            row[k] = stats(np.concatenate(vals)) if vals else None
        curves = np.concatenate([np.asarray(p["train_loss"], np.float64) for p in parts])
        with np.errstate(invalid="ignore"):
            row["train_loss_curve_mean"] = np.nanmean(curves, 0).tolist()
        row["_curves"] = curves  # every instance's curve, for the plot (not written to JSON)
        if "best_lr" in parts[0]:
            row["best_lr"] = parts[0]["best_lr"]
            row["lr_sweep"] = parts[0]["sweep"]
        out[str(n)] = row
    return out


LABELS = {
    "adamw": "AdamW (tuned lr)",
    "naive": "LO naive",
    "curriculum": "LO + curriculum",
    "elo": "ELO-LO (replay + BC)",
}


def format_table(results: dict[str, dict], horizon: int, long: int) -> str:
    """ELO Table 1's shape: test accuracy (or test loss) at H and at the long horizon, plus the
    final training losses and the meta-training cost."""
    first = next((r for r in results.values() if "eval" in r), None)
    accuracy = first is not None and first["eval"][str(horizon)]["test_accuracy"] is not None
    metric, spec = ("test_accuracy", ".3f") if accuracy else ("test_loss", ".4f")
    name = "test acc" if accuracy else "test loss"
    k = long // horizon
    header = ["method", f"{name} @ H={horizon}", f"{name} @ {k}H={long}", "train loss @ H",
              f"train loss @ {k}H", COST_COLUMNS[0], "meta-train s (after compile)"]
    rows = {}
    for method, r in results.items():
        label = LABELS.get(method, method)
        if r.get("error"):
            rows[label] = {header[1]: "failed (see results.json)"}
            continue
        e = r["eval"]
        if method == "adamw":
            label += f" lr={e[str(horizon)]['best_lr']:.3g}/{e[str(long)]['best_lr']:.3g}"
        rows[label] = {header[1]: pm(e[str(horizon)][metric], spec), header[2]: pm(e[str(long)][metric], spec),
                       header[3]: pm(e[str(horizon)]["final_train_loss"]),
                       header[4]: pm(e[str(long)]["final_train_loss"]),
                       **cost_cells(r.get("runs") or [], header[6])}
    return table(header, rows)


def plot(results: dict[str, dict], long: int, horizon: int, path: str, title: str) -> str:
    """Training loss over the long evaluation, mean ± std over instances x meta-seeds (each
    curve averaged over its last 10% of steps, see ``lopt.training.evaluation.plot_curves``)."""
    from lopt.training import evaluation

    curves = {LABELS.get(m, m): r["eval"][str(long)]["_curves"] for m, r in results.items() if "eval" in r}
    return evaluation.plot_curves(curves, path, title, vlines={f"H={horizon}": horizon}, log_x=True,
                                  smooth=0.1)


def run(b: dict, runs: str, out: str, progress: bool = True) -> Report:
    """ELO Table 1's shape through ``scripts/ablate.py`` (its own runs, table and plot)."""
    config = load_config("elo_mnist" if any("elo_mnist" in a for a in b["args"]) else "elo")
    ensure_mnist(config)
    workdir = os.path.join(runs, "ablate")
    cmd = [sys.executable, os.path.join(CHECKOUT, "scripts", "ablate.py"), f"--out={workdir}",
           *b["args"], f"--progress={'true' if progress else 'false'}"]
    print(f"[elo] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=CHECKOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/ablate.py exited with {proc.returncode}")
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    shutil.copyfile(os.path.join(workdir, "curves.png"), os.path.join(out, "elo.png"))
    H, long = res["horizon"], res["long_horizon"]
    methods = res["methods"]
    metric = "test_accuracy" if methods["adamw"]["eval"][str(H)].get("test_accuracy") else "test_loss"
    outcome = []
    for m in ("naive", "curriculum", "elo"):
        e = methods.get(m, {}).get("eval")
        if not e:
            continue
        h, l = e[str(H)][metric]["mean"], e[str(long)][metric]["mean"]
        outcome.append(f"{m}: {metric} {h:.4f} at H -> {l:.4f} at {long // H}H ({l - h:+.4f}); "
                       f"final train loss {e[str(H)]['final_train_loss']['mean']:.4f} -> "
                       f"{e[str(long)]['final_train_loss']['mean']:.4f}")
    if "elo" in methods and "naive" in methods:
        import numpy as np

        higher = metric == "test_accuracy"
        ours = np.asarray(methods["elo"]["eval"][str(long)][metric]["per_seed"], np.float64)
        theirs = np.asarray(methods["naive"]["eval"][str(long)][metric]["per_seed"], np.float64)
        k = len(res["meta_seeds"])
        outcome.insert(0, f"at {long // H}H, {metric}: " + verdict(
            ours.reshape(k, -1), theirs.reshape(k, -1), "ELO-LO", "LO naive", lower_is_better=not higher))
    return Report(
        name="elo",
        title="ELO Table 1 shape: AdamW, LO naive, LO + curriculum, ELO-LO at H and 10H",
        claim=("ELO (Algorithm 1: a replay buffer of optimizee states and online behaviour "
               "cloning) trains a learned optimizer that generalises to 10x the meta-training "
               "horizon H, where the naively trained one degrades."),
        setting=(f"scripts/ablate.py {' '.join(b['args'])}: task {res['task']}, H={H}, "
                 f"evaluated at H and {long} on {len(res['eval_seeds'])} held-out instances x "
                 f"meta-seeds {res['meta_seeds']}; AdamW tuned per length on separate instances "
                 f"(PRNGKey({res['adamw_tune_seeds'][0]}..))."),
        outcome=outcome,
        tables=[(res["table"].split("\n")[0] and "Mean ± std over instances x meta-seeds.",
                 res["table"])],
        figures=[(f"Training loss over {long} steps on held-out instances, H marked", "elo.png")],
        notes=[f"ablate's own outputs: {os.path.relpath(workdir)} (table.md, results.json)."],
        record=res,
    )
