"""Orbax checkpoints of the whole meta-training state plus a small JSON of host-side state.

The device state (``MetaTrainState``: meta-params, meta-optimizer state, estimator state with
every particle's inner state, outer step, key) is saved with ``StandardSave`` and restored into
the structure of a freshly initialised state, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the newest ``max_to_keep`` checkpoints in ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, host: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host or {})
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore ``step`` into the structure, shapes and dtypes of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, dict(restored.host or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
