"""docs/extending.md, run: each of its four examples (docs/examples/: a task, a learned optimizer,
an estimator, a reset policy) meta-trains for a few outer steps through the checkout's
meta_train script and is evaluated against tuned Adam with its evaluate script; and a task in
a user's own module trains, resumes, exports, evaluates and ablates through the commands with no
code of the package changed, its module named once (``--module``) and recorded in the workdir.
The same through the installed wheel: tests/test_package.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from tests import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples")
# Compilation is most of every run: the tests' fast compile flags (as the other command tests).
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
TINY = ["--config.num_outer_steps=2", "--config.log_every=1", "--config.unroll.num_particles=2",
        "--config.unroll.trunc_length=4", "--config.unroll.horizon.length=8", "--noprogress"]
EVAL = ["--steps=8", "--seeds=2", "--lrs=0.01,0.1"]


def script(name: str, *args: str, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python scripts/NAME.py ARGS`` in ``cwd``, asserting it succeeds."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *args],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_the_page_s_code_is_the_examples_code_and_the_readme_links_it():
    page = open(os.path.join(ROOT, "docs", "extending.md")).read()
    files = {name: open(os.path.join(EXAMPLES, f"{name}.py")).read()
             for name in ("rosenbrock", "momentum_lopt", "vanilla_es", "latest_replay")}
    for name in files:
        assert f"(examples/{name}.py)" in page, name
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 4
    for block in blocks:  # each an excerpt of an example, as it is there
        assert any(block in text for text in files.values()), block[:200]
    assert "(docs/extending.md)" in open(os.path.join(ROOT, "README.md")).read()


@pytest.mark.parametrize("example, task, extra", [
    # rosenbrock.py also runs in the end-to-end user-module test below, in the fast suite.
    pytest.param("rosenbrock", "rosenbrock2d", ["--config.lopt.hidden_size=4"],
                 marks=pytest.mark.slow),
    ("momentum_lopt", "quadratic", []),
    ("vanilla_es", "quadratic", ["--config.lopt.hidden_size=4"]),
    ("latest_replay", "quadratic", ["--config.lopt.hidden_size=4"]),
])
def test_an_example_meta_trains_and_evaluates_against_tuned_adam(example, task, extra, tmp_path):
    """The example file is the config (``get_config``) and registers its component when it
    loads; the run records it, so the evaluation of its export finds the component unasked."""
    path = os.path.join(EXAMPLES, f"{example}.py")
    script("meta_train", f"--config={path}", "--workdir=run", *TINY, *extra, cwd=tmp_path)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["modules"] == [path]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
            if line.strip()]
    assert [r["step"] for r in rows if "meta_loss" in r] == [1, 2]
    export = tmp_path / "run" / "export" / "optimizer.safetensors"
    proc = script("evaluate", f"--export={export}", f"--task={task}", *EVAL, "--out=eval",
                  cwd=tmp_path)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["task"] == task and results["adam"]["best_lr"] in (0.01, 0.1)
    assert "adam (lr=" in proc.stdout and "learned (" in proc.stdout


MY_CONFIG = textwrap.dedent('''
    from ml_collections import ConfigDict

    from lopt.experiments.inputs import load_config


    def get_config():  # names the task of my_tasks.py; imports nothing of it
        c = load_config("quickstart")
        c.task = ConfigDict(dict(name="rosenbrock2d"))
        c.lopt.hidden_size, c.lopt.hidden_layers = 4, 1
        c.unroll.num_particles, c.unroll.trunc_length = 2, 4
        c.unroll.horizon.length = 8
        c.num_outer_steps, c.log_every, c.checkpoint_every = 2, 1, 1
        return c
''')
ABLATION_CONFIG = textwrap.dedent('''
    from ml_collections import ConfigDict

    from lopt.experiments.inputs import load_config


    def get_config():  # the shipped {name} config on the task of my_tasks.py
        c = load_config("{name}")
        c.task = ConfigDict(dict(name="rosenbrock2d"))
        return c
''')
ABLATE_TINY = ["--set=lopt.hidden_size=4", "--set=lopt.hidden_layers=1",
               "--set=unroll.num_particles=2", "--set=unroll.trunc_length=4",
               "--set=unroll.replay.capacity=2", "--set=unroll.behaviour_cloning.schedule.steps=2",
               "--outer_steps=2", "--seeds=2", "--factor=2", "--lrs=0.01,0.1", "--noprogress"]


def test_a_user_module_task_trains_resumes_exports_and_evaluates(tmp_path):
    shutil.copy(os.path.join(EXAMPLES, "rosenbrock.py"), tmp_path / "my_tasks.py")
    (tmp_path / "my_config.py").write_text(MY_CONFIG)

    script("meta_train", "--module=my_tasks", "--config=my_config.py", "--workdir=run",
           "--noprogress", cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["modules"] == ["my_tasks"]

    # Resumed without --module: config.json names it.
    script("meta_train", "--config=my_config.py", "--workdir=run", "--config.num_outer_steps=4",
           "--noprogress", cwd=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "meta_loss" in r] == [1, 2, 3, 4]

    script("export", "--workdir=run", "--step=3", cwd=tmp_path)
    assert (tmp_path / "run" / "export" / "optimizer_step3.safetensors").is_file()
    script("evaluate", "--export=run/export/optimizer.safetensors", "--task=rosenbrock2d", *EVAL,
           "--out=eval", cwd=tmp_path)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["task"] == "rosenbrock2d"


@pytest.mark.slow  # ~25 s: the ablation meta-trains and tunes again (the same --module path)
def test_a_user_module_task_ablates(tmp_path):
    shutil.copy(os.path.join(EXAMPLES, "rosenbrock.py"), tmp_path / "my_tasks.py")
    for name in ("naive", "elo"):
        (tmp_path / f"my_{name}.py").write_text(ABLATION_CONFIG.format(name=name))
    script("ablate", "--module=my_tasks", "--naive_config=my_naive.py", "--elo_config=my_elo.py",
           "--methods=adamw,naive", "--out=ablate", *ABLATE_TINY, cwd=tmp_path)
    assert "LO naive" in (tmp_path / "ablate" / "table.md").read_text()
    run = json.loads((tmp_path / "ablate" / "naive" / "seed0" / "config.json").read_text())
    assert run["modules"] == ["my_tasks"] and run["task"] == {"name": "rosenbrock2d"}


@pytest.mark.parametrize("command, args", [
    ("meta_train", ["--config=quickstart", "--workdir=run"]),
    ("evaluate", ["--export=missing.safetensors"]),
    ("export", ["--workdir=run"]),
    ("ablate", ["--out=ablate"]),
    ("reproduce", ["--experiment=quickstart"]),
])
def test_every_command_takes_module_and_names_a_missing_one_in_one_line(command, args, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "missing.safetensors").write_text("")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{command}.py"),
                           "--module=no_such_user_module", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-4000:]
    assert "--module 'no_such_user_module': cannot import it" in proc.stderr
