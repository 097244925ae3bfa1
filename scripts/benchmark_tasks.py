"""Inner steps per second under Adam for every registered task family.

    python scripts/benchmark_tasks.py [--tasks=mlp_orig,gpt2_mini] [--steps=20] [--particles=1]
        [--batch_size=N] [--preset=default|small] [--data=paper|embedded]
        [--data_dir=../shared/data]

Each task trains ``--particles`` instances (vmapped over their specs, as meta-training runs
them) for ``--steps`` Adam steps in one compiled ``lax.scan``, reading its dataset passed into
jit as an argument. The program is compiled and run once to warm up, then timed on a second
call; inner steps per second = particles x steps / wall time (DESIGN.md, performance rules).

Data: with --data=paper (the default) each family's default dataset, its paper's (MNIST,
CIFAR-10, ImageNet 32x32, Tiny Shakespeare), prepared beforehand with scripts/prepare_data.py
(an unprepared one stops the run at once with the command that prepares it); with
--data=embedded the embedded smoke data (digits for image tasks, generated text for gpt2_mini).
--data_dir names a directory with MNIST IDX files (``*-images-idx3-ubyte.gz`` ...) and/or
``tinyshakespeare.txt`` read in place: the MNIST tasks (mlp_orig, mlp_relu, mlp_deeper,
conv_mnist, conv6_mnist, metz_conv) read the IDX files and gpt2_mini reads the text. --preset=small uses the tests' small widths and
resolutions; --preset=default the families' default (paper) architectures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated task names (default: all).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed Adam steps per particle.")
_PARTICLES = flags.DEFINE_integer("particles", 1, "Task instances trained in parallel (vmap).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Override every task's batch size.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_PRESET = flags.DEFINE_enum("preset", "default", ["default", "small"], "Task options preset.")
_DATA = flags.DEFINE_enum(
    "data", "paper", ["paper", "embedded"],
    "paper: each family's default (its paper's) dataset, prepared with scripts/prepare_data.py; "
    "embedded: digits / generated text, for CPU smoke runs.",
)  # fmt: skip
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Directory with MNIST IDX files and/or tinyshakespeare.txt (local data)."
)
_TASK_KWARGS = flags.DEFINE_string(
    "task_kwargs", "{}", 'JSON {task: {option: value}} applied on top of the preset.'
)

MNIST_TASKS = ("mlp_orig", "mlp_relu", "mlp_deeper", "conv_mnist", "conv6_mnist", "metz_conv")
SMALL = {
    "digits_mlp": dict(hidden_sizes=(32,)),
    "mlp_d3_w128": dict(hidden_sizes=(32, 32, 32), resize=16),
    "conv_mnist": dict(features=(8, 16)),
    "conv_cifar": dict(features=(8, 16), resize=16),
    "metz_conv": dict(features=(16, 16, 16), classes_per_task=5),
    "conv6_mnist": dict(features=(8,) * 6),
    "resnet18": dict(width_multiplier=1 / 16, resize=16),
    "gpt2_mini": dict(num_layers=1, width=32, num_heads=2, context=16),
}


def embedded_dataset(name: str) -> str | None:
    """The embedded dataset to run ``name`` on for --data=embedded (None: keep its default)."""
    import dataclasses

    import tasks
    from tasks import catalogue

    factory = tasks.REGISTRY.factory(name)
    if not dataclasses.is_dataclass(factory):
        return None
    default = {f.name: f.default for f in dataclasses.fields(factory)}.get("dataset")
    entry = catalogue.PAPER_DATASETS.get(default)
    if entry is None:
        return None  # no data, or already embedded
    return catalogue.SMOKE_TEXT if entry.kind == "text" else catalogue.SMOKE_IMAGE


def task_options(name: str) -> dict:
    options = dict(SMALL.get(name, {})) if _PRESET.value == "small" else {}
    if _DATA.value == "embedded" and embedded_dataset(name) is not None:
        options["dataset"] = embedded_dataset(name)
    if _BATCH_SIZE.value and name != "quadratic":
        options["batch_size"] = _BATCH_SIZE.value
    data_dir = _DATA_DIR.value
    if data_dir:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
        has_idx = any("-images-idx3-ubyte" in f for f in os.listdir(data_dir))
        text = os.path.join(data_dir, "tinyshakespeare.txt")
        if name in MNIST_TASKS and has_idx:
            options["dataset"] = f"idx:{data_dir}"
        if name == "gpt2_mini" and os.path.isfile(text):
            options["dataset"] = f"text:{text}"
    options.update(json.loads(_TASK_KWARGS.value).get(name, {}))
    return options


def benchmark(name: str, options: dict) -> dict:
    import jax
    import optax

    import tasks
    from tasks.base import bind_data, data_arrays

    family = tasks.get(name, **options)
    arrays = data_arrays(family)
    opt = optax.adam(_LR.value)
    steps, particles = _STEPS.value, _PARTICLES.value

    def init(arrays, key):
        fam = bind_data(family, arrays)

        def one(key):
            spec = fam.sample(key)
            params = fam.init(spec, jax.random.fold_in(key, 1))
            return spec, params, opt.init(params)

        return jax.vmap(one)(jax.random.split(key, particles))

    def train(arrays, state, key):
        fam = bind_data(family, arrays)
        grad_fn = jax.value_and_grad(fam.loss, argnums=1, has_aux=True)

        def one(state, key):
            spec, params, opt_state = state

            def step(carry, k):
                params, opt_state = carry
                (loss, _), grads = grad_fn(spec, params, fam.batch(spec, k, "train"))
                updates, opt_state = opt.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            (params, opt_state), losses = jax.lax.scan(
                step, (params, opt_state), jax.random.split(key, steps)
            )
            return (spec, params, opt_state), losses

        return jax.vmap(one)(state, jax.random.split(key, particles))

    key = jax.random.PRNGKey(0)
    state = jax.jit(init)(arrays, key)
    train_fn = jax.jit(train, donate_argnums=1)
    start = time.perf_counter()
    compiled = train_fn.lower(arrays, state, key).compile()
    compile_s = time.perf_counter() - start
    state, losses = compiled(arrays, state, jax.random.fold_in(key, 1))  # warm-up
    jax.block_until_ready(losses)
    start = time.perf_counter()
    state, losses = compiled(arrays, state, jax.random.fold_in(key, 2))
    jax.block_until_ready(losses)
    wall = time.perf_counter() - start
    params = jax.tree.map(lambda x: x[0], state[1])
    return {
        "task": name,
        "data": getattr(family, "dataset", "generated"),
        "params": sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
        "batch": getattr(family, "batch_size", "-"),
        "compile_s": compile_s,
        "steps_per_s": particles * steps / wall,
        "ms_per_step": 1e3 * wall / steps,
        "loss": float(losses[:, -1].mean()),
    }


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    import jax

    import tasks

    names = _TASKS.value.split(",") if _TASKS.value else tasks.names()
    device = jax.devices()[0]
    print(
        f"# {device.platform} ({device.device_kind}), preset={_PRESET.value}, "
        f"particles={_PARTICLES.value}, steps={_STEPS.value}, Adam lr={_LR.value}"
    )
    header = ["task", "data", "params", "batch", "compile s", "inner steps/s", "ms/step", "loss"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name in names:
        try:
            r = benchmark(name, task_options(name))
        except FileNotFoundError as e:  # e.g. a paper dataset not prepared: say how, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(
            f"| {r['task']} | {r['data']} | {r['params']:,} | {r['batch']} | "
            f"{r['compile_s']:.1f} | {r['steps_per_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['loss']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    app.run(main)
