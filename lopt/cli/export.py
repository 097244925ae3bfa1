"""Export a meta-training checkpoint as a single learned-optimizer file (lopt.export format).

    python scripts/export.py --workdir=runs/quickstart                  # latest checkpoint
    python scripts/export.py --workdir=runs/quickstart --step=300 --out=/tmp/mlp_300.safetensors

Reads ``WORKDIR/config.json`` (the resolved config ``train`` wrote), rebuilds the
``MetaTrainer`` it describes, restores the orbax checkpoint of ``--step`` (default: the latest)
from ``WORKDIR/checkpoints`` into the structure of a freshly initialised state, and writes the
meta-params with ``lopt.export.save``. The default output is
``WORKDIR/export/optimizer_step{STEP}.safetensors`` (a safetensors file; ``--out`` may name any
path). Load it anywhere with ``lopt.export.load_optimizer(path)``, or in PyTorch with
``lopt.torch.load(path, model.parameters())``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging  # noqa: E402


def _define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import this module beside
    others that define --workdir."""
    flags.DEFINE_string("workdir", None, "Meta-training workdir (holds config.json, checkpoints/).")
    flags.DEFINE_string(
        "out", None, "Output file; default WORKDIR/export/optimizer_step{STEP}.safetensors."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest.")


class ExportScriptError(RuntimeError):
    """The workdir lacks what an export needs (config, checkpoints, the requested step)."""


def export_checkpoint(workdir: str, out: str | None = None, step: int | None = None) -> str:
    """Write the meta-params of ``workdir``'s checkpoint ``step`` (default latest) to ``out``.

    Returns the path written. Raises :class:`ExportScriptError` when the workdir has no
    config.json, no checkpoints, or not the requested step.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ExportScriptError(f"{config_path} not found: is {workdir} a meta-training workdir?")

    import jax
    from ml_collections import ConfigDict

    from lopt.training import checkpoint as ckpt_lib
    from lopt.training import config as config_lib
    from lopt import export as export_lib
    with open(config_path) as f:
        config = ConfigDict(json.load(f))
    trainer = config_lib.build(config)

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ExportScriptError(f"{workdir} has no checkpoints/ directory")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())  # orbax step folders
    if not steps:
        raise ExportScriptError(f"{ckpt_dir} holds no checkpoints")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportScriptError(
            f"{ckpt_dir} has no checkpoint for step {step}; available: {steps} (a run keeps "
            "config.checkpoint_keep newest and every config.checkpoint_keep_every-th step)")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=None)  # reads only: deletes nothing
    try:
        # The state's structure, shapes and dtypes, traced but not computed or compiled.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(trainer.init, jax.random.PRNGKey(int(config.seed))),
        )
        like = {"state": template}
        if config_lib.curriculum(config) is not None:  # the curriculum keeps its best beside
            like["best_meta_params"] = template.meta_params
        state = checkpointer.restore(step, like)[0]["state"]
    finally:
        checkpointer.close()

    if out is None:
        out = os.path.join(workdir, "export", f"optimizer_step{step}.safetensors")
    return export_lib.save(
        out,
        trainer.learned_opt,
        jax.device_get(state.meta_params),
        metadata={
            "outer_step": int(state.outer_step),
            "checkpoint_step": int(step),
            "workdir": os.path.abspath(workdir),
            "task": config.task.to_dict(),
            "estimator": config.estimator.to_dict(),
            **({"modules": list(config.modules)} if config.get("modules") else {}),
        },
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from lopt.cli.common import import_user_modules
    from tasks.registry import ConfigError

    try:  # --module; config.json's modules are imported when its config is built
        import_user_modules()
        path = export_checkpoint(FLAGS.workdir, FLAGS.out, FLAGS.step)
    except (ExportScriptError, ConfigError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    from lopt import export as export_lib

    header = export_lib.read_metadata(path)
    arch = header["architecture"]
    print(f"exported {arch['name']} (outer step {header['metadata']['outer_step']}) to {path}")
    return 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-export`` command."""
    from lopt.cli.common import run_app

    _define_flags()
    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
