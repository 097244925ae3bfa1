"""TensorBoard event files without TensorFlow (``tensorboardX``'s writer).

Every row a run logs to ``metrics.jsonl`` is also written under ``WORKDIR/tensorboard/``:
numbers as scalars at the row's outer step (``meta/...`` for the outer step's metrics,
``curriculum/...`` for curriculum decisions, whose text goes in as a text summary; a key that
names its own group, such as the held-out evaluation's ``eval/<task>/<length>/<metric>``, is
its tag), so

    tensorboard --logdir runs/quickstart/tensorboard

shows the meta-loss, gradient norm, skipped steps, es_share, inner steps/s, positions and the
curriculum's validations. ``metrics.jsonl`` stays the record of the run. A resumed run's
file begins by discarding what a killed run wrote after the checkpoint (:class:`Writer`).
"""

from __future__ import annotations

import math
import numbers
import os
import time

from lopt.training import faults

#: Row keys that are bookkeeping, not plotted.
_SKIP = frozenset({"step"})


def _import_tensorboardx() -> None:
    """Import tensorboardX without torch. Its package ``__init__`` imports its
    ``SummaryWriter``, which imports torch where torch is installed: ~1 s (1.9 s on a loaded
    2-core VM, ``python -X importtime``) paid by every run that logs, for nothing, since this
    module uses only the event file writer, the protos and the scalar and text summaries.
    Unless torch is already imported, tensorboardX is imported with torch marked absent (an
    ImportError, which tensorboardX handles: its writer then type-checks numpy arrays), and
    torch stays importable afterwards."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is here
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


class Writer:
    """Scalars (and curriculum text) of metrics rows into a new event file in ``logdir``.

    Events are written in the caller's thread (tensorboardX's ``EventsWriter``; its
    ``SummaryWriter`` writes from a thread of its own, where a failed write goes unseen and
    then blocks the queue) and flushed every ``flush_secs``, at :meth:`flush` (each checkpoint)
    and at :meth:`close`; a failed write is :class:`lopt.training.faults.WriteFailed`.
    With ``purge_step`` the file starts with a SessionLog START at that step, what
    ``SummaryWriter(purge_step=...)`` writes: TensorBoard then discards the events of earlier
    files at that step or later, so a run resumed from a checkpoint, with rows of a killed run
    after it, reads as one run (:func:`read_scalars` does the same)."""

    def __init__(self, logdir: str, purge_step: int | None = None, flush_secs: float = 30.0):
        _import_tensorboardx()
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        self.flush_secs = flush_secs
        with faults.writing(logdir):
            os.makedirs(logdir, exist_ok=True)
            # A suffix of its own: two writers started in the same second get two files.
            self._events = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}.{time.time_ns()}")
        self.path = getattr(self._events, "_file_name", logdir)  # for messages
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=int(purge_step),
                              session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event) -> None:
        with faults.writing(self.path):
            self._events.write_event(event)

    def _add(self, summary, step: int) -> None:
        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def row(self, row: dict) -> None:
        from tensorboardX.summary import scalar, text

        step = int(row["step"])
        group = "curriculum" if "decision" in row else "meta"
        for key, value in row.items():
            if key in _SKIP:
                continue
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, numbers.Real) and math.isfinite(float(value)):
                self._add(scalar(key if "/" in key else f"{group}/{key}", float(value)), step)
        if group == "curriculum":
            message = f"{row.get('validation')}: {row.get('decision')} ({row.get('reason')})"
            self._add(text("curriculum/decision", message), step)
        if time.monotonic() - self._flushed > self.flush_secs:
            self.flush()

    def scalars(self, tag: str, values, start: int = 0) -> None:
        """A curve (e.g. an evaluation's mean loss per inner step) as scalars at steps
        ``start``, ``start + 1``, ..."""
        from tensorboardX.summary import scalar

        for i, v in enumerate(values):
            if math.isfinite(float(v)):
                self._add(scalar(tag, float(v)), start + i)

    def flush(self) -> None:
        """Everything written so far is on disk (flushed and fsynced)."""
        with faults.writing(self.path):
            self._events.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        with faults.writing(self.path):
            self._events.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files under ``logdir``, as
    TensorBoard shows them: a plain reader of the TFRecord framing and tensorboardX's ``Event``
    protos, for tests and scripts. Files are read in name (time) order; a SessionLog START at
    step s discards the scalars read so far at step s or later (TensorBoard's purge of orphaned
    data); a record cut short by a killed writer ends its file."""
    import struct

    _import_tensorboardx()
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(logdir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            pos = 0
            while pos + 12 <= len(data):
                (length,) = struct.unpack("<Q", data[pos : pos + 8])
                if pos + 12 + length + 4 > len(data):
                    break  # half-written
                record = data[pos + 12 : pos + 12 + length]
                pos += 12 + length + 4
                event = event_pb2.Event()
                event.ParseFromString(record)
                if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                    out = {tag: [(s, v) for s, v in series if s < event.step] for tag, series in out.items()}
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: series for tag, series in out.items() if series}
