"""The outer loop: ``MetaTrainer`` (one compiled outer step) and ``train`` (the host loop).

``MetaTrainer.step`` runs, inside a single ``jax.jit`` with the state donated: the estimator's
meta-gradient (task sampling, batch sampling and every particle's truncated unroll included),
a finiteness check, and the meta-optimizer update. A non-finite meta-gradient is never
applied: the meta-params and meta-optimizer state stay as they were and ``num_skipped`` counts
it. ``train`` adds logging (``metrics.jsonl``, a tqdm bar), orbax checkpoints, resumption and
the final export; see DESIGN.md for the workdir layout.
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
import optax
from tqdm.auto import tqdm

from estimators.base import Estimator
from estimators.schedules import Schedule
from estimators.unroll import MetaLoss, Unroller
from lopt import checkpoint as ckpt_lib
from lopt import config as config_lib
from lopt import export as export_lib
from lopt.base import LearnedOptimizer
from tasks.base import TaskFamily, bind_data, data_arrays


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
    mesh: Any = None

    def __post_init__(self):
        if self.horizon is None:
            raise ValueError("MetaTrainer needs a horizon schedule, e.g. schedules.constant(200)")
        if self.mesh is not None:
            raise NotImplementedError(
                "sharding the particle axis over a mesh is not implemented yet; pass mesh=None"
            )

    @functools.cached_property
    def unroller(self) -> Unroller:
        return Unroller(
            task_family=self.task_family,
            learned_opt=self.learned_opt,
            num_particles=self.num_particles,
            trunc_length=self.trunc_length,
            horizon=self.horizon,
            meta_loss=self.meta_loss,
            stagger=self.stagger,
            trunc_schedule=self.trunc_schedule,
        )

    def _bound_unroller(self, arrays: Any) -> Unroller:
        """The unroller whose task family reads the dataset passed into jit as ``arrays``."""
        if arrays is None:
            return self.unroller
        family = bind_data(self.task_family, arrays)
        return dataclasses.replace(self.unroller, task_family=family)

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

        return jax.jit(init)

    def step(self, state: MetaTrainState) -> tuple[MetaTrainState, dict]:
        """One outer step (compiled once; ``state`` is donated)."""
        return self._step_fn(state, data_arrays(self.task_family))

    @functools.cached_property
    def _step_fn(self):
        return jax.jit(self._step, donate_argnums=0)

    def _step(self, state: MetaTrainState, arrays: Any = None) -> tuple[MetaTrainState, dict]:
        key, k_grad = jax.random.split(state.key)
        grad, est_state, metrics = self.estimator.grad(
            self._bound_unroller(arrays), state.meta_params, state.estimator_state, k_grad
        )
        finite = _all_finite(grad)
        safe_grad = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad)
        updates, opt_state = self.meta_optimizer.update(
            safe_grad, state.meta_opt_state, state.meta_params
        )
        new_params = optax.apply_updates(state.meta_params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        num_skipped = state.num_skipped + (~finite).astype(jnp.int32)
        metrics = dict(metrics)
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
    for k, v in jax.device_get(metrics).items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = bool(v) if isinstance(v, bool) else (float(v) if isinstance(v, float) else v)
    return out


def plot_metrics(metrics_path: str, out_path: str) -> str | None:
    """Meta-loss against outer step (PNG); returns the path, or None if nothing was logged."""
    rows = _read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["meta_loss"] for r in rows], lw=1)
    ax.set_xlabel("outer step")
    ax.set_ylabel("meta-loss (normalised)")
    ax.set_title("meta-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> dict[str, Any]:
    """Meta-train as ``config`` says, in ``workdir``; resume from its latest checkpoint if any.

    Returns a summary: final state, paths of the metrics, checkpoints, export and plot, and the
    measured meta-training throughput (inner steps per second, compile excluded).
    """
    trainer = config_lib.build(config)  # fails on bad keys before anything compiles
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))

    state = trainer.init(jax.random.PRNGKey(config.seed))
    start = checkpointer.latest_step()
    if start is not None:
        state, _ = checkpointer.restore(start, state)
        _truncate_metrics(metrics_path, start)
        logging.info("resumed from checkpoint at outer step %d", start)
    else:
        start = 0
        if os.path.exists(metrics_path):
            os.remove(metrics_path)

    total = int(config.num_outer_steps)
    done_rows = _read_metrics(metrics_path)
    inner_total = done_rows[-1].get("inner_steps_total", 0) if done_rows else 0
    bar = tqdm(total=total, initial=start, desc="meta-train", disable=not progress, dynamic_ncols=True)
    t_first = None
    inner_timed = 0  # inner steps run after the first (compiling) outer step
    pending: list = []  # device scalars, summed at log time so the loop never blocks
    last_metrics: dict = {}
    step = start
    try:
        with open(metrics_path, "a") as log:
            while step < total:
                state, metrics = trainer.step(state)
                step += 1
                pending.append(metrics["inner_steps"])
                if t_first is None:  # the first step compiles: time from its end on
                    jax.block_until_ready(state.meta_params)
                    t_first = time.perf_counter()
                    first_inner = int(pending[0])
                if step % config.log_every == 0 or step == total:
                    new_inner = int(sum(int(x) for x in jax.device_get(pending)))
                    pending = []
                    inner_total += new_inner
                    inner_timed += new_inner - first_inner
                    first_inner = 0
                    row = {"step": step, **_to_python(metrics), "inner_steps_total": inner_total}
                    now = time.perf_counter()
                    row["wall_time"] = now - t_first
                    row["inner_steps_per_sec"] = inner_timed / (now - t_first) if inner_timed else None
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    last_metrics = row
                    bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}")
                bar.update(1)
                if step % config.checkpoint_every == 0 and step < total:
                    checkpointer.save(step, state)
    except KeyboardInterrupt:
        bar.close()
        try:  # the state is donated to each step: if the interrupt hit mid-step it is gone
            checkpointer.save(int(state.outer_step), state)
            checkpointer.wait()
            logging.warning("interrupted at outer step %d; checkpoint saved, rerun to resume", step)
        except Exception:  # noqa: BLE001
            logging.warning("interrupted mid-step; rerun to resume from the last checkpoint")
        raise
    bar.close()
    checkpointer.save(step, state)
    checkpointer.wait()
    checkpointer.close()

    export_path = export_lib.save(
        os.path.join(workdir, "export", "optimizer.lopt"),
        trainer.learned_opt,
        jax.device_get(state.meta_params),
        metadata={
            "outer_step": step,
            "task": config.task.to_dict(),
            "estimator": config.estimator.to_dict(),
            "final_meta_loss": last_metrics.get("meta_loss"),
        },
    )
    plot_path = plot_metrics(metrics_path, os.path.join(workdir, "plots", "meta_loss.png"))
    return {
        "state": state,
        "workdir": os.path.abspath(workdir),
        "metrics": metrics_path,
        "checkpoints": checkpointer.directory,
        "export": export_path,
        "plot": plot_path,
        "last_metrics": last_metrics,
        "inner_steps_per_sec": last_metrics.get("inner_steps_per_sec"),
    }
