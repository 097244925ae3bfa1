"""What the command-line programs share: running an absl program with one-line errors and a
``--help`` that succeeds (:func:`run_app`), and, for the ablations, reading a run's
``metrics.jsonl``, reusing a finished run, per-seed statistics, JSON-safe results and markdown
tables. Imports nothing heavy at module level, so the programs check their flags before JAX
starts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from typing import Any

#: A run's final meta-loss is the mean over this fraction of its last logged rows.
FINAL_FRACTION = 0.1


class UsageError(Exception):
    """A bad command-line input: reported in one line, exit code 2."""


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
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except SyntaxError as e:  # a config file that does not parse (raised while flags parse)
        print(f"config error: --config: cannot load {e.filename}: SyntaxError: {e.msg} (line "
              f"{e.lineno})", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
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
    from absl import app, flags

    import warnings

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    argv = list(sys.argv if argv is None else argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        paragraphs = [p for p in doc.strip().split("\n\n") if p.strip()]
        print("\n\n".join(paragraphs[:2]))  # what it does, and the example command
        print("\nflags:")
        for flag in sorted(flags.FLAGS.get_key_flags_for_module(module), key=lambda f: f.name):
            print(f"  --{flag.name}: {flag.help} (default: {flag.default_as_str or 'none'})")
        sys.exit(0)
    app.run(lambda a: sys.exit(main(a)), argv=argv, flags_parser=parse_flags)


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


def load_module(path: str, name: str) -> Any:
    """Execute the Python file ``path`` (a config file) as module ``name``."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- reading runs ------------------------------------------------------------------------------


def read_rows(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (empty if there is none yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_mean(rows: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the last ``FINAL_FRACTION`` of the rows that have it."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    k = max(1, math.ceil(FINAL_FRACTION * len(vals)))
    return float(sum(vals[-k:]) / k)


def finished_export(run_dir: str, num_outer_steps: int, *, stops_early: bool = False) -> str | None:
    """The export of a run in ``run_dir`` that already finished, else None.

    Finished means its latest checkpoint is at ``num_outer_steps`` (or, with ``stops_early``,
    the run ended before that: a curriculum that stopped writes its export and a final
    checkpoint). ``lopt.training.train`` resumes an unfinished run by itself, but on a finished
    one it saves the final checkpoint again, which orbax refuses (StepAlreadyExistsError); a
    finished run is therefore not passed to it again."""
    from absl import logging

    from lopt.training import checkpoint as ckpt_lib

    export_path = os.path.join(run_dir, "export", "optimizer.safetensors")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not (os.path.isfile(export_path) and os.path.isdir(ckpt_dir)):
        return None
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
    latest = checkpointer.latest_step()
    checkpointer.close()
    rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    if latest is None or not rows or max(r["step"] for r in rows) < latest:
        return None
    if latest < num_outer_steps:
        stopped = any(r.get("decision") == "stop" for r in rows)
        if not (stops_early and stopped):
            return None
    if latest > num_outer_steps:
        logging.warning("%s ran %d outer steps, more than the %d of this budget; reusing it",
                        run_dir, latest, num_outer_steps)
    return export_path


# --- numbers -----------------------------------------------------------------------------------


def stats(x: Any) -> dict | None:
    """``{"mean", "std", "per_seed"}`` of per-seed values (NaN/inf kept: diverged seeds)."""
    import numpy as np

    if x is None:
        return None
    v = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v.tolist()}


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def pm(s: dict | None, spec: str = ".4f") -> str:
    """``mean ± std`` of a :func:`stats` dict, ``-`` when missing or not finite."""
    if s is None or not math.isfinite(s["mean"]):
        return "-"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}}"


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def write_report(directory: str, caption: str, table: str, record: dict, plot_path: str | None,
                 wall_s: float) -> None:
    """Print ``table``; write ``table.md`` (caption + table) and ``results.json`` (``record``,
    non-finite numbers as null) into ``directory``; print where everything went."""
    print()
    print(table)
    table_path = os.path.join(directory, "table.md")
    with open(table_path, "w") as f:
        f.write(f"{caption}\n\n{table}\n")
    results_path = os.path.join(directory, "results.json")
    with open(results_path, "w") as f:
        json.dump(clean(record), f, indent=1)
        f.write("\n")
    print(f"  table:   {table_path}")
    print(f"  results: {results_path}")
    print(f"  plot:    {plot_path}")
    print(f"  wall time: {wall_s:.0f} s")
