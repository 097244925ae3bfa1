"""MetaTrainer and the train() host loop: skipping non-finite gradients, resume == uninterrupted,
config validation, the optimizer as an optax transformation under jit and vmap."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import estimators
import lopt
import tasks
from estimators import schedules
from lopt.training import config as config_lib
from lopt import export
from lopt.training import MetaTrainer, train
from tasks.registry import ConfigError


def tiny_config(**overrides) -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 6
    c.log_every = 1
    c.checkpoint_every = 2
    c.task = ConfigDict(dict(name="digits_mlp", hidden_sizes=(8,), batch_size=16, permute_classes=True))
    c.lopt = ConfigDict(dict(name="mlp", hidden_size=8, hidden_layers=1))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-3, clip_grad_norm=None))
    c.unroll = ConfigDict(
        dict(num_particles=4, trunc_length=3, horizon=ConfigDict(dict(name="constant", length=7)))
    )
    for k, v in overrides.items():
        c[k] = v
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "inner_steps_per_sec")} for r in rows]


def test_resume_equals_uninterrupted(tmp_path):
    """Stop after 4 of 6 steps, start again on the same workdir: the metrics and the final
    meta-params equal those of a run that was never stopped, bit for bit."""
    full = train(tiny_config(), str(tmp_path / "full"), progress=False)
    part_dir = str(tmp_path / "part")
    train(tiny_config(num_outer_steps=4), part_dir, progress=False)
    resumed = train(tiny_config(), part_dir, progress=False)
    assert [r["step"] for r in _rows(part_dir)] == list(range(1, 7))
    assert _strip_timing(_rows(part_dir)) == _strip_timing(_rows(str(tmp_path / "full")))
    for a, b in zip(jax.tree.leaves(full["state"].meta_params), jax.tree.leaves(resumed["state"].meta_params)):
        np.testing.assert_array_equal(a, b)
    # The workdir holds what DESIGN.md promises, and the export is the final meta-params.
    for name in ("config.json", "metrics.jsonl", "checkpoints", "export/optimizer.safetensors", "plots/meta_loss.png"):
        assert os.path.exists(os.path.join(part_dir, name)), name
    _, exported = export.load(resumed["export"])
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(resumed["state"].meta_params)):
        np.testing.assert_array_equal(a, b)


def test_meta_training_changes_params_and_counts_inner_steps(tmp_path):
    out = train(tiny_config(num_outer_steps=3), str(tmp_path), progress=False)
    rows = _rows(str(tmp_path))
    assert all(np.isfinite(r["meta_loss"]) and r["grad_finite"] for r in rows)
    assert rows[-1]["inner_steps_per_sec"] > 0
    assert out["state"].outer_step == 3


def test_non_finite_meta_gradient_is_skipped_and_counted():
    """An estimator returning NaN leaves meta-params and the meta-optimizer state untouched."""

    class NaNEstimator(estimators.pes.PES):
        def grad(self, unroller, meta_params, state, key, outer_step):
            g, s, m = super().grad(unroller, meta_params, state, key, outer_step)
            return jax.tree.map(lambda x: x * jnp.nan, g), s, m

    trainer = MetaTrainer.create(
        task_family=tasks.get("quadratic", dim=3),
        learned_opt=lopt.get("mlp", hidden_size=4, hidden_layers=1),
        estimator=NaNEstimator(std=0.01),
        meta_optimizer=optax.adam(1e-2),
        num_particles=2,
        trunc_length=2,
        horizon=schedules.constant(5),
    )
    state = trainer.init(jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, (state.meta_params, state.meta_opt_state.inner_state))
    state, metrics = trainer.step(state)
    state, metrics = trainer.step(state)
    assert int(state.num_skipped) == 2 and not bool(metrics["grad_finite"])
    assert int(state.consecutive_skipped) == 2 == int(metrics["consecutive_skipped"])
    after = (state.meta_params, state.meta_opt_state.inner_state)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert int(state.outer_step) == 2


@pytest.mark.parametrize(
    "section,key,message",
    [
        ("estimator", "stdd", "unknown option 'stdd' for estimator 'pes'. Did you mean 'std'?"),
        ("lopt", "hiden_size", "unknown option 'hiden_size'"),
        ("task", "hidden_size", "Did you mean 'hidden_sizes'?"),
        ("meta_optimizer", "learning_rat", "unknown option 'learning_rat' for optax.adam"),
    ],
)
def test_config_typo_fails_before_compiling(section, key, message):
    c = tiny_config()
    c[section][key] = 1
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        config_lib.build(c)


def test_config_unknown_top_level_and_registry_names():
    c = tiny_config()
    c.num_outer_step = 3
    with pytest.raises(ConfigError, match="unknown config key 'config.num_outer_step'"):
        config_lib.build(c)
    c = tiny_config()
    c.estimator.name = "pess"
    with pytest.raises(ConfigError, match="unknown estimator 'pess'. Did you mean 'pes'"):
        config_lib.build(c)
    c = tiny_config()
    c.unroll.trunc_lenght = 3
    with pytest.raises(ConfigError, match="config.unroll.trunc_lenght"):
        config_lib.build(c)
    c = tiny_config()
    c.unroll.particle_chunk = 3  # 4 particles in pes's pairs: 2 or 0 would do
    with pytest.raises(ConfigError, match="config.unroll.particle_chunk: 3 must divide the 4 particles"):
        config_lib.build(c)
    c.unroll.particle_chunk = -2
    with pytest.raises(ConfigError, match="config.unroll.particle_chunk: must be an integer >= 0"):
        config_lib.build(c)


def test_learned_optimizer_is_an_optax_transformation_under_jit_and_vmap():
    lo = lopt.get("mlp")
    opt = lo.optimizer(lo.init(jax.random.PRNGKey(0)))
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,)), "s": jnp.asarray(2.0)}
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    chained = optax.chain(optax.clip_by_global_norm(1.0), opt)
    state = chained.init(params)
    step = jax.jit(lambda g, s, p: chained.update(g, s, p))
    updates, state = step(grads, state, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    assert int(state[1].step) == 1
    # First step ~1e-3 per coordinate (Metz et al. 2019 output scaling).
    scale = float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))
    assert 1e-5 < scale < 1e-2
    # vmap over a batch of parameter pytrees equals the per-instance updates.
    batched = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)
    bgrads = jax.tree.map(lambda g: jnp.stack([g, -g]), grads)
    bstate = jax.vmap(opt.init)(batched)
    bupd, _ = jax.jit(jax.vmap(opt.update))(bgrads, bstate, batched)
    for i in range(2):
        p_i = jax.tree.map(lambda x: x[i], batched)
        g_i = jax.tree.map(lambda x: x[i], bgrads)
        u_i, _ = opt.update(g_i, opt.init(p_i), p_i)
        for a, b in zip(jax.tree.leaves(u_i), jax.tree.leaves(jax.tree.map(lambda x: x[i], bupd))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_dataset_is_a_jit_argument_not_an_embedded_constant():
    """The digits arrays (~0.5 MB as float32, several MB as HLO text) must enter the compiled
    step as arguments; embedded, a CIFAR-sized set costs seconds of compile and GBs of memory."""
    trainer = config_lib.build(tiny_config())
    state = trainer.init(jax.random.PRNGKey(0))
    arrays = tasks.base.data_arrays(trainer.task_family)
    assert arrays is not None
    text = trainer._step_fn.lower(state, arrays).as_text()
    assert len(text) < 1_000_000, len(text)  # the embedded digits would add several MB
