"""The single-cell commands: tag, correct, histogram, dedup, count, qc."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CELL_TAG,
    INPUT,
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
