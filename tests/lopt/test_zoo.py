"""The learned-optimizer zoo: adafac_mlp, lstm_dm, rnnprop, hyper_adam.

Per optimizer: state and update shapes on a mixed pytree inside an optax chain, the first
update's scale, jit and vmap, a state checkpoint round trip, export round trip, and a short PES
meta-training run on ``quadratic`` that lowers the meta-loss. Compiled functions are module-level
and keyed on the (hashable) learned optimizer, so tests share them.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.unroll import MetaLoss
from lopt import export
from lopt.base import config_of
from lopt.training.checkpoint import Checkpointer
from lopt.hyper import HyperAdam
from lopt.training import MetaTrainer

ZOO = ("adafac_mlp", "lstm_dm", "rnnprop", "hyper_adam")
# Optimizers whose first update does not depend on the gradient's scale.
SCALE_INVARIANT = ("adafac_mlp", "rnnprop", "hyper_adam")


def _params():
    """Scalar, vector, matrix, conv kernel and a bf16 embedding table."""
    k = jax.random.split(jax.random.PRNGKey(42), 5)
    return {
        "scale": jnp.asarray(0.7),
        "bias": jax.random.normal(k[0], (5,)),
        "dense": {"w": jax.random.normal(k[1], (6, 4)) / 3},
        "conv": jax.random.normal(k[2], (3, 3, 2, 4)) / 5,
        "embed": jax.random.normal(k[3], (11, 3)).astype(jnp.bfloat16),
    }


def _grads(params, key=jax.random.PRNGKey(7), scale=1.0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [(scale * jax.random.normal(k, jnp.shape(p))).astype(p.dtype) for k, p in zip(keys, leaves)]
    )


@functools.lru_cache(maxsize=None)
def _zoo(name: str):
    learned_opt = lopt.get(name)
    return learned_opt, learned_opt.init(jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnums=0)
def _init(learned_opt, meta_params, params):
    return learned_opt.optimizer(meta_params).init(params)


@functools.partial(jax.jit, static_argnums=0)
def _update(learned_opt, meta_params, grads, state, params):
    return learned_opt.optimizer(meta_params).update(grads, state, params, loss=jnp.float32(1.0))


def _chain(learned_opt, meta_params):
    """Clipping before, weight decay after: the composition users write."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        learned_opt.optimizer(meta_params),
        optax.add_decayed_weights(1e-4),
    )


@functools.partial(jax.jit, static_argnums=0)
def _chain_steps(learned_opt, meta_params, params, grads_seq):
    """Init, then one chained update per leading index of ``grads_seq`` (scan: one trace)."""
    opt = _chain(learned_opt, meta_params)
    state0 = opt.init(params)

    def body(carry, grads):
        p, s = carry
        u, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, u), s), u

    (_, state), upds = jax.lax.scan(body, (params, state0), grads_seq)
    return upds, (state0, state)


def _rms(tree):
    leaves = [jnp.asarray(x, jnp.float32).ravel() for x in jax.tree.leaves(tree)]
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.concatenate(leaves)))))


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-8):
    """Leaf-wise allclose with equal dtypes; bf16 leaves get bf16's resolution (2^-7) or more."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.asarray(x).dtype == jnp.asarray(y).dtype
        low = jnp.asarray(x).dtype == jnp.bfloat16 and rtol > 0
        np.testing.assert_allclose(
            np.asarray(x, np.float32),
            np.asarray(y, np.float32),
            rtol=max(rtol, 2**-7) if low else rtol,
            atol=atol,
        )


def test_registered_and_config_round_trips():
    assert set(ZOO) <= set(lopt.names())
    for name in ZOO:
        learned_opt = lopt.get(name)
        assert learned_opt.name == name
        hash(learned_opt)
        # Export rebuilds from the JSON'd config (tuples become lists): must give an equal object.
        config = json.loads(json.dumps(config_of(learned_opt)))
        assert lopt.get(name, **config) == learned_opt
    assert lopt.get("adafac_mlp").num_features == 39


@pytest.mark.parametrize("name", ZOO)
def test_state_and_update_shapes_in_a_chain(name):
    learned_opt, meta_params = _zoo(name)
    params = _params()
    grads = _grads(params)
    grads_seq = jax.tree.map(lambda g: jnp.stack([g, -g, 2 * g]), grads)
    upds, (state0, state) = _chain_steps(learned_opt, meta_params, params, grads_seq)
    for i in range(3):
        upd = jax.tree.map(lambda x: x[i], upds)
        assert jax.tree.structure(upd) == jax.tree.structure(params)
        for u, p in zip(jax.tree.leaves(upd), jax.tree.leaves(params)):
            assert u.shape == p.shape and u.dtype == p.dtype
            assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
    # scan already demands a state of fixed structure, shapes and dtypes; it must also move.
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state0) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state
    )
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state0[1]), jax.tree.leaves(state[1]))
    )


def test_documented_state_shapes():
    params = _params()
    lo, mp = _zoo("adafac_mlp")
    acc = _init(lo, mp, params).accumulators
    # (3, 3, 2, 4): the two largest axes are 1 (3; the later of the two 3s) and 3 (4).
    assert acc["conv"]["row"].shape == (3, 3, 2, 1, 3)
    assert acc["conv"]["col"].shape == (3, 1, 2, 4, 3)
    assert acc["embed"]["row"].shape == (11, 1, 3) and acc["embed"]["col"].shape == (1, 3, 3)
    assert acc["bias"]["v"].shape == (5, 3) and acc["scale"]["v"].shape == (3,)
    assert acc["dense"]["w"]["m"].shape == (6, 4, 3) and acc["dense"]["w"]["rms"].shape == (6, 4, 1)
    n = sum(p.size for p in jax.tree.leaves(params))  # one LSTM state per coordinate
    for name in ("lstm_dm", "rnnprop"):
        lo, mp = _zoo(name)
        state = _init(lo, mp, params)
        assert state.h.shape == state.c.shape == (n, 2, 20) and state.h.dtype == jnp.float32
    assert _init(*_zoo("rnnprop"), params).mu.shape == (n,)
    lo, mp = _zoo("hyper_adam")
    assert jax.tree.map(jnp.shape, mp) == {"log_lr": (), "log_one_minus_b1": (), "log_one_minus_b2": ()}


@pytest.mark.parametrize("name", ZOO)
def test_first_update_scale(name):
    """A fresh optimizer's first step is ~1e-3 per coordinate for unit-scale gradients."""
    learned_opt, meta_params = _zoo(name)
    params = _params()
    state = _init(learned_opt, meta_params, params)
    upd, _ = _update(learned_opt, meta_params, _grads(params), state, params)
    assert 1e-5 < _rms(upd) < 1e-2, _rms(upd)
    if name == "hyper_adam":  # Adam's first step is exactly lr * sign(g)
        np.testing.assert_allclose(_rms(upd), 1e-3, rtol=1e-2)
    if name in SCALE_INVARIANT:
        # adafac_mlp's reciprocal-sqrt epsilons (1e-6, 1e-8, as small_fc_lopt) make it scale
        # invariant only once the second moments dwarf them: compare scales 1e2 and 1e4 there.
        base = 100.0 if name == "adafac_mlp" else 1.0
        if base != 1.0:
            upd, _ = _update(learned_opt, meta_params, _grads(params, scale=base), state, params)
        big, _ = _update(learned_opt, meta_params, _grads(params, scale=100.0 * base), state, params)
        diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), big, upd)
        assert _rms(diff) < 0.02 * _rms(upd), (_rms(diff), _rms(upd))


@functools.partial(jax.jit, static_argnums=0)
def _vmapped_update(learned_opt, meta_params, grads, params):
    opt = learned_opt.optimizer(meta_params)
    state = jax.vmap(opt.init)(params)
    return jax.vmap(lambda g, s, p: opt.update(g, s, p))(grads, state, params)


@pytest.mark.parametrize("name", ZOO)
def test_jit_and_vmap_match_per_instance(name):
    learned_opt, meta_params = _zoo(name)
    params = _params()
    batch = [params, jax.tree.map(lambda x: 2.0 * x + 0.1, params)]
    grads = [_grads(params), _grads(params, jax.random.PRNGKey(8), scale=0.5)]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    b_upd, b_state = _vmapped_update(learned_opt, meta_params, stack(grads), stack(batch))
    for i in range(2):
        state = _init(learned_opt, meta_params, batch[i])
        upd, new_state = _update(learned_opt, meta_params, grads[i], state, batch[i])
        _assert_trees_close(jax.tree.map(lambda x: x[i], b_upd), upd, rtol=1e-5, atol=1e-8)
        _assert_trees_close(jax.tree.map(lambda x: x[i], b_state), new_state, rtol=1e-5, atol=1e-6)


def test_state_checkpoint_round_trip(tmp_path):
    """Optax states of every zoo optimizer survive an orbax save/restore exactly, and training
    continues identically from the restored state."""
    params = _params()
    grads = _grads(params)
    states = {}
    for name in ZOO:
        learned_opt, meta_params = _zoo(name)
        state = _init(learned_opt, meta_params, params)
        for _ in range(2):
            _, state = _update(learned_opt, meta_params, grads, state, params)
        states[name] = state
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, states, host={"note": "zoo"})
    ckpt.wait()
    template = {name: _init(*_zoo(name), params) for name in ZOO}
    restored, host = ckpt.restore(3, template)
    ckpt.close()
    assert host == {"note": "zoo"}
    for name in ZOO:
        assert type(restored[name]) is type(states[name])
        _assert_trees_close(restored[name], states[name], rtol=0, atol=0)
        learned_opt, meta_params = _zoo(name)
        a, _ = _update(learned_opt, meta_params, grads, states[name], params)
        b, _ = _update(learned_opt, meta_params, grads, restored[name], params)
        _assert_trees_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lstm_dm", "rnnprop"])
def test_recurrent_chunking_matches_one_pass(monkeypatch, name):
    """Above CHUNK_SIZE coordinates the LSTM runs chunk by chunk over a padded state; the
    result equals the one-pass computation."""
    from lopt import rnn

    learned_opt = lopt.get(name, hidden_size=4, num_layers=1)
    meta_params = learned_opt.init(jax.random.PRNGKey(1))
    params = {"w": jnp.linspace(-1.0, 1.0, 96).reshape(8, 12), "b": jnp.zeros((4,))}  # 100
    grads = _grads(params)

    def two_steps(meta_params, params, grads):
        opt = learned_opt.optimizer(meta_params)
        state = opt.init(params)
        _, state = opt.update(grads, state, params)
        return opt.update(jax.tree.map(lambda g: 0.5 - g, grads), state, params)

    ref_upd, ref_state = jax.jit(two_steps)(meta_params, params, grads)
    monkeypatch.setattr(rnn, "CHUNK_SIZE", 16)
    assert rnn.chunk_layout(100) == (7, 15) and rnn.num_slots(params) == 105
    upd, state = jax.jit(lambda *a: two_steps(*a))(meta_params, params, grads)  # fresh trace
    assert state.h.shape[0] == 105 and ref_state.h.shape[0] == 100
    _assert_trees_close(upd, ref_upd, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(state.h[:100], ref_state.h, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="105 coordinate slots but these updates need 100"):
        monkeypatch.setattr(rnn, "CHUNK_SIZE", 1 << 16)
        learned_opt.optimizer(meta_params).update(grads, state, params)


# --- hyper_adam ---------------------------------------------------------------------------------


def _rosenbrock(params):
    x, y = params["xy"][0], params["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2 + jnp.sum((params["w"] - 0.5) ** 2)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _trajectory(opt, params, steps):
    def body(carry, _):
        p, s = carry
        g = jax.grad(_rosenbrock)(p)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[1]


def test_hyper_adam_reproduces_optax_adam():
    meta_params = HyperAdam.meta_params_for(1e-3, 0.9, 0.999)
    hp = HyperAdam.hyperparameters(meta_params)
    np.testing.assert_allclose([hp["learning_rate"], hp["b1"], hp["b2"]], [1e-3, 0.9, 0.999], rtol=1e-6)
    learned_opt = lopt.get("hyper_adam")
    _assert_trees_close(learned_opt.init(jax.random.PRNGKey(5)), meta_params, rtol=0, atol=0)
    params = {"xy": jnp.asarray([-1.2, 1.0]), "w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    ours = _trajectory(learned_opt.optimizer(meta_params), params, 300)
    ref = _trajectory(optax.adam(1e-3, eps_root=learned_opt.eps_root), params, 300)
    _assert_trees_close(ours, ref, rtol=1e-6, atol=5e-7)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a[-1] - b)), ref, params)
    assert min(jax.tree.leaves(moved)) > 0.1  # the trajectory went somewhere


def test_hyper_adam_meta_gradient():
    """The meta-params are differentiable: a larger learning rate helps on a short horizon."""
    params = {"xy": jnp.asarray([-1.2, 1.0]), "w": jnp.zeros((2, 3))}

    def final_loss(meta_params):
        opt = lopt.get("hyper_adam").optimizer(meta_params)
        traj = _trajectory.__wrapped__(opt, params, 20)
        return _rosenbrock(jax.tree.map(lambda x: x[-1], traj))

    g = jax.jit(jax.grad(final_loss))(HyperAdam.meta_params_for(1e-3, 0.9, 0.999))
    assert all(bool(jnp.isfinite(x)) for x in jax.tree.leaves(g))
    assert float(g["log_lr"]) < 0


def test_hyper_adam_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="b1"):
        HyperAdam.meta_params_for(1e-3, 1.0, 0.999)
    with pytest.raises(ValueError, match="learning_rate"):
        lopt.get("hyper_adam", init_learning_rate=0.0)


# --- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_export_round_trip(tmp_path, name):
    learned_opt, meta_params = _zoo(name)
    path = export.save(tmp_path / f"{name}.safetensors", learned_opt, meta_params, metadata={"n": name})
    loaded_opt, loaded = export.load(path)
    assert loaded_opt == learned_opt
    _assert_trees_close(loaded, meta_params, rtol=0, atol=0)
    params = _params()
    grads = _grads(params)
    state = _init(learned_opt, meta_params, params)
    ref, _ = _update(learned_opt, meta_params, grads, state, params)
    upd, _ = _update(loaded_opt, loaded, grads, state, params)  # equal object: same compile
    _assert_trees_close(upd, ref, rtol=0, atol=0)
    opt = export.load_optimizer(path)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    if name == "hyper_adam":  # cheap enough to run op by op on one leaf
        one = {"bias": params["bias"]}
        upd, _ = opt.update({"bias": grads["bias"]}, opt.init(one), one)
        np.testing.assert_allclose(upd["bias"], ref["bias"], rtol=1e-6)


def test_export_loaded_as_another_architecture_fails(tmp_path):
    learned_opt, meta_params = _zoo("lstm_dm")
    path = export.save(tmp_path / "lstm.safetensors", learned_opt, meta_params)
    with pytest.raises(export.ArchitectureMismatchError, match="'lstm_dm'.*but 'rnnprop'"):
        export.load(path, learned_opt=lopt.get("rnnprop"))
    with pytest.raises(export.ArchitectureMismatchError, match="hidden_size"):
        export.load(path, learned_opt=lopt.get("lstm_dm", hidden_size=8))
    # Meta-params of one architecture cannot be saved as another.
    with pytest.raises(export.ArchitectureMismatchError):
        export.save(tmp_path / "x.safetensors", lopt.get("rnnprop"), meta_params)
    learnable = lopt.get("adafac_mlp", learnable_decays=True)
    path = export.save(tmp_path / "ada.safetensors", learnable, learnable.init(jax.random.PRNGKey(1)))
    with pytest.raises(export.ArchitectureMismatchError, match="learnable_decays"):
        export.load(path, learned_opt=lopt.get("adafac_mlp"))


def test_adafac_learnable_decays():
    learned_opt = lopt.get("adafac_mlp", learnable_decays=True, hidden_size=8, hidden_layers=1)
    meta_params = learned_opt.init(jax.random.PRNGKey(0))
    decays = learned_opt.decays(meta_params)
    np.testing.assert_allclose(decays[0], [0.9, 0.99, 0.999], rtol=1e-6)
    np.testing.assert_allclose(decays[1], [0.999], rtol=1e-6)
    params = {"w": jnp.ones((3, 4))}
    grads = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}

    def first_moment(logits):
        mp = dict(meta_params, decay_logits=dict(meta_params["decay_logits"], momentum=logits))
        opt = learned_opt.optimizer(mp)
        _, state = opt.update(grads, opt.init(params), params)
        return jnp.sum(state.accumulators["w"]["m"])

    g = jax.jit(jax.grad(first_moment))(meta_params["decay_logits"]["momentum"])
    assert bool(jnp.all(g != 0))


# --- meta-training ------------------------------------------------------------------------------

META_TRAIN = {
    "hyper_adam": {},
    "adafac_mlp": dict(hidden_size=8, hidden_layers=1),
    "lstm_dm": dict(hidden_size=4, num_layers=1),
    # tanh caps a step at learning_rate * 0.01 per coordinate; allow steps that can matter in
    # a 10-step horizon.
    "rnnprop": dict(hidden_size=4, num_layers=1, learning_rate=5.0),
}


@pytest.mark.parametrize(
    "name",
    # hyper_adam's run is the fast one; each network optimizer's outer step compiles for 5-15 s.
    ["hyper_adam"] + [pytest.param(n, marks=pytest.mark.slow) for n in ZOO if n != "hyper_adam"],
)
def test_short_meta_training_lowers_meta_loss(name):
    """30 PES outer steps on noiseless 4-d quadratics (fresh 10-step trajectories per outer step,
    16 antithetic pairs): the mean meta-loss of the last 5 steps is clearly below the first 5."""
    trainer = MetaTrainer.create(
        task_family=tasks.get("quadratic", dim=4, noise_std=0.0),
        learned_opt=lopt.get(name, **META_TRAIN[name]),
        estimator=estimators.get("pes", std=0.01),
        meta_optimizer=optax.adam(0.1),
        num_particles=32,
        trunc_length=10,
        horizon=schedules.constant(10),
        # Quadratic instances differ in scale: compare each to its own initial loss.
        meta_loss=MetaLoss(normalize="initial"),
        stagger=False,
    )
    state = trainer.init(jax.random.PRNGKey(0))
    losses = []
    for _ in range(30):
        state, metrics = trainer.step(state)
        losses.append(float(metrics["meta_loss"]))
    assert int(state.num_skipped) == 0
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.04, (first, last, np.round(losses, 3))


# --- adafac_mlp as small_fc_lopt ----------------------------------------------------------------

# Feature indices with the default sizes (module docstring of lopt/adafac.py).
_RSQRT_RMS_FEATURE = 9
_FIRST_TIME_FEATURE = 28


def _probe(feature: int) -> tuple:
    """A linear adafac_mlp (no hidden layer) whose direction is normalised input ``feature`` and
    whose magnitude is 0: its update is exactly -1e-3 * that feature."""
    learned_opt = lopt.get("adafac_mlp", hidden_layers=0)
    mp = learned_opt.init(jax.random.PRNGKey(0))
    w = jnp.zeros_like(mp["mlp"][0]["w"]).at[feature, 0].set(1.0)
    mp = {"mlp": [{"w": w, "b": jnp.zeros_like(mp["mlp"][0]["b"])}]}
    return learned_opt, mp


def test_adafac_time_features_are_tanh_t_over_x_minus_one():
    """At step 0 the time features of small_fc_lopt are tanh(0 / x - 1) = tanh(-1) for every
    timescale (tanh(t / x) would give 0)."""
    learned_opt, mp = _probe(_FIRST_TIME_FEATURE)
    params = {"w": jnp.ones((4, 3))}
    opt = learned_opt.optimizer(mp)
    updates, _ = opt.update({"w": jnp.ones((4, 3))}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-3 * np.tanh(-1.0), rtol=1e-6)


def test_adafac_rsqrt_feature_survives_dead_rows():
    """A 64x32 kernel with three all-zero gradient rows (always-black input pixels): the live
    entries' 1/sqrt(rms) feature must stay O(1) after the per-tensor normalisation. With a
    1e-20 epsilon the dead rows' 1e10 dominated the tensor's second moment and squashed the
    live entries to ~1e-5."""
    learned_opt, mp = _probe(_RSQRT_RMS_FEATURE)
    g = jax.random.normal(jax.random.PRNGKey(3), (64, 32)).at[:3].set(0.0)
    params = {"w": jnp.zeros((64, 32))}
    opt = learned_opt.optimizer(mp)
    updates, _ = opt.update({"w": g}, opt.init(params), params)
    live = np.abs(np.asarray(updates["w"][3:])) / 1e-3  # the normalised feature itself
    assert np.median(live) > 0.05, np.median(live)


def test_adafac_factors_the_two_largest_axes():
    learned_opt, mp = _zoo("adafac_mlp")
    params = {"k": jnp.zeros((5, 7, 3)), "t": jnp.zeros((4, 4))}
    acc = _init(learned_opt, mp, params).accumulators
    assert acc["k"]["row"].shape == (5, 1, 3, 3) and acc["k"]["col"].shape == (1, 7, 3, 3)
    assert acc["t"]["row"].shape == (4, 1, 3) and acc["t"]["col"].shape == (1, 4, 3)


def test_mlp_metz2019_timescales_and_architecture():
    """Metz et al. 2019 App. D.1: one hidden layer of 32 by default; the paper's 9 timescales
    log-spaced over (3, 300k) as the ``"metz2019"`` preset."""
    learned_opt = lopt.get("mlp", timescales="metz2019")
    np.testing.assert_allclose(learned_opt.timescales, np.geomspace(3, 3e5, 9))
    assert learned_opt.num_features == 2 + 5 + 9
    shapes = [layer["w"].shape for layer in learned_opt.init(jax.random.PRNGKey(0))["mlp"]]
    assert shapes == [(16, 32), (32, 2)]
    with pytest.raises(ValueError, match="metz2019"):
        lopt.get("mlp", timescales="metz")


def _mlp_reference(learned_opt, meta_params, grads, params, momenta, step):
    """Metz et al. 2019 App. D.1 written out per leaf and per coordinate: the features (g, w,
    momenta, each / sqrt(mean over the tensor of x^2) + 1e-8; tanh(t / eta - 1)), the MLP,
    dw = -d exp(1e-3 m) 1e-3. The optimizer folds the time features into a per-step bias and
    runs one MLP pass over all leaves: the same function up to float32 rounding."""
    decays = np.asarray(learned_opt.decays)
    t = np.tanh(step / np.asarray(learned_opt.timescales) - 1.0)
    out = {}
    for name in grads:
        g, w = np.asarray(grads[name], np.float64), np.asarray(params[name], np.float64)
        m = decays * np.asarray(momenta[name], np.float64) + (1 - decays) * g[..., None]
        norm = lambda x: x / np.sqrt(np.mean(x**2, axis=tuple(range(g.ndim)), keepdims=True) + 1e-8)
        x = np.concatenate([norm(g[..., None]), norm(w[..., None]), norm(m),
                            np.broadcast_to(t, g.shape + t.shape)], axis=-1)
        for i, layer in enumerate(meta_params["mlp"]):
            x = x @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
            x = np.maximum(x, 0) if i < len(meta_params["mlp"]) - 1 else x
        out[name] = -x[..., 0] * np.exp(x[..., 1] * 1e-3) * 1e-3
    return out


def test_mlp_update_equals_the_per_leaf_reference():
    learned_opt = lopt.get("mlp", hidden_size=8, hidden_layers=2)
    meta_params = jax.tree.map(lambda x: 3.0 * x, learned_opt.init(jax.random.PRNGKey(1)))
    params = {"w": jax.random.normal(jax.random.PRNGKey(2), (6, 5)), "b": jnp.full((5,), 0.3),
              "s": jnp.asarray(-0.7)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(3), jnp.shape(p)), params)
    opt = learned_opt.optimizer(meta_params)
    state = opt.init(params)
    state = state._replace(momenta=jax.tree.map(lambda m: m + 0.1, state.momenta), step=jnp.asarray(7))
    updates, _ = opt.update(grads, state, params)
    want = _mlp_reference(learned_opt, meta_params, grads, params, jax.device_get(state.momenta), 7)
    for name in params:
        np.testing.assert_allclose(np.asarray(updates[name]), want[name], rtol=2e-4, atol=1e-9)
    assert max(np.abs(v).max() for v in want.values()) > 1e-4  # not a trivial comparison
