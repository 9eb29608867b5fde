"""Joining BGZF files without recompressing: the compressed blocks copied
as they are (``copy_file_range`` where the kernel can).

A BAM written by bamflow (or htslib) ends its header with a BGZF block, so
its record blocks can be copied into another BAM with the same header as
they are: :func:`concat_bams` writes the first part's header blocks, then
every part's record blocks, then one EOF marker — ``samtools cat`` without
decompressing. A part whose first record shares a block with the header
gets that one block recompressed. :func:`concat_raw` does the same for raw
BAM streams.

:func:`join_parts` is the job that ends a region run
(:meth:`~bamflow.bam.workflow.BamWorkflow.regions`): each worker's records
are compressed by their own writer, part 0's with the header, and the join
passes part 0's blocks straight on while the later parts wait, compressed,
in unnamed files beside the output; then their blocks follow in partition
order, and one EOF marker. Used by ``bamflow.distributed`` (its gather) as
well.
"""

from __future__ import annotations

import os
import select
import tempfile
from contextlib import ExitStack
from typing import Any

from ..engine.errors import WorkflowError
from ..engine.files import fd_of, write_all
from .bgzf import BLOCK_SIZE, EOF_BLOCK, compress_block
from .partition import Layout, layout_of, read_block

READ_BLOCK = 1 << 20


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy ``length`` bytes at ``offset`` of the file ``src`` to the end of ``dst``
    (in the kernel where it can: copy_file_range, else read and write)."""
    done = 0
    try:
        while done < length and hasattr(os, "copy_file_range"):
            n = os.copy_file_range(src, dst, length - done, offset + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass  # not on this filesystem pair: copy through user space
    while done < length:
        data = os.pread(src, min(1 << 20, length - done), offset + done)
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
        done += len(data)
    if done != length:
        raise WorkflowError(f"a part ended early: {done} of {length} bytes copied")
    return done


def _header_blocks(layout: Layout) -> bytes | None:
    """None when the header fills whole blocks (copy them); else the header recompressed."""
    if layout.first[1] == 0:
        return None
    data = layout.header
    return b"".join(compress_block(data[i : i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE))


def concat_bams(paths: list[str], output: str, *, check_headers: bool = True) -> dict[str, Any]:
    """One BAM from BAMs that share a header: the first one's header, every
    part's records in order, one EOF marker, no record recompressed.
    Returns {"parts", "bytes"}."""
    if not paths:
        raise ValueError("concat_bams needs at least one part")
    layouts = [layout_of(p) for p in paths]
    if check_headers:
        for path, layout in zip(paths, layouts, strict=True):
            if layout.header != layouts[0].header:
                raise WorkflowError(f"{path}: its header differs from {paths[0]}'s; parts cannot be joined")
    written = 0
    with ExitStack() as stack:
        out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        stack.callback(os.close, out)
        first = layouts[0]
        header = _header_blocks(first)
        src = os.open(paths[0], os.O_RDONLY | os.O_CLOEXEC)
        try:
            if header is None:
                written += copy_range(src, out, 0, first.first[0])
            else:
                written += os.write(out, header)
        finally:
            os.close(src)
        for path, layout in zip(paths, layouts, strict=True):
            c, u = layout.first
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if u:  # the first records share a block with the header: that block once more
                    with os.fdopen(os.dup(src), "rb") as f:
                        size, payload = read_block(f, c, path)
                    written += os.write(out, compress_block(payload[u:]))
                    c += size
                written += copy_range(src, out, c, layout.data_end - c)
            finally:
                os.close(src)
        written += os.write(out, EOF_BLOCK)
    return {"parts": len(paths), "bytes": written}


def concat_raw(paths: list[str], header_bytes: int, output: str) -> int:
    """One raw BAM stream file from raw parts that share a header of
    ``header_bytes``: the first part whole, the others without their header."""
    total = 0
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for i, path in enumerate(paths):
            skip = 0 if i == 0 else header_bytes
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                total += copy_range(src, out, skip, os.fstat(src).st_size - skip)
            finally:
                os.close(src)
    finally:
        os.close(out)
    return total


def join_parts(inputs: list[Any], output: Any, *, folder: str | None = None, end_marker: bool = True
               ) -> dict[str, Any]:
    """Join BGZF streams in the order of ``inputs`` (FIFOs of the part writers;
    the first carries the header, the others records only, none an EOF
    marker) into ``output``, copying the compressed blocks: the part in turn
    goes straight through, the later ones are kept meanwhile in unnamed
    files in ``folder`` (None: the temporary folder), so that no writer
    waits and a failed run leaves none behind; then one EOF marker (unless
    ``end_marker=False``: the workflow writes it after the run succeeded).
    Returns {"bytes", "part_bytes"}."""
    n = len(inputs)
    with ExitStack() as stack:
        out_fd = fd_of(output, True, stack)
        fds = [fd_of(item, False, stack) for item in inputs]
        spools = [-1] + [stack.enter_context(tempfile.TemporaryFile(dir=folder)).fileno() for _ in range(1, n)]
        sizes = [0] * n
        ended = [False] * n
        part_of = {fd: i for i, fd in enumerate(fds)}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        written = 0
        turn = 0  # the part whose blocks go straight to the output

        def next_turn() -> int:
            """Copy out each finished part's spool in order; the first unfinished part goes straight on."""
            nonlocal turn, written
            while turn < n and ended[turn]:
                turn += 1
                if turn < n and sizes[turn]:  # (an unfinished part: what it wrote so far)
                    written += copy_range(spools[turn], out_fd, 0, sizes[turn])
            return turn

        while next_turn() < n:
            for fd, _ in poller.poll():
                i = part_of[fd]
                data = os.read(fd, READ_BLOCK)
                if not data:  # its writer closed
                    poller.unregister(fd)
                    ended[i] = True
                elif i == turn:
                    write_all(out_fd, memoryview(data))
                    written += len(data)
                    sizes[i] += len(data)
                else:
                    write_all(spools[i], memoryview(data))
                    sizes[i] += len(data)
        if end_marker:
            write_all(out_fd, memoryview(EOF_BLOCK))
            written += len(EOF_BLOCK)
    return {"bytes": written, "part_bytes": sizes}


__all__ = ["concat_bams", "concat_raw", "copy_range", "join_parts"]
