"""``mlp``: the per-parameter MLP learned optimizer of Metz et al. 2019.

L. Metz, N. Maheswaranathan, J. Nixon, C. D. Freeman, J. Sohl-Dickstein, "Understanding and
correcting pathologies in the training of learned optimizers", ICML 2019, Sec. 4.1 and
Appendix D.1 ("Architecture"), which this module implements line by line:

* "a single hidden layer feed forward MLP with 32 hidden units" (``hidden_size=32,
  hidden_layers=1``, the defaults; more layers are an option), ReLU;
* inputs: "momentum terms at a few different decay values: [0.5, 0.9, 0.99, 0.999, 0.9999]",
  "the current gradient as well as the current weight value" (``decays``);
* "the current training iteration is fed in transformed via applying a tanh squashing functions
  at different timescales: tanh(t/eta - 1) where eta is the timescale. We use 9 timescales
  logarithmicly spaced from (3, 300k)" (``timescales="metz2019"``, read as
  ``geomspace(3, 300_000, 9)``, both ends included). The default ``timescales`` are instead the 11
  of learned_optimization's ``MLPLOpt`` (1, 3, 10, ..., 1e5), with the same tanh(t/eta - 1);
* "All non-time features are normalized by the second moment with regard to other elements in
  the 'batch' dimension (the other weights of the weight tensor)": x / sqrt(mean(x^2) + 1e-8)
  over the tensor (``norm_eps``; learned_optimization's ``MLPLOpt`` uses 1e-5, and its six
  decays 0.1, 0.5, ..., 0.9999 and two hidden layers: ``lopt.importer`` sets those options);
* "the network produces two outputs, and we combine them in an exponential manner:
  exp(lambda_exp o_1) lambda_lin o_2 ... both set to 1e-3". With d = o_1 the direction and
  m = o_2 the log-magnitude:

    dw = -d * exp(m * 1e-3) * 1e-3   (``exp_mult``, ``step_mult``),

  so a freshly initialised optimizer takes steps of about 1e-3 and meta-training starts from a
  stable point.

``fused`` computes the same update with one fused kernel per update: the momenta, features
and MLP of a block of coordinates in registers, the hidden activations never written to memory.
On a CPU, a C++ XLA FFI kernel built on first use (``lopt/mlp_cpu.py``; W1 1.1-1.4x inner
steps/s, docs/performance.md), on by default (``fused="auto"``) and replaced by the unfused
update with a one-line notice where it cannot be built; on a GPU, a Pallas kernel compiled with
Triton (``lopt/mlp_fused.py``), run only with ``fused=True`` until a GPU run has checked it
(``lopt/execution.py``). It is an execution option, not part of the architecture: same
meta-params, same numbers up to float rounding, exports without it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt import execution
from lopt.base import EXECUTION_OPTION, dense_apply, dense_init, tensor_rms_normalize, time_features

DEFAULT_DECAYS = (0.5, 0.9, 0.99, 0.999, 0.9999)
DEFAULT_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)
#: Named timescale sets: Metz et al. 2019 App. D.1, "9 timescales logarithmicly spaced from
#: (3, 300k)".
TIMESCALE_PRESETS = {"metz2019": tuple(float(x) for x in np.geomspace(3.0, 300_000.0, 9))}


class MLPLOptState(NamedTuple):
    momenta: optax.Params  # per leaf: leaf.shape + (len(decays),), float32
    step: jax.Array  # int32 scalar: updates taken so far


@lopt.register("mlp")
@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Metz et al. 2019 per-parameter MLP optimizer (see module docstring).

    ``timescales``: a tuple of timescales eta, or the name of a preset in ``TIMESCALE_PRESETS``
    (``"metz2019"``: the paper's 9). ``fused``: compute ``update`` with a fused kernel (GPU:
    Pallas, ``lopt/mlp_fused.py``; CPU: C++, ``lopt/mlp_cpu.py``): ``"auto"`` (the default),
    True or False as ``lopt/execution.py`` says; same numbers up to float rounding, and
    gradients through it are those of the unfused path. ``bf16_hidden`` (with ``fused`` on,
    two or more hidden layers): the CPU kernel takes the middle hidden layers'
    products in bfloat16 with float32 sums (AVX512-BF16; about 2x the multiply-add rate on the
    layer that holds most of the work), so the update differs from float32 by up to a bound of
    about 2^-8 of the layer's absolute terms, stated and tested in ``lopt/mlp_cpu.py``: an
    approximation of the paper's float32 MLP, off by default; gradients through the update
    (TBPTT, merged) are still the float32 update's, taken along the bf16 trajectory. Where it
    cannot run (a CPU without AVX512-BF16, a GPU) it warns once and computes float32.
    """

    hidden_size: int = 32
    hidden_layers: int = 1
    decays: tuple[float, ...] = DEFAULT_DECAYS
    timescales: tuple[float, ...] | str = DEFAULT_TIMESCALES
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    norm_eps: float = 1e-8
    fused: bool | str = dataclasses.field(default=execution.AUTO, metadata=EXECUTION_OPTION)
    bf16_hidden: bool = dataclasses.field(default=False, metadata=EXECUTION_OPTION)
    name: ClassVar[str] = "mlp"

    def __post_init__(self):
        object.__setattr__(self, "decays", tuple(float(d) for d in self.decays))
        if isinstance(self.timescales, str):
            if self.timescales not in TIMESCALE_PRESETS:
                raise ValueError(
                    f"mlp: timescales must be a tuple or one of {sorted(TIMESCALE_PRESETS)}, "
                    f"got {self.timescales!r}"
                )
            object.__setattr__(self, "timescales", TIMESCALE_PRESETS[self.timescales])
        object.__setattr__(self, "timescales", tuple(float(x) for x in self.timescales))
        if not all(0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"mlp: decays must lie in [0, 1), got {self.decays}")
        if isinstance(self.hidden_size, bool) or int(self.hidden_size) < 1 or int(self.hidden_layers) < 0:
            raise ValueError(
                f"mlp: hidden_size must be >= 1 and hidden_layers >= 0, got {self.hidden_size} "
                f"and {self.hidden_layers}"
            )
        if not all(x > 0 for x in self.timescales):
            raise ValueError(f"mlp: timescales must be positive, got {self.timescales}")
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        if not self.norm_eps >= 0.0:
            raise ValueError(f"mlp: norm_eps must be >= 0, got {self.norm_eps}")
        object.__setattr__(self, "fused", execution.fused_option("mlp", self.fused))
        if self.fused is True and self.norm_eps != 1e-8:  # "auto" runs unfused, with a notice
            raise ValueError(
                f"mlp: the fused kernels normalise with norm_eps=1e-8, got {self.norm_eps}; "
                "use fused=False or 'auto'"
            )
        if not isinstance(self.bf16_hidden, (bool, np.bool_)):
            raise ValueError(f"mlp: bf16_hidden must be True or False, got {self.bf16_hidden!r}")
        object.__setattr__(self, "bf16_hidden", bool(self.bf16_hidden))
        if self.bf16_hidden and (self.fused is False or int(self.hidden_layers) < 2):
            raise ValueError(
                "mlp: bf16_hidden=True is an option of the fused kernel's middle hidden layers: "
                f"it needs fused=True or 'auto' and hidden_layers >= 2, got fused={self.fused}, "
                f"hidden_layers={self.hidden_layers}"
            )

    @property
    def num_features(self) -> int:
        return 2 + len(self.decays) + len(self.timescales)

    def init(self, key: jax.Array) -> dict:
        sizes = (self.num_features, *([self.hidden_size] * self.hidden_layers), 2)
        return {"mlp": dense_init(key, sizes)}

    def optimizer(self, meta_params: dict) -> optax.GradientTransformationExtraArgs:
        def init_fn(params):
            momenta = jax.tree.map(
                lambda p: jnp.zeros(jnp.shape(p) + (len(self.decays),), jnp.float32), params
            )
            return MLPLOptState(momenta=momenta, step=jnp.zeros([], jnp.int32))

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args
            if params is None:
                raise ValueError("the mlp learned optimizer needs `params` in update()")
            layers = self.step_layers(meta_params, state.step)
            leaves, treedef = jax.tree.flatten(updates)
            param_leaves = treedef.flatten_up_to(params)
            momenta_leaves = treedef.flatten_up_to(state.momenta)
            if sum(int(np.size(g)) for g in leaves) > 0 and execution.kernel_platform(self):
                from lopt import mlp_fused  # imports Pallas only when asked for

                steps, momenta = mlp_fused.fused_leaf_updates(
                    self, layers, leaves, param_leaves, momenta_leaves
                )
            else:
                steps, momenta = self.leaf_updates(layers, leaves, param_leaves, momenta_leaves)
            new_state = MLPLOptState(momenta=treedef.unflatten(momenta), step=state.step + 1)
            return treedef.unflatten(steps), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    @property
    def num_normalized_features(self) -> int:
        """Features normalised per tensor (gradient, parameter, one momentum per decay); the
        time features come after them in the first layer's inputs."""
        return 2 + len(self.decays)

    def step_layers(self, meta_params: dict, step: jax.Array) -> list[dict]:
        """The MLP of this step: the time features are the same for every coordinate, so their
        part of the first layer is a per-step bias, x @ W = x[:n] @ W[:n] + (t @ W[n:]),
        computed once (n = :attr:`num_normalized_features`)."""
        n_in = self.num_normalized_features
        t_feats = time_features(step, self.timescales, offset=1.0)
        first, rest = meta_params["mlp"][0], meta_params["mlp"][1:]
        layer0 = {"w": first["w"][:n_in], "b": t_feats @ first["w"][n_in:] + first["b"]}
        return [layer0, *rest]

    def leaf_updates(self, layers, grads, params, momenta) -> tuple[list, list]:
        """(updates, new momenta), one per leaf of the flat lists ``grads``, ``params`` (leaves
        of the parameter tree) and ``momenta`` (leaf.shape + (len(decays),)), with the MLP
        ``layers`` of :meth:`step_layers`: the unfused reference computation."""
        decays = jnp.asarray(self.decays, jnp.float32)
        n_in = self.num_normalized_features

        def features(g, p, m):
            """(new momenta, the leaf's normalised features as [size, n_in] rows)."""
            g32 = jnp.asarray(g, jnp.float32)
            p32 = jnp.asarray(p, jnp.float32)
            m = decays * m + (1.0 - decays) * g32[..., None]
            axes = tuple(range(g32.ndim))
            feats = jnp.concatenate(
                [
                    tensor_rms_normalize(g32[..., None], axes, self.norm_eps),
                    tensor_rms_normalize(p32[..., None], axes, self.norm_eps),
                    tensor_rms_normalize(m, axes, self.norm_eps),
                ],
                axis=-1,
            )
            return m, feats.reshape(-1, n_in)

        if not grads:
            return [], []
        new_momenta, rows = zip(*(features(g, p, m) for g, p, m in zip(grads, params, momenta)))
        # One MLP pass over every coordinate of every leaf (not one per leaf).
        out = dense_apply(layers, jnp.concatenate(rows))
        steps, start = [], 0
        for g in grads:
            o = out[start : start + g.size]
            start += g.size
            step = o[:, 0] * jnp.exp(o[:, 1] * self.exp_mult) * self.step_mult
            steps.append((-step).reshape(jnp.shape(g)).astype(jnp.result_type(g)))
        return steps, list(new_momenta)
