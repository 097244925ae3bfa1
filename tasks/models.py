"""Flax models of the paper tasks (``tasks.image``, ``tasks.text``).

Every model is stateless (no batch-norm running averages, no dropout): the loss is a pure
function of (params, batch), as the inner loop needs. Each image model also reports, through
``spatial_sizes``, the feature-map sizes an input size leads to, so a task can reject an image
size it cannot take before anything is compiled.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
}
NORMS = ("batch", "layer", "none")


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense ``[in, out]`` or conv ``[*window, in, out]`` kernel."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def lecun_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """LeCun-normal (truncated at 2 std, variance 1 / fan_in), as ``jax.nn.initializers``.

    Drawn as a flat vector and reshaped: XLA on CPU compiles random bits for a rank-4 shape
    several times slower than for a vector, and task ``init`` runs inside compiled unrolls.
    """
    std = math.sqrt(1.0 / _fans(shape)[0]) / 0.87962566103423978  # std of N(0,1) cut at +-2
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
    return (flat * std).reshape(shape)


def he_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """He et al. (2015) normal, variance 2 / fan_in (for ReLU nets); flat draw."""
    return normal(math.sqrt(2.0 / _fans(shape)[0]))(key, shape, dtype)


def glorot_uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Glorot & Bengio (2010) uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); flat draw."""
    fan_in, fan_out = _fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -limit, limit)
    return flat.reshape(shape)


def normal(std: float) -> Callable:
    """N(0, std^2), drawn flat (see :func:`lecun_normal`)."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return (std * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)

    return init


# ----------------------------------------------------------------------------------------------
# Convolution with a loop-friendly gradient on CPU.

_DIMS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DIMS)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """((low, high) padding, output size) of a SAME convolution, as XLA computes them."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return _lax_conv(x, w, stride)


def _cpu_conv_fwd(x, w, stride):
    return _lax_conv(x, w, stride), (x, w)


def _cpu_conv_bwd(stride, residuals, dy):
    """Gradients as forward convolutions and matrix products.

    XLA:CPU runs the transposed convolutions of a convolution's own gradient 5-50x slower inside
    a loop body than outside (jax-ml/jax#12868), and every inner step here runs inside
    ``lax.scan``. So the kernel gradient is one matrix product of ``dy`` with the input
    patches under each kernel tap (strided slices), and for stride 1 the input gradient is a
    SAME forward convolution of ``dy`` with the flipped, transposed kernel. Same values as
    ``jax.vjp``; 10-35x faster inside ``lax.scan`` on CPU for the tasks here.
    """
    x, w = residuals
    kh, kw, c_in, _ = w.shape
    (pad_h, out_h), (pad_w, out_w) = (
        _same_pads(x.shape[1], kh, stride),
        _same_pads(x.shape[2], kw, stride),
    )
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    limit = lambda i, out: i + (out - 1) * stride + 1  # noqa: E731
    patches = jnp.concatenate(  # [n, out_h, out_w, kh * kw * c_in]: the input under each tap
        [
            jax.lax.slice(
                xp,
                (0, i, j, 0),
                (xp.shape[0], limit(i, out_h), limit(j, out_w), c_in),
                (1, stride, stride, 1),
            )
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    dw = jnp.einsum("nhwp,nhwo->po", patches, dy).reshape(w.shape)
    if stride == 1 and kh % 2 and kw % 2:
        dx = _lax_conv(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), 1)
    else:
        dx = jax.vjp(lambda x: _lax_conv(x, w, stride), x)[1](dy)[0]
    return dx, dw.astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """SAME-padded NHWC convolution with an HWIO kernel (the CPU-friendly gradient on CPU)."""
    if jax.default_backend() == "cpu":
        return _cpu_conv(x, w, stride)
    return _lax_conv(x, w, stride)


class Conv(nn.Module):
    """``nn.Conv`` (SAME padding, square kernel) computed with :func:`conv2d`."""

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = True
    kernel_init: Callable = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        init = self.kernel_init or lecun_normal
        kernel = self.param("kernel", init, (k, k, x.shape[-1], self.features))
        y = conv2d(x, kernel, self.stride)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


def _conv_out(size: int, stride: int) -> int:
    """Output size of a SAME-padded convolution."""
    return -(-size // stride)


def _pool_out(size: int) -> int:
    """Output size of a 2x2, stride-2, VALID max-pool."""
    return size // 2


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped).

    A reshape and a max rather than ``reduce_window``: the same values, and its gradient runs
    several times faster on CPU than ``select_and_scatter``.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MLP(nn.Module):
    """Fully connected classifier on flattened images (LeCun-normal weights, zero biases)."""

    hidden_sizes: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden_sizes:
            x = ACTIVATIONS[self.activation](nn.Dense(h, kernel_init=lecun_normal)(x))
        return nn.Dense(self.num_classes, kernel_init=lecun_normal)(x)

    @staticmethod
    def spatial_sizes(size: int, **_) -> list[int]:
        return [size]


class ConvPool(nn.Module):
    """Chen et al. (2020) conv_mnist / conv_cifar: [conv -> ReLU -> 2x2 max-pool] x n -> linear.

    Convolutions are SAME-padded with ``kernel_sizes`` and one ``stride`` (1 for conv_mnist,
    2 for conv_cifar); pools are 2x2 with stride 2 (VALID).
    """

    features: Sequence[int]
    kernel_sizes: Sequence[int]
    stride: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for f, k in zip(self.features, self.kernel_sizes):
            x = Conv(f, k, self.stride, kernel_init=lecun_normal)(x)
            x = max_pool_2x2(jax.nn.relu(x))
        return nn.Dense(self.num_classes, kernel_init=lecun_normal)(x.reshape(x.shape[0], -1))

    @staticmethod
    def spatial_sizes(size: int, *, num_layers: int, stride: int) -> list[int]:
        sizes = [size]
        for _ in range(num_layers):
            sizes += [_conv_out(sizes[-1], stride), _pool_out(_conv_out(sizes[-1], stride))]
        return sizes


class ConvGAP(nn.Module):
    """3x3 conv stack with ReLU, global average pool, linear (Metz et al. 2019's conv tasks).

    ``metz_conv``: 32 channels, strides 2, 2, 1; ``conv6_mnist``: six of 32, strides
    2, 1, 2, 1, 1, 1. Glorot-uniform kernels, zero biases.
    """

    features: Sequence[int]
    strides: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = glorot_uniform
        for f, s in zip(self.features, self.strides):
            x = jax.nn.relu(Conv(f, 3, s, kernel_init=init)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init)(x)

    @staticmethod
    def spatial_sizes(size: int, *, strides: Sequence[int]) -> list[int]:
        sizes = [size]
        for s in strides:
            sizes.append(_conv_out(sizes[-1], s))
        return sizes


class BatchStatNorm(nn.Module):
    """Batch normalisation with the current batch's statistics only (Ioffe & Szegedy 2015,
    Alg. 1, without running averages): stateless, so the loss stays a pure function. Under
    ``vmap`` over task instances each instance normalises with its own batch."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axes)
        var = jnp.var(x, axes)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _norm(kind: str) -> nn.Module | None:
    if kind == "batch":
        return BatchStatNorm()
    if kind == "layer":
        return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1)
    return None


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs, identity or 1x1 projection shortcut."""

    features: int
    stride: int
    norm: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.norm == "none"

        def norm(y):
            layer = _norm(self.norm)
            return y if layer is None else layer(y)

        conv = functools.partial(Conv, self.features, use_bias=bias, kernel_init=he_normal)
        y = conv(3, self.stride)(x)
        y = jax.nn.relu(norm(y))
        y = conv(3, 1)(y)
        y = norm(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(1, self.stride)(x)
            x = norm(x)
        return jax.nn.relu(x + y)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016, Sec. 4.2 layout with ImageNet widths): a 3x3
    stem of 64 channels at stride 1, four stages of two basic blocks of 64, 128, 256, 512
    channels (strides 1, 2, 2, 2), global average pool, linear. ``width_multiplier`` scales
    every width (for small runs). 11,173,962 parameters at width 1 with 10 classes."""

    num_classes: int
    width_multiplier: float = 1.0
    norm: str = "batch"

    STAGE_STRIDES = (1, 2, 2, 2)

    def width(self, base: int) -> int:
        return max(1, int(round(base * self.width_multiplier)))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.norm == "none"
        x = Conv(self.width(64), 3, 1, use_bias=bias, kernel_init=he_normal)(x)
        layer = _norm(self.norm)
        x = jax.nn.relu(x if layer is None else layer(x))
        for base, stride in zip((64, 128, 256, 512), self.STAGE_STRIDES):
            x = BasicBlock(self.width(base), stride, self.norm)(x)
            x = BasicBlock(self.width(base), 1, self.norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=lecun_normal)(x)

    @staticmethod
    def spatial_sizes(size: int, **_) -> list[int]:
        sizes = [size]
        for s in ResNet18.STAGE_STRIDES:
            sizes.append(_conv_out(sizes[-1], s))
        return sizes


# ----------------------------------------------------------------------------------------------
# Decoder-only transformer (GPT-2, Radford et al. 2019).


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t."""

    num_heads: int
    residual_init: Callable

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        head = d // self.num_heads
        init = normal(0.02)
        qkv = nn.Dense(3 * d, kernel_init=init)(x).reshape(b, t, 3, self.num_heads, head)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head)
        mask = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        return nn.Dense(d, kernel_init=self.residual_init)(y)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    num_heads: int
    mlp_ratio: int
    residual_init: Callable

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = x + CausalSelfAttention(self.num_heads, self.residual_init)(nn.LayerNorm()(x))
        h = nn.Dense(self.mlp_ratio * d, kernel_init=normal(0.02))(nn.LayerNorm()(x))
        return x + nn.Dense(d, kernel_init=self.residual_init)(jax.nn.gelu(h))


class GPT(nn.Module):
    """GPT-2-style decoder-only language model: token + learned position embeddings, pre-LN
    blocks, final LayerNorm, output layer tied to the token embedding. Weights N(0, 0.02),
    residual projections N(0, 0.02 / sqrt(2 * num_layers)) (Radford et al. 2019, Sec. 2.3)."""

    vocab_size: int
    context: int
    num_layers: int
    width: int
    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        embed = nn.Embed(self.vocab_size, self.width, embedding_init=normal(0.02))
        pos = self.param("position", normal(0.01), (self.context, self.width))
        x = embed(tokens) + pos[:t]
        residual_init = normal(0.02 / math.sqrt(2 * self.num_layers))
        for _ in range(self.num_layers):
            x = TransformerBlock(self.num_heads, self.mlp_ratio, residual_init)(x)
        return embed.attend(nn.LayerNorm()(x))
