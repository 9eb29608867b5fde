"""Job functions of the BAM stages: decode, distribute, collect, encode.

Between stages flows a *raw BAM stream*: ``BAM\\1``, header, records, with
no BGZF framing and no compression. Decode turns any BAM/SAM input into one;
encode compresses one into the final BAM (BGZF, in parallel threads), SAM or
uncompressed BAM, adding bamflow's @PG line. Every record a kernel reads is
checked by the one record layer (bamflow.kernels._records).

Chunk-end frames: where the input order must come back after parallel
workers (``collect_bam(order="input")``), a stream carries the end of each
chunk out of band of the records: a block_size of 0, which no record can
have (a record has at least 32 bytes). The distributor writes them after
every chunk (``frame_chunks``) for workers that pass raw streams on; a
worker that reads through pysam (which cannot see them) counts its reads
instead and writes a frame after every ``chunk_size`` of them
(:class:`ChunkFramer`). The collector consumes them; they never reach a file.
"""

from __future__ import annotations

import io
import os
from contextlib import ExitStack
from typing import Any

from ..engine import progress
from ..engine.files import STDIN_NAMES, copy_stream, fd_of, open_for_reading, open_for_writing, owned_fd, write_all
from ..kernels.bam import Collector, Distributor, RecordChunks
from .bgzf import BgzfReader, BgzfWriter, detect_format
from .header import BamFormatError, BamHeader
from .header import command_line as process_command_line
from .options import CollectOptions, DecodeOptions, DistributeOptions, EncodeOptions

COPY_BLOCK = 1 << 20


def source_name(path: str) -> str:
    """How messages name an input: its path, or ``stdin``."""
    return "stdin" if path in STDIN_NAMES else path


def decode_bam(input: str, output: Any, options: DecodeOptions = DecodeOptions()) -> dict[str, Any]:
    """Write ``input`` (BAM, uncompressed BAM, raw BAM or SAM; ``-``: stdin) to
    ``output`` as a raw BAM stream. Returns {"format", "bytes"}."""
    name = source_name(input)
    with ExitStack() as stack:
        out_fd = fd_of(output, True, stack)
        source = io.FileIO(open_for_reading(input), "rb")
        source.name = name  # errors name the file  # type: ignore[misc]
        raw = stack.enter_context(io.BufferedReader(progress.CountingReader(source, progress.current()), COPY_BLOCK))
        fmt = detect_format(raw.peek(4)[:4])
        if fmt == "bgzf":
            total = _copy_checked_header(stack.enter_context(BgzfReader(raw, threads=options.threads)), out_fd, name)
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
    """Copy a raw BAM stream, checking that it starts with a complete header
    (the records are checked by the next stage's kernel)."""
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
            text = str(e) if isinstance(e, BamFormatError) else f"{type(e).__name__}: {e}"
            os.write(err_write, text.encode()[:4000])
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
        pysam.set_verbosity(0)  # the error below names the line; htslib's own warnings would repeat it
        records = 0
        with pysam.AlignmentFile(f"/dev/fd/{sam_read}", "r") as sam:
            header_lines = sam.text.count("\n") if sam.text else 0
            with pysam.AlignmentFile(f"/dev/fd/{bam_write}", "wbu", header=sam.header) as bam:
                try:
                    for record in sam:
                        bam.write(record)
                        records += 1
                except (OSError, ValueError) as e:
                    raise BamFormatError(
                        f"line {header_lines + records + 1}: not a valid SAM alignment line ({e})"
                    ) from None

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


def encode_bam(input: Any, output: Any, options: EncodeOptions = EncodeOptions()) -> dict[str, Any]:
    """Write the raw BAM stream ``input`` to ``output`` as BAM, uncompressed BAM
    or SAM (``options.fmt``), with one @PG line added to the header (and @HD
    SO set to ``options.sort_order`` when given). Every record is checked on
    its way; the result counts them (the books). Without
    ``options.end_marker`` the BGZF EOF marker is left out: the workflow adds
    it when the whole run succeeded (for standard output, which cannot be
    published by renaming); without ``options.header`` the header is left
    out too (BAM only: a part to be joined after one that has it). The
    result: {"records", "record_bytes", "bytes"} (compressed bytes out)."""
    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        chunks = RecordChunks(in_fd, "collected stream: ", progress.current().slot)
        header, _ = BamHeader.from_bytes(chunks.header(), "collected stream")
        if options.program:
            header = header.with_program(options.command_line if options.command_line is not None else process_command_line())
        if options.sort_order is not None:
            header = header.with_sort_order(options.sort_order)
        out_fd = fd_of(output, True, stack)
        if options.fmt == "sam":
            if not options.header:
                raise ValueError("SAM is written with its header")
            return _raw_to_sam(header, chunks, out_fd)
        writer = BgzfWriter(
            io.FileIO(out_fd, "wb", closefd=False), level=0 if options.fmt == "ubam" else options.level,
            threads=options.threads,
        )
        try:
            if options.header:
                writer.write(header.to_bytes())
                writer.flush_block()  # records start in a fresh block, as htslib writes them
            total = 0
            while data := chunks.next_chunk():
                writer.write(data)
                total += len(data)
            if options.end_marker:
                writer.close()
            else:  # the workflow writes the EOF marker once the whole run succeeded
                writer.flush()
        finally:
            writer.abort()  # (after close: nothing left to do)
        return {"records": chunks.records, "record_bytes": total, "bytes": writer.compressed_bytes}


def _raw_to_sam(header: BamHeader, chunks: Any, out_fd: int) -> dict[str, Any]:
    """Raw BAM → SAM text through pysam, fed over a pipe by a forked child."""
    import pysam

    read_end, write_end = os.pipe()

    def feed() -> None:
        os.close(read_end)
        write_all(write_end, memoryview(header.to_bytes()))
        while data := chunks.next_chunk():
            write_all(write_end, memoryview(data))

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
    options: DistributeOptions = DistributeOptions(),
    unassigned: Any = None,
    header_fifo: Any = None,
    source: str = "",
) -> dict[str, Any]:
    """Deal the records of a raw BAM stream to ``outputs`` (see BamWorkflow.distribute_bam).
    ``source`` names the input in messages."""
    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        out_fds = [fd_of(o, True, stack) for o in outputs]
        unassigned_fd = -1 if unassigned is None else fd_of(unassigned, True, stack)
        # the kernel closes the header's descriptor as soon as the header is out
        header_fd = -1 if header_fifo is None else owned_fd(header_fifo, writing=True)
        return Distributor(
            in_fd,
            out_fds,
            options,
            unassigned_fd=unassigned_fd,
            header_fd=header_fd,
            progress=progress.current().slot,
            source=f"{source}: " if source else "",
        ).run()


def collect_records(
    inputs: list[Any], output: Any, options: CollectOptions = CollectOptions(), header_fifo: Any = None
) -> dict[str, Any]:
    """Merge raw BAM streams (or BGZF streams) into one raw BAM stream, header
    first (see BamWorkflow.collect_bam)."""
    with ExitStack() as stack:
        in_fds = [fd_of(i, False, stack) for i in inputs]
        header_fd = -1 if header_fifo is None else fd_of(header_fifo, False, stack)
        out_fd = fd_of(output, True, stack)
        return Collector(in_fds, out_fd, options, header_fd=header_fd, progress=progress.current().slot).run()


class ChunkFramer:
    """For a worker whose reader cannot see chunk-end frames (pysam): call
    :meth:`read_done` after handling each input read; a frame follows every
    ``chunk_size`` reads in ``writer`` (a :class:`~bamflow.kernels.pysam_bridge.RawWriter`).
    ``chunk_size=None``: no frames."""

    def __init__(self, writer: Any, chunk_size: int | None) -> None:
        self.writer = writer
        self.chunk_size = chunk_size or 0
        self._in_chunk = 0

    def read_done(self) -> None:
        if self.chunk_size:
            self._in_chunk += 1
            if self._in_chunk == self.chunk_size:
                self._in_chunk = 0
                self.writer.frame()


def raw_writer(path: str, header: Any) -> Any:
    """A RawWriter on ``path`` (an unmanaged FIFO or a file) that starts with
    the raw form of a pysam ``AlignmentHeader``."""
    from ..kernels.pysam_bridge import RawWriter

    fd = open_for_writing(path)
    return RawWriter(fd, BamHeader.from_pysam(header).to_bytes())


__all__ = [
    "ChunkFramer",
    "collect_records",
    "decode_bam",
    "distribute_records",
    "encode_bam",
    "raw_writer",
    "read_raw_header",
    "source_name",
]
