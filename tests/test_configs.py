"""The shipped config files as the command line reads them: values a config derives from
others (the naive horizon from trunc_length, ELO's chain cap and behaviour-cloning ramp, the
evaluation lengths) are ml_collections references, resolved after the overrides, so an
override of the source moves them, and config.json, ``to_dict`` and the built trainer see plain
numbers."""

from __future__ import annotations

import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from lopt.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(name: str, *overrides: str):
    """``--config=configs/<name>.py --config.<override> ...`` through absl and config_flags, as
    ``lopt-train`` parses them (a flag registry of its own, so tests do not share flags)."""
    argv = ["lopt-train", f"--config={os.path.join(ROOT, 'configs', name + '.py')}",
            *(f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value


def plain(config) -> dict:
    """What config.json holds (``train`` writes ``to_json_best_effort``), checked equal to
    ``to_dict``."""
    written = json.loads(config.to_json_best_effort())
    assert written == json.loads(json.dumps(config.to_dict()))
    return written


@pytest.mark.parametrize("name", ["naive", "naive_mnist"])
def test_naive_trajectories_follow_trunc_length(name):
    config = parse(name, "unroll.trunc_length=50")
    assert plain(config)["unroll"]["horizon"]["length"] == 50
    assert plain(parse(name))["unroll"]["horizon"]["length"] == 20
    if name == "naive":  # the MNIST twin needs its dataset prepared to build
        trainer = config_lib.build(config)
        assert trainer.trunc_length == 50 and trainer.horizon.max_length == 50


def test_elo_cap_and_ramp_follow_their_sources():
    config = parse("elo", "unroll.trunc_length=50", "num_outer_steps=100")
    written = plain(config)
    assert written["unroll"]["horizon"]["length"] == 500  # 10 N
    assert written["unroll"]["behaviour_cloning"]["schedule"]["steps"] == 50  # the first half
    trainer = config_lib.build(config)
    assert trainer.horizon.max_length == 500
    assert trainer.unroller.learned_opt.schedule.steps == 50
    assert plain(parse("elo_mnist", "unroll.trunc_length=50"))["unroll"]["horizon"]["length"] == 500


def test_a_derived_value_can_still_be_overridden_alone():
    config = parse("elo", "unroll.horizon.length=300", "unroll.behaviour_cloning.schedule.steps=7")
    written = plain(config)
    assert written["unroll"]["trunc_length"] == 20 and written["num_outer_steps"] == 600
    assert written["unroll"]["horizon"]["length"] == 300
    assert written["unroll"]["behaviour_cloning"]["schedule"]["steps"] == 7
    naive = plain(parse("naive", "unroll.horizon.length=40"))
    assert naive["unroll"]["trunc_length"] == 20 and naive["unroll"]["horizon"]["length"] == 40


@pytest.mark.parametrize("name", ["elo", "naive"])
def test_evaluation_lengths_are_h_and_10_h_after_overrides(name):
    assert plain(parse(name))["eval"]["lengths"] == [20, 200]
    config = parse(name, "unroll.trunc_length=50")
    assert plain(config)["eval"]["lengths"] == [50, 500]
    assert config_lib.eval_options(config).lengths == (50, 500)
    assert plain(parse(name, "eval.lengths=(30,300,3000)"))["eval"]["lengths"] == [30, 300, 3000]


def test_quickstart_evaluation_is_off_and_follows_its_horizon():
    assert config_lib.eval_options(parse("quickstart")) is None
    config = parse("quickstart", "eval.enabled=True", "unroll.horizon.length=100")
    assert config_lib.eval_options(config).lengths == (100, 1000)
