"""Convolutional image-classification families of the seed papers; ``tasks.image`` holds the
shared :class:`~tasks.image.ImageClassification` base (datasets, batches, preprocessing) and the
MLP families.

Chen et al. 2020, Sec. 5: ``conv_mnist`` (conv 16 3x3, max-pool 2x2, conv 32 5x5, max-pool,
linear) on MNIST and ``conv_cifar`` (the same with stride-2 convolutions) on CIFAR-10. Metz et
al. 2019: ``metz_conv`` (three 3x3 convs of 32, strides 2, 2, 1, ReLU, Glorot init, global
average pool, linear; Sec. 4.2, App. D.2) on 10-class subsets of 32x32 ImageNet, and
``conv6_mnist`` (six 3x3 convs of 32, strides 2, 1, 2, 1, 1, 1; App. F, Fig. 14). ELO Table 1:
``resnet18`` (CIFAR-style) on 32x32 ImageNet.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import tasks
from tasks import models
from tasks import data as data_lib
from tasks.base import check_split
from tasks.image import CHEN_INIT_STD, ImageClassification, _positive_ints


# ----------------------------------------------------------------------------------------------
# Conv nets with max-pooling (Chen et al. 2020).


@dataclasses.dataclass(frozen=True)
class ConvPoolClassification(ImageClassification):
    """[conv -> ReLU -> 2x2 max-pool] per entry of ``features``/``kernel_sizes``, then linear."""

    features: tuple[int, ...] = (16, 32)
    kernel_sizes: tuple[int, ...] = (3, 5)
    stride: ClassVar[int] = 1

    def _check_options(self) -> None:
        object.__setattr__(self, "features", _positive_ints(self.name, "features", self.features))
        object.__setattr__(
            self, "kernel_sizes", _positive_ints(self.name, "kernel_sizes", self.kernel_sizes)
        )
        if len(self.features) != len(self.kernel_sizes):
            raise ValueError(
                f"{self.name}: features {self.features} and kernel_sizes {self.kernel_sizes} "
                "must have the same length"
            )

    def module(self, num_classes: int) -> nn.Module:
        return models.ConvPool(self.features, self.kernel_sizes, self.stride, num_classes)

    def spatial_sizes(self, size: int) -> list[int]:
        layers = len(self.features)
        return models.ConvPool.spatial_sizes(size, num_layers=layers, stride=self.stride)


@dataclasses.dataclass(frozen=True)
class ConvMNIST(ConvPoolClassification):
    """conv 16 3x3 s1, pool, conv 32 5x5 s1, pool, linear, on MNIST (Chen et al. 2020 Sec. 5,
    "Conv-MNIST")."""

    dataset: str = "mnist"
    init_std: float | None = CHEN_INIT_STD
    name: ClassVar[str] = "conv_mnist"


@dataclasses.dataclass(frozen=True)
class ConvCIFAR(ConvPoolClassification):
    """``conv_mnist`` with stride-2 convolutions, on 32x32x3 CIFAR-10 (Chen et al. 2020 Sec. 5,
    "Conv-CIFAR")."""

    dataset: str = "cifar10"
    resize: int | tuple[int, int] | None = 32
    channels: int | None = 3
    init_std: float | None = CHEN_INIT_STD
    name: ClassVar[str] = "conv_cifar"
    stride: ClassVar[int] = 2
    paper_size: ClassVar[int] = 32


# ----------------------------------------------------------------------------------------------
# Conv nets with global average pooling (Metz et al. 2019).


@dataclasses.dataclass(frozen=True)
class ConvGAPClassification(ImageClassification):
    """3x3 convs of ``features`` channels at the family's strides, ReLU, GAP, linear."""

    features: tuple[int, ...] = (32, 32, 32)
    strides: ClassVar[tuple[int, ...]] = (2, 2, 1)

    def _check_options(self) -> None:
        features = _positive_ints(self.name, "features", self.features)
        if len(features) != len(self.strides):
            raise ValueError(
                f"{self.name}: features must list {len(self.strides)} layers (strides "
                f"{self.strides}), got {features}"
            )
        object.__setattr__(self, "features", features)

    def module(self, num_classes: int) -> nn.Module:
        return models.ConvGAP(self.features, self.strides, num_classes)

    def spatial_sizes(self, size: int) -> list[int]:
        return models.ConvGAP.spatial_sizes(size, strides=self.strides)


@dataclasses.dataclass(frozen=True)
class Conv6MNIST(ConvGAPClassification):
    """Six 3x3 convs of 32 channels, strides 2, 1, 2, 1, 1, 1, on 28x28 MNIST (Metz et al.
    2019 App. F, Fig. 14: an out-of-domain test problem)."""

    dataset: str = "mnist"
    features: tuple[int, ...] = (32,) * 6
    name: ClassVar[str] = "conv6_mnist"
    strides: ClassVar[tuple[int, ...]] = (2, 1, 2, 1, 1, 1)


@dataclasses.dataclass(frozen=True)
class MetzConv(ConvGAPClassification):
    """Three 3x3 convs of 32 (strides 2, 2, 1) on a random ``classes_per_task``-class subset.

    Metz et al. 2019 (Sec. 4.2, App. D.2) train on 10-class subsets of 32x32 ImageNet, the
    default ``dataset="imagenet_resized/32x32"`` (they split its 1000 classes into 700 training
    and 300 test classes: ``heldout_classes``). Spec: ``{"seed", "classes": int32
    [classes_per_task]}``; the task's label of an example of class ``classes[i]`` is ``i``.
    Batches are class-balanced.
    ``heldout_classes`` are never sampled for training tasks; ``heldout=True`` samples only
    from them, giving held-out tasks.
    """

    dataset: str = "imagenet_resized/32x32"
    classes_per_task: int = 10
    heldout_classes: tuple[int, ...] = ()
    heldout: bool = False
    name: ClassVar[str] = "metz_conv"
    paper_size: ClassVar[int] = 32

    def _check_options(self) -> None:
        super()._check_options()
        object.__setattr__(self, "heldout_classes", tuple(int(c) for c in self.heldout_classes))
        if self.permute_classes:
            raise ValueError(
                f"{self.name}: permute_classes does not apply; each task's class subset is drawn "
                "in random order already"
            )
        n, held = self.num_classes, self.heldout_classes
        bad = sorted(c for c in held if not 0 <= c < n)
        if bad or len(set(held)) != len(held):
            raise ValueError(
                f"{self.name}: heldout_classes must be distinct ids in 0..{n - 1} (dataset "
                f"{self.dataset!r} has {n} classes), got {held}"
            )
        pool = self.class_pool
        if not 1 <= self.classes_per_task <= len(pool):
            which = "held-out" if self.heldout else "training (non-held-out)"
            raise ValueError(
                f"{self.name}: classes_per_task={self.classes_per_task} but dataset "
                f"{self.dataset!r} has {len(pool)} {which} classes to draw from"
            )
        index = data_lib.class_index(self.data)
        for split, arrays in index.items():
            empty = [int(c) for c in pool if int(arrays["count"][c]) == 0]
            if empty:
                raise ValueError(
                    f"{self.name}: dataset {self.dataset!r} has no {split} examples of classes "
                    f"{empty}; exclude them with classes=... or heldout_classes=..."
                )

    @property
    def class_pool(self) -> np.ndarray:
        """The class ids this family's tasks draw their subsets from."""
        held = set(self.heldout_classes)
        ids = range(self.num_classes)
        return np.asarray([c for c in ids if (c in held) == self.heldout], np.int32)

    @property
    def num_outputs(self) -> int:
        return self.classes_per_task

    @property
    def arrays(self) -> dict:
        if self.bound_arrays is not None:
            return self.bound_arrays
        index = data_lib.class_index(self.data)
        return {s: {**a, **index[s]} for s, a in self.data.splits.items()}

    def sample(self, key: jax.Array) -> dict:
        k_seed, k_classes = jax.random.split(key)
        pool = jnp.asarray(self.class_pool)
        classes = jax.random.choice(k_classes, pool, (self.classes_per_task,), replace=False)
        seed = jax.random.randint(k_seed, (), 0, jnp.iinfo(jnp.int32).max)
        return {"seed": seed, "classes": classes.astype(jnp.int32)}

    def _targets(self, spec: dict, label: jax.Array) -> tuple[jax.Array, jax.Array]:
        match = label[:, None] == spec["classes"][None, :]
        return jnp.argmax(match, axis=-1), match.any(axis=-1).astype(jnp.float32)

    def batch(self, spec: dict, key: jax.Array, split: str) -> dict:
        check_split(split)
        arrays = self.arrays[split]
        k_class, k_example = jax.random.split(key)
        slot = jax.random.randint(k_class, (self.batch_size,), 0, self.classes_per_task)
        cls = spec["classes"][slot]
        row = jax.random.randint(k_example, (self.batch_size,), 0, arrays["count"][cls])
        idx = arrays["by_class"][cls, row]
        return {"image": arrays["image"][idx], "label": arrays["label"][idx]}


# ----------------------------------------------------------------------------------------------
# ResNet-18 (ELO).


@dataclasses.dataclass(frozen=True)
class ResNet18Classification(ImageClassification):
    """CIFAR-style ResNet-18 on 32x32x3 inputs (``tasks.models.ResNet18``), on ImageNet-1K 32x32
    (ELO Table 1, "ResNet18").

    ``width_multiplier`` scales all widths (1/16 gives 4..32 channels for small runs). ``norm``:
    ``"batch"`` (batch statistics, stateless), ``"layer"`` or ``"none"``. The network halves the
    resolution three times, and needs a final feature map of at least 2x2, so inputs of at
    least 16x16.
    """

    dataset: str = "imagenet_resized/32x32"
    width_multiplier: float = 1.0
    norm: str = "batch"
    resize: int | tuple[int, int] | None = 32
    channels: int | None = 3
    name: ClassVar[str] = "resnet18"
    min_final_size: ClassVar[int] = 2
    paper_size: ClassVar[int] = 32

    def _check_options(self) -> None:
        if not self.width_multiplier > 0:
            raise ValueError(
                f"{self.name}: width_multiplier must be > 0, got {self.width_multiplier!r}"
            )
        if self.norm not in models.NORMS:
            raise ValueError(f"{self.name}: norm must be one of {models.NORMS}, got {self.norm!r}")

    def module(self, num_classes: int) -> nn.Module:
        return models.ResNet18(num_classes, self.width_multiplier, self.norm)

    def spatial_sizes(self, size: int) -> list[int]:
        return models.ResNet18.spatial_sizes(size)


for _name, _family in (("conv_mnist", ConvMNIST), ("conv_cifar", ConvCIFAR), ("metz_conv", MetzConv),
                      ("resnet18", ResNet18Classification), ("conv6_mnist", Conv6MNIST)):
    tasks.register(_name)(_family)
