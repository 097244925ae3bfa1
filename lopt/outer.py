"""The outer loop: ``MetaTrainer`` (one compiled outer step) and ``train`` (the host loop).

``MetaTrainer.step`` runs, inside a single ``jax.jit`` with the state donated: the estimator's
meta-gradient (task sampling, batch sampling and every particle's truncated unroll included),
a finiteness check, and the meta-optimizer update. A non-finite meta-gradient is never
applied: the meta-params and meta-optimizer state stay as they were and ``num_skipped`` counts
it. ``train`` adds logging (``metrics.jsonl``, a tqdm bar), orbax checkpoints, resumption,
the optional unroll-length curriculum (``lopt.curriculum``, Chen et al. 2020) and the final
export; see DESIGN.md for the workdir layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from estimators.base import Estimator
from estimators import imitation as imitation_lib
from estimators import schedules
from estimators.schedules import Schedule
from estimators.unroll import MetaLoss, Unroller
from lopt import checkpoint as ckpt_lib
from lopt import config as config_lib
from lopt import curriculum as curriculum_lib
from lopt import distributed
from lopt import export as export_lib
from lopt.base import LearnedOptimizer
from tasks.base import TaskFamily, bind_data, data_arrays


PARTICLE_AXIS = "particles"
# Estimator metrics that count things (summed over devices); all others are means.
COUNT_METRICS = frozenset({"inner_steps", "trajectories_done"})


class MetaTrainState(NamedTuple):
    meta_params: Any
    meta_opt_state: Any
    estimator_state: Any
    outer_step: jax.Array  # int32
    key: jax.Array  # uint32[2]
    num_skipped: jax.Array  # int32: outer steps whose meta-gradient was non-finite


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class MetaTrainer:
    """Meta-trains ``learned_opt`` on ``task_family`` with ``estimator`` (DESIGN.md, lopt/outer.py)."""

    task_family: TaskFamily
    learned_opt: LearnedOptimizer
    estimator: Estimator
    meta_optimizer: optax.GradientTransformation
    num_particles: int = 8
    trunc_length: int = 20
    horizon: Schedule = dataclasses.field(default=None)  # type: ignore[assignment]
    meta_loss: MetaLoss = MetaLoss()
    stagger: bool = True
    trunc_schedule: Schedule | None = None  # varying truncation lengths, bucketed (Unroller)
    mesh: Mesh | None = None
    # Training techniques passed to the Unroller (None: off); see estimators/replay.py and
    # estimators/imitation.py. Imitation episodes wrap the estimator (imitation.Imitation).
    replay: Any = None  # estimators.replay.ReplayBuffer
    behaviour_cloning: Any = None  # estimators.imitation.BehaviourCloning
    self_improving: Any = None  # estimators.imitation.SelfImproving

    def __post_init__(self):
        if self.horizon is None:
            raise ValueError("MetaTrainer needs a horizon schedule, e.g. schedules.constant(200)")
        if self.mesh is not None:
            if len(self.mesh.axis_names) != 1:
                raise ValueError(
                    f"MetaTrainer shards particles over a 1-D mesh; got axes {self.mesh.axis_names}"
                )
            n = self.mesh.size
            if self.num_particles % n:
                raise ValueError(
                    f"num_particles={self.num_particles} must be divisible by the {n} devices of "
                    f"the mesh; set num_particles to a multiple of {n} (e.g. "
                    f"{n * max(1, -(-self.num_particles // n))})"
                )

    # -- sharding: the particle axis over a 1-D mesh (one device: a mesh of one) ----------------

    @functools.cached_property
    def _mesh(self) -> Mesh:
        if self.mesh is not None:
            return self.mesh
        return Mesh(np.asarray(jax.devices()[:1]), (PARTICLE_AXIS,))

    @property
    def num_devices(self) -> int:
        return self._mesh.size

    @functools.cached_property
    def unroller(self) -> Unroller:
        """The per-device unroller: ``num_particles / num_devices`` particles, used inside
        ``shard_map`` (its estimators key randomness by global particle index)."""
        return Unroller(
            task_family=self.task_family,
            learned_opt=self.learned_opt,
            num_particles=self.num_particles // self.num_devices,
            trunc_length=self.trunc_length,
            horizon=self.horizon,
            meta_loss=self.meta_loss,
            stagger=self.stagger,
            trunc_schedule=self.trunc_schedule,
            shard_axis=self._mesh.axis_names[0],
            num_shards=self.num_devices,
            replay=self.replay,
            behaviour_cloning=self.behaviour_cloning,
            self_improving=self.self_improving,
        )

    def _bound_unroller(self, arrays: Any) -> Unroller:
        """The unroller whose task family reads the dataset passed into jit as ``arrays``."""
        if arrays is None:
            return self.unroller
        family = bind_data(self.task_family, arrays)
        return dataclasses.replace(self.unroller, task_family=family)

    @functools.cached_property
    def state_specs(self) -> MetaTrainState:
        """PartitionSpecs of the train state: estimator-state leaves with a leading particle
        (or pair) axis are sharded over the mesh, everything else is replicated."""
        axis = self._mesh.axis_names[0]
        unsharded = dataclasses.replace(self.unroller, shard_axis=None)  # same local shapes
        arrays = data_arrays(self.task_family)

        def est_init(key, arrays):
            u = unsharded if arrays is None else dataclasses.replace(
                unsharded, task_family=bind_data(self.task_family, arrays))
            return self.estimator.init(u, key, self.learned_opt.init(key))

        shapes = jax.eval_shape(est_init, jax.random.PRNGKey(0), arrays)
        est_specs = jax.tree.map(lambda x: P(axis) if x.ndim else P(), shapes)
        return MetaTrainState(P(), P(), est_specs, P(), P(), P())

    def _shard(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self._mesh, in_specs=in_specs, out_specs=out_specs)

    # -- init and step --------------------------------------------------------------------------

    def init(self, key: jax.Array) -> MetaTrainState:
        return self._init_fn(key, data_arrays(self.task_family))

    @functools.cached_property
    def _init_fn(self):
        def init(key, arrays):
            k_meta, k_est, k_next = jax.random.split(key, 3)
            meta_params = self.learned_opt.init(k_meta)
            unroller = self._bound_unroller(arrays)
            return MetaTrainState(
                meta_params=meta_params,
                meta_opt_state=self.meta_optimizer.init(meta_params),
                estimator_state=self.estimator.init(unroller, k_est, meta_params),
                outer_step=jnp.zeros([], jnp.int32),
                key=k_next,
                num_skipped=jnp.zeros([], jnp.int32),
            )

        return jax.jit(self._shard(init, (P(), P()), self.state_specs))

    def step(self, state: MetaTrainState) -> tuple[MetaTrainState, dict]:
        """One outer step (compiled once; ``state`` is donated)."""
        return self._step_fn(state, data_arrays(self.task_family))

    @functools.cached_property
    def _step_fn(self):
        sharded = self._shard(self._step, (self.state_specs, P()), (self.state_specs, P()))
        return jax.jit(sharded, donate_argnums=0)

    def _step(self, state: MetaTrainState, arrays: Any = None) -> tuple[MetaTrainState, dict]:
        """The per-device outer step (runs inside ``shard_map``)."""
        axis = self._mesh.axis_names[0]
        key, k_grad = jax.random.split(state.key)
        grad, est_state, metrics = self.estimator.grad(
            self._bound_unroller(arrays), state.meta_params, state.estimator_state, k_grad
        )
        grad = jax.lax.pmean(grad, axis)  # every device holds the same number of particles
        metrics = {
            k: jax.lax.psum(v, axis) if k in COUNT_METRICS else jax.lax.pmean(v, axis)
            for k, v in metrics.items()
        }
        finite = _all_finite(grad)
        safe_grad = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad)
        updates, opt_state = self.meta_optimizer.update(
            safe_grad, state.meta_opt_state, state.meta_params
        )
        new_params = optax.apply_updates(state.meta_params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        num_skipped = state.num_skipped + (~finite).astype(jnp.int32)
        metrics.update(grad_norm=optax.global_norm(safe_grad), grad_finite=finite, num_skipped=num_skipped)
        new_state = MetaTrainState(
            meta_params=keep(new_params, state.meta_params),
            meta_opt_state=keep(opt_state, state.meta_opt_state),
            estimator_state=est_state,
            outer_step=state.outer_step + 1,
            key=key,
            num_skipped=num_skipped,
        )
        return new_state, metrics


# --- the host loop ---------------------------------------------------------------------------


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so a resumed log has no repeats."""
    rows = [r for r in _read_metrics(path) if r["step"] <= last_step]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _to_python(metrics: dict) -> dict:
    out = {}
    for k, v in distributed.to_host(metrics).items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = bool(v) if isinstance(v, bool) else (float(v) if isinstance(v, float) else v)
    return out


def plot_metrics(metrics_path: str, out_path: str) -> str | None:
    """Meta-loss against outer step (PNG), curriculum stage changes as dotted lines; returns the
    path, or None if nothing was logged."""
    all_rows = _read_metrics(metrics_path)
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
    ax.set_ylabel("meta-loss (normalised)")
    ax.set_title("meta-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _put_like(host_tree: Any, like: Any) -> Any:
    """``host_tree`` (numpy) as device arrays with the shardings of ``like`` (any process count)."""

    def one(x, ref):
        x = np.asarray(x, dtype=ref.dtype)
        return jax.make_array_from_callback(x.shape, ref.sharding, lambda index: x[index])

    return jax.tree.map(one, host_tree, like)


class _CurriculumRun:
    """``train``'s side of the curriculum (Chen et al. 2020, Algorithm 1; ``lopt.curriculum``).

    Holds the controller state, the best meta-params (host numpy) and the trainer of the current
    stage: ``base`` with ``horizon=constant(N_train)``, one compile of the outer step per stage.
    At every ``period``-th outer step :meth:`validate` validates, decides, and on "advance"
    switches to the next stage's trainer, restarts from the best meta-params (unless
    ``restart_from_best=False``) and re-initialises the estimator state (particles start fresh
    trajectories of the new length; PES sums restart; an imitation wrapper takes the stage's
    r), keeping the meta-optimizer state.
    """

    def __init__(self, curriculum: curriculum_lib.Curriculum, base: MetaTrainer, seed: int):
        self.curriculum = curriculum
        self.base = base
        self.seed = seed
        self.validator = curriculum_lib.Validator(base.task_family, base.learned_opt, curriculum)
        self.state = curriculum.init()
        self.best: Any = None  # host numpy meta-params; set by the first (baseline) validation
        self.trainer = self._trainer(0)

    @property
    def done(self) -> bool:
        return self.state.done

    def _trainer(self, stage: int) -> MetaTrainer:
        horizon = schedules.constant(self.curriculum.stages[stage])
        return dataclasses.replace(self.base, horizon=horizon)

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

    # -- checkpoints: the best meta-params beside the train state, the controller in JSON -------

    def pack(self, state: MetaTrainState) -> dict:
        best = self.best if self.best is not None else distributed.to_host(state.meta_params)
        return {"state": state, "best_meta_params": best}

    def host(self) -> dict:
        return {"curriculum": self.state.to_dict()}

    def unpack(self, restored: dict, host: dict) -> MetaTrainState:
        if "curriculum" not in host:
            raise ValueError("this checkpoint was written without a curriculum; use a new workdir")
        self.state = curriculum_lib.CurriculumState.from_dict(host["curriculum"])
        self.best = distributed.to_host(restored["best_meta_params"])
        if self.state.best_step < 0:  # saved before the first validation
            self.best = None
        self.trainer = self._trainer(self.state.stage)
        return restored["state"]

    # -- validation and decisions ---------------------------------------------------------------

    def validate(self, state: MetaTrainState, step: int) -> tuple[MetaTrainState, list[dict]]:
        """Validate at outer step ``step``; returns the (possibly restarted) state and the
        decision rows for ``metrics.jsonl``."""
        c, rows = self.curriculum, []
        params = distributed.to_host(state.meta_params)
        if self.state.period >= 0:  # the end of a period of training
            self.state, d = c.update(self.state, self.validator(params, c.valid_length(self.state)), step)
            rows.append(d.to_row())
            if d.is_best:
                self.best = params
            if d.action == "advance":
                state = self._start_stage(state)
        while not self.state.done and self.state.period < 0:  # a stage's baseline
            candidate = self.best if self.best is not None else params
            self.state, d = c.update(
                self.state, self.validator(candidate, c.valid_length(self.state)), step
            )
            rows.append(d.to_row())
            if d.is_best:
                self.best = candidate
        return state, rows

    def _start_stage(self, state: MetaTrainState) -> MetaTrainState:
        stage = self.state.stage
        self.trainer = self._trainer(stage)
        fresh = self.trainer.init(jax.random.fold_in(jax.random.PRNGKey(self.seed), stage))
        meta_params = state.meta_params
        if self.curriculum.restart_from_best:
            meta_params = _put_like(self.best, state.meta_params)
        estimator_state = fresh.estimator_state
        estimator = self.trainer.estimator
        if isinstance(estimator, imitation_lib.Imitation):  # r of this stage (Chen et al. 2020)
            estimator_state = imitation_lib.set_imitation_prob(estimator_state, estimator.prob_at(stage))
        return state._replace(meta_params=meta_params, estimator_state=estimator_state)

    def summary(self) -> dict:
        s = self.state
        return {
            "exported": "best",
            "best_valid_loss": s.best_loss if np.isfinite(s.best_loss) else None,
            "best_stage": s.best_stage,
            "best_step": s.best_step,
            "valid_length": self.curriculum.valid_length(s),
            "stage": s.stage,
            "stages": list(self.curriculum.stages),
            "stopped": s.done,
        }


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> dict[str, Any]:
    """Meta-train as ``config`` says, in ``workdir``; resume from its latest checkpoint if any.

    With an enabled ``config.curriculum`` section (``lopt.curriculum``, Chen et al. 2020,
    Algorithm 1) each stage trains at its own constant horizon (replacing ``unroll.horizon``),
    every ``period`` outer steps the meta-params are validated and the decision is logged in
    ``metrics.jsonl`` (rows with ``decision``), training ends at the curriculum's "stop" (or at
    ``num_outer_steps``), and the export holds the *best* validated meta-params, not the last.

    Returns a summary: final state, paths of the metrics, checkpoints, export and plot, and the
    measured meta-training throughput (inner steps per second, compile and validation excluded);
    with a curriculum also ``curriculum`` (where the best meta-params come from) and
    ``best_meta_params``.
    """
    mesh = distributed.particle_mesh(config.get("num_devices", 0))
    trainer = config_lib.build(config, mesh=mesh)  # fails on bad keys before anything compiles
    curriculum = config_lib.curriculum(config)
    run = _CurriculumRun(curriculum, trainer, int(config.seed)) if curriculum else None
    if run is not None:
        trainer = run.trainer
    primary = distributed.is_primary()
    progress = progress and primary
    os.makedirs(workdir, exist_ok=True)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))

    def save(step: int, state: MetaTrainState) -> None:
        if checkpointer.latest_step() == step:  # e.g. rerun on a finished workdir: same state
            return
        if run is None:
            checkpointer.save(step, state)
        else:
            checkpointer.save(step, run.pack(state), host=run.host())

    state = trainer.init(jax.random.PRNGKey(config.seed))
    start = checkpointer.latest_step()
    if start is not None:
        if run is None:
            state, _ = checkpointer.restore(start, state)
        else:
            restored, host = checkpointer.restore(start, run.pack(state))
            state = run.unpack(restored, host)
            trainer = run.trainer
        if primary:
            _truncate_metrics(metrics_path, start)
        logging.info("resumed from checkpoint at outer step %d", start)
    else:
        start = 0
        if primary and os.path.exists(metrics_path):
            os.remove(metrics_path)

    total = int(config.num_outer_steps)
    done_rows = _read_metrics(metrics_path)
    inner_total = next((r["inner_steps_total"] for r in reversed(done_rows) if "inner_steps_total" in r), 0)
    bar = tqdm(total=total, initial=start, desc="meta-train", disable=not progress, dynamic_ncols=True)
    t_first = None
    paused = 0.0  # seconds after t_first spent validating or recompiling (not meta-training)
    inner_timed = 0  # inner steps run after the first (compiling) outer step
    pending: list = []  # device scalars, summed at log time so the loop never blocks
    last_metrics: dict = {}
    step = start
    recompiled = False  # a new stage's trainer compiles its step on the next call
    validating = False  # inside curriculum_step: an interrupt there must not save a checkpoint

    def curriculum_step(state, log):
        """Validate and decide at ``step`` if due; returns the state to continue from."""
        nonlocal trainer, paused, recompiled, validating
        if run is None or not run.due(step):
            return state
        validating = True  # cleared by the caller once it holds the returned state
        t0 = time.perf_counter()
        stage = run.state.stage
        state, rows = run.validate(state, step)
        for r in rows:
            log.write(json.dumps(r) + "\n")
        log.flush()
        if run.state.stage != stage:
            trainer, recompiled = run.trainer, True
        if t_first is not None:
            paused += time.perf_counter() - t0
        bar.set_postfix(stage=run.state.stage, best_valid=f"{run.state.best_loss:.4g}")
        return state

    try:
        with open(metrics_path if primary else os.devnull, "a") as log:
            state = curriculum_step(state, log)  # stage 0's baseline (or one missed at an interrupt)
            validating = False
            while step < total and not (run is not None and run.done):
                t_step = time.perf_counter()
                state, metrics = trainer.step(state)
                step += 1
                pending.append(metrics["inner_steps"])
                if t_first is None:  # the first step compiles: time from its end on
                    jax.block_until_ready(state.meta_params)
                    t_first = time.perf_counter()
                    first_inner = int(pending[0])
                    recompiled = False
                elif recompiled:  # the first step of a new curriculum stage compiled too
                    jax.block_until_ready(state.meta_params)
                    paused += time.perf_counter() - t_step
                    first_inner += int(pending[-1])
                    recompiled = False
                boundary = run is not None and run.due(step)
                if step % config.log_every == 0 or step == total or boundary:
                    new_inner = int(sum(int(x) for x in jax.device_get(pending)))
                    pending = []
                    inner_total += new_inner
                    inner_timed += new_inner - first_inner
                    first_inner = 0
                    row = {"step": step, **_to_python(metrics), "inner_steps_total": inner_total}
                    now = time.perf_counter()
                    row["wall_time"] = now - t_first
                    busy = now - t_first - paused
                    row["inner_steps_per_sec"] = inner_timed / busy if inner_timed and busy > 0 else None
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    last_metrics = row
                    bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}")
                state = curriculum_step(state, log)
                validating = False
                bar.update(1)
                finished = run is not None and run.done
                if step % config.checkpoint_every == 0 and step < total and not finished:
                    save(step, state)
    except KeyboardInterrupt:
        bar.close()
        try:  # the state is donated to each step: if the interrupt hit mid-step it is gone
            if validating:  # the curriculum state and the train state may disagree
                raise RuntimeError("interrupted during a curriculum validation")
            save(int(state.outer_step), state)
            checkpointer.wait()
            logging.warning("interrupted at outer step %d; checkpoint saved, rerun to resume", step)
        except Exception:  # noqa: BLE001
            logging.warning("interrupted mid-step; rerun to resume from the last checkpoint")
        raise
    bar.close()
    save(step, state)
    checkpointer.wait()
    checkpointer.close()

    export_path = plot_path = None
    if primary:
        metadata = {
            "outer_step": step,
            "task": config.task.to_dict(),
            "estimator": config.estimator.to_dict(),
            "final_meta_loss": last_metrics.get("meta_loss"),
        }
        if run is not None:
            metadata["curriculum"] = run.summary()
        export_path = export_lib.save(
            os.path.join(workdir, "export", "optimizer.lopt"),
            trainer.learned_opt,
            run.best if run is not None else distributed.to_host(state.meta_params),
            metadata=metadata,
        )
        plot_path = plot_metrics(metrics_path, os.path.join(workdir, "plots", "meta_loss.png"))
    summary = {
        "state": state,
        "workdir": os.path.abspath(workdir),
        "metrics": metrics_path,
        "checkpoints": checkpointer.directory,
        "export": export_path,
        "plot": plot_path,
        "last_metrics": last_metrics,
        "inner_steps_per_sec": last_metrics.get("inner_steps_per_sec"),
    }
    if run is not None:
        summary["curriculum"] = run.summary()
        summary["best_meta_params"] = run.best
    return summary
