"""What the command-line programs share: running an absl program with one-line errors and a
``--help`` that succeeds (:func:`run_app`), a ``--config`` flag that takes a shipped config's
name or a file's path (:func:`define_config`), ``--module`` (the user's own components:
:func:`import_user_modules`) and reading ``--lrs``. Imports nothing heavy at
module level, so the programs check their flags before JAX starts.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from lopt.experiments.inputs import UsageError, config_path

# The flags define_config defines are the calling program's own (its --help lists them).
flags.disclaim_key_flags()

#: Every command's ``--module``: the user's modules that register components of their own.
MODULES = flags.DEFINE_multi_string(
    "module", [], "A module of your own to import first, so the tasks, learned optimizers, "
    "estimators, schedules and reset policies it registers can be named (a dotted name, found "
    "on sys.path then in the current directory, or a .py file's path); repeatable. A training "
    "run records it in config.json and its export, so resuming, exporting and evaluating the "
    "run need it no more.")


def import_user_modules(extra=()) -> tuple[str, ...]:
    """Import ``--module``'s modules, then ``extra`` (e.g. an export's recorded ones), and
    return them as recorded; a failure is one ConfigError line (tasks.user_code)."""
    from tasks import user_code

    return user_code.merge(user_code.import_modules(MODULES.value, "--module"),
                           user_code.import_modules(extra, "the run's recorded module"))


class ConfigFlagError(ValueError):
    """A config flag's value names no config file, or the file fails to load. absl reports a
    parser's ValueError as ``flag --config=VALUE: ...``; :func:`parse_flags` prints this one
    as the config error it is."""


class ConfigParser(flags.ArgumentParser):
    """ml_collections' config-file parser (``inner``), given a shipped config's name
    (``quickstart``) or a file's path (:func:`lopt.experiments.inputs.config_path`). A missing
    file, or one whose import or ``get_config()`` raises what ml_collections would let escape as
    a traceback or defer to the config's first use (an OSError), is a :class:`ConfigFlagError`
    at once. ml_collections words syntax errors and a ValueError or TypeError of
    ``get_config()`` itself, which :func:`parse_flags` shortens to one line."""

    def __init__(self, name: str, inner: Any):
        self.name, self.inner = name, inner

    def parse(self, value):
        file, colon, argument = value.partition(":")
        try:
            path = config_path(file, f"--{self.name}")
        except UsageError as e:
            raise ConfigFlagError(str(e)) from None
        try:
            config = self.inner.parse(path + colon + argument)
            getattr(config, "keys", None)  # the stand-in for a deferred OSError raises here
        except (SyntaxError, ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001  whatever the file raised, in one line
            cause = e.__cause__ or e
            why = " ".join(str(cause).split()) or type(cause).__name__
            raise ConfigFlagError(f"--{self.name}: cannot load {path}: "
                                  f"{type(cause).__name__}: {why}") from None
        return config

    def flag_type(self) -> str:
        return self.inner.flag_type()


def define_config(name: str, default: str, help_string: str):
    """``config_flags.DEFINE_config_file`` whose value (``default`` too) may be a shipped
    config's name: ``--config=quickstart`` works from any directory, installed or not, and
    ``--config.<key>=value`` overrides it as usual."""
    holder = config_flags.DEFINE_config_file(name, None, help_string)
    flags.FLAGS[name].parser = ConfigParser(name, flags.FLAGS[name].parser)
    flags.FLAGS.set_default(name, default)
    return holder


def _one_line(text: str) -> str:
    """An exception's message as one line (ml_collections quotes and splits its own)."""
    text = text.strip().strip("'\"").replace("\\'", "'").replace("\\n", "\n")
    return "; ".join(part.strip().strip("'\"") for part in text.splitlines() if part.strip())


def _override_error(argv: list[str], e: BaseException) -> str:
    """``config.<path>: <what>; <fix>`` for an exception raised while applying a
    ``--config.<path>=...`` override (ml_collections raises KeyError/AttributeError for a key
    the config file does not have, ValueError/TypeError for a value of the wrong type)."""
    message = _one_line(str(e))
    missing = message.split(";")[0].strip("'\" ")
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            path = arg[2:].split("=", 1)[0]
            if missing in path.split("."):
                hint = message.split(";", 1)[1].strip() + "; " if ";" in message else ""
                section = path.rsplit(".", 1)[0]
                return (f"{path}: the config file has no such key to override; {hint}an override "
                        f"can only change a key the file sets (add it to {section} there)")
    return message


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a bad or missing flag, or a bad ``--config.<key>=`` override, is
    a one-line error with exit code 2 (a config override's begins with ``config error:``)."""
    try:
        return flags.FLAGS(argv)
    except SyntaxError as e:  # a config file that does not parse (raised while flags parse)
        print(f"config error: --config: cannot load {e.filename}: SyntaxError: {e.msg} (line "
              f"{e.lineno})", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        if isinstance(e.__context__, ConfigFlagError):  # raised by ConfigParser, recast by absl
            print(f"config error: {e.__context__}", file=sys.stderr)
            sys.exit(2)
        line = " ".join(str(e).split())
        if "Error whilst parsing config file" in line:  # get_config raised: its last line
            last = [x for x in str(e).strip().splitlines() if x.strip()][-1].strip()
            print(f"config error: {line.split(': Error whilst', 1)[0].replace('flag ', '')}: "
                  f"get_config() raised {last}", file=sys.stderr)
            sys.exit(2)
        if line.startswith("flag --config.") and ": " in line:
            flag, why = line[len("flag --"):].split(": ", 1)
            path, _, value = flag.partition("=")
            print(f"config error: {path}: cannot read {value!r} as this key's type ({why}); give "
                  "a value of the type the config file sets", file=sys.stderr)
        else:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        print(f"config error: {_override_error(argv, e)}", file=sys.stderr)
        sys.exit(2)


HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-help")


def run_app(main: Any, doc: str, module: str, argv: list[str] | None = None) -> None:
    """Run ``main(argv) -> exit code`` as an absl program whose flags live in ``module``:
    ``--help`` prints ``doc`` and those flags and exits 0 (absl's exits 1); bad flags are one
    line with exit code 2 (:func:`parse_flags`)."""
    from absl import app

    import warnings

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    argv = list(sys.argv if argv is None else argv)
    import os

    if os.getcwd() not in sys.path:  # the user's modules beside the working directory, after
        sys.path.append(os.getcwd())  # the installed ones (a config file may import them)
    if any(a in HELP_FLAGS for a in argv[1:]):
        paragraphs = [p for p in doc.strip().split("\n\n") if p.strip()]
        print("\n\n".join(paragraphs[:2]))  # what it does, and the example command
        print("\nflags:")
        own = {f.name: f for f in flags.FLAGS.get_key_flags_for_module(module)}
        own[MODULES.name] = flags.FLAGS[MODULES.name]
        for flag in sorted(own.values(), key=lambda f: f.name):
            print(f"  --{flag.name}: {flag.help} (default: {flag.default_as_str or 'none'})")
        sys.exit(0)
    app.run(lambda a: sys.exit(main(a)), argv=argv, flags_parser=parse_flags)


def make_dir(path: str, flag: str) -> None:
    """Create the output directory ``path`` given by ``flag``; a UsageError if it cannot be."""
    import os

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag}: cannot create {path}: {e.strerror or e}") from None


def parse_lrs(text: str | None) -> list[float] | None:
    """Comma-separated learning rates (``--lrs``); None for an empty flag (the default grid)."""
    if text is None or not text.strip():
        return None
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lrs must be comma-separated numbers, got {text!r}") from None
    if not lrs or any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        raise UsageError(f"--lrs must be positive finite numbers, got {text!r}")
    return lrs
