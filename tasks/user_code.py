"""Loading a user's own components: the modules that register them.

A task family, learned optimizer, estimator, schedule or reset policy of a user's own is
registered, as the package's own are, when its module is imported (``@tasks.register(...)``).
So every command takes ``--module=my_pkg.my_tasks`` (repeatable) and a config may list
``modules``: each is imported before any name is looked up. An entry is a module's dotted name
or the path of a ``.py`` file. The current directory is searched after the installed packages,
as ``python -m`` would search it first, so a module beside the command's working directory
imports without a ``PYTHONPATH`` while it cannot shadow an installed one.

A run records in its ``config.json`` the modules it imported and those that registered the
names it uses (:func:`entry_of`), so resuming, exporting or evaluating it needs no flag.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import zlib
from typing import Iterable

from tasks.registry import ConfigError

#: The packages whose modules are built in (never recorded as user code).
PACKAGES = ("tasks", "estimators", "lopt")


def _search_cwd() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or os.sep in entry


def _file_module_name(path: str) -> str:
    """A module name for the file ``path``, stable for one path and apart from real modules."""
    stem = "".join(c if c.isalnum() else "_" for c in os.path.basename(path).removesuffix(".py"))
    return f"lopt_user_{stem}_{zlib.crc32(path.encode()):08x}"


def import_module(entry: str, where: str = "--module") -> str:
    """Import ``entry`` (a dotted module name or a ``.py`` file's path) and return it as a
    config records it (a file's absolute path). Anything that stops it is one ConfigError
    line naming ``where``, the entry and the cause."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"{where}: a module's dotted name or a .py file's path, got {entry!r}")
    entry = entry.strip()
    _search_cwd()
    try:
        if _is_path(entry):
            path = os.path.abspath(os.path.expanduser(entry))
            if not os.path.isfile(path):
                raise ConfigError(f"{where} {entry!r}: no such file")
            name = _file_module_name(path)
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            return path
        importlib.import_module(entry)
        return entry
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where} {entry!r}: {e}") from None
    except ModuleNotFoundError as e:
        if e.name and entry != e.name and not entry.startswith(e.name + "."):
            raise ConfigError(f"{where} {entry!r}: importing it raised {_where(e)}"  # its import
                              f"ModuleNotFoundError: {e}") from None
        raise ConfigError(
            f"{where} {entry!r}: cannot import it: {e} (searched sys.path, then the current "
            "directory; add its directory to PYTHONPATH or give the file's path)") from None
    except Exception as e:  # noqa: BLE001  whatever the module raised, in one line
        raise ConfigError(f"{where} {entry!r}: importing it raised {_where(e)}"
                          f"{type(e).__name__}: {' '.join(str(e).split())}") from None


def _where(e: BaseException) -> str:
    """``file:line: `` of the innermost frame of ``e``'s traceback (or of a SyntaxError)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: "
    tb, where = e.__traceback__, ""
    while tb is not None:  # the innermost frame of real code (not importlib's frozen frames)
        file = tb.tb_frame.f_code.co_filename
        if not file.startswith("<"):
            where = f"{file}:{tb.tb_lineno}: "
        tb = tb.tb_next
    return where


def import_modules(entries: Iterable[str], where: str = "--module") -> tuple[str, ...]:
    """:func:`import_module` of each entry, in order; the entries as recorded, without repeats."""
    if isinstance(entries, str):
        entries = (entries,)
    return merge(import_module(e, where) for e in entries)


def merge(*groups: Iterable[str]) -> tuple[str, ...]:
    """The entries of ``groups`` in order, each once."""
    out: list[str] = []
    for group in groups:
        out += [e for e in group if e not in out]
    return tuple(out)


def entry_of(module: str, file: str | None) -> str | None:
    """How a config records the module ``module`` (file ``file``) that registered a name: its
    dotted name when importing that name gives the same file, else the file's path; None for
    the package's own modules and for code without a file."""
    if module.split(".")[0] in PACKAGES:
        return None
    if file and module != "__main__" and _found_as(module) == os.path.realpath(file):
        return module
    return os.path.abspath(file) if file else None


def _found_as(module: str) -> str | None:
    """The file importing ``module`` by name would load, asked of the import system's finders
    (not of ``sys.modules``, where a file imported by path sits under a name nothing imports)."""
    parent = module.rpartition(".")[0]
    path = None
    if parent:
        path = getattr(sys.modules.get(parent), "__path__", None)
        if path is None:
            return None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            spec = find(module, path) if find is not None else None
        except (ImportError, ValueError, TypeError):
            spec = None
        if spec is not None:
            return os.path.realpath(spec.origin) if spec.origin else None
    return None
