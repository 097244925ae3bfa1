"""``train``: the host loop, a short loop over hooks (DESIGN.md, "the training layer").

    state = trainer.init(key)
    restore from the newest intact checkpoint, if any
    every hook's start()                   (lock, logs, curriculum baseline, ...)
    while step < num_outer_steps and nothing asked to stop (a hook, SIGTERM, SIGINT):
        state, metrics = trainer.step(state)   # one compiled outer step
        every hook's after_step()         (log, validate, check health, checkpoint)
    every hook's end()                     (final checkpoint, export, plots)

The hooks share one :class:`Run` (the trainer, the state, the step, the reason to stop).
Device values are read on the host only when a hook needs them (at log steps); the state is
donated to each step and never copied otherwise.

The hooks live in ``lopt.training.hooks`` (metrics and TensorBoard, the curriculum, health
checks, checkpoints, the export, plots) and ``lopt.training.continuous_eval`` (the held-out
evaluation of ``config.eval``). A workdir is locked while a run writes it
(``lopt.training.workdir``). SIGTERM and SIGINT end the run after the step in flight, with a
checkpoint (``lopt.training.preemption``); a failed write is one line naming the path and the
last intact checkpoint (``lopt.training.faults``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from lopt.training import checkpoint as ckpt_lib
from lopt.training import config as config_lib
from lopt.training import distributed, faults, preemption
from lopt.training import workdir as workdir_lib
from lopt.training.continuous_eval import ContinuousEval
from lopt.training.hooks import (  # noqa: F401  (re-exported: the loop's public names)
    EXPORT_NAME,
    Checkpointing,
    CurriculumHook,
    Exporter,
    Health,
    HealthOptions,
    Hook,
    Plotter,
    Run,
    plot_metrics,
    read_metrics,
)
from lopt.training.metrics_log import MetricsLog, window_row  # noqa: F401
from tasks import user_code
from tasks.registry import ConfigError


class TrainingStopped(RuntimeError):
    """A health check stopped the run; the message is one line naming the cause."""


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
    validated meta-params. With ``config.eval`` the meta-params are evaluated on held-out
    instances every ``eval.every`` outer steps (``eval/...`` rows, ``plots/eval.png``).
    ``hooks`` are added after the built-in ones.

    Returns a summary: final state, paths of the metrics, checkpoints, export and plot, the
    measured throughput (inner steps per second, compile, validation and evaluation excluded),
    with a curriculum ``curriculum`` and ``best_meta_params``, and with an evaluation ``eval``
    (its count, seconds and share of the run's time, and its plot). Raises
    :class:`TrainingStopped` when a health check stopped the run (its final checkpoint is still
    written); ``preemption.Interrupted`` when SIGTERM or SIGINT stopped it (after the step in
    flight, with a checkpoint of it; metrics and TensorBoard flushed; no export or plots);
    ``faults.WriteFailed`` when a write failed (half-written checkpoint removed). Each says
    what happened in one line.
    """
    # A resumed run imports the user's modules its first run recorded (config.json), so
    # rerunning it needs no --module; config.json then records every module the run needs.
    config = config_lib.with_modules(config, user_code.merge(
        config.get("modules", ()) or (), workdir_lib.recorded_modules(workdir)))
    config_lib.validate(config)
    try:
        mesh = distributed.particle_mesh(config.get("num_devices", 0))
    except ValueError as e:
        raise ConfigError(f"config.num_devices: {e}") from None
    trainer = config_lib.build(config, mesh=mesh)  # fails on bad keys/values before anything else
    config = config_lib.with_modules(config, config_lib.user_modules(config))
    curriculum = config_lib.curriculum(config)
    evaluation = config_lib.eval_options(config)
    eval_tasks = config_lib.eval_tasks(config, trainer.task_family) if evaluation else None
    health = health_options(config)
    primary = distributed.is_primary()
    run = Run(config, os.path.abspath(workdir), trainer, primary, total=int(config.num_outer_steps))
    with preemption.StopSignals() as run.signals:
        try:
            _run(run, hooks, curriculum, evaluation, eval_tasks, health, progress)
        except faults.WriteFailed as e:
            raise e.then(f"the run stopped at outer step {run.step}",
                         ckpt_lib.describe_latest(run.path("checkpoints")),
                         f"{e.remedy()} and rerun the same command to resume from it") from None
        except preemption.SecondSignal as e:
            raise preemption.Interrupted(
                f"stopped at once by a second {e} at outer step {run.step} (not saved); "
                f"{ckpt_lib.describe_latest(run.path('checkpoints'))}; rerun the same command to "
                "resume from it", e.signum, run.step) from None
    run.summary.update(
        state=run.state,
        workdir=run.workdir,
        metrics=run.path("metrics.jsonl"),
        stopped=run.stop,
    )
    if run.failure is not None:
        raise TrainingStopped(run.failure)
    if run.signal is not None:
        raise run.signals.stopped(run.step)
    return run.summary


def _run(run: Run, hooks: tuple[Hook, ...], curriculum, evaluation, eval_tasks, health: HealthOptions,
         progress: bool) -> None:
    """Build the hooks, restore, and drive the loop (:func:`train`)."""
    config, trainer = run.config, run.trainer
    with faults.writing(run.path(".lock")):
        lock = workdir_lib.lock(run.workdir) if run.primary else None
    log_hook = None
    try:
        if run.primary:
            with faults.writing(run.path("config.json")), open(run.path("config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        cur_hook = CurriculumHook(curriculum, trainer) if curriculum else None
        if cur_hook is not None:  # stage 0 trains at its own length
            run.trainer = cur_hook.trainer(0)
        run.state = run.trainer.init(jax.random.PRNGKey(int(config.seed)))
        log_hook = MetricsLog(config.log_every, progress, cur_hook.due if cur_hook else None)
        user = list(hooks)
        middle: list[Hook] = [h for h in (cur_hook,) if h is not None]
        late: list[Hook] = []  # after the health check: a run it stops is not evaluated
        if evaluation is not None:
            late.append(ContinuousEval(evaluation, eval_tasks, trainer.learned_opt))
        keep = {k: config.get(f"checkpoint_{k}", config_lib.OPTIONAL[f"checkpoint_{k}"])
                for k in ("keep", "keep_every")}
        saved: list[Hook] = [log_hook, *middle, *late, *user]  # their state goes in the checkpoints
        ckpt_hook = Checkpointing(config.checkpoint_every, saved, **keep)
        health_hook = Health(health, config.log_every, ckpt_hook)
        saved.append(health_hook)
        all_hooks: list[Hook] = [log_hook, *middle, health_hook, *late, *user, ckpt_hook, Exporter(),
                                 Plotter()]
        ckpt_hook.restore(run)
        for hook in all_hooks:
            hook.start(run)
        log_hook.flush_rows(run)
        _loop(run, all_hooks)
        for hook in all_hooks:
            hook.end(run)
    except BaseException:
        if log_hook is not None and hasattr(log_hook, "bar"):
            log_hook.bar.close()  # the error's line starts on a line of its own
        raise
    finally:
        if lock is not None:
            lock.release()


def _loop(run: Run, hooks: list[Hook]) -> None:
    """Outer steps until the last, a hook's stop, or a signal (asked after every step, so
    that on several processes the same step is agreed: lopt.training.preemption)."""
    signals = run.signals
    if signals.reached(run.step) and run.step < run.total:  # a signal while the run started
        run.signal = run.stop = signals.name()
        return
    while run.step < run.total and run.stop is None:
        run.step_started = time.perf_counter()
        run.state, metrics = run.trainer.step(run.state)
        run.step += 1
        for hook in hooks:
            hook.after_step(run, metrics)
        if signals.reached(run.step) and run.step < run.total:  # (the last step ends anyway)
            run.signal = run.stop = signals.name()
