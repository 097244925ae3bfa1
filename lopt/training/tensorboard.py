"""TensorBoard event files without TensorFlow (``tensorboardX``'s writer).

Every row a run logs to ``metrics.jsonl`` is also written under ``WORKDIR/tensorboard/``:
numbers as scalars at the row's outer step (``meta/...`` for the outer step's metrics,
``curriculum/...`` for curriculum decisions, whose text goes in as a text summary; a key that
names its own group, such as the held-out evaluation's ``eval/<task>/<length>/<metric>``, is
its tag), so

    tensorboard --logdir runs/quickstart/tensorboard

shows the meta-loss, gradient norm, skipped steps, es_share, inner steps/s, positions and the
curriculum's validations. ``metrics.jsonl`` stays the record of the run.
"""

from __future__ import annotations

import math
import numbers

#: Row keys that are bookkeeping, not plotted.
_SKIP = frozenset({"step"})


class Writer:
    """Scalars (and curriculum text) of metrics rows into event files in ``logdir``."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

    def row(self, row: dict) -> None:
        step = int(row["step"])
        group = "curriculum" if "decision" in row else "meta"
        for key, value in row.items():
            if key in _SKIP:
                continue
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, numbers.Real) and math.isfinite(float(value)):
                self._writer.add_scalar(key if "/" in key else f"{group}/{key}", float(value), step)
        if group == "curriculum":
            text = f"{row.get('validation')}: {row.get('decision')} ({row.get('reason')})"
            self._writer.add_text("curriculum/decision", text, step)

    def scalars(self, tag: str, values, start: int = 0) -> None:
        """A curve (e.g. an evaluation's mean loss per inner step) as scalars at steps
        ``start``, ``start + 1``, ..."""
        for i, v in enumerate(values):
            if math.isfinite(float(v)):
                self._writer.add_scalar(tag, float(v), start + i)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files under ``logdir``: a plain
    reader of the TFRecord framing and tensorboardX's ``Event`` protos, for tests and scripts."""
    import os
    import struct

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
                record = data[pos + 12 : pos + 12 + length]
                pos += 12 + length + 4
                event = event_pb2.Event()
                event.ParseFromString(record)
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
