"""The estimator ablation: one experiment, every meta-gradient estimator (TBPTT, ES, PES, merged,
FullES), the same inner-step budget each, evaluated on the same held-out task instances.

The experiment is a config file with ``get_config()`` (an ordinary experiment config) and
``get_ablation()`` (the estimators' sections, the inner-step budget and the held-out
evaluation: this ablation's budget, ``configs/ablate_estimators.py``). For each estimator the
base config is copied, that estimator's section put in ``config.estimator`` and
``num_outer_steps`` set so that the run takes the budget's inner steps (summed over particles):
an outer step of ``full_es`` costs ``num_particles`` x the trajectory length (the expected
length under the horizon schedule), of the truncated estimators ``num_particles`` x the
truncation length (the exact per-step lengths under a truncation schedule). Each run is
:func:`harness.meta_train` in ``WORKDIR/<estimator>``; its export is evaluated on instances
``PRNGKey(eval_seed_offset + i)``, the mean final test loss being the held-out evaluation loss.
Tuned Adam on the same instances is a reference row. ``scripts/ablate_estimators.py`` is its
command line.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any

from lopt.experiments.harness import (
    FINAL_FRACTION,
    UsageError,
    final_mean,
    fmt,
    lo_curves,
    meta_train,
    pm,
    stats,
    table,
    task_of,
    trailing,
    write_ablation,
)
from lopt.experiments.inputs import config_path, load_module

#: The shipped config of the ablation (``configs/ablate_estimators.py``).
DEFAULT_CONFIG = "ablate_estimators"


# --- the inner-step budget ----------------------------------------------------------------------


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


def outer_steps_for_budget(config, inner_steps: int) -> tuple[int, float]:
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


def load_ablation(config: str):
    """``get_ablation()`` of the config file (a path or a shipped config's name, optionally
    with ml_collections' ``:argument``), or of the default config if it has none."""
    path = config_path(config.split(":", 1)[0])
    for candidate in (path, config_path(DEFAULT_CONFIG)):
        module = load_module(candidate, "_ablation_config")
        if hasattr(module, "get_ablation"):
            return module.get_ablation()
    raise UsageError(f"{path} has no get_ablation() and neither has {config_path(DEFAULT_CONFIG)}")


def settings(ablation, estimators: str | None = None, inner_steps: int | None = None,
             eval_steps: int | None = None, eval_seeds: int | None = None) -> dict:
    """The estimators to run (the ablation's order) and the budget: the ablation's, where an
    argument (a flag of the command) does not replace it."""
    names = [n for n in (ablation.get("order") or ()) if n in ablation.estimators]
    names += [n for n in ablation.estimators.keys() if n not in names]
    if estimators:
        chosen = [s.strip() for s in estimators.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in ablation.estimators]
        if unknown or not chosen:
            raise UsageError(f"--estimators: unknown {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(names)}")
        names = chosen
    inner = inner_steps if inner_steps is not None else int(ablation.inner_steps)
    steps = eval_steps if eval_steps is not None else int(ablation.eval_steps)
    seeds = eval_seeds if eval_seeds is not None else int(ablation.eval_seeds)
    for flag, v in (("inner_steps", inner), ("eval_steps", steps), ("eval_seeds", seeds)):
        if v < 1:
            raise UsageError(f"--{flag} must be >= 1, got {v}")
    offset = int(ablation.get("eval_seed_offset", 1_000_000))
    return dict(names=names, inner_steps=inner, eval_steps=steps, eval_seeds=seeds,
                eval_seed_offset=offset)


# --- the ablation -------------------------------------------------------------------------------


def run_estimator(base, section, name: str, s: dict, eval_keys: Any, workdir: str, index: str,
                  progress: bool = True) -> dict:
    """Meta-train with one estimator on the shared budget, then evaluate its export."""
    import numpy as np

    from lopt.training import loop

    config = copy.deepcopy(base)
    config.estimator = copy.deepcopy(section)
    num_outer, per_step = outer_steps_for_budget(config, s["inner_steps"])
    config.num_outer_steps = num_outer
    run_dir = os.path.join(workdir, name)
    print(f"[{index}] {name}: {num_outer} outer steps x {per_step:,.0f} inner steps "
          f"(budget {s['inner_steps']:,}) -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    record = meta_train(config, run_dir, progress)
    if record["reused"]:
        print(f"    already trained: reusing {record['export']}", flush=True)
    train_wall = time.perf_counter() - t0

    rows = loop.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    t1 = time.perf_counter()
    curves = lo_curves(record["export"], task_of(config), eval_keys, s["eval_steps"])
    eval_wall = time.perf_counter() - t1
    result = {
        "estimator": section.to_dict(),
        **{k: record[k] for k in ("workdir", "export", "outer_steps", "inner_steps")},
        "inner_steps_per_outer_step": per_step,
        "final_meta_loss": record["final_meta_loss"],
        "final_inner_loss": final_mean(rows, "inner_loss"),
        "inner_steps_per_sec": record["inner_steps_per_sec"],
        "skipped_outer_steps": rows[-1].get("num_skipped") if rows else None,
        "train_wall_s": train_wall,
        "eval_wall_s": eval_wall,
        "eval": {k: stats(curves.get(k)) for k in ("final_train_loss", "test_loss", "test_accuracy")},
        "eval_train_loss_curve_mean": np.nanmean(np.asarray(curves["train_loss"], np.float64), 0).tolist(),
        "curve": {
            "step": [r["step"] for r in rows],
            "inner_steps": [r.get("inner_steps_total") for r in rows],
            "meta_loss": [r.get("meta_loss") for r in rows],
        },
    }
    if any("es_share" in r for r in rows):
        result["final_es_share"] = final_mean(rows, "es_share")
    print(f"    meta-loss {fmt(result['final_meta_loss'])}, held-out test loss "
          f"{pm(result['eval']['test_loss'])}, {fmt(result['inner_steps_per_sec'], ',.0f')} "
          f"inner steps/s, {train_wall:.0f} s training + {eval_wall:.0f} s evaluation", flush=True)
    return result


def ablate(base, ablation, s: dict, workdir: str, adam_baseline: bool = True,
           progress: bool = True) -> tuple[dict, list[str]]:
    """Every estimator of ``s`` on ``base`` (seed included); ``table.md``, ``results.json`` and
    ``meta_loss.png`` in ``workdir``. Returns the results record and the estimators that failed
    (one failing does not lose the others). A config the registries reject is a ConfigError."""
    import jax
    import jax.numpy as jnp
    from absl import logging

    from lopt.training import evaluation
    from tasks.registry import ConfigError

    os.makedirs(workdir, exist_ok=True)
    seeds = [s["eval_seed_offset"] + i for i in range(s["eval_seeds"])]
    eval_keys = jnp.stack([jax.random.PRNGKey(x) for x in seeds])
    print(f"ablating {', '.join(s['names'])}: {s['inner_steps']:,} inner steps each, seed "
          f"{base.seed}; held-out evaluation on {len(seeds)} instances x {s['eval_steps']} steps",
          flush=True)

    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    failed = []
    for i, name in enumerate(s["names"]):
        try:
            results[name] = run_estimator(base, ablation.estimators[name], name, s, eval_keys,
                                          workdir, f"{i + 1}/{len(s['names'])}", progress)
        except ConfigError as e:
            raise ConfigError(f"({name}): {e}") from None
        except Exception as e:  # noqa: BLE001  one estimator failing must not lose the others
            logging.exception("estimator %s failed", name)
            print(f"    {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[name] = {"estimator": ablation.estimators[name].to_dict(),
                             "error": f"{type(e).__name__}: {e}"}
            failed.append(name)

    adam = None
    if adam_baseline:
        best_lr, per_lr = evaluation.tune_adam(task_of(base), eval_keys, s["eval_steps"])
        adam = {"best_lr": best_lr,
                **{k: stats(per_lr[best_lr].get(k)) for k in ("final_train_loss", "test_loss", "test_accuracy")}}

    results_md = estimator_table(results, adam)
    caption = (f"Estimator ablation: {s['inner_steps']:,} inner steps per estimator, held-out "
               f"evaluation on {len(seeds)} task instances x {s['eval_steps']} steps (eval loss: "
               "final test loss, mean ± std over instances).")
    plot_path = plot_meta_loss(results, os.path.join(workdir, "meta_loss.png"))
    total = time.perf_counter() - t_start
    record = {
        "base_config": json.loads(base.to_json_best_effort()),
        "inner_steps_budget": s["inner_steps"],
        "eval": {"steps": s["eval_steps"], "seeds": seeds},
        "final_fraction": FINAL_FRACTION,
        "estimators": results,
        "adam_reference": adam,
        "total_wall_s": total,
        "table": results_md,
    }
    write_ablation(workdir, caption, results_md, record, plot_path, total)
    return record, failed


# --- reporting ----------------------------------------------------------------------------------


def estimator_table(results: dict[str, dict], adam: dict | None = None) -> str:
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
        if len(y) >= 40:  # a window of at least 2
            ax.plot(*trailing(x, y), lw=1.8, color=ln.get_color(), label=name)
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
