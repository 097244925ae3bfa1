"""The gradient-estimator contract and helpers shared by the ES family."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from estimators import keys as keys_lib
from estimators.unroll import UnrollOutput, Unroller, UnrollState
from lopt.base import MetaParams

EstimatorState = Any


class Estimator(Protocol):
    """Static, hashable; knows only its own hyperparameters (DESIGN.md, "estimators/").

    ``grad`` receives ``outer_step``, the run's one clock (``MetaTrainState.outer_step``), and
    passes it down to the unroll (schedules, alpha ramps and the reset policy's gates read it).
    ``partition`` says which state leaves have a leading per-particle (or per-pair) axis and
    are sharded over devices (True) and which are replicated (False).
    """

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> EstimatorState:
        """Particles' states and whatever the estimator carries between truncations."""

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: EstimatorState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, EstimatorState, dict]:
        """Meta-gradient estimate, new state, and scalar metrics."""

    def partition(self, state: EstimatorState) -> Any:
        """A tree of bools like ``state``: True for per-particle (sharded) leaves."""


def unroll_partition(state: UnrollState) -> UnrollState:
    """Particles are per-particle; the reset policy's state (ELO's buffer) is replicated."""
    return UnrollState(
        jax.tree.map(lambda _: True, state.particles), jax.tree.map(lambda _: False, state.reset_state)
    )


def at_stage(estimator: Any, state: EstimatorState, stage: int) -> EstimatorState:
    """The estimator state for curriculum stage ``stage`` (host side): the estimator's own
    ``at_stage`` if it has one (imitation's per-stage r), else ``state`` unchanged."""
    fn = getattr(estimator, "at_stage", None)
    return state if fn is None else fn(state, stage)


class UnrollMismatch(ValueError):
    """An estimator cannot run with this unroll; ``key`` names the config entry to change
    (``unroll.num_particles``, ``unroll.replay``, ``estimator``)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_unroll(estimator: Any, unroller: Unroller, num_devices: int | None = None) -> None:
    """THE check of what an estimator needs of the unroll, one line per failure
    (:class:`UnrollMismatch`), before anything is traced: the particles split evenly over the
    devices; an antithetic estimator (``antithetic = True``: the ES family) holds whole
    (+eps, -eps) pairs on every device, at least ``min_pairs`` in all; an estimator with
    ``fresh_only`` (full_es) runs no reset policy but fresh trajectories; one with
    ``persistent`` (PES) needs trajectories that continue across truncations; a
    ``particle_chunk`` divides a device's particles (into whole pairs). The trainer
    calls it with the whole unroller and its device count; estimators' ``init`` with the
    unroller they get (a device's shard inside ``shard_map``: ``num_shards`` devices)."""
    est = getattr(estimator, "base", estimator)  # inside imitation episodes
    name = type(est).__name__
    devices = unroller.num_shards if num_devices is None else int(num_devices)
    p = unroller.num_particles * unroller.num_shards
    if p % devices:
        raise UnrollMismatch("unroll.num_particles", (
            f"{p} particles do not split over {devices} devices; use a multiple of {devices}, "
            f"e.g. num_particles={devices * max(1, -(-p // devices))}"))
    if getattr(est, "antithetic", False):
        unit = 2 * devices
        if p % unit:
            where = (f"each of the {devices} devices must hold whole pairs ({p} particles is "
                     f"{p / devices:g} per device)" if devices > 1 else f"{p} is odd")
            raise UnrollMismatch("unroll.num_particles", (
                f"{name} runs antithetic (+eps, -eps) pairs and {where}; use a multiple of "
                f"{unit}, e.g. num_particles={unit * max(1, -(-p // unit))}"))
        need = int(getattr(est, "min_pairs", 1))
        if p // 2 < need:
            raise UnrollMismatch("unroll.num_particles", (
                f"{name} estimates per-element variances from at least {need} antithetic pairs; "
                f"use num_particles >= {2 * need}"))
    chunk, per_device, step = unroller.particle_chunk, p // devices, 2 if getattr(est, "antithetic", False) else 1
    if chunk and chunk < per_device and (per_device % chunk or chunk % step):
        fits = [d for d in range(step, chunk, step) if per_device % d == 0] or [0]
        raise UnrollMismatch("unroll.particle_chunk", (
            f"{chunk} must divide the {per_device} particles of a device"
            f"{' into whole antithetic pairs' if step == 2 else ''}; e.g. particle_chunk={fits[-1]}"))
    if getattr(est, "fresh_only", False) and unroller.reset.segment_reset:
        raise UnrollMismatch("unroll.replay", (
            f"{name} runs complete fresh trajectories and cannot restore from the buffer; "
            "disable replay or pick tbptt, es, pes, merged"))
    if getattr(est, "persistent", False) and unroller.reset.segment_reset:
        raise UnrollMismatch("estimator", (
            f"{name} with a replay buffer (unroll.replay) is truncated ES: every segment "
            "starts restored or fresh, so the perturbation sums restart each truncation; use "
            "estimator es, which computes the same gradients under its own name"))


def sample_perturbation(
    unroller: Unroller, key: jax.Array, meta_params: MetaParams, std: float
) -> MetaParams:
    """One Gaussian perturbation eps_i ~ N(0, std^2 I) per (global) pair, leading axis N."""
    leaves, treedef = jax.tree.flatten(meta_params)

    def one(k):
        ks = jax.random.split(k, len(leaves))
        return [std * jax.random.normal(kk, jnp.shape(x), jnp.float32) for kk, x in zip(ks, leaves)]

    keys = keys_lib.index_keys(key, keys_lib.global_indices(unroller.num_particles // 2, unroller.shard_axis))
    return jax.tree.unflatten(treedef, jax.vmap(one)(keys))


def antithetic_params(meta_params: MetaParams, eps: MetaParams) -> MetaParams:
    """[2N, ...] meta-params, theta + eps_i at particle 2i and theta - eps_i at 2i + 1."""
    return from_pairs(
        jax.tree.map(lambda t, e: jnp.stack([t + e, t - e], axis=1), meta_params, eps)
    )


def antithetic(unroller: Unroller) -> Unroller:
    """The unroller as the ES family runs it: antithetic partners share keys (``pairs``) and
    each particle unrolls its own perturbed meta-params (``per_particle``)."""
    return dataclasses.replace(unroller, pairs=True, per_particle=True)


def antithetic_unroll(
    unroller: Unroller, meta_params: MetaParams, unroll_state: UnrollState, key: jax.Array,
    std: float, outer_step: jax.Array,
) -> tuple[MetaParams, UnrollState, UnrollOutput]:
    """One truncation of the antithetic particles (truncated ES / PES, Vicol et al. 2021) of
    an :func:`antithetic` unroller: draws eps_i per pair, unrolls theta + eps_i and
    theta - eps_i with shared task keys, and returns ``(eps, new unroll state, UnrollOutput)``."""
    k_eps, k_unroll = jax.random.split(key)
    eps = sample_perturbation(unroller, k_eps, meta_params, std)
    unroll, out = unroller.unroll(antithetic_params(meta_params, eps), unroll_state, k_unroll, outer_step)
    return eps, unroll, out


def split_signs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The positive and negative members' values of an interleaved [2N, ...] array."""
    return x[0::2], x[1::2]


def weighted_sum(coef: jax.Array, tree: MetaParams) -> MetaParams:
    """sum_i coef_i * tree_i over the leading axis.

    Written as a multiply and a sum, not a ``tensordot``: XLA:CPU in jaxlib 0.10.2 miscompiles
    a reduction feeding a dot whose other operand is a broadcast scalar (PES's all-zero initial
    perturbation sums), returning garbage (pyproject.toml excludes that version; this keeps the
    pattern out of our programs on any version)."""
    return jax.tree.map(
        lambda x: jnp.sum(coef.reshape(coef.shape + (1,) * (x.ndim - 1)) * x, axis=0), tree
    )


def to_pairs(tree: Any) -> Any:
    """[2N, ...] interleaved particles -> [N, 2, ...] (row i: pair i's +, - members)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // 2, 2) + x.shape[1:]), tree)


def from_pairs(tree: Any) -> Any:
    """Inverse of :func:`to_pairs`."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * 2,) + x.shape[2:]), tree)


def keep_positive(tree: Any) -> Any:
    """Both members of every pair continue from the positive trajectory's state."""
    return jax.tree.map(lambda x: jnp.repeat(x[0::2], 2, axis=0), tree)


def per_device(unroller: Unroller, tree: Any) -> Any:
    """Mark replicated meta-params as varying across devices before differentiating.

    Inside ``shard_map``, ``jax.grad`` with respect to a replicated value returns the *sum* of
    every device's gradient (the transpose of the implicit replicated-to-varying cast is a
    psum). Estimators want this device's own gradient, averaged explicitly by the trainer."""
    if unroller.shard_axis is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, unroller.shard_axis, to="varying"), tree)


def pair_mean(unroller: Unroller, x: jax.Array) -> jax.Array:
    """Mean over the leading (pair) axis across every shard."""
    m = x.mean(0)
    return m if unroller.shard_axis is None else jax.lax.pmean(m, unroller.shard_axis)


@dataclasses.dataclass(frozen=True)
class ESOptions:
    """Options shared by every ES-type estimator.

    std: perturbation standard deviation sigma. The default 0.01 (sigma^2 = 1e-4) is ours, a
      scale at which antithetic differences of the per-parameter MLP's meta-loss stay local;
      Metz et al. 2019 smooth with sigma^2 = 0.01 ("set to 0.01 in all experiments", Sec. 3),
      i.e. ``std=0.1``, which ``configs/metz2019.py`` uses.
    """

    std: float = 0.01

    #: Particles run as (+eps, -eps) pairs sharing keys (:func:`check_unroll`).
    antithetic = True

    def __post_init__(self):
        if not self.std > 0:
            raise ValueError(f"{type(self).__name__}: std must be positive, got {self.std}")

    def es_coefficients(self, diff: jax.Array) -> jax.Array:
        """Per-pair weights c_i with  g = sum_i c_i eps_i = 1/(2 sigma^2 N) sum_i dL_i eps_i
        (the antithetic ES estimator, Salimans et al. 2017 / Vicol et al. 2021 eq. 3)."""
        return diff / (2.0 * self.std**2 * diff.shape[0])


def unroll_metrics(unroller: Unroller, out: UnrollOutput) -> dict[str, jax.Array]:
    """Metrics every estimator reports about its unroll (means over this device's particles;
    the trainer combines devices: counts summed, ``position_max`` maxed, the rest averaged).

    ``inner_loss``: mean training-batch loss over the steps that ran; ``inner_steps``: steps
    run (all particles); ``trajectories_done``: trajectories that ended (per pair when
    ``unroller.pairs``); ``position_mean``/``position_max``: the inner step the particles
    reached at the end of the truncation (the effective unroll length); ``restored_share``:
    particles that started from a stored state; ``clipped_share``: meta-loss terms at the clip
    or non-finite (no gradient); ``nonfinite_share``: training losses that are NaN/inf (a
    diverged inner run); ``unnormalized_share``: with ``normalize="initial"``, terms left
    unnormalised because the trajectory's initial loss was ~0."""
    done = out.done[0::2] if unroller.pairs else out.done
    ran = out.mask.astype(jnp.float32)
    n_ran = jnp.maximum(ran.sum(), 1.0)
    share = lambda flags: (flags.astype(jnp.float32) * ran).sum() / n_ran  # noqa: E731
    return {
        "inner_loss": out.step_mean(out.raw_losses).mean(),
        "inner_steps": out.mask.sum(),
        "trajectories_done": done.sum(),
        "position_mean": out.position.astype(jnp.float32).mean(),
        "position_max": out.position.max().astype(jnp.float32),
        "restored_share": out.info.restored.astype(jnp.float32).mean(),
        "clipped_share": share(unroller.meta_loss.at_bound(out.losses)),
        "nonfinite_share": share(~jnp.isfinite(out.raw_losses)),
        "unnormalized_share": share(out.unnormalized),
        **out.extras,
    }
