"""From an experiment config (an ``ml_collections.ConfigDict``) to a ``MetaTrainer``.

A config has these sections; every component section names a registry entry and passes the
rest of its keys as that component's options:

    seed: int                   num_outer_steps: int
    log_every: int              checkpoint_every: int
    num_devices: int (optional; 0 = shard particles over every visible device)
    task:           {name: "digits_mlp", hidden_sizes: (32,), ...}      -> tasks.get
    lopt:           {name: "mlp", hidden_size: 32, ...}                 -> lopt.get
    estimator:      {name: "pes", std: 0.01, ...}                       -> estimators.get
    meta_optimizer: {name: "adam", learning_rate: 1e-3, clip_grad_norm: None}  -> optax.<name>
    unroll:         {num_particles, trunc_length,
                     horizon: {name: "constant", length: 200},          -> estimators.schedules
                     meta_loss: {split, normalize, clip},
                     trunc_schedule: None or {name: "log_uniform", low: 5, high: 50}}
                     (with a trunc_schedule, trunc_length is the largest truncation)

``build`` checks every key before constructing anything, so a typo fails at once with a
message naming the key, long before the first compile.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.unroll import MetaLoss
from tasks.registry import ConfigError, check_kwargs

TOP_LEVEL = {
    "seed": int,
    "num_outer_steps": int,
    "log_every": int,
    "checkpoint_every": int,
    "task": dict,
    "lopt": dict,
    "estimator": dict,
    "meta_optimizer": dict,
    "unroll": dict,
}
# Optional top-level keys and their defaults.
OPTIONAL = {"num_devices": 0}  # devices to shard particles over (0: all visible, all hosts)
UNROLL_KEYS = {"num_particles", "trunc_length", "horizon", "meta_loss", "stagger", "trunc_schedule"}


def _as_dict(section: Any, where: str) -> dict:
    if isinstance(section, ml_collections.ConfigDict):
        return section.to_dict()
    if isinstance(section, dict):
        return dict(section)
    raise ConfigError(f"config.{where} must be a section (ConfigDict), got {type(section).__name__}")


def _named(section: Any, where: str) -> tuple[str, dict]:
    d = _as_dict(section, where)
    if "name" not in d:
        raise ConfigError(f"config.{where} needs a 'name'")
    name = d.pop("name")
    return name, d


def _component(registry_get, section, where: str):
    name, options = _named(section, where)
    try:
        return registry_get(name, **options)
    except ConfigError as e:
        raise ConfigError(f"config.{where}: {e}") from None


def meta_optimizer(section: Any) -> optax.GradientTransformation:
    """``optax.<name>(**options)``, optionally preceded by global-norm clipping."""
    name, options = _named(section, "meta_optimizer")
    clip = options.pop("clip_grad_norm", None)
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"config.meta_optimizer: optax has no optimizer '{name}'")
    try:
        check_kwargs(f"optax.{name}", factory, options)
    except ConfigError as e:
        raise ConfigError(f"config.meta_optimizer: {e}") from None
    opt = factory(**options)
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for unknown or missing top-level keys and unknown unroll options."""
    for key in config.keys():
        if key not in TOP_LEVEL and key not in OPTIONAL:
            valid = ", ".join(sorted([*TOP_LEVEL, *OPTIONAL]))
            raise ConfigError(f"unknown config key 'config.{key}'. Valid keys: {valid}.")
    missing = [k for k in TOP_LEVEL if k not in config]
    if missing:
        raise ConfigError(f"config is missing {', '.join('config.' + k for k in missing)}")
    for key in _as_dict(config.unroll, "unroll"):
        if key not in UNROLL_KEYS:
            raise ConfigError(
                f"unknown config key 'config.unroll.{key}'. Valid keys: {', '.join(sorted(UNROLL_KEYS))}."
            )
    for key in ("num_outer_steps", "log_every", "checkpoint_every"):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}")


def build(config: ml_collections.ConfigDict, mesh=None):
    """Validate ``config`` and construct the ``MetaTrainer`` it describes (nothing compiles);
    ``mesh`` shards the particles (see ``lopt.distributed.particle_mesh``)."""
    from lopt.outer import MetaTrainer  # outer imports this module

    validate(config)
    unroll = _as_dict(config.unroll, "unroll")
    if "num_particles" not in unroll or "trunc_length" not in unroll or "horizon" not in unroll:
        raise ConfigError("config.unroll needs num_particles, trunc_length and horizon")
    meta_loss_opts = _as_dict(unroll.get("meta_loss", {}), "unroll.meta_loss")
    try:
        check_kwargs("config.unroll.meta_loss", MetaLoss, meta_loss_opts)
        meta_loss = MetaLoss(**meta_loss_opts)
    except (ConfigError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return MetaTrainer(
        task_family=_component(tasks.get, config.task, "task"),
        learned_opt=_component(lopt.get, config.lopt, "lopt"),
        estimator=_component(estimators.get, config.estimator, "estimator"),
        meta_optimizer=meta_optimizer(config.meta_optimizer),
        num_particles=int(unroll["num_particles"]),
        trunc_length=int(unroll["trunc_length"]),
        horizon=_component(schedules.get, unroll["horizon"], "unroll.horizon"),
        meta_loss=meta_loss,
        stagger=bool(unroll.get("stagger", True)),
        mesh=mesh,
        trunc_schedule=(
            _component(schedules.get, unroll["trunc_schedule"], "unroll.trunc_schedule")
            if unroll.get("trunc_schedule")
            else None
        ),
    )
