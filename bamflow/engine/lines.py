"""The line stages: job functions for the engine's builder methods (reader,
gz_reader, distribute, collect, funnel) on text or bytes split into lines.

Each takes its FIFOs as opened file objects (managed) or as paths
(unmanaged), and files as paths (``-`` for stdin/stdout); the hot loops run
in :mod:`bamflow.kernels.lines` on file descriptors. The options of a stage
are declared once, in a frozen dataclass the builder, the job function and
the kernel share.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..kernels.lines import collect_lines as _collect_lines_kernel
from ..kernels.lines import distribute_lines as _distribute_lines_kernel
from .fifo import wait_readable
from .files import copy_stream, fd_of, open_for_reading, owned_fd, write_all
from .options import StageOptions

if TYPE_CHECKING:
    from ..kernels.lines import CollectStats, DistributeStats

@dataclass(frozen=True)
class LineDistributeOptions(StageOptions):
    """How :func:`distribute_lines` deals lines (see Workflow.distribute)."""

    chunk_size: int = 1
    header_detect_func: Callable[[str], object] | None = None
    header_prefix: str | bytes | None = None
    header_broadcast: bool = False
    by: int | None = None
    field_sep: str = "\t"

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {self.chunk_size}")
        if len(self.field_sep) != 1:
            raise ValueError(f"field_sep must be one character, not {self.field_sep!r}")
        if self.header_prefix is not None and len(self.header_prefix) == 0:
            raise ValueError("header_prefix must not be empty")
        if self.header_broadcast and not self.detects_header:
            raise ValueError("header_broadcast needs header_detect_func or header_prefix")

    @property
    def detects_header(self) -> bool:
        return self.header_detect_func is not None or self.header_prefix is not None

    @property
    def prefix_bytes(self) -> bytes | None:
        return self.header_prefix.encode() if isinstance(self.header_prefix, str) else self.header_prefix


@dataclass(frozen=True)
class LineCollectOptions(StageOptions):
    """How :func:`collect_lines` merges lines (see Workflow.collect)."""

    order: str = "any"
    chunk_size: int = 1

    def __post_init__(self) -> None:
        if self.order not in ("any", "round-robin"):
            raise ValueError(f"order must be 'any' or 'round-robin', not {self.order!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {self.chunk_size}")

COPY_BLOCK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


def _copy(in_fd: int, out_fd: int) -> int:
    """Copy in_fd to out_fd until end of file; returns the byte count."""
    total = 0
    try:
        while True:  # sendfile: no copy through user space (regular-file input)
            n = os.sendfile(out_fd, in_fd, None, 1 << 30)
            if n == 0:
                return total
            total += n
    except OSError:
        if total:
            raise
    wait_readable(in_fd)
    buffer = bytearray(COPY_BLOCK)
    view = memoryview(buffer)
    while True:
        n = os.readv(in_fd, [buffer])
        if n == 0:
            return total
        write_all(out_fd, view[:n])
        total += n


def read_files(inputs: list[str], output: Any) -> int:
    """Copy each input file (``-``: stdin) in turn to ``output``; returns bytes copied."""
    total = 0
    with ExitStack() as stack:
        out_fd = fd_of(output, True, stack)
        for path in inputs:
            fd = open_for_reading(path)
            try:
                total += _copy(fd, out_fd)
            finally:
                os.close(fd)
    return total


def read_gz_or_plain(inputs: list[str], output: Any) -> int:
    """Like :func:`read_files`, decompressing gzip inputs (detected by magic bytes) with ISA-L."""
    from isal import igzip

    total = 0
    with ExitStack() as stack:
        out_fd = fd_of(output, True, stack)
        for path in inputs:
            with io.BufferedReader(io.FileIO(open_for_reading(path), "rb"), COPY_BLOCK) as raw:
                if raw.peek(2)[:2] != GZIP_MAGIC:
                    total += copy_stream(raw, out_fd)
                    continue
                try:
                    with igzip.IGzipFile(fileobj=raw, mode="rb") as unzipped:
                        total += copy_stream(unzipped, out_fd)
                except (EOFError, OSError) as e:
                    if isinstance(e, BrokenPipeError):
                        raise
                    raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return total


def distribute_lines(
    input: Any, outputs: list[Any], options: LineDistributeOptions = LineDistributeOptions(), header_fifo: Any = None
) -> DistributeStats:
    """Split the lines of ``input`` over ``outputs`` (see :meth:`Workflow.distribute`)."""
    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        out_fds = [fd_of(o, True, stack) for o in outputs]
        # the kernel closes the header's descriptor as soon as the header ends
        header_fd = -1 if header_fifo is None else owned_fd(header_fifo, writing=True)
        return _distribute_lines_kernel(in_fd, out_fds, options, header_fd=header_fd)


def collect_lines(
    inputs: list[Any], output: Any, options: LineCollectOptions = LineCollectOptions(), header_fifo: Any = None
) -> CollectStats:
    """Merge the lines of ``inputs`` into ``output``, header first (see :meth:`Workflow.collect`)."""
    with ExitStack() as stack:
        in_fds = [fd_of(i, False, stack) for i in inputs]
        header_fd = -1 if header_fifo is None else fd_of(header_fifo, False, stack)
        out_fd = fd_of(output, True, stack)
        return _collect_lines_kernel(in_fds, out_fd, options, header_fd=header_fd)


def write_file(input: Any, output: Any) -> int:
    """Copy ``input`` (an open FIFO or a path) to ``output`` (a path or ``-``); returns bytes."""
    with ExitStack() as stack:
        return _copy(fd_of(input, False, stack), fd_of(output, True, stack))
