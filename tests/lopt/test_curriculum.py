"""The curriculum controller (Chen et al. 2020, Algorithm 1): decisions on scripted validation
sequences, its JSON state, and ``train()`` with a curriculum (advance, best export, resume)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from lopt.training import config as config_lib
from lopt.training import curriculum as curriculum_lib
from lopt import export
from lopt.training import loop
from lopt.training.curriculum import Curriculum, CurriculumState
from lopt.training import train
from tasks.registry import ConfigError


def run_script(cur: Curriculum, losses, state: CurriculumState | None = None):
    """Feed validation losses one per period (``cur.period`` outer steps apart); a stage's
    baseline is validated at the outer step of the "advance" that precedes it."""
    state = cur.init() if state is None else state
    out = []
    for loss in losses:
        if state.last_step < 0:
            step = 0
        elif state.period < 0:
            step = state.last_step
        else:
            step = state.last_step + cur.period
        state, d = cur.update(state, loss, step)
        out.append(d)
    return state, out


def actions(decisions):
    return [(d.kind, d.action) for d in decisions]


# --- decisions on scripted validation sequences --------------------------------------------------


def test_advance_when_the_stage_beats_its_baseline():
    cur = Curriculum(stages=(10, 20, 40), period=5, min_periods=2)
    state, ds = run_script(cur, [1.0, 0.9, 0.95])
    assert actions(ds) == [("baseline", "continue"), ("period", "continue"), ("period", "advance")]
    assert [d.valid_length for d in ds] == [20, 20, 20]  # stage 0 validates at the next length
    assert [d.train_length for d in ds] == [10, 10, 10]
    assert [d.is_best for d in ds] == [True, True, False]
    assert state.stage == 1 and state.period == -1  # the new stage's baseline comes next
    assert (cur.train_length(state), cur.valid_length(state)) == (20, 40)
    # The baseline of stage 1 re-validates the best (stage 0, step 5) at length 40.
    state, d = cur.update(state, 1.7, outer_step=10)
    assert (d.kind, d.action, d.is_best, d.valid_length) == ("baseline", "continue", False, 40)
    assert (state.baseline, state.best_loss, state.best_stage, state.best_step) == (1.7, 1.7, 0, 5)


def test_stop_when_a_new_stage_never_beats_its_baseline():
    cur = Curriculum(stages=(10, 20, 40), period=5, min_periods=2)
    state, ds = run_script(cur, [1.0, 0.8, 0.9, 1.5, 1.6, 1.5])
    assert actions(ds) == [
        ("baseline", "continue"), ("period", "continue"), ("period", "advance"),
        ("baseline", "continue"), ("period", "continue"), ("period", "stop"),
    ]
    assert state.done and state.stage == 1
    assert "never beat its baseline" in ds[-1].reason
    # Equal to the baseline is not better: the best stays the stage-0 meta-params of step 5.
    assert (state.best_stage, state.best_step, state.best_loss) == (0, 5, 1.5)
    with pytest.raises(ValueError, match="after the curriculum stopped"):
        cur.update(state, 0.1, 100)


def test_a_stage_continues_while_its_latest_period_is_its_best():
    """Algorithm 1: "while n <= N_period or L_val == L_min": at least N_period periods, then
    on while the latest validation is the stage's best so far; the first period that is not
    ends the stage (advancing, as it improved)."""
    cur = Curriculum(stages=(10, 20), period=1, min_periods=2)
    _, ds = run_script(cur, [1.0, 0.9, 0.8, 0.7, 0.6, 0.65])
    assert [d.action for d in ds] == ["continue"] * 5 + ["advance"]
    assert "latest validation is the stage's best" in ds[3].reason
    # Under N_period periods the stage goes on whatever the losses do ...
    cur = Curriculum(stages=(10, 20), period=1, min_periods=3)
    _, ds = run_script(cur, [1.0, 0.5, 0.6, 0.7])
    assert [d.action for d in ds] == ["continue", "continue", "continue", "advance"]
    # ... and after them a period that is no new best ends a stage that never improved.
    cur = Curriculum(stages=(10, 20), period=1, min_periods=2)
    _, ds = run_script(cur, [1.0, 1.1, 1.2])
    assert [d.action for d in ds] == ["continue", "continue", "stop"]


def test_max_periods_is_an_optional_cap():
    """Our extension: with max_periods a stage that keeps improving ends at the cap."""
    assert Curriculum().max_periods is None
    cur = Curriculum(stages=(10, 20), period=1, min_periods=2, max_periods=3)
    _, ds = run_script(cur, [1.0, 0.9, 0.8, 0.7])
    assert [d.action for d in ds] == ["continue"] * 3 + ["advance"]
    assert "max_periods=3" in ds[-1].reason
    _, ds = run_script(cur, [1.0, 1.1, 1.2])
    assert [d.action for d in ds][-1] == "stop"


def test_periods_are_epochs_of_n_train_steps():
    """A period is T_period epochs, an epoch one N_train-step trajectory per particle:
    ceil(N_train / trunc_length) outer steps, so a later stage's period is longer."""
    cur = Curriculum(stages=(100, 200, 500), period=3)
    assert [cur.period_steps(s, trunc_length=20) for s in range(3)] == [15, 30, 75]
    assert cur.period_steps(0, trunc_length=30) == 3 * 4


def test_stage_zero_without_improvement_stops():
    cur = Curriculum(stages=(10, 20), period=3, min_periods=2)
    state, ds = run_script(cur, [1.0, 1.2, 1.1])
    assert [d.action for d in ds] == ["continue", "continue", "stop"]
    assert (state.best_stage, state.best_step, state.best_loss) == (0, 0, 1.0)  # the initial ones


def test_best_kept_and_diverged_validations_never_best():
    cur = Curriculum(stages=(10, 20, 40), period=2, min_periods=4)
    state, ds = run_script(cur, [float("nan"), 3.0, 2.0, float("inf"), 2.5])
    assert [d.is_best for d in ds] == [True, True, True, False, False]  # NaN baseline counts as inf
    assert ds[-1].action == "advance"
    assert (state.best_loss, state.best_step) == (2.0, 4)
    assert ds[3].to_row()["valid_loss"] is None  # non-finite losses are logged as null


def test_last_stage_validates_at_its_own_length_and_completes():
    cur = Curriculum(stages=(10, 20), period=1, min_periods=1)
    state, ds = run_script(cur, [1.0, 0.9, 0.95, 0.95, 0.9, 0.92])
    assert actions(ds) == [
        ("baseline", "continue"), ("period", "continue"), ("period", "advance"),
        ("baseline", "continue"), ("period", "continue"), ("period", "stop"),
    ]
    assert [d.valid_length for d in ds] == [20] * 6
    assert state.done and "curriculum complete" in ds[-1].reason
    assert (state.best_stage, state.best_step) == (1, 3)


def test_state_json_round_trip_gives_identical_future_decisions():
    cur = Curriculum(stages=(5, 10, 20, 40), period=3, min_periods=2, max_periods=3)
    losses = [float("nan"), 2.0, 2.1, 2.5, 2.6, 2.4, 2.45, 3.0, 3.1, 3.2]
    full_state, full = run_script(cur, losses)
    for cut in range(1, len(losses)):
        state, first = run_script(cur, losses[:cut])
        restored = CurriculumState.from_dict(json.loads(json.dumps(state.to_dict())))
        assert restored == state
        end, rest = run_script(cur, losses[cut:], restored)
        assert first + rest == full and end == full_state
    assert [d.action for d in full][-1] == "stop" and full_state.stage == 2


def test_config_section():
    c = ConfigDict(dict(curriculum=ConfigDict(dict(stages=(4, 8), period=2))))
    assert config_lib.curriculum(c) == Curriculum(stages=(4, 8), period=2)
    c.curriculum.enabled = False
    assert config_lib.curriculum(c) is None
    assert config_lib.curriculum(ConfigDict()) is None
    c = ConfigDict(dict(curriculum=ConfigDict(dict(stages=(4, 8), min_period=2))))
    message = "unknown option 'min_period' for config.curriculum. Did you mean 'min_periods'"
    with pytest.raises(ConfigError, match=message):
        config_lib.curriculum(c)
    c = ConfigDict(dict(curriculum=ConfigDict(dict(stages=(8, 4)))))
    with pytest.raises(ConfigError, match="config.curriculum: stages must be positive and strictly"):
        config_lib.curriculum(c)


# --- train() with a curriculum ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The train() runs below compile the same programs again (resume, scripted validations):
    a persistent compilation cache keeps this module's wall time down. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def cl_config(**overrides) -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 20
    c.log_every = 1  # a run stopped early logs its last step: keep logs comparable
    c.checkpoint_every = 3
    c.task = ConfigDict(dict(name="quadratic", dim=2))
    c.lopt = ConfigDict(dict(name="hyper_adam"))
    c.estimator = ConfigDict(dict(name="tbptt"))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=0.1, clip_grad_norm=None))
    c.unroll = ConfigDict(
        dict(num_particles=2, trunc_length=2, horizon=ConfigDict(dict(name="constant", length=4)))
    )
    # A period is one epoch: 2 outer steps in stage 0 (N_train 4), 4 in stage 1 (N_train 8).
    c.curriculum = ConfigDict(
        dict(stages=(4, 8), period=1, min_periods=2, max_periods=2, valid_seeds=2)
    )
    for k, v in overrides.items():
        c[k] = v
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "inner_steps_per_sec")} for r in rows]


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cl_full"))
    return workdir, train(cl_config(), workdir, progress=False)


def test_train_with_curriculum_advances_and_exports_the_best(full_run):
    workdir, out = full_run
    rows = _rows(workdir)
    decisions = [r for r in rows if "decision" in r]
    assert [r["decision"] for r in decisions].count("advance") >= 1
    advance = next(r for r in decisions if r["decision"] == "advance")
    # Stage 1's trajectories are 8 steps: its validations run at length 8 (the last stage's own).
    assert all(r["train_length"] == 8 for r in decisions if r["step"] > advance["step"])
    assert decisions[-1]["decision"] == "stop"  # stopped by the curriculum, before 20 steps
    assert rows[-1]["step"] == out["state"].outer_step < 20
    # Every outer step's metrics are still there, and the plot skips the decision rows.
    assert all(np.isfinite(r["meta_loss"]) for r in rows if "decision" not in r)
    assert os.path.exists(out["plot"])
    # The export holds the best meta-params, and re-validating them gives the best loss.
    _, exported = export.load(out["export"])
    _assert_trees_equal(exported, out["best_meta_params"])
    summary = out["curriculum"]
    assert summary["stopped"] and summary["best_valid_loss"] == min(
        r["valid_loss"] for r in decisions if r["step"] >= advance["step"]
    )
    trainer = config_lib.build(cl_config())
    cur = config_lib.curriculum(cl_config())
    validator = curriculum_lib.Validator(trainer.task_family, trainer.learned_opt, cur)
    assert validator(exported, summary["valid_length"]) == summary["best_valid_loss"]


def test_resume_mid_curriculum_equals_uninterrupted(full_run, tmp_path):
    """Stop at outer step 5 (in stage 1, after the advance at step 4), start again: the
    decisions, metrics and exported meta-params equal those of the uninterrupted run."""
    full_dir, full = full_run
    assert any(r.get("decision") == "advance" and r["step"] <= 4 for r in _rows(full_dir))
    part_dir = str(tmp_path / "part")
    train(cl_config(num_outer_steps=5), part_dir, progress=False)
    resumed = train(cl_config(), part_dir, progress=False)
    assert _strip_timing(_rows(part_dir)) == _strip_timing(_rows(full_dir))
    _assert_trees_equal(resumed["state"].meta_params, full["state"].meta_params)
    _assert_trees_equal(export.load(resumed["export"])[1], export.load(full["export"])[1])
    assert resumed["curriculum"] == full["curriculum"]


def test_scripted_validations_export_the_best_not_the_last(tmp_path, monkeypatch):
    """With the validation losses scripted, training stops where Algorithm 1 says, a new stage
    re-validates the best meta-params as its baseline, and the export is the meta-params
    validated best, not the last ones."""
    # Validations at steps 0 (baseline), 2, 4 (-> advance), 4 (stage 1's baseline), then stage
    # 1's periods of one 8-step trajectory per particle: 4 outer steps each, at 8 and 12.
    losses = iter([1.0, 0.5, 0.8, 0.6, 0.7, 0.75])
    params = []

    def scripted(self, meta_params, length):
        params.append(jax.tree.map(np.array, meta_params))
        return next(losses)

    monkeypatch.setattr(curriculum_lib.Validator, "__call__", scripted)
    out = train(cl_config(), str(tmp_path), progress=False)
    decisions = [(r["step"], r["validation"], r["decision"]) for r in _rows(str(tmp_path)) if "decision" in r]
    assert decisions == [
        (0, "baseline", "continue"), (2, "period", "continue"), (4, "period", "advance"),
        (4, "baseline", "continue"), (8, "period", "continue"), (12, "period", "stop"),
    ]
    assert out["curriculum"]["best_step"] == 2 and int(out["state"].outer_step) == 12
    _assert_trees_equal(params[3], params[1])  # stage 1's baseline re-validates the best
    _, exported = export.load(out["export"])
    _assert_trees_equal(exported, params[1])
    assert not np.array_equal(exported["log_lr"], params[5]["log_lr"])  # not the last ones


def _hook_and_run(config, tmp_path):
    trainer = config_lib.build(config)
    hook = loop.CurriculumHook(config_lib.curriculum(config), trainer)
    run = loop.Run(config, str(tmp_path), hook.trainer(0), primary=True, total=20)
    run.state = run.trainer.init(jax.random.PRNGKey(0))
    return hook, run


def test_new_stage_restarts_from_the_best_with_fresh_particles(tmp_path):
    hook, run = _hook_and_run(cl_config(), tmp_path)
    before = jax.device_get(run.state)
    hook.best = jax.tree.map(lambda x: np.asarray(x) + 1.0, before.meta_params)
    hook.state = CurriculumState(stage=1, period=-1, best_step=2, best_stage=0)
    hook._start_stage(run)
    assert run.trainer.horizon.length == 8 and run.recompiling
    _assert_trees_equal(run.state.meta_params, hook.best)
    _assert_trees_equal(run.state.meta_opt_state, before.meta_opt_state)  # the meta-optimizer is kept
    assert int(run.state.outer_step) == int(before.outer_step)  # and the run's clock
    # Fresh particles drawn for the new horizon from the run's own key (a resumed run gets the same).
    fresh = run.trainer.init(jax.random.fold_in(jax.device_put(before.key), 1))
    _assert_trees_equal(run.state.estimator_state, fresh.estimator_state)
    assert (np.asarray(run.state.estimator_state.unroll.particles.length) <= 8).all()


def test_imitation_probability_follows_the_curriculum_stage(tmp_path):
    """Chen et al. 2020: r may change per stage; ``imitation.prob=(r0, r1)`` gives stage 0's
    particles r0 and a new stage r1 (the last value repeating), and a per-stage r without a
    curriculum is a config error."""
    imitation = ConfigDict(dict(prob=(1.0, 0.25), teachers=("adam", "sgd")))
    config = cl_config(imitation=imitation)
    hook, run = _hook_and_run(config, tmp_path)
    assert [hook.base.estimator.prob_at(s) for s in (0, 1, 5)] == [1.0, 0.25, 0.25]
    assert float(run.state.estimator_state.prob) == 1.0
    hook.best = jax.device_get(run.state.meta_params)
    hook.state = CurriculumState(stage=1, period=-1, best_step=2, best_stage=0)
    hook._start_stage(run)
    assert float(run.state.estimator_state.prob) == 0.25
    with pytest.raises(ConfigError, match="one value per curriculum stage"):
        config_lib.build(cl_config(imitation=imitation, curriculum=ConfigDict(dict(enabled=False))))
    with pytest.raises(ConfigError, match=r"imitation.prob must lie in \[0, 1\]"):
        config_lib.build(cl_config(imitation=ConfigDict(dict(prob=(0.5, 1.5)))))


def test_behaviour_cloning_alpha_follows_the_runs_clock_across_stages(tmp_path):
    """One clock: a_t of behaviour cloning rises with the run's outer step, and a curriculum
    stage switch neither restarts it nor the step count."""
    bc = ConfigDict(dict(teacher="adam", schedule=ConfigDict(dict(kind="linear", steps=20))))
    config = cl_config()
    config.unroll.behaviour_cloning = bc
    train(config, str(tmp_path), progress=False)
    rows = _rows(str(tmp_path))
    advance = next(r["step"] for r in rows if r.get("decision") == "advance")
    logged = [r for r in rows if "bc_alpha" in r]
    assert any(r["step"] > advance + 1 for r in logged)
    for r in logged:  # a row at step s reports outer step s - 1
        assert r["bc_alpha"] == pytest.approx((r["step"] - 1) / 20, abs=1e-6), r
