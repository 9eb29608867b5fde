"""FIFO specs, and how a job opens its FIFOs without ever deadlocking.

Opening a FIFO blocks until the other end is opened too, so jobs that open
several FIFOs in different orders can wait on each other forever. bamflow
avoids this in every managed job:

* read ends are opened first, with ``O_NONBLOCK`` (never blocks), then made
  blocking again. Such a read end reports end-of-file until a writer connects,
  so the first read waits with ``poll(2)``, which only reports data or the
  hang-up of a writer that has been connected (:class:`FifoReader`);
* write ends are opened with ``O_NONBLOCK`` in a retry loop over all of them
  (``ENXIO`` means: no reader yet), so no write end waits for another.

Whichever end a managed job opens, it enlarges the pipe buffer
(``F_SETPIPE_SZ``) as far as the system allows, falling back to smaller
buffers when the per-user pipe budget is spent; it never fails over it.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import select
import time
from dataclasses import dataclass
from typing import BinaryIO, TextIO

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
DEFAULT_PIPE_SIZE = 1 << 20
IO_BUFFER_SIZE = 1 << 20

FifoFile = BinaryIO | TextIO


@dataclass(frozen=True)
class FIFO:
    """A named pipe between two jobs of a workflow.

    ``mode`` is ``"r"``/``"w"`` plus ``"t"`` (text, the default) or ``"b"``.
    With ``n`` set the spec stands for the collection ``name`` with ``{n}``
    replaced by 0 … n-1 (a job receives a list). Without ``n``, a ``{n}`` in
    the name is filled in per worker by :meth:`Workflow.workers`.
    """

    name: str
    mode: str
    n: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("r", "rt", "rb", "w", "wt", "wb"):
            raise ValueError(f"FIFO {self.name!r}: mode must be r, rt, rb, w, wt or wb, not {self.mode!r}")
        if self.n is not None:
            if self.n < 0:
                raise ValueError(f"FIFO {self.name!r}: n must be >= 0, not {self.n}")
            if "{n}" not in self.name:
                raise ValueError(f"FIFO {self.name!r}: a collection (n={self.n}) needs '{{n}}' in its name")

    @property
    def is_reader(self) -> bool:
        return self.mode[0] == "r"

    @property
    def is_collection(self) -> bool:
        return self.n is not None

    def names(self) -> list[str]:
        """The concrete FIFO names this spec stands for."""
        if self.n is None:
            return [self.name]
        return [self.name.replace("{n}", str(i)) for i in range(self.n)]

    def for_worker(self, index: int) -> FIFO:
        """This spec with ``{n}`` filled in for worker ``index`` (collections stay)."""
        if self.n is not None or "{n}" not in self.name:
            return self
        return FIFO(self.name.replace("{n}", str(index)), self.mode)


def pipe_max_size() -> int:
    """The largest pipe buffer an unprivileged process may ask for."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_PIPE_SIZE


def grow_pipe(fd: int, size: int) -> int:
    """Enlarge the pipe behind ``fd`` towards ``size`` bytes; returns the size set.

    Halves the request whenever the kernel refuses (pipe-max-size, the per-user
    pipe budget, memory); a pipe keeps its current size if nothing larger is
    allowed. Not a pipe: returns 0 and changes nothing.
    """
    try:
        current = fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return 0
    while size > current:
        try:
            return fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EBUSY, errno.ENOMEM, errno.EINVAL):
                raise
            size //= 2
    return current


def wait_readable(fd: int) -> None:
    """Block until ``fd`` has data or its (once connected) writer hung up."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass


class FifoReader(io.RawIOBase):
    """Raw reader over a FIFO read end opened with O_NONBLOCK (see module doc)."""

    def __init__(self, fd: int, name: str = "") -> None:
        super().__init__()
        self._fd = fd
        self._connected = False
        self.name = name

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if not self._connected:
            wait_readable(self._fd)
            self._connected = True
        return os.readv(self._fd, [buffer])

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def open_read_end(path: str, pipe_size: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    grow_pipe(fd, pipe_size)
    return fd


def open_write_ends(paths: list[str], pipe_size: int) -> list[int]:
    """Open every path for writing without making any one wait for another."""
    fds: dict[int, int] = {}
    delay = 0.0005
    try:
        while len(fds) < len(paths):
            for i, path in enumerate(paths):
                if i in fds:
                    continue
                try:
                    fds[i] = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as e:
                    if e.errno != errno.ENXIO:  # ENXIO: its reader has not opened yet
                        raise
                    continue
                os.set_blocking(fds[i], True)
                grow_pipe(fds[i], pipe_size)
            if len(fds) < len(paths):
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return [fds[i] for i in range(len(paths))]


def wrap_fd(fd: int, mode: str, name: str) -> FifoFile:
    """A file object over an opened FIFO end; text is UTF-8 and bytes-safe."""
    if mode[0] == "r":
        binary: BinaryIO = io.BufferedReader(FifoReader(fd, name), IO_BUFFER_SIZE)  # type: ignore[arg-type]
    else:
        binary = open(fd, "wb", buffering=IO_BUFFER_SIZE)
    if "b" in mode:
        return binary
    return io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="\n")  # type: ignore[arg-type]
