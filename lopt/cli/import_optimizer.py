"""Convert a learned optimizer meta-trained with google/learned_optimization into an export.

    lopt-import --from=learned_optimization --arch=adafac_mlp --params=params_5000 --out=lo.safetensors

``--arch=mlp`` is that library's ``MLPLOpt``, ``--arch=adafac_mlp`` its ``AdafacMLPLOpt`` (the
small_fc_lopt of PyLO and Celo), ``--arch=velo`` its ``HyperV2`` (VeLO, e.g. the published
``.../pretrained_lopts/aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620/params``), whose
configuration comes from the ``config.gin`` beside the file when there is one (a setting lopt's
``velo`` does not implement is refused in one line) and else from the arrays' shapes.
``--params`` is its meta-params as it saves them: a flax
msgpack file (``checkpoints.save_state``; the ``params_<step>`` files of ``outer_train``) or an
orbax checkpoint directory. The constructor options its meta-params do not record are flags
(``--step_mult``, ``--exp_mult``; for adafac_mlp its initial decays) with that library's
defaults. The export (docs/export-format.md) sets the options under which ``adafac_mlp`` and
``mlp`` compute that library's update (``lopt/importer.py``), and loads with
``lopt.export.load_optimizer`` or ``lopt.torch.load``. Errors are one line, exit code 2.
"""

from __future__ import annotations

import sys

from absl import flags, logging


def _define_flags() -> None:
    flags.DEFINE_enum("from", None, ["learned_optimization"], "The framework that wrote --params.")
    flags.DEFINE_enum("arch", None, ["mlp", "adafac_mlp", "velo"],
                      "mlp: learned_optimization's MLPLOpt; adafac_mlp: its AdafacMLPLOpt; "
                      "velo: its HyperV2 (VeLO; reads config.gin beside --params).")
    flags.DEFINE_string("params", None, "Its meta-params: a msgpack file or orbax directory.")
    flags.DEFINE_string("out", None, "The export to write (a .safetensors file).")
    flags.DEFINE_float("step_mult", 1e-3, "The peer optimizer's step_mult.")
    flags.DEFINE_float("exp_mult", 1e-3, "The peer optimizer's exp_mult.")
    flags.DEFINE_list("momentum_decays", None, "adafac_mlp: initial_momentum_decays "
                      "(default 0.9,0.99,0.999).")
    flags.DEFINE_list("rms_decays", None, "adafac_mlp: initial_rms_decays (default 0.999).")
    flags.DEFINE_list("adafactor_decays", None, "adafac_mlp: initial_adafactor_decays "
                      "(default 0.9,0.99,0.999).")


def main(argv) -> int:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    missing = [f"--{n}" for n in ("from", "arch", "params", "out") if not FLAGS[n].value]
    if missing:
        print(f"error: {', '.join(missing)} required", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every restore at INFO
    from lopt import export as export_lib
    from lopt import importer

    options = {"step_mult": FLAGS.step_mult, "exp_mult": FLAGS.exp_mult}
    for name in ("momentum_decays", "rms_decays", "adafactor_decays"):
        if FLAGS[name].value is not None:
            if FLAGS.arch != "adafac_mlp":
                print(f"error: --{name} is an option of --arch=adafac_mlp", file=sys.stderr)
                return 2
            try:
                options[name] = tuple(float(x) for x in FLAGS[name].value)
            except ValueError:
                print(f"error: --{name}={','.join(FLAGS[name].value)}: not numbers",
                      file=sys.stderr)
                return 2
    try:
        path = importer.import_file(FLAGS.arch, FLAGS.params, FLAGS.out, **options)
    except (importer.ImportFailed, export_lib.ExportError, OSError) as e:
        print(f"import error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    arch = export_lib.read_metadata(path)["architecture"]
    print(f"imported learned_optimization {importer.ARCHITECTURES[FLAGS.arch][0]} from "
          f"{FLAGS.params} as {arch['name']} to {path}")
    return 0


def run(argv: list[str] | None = None) -> None:
    """The ``lopt-import`` command."""
    from lopt.cli.common import run_app

    _define_flags()
    run_app(main, __doc__, __name__, argv)


if __name__ == "__main__":
    run()
