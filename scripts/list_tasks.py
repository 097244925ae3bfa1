"""List the registered task families: their default datasets and parameter counts.

    python scripts/list_tasks.py [--mnist_dir=DIR] [--text_file=FILE]

For each family: its default dataset (the paper's, for the paper tasks) and whether it is
prepared in the data dir (else the command that prepares it is in the error a run would raise;
see scripts/prepare_data.py); the input shape and parameter count on the embedded smoke data
(digits or generated text, so this runs anywhere and loads no large dataset); and the parameter
count at the paper's input shape (computed from shapes alone, no data needed). With --mnist_dir
(a directory of MNIST IDX files) and --text_file, also the counts on those local files.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MNIST_DIR = flags.DEFINE_string("mnist_dir", None, "Directory of MNIST-format IDX files.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "A text corpus for gpt2_mini.")

#: The papers' data for each family: (description, input shape or vocabulary size, classes).
#: Chen et al. 2020 Sec. 5; Metz et al. 2019 Sec. 4.2, App. D.2, App. F; ELO Table 1.
PAPER = {
    "mlp_orig": ("MNIST", (28, 28, 1), 10),
    "mlp_relu": ("MNIST", (28, 28, 1), 10),
    "mlp_deeper": ("MNIST", (28, 28, 1), 10),
    "conv_mnist": ("MNIST", (28, 28, 1), 10),
    "conv_cifar": ("CIFAR-10", (32, 32, 3), 10),
    "metz_conv": ("ImageNet 32x32, 10-class subsets", (32, 32, 3), 10),
    "mlp_d3_w128": ("ImageNet-1K 32x32", (32, 32, 3), 1000),
    "resnet18": ("ImageNet-1K 32x32", (32, 32, 3), 1000),
    "gpt2_mini": ("FineWeb-10B in ELO; Tiny Shakespeare chars here", 65, None),
    "conv6_mnist": ("MNIST 28x28", (28, 28, 1), 10),
}
#: Families that read MNIST-like images (for --mnist_dir).
MNIST_TASKS = ("mlp_orig", "mlp_relu", "mlp_deeper", "conv_mnist", "conv6_mnist", "metz_conv")


def count(family) -> int:
    """Parameters of one instance, from shapes only."""
    import jax

    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(lambda k: family.init(family.sample(k), k), key)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def default_dataset(name: str) -> str | None:
    """The ``dataset`` a family uses unless told otherwise (None: it has no data)."""
    import dataclasses

    import tasks

    factory = tasks.REGISTRY.factory(name)
    if not dataclasses.is_dataclass(factory):
        return None
    return {f.name: f.default for f in dataclasses.fields(factory)}.get("dataset")


def smoke_dataset(default: str | None) -> str | None:
    """The embedded dataset standing in for ``default`` (None: no data, or already embedded)."""
    from tasks import catalogue

    if default is None or default in (catalogue.SMOKE_IMAGE, catalogue.SMOKE_TEXT):
        return None
    entry = catalogue.PAPER_DATASETS.get(default)
    text = entry is not None and entry.kind == "text"
    return catalogue.SMOKE_TEXT if text else catalogue.SMOKE_IMAGE


def prepared(dataset: str | None) -> str:
    """'yes', 'no', or '-' (embedded or no data)."""
    from tasks import data

    if dataset is None or smoke_dataset(dataset) is None:
        return "-"
    try:
        data.require(dataset)
    except FileNotFoundError:
        return "no"
    return "yes"


def describe(family) -> tuple[str, str]:
    """(data, input) of a family's default options."""
    if hasattr(family, "vocab_size"):
        return family.dataset, f"{family.context} tokens, vocab {family.vocab_size}"
    data = getattr(family, "data", None)
    if data is not None and hasattr(data, "image_shape"):
        shape = "x".join(map(str, data.image_shape))
        classes = getattr(family, "num_outputs", data.num_classes)
        return family.dataset, f"{shape}, {classes} classes"
    return "-", "-"


def paper_count(name: str, family) -> str:
    if name not in PAPER:
        return "-"
    _, shape, classes = PAPER[name]
    if isinstance(shape, int):
        return f"{family.param_count(vocab_size=shape):,}"
    return f"{family.param_count(shape, classes):,}"


def rows() -> list[list[str]]:
    import tasks

    out = []
    for name in tasks.names():
        default = default_dataset(name)
        smoke = smoke_dataset(default)
        family = tasks.get(name, **({} if smoke is None else {"dataset": smoke}))
        data, shape = describe(family)
        paper = PAPER.get(name, ("-",))[0]
        out.append([
            name, default or "-", prepared(default), data, shape, f"{count(family):,}", paper,
            paper_count(name, family),
        ])  # fmt: skip
        if _MNIST_DIR.value and name in MNIST_TASKS:
            local = tasks.get(name, dataset=f"idx:{_MNIST_DIR.value}")
            data, shape = describe(local)
            out.append(["", "", "", data, shape, f"{count(local):,}", "", ""])
        if _TEXT_FILE.value and name == "gpt2_mini":
            local = tasks.get(name, dataset=f"text:{_TEXT_FILE.value}")
            data, shape = describe(local)
            out.append(["", "", "", data, shape, f"{count(local):,}", "", ""])
    return out


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    header = [
        "task", "default dataset", "prepared", "smoke data", "input", "params", "paper data",
        "params (paper)",
    ]  # fmt: skip
    print(table(header, rows()))
    return 0


if __name__ == "__main__":
    app.run(main)
