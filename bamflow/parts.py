"""Ready-made job functions for the builder methods of :class:`~bamflow.Workflow`.

Each takes its FIFOs as opened file objects (managed) or as paths
(unmanaged), and files as paths (``-`` for stdin/stdout); the hot loops run
in :mod:`bamflow.kernels` on file descriptors.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from .bam.stages import decode_bam as bam_reader  # noqa: F401  (mrfifo's names)
from .bam.stages import encode_bam as bam_writer  # noqa: F401
from .fifo import wait_readable
from .files import copy_stream, fd_of, open_for_reading, owned_fd, write_all
from .kernels.lines import collect_lines as _collect_lines_kernel
from .kernels.lines import distribute_lines as _distribute_lines_kernel

if TYPE_CHECKING:
    from .kernels.lines import CollectStats, DistributeStats

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
    input: Any,
    outputs: list[Any],
    chunk_size: int = 1,
    header_detect_func: Callable[[str], object] | None = None,
    header_prefix: str | bytes | None = None,
    header_broadcast: bool = False,
    header_fifo: Any = None,
    by: int | None = None,
    field_sep: str = "\t",
) -> DistributeStats:
    """Split the lines of ``input`` over ``outputs`` (see :meth:`Workflow.distribute`)."""
    if isinstance(header_prefix, str):
        header_prefix = header_prefix.encode()
    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        out_fds = [fd_of(o, True, stack) for o in outputs]
        # the kernel closes the header's descriptor as soon as the header ends
        header_fd = -1 if header_fifo is None else owned_fd(header_fifo, writing=True)
        return _distribute_lines_kernel(
            in_fd,
            out_fds,
            chunk_size=chunk_size,
            header_fd=header_fd,
            header_broadcast=header_broadcast,
            header_detect=header_detect_func,
            header_prefix=header_prefix,
            key_field=-1 if by is None else by,
            field_sep=field_sep.encode(),
        )


def collect_lines(
    inputs: list[Any],
    output: Any,
    header_fifo: Any = None,
    order: str = "any",
    chunk_size: int = 1,
) -> CollectStats:
    """Merge the lines of ``inputs`` into ``output``, header first (see :meth:`Workflow.collect`)."""
    with ExitStack() as stack:
        in_fds = [fd_of(i, False, stack) for i in inputs]
        header_fd = -1 if header_fifo is None else fd_of(header_fifo, False, stack)
        out_fd = fd_of(output, True, stack)
        return _collect_lines_kernel(in_fds, out_fd, header_fd=header_fd, order=order, chunk_size=chunk_size)


def write_file(input: Any, output: Any) -> int:
    """Copy ``input`` (an open FIFO or a path) to ``output`` (a path or ``-``); returns bytes."""
    with ExitStack() as stack:
        return _copy(fd_of(input, False, stack), fd_of(output, True, stack))
