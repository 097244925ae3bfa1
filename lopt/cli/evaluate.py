"""Evaluate an exported learned optimizer against learning-rate-tuned Adam.

    python scripts/evaluate.py --export=runs/quickstart/export/optimizer.safetensors \
        --task=digits_mlp --task_kwargs='{"permute_classes": true}' --steps=200 --seeds=5 \
        --out=runs/quickstart/eval

Task instances come from the keys ``jax.random.PRNGKey(seed_offset + i)``, i < seeds; the default
offset (1,000,000) keeps them apart from the instances meta-training saw. Adam's learning rate
is tuned (every rate of --lrs, best by mean final train loss) on as many separate instances,
``PRNGKey(tune_seed_offset + i)``, then Adam runs at that rate on the evaluation instances
beside the learned optimizer: nothing reported was tuned on the instances it is reported on.
Prints a table and writes results.json (all numbers, the best learning rate, the flags) and
curves.png into --out.

A task or learned optimizer of your own is found by importing its module: ``--module``
(repeatable); the modules the export's training run recorded are imported without it.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import flags, logging  # noqa: E402

from lopt.cli.common import UsageError, parse_lrs  # noqa: E402

_EXPORT = flags.DEFINE_string("export", None,
                              "Path of the exported learned optimizer (.safetensors).")
_TASK = flags.DEFINE_string("task", "digits_mlp", "Task family name (tasks registry).")
_TASK_KWARGS = flags.DEFINE_string("task_kwargs", "{}", "JSON dict of task family options.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per task instance.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Number of task instances (seeds).")
_SEED_OFFSET = flags.DEFINE_integer(
    "seed_offset", 1_000_000, "Instance i uses PRNGKey(seed_offset + i); keep it apart from "
    "meta-training's seeds."
)
_TUNE_SEED_OFFSET = flags.DEFINE_integer(
    "tune_seed_offset", 3_000_000, "Adam is tuned on instances PRNGKey(tune_seed_offset + i), "
    "never on the evaluation instances.")
_LRS = flags.DEFINE_string(
    "lrs", None, "Comma-separated Adam learning rates to tune over (default: 7 log-spaced values "
    "from 1e-4 to 1e-1)."
)
_OUT = flags.DEFINE_string("out", "runs/eval", "Output directory for results.json, curves.png and "
                           "tensorboard/.")
_HORIZON = flags.DEFINE_integer("horizon", None, "Meta-training horizon to mark on the plot "
                                "(default: the export's own, when it records one).")
flags.mark_flag_as_required("export")


def _parse_task_kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--task_kwargs is not valid JSON ({e}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--task_kwargs must be a JSON object, got {text!r}")
    return kwargs


def _summary(r: dict) -> dict:
    import numpy as np

    out = {}
    for k in ("final_train_loss", "test_loss", "test_accuracy"):
        if r.get(k) is None:
            out[k] = None
            continue
        v = np.asarray(r[k], np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # diverged seeds: inf/nan
            mean, std = float(np.mean(v)), float(np.std(v))
        out[k] = {"mean": mean, "std": std, "per_seed": v.tolist()}
    with np.errstate(invalid="ignore", over="ignore"):
        out["train_loss_curve_mean"] = np.mean(np.asarray(r["train_loss"], np.float64), 0).tolist()
    out["train_loss"] = np.asarray(r["train_loss"]).tolist()
    return out


def _setup():
    """Validate the flags and build (task, learned optimizer, meta-params, lrs, keys).

    The checks that need no JAX come first, so simple mistakes are reported at once.
    """
    if _STEPS.value < 1:
        raise UsageError(f"--steps must be >= 1, got {_STEPS.value}")
    if _SEEDS.value < 1:
        raise UsageError(f"--seeds must be >= 1, got {_SEEDS.value}")
    if abs(_TUNE_SEED_OFFSET.value - _SEED_OFFSET.value) < _SEEDS.value:
        raise UsageError("--seed_offset and --tune_seed_offset give overlapping instances; Adam "
                         "must be tuned on instances the table does not report")
    if _SEED_OFFSET.value < 0 or _SEED_OFFSET.value + _SEEDS.value > 2**32:
        raise UsageError(f"--seed_offset must lie in [0, 2**32 - seeds), got {_SEED_OFFSET.value}")
    task_kwargs = _parse_task_kwargs(_TASK_KWARGS.value)
    lrs = parse_lrs(_LRS.value)
    path = _EXPORT.value
    if not os.path.isfile(path):
        raise UsageError(f"export file not found: {path}")

    import jax

    import tasks
    from lopt import export
    from lopt.cli.common import import_user_modules
    from lopt.training import evaluation
    from tasks.base import data_arrays
    from tasks.registry import ConfigError

    try:  # --module, then the modules the export's training run recorded
        import_user_modules()
        recorded = export.read_metadata(path).get("metadata", {}).get("modules") or ()
        import_user_modules(recorded)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except (export.ExportError, OSError) as e:
        raise UsageError(f"cannot load export {path}: {e}") from None

    if lrs is None:
        lrs = list(evaluation.DEFAULT_LRS)
    try:
        task = tasks.get(_TASK.value, **task_kwargs)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise UsageError(f"bad task {_TASK.value!r} {json.dumps(task_kwargs)}: {e}") from None
    try:
        learned_opt, meta_params = export.load(path)
    except (export.ExportError, OSError) as e:
        raise UsageError(f"cannot load export {path}: {e}") from None
    try:  # load a data-backed task's dataset now: a missing one is a usage error
        data_arrays(task)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load the data of task {_TASK.value!r}: {e}") from None
    from lopt.contract import check_learned_optimizer
    from tasks.contract import ContractError, check_task_family, example_params

    try:  # a user's task or optimizer that breaks its contract: one line, before compiling
        check_task_family(task)
        check_learned_optimizer(learned_opt, example_params(task))
    except ContractError as e:
        raise UsageError(str(e)) from None
    seeds = [_SEED_OFFSET.value + i for i in range(_SEEDS.value)]
    keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])
    return task, learned_opt, meta_params, lrs, keys


def main(argv) -> int:
    if not flags.FLAGS["verbosity"].present:  # keep JAX/tfds info logs off the report
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    try:
        task, learned_opt, meta_params, lrs, keys = _setup()
    except UsageError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    from lopt.base import build_optimizer
    from lopt.training import evaluation

    steps = _STEPS.value
    lopt_name = f"learned ({learned_opt.name})"
    print(f"evaluating {lopt_name} vs adam on {_SEEDS.value} instances of {task.name}, "
          f"{steps} steps each", flush=True)
    learned = evaluation.train_curves(task, build_optimizer(learned_opt, meta_params, steps), keys, steps)
    import jax
    import jax.numpy as jnp
    import optax

    tune_keys = jnp.stack([jax.random.PRNGKey(_TUNE_SEED_OFFSET.value + i) for i in range(_SEEDS.value)])
    best_lr, per_lr = evaluation.tune_adam(task, tune_keys, steps, lrs)
    adam_name = f"adam (lr={best_lr:.3g})"
    adam = evaluation.train_curves(task, optax.adam(best_lr), keys, steps)
    rows = {lopt_name: learned, adam_name: adam}

    print(evaluation.format_table(rows))
    print("adam learning-rate sweep (mean final train loss on the tuning instances): " + ", ".join(
        f"{lr:.3g}: {float(per_lr[lr]['final_train_loss'].mean()):.4g}" for lr in lrs
    ))

    out_dir = _OUT.value
    os.makedirs(out_dir, exist_ok=True)
    results = {
        "task": task.name,
        "steps": steps,
        "seeds": [_SEED_OFFSET.value + i for i in range(_SEEDS.value)],
        "best_lr": best_lr,
        "learned_optimizer": {"name": learned_opt.name, **_summary(learned)},
        "adam": {"best_lr": best_lr, **_summary(adam)},
        "adam_tune_seeds": [_TUNE_SEED_OFFSET.value + i for i in range(_SEEDS.value)],
        "adam_sweep": {repr(lr): _summary(per_lr[lr]) for lr in lrs},
        "flags": {
            "export": _EXPORT.value,
            "task": _TASK.value,
            "task_kwargs": _parse_task_kwargs(_TASK_KWARGS.value),
            "steps": steps,
            "seeds": _SEEDS.value,
            "seed_offset": _SEED_OFFSET.value,
            "lrs": lrs,
            "out": out_dir,
        },
        "table": evaluation.format_table(rows),
    }
    results_path = os.path.join(out_dir, "results.json")
    text = json.dumps(results, indent=1)
    # Put each innermost list of numbers (the curves, per-seed values) on one line.
    text = re.sub(
        r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text
    )
    with open(results_path, "w") as f:
        f.write(text + "\n")
    plot_path = evaluation.plot_evaluation(
        rows,
        os.path.join(out_dir, "curves.png"),
        f"{task.name}: {_SEEDS.value} unseen instances",
        horizon=_HORIZON.value or _export_horizon(_EXPORT.value),
    )
    _write_tensorboard(os.path.join(out_dir, "tensorboard"), rows, steps)
    print(f"  results: {results_path}")
    print(f"  plot:    {plot_path}")
    print(f"  tensorboard: {os.path.join(out_dir, 'tensorboard')}")
    return 0


def _export_horizon(path: str) -> int | None:
    """The meta-training horizon an export records (constant horizons only), else None."""
    from lopt import export

    meta = export.read_metadata(path).get("metadata", {})
    horizon = meta.get("horizon")
    return int(horizon) if isinstance(horizon, (int, float)) else None


def _write_tensorboard(logdir: str, rows: dict, steps: int) -> None:
    """The evaluation curves (mean over seeds) as TensorBoard scalars, one tag per optimizer."""
    import numpy as np

    from lopt.training import evaluation, tensorboard

    writer = tensorboard.Writer(logdir)
    for name, r in rows.items():
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
        with np.errstate(invalid="ignore"):
            writer.scalars(f"eval/{tag}/train_loss", np.nanmean(np.asarray(r["train_loss"], np.float64), 0), 1)
        for i, (step, loss) in enumerate(zip(evaluation.eval_steps(steps),
                                             np.nanmean(np.asarray(r["test_loss_curve"], np.float64), 0))):
            writer.scalars(f"eval/{tag}/test_loss", [loss], step)
    writer.close()


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-eval`` command."""
    from lopt.cli.common import run_app

    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
