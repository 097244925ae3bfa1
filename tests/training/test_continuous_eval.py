"""Evaluation during meta-training (``config.eval``): held-out instances at each length every
``every`` outer steps, one compiled program per length, rows ``eval/<task>/<length>/<metric>``
in metrics.jsonl and TensorBoard, ``plots/eval.png``, a tuned-Adam baseline computed once and
carried by the checkpoints, and a resumed run continuing the same series."""

from __future__ import annotations

import json
import os

import pytest
from ml_collections import ConfigDict

from lopt.training import config as config_lib
from lopt.training import continuous_eval, evaluation, held_out, train
from lopt.training.tensorboard import read_scalars
from tasks.registry import ConfigError

LENGTHS = (3, 6)


def config(**overrides) -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 6
    c.log_every = 3
    c.checkpoint_every = 2
    c.task = ConfigDict(dict(name="quadratic", dim=3))
    c.lopt = ConfigDict(dict(name="hyper_adam"))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=3e-2))
    c.unroll = ConfigDict(dict(num_particles=2, trunc_length=2, horizon=ConfigDict(dict(name="constant", length=4))))
    c.eval = ConfigDict(dict(every=2, lengths=LENGTHS, seeds=3))
    for k, v in overrides.items():
        c[k] = v
    return c


def _eval_rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "eval/seconds"} for r in rows if "eval/seconds" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run evaluated at steps 0, 2, 4 and 6."""
    workdir = str(tmp_path_factory.mktemp("eval_reference"))
    summary = train(config(), workdir, progress=False)
    return workdir, summary


def test_rows_tensorboard_plot_and_cost(reference):
    workdir, summary = reference
    rows = _eval_rows(workdir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    for r in rows:
        for n in LENGTHS:
            p = f"eval/quadratic/{n}/"
            assert r[p + "final_train_loss"] > 0 and r[p + "test_loss"] > 0 and r[p + "diverged"] == 0
            assert r[p + "final_train_loss_over_adam"] == pytest.approx(
                r[p + "final_train_loss"] / r[p + "adam_final_train_loss"])
            assert r[p + "adam_test_loss"] == rows[0][p + "adam_test_loss"]  # computed once
    # The learned optimizer changes between evaluations (the series moves).
    assert rows[0]["eval/quadratic/6/final_train_loss"] != rows[-1]["eval/quadratic/6/final_train_loss"]
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    tag = "eval/quadratic/6/final_train_loss"
    assert scalars[tag] == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows]
    assert os.path.getsize(os.path.join(workdir, "plots", "eval.png")) > 0
    cost = summary["eval"]
    assert cost["evaluations"] == 4 and 0 < cost["baseline_seconds"] < cost["seconds"] and 0 < cost["share"] < 1
    assert cost["plot"] == os.path.join(workdir, "plots", "eval.png")
    series = continuous_eval.eval_series([json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))])
    assert series[("quadratic", 6)]["step"] == [0, 2, 4, 6]


def test_one_compiled_program_per_length(reference):
    """Four evaluations, two lengths: each length's program compiled once (the meta-params
    are an argument)."""
    trainer = config_lib.build(config())
    for n in LENGTHS:
        assert held_out.program(trainer.task_family, trainer.learned_opt, n)._cache_size() == 1


def test_a_resumed_run_continues_the_same_series(reference, tmp_path, monkeypatch):
    """Stopped at step 4 and resumed to 6: the eval rows are the uninterrupted run's (no row
    twice, the same numbers), and the Adam baseline comes from the checkpoint, not tuned
    again."""
    workdir = str(tmp_path)
    train(config(num_outer_steps=4), workdir, progress=False)
    calls = []
    tune = evaluation.tune_adam
    monkeypatch.setattr(evaluation, "tune_adam", lambda *a, **k: calls.append(a) or tune(*a, **k))
    train(config(), workdir, progress=False)
    assert calls == []
    assert _eval_rows(workdir) == _eval_rows(reference[0])


@pytest.mark.slow  # ~15 s; the resume path itself is test_a_resumed_run_continues_the_same_series
def test_an_evaluation_lost_at_an_interrupt_is_made_up(reference, tmp_path):
    """A run killed after its step-4 checkpoint but before the step-4 eval row reached
    metrics.jsonl: the resumed run evaluates step 4 first (its state is the checkpoint's)."""
    workdir = str(tmp_path)
    train(config(num_outer_steps=4), workdir, progress=False)
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if not (r["step"] == 4 and "eval/seconds" in r))
    train(config(), workdir, progress=False)
    assert _eval_rows(workdir) == _eval_rows(reference[0])


@pytest.mark.parametrize("section,message", [
    (dict(every=0, lengths=(3,)), "config.eval: every must be an int >= 1"),
    (dict(every=2, lengths=()), "config.eval: lengths must be distinct ints >= 1"),
    (dict(every=2, lengths=(3, 3)), "config.eval: lengths must be distinct ints >= 1"),
    (dict(every=2, lengths=(3,), baseline="sgd"), "config.eval: baseline must be one of"),
    (dict(every=2, lengths=(3,), seed=1), "unknown option 'seed' for config.eval. Did you mean 'seeds'"),
    (dict(every=2, lengths=(3,), tasks=dict(bowl=dict(dim=4))), "config.eval: tasks.bowl must be a task section"),
])
def test_bad_eval_options_are_one_line(section, message):
    with pytest.raises(ConfigError) as e:
        config_lib.validate(config(eval=ConfigDict(section)))
    assert "\n" not in str(e.value) and message in str(e.value), str(e.value)


def test_eval_instances_are_apart_from_the_curriculums():
    c = config(eval=ConfigDict(dict(every=2, lengths=(3,), seed_offset=2_000_004)),
               curriculum=ConfigDict(dict(stages=(2, 4), period=1, valid_seeds=8)))
    with pytest.raises(ConfigError, match=r"config.eval.seed_offset: .* overlap the curriculum's"):
        config_lib.validate(c)
    c.eval.seed_offset = 2_000_008
    config_lib.validate(c)


def test_eval_tasks_default_to_the_training_task_or_name_their_own():
    c = config()
    trainer = config_lib.build(c)
    assert config_lib.eval_tasks(c, trainer.task_family) == {"quadratic": trainer.task_family}
    c.eval.tasks = ConfigDict(dict(wide=dict(name="quadratic", dim=7)))
    built = config_lib.eval_tasks(c, trainer.task_family)
    assert list(built) == ["wide"] and built["wide"].dim == 7
    c.eval.tasks = ConfigDict(dict(wide=dict(name="quadratc")))
    with pytest.raises(ConfigError, match=r"config.eval.tasks.wide: unknown task family 'quadratc'"):
        config_lib.eval_tasks(c, trainer.task_family)
