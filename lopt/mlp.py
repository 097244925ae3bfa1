"""``mlp``: the per-parameter MLP learned optimizer of Metz et al. 2019.

L. Metz, N. Maheswaranathan, J. Nixon, C. D. Freeman, J. Sohl-Dickstein, "Understanding and
correcting pathologies in the training of learned optimizers", ICML 2019, Appendix B.

For every scalar parameter w with gradient g the MLP reads
  * g, w, and momenta m_b = b m_b + (1 - b) g for b in (0.5, 0.9, 0.99, 0.999, 0.9999),
    each divided by the square root of its second moment over the tensor;
  * time features tanh(t / x - 1) for log-spaced timescales x;
and outputs a direction d and a log-magnitude m. The update is

    dw = -d * exp(m * 1e-3) * 1e-3 .

The 1e-3 factors keep the first steps small, so a freshly initialised optimizer takes steps of
about 1e-3 and meta-training starts from a stable point.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lopt
from lopt.base import dense_apply, dense_init, map_leaves, tensor_rms_normalize, time_features

DEFAULT_DECAYS = (0.5, 0.9, 0.99, 0.999, 0.9999)
DEFAULT_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)


class MLPLOptState(NamedTuple):
    momenta: optax.Params  # per leaf: leaf.shape + (len(decays),), float32
    step: jax.Array  # int32 scalar: updates taken so far


@lopt.register("mlp")
@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Metz et al. 2019 per-parameter MLP optimizer (see module docstring)."""

    hidden_size: int = 32
    hidden_layers: int = 2
    decays: tuple[float, ...] = DEFAULT_DECAYS
    timescales: tuple[float, ...] = DEFAULT_TIMESCALES
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    name: ClassVar[str] = "mlp"

    def __post_init__(self):
        object.__setattr__(self, "decays", tuple(float(d) for d in self.decays))
        object.__setattr__(self, "timescales", tuple(float(x) for x in self.timescales))
        if not all(0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"mlp: decays must lie in [0, 1), got {self.decays}")

    @property
    def num_features(self) -> int:
        return 2 + len(self.decays) + len(self.timescales)

    def init(self, key: jax.Array) -> dict:
        sizes = (self.num_features, *([self.hidden_size] * self.hidden_layers), 2)
        return {"mlp": dense_init(key, sizes)}

    def optimizer(self, meta_params: dict) -> optax.GradientTransformationExtraArgs:
        decays = jnp.asarray(self.decays, jnp.float32)

        def init_fn(params):
            momenta = jax.tree.map(
                lambda p: jnp.zeros(jnp.shape(p) + (len(self.decays),), jnp.float32), params
            )
            return MLPLOptState(momenta=momenta, step=jnp.zeros([], jnp.int32))

        def update_leaf(g, p, m, t_feats):
            g32 = jnp.asarray(g, jnp.float32)
            p32 = jnp.asarray(p, jnp.float32)
            m = decays * m + (1.0 - decays) * g32[..., None]
            axes = tuple(range(g32.ndim))
            feats = jnp.concatenate(
                [
                    tensor_rms_normalize(g32[..., None], axes),
                    tensor_rms_normalize(p32[..., None], axes),
                    tensor_rms_normalize(m, axes),
                    jnp.broadcast_to(t_feats, g32.shape + t_feats.shape),
                ],
                axis=-1,
            )
            out = dense_apply(meta_params["mlp"], feats)
            direction, magnitude = out[..., 0], out[..., 1]
            step = direction * jnp.exp(magnitude * self.exp_mult) * self.step_mult
            return (-step).astype(jnp.result_type(g)), m

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args
            if params is None:
                raise ValueError("the mlp learned optimizer needs `params` in update()")
            t_feats = time_features(state.step, self.timescales, offset=1.0)
            new_updates, new_momenta = map_leaves(
                lambda g, p, m: update_leaf(g, p, m, t_feats), 2, updates, params, state.momenta
            )
            return new_updates, MLPLOptState(momenta=new_momenta, step=state.step + 1)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
