"""Ablate the training techniques, in the shape of ELO's Table 1: tuned AdamW, the naive learned
optimizer, the learned optimizer with Chen et al.'s curriculum, and ELO, each evaluated at the
meta-training horizon H and at 10 H on held-out task instances.

    python scripts/ablate.py --out=runs/ablate

Methods (``--methods``, default all four; the table keeps this order):

* ``adamw``: AdamW (decoupled weight decay ``--weight_decay``) with its learning rate tuned over
  ``--lrs`` on separate tuning instances ``PRNGKey(--tune_seed_offset + i)``, separately at each
  evaluation length (the best rate by mean final training loss,
  ``lopt.training.evaluation.tune_adam``), then run at that rate on the evaluation instances:
  nothing is tuned on the instances the table reports.
* ``naive``: ``configs/naive.py``, the Metz et al. 2019 MLP optimizer meta-trained with PES
  (Vicol et al. 2021) on segments of N = ``trunc_length`` steps, every one a fresh trajectory
  (horizon H = N, no buffer, no behaviour cloning).
* ``curriculum``: the naive run with Chen et al. 2020's unroll-length curriculum (Algorithm 1,
  ``lopt.training.curriculum``) over the trajectory length: stages ``--cl_stages`` (default
  H/4, H/2, H), validated every ``--cl_period`` epochs at the next stage's length; training
  stops when a stage brings no improvement and the best validated meta-params are exported.
* ``elo``: ``configs/elo.py``, the same N-step segments started from ELO's replay buffer of
  optimizee states (chains through the buffer reach far past N) with online behaviour cloning
  of Adam (``estimators/resets.py``, ``lopt/wrappers.py``).

All three learned optimizers share the task family, learned optimizer, estimator, particles,
segment length N, meta-optimizer and outer-step budget (``configs/naive.py`` is derived from
``configs/elo.py``); ``--set key=value`` changes all three alike (e.g. ``--set
unroll.num_particles=4``), ``--outer_steps`` their budget. Every meta-training run is
``lopt.training.train`` in ``OUT/<method>/seed<k>`` (``--meta_seeds`` runs, config seeds 0, 1,
...), so rerunning resumes unfinished runs and reuses finished ones.

The evaluation trains instances ``PRNGKey(--seed_offset + i)``, i < ``--seeds`` (never seen in
meta-training; the curriculum validates on keys from 2,000,000 on), of the config's task for H
and 10 H steps, and reports test accuracy (test loss for tasks without accuracy, such as
language models) and the final training loss, mean ± std over instances x meta-training seeds.
Outputs in ``--out``: ``table.md`` (also printed), ``results.json`` (every number, per seed, the
command line) and ``curves.png`` (training loss over 10 H steps; the horizon marked).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from lopt.cli.common import parse_lrs  # noqa: E402
from lopt.experiments.elo import (  # noqa: E402
    LABELS,
    METHODS,
    _eval_summary,
    _task,
    apply_overrides,
    combine,
    curriculum_stages,
    evaluate_export,
    format_table,
    horizon_of,
    plot,
)
from lopt.experiments.harness import (  # noqa: E402
    UsageError,
    load_module,
    meta_train,
    pm,
    write_ablation,
)

# The checkout's configs/ when run from one (scripts/ablate.py, an editable install), else
# configs/ under the working directory.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIGS = os.path.join(_CHECKOUT, "configs") if os.path.isdir(os.path.join(_CHECKOUT, "configs")) else "configs"

#: AdamW learning rates tried by default: 7 log-spaced values from 1e-4 to 1e-1.
DEFAULT_LRS = "1e-4,3.16e-4,1e-3,3.16e-3,1e-2,3.16e-2,1e-1"

_OUT = flags.DEFINE_string("out", "runs/ablate", "Output directory (runs, table, results, plot).")
_METHODS = flags.DEFINE_string("methods", ",".join(METHODS), f"Comma-separated subset of {METHODS}.")
_NAIVE_CONFIG = flags.DEFINE_string(
    "naive_config", os.path.join(_CONFIGS, "naive.py"),
    "Config file of the naive learned optimizer (also the base of the curriculum run).")
_ELO_CONFIG = flags.DEFINE_string(
    "elo_config", os.path.join(_CONFIGS, "elo.py"), "Config file of the ELO run.")
_SET = flags.DEFINE_multi_string(
    "set", [], "key=value applied to every learned-optimizer config, e.g. "
    "--set unroll.num_particles=4 (value parsed as a Python literal, else a string).")
_OUTER_STEPS = flags.DEFINE_integer(
    "outer_steps", None, "Outer-step budget of every meta-training run (default: the configs').")
_META_SEEDS = flags.DEFINE_integer("meta_seeds", 1, "Meta-training runs per learned optimizer "
                                   "(config seeds 0 .. meta_seeds - 1).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Held-out task instances in the evaluation.")
_SEED_OFFSET = flags.DEFINE_integer("seed_offset", 1_000_000, "Instance i is PRNGKey(seed_offset + i).")
_TUNE_SEED_OFFSET = flags.DEFINE_integer(
    "tune_seed_offset", 3_000_000, "AdamW is tuned on instances PRNGKey(tune_seed_offset + i), "
    "i < --seeds, never on the evaluation instances.")
_FACTOR = flags.DEFINE_integer("factor", 10, "The long evaluation runs factor x H steps.")
_LRS = flags.DEFINE_string("lrs", DEFAULT_LRS, "AdamW learning rates to tune over.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4, "AdamW's decoupled weight decay.")
_CL_STAGES = flags.DEFINE_string("cl_stages", None, "Curriculum stages N_train, comma-separated "
                                 "(default: H/4, H/2, H).")
_CL_PERIOD = flags.DEFINE_integer("cl_period", None, "Curriculum T_period in epochs (one "
                                  "N_train-step trajectory per particle; with N_train <= N one "
                                  "outer step; default: an eighth of the outer-step budget).")
_CL_MIN_PERIODS = flags.DEFINE_integer("cl_min_periods", 2, "Curriculum N_period.")
_CL_MAX_PERIODS = flags.DEFINE_integer("cl_max_periods", 3, "Our cap on a stage's periods (not "
                                       "in Chen et al.'s Algorithm 1), so the three stages fit "
                                       "the budget.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per meta-training run.")


# --- settings ----------------------------------------------------------------------------------


def settings() -> dict:
    """Check every flag and build the three meta-training configs (no JAX yet)."""
    methods = [m.strip() for m in _METHODS.value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in methods]
    for name, v in (("seeds", _SEEDS.value), ("meta_seeds", _META_SEEDS.value),
                    ("factor", _FACTOR.value)):
        if v < 1:
            raise UsageError(f"--{name} must be >= 1, got {v}")
    if _OUTER_STEPS.value is not None and _OUTER_STEPS.value < 1:
        raise UsageError(f"--outer_steps must be >= 1, got {_OUTER_STEPS.value}")
    if abs(_TUNE_SEED_OFFSET.value - _SEED_OFFSET.value) < _SEEDS.value:
        raise UsageError("--seed_offset and --tune_seed_offset give overlapping instances; AdamW "
                         "must be tuned on instances the table does not report")
    if _WEIGHT_DECAY.value < 0:
        raise UsageError(f"--weight_decay must be >= 0, got {_WEIGHT_DECAY.value}")

    elo = apply_overrides(load_module(_ELO_CONFIG.value, "_ablate_elo").get_config(), _SET.value)
    naive = apply_overrides(load_module(_NAIVE_CONFIG.value, "_ablate_naive").get_config(), _SET.value)
    if not any(a.split("=")[0].strip() == "unroll.horizon.length" for a in _SET.value):
        naive.unroll.horizon.length = naive.unroll.trunc_length  # naive: H = N, whatever N is
    if _OUTER_STEPS.value is not None:
        elo.num_outer_steps = naive.num_outer_steps = _OUTER_STEPS.value
    horizon = horizon_of(naive)
    n = int(naive.unroll.trunc_length)
    if horizon != n or int(elo.unroll.trunc_length) != n or elo.task.to_dict() != naive.task.to_dict():
        raise UsageError(f"{_NAIVE_CONFIG.value} and {_ELO_CONFIG.value} must share the task and "
                         f"the segment length N (trunc_length), and the naive horizon must be N "
                         f"(got horizon {horizon}, N {n} and {elo.unroll.trunc_length}), or the "
                         "ablation compares different problems")

    cl = copy.deepcopy(naive)
    period = _CL_PERIOD.value if _CL_PERIOD.value is not None else max(1, int(cl.num_outer_steps) // 8)
    if period < 1 or _CL_MIN_PERIODS.value < 1 or _CL_MAX_PERIODS.value < _CL_MIN_PERIODS.value:
        raise UsageError("need --cl_period >= 1 and 1 <= --cl_min_periods <= --cl_max_periods")
    cl.curriculum = ConfigDict(dict(
        enabled=True,
        stages=curriculum_stages(_CL_STAGES.value, horizon),
        period=period,
        min_periods=_CL_MIN_PERIODS.value,
        max_periods=_CL_MAX_PERIODS.value,
        valid_seeds=8,
        valid_metric="final_train_loss",
        restart_from_best=True,
    ))
    return dict(
        methods=methods,
        configs={"naive": naive, "curriculum": cl, "elo": elo},
        horizon=horizon,
        long=horizon * _FACTOR.value,
        lrs=parse_lrs(_LRS.value) or parse_lrs(DEFAULT_LRS),
        seeds=[_SEED_OFFSET.value + i for i in range(_SEEDS.value)],
        tune_seeds=[_TUNE_SEED_OFFSET.value + i for i in range(_SEEDS.value)],
    )


# --- running -----------------------------------------------------------------------------------


def evaluate_adamw(task: Any, tune_keys: Any, keys: Any, lengths: tuple[int, int],
                   lrs: list[float]) -> dict:
    """AdamW tuned on ``tune_keys`` at each length, then run at its best rate on ``keys``."""
    import optax

    from lopt.training import evaluation

    out = {}
    wd = _WEIGHT_DECAY.value
    for n in lengths:
        best, per_lr = evaluation.tune_adam(task, tune_keys, n, lrs, weight_decay=wd)
        curves = evaluation.train_curves(task, optax.adamw(best, weight_decay=wd), keys, n)
        out[n] = {**_eval_summary(curves), "best_lr": best,
                  "sweep": {repr(lr): float(per_lr[lr]["final_train_loss"].mean()) for lr in lrs}}
    return out


# --- reporting ---------------------------------------------------------------------------------

def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        s = settings()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp

    from tasks.registry import ConfigError

    out = _OUT.value
    os.makedirs(out, exist_ok=True)
    H, long = s["horizon"], s["long"]
    lengths = (H, long)
    try:
        task = _task(s["configs"]["elo"])
    except (ValueError, TypeError) as e:
        print(f"error: bad task {s['configs']['elo'].task.to_dict()}: {e}", file=sys.stderr)
        return 2
    keys = jnp.stack([jax.random.PRNGKey(x) for x in s["seeds"]])
    tune_keys = jnp.stack([jax.random.PRNGKey(x) for x in s["tune_seeds"]])
    meta_seeds = list(range(_META_SEEDS.value))
    print(f"ablating {', '.join(s['methods'])} on {task.name}: meta-training horizon H={H}, "
          f"evaluation at {H} and {long} steps on {len(keys)} held-out instances, "
          f"meta-seeds {meta_seeds}", flush=True)

    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    failed = False
    for i, method in enumerate(s["methods"]):
        print(f"[{i + 1}/{len(s['methods'])}] {LABELS[method]}", flush=True)
        t0 = time.perf_counter()
        try:
            if method == "adamw":
                results[method] = {"eval": combine([evaluate_adamw(task, tune_keys, keys, lengths, s["lrs"])], lengths)}
            else:
                config = s["configs"][method]
                runs, evals = [], []
                for seed in meta_seeds:
                    c = copy.deepcopy(config)
                    c.seed = seed
                    runs.append(meta_train(c, os.path.join(out, method, f"seed{seed}"), _PROGRESS.value))
                    evals.append(evaluate_export(runs[-1]["export"], task, keys, lengths))
                results[method] = {"config": json.loads(config.to_json_best_effort()),
                                   "runs": runs, "eval": combine(evals, lengths)}
        except ConfigError as e:
            print(f"config error ({method}): {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001  one method failing must not lose the others
            logging.exception("method %s failed", method)
            print(f"    {method} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[method] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
            continue
        results[method]["wall_s"] = time.perf_counter() - t0
        e = results[method]["eval"]
        metric = "test_accuracy" if e[str(H)]["test_accuracy"] is not None else "test_loss"
        print(f"    {metric} {pm(e[str(H)][metric])} at {H} steps, {pm(e[str(long)][metric])} at "
              f"{long}; {results[method]['wall_s']:.0f} s", flush=True)

    table = format_table(results, H, long)
    total = time.perf_counter() - t_start
    caption = (
        f"Training-technique ablation on {task.name} (ELO Table 1 shape): meta-training horizon "
        f"H={H}; held-out instances PRNGKey({s['seeds'][0]}..{s['seeds'][-1]}) x meta-seeds "
        f"{meta_seeds}, mean ± std; AdamW weight decay {_WEIGHT_DECAY.value:g}, lr tuned per "
        f"length over {len(s['lrs'])} values on separate instances PRNGKey("
        f"{s['tune_seeds'][0]}..{s['tune_seeds'][-1]}). Wall time {total:.0f} s.\n"
        f"Command: {' '.join(['python', 'scripts/ablate.py', *sys.argv[1:]])}"
    )
    plot_path = plot(results, long, H, os.path.join(out, "curves.png"),
                     f"{task.name}: training loss on held-out instances ({long} steps)")
    for r in results.values():
        for row in r.get("eval", {}).values():
            row.pop("_curves", None)
    record = {
        "command": ["scripts/ablate.py", *sys.argv[1:]],
        "task": s["configs"]["elo"].task.to_dict(),
        "horizon": H,
        "long_horizon": long,
        "eval_seeds": s["seeds"],
        "adamw_tune_seeds": s["tune_seeds"],
        "meta_seeds": meta_seeds,
        "adamw": {"weight_decay": _WEIGHT_DECAY.value, "lrs": s["lrs"]},
        "methods": results,
        "total_wall_s": total,
        "table": table,
    }
    write_ablation(out, caption, table, record, plot_path, total)
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-ablate`` command."""
    from lopt.cli.common import run_app

    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
