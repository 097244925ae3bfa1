"""Prepare a paper dataset from raw files you downloaded (this project never downloads).

    python scripts/prepare_data.py --dataset=mnist --source=PATH/TO/mnist_idx_dir
    python scripts/prepare_data.py --dataset=cifar10 --source=PATH/TO/cifar-10-batches-py
    python scripts/prepare_data.py --dataset=imagenet_resized/32x32 --source=PATH/TO/imagenet32
    python scripts/prepare_data.py --dataset=tiny_shakespeare --source=PATH/TO/input.txt
        [--data_dir=DIR] [--overwrite] [--noprogress]

Reads and checks every raw file, then writes the array_record tfds layout under the catalogue
name in the data dir (``--data_dir``, default ``$LOPT_DATA_DIR``, else ``$TFDS_DATA_DIR``, else
``~/.cache/lopt/tensorflow_datasets``), so ``dataset="mnist"`` etc., the paper task families'
defaults, then load. The raw formats and where to get them (``tasks.catalogue``):

* mnist: a directory of IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
  t10k-...; gzipped or not; the t10k files alone also work, split 7,200/800/2,000);
* cifar10: cifar-10-batches-py/ from cifar-10-python.tar.gz (data_batch_1..5, test_batch);
* imagenet_resized/32x32: train_data_batch_1..10.npz and val_data.npz (downsampled ImageNet);
* tiny_shakespeare: one text file (the stand-in for ELO's FineWeb-10B).

A bad raw file stops it before anything is written, with a one-line error naming the file;
exit code 1 (2 for bad flags).
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from lopt.cli.common import parse_flags  # noqa: E402
from tasks import catalogue  # noqa: E402  (imports nothing heavy)

_DATASET = flags.DEFINE_enum(
    "dataset", None, list(catalogue.PAPER_DATASETS), "The catalogue dataset to prepare."
)
_SOURCE = flags.DEFINE_string(
    "source", None, "The raw files: a directory (mnist, cifar10, imagenet) or a text file."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data dir to write; default $LOPT_DATA_DIR, $TFDS_DATA_DIR, ~/.cache."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an already prepared copy.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def families_defaulting_to(name: str) -> list[str]:
    """The registered task families whose default ``dataset`` is ``name``."""
    import tasks

    out = []
    for family in tasks.names():
        factory = tasks.REGISTRY.factory(family)
        if dataclasses.is_dataclass(factory):
            default = {f.name: f.default for f in dataclasses.fields(factory)}.get("dataset")
            if default == name:
                out.append(family)
    return out


def summary(prepared) -> str:
    """The final line: where it wrote, and how to use it."""
    from tasks import data

    if prepared.num_classes is None:
        sizes = ", ".join(f"{s} {n:,} bytes" for s, n in prepared.splits.items())
    else:
        sizes = ", ".join(f"{s} {n:,}" for s, n in prepared.splits.items())
        sizes += f" examples, {prepared.num_classes} classes"
    families = families_defaulting_to(prepared.name)
    use = f'dataset="{prepared.name}"'
    if families:
        use += f" (the default of {', '.join(families)})"
    if os.path.abspath(data.default_data_dir()) != prepared.data_dir:
        use += f' with LOPT_DATA_DIR={prepared.data_dir} or data_dir="{prepared.data_dir}"'
    return f"wrote {prepared.path} ({sizes}); use it with {use}"


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    for flag in (_DATASET, _SOURCE):
        if flag.value is None:
            print(f"error: --{flag.name} is required (see --help)", file=sys.stderr)
            return 2
    from tasks import prepare as prepare_lib

    try:
        prepared = prepare_lib.prepare(
            _DATASET.value,
            _SOURCE.value,
            _DATA_DIR.value,
            overwrite=_OVERWRITE.value,
            progress=_PROGRESS.value,
        )
    except (OSError, ValueError) as e:  # bad or missing raw files: one line, no traceback
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    for note in prepared.notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary(prepared))
    return 0


def parse_or_help(argv: list[str]) -> list[str]:
    """Flags as ``scripts._shared.parse_flags`` parses them (a bad flag: one line, exit 2), but
    ``--help`` prints this docstring and the flags and exits 0 (absl's exits 1)."""
    if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    return parse_flags(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_or_help)
