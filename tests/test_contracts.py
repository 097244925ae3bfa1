"""A user's component that breaks its contract fails when the trainer is built, before anything
compiles, in one line naming the component, the method and what is wrong (tasks.contract,
lopt.contract, estimators.contract; traced with jax.eval_shape only)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import resets, schedules
from estimators.unroll import Unroller
from lopt.training.trainer import MetaTrainer
from tasks.contract import ContractError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Bowl:
    """A valid task family; the broken ones below override one method each."""

    name: ClassVar[str] = "bowl"

    def sample(self, key):
        return {"c": jax.random.normal(key, (3,))}

    def init(self, spec, key):
        return {"x": jnp.zeros(3), "b": jnp.zeros(())}

    def batch(self, spec, key, split):
        return {"noise": 0.1 * jax.random.normal(key, (3,))}

    def loss(self, spec, params, batch):
        return jnp.mean((params["x"] + params["b"] - spec["c"] - batch["noise"]) ** 2), {}


class SpecWithFloat(Bowl):
    def sample(self, key):
        return {"c": jax.random.normal(key, (3,)), "scale": 1.0}


class VectorLoss(Bowl):
    def loss(self, spec, params, batch):
        return (params["x"] - spec["c"]) ** 2, {}


class BareLoss(Bowl):
    def loss(self, spec, params, batch):
        return jnp.sum(params["x"] ** 2)


class IntParams(Bowl):
    def init(self, spec, key):
        return {"x": jnp.zeros(3, jnp.int32)}


class AuxList(Bowl):
    def loss(self, spec, params, batch):
        return jnp.sum(params["x"] ** 2), [jnp.zeros(())]


class Mutable(Bowl):
    __hash__ = None  # as a dataclass that is not frozen (eq=True) has


@dataclasses.dataclass(frozen=True)
class NoBatch:
    name: ClassVar[str] = "no_batch"

    def sample(self, key):
        return {}

    def init(self, spec, key):
        return {}

    def loss(self, spec, params, batch):
        return jnp.zeros(()), {}


class _State(NamedTuple):
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class Sgd:
    """A valid learned optimizer (SGD with a learned log learning rate); ``bug`` breaks it."""

    bug: str = ""
    name: ClassVar[str] = "sgd"

    def init(self, key):
        if self.bug == "int_meta_params":
            return {"log_lr": jnp.zeros((), jnp.int32)}
        return {"log_lr": jnp.log(jnp.float32(0.1))}

    def optimizer(self, meta_params):
        if self.bug == "no_extra_args":  # a plain GradientTransformation's update
            return optax.GradientTransformation(
                lambda params: (), lambda updates, state, params=None: (updates, state))
        lr = jnp.exp(meta_params["log_lr"])

        def init_fn(params):
            return _State(jnp.zeros([], jnp.int32))

        def update_fn(grads, state, params=None, **extra):
            updates = jax.tree.map(lambda g: -lr * g, grads)
            if self.bug == "drop_leaf":
                updates = {"x": updates["x"]}
            if self.bug == "flatten":
                updates = jax.tree.map(jnp.ravel, updates)
            count = state.count + (1.0 if self.bug == "float_count" else 1)
            return updates, _State(count)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class NoPartition:
    """An estimator that lacks ``partition``."""

    def init(self, unroller, key, meta_params):
        return unroller.init(meta_params, key)

    def grad(self, unroller, meta_params, state, key, outer_step):
        raise AssertionError("never traced")


@dataclasses.dataclass(frozen=True)
class BadPartition(NoPartition):
    def partition(self, state):
        return {"particles": True}


@dataclasses.dataclass(frozen=True)
class OldGrad(NoPartition):
    def partition(self, state):
        return jax.tree.map(lambda _: True, state)

    def grad(self, unroller, meta_params, state, key):  # no outer_step
        raise AssertionError("never traced")


class _Keep(NamedTuple):
    entry: Any


@dataclasses.dataclass(frozen=True)
class Policy:
    """A reset policy keeping one state; ``bug`` breaks it."""

    bug: str = ""
    segment_reset = False

    def init(self, example):
        if self.bug == "zeros_like":
            return _Keep(jax.tree.map(jnp.zeros_like, example))
        return _Keep(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), example))

    def draw(self, state, keys, outer_step):
        n = keys.shape[0] + (1 if self.bug == "draw_shape" else 0)
        return jnp.zeros((n,), bool), None

    def push_index(self, keys, n_steps):
        return None

    def observe(self, state, offered, valid, shard_axis, num_shards=1):
        if self.bug == "observe_structure":
            return state.entry
        return state


@dataclasses.dataclass(frozen=True)
class NoObserve:
    segment_reset = False

    def init(self, example):
        return None

    def draw(self, state, keys, outer_step):
        return jnp.zeros(keys.shape[:1], bool), None

    def push_index(self, keys, n_steps):
        return None


def trainer(task=Bowl(), learned_opt=None, estimator=None, reset=None) -> MetaTrainer:
    unroller = Unroller(task, learned_opt or Sgd(), num_particles=2, trunc_length=3,
                        horizon=schedules.constant(6), reset=reset or resets.FreshReset())
    return MetaTrainer(unroller, estimator or estimators.get("tbptt"), optax.adam(1e-3))


CASES = [
    # (what breaks, trainer kwargs, the line's start)
    ("spec", dict(task=SpecWithFloat()), "task family 'bowl' (tests.test_contracts.SpecWithFloat): "
     "sample(key)['scale'] is float 1.0, not an array; a Spec holds only arrays"),
    ("loss shape", dict(task=VectorLoss()), "task family 'bowl' (tests.test_contracts.VectorLoss): "
     "loss(spec, params, batch) returned a loss of shape (3,); it must be a scalar"),
    ("loss tuple", dict(task=BareLoss()), "task family 'bowl' (tests.test_contracts.BareLoss): "
     "loss(spec, params, batch) returned an array of shape (); it must return (scalar loss, aux dict)"),
    ("params dtype", dict(task=IntParams()), "task family 'bowl' (tests.test_contracts.IntParams): "
     "init(spec, key)['x'] has dtype int32, not a float"),
    ("aux", dict(task=AuxList()), "task family 'bowl' (tests.test_contracts.AuxList): loss(spec, "
     "params, batch) returned aux list; it must be a dict of metrics"),
    ("hashable", dict(task=Mutable()), "task family 'bowl' (tests.test_contracts.Mutable) is not "
     "hashable; make it a frozen dataclass"),
    ("method", dict(task=NoBatch()), "task family 'no_batch' (tests.test_contracts.NoBatch) has "
     "no method batch(spec, key, split), which the TaskFamily contract requires"),
    ("update structure", dict(learned_opt=Sgd("drop_leaf")), "learned optimizer 'sgd' "
     "(tests.test_contracts.Sgd): update(...)'s updates changed the tree structure of the params "
     "(it lacks ['b'])"),
    ("update shapes", dict(learned_opt=Sgd("flatten")), "learned optimizer 'sgd' "
     "(tests.test_contracts.Sgd): update(...)'s updates['b'] is float32[1] where the params['b'] "
     "is float32[]"),
    ("state dtype", dict(learned_opt=Sgd("float_count")), "learned optimizer 'sgd' "
     "(tests.test_contracts.Sgd): update(...)'s new state.count is float32[] where init(params)'s "
     "state.count is int32[]; lax.scan carries the state"),
    ("extra args", dict(learned_opt=Sgd("no_extra_args")), "learned optimizer 'sgd' "
     "(tests.test_contracts.Sgd): update(grads, state, params, value=, outer_step=, key=) raised "
     "TypeError"),
    ("meta-params", dict(learned_opt=Sgd("int_meta_params")), "learned optimizer 'sgd' "
     "(tests.test_contracts.Sgd): init(key)['log_lr'] has dtype int32, not a float"),
    ("no partition", dict(estimator=NoPartition()), "estimator (tests.test_contracts.NoPartition) "
     "has no method partition(state), which the Estimator contract requires"),
    ("bad partition", dict(estimator=BadPartition()), "estimator (tests.test_contracts."
     "BadPartition): partition(state) must return a tree of bools shaped like the state"),
    ("grad signature", dict(estimator=OldGrad()), "estimator (tests.test_contracts.OldGrad): "
     "grad(unroller, meta_params, state, key, outer_step) cannot be called so (too many "
     "positional arguments)"),
    ("no observe", dict(reset=NoObserve()), "reset policy (tests.test_contracts.NoObserve) has no "
     "method observe(state, offered, valid, shard_axis, num_shards), which the reset-policy "
     "contract requires"),
    ("draw shape", dict(reset=Policy("draw_shape")), "reset policy (tests.test_contracts.Policy): "
     "draw(state, keys, outer_step) returned restore bool[3]; it must be bool[2]"),
    ("observe structure", dict(reset=Policy("observe_structure")), "reset policy "
     "(tests.test_contracts.Policy): observe(...)'s state changed the tree structure of "
     "init(example)'s state"),
    ("replicated", dict(reset=Policy("zeros_like")), "reset policy (tests.test_contracts.Policy): "
     "its state is replicated (the same on every device) but ['init'].entry.spec['c'] is made "
     "from per-particle values"),
]


@pytest.mark.parametrize("kwargs, start", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_broken_component_fails_in_one_line_before_compiling(kwargs, start):
    compiled = []

    def listener(event, *args, **kw):
        if "backend_compile" in event:
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x + 1)(jnp.float32(0.5) * 3)  # the listener hears a compile
        assert compiled
        compiled.clear()
        with pytest.raises(ContractError) as e:
            trainer(**kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    line = str(e.value)
    assert line.startswith(start), line
    assert "\n" not in line and not compiled


def test_the_package_s_own_components_meet_their_contracts():
    from estimators.contract import check_components
    from lopt.contract import check_learned_optimizer
    from tasks.contract import check_task_family, example_params

    for name in ("quadratic", "digits_mlp"):
        check_task_family(tasks.get(name))
    params = example_params(tasks.get("quadratic"))
    for name in lopt.names():
        check_learned_optimizer(lopt.get(name), params)
    for name in estimators.names():
        est = estimators.get(name)
        reset = resets.get("elo_replay", capacity=2) if name == "es" else resets.FreshReset()
        check_components(dataclasses.replace(trainer().unroller, num_particles=4, reset=reset), est)


def _reads_value() -> optax.GradientTransformationExtraArgs:
    """An optax-style transformation whose update requires the loss as ``value=``, as optax's
    value-aware ones do (``reduce_on_plateau``, the zoom line search); it adds nothing."""

    def update_fn(updates, state, params=None, *, value, **extra):
        del params, extra
        return jax.tree.map(lambda u: u + 0.0 * value, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


@dataclasses.dataclass(frozen=True)
class SgdReadingValue(Sgd):
    """:class:`Sgd` chained with a transformation that reads ``value=``."""

    def optimizer(self, meta_params):
        return optax.chain(super().optimizer(meta_params), _reads_value())


def test_the_loss_reaches_optax_s_value_aware_transformations():
    """DESIGN.md: the inner loop passes the loss as ``value=`` (optax's name), so a learned
    optimizer chained with a value-aware optax transformation meta-trains; under another
    keyword its update raises for the missing ``value`` (the contract check says so)."""
    t = trainer(learned_opt=SgdReadingValue())
    _, metrics = t.step(t.init(jax.random.key(0)))
    assert np.isfinite(float(metrics["meta_loss"]))
    # The same call drives optax's own reduce_on_plateau in a user's loop.
    opt = optax.chain(Sgd().optimizer(Sgd().init(jax.random.key(0))),
                      optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    params = {"x": jnp.ones(2)}
    opt_state = opt.init(params)
    for loss in (1.0, 2.0, 3.0, 4.0):  # no improvement: the plateau halves the scale
        _, opt_state = opt.update(params, opt_state, params, value=jnp.float32(loss))
    assert float(opt_state[1].scale) < 1.0


BROKEN_CONFIG = textwrap.dedent('''
    import dataclasses
    from typing import ClassVar

    import jax.numpy as jnp
    from ml_collections import ConfigDict

    import tasks
    from lopt.experiments.inputs import load_config


    @tasks.register("broken_bowl")
    @dataclasses.dataclass(frozen=True)
    class BrokenBowl:
        name: ClassVar[str] = "broken_bowl"

        def sample(self, key):
            return {"c": jnp.ones(2), "scale": 2.0}

        def init(self, spec, key):
            return {"x": jnp.zeros(2)}

        def batch(self, spec, key, split):
            return {}

        def loss(self, spec, params, batch):
            return jnp.sum((params["x"] - spec["c"]) ** 2), {}


    def get_config():
        c = load_config("quickstart")
        c.task = ConfigDict(dict(name="broken_bowl"))
        return c
''')


def test_lopt_train_reports_a_broken_task_in_one_line(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_CONFIG)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "meta_train.py"), "--config=broken.py",
         "--workdir=run", "--noprogress"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("config error: task family 'broken_bowl' (") and \
        proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "sample(key)['scale'] is float 2.0, not an array" in proc.stderr
    assert not (tmp_path / "run").exists()
