"""Failed writes as one line: a full disk, a permission or a read-only filesystem while a run
writes a checkpoint, its metrics, TensorBoard events, the export or a plot.

Every write site of the training layer runs inside :func:`writing` (the path it writes), which
turns an ``OSError`` into :class:`WriteFailed` naming that path, the errno's meaning and the
free space there. Orbax writes array data with TensorStore, whose errors are ``ValueError``s
carrying the errno in their text (``[os_error_code='28']``): :func:`os_error` reads both. The
training loop adds the last intact checkpoint (:meth:`WriteFailed.line`); the command prints it
and exits with 2.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import os
import re
import shutil
from typing import Iterator

#: TensorStore's text for a failed file operation: the file (else its database), the errno.
_TS_PATHS = (re.compile(r'Failed writing: "([^"]+)"'), re.compile(r'local file "([^"]+)"'))
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")


class WriteFailed(RuntimeError):
    """A write of the run failed (the message is one line)."""

    def __init__(self, path: str, err: int, what: str = "", more: tuple[str, ...] = (),
                 free: str | None = None):
        self.path = os.path.abspath(path)
        self.errno = int(err)
        self.what = what  # e.g. "checkpoint 100"
        self.more = tuple(more)
        self.free = free or free_space(self.path)  # when it failed
        name = errno_lib.errorcode.get(self.errno, str(self.errno))
        where = f"{what} at {self.path}" if what else self.path
        super().__init__("; ".join((f"cannot write {where}: {os.strerror(self.errno)} ({name})",
                                    self.free, *self.more)))

    def named(self, what: str, *more: str) -> WriteFailed:
        """The same failure, saying what was being written (and ``more`` after it)."""
        return WriteFailed(self.path, self.errno, what, self.more + more, self.free)

    def then(self, *more: str) -> WriteFailed:
        """The same failure with ``more`` said after it (the last intact checkpoint, a fix)."""
        return WriteFailed(self.path, self.errno, self.what, self.more + more, self.free)

    def remedy(self) -> str:
        """What the user does before rerunning."""
        if self.errno in (errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EFBIG):
            return "free some space"
        if self.errno in (errno_lib.EACCES, errno_lib.EPERM):
            return "fix the permissions"
        if self.errno == errno_lib.EROFS:
            return "make the filesystem writable"
        return "fix the cause"


def free_space(path: str) -> str:
    """``'40.0 KiB free on /mnt/scratch'``: the free space of the filesystem holding ``path``,
    named by its mount point, or why it is unknown."""
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        return f"free space at {where} unknown ({os.strerror(e.errno or 0)})"
    while not os.path.ismount(where):
        where = os.path.dirname(where)
    return f"{human_bytes(free)} free on {where}"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable


def os_error(e: BaseException, default_path: str) -> WriteFailed | None:
    """The failed write behind ``e`` (an ``OSError`` in its chain, or TensorStore's text), or
    None when ``e`` is not a failed write."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, WriteFailed):
            return cur
        if isinstance(cur, OSError) and cur.errno:
            return WriteFailed(cur.filename or default_path, cur.errno)
        text = str(cur)
        code = _TS_ERRNO.search(text)
        if code:
            paths = [m.group(1) for m in (r.search(text) for r in _TS_PATHS) if m]
            return WriteFailed(paths[0] if paths else default_path, int(code.group(1)))
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return None


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Run a write of ``path``: a failure becomes :class:`WriteFailed` naming it."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:  # noqa: BLE001  (only failed writes are converted)
        failed = os_error(e, path)
        if failed is None:
            raise
        raise failed from None
