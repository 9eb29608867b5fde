"""The Python API for custom per-read work on BAM files.

``map_reads`` runs ``func(read) -> read | None | reads`` over every read of a
BAM in N worker processes and writes the results; ``map_reduce`` hands each
worker its whole share of reads and combines what the workers return.
Both build a workflow on the engine::

    decode ─▶ distribute ─▶ worker × N ─▶ collect ─▶ encode ─▶ output.bam
                  └──────────── header ─────────▲

and check the books afterwards: every read that came in was written or
dropped for a stated reason, or the run fails.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import progress
from ..errors import WorkflowError
from ..fifo import FIFO
from ..kernels.bam import CHUNK_END_NAME as _CHUNK_END_NAME
from ..workflow import Workflow, merge_counts
from .header import command_line as _process_command_line

CHUNK_END_NAME = _CHUNK_END_NAME.decode()
log = logging.getLogger("bamflow")


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


def _key_tags(by: str | Sequence[str] | None) -> Any:
    """by="CB" / "CB,UB" / ["CB", "UB"] / "name" / None → the kernel's form."""
    if by is None or by == "name":
        return by
    tags = by.split(",") if isinstance(by, str) else list(by)
    for tag in tags:
        if len(tag) != 2 or not tag.isascii():
            raise ValueError(f"a BAM tag has two characters, not {tag!r}")
    return [tag.encode() for tag in tags]


def _write_result(out: Any, result: Any) -> int:
    import pysam

    if result is None:
        return 0
    if isinstance(result, pysam.AlignedSegment):
        out.write(result)
        return 1
    written = 0
    for read in result:
        out.write(read)
        written += 1
    return written


def map_worker(input: str, output: str, user_func: Callable[[Any], Any], marked: bool = False) -> dict[str, int]:
    """A worker of :func:`map_reads`: pysam reads its share, ``user_func`` maps each
    read; with ``marked``, chunk-end markers are passed on at once."""
    import pysam

    reads_in = written = dropped = added = 0
    slot = progress.current().slot
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        with pysam.AlignmentFile(output, "wbu", header=reads.header) as out:
            out.flush()  # the header now: a merging collector reads every header first
            for read in reads:
                if marked and read.query_name == CHUNK_END_NAME:
                    out.write(read)  # pass the chunk boundary on, now: the collector waits for it
                    out.flush()
                    continue
                reads_in += 1
                if not reads_in & 1023:
                    slot[0] = reads_in
                n = _write_result(out, user_func(read))
                written += n
                dropped += n == 0
                added += max(0, n - 1)
    slot[0] = reads_in
    return {"reads_in": reads_in, "written": written, "dropped_by_function": dropped, "added": added}


def reduce_worker(input: str, output: str | None, user_func: Callable[..., Any]) -> dict[str, Any]:
    """A worker of :func:`map_reduce`: ``user_func(reads, out)`` sees the whole
    share; the reads it was handed are counted, for the books."""
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

    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        if output is None:
            result = user_func(counted(reads), None)
        else:
            with pysam.AlignmentFile(output, "wbu", header=reads.header) as out:
                out.flush()
                result = user_func(counted(reads), out)
    slot[0] = seen
    return {"result": result, "reads_in": seen}


def _build(
    name: str,
    input: str,
    output: str | None,
    worker: Callable[..., Any],
    worker_kwargs: dict[str, Any],
    *,
    by: Any,
    workers: int,
    order: str,
    threads: int,
    level: int | str | None,
    chunk_size: int,
    missing: str,
    fmt: str,
    command_line: str | None,
    start_method: str | None,
) -> Workflow:

    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    if order == "input" and by is not None:
        raise ValueError("order='input' needs reads dealt round-robin (by=None); sharding by a key reorders them")
    w = Workflow(name, start_method=start_method)
    w.BAM_reader(input=input, output=FIFO("decoded", "wb"), threads=threads)
    w.distribute_bam(
        input=FIFO("decoded", "rb"),
        outputs=FIFO("share{n}", "wb", n=workers),
        by=_key_tags(by),
        chunk_size=chunk_size,
        missing=missing,
        header_fifo=FIFO("header", "wb") if output is not None else None,
        mark_chunks=order == "input",
    )
    w.workers(
        input=FIFO("share{n}", "rb"),
        output=FIFO("mapped{n}", "wb") if output is not None else None,
        func=worker,
        n=workers,
        manage_fifos=False,
        **worker_kwargs,
    )
    if output is not None:
        w.collect_and_write_bam(
            FIFO("mapped{n}", "rb", n=workers),
            output,
            order=order,
            level=level,
            threads=threads,
            fmt=fmt,
            command_line=command_line or _process_command_line(),
        )
    return w


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
) -> RunStats:
    """Run ``func`` on every read of ``input`` in ``workers`` processes; write ``output``.

    ``func(read: pysam.AlignedSegment)`` returns the read (changed or not),
    ``None`` to drop it, or an iterable of reads. ``by`` sends all reads with
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
    w = _build(
        "map_reads",
        os.fspath(input),
        os.fspath(output),
        map_worker,
        {"user_func": func, "marked": order == "input"},
        by=by,
        workers=workers,
        order=order,
        threads=threads,
        level=level,
        chunk_size=chunk_size,
        missing=missing,
        fmt=fmt,
        command_line=command_line,
        start_method=start_method,
    )
    stats = RunStats()

    def check(w: Workflow) -> None:
        """The books, before the output appears: every stage passed on what it got."""
        dist = w.result_dict["map_reads.dist0"]
        per_worker = w.results("map_reads.worker*")
        collected = w.result_dict["map_reads.collect0"]["records"]
        dropped = {
            "missing_tag": dist["dropped_missing_tag"],
            "by_function": sum(p["dropped_by_function"] for p in per_worker),
        }
        stats.reads_in = dist["records"]
        stats.added = sum(p["added"] for p in per_worker)
        stats.written = collected
        stats.dropped = {reason: n for reason, n in dropped.items() if n}
        stats.per_worker = per_worker
        stats.outputs = {os.fspath(output): collected}
        dealt = dist["records"] - dist["dropped_missing_tag"]
        read_by_workers = sum(p["reads_in"] for p in per_worker)
        written_by_workers = sum(p["written"] for p in per_worker)
        encoded = w.result_dict["map_reads.BAM_writer0"].get("records", collected)  # (SAM output: by pysam)
        if dealt != read_by_workers or collected != written_by_workers or encoded != collected:
            raise WorkflowError(
                f"reads do not add up between stages: {dealt} dealt to workers, {read_by_workers} read by them, "
                f"{written_by_workers} written by them, {collected} collected, {encoded} written out"
            )
        stats.check()

    w.run(timeout=timeout, on_progress=on_progress, check=check)
    log.info("map_reads %s → %s: %s", input, output, stats.as_dict())
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
) -> RunStats:
    """Give each of ``workers`` processes its share of the reads: ``func(reads, out)``
    iterates ``reads`` (pysam.AlignedSegment objects) and may write to ``out`` (a
    pysam.AlignmentFile, or None without ``output``); what the workers return is
    folded with ``combine`` (default: add numbers, merge counters) into
    ``RunStats.result``. With ``by="CB"`` all reads of a cell meet in one worker,
    so per-cell results are complete."""
    w = _build(
        "map_reduce",
        os.fspath(input),
        None if output is None else os.fspath(output),
        reduce_worker,
        {"user_func": func},
        by=by,
        workers=workers,
        order=order,
        threads=threads,
        level=level,
        chunk_size=chunk_size,
        missing=missing,
        fmt="bam",
        command_line=command_line,
        start_method=start_method,
    )
    stats = RunStats()

    def check(w: Workflow) -> None:
        """Every read dealt out reached a worker's function."""
        dist = w.result_dict["map_reduce.dist0"]
        per_worker = w.results("map_reduce.worker*")
        stats.reads_in = dist["records"]
        stats.per_worker = [p["result"] for p in per_worker]
        if dist["dropped_missing_tag"]:
            stats.dropped = {"missing_tag": dist["dropped_missing_tag"]}
        seen = sum(p["reads_in"] for p in per_worker)
        if dist["records"] - dist["dropped_missing_tag"] != seen:
            raise WorkflowError(
                f"reads do not add up: {dist['records'] - dist['dropped_missing_tag']} dealt to workers, "
                f"{seen} handed to the function"
            )
        if output is not None:
            stats.written = w.result_dict["map_reduce.collect0"]["records"]
            stats.outputs = {os.fspath(output): stats.written}

    w.run(timeout=timeout, on_progress=on_progress, check=check)
    stats.result = functools.reduce(combine, stats.per_worker) if stats.per_worker else None
    log.info("map_reduce %s: %s", input, stats.as_dict())
    return stats
