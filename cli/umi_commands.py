"""The UMI commands, umi_tools' dedup, count, group and count_tab, under
umi_tools' option names (``--extract-umi-method``, ``--umi-tag``,
``--per-gene``, ``--paired``, ``--random-seed``, …; see
docs/presets/dedup_count.md for the table). The options the three BAM
commands share are declared once (:data:`UMI_OPTIONS`) and added to each
command's signature by :func:`umi_options`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    CELL_TAG,
    FORCE,
    METHOD,
    SHARDED_WORKERS,
    Common,
    _counted,
    _existing_file,
    _written_to,
    command,
    folder_output,
    input_argument,
    output_option,
    stream_output,
    workers_option,
)


def _choice(*choices: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return check


PAIR_CHOICES = ("discard", "use")
GROUP_PAIR_CHOICES = ("discard", "use", "output")


def _option(default: Any, *names: str, help: str, **settings: Any) -> Any:
    return typer.Option(default, *names, help=help, **settings)


# name → (annotation, typer option): umi_tools' option names (and bamflow's old spellings as aliases)
UMI_OPTIONS: dict[str, tuple[Any, Any]] = {
    "method": (str, METHOD),
    "extract_umi_method": (str, _option("tag", "--extract-umi-method", callback=_choice("tag", "read_id", "umis"),
                                        help="Where the UMI (and cell) is: tag, read_id (…_UMI) or umis (UMI_…).")),
    "umi_tag": (str, _option("UB", "--umi-tag", help="UMI tag (with --extract-umi-method tag).")),
    "umi": (str | None, _option(None, "--umi", help="Old spelling: tag:XX, read_name (…_UMI) or read_name_cell (…_CELL_UMI).")),
    "umi_separator": (str, _option("_", "--umi-separator", help="Separator before the UMI in read names (read_id).")),
    "umi_tag_split": (str | None, _option(None, "--umi-tag-split", help="Keep the UMI tag up to this separator.")),
    "umi_tag_delimiter": (str | None, _option(None, "--umi-tag-delimiter", help="Remove this from the UMI tag.")),
    "cell_tag": (str, CELL_TAG),
    "cell_tag_split": (str | None, _option(None, "--cell-tag-split",
                                           help="Keep the cell tag up to this separator (umi_tools: '-'; bamflow: none).")),
    "cell_tag_delimiter": (str | None, _option(None, "--cell-tag-delimiter", help="Remove this from the cell tag.")),
    "per_cell": (bool, _option(True, "--per-cell/--not-per-cell", help="Per cell (bamflow's default: on).")),
    "per_gene": (bool, _option(False, "--per-gene", help="Group per gene (--gene-tag or --per-contig) instead of position.")),
    "gene_tag": (str | None, _option(None, "--gene-tag", help="Gene tag (implies --per-gene).")),
    "assigned_status_tag": (str | None, _option(None, "--assigned-status-tag",
                                                help="Tag --skip-tags-regex looks at (default: the gene tag).")),
    "skip_tags_regex": (str, _option(r"^(__|Unassigned)", "--skip-tags-regex", help="Skip reads whose gene matches this.")),
    "per_contig": (bool, _option(False, "--per-contig", help="The reference is the gene (transcriptome).")),
    "edit_distance_threshold": (int, _option(1, "--edit-distance-threshold", min=0, help="UMIs this close join.")),
    "spliced_is_unique": (bool, _option(False, "--spliced-is-unique", help="A spliced read differs from an unspliced one.")),
    "soft_clip_threshold": (float, _option(4.0, "--soft-clip-threshold",
                                           help="3' soft clip longer than this counts as spliced.")),
    "read_length": (bool, _option(False, "--read-length", help="Reads of other lengths are not duplicates.")),
    "mapping_quality": (int, _option(0, "--mapping-quality", min=0, help="Skip reads below this MAPQ.")),
    "ignore_umi": (bool, _option(False, "--ignore-umi", help="Deduplicate on position only.")),
    "ignore_tlen": (bool, _option(False, "--ignore-tlen", help="--paired: template length is not part of the key.")),
    "chrom": (str | None, _option(None, "--chrom", help="Only this reference.")),
    "subset": (float | None, _option(None, "--subset", min=0.0, max=1.0, help="Use only this fraction of the reads.")),
    "paired": (bool, _option(False, "--paired", help="Paired-end: read 1 decides, its mate goes with it.")),
    "unmapped_reads": (str, _option("discard", "--unmapped-reads", callback=_choice(*PAIR_CHOICES),
                                    help="Read 1 with its mate unmapped (--paired): discard or use.")),
    "chimeric_pairs": (str, _option("use", "--chimeric-pairs", callback=_choice(*PAIR_CHOICES),
                                    help="Mates on two references: discard or use.")),
    "unpaired_reads": (str, _option("use", "--unpaired-reads", callback=_choice(*PAIR_CHOICES),
                                    help="Reads without a mate (--paired): discard or use.")),
    "buffer_whole_contig": (bool, _option(False, "--buffer-whole-contig", help="Hold a whole reference before grouping.")),
    "multimapping_detection_method": (str | None, _option(None, "--multimapping-detection-method",
                                                          callback=_choice("NH", "X0", "XT"),
                                                          help="NH, X0 or XT: prefer uniquely mapped reads.")),
    "random_seed": (int | None, _option(None, "--random-seed",
                                        help="umi_tools' draws among equal-MAPQ reads: the same reads kept (one worker).")),
}
GROUP_CHOICES = {
    name: (str, _option(default, f"--{name.replace('_', '-')}", callback=_choice(*GROUP_PAIR_CHOICES),
                        help=f"{name.replace('_', ' ').capitalize()}: discard, use or output (written without a group)."))
    for name, default in (("unmapped_reads", "discard"), ("chimeric_pairs", "use"), ("unpaired_reads", "use"))
}
COUNT_SKIPS = ("per_gene", "gene_tag", "ignore_umi", "buffer_whole_contig", "multimapping_detection_method", "umi")


def umi_options(*, skip: tuple[str, ...] = (), replace: dict[str, tuple[Any, Any]] | None = None) -> Callable[..., Any]:
    """Add :data:`UMI_OPTIONS` (but ``skip``; ``replace`` some) to a command's
    signature, before the shared ones; the function gets them in ``**umi``."""

    def add(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        common = [p for p in own if p.name == "common"]
        table = {**UMI_OPTIONS, **(replace or {})}
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
                 for name, (annotation, option) in table.items() if name not in skip]

        @functools.wraps(func)
        def call(**arguments: Any) -> Any:
            return func(**arguments)

        call.__signature__ = inspect.Signature([p for p in own if p.name != "common"] + added + common)  # type: ignore[attr-defined]
        return call

    return add


def _umi_arguments(umi: dict[str, Any]) -> dict[str, Any]:
    """The UMI options for the Python API: ``--umi`` (old spelling) wins over --extract-umi-method/--umi-tag."""
    options = dict(umi)
    if options.get("umi") is None:
        options.pop("umi", None)
    else:
        options.pop("extract_umi_method", None)
        options.pop("umi_tag", None)
    return options


@command("Example: bamflow dedup --method directional in.bam -o dedup.bam", cluster=True)
@umi_options()
def dedup(
    input: Annotated[str, input_argument("Coordinate-sorted BAM; - for stdin.")],
    output: Annotated[str | None, typer.Option(
        "-o", "--output", "-S", "--stdout", help="Deduplicated BAM (default: standard output, unless a terminal).")] = None,
    mark: bool = typer.Option(False, "--mark", help="Flag duplicates (0x400) instead of removing them."),
    umi_whitelist: Path | None = typer.Option(None, "--umi-whitelist", callback=_existing_file,
                                              help="Drop UMI groups whose top UMI is not in this list."),
    output_stats: str | None = typer.Option(None, "--output-stats", help="Prefix of umi_tools' three statistics tables."),
    no_sort_output: bool = typer.Option(False, "--no-sort-output", help="umi_tools' bundle order, not coordinates."),
    workers: int = workers_option(SHARDED_WORKERS),
    *,
    common: Common,
    **given: Any,
) -> None:
    """UMI deduplication by alignment position, as umi_tools dedup does (its options, its reads with --random-seed)."""
    from bamflow.presets.dedup import dedup as dedup_reads

    output = stream_output(output)
    if common.cluster and output == "-":
        raise typer.BadParameter("with --cluster the output is a file: give -o OUT.bam", param_hint="'-o' / '--output'")
    common.run(dedup_reads, input, output, workers=workers, mark=mark, umi_whitelist=umi_whitelist,
               output_stats=output_stats, no_sort_output=no_sort_output, **_umi_arguments(given),
               tally=_written_to(output),
               key_numbers=lambda r: {"kept": r["kept"], "mates": r["mates"], "workers": r.get("workers", "-")})


@command("Example: bamflow count --gene-tag GX in.bam -o counts/", level=False, cluster=True)
@umi_options(skip=COUNT_SKIPS)
def count(
    input: Annotated[str, input_argument("BAM with cell, UMI and gene tags; - for stdin.")],
    output: Annotated[Path | None, output_option(
        "Folder: counts.tsv, matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz, counts.h5ad. Default: INPUT.counts")] = None,
    gene_tag: str = typer.Option("GX", "--gene-tag", help="Gene id tag (umi_tools count's --per-gene --gene-tag)."),
    name_tag: str = typer.Option("GN", "--name-tag", "--gene-name-tag", help="Gene name tag (features.tsv)."),
    cells: Path | None = typer.Option(None, "--cells", callback=_existing_file,
                                      help="Only these cells: one barcode a line, or qc's per_cell.tsv (its called cells)."),
    min_umis: int | None = typer.Option(None, "--min-umis", min=1, help="Only cells with at least N UMIs."),
    wide_format_cell_counts: bool = typer.Option(False, "--wide-format-cell-counts", help="counts.tsv as genes × cells."),
    formats: str = typer.Option("mtx,tsv,h5ad", "--formats", help="Outputs: any of mtx, tsv, h5ad (comma-separated)."),
    force: bool = FORCE,
    workers: int = workers_option(SHARDED_WORKERS),
    *,
    common: Common,
    **given: Any,
) -> None:
    """UMI molecules per gene and cell (umi_tools count --per-gene [--per-cell]) → counts.tsv, 10x MTX, h5ad."""
    from bamflow.presets.count import count as count_umis

    folder = folder_output(output, input, "counts")
    options = _umi_arguments(given)
    if not options.get("per_cell", True) and formats == "mtx,tsv,h5ad":
        formats = "tsv"
    common.run(count_umis, input, folder, gene_tag=gene_tag, name_tag=name_tag, cells=cells, min_umis=min_umis,
               wide_format_cell_counts=wide_format_cell_counts, formats=tuple(f for f in formats.split(",") if f),
               force=force, workers=workers, **options, tally=_counted,
               key_numbers=lambda r: {"molecules": r["molecules"], "genes": r["genes"], "cells": r.get("cells", "-")},
               output=folder if output is None else None)


@command("Example: bamflow group --group-out groups.tsv in.bam -o grouped.bam")
@umi_options(replace=GROUP_CHOICES)
def group(
    input: Annotated[str, input_argument("Coordinate-sorted BAM; - for stdin.")],
    output: Annotated[str | None, typer.Option(
        "-o", "--output", "-S", "--stdout", help="BAM with UG and BX tags (umi_tools' --output-bam).")] = None,
    group_out: str | None = typer.Option(None, "--group-out", help="umi_tools' table: read, position, UMI, group."),
    output_bam: bool = typer.Option(False, "--output-bam", help="Accepted for umi_tools' command lines (-o writes the BAM)."),
    umi_group_tag: str = typer.Option("BX", "--umi-group-tag", help="Tag for the group's top UMI."),
    no_sort_output: bool = typer.Option(False, "--no-sort-output", help="umi_tools' bundle order, not coordinates."),
    *,
    common: Common,
    **given: Any,
) -> None:
    """UMI groups (umi_tools group): every read tagged with its group (UG) and top UMI (BX), and/or the group table."""
    from bamflow.presets.group import group as group_reads

    if output is None and group_out is None:
        output = stream_output(None)
    def tally(r: dict[str, Any]) -> tuple[int, dict[str, int], dict[str, int]]:
        return r["reads_in"], {output or group_out or "-": r["grouped"] + r["singles"]}, r["dropped"]

    common.run(group_reads, input, output, group_out=group_out, umi_group_tag=umi_group_tag,
               no_sort_output=no_sort_output, **_umi_arguments(given), tally=tally,
               key_numbers=lambda r: {"groups": r["groups"], "without a group": r["singles"]})


@command("Example: bamflow count-tab --per-cell assigned.tsv -o counts.tsv", name="count-tab", level=False)
def count_tab(
    input: Annotated[str, input_argument("read_id<TAB>gene lines (gzip ok; - for stdin).")],
    output: Annotated[str | None, output_option("Counts table (default: standard output).")] = None,
    method: str = METHOD,
    edit_distance_threshold: int = typer.Option(1, "--edit-distance-threshold", min=0, help="UMIs this close join."),
    barcode_separator: str = typer.Option("_", "--barcode-separator", help="Separator before the UMI (and cell)."),
    per_cell: bool = typer.Option(False, "--per-cell", help="The read id ends _CELL_UMI: count per cell."),
    *,
    common: Common,
) -> None:
    """UMI molecules per gene (and cell) from read id/gene lines (umi_tools count_tab)."""
    from bamflow.presets.group import count_tab as count_table

    target = output or "-"
    common.run(count_table, input, target, method=method, edit_distance_threshold=edit_distance_threshold,
               barcode_separator=barcode_separator, per_cell=per_cell,
               tally=lambda r: (r["reads_in"], {target: r["reads_in"]}, {}),
               key_numbers=lambda r: {"molecules": r["molecules"]})
