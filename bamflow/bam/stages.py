"""Job functions of the BAM stages: decode, distribute, collect, encode.

Between stages flows a *raw BAM stream*: ``BAM\\1``, header, records, with
no BGZF framing and no compression. Decode turns any BAM/SAM input into one;
encode compresses one into the final BAM (BGZF, in parallel threads), SAM or
uncompressed BAM, adding bamflow's @PG line.
"""

from __future__ import annotations

import io
import os
from contextlib import ExitStack
from typing import Any

from .. import progress
from ..bgzf import DEFAULT_LEVEL, BgzfReader, BgzfWriter, detect_format
from ..fifo import wait_readable
from ..files import STDIN_NAMES, fd_of, open_for_reading, write_all
from .header import BamFormatError, BamHeader
from .header import command_line as process_command_line

COPY_BLOCK = 1 << 20


def _source_name(path: str) -> str:
    return "stdin" if path in STDIN_NAMES else path


def decode_bam(input: str, output: Any, threads: int = 2) -> dict[str, Any]:
    """Write ``input`` (BAM, uncompressed BAM, raw BAM or SAM; ``-``: stdin) to
    ``output`` as a raw BAM stream. Returns {"format", "bytes"}."""
    name = _source_name(input)
    with ExitStack() as stack:
        out_fd = fd_of(output, True, stack)
        source = io.FileIO(open_for_reading(input), "rb")
        source.name = name  # errors name the file  # type: ignore[misc]
        raw = stack.enter_context(io.BufferedReader(progress.CountingReader(source, progress.current()), COPY_BLOCK))
        fmt = detect_format(raw.peek(4)[:4])
        if fmt == "bgzf":
            reader = stack.enter_context(BgzfReader(raw, threads=threads))
            total = _copy_checked_header(reader, out_fd, name)
        elif fmt == "bam-raw":
            total = _copy_checked_header(raw, out_fd, name)
        elif fmt == "sam":
            total = _sam_to_raw(input, out_fd, threads)
        elif fmt == "empty":
            raise BamFormatError(f"{name}: empty file, not BAM or SAM")
        elif fmt == "gzip":
            raise BamFormatError(f"{name}: gzip-compressed but not BGZF: not a BAM file")
        else:
            raise BamFormatError(f"{name}: not a BAM or SAM file")
        return {"format": fmt, "bytes": total}


def _copy_checked_header(stream: Any, out_fd: int, name: str) -> int:
    """Copy a raw BAM stream, checking that it starts with a complete header."""
    buffer = b""
    while True:
        block = stream.read(COPY_BLOCK)
        buffer += block
        try:
            BamHeader.from_bytes(buffer, name)
            break
        except EOFError:
            if not block:
                raise BamFormatError(f"{name}: file ends inside the BAM header") from None
    write_all(out_fd, memoryview(buffer))
    total = len(buffer)
    while True:
        block = stream.read(COPY_BLOCK)
        if not block:
            return total
        write_all(out_fd, memoryview(block))
        total += len(block)


def _run_forked(target: Any) -> tuple[int, int]:
    """Run ``target()`` in a forked child; returns (pid, fd of its error report).

    pysam holds the GIL while it blocks on a pipe, so pysam and the code that
    feeds or drains its pipe cannot share a process as threads."""
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(err_read)
        code = 0
        try:
            target()
        except BaseException as e:
            os.write(err_write, f"{type(e).__name__}: {e}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(err_write)
    return pid, err_read


def _join_forked(pid: int, err_read: int, what: str) -> None:
    with io.FileIO(err_read, "rb") as err:
        message = err.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise BamFormatError(f"{what}: {message or f'helper process ended with status {code}'}")


def _sam_to_raw(input: str, out_fd: int, threads: int) -> int:
    """SAM text → raw BAM: a forked child has pysam parse the SAM and write
    uncompressed BAM into a pipe; here its BGZF framing is stripped."""
    import pysam

    read_end, write_end = os.pipe()

    def produce() -> None:
        os.close(read_end)
        with pysam.AlignmentFile(input if input not in STDIN_NAMES else "-", "r") as sam:
            with pysam.AlignmentFile(f"/dev/fd/{write_end}", "wbu", header=sam.header) as bam:
                for record in sam:
                    bam.write(record)

    pid, err = _run_forked(produce)
    os.close(write_end)
    pipe = io.FileIO(read_end, "rb")
    try:
        with BgzfReader(pipe, threads=1) as reader:
            total = _copy_checked_header(reader, out_fd, _source_name(input))
    finally:
        pipe.close()  # stops the child if we stopped early
        _join_forked(pid, err, _source_name(input))
    return total


def encode_bam(
    input: Any,
    output: Any,
    level: int | str = DEFAULT_LEVEL,
    threads: int = 2,
    fmt: str = "bam",
    command_line: str | None = None,
) -> dict[str, Any]:
    """Write the raw BAM stream ``input`` to ``output`` as BAM (BGZF at ``level``,
    compressed in ``threads`` threads), ``fmt="ubam"`` (uncompressed BAM) or
    ``fmt="sam"``, with one @PG line added to the header (CL: ``command_line``,
    by default how this process was started)."""
    if fmt not in ("bam", "ubam", "sam"):
        raise ValueError(f"fmt must be bam, ubam or sam, not {fmt!r}")
    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        wait_readable(in_fd)  # a FIFO read end reports EOF until its writer connects
        out_fd = fd_of(output, True, stack)
        source = stack.enter_context(
            io.BufferedReader(progress.CountingReader(io.FileIO(in_fd, "rb", closefd=False), progress.current()), COPY_BLOCK)
        )
        buffer = b""
        while True:
            block = source.read(COPY_BLOCK)
            buffer += block
            try:
                header, header_length = BamHeader.from_bytes(buffer, "collected stream")
                break
            except EOFError:
                if not block:
                    raise BamFormatError("collected stream ends inside the BAM header") from None
        header = header.with_program(command_line if command_line is not None else process_command_line())
        rest = memoryview(buffer)[header_length:]
        if fmt == "sam":
            return _raw_to_sam(header, rest, source, out_fd)
        writer = stack.enter_context(
            BgzfWriter(io.FileIO(out_fd, "wb", closefd=False), level=0 if fmt == "ubam" else level, threads=threads)
        )
        writer.write(header.to_bytes())
        writer.flush_block()  # records start in a fresh block, as htslib writes them
        writer.write(rest)
        total = len(rest)
        while True:
            block = source.read(COPY_BLOCK)
            if not block:
                break
            writer.write(block)
            total += len(block)
        return {"record_bytes": total}


def _raw_to_sam(header: BamHeader, rest: memoryview, source: Any, out_fd: int) -> dict[str, Any]:
    """Raw BAM → SAM text through pysam, fed over a pipe by a forked child."""
    import pysam

    read_end, write_end = os.pipe()

    def feed() -> None:
        os.close(read_end)
        write_all(write_end, memoryview(header.to_bytes()))
        write_all(write_end, rest)
        while True:
            block = source.read(COPY_BLOCK)
            if not block:
                break
            write_all(write_end, memoryview(block))

    pid, err = _run_forked(feed)
    os.close(write_end)
    records = 0
    try:
        with pysam.AlignmentFile(f"/dev/fd/{read_end}", "rb", check_sq=False) as bam:
            with pysam.AlignmentFile(f"/dev/fd/{out_fd}", "w", header=bam.header) as sam:
                for record in bam:
                    sam.write(record)
                    records += 1
    finally:
        os.close(read_end)
        _join_forked(pid, err, "collected stream")
    return {"records": records}


def distribute_records(
    input: Any,
    outputs: list[Any],
    by: Any = None,
    chunk_size: int = 1000,
    missing: str = "error",
    unassigned: Any = None,
    header_fifo: Any = None,
    header_broadcast: bool = True,
    mark_chunks: bool = False,
    count_values: bool = False,
) -> dict[str, Any]:
    """Deal the records of a raw BAM stream to ``outputs`` (see Workflow.distribute_bam)."""
    from ..kernels.bam import distribute_bam

    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        out_fds = [fd_of(o, True, stack) for o in outputs]
        unassigned_fd = -1 if unassigned is None else fd_of(unassigned, True, stack)
        header_fd = -1
        if header_fifo is not None:
            # the kernel owns (and closes, as soon as the header is out) its own descriptor
            header_fd = os.dup(fd_of(header_fifo, True, stack))
            if hasattr(header_fifo, "close"):
                header_fifo.close()
        return dict(distribute_bam(
            in_fd,
            out_fds,
            by=by,
            chunk_size=chunk_size,
            missing=missing,
            unassigned_fd=unassigned_fd,
            header_fd=header_fd,
            header_broadcast=header_broadcast,
            mark_chunks=mark_chunks,
            count_values=count_values,
            progress=progress.current().slot,
        ))


def collect_records(inputs: list[Any], output: Any, header_fifo: Any = None, order: str = "any") -> dict[str, Any]:
    """Merge raw BAM streams (or BGZF streams from pysam workers) into one raw
    BAM stream, header first (see Workflow.collect_bam)."""
    from ..kernels.bam import collect_bam

    tag = None
    if order.startswith("tag:"):
        order, tag = "tag", order[4:].encode()
    with ExitStack() as stack:
        in_fds = [fd_of(i, False, stack) for i in inputs]
        header_fd = -1 if header_fifo is None else fd_of(header_fifo, False, stack)
        out_fd = fd_of(output, True, stack)
        return dict(collect_bam(in_fds, out_fd, order=order, header_fd=header_fd, tag=tag, progress=progress.current().slot))
