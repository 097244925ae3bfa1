"""``hyper_adam``: Adam whose hyperparameters are the meta-params.

D. P. Kingma, J. Ba, "Adam: A method for stochastic optimization", ICLR 2015, Algorithm 1:

    m_t = b1 m_{t-1} + (1 - b1) g_t            v_t = b2 v_{t-1} + (1 - b2) g_t^2
    m_hat = m_t / (1 - b1^t)                   v_hat = v_t / (1 - b2^t)
    dp = -lr * m_hat / (sqrt(v_hat + eps_root) + eps)

``eps_root`` (optax's name; 0 in Kingma & Ba) sits inside the square root. Meta-training
differentiates *through* this update (second-order TBPTT differentiates it with respect to the
gradient), and d sqrt(v)/dv is infinite at v = 0, which every coordinate with an exactly-zero
gradient reaches (the always-black pixels of 8x8 digits feed such weights): inf * 0 = NaN and
the whole meta-gradient is lost. With ``eps_root`` > 0 the derivative is finite everywhere;
the default 1e-16 adds sqrt(1e-16) = 1e-8 to the denominator only where v is ~0.

The meta-params are ``{"log_lr", "log_one_minus_b1", "log_one_minus_b2"}`` (float32 scalars),
so ``lr = exp(log_lr)`` and ``b = 1 - exp(log_one_minus_b)``: unconstrained, with b in (0, 1)
whenever ``log_one_minus_b < 0``; ``eps`` is fixed. This is the smallest "learned optimizer":
three numbers, whose meta-loss landscape can be plotted, used for truncation-bias studies
(Wu et al., "Understanding short-horizon bias in stochastic meta-optimization", ICLR 2018;
Vicol et al., "Unbiased gradient estimation in unrolled computation graphs with persistent
evolution strategies", ICML 2021) and as a sanity check of every estimator. With
``meta_params_for(1e-3, 0.9, 0.999)`` it follows ``optax.adam(1e-3, eps_root=eps_root)`` to float
tolerance (the arithmetic mirrors ``optax.scale_by_adam``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt


class HyperAdamState(NamedTuple):
    count: jax.Array  # int32 scalar: updates taken so far
    mu: optax.Params  # first moment, float32 per leaf
    nu: optax.Params  # second moment, float32 per leaf


def _check_hyperparameters(learning_rate: float, b1: float, b2: float) -> None:
    if not learning_rate > 0:
        raise ValueError(f"hyper_adam: learning_rate must be positive, got {learning_rate}")
    for nm, b in (("b1", b1), ("b2", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"hyper_adam: {nm} must lie in [0, 1), got {b}")


@lopt.register("hyper_adam")
@dataclasses.dataclass(frozen=True)
class HyperAdam:
    """Adam with meta-learned log learning rate and log(1 - beta)s (see module docstring).

    ``init`` returns the meta-params of (``init_learning_rate``, ``init_b1``, ``init_b2``); the
    key is unused.
    """

    init_learning_rate: float = 1e-3
    init_b1: float = 0.9
    init_b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 1e-16
    name: ClassVar[str] = "hyper_adam"

    def __post_init__(self):
        _check_hyperparameters(self.init_learning_rate, self.init_b1, self.init_b2)
        if not self.eps >= 0:
            raise ValueError(f"hyper_adam: eps must be >= 0, got {self.eps}")
        if not self.eps_root >= 0:
            raise ValueError(f"hyper_adam: eps_root must be >= 0, got {self.eps_root}")

    @staticmethod
    def meta_params_for(learning_rate: float, b1: float, b2: float) -> dict:
        """Meta-params for Adam(learning_rate, b1, b2); logs taken in float64, stored float32."""
        _check_hyperparameters(learning_rate, b1, b2)
        return {
            "log_lr": jnp.asarray(np.log(float(learning_rate)), jnp.float32),
            "log_one_minus_b1": jnp.asarray(np.log1p(-float(b1)), jnp.float32),
            "log_one_minus_b2": jnp.asarray(np.log1p(-float(b2)), jnp.float32),
        }

    @staticmethod
    def hyperparameters(meta_params: dict) -> dict[str, jax.Array]:
        """``{"learning_rate", "b1", "b2"}`` the meta-params encode (arrays; jit-friendly)."""
        return {
            "learning_rate": jnp.exp(meta_params["log_lr"]),
            "b1": 1.0 - jnp.exp(meta_params["log_one_minus_b1"]),
            "b2": 1.0 - jnp.exp(meta_params["log_one_minus_b2"]),
        }

    def init(self, key: jax.Array) -> dict:
        del key
        return self.meta_params_for(self.init_learning_rate, self.init_b1, self.init_b2)

    def optimizer(self, meta_params: dict) -> optax.GradientTransformationExtraArgs:
        eps, eps_root = self.eps, self.eps_root

        def init_fn(params):
            zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
            return HyperAdamState(
                count=jnp.zeros([], jnp.int32),
                mu=jax.tree.map(zeros, params),
                nu=jax.tree.map(zeros, params),
            )

        def update_fn(updates, state, params=None, **extra_args):
            del params, extra_args
            mp = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), meta_params)
            lr = jnp.exp(mp["log_lr"])
            one_minus_b1 = jnp.exp(mp["log_one_minus_b1"])
            one_minus_b2 = jnp.exp(mp["log_one_minus_b2"])
            b1, b2 = 1 - one_minus_b1, 1 - one_minus_b2
            count = optax.safe_increment(state.count)
            # Kingma & Ba, Alg. 1: moments, bias corrections, step (as in optax.scale_by_adam;
            # 1 - b is used as exp(log(1 - b)) directly, like optax's 1 - b of a Python float).
            g32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), updates)
            mu = jax.tree.map(lambda g, m: one_minus_b1 * g + b1 * m, g32, state.mu)
            nu = jax.tree.map(lambda g, v: one_minus_b2 * g**2 + b2 * v, g32, state.nu)
            c1 = 1 - b1**count
            c2 = 1 - b2**count
            new_updates = jax.tree.map(
                lambda g, m, v: (-lr * ((m / c1) / (jnp.sqrt(v / c2 + eps_root) + eps))).astype(
                    jnp.result_type(g)
                ),
                updates,
                mu,
                nu,
            )
            return new_updates, HyperAdamState(count=count, mu=mu, nu=nu)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
