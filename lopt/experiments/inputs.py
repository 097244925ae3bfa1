"""What the programs read that is not their code: the experiment config files and the raw MNIST
files the MNIST experiments prepare their dataset from. Both are found the same way from a
checkout and from an installed wheel, from any working directory; a missing one is a
:class:`UsageError` saying in one line how to provide it.

The configs are the repository's ``configs/``, which the wheel ships inside the package as
``lopt/configs`` (pyproject's ``package-dir``), so a bare name such as ``quickstart`` names a
shipped config wherever lopt is installed. Imports nothing heavy at module level.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lopt/
_ROOT = os.path.dirname(_PACKAGE)
#: The repository root when lopt runs from a checkout (scripts/*.py, an editable install), else
#: None (an installed wheel: the directory above lopt is site-packages).
CHECKOUT = _ROOT if os.path.isfile(os.path.join(_ROOT, "pyproject.toml")) else None
#: The shipped configs: lopt/configs when installed, the checkout's configs/ otherwise.
CONFIGS = next((d for d in (os.path.join(_PACKAGE, "configs"), os.path.join(_ROOT, "configs"))
                if os.path.isdir(d)), os.path.join(_PACKAGE, "configs"))
#: The environment variable naming the directory of raw MNIST files (IDX) the MNIST experiments
#: prepare ``mnist`` from when it is not prepared yet (unset: a checkout's ``../shared/data``).
MNIST_SOURCE_ENV = "LOPT_MNIST_SOURCE"


class UsageError(Exception):
    """A bad input to a program or an experiment: reported in one line, exit code 2."""


def shipped() -> list[str]:
    """The names of the shipped configs (``quickstart``, ``elo``, ...), sorted."""
    if not os.path.isdir(CONFIGS):
        return []
    return sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py") and not f.startswith("_"))


def config_path(value: str, flag: str = "--config") -> str:
    """The config file ``value`` names: a path to a file as given, else a shipped config named
    bare (``quickstart``), as a file name (``quickstart.py``) or as the docs write it
    (``configs/quickstart.py``, which thus works from any directory and installed)."""
    if os.path.isfile(value):
        return value
    name = value.removeprefix("configs/").removesuffix(".py")
    if name and "/" not in name and os.path.isfile(os.path.join(CONFIGS, f"{name}.py")):
        return os.path.join(CONFIGS, f"{name}.py")
    names = ", ".join(shipped()) or f"none found in {CONFIGS}"
    if "/" not in value and not value.endswith(".py"):
        raise UsageError(f"{flag}: no shipped config named {value!r} (shipped: {names}); or give "
                         "the path of a config file")
    raise UsageError(f"{flag}: no such config file: {value} (or name a shipped config: {names})")


def load_module(path: str, name: str) -> Any:
    """Execute the Python file ``path`` (a config file) as module ``name``."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(value: str, flag: str = "--config"):
    """``get_config()`` of the config ``value`` names (:func:`config_path`)."""
    path = config_path(value, flag)
    name = os.path.basename(path).removesuffix(".py")
    return load_module(path, f"_experiment_{name}").get_config()


def mnist_source() -> tuple[str, str] | None:
    """Where the raw MNIST files are and who said so: ``$LOPT_MNIST_SOURCE``, else a checkout's
    ``../shared/data`` if it exists, else None."""
    if os.environ.get(MNIST_SOURCE_ENV):
        path = os.path.abspath(os.path.expanduser(os.environ[MNIST_SOURCE_ENV]))
        return path, f"${MNIST_SOURCE_ENV}"
    if CHECKOUT is not None:
        shared = os.path.join(os.path.dirname(CHECKOUT), "shared", "data")
        if os.path.isdir(shared):
            return shared, "the checkout's ../shared/data"
    return None


def ensure_mnist(config) -> None:
    """Prepare the ``mnist`` dataset from :func:`mnist_source` if a config needs it and it is
    missing (the experiments use MNIST where the papers did)."""
    if config.task.get("dataset") != "mnist":
        return
    from tasks import data, prepare

    try:
        data.load("mnist")
        return
    except Exception:  # noqa: BLE001  not prepared (or unreadable): prepare it below
        pass
    how = (f"set {MNIST_SOURCE_ENV}=DIR, a directory holding MNIST's IDX files (train-*/t10k-*-"
           "ubyte, .gz or not), and it is prepared on first use")
    found = mnist_source()
    if found is None:
        raise UsageError(f"the mnist dataset is not prepared in {data.default_data_dir()}; {how}")
    source, origin = found
    if not os.path.isdir(source):
        raise UsageError(f"the mnist dataset is not prepared and {origin} ({source}) is not a "
                         f"directory; {how}")
    print(f"preparing mnist from {source}", flush=True)
    try:
        prepare.prepare("mnist", source, progress=False)
    except (OSError, ValueError) as e:  # a bad or missing IDX file
        why = " ".join(str(e).split())
        raise UsageError(f"cannot prepare mnist from {source} ({origin}): {why}") from None
