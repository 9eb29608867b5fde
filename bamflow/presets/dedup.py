"""UMI deduplication by alignment position, as ``umi_tools dedup`` does it
(UMI-tools 1.1.6), on bamflow's engine with C kernels.

    decode ─▶ distribute by CB ─▶ UMI kernel × N ─▶ collect (coordinate) ─▶ encode ─▶ out.bam
                  │   └─(no CB)─▶ unassigned kernel ─────▲ (counts why; passes reads on in mark mode)
                  └────────────── header ─────────────────┘

or, for an indexed coordinate-sorted file (by region, see :func:`run_umi`)::

    read partition i (whole references) ─▶ UMI kernel i ─▶ encode i  (i < N) ─▶ join in order ─▶ out.bam

Each worker runs :class:`bamflow.kernels.umi.UmiKernel` on its share (whole
cells, or whole references): umi_tools' bundles (``get_bundles``: cell, reference, 5' position
including soft clips, strand, …; or gene), its five clustering methods and
its choice of the representative read, in C. This module also holds what
``count`` and ``group`` share: :class:`UmiOptions` (umi_tools' options,
checked as umi_tools checks them), the worker and the workflow
(:func:`run_umi`).

**Which reads are kept.** umi_tools keeps the highest-MAPQ read of each UMI
group's top UMI and draws at random among reads of equal MAPQ (Python's
``random``, seeded by ``--random-seed``). With ``random_seed`` bamflow makes
the same Mersenne Twister draws in the same order, so it keeps the very
reads umi_tools keeps and writes them in umi_tools' order: the output is
equal line for line apart from bamflow's @PG. The draw order runs through
all cells, so this takes one worker (see docs/presets/dedup_count.md for
why more cannot be as fast). Without ``random_seed`` the first read in input
order is kept among equal MAPQ, and cells are sharded over the workers.

**Memory.** With coordinate-sorted input (``@HD SO:coordinate``) a worker
holds a bundle's best reads until umi_tools would yield the bundle (a gap of
more than 1 kb between reads, or the next reference; per gene: the next
reference), and a kept read until nothing before it in the output order can
still come. Unsorted input is held whole (a worker's share) until its end.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..bam.header import command_line as process_command_line
from ..bam.header import read_file_header
from ..bam.options import CollectOptions, DecodeOptions, DistributeOptions, EncodeOptions, parse_tag
from ..bam.partition import plan_regions
from ..bam.workflow import BamWorkflow, Regions, Scatter
from ..engine import progress
from ..engine.errors import WorkflowError
from ..engine.files import open_for_reading, open_for_writing
from ..engine.publish import Publication, is_special
from ..engine.workflow import merge_counts
from .umi import METHODS

log = logging.getLogger("bamflow")

UMI_MODES = ("tag:XX", "read_name", "read_name_cell")  # the old spelling of the UMI's place (``umi=``)
EXTRACT_METHODS = ("tag", "read_id", "umis")
DEFAULT_SKIP = r"^(__|Unassigned)"  # umi_tools' --skip-tags-regex default
PAIR_CHOICES = ("discard", "use", "output")
DETECTION_METHODS = ("NH", "X0", "XT")


# -- umi_tools' options ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UmiOptions:
    """umi_tools' options shared by dedup, count and group, under its names
    (``--extract-umi-method`` is ``extract_umi_method``, …), checked as
    umi_tools checks them. Defaults are umi_tools' except where bamflow's
    presets differ on purpose: the UMI and cell come from the ``UB`` and
    ``CB`` tags, per cell, and the cell barcode is not cut at ``-``
    (``cell_tag_split=None``; umi_tools: ``-``). ``cell_from_tag`` (bamflow's):
    with the UMI in the read name, the cell from ``cell_tag`` all the same
    (umi_tools takes it from the read name)."""

    method: str = "directional"
    extract_umi_method: str = "tag"
    umi_tag: str = "UB"
    umi_separator: str = "_"
    umi_tag_split: str | None = None
    umi_tag_delimiter: str | None = None
    cell_tag: str = "CB"
    cell_tag_split: str | None = None
    cell_tag_delimiter: str | None = None
    per_cell: bool = True
    per_gene: bool = False
    gene_tag: str | None = None
    assigned_status_tag: str | None = None
    skip_tags_regex: str | None = DEFAULT_SKIP
    per_contig: bool = False
    edit_distance_threshold: int = 1
    spliced_is_unique: bool = False
    soft_clip_threshold: float = 4
    read_length: bool = False
    mapping_quality: int = 0
    ignore_umi: bool = False
    ignore_tlen: bool = False
    chrom: str | None = None
    subset: float | None = None
    paired: bool = False
    unmapped_reads: str = "discard"
    chimeric_pairs: str = "use"
    unpaired_reads: str = "use"
    buffer_whole_contig: bool = False
    multimapping_detection_method: str | None = None
    random_seed: int | None = None
    cell_from_tag: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.extract_umi_method not in EXTRACT_METHODS:
            raise ValueError(f"extract_umi_method must be one of {', '.join(EXTRACT_METHODS)}, "
                             f"not {self.extract_umi_method!r}")
        for name in ("umi_tag", "cell_tag", "gene_tag", "assigned_status_tag"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_tag(value))
        for name in ("umi_separator", "umi_tag_split", "umi_tag_delimiter", "cell_tag_split", "cell_tag_delimiter"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty")
        for name in ("unmapped_reads", "chimeric_pairs", "unpaired_reads"):
            if getattr(self, name) not in PAIR_CHOICES:
                raise ValueError(f"{name} must be one of {', '.join(PAIR_CHOICES)}, not {getattr(self, name)!r}")
        # umi_tools' validateSamOptions
        if self.gene_tag is not None and not self.per_gene:
            object.__setattr__(self, "per_gene", True)  # umi_tools: "need to use --per-gene with --gene_tag"
        if self.per_gene and self.gene_tag is not None and self.per_contig:
            raise ValueError("give per_contig or gene_tag, not both (umi_tools: --per-contig OR --gene-tag)")
        if self.per_gene and not self.per_contig and self.gene_tag is None:
            raise ValueError("per_gene needs gene_tag or per_contig (umi_tools: --per-gene needs --gene-tag or --per-contig)")
        if self.per_contig and not self.per_gene:
            object.__setattr__(self, "per_gene", True)
        if self.skip_tags_regex:
            import re

            try:
                re.compile(self.skip_tags_regex)
            except re.error as e:
                raise ValueError(f"skip_tags_regex {self.skip_tags_regex!r} is not a regular expression: {e}") from None
        if self.edit_distance_threshold < 0:
            raise ValueError(f"edit_distance_threshold must be >= 0, not {self.edit_distance_threshold}")
        if self.mapping_quality < 0:
            raise ValueError(f"mapping_quality must be >= 0, not {self.mapping_quality}")
        if self.subset is not None and not 0 <= self.subset <= 1:
            raise ValueError(f"subset must be between 0 and 1, not {self.subset}")
        if self.multimapping_detection_method not in (None, *DETECTION_METHODS):
            raise ValueError(f"multimapping_detection_method must be one of {', '.join(DETECTION_METHODS)}, "
                             f"not {self.multimapping_detection_method!r}")
        if self.random_seed is not None and (isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)):
            raise ValueError(f"random_seed must be an integer, not {self.random_seed!r}")

    @classmethod
    def take(cls, kwargs: dict[str, Any]) -> tuple[UmiOptions, dict[str, Any]]:
        """The options among ``kwargs`` (the old spellings ``umi=`` and
        ``skip_genes=`` too); returns them and the other keyword arguments."""
        names = {f.name for f in fields(cls)}
        rest = dict(kwargs)
        given = {name: rest.pop(name) for name in list(rest) if name in names}
        if "skip_genes" in rest:
            given.setdefault("skip_tags_regex", rest.pop("skip_genes"))
        umi = rest.pop("umi", None)
        if umi is not None:
            given.update(_old_umi_spelling(umi, given))
        return cls(**given), rest

    def needs_one_worker(self, mode: str) -> str | None:
        """Why the reads must all go to one worker (None: cells can be sharded)."""
        if not self.per_cell or not (self.extract_umi_method == "tag" or self.cell_from_tag):
            return "the cell does not come from a tag"
        if self.cell_tag_split is not None or self.cell_tag_delimiter is not None:
            return "cells are cut or joined (cell_tag_split, cell_tag_delimiter)"
        if self.paired:
            return "paired: mates must meet"
        if self.random_seed is not None and (mode == "dedup" or self.subset):
            return "random_seed: umi_tools' draws run through all cells in input order"
        return None

    def needs_whole_file(self, mode: str) -> str | None:
        """Why the reads cannot be split by reference either (None: each worker
        may take whole references, see :func:`run_umi`)."""
        if self.paired:
            return "paired: a mate may be on another reference"
        if self.random_seed is not None and (mode == "dedup" or self.subset):
            return "random_seed: umi_tools' draws run through all references in input order"
        return None

    def kernel_config(self, mode: str) -> dict[str, Any]:
        """The options as :class:`bamflow.kernels.umi.UmiKernel` takes them."""
        return dict(
            mode=mode,
            method=self.method,
            threshold=self.edit_distance_threshold,
            umi_method=self.extract_umi_method,
            umi_tag=self.umi_tag,
            umi_sep=self.umi_separator,
            umi_tag_split=self.umi_tag_split,
            umi_tag_delim=self.umi_tag_delimiter,
            cell_tag=self.cell_tag,
            cell_tag_split=self.cell_tag_split,
            cell_tag_delim=self.cell_tag_delimiter,
            per_cell=self.per_cell,
            cell_from_tag=self.cell_from_tag,
            per_gene=self.per_gene,
            per_contig=self.per_contig,
            gene_tag=self.gene_tag,
            assigned_tag=self.assigned_status_tag or self.gene_tag,
            skip_regex=self.skip_tags_regex,
            paired=self.paired,
            unmapped_reads=self.unmapped_reads,
            chimeric_pairs=self.chimeric_pairs,
            unpaired_reads=self.unpaired_reads,
            ignore_umi=self.ignore_umi,
            ignore_tlen=self.ignore_tlen,
            spliced=self.spliced_is_unique,
            soft_clip_threshold=float(self.soft_clip_threshold),
            read_length=self.read_length,
            whole_contig=self.buffer_whole_contig,
            chrom=self.chrom,
            subset=self.subset,
            seed_state=random.Random(self.random_seed).getstate() if self.random_seed is not None else None,
            mapping_quality=self.mapping_quality,
            detection_method=self.multimapping_detection_method,
        )

    def tags(self) -> list[str]:
        """The tags every run keys on (each must be on some read)."""
        tags = []
        if self.extract_umi_method == "tag" and not self.ignore_umi:
            tags.append(self.umi_tag)
        if self.per_cell and (self.extract_umi_method == "tag" or self.cell_from_tag):
            tags.append(self.cell_tag)
        if self.per_gene and not self.per_contig and self.gene_tag is not None:
            tags.append(self.gene_tag)
            if self.assigned_status_tag:
                tags.append(self.assigned_status_tag)
        return list(dict.fromkeys(tags))


def _old_umi_spelling(umi: str, given: dict[str, Any]) -> dict[str, Any]:
    """``umi="tag:UB"`` / ``"read_name"`` / ``"read_name_cell"`` (bamflow's first spelling)."""
    if umi.startswith("tag:"):
        return {"extract_umi_method": "tag", "umi_tag": parse_tag(umi[4:])}
    if umi == "read_name":  # the UMI from the name; per cell, the cell from cell_tag
        return {"extract_umi_method": "read_id", "cell_from_tag": True}
    if umi == "read_name_cell":
        return {"extract_umi_method": "read_id", "per_cell": given.get("per_cell", True)}
    raise ValueError(f"umi must be 'tag:XX', 'read_name' (…_UMI) or 'read_name_cell' (…_CELL_UMI), not {umi!r}")


def read_position(read: Any) -> int:
    """umi_tools' get_read_position of a pysam read: the 5' end including soft clips."""
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


# -- the worker ------------------------------------------------------------------------------------


def umi_worker(input: str, output: str | None, *, config: dict[str, Any], parts: str | None = None) -> dict[str, Any]:
    """One worker: the UMI kernel over its share (raw BAM stream in, raw BAM
    stream out); with ``parts`` (a folder) it writes its part of the group
    table there, named after its input."""
    from ..kernels.umi import UmiKernel

    tsv = os.path.join(parts, os.path.basename(input) + ".tsv") if parts is not None and not config.get("classify") else None
    in_fd = open_for_reading(input)
    out_fd = tsv_fd = -1
    try:
        if output is not None:
            out_fd = open_for_writing(output)
        if tsv is not None:
            tsv_fd = os.open(tsv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        result = UmiKernel(in_fd, out_fd, config, tsv_fd=tsv_fd, progress=progress.current().slot).run()
    finally:
        for fd in (in_fd, out_fd, tsv_fd):
            if fd >= 0:
                os.close(fd)
    if output is None:
        result["written"] = None
    return result


# -- the workflow ----------------------------------------------------------------------------------


def by_cell(cell_tag: str | None) -> DistributeOptions:
    """Whole cells per worker (reads without the cell tag to the unassigned
    worker), or everything to one worker when the cell does not come from a tag."""
    if cell_tag is None:
        return DistributeOptions()
    return DistributeOptions(by=cell_tag, missing="unassigned")


SUMMED = ("reads_in", "kept", "mates", "singles", "grouped", "counted", "molecules", "groups", "dropped", "positions",
          "total_umis", "draws", "overwritten", "tsv_rows")
"""The UMI kernel's counts that add up over workers (the rest are per-worker arrays)."""


def gather(w: BamWorkflow, jobs: Scatter | Regions, keys: Sequence[str] | None = None
           ) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """(reads in, merged worker results, per-worker results) of a sharded run,
    after checking that every stage passed on what it got; ``keys``: the
    fields to add up (default: all but ``written``)."""
    flow = jobs.check_flow(w)
    per_worker = list(flow["per_worker"]) + ([w.result(jobs.unassigned)] if jobs.unassigned is not None else [])
    merged: dict[str, Any] = {}
    for r in per_worker:
        merged = merge_counts(merged, {k: v for k, v in r.items() if (k in keys if keys is not None else k != "written")})
    return flow["reads_in"], merged, per_worker


def is_coordinate_sorted(path: str) -> bool:
    """Whether the input's header says @HD SO:coordinate (stdin: not known, so no)."""
    header = read_file_header(path)
    return header is not None and header.sort_order == "coordinate"


@dataclass
class UmiRun:
    """A run of the UMI kernel over a workflow (what :func:`run_umi` built):
    ``sharding`` is ``"region"`` (whole references per worker, each read
    from its own part of the file), ``"cell"`` (whole cells per worker,
    dealt by one distributor) or ``"one"`` (one worker); ``why`` says why
    not by region (or not sharded at all)."""

    w: BamWorkflow
    jobs: Scatter | Regions
    workers: int
    one_worker_because: str | None
    sharding: str = "one"
    why: str | None = None


def run_umi(
    name: str,
    input: str,
    opts: UmiOptions,
    mode: str,
    *,
    output: str | None,
    workers: int,
    threads: int,
    extra: dict[str, Any] | None = None,
    one_worker: str | None = None,
    level: int | str | None = None,
    command_line: str | None = None,
    sort_output: bool = True,
    pass_unassigned: bool = False,
    parts_dir: str | None = None,
    start_method: str | None = None,
) -> UmiRun:
    """Assemble the UMI kernels for ``mode`` (dedup, count, group).

    By region when it can be: an indexed coordinate-sorted file is cut into
    at most ``workers`` parts of whole references (so that no bundle spans
    two workers), each read by its own job straight into its own kernel
    (:meth:`BamWorkflow.regions`). Else sharded by cell when umi_tools'
    semantics allow it, else one worker. ``one_worker``,
    :meth:`UmiOptions.needs_whole_file` and
    :func:`~bamflow.bam.partition.plan_regions` say why not by region,
    :meth:`UmiOptions.needs_one_worker` why not by cell; the log says which.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    if opts.chrom is not None:
        header = read_file_header(input)
        if header is not None and opts.chrom not in [n for n, _ in header.references]:
            raise ValueError(f"chrom {opts.chrom!r} is not a reference of {input}")
    config = {**opts.kernel_config(mode), **(extra or {})}
    collect = CollectOptions("coordinate" if output is not None and sort_output and is_coordinate_sorted(input)
                             else "any")
    encode = EncodeOptions(**({} if level is None else {"level": level}), threads=threads,
                           command_line=command_line or process_command_line())
    not_by_region = one_worker or opts.needs_whole_file(mode)
    if not_by_region is None and workers > 1:
        plan, not_by_region = plan_regions(input, workers)
        if plan is not None:
            n = len(plan.partitions)
            log.info("%s: %d workers by region (reference numbers: reads %s)", name, n, ", ".join(
                f"{lo}{'' if hi == lo + 1 else f'-{hi - 1}'}: {reads:,}"
                for (lo, hi), reads in zip(plan.refs, plan.records, strict=True)))
            # each reader inflates in its own process; helper threads only when ``threads`` leaves
            # cores beyond the N readers (with threads <= N they slowed a 2-core run by 10%)
            w = BamWorkflow(name, start_method=start_method)
            jobs: Scatter | Regions = w.regions(
                plan, umi_worker, worker_kwargs=dict(config={**config, "note_tags": True}, parts=parts_dir),
                threads=threads // n if threads > n else 0, output=output, encode=encode,
                spool_folder=_spool_folder(output))
            return UmiRun(w, jobs, n, None, "region", None)
    why = one_worker or opts.needs_one_worker(mode)
    sharded = why is None and workers > 1
    n = workers if sharded else 1
    if why is not None and workers > 1:
        log.info("%s: one worker (%s; not by region: %s)", name, why, not_by_region)
    elif sharded:
        log.info("%s: %d workers by cell (not by region: %s)", name, n, not_by_region)
    w = BamWorkflow(name, start_method=start_method)
    jobs = w.scatter(
        input,
        umi_worker,
        workers=n,
        distribute=by_cell(opts.cell_tag if sharded else None),
        worker_kwargs=dict(config=config, parts=parts_dir),
        decode=DecodeOptions(threads),
        output=output,
        collect=collect,
        encode=encode,
        unassigned_worker=umi_worker if sharded else None,
        unassigned_kwargs=dict(config={**config, "classify": True}),
        pass_unassigned=pass_unassigned,
    )
    return UmiRun(w, jobs, n, why, "cell" if sharded else "one", why or not_by_region)


def _spool_folder(output: str | None) -> str | None:
    """Where a region run's later parts wait, compressed: beside the output
    (where its data are meant to go), else the temporary folder."""
    if output is None or is_special(output):
        return None
    folder = os.path.dirname(os.path.abspath(output))
    return folder if os.path.isdir(folder) else None


def books(stats: dict[str, Any], done: str, what: str) -> None:
    """reads in = ``done`` (e.g. kept + mates) + dropped, or WorkflowError."""
    parts = [stats.get(k, 0) for k in done.split("+")]
    if stats["reads_in"] != sum(parts) + sum(stats["dropped"].values()):
        raise WorkflowError(f"reads do not add up: {stats['reads_in']} in, {sum(parts)} {what}, "
                            f"dropped {stats['dropped']}")


# -- dedup ----------------------------------------------------------------------------------------


def dedup(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    mark: bool = False,
    umi_whitelist: str | os.PathLike[str] | Sequence[str] | None = None,
    output_stats: str | os.PathLike[str] | None = None,
    no_sort_output: bool = False,
    workers: int = 2,
    threads: int = 2,
    level: int | str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    command_line: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Deduplicate ``input`` by UMI and alignment position like ``umi_tools dedup``.

    ``options``: :class:`UmiOptions` fields (umi_tools' option names:
    ``method``, ``extract_umi_method``, ``umi_tag``, ``cell_tag``,
    ``per_cell``, ``per_gene``/``gene_tag``, ``paired``, ``random_seed``, …;
    the old spellings ``umi="tag:UB" | "read_name" | "read_name_cell"`` and
    ``skip_genes=`` still work). ``mark``: write every read, 0x400 set on the
    duplicates and cleared on the kept reads (bamflow's; umi_tools removes).
    ``umi_whitelist``: a file (first column) or list of UMIs; UMI groups whose
    top UMI is not listed are dropped (umi_tools' ``--umi-whitelist``).
    ``output_stats``: a prefix; writes umi_tools' ``_edit_distance.tsv``,
    ``_per_umi_per_position.tsv`` and ``_per_umi.tsv``. ``no_sort_output``:
    write in umi_tools' bundle order instead of coordinate order.

    Returns ``{"reads_in", "kept", "mates", "written", "dropped": {reason: n},
    "molecules", "workers", "per_worker", …}``; raises WorkflowError unless
    reads in = kept + mates + dropped (mark mode: every read written).
    """
    opts, rest = UmiOptions.take(options)
    if rest:
        raise TypeError(f"dedup() got unexpected keyword arguments: {', '.join(sorted(rest))}")
    if output_stats is not None and opts.ignore_umi:
        raise ValueError("output_stats and ignore_umi cannot be used together (as in umi_tools)")
    if mark and (opts.paired or no_sort_output):
        raise ValueError("mark is not offered with paired or no_sort_output")
    input, output = os.fspath(input), os.fspath(output)
    extra: dict[str, Any] = dict(mark=mark, no_sort=no_sort_output, output_stats=output_stats is not None)
    if umi_whitelist is not None:
        extra["whitelist"] = read_whitelist(umi_whitelist)
    one = "output_stats: one table in umi_tools' bundle order" if output_stats is not None else None
    if no_sort_output:
        one = "no_sort_output: umi_tools' bundle order"
    run = run_umi("dedup", input, opts, "dedup", output=output, workers=workers, threads=threads, extra=extra,
                  one_worker=one, level=level, command_line=command_line, sort_output=not no_sort_output,
                  pass_unassigned=mark, start_method=start_method)
    stats: dict[str, Any] = {}

    def check(w: BamWorkflow) -> None:
        """The books, before the output appears."""
        reads_in, merged, per_worker = gather(w, run.jobs, SUMMED)
        run.jobs.require_tags(w, opts.tags())
        written = run.jobs.flow["collected"]  # (after gather: the books checked it)
        stats.update(
            reads_in=reads_in,
            kept=merged.get("kept", 0),
            mates=merged.get("mates", 0),
            written=written,
            dropped=dict(sorted(merged.get("dropped", {}).items())),
            molecules=merged.get("molecules", 0),
            positions=merged.get("positions", 0),
            mark=mark,
            method=opts.method,
            workers=run.workers,
            sharding=run.sharding,
            per_worker=[{k: v for k, v in r.items() if k != "stats"} for r in per_worker],
        )
        books(stats, "kept+mates", "kept")
        expected = reads_in if mark else stats["kept"] + stats["mates"]
        if written != expected:
            raise WorkflowError(f"{written} reads written, expected {expected}")

    with Publication() as pub:
        run.w.run(timeout=timeout, on_progress=on_progress, check=check, publication=pub)
        if output_stats is not None:
            (result,) = [r for r in run.w.result(run.jobs.workers)]
            stats["outputs"] = write_dedup_stats(pub, os.fspath(output_stats), result["stats"], opts)
        pub.commit()
    log.info("dedup %s → %s: %s", input, output, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


def read_whitelist(whitelist: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """umi_tools' getUserDefinedBarcodes: the first tab-separated field of each
    line not starting with ``#`` (gzip too); or the given UMIs."""
    if isinstance(whitelist, (str, os.PathLike)):
        import gzip

        path = os.fspath(whitelist)
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rt") if gz else open(path)) as f:
            return [line.strip().split("\t")[0] for line in f if not line.startswith("#")]
    return [str(u) for u in whitelist]


# -- --output-stats ---------------------------------------------------------------------------------


def write_dedup_stats(pub: Publication, prefix: str, st: dict[str, Any], opts: UmiOptions) -> list[str]:
    """umi_tools dedup's three ``--output-stats`` tables from the kernel's arrays.

    The null distributions draw UMIs (numpy's legacy RandomState, seeded as
    umi_tools seeds it) from the UMI frequencies of every mapped read 1,
    ``len(bundle)`` before and after deduplication for each bundle in
    umi_tools' order, 100,000 at a time as its random_read_generator does.
    """
    import numpy as np

    umis: list[bytes] = st["umis"]
    freq = np.asarray(st["frequencies"], dtype=np.float64)
    pre = np.frombuffer(st["pre"], dtype=np.int64).reshape(-1, 2)  # (UMI id, reads) per bundle and UMI
    post = np.frombuffer(st["post"], dtype=np.int64).reshape(-1, 2)  # per kept group
    pre_umi, pre_count, post_umi, post_count = pre[:, 0], pre[:, 1], post[:, 0], post[:, 1]
    sizes = np.frombuffer(st["sizes"], dtype=np.int64).reshape(-1, 2)
    means = np.frombuffer(st["mean_distances"], dtype=np.float64).reshape(-1, 2)
    outputs = []

    # _per_umi_per_position.tsv: how many (position, UMI) have each count, before and after
    pre_tally = np.bincount(pre_count) if len(pre_count) else np.zeros(0, dtype=np.int64)
    post_tally = np.bincount(post_count) if len(post_count) else np.zeros(0, dtype=np.int64)
    counts_index = sorted(set(np.flatnonzero(pre_tally).tolist()) | set(np.flatnonzero(post_tally).tolist()))
    rows = [(c, int(pre_tally[c]) if c < len(pre_tally) else 0, int(post_tally[c]) if c < len(post_tally) else 0)
            for c in counts_index]
    outputs.append(pub.write_tsv(prefix + "_per_umi_per_position.tsv", ("counts", "instances_pre", "instances_post"), rows))

    # _per_umi.tsv: per UMI, median / number / sum of its counts over positions, before and after
    def aggregate(ids: Any, counts: Any) -> dict[int, tuple[int, int, int]]:
        """UMI id → (median count, positions, total), as pandas' groupby then astype(int)."""
        if not len(ids):
            return {}
        order = np.lexsort((counts, ids))
        ids_s, counts_s = ids[order], counts[order]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ids_s)) + 1])
        sizes = np.diff(np.concatenate([starts, [len(ids_s)]]))
        medians = (counts_s[starts + (sizes - 1) // 2] + counts_s[starts + sizes // 2]) / 2  # sorted within a UMI
        totals = np.add.reduceat(counts_s, starts)
        return {int(u): (int(m), int(n), int(t)) for u, m, n, t in zip(ids_s[starts], medians, sizes, totals, strict=True)}

    pre, post = aggregate(pre_umi, pre_count), aggregate(post_umi, post_count)
    table = sorted((umis[i], pre[i], post.get(i, (0, 0, 0))) for i in pre)
    outputs.append(pub.write_tsv(
        prefix + "_per_umi.tsv",
        ("UMI", "median_counts_pre", "times_observed_pre", "total_counts_pre", "median_counts_post",
         "times_observed_post", "total_counts_post"),
        ((u.decode("utf-8", "surrogateescape"), *a, *b) for u, a, b in table),
    ))

    # _edit_distance.tsv: binned mean distances, observed and null
    rng = np.random.RandomState(opts.random_seed) if opts.random_seed else np.random.RandomState()
    prob = freq / freq.sum() if len(freq) else freq
    fill_size, drawn, ix = 100000, np.zeros(0, dtype=np.int64), 0

    def refill(size: int) -> Any:
        return rng.choice(len(umis), size, p=prob)

    if len(sizes):
        drawn = refill(fill_size)
    null_means = np.empty(sizes.shape, dtype=np.float64)
    from ..kernels.umi import mean_distances

    for b in range(len(sizes)):
        for k in (0, 1):
            need = int(sizes[b, k])
            if not need < fill_size - ix:
                if need > fill_size:
                    fill_size = need * 2
                drawn = refill(fill_size)
                ix = 0
            null_means[b, k] = mean_distances(umis, drawn[ix:ix + need])
            ix += need
    observed = [means[:, 0], null_means[:, 0], means[:, 1], null_means[:, 1]]
    max_ed = int(max(max(a) for a in observed)) if len(sizes) else 0
    bins = list(range(-1, max_ed + 2))
    tallies = [np.bincount(np.digitize(a, bins, right=True), minlength=max_ed + 3) for a in observed]
    names = ["unique", "unique_null", opts.method, f"{opts.method}_null", "edit_distance"]
    rows = []
    for i, edit in enumerate(bins):
        rows.append((*(int(t[i]) for t in tallies), "Single_UMI" if i == 0 else str(edit)))
    outputs.append(pub.write_tsv(prefix + "_edit_distance.tsv", names, rows))
    return outputs


def parts_folder(final: str) -> str:
    """A private folder next to ``final`` for the workers' parts (removed by the caller)."""
    return tempfile.mkdtemp(prefix=".bamflow-parts-", dir=os.path.dirname(os.path.abspath(final)) or ".")


__all__ = [
    "UmiOptions", "dedup", "run_umi", "umi_worker", "by_cell", "gather", "read_position", "UMI_MODES",
    "DEFAULT_SKIP", "read_whitelist", "write_dedup_stats",
]
