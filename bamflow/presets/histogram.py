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

Pipeline: a :meth:`~bamflow.bam.workflow.BamWorkflow.scatter` of ``workers``
counting jobs (kernel :class:`~bamflow.kernels.presets.TagCounter`: values
counted in a C hash table) → counts merged here; the histogram is published
when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..bam.options import DecodeOptions, DistributeOptions, parse_tag
from ..bam.workflow import BamWorkflow, refuse_overwrite
from ..engine import progress
from ..engine.errors import WorkflowError
from ..engine.files import open_for_reading
from ..engine.publish import Publication
from ..kernels.presets import COUNT_STATS, TagCounter


def count_worker(
    input: str, output: None, tag: str, skip_secondary: bool, skip_duplicates: bool, min_mapq: int
) -> dict[str, Any]:
    """A job: count the values of ``tag`` in a raw BAM stream (kernel TagCounter)."""
    fd = open_for_reading(input)
    try:
        table, stats, seen = TagCounter(
            fd, tag, skip_secondary=skip_secondary, skip_duplicates=skip_duplicates, min_mapq=min_mapq,
            progress=progress.current().slot,
        ).run()
    finally:
        os.close(fd)
    return {"reads_in": stats["records"], "written": None, "counts": table.counts(), "stats": stats, "tags_seen": seen}


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
    timeout: float | None = None,
) -> tuple[dict[bytes, int], dict[str, int]]:
    """Count reads per value of ``tag``: (value → reads, stats with COUNT_STATS keys)."""
    tag = parse_tag(tag)
    w = BamWorkflow(name)
    jobs = w.scatter(
        os.fspath(input),
        count_worker,
        workers=workers,
        distribute=DistributeOptions(),
        decode=DecodeOptions(threads),
        worker_kwargs=dict(tag=tag, skip_secondary=skip_secondary, skip_duplicates=skip_duplicates, min_mapq=min_mapq),
    )
    def check(w: BamWorkflow) -> None:
        jobs.check_flow(w)
        jobs.require_tags(w, [tag])

    w.run(on_progress=on_progress, check=check, timeout=timeout)
    counts: dict[bytes, int] = {}
    stats = dict.fromkeys(COUNT_STATS, 0)
    for result in w.result(jobs.workers):
        for key, n in result["stats"].items():
            stats[key] += n
        if not counts:
            counts = result["counts"]
        else:
            for value, n in result["counts"].items():
                counts[value] = counts.get(value, 0) + n
    skipped = sum(stats[k] for k in COUNT_STATS[2:])
    if stats["records"] != stats["counted"] + skipped or stats["counted"] != sum(counts.values()):
        raise WorkflowError(f"reads do not add up: {stats}, {sum(counts.values())} in the histogram")
    return counts, stats


def write_histogram(
    pub: Publication, counts: dict[bytes, int], output: str | os.PathLike[str], header: list[str] | None
) -> int:
    """``count<TAB>value`` lines, by count descending then value, after the
    ``header`` fields (a comment line); into ``pub`` (``.gz``: gzip; ``-``:
    stdout). Returns the lines written."""
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    pub.write_tsv(output, header, ((n, value) for value, n in rows))
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
    timeout: float | None = None,
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
    refuse_overwrite([input], output)
    counts, stats = count_values(
        input, tag, skip_secondary=skip_secondary, skip_duplicates=filter_pcr_duplicates, min_mapq=mq,
        workers=workers, threads=threads, name="histogram", on_progress=on_progress, timeout=timeout,
    )
    fields = None
    if header:
        fields = [
            f"#INPUT={os.path.abspath(os.fspath(input)) if os.fspath(input) != '-' else '-'}",
            f"TAG={tag}",
            f"FILTER_PCR_DUPLICATES={str(filter_pcr_duplicates).lower()}",
            f"READ_QUALITY={mq}",
        ]
    dropped = {k: stats[k] for k in COUNT_STATS[2:] if stats[k]}
    result: dict[str, Any] = {
        "reads_in": stats["records"],
        "written": stats["counted"],
        "dropped": dropped,
        "output": os.fspath(output),
    }
    if stats["records"] != stats["counted"] + sum(dropped.values()):
        raise WorkflowError(f"reads do not add up: {result}")
    with Publication() as pub:
        result["values"] = write_histogram(pub, counts, output, fields)
        pub.commit()
    return result
