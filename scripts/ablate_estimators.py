"""Ablate the meta-gradient estimators: same experiment, same seeds, same inner-step budget.

    python scripts/ablate_estimators.py --config=configs/ablate_estimators.py \
        --workdir=runs/ablate_estimators

For every estimator of ``--estimators`` (default: all sections of the config file's
``get_ablation().estimators``) the script copies the base experiment (``get_config()``), puts
that estimator's section in ``config.estimator``, and sets ``num_outer_steps`` so that the run
takes ``--inner_steps`` inner steps (summed over particles). The cost of an outer step is
computed from the config: ``num_particles * trajectory length`` for ``full_es`` (the expected
length under the horizon schedule), ``num_particles * truncation length`` for the truncated
estimators (the exact per-step lengths when there is a truncation schedule). Each run is
``lopt.training.train`` in ``WORKDIR/<estimator>``, so rerunning resumes it from its checkpoint.

The exported optimizer is then evaluated on held-out task instances (keys
``PRNGKey(eval_seed_offset + i)``, i < --eval_seeds, the same for every estimator) for
--eval_steps steps; the mean final test loss is the held-out evaluation loss. Tuned Adam on the
same instances is a reference row (--adam_baseline).

Outputs in --workdir: ``table.md`` (also printed), ``results.json`` and ``meta_loss.png``
(meta-loss against cumulative inner steps, one line per estimator).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from lopt.experiments.estimators import (  # noqa: E402
    _DEFAULT_CONFIG,
    _load_ablation,
    format_table,
    outer_steps_for_budget,
    plot_meta_loss,
)
from lopt.experiments.harness import (  # noqa: E402
    FINAL_FRACTION,
    UsageError,
    final_mean,
    fmt,
    lo_curves,
    meta_train,
    pm,
    stats,
    task_of,
    write_ablation,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file with get_config() and get_ablation()."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablate_estimators", "Output directory.")
_INNER_STEPS = flags.DEFINE_integer(
    "inner_steps", None, "Inner-step budget per estimator (default: the config's ablation)."
)
_ESTIMATORS = flags.DEFINE_string(
    "estimators", None, "Comma-separated estimators to run (default: all in the config's ablation)."
)
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "Steps per held-out task instance.")
_EVAL_SEEDS = flags.DEFINE_integer("eval_seeds", None, "Number of held-out task instances.")
_SEED = flags.DEFINE_integer("seed", None, "Meta-training seed, shared by every estimator "
                             "(default: the config's seed).")
_ADAM = flags.DEFINE_bool("adam_baseline", True, "Add tuned Adam on the held-out instances.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per estimator.")

# --- the ablation ------------------------------------------------------------------------------


def _settings(ablation: ConfigDict) -> dict:
    names = [n for n in (ablation.get("order") or ()) if n in ablation.estimators]
    names += [n for n in ablation.estimators.keys() if n not in names]
    if _ESTIMATORS.value:
        chosen = [s.strip() for s in _ESTIMATORS.value.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in ablation.estimators]
        if unknown or not chosen:
            raise UsageError(f"--estimators: unknown {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(names)}")
        names = chosen
    inner = _INNER_STEPS.value if _INNER_STEPS.value is not None else int(ablation.inner_steps)
    steps = _EVAL_STEPS.value if _EVAL_STEPS.value is not None else int(ablation.eval_steps)
    seeds = _EVAL_SEEDS.value if _EVAL_SEEDS.value is not None else int(ablation.eval_seeds)
    for flag, v in (("inner_steps", inner), ("eval_steps", steps), ("eval_seeds", seeds)):
        if v < 1:
            raise UsageError(f"--{flag} must be >= 1, got {v}")
    offset = int(ablation.get("eval_seed_offset", 1_000_000))
    return dict(names=names, inner_steps=inner, eval_steps=steps, eval_seeds=seeds,
                eval_seed_offset=offset)


def run_estimator(base: ConfigDict, section: ConfigDict, name: str, s: dict, eval_keys: Any,
                  workdir: str, index: str) -> dict:
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
    record = meta_train(config, run_dir, _PROGRESS.value)
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


def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        ablation = _load_ablation(config_flags.get_config_filename(flags.FLAGS["config"]))
        s = _settings(ablation)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp

    from lopt.training import evaluation
    from tasks.registry import ConfigError

    base = _CONFIG.value
    if _SEED.value is not None:
        base.seed = _SEED.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    seeds = [s["eval_seed_offset"] + i for i in range(s["eval_seeds"])]
    eval_keys = jnp.stack([jax.random.PRNGKey(x) for x in seeds])
    print(f"ablating {', '.join(s['names'])}: {s['inner_steps']:,} inner steps each, seed "
          f"{base.seed}; held-out evaluation on {len(seeds)} instances x {s['eval_steps']} steps",
          flush=True)

    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    failed = False
    for i, name in enumerate(s["names"]):
        try:
            results[name] = run_estimator(base, ablation.estimators[name], name, s, eval_keys,
                                          workdir, f"{i + 1}/{len(s['names'])}")
        except ConfigError as e:
            print(f"config error ({name}): {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001  one estimator failing must not lose the others
            logging.exception("estimator %s failed", name)
            print(f"    {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[name] = {"estimator": ablation.estimators[name].to_dict(),
                             "error": f"{type(e).__name__}: {e}"}
            failed = True

    adam = None
    if _ADAM.value:
        task_opts = base.task.to_dict()
        import tasks

        task = tasks.get(task_opts.pop("name"), **task_opts)
        best_lr, per_lr = evaluation.tune_adam(task, eval_keys, s["eval_steps"])
        adam = {"best_lr": best_lr,
                **{k: stats(per_lr[best_lr].get(k))
                   for k in ("final_train_loss", "test_loss", "test_accuracy")}}

    table = format_table(results, adam)
    caption = (f"Estimator ablation: {s['inner_steps']:,} inner steps per estimator, held-out "
               f"evaluation on {len(seeds)} task instances x {s['eval_steps']} steps (eval loss: "
               "final test loss, mean ± std over instances).")
    plot_path = plot_meta_loss(results, os.path.join(workdir, "meta_loss.png"))
    total = time.perf_counter() - t_start
    out = {
        "base_config": json.loads(base.to_json_best_effort()),
        "inner_steps_budget": s["inner_steps"],
        "eval": {"steps": s["eval_steps"], "seeds": seeds},
        "final_fraction": FINAL_FRACTION,
        "estimators": results,
        "adam_reference": adam,
        "total_wall_s": total,
        "table": table,
    }
    write_ablation(workdir, caption, table, out, plot_path, total)
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
