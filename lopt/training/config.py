"""From an experiment config (an ``ml_collections.ConfigDict``) to a ``MetaTrainer``.

A config has these sections; every component section names a registry entry and passes the
rest of its keys as that component's options:

    modules: optional, the user's modules (dotted names or .py paths) imported before any name
                        is looked up, so components of one's own resolve (tasks.user_code)
    seed: int                   num_outer_steps: int
    log_every: int              checkpoint_every: int
    checkpoint_keep: int (optional, 2): the newest checkpoints kept
    checkpoint_keep_every: int (optional, 0 = off): also keep every checkpoint whose step is a
                        multiple of this (so ``lopt-export --step`` finds it later)
    num_devices: int (optional; 0 = shard particles over every visible device)
    task:           {name: "digits_mlp", hidden_sizes: (32,), ...}      -> tasks.get
    lopt:           {name: "mlp", hidden_size: 32, ...}                 -> lopt.get
    estimator:      {name: "pes", std: 0.01, ...}                       -> estimators.get
    meta_optimizer: {name: "adam", learning_rate: 1e-3, clip_grad_norm: None}  -> optax.<name>
    unroll:         {num_particles, trunc_length,
                     horizon: {name: "constant", length: 200},          -> estimators.schedules
                     meta_loss: {split, normalize, clip},
                     trunc_schedule: None or {name: "log_uniform", low: 5, high: 50},
                     replay: optional {capacity, p_threshold}           -> estimators.resets.ELOReplay
                     reset: optional {name: "fresh", ...}                -> estimators.resets.get
                                 (a reset policy by name; replay is ELO's, the default fresh)
                     behaviour_cloning: optional {teacher, schedule}     -> lopt.wrappers.BehaviourCloning
                     self_improving: optional {teachers, schedule, initial_prob}
                                                                        -> lopt.wrappers.SelfImproving}
    curriculum:     optional {stages, period, min_periods, max_periods, valid_seeds, ...}
                     -> lopt.training.curriculum.Curriculum (Chen et al. 2020, Algorithm 1)
    imitation:      optional {prob, teachers, length, ...} -> estimators.imitation.Imitation
    health:         optional {max_skipped, max_clipped_logs, max_nonfinite_share}  (lopt.training.loop)
    eval:           optional {every, lengths, seeds, tasks, baseline, seed_offset}
                     -> lopt.training.continuous_eval.EvalOptions (held-out evaluation during the run)

An optional section is off when absent, None, empty or ``enabled: False``. ``build`` checks
every key and value before constructing anything, so a mistake fails at once with a message
naming the key, long before the first compile.

A value a config file derives from another is an ``ml_collections`` reference, resolved when
read, i.e. after command-line overrides (``c.unroll.get_ref("trunc_length") * 10``; a tuple of
them: :func:`tuple_ref`), so ``to_dict``, ``config.json`` and everything here see plain values.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import optax
from ml_collections import FieldReference

import estimators
import lopt
import tasks
from estimators import resets, schedules
from estimators.base import UnrollMismatch
from estimators.imitation import Imitation
from estimators.resets import ELOReplay, FreshReset
from estimators.meta_loss import MetaLoss
from lopt.wrappers import BehaviourCloning, SelfImproving
from tasks import user_code
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
    "modules": (),  # the user's modules that register components (tasks.user_code)
    "num_devices": 0,  # devices to shard particles over (0: all visible, all hosts)
    "curriculum": None,  # Curriculum options plus `enabled` (see curriculum())
    "imitation": None,  # estimators.imitation.Imitation options plus `enabled` (Chen et al. 2020)
    "health": None,  # lopt.training.loop.Health options
    "checkpoint_keep": 2,  # the newest checkpoints kept (lopt.training.checkpoint.Checkpointer)
    "checkpoint_keep_every": 0,  # also keep steps that are multiples of this (0: none)
    "eval": None,  # lopt.training.continuous_eval.EvalOptions plus `enabled`
}
UNROLL_KEYS = {
    "num_particles", "trunc_length", "horizon", "meta_loss", "stagger", "trunc_schedule",
    "replay", "reset", "behaviour_cloning", "self_improving", "particle_chunk",
}


class _TupleReference(FieldReference):
    """A tuple-valued reference whose items may be references, each resolved when read."""

    def get(self):
        value = super().get()
        if value is None:
            return None
        return tuple(x.get() if isinstance(x, FieldReference) else x for x in value)


def tuple_ref(*items: Any) -> FieldReference:
    """A tuple for a config field whose items may be references to other fields, resolved when
    the field is read (after command-line overrides), e.g. evaluation lengths H and 10 H:
    ``c.eval.lengths = tuple_ref(n, 10 * n)`` with ``n = c.unroll.get_ref("trunc_length")``.
    (ml_collections resolves a reference held directly in a field, not one inside a tuple.) An
    override of the field itself (``--config.eval.lengths="(50,500)"``) replaces the tuple."""
    return _TupleReference(tuple(items), field_type=tuple)


def as_dict(section: Any, where: str) -> dict:
    if isinstance(section, ml_collections.ConfigDict):
        return section.to_dict()
    if isinstance(section, dict):
        return dict(section)
    raise ConfigError(f"config.{where} must be a section (ConfigDict), got {type(section).__name__}")


def _named(section: Any, where: str) -> tuple[str, dict]:
    d = as_dict(section, where)
    if "name" not in d:
        raise ConfigError(f"config.{where} needs a 'name'")
    name = d.pop("name")
    return name, d


def _line(e: BaseException) -> str:
    """An exception's message as one line."""
    return " ".join(str(e).split()) or type(e).__name__


def _component(registry_get, section, where: str):
    name, options = _named(section, where)
    try:
        return registry_get(name, **options)
    except (ConfigError, TypeError, ValueError, OSError) as e:  # OSError: a dataset not prepared
        raise ConfigError(f"config.{where}: {_line(e)}") from None


def section_options(section: Any, where: str, factory: Any) -> dict | None:
    """Options of an optional config section for ``factory``: None when the section is None,
    empty, or has ``enabled: False``; unknown keys raise ``ConfigError`` naming ``config.<where>``."""
    if section is None:
        return None
    options = as_dict(section, where)
    enabled = options.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"config.{where}.enabled must be True or False, got {enabled!r}")
    if not options or not enabled:
        return None
    try:
        check_kwargs(f"config.{where}", factory, options)
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    return options


def _build(factory: Any, options: dict | None, where: str, *args) -> Any:
    if options is None:
        return None
    try:
        return factory(*args, **options)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"config.{where}: {_line(e)}") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def meta_optimizer(section: Any) -> optax.GradientTransformation:
    """``optax.<name>(**options)``, optionally preceded by global-norm clipping."""
    name, options = _named(section, "meta_optimizer")
    clip = options.pop("clip_grad_norm", None)
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"config.meta_optimizer.name: optax has no optimizer '{name}'; use e.g. adam")
    try:
        check_kwargs(f"optax.{name}", factory, options)
    except ConfigError as e:
        raise ConfigError(f"config.meta_optimizer: {e}") from None
    lr = options.get("learning_rate")
    if lr is not None and not callable(lr):
        x = _number(lr)
        if x is None or not (math.isfinite(x) and x > 0):
            raise ConfigError(
                f"config.meta_optimizer.learning_rate: must be a positive number, got {lr!r} "
                "(a negative rate would ascend the meta-loss); use e.g. 1e-3"
            )
    if clip is not None:
        x = _number(clip)
        if x is None or not (math.isfinite(x) and x > 0):
            raise ConfigError(
                f"config.meta_optimizer.clip_grad_norm: must be None or a positive number, got {clip!r}"
            )
    try:
        opt = factory(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.meta_optimizer: {_line(e)}") from None
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


def load_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Import ``config.modules`` (the user's modules registering components) and return them
    as recorded; a module that is missing or fails to import is a one-line ConfigError."""
    entries = config.get("modules", ()) or ()
    if isinstance(entries, str) or not isinstance(entries, (tuple, list)):
        raise ConfigError(f"config.modules: a tuple of module names or .py paths, got {entries!r}")
    return user_code.import_modules(entries, "config.modules")


def _named_sections(config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """Where ``config`` names a registered component: (section path, section, registry)."""
    unroll = as_dict(config.unroll, "unroll") if "unroll" in config else {}
    out = [("task", config.get("task"), tasks.REGISTRY), ("lopt", config.get("lopt"), lopt.REGISTRY),
           ("estimator", config.get("estimator"), estimators.REGISTRY),
           ("unroll.horizon", unroll.get("horizon"), schedules.REGISTRY),
           ("unroll.trunc_schedule", unroll.get("trunc_schedule"), schedules.REGISTRY),
           ("unroll.reset", unroll.get("reset"), resets.REGISTRY)]
    evaluation = config.get("eval")
    sections = (dict, ml_collections.ConfigDict)
    eval_tasks = evaluation.get("tasks") if isinstance(evaluation, sections) else None
    for label, section in (as_dict(eval_tasks, "eval.tasks") if eval_tasks else {}).items():
        out.append((f"eval.tasks.{label}", section, tasks.REGISTRY))
    return out


def user_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.modules`` and the modules that registered the components ``config`` names
    (its task, learned optimizer, estimator, schedules, reset policy, evaluation tasks) when
    they are not the package's own: what a run records in ``config.json`` so that resuming,
    exporting and evaluating it import them again."""
    found = []
    for _, section, registry in _named_sections(config):
        name = section.get("name") if isinstance(section, (dict, ml_collections.ConfigDict)) else None
        origin = registry.origin(name) if isinstance(name, str) else None
        entry = origin and user_code.entry_of(origin.module, origin.file)
        if entry:
            found.append(entry)
    return user_code.merge(config.get("modules", ()) or (), found)


def with_modules(config: ml_collections.ConfigDict, entries) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``modules`` are ``entries`` (a tuple), other keys unchanged."""
    import copy

    entries = tuple(entries)
    if not entries and "modules" not in config:
        return config
    out = copy.deepcopy(config)
    with out.unlocked():
        if "modules" in out:
            del out["modules"]
        out.modules = tuple(entries)
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for unknown or missing top-level keys and unknown unroll options
    (after importing ``config.modules``, so the names they register resolve)."""
    load_modules(config)
    for key in config.keys():
        if key not in TOP_LEVEL and key not in OPTIONAL:
            valid = ", ".join(sorted([*TOP_LEVEL, *OPTIONAL]))
            raise ConfigError(f"unknown config key 'config.{key}'. Valid keys: {valid}.")
    missing = [k for k in TOP_LEVEL if k not in config]
    if missing:
        raise ConfigError(f"config is missing {', '.join('config.' + k for k in missing)}")
    for key in as_dict(config.unroll, "unroll"):
        if key not in UNROLL_KEYS:
            raise ConfigError(
                f"unknown config key 'config.unroll.{key}'. Valid keys: {', '.join(sorted(UNROLL_KEYS))}."
            )
    for key in ("num_outer_steps", "log_every", "checkpoint_every"):
        _integer(config[key], key, 1)
    _integer(config.seed, "seed", 0)
    _integer(config.get("num_devices", 0), "num_devices", 0)
    _integer(config.get("checkpoint_keep", OPTIONAL["checkpoint_keep"]), "checkpoint_keep", 1)
    _integer(config.get("checkpoint_keep_every", 0), "checkpoint_keep_every", 0)
    unroll = as_dict(config.unroll, "unroll")
    for key in ("num_particles", "trunc_length"):
        if key not in unroll:
            raise ConfigError(f"config.unroll.{key}: missing; set it (e.g. num_particles=8, trunc_length=20)")
        _integer(unroll[key], f"unroll.{key}", 1)
    _integer(unroll.get("particle_chunk", 0), "unroll.particle_chunk", 0)
    if not isinstance(unroll.get("stagger", True), bool):
        raise ConfigError(f"config.unroll.stagger: must be True or False, got {unroll['stagger']!r}")
    curriculum(config)
    eval_options(config)


def _integer(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.{where}: must be an integer >= {low}, got {value!r}")
    return value


def curriculum(config: ml_collections.ConfigDict):
    """The ``Curriculum`` of ``config.curriculum``, or None when the section is absent, None,
    or has ``enabled=False``."""
    from lopt.training.curriculum import Curriculum

    options = section_options(config.get("curriculum"), "curriculum", Curriculum)
    if options is None:
        return None
    try:
        return Curriculum(**options)
    except (TypeError, ValueError) as e:
        message = str(e) if str(e).startswith("curriculum:") else f"curriculum: {e}"
        raise ConfigError(f"config.{message}") from None


def eval_options(config: ml_collections.ConfigDict):
    """The ``EvalOptions`` of ``config.eval``, or None when it is off; its instances must be
    apart from the curriculum's validation instances."""
    from lopt.training.continuous_eval import EvalOptions

    options = section_options(config.get("eval"), "eval", EvalOptions)
    if options is None:
        return None
    built = _build(EvalOptions, options, "eval")
    cur = curriculum(config)
    if cur is not None:
        valid = range(cur.valid_seed_offset, cur.valid_seed_offset + cur.valid_seeds)
        if set(valid) & set(built.instances()):
            raise ConfigError(
                f"config.eval.seed_offset: instances {built.seed_offset}.. overlap the curriculum's "
                f"validation instances {cur.valid_seed_offset}..; keep them apart"
            )
    return built


def eval_tasks(config: ml_collections.ConfigDict, training_task: Any) -> dict[str, Any]:
    """``{label: task family}`` to evaluate on: ``config.eval.tasks`` built by ``tasks.get``, or
    the training task under its name."""
    options = eval_options(config)
    if options is None or options.tasks is None:
        return {as_dict(config.task, "task")["name"]: training_task}
    return {label: _component(tasks.get, section, f"eval.tasks.{label}")
            for label, section in options.tasks.items()}


def inner_update(config: ml_collections.ConfigDict, learned_opt: Any) -> Any:
    """The inner-update factory: the learned optimizer, or it wrapped in behaviour cloning or
    self-improving mixing (one at most: both choose the inner update)."""
    unroll = as_dict(config.unroll, "unroll")
    bc = section_options(unroll.get("behaviour_cloning"), "unroll.behaviour_cloning", BehaviourCloning)
    si = section_options(unroll.get("self_improving"), "unroll.self_improving", SelfImproving)
    if bc is not None and si is not None:
        raise ConfigError(
            "config.unroll: behaviour_cloning and self_improving both choose the inner update; "
            "enable one"
        )
    for options in (bc, si):
        if options is not None and "learned_opt" in options:
            raise ConfigError("config.unroll: the learned optimizer is config.lopt; remove learned_opt")
    if bc is not None:
        return _build(BehaviourCloning, bc, "unroll.behaviour_cloning", learned_opt)
    if si is not None:
        return _build(SelfImproving, si, "unroll.self_improving", learned_opt)
    return learned_opt


def reset_policy(config: ml_collections.ConfigDict) -> Any:
    """``unroll.reset`` -> the reset policy it names; ``unroll.replay`` -> ELO's replay buffer
    (the shorthand the ELO configs use); else fresh resets."""
    unroll = as_dict(config.unroll, "unroll")
    options = section_options(unroll.get("replay"), "unroll.replay", ELOReplay)
    if unroll.get("reset"):
        if options is not None:
            raise ConfigError("config.unroll: replay and reset both choose the reset policy; set "
                              "one (replay is reset={name: 'elo_replay', ...})")
        return _component(resets.get, unroll["reset"], "unroll.reset")
    return FreshReset() if options is None else _build(ELOReplay, options, "unroll.replay")


def estimator(config: ml_collections.ConfigDict) -> Any:
    """``config.estimator``, wrapped in imitation episodes when ``config.imitation`` is on."""
    base = _component(estimators.get, config.estimator, "estimator")
    options = section_options(config.get("imitation"), "imitation", Imitation)
    if options is None:
        return base
    if "base" in options:
        raise ConfigError("config.imitation: 'base' is the configured estimator; remove it")
    built = _build(Imitation, options, "imitation", base)
    if built.per_stage and curriculum(config) is None:
        raise ConfigError(
            "config.imitation.prob has one value per curriculum stage but config.curriculum is "
            "off; give one float or enable the curriculum"
        )
    return built


def build(config: ml_collections.ConfigDict, mesh=None):
    """Validate ``config`` and construct the ``MetaTrainer`` it describes (nothing compiles);
    ``mesh`` shards the particles (see ``lopt.training.distributed.particle_mesh``)."""
    from estimators.unroll import Unroller
    from lopt.training.trainer import MetaTrainer

    validate(config)
    unroll = as_dict(config.unroll, "unroll")
    if "num_particles" not in unroll or "trunc_length" not in unroll or "horizon" not in unroll:
        raise ConfigError("config.unroll needs num_particles, trunc_length and horizon")
    meta_loss_opts = as_dict(unroll.get("meta_loss", {}), "unroll.meta_loss")
    check_kwargs("config.unroll.meta_loss", MetaLoss, meta_loss_opts)
    meta_loss = _build(MetaLoss, meta_loss_opts, "unroll.meta_loss")
    learned_opt = _component(lopt.get, config.lopt, "lopt")
    trunc_schedule = None
    if unroll.get("trunc_schedule"):
        trunc_schedule = _component(schedules.get, unroll["trunc_schedule"], "unroll.trunc_schedule")
    try:
        unroller = Unroller(
            task_family=_component(tasks.get, config.task, "task"),
            learned_opt=inner_update(config, learned_opt),
            num_particles=int(unroll["num_particles"]),
            trunc_length=int(unroll["trunc_length"]),
            horizon=_component(schedules.get, unroll["horizon"], "unroll.horizon"),
            meta_loss=meta_loss,
            reset=reset_policy(config),
            trunc_schedule=trunc_schedule,
            stagger=bool(unroll.get("stagger", True)),
            particle_chunk=int(unroll.get("particle_chunk", 0)),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.unroll: {e}") from None
    try:  # what the estimator needs of the unroll (estimators.base.check_unroll), and the
        # components' contracts (estimators.contract: traced with eval_shape, nothing compiles)
        return MetaTrainer(unroller, estimator(config), meta_optimizer(config.meta_optimizer), mesh)
    except UnrollMismatch as e:
        raise ConfigError(f"config.{e.key}: {e}") from None
