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
    curriculum:     optional {enabled: True, stages: (100, 200, 500, 1000), period: 100,
                     min_periods: 2, max_periods: None, valid_seeds: 8,
                     valid_metric: "final_train_loss", restart_from_best: True}
                     -> lopt.curriculum.Curriculum (Chen et al. 2020, Algorithm 1); while it is
                     enabled, each stage's length replaces unroll.horizon (see lopt.outer.train)

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
OPTIONAL = {
    "num_devices": 0,  # devices to shard particles over (0: all visible, all hosts)
    "curriculum": None,  # lopt.curriculum.Curriculum options plus `enabled` (see curriculum())
    "imitation": None,  # estimators.imitation.Imitation options plus `enabled` (Chen et al. 2020)
}
UNROLL_KEYS = {
    "num_particles", "trunc_length", "horizon", "meta_loss", "stagger", "trunc_schedule",
    "replay", "behaviour_cloning", "self_improving",
}


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
    curriculum(config)


def curriculum(config: ml_collections.ConfigDict):
    """The ``lopt.curriculum.Curriculum`` of ``config.curriculum``, or None when the section is
    absent, None, or has ``enabled=False``."""
    from lopt.curriculum import Curriculum

    section = config.get("curriculum")
    if section is None:
        return None
    options = _as_dict(section, "curriculum")
    enabled = options.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"config.curriculum.enabled must be True or False, got {enabled!r}")
    check_kwargs("config.curriculum", Curriculum, options)
    try:
        built = Curriculum(**options)
    except (TypeError, ValueError) as e:
        message = str(e) if str(e).startswith("curriculum:") else f"curriculum: {e}"
        raise ConfigError(f"config.{message}") from None
    return built if enabled else None


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
    from estimators import imitation as imitation_lib
    from estimators import replay as replay_lib

    estimator = imitation_lib.wrap_estimator(
        _component(estimators.get, config.estimator, "estimator"), config.get("imitation")
    )
    if isinstance(estimator, imitation_lib.Imitation) and estimator.per_stage and curriculum(config) is None:
        raise ConfigError(
            "config.imitation.prob has one value per curriculum stage but config.curriculum is "
            "off; give one float or enable the curriculum"
        )
    replay = replay_lib.from_config(unroll.get("replay"))
    bc = imitation_lib.behaviour_cloning_from_config(unroll.get("behaviour_cloning"))
    si = imitation_lib.self_improving_from_config(unroll.get("self_improving"))
    if bc is not None and si is not None:
        raise ConfigError(
            "config.unroll: behaviour_cloning and self_improving both choose the inner update; "
            "enable one"
        )
    return MetaTrainer(
        task_family=_component(tasks.get, config.task, "task"),
        learned_opt=_component(lopt.get, config.lopt, "lopt"),
        estimator=estimator,
        replay=replay,
        behaviour_cloning=bc,
        self_improving=si,
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
