"""SIGTERM and SIGINT end a run at an outer-step boundary with a checkpoint and one line
(DESIGN.md, "the training layer").

Clusters (SLURM, Kubernetes, preemptible cloud VMs) send SIGTERM and kill after a grace period;
Ctrl-C is SIGINT. :class:`StopSignals` records the first signal and the training loop asks
:meth:`StopSignals.reached` after every outer step: the step in flight finishes, a checkpoint
is written, the logs are flushed and :class:`Interrupted` says "stopped by SIGTERM at outer step
N; checkpoint N saved; rerun the same command to resume" (the command exits with 128 + the
signal's number: 143, 130). A second signal while that checkpoint is written is held until the
save is complete (:meth:`StopSignals.saving`); at any other time it stops the run at once,
without a checkpoint of the step in flight.

On several processes every one must save the same step. JAX's preemption service (started by
``jax.distributed.initialize``) catches SIGTERM on any process and agrees, through the
coordination service, on the first step every process can still reach
(``multihost_utils.reached_preemption_sync_point``); a Python handler for SIGTERM would replace
its handler, so there only SIGINT gets one, which passes the signal on to JAX's as SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import jax
from jax.experimental import multihost_utils

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """A signal stopped the run (the message is one line); exit with :attr:`exit_code`."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SecondSignal(BaseException):
    """A second signal outside a checkpoint's save: unwind now (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` holds it up)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _preemption_service() -> bool:
    """Whether JAX's preemption service runs: several processes joined by
    ``jax.distributed.initialize`` with ``jax_enable_preemption_service`` (JAX's default)."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopSignals:
    """A context manager: while it is entered (on the main thread) SIGTERM and SIGINT ask the
    run to stop at the next outer-step boundary; on exit the previous handlers are back."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal this process received
        self.held: int | None = None  # a second one, held during a save
        self.agreed = _preemption_service()
        self._saving = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        for signum in HANDLED:
            if self.agreed and signum == signal.SIGTERM:
                continue  # JAX's preemption notifier owns it
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored on purpose (a shell's background job ignores SIGINT)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.agreed:  # tell JAX's preemption service, which tells the other processes
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if self._saving:
            self.held = signum  # ignored until the checkpoint is complete
            return
        raise SecondSignal(signum)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A checkpoint is being written: a second signal waits for it."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def reached(self, step: int) -> bool:
        """Whether the run stops after outer step ``step`` (call it after every step, with the
        same steps on every process)."""
        if self.agreed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    def name(self) -> str:
        """The signal that stopped the run (SIGTERM on a process that learnt of it from JAX's
        preemption service)."""
        return signal.Signals(self.signum or signal.SIGTERM).name

    def stopped(self, step: int) -> Interrupted:
        """What the run says once its checkpoint of ``step`` is written."""
        name = self.name()
        where = f"at outer step {step}"
        if self.agreed:
            where += f" on all {jax.process_count()} processes"
        rerun = "rerun the same command" + (" on every process" if self.agreed else "")
        return Interrupted(f"stopped by {name} {where}; checkpoint {step} saved; {rerun} to resume",
                           getattr(signal, name), step)
