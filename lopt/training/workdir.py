"""One writer per workdir: a lock file held while a run writes it.

``lock(workdir)`` creates the workdir, opens ``WORKDIR/.lock`` and takes an exclusive,
non-blocking ``fcntl.flock`` on it, then writes the owner (pid, host, start time) into it. The
kernel releases a flock when its process dies, so a lock file left by a killed run is stale by
construction: the next run takes it over (and says so). A second run on a workdir in use fails
at once naming the first. (flock is advisory and per host: on a network filesystem shared by
several hosts, only the process-0 host takes the lock.)
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket


class WorkdirInUseError(RuntimeError):
    """Another run is writing this workdir (the message is one line)."""


class WorkdirLock:
    def __init__(self, path: str, handle):
        self.path = path
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            try:
                os.remove(self.path)
            except OSError:
                pass


def _owner(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def lock(workdir: str) -> WorkdirLock:
    """Take ``workdir``'s lock (creating the workdir), or raise :class:`WorkdirInUseError`."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(path)
        handle.close()
        raise WorkdirInUseError(
            f"workdir {workdir} is in use by pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')} since {owner.get('started', '?')}; wait for it, or use "
            "another --workdir"
        ) from None
    previous = _owner(path)
    if previous.get("pid"):
        logging.warning("workdir %s: took over the stale lock of pid %s on host %s (started %s), "
                        "whose process is gone", workdir, previous.get("pid"), previous.get("host"),
                        previous.get("started"))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }))
    handle.flush()
    return WorkdirLock(path, handle)


def recorded_modules(workdir: str) -> tuple[str, ...]:
    """The user's modules an earlier run in ``workdir`` recorded (``config.json``'s
    ``modules``), or () when there is none or it cannot be read."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            modules = json.load(f).get("modules") or ()
    except (OSError, ValueError, AttributeError):
        return ()
    return tuple(m for m in modules if isinstance(m, str))
