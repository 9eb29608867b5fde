"""The ``bamflow`` command: a thin typer layer over the Python API.

Exit status: 0 success, 1 the run failed (one error line; the child's
traceback with --debug), 2 usage error.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from bamflow import WorkflowError, __version__

from .display import ProgressDisplay, summary_table

EXAMPLES = """
Examples:

  bamflow shard --by CB -n 16 -o shards/ possorted_genome_bam.bam

  samtools view -u in.bam | bamflow shard --by CB,UB -o shards/ -

  bamflow split --by CB --min-reads 100 -o cells/ in.bam

  bamflow filter --barcodes cells.txt in.bam -o subset.bam

  bamflow run my_module:fix_read --by CB -w 4 in.bam -o out.bam
"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="High-throughput BAM/SAM processing over named pipes, with every read accounted for.\n" + EXAMPLES,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bamflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """High-throughput BAM/SAM processing over named pipes."""


# -- shared options ---------------------------------------------------------------------

THREADS = typer.Option(2, "-@", "--threads", min=1, help="Threads for BGZF decompression and compression.")
LEVEL = typer.Option(None, "--level", help="Compression level: 0-12 (libdeflate; 0 = none) or 'fast' (ISA-L). Default: 6.")
STATS = typer.Option(None, "--stats", help="Write the run's statistics to this JSON file.")
QUIET = typer.Option(False, "-q", "--quiet", help="No live display: a log line every few seconds.")
DEBUG = typer.Option(False, "--debug", help="Show the failing job's traceback on error.")
PROGRESS = typer.Option("auto", "--progress", help="Progress display: auto, live, log or none.")


def _level(value: str | None) -> int | str | None:
    if value is None or value == "fast":
        return value
    try:
        level = int(value)
    except ValueError:
        raise typer.BadParameter(f"must be 0-12 or 'fast', not {value!r}", param_hint="--level") from None
    if not 0 <= level <= 12:
        raise typer.BadParameter(f"must be 0-12 or 'fast', not {value!r}", param_hint="--level")
    return level


@dataclass
class Session:
    """What every command does around its run: display, errors, stats file."""

    name: str
    input: str
    quiet: bool
    debug: bool
    progress: str
    stats: Path | None

    def __post_init__(self) -> None:
        self.console = Console(stderr=True)
        if self.progress not in ("auto", "live", "log", "none"):
            raise typer.BadParameter("must be auto, live, log or none", param_hint="--progress")
        if self.input != "-" and not os.path.exists(self.input):
            raise typer.BadParameter(f"'{self.input}' does not exist", param_hint="INPUT")

    def mode(self) -> str:
        if self.progress != "auto":
            return self.progress
        if self.quiet or not self.console.is_terminal:
            return "log"
        return "live"

    def run(self, action: Callable[[ProgressDisplay], dict[str, Any]]) -> dict[str, Any]:
        """Run ``action(display)``; turn failures into one line and exit status 1."""
        total = os.path.getsize(self.input) if self.input != "-" and os.path.isfile(self.input) else None
        started = time.monotonic()
        try:
            with ProgressDisplay(self.console, self.mode(), total, f"bamflow {self.name}") as display:
                stats = action(display)
        except WorkflowError as e:
            self._fail(e.summary, str(e))
        except ValueError as e:  # raised before any job ran: the arguments are wrong
            self._fail(str(e), None, status=2)
        except OSError as e:
            self._fail(f"{type(e).__name__}: {e}", None)
        except KeyboardInterrupt:
            self.console.print(f"bamflow {self.name}: interrupted", style="bold red", highlight=False)
            raise typer.Exit(130) from None
        stats["seconds"] = time.monotonic() - started
        if self.stats is not None:
            self.stats.write_text(json.dumps(stats, indent=2, default=str) + "\n")
        return stats

    def _fail(self, summary: str, details: str | None, status: int = 1) -> None:
        self.console.print(f"bamflow {self.name}: error: {summary}", style="bold red", highlight=False, soft_wrap=True)
        if self.debug and details:
            self.console.print(details, highlight=False, soft_wrap=True)
        raise typer.Exit(status)

    def summary(self, reads_in: int, written: dict[str, int], dropped: dict[str, int], seconds: float) -> None:
        if self.quiet:
            self.console.print(
                f"bamflow {self.name}: {reads_in:,} reads in, {sum(written.values()):,} written, "
                f"{sum(dropped.values()):,} dropped {dropped or ''} in {seconds:.1f} s",
                highlight=False,
                soft_wrap=True,
            )
        else:
            self.console.print(summary_table(f"bamflow {self.name}", reads_in, written, dropped, seconds))


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["bamflow", *sys.argv[1:]])


# -- commands ---------------------------------------------------------------------------


@app.command(epilog="Example: bamflow shard --by CB -n 16 -o shards/ in.bam")
def shard(
    input: str = typer.Argument(..., help="BAM, uncompressed BAM or SAM file; - for stdin."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the shards (created if missing)."),
    by: str = typer.Option("CB", "--by", help="Tag(s) to shard by (CB, or CB,UB), or 'name' for read names."),
    n: int = typer.Option(16, "-n", "--shards", min=1, help="Number of shards."),
    missing: str = typer.Option("unassigned", "--missing", help="Reads without the tag: unassigned (own file), drop, error."),
    prefix: str = typer.Option("shard", "--prefix", help="Shard file names: PREFIX_000.bam …"),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Split a BAM into N BAMs; all reads with one tag value (one cell) land in one shard.

    Writes OUTPUT/PREFIX_NNN.bam, OUTPUT/unassigned.bam (reads without the tag)
    and OUTPUT/manifest.tsv (value, shard, reads); prints a balance report.
    """
    from bamflow.bam.options import MISSING_POLICIES
    from bamflow.bam.shard import shard as shard_bam

    if missing not in MISSING_POLICIES:
        raise typer.BadParameter(f"must be one of {', '.join(MISSING_POLICIES)}", param_hint="--missing")
    session = Session("shard", input, quiet, debug, progress, stats)
    lvl = _level(level)

    def action(display: ProgressDisplay) -> dict[str, Any]:
        result = shard_bam(
            input,
            output,
            by=by,
            n=n,
            missing=missing,
            threads=threads,
            level=lvl,
            prefix=prefix,
            command_line=_command_line(),
            on_progress=display,
        )
        return result.as_dict()

    result = session.run(action)
    session.summary(result["reads_in"], result["written"], result["dropped"], result["seconds"])
    balance = result["balance"]
    if balance:
        session.console.print(
            f"balance: {balance['min']:,.0f}–{balance['max']:,.0f} reads per shard, "
            f"max/mean {balance['max_over_mean']:.2f}, CV {balance['cv']:.3f}; "
            f"{result['values']:,} values in {result['manifest']}",
            highlight=False,
            soft_wrap=True,
        )


@app.command(epilog="Example: bamflow split --by CB --min-reads 100 -o cells/ in.bam")
def split(
    input: str = typer.Argument(..., help="BAM, uncompressed BAM or SAM file; - for stdin."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the outputs (created if missing)."),
    by: str = typer.Option("CB", "--by", help="Tag(s) whose values name the outputs (CB, or CB,UB)."),
    barcodes: Path | None = typer.Option(None, "--barcodes", help="Only these values (one per line; gzip ok)."),
    groups: Path | None = typer.Option(None, "--groups", help="TSV value<TAB>group (sinto's format): one BAM per group."),
    min_reads: int | None = typer.Option(None, "--min-reads", min=1, help="Only values (or groups) with at least N reads."),
    workers: int = typer.Option(2, "-w", "--workers", min=1, help="Worker processes writing outputs."),
    memory: int = typer.Option(256, "--memory-mb", min=1, help="Record buffers shared by the workers, MB."),
    prefix: str = typer.Option("", "--prefix", help="Prefix of every output file name."),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """One BAM per tag value (per cell) or per group of values, in one pass.

    Any number of outputs with a bounded number of open files and bounded
    memory. File names come from the values, made safe (never outside OUTPUT);
    OUTPUT/manifest.tsv maps each value to its file and read count.
    """
    from bamflow.bam.split import split_reads

    if barcodes is not None and groups is not None:
        raise typer.BadParameter("give --barcodes or --groups, not both", param_hint="--barcodes")
    for path, hint in ((barcodes, "--barcodes"), (groups, "--groups")):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"'{path}' does not exist", param_hint=hint)
    session = Session("split", input, quiet, debug, progress, stats)
    lvl = _level(level)

    def action(display: ProgressDisplay) -> dict[str, Any]:
        return split_reads(
            input,
            output,
            by=by,
            values=barcodes,
            groups=groups,
            min_reads=min_reads,
            workers=workers,
            threads=threads,
            level=lvl,
            memory_budget=memory << 20,
            prefix=prefix,
            command_line=_command_line(),
            on_progress=display,
        )

    result = session.run(action)
    dropped = {reason: n for reason, n in result["dropped"].items() if n}
    session.summary(result["records_in"], {f"{result['files']:,} files": result["written"]}, dropped, result["seconds"])


@app.command(epilog="Example: bamflow filter --barcodes cells.txt in.bam -o subset.bam")
def filter(
    input: str = typer.Argument(..., help="BAM, uncompressed BAM or SAM file; - for stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Output BAM (- for stdout)."),
    barcodes: Path = typer.Option(..., "--barcodes", help="Values to keep, one per line (gzip ok); any number."),
    tag: str = typer.Option("CB", "--tag", help="The tag (or tags, CB,UB) to look up."),
    invert: bool = typer.Option(False, "--invert", help="Keep the reads whose value is NOT listed."),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Keep the reads whose tag value is in a list (like subset-bam or samtools view -D).

    Reads without the tag are dropped (and counted), with or without --invert.
    """
    from bamflow.bam.split import filter_reads

    if not barcodes.is_file():
        raise typer.BadParameter(f"'{barcodes}' does not exist", param_hint="--barcodes")
    session = Session("filter", input, quiet, debug, progress, stats)
    lvl = _level(level)

    def action(display: ProgressDisplay) -> dict[str, Any]:
        return dict(
            filter_reads(
                input,
                output,
                tag=tag,
                values=barcodes,
                invert=invert,
                threads=threads,
                level=lvl,
                command_line=_command_line(),
                on_progress=display,
            )
        )

    result = session.run(action)
    dropped = {"not listed": result["dropped_not_listed"], "missing tag": result["dropped_missing_tag"]}
    session.summary(result["records_in"], {output: result["kept"]}, {k: v for k, v in dropped.items() if v}, result["seconds"])


@app.command(name="tag", epilog="Example: bamflow tag --layout 10x-v3 R1.fastq.gz R2.fastq.gz -o unaligned.bam")
def tag_fastq(
    read1: str = typer.Argument(..., help="Read 1 FASTQ (barcode and UMI; gzip or plain; - for stdin)."),
    read2: str = typer.Argument(..., help="Read 2 FASTQ (cDNA)."),
    output: str = typer.Option(..., "-o", "--output", help="Unaligned BAM to write (- for stdout)."),
    layout: str = typer.Option(
        "10x-v3", "--layout", help="10x-v2, 10x-v3, dropseq, visium, slideseq, or CB=r1[0:16],UMI=r1[16:28]."
    ),
    sample: str = typer.Option("sample", "--sample", help="Sample name for the read group."),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """FASTQ pair → unaligned BAM with raw barcode and UMI tags (CR CY UR UY) and a read group."""
    from bamflow.presets.tag import tag

    session = Session("tag", read1, quiet, debug, progress, stats)
    if read2 != "-" and not os.path.exists(read2):
        raise typer.BadParameter(f"'{read2}' does not exist", param_hint="READ2")
    lvl = _level(level)
    result = session.run(
        lambda display: tag(
            read1, read2, output, layout=layout, sample=sample, threads=threads, level=lvl, command_line=_command_line()
        )
    )
    session.summary(result["reads_in"], {output: result["written"]}, result["dropped"], result["seconds"])


@app.command(epilog="Example: bamflow correct --whitelist 3M-february-2018.txt.gz in.bam -o corrected.bam")
def correct(
    input: str = typer.Argument(..., help="BAM with raw barcodes (CR, qualities in CY)."),
    output: str = typer.Option(..., "-o", "--output", help="BAM with corrected barcodes (CB)."),
    whitelist: Path = typer.Option(..., "--whitelist", help="Barcode whitelist, one per line (gzip ok)."),
    workers: int = typer.Option(2, "-w", "--workers", min=1, help="Worker processes."),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Correct cell barcodes against a whitelist as Cell Ranger does (exact, else 1 mismatch by posterior)."""
    from bamflow.presets.correct import correct as correct_barcodes

    if not whitelist.is_file():
        raise typer.BadParameter(f"'{whitelist}' does not exist", param_hint="--whitelist")
    session = Session("correct", input, quiet, debug, progress, stats)
    lvl = _level(level)
    result = session.run(
        lambda display: correct_barcodes(
            input,
            output,
            whitelist=whitelist,
            workers=workers,
            threads=threads,
            level=lvl,
            command_line=_command_line(),
            on_progress=display,
        )
    )
    session.summary(result["reads_in"], {output: result["written"]}, result["dropped"], result["seconds"])


@app.command(epilog="Example: bamflow histogram --tag CB in.bam -o reads_per_cell.txt.gz")
def histogram(
    input: str = typer.Argument(..., help="BAM, uncompressed BAM or SAM file; - for stdin."),
    output: str = typer.Option(..., "-o", "--output", help="count<TAB>value lines (.gz: gzip; - for stdout)."),
    tag: str = typer.Option("CB", "--tag", help="The tag to count reads of."),
    read_quality: int | None = typer.Option(None, "--read-quality", min=0, help="Skip reads below this MAPQ."),
    filter_pcr_duplicates: bool = typer.Option(False, "--filter-pcr-duplicates", help="Skip reads flagged as duplicates."),
    workers: int = typer.Option(1, "-w", "--workers", min=1, help="Counting processes."),
    threads: int = THREADS,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Reads per tag value (Drop-seq BamTagHistogram), secondary alignments skipped."""
    from bamflow.presets.histogram import histogram as tag_histogram

    session = Session("histogram", input, quiet, debug, progress, stats)
    result = session.run(
        lambda display: tag_histogram(
            input,
            output,
            tag=tag,
            read_quality=read_quality,
            filter_pcr_duplicates=filter_pcr_duplicates,
            workers=workers,
            threads=threads,
            on_progress=display,
        )
    )
    session.summary(result["reads_in"], {output: result["written"]}, result["dropped"], result["seconds"])


METHODS = "unique, percentile, cluster, adjacency or directional (umi_tools' definitions)."


@app.command(epilog="Example: bamflow dedup --method directional in.bam -o dedup.bam")
def dedup(
    input: str = typer.Argument(..., help="Coordinate-sorted BAM; - for stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Deduplicated BAM (- for stdout)."),
    method: str = typer.Option("directional", "--method", help=METHODS),
    umi: str = typer.Option("tag:UB", "--umi", help="tag:XX, read_name (_UMI suffix) or read_name_cell (_CELL_UMI)."),
    cell_tag: str = typer.Option("CB", "--cell-tag", help="Cell barcode tag."),
    per_cell: bool = typer.Option(True, "--per-cell/--not-per-cell", help="Deduplicate within each cell."),
    gene_tag: str | None = typer.Option(None, "--gene-tag", help="Also group by this gene tag (per gene)."),
    mark: bool = typer.Option(False, "--mark", help="Flag duplicates (0x400) instead of removing them."),
    workers: int = typer.Option(2, "-w", "--workers", min=1, help="Worker processes (cells are sharded over them)."),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """UMI deduplication by alignment position, per cell, as umi_tools dedup does."""
    from bamflow.presets.dedup import dedup as dedup_reads

    session = Session("dedup", input, quiet, debug, progress, stats)
    lvl = _level(level)
    result = session.run(
        lambda display: dedup_reads(
            input,
            output,
            method=method,
            umi=umi,
            cell_tag=cell_tag,
            per_cell=per_cell,
            gene_tag=gene_tag,
            mark=mark,
            workers=workers,
            threads=threads,
            level=lvl,
            command_line=_command_line(),
            on_progress=display,
        )
    )
    session.summary(result["reads_in"], {output: result["written"]}, result["dropped"], result["seconds"])


@app.command(epilog="Example: bamflow count --gene-tag GX in.bam -o counts/")
def count(
    input: str = typer.Argument(..., help="BAM with cell, UMI and gene tags; - for stdin."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Folder: matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz, counts.tsv, counts.h5ad."
    ),
    method: str = typer.Option("directional", "--method", help=METHODS),
    gene_tag: str = typer.Option("GX", "--gene-tag", help="Gene id tag."),
    name_tag: str = typer.Option("GN", "--name-tag", help="Gene name tag (features.tsv)."),
    cell_tag: str = typer.Option("CB", "--cell-tag", help="Cell barcode tag."),
    umi_tag: str = typer.Option("UB", "--umi-tag", help="UMI tag."),
    cells: Path | None = typer.Option(None, "--cells", help="Only these cells (one barcode per line)."),
    min_umis: int | None = typer.Option(None, "--min-umis", min=1, help="Only cells with at least N UMIs."),
    workers: int = typer.Option(2, "-w", "--workers", min=1, help="Worker processes (cells are sharded over them)."),
    threads: int = THREADS,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Gene × cell UMI counts (as umi_tools count --per-gene --per-cell) → 10x MTX folder, TSV, h5ad."""
    from bamflow.presets.count import count as count_umis

    if cells is not None and not cells.is_file():
        raise typer.BadParameter(f"'{cells}' does not exist", param_hint="--cells")
    session = Session("count", input, quiet, debug, progress, stats)
    result = session.run(
        lambda display: count_umis(
            input,
            output,
            method=method,
            gene_tag=gene_tag,
            name_tag=name_tag,
            cell_tag=cell_tag,
            umi_tag=umi_tag,
            cells=cells,
            min_umis=min_umis,
            workers=workers,
            threads=threads,
            on_progress=display,
        )
    )
    session.summary(result["reads_in"], {"counted": result.get("counted", 0)}, result.get("dropped", {}), result["seconds"])


@app.command(epilog="Example: bamflow qc in.bam -o qc/")
def qc(
    input: str = typer.Argument(..., help="BAM with cell, UMI and gene tags; - for stdin."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder: per_cell.tsv, summary.json, knee.svg/png, report.html."),
    method: str = typer.Option("directional", "--method", help=METHODS),
    cell_tag: str = typer.Option("CB", "--cell-tag", help="Cell barcode tag."),
    umi_tag: str = typer.Option("UB", "--umi-tag", help="UMI tag."),
    gene_tag: str = typer.Option("GX", "--gene-tag", help="Gene tag."),
    min_umis: int | None = typer.Option(None, "--min-umis", min=0, help="Call cells with at least N UMIs (default: the knee)."),
    workers: int = typer.Option(2, "-w", "--workers", min=1, help="Worker processes (cells are sharded over them)."),
    threads: int = THREADS,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Per-cell QC: reads, UMIs, genes, duplication rate; knee plot and a self-contained HTML report."""
    from bamflow.presets.qc import qc as run_qc

    session = Session("qc", input, quiet, debug, progress, stats)
    result = session.run(
        lambda display: run_qc(
            input,
            output,
            cell_tag=cell_tag,
            umi_tag=umi_tag,
            gene_tag=gene_tag,
            method=method,
            min_umis=min_umis,
            workers=workers,
            threads=threads,
            on_progress=display,
        )
    )
    session.summary(result["reads_in"], {"counted": result.get("counted", 0)}, result.get("dropped", {}), result["seconds"])


@app.command(epilog="Example: bamflow run my_module:fix_read --by CB -w 4 in.bam -o out.bam")
def run(
    function: str = typer.Argument(..., help="MODULE:FUNC or path/to/file.py:FUNC; FUNC(read) returns the read, None or reads."),
    input: str = typer.Argument(..., help="BAM, uncompressed BAM or SAM file; - for stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Output BAM (- for stdout)."),
    by: str | None = typer.Option(None, "--by", help="Send reads with the same tag value(s) (CB, CB,UB) or 'name' together."),
    workers: int = typer.Option(2, "-w", "--workers", min=1, help="Worker processes."),
    order: str = typer.Option("input", "--order", help="Output order: input, any, coordinate, tag:XX."),
    missing: str = typer.Option("error", "--missing", help="Reads without the --by tag: error or drop."),
    chunk_size: int = typer.Option(1000, "--chunk-size", min=1, help="Reads dealt to a worker at a time (without --by)."),
    fmt: str = typer.Option("bam", "--format", help="Output format: bam, ubam (uncompressed) or sam."),
    threads: int = THREADS,
    level: str | None = LEVEL,
    stats: Path | None = STATS,
    quiet: bool = QUIET,
    progress: str = PROGRESS,
    debug: bool = DEBUG,
) -> None:
    """Run your per-read Python function over a BAM in parallel worker processes."""
    from bamflow.bam.api import map_reads

    if missing not in ("error", "drop"):
        raise typer.BadParameter("must be error or drop", param_hint="--missing")
    if fmt not in ("bam", "ubam", "sam"):
        raise typer.BadParameter("must be bam, ubam or sam", param_hint="--format")
    if not (order in ("input", "any", "coordinate") or (order.startswith("tag:") and len(order) == 6)):
        raise typer.BadParameter("must be input, any, coordinate or tag:XX", param_hint="--order")
    if order == "input" and by is not None:
        order = "any"  # sharding by a key cannot keep the input order
    func = _load_function(function)
    session = Session("run", input, quiet, debug, progress, stats)
    lvl = _level(level)

    def action(display: ProgressDisplay) -> dict[str, Any]:
        result = map_reads(
            input,
            func,
            output,
            by=by,
            workers=workers,
            order=order,
            threads=threads,
            level=lvl,
            chunk_size=chunk_size,
            missing=missing,
            fmt=fmt,
            command_line=_command_line(),
            on_progress=display,
        )
        return result.as_dict()

    result = session.run(action)
    session.summary(result["reads_in"], {output: result["written"]}, result["dropped"], result["seconds"])


def _load_function(spec: str) -> Callable[..., Any]:
    """MODULE:FUNC or path/to/file.py:FUNC → the function (importable by workers)."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise typer.BadParameter(f"expected MODULE:FUNC or file.py:FUNC, not {spec!r}", param_hint="FUNCTION")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise typer.BadParameter(f"no such file: {module_name}", param_hint="FUNCTION")
        sys.path.insert(0, str(path.resolve().parent))  # workers import it the same way
        module_name = path.stem
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise typer.BadParameter(f"cannot import {module_name}: {e}", param_hint="FUNCTION") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise typer.BadParameter(f"{module_name} has no function {func_name}", param_hint="FUNCTION")
    return func


def main() -> None:
    app()
