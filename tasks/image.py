"""Image-classification task families of the seed papers, each on its paper's dataset by default:
the shared base (datasets, batches, preprocessing) and the MLP families here, the convolutional
ones in ``tasks.conv``.

Chen et al. 2020 ("Training Stronger Baselines for Learning to Optimize"), Sec. 5 "Optimizee
Settings", after Andrychowicz et al. 2016: ``mlp_orig`` (one hidden layer of 20 sigmoid units,
batch 128), ``mlp_relu``, ``mlp_deeper`` (two hidden layers of 20) and ``conv_mnist`` (conv 16
3x3 stride 1, max-pool 2x2, conv 32 5x5 stride 1, max-pool 2x2, linear), all on MNIST
(default ``dataset="mnist"``), and ``conv_cifar`` (the same with stride-2 convolutions) on
CIFAR-10 (``"cifar10"``). Metz et al. 2019 ("Understanding and correcting pathologies in the
training of learned optimizers"): ``metz_conv`` (three 3x3 convs of 32 channels, strides 2, 2,
1, ReLU, Glorot init, global average pool, linear; Sec. 4.2 and App. D.2) on 10-class subsets
of 32x32 ImageNet (``"imagenet_resized/32x32"``), and ``conv6_mnist`` (six 3x3 convs of 32,
strides 2, 1, 2, 1, 1, 1; App. F, Fig. 14) on 28x28 MNIST (``"mnist"``). The ELO tasks
(Table 1: ImageNet-1K 32x32): ``mlp_d3_w128`` (three hidden layers of 128 on 32x32x3) and
``resnet18`` (CIFAR-style), both on ``"imagenet_resized/32x32"``.

The paper datasets are prepared once from raw files with ``python scripts/prepare_data.py``
(``tasks.catalogue``); building a family whose dataset is not prepared fails at once, before
any model is built, with the command that prepares it. ``dataset="digits"`` (scikit-learn's
8x8 digits, embedded) runs any family on a CPU in seconds, for smoke tests. Every family runs
on any image dataset ``tasks.data.load`` serves (a prepared catalogue dataset; ``"idx:DIR"``
for local IDX files), with ``resize``/``channels``/``scale``/``classes`` preprocessing. An
image size a model cannot take is rejected when the family is built, with the ``resize`` that
fixes it. Instances differ by their initialisation seed and, with ``permute_classes``, a
relabelling of the classes (``metz_conv``: by their class subset). Batches are drawn inside
jit from device-resident arrays that a compiled loop passes in as arguments
(``tasks.base.bind_data``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import tasks
from tasks import catalogue, models, preprocess
from tasks import data as data_lib
from tasks.base import check_split, sample_indices
from tasks.errors import DatasetNotPreparedError


@dataclasses.dataclass(frozen=True)
class ImageClassification:
    """Shared options and behaviour; subclasses add the model (``module``) and its options.

    Spec: ``{"seed": int32 init seed, "perm": int32 [num_classes] relabelling}``.
    """

    batch_size: int = 128
    dataset: str = catalogue.SMOKE_IMAGE  # each registered family names its paper's dataset
    data_dir: str | None = None
    resize: int | tuple[int, int] | None = None
    channels: int | None = None
    scale: str = "unit"
    classes: tuple[int, ...] | None = None
    permute_classes: bool = False
    # None: the model's own initialisers (flax defaults: LeCun normal, zero biases); a float s:
    # every parameter, biases included, drawn from N(0, s^2) (Chen et al. 2020's optimizees).
    init_std: float | None = None
    # Arrays bound inside jit by `tasks.base.bind_data`; not part of the family's identity.
    bound_arrays: Any = dataclasses.field(default=None, compare=False, repr=False)
    name: ClassVar[str] = "image_classification"
    #: The smallest final feature-map size (per side) the model is meant for.
    min_final_size: ClassVar[int] = 1
    #: The input side length the papers use (suggested in size errors).
    paper_size: ClassVar[int] = 28

    def __post_init__(self):
        size = preprocess.normalize_size(self.resize, f"{self.name}: resize")
        if size is not None:
            object.__setattr__(self, "resize", size[0] if size[0] == size[1] else size)
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        batch_size = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be a positive int, got {batch_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(
                f"{self.name}: channels must be None, 1 (grey) or 3 (colour), got {self.channels!r}"
            )
        if self.init_std is not None and not float(self.init_std) > 0:
            raise ValueError(f"{self.name}: init_std must be None or positive, got {self.init_std!r}")
        if self.scale not in preprocess.SCALES:
            raise ValueError(
                f"{self.name}: scale must be one of {preprocess.SCALES}, got {self.scale!r}"
            )
        self._require_data()  # before anything reads data or builds a model
        self._check_options()
        self._check_image_size()

    def _require_data(self) -> None:
        """Fail fast, from the filesystem alone, if ``dataset`` is not there to load."""
        try:
            data_lib.require(self.dataset, self.data_dir)
        except DatasetNotPreparedError as e:
            raise data_lib.with_smoke_hint(e, self.name, catalogue.SMOKE_IMAGE) from None

    # --- model: overridden by subclasses ------------------------------------------------------

    def _check_options(self) -> None:
        """Validate the model's own options (subclasses)."""

    def module(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def spatial_sizes(self, size: int) -> list[int]:
        """Side lengths of the feature maps, input first, for an input side ``size``."""
        return [size]

    # --- data ---------------------------------------------------------------------------------

    @property
    def data(self) -> data_lib.Dataset:
        return data_lib.load(
            self.dataset,
            self.data_dir,
            resize=self.resize,
            channels=self.channels,
            scale=self.scale,
            classes=self.classes,
        )

    @property
    def arrays(self) -> dict:
        """{split: {"image", "label"}} device arrays (the bound ones inside a compiled loop)."""
        return self.data.splits if self.bound_arrays is None else self.bound_arrays

    def bind(self, arrays: dict) -> "ImageClassification":
        bound = copy.copy(self)  # no __post_init__: options were checked when self was built
        object.__setattr__(bound, "bound_arrays", arrays)
        return bound

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def num_outputs(self) -> int:
        """Logits the model produces."""
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data.image_shape

    def _check_image_size(self) -> None:
        h, w, _ = self.image_shape

        def fits(side: int) -> bool:
            sizes = self.spatial_sizes(side)
            return min(sizes) >= 1 and sizes[-1] >= self.min_final_size

        for side in (h, w):
            if fits(side):
                continue
            sizes = self.spatial_sizes(side)
            need = next(n for n in range(1, 4097) if fits(n))
            fix = max(need, self.paper_size) if need > 8 else need
            raise ValueError(
                f"{self.name}: images of {h}x{w} (dataset {self.dataset!r}"
                + (f", resize={self.resize!r}" if self.resize is not None else "")
                + f") are too small for this model: its feature maps would be {sizes} pixels per "
                f"side, and it needs at least {need}x{need} inputs (a final map of at least "
                f"{self.min_final_size}x{self.min_final_size}). Set resize={fix} (or any size "
                f">= {need}) to resize the images."
            )

    # --- the TaskFamily protocol -------------------------------------------------------------

    def sample(self, key: jax.Array) -> dict:
        k_seed, k_perm = jax.random.split(key)
        n = self.num_classes
        perm = jax.random.permutation(k_perm, n) if self.permute_classes else jnp.arange(n)
        seed = jax.random.randint(k_seed, (), 0, jnp.iinfo(jnp.int32).max)
        return {"seed": seed, "perm": perm.astype(jnp.int32)}

    def init(self, spec: dict, key: jax.Array) -> dict:
        dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
        key = jax.random.fold_in(key, spec["seed"])
        params = self.module(self.num_outputs).init(key, dummy)["params"]
        if self.init_std is None:
            return params
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return treedef.unflatten(
            [float(self.init_std) * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        )

    def _targets(self, spec: dict, label: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(class index per example, example weights or None)."""
        return spec["perm"][label], None

    def loss(self, spec: dict, params: dict, batch: dict) -> tuple[jax.Array, dict]:
        logits = self.module(self.num_outputs).apply({"params": params}, batch["image"])
        labels, weight = self._targets(spec, batch["label"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        if weight is None:
            return ce.mean(), {"accuracy": correct.mean()}
        total = jnp.maximum(weight.sum(), 1.0)
        return (ce * weight).sum() / total, {"accuracy": (correct * weight).sum() / total}

    def batch(self, spec: dict, key: jax.Array, split: str) -> dict:
        check_split(split)
        arrays = self.arrays[split]
        idx = sample_indices(key, self.batch_size, arrays["label"].shape[0])
        return {"image": arrays["image"][idx], "label": arrays["label"][idx]}

    def full_batch(self, split: str) -> dict:
        """The whole split as one batch (for evaluation)."""
        check_split(split)
        return {k: self.arrays[split][k] for k in ("image", "label")}

    def param_count(
        self, image_shape: tuple[int, int, int] | None = None, num_classes: int | None = None
    ) -> int:
        """Parameters of the model for ``image_shape``/``num_classes`` (default: this data's)."""
        shape = tuple(image_shape or self.image_shape)
        module = self.module(num_classes or self.num_outputs)
        params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
        return sum(math.prod(p.shape) for p in jax.tree.leaves(params["params"]))


def _positive_ints(name: str, what: str, values) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or min(values) < 1:
        raise ValueError(f"{name}: {what} must be a non-empty tuple of positive ints, got {values}")
    return values


# ----------------------------------------------------------------------------------------------
# MLPs (Chen et al. 2020; ELO's mlp_d3_w128).


@dataclasses.dataclass(frozen=True)
class MLPClassification(ImageClassification):
    """Fully connected classifier on the flattened image."""

    hidden_sizes: tuple[int, ...] = (20,)
    activation: str = "sigmoid"

    def _check_options(self) -> None:
        hidden = tuple(int(h) for h in self.hidden_sizes)  # () is logistic regression
        if any(h < 1 for h in hidden):
            raise ValueError(f"{self.name}: hidden_sizes must be positive, got {hidden}")
        object.__setattr__(self, "hidden_sizes", hidden)
        if self.activation not in models.ACTIVATIONS:
            raise ValueError(
                f"{self.name}: unknown activation {self.activation!r}; choose from "
                f"{sorted(models.ACTIVATIONS)}"
            )

    def module(self, num_classes: int) -> nn.Module:
        return models.MLP(self.hidden_sizes, num_classes, self.activation)


#: Chen et al. 2020, Sec. 5 ("Training Details"): "The optimizee parameters are initialized by a
#: random normal distribution of standard deviation of 0.01. The batch size for optimizees is
#: 128." It applies to every optimizee of the paper (mlp_orig ... conv_cifar).
CHEN_INIT_STD = 0.01


@dataclasses.dataclass(frozen=True)
class MLPOrig(MLPClassification):
    """One hidden layer of 20 sigmoid units, batch 128, N(0, 0.01^2) init, on MNIST
    (Andrychowicz et al. 2016's MNIST MLP; Chen et al. 2020 Sec. 5, "MLP-orig")."""

    dataset: str = "mnist"
    init_std: float | None = CHEN_INIT_STD
    name: ClassVar[str] = "mlp_orig"


@dataclasses.dataclass(frozen=True)
class MLPRelu(MLPClassification):
    """``mlp_orig`` with ReLU units, on MNIST (Chen et al. 2020 Sec. 5, "MLP-ReLU")."""

    dataset: str = "mnist"
    activation: str = "relu"
    init_std: float | None = CHEN_INIT_STD
    name: ClassVar[str] = "mlp_relu"


@dataclasses.dataclass(frozen=True)
class MLPDeeper(MLPClassification):
    """Two hidden layers of 20 sigmoid units, on MNIST (Chen et al. 2020 Sec. 5,
    "MLP-deeper")."""

    dataset: str = "mnist"
    hidden_sizes: tuple[int, ...] = (20, 20)
    init_std: float | None = CHEN_INIT_STD
    name: ClassVar[str] = "mlp_deeper"


@dataclasses.dataclass(frozen=True)
class MLPD3W128(MLPClassification):
    """Three hidden layers of 128 ReLU units on 32x32x3 images, on ImageNet-1K 32x32 (ELO
    Table 1, "MLP")."""

    dataset: str = "imagenet_resized/32x32"
    hidden_sizes: tuple[int, ...] = (128, 128, 128)
    activation: str = "relu"
    resize: int | tuple[int, int] | None = 32
    channels: int | None = 3
    name: ClassVar[str] = "mlp_d3_w128"
    paper_size: ClassVar[int] = 32


for _name, _family in (("mlp_orig", MLPOrig), ("mlp_relu", MLPRelu), ("mlp_deeper", MLPDeeper),
                      ("mlp_d3_w128", MLPD3W128)):
    tasks.register(_name)(_family)
