"""UMI deduplication by alignment position, like ``umi_tools dedup``.

    decode ─▶ distribute by CB ─▶ dedup worker × N ─▶ collect (coordinate) ─▶ encode ─▶ out.bam
                  │   └─(no CB)─▶ unassigned worker ──────▲ (counts why; passes reads on in mark mode)
                  └────────────── header ──────────────────┘

Each worker sees whole cells (``by=CB``). It groups reads like umi_tools'
default (``get_bundles``): per cell, reference, position and strand, where
the position is the 5' end of the alignment including soft clips (forward:
``reference_start`` minus a leading soft clip; reverse: ``reference_end``
plus a trailing soft clip). With ``gene_tag`` (umi_tools ``--per-gene
--gene-tag``) it groups per cell, reference and gene instead. The UMIs of a
group are clustered (:mod:`bamflow.presets.umi`) and one read per UMI
cluster is kept: the best read of the cluster's top UMI, best = highest MAPQ,
ties = the first such read in input order (umi_tools picks among equal-MAPQ
reads at random).

Memory: with coordinate-sorted input (``@HD SO:coordinate``) a worker holds
the reads of a sliding window, as umi_tools does: a group is decided once
the reads have moved 1,000 bp past its position (or onto another
reference), and reads leave in input order as soon as every read before
them is decided. So a worker holds about the reads of its cells within
1 kb plus the span of the longest alignment. Unsorted input is held whole
(a worker's entire share) until the end.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Callable
from typing import Any

from ..bam.header import command_line as process_command_line
from ..bam.header import read_file_header
from ..bam.options import CollectOptions, DecodeOptions, DistributeOptions, EncodeOptions, parse_tag
from ..bam.stages import raw_writer
from ..bam.workflow import BamWorkflow, Scatter
from ..engine.errors import WorkflowError
from ..engine.workflow import merge_counts
from .umi import METHODS, cluster_umis

log = logging.getLogger("bamflow")

UMI_MODES = ("tag:XX", "read_name", "read_name_cell")
WINDOW = 1000  # bp, umi_tools' flush distance
SOFT_CLIP_THRESHOLD = 4  # umi_tools' --soft-clip-threshold default (used only for "spliced", which is off)
DEFAULT_SKIP = r"^(__|Unassigned)"  # umi_tools' --skip-tags-regex default


# -- how a read is identified ---------------------------------------------------------------


def parse_umi_mode(umi: str) -> tuple[str, str | None]:
    """ "tag:UB" → ("tag", "UB"); "read_name" / "read_name_cell" → (mode, None)."""
    if umi.startswith("tag:"):
        tag = parse_tag(umi[4:])
        return "tag", tag
    if umi in ("read_name", "read_name_cell"):
        return umi, None
    raise ValueError(f"umi must be 'tag:XX', 'read_name' (…_UMI) or 'read_name_cell' (…_CELL_UMI), not {umi!r}")


class ReadKeys:
    """Takes UMI, cell and gene of a read, or says why it cannot be used.

    The checks follow umi_tools' order: read 2 (ignored in single-end mode),
    unmapped, UMI, cell, gene (missing or empty), gene matching the skip regex.
    """

    def __init__(
        self,
        umi: str,
        cell_tag: str | None,
        per_cell: bool,
        gene_tag: str | None = None,
        skip_genes: str | None = DEFAULT_SKIP,
        need_mapped: bool = True,
    ) -> None:
        self.mode, self.umi_tag = parse_umi_mode(umi)
        self.cell_tag = cell_tag
        self.per_cell = per_cell
        self.gene_tag = gene_tag
        self.skip = re.compile(skip_genes) if skip_genes else None
        self.need_mapped = need_mapped

    def __call__(self, read: Any) -> tuple[str | None, Any, Any, Any]:
        """(reason, umi, cell, gene): reason None when the read can be used."""
        if read.is_read2:
            return "read2", None, None, None
        if self.need_mapped and read.is_unmapped:
            return "unmapped", None, None, None
        cell = None
        if self.mode == "tag":
            try:
                umi = read.get_tag(self.umi_tag)
            except KeyError:
                return "no_umi", None, None, None
            if not isinstance(umi, str) or not umi:
                return "no_umi", None, None, None
        else:
            parts = read.query_name.split("_")
            if len(parts) < (3 if self.mode == "read_name_cell" else 2) or not parts[-1]:
                return "no_umi", None, None, None
            umi = parts[-1]
            if self.mode == "read_name_cell" and self.per_cell:
                cell = parts[-2]
                if not cell:
                    return "no_cell", None, None, None
        if self.per_cell and cell is None:
            try:
                cell = read.get_tag(self.cell_tag)
            except KeyError:
                return "no_cell", None, None, None
        gene = None
        if self.gene_tag is not None:
            try:
                gene = read.get_tag(self.gene_tag)
            except KeyError:
                return "no_gene", None, None, None
            if gene == "":
                return "no_gene", None, None, None
            if self.skip is not None and self.skip.search(str(gene)):
                return "gene_filtered", None, None, None
        return None, umi, cell, gene


def read_position(read: Any) -> int:
    """umi_tools' get_read_position: the 5' end including soft clips."""
    cigar = read.cigartuples
    if read.is_reverse:
        pos = read.reference_end
        if cigar and cigar[-1][0] == 4:
            pos += cigar[-1][1]
        return pos
    pos = read.reference_start
    if cigar and cigar[0][0] == 4:
        pos -= cigar[0][1]
    return pos


# -- the worker -----------------------------------------------------------------------------


class _Group:
    """The reads of one (reference, position, strand, cell) or (reference, gene, cell)."""

    __slots__ = ("umis", "kept", "done")

    def __init__(self) -> None:
        self.umis: dict[str, list[Any]] = {}  # umi → [reads, best read]
        self.kept: set[int] = set()  # id() of the kept reads, once decided
        self.done = False

    def add(self, umi: str, read: Any) -> None:
        entry = self.umis.get(umi)
        if entry is None:
            self.umis[umi] = [1, read]
        else:
            entry[0] += 1
            if read.mapping_quality > entry[1].mapping_quality:  # ties: the first read stays
                entry[1] = read

    def decide(self, method: str) -> int:
        counts = {umi: entry[0] for umi, entry in self.umis.items()}
        groups = cluster_umis(counts, method)
        self.kept = {id(self.umis[group[0]][1]) for group in groups}
        self.done = True
        return len(groups)


def dedup_worker(
    input: str,
    output: str,
    *,
    method: str,
    umi: str,
    cell_tag: str,
    per_cell: bool,
    gene_tag: str | None,
    skip_genes: str | None,
    mark: bool,
) -> dict[str, Any]:
    """One worker: read its share (whole cells), write kept reads (all, in mark mode)."""
    import pysam

    keys = ReadKeys(umi, cell_tag, per_cell, gene_tag, skip_genes)
    dropped: dict[str, int] = {}
    reads_in = kept = duplicates = groups_n = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        sorted_input = reads.header.to_dict().get("HD", {}).get("SO") == "coordinate"
        out = raw_writer(output, reads.header)
        groups: dict[Any, _Group] = {}
        pending: deque[tuple[Any, _Group | None]] = deque()  # reads in input order

        def drain() -> None:
            nonlocal kept, duplicates
            while pending and (pending[0][1] is None or pending[0][1].done):
                read, group = pending.popleft()
                if group is None:  # not examined (mark mode only): passed on unchanged
                    out.write(read)
                elif id(read) in group.kept:
                    kept += 1
                    if mark:
                        read.flag &= ~0x400
                    out.write(read)
                else:
                    duplicates += 1
                    if mark:
                        read.flag |= 0x400
                        out.write(read)

        def flush(limit: int | None) -> None:
            nonlocal groups_n
            for key in [k for k in groups if limit is None or k[1] <= limit]:
                groups_n += groups.pop(key).decide(method)
            drain()

        last_tid, last_start, flushed_at = -1, -1, -1
        for read in reads:
            reads_in += 1
            reason, u, cell, gene = keys(read)
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                if mark:
                    pending.append((read, None))
                    if len(pending) == 1:
                        drain()
                continue
            tid, start = read.reference_id, read.reference_start
            if sorted_input:
                if tid < last_tid or (tid == last_tid and start < last_start):
                    raise WorkflowError(
                        f"the input's header says @HD SO:coordinate but read {read.query_name} "
                        f"({read.reference_name}:{start + 1}) is out of order; sort it or fix the header"
                    )
                if tid != last_tid:
                    flush(None)
                    flushed_at = start
                elif gene_tag is None and start > flushed_at + WINDOW:
                    flush(start - WINDOW)
                    flushed_at = start
                last_tid, last_start = tid, start
            key: tuple[Any, ...] = (tid, read_position(read), read.is_reverse, cell) if gene_tag is None else (tid, gene, cell)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
            group.add(u, read)
            pending.append((read, group))
        flush(None)
        out.close()
    if pending:
        raise WorkflowError(f"dedup worker: {len(pending)} reads left undecided")  # cannot happen
    return {
        "reads_in": reads_in,
        "written": out.records,
        "kept": kept,
        "duplicates": duplicates,
        "dropped": dropped,
        "molecules": groups_n,
    }


def unassigned_worker(input: str, output: str | None, *, umi: str, cell_tag: str, need_mapped: bool = True) -> dict[str, Any]:
    """Reads without the cell tag: say why each cannot be used (read2, unmapped,
    no_umi, else no_cell); pass them on unchanged when ``output`` is given."""
    import pysam

    keys = ReadKeys(umi, cell_tag, per_cell=True, need_mapped=need_mapped)
    dropped: dict[str, int] = {}
    reads_in = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        out = raw_writer(output, reads.header) if output is not None else None
        for read in reads:
            reads_in += 1
            reason = keys(read)[0] or "no_cell"  # it has no cell tag, whatever else it has
            dropped[reason] = dropped.get(reason, 0) + 1
            if out is not None:
                out.write(read)
        if out is not None:
            out.close()
    return {"reads_in": reads_in, "written": out.records if out is not None else None, "dropped": dropped}


# -- the workflow ---------------------------------------------------------------------------


def by_cell(cell_tag: str | None) -> DistributeOptions:
    """Whole cells per worker (reads without the cell tag to the unassigned
    worker), or everything to one worker when the cell does not come from a tag."""
    if cell_tag is None:
        return DistributeOptions()
    return DistributeOptions(by=cell_tag, missing="unassigned")


def gather(w: BamWorkflow, jobs: Scatter) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """(reads in, merged worker results, per-worker results) of a cell-sharded
    run, after checking that every stage passed on what it got."""
    flow = jobs.check_flow(w)
    per_worker = list(flow["per_worker"]) + ([w.result(jobs.unassigned)] if jobs.unassigned is not None else [])
    merged: dict[str, Any] = {}
    for r in per_worker:
        merged = merge_counts(merged, {k: v for k, v in r.items() if k != "written"})
    return flow["reads_in"], merged, per_worker


def _is_coordinate_sorted(path: str) -> bool:
    """Whether the input's header says @HD SO:coordinate (read without pysam;
    stdin: not known, so no)."""
    header = read_file_header(path)
    return header is not None and header.sort_order == "coordinate"


def dedup(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    method: str = "directional",
    umi: str = "tag:UB",
    cell_tag: str = "CB",
    per_cell: bool = True,
    gene_tag: str | None = None,
    skip_genes: str | None = DEFAULT_SKIP,
    mark: bool = False,
    workers: int = 2,
    threads: int = 2,
    level: int | str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    command_line: str | None = None,
) -> dict[str, Any]:
    """Deduplicate ``input`` by UMI and alignment position like ``umi_tools dedup``.

    ``umi``: ``"tag:UB"`` (a tag), ``"read_name"`` (name ends ``_UMI``; cell,
    if ``per_cell``, from ``cell_tag``) or ``"read_name_cell"`` (name ends
    ``_CELL_UMI``, umi_tools' ``read_id`` with ``--per-cell``). ``per_cell``
    groups per cell (umi_tools ``--per-cell``); ``gene_tag`` groups per gene
    instead of per position (``--per-gene --gene-tag``; genes matching
    ``skip_genes`` are dropped). ``mark``: write every read, setting 0x400 on
    the duplicates (and clearing it on the kept reads) instead of removing them.

    Reads are sharded by cell over ``workers`` processes when the cell comes
    from a tag; otherwise (``per_cell=False`` or ``read_name_cell``) one worker
    does all the grouping. Returns ``{"reads_in", "kept", "written",
    "dropped": {reason: n}, "molecules", "per_worker", "mark"}``; in mark mode
    ``dropped`` still names what remove mode would drop, all reads are written.
    Raises WorkflowError if reads in ≠ kept + dropped.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    mode, _ = parse_umi_mode(umi)
    input, output = os.fspath(input), os.fspath(output)
    shard_tag = cell_tag if per_cell and mode != "read_name_cell" else None
    w = BamWorkflow("dedup", start_method=start_method)
    jobs = w.scatter(
        input,
        dedup_worker,
        workers=workers if shard_tag is not None else 1,
        distribute=by_cell(shard_tag),
        worker_kwargs=dict(method=method, umi=umi, cell_tag=cell_tag, per_cell=per_cell, gene_tag=gene_tag,
                           skip_genes=skip_genes, mark=mark),
        decode=DecodeOptions(threads),
        output=output,
        collect=CollectOptions("coordinate" if _is_coordinate_sorted(input) else "any"),
        encode=EncodeOptions(**({} if level is None else {"level": level}), threads=threads,
                             command_line=command_line or process_command_line()),
        unassigned_worker=unassigned_worker if shard_tag is not None else None,
        unassigned_kwargs=dict(umi=umi, cell_tag=cell_tag),
        pass_unassigned=mark,
    )
    stats: dict[str, Any] = {}

    def check(w: BamWorkflow) -> None:
        """The books, before the output appears."""
        reads_in, merged, per_worker = gather(w, jobs)
        dropped = dict(merged.get("dropped", {}))
        if merged.get("duplicates"):
            dropped["duplicate"] = merged["duplicates"]
        kept = merged.get("kept", 0)
        written = w.result(jobs.collector)["records"]
        encoded = w.result(jobs.writer)["records"]
        stats.update(
            reads_in=reads_in,
            kept=kept,
            written=written,
            dropped=dict(sorted(dropped.items())),
            molecules=merged.get("molecules", 0),
            mark=mark,
            method=method,
            per_worker=per_worker,
        )
        if reads_in != kept + sum(dropped.values()):
            raise WorkflowError(f"reads do not add up: {reads_in} in, {kept} kept, dropped {dropped}")
        if not written == encoded == (reads_in if mark else kept):
            raise WorkflowError(f"{written} reads collected, {encoded} written, expected {reads_in if mark else kept}")

    w.run(timeout=timeout, on_progress=on_progress, check=check)
    log.info("dedup %s → %s: %s", input, output, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


__all__ = ["dedup", "ReadKeys", "read_position", "UMI_MODES"]
