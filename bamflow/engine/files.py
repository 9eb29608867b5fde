"""Input and output files of a workflow, checked before it starts.

An :class:`OutputFile` among a job's arguments is published by the run's
:class:`~bamflow.engine.publish.Publication`: the job writes a temporary file
that appears under its name only when the whole run succeeded.
``-`` means standard input or output.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from .fifo import grow_pipe, pipe_max_size
from .publish import STDOUT_NAMES, is_special

STDIN_NAMES = ("-", "/dev/stdin")


@dataclass(frozen=True)
class InputFile:
    """A file a job reads; must exist before the workflow starts (``-``: stdin)."""

    path: str

    @property
    def key(self) -> str:
        """The same for an InputFile and an OutputFile naming the same file."""
        return self.path if self.path in STDIN_NAMES else os.path.abspath(self.path)

    def check(self) -> str | None:
        """A one-line problem with this input, or None."""
        if self.path in STDIN_NAMES:
            return None
        if not os.path.exists(self.path):
            return f"input file '{self.path}' does not exist"
        if os.path.isdir(self.path):
            return f"input '{self.path}' is a directory, not a file"
        if not os.access(self.path, os.R_OK):
            return f"input file '{self.path}' is not readable"
        return None


@dataclass(frozen=True)
class OutputFile:
    """A file a job writes; it appears under its name only if the run succeeds."""

    path: str

    @property
    def key(self) -> str:
        """The same for an InputFile and an OutputFile naming the same file."""
        return self.path if self.is_special else os.path.abspath(self.path)

    @property
    def is_special(self) -> bool:
        """stdout and device files are written in place, not renamed."""
        return is_special(self.path)

    def check(self) -> str | None:
        """A one-line problem with this output, or None."""
        if self.is_special:
            return None
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            return f"cannot write output '{self.path}': folder '{folder}' does not exist"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write output '{self.path}': folder '{folder}' is not writable"
        if os.path.isdir(self.path):
            return f"cannot write output '{self.path}': it is a directory"
        return None


def open_for_writing(path: str) -> int:
    """A file descriptor for ``path`` (``-``: a duplicate of stdout).

    A pipe (an unmanaged FIFO, or stdout) gets the largest buffer allowed.
    """
    if path in STDOUT_NAMES:
        fd = os.dup(1)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    grow_pipe(fd, pipe_max_size())
    return fd


def open_for_reading(path: str) -> int:
    """A file descriptor for ``path`` (``-``: a duplicate of stdin); pipes grown."""
    fd = os.dup(0) if path in STDIN_NAMES else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    grow_pipe(fd, pipe_max_size())
    return fd


def fd_of(target: Any, writing: bool, stack: ExitStack) -> int:
    """The file descriptor behind an open file, or of a path opened here and
    closed when ``stack`` closes (``-``: stdin or stdout)."""
    if hasattr(target, "fileno"):
        if writing:
            target.flush()
        return target.fileno()
    fd = open_for_writing(target) if writing else open_for_reading(target)
    stack.callback(os.close, fd)
    return fd


def write_all(fd: int, data: memoryview) -> None:
    """os.write until all of ``data`` is written."""
    while data:
        data = data[os.write(fd, data) :]


def owned_fd(target: Any, writing: bool) -> int:
    """A descriptor for ``target`` that the caller owns and must close: a
    duplicate of an open file's descriptor (the file object is closed, so the
    caller's close is the last one), or a path opened here."""
    if hasattr(target, "fileno"):
        if writing:
            target.flush()
        fd = os.dup(target.fileno())
        target.close()
        return fd
    return open_for_writing(target) if writing else open_for_reading(target)


def copy_stream(stream: Any, out: Any, block: int = 1 << 20) -> int:
    """Copy a readable stream to an fd (int) or a writable object until the
    stream ends; returns the byte count."""
    total = 0
    while True:
        data = stream.read(block)
        if not data:
            return total
        if isinstance(out, int):
            write_all(out, memoryview(data))
        else:
            out.write(data)
        total += len(data)
