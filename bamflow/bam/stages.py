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
from ..files import STDIN_NAMES, copy_stream, fd_of, open_for_reading, owned_fd, write_all
from ..kernels.bam import RecordCounter
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
            total = _copy_checked_header(stack.enter_context(BgzfReader(raw, threads=threads)), out_fd, name)
        elif fmt == "bam-raw":
            total = _copy_checked_header(raw, out_fd, name)
        elif fmt == "sam":
            total = _sam_to_raw(raw, out_fd, name)
        elif fmt == "empty":
            raise BamFormatError(f"{name}: empty file, not BAM or SAM")
        elif fmt == "gzip":
            raise BamFormatError(f"{name}: gzip-compressed but not BGZF: not a BAM file")
        else:
            raise BamFormatError(f"{name}: not a BAM or SAM file")
        return {"format": fmt, "bytes": total}


def read_raw_header(stream: Any, name: str) -> tuple[BamHeader, int, bytes]:
    """Read from ``stream`` until a whole raw BAM header is in: (header, its
    length, every byte read so far)."""
    buffer = b""
    while True:
        block = stream.read(COPY_BLOCK)
        buffer += block
        try:
            header, length = BamHeader.from_bytes(buffer, name)
            return header, length, buffer
        except EOFError:
            if not block:
                raise BamFormatError(f"{name}: ends inside the BAM header") from None


def _copy_checked_header(stream: Any, out_fd: int, name: str) -> int:
    """Copy a raw BAM stream, checking that it starts with a complete header."""
    _, _, start = read_raw_header(stream, name)
    write_all(out_fd, memoryview(start))
    return len(start) + copy_stream(stream, out_fd)


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


def _join_forked(pid: int, err_read: int, what: str, failing: bool) -> None:
    """Reap the child; raise its error unless the caller is already failing
    (then the caller's error is the cause, the child's a consequence)."""
    with io.FileIO(err_read, "rb") as err:
        message = err.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code and not failing:
        raise BamFormatError(f"{what}: {message or f'helper process ended with status {code}'}")


def _sam_to_raw(source: Any, out_fd: int, name: str) -> int:
    """SAM text → raw BAM. One forked child feeds the SAM text (what was read
    already, then the rest) into a pipe; another has pysam parse it and write
    uncompressed BAM into a second pipe; here its BGZF framing is stripped."""
    import pysam

    sam_read, sam_write = os.pipe()
    bam_read, bam_write = os.pipe()

    def feed() -> None:
        for fd in (sam_read, bam_read, bam_write):
            os.close(fd)
        copy_stream(source, sam_write)

    def parse() -> None:
        for fd in (sam_write, bam_read):
            os.close(fd)
        with pysam.AlignmentFile(f"/dev/fd/{sam_read}", "r") as sam:
            with pysam.AlignmentFile(f"/dev/fd/{bam_write}", "wbu", header=sam.header) as bam:
                for record in sam:
                    bam.write(record)

    feeder = _run_forked(feed)
    parser = _run_forked(parse)
    for fd in (sam_read, sam_write, bam_write):
        os.close(fd)
    pipe = io.FileIO(bam_read, "rb")
    failing = True
    try:
        with BgzfReader(pipe, threads=1) as reader:
            total = _copy_checked_header(reader, out_fd, name)
        failing = False
    finally:
        pipe.close()  # stops the children if we stopped early
        _join_forked(*parser, name, failing)
        _join_forked(*feeder, name, failing)
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
        header, header_length, start = read_raw_header(source, "collected stream")
        header = header.with_program(command_line if command_line is not None else process_command_line())
        rest = memoryview(start)[header_length:]
        if fmt == "sam":
            return _raw_to_sam(header, rest, source, out_fd)
        writer = stack.enter_context(
            BgzfWriter(io.FileIO(out_fd, "wb", closefd=False), level=0 if fmt == "ubam" else level, threads=threads)
        )
        writer.write(header.to_bytes())
        writer.flush_block()  # records start in a fresh block, as htslib writes them
        counter = RecordCounter()  # the books: what this writer wrote
        data: bytes | memoryview = rest
        total = 0
        while data:
            counter.feed(data)
            writer.write(data)
            total += len(data)
            data = source.read(COPY_BLOCK)
        try:
            records = counter.finish()
        except ValueError as e:
            raise BamFormatError(f"collected stream: {e}") from None
        progress.current().slot[0] = records
        return {"records": records, "record_bytes": total}


def _raw_to_sam(header: BamHeader, rest: memoryview, source: Any, out_fd: int) -> dict[str, Any]:
    """Raw BAM → SAM text through pysam, fed over a pipe by a forked child."""
    import pysam

    read_end, write_end = os.pipe()

    def feed() -> None:
        os.close(read_end)
        write_all(write_end, memoryview(header.to_bytes()))
        write_all(write_end, rest)
        copy_stream(source, write_end)

    feeder = _run_forked(feed)
    os.close(write_end)
    records = 0
    failing = True
    try:
        # a file object, not /dev/fd/N: reopening would truncate a file on stdout
        with pysam.AlignmentFile(f"/dev/fd/{read_end}", "rb", check_sq=False) as bam, open(
            out_fd, "wb", closefd=False
        ) as out, pysam.AlignmentFile(out, "w", header=bam.header) as sam:
            for record in bam:
                sam.write(record)
                records += 1
        failing = False
    finally:
        os.close(read_end)
        _join_forked(*feeder, "collected stream", failing)
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
        # the kernel closes the header's descriptor as soon as the header is out
        header_fd = -1 if header_fifo is None else owned_fd(header_fifo, writing=True)
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
