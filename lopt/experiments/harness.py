"""What every experiment shares: configs with a budget's overrides, meta-training runs reused
when finished, Adam tuned on instances separate from the evaluation's, paired verdicts with their
statistics, the one results-table formatter and the report writer (``docs/results/``).

Honesty rules every experiment follows through it: Adam's learning rate is tuned (over ``LRS``,
a log grid) on task instances ``PRNGKey(TUNE_SEED_OFFSET + i)``, separate from the evaluation
instances ``PRNGKey(EVAL_SEED_OFFSET + i)``; numbers are mean ± std over evaluation instances x
meta-training seeds; a verdict is computed from paired per-seed differences, never asserted.
Imports nothing heavy at module level, so the programs check their inputs before JAX starts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from typing import Any, Callable, Iterable

from lopt.experiments.inputs import UsageError, ensure_mnist, load_config

EVAL_SEED_OFFSET = 1_000_000
TUNE_SEED_OFFSET = 3_000_000
#: Adam's learning-rate grid: 13 log-spaced rates from 1e-4 to 1e-1 (half-decade quarter steps).
LRS = tuple(float(f"{10 ** (-4 + i / 4):.4g}") for i in range(13))
#: A run's final meta-loss is the mean over this fraction of its last logged rows.
FINAL_FRACTION = 0.1
#: Smoke budgets' shapes of the MLP experiments (seconds of work after compiling).
TINY_MLP = {"task.hidden_sizes": (4,), "task.batch_size": 16, "lopt.hidden_size": 4,
            "unroll.num_particles": 2}
#: The columns :func:`cost_cells` fills.
COST_COLUMNS = ["meta-train outer / inner steps", "meta-train s"]


# --- configs ------------------------------------------------------------------------------------


def override(config, items: Iterable[tuple[str, Any]], *, where: str = "--set",
             new_keys: bool = False):
    """A copy of ``config`` with ``config.<dotted path> = value`` for each item. A section the
    config lacks is a UsageError (a typo must not silently ablate nothing), and so is a key it
    lacks unless ``new_keys`` (a budget may set a task option the file leaves at its default),
    and so is a value of another type than the key's."""
    from ml_collections import ConfigDict

    config = copy.deepcopy(config)
    for key, value in items:
        *path, last = key.split(".")
        node = config
        for i, part in enumerate(path):
            if part not in node or not isinstance(node[part], ConfigDict):
                raise UsageError(f"{where} {key}: the config has no section {'.'.join(path[: i + 1])}")
            node = node[part]
        if last not in node and not new_keys:
            raise UsageError(f"{where} {key}: the config has no key {key}; "
                             f"{'.'.join(path) or 'the top level'} has {', '.join(sorted(node.keys()))}")
        try:
            node[last] = value
        except TypeError as e:  # ConfigDict keeps a field's type
            raise UsageError(f"{where} {key}: {str(e).splitlines()[0]}") from None
    return config


def configured(name: str, overrides: dict) -> Any:
    """The shipped config ``name`` (``configs/<name>.py``) with a budget's overrides."""
    return override(load_config(name), overrides.items(), where="budget override", new_keys=True)


def keys(offset: int, n: int):
    import jax
    import jax.numpy as jnp

    return jnp.stack([jax.random.PRNGKey(offset + i) for i in range(n)])


def task_of(config):
    import tasks

    options = config.task.to_dict()
    return tasks.get(options.pop("name"), **options)


# --- meta-training runs -------------------------------------------------------------------------


#: What a run record keeps of each curriculum decision row of ``metrics.jsonl``.
DECISION_KEYS = ("step", "curriculum_stage", "train_length", "valid_length", "validation",
                 "valid_loss", "decision")


def final_mean(rows: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the last ``FINAL_FRACTION`` of the rows that have it."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    k = max(1, math.ceil(FINAL_FRACTION * len(vals)))
    return float(sum(vals[-k:]) / k)


def finished_export(run_dir: str, num_outer_steps: int, *, stops_early: bool = False) -> str | None:
    """The export of a run in ``run_dir`` that finished: its latest checkpoint is at
    ``num_outer_steps`` (or, with ``stops_early``, before it, a curriculum having stopped). Else
    None. A finished run must not go to ``lopt.training.train`` again: it would save its final
    checkpoint again, which orbax refuses (StepAlreadyExistsError)."""
    from absl import logging

    from lopt.training import checkpoint as ckpt_lib
    from lopt.training import loop

    export_path = os.path.join(run_dir, "export", "optimizer.safetensors")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not (os.path.isfile(export_path) and os.path.isdir(ckpt_dir)):
        return None
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
    latest = checkpointer.latest_step()
    checkpointer.close()
    rows = loop.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if latest is None or not rows or max(r["step"] for r in rows) < latest:
        return None
    if latest < num_outer_steps:
        stopped = any(r.get("decision") == "stop" for r in rows)
        if not (stops_early and stopped):
            return None
    if latest > num_outer_steps:
        logging.warning("%s ran %d outer steps, more than the %d of this budget; reusing it",
                        run_dir, latest, num_outer_steps)
    return export_path


def meta_train(config, run_dir: str, progress: bool = True) -> dict:
    """One meta-training run of ``config`` in ``run_dir``: reused when it finished, resumed when
    not. Returns its record: where it is, its export, its cost in outer and inner steps (the
    last logged row's), the mean meta-loss of its last logged rows (only rows that have one: an
    imitation-only window logs none) and, for a curriculum run, its decisions."""
    from lopt.training import loop

    budget = int(config.num_outer_steps)
    curriculum = "curriculum" in config and bool(config.curriculum.get("enabled", False))
    t0 = time.perf_counter()
    export = finished_export(run_dir, budget, stops_early=curriculum)
    reused = export is not None
    if not reused:
        export = loop.train(config, run_dir, progress=progress)["export"]
    rows = loop.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    last = ([r for r in rows if "inner_steps_total" in r] or [{}])[-1]  # not a decision row
    record = dict(
        workdir=os.path.abspath(run_dir), export=export, seed=int(config.seed), reused=reused,
        outer_steps=int(last.get("step", 0)), inner_steps=int(last.get("inner_steps_total", 0)),
        inner_steps_per_sec=last.get("inner_steps_per_sec"),
        final_meta_loss=final_mean(rows, "meta_loss"),
        # From metrics.jsonl (first compiled step to the end), so a reused run still has it.
        train_wall_s=last.get("wall_time"),
        call_wall_s=None if reused else time.perf_counter() - t0,  # with compiles, validations
    )
    if any("decision" in r for r in rows):
        record["curriculum"] = [{k: r.get(k) for k in DECISION_KEYS} for r in rows if "decision" in r]
    return record


def lo_curves(export_path: str, task, eval_keys, num_steps: int) -> dict:
    from lopt import export
    from lopt.base import build_optimizer
    from lopt.training import evaluation

    learned_opt, meta_params = export.load(export_path)
    return evaluation.train_curves(task, build_optimizer(learned_opt, meta_params, num_steps), eval_keys, num_steps)


def train_seeds(name: str, b: dict, runs: str, subdir: str, progress: bool = True):
    """The experiment's config with the budget's overrides, meta-trained once per meta-seed
    (``runs/subdir/seed<i>``) and each export's curves on the held-out instances at H.
    Returns (config, task, H, instances, records, curves)."""
    config = configured(name, b["set"])
    ensure_mnist(config)
    task = task_of(config)
    H = int(config.unroll.horizon.length)
    n = b["instances"]
    records, curves = [], []
    for seed in range(b["meta_seeds"]):
        c = copy.deepcopy(config)
        c.seed = seed
        print(f"[{name}] meta-training seed {seed}", flush=True)
        records.append(meta_train(c, os.path.join(runs, subdir, f"seed{seed}"), progress))
        curves.append(lo_curves(records[-1]["export"], task, keys(EVAL_SEED_OFFSET, n), H))
    return config, task, H, n, records, curves


# --- tuned Adam and statistics ------------------------------------------------------------------


def mean_normalized_train_loss(r: dict):
    """Per instance, mean_t L_t / L_0 over the run: the training-batch loss before update t
    divided by the loss of the initial parameters (the quickstart's meta-objective,
    ``meta_loss.normalize="initial"``, measured on the evaluation curves)."""
    import numpy as np

    c = np.asarray(r["train_loss"], np.float64)
    return c[:, 1:].mean(1) / c[:, 0]


CRITERIA: dict[str, Callable[[dict], Any]] = {
    "final_train_loss": lambda r: r["final_train_loss"],
    "test_loss": lambda r: r["test_loss"],
    "mean_normalized_train_loss": mean_normalized_train_loss,
}


def tuned_adam(task, num_steps: int, lrs, n: int, criterion: str) -> dict:
    """Adam's rate tuned for ``criterion`` on the tuning instances, then run on the evaluation
    instances; returns the evaluation curves, the chosen rate and the sweep."""
    import optax

    from lopt.training import evaluation

    _, per_lr = evaluation.tune_adam(task, keys(TUNE_SEED_OFFSET, n), num_steps, lrs)
    means = {lr: stats(CRITERIA[criterion](per_lr[lr]))["mean"] for lr in lrs}
    sweep = {lr: m if math.isfinite(m) else math.inf for lr, m in means.items()}
    best = min(lrs, key=lambda lr: sweep[lr])
    curves = evaluation.train_curves(task, optax.adam(best), keys(EVAL_SEED_OFFSET, n), num_steps)
    return dict(curves=curves, best_lr=best, sweep=sweep, at_edge=best in (min(lrs), max(lrs)))


def stats(values: Any) -> dict | None:
    """``{"mean", "std", "per_seed"}`` of every value (NaN/inf kept: diverged runs)."""
    import numpy as np

    if values is None:
        return None
    v = np.asarray(values, np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        return {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v.tolist()}


def pm(s: dict | None, spec: str = ".4f") -> str:
    """``mean ± std`` of a :func:`stats` dict; ``-`` when missing; how many runs diverged when
    the mean is not finite."""
    if s is None:
        return "-"
    if not math.isfinite(s["mean"]):
        v = s.get("per_seed") or []
        bad = sum(1 for x in v if x is None or not math.isfinite(x))
        return f"non-finite ({bad} of {len(v)} diverged)" if v else "-"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}}"


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def metric_values(runs: list[dict], metric: str):
    """``metric`` of every (meta-seed, instance) pair: [meta_seeds, instances] (None if the task
    reports no such metric)."""
    import numpy as np

    if any(r.get(metric) is None for r in runs) and metric != "mean_normalized_train_loss":
        return None
    return np.stack([np.asarray(CRITERIA[metric](r) if metric in CRITERIA else r[metric], np.float64)
                     for r in runs])


def verdict(ours, theirs, name: str, other: str, lower_is_better: bool = True) -> str:
    """The claim "``name`` beats ``other``" read from paired values: ``ours`` [seeds, instances]
    and ``theirs`` [instances] or [seeds, instances] (the same evaluation instances)."""
    import numpy as np

    ours = np.asarray(ours, np.float64)
    theirs = np.broadcast_to(np.asarray(theirs, np.float64), ours.shape)
    raw = ours - theirs
    d = raw if lower_is_better else -raw  # < 0: ours better
    if not np.isfinite(d).all():
        return f"{name} vs {other}: some runs diverged (non-finite), no verdict"
    per_seed = d.mean(1)
    se = float(d.std() / math.sqrt(d.size))
    wins = int((per_seed < 0).sum())
    better = "lower" if lower_is_better else "higher"
    detail = (f"paired difference ({name} - {other}) {raw.mean():+.4g} ± {se:.2g} (s.e. over "
              f"{d.size} runs; per meta-seed: {', '.join(f'{x:+.3g}' for x in raw.mean(1))})")
    if wins == len(per_seed) and d.mean() < -2 * se:
        head = f"**reproduced**: {name} is {better} than {other} for every meta-seed"
    elif wins == 0 and d.mean() > 2 * se:
        head = f"**not reproduced**: {other} is {better} than {name} for every meta-seed"
    else:
        head = f"**inconclusive**: {name} is {better} for {wins} of {len(per_seed)} meta-seeds"
    return f"{head}; {detail}"


# --- tables and reports -------------------------------------------------------------------------


def table(header: list[str], rows: dict[str, dict[str, str]]) -> str:
    """The results table of every experiment, in markdown: a row per label of ``rows``, its
    cells under the columns they name (``-`` in a column a row has no cell for); the first
    column left-aligned, the others right-aligned."""
    body = [[label, *(cells.get(h, "-") for h in header[1:])] for label, cells in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def metric_cells(runs: list[dict], metrics: list[tuple[str, str, str]]) -> dict[str, str]:
    """A method's cells: for each (key, column, format) of ``metrics``, mean ± std of ``key``
    over every (meta-seed, instance) run of ``runs``."""
    cells = {}
    for key, column, spec in metrics:
        v = metric_values(runs, key)
        cells[column] = "-" if v is None else pm(stats(v), spec)
    return cells


def cost_cells(records: list[dict], wall_column: str = COST_COLUMNS[1]) -> dict[str, str]:
    """Meta-training's cost, the mean over ``records``: outer / inner steps, and seconds."""
    if not records:
        return {}
    outer = sum(r["outer_steps"] for r in records) // len(records)
    inner = sum(r["inner_steps"] for r in records) // len(records)
    walls = [r["train_wall_s"] for r in records if r.get("train_wall_s") is not None]
    return {COST_COLUMNS[0]: f"{outer} / {inner:,}",
            wall_column: fmt(sum(walls) / len(walls), ".0f") if walls else "-"}


def adam_label(adam: dict) -> str:
    edge = ", at the grid's edge" if adam["at_edge"] else ""
    return f"Adam (lr {adam['best_lr']:.3g}{edge})"


def trailing(x, y, fraction: float = 0.05):
    """(x, y) with y a trailing mean over ``fraction`` of its points (at least 1): the smoothing
    of the experiments' curves over outer or inner steps; x loses the first window - 1 points."""
    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = max(1, int(len(y) * fraction))
    return x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid")


def stacked(runs: list[dict], key: str):
    """Every meta-seed's per-instance ``key`` rows in one [meta_seeds x instances, ...] array."""
    import numpy as np

    return np.concatenate([np.asarray(r[key], np.float64) for r in runs])


def without_curves(r: dict) -> dict:
    """A train_curves result without its per-step training curve (kept out of the JSON)."""
    return {k: v for k, v in r.items() if k != "train_loss"}


def to_json(obj: Any) -> Any:
    """JSON-safe: string keys, lists for tuples and arrays, Python numbers, non-finite as null."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(to_json(record), f, indent=1)
        f.write("\n")


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    devices = jax.devices()
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {devices[0].platform} "
            f"({len(devices)} device{'s' if len(devices) > 1 else ''})")


def write_ablation(directory: str, caption: str, table_md: str, record: dict,
                   plot_path: str | None, wall_s: float) -> None:
    """An ablation's own outputs: print ``table_md``; write ``table.md`` (caption + table) and
    ``results.json`` (``record``) into ``directory``; print where everything went."""
    print()
    print(table_md)
    table_path = os.path.join(directory, "table.md")
    with open(table_path, "w") as f:
        f.write(f"{caption}\n\n{table_md}\n")
    results_path = os.path.join(directory, "results.json")
    write_json(results_path, record)
    print(f"  table:   {table_path}")
    print(f"  results: {results_path}")
    print(f"  plot:    {plot_path}")
    print(f"  wall time: {wall_s:.0f} s")


#: A report's hand-written section, from this heading to the end of its markdown: what was
#: tried before the committed setting and what it measured. Regenerating the report keeps it.
NOTES_HEADING = "## What was tried before"


def kept_notes(path: str) -> str:
    """The hand-written section of the report at ``path``, or "" (no file, no section)."""
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        lines = f.read().split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == NOTES_HEADING]
    return "\n".join(lines[starts[0]:]) if starts else ""


@dataclasses.dataclass
class Report:
    """A claim's report: what the paper says, our setting, the computed outcome, tables, figures
    (files in the output directory) and notes; ``record`` goes to the JSON beside it."""

    name: str
    title: str
    claim: str
    setting: str
    outcome: list[str]
    tables: list[tuple[str, str]]  # (caption, markdown table)
    figures: list[tuple[str, str]]  # (caption, file name in out)
    notes: list[str]
    record: dict

    def write(self, out: str, command: str, wall_s: float, budget: str) -> str:
        """``out/NAME.md`` (keeping its hand-written section, :func:`kept_notes`) and
        ``out/NAME.json``; returns the markdown's path."""
        lines = [f"# {self.title}", "", f"**Claim.** {self.claim}", "",
                 f"**Our setting ({budget} budget).** {self.setting}", "", "**Outcome.**", ""]
        lines += [f"- {o}" for o in self.outcome] + [""]
        for caption, table in self.tables:
            lines += [caption, "", table, ""]
        for caption, fname in self.figures:
            lines += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
        if self.notes:
            lines += ["**Notes.**", ""] + [f"- {n}" for n in self.notes] + [""]
        lines += [f"Command: `{command}`", "",
                  f"Wall time {wall_s:.0f} s on {machine()}, {time.strftime('%Y-%m-%d')}.", ""]
        path = os.path.join(out, f"{self.name}.md")
        notes = kept_notes(path)
        with open(path, "w") as f:
            f.write("\n".join(lines) + ("\n" + notes if notes else ""))
        record = dict(self.record, command=command, wall_s=wall_s, machine=machine(), budget=budget,
                      outcome=self.outcome)
        write_json(os.path.join(out, f"{self.name}.json"), record)
        return path
