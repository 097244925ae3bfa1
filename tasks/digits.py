"""``digits_mlp``: an MLP classifier on a small image dataset (default: sklearn's 8x8 digits).

Instances differ by their initialisation seed and, with ``permute_classes``, by a random
relabelling of the classes, so a learned optimizer cannot memorise one problem. Batches are
drawn inside jit from the device-resident dataset (``tasks.data.load``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import optax

import tasks
from tasks import catalogue
from tasks import data as data_lib
from tasks.base import check_split, sample_indices
from tasks.errors import DatasetNotPreparedError

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
}


def mlp_init(key: jax.Array, sizes: tuple[int, ...]) -> dict:
    """LeCun-normal weights and zero biases for layer sizes ``sizes`` (input first)."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        w = jax.random.normal(k, (fan_in, fan_out)) / jnp.sqrt(fan_in)
        params[f"dense_{i}"] = {"w": w, "b": jnp.zeros((fan_out,))}
    return params


def mlp_apply(params: dict, x: jax.Array, activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
    n = len(params)
    for i in range(n):
        layer = params[f"dense_{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < n - 1:
            x = activation(x)
    return x


@tasks.register("digits_mlp")
@dataclasses.dataclass(frozen=True)
class DigitsMLP:
    """MLP classifier; spec = {"seed": init seed, "perm": class relabelling}."""

    hidden_sizes: tuple[int, ...] = (32,)
    activation: str = "relu"
    batch_size: int = 64
    permute_classes: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    # Arrays bound inside jit by `tasks.base.bind_data`; not part of the family's identity.
    bound_arrays: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    name: ClassVar[str] = "digits_mlp"

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"digits_mlp: unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}"
            )
        if self.batch_size < 1 or any(h < 1 for h in self.hidden_sizes):
            raise ValueError("digits_mlp: batch_size and hidden_sizes must be positive")
        try:  # fail when built, not when first sampled
            data_lib.require(self.dataset, self.data_dir)
        except DatasetNotPreparedError as e:
            raise data_lib.with_smoke_hint(e, self.name, catalogue.SMOKE_IMAGE) from None

    @property
    def data(self) -> data_lib.Dataset:
        return data_lib.load(self.dataset, self.data_dir)

    @property
    def arrays(self) -> dict:
        """{split: {"image", "label"}} device arrays (the bound ones inside a compiled loop)."""
        return self.data.splits if self.bound_arrays is None else self.bound_arrays

    def bind(self, arrays: dict) -> "DigitsMLP":
        return dataclasses.replace(self, bound_arrays=arrays)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def sample(self, key: jax.Array) -> dict:
        k_seed, k_perm = jax.random.split(key)
        n = self.num_classes
        perm = jax.random.permutation(k_perm, n) if self.permute_classes else jnp.arange(n)
        seed = jax.random.randint(k_seed, (), 0, jnp.iinfo(jnp.int32).max)
        return {"seed": seed, "perm": perm.astype(jnp.int32)}

    def init(self, spec: dict, key: jax.Array) -> dict:
        in_dim = 1
        for d in self.data.image_shape:
            in_dim *= d
        sizes = (in_dim, *self.hidden_sizes, self.num_classes)
        return mlp_init(jax.random.fold_in(key, spec["seed"]), sizes)

    def loss(self, spec: dict, params: dict, batch: dict) -> tuple[jax.Array, dict]:
        x = batch["image"].reshape(batch["image"].shape[0], -1)
        logits = mlp_apply(params, x, ACTIVATIONS[self.activation])
        labels = spec["perm"][batch["label"]]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"accuracy": accuracy}

    def batch(self, spec: dict, key: jax.Array, split: str) -> dict:
        check_split(split)
        arrays = self.arrays[split]
        idx = sample_indices(key, self.batch_size, arrays["label"].shape[0])
        return {"image": arrays["image"][idx], "label": arrays["label"][idx]}

    def full_batch(self, split: str) -> dict:
        """The whole split as one batch (for evaluation)."""
        check_split(split)
        return dict(self.arrays[split])
