"""The Python API for custom per-read work on BAM files.

``map_reads`` runs ``func(read) -> read | None | reads`` over every read of a
BAM in N worker processes and writes the results; ``map_reduce`` hands each
worker its whole share of reads and combines what the workers return
(``map_batches``, in :mod:`bamflow.bam.batches`, hands them column batches).
All are :meth:`~bamflow.bam.workflow.BamWorkflow.scatter` workflows::

    decode ─▶ distribute ─▶ worker × N ─▶ collect ─▶ encode ─▶ output.bam
                  └──────────── header ─────────▲

and check the books before the output appears: every read that came in was
written or dropped for a stated reason, or the run fails.

A read is a :class:`bamflow.Record` (``record="bamflow"``, the default: a
view of the raw record in the worker's buffer, with pysam's names; a Cython
loop reads, calls and writes) or a ``pysam.AlignedSegment``
(``record="pysam"``: pysam reads the worker's share; RawWriter writes).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import progress
from ..engine.errors import WorkflowError
from ..engine.files import open_for_reading, open_for_writing
from ..engine.workflow import merge_counts
from .header import command_line as _process_command_line
from .options import CollectOptions, DecodeOptions, DistributeOptions, EncodeOptions
from .stages import ChunkFramer, raw_writer
from .workflow import BamWorkflow

log = logging.getLogger("bamflow")

#: what a worker hands to the user's function: bamflow.Record or pysam.AlignedSegment
RECORD_KINDS = ("bamflow", "pysam")


@dataclass
class RunStats:
    """What a BAM run did with every read."""

    reads_in: int = 0
    added: int = 0  # extra reads made by a function that returned several for one
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    per_worker: list[dict[str, int]] = field(default_factory=list)
    outputs: dict[str, int] = field(default_factory=dict)
    result: Any = None

    def check(self) -> None:
        """Raise WorkflowError unless reads in (+ added) = written + dropped."""
        dropped = sum(self.dropped.values())
        missing = self.reads_in + self.added - self.written - dropped
        if missing:
            raise WorkflowError(
                f"reads do not add up: {self.reads_in} in, {self.added} added, {self.written} written, "
                f"{dropped} dropped {self.dropped}; {missing} unaccounted for"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "reads_in": self.reads_in,
            "added": self.added,
            "written": self.written,
            "dropped": dict(self.dropped),
            "per_worker": list(self.per_worker),
            "outputs": dict(self.outputs),
        }


def map_worker(input: str, output: str, user_func: Callable[[Any], Any], chunk_size: int | None = None) -> dict[str, int]:
    """A worker of :func:`map_reads`: pysam reads its share, ``user_func`` maps
    each read, the results go out as a raw stream; with ``chunk_size`` (input
    order), a chunk-end frame follows every ``chunk_size`` reads."""
    import pysam

    reads_in = written = dropped = added = 0
    slot = progress.current().slot
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        out = raw_writer(output, reads.header)
        with _close_on_success(out):
            framer = ChunkFramer(out, chunk_size)
            write = out.write
            for read in reads:
                reads_in += 1
                if not reads_in & 1023:
                    slot[0] = reads_in
                result = user_func(read)
                if result is None:
                    n = 0
                elif isinstance(result, pysam.AlignedSegment):
                    n = write(result)
                else:
                    n = 0
                    for each in result:
                        n += write(each)
                written += n
                dropped += n == 0
                added += max(0, n - 1)
                framer.read_done()
    slot[0] = reads_in
    return {"reads_in": reads_in, "written": written, "dropped_by_function": dropped, "added": added}


def reduce_worker(input: str, output: str | None, user_func: Callable[..., Any]) -> dict[str, Any]:
    """A worker of :func:`map_reduce`: ``user_func(reads, out)`` sees the whole
    share (``out.write(read)`` writes to the output); the reads it was handed
    are counted, for the books."""
    import pysam

    seen = 0
    slot = progress.current().slot

    def counted(reads: Iterable[Any]) -> Iterator[Any]:
        nonlocal seen
        for read in reads:
            seen += 1
            if not seen & 1023:
                slot[0] = seen
            yield read

    written = None
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        if output is None:
            result = user_func(counted(reads), None)
        else:
            out = raw_writer(output, reads.header)
            with _close_on_success(out):
                result = user_func(counted(reads), out)
            written = out.records
    slot[0] = seen
    return {"result": result, "reads_in": seen, "written": written}


def map_record_worker(input: str, output: str, user_func: Callable[[Any], Any]) -> dict[str, int]:
    """A worker of :func:`map_reads` with ``record="bamflow"``: the kernel
    (:class:`bamflow.kernels.record.MapRecords`) reads the share, hands each
    record to ``user_func`` as a :class:`bamflow.Record` and writes what it
    returns; chunk-end frames pass through (input order)."""
    from ..kernels.record import MapRecords

    with _worker_fds(input, output) as (in_fd, out_fd):
        result = MapRecords(in_fd, out_fd, user_func, progress=progress.current().slot).run()
    return {key: result[key] for key in ("reads_in", "written", "dropped_by_function", "added")}


def reduce_record_worker(input: str, output: str | None, user_func: Callable[..., Any]) -> dict[str, Any]:
    """A worker of :func:`map_reduce` with ``record="bamflow"``: ``user_func(reads,
    out)`` iterates :class:`bamflow.Record` views (``out.write(read)`` takes
    Records and pysam reads); the reads handed out are counted, for the books."""
    from ..kernels.record import RecordIterator, RecordWriter

    with _worker_fds(input, output) as (in_fd, out_fd):
        reads = RecordIterator(in_fd, progress=progress.current().slot)
        out = None if out_fd is None else RecordWriter(os.dup(out_fd), reads.header.raw)
        with _close_on_success(out):
            result = user_func(reads, out)
    return {"result": result, "reads_in": reads.count, "written": None if out is None else out.records}


class _close_on_success:
    """Close ``writer`` (if not None) when the block succeeds. On failure it
    stays open until the job process ends: the engine notes when the job
    failed before its outputs close, so that a downstream job's "stream
    ended early" comes after the cause and is not taken for it."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __enter__(self) -> Any:
        return self.writer

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None and self.writer is not None:
            self.writer.close()


class _worker_fds:
    """The descriptors of a worker's input and output (None without output),
    closed at the end of a successful block (see :class:`_close_on_success`)."""

    def __init__(self, input: str, output: str | None) -> None:
        self.input = input
        self.output = output
        self.fds: list[int] = []

    def __enter__(self) -> tuple[int, int | None]:
        in_fd = open_for_reading(self.input)
        self.fds.append(in_fd)
        out_fd = None
        if self.output is not None:
            out_fd = open_for_writing(self.output)
            self.fds.append(out_fd)
        return in_fd, out_fd

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            for fd in self.fds:
                os.close(fd)


def _check_record(record: str) -> str:
    if record not in RECORD_KINDS:
        raise ValueError(f"record must be one of {', '.join(RECORD_KINDS)}, not {record!r}")
    return record


def map_reads(
    input: str | os.PathLike[str],
    func: Callable[[Any], Any],
    output: str | os.PathLike[str],
    *,
    by: str | Sequence[str] | None = None,
    workers: int = 2,
    order: str = "input",
    threads: int = 2,
    level: int | str | None = None,
    chunk_size: int = 1000,
    missing: str = "error",
    fmt: str = "bam",
    command_line: str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    record: str = "bamflow",
) -> RunStats:
    """Run ``func`` on every read of ``input`` in ``workers`` processes; write ``output``.

    ``func(read)`` returns the read (changed or not), ``None`` to drop it, or
    an iterable of reads. ``record``: what ``read`` is, a
    :class:`bamflow.Record` (``"bamflow"``, the default: pysam's names, no
    copy until an edit changes a length) or a ``pysam.AlignedSegment``
    (``"pysam"``); either kind may return both kinds. ``by`` sends all reads with
    the same tag value(s) (``"CB"``, ``"CB,UB"``) or read name (``"name"``)
    to the same worker; ``None`` deals reads round-robin in chunks of
    ``chunk_size``. ``order``: ``"input"`` keeps the input order (needs
    ``by=None``), ``"coordinate"`` or ``"tag:XX"`` merge sorted worker outputs,
    ``"any"`` is fastest. ``missing`` (reads without the ``by`` tag):
    ``"error"`` or ``"drop"``. ``threads``/``level``: BGZF decompression and
    compression. Returns the run's :class:`RunStats`; raises WorkflowError if
    anything failed or the reads do not add up.
    """
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', not {missing!r}")
    if order == "input" and by is not None:
        raise ValueError("order='input' needs reads dealt round-robin (by=None); sharding by a key reorders them")
    if _check_record(record) == "bamflow":  # the kernel passes the distributor's chunk-end frames on
        worker: Callable[..., Any] = map_record_worker
        worker_kwargs: dict[str, Any] = {"user_func": func}
        distribute = DistributeOptions(by=by, chunk_size=chunk_size, missing=missing, frame_chunks=order == "input")
    else:  # pysam cannot see frames: the worker counts reads and frames every chunk
        worker = map_worker
        worker_kwargs = {"user_func": func, "chunk_size": chunk_size if order == "input" else None}
        distribute = DistributeOptions(by=by, chunk_size=chunk_size, missing=missing)
    w = BamWorkflow("map_reads", start_method=start_method)
    jobs = w.scatter(
        os.fspath(input),
        worker,
        workers=workers,
        distribute=distribute,
        worker_kwargs=worker_kwargs,
        decode=DecodeOptions(threads),
        output=os.fspath(output),
        collect=CollectOptions(order),
        encode=_encode_options(level, threads, fmt, command_line),
    )
    return run_mapped(w, jobs, input, output, timeout, on_progress)


def run_mapped(w: BamWorkflow, jobs: Any, input: str | os.PathLike[str], output: str | os.PathLike[str],
               timeout: float | None, on_progress: Callable[[Any], None] | None) -> RunStats:
    """Run a workflow whose workers map reads one to many (map_reads,
    map_batches: each worker returns reads_in, written, dropped_by_function,
    added) and check its books before the output appears."""
    stats = RunStats()

    def check(w: BamWorkflow) -> None:
        """The books, before the output appears: every stage passed on what it got."""
        flow = jobs.check_flow(w)
        dist = w.result(jobs.distributor)
        per_worker = flow["per_worker"]
        dropped = {
            "missing_tag": dist["dropped_missing_tag"],
            "by_function": sum(p["dropped_by_function"] for p in per_worker),
        }
        stats.reads_in = dist["records"]
        stats.added = sum(p["added"] for p in per_worker)
        stats.written = flow["collected"]
        stats.dropped = {reason: n for reason, n in dropped.items() if n}
        stats.per_worker = per_worker
        stats.outputs = {os.fspath(output): flow["collected"]}
        stats.check()

    w.run(timeout=timeout, on_progress=on_progress, check=check)
    log.info("%s %s → %s: %s", w.name, input, output, stats.as_dict())
    return stats


def map_reduce(
    input: str | os.PathLike[str],
    func: Callable[[Iterable[Any], Any], Any],
    *,
    output: str | os.PathLike[str] | None = None,
    combine: Callable[[Any, Any], Any] = merge_counts,
    by: str | Sequence[str] | None = None,
    workers: int = 2,
    order: str = "any",
    threads: int = 2,
    level: int | str | None = None,
    chunk_size: int = 1000,
    missing: str = "error",
    command_line: str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    record: str = "bamflow",
) -> RunStats:
    """Give each of ``workers`` processes its share of the reads: ``func(reads, out)``
    iterates ``reads`` (:class:`bamflow.Record` objects, or with
    ``record="pysam"`` pysam.AlignedSegment objects) and may write reads with
    ``out.write(read)`` (``out`` is None without ``output``); what the workers
    return is folded with ``combine`` (default: add numbers, merge counters)
    into ``RunStats.result``. With ``by="CB"`` all reads of a cell meet in one
    worker, so per-cell results are complete."""
    if order == "input":
        raise ValueError("map_reduce cannot keep the input order (a worker's function sees its whole share); "
                         "use order='any', 'coordinate' or 'tag:XX'")
    w = BamWorkflow("map_reduce", start_method=start_method)
    jobs = w.scatter(
        os.fspath(input),
        reduce_record_worker if _check_record(record) == "bamflow" else reduce_worker,
        workers=workers,
        distribute=DistributeOptions(by=by, chunk_size=chunk_size, missing=missing),
        worker_kwargs={"user_func": func},
        decode=DecodeOptions(threads),
        output=None if output is None else os.fspath(output),
        collect=CollectOptions(order),
        encode=_encode_options(level, threads, "bam", command_line),
    )
    stats = RunStats()

    def check(w: BamWorkflow) -> None:
        """Every read dealt out reached a worker's function."""
        flow = jobs.check_flow(w)
        dist = w.result(jobs.distributor)
        stats.reads_in = dist["records"]
        stats.per_worker = [p["result"] for p in flow["per_worker"]]
        if dist["dropped_missing_tag"]:
            stats.dropped = {"missing_tag": dist["dropped_missing_tag"]}
        if output is not None:
            stats.written = flow["collected"]
            stats.outputs = {os.fspath(output): stats.written}

    w.run(timeout=timeout, on_progress=on_progress, check=check)
    stats.result = functools.reduce(combine, stats.per_worker) if stats.per_worker else None
    log.info("map_reduce %s: %s", input, stats.as_dict())
    return stats


def _encode_options(level: int | str | None, threads: int, fmt: str, command_line: str | None) -> EncodeOptions:
    """The writer's options of an API call (its command line by default)."""
    return EncodeOptions(
        **({} if level is None else {"level": level}),
        threads=threads,
        fmt=fmt,
        command_line=command_line or _process_command_line(),
    )
