"""The meta-loss of the inner unroll (DESIGN.md, "estimators/"): one definition for every
estimator.

Per inner step, the loss of the parameters AFTER that step's update, on a fresh batch of the
``split`` ("train" or "valid") drawn independently of the batch the update's gradient used. A
truncation of T steps from position K therefore scores the T updates it made, f(theta_{K+1})
... f(theta_{K+T}): Metz et al. 2019, Figure 1, L_train(theta) = E_{x ~ D_train}[1/T
sum_{t=1..T} l(x; w(t))], and L_valid likewise with D_valid. Two options, both off by default
(the papers' objective is the plain mean): ``normalize="initial"`` divides each term by the loss
of the trajectory's initial parameters (on a batch of the same split, under ``stop_gradient``:
it does not depend on the meta-params), so task instances of different loss scales weigh alike;
``clip`` bounds each term (and turns a non-finite one into ``clip``) so a diverging inner run
cannot dominate. A wrapper with a ``meta_term`` (behaviour cloning) fuses its own term in
(``lopt.wrappers.meta_term``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

#: An initial loss at or below this is "zero": normalising by it would blow every term up to
#: the clip (and zero the meta-gradient), so such a trajectory's terms are left unnormalised.
NORMALIZER_FLOOR = 1e-8


@dataclasses.dataclass(frozen=True)
class MetaLoss:
    """How per-step losses become the meta-objective (module docstring).

    split: ``"train"`` or ``"valid"``: the data the loss after each update is measured on
      (Metz et al. 2019's L_train and L_valid, Figure 1).
    normalize: ``"none"`` (default) or ``"initial"``: divide by the loss of the trajectory's
      initial parameters (theta-independent, under ``stop_gradient``). A trajectory whose initial
      loss is <= ``NORMALIZER_FLOOR`` is left unnormalised and counted (``unnormalized_share``).
    clip: None (default) or a bound c > 0: each term becomes min(term, c), non-finite -> c.

    What the papers used: Metz et al. 2019 (Figure 1, Sec. 2.1): the plain mean of the per-step
    loss over the truncation, no normalisation, no clip (``normalize="none", clip=None``). L2O-DM
    (Andrychowicz et al. 2016, eq. 2) and Chen et al. 2020 (Sec. 3, L_f = sum_t w_t f(theta_t)):
    a weighted sum of raw losses, here with w_t = 1/T. Neither paper normalises or clips; both are
    this framework's options for mixing task instances of different loss scales (e.g.
    ``normalize="initial", clip=2.0`` in the quickstart).
    """

    split: str = "train"
    normalize: str = "none"
    clip: float | None = None

    def __post_init__(self):
        if self.split not in ("train", "valid"):
            raise ValueError(f"meta_loss.split must be 'train' or 'valid', got {self.split!r}")
        if self.normalize not in ("initial", "none"):
            raise ValueError(f"meta_loss.normalize must be 'initial' or 'none', got {self.normalize!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"meta_loss.clip must be None or positive, got {self.clip}")

    def normalizer(self, init_loss: jax.Array) -> jax.Array:
        """What a term is divided by: the initial loss, or 1 (no normalisation, or an initial
        loss at or below ``NORMALIZER_FLOOR``)."""
        if self.normalize == "none":
            return jnp.ones_like(init_loss)
        return jnp.where(init_loss > NORMALIZER_FLOOR, init_loss, 1.0)

    def term(self, loss: jax.Array, init_loss: jax.Array) -> jax.Array:
        return self.bound(loss / jax.lax.stop_gradient(self.normalizer(init_loss)))

    def bound(self, x: jax.Array) -> jax.Array:
        """With ``clip``: min(x, clip), non-finite values become ``clip``; else x unchanged."""
        if self.clip is None:
            return x
        return jnp.where(jnp.isfinite(x), jnp.minimum(x, self.clip), self.clip)

    def at_bound(self, x: jax.Array) -> jax.Array:
        """bool: the term sits at the clip (or is non-finite): it carries no gradient."""
        if self.clip is None:
            return ~jnp.isfinite(x)
        return ~jnp.isfinite(x) | (x >= self.clip)


__all__ = ["MetaLoss", "NORMALIZER_FLOOR"]
