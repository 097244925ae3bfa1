"""Loading a user's own modules (tasks.user_code) and the registry's rule for a name registered
twice: the same definition again (a module imported by name and by path) replaces the entry; two
different definitions under one name are a one-line ConfigError naming both."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from typing import ClassVar

import pytest
from ml_collections import ConfigDict

import tasks
from lopt.training import config as config_lib
from tasks import user_code
from tasks.registry import ConfigError, Registry

TASK = textwrap.dedent('''
    import dataclasses
    from typing import ClassVar

    import jax.numpy as jnp

    import tasks


    @tasks.register("{name}")
    @dataclasses.dataclass(frozen=True)
    class Bowl:
        name: ClassVar[str] = "{name}"

        def sample(self, key):
            return {{"c": jnp.ones(2)}}

        def init(self, spec, key):
            return {{"x": jnp.zeros(2)}}

        def batch(self, spec, key, split):
            return {{}}

        def loss(self, spec, params, batch):
            return jnp.sum((params["x"] - spec["c"]) ** 2), {{}}
''')


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """An empty directory on sys.path, as the current directory; the modules a test imports
    from it and the names they register are removed afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules, names = set(sys.modules), set(tasks.REGISTRY._factories)
    yield tmp_path
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    for name in set(tasks.REGISTRY._factories) - names:
        del tasks.REGISTRY._factories[name]
        del tasks.REGISTRY._origins[name]


def test_a_module_imported_by_name_and_by_path_registers_once(user_dir):
    (user_dir / "bowl_tasks.py").write_text(TASK.format(name="user_bowl"))
    assert user_code.import_modules(["bowl_tasks"]) == ("bowl_tasks",)
    first = tasks.REGISTRY.factory("user_bowl")
    path = str(user_dir / "bowl_tasks.py")
    assert user_code.import_modules([path, "bowl_tasks"]) == (path, "bowl_tasks")
    again = tasks.REGISTRY.factory("user_bowl")
    assert again is not first and again.__qualname__ == first.__qualname__
    assert tasks.get("user_bowl").name == "user_bowl"


def test_two_definitions_under_one_name_stay_an_error(user_dir):
    (user_dir / "bowl_a.py").write_text(TASK.format(name="user_twice"))
    (user_dir / "bowl_b.py").write_text(TASK.format(name="user_twice").replace("Bowl", "Cup"))
    user_code.import_module("bowl_a")
    with pytest.raises(ConfigError) as e:
        user_code.import_module("bowl_b")
    line = str(e.value)
    assert line.startswith("--module 'bowl_b': task family 'user_twice' is registered twice, by "
                           "bowl_a.Bowl (")
    assert "bowl_b.Cup (" in line and "\n" not in line


def test_a_registry_tells_a_different_function_from_the_same():
    registry = Registry("thing")

    def make():
        return 1

    registry.register("x")(make)
    registry.register("x")(make)  # the same object

    def make():  # noqa: F811  another definition of the same qualified name and module
        return 2

    registry.register("x")(make)
    assert registry.factory("x")() == 2

    with pytest.raises(ConfigError, match="thing 'x' is registered twice"):
        registry.register("x")(lambda: 3)


@pytest.mark.parametrize("entry, message", [
    ("no_such_user_module", "--module 'no_such_user_module': cannot import it: No module named "
                            "'no_such_user_module' (searched sys.path, then the current directory"),
    ("missing/tasks.py", "--module 'missing/tasks.py': no such file"),
    ("broken_tasks", "--module 'broken_tasks': importing it raised {dir}/broken_tasks.py:2: "
                     "ZeroDivisionError: division by zero"),
    ("bad_syntax", "--module 'bad_syntax': importing it raised {dir}/bad_syntax.py:1: "
                   "SyntaxError: invalid syntax"),
    ("needs_missing", "--module 'needs_missing': importing it raised "),  # not "cannot import it"
])
def test_a_module_that_cannot_be_imported_is_one_line(user_dir, entry, message):
    (user_dir / "broken_tasks.py").write_text("import os\n1 / 0\n")
    (user_dir / "bad_syntax.py").write_text("def (:\n")
    (user_dir / "needs_missing.py").write_text("import no_such_dependency_of_it\n")
    with pytest.raises(ConfigError) as e:
        user_code.import_module(entry)
    assert str(e.value).startswith(message.format(dir=user_dir)) and "\n" not in str(e.value)


def test_a_run_records_the_modules_that_registered_its_components(user_dir):
    """By dotted name when that imports the same file, else by path; built-ins never."""
    (user_dir / "named_tasks.py").write_text(TASK.format(name="user_named"))
    (user_dir / "by_path.py").write_text(TASK.format(name="user_by_path"))
    user_code.import_modules(["named_tasks", str(user_dir / "by_path.py")])
    config = ConfigDict(dict(task=dict(name="user_named"), lopt=dict(name="mlp"),
                             estimator=dict(name="pes"),
                             unroll=dict(horizon=dict(name="constant", length=5)),
                             eval=dict(tasks=dict(other=dict(name="user_by_path")))))
    assert config_lib.user_modules(config) == ("named_tasks", str(user_dir / "by_path.py"))
    config.modules = ("extra",)
    assert config_lib.user_modules(config)[0] == "extra"
    assert user_code.entry_of("tasks.quadratic", tasks.quadratic.__file__) is None


def test_config_modules_are_imported_before_names_resolve(user_dir):
    (user_dir / "cfg_tasks.py").write_text(TASK.format(name="user_cfg"))
    config = ConfigDict(dict(modules=("cfg_tasks",)))
    assert config_lib.load_modules(config) == ("cfg_tasks",)
    assert "user_cfg" in tasks.names()
    with pytest.raises(ConfigError, match=r"^config.modules 'nope_mod': cannot import it"):
        config_lib.load_modules(ConfigDict(dict(modules=["nope_mod"])))
    with pytest.raises(ConfigError, match="config.modules: a tuple of module names"):
        config_lib.load_modules(ConfigDict(dict(modules="cfg_tasks")))


def test_the_current_directory_is_searched_after_sys_path(tmp_path, monkeypatch):
    (tmp_path / "cwd_only_tasks.py").write_text("VALUE = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        user_code.import_module("cwd_only_tasks")
        assert sys.modules["cwd_only_tasks"].VALUE == 7
        assert sys.path[-1] == os.getcwd()
    finally:
        sys.modules.pop("cwd_only_tasks", None)


def test_a_reset_policy_is_named_in_config_unroll_reset():
    from estimators.resets import ELOReplay
    from lopt.experiments.inputs import load_config

    config = load_config("quickstart")
    config.unroll.reset = ConfigDict(dict(name="elo_replay", capacity=4))
    config.estimator.name = "es"
    assert config_lib.build(config).unroller.reset == ELOReplay(capacity=4)
    config.unroll.reset.name = "elo_replai"
    with pytest.raises(ConfigError, match=r"^config.unroll.reset: unknown reset policy "
                                          r"'elo_replai'. Did you mean 'elo_replay'"):
        config_lib.build(config)
    config.unroll.reset.name = "elo_replay"
    config.unroll.replay = ConfigDict(dict(capacity=4))
    with pytest.raises(ConfigError, match="replay and reset both choose the reset policy"):
        config_lib.build(config)


def test_loading_an_export_of_an_unimported_optimizer_names_the_recorded_modules(tmp_path):
    """lopt.export.load imports nothing; its error says which modules the run recorded."""
    import lopt
    from lopt import export
    from lopt.hyper import HyperAdam

    @dataclasses.dataclass(frozen=True)
    class Mine(HyperAdam):
        name: ClassVar[str] = "user_mine"

    lopt.register("user_mine")(Mine)
    path = str(tmp_path / "mine.safetensors")
    try:
        export.save(path, Mine(), Mine().init(None), metadata={"modules": ["my_pkg.mine"]})
    finally:
        del lopt.REGISTRY._factories["user_mine"], lopt.REGISTRY._origins["user_mine"]
    with pytest.raises(export.ExportError, match=r"unknown learned optimizer 'user_mine'.* \(the "
                       r"run that wrote it imported my_pkg.mine: import them first\)"):
        export.load(path)
