"""ELO's Table 1 in shape: tuned AdamW, the naive learned optimizer, the learned optimizer with
Chen et al. 2020's curriculum, and ELO (Algorithm 1: a replay buffer of optimizee states and
online behaviour cloning), each evaluated at the meta-training horizon H and at 10 H on held-out
task instances. The claim: ELO generalises to 10 H where the naively trained optimizer degrades.

Methods (the table keeps this order):

* ``adamw``: AdamW (decoupled weight decay) with its learning rate tuned over ``lrs`` on
  instances ``PRNGKey(tune_seed_offset + i)``, separately at each evaluation length (the best
  mean final training loss, ``lopt.training.evaluation.tune_adam``), then run on the evaluation
  instances: nothing is tuned on the instances the table reports.
* ``naive``: the naive config (``configs/naive.py``), the per-parameter MLP optimizer (Metz et
  al. 2019's, with the config's layers and timescales) meta-trained with the config's estimator
  (the same as ELO's) on segments of N = ``trunc_length`` steps, each one a fresh trajectory of
  exactly N steps (horizon H = N, no stagger, no buffer, no behaviour cloning).
* ``curriculum``: the naive run with Chen et al. 2020's unroll-length curriculum (Algorithm 1,
  ``lopt.training.curriculum``) over the trajectory length: stages ``cl_stages`` (default H/4,
  H/2, H), validated every ``cl_period`` epochs at the next stage's length; training stops when
  a stage brings no improvement and the best validated meta-params are exported.
* ``elo``: the ELO config (``configs/elo.py``), the same N-step segments started from ELO's
  replay buffer (chains through it reach far past N) with online behaviour cloning of Adam.

The three learned optimizers share the task family, learned optimizer, estimator, particles,
segment length N, meta-optimizer and outer-step budget; ``overrides`` change all three alike.
Each meta-training run is :func:`harness.meta_train` in ``OUT/<method>/seed<k>``, so a rerun
resumes unfinished runs and reuses finished ones. :func:`ablate` runs the ablation (the
``lopt-ablate`` command is its command line); :func:`run` is the reproduction at a budget.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any

from lopt.experiments.harness import (
    COST_COLUMNS,
    EVAL_SEED_OFFSET,
    LRS,
    TUNE_SEED_OFFSET,
    UsageError,
    cost_cells,
    ensure_mnist,
    meta_train,
    override,
    pm,
    stats,
    table,
    task_of,
    to_json,
    write_ablation,
)
from lopt.experiments.inputs import load_config

#: Every method, in table order, and its row label.
LABELS = {"adamw": "AdamW (tuned lr)", "naive": "LO naive", "curriculum": "LO + curriculum",
          "elo": "ELO-LO (replay + BC)"}
METHODS = tuple(LABELS)
#: AdamW learning rates tried by default: 7 log-spaced values from 1e-4 to 1e-1.
DEFAULT_LRS = (1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1)


@dataclasses.dataclass(frozen=True)
class Options:
    """The ablation's inputs; ``lopt-ablate``'s flags of the same names (``overrides``: ``--set``)."""

    elo_config: str = "elo"  # a shipped config's name or a config file's path
    naive_config: str = "naive"
    methods: tuple[str, ...] = METHODS
    meta_seeds: int = 1
    seeds: int = 5
    factor: int = 10
    outer_steps: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    lrs: tuple[float, ...] = DEFAULT_LRS
    seed_offset: int = EVAL_SEED_OFFSET
    tune_seed_offset: int = TUNE_SEED_OFFSET
    weight_decay: float = 1e-4
    cl_stages: tuple[int, ...] | None = None
    cl_period: int | None = None
    cl_min_periods: int = 2
    cl_max_periods: int = 3
    modules: tuple[str, ...] = ()  # the user's modules (--module): every run's config lists them


#: Per budget, the ablation's options (``overrides`` as a dict); the report prints them as the
#: ``lopt-ablate`` flags that run the same.
BUDGETS: dict[str, dict] = {
    "smoke": dict(elo_config="elo", naive_config="naive", outer_steps=2,
                  seeds=2, factor=2, lrs=(1e-3, 1e-2), meta_seeds=1, cl_period=1, cl_max_periods=2,
                  overrides={"task.hidden_sizes": (4,), "task.batch_size": 8, "lopt.hidden_size": 4,
                             "lopt.hidden_layers": 1, "unroll.num_particles": 2,
                             "unroll.trunc_length": 4, "unroll.replay.capacity": 2,
                             "unroll.behaviour_cloning.schedule.steps": 2},
                  search_horizons=(2, 4)),
    # search_horizons: the naive optimizer's H grid for the horizon search (elo_reproduce.py);
    # the table, Fig. 2 left and right then run at the H it picks. 3,000 outer steps, not the
    # configs' 600: at 600 no H of 5-40 degraded at 10 H (docs/results/elo.md, "What was tried
    # before"), while a naive run meta-trained 5x longer did (its 10 H loss over tuned AdamW's
    # grew 1.29x -> 1.83x after outer step 750): degradation at 10 H is a product of
    # meta-training long at H, so the table has to be measured there (~50 min on 2 cores).
    "cpu": dict(elo_config="elo_mnist", naive_config="naive_mnist", outer_steps=3000,
                meta_seeds=3, seeds=16, factor=10, lrs=LRS, search_horizons=(10, 20)),
    "gpu": dict(elo_config="elo_mnist", naive_config="naive_mnist",
                meta_seeds=5, seeds=64, factor=10, outer_steps=3000,
                overrides={"unroll.num_particles": 32}, lrs=LRS),
}


#: Budget keys of the reproduction only (not ``lopt-ablate`` options).
REPRODUCTION_KEYS = ("search_horizons",)


def budget_options(b: dict) -> Options:
    b = {k: v for k, v in b.items() if k not in REPRODUCTION_KEYS}
    return Options(**{**b, "overrides": tuple(b.get("overrides", {}).items())})


def budget_flags(b: dict) -> list[str]:
    """The ``lopt-ablate`` flags that run budget ``b``."""
    out = []
    for key, value in b.items():
        if key in REPRODUCTION_KEYS:
            continue
        if key == "overrides":
            out += [f"--set={k}={v!r}" for k, v in value.items()]
        elif isinstance(value, (tuple, list)):
            out.append(f"--{key}=" + ",".join(map(str, value)))
        else:
            out.append(f"--{key}={value}")
    return out


# --- settings -----------------------------------------------------------------------------------


def horizon_of(config) -> int:
    """H: the meta-training trajectory length of a config with a constant horizon."""
    horizon = config.unroll.horizon
    if horizon.get("name") != "constant":
        raise UsageError(
            f"the ablation needs a constant meta-training horizon (unroll.horizon.name="
            f"'constant'), got {horizon.get('name')!r}"
        )
    return int(horizon.length)


def curriculum_stages(stages: tuple[int, ...] | None, horizon: int) -> tuple[int, ...]:
    """``stages``, or H/4, H/2, H: the last stage trains (and validates) at the horizon the
    other methods meta-train at."""
    stages = stages or tuple(sorted({max(1, horizon // 4), max(1, horizon // 2), horizon}))
    if min(stages) < 1 or any(b <= a for a, b in zip(stages, stages[1:])):
        raise UsageError(f"--cl_stages must be positive and increasing, got {stages}")
    return stages


def settings(o: Options) -> dict:
    """Check every option and build the three meta-training configs (no JAX yet)."""
    from ml_collections import ConfigDict

    unknown = [m for m in o.methods if m not in METHODS]
    if unknown or not o.methods:
        raise UsageError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)}")
    for name in ("seeds", "meta_seeds", "factor"):
        if getattr(o, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(o, name)}")
    if o.outer_steps is not None and o.outer_steps < 1:
        raise UsageError(f"--outer_steps must be >= 1, got {o.outer_steps}")
    if abs(o.tune_seed_offset - o.seed_offset) < o.seeds:
        raise UsageError("--seed_offset and --tune_seed_offset give overlapping instances; AdamW "
                         "must be tuned on instances the table does not report")
    if o.weight_decay < 0:
        raise UsageError(f"--weight_decay must be >= 0, got {o.weight_decay}")

    elo = override(load_config(o.elo_config, "--elo_config"), o.overrides)
    naive = override(load_config(o.naive_config, "--naive_config"), o.overrides)
    if "unroll.horizon.length" not in dict(o.overrides):
        naive.unroll.horizon.length = naive.unroll.trunc_length  # naive: H = N, whatever N is
    if o.modules:  # recorded in each run's config.json, so the runs resume and export alone
        from lopt.training.config import with_modules
        from tasks.user_code import merge

        elo, naive = (with_modules(c, merge(c.get("modules") or (), o.modules)) for c in (elo, naive))
    if o.outer_steps is not None:
        elo.num_outer_steps = naive.num_outer_steps = o.outer_steps
    for c in (elo, naive):  # the table evaluates each export at H and 10 H itself (below)
        if "eval" in c and "eval.enabled" not in dict(o.overrides):
            c.eval.enabled = False
    horizon = horizon_of(naive)
    n = int(naive.unroll.trunc_length)
    if horizon != n or int(elo.unroll.trunc_length) != n or elo.task.to_dict() != naive.task.to_dict():
        raise UsageError(f"{o.naive_config} and {o.elo_config} must share the task and the segment "
                         f"length N (trunc_length), and the naive horizon must be N (got horizon "
                         f"{horizon}, N {n} and {elo.unroll.trunc_length}), or the ablation "
                         "compares different problems")

    cl = copy.deepcopy(naive)
    period = o.cl_period if o.cl_period is not None else max(1, int(cl.num_outer_steps) // 8)
    if period < 1 or o.cl_min_periods < 1 or o.cl_max_periods < o.cl_min_periods:
        raise UsageError("need --cl_period >= 1 and 1 <= --cl_min_periods <= --cl_max_periods")
    cl.curriculum = ConfigDict(dict(
        enabled=True, stages=curriculum_stages(o.cl_stages, horizon), period=period,
        min_periods=o.cl_min_periods, max_periods=o.cl_max_periods, valid_seeds=8,
        valid_metric="final_train_loss", restart_from_best=True))
    return dict(
        options=o,
        methods=[m for m in METHODS if m in o.methods],
        configs={"naive": naive, "curriculum": cl, "elo": elo},
        horizon=horizon,
        long=horizon * o.factor,
        seeds=[o.seed_offset + i for i in range(o.seeds)],
        tune_seeds=[o.tune_seed_offset + i for i in range(o.seeds)],
    )


# --- evaluation ---------------------------------------------------------------------------------


def _curves_summary(curves: dict) -> dict:
    return {k: curves.get(k) for k in ("final_train_loss", "test_loss", "test_accuracy", "train_loss")}


def evaluate_export(export_path: str, task: Any, keys: Any, lengths: tuple[int, int]) -> dict:
    from lopt import export
    from lopt.training import evaluation

    learned_opt, meta_params = export.load(export_path)
    opt = learned_opt.optimizer(meta_params)
    return {n: _curves_summary(evaluation.train_curves(task, opt, keys, n)) for n in lengths}


def evaluate_adamw(task: Any, tune_keys: Any, keys: Any, lengths: tuple[int, int],
                   lrs: list[float], weight_decay: float) -> dict:
    """AdamW tuned on ``tune_keys`` at each length, then run at its best rate on ``keys``."""
    import optax

    from lopt.training import evaluation

    out = {}
    for n in lengths:
        best, per_lr = evaluation.tune_adam(task, tune_keys, n, lrs, weight_decay=weight_decay)
        curves = evaluation.train_curves(task, optax.adamw(best, weight_decay=weight_decay), keys, n)
        out[n] = {**_curves_summary(curves), "best_lr": best,
                  "sweep": {repr(lr): float(per_lr[lr]["final_train_loss"].mean()) for lr in lrs}}
    return out


def combine(evals: list[dict], lengths: tuple[int, int]) -> dict:
    """Per evaluation length, the statistics over instances x meta-seeds and the mean curve."""
    import numpy as np

    out = {}
    for n in lengths:
        parts = [e[n] for e in evals]
        row = {}
        for k in ("final_train_loss", "test_loss", "test_accuracy"):
            vals = [p[k] for p in parts if p.get(k) is not None]
            row[k] = stats(np.concatenate(vals)) if vals else None
        curves = np.concatenate([np.asarray(p["train_loss"], np.float64) for p in parts])
        with np.errstate(invalid="ignore"):
            row["train_loss_curve_mean"] = np.nanmean(curves, 0).tolist()
        row["_curves"] = curves  # every instance's curve, for the plot (not written to JSON)
        if "best_lr" in parts[0]:
            row["best_lr"] = parts[0]["best_lr"]
            row["lr_sweep"] = parts[0]["sweep"]
        out[str(n)] = row
    return out


def elo_table(results: dict[str, dict], horizon: int, long: int) -> str:
    """ELO Table 1's shape: test accuracy (or test loss) at H and at the long horizon, plus the
    final training losses and the meta-training cost."""
    first = next((r for r in results.values() if "eval" in r), None)
    accuracy = first is not None and first["eval"][str(horizon)]["test_accuracy"] is not None
    metric, spec = ("test_accuracy", ".3f") if accuracy else ("test_loss", ".4f")
    name = "test acc" if accuracy else "test loss"
    k = long // horizon
    header = ["method", f"{name} @ H={horizon}", f"{name} @ {k}H={long}", "train loss @ H",
              f"train loss @ {k}H", COST_COLUMNS[0], "meta-train s (after compile)"]
    rows = {}
    for method, r in results.items():
        label = LABELS.get(method, method)
        if r.get("error"):
            rows[label] = {header[1]: "failed (see results.json)"}
            continue
        e = r["eval"]
        if method == "adamw":
            label += f" lr={e[str(horizon)]['best_lr']:.3g}/{e[str(long)]['best_lr']:.3g}"
        rows[label] = {header[1]: pm(e[str(horizon)][metric], spec), header[2]: pm(e[str(long)][metric], spec),
                       header[3]: pm(e[str(horizon)]["final_train_loss"]),
                       header[4]: pm(e[str(long)]["final_train_loss"]),
                       **cost_cells(r.get("runs") or [], header[6])}
    return table(header, rows)


def plot(results: dict[str, dict], long: int, horizon: int, path: str, title: str) -> str:
    """Training loss over the long evaluation, mean ± std over instances x meta-seeds (each
    curve averaged over its last 10% of steps, see ``lopt.training.evaluation.plot_curves``)."""
    from lopt.training import evaluation

    curves = {LABELS.get(m, m): r["eval"][str(long)]["_curves"] for m, r in results.items() if "eval" in r}
    return evaluation.plot_curves(curves, path, title, vlines={f"H={horizon}": horizon}, log_x=True,
                                  smooth=0.1)


# --- the ablation -------------------------------------------------------------------------------


def ablate(s: dict, out: str, command: list[str], progress: bool = True) -> tuple[dict, list[str]]:
    """Run every method of ``settings`` ``s``; write ``table.md``, ``results.json`` and
    ``curves.png`` into ``out``. Returns the results record and the methods that failed (one
    failing does not lose the others). A config the registries reject is a ConfigError."""
    import jax
    import jax.numpy as jnp
    from absl import logging

    from tasks.registry import ConfigError

    o = s["options"]
    ensure_mnist(s["configs"]["elo"])  # the configs share their task (settings checks)
    os.makedirs(out, exist_ok=True)
    H, long = s["horizon"], s["long"]
    lengths = (H, long)
    try:
        task = task_of(s["configs"]["elo"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad task {s['configs']['elo'].task.to_dict()}: {e}") from None
    keys = jnp.stack([jax.random.PRNGKey(x) for x in s["seeds"]])
    tune_keys = jnp.stack([jax.random.PRNGKey(x) for x in s["tune_seeds"]])
    meta_seeds = list(range(o.meta_seeds))
    print(f"ablating {', '.join(s['methods'])} on {task.name}: meta-training horizon H={H}, "
          f"evaluation at {H} and {long} steps on {len(keys)} held-out instances, "
          f"meta-seeds {meta_seeds}", flush=True)

    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    failed = []
    for i, method in enumerate(s["methods"]):
        print(f"[{i + 1}/{len(s['methods'])}] {LABELS[method]}", flush=True)
        t0 = time.perf_counter()
        try:
            if method == "adamw":
                evals = [evaluate_adamw(task, tune_keys, keys, lengths, list(o.lrs), o.weight_decay)]
                results[method] = {"eval": combine(evals, lengths)}
            else:
                config = s["configs"][method]
                runs, evals = [], []
                for seed in meta_seeds:
                    c = copy.deepcopy(config)
                    c.seed = seed
                    runs.append(meta_train(c, os.path.join(out, method, f"seed{seed}"), progress))
                    evals.append(evaluate_export(runs[-1]["export"], task, keys, lengths))
                results[method] = {"config": json.loads(config.to_json_best_effort()),
                                   "runs": runs, "eval": combine(evals, lengths)}
        except ConfigError as e:
            raise ConfigError(f"({method}): {e}") from None
        except Exception as e:  # noqa: BLE001  one method failing must not lose the others
            logging.exception("method %s failed", method)
            print(f"    {method} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[method] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(method)
            continue
        results[method]["wall_s"] = time.perf_counter() - t0
        e = results[method]["eval"]
        metric = "test_accuracy" if e[str(H)]["test_accuracy"] is not None else "test_loss"
        print(f"    {metric} {pm(e[str(H)][metric])} at {H} steps, {pm(e[str(long)][metric])} at "
              f"{long}; {results[method]['wall_s']:.0f} s", flush=True)

    results_md = elo_table(results, H, long)
    total = time.perf_counter() - t_start
    caption = (
        f"Training-technique ablation on {task.name} (ELO Table 1 shape): meta-training horizon "
        f"H={H}; held-out instances PRNGKey({s['seeds'][0]}..{s['seeds'][-1]}) x meta-seeds "
        f"{meta_seeds}, mean ± std; AdamW weight decay {o.weight_decay:g}, lr tuned per "
        f"length over {len(o.lrs)} values on separate instances PRNGKey("
        f"{s['tune_seeds'][0]}..{s['tune_seeds'][-1]}). Wall time {total:.0f} s.\n"
        f"Command: {' '.join(['python', *command])}"
    )
    plot_path = plot(results, long, H, os.path.join(out, "curves.png"),
                     f"{task.name}: training loss on held-out instances ({long} steps)")
    for r in results.values():
        for row in r.get("eval", {}).values():
            row.pop("_curves", None)
    record = {
        "command": command, "task": to_json(s["configs"]["elo"].task.to_dict()), "horizon": H,
        "long_horizon": long, "eval_seeds": s["seeds"], "adamw_tune_seeds": s["tune_seeds"],
        "meta_seeds": meta_seeds, "adamw": {"weight_decay": o.weight_decay, "lrs": list(o.lrs)},
        "methods": results, "total_wall_s": total, "table": results_md,
    }
    write_ablation(out, caption, results_md, record, plot_path, total)
    return record, failed

