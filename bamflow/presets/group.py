"""UMI groups of reads, as ``umi_tools group`` does it (UMI-tools 1.1.6), and
``umi_tools count_tab``, with C kernels.

``group``: every read of a bundle is written with its group: ``UG`` (the
group's number, counted through the whole run in umi_tools' order; an
integer of the smallest unsigned type, as pysam writes it) and
``umi_group_tag`` (default ``BX``: the group's top UMI); read 2s (and, with
the ``output`` choices, unmapped reads, chimeric and unpaired pairs) are
written without a group. ``group_out`` writes umi_tools' table: read_id,
contig, position (5' end), gene (``NA`` unless per gene), umi, umi_count,
final_umi, final_umi_count, unique_id. The group numbers run through all
cells, so one worker does the grouping (decoding and compression still run
in their own processes).

``count_tab``: from ``read_id<TAB>gene`` lines (e.g. featureCounts' ``-R
CORE`` output, cut to those two columns), the UMI molecules per gene (and
cell, ``per_cell``: the read id ends ``_CELL_UMI``) of each run of lines
of one gene.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ..engine.errors import WorkflowError
from ..engine.publish import Publication, is_special
from .dedup import SUMMED, UmiOptions, books, gather, parts_folder, run_umi

log = logging.getLogger("bamflow")

GROUP_COLUMNS = ("read_id", "contig", "position", "gene", "umi", "umi_count", "final_umi", "final_umi_count", "unique_id")


def group(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    group_out: str | os.PathLike[str] | None = None,
    umi_group_tag: str = "BX",
    no_sort_output: bool = False,
    threads: int = 2,
    level: int | str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    command_line: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Group reads by UMI like ``umi_tools group --output-bam`` (``output``)
    and ``--group-out`` (``group_out``); at least one of them.

    ``options``: :class:`~bamflow.presets.dedup.UmiOptions` fields (umi_tools'
    option names). ``unmapped_reads``, ``chimeric_pairs`` and
    ``unpaired_reads`` may also be ``"output"`` (written without a group).
    Returns ``{"reads_in", "grouped", "singles", "written", "groups",
    "dropped", …}``; reads in = grouped + singles + dropped is checked.
    """
    from ..bam.options import parse_tag

    opts, rest = UmiOptions.take(options)
    if rest:
        raise TypeError(f"group() got unexpected keyword arguments: {', '.join(sorted(rest))}")
    if output is None and group_out is None:
        raise ValueError("give output (a BAM with UG and BX tags) and/or group_out (the group table)")
    umi_group_tag = parse_tag(umi_group_tag)
    input = os.fspath(input)
    out = os.fspath(output) if output is not None else None
    table = os.fspath(group_out) if group_out is not None else None
    parts = parts_folder(table) if table is not None and not is_special(table) else None
    if table is not None and parts is None:
        import tempfile

        parts = tempfile.mkdtemp(prefix="bamflow-group-")
    extra = dict(no_sort=no_sort_output, umi_group_tag=umi_group_tag)
    try:
        run = run_umi("group", input, opts, "group", output=out, workers=1, threads=threads, extra=extra,
                      one_worker="group: UG numbers run through all groups in umi_tools' order", level=level,
                      command_line=command_line, sort_output=not no_sort_output, parts_dir=parts,
                      start_method=start_method)
        stats: dict[str, Any] = {}

        def check(w: Any) -> None:
            reads_in, merged, per_worker = gather(w, run.jobs, SUMMED)
            run.jobs.require_tags(w, opts.tags())
            stats.update(reads_in=reads_in, grouped=merged.get("grouped", 0), singles=merged.get("singles", 0),
                         groups=merged.get("groups", 0), dropped=dict(sorted(merged.get("dropped", {}).items())),
                         written=run.jobs.flow.get("collected", 0),
                         table_rows=merged.get("tsv_rows", 0), workers=run.workers, sharding=run.sharding,
                         per_worker=per_worker)
            books(stats, "grouped+singles", "grouped")
            if out is not None and stats["written"] != stats["grouped"] + stats["singles"]:
                raise WorkflowError(f"{stats['written']} reads written, expected {stats['grouped'] + stats['singles']}")
            if table is not None and stats["table_rows"] != stats["grouped"]:
                raise WorkflowError(f"{stats['table_rows']} table rows, expected {stats['grouped']}")

        with Publication() as pub, ExitStack() as stack:
            run.w.run(timeout=timeout, on_progress=on_progress, check=check, publication=pub)
            if table is not None and parts is not None:
                f = sys.stdout.buffer if table == "-" else stack.enter_context(
                    open(table, "wb") if is_special(table) else pub.open(table, "wb"))
                f.write(("\t".join(GROUP_COLUMNS) + "\n").encode())
                for part in sorted(os.listdir(parts)):
                    with open(os.path.join(parts, part), "rb") as p:
                        shutil.copyfileobj(p, f, 1 << 20)
                f.flush()
            stack.close()
            pub.commit()
    finally:
        if parts is not None:
            shutil.rmtree(parts, ignore_errors=True)
    log.info("group %s: %s", input, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


def count_tab(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    method: str = "directional",
    edit_distance_threshold: int = 1,
    barcode_separator: str = "_",
    per_cell: bool = False,
) -> dict[str, Any]:
    """``umi_tools count_tab``: molecules per gene (and cell) from
    ``read_id<TAB>gene`` lines (``-``: stdin; ``.gz`` read and written
    gzip-compressed). Output: ``gene<TAB>count`` or, ``per_cell``,
    ``cell<TAB>gene<TAB>count``; a header line first, as umi_tools writes."""
    import gzip

    from ..kernels.umi import CountTab

    kernel = CountTab(method, edit_distance_threshold, barcode_separator, per_cell)
    input = os.fspath(input)
    output = os.fspath(output)
    with Publication() as pub, ExitStack() as stack:
        if input == "-":
            source: Any = sys.stdin.buffer
        else:
            with open(input, "rb") as raw:
                gz = raw.read(2) == b"\x1f\x8b"
            source = stack.enter_context(gzip.open(input, "rb") if gz else open(input, "rb"))
        f = sys.stdout.buffer if output == "-" else stack.enter_context(pub.open(output, "wb"))
        f.write(b"cell\tgene\tcount\n" if per_cell else b"gene\tcount\n")
        for chunk in iter(lambda: source.read(1 << 22), b""):
            f.write(kernel.feed(chunk))
        f.write(kernel.finish())
        f.flush()
        stack.close()
        pub.commit()
    return {"lines": kernel.lines, "reads_in": kernel.reads, "molecules": kernel.molecules, "output": output}


__all__ = ["group", "count_tab", "GROUP_COLUMNS"]
