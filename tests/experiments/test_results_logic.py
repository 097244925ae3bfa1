"""The reproductions' decision logic on hand-made inputs (no meta-training): Metz's meta-loss
plateau, ELO's "degrades at 10 H" and its stability figures, and Chen's arms (naive and IL get
CL+IL's meta-updates, IL keeps the last stage's r)."""

from __future__ import annotations

import numpy as np
import pytest

from lopt.experiments import chen2020, elo_reproduce, metz2019


def test_plateau_compares_the_last_tenth_with_the_tenth_before():
    falling = [{"step": i, "meta_loss": 100.0 - i} for i in range(100)]
    flat = [{"step": i, "meta_loss": 1.0 + (0.1 if i % 2 else -0.1)} for i in range(100)]
    p = metz2019.plateau(falling + [{"step": 100}])  # a row without a meta-loss is skipped
    assert p["last"] == pytest.approx(np.mean(np.arange(1, 11)))
    assert p["before"] == pytest.approx(np.mean(np.arange(11, 21)))
    assert p["change"] < -0.3
    assert abs(metz2019.plateau(flat)["change"]) < 1e-9
    assert metz2019.plateau(falling[:3]) is None


def _eval(curve, final, acc=None):
    curve = np.asarray(curve, np.float64)[None].repeat(4, 0)
    return {"train_loss": curve, "final_train_loss": np.full(4, final),
            "test_accuracy": None if acc is None else np.asarray(acc, np.float64)}


def test_degradation_absolute_when_the_loss_turns_back_up_or_accuracy_drops():
    H, long = 10, 100
    down = np.linspace(2.0, 0.5, long + 1)
    turns = np.concatenate([np.linspace(2.0, 0.5, 51), np.linspace(0.5, 1.0, 50)])
    adamw = {H: _eval(down[: H + 1], 1.0), long: _eval(down, 0.5)}
    steady = {H: _eval(down[: H + 1], 1.0, [0.8, 0.8, 0.8, 0.8]), long: _eval(down, 0.5, [0.9] * 4)}
    d = elo_reproduce.degradation(steady, adamw, H, long)
    assert not d["absolute"] and not d["relative"] and d["rise"] == pytest.approx(0.0, abs=1e-9)
    d = elo_reproduce.degradation({H: steady[H], long: _eval(turns, 1.0, [0.9] * 4)}, adamw, H, long)
    assert d["absolute"] and d["rise"] > 0.5
    assert d["relative"]  # 1.0 / 0.5 at 10 H against 1.0 / 1.0 at H
    # An accuracy drop counts only beyond 2 standard errors of the paired differences.
    noisy = {H: _eval(down[: H + 1], 1.0, [0.80, 0.82, 0.78, 0.80]), long: _eval(down, 0.5, [0.81, 0.80, 0.79, 0.79])}
    assert not elo_reproduce.degradation(noisy, adamw, H, long)["absolute"]
    drop = {H: _eval(down[: H + 1], 1.0, [0.80, 0.82, 0.78, 0.80]), long: _eval(down, 0.5, [0.70, 0.71, 0.69, 0.70])}
    assert elo_reproduce.degradation(drop, adamw, H, long)["absolute"]


def test_stability_reads_only_the_steps_after_the_ramp():
    rows = [{"step": s, "meta_loss": 5.0 if s <= 50 else 1.0 + s / 1000, "clipped_share": 0.5 if s <= 50 else 0.1,
             "nonfinite_share": 0.0} for s in range(10, 110, 10)]
    st = elo_reproduce.stability(rows, ramp_end=50)
    assert st["meta_loss_max"] == pytest.approx(1.1)
    assert st["clipped_share"] == pytest.approx(0.1)
    assert elo_reproduce.stability(rows, ramp_end=200) == {}


def test_chen_arms_share_everything_but_the_techniques():
    b = chen2020.BUDGETS["cpu"]
    c = chen2020.chen_configs(b, "lstm_dm")
    last = c["CL+IL"].curriculum.stages[-1]
    assert c["CL"].curriculum.stages == c["CL+IL"].curriculum.stages and not c["CL"].imitation.enabled
    for arm in ("naive", "IL"):
        assert tuple(c[arm].curriculum.stages) == (last,) and c[arm].unroll.horizon.length == last
    assert not c["naive"].imitation.enabled
    assert c["IL"].imitation.enabled and c["IL"].imitation.prob == c["CL+IL"].imitation.prob[-1]
    for arm in ("naive", "CL", "IL"):  # everything else is CL+IL's
        for key in ("task", "lopt", "estimator", "meta_optimizer"):
            assert c[arm][key].to_dict() == c["CL+IL"][key].to_dict(), (arm, key)
        assert c[arm].unroll.num_particles == c["CL+IL"].unroll.num_particles


def test_chen_matched_rounds_up_to_whole_validation_periods():
    c = chen2020.chen_configs(chen2020.BUDGETS["cpu"], "lstm_dm")["naive"]
    steps = c.curriculum.period * -(-c.curriculum.stages[-1] // c.unroll.trunc_length)  # per period
    m = chen2020.matched(c, 3 * steps + 1)
    assert m.curriculum.min_periods == m.curriculum.max_periods == 4
    assert m.num_outer_steps == 4 * steps
    assert chen2020.matched(c, 2 * steps).num_outer_steps == 2 * steps
