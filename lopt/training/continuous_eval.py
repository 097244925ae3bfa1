"""Evaluation during meta-training (``config.eval``; learned_optimization's ``continuous_eval``).

The run's own metrics cannot compare runs: ``meta_loss`` and ``inner_loss`` depend on where in
a trajectory the losses are scored (an ELO buffer arm scores positions 50-250 and looks better
by construction). So every ``every`` outer steps (and at step 0 and the run's last step) the
current meta-params train held-out task instances from scratch for each length in ``lengths``
(e.g. the meta-training horizon H and 10 H, ELO Table 1's 1x and 10x), and the run logs what a
user of the optimizer would see: the final training loss, the test loss and accuracy, and their
ratio to Adam with a tuned learning rate on the same instances.

Each (task, length) is one compiled program vmapped over the instances
(``lopt.training.held_out``, the curriculum's validation machinery), compiled at the first
evaluation and reused after. Instance i is drawn from ``PRNGKey(seed_offset + i)``, apart from
the curriculum's validation instances (``curriculum.VALID_SEED_OFFSET``) and from the keys
meta-training derives from ``config.seed``. The Adam baseline is tuned once, at the start, and
kept in every checkpoint, so a resumed run continues the same series against the same numbers.

Rows in ``metrics.jsonl`` (and TensorBoard tags) ``eval/<task>/<length>/<metric>``; the plot is
``plots/eval.png``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np

from lopt.base import LearnedOptimizer
from lopt.training import distributed, evaluation, faults, held_out
from lopt.training.hooks import Hook, Run, read_metrics
from tasks.base import TaskFamily, data_arrays

#: Held-out evaluation instance i is drawn from ``PRNGKey(EVAL_SEED_OFFSET + i)``: apart from the
#: curriculum's validation (2,000,000) and the experiments' evaluation and tuning instances
#: (1,000,000 and 3,000,000).
EVAL_SEED_OFFSET = 4_000_000
BASELINES = ("adam", "none")
#: What each evaluation reports per task and length (accuracy when the task has one).
METRICS = ("final_train_loss", "test_loss", "test_accuracy")
#: Metrics also reported as a ratio to tuned Adam's (``<metric>_over_adam``; < 1: better).
RATIOS = ("final_train_loss", "test_loss")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """``config.eval``: evaluation of the meta-params on held-out instances during meta-training.

    every: outer steps between evaluations (also at step 0 and at the run's last step).
    lengths: inner steps each instance trains, e.g. ``(H, 10 H)``; one compiled program each.
    seeds: held-out instances per task and length.
    tasks: None (default): the training task, ``config.task``. Else a section of
      ``{label: task section}``, each task section like ``config.task`` (``name`` plus that
      family's options, built by ``tasks.get``); the label names the metrics
      (``eval/<label>/<length>/...``), so it holds no ``/``.
    baseline: ``"adam"``: Adam with its learning rate tuned per task and length over
      ``evaluation.DEFAULT_LRS`` (lowest mean final training loss) on the evaluation instances
      themselves (which favours Adam, so the ratio is conservative), once, at the start;
      ``"none"``: no baseline.
    seed_offset: instance i is drawn from ``PRNGKey(seed_offset + i)``.
    """

    every: int = 100
    lengths: tuple[int, ...] = ()
    seeds: int = 8
    tasks: Any = None
    baseline: str = "adam"
    seed_offset: int = EVAL_SEED_OFFSET

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(self.lengths))
        for name, low in (("every", 1), ("seeds", 1), ("seed_offset", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        n = self.lengths
        ints = all(not isinstance(x, bool) and isinstance(x, int) and x >= 1 for x in n)
        if not n or not ints or len(set(n)) < len(n):
            raise ValueError(f"lengths must be distinct ints >= 1, e.g. (20, 200), got {n!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.tasks is not None:
            if not isinstance(self.tasks, dict) or not self.tasks:
                raise ValueError(f"tasks must be None or a section {{label: task section}}, "
                                 f"got {self.tasks!r}")
            for label, section in self.tasks.items():
                if "/" in label or not isinstance(section, dict) or "name" not in section:
                    raise ValueError(f"tasks.{label} must be a task section with a 'name' (and a "
                                     "label without '/')")

    def instances(self) -> range:
        return range(self.seed_offset, self.seed_offset + self.seeds)


def _mean(values: Any) -> float | None:
    """Mean over the finite values (None when none is)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _summary(out: dict) -> dict:
    """Per-instance results -> the means over finite instances and the diverged share."""
    row = {m: _mean(out[m]) for m in METRICS if out.get(m) is not None}
    row["diverged"] = float(np.mean(~np.isfinite(np.asarray(out["final_train_loss"], np.float64))))
    return row


class ContinuousEval(Hook):
    """Evaluates the meta-params every ``options.every`` outer steps (:class:`EvalOptions`) on
    the primary process, logs ``eval/...`` rows and writes ``plots/eval.png`` at the end. Its
    time is not meta-training time (``inner_steps_per_sec`` leaves it out); its cost is printed
    at the first evaluation and summarised in ``run.summary["eval"]``."""

    def __init__(self, options: EvalOptions, tasks: dict[str, TaskFamily], learned_opt: LearnedOptimizer):
        self.options = options
        self.tasks = tasks
        self.learned_opt = learned_opt
        self.keys = held_out.instance_keys(options.seed_offset, options.seeds)
        self.baseline: dict | None = None  # {label: {str(length): {learning_rate, metrics}}}
        self.seconds = self.baseline_seconds = 0.0
        self.count = 0

    # -- checkpoints: the baseline travels with the run ------------------------------------------

    def checkpoint_items(self, run: Run) -> tuple[dict, dict]:
        return {}, {"eval": {"baseline": self.baseline}}

    def restore_items(self, run: Run, items: dict, host: dict) -> None:
        self.baseline = (host.get("eval") or {}).get("baseline")

    # -- the loop --------------------------------------------------------------------------------

    def due(self, run: Run) -> bool:
        ends = run.step == run.total or (run.stop is not None and run.failure is None)
        return run.failure is None and (run.step % self.options.every == 0 or ends)

    def start(self, run: Run) -> None:
        self.t_start = time.perf_counter()
        if not run.primary:
            return
        todo = [(label, n) for label in self.tasks for n in self.options.lengths
                if str(n) not in (self.baseline or {}).get(label, {})]
        if self.options.baseline == "adam" and todo:  # a resumed run has it from its checkpoint
            self.baseline = self._tune_adam(self.baseline or {}, todo)
            self.baseline_seconds = time.perf_counter() - self.t_start
            self._say(f"eval: tuned Adam at lengths {', '.join(str(n) for _, n in todo)} on "
                      f"{self.options.seeds} held-out instances: {self.baseline_seconds:.1f} s")
        logged = {r["step"] for r in read_metrics(run.path("metrics.jsonl")) if _is_eval(r)}
        if self.due(run) and run.step not in logged:  # step 0, or one lost at an interrupt
            self._evaluate(run)

    def after_step(self, run: Run, metrics: dict) -> None:
        if run.primary and self.due(run):
            t0 = time.perf_counter()
            self._evaluate(run)
            run.paused += time.perf_counter() - t0

    def end(self, run: Run) -> None:
        if not run.primary:
            return
        total = time.perf_counter() - self.t_start
        spent = self.seconds + self.baseline_seconds
        run.summary["eval"] = {
            "evaluations": self.count,
            "seconds": spent,
            "baseline_seconds": self.baseline_seconds,
            "share": spent / total if total > 0 else None,
            "plot": None,
        }
        if run.signal is None:  # a stopped run is to be resumed: its plot comes at the end
            path = run.path("plots", "eval.png")
            with faults.writing(path):
                run.summary["eval"]["plot"] = plot_eval(run.path("metrics.jsonl"), path)

    # -- the work --------------------------------------------------------------------------------

    def _tune_adam(self, baseline: dict, todo: list[tuple[str, int]]) -> dict:
        out = {label: dict(lengths) for label, lengths in baseline.items()}
        for label, n in todo:
            lr, per_lr = evaluation.tune_adam(self.tasks[label], self.keys, n)
            out.setdefault(label, {})[str(n)] = {"learning_rate": lr, **_summary(per_lr[lr])}
        return out

    def _evaluate(self, run: Run) -> None:
        t0 = time.perf_counter()
        params = distributed.to_host(run.state.meta_params)
        row: dict[str, Any] = {"step": run.step}
        for label, task in self.tasks.items():
            arrays = data_arrays(task)
            for n in self.options.lengths:
                fn = held_out.program(task, self.learned_opt, n)
                got = _summary(jax.device_get(fn(params, self.keys, arrays)))
                adam = (self.baseline or {}).get(label, {}).get(str(n))
                prefix = f"eval/{label}/{n}/"
                row.update({prefix + k: v for k, v in got.items()})
                if adam is not None:
                    row.update({f"{prefix}adam_{m}": adam.get(m) for m in METRICS if m in got})
                    for m in RATIOS:
                        a, b = got.get(m), adam.get(m)
                        row[f"{prefix}{m}_over_adam"] = a / b if a is not None and b else None
        seconds = time.perf_counter() - t0
        row["eval/seconds"] = seconds
        run.emit(row)
        if self.count == 0:
            programs = len(self.tasks) * len(self.options.lengths)
            self._say(f"eval: {programs} program(s) ({', '.join(self.tasks)} at lengths "
                      f"{', '.join(map(str, self.options.lengths))}) x {self.options.seeds} held-out "
                      f"instances every {self.options.every} outer steps: {seconds:.1f} s the first "
                      "time (compiles included)")
        self.seconds += seconds
        self.count += 1

    @staticmethod
    def _say(message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message)


def _is_eval(row: dict) -> bool:
    return any(k.startswith("eval/") for k in row)


def eval_series(rows: list[dict]) -> dict[tuple[str, int], dict[str, list]]:
    """``{(task, length): {"step": [...], metric: [...], "adam_<metric>": value}}`` from the
    ``eval/...`` rows of ``metrics.jsonl``."""
    out: dict[tuple[str, int], dict[str, list]] = {}
    for r in rows:
        if not _is_eval(r):
            continue
        seen = set()
        for key, value in r.items():
            parts = key.split("/")
            if len(parts) != 4 or parts[0] != "eval":
                continue
            series = out.setdefault((parts[1], int(parts[2])), {"step": []})
            if (parts[1], parts[2]) not in seen:
                series["step"].append(r["step"])
                seen.add((parts[1], parts[2]))
            if parts[3].startswith("adam_"):
                series[parts[3]] = value
            else:
                series.setdefault(parts[3], []).append(math.nan if value is None else value)
    return out


def plot_eval(metrics_path: str, out_path: str) -> str | None:
    """Each task and length's final training loss, test loss and test accuracy on the held-out
    instances against outer step, tuned Adam's as a dashed line of the same colour (PNG);
    returns the path, or None when nothing was evaluated."""
    series = eval_series(read_metrics(metrics_path))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({task for task, _ in series})
    metrics = [m for m in METRICS if any(m in s for s in series.values())]
    fig, axes = plt.subplots(len(labels), len(metrics), figsize=(4.6 * len(metrics), 3.6 * len(labels)),
                             squeeze=False)
    for i, label in enumerate(labels):
        lengths = sorted(n for task, n in series if task == label)
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for k, n in enumerate(lengths):
                s, color = series[(label, n)], f"C{k}"
                if metric in s:
                    ax.plot(s["step"], s[metric], color=color, marker="o", ms=3, lw=1.4,
                            label=f"learned, {n} steps")
                if s.get(f"adam_{metric}") is not None:
                    ax.axhline(s[f"adam_{metric}"], color=color, ls="--", lw=1,
                               label=f"tuned Adam, {n} steps")
            ax.set_xlabel("outer step")
            ax.set_ylabel(metric.replace("_", " "))
            values = np.concatenate([np.atleast_1d(np.asarray(line.get_ydata(), np.float64))
                                     for line in ax.get_lines()] or [np.zeros(0)])
            values = values[np.isfinite(values)]
            if metric != "test_accuracy" and values.size and values.min() > 0:
                ax.set_yscale("log")
            ax.set_title(f"{label}: held-out {metric.replace('_', ' ')}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
