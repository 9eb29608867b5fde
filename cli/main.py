"""The ``bamflow`` command: a thin typer layer over the Python API.

Exit status: 0 success, 1 the run failed (one error line; the child's
traceback with --debug), 2 usage error.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from bamflow import WorkflowError, __version__
from bamflow.engine.publish import Publication, is_special

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


# -- the options every command shares, each declared once -------------------------------------------


def _level(value: str | None) -> int | str | None:
    """--level: 0-12 or 'fast' (checked and parsed with the other arguments)."""
    if value is None or value == "fast":
        return value
    try:
        level = int(value)
    except ValueError:
        raise typer.BadParameter(f"must be 0-12 or 'fast', not {value!r}", param_hint="--level") from None
    if not 0 <= level <= 12:
        raise typer.BadParameter(f"must be 0-12 or 'fast', not {value!r}", param_hint="--level")
    return level


def _progress(value: str) -> str:
    if value not in ("auto", "live", "log", "none"):
        raise typer.BadParameter("must be auto, live, log or none", param_hint="--progress")
    return value


def _stats(value: Path | None) -> Path | None:
    """--stats: a file the run can publish, checked before the run starts."""
    if value is None or is_special(os.fspath(value)):
        return value
    folder = value.parent
    if value.is_dir():
        problem = f"'{value}' is a folder"
    elif not folder.is_dir():
        problem = f"'{folder}' is not a folder" if folder.exists() else f"the folder '{folder}' does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"cannot write to the folder '{folder}'"
    else:
        return value
    raise typer.BadParameter(problem, param_hint="--stats")


def _shared(name: str, annotation: Any, *declarations: Any, **settings: Any) -> inspect.Parameter:
    option = typer.Option(*declarations, **settings)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


SHARED = (
    _shared("threads", int, 2, "-@", "--threads", min=1, help="Threads for BGZF decompression and compression."),
    _shared(
        "level",
        str | None,
        None,
        "--level",
        callback=_level,
        help="Compression level: 0-12 (libdeflate; 0 = none) or 'fast' (ISA-L). Default: 6.",
    ),
    _shared("stats", Path | None, None, "--stats", callback=_stats, help="Write the run's statistics to this JSON file."),
    _shared("quiet", bool, False, "-q", "--quiet", help="No live display: a log line every few seconds."),
    _shared("progress", str, "auto", "--progress", callback=_progress, help="Progress display: auto, live, log or none."),
    _shared("debug", bool, False, "--debug", help="Show the failing job's traceback on error."),
)
"""The options every command takes, after its own, in this order (see :func:`command`)."""


def _exists(param: typer.CallbackParam, value: str) -> str:
    if value != "-" and not os.path.exists(value):
        raise typer.BadParameter(f"'{value}' does not exist", param_hint=(param.name or "input").upper())
    return value


def _existing_file(param: typer.CallbackParam, value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"'{value}' does not exist", param_hint=param.opts[-1] if param.opts else None)
    return value


def input_argument(help: str = "BAM, uncompressed BAM or SAM file; - for stdin.") -> Any:
    """An input file (- for stdin), which must exist."""
    return typer.Argument(callback=_exists, help=help)


def output_option(help: str) -> Any:
    return typer.Option("-o", "--output", help=help)


def workers_option(help: str = "Worker processes.", default: int = 2) -> Any:
    return typer.Option(default, "-w", "--workers", min=1, help=help)


INPUT = input_argument()
SHARDED_WORKERS = "Worker processes (cells are sharded over them)."
METHOD = typer.Option(
    "directional", "--method", help="unique, percentile, cluster, adjacency or directional (umi_tools' definitions)."
)
CELL_TAG = typer.Option("CB", "--cell-tag", help="Cell barcode tag.")
UMI_TAG = typer.Option("UB", "--umi-tag", help="UMI tag.")

Tally = tuple[int, dict[str, int], dict[str, int]]
"""What the summary shows: reads in, reads written per output, reads dropped per reason."""


def _written_to(output: str) -> Callable[[dict[str, Any]], Tally]:
    """The usual tally: every read written goes to ``output``."""
    return lambda result: (result["reads_in"], {output: result["written"]}, result["dropped"])


def _per_output(result: dict[str, Any]) -> Tally:
    return result["reads_in"], result["written"], result["dropped"]


def _counted(result: dict[str, Any]) -> Tally:
    return result["reads_in"], {"counted": result.get("counted", 0)}, result.get("dropped", {})


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["bamflow", *sys.argv[1:]])


@dataclass
class Common:
    """The shared options of a command, checked, and what every command does around its run:
    the display, one error line and the exit status, the stats file, the summary."""

    name: str
    threads: int
    stats: Path | None
    quiet: bool
    progress: str
    debug: bool
    level: int | str | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True), repr=False)

    def mode(self) -> str:
        if self.progress != "auto":
            return self.progress
        if self.quiet or not self.console.is_terminal:
            return "log"
        return "live"

    def run(self, api: Callable[..., Any], *args: Any, tally: Callable[[dict[str, Any]], Tally], **kwargs: Any) -> dict[str, Any]:
        """``api(*args, **kwargs)`` with the shared settings it takes (threads, level, command_line,
        on_progress) under the display; ``args[0]`` is the input. Publishes the stats file and
        prints the summary (``tally(result)``) after a run that succeeded; failures → one error
        line and exit status 1."""
        params = inspect.signature(api).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepts = {name for name in ("threads", "level", "command_line", "on_progress") if takes_any or name in params}
        shared = {"threads": self.threads, "level": self.level, "command_line": _command_line()}
        kwargs.update({key: value for key, value in shared.items() if key in accepts})
        input = os.fspath(args[0])
        total = os.path.getsize(input) if input != "-" and os.path.isfile(input) else None
        started = time.monotonic()
        try:
            with ProgressDisplay(self.console, self.mode(), total, f"bamflow {self.name}") as display:
                if "on_progress" in accepts:
                    kwargs["on_progress"] = display
                done = api(*args, **kwargs)
            result = done.as_dict() if hasattr(done, "as_dict") else dict(done)
            result["seconds"] = time.monotonic() - started
            if self.stats is not None:
                _publish_stats(self.stats, result)
        except WorkflowError as e:
            self._fail(e.summary, str(e))
        except ValueError as e:  # raised before any job ran: the arguments are wrong
            self._fail(str(e), None, status=2)
        except OSError as e:
            self._fail(f"{type(e).__name__}: {e}", None)
        except KeyboardInterrupt:
            self.say(f"bamflow {self.name}: interrupted", style="bold red")
            raise typer.Exit(130) from None
        self.summary(*tally(result), result["seconds"])
        return result

    def _fail(self, summary: str, details: str | None, status: int = 1) -> NoReturn:
        self.say(f"bamflow {self.name}: error: {summary}", style="bold red")
        if self.debug and details:
            self.say(details)
        raise typer.Exit(status)

    def say(self, text: str, style: str | None = None) -> None:
        """A line on stderr, as it is (no highlighting, no wrapping)."""
        self.console.print(text, style=style, highlight=False, soft_wrap=True)

    def summary(self, reads_in: int, written: dict[str, int], dropped: dict[str, int], seconds: float) -> None:
        if self.quiet:
            self.say(
                f"bamflow {self.name}: {reads_in:,} reads in, {sum(written.values()):,} written, "
                f"{sum(dropped.values()):,} dropped {dropped or ''} in {seconds:.1f} s"
            )
        else:
            self.console.print(summary_table(f"bamflow {self.name}", reads_in, written, dropped, seconds))


def _publish_stats(path: Path, stats: dict[str, Any]) -> None:
    """The stats JSON, written under a temporary name and renamed into place when complete (a
    device such as /dev/stderr: written in place); called only after a run that succeeded."""
    with Publication() as publication:
        with open(publication.path(path), "w", encoding="utf-8") as f:
            f.write(json.dumps(stats, indent=2, default=str) + "\n")
        publication.commit()


def command(epilog: str, *, name: str | None = None, level: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command: its own parameters, then the shared options (``level=False``: no
    --level, for the commands whose function takes no compression level). The function gets its
    own arguments and, as ``common``, the shared ones in a :class:`Common`."""

    def register(func: Callable[..., None]) -> Callable[..., None]:
        shared = [p for p in SHARED if level or p.name != "level"]
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "common"]
        command_name = name or func.__name__

        @functools.wraps(func)
        def with_common(**arguments: Any) -> None:
            options = {p.name: arguments.pop(p.name) for p in shared}
            func(**arguments, common=Common(command_name, **options))

        with_common.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
        app.command(name=command_name, epilog=epilog)(with_common)
        return func

    return register


# -- commands ---------------------------------------------------------------------------


@command("Example: bamflow shard --by CB -n 16 -o shards/ in.bam")
def shard(
    input: Annotated[str, INPUT],
    output: Annotated[Path, output_option("Folder for the shards (created if missing).")],
    by: str = typer.Option("CB", "--by", help="Tag(s) to shard by (CB, or CB,UB), or 'name' for read names."),
    n: int = typer.Option(16, "-n", "--shards", min=1, help="Number of shards."),
    missing: str = typer.Option("unassigned", "--missing", help="Reads without the tag: unassigned (own file), drop, error."),
    prefix: str = typer.Option("shard", "--prefix", help="Shard file names: PREFIX_000.bam …"),
    *,
    common: Common,
) -> None:
    """Split a BAM into N BAMs; all reads with one tag value (one cell) land in one shard.

    Writes OUTPUT/PREFIX_NNN.bam, OUTPUT/unassigned.bam (reads without the tag)
    and OUTPUT/manifest.tsv (value, shard, reads); prints a balance report.
    """
    from bamflow.bam.options import MISSING_POLICIES
    from bamflow.bam.shard import shard as shard_bam

    if missing not in MISSING_POLICIES:
        raise typer.BadParameter(f"must be one of {', '.join(MISSING_POLICIES)}", param_hint="--missing")
    result = common.run(shard_bam, input, output, by=by, n=n, missing=missing, prefix=prefix, tally=_per_output)
    balance = result["balance"]
    if balance:
        common.say(
            f"balance: {balance['min']:,.0f}–{balance['max']:,.0f} reads per shard, "
            f"max/mean {balance['max_over_mean']:.2f}, CV {balance['cv']:.3f}; "
            f"{result['values']:,} values in {result['manifest']}"
        )


@command("Example: bamflow split --by CB --min-reads 100 -o cells/ in.bam")
def split(
    input: Annotated[str, INPUT],
    output: Annotated[Path, output_option("Folder for the outputs (created if missing).")],
    by: str = typer.Option("CB", "--by", help="Tag(s) whose values name the outputs (CB, or CB,UB)."),
    barcodes: Path | None = typer.Option(
        None, "--barcodes", callback=_existing_file, help="Only these values (one per line; gzip ok)."
    ),
    groups: Path | None = typer.Option(
        None, "--groups", callback=_existing_file, help="TSV value<TAB>group (sinto's format): one BAM per group."
    ),
    min_reads: int | None = typer.Option(None, "--min-reads", min=1, help="Only values (or groups) with at least N reads."),
    workers: int = workers_option("Worker processes writing outputs."),
    memory: int = typer.Option(256, "--memory-mb", min=1, help="Record buffers shared by the workers, MB."),
    prefix: str = typer.Option("", "--prefix", help="Prefix of every output file name."),
    *,
    common: Common,
) -> None:
    """One BAM per tag value (per cell) or per group of values, in one pass.

    Any number of outputs with a bounded number of open files and bounded
    memory. File names come from the values, made safe (never outside OUTPUT);
    OUTPUT/manifest.tsv maps each value to its file and read count.
    """
    from bamflow.bam.split import split_reads

    if barcodes is not None and groups is not None:
        raise typer.BadParameter("give --barcodes or --groups, not both", param_hint="--barcodes")

    def tally(result: dict[str, Any]) -> Tally:
        dropped = {reason: n for reason, n in result["dropped"].items() if n}
        return result["records_in"], {f"{result['files']:,} files": result["written"]}, dropped

    options = dict(by=by, values=barcodes, groups=groups, min_reads=min_reads, memory_budget=memory << 20, prefix=prefix)
    common.run(split_reads, input, output, workers=workers, **options, tally=tally)


@command("Example: bamflow filter --barcodes cells.txt in.bam -o subset.bam")
def filter(
    input: Annotated[str, INPUT],
    output: Annotated[str, output_option("Output BAM (- for stdout).")],
    barcodes: Path = typer.Option(
        ..., "--barcodes", callback=_existing_file, help="Values to keep, one per line (gzip ok); any number."
    ),
    tag: str = typer.Option("CB", "--tag", help="The tag (or tags, CB,UB) to look up."),
    invert: bool = typer.Option(False, "--invert", help="Keep the reads whose value is NOT listed."),
    *,
    common: Common,
) -> None:
    """Keep the reads whose tag value is in a list (like subset-bam or samtools view -D).

    Reads without the tag are dropped (and counted), with or without --invert.
    """
    from bamflow.bam.split import filter_reads

    def tally(result: dict[str, Any]) -> Tally:
        dropped = {"not listed": result["dropped_not_listed"], "missing tag": result["dropped_missing_tag"]}
        return result["records_in"], {output: result["kept"]}, {k: v for k, v in dropped.items() if v}

    common.run(filter_reads, input, output, tag=tag, values=barcodes, invert=invert, tally=tally)


@command("Example: bamflow tag --layout 10x-v3 R1.fastq.gz R2.fastq.gz -o unaligned.bam", name="tag")
def tag_fastq(
    read1: Annotated[str, input_argument("Read 1 FASTQ (barcode and UMI; gzip or plain; - for stdin).")],
    read2: Annotated[str, input_argument("Read 2 FASTQ (cDNA).")],
    output: Annotated[str, output_option("Unaligned BAM to write (- for stdout).")],
    layout: str = typer.Option(
        "10x-v3", "--layout", help="10x-v2, 10x-v3, dropseq, visium, slideseq, or CB=r1[0:16],UMI=r1[16:28]."
    ),
    sample: str = typer.Option("sample", "--sample", help="Sample name for the read group."),
    *,
    common: Common,
) -> None:
    """FASTQ pair → unaligned BAM with raw barcode and UMI tags (CR CY UR UY) and a read group."""
    from bamflow.presets.tag import tag

    common.run(tag, read1, read2, output, layout=layout, sample=sample, tally=_written_to(output))


@command("Example: bamflow correct --whitelist 3M-february-2018.txt.gz in.bam -o corrected.bam")
def correct(
    input: Annotated[str, input_argument("BAM with raw barcodes (CR, qualities in CY).")],
    output: Annotated[str, output_option("BAM with corrected barcodes (CB).")],
    whitelist: Path = typer.Option(
        ..., "--whitelist", callback=_existing_file, help="Barcode whitelist, one per line (gzip ok)."
    ),
    workers: int = workers_option(),
    *,
    common: Common,
) -> None:
    """Correct cell barcodes against a whitelist as Cell Ranger does (exact, else 1 mismatch by posterior)."""
    from bamflow.presets.correct import correct as correct_barcodes

    common.run(correct_barcodes, input, output, whitelist=whitelist, workers=workers, tally=_written_to(output))


@command("Example: bamflow histogram --tag CB in.bam -o reads_per_cell.txt.gz", level=False)
def histogram(
    input: Annotated[str, INPUT],
    output: Annotated[str, output_option("count<TAB>value lines (.gz: gzip; - for stdout).")],
    tag: str = typer.Option("CB", "--tag", help="The tag to count reads of."),
    read_quality: int | None = typer.Option(None, "--read-quality", min=0, help="Skip reads below this MAPQ."),
    filter_pcr_duplicates: bool = typer.Option(False, "--filter-pcr-duplicates", help="Skip reads flagged as duplicates."),
    workers: int = workers_option("Counting processes.", default=1),
    *,
    common: Common,
) -> None:
    """Reads per tag value (Drop-seq BamTagHistogram), secondary alignments skipped."""
    from bamflow.presets.histogram import histogram as tag_histogram

    options = dict(tag=tag, read_quality=read_quality, filter_pcr_duplicates=filter_pcr_duplicates)
    common.run(tag_histogram, input, output, workers=workers, **options, tally=_written_to(output))


@command("Example: bamflow dedup --method directional in.bam -o dedup.bam")
def dedup(
    input: Annotated[str, input_argument("Coordinate-sorted BAM; - for stdin.")],
    output: Annotated[str, output_option("Deduplicated BAM (- for stdout).")],
    method: str = METHOD,
    umi: str = typer.Option("tag:UB", "--umi", help="tag:XX, read_name (_UMI suffix) or read_name_cell (_CELL_UMI)."),
    cell_tag: str = CELL_TAG,
    per_cell: bool = typer.Option(True, "--per-cell/--not-per-cell", help="Deduplicate within each cell."),
    gene_tag: str | None = typer.Option(None, "--gene-tag", help="Also group by this gene tag (per gene)."),
    mark: bool = typer.Option(False, "--mark", help="Flag duplicates (0x400) instead of removing them."),
    workers: int = workers_option(SHARDED_WORKERS),
    *,
    common: Common,
) -> None:
    """UMI deduplication by alignment position, per cell, as umi_tools dedup does."""
    from bamflow.presets.dedup import dedup as dedup_reads

    options = dict(method=method, umi=umi, cell_tag=cell_tag, per_cell=per_cell, gene_tag=gene_tag, mark=mark)
    common.run(dedup_reads, input, output, workers=workers, **options, tally=_written_to(output))


TAGGED_INPUT = input_argument("BAM with cell, UMI and gene tags; - for stdin.")


@command("Example: bamflow count --gene-tag GX in.bam -o counts/", level=False)
def count(
    input: Annotated[str, TAGGED_INPUT],
    output: Annotated[Path, output_option("Folder: matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz, counts.tsv, counts.h5ad.")],
    method: str = METHOD,
    gene_tag: str = typer.Option("GX", "--gene-tag", help="Gene id tag."),
    name_tag: str = typer.Option("GN", "--name-tag", help="Gene name tag (features.tsv)."),
    cell_tag: str = CELL_TAG,
    umi_tag: str = UMI_TAG,
    cells: Path | None = typer.Option(None, "--cells", callback=_existing_file, help="Only these cells (one barcode per line)."),
    min_umis: int | None = typer.Option(None, "--min-umis", min=1, help="Only cells with at least N UMIs."),
    workers: int = workers_option(SHARDED_WORKERS),
    *,
    common: Common,
) -> None:
    """Gene × cell UMI counts (as umi_tools count --per-gene --per-cell) → 10x MTX folder, TSV, h5ad."""
    from bamflow.presets.count import count as count_umis

    options = dict(method=method, gene_tag=gene_tag, name_tag=name_tag, cell_tag=cell_tag, umi_tag=umi_tag)
    common.run(count_umis, input, output, cells=cells, min_umis=min_umis, workers=workers, **options, tally=_counted)


@command("Example: bamflow qc in.bam -o qc/", level=False)
def qc(
    input: Annotated[str, TAGGED_INPUT],
    output: Annotated[Path, output_option("Folder: per_cell.tsv, summary.json, knee.svg/png, report.html.")],
    method: str = METHOD,
    cell_tag: str = CELL_TAG,
    umi_tag: str = UMI_TAG,
    gene_tag: str = typer.Option("GX", "--gene-tag", help="Gene tag."),
    min_umis: int | None = typer.Option(None, "--min-umis", min=0, help="Call cells with at least N UMIs (default: the knee)."),
    workers: int = workers_option(SHARDED_WORKERS),
    *,
    common: Common,
) -> None:
    """Per-cell QC: reads, UMIs, genes, duplication rate; knee plot and a self-contained HTML report."""
    from bamflow.presets.qc import qc as run_qc

    options = dict(method=method, cell_tag=cell_tag, umi_tag=umi_tag, gene_tag=gene_tag, min_umis=min_umis)
    common.run(run_qc, input, output, workers=workers, **options, tally=_counted)


@command("Example: bamflow run my_module:fix_read --by CB -w 4 in.bam -o out.bam")
def run(
    function: Annotated[
        str, typer.Argument(help="MODULE:FUNC or path/to/file.py:FUNC; FUNC(read) returns the read, None or reads.")
    ],
    input: Annotated[str, INPUT],
    output: Annotated[str, output_option("Output BAM (- for stdout).")],
    by: str | None = typer.Option(None, "--by", help="Send reads with the same tag value(s) (CB, CB,UB) or 'name' together."),
    workers: int = workers_option(),
    order: str = typer.Option("input", "--order", help="Output order: input, any, coordinate, tag:XX."),
    missing: str = typer.Option("error", "--missing", help="Reads without the --by tag: error or drop."),
    chunk_size: int = typer.Option(1000, "--chunk-size", min=1, help="Reads dealt to a worker at a time (without --by)."),
    fmt: str = typer.Option("bam", "--format", help="Output format: bam, ubam (uncompressed) or sam."),
    *,
    common: Common,
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
    options = dict(by=by, order=order, chunk_size=chunk_size, missing=missing, fmt=fmt)
    common.run(map_reads, input, func, output, workers=workers, **options, tally=_written_to(output))


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
