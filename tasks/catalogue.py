"""The paper datasets: which raw files prepare each one, and where they come from.

The paper task families default to the data their papers trained on (DESIGN.md: "A paper task
defaults to its paper's dataset"):

* MNIST: Chen et al. 2020, Sec. 5 "Optimizee Settings" (MLP-orig, MLP-ReLU, MLP-deeper,
  Conv-MNIST); Metz et al. 2019, App. F, Fig. 14 (the six-layer conv net on 28x28 MNIST).
* CIFAR-10: Chen et al. 2020, Sec. 5 "Optimizee Settings" (Conv-CIFAR).
* ImageNet 32x32: Metz et al. 2019, Sec. 4.2 and App. D.2 (10-class subsets of 32x32x3
  ImageNet); ELO, Table 1 (ImageNet-1K 32x32 for MLP-d3-w128 and ResNet18).
* Tiny Shakespeare stands in for ELO's FineWeb-10B (ELO, Table 1, GPT2-mini), which is not
  available here.

This layer never downloads: a user fetches the raw files below and converts them once with
``python scripts/prepare_data.py --dataset=NAME --source=PATH`` (``tasks.prepare``), which
writes the array_record tfds layout ``tasks.data.load`` reads, under the catalogue name.
"""

from __future__ import annotations

import dataclasses
import shlex


@dataclasses.dataclass(frozen=True)
class PaperDataset:
    """A catalogue dataset that ``scripts/prepare_data.py`` can build from raw files."""

    name: str  # tfds catalogue name (with config), e.g. "imagenet_resized/32x32"
    title: str
    kind: str  # the raw format: "idx", "cifar_pickle", "imagenet_npz" or "text"
    source: str  # what --source names, as a placeholder path
    download: str  # where the raw files come from
    num_classes: int | None
    papers: str
    #: sha256 of the raw files as distributed, by file name (a mismatch is reported, not fatal).
    sha256: tuple[tuple[str, str], ...] = ()


PAPER_DATASETS: dict[str, PaperDataset] = {
    d.name: d
    for d in (
        PaperDataset(
            name="mnist",
            title="MNIST",
            kind="idx",
            source="PATH/TO/mnist",
            download=(
                "the four IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
                "https://storage.googleapis.com/cvdf-datasets/mnist/ (the copy tfds uses); "
                "--source is the directory holding them"
            ),
            num_classes=10,
            papers="Chen et al. 2020 Sec. 5; Metz et al. 2019 App. F",
            # The sums tfds registers for these files (tensorflow_datasets url_checksums).
            sha256=(
                ("train-images-idx3-ubyte.gz",
                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                ("train-labels-idx1-ubyte.gz",
                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                ("t10k-images-idx3-ubyte.gz",
                 "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                ("t10k-labels-idx1-ubyte.gz",
                 "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
            ),  # fmt: skip
        ),
        PaperDataset(
            name="cifar10",
            title="CIFAR-10",
            kind="cifar_pickle",
            source="PATH/TO/cifar-10-batches-py",
            download=(
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz; unpack it, --source is "
                "the cifar-10-batches-py directory (data_batch_1..5, test_batch)"
            ),
            num_classes=10,
            papers="Chen et al. 2020 Sec. 5",
        ),
        PaperDataset(
            name="imagenet_resized/32x32",
            title="ImageNet 32x32 (downsampled ImageNet, Chrabaszcz et al. 2017)",
            kind="imagenet_npz",
            source="PATH/TO/imagenet32",
            download=(
                "Imagenet32_train_npz.zip and Imagenet32_val_npz.zip from "
                "https://image-net.org/download-images (needs an ImageNet account); unzip both "
                "into one directory, --source is that directory (train_data_batch_1..10.npz, "
                "val_data.npz)"
            ),
            num_classes=1000,
            papers="Metz et al. 2019 Sec. 4.2, App. D.2; ELO Table 1",
        ),
        PaperDataset(
            name="tiny_shakespeare",
            title="Tiny Shakespeare (stand-in for ELO's FineWeb-10B)",
            kind="text",
            source="PATH/TO/tinyshakespeare.txt",
            download=(
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                "tinyshakespeare/input.txt; --source is that file"
            ),
            num_classes=None,
            papers="ELO Table 1 used FineWeb-10B (not available); Tiny Shakespeare stands in",
            sha256=(
                ("input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
                ("tinyshakespeare.txt",
                 "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
            ),  # fmt: skip
        ),
    )
}

#: The embedded datasets, for CPU smoke runs: image families, text families.
SMOKE_IMAGE, SMOKE_TEXT = "digits", "generated"


def prepare_command(name: str, data_dir: str, source: str | None = None) -> str | None:
    """The ``scripts/prepare_data.py`` command that prepares ``name`` in ``data_dir``, or None
    for a dataset the script does not know."""
    entry = PAPER_DATASETS.get(name)
    if entry is None:
        return None
    args = [
        "python",
        "scripts/prepare_data.py",
        f"--dataset={entry.name}",
        f"--source={source or entry.source}",
        f"--data_dir={data_dir}",
    ]
    return shlex.join(args)
