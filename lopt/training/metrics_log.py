"""Metrics of a run: the log rows of ``metrics.jsonl`` and TensorBoard, and the progress bar
(:class:`MetricsLog`, the first of the training loop's hooks).

A row summarises every outer step since the previous row (:func:`window_row`), so a row never
shows one phase of the particles' trajectories as the run's, and each metric is averaged over
the steps it applies to (an imitation step has no meta-loss, a meta-loss step no imitation
loss).

A resumed run reads as one run: ``metrics.jsonl`` is cut after the checkpoint's step (rows a
killed or stopped run wrote after it, and a row cut short mid-write, go), TensorBoard discards
the killed run's events after it (:class:`lopt.training.tensorboard.Writer`), and the steps
since the checkpoint's last row travel in the checkpoint, so the next row averages the same
steps as in a run never stopped. Everything logged up to a checkpoint is on disk before the
checkpoint is.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from lopt.training import distributed, faults
from lopt.training import tensorboard as tb_lib
from lopt.training.hooks import Hook, Run, read_metrics
from lopt.training.trainer import COUNT_METRICS, MAX_METRICS


def _to_python(metrics: dict) -> dict:
    out = {}
    for k, v in distributed.to_host(metrics).items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = bool(v) if isinstance(v, bool) else (float(v) if isinstance(v, float) else v)
    return out


# --- hooks ---------------------------------------------------------------------------------------


#: Metrics a log row reports at its own step (running counts), not over its window.
LAST_METRICS = frozenset({"num_skipped", "consecutive_skipped"})


def window_row(window: list[dict]) -> dict:
    """One log row from the metrics of every outer step since the previous row: counts
    (``inner_steps``, ``trajectories_done``) summed, ``position_max`` the maximum, running counts
    (``num_skipped``, ``consecutive_skipped``) the last step's, everything else the mean (a
    bool such as ``grad_finite`` becomes the share of steps where it held).

    A metric that does not apply to a step is NaN there (an imitation episode's step has no
    meta-loss, a meta-loss step no imitation loss): each metric is aggregated over the steps it
    applies to, and a row whose window holds none of them leaves it out. So ``meta_loss`` is a
    mean over meta-loss steps only, never diluted by another objective's steps.

    A row that showed only its own step's metrics would alias: with ``log_every`` a multiple of
    horizon / trunc_length (the quickstart: 10 and 200 / 20) every row lands at the same phase
    of the particles' trajectories, and its meta-loss is that phase's, not the run's."""
    import numpy as np

    host = [distributed.to_host(m) for m in window]
    row = {}
    for k in dict.fromkeys(k for m in host for k in m):
        vals = np.stack([np.asarray(m[k], np.float64) for m in host if k in m])
        if np.isnan(vals).all():
            continue
        if k in LAST_METRICS:
            v = vals[-1]
        elif k in COUNT_METRICS:
            v = np.nansum(vals, 0)
        elif k in MAX_METRICS:
            v = np.nanmax(vals, 0)
        else:
            v = np.nanmean(vals, 0)
        row[k] = v
    return _to_python(row)


class MetricsLog(Hook):
    """Every ``log_every`` outer steps (and the last, and curriculum validations) a row of the
    metrics of the steps since the previous row (:func:`window_row`: means, sums of counts) plus
    ``inner_steps_total``, ``wall_time`` and ``inner_steps_per_sec`` (compile and validation
    time excluded) goes to ``metrics.jsonl`` and the TensorBoard event files under
    ``tensorboard/``; the progress bar shows the meta-loss and beside it the non-finite and
    clipped shares (:func:`_postfix`). The window's
    device arrays are fetched only when the row is written, so the steps between rows never
    wait for the host."""

    def __init__(self, log_every: int, progress: bool, due_extra=None):
        self.log_every = int(log_every)
        self.progress = progress
        self.due_extra = due_extra  # callable(step) -> bool: also log at these steps
        self.pending: list = []
        self.t_first: float | None = None
        self.first_inner = 0
        self.inner_total = 0
        self.inner_timed = 0
        self.last: dict = {}
        self.log = self.tb = None  # opened at start

    def start(self, run: Run) -> None:
        path = self.path = run.path("metrics.jsonl")
        if run.primary:
            with faults.writing(path):
                if run.start_step > 0:  # drop rows logged after the checkpoint we resume from
                    keep_rows_through(path, run.start_step)
                elif os.path.exists(path):
                    os.remove(path)
        done = read_metrics(path) if run.primary else []
        self.inner_total = next((r["inner_steps_total"] for r in reversed(done) if "inner_steps_total" in r), 0)
        with faults.writing(path):
            self.log = open(path if run.primary else os.devnull, "a")
        # TensorBoard discards earlier events after the checkpoint's step (all of them afresh).
        purge = run.start_step + 1 if run.start_step > 0 else 0
        self.tb = tb_lib.Writer(run.path("tensorboard"), purge_step=purge) if run.primary else None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total, initial=run.start_step, desc="meta-train",
                        disable=not (self.progress and run.primary), dynamic_ncols=True)

    def _write(self, run: Run, row: dict) -> None:
        with faults.writing(self.path):
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        if self.tb is not None:
            self.tb.row(row)

    def checkpoint_items(self, run: Run) -> tuple[dict, dict]:
        """The steps since the last row (their metrics, exactly: float32 values are exact in
        JSON's doubles); and, first, the rows so far are flushed to disk."""
        if run.primary and self.log is not None and not self.log.closed:  # (open after start, till end)
            with faults.writing(self.path):
                self.log.flush()
                os.fsync(self.log.fileno())
            self.tb.flush()
        window = [{k: np.asarray(v).tolist() for k, v in distributed.to_host(m).items()}
                  for m in self.pending]
        return {}, {"metrics_window": window}

    def restore_items(self, run: Run, items: dict, host: dict) -> None:
        self.pending = [{k: np.asarray(v) for k, v in m.items()} for m in host.get("metrics_window", [])]

    def flush_rows(self, run: Run) -> None:
        for row in run.rows:
            self._write(run, row)
        run.rows.clear()

    def after_step(self, run: Run, metrics: dict) -> None:
        self.pending.append(metrics)
        if self.t_first is None:  # the first step compiles: time from its end on
            jax.block_until_ready(run.state.meta_params)
            self.t_first = time.perf_counter()
            self.first_inner = int(distributed.to_host(metrics["inner_steps"]))
        elif run.recompiling:  # the first step of a new curriculum stage compiled too
            jax.block_until_ready(run.state.meta_params)
            run.paused += time.perf_counter() - run.step_started
            self.first_inner += int(distributed.to_host(metrics["inner_steps"]))
        run.recompiling = False
        step = run.step
        extra = self.due_extra is not None and self.due_extra(step)
        if step % self.log_every == 0 or step == run.total or extra:
            window = window_row(self.pending)
            self.pending = []
            new_inner = int(window["inner_steps"])
            self.inner_total += new_inner
            self.inner_timed += new_inner - self.first_inner
            self.first_inner = 0
            row = {"step": step, **window, "inner_steps_total": self.inner_total}
            now = time.perf_counter()
            row["wall_time"] = now - self.t_first
            busy = now - self.t_first - run.paused
            row["inner_steps_per_sec"] = self.inner_timed / busy if self.inner_timed and busy > 0 else None
            self._write(run, row)
            self.last = row
            self.bar.set_postfix(_postfix(row), refresh=False)
        self.bar.update(1)
        self.flush_rows(run)

    def end(self, run: Run) -> None:
        self.flush_rows(run)
        self.bar.close()
        with faults.writing(self.path):
            self.log.close()
        if self.tb is not None:
            self.tb.close()
        run.summary["last_metrics"] = self.last
        run.summary["inner_steps_per_sec"] = self.last.get("inner_steps_per_sec")


def keep_rows_through(path: str, step: int) -> None:
    """Cut ``metrics.jsonl`` before its first row after outer step ``step`` or its first row
    cut short (rows are in step order). In place, with one truncate: it needs no free space."""
    if not os.path.exists(path):
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n") or row.get("step", 0) > step:
                break
            keep += len(line)
    os.truncate(path, keep)


def _postfix(row: dict) -> dict:
    """The progress bar's figures: the meta-loss and, beside it always, the run's stability:
    ``nonfinite`` (``nonfinite_share``, inner losses that were NaN/inf) and ``clipped``
    (``clipped_share``, meta-loss terms at the clip). With a meta-loss clip a non-finite term
    becomes the clip value, so ES/PES never skip a step (``skipped``, shown once non-zero) and
    these shares are the signal."""
    out = {"meta_loss": f"{row.get('meta_loss', float('nan')):.4g}"}
    for name, key in (("nonfinite", "nonfinite_share"), ("clipped", "clipped_share")):
        if row.get(key) is not None:  # absent in a window of imitation steps only
            out[name] = f"{100 * row[key]:.0f}%"
    if row.get("num_skipped"):
        out["skipped"] = int(row["num_skipped"])
    return out
