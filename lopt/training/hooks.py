"""The training loop's hooks (DESIGN.md, "the training layer"): what happens around each
compiled outer step, one concern each, sharing one :class:`Run`.

In the order ``lopt.training.loop.train`` runs them: ``MetricsLog`` (``metrics.jsonl``,
TensorBoard event files, the progress bar; ``lopt.training.metrics_log``),
:class:`CurriculumHook` (Chen et al. 2020, Algorithm 1, when configured), :class:`Health`
(stops a run whose meta-gradients keep being skipped, whose meta-loss sits at its clip or whose
inner losses stay non-finite), :class:`Checkpointing` (orbax, newest intact checkpoint restored
first), :class:`Exporter` and :class:`Plotter`. A hook implements any of ``start``,
``after_step``, ``end`` and, to save state beside the train state,
``checkpoint_items``/``restore_items``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lopt import export as export_lib
from lopt.training import checkpoint as ckpt_lib
from lopt.training import curriculum as curriculum_lib
from lopt.training import distributed, faults
from lopt.training.trainer import MetaTrainer, MetaTrainState
from tasks.registry import ConfigError

EXPORT_NAME = "optimizer.safetensors"


@dataclasses.dataclass
class Run:
    """What the hooks share (host side, mutable)."""

    config: ml_collections.ConfigDict
    workdir: str
    trainer: MetaTrainer
    primary: bool
    total: int
    state: MetaTrainState | None = None
    step: int = 0
    start_step: int = 0
    stop: str | None = None  # why the loop should end early (curriculum done, health, a signal)
    failure: str | None = None  # a health stop: the run did not work
    signal: str | None = None  # the signal that stopped the run (SIGTERM, SIGINT)
    signals: Any = None  # the loop's lopt.training.preemption.StopSignals
    paused: float = 0.0  # seconds not spent meta-training (validation, recompiles)
    step_started: float = 0.0  # perf_counter() when the latest outer step was called
    recompiling: bool = False  # the next step compiles (a new curriculum stage)
    export_params: Any = None  # what to export, if not the final meta-params
    summary: dict = dataclasses.field(default_factory=dict)
    rows: list = dataclasses.field(default_factory=list)  # extra rows for metrics.jsonl

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def emit(self, row: dict) -> None:
        """A row for the metrics logs (written by MetricsLog)."""
        self.rows.append(row)


class Hook:
    """A training-loop hook; every method is optional."""

    def start(self, run: Run) -> None: ...

    def after_step(self, run: Run, metrics: dict) -> None: ...

    def end(self, run: Run) -> None: ...

    def checkpoint_items(self, run: Run) -> tuple[dict, dict]:
        """(device pytrees, JSON host state) to save beside the train state."""
        return {}, {}

    def restore_items(self, run: Run, items: dict, host: dict) -> None:
        """Take back what ``checkpoint_items`` saved."""


def read_metrics(path: str) -> list[dict]:
    """The rows of ``metrics.jsonl``; a row cut short by a killed run is left out."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class Checkpointing(Hook):
    """Orbax checkpoints every ``every`` outer steps and at the end, keeping the newest ``keep``
    and every ``keep_every``-th step (0: none); the newest intact one is restored before
    anything else starts. Other hooks add their own items."""

    def __init__(self, every: int, hooks: list[Hook], keep: int = 2, keep_every: int = 0):
        self.every = int(every)
        self.hooks = hooks
        self.keep = int(keep)
        self.keep_every = int(keep_every)

    def restore(self, run: Run) -> None:
        self.ckpt = ckpt_lib.Checkpointer(run.path("checkpoints"), self.keep, self.keep_every, owner=True)
        like = self._pack(run)
        found = self.ckpt.restore_latest(like)
        if found is None:
            return
        step, restored, host = found
        run.state = restored.pop("state")
        for hook in self.hooks:
            hook.restore_items(run, restored, host)
        run.step = run.start_step = step
        logging.info("resumed from checkpoint at outer step %d", step)

    def _pack(self, run: Run) -> tuple[dict, dict]:
        items, host = {"state": run.state}, {}
        for hook in self.hooks:
            i, h = hook.checkpoint_items(run)
            items.update(i)
            host.update(h)
        return items, host

    def save(self, run: Run) -> None:
        if self.ckpt.latest_step() == run.step:  # e.g. rerun on a finished workdir: same state
            return
        # A second SIGTERM/SIGINT waits until the checkpoint is complete.
        with run.signals.saving() if run.signals is not None else contextlib.nullcontext():
            items, host = self._pack(run)
            self.ckpt.save(run.step, items, host)

    def after_step(self, run: Run, metrics: dict) -> None:
        if run.step % self.every == 0 and run.step < run.total and run.stop is None:
            self.save(run)

    def end(self, run: Run) -> None:
        self.save(run)
        self.ckpt.wait()
        self.ckpt.close()
        run.summary["checkpoints"] = self.ckpt.directory


@dataclasses.dataclass(frozen=True)
class HealthOptions:
    """When a run that cannot be learning stops (``config.health``).

    max_skipped: consecutive outer steps whose meta-gradient was non-finite (not applied).
    max_clipped_logs: consecutive logged steps at which every meta-loss term sat at its clip
      (or was non-finite): the meta-gradient is then ~0 and nothing is learnt. Also how many
      logged steps in a row the non-finite share may stay above ``max_nonfinite_share``.
    max_nonfinite_share: the share of inner losses that are NaN/inf (``nonfinite_share``) above
      which a logged step counts as dead. With a meta-loss clip a non-finite term becomes the
      clip value, so ES/PES never skip a meta-gradient and ``max_skipped`` cannot fire; this
      can. 1.0 turns it off.
    """

    max_skipped: int = 20
    max_clipped_logs: int = 5
    max_nonfinite_share: float = 0.5

    def __post_init__(self):
        for name in ("max_skipped", "max_clipped_logs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        v = self.max_nonfinite_share
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"max_nonfinite_share must be a number in [0, 1], got {v!r}")


class Health(Hook):
    """Stops a run that cannot be learning, with one line naming the likely cause and the last
    good checkpoint (:class:`HealthOptions`); checked at log steps, from the state's exact
    count of consecutive skipped meta-gradients."""

    def __init__(self, options: HealthOptions, log_every: int, checkpointing: Checkpointing):
        self.options = options
        self.log_every = int(log_every)
        self.checkpointing = checkpointing
        self.clipped_logs = 0
        self.nonfinite_logs = 0

    def checkpoint_items(self, run: Run) -> tuple[dict, dict]:
        return {}, {"health": {"clipped_logs": self.clipped_logs, "nonfinite_logs": self.nonfinite_logs}}

    def restore_items(self, run: Run, items: dict, host: dict) -> None:
        counts = host.get("health") or {}
        self.clipped_logs = int(counts.get("clipped_logs", 0))
        self.nonfinite_logs = int(counts.get("nonfinite_logs", 0))

    def after_step(self, run: Run, metrics: dict) -> None:
        if run.step % self.log_every and run.step != run.total:
            return
        keys = ("consecutive_skipped", "clipped_share", "nonfinite_share")
        host = distributed.to_host({k: metrics[k] for k in keys if k in metrics})
        skipped_run = int(host["consecutive_skipped"])
        clipped = float(host.get("clipped_share", 0.0))
        nonfinite = float(host.get("nonfinite_share", 0.0))
        o = self.options
        # NaN: a step of another objective (imitation) has neither; the counts stand.
        if not math.isnan(clipped):
            self.clipped_logs = self.clipped_logs + 1 if clipped >= 1.0 else 0
        if not math.isnan(nonfinite):
            self.nonfinite_logs = self.nonfinite_logs + 1 if nonfinite > o.max_nonfinite_share else 0
        cause = None
        if skipped_run >= o.max_skipped:
            cause = (f"the last {skipped_run} meta-gradients were non-finite and skipped (likely "
                     "cause: diverging inner runs or an unstable meta-learning rate; lower "
                     "meta_optimizer.learning_rate, or set unroll.meta_loss.clip)")
        elif self.clipped_logs >= o.max_clipped_logs:
            cause = (f"every meta-loss term sat at its clip for {self.clipped_logs} logged steps "
                     "in a row, so the meta-gradient is zero (likely cause: the inner runs diverge; "
                     "lower meta_optimizer.learning_rate)")
        elif self.nonfinite_logs >= o.max_clipped_logs:
            cause = (f"the non-finite share of inner losses stayed above health.max_nonfinite_share="
                     f"{o.max_nonfinite_share:g} for {self.nonfinite_logs} logged steps in a row "
                     f"(now {100 * nonfinite:.0f}%; likely cause: the learned optimizer's updates "
                     "diverge the inner runs; lower meta_optimizer.learning_rate)")
        if cause is not None:
            last = self.checkpointing.ckpt.latest_step()
            where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written"
            run.failure = f"training stopped at outer step {run.step}: {cause}; {where}"
            run.stop = run.failure


class CurriculumHook(Hook):
    """Chen et al. 2020, Algorithm 1 (``lopt.training.curriculum``) inside the loop.

    Holds the controller state, the best meta-params (host numpy) and the trainer of the
    current stage: the base trainer with ``horizon=constant(N_train)``, one compile of the outer
    step per stage. At each period's end (``Curriculum.period_steps`` outer steps of the stage)
    it validates and decides; on "advance" it switches to the next stage's trainer, restarts
    from the best meta-params (unless ``restart_from_best=False``) and draws fresh particles for
    the new length (the estimator's ``at_stage`` sets per-stage state, e.g. imitation's r),
    keeping the meta-optimizer state and the run's clock. ``metrics.jsonl`` gets a row per
    decision; the export is the best meta-params.
    """

    def __init__(self, curriculum: curriculum_lib.Curriculum, base: MetaTrainer):
        self.curriculum = curriculum
        self.base = base
        self.validator = curriculum_lib.Validator(base.task_family, base.learned_opt, curriculum)
        self.state = curriculum.init()
        self.best: Any = None

    def trainer(self, stage: int) -> MetaTrainer:
        return self.base.with_horizon(curriculum_lib.constant_horizon(self.curriculum.stages[stage]))

    def due(self, step: int) -> bool:
        """Whether a validation is due at outer step ``step``: a stage's baseline (at once), or
        the end of a period, ``period_steps`` outer steps of this stage apart."""
        s = self.state
        if s.done or s.last_step >= step:
            return False
        if s.period < 0:
            return True
        every = self.curriculum.period_steps(s.stage, self.base.trunc_length)
        return step >= s.stage_start + (s.period + 1) * every

    def checkpoint_items(self, run: Run) -> tuple[dict, dict]:
        best = self.best if self.best is not None else distributed.to_host(run.state.meta_params)
        return {"best_meta_params": best}, {"curriculum": self.state.to_dict()}

    def restore_items(self, run: Run, items: dict, host: dict) -> None:
        if "curriculum" not in host:
            raise ConfigError("this workdir's checkpoints were written without a curriculum; "
                              "use a new workdir")
        self.state = curriculum_lib.CurriculumState.from_dict(host["curriculum"])
        self.best = distributed.to_host(items["best_meta_params"]) if self.state.best_step >= 0 else None
        run.trainer = self.trainer(self.state.stage)

    def start(self, run: Run) -> None:
        self._validate(run)  # stage 0's baseline (or one missed at an interrupt)

    def after_step(self, run: Run, metrics: dict) -> None:
        self._validate(run)

    def _validate(self, run: Run) -> None:
        if not self.due(run.step):
            return
        t0 = time.perf_counter()
        c, step = self.curriculum, run.step
        params = distributed.to_host(run.state.meta_params)
        if self.state.period >= 0:  # the end of a period of training
            self.state, d = c.update(self.state, self.validator(params, c.valid_length(self.state)), step)
            run.emit(d.to_row())
            if d.is_best:
                self.best = params
            if d.action == "advance":
                self._start_stage(run)
        while not self.state.done and self.state.period < 0:  # a stage's baseline
            candidate = self.best if self.best is not None else params
            self.state, d = c.update(self.state, self.validator(candidate, c.valid_length(self.state)), step)
            run.emit(d.to_row())
            if d.is_best:
                self.best = candidate
        if self.state.done:
            run.stop = "curriculum finished"
        if step > 0:
            run.paused += time.perf_counter() - t0

    def _start_stage(self, run: Run) -> None:
        stage = self.state.stage
        run.trainer = self.trainer(stage)
        # Fresh particles for the new length, drawn from the run's own key stream.
        state = run.trainer.init_stage(run.state, stage, jax.random.fold_in(run.state.key, stage))
        if self.curriculum.restart_from_best:
            state = state._replace(meta_params=_put_like(self.best, state.meta_params))
        run.state = state
        run.recompiling = True

    def end(self, run: Run) -> None:
        run.export_params = self.best
        s = self.state
        run.summary["curriculum"] = {
            "exported": "best",
            "best_valid_loss": s.best_loss if math.isfinite(s.best_loss) else None,
            "best_stage": s.best_stage,
            "best_step": s.best_step,
            "valid_length": self.curriculum.valid_length(s),
            "stage": s.stage,
            "stages": list(self.curriculum.stages),
            "stopped": s.done,
        }
        run.summary["best_meta_params"] = self.best


def _put_like(host_tree: Any, like: Any) -> Any:
    """``host_tree`` (numpy) as device arrays with the shardings of ``like`` (any process count)."""

    def one(x, ref):
        x = np.asarray(x, dtype=ref.dtype)
        return jax.make_array_from_callback(x.shape, ref.sharding, lambda index: x[index])

    return jax.tree.map(one, host_tree, like)


class Exporter(Hook):
    """Writes the trained optimizer (the final meta-params, or the curriculum's best) to
    ``export/optimizer.safetensors``; a run stopped by a health check or a signal exports
    nothing."""

    def end(self, run: Run) -> None:
        run.summary["export"] = None
        if not run.primary or run.failure is not None or run.signal is not None:
            return
        config = run.config
        metadata = {
            "outer_step": run.step,
            "task": config.task.to_dict(),
            "estimator": config.estimator.to_dict(),
            "final_meta_loss": run.summary.get("last_metrics", {}).get("meta_loss"),
            "horizon": run.trainer.horizon.max_length,
        }
        if "curriculum" in run.summary:
            metadata["curriculum"] = run.summary["curriculum"]
        if config.get("modules"):  # the user's modules: lopt-eval imports them
            metadata["modules"] = list(config.modules)
        params = run.export_params
        if params is None:
            params = distributed.to_host(run.state.meta_params)
        path = run.path("export", EXPORT_NAME)
        with faults.writing(path):
            run.summary["export"] = export_lib.save(path, run.trainer.learned_opt, params, metadata=metadata)


class Plotter(Hook):
    """``plots/meta_loss.png``: the meta-loss against outer step, curriculum advances dotted
    (not when a signal stopped the run: it is to be resumed)."""

    def end(self, run: Run) -> None:
        run.summary["plot"] = None
        if run.primary and run.signal is None:
            path = run.path("plots", "meta_loss.png")
            with faults.writing(path):
                run.summary["plot"] = plot_metrics(run.path("metrics.jsonl"), path)


def plot_metrics(metrics_path: str, out_path: str) -> str | None:
    """Meta-loss against outer step (PNG), curriculum stage changes as dotted lines; returns the
    path, or None if nothing was logged."""
    all_rows = read_metrics(metrics_path)
    rows = [r for r in all_rows if "meta_loss" in r]  # curriculum rows carry "decision" instead
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["meta_loss"] for r in rows], lw=1)
    for r in all_rows:
        if r.get("decision") == "advance":
            ax.axvline(r["step"], color="grey", ls=":", lw=1)
    ax.set_xlabel("outer step")
    ax.set_ylabel("meta-loss")
    ax.set_title("meta-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
