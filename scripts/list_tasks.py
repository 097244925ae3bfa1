"""List the registered task families with their parameter counts.

    python scripts/list_tasks.py [--mnist_dir=DIR] [--text_file=FILE]

For each family: the data its default options use (the embedded digits or generated text, so
this runs anywhere), the input shape and parameter count there, and the parameter count at the
papers' input shape (computed from shapes alone, no data needed). With --mnist_dir (a directory
of MNIST IDX files) and --text_file, also the counts on those local files.
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
PAPER = {
    "mlp_orig": ("MNIST", (28, 28, 1), 10),
    "mlp_relu": ("MNIST", (28, 28, 1), 10),
    "mlp_deeper": ("MNIST", (28, 28, 1), 10),
    "conv_mnist": ("MNIST", (28, 28, 1), 10),
    "conv_cifar": ("CIFAR-10", (32, 32, 3), 10),
    "metz_conv": ("ImageNet 32x32, 10-class subsets", (32, 32, 3), 10),
    "mlp_d3_w128": ("CIFAR-10", (32, 32, 3), 10),
    "resnet18": ("CIFAR-10", (32, 32, 3), 10),
    "gpt2_mini": ("Tiny Shakespeare, chars", 65, None),
    "conv6_mnist": ("MNIST", (28, 28, 1), 10),
}
#: Families that read MNIST-like images (for --mnist_dir).
MNIST_TASKS = ("mlp_orig", "mlp_relu", "mlp_deeper", "conv_mnist", "conv6_mnist", "metz_conv")


def count(family) -> int:
    """Parameters of one instance, from shapes only."""
    import jax

    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(lambda k: family.init(family.sample(k), k), key)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def describe(family) -> tuple[str, str]:
    """(data, input) of a family's default options."""
    if hasattr(family, "vocab_size"):
        return family.dataset, f"{family.context} tokens, vocab {family.vocab_size}"
    data = getattr(family, "data", None)
    if data is not None and hasattr(data, "image_shape"):
        shape = "x".join(map(str, data.image_shape))
        classes = getattr(family, "num_outputs", data.num_classes)
        return family.dataset, f"{shape}, {classes} classes"
    return "generated", "-"


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
        family = tasks.get(name)
        data, shape = describe(family)
        paper = PAPER.get(name, ("-",))[0]
        out.append([name, data, shape, f"{count(family):,}", paper, paper_count(name, family)])
        if _MNIST_DIR.value and name in MNIST_TASKS:
            local = tasks.get(name, dataset=f"idx:{_MNIST_DIR.value}")
            data, shape = describe(local)
            out.append(["", data, shape, f"{count(local):,}", "", ""])
        if _TEXT_FILE.value and name == "gpt2_mini":
            local = tasks.get(name, dataset=f"text:{_TEXT_FILE.value}")
            data, shape = describe(local)
            out.append(["", data, shape, f"{count(local):,}", "", ""])
    return out


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    header = ["task", "data (default options)", "input", "params", "paper data", "params (paper)"]
    print(table(header, rows()))
    return 0


if __name__ == "__main__":
    app.run(main)
