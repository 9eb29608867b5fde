"""Reads per tag value, like Drop-seq's ``BamTagHistogram`` (also used by spacemake).

Semantics (Drop-seq tools ``BamTagHistogram.getBamTagCounts``): a read is
skipped if it is a PCR duplicate (flag 0x400, only with
``filter_pcr_duplicates``), if its MAPQ is below ``read_quality`` (Drop-seq's
``READ_MQ``), if it is secondary or supplementary (Drop-seq's
``isSecondaryOrSupplementary()``: flags 0x100 and 0x800; here both go with
``skip_secondary``), or if the tag is missing or empty. String tags count as
they are, integer tags by their decimal value (Drop-seq's
``getAnyTagAsString``); other types are an error.

Output: Drop-seq's format — one comment line
``#INPUT=…<TAB>TAG=…<TAB>FILTER_PCR_DUPLICATES=…<TAB>READ_QUALITY=…`` (``header=False``
leaves it out), then ``count<TAB>value`` lines by count, descending; ties
(which Drop-seq leaves in hash order) by value, ascending. A name ending in
``.gz`` is gzip-compressed.

Pipeline: ``BAM_reader`` (BGZF inflated in ``threads`` threads) → with
``workers > 1`` ``distribute_bam`` round-robin → ``workers`` counting jobs
(kernel ``count_tag_values``: tags found in C, counts in a dict keyed by the
value bytes) → counts merged here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from ..bam.header import BamHeader
from ..bam.stages import read_raw_header
from ..errors import WorkflowError
from ..fifo import FIFO
from ..workflow import Workflow

READ_SIZE = 1 << 20
COUNT_STATS = ("records", "counted", "duplicate", "low_mapq", "secondary", "supplementary", "missing_tag")


def read_header(stream: Any) -> tuple[BamHeader, bytes]:
    """Read the header of a raw BAM stream (a buffered binary file); returns it and the bytes after it."""
    header, length, data = read_raw_header(stream, str(getattr(stream, "name", "BAM stream")))
    return header, data[length:]


def raw_chunks(stream: Any, rest: bytes) -> Iterator[bytes]:
    """Buffers of the stream, starting with ``rest``."""
    if rest:
        yield rest
    while True:
        more = stream.read1(READ_SIZE)
        if not more:
            return
        yield more


def process_records(stream: Any, rest: bytes, kernel: Any) -> None:
    """Feed the records of the stream to ``kernel(buf, start) -> end of complete records``."""
    pending = b""
    for chunk in raw_chunks(stream, rest):
        buf = pending + chunk if pending else chunk
        end = kernel(buf, 0)
        pending = buf[end:]
    if pending:
        raise WorkflowError(f"BAM stream ends inside a record ({len(pending)} bytes left over)")


def count_worker(
    input: Any, tag: bytes, skip_secondary: bool, skip_duplicates: bool, min_mapq: int
) -> dict[str, Any]:
    """A job: count the values of ``tag`` in a raw BAM stream."""
    from array import array

    from ..kernels.presets import count_tag_values

    counts: dict[bytes, int] = {}
    stats = array("q", [0] * len(COUNT_STATS))
    _, rest = read_header(input)

    def kernel(buf: bytes, start: int) -> int:
        return count_tag_values(buf, start, tag, skip_secondary, skip_duplicates, min_mapq, counts, stats)

    process_records(input, rest, kernel)
    return {"counts": counts, "stats": dict(zip(COUNT_STATS, stats, strict=True))}


def count_values(
    input: str | os.PathLike[str],
    tag: str,
    *,
    skip_secondary: bool = True,
    skip_duplicates: bool = False,
    min_mapq: int = 0,
    workers: int = 1,
    threads: int = 2,
    name: str = "count_values",
    on_progress: Callable[[Any], None] | None = None,
) -> tuple[dict[bytes, int], dict[str, int]]:
    """Count reads per value of ``tag``: (value → reads, stats with COUNT_STATS keys)."""
    if len(tag) != 2 or not tag.isascii():
        raise ValueError(f"a BAM tag has two characters, not {tag!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    w = Workflow(name)
    w.BAM_reader(input=os.fspath(input), output=FIFO("decoded", "wb"), threads=threads)
    kwargs: dict[str, Any] = dict(
        tag=tag.encode(), skip_secondary=skip_secondary, skip_duplicates=skip_duplicates, min_mapq=min_mapq
    )
    if workers == 1:
        w.add_job(func=count_worker, job_name="{workflow}.worker0", input=FIFO("decoded", "rb"), **kwargs)
    else:
        w.distribute_bam(input=FIFO("decoded", "rb"), outputs=FIFO("share{n}", "wb", n=workers))
        w.workers(input=FIFO("share{n}", "rb"), func=count_worker, n=workers, **kwargs)
    w.run(on_progress=on_progress)
    counts: dict[bytes, int] = {}
    stats = dict.fromkeys(COUNT_STATS, 0)
    for result in w.results(f"{name}.worker*"):
        for key, n in result["stats"].items():
            stats[key] += n
        if not counts:
            counts = result["counts"]
        else:
            for value, n in result["counts"].items():
                counts[value] = counts.get(value, 0) + n
    if workers > 1:
        dealt = w.result_dict[f"{name}.dist0"]["records"]
        if dealt != stats["records"]:
            raise WorkflowError(f"reads do not add up: {dealt} dealt to the counters, {stats['records']} counted")
    skipped = sum(stats[k] for k in COUNT_STATS[2:])
    if stats["records"] != stats["counted"] + skipped or stats["counted"] != sum(counts.values()):
        raise WorkflowError(f"reads do not add up: {stats}, {sum(counts.values())} in the histogram")
    return counts, stats


def write_histogram(counts: dict[bytes, int], output: str | os.PathLike[str], header_line: str | None) -> int:
    """Write ``count<TAB>value`` lines, by count descending then value; atomically. Returns lines written."""
    output = os.fspath(output)
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    data = b"".join(b"%d\t%s\n" % (n, value) for value, n in rows)
    if header_line is not None:
        data = header_line.encode() + b"\n" + data
    if output.endswith(".gz"):
        import isal.igzip

        data = isal.igzip.compress(data)
    if output in ("-", "/dev/stdout"):
        import sys

        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return len(rows)
    tmp = f"{output}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(rows)


def histogram(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    tag: str = "CB",
    skip_secondary: bool = True,
    min_mapq: int | None = None,
    read_quality: int | None = None,
    filter_pcr_duplicates: bool = False,
    header: bool = True,
    workers: int = 2,
    threads: int = 2,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Write the number of reads per value of ``tag`` (Drop-seq BamTagHistogram format).

    ``min_mapq`` and ``read_quality`` (Drop-seq's name) are the same option:
    reads with a lower MAPQ are skipped; None (default) = 0, no MAPQ filter
    (Drop-seq's default is 10: pass ``read_quality=10`` to get it).
    Returns stats: ``reads_in == written + sum(dropped.values())``, where
    ``written`` is the reads counted in the histogram.
    """
    if min_mapq is not None and read_quality is not None and min_mapq != read_quality:
        raise ValueError(f"min_mapq={min_mapq} and read_quality={read_quality} are the same option; give one")
    mq = min_mapq if min_mapq is not None else (read_quality if read_quality is not None else 0)
    counts, stats = count_values(
        input, tag, skip_secondary=skip_secondary, skip_duplicates=filter_pcr_duplicates, min_mapq=mq,
        workers=workers, threads=threads, name="histogram", on_progress=on_progress,
    )
    header_line = None
    if header:
        header_line = "#" + "\t".join([
            f"INPUT={os.path.abspath(os.fspath(input)) if os.fspath(input) != '-' else '-'}",
            f"TAG={tag}",
            f"FILTER_PCR_DUPLICATES={str(filter_pcr_duplicates).lower()}",
            f"READ_QUALITY={mq}",
        ])
    n_values = write_histogram(counts, output, header_line)
    dropped = {k: stats[k] for k in COUNT_STATS[2:] if stats[k]}
    result: dict[str, Any] = {
        "reads_in": stats["records"],
        "written": stats["counted"],
        "dropped": dropped,
        "values": n_values,
        "output": os.fspath(output),
    }
    if stats["records"] != stats["counted"] + sum(dropped.values()):
        raise WorkflowError(f"reads do not add up: {result}")
    return result
