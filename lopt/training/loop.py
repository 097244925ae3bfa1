"""``train``: the host loop, a short loop over hooks (DESIGN.md, "the training layer").

    state = trainer.init(key)
    restore from the newest intact checkpoint, if any
    every hook's start()                   (lock, logs, curriculum baseline, ...)
    while step < num_outer_steps and nothing asked to stop:
        state, metrics = trainer.step(state)   # one compiled outer step
        every hook's after_step()         (log, validate, check health, checkpoint)
    every hook's end()                     (final checkpoint, export, plots)

The hooks share one :class:`Run` (the trainer, the state, the step, the reason to stop).
Device values are read on the host only when a hook needs them (at log steps); the state is
donated to each step and never copied otherwise.

Hooks, in order: :class:`MetricsLog` (``metrics.jsonl``, TensorBoard event files, the progress
bar), :class:`CurriculumHook` (Chen et al. 2020, Algorithm 1, when configured),
:class:`Health` (stops a run whose meta-gradients keep being skipped or whose meta-loss sits at
its clip), :class:`Checkpointing` (orbax, newest intact checkpoint restored first),
:class:`Exporter` and :class:`Plotter`. A workdir is locked while a run writes it
(``lopt.training.workdir``).
"""

from __future__ import annotations

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
from lopt.training import config as config_lib
from lopt.training import curriculum as curriculum_lib
from lopt.training import distributed
from lopt.training import tensorboard as tb_lib
from lopt.training import workdir as workdir_lib
from lopt.training.trainer import COUNT_METRICS, MAX_METRICS, MetaTrainer, MetaTrainState
from tasks.registry import ConfigError, check_kwargs

EXPORT_NAME = "optimizer.safetensors"


class TrainingStopped(RuntimeError):
    """A health check stopped the run; the message is one line naming the cause."""


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
    stop: str | None = None  # why the loop should end early (curriculum done, health)
    failure: str | None = None  # a health stop: the run did not work
    busy: bool = False  # a hook is mid-update (no interrupt checkpoint now)
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


def _to_python(metrics: dict) -> dict:
    out = {}
    for k, v in distributed.to_host(metrics).items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = bool(v) if isinstance(v, bool) else (float(v) if isinstance(v, float) else v)
    return out


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    ``tensorboard/``; the progress bar shows the meta-loss and the health figures. The window's
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

    def start(self, run: Run) -> None:
        path = run.path("metrics.jsonl")
        if run.primary:
            if run.start_step > 0:  # drop rows logged after the checkpoint we resume from
                rows = [r for r in read_metrics(path) if r["step"] <= run.start_step]
                with open(path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            elif os.path.exists(path):
                os.remove(path)
        done = read_metrics(path) if run.primary else []
        self.inner_total = next((r["inner_steps_total"] for r in reversed(done) if "inner_steps_total" in r), 0)
        self.log = open(path if run.primary else os.devnull, "a")
        self.tb = tb_lib.Writer(run.path("tensorboard")) if run.primary else None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total, initial=run.start_step, desc="meta-train",
                        disable=not (self.progress and run.primary), dynamic_ncols=True)

    def _write(self, run: Run, row: dict) -> None:
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()
        if self.tb is not None:
            self.tb.row(row)

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
        self.log.close()
        if self.tb is not None:
            self.tb.close()
        run.summary["last_metrics"] = self.last
        run.summary["inner_steps_per_sec"] = self.last.get("inner_steps_per_sec")


def _postfix(row: dict) -> dict:
    out = {"meta_loss": f"{row.get('meta_loss', float('nan')):.4g}"}
    if row.get("num_skipped"):
        out["skipped"] = int(row["num_skipped"])
    clipped = row.get("clipped_share")
    if clipped:
        out["at_clip"] = f"{100 * clipped:.0f}%"
    if row.get("nonfinite_share"):
        out["nan_loss"] = f"{100 * row['nonfinite_share']:.0f}%"
    return out


class Checkpointing(Hook):
    """Orbax checkpoints every ``every`` outer steps and at the end; the newest intact one is
    restored before anything else starts. Other hooks add their own items."""

    def __init__(self, every: int, hooks: list[Hook]):
        self.every = int(every)
        self.hooks = hooks

    def restore(self, run: Run) -> None:
        self.ckpt = ckpt_lib.Checkpointer(run.path("checkpoints"))
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

    def interrupted(self, run: Run) -> None:
        self.save(run)
        self.ckpt.wait()


@dataclasses.dataclass(frozen=True)
class HealthOptions:
    """When a run that cannot be learning stops (``config.health``).

    max_skipped: consecutive outer steps whose meta-gradient was non-finite (not applied).
    max_clipped_logs: consecutive logged steps at which every meta-loss term sat at its clip
      (or was non-finite): the meta-gradient is then ~0 and nothing is learnt.
    """

    max_skipped: int = 20
    max_clipped_logs: int = 5

    def __post_init__(self):
        for name in ("max_skipped", "max_clipped_logs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class Health(Hook):
    """Stops a run that cannot be learning, with one line naming the likely cause and the last
    good checkpoint (:class:`HealthOptions`); checked at log steps, from the state's exact
    count of consecutive skipped meta-gradients."""

    def __init__(self, options: HealthOptions, log_every: int, checkpointing: Checkpointing):
        self.options = options
        self.log_every = int(log_every)
        self.checkpointing = checkpointing
        self.clipped_logs = 0

    def after_step(self, run: Run, metrics: dict) -> None:
        if run.step % self.log_every and run.step != run.total:
            return
        host = distributed.to_host({k: metrics[k] for k in ("consecutive_skipped", "clipped_share") if k in metrics})
        skipped_run = int(host["consecutive_skipped"])
        clipped = float(host.get("clipped_share", 0.0))
        if not math.isnan(clipped):  # NaN: a step of another objective (imitation) has no clip
            self.clipped_logs = self.clipped_logs + 1 if clipped >= 1.0 else 0
        o = self.options
        cause = None
        if skipped_run >= o.max_skipped:
            cause = (f"the last {skipped_run} meta-gradients were non-finite and skipped (likely "
                     "cause: diverging inner runs or an unstable meta-learning rate; lower "
                     "meta_optimizer.learning_rate, or set unroll.meta_loss.clip)")
        elif self.clipped_logs >= o.max_clipped_logs:
            cause = (f"every meta-loss term sat at its clip for {self.clipped_logs} logged steps "
                     "in a row, so the meta-gradient is zero (likely cause: the inner runs diverge; "
                     "lower meta_optimizer.learning_rate)")
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
        run.busy = True
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
        run.busy = False

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
    ``export/optimizer.safetensors``; a run stopped by a health check exports nothing."""

    def end(self, run: Run) -> None:
        run.summary["export"] = None
        if not run.primary or run.failure is not None:
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
        params = run.export_params
        if params is None:
            params = distributed.to_host(run.state.meta_params)
        run.summary["export"] = export_lib.save(
            run.path("export", EXPORT_NAME), run.trainer.learned_opt, params, metadata=metadata
        )


class Plotter(Hook):
    """``plots/meta_loss.png``: the meta-loss against outer step, curriculum advances dotted."""

    def end(self, run: Run) -> None:
        run.summary["plot"] = (
            plot_metrics(run.path("metrics.jsonl"), run.path("plots", "meta_loss.png"))
            if run.primary else None
        )


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


# --- the loop --------------------------------------------------------------------------------------


def health_options(config: ml_collections.ConfigDict) -> HealthOptions:
    options = config_lib.section_options(config.get("health"), "health", HealthOptions) or {}
    try:
        return HealthOptions(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.health: {e}") from None


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
    hooks: tuple[Hook, ...] = (),
) -> dict[str, Any]:
    """Meta-train as ``config`` says, in ``workdir``; resume from its newest intact checkpoint.

    Every key and value of ``config`` is checked before anything is compiled or written. With
    an enabled ``config.curriculum`` (Chen et al. 2020, Algorithm 1) each stage trains at its
    own constant horizon, the meta-params are validated at every period's end, decisions are
    logged in ``metrics.jsonl`` (rows with ``decision``) and the export holds the *best*
    validated meta-params. ``hooks`` are added after the built-in ones.

    Returns a summary: final state, paths of the metrics, checkpoints, export and plot, the
    measured throughput (inner steps per second, compile and validation excluded), and with a
    curriculum ``curriculum`` and ``best_meta_params``. Raises :class:`TrainingStopped` when a
    health check stopped the run (its final checkpoint is still written).
    """
    config_lib.validate(config)
    try:
        mesh = distributed.particle_mesh(config.get("num_devices", 0))
    except ValueError as e:
        raise ConfigError(f"config.num_devices: {e}") from None
    trainer = config_lib.build(config, mesh=mesh)  # fails on bad keys/values before anything else
    curriculum = config_lib.curriculum(config)
    health = health_options(config)
    primary = distributed.is_primary()
    run = Run(config, os.path.abspath(workdir), trainer, primary, total=int(config.num_outer_steps))
    lock = workdir_lib.lock(run.workdir) if primary else None
    try:
        if primary:
            with open(run.path("config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        cur_hook = CurriculumHook(curriculum, trainer) if curriculum else None
        if cur_hook is not None:  # stage 0 trains at its own length
            run.trainer = cur_hook.trainer(0)
        run.state = run.trainer.init(jax.random.PRNGKey(int(config.seed)))
        log_hook = MetricsLog(config.log_every, progress, cur_hook.due if cur_hook else None)
        user = list(hooks)
        middle: list[Hook] = [h for h in (cur_hook,) if h is not None]
        ckpt_hook = Checkpointing(config.checkpoint_every, middle + user)
        health_hook = Health(health, config.log_every, ckpt_hook)
        all_hooks: list[Hook] = [log_hook, *middle, health_hook, *user, ckpt_hook, Exporter(), Plotter()]
        ckpt_hook.restore(run)
        for hook in all_hooks:
            hook.start(run)
        log_hook.flush_rows(run)
        try:
            while run.step < run.total and run.stop is None:
                run.step_started = time.perf_counter()
                run.state, metrics = run.trainer.step(run.state)
                run.step += 1
                for hook in all_hooks:
                    hook.after_step(run, metrics)
        except KeyboardInterrupt:
            log_hook.bar.close()
            if run.busy:  # mid-validation: the curriculum and the train state may disagree
                logging.warning("interrupted mid-validation; rerun to resume from the last checkpoint")
            else:
                try:  # the state is donated to each step: if the interrupt hit mid-step it is gone
                    ckpt_hook.interrupted(run)
                    logging.warning("interrupted at outer step %d; checkpoint saved, rerun to resume", run.step)
                except Exception:  # noqa: BLE001
                    logging.warning("interrupted mid-step; rerun to resume from the last checkpoint")
            raise
        for hook in all_hooks:
            hook.end(run)
    finally:
        if lock is not None:
            lock.release()
    run.summary.update(
        state=run.state,
        workdir=run.workdir,
        metrics=run.path("metrics.jsonl"),
        stopped=run.stop,
    )
    if run.failure is not None:
        raise TrainingStopped(run.failure)
    return run.summary
