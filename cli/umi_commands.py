"""The UMI commands: dedup and count (umi_tools' dedup and count)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CELL_TAG,
    METHOD,
    SHARDED_WORKERS,
    TAGGED_INPUT,
    UMI_TAG,
    Common,
    _counted,
    _existing_file,
    _written_to,
    command,
    input_argument,
    output_option,
    workers_option,
)


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
