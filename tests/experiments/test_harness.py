"""The experiments' harness on hand-made inputs: a run record read from ``metrics.jsonl``."""

from __future__ import annotations

import json

import pytest
from ml_collections import ConfigDict

from lopt.experiments import harness


def _write_rows(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_run_record_averages_only_rows_with_a_meta_loss(tmp_path, monkeypatch):
    """Imitation-only windows (Chen et al. 2020, Alg. 2) log no ``meta_loss``: the record's
    final meta-loss averages the rows that have one (a missing key is not a 0), and its cost is
    the last logged row's, whatever that row holds; curriculum decision rows are neither."""
    rows = [{"step": 10 * (i + 1), "meta_loss": 1.0 + i, "inner_steps_total": 100 * (i + 1),
             "wall_time": 1.0 * i} for i in range(20)]
    rows[-1].pop("meta_loss")  # the last window was imitation only
    rows += [{"step": 200, "decision": "stop", "curriculum_stage": 1, "train_length": 8}]
    _write_rows(tmp_path / "run", rows)
    monkeypatch.setattr(harness, "finished_export", lambda *a, **k: "export.safetensors")
    config = ConfigDict(dict(seed=3, num_outer_steps=200))

    record = harness.meta_train(config, str(tmp_path / "run"))

    with_loss = [r["meta_loss"] for r in rows if "meta_loss" in r]  # 19 rows: the last 2
    assert record["final_meta_loss"] == pytest.approx(sum(with_loss[-2:]) / 2)
    assert record["outer_steps"] == 200 and record["inner_steps"] == 2000
    assert record["reused"] and record["seed"] == 3 and record["train_wall_s"] == 19.0
    assert [d["decision"] for d in record["curriculum"]] == ["stop"]


def test_final_mean_skips_missing_and_null_values():
    rows = [{"meta_loss": 4.0}, {"inner_loss": 1.0}, {"meta_loss": None}, {"meta_loss": 2.0}]
    assert harness.final_mean(rows, "meta_loss") == 2.0  # the last 10% of 2 values: 1 value
    assert harness.final_mean([{"inner_loss": 1.0}], "meta_loss") is None


def test_report_keeps_its_hand_written_section(tmp_path, monkeypatch):
    """Regenerating a report rewrites everything but its "What was tried before" section, which
    is hand-written in docs/results/<experiment>.md (the lab notes are not code)."""
    monkeypatch.setattr(harness, "machine", lambda: "a test machine")
    notes = "## What was tried before\n\n- 600 outer steps: lost on every metric.\n"
    path = tmp_path / "quickstart.md"
    path.write_text("# An old report\n\n**Outcome.**\n\n- stale outcome\n\n" + notes)
    report = harness.Report(name="quickstart", title="Quickstart", claim="c", setting="s",
                            outcome=["first outcome"], tables=[], figures=[], notes=[],
                            record={"x": float("nan")})

    for outcome in ("first outcome", "second outcome"):
        report.outcome = [outcome]
        report.write(str(tmp_path), "python scripts/reproduce.py", 1.0, "cpu")
        text = path.read_text()
        assert text.startswith("# Quickstart\n") and f"- {outcome}\n" in text
        assert "stale" not in text and ("first" in text) == (outcome == "first outcome")
        assert text.endswith("\n\n" + notes) and text.count(harness.NOTES_HEADING) == 1
    assert json.loads((tmp_path / "quickstart.json").read_text())["x"] is None

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    report.write(str(fresh), "python scripts/reproduce.py", 1.0, "smoke")
    assert harness.NOTES_HEADING not in (fresh / "quickstart.md").read_text()
