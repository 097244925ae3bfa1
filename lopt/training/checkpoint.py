"""Orbax checkpoints of the whole meta-training state, with integrity checks.

A checkpoint (``checkpoints/<step>/``, with ``<step>.files.json`` recording the size and
SHA-256 of each of its files) holds the device items (``state``: the
``MetaTrainState`` with every particle's inner state; plus what hooks add, e.g. the curriculum's
best meta-params) written with ``StandardSave``, and a JSON ``host`` item: hooks' host state, the
items' structure (path, shape, dtype of every leaf) and a SHA-256 of their bytes. Items are
restored into the structure of a freshly initialised state, so a resumed run continues
bit-for-bit.

:meth:`Checkpointer.restore_latest` tries the newest checkpoint first and checks it: a
checkpoint whose files are missing, truncated or changed (found from the file record before
orbax reads anything; or orbax fails; or the restored arrays do not match their SHA-256) is
*corrupt*: it is named in a warning, kept (renamed to
``<step>.corrupt``, never deleted) and the next newest is tried. A checkpoint whose structure
differs from this config's (another task or optimizer size) is not corrupt but foreign: that is
an error naming the first differing leaf. When no intact checkpoint remains,
:class:`CheckpointError` says so in one line.

A save that fails for want of space or permission (:mod:`lopt.training.faults`) removes its
half-written temporary directory and raises ``WriteFailed``; the checkpoints before it stay
intact (orbax renames a checkpoint into place only once it is complete), and orbax also clears
temporary directories a killed run left when the next run opens the directory (``owner``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lopt.training import faults
from tasks.registry import ConfigError


class CheckpointError(RuntimeError):
    """No intact checkpoint to resume from (the message is one line)."""


class CheckpointMismatchError(ConfigError):
    """The workdir's checkpoint was written by a config with other shapes."""


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint was unreadable and skipped (kept under a new name)."""


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def structure(tree: Any) -> list[list]:
    """[path, shape, dtype] of every leaf (JSON-able)."""
    def dtype(x):
        return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype

    return [[p, list(np.shape(x)), str(dtype(x))] for p, x in _leaves(tree)]


def checksum(tree: Any) -> str | None:
    """SHA-256 over every leaf's path, shape, dtype and bytes; None when some array is not
    fully addressable from this process (multi-host: each host holds only its shards)."""
    h = hashlib.sha256()
    for path, x in _leaves(tree):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
        h.update(f"{path}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet():
    """Orbax reports a failed read with tracebacks on its loggers; the caller reports it once."""
    names = ("absl", "orbax", "asyncio", "jax")
    saved = [(n, logging.getLogger(n).level) for n in names]
    for n, _ in saved:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()  # orbax's failed read tasks report "never retrieved" when collected: now
        for n, level in saved:
            logging.getLogger(n).setLevel(level)


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_reports() -> None:
    """After a failed save, TensorStore's writes still in flight complete into orbax's event
    loop, closed by then, and TensorStore prints each "Event loop is closed" as a traceback
    (through ``sys.excepthook``): dozens for one full disk. Those, and only those, go unsaid
    from now on; the run is ending with its own line."""
    if getattr(sys.excepthook, "lopt_drops_closed_loop", False):
        return
    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def hook(kind, exc, tb):
        if not _closed_loop(exc):
            previous_hook(kind, exc, tb)

    def unraisable(report):
        if not _closed_loop(report.exc_value):
            previous_unraisable(report)

    hook.lopt_drops_closed_loop = True
    sys.excepthook, sys.unraisablehook = hook, unraisable


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300]


class Checkpointer:
    """Checkpoints in ``directory``: the newest ``keep`` (None: all) and, with ``keep_every`` =
    K > 0, also every one whose step is a multiple of K (``config.checkpoint_keep`` and
    ``config.checkpoint_keep_every``). Older ones are deleted as new ones are written; a
    Checkpointer that only reads deletes nothing. The ``owner`` (the run holding the workdir's
    lock) also removes the temporary directories of a save a killed run left unfinished."""

    def __init__(self, directory: str, keep: int | None = 2, keep_every: int = 0, owner: bool = False):
        self.directory = os.path.abspath(directory)
        # orbax's preservation policies (what its deprecated max_to_keep / keep_period build).
        policies = ocp.checkpoint_managers
        keepers = [policies.LatestN(n=keep)]
        if keep_every:
            keepers.append(policies.EveryNSteps(keep_every))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=True, preservation_policy=policies.AnyPreservationPolicy(keepers),
                cleanup_tmp_directories=owner,  # what a run killed mid-save left
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, items: dict, host: dict | None = None) -> None:
        """Write checkpoint ``step`` and wait for it, then record the size and SHA-256 of each
        of its files (``<step>.files.json`` beside it), so a damaged file is found before orbax
        reads it. (Waiting makes saves synchronous; a meta-training state is small.)"""
        host = dict(host or {})
        host["_structure"] = structure(items)
        host["_sha256"] = checksum(items)
        args = ocp.args.Composite(
            arrays=ocp.args.StandardSave(items), host=ocp.args.JsonSave(host)
        )
        try:
            with faults.writing(os.path.join(self.directory, str(step))), _quiet():
                self._manager.save(step, args=args, force=True)
                self._manager.wait_until_finished()
                if jax.process_index() == 0:
                    self._write_manifest(step)
        except faults.WriteFailed as e:
            removed = self._discard(step)
            raise e.named(f"checkpoint {step}", *(["the half-written checkpoint was removed"]
                                                  if removed else [])) from None

    def _discard(self, step: int) -> bool:
        """Remove what a failed save of ``step`` left (orbax's temporary directory, a
        temporary file record); whether there was any."""
        _drop_closed_loop_reports()
        removed = False
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if name.startswith(f"{step}{ocp.path.atomicity_types.TMP_DIR_SUFFIX}"):
                    shutil.rmtree(path, ignore_errors=True)
                    removed = True
                elif name == f"{step}.files.json.tmp":
                    os.remove(path)
        self._manager.reload()
        return removed

    def _manifest_path(self, step: int) -> str:
        return os.path.join(self.directory, f"{step}.files.json")

    def _files(self, step: int) -> dict[str, list]:
        base = os.path.join(self.directory, str(step))
        out = {}
        for root, _, files in os.walk(base):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[os.path.relpath(path, base)] = [os.path.getsize(path), digest]
        return out

    def _write_manifest(self, step: int) -> None:
        path = self._manifest_path(step)
        with open(path + ".tmp", "w") as f:  # atomic: a killed run leaves no half record
            json.dump(self._files(step), f)
        os.replace(path + ".tmp", path)
        keep = {f"{s}.files.json" for s in self._manager.all_steps()}
        for name in os.listdir(self.directory):
            if name.endswith((".files.json", ".files.json.tmp")) and name not in keep:
                os.remove(os.path.join(self.directory, name))

    def verify(self, step: int) -> str | None:
        """What is wrong with checkpoint ``step``'s files (missing, truncated, changed since
        they were written), or None when they are as written (or no record exists)."""
        path = self._manifest_path(step)
        try:
            with open(path) as f:
                want = json.load(f)
        except (OSError, ValueError):  # no record (an older run, or killed before writing it)
            return None
        base = os.path.join(self.directory, str(step))
        for rel, (size, digest) in sorted(want.items()):
            full = os.path.join(base, rel)
            if not os.path.exists(full):
                return f"file {rel} is missing"
            have = os.path.getsize(full)
            if have != size:
                return f"file {rel} is {have} bytes, {size} when written (truncated or replaced)"
            with open(full, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return f"file {rel} changed after it was written"
        return None

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        """Restore ``step`` into the structure, shapes and dtypes of ``like``, checked (see
        the module docstring): raises CheckpointMismatchError, or another exception for a
        corrupt checkpoint."""
        with _quiet():
            host = self._manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
        host = dict(host or {})
        want = structure(like)
        have = host.get("_structure")
        if have is not None and have != want:
            for a, b in zip(have, want):
                if a != b:
                    raise CheckpointMismatchError(
                        f"checkpoint {step} in {self.directory} was written by another config: "
                        f"{a[0]} is {tuple(a[1])} {a[2]} there, {tuple(b[1])} {b[2]} here; use a "
                        "new workdir (or the config that wrote it)"
                    )
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} was written by another config "
                f"({len(have)} arrays there, {len(want)} here); use a new workdir"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
        with _quiet():
            items = self._manager.restore(step, args=args)["arrays"]
        expected = host.get("_sha256")
        if expected is not None:
            got = checksum(items)
            if got is not None and got != expected:
                raise ValueError("its arrays do not match the SHA-256 recorded when it was written")
        return items, {k: v for k, v in host.items() if not k.startswith("_")}

    def restore_latest(self, like: tuple[dict, dict]) -> tuple[int, dict, dict] | None:
        """(step, items, host) of the newest intact checkpoint, or None if there is none at all;
        corrupt ones are renamed ``<step>.corrupt`` with a warning (module docstring)."""
        items_like, _ = like
        corrupt = []
        for step in reversed(self.all_steps()):
            try:
                damage = self.verify(step)
                if damage is not None:
                    raise ValueError(damage)
                items, host = self.restore(step, items_like)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  (any failure to read is corruption)
                kept = self._set_aside(step)
                why = _first_line(e)
                corrupt.append(f"{step} ({why}; kept as {os.path.basename(kept)})")
                warnings.warn(
                    f"checkpoint {step} in {self.directory} is corrupt ({why}); kept as {kept}; "
                    "falling back to the next newest", CorruptCheckpointWarning, stacklevel=2,
                )
                continue
            return step, items, host
        if corrupt:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: {'; '.join(corrupt)}; move the "
                "workdir away to start afresh"
            )
        return None

    def _set_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.corrupt", 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.corrupt{n}"
        os.replace(src, dst)
        if os.path.exists(self._manifest_path(step)):
            os.replace(self._manifest_path(step), os.path.join(dst, "lopt.files.json"))
        self._manager.reload()
        return dst

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def describe_latest(directory: str) -> str:
    """The newest complete checkpoint in ``directory`` in words, read from the directory alone
    (orbax renames a checkpoint to its step only once it is complete), for one-line errors."""
    steps = sorted(int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
                   if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
    if not steps:
        return f"no checkpoint was written yet in {directory}"
    return f"the last intact checkpoint is step {steps[-1]} ({os.path.join(directory, str(steps[-1]))})"
