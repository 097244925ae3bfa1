"""The estimator ablation: one experiment, every meta-gradient estimator, the same inner-step
budget, evaluated on the same held-out instances (``scripts/ablate_estimators.py``)."""

from __future__ import annotations

import os
from typing import Any

from ml_collections import ConfigDict

from lopt.experiments.harness import UsageError, fmt, load_module, pm, table

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "ablate_estimators.py")


def _mean_length(schedule: Any, num_outer_steps: int, samples: int = 64) -> float:
    """Expected length drawn from ``schedule`` over outer steps ``[0, num_outer_steps)``.

    Exact for a constant schedule; otherwise a Monte-Carlo mean over ``samples`` keys at 32
    outer steps spread over the run (the schedules are cheap pure functions)."""
    from estimators import schedules

    if isinstance(schedule, schedules.Constant):
        return float(schedule.length)
    import jax
    import jax.numpy as jnp
    import numpy as np

    steps = jnp.asarray(np.linspace(0, max(num_outer_steps - 1, 0), 32).round(), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), samples)
    draw = jax.vmap(jax.vmap(lambda k, s: schedule(k, s), (0, None)), (None, 0))
    lengths = jnp.clip(draw(keys, steps), 1, schedule.max_length)
    return float(jnp.mean(lengths.astype(jnp.float32)))


def outer_steps_for_budget(config: ConfigDict, inner_steps: int) -> tuple[int, float]:
    """``(num_outer_steps, inner steps per outer step)`` for a budget of ``inner_steps``.

    ``full_es`` runs every particle through one whole trajectory per outer step; the other
    estimators run every particle through one truncation. The number of outer steps is the one
    whose total is nearest the budget (at least 1)."""
    from lopt.training import config as config_lib

    trainer = config_lib.build(config)
    particles = trainer.unroller.num_particles
    if config.estimator.name == "full_es":
        n = max(1, round(inner_steps / (particles * trainer.horizon.max_length)))
        for _ in range(5):  # the mean of a growing schedule depends on the run's length
            per_step = particles * _mean_length(trainer.horizon, n)
            n = max(1, round(inner_steps / per_step))
        return n, per_step
    unroller = trainer.unroller
    if unroller.trunc_schedule is None:
        per_step = float(particles * unroller.trunc_length)
        return max(1, round(inner_steps / per_step)), per_step
    import jax
    import jax.numpy as jnp
    import numpy as np

    # Truncation lengths are drawn from the run's key stream: budget with their expectation
    # (the mean of 64 draws per outer step).
    most = inner_steps // particles + 1
    steps = jnp.arange(most, dtype=jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(12345), 64)
    draws = jax.vmap(lambda k: jax.vmap(unroller.truncation_length, in_axes=(None, 0))(k, steps))(keys)
    lengths = np.asarray(draws, np.float64).mean(0)
    totals = particles * np.cumsum(lengths)
    n = int(np.argmin(np.abs(totals - inner_steps))) + 1
    return n, float(totals[n - 1] / n)


def format_table(results: dict[str, dict], adam: dict | None = None) -> str:
    """A markdown table, one row per estimator (and tuned Adam as a reference row)."""
    header = ["estimator", "outer steps", "inner steps", "final meta-loss",
              "held-out eval loss", "held-out test acc", "inner steps/s"]
    rows = {}
    for name, r in results.items():
        if r.get("error"):
            rows[name] = {"final meta-loss": "failed (error in results.json)"}
            continue
        rows[name] = dict(zip(header[1:], [
            str(r["outer_steps"]), f"{r['inner_steps']:,}", fmt(r["final_meta_loss"]),
            pm(r["eval"]["test_loss"]), pm(r["eval"]["test_accuracy"], ".3f"),
            fmt(r["inner_steps_per_sec"], ",.0f")]))
    if adam is not None:
        rows[f"adam (lr={adam['best_lr']:.3g}, reference)"] = {
            "held-out eval loss": pm(adam["test_loss"]), "held-out test acc": pm(adam["test_accuracy"], ".3f")}
    return table(header, rows)


def plot_meta_loss(results: dict[str, dict], path: str) -> str:
    """Meta-loss against cumulative inner steps, one line per estimator (raw rows faint, a
    moving average over ~5% of the rows solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        curve = r.get("curve")
        if not curve or not curve["inner_steps"]:
            continue
        x = np.asarray(curve["inner_steps"], np.float64)
        y = np.asarray([np.nan if v is None else v for v in curve["meta_loss"]], np.float64)
        (ln,) = ax.plot(x, y, lw=0.8, alpha=0.3)
        w = max(1, len(y) // 20)
        if w > 1:
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], smooth, lw=1.8, color=ln.get_color(), label=name)
        else:
            ln.set_alpha(1.0)
            ln.set_linewidth(1.8)
            ln.set_label(name)
    ax.set_xlabel("inner steps (cumulative, all particles)")
    ax.set_ylabel("meta-loss (normalised)")
    ax.set_title("meta-training with each gradient estimator")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load_ablation(config_flag: str) -> ConfigDict:
    """``get_ablation()`` of the --config file, or of the default file if it has none."""
    path = config_flag.split(":", 1)[0]
    for candidate in (path, _DEFAULT_CONFIG):
        if not os.path.isfile(candidate):
            continue
        module = load_module(candidate, "_ablation_config")
        if hasattr(module, "get_ablation"):
            return module.get_ablation()
    raise UsageError(f"{path} has no get_ablation() and neither has {_DEFAULT_CONFIG}")
