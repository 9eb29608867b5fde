"""The single-cell commands: tag, correct, histogram, dedup, count, qc."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    CELL_TAG,
    FORCE,
    GENE_NAME_TAG,
    GENE_TAG,
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
    folder_output,
    input_argument,
    output_option,
    stream_output,
    workers_option,
)

STREAM_OUTPUT = "(default: standard output, unless a terminal)"


@command("Example: bamflow tag --layout 10x-v3 R1.fastq.gz R2.fastq.gz -o unaligned.bam", name="tag")
def tag_fastq(
    read1: Annotated[str, input_argument("Read 1 FASTQ (barcode and UMI; gzip or plain; - for stdin).")],
    read2: Annotated[str, input_argument("Read 2 FASTQ (cDNA).")],
    output: Annotated[str | None, output_option(f"Unaligned BAM to write {STREAM_OUTPUT}.")] = None,
    layout: str = typer.Option(
        "10x-v3", "--layout", help="10x-v2, 10x-v3, dropseq, visium, slideseq, or CB=r1[0:16],UMI=r1[16:28]."
    ),
    sample: str = typer.Option("sample", "--sample", help="Sample name for the read group."),
    *,
    common: Common,
) -> None:
    """FASTQ pair → unaligned BAM with raw barcode and UMI tags (CR CY UR UY) and a read group."""
    from bamflow.presets.tag import tag

    output = stream_output(output)
    common.run(tag, read1, read2, output, layout=layout, sample=sample, tally=_written_to(output))


@command("Example: bamflow correct --whitelist 3M-february-2018.txt.gz in.bam -o corrected.bam", cluster=True)
def correct(
    input: Annotated[str, input_argument("BAM with raw barcodes (CR, qualities in CY).")],
    output: Annotated[str | None, output_option(f"BAM with corrected barcodes (CB) {STREAM_OUTPUT}.")] = None,
    whitelist: Path = typer.Option(
        ..., "--whitelist", callback=_existing_file, help="Barcode whitelist, one per line (gzip ok)."
    ),
    workers: int = workers_option(),
    *,
    common: Common,
) -> None:
    """Correct cell barcodes against a whitelist as Cell Ranger does (exact, else 1 mismatch by posterior)."""
    from bamflow.presets.correct import correct as correct_barcodes

    output = stream_output(output)

    def key_numbers(result: dict[str, Any]) -> dict[str, Any]:
        keys = ("exact", "corrected", "ambiguous", "uncorrectable", "missing_tag", "barcodes_seen", "whitelist")
        return {key: result[key] for key in keys if key in result}

    common.run(correct_barcodes, input, output, whitelist=whitelist, workers=workers, tally=_written_to(output),
               key_numbers=key_numbers)


@command("Example: bamflow histogram --tag CB in.bam -o reads_per_cell.txt.gz", level=False)
def histogram(
    input: Annotated[str, INPUT],
    output: Annotated[str | None, output_option(f"count<TAB>value lines (.gz: gzip) {STREAM_OUTPUT}.")] = None,
    tag: str = typer.Option("CB", "--by", "--tag", help="The tag to count reads of."),
    read_quality: int | None = typer.Option(None, "--read-quality", min=0, help="Skip reads below this MAPQ."),
    filter_pcr_duplicates: bool = typer.Option(False, "--filter-pcr-duplicates", help="Skip reads flagged as duplicates."),
    workers: int = workers_option("Counting processes.", default=1),
    *,
    common: Common,
) -> None:
    """Reads per tag value (Drop-seq BamTagHistogram), secondary alignments skipped."""
    from bamflow.presets.histogram import histogram as tag_histogram

    output = stream_output(output)
    options = dict(tag=tag, read_quality=read_quality, filter_pcr_duplicates=filter_pcr_duplicates)
    common.run(tag_histogram, input, output, workers=workers, **options, tally=_written_to(output),
               key_numbers=lambda result: {"values": result.get("values")})


@command("Example: bamflow qc in.bam   (in.qc/report.html, cells.txt, per_cell.tsv …)", level=False)
def qc(
    input: Annotated[str, TAGGED_INPUT],
    output: Annotated[
        Path | None,
        output_option("Folder: report.html, cells.txt, per_cell.tsv, summary.json, knee.svg/png. Default: INPUT.qc"),
    ] = None,
    method: str = METHOD,
    cell_tag: str = CELL_TAG,
    umi_tag: str = UMI_TAG,
    gene_tag: str = GENE_TAG,
    gene_name_tag: str = GENE_NAME_TAG,
    min_umis: int | None = typer.Option(None, "--min-umis", min=0, help="Call cells with at least N UMIs (default: the knee)."),
    workers: int = workers_option(SHARDED_WORKERS),
    force: bool = FORCE,
    *,
    common: Common,
) -> None:
    """Per-cell QC and a web summary: cells, reads and genes per cell, saturation, mitochondrial fraction.

    Writes a self-contained report.html (open it in a browser; works offline),
    cells.txt (the called cells, for count --cells), per_cell.tsv and summary.json.
    """
    from bamflow.presets.qc import key_numbers
    from bamflow.presets.qc import qc as run_qc

    folder = folder_output(output, input, "qc")
    options = dict(method=method, cell_tag=cell_tag, umi_tag=umi_tag, gene_tag=gene_tag, gene_name_tag=gene_name_tag,
                   min_umis=min_umis)

    def numbers(summary: dict[str, Any]) -> dict[str, Any]:
        found = key_numbers(summary)
        for warning in summary.get("warnings", []):
            found[f"warning: {warning['title']}"] = warning["detail"]
        found["report"] = summary["outputs"]["report.html"]
        return found

    common.run(run_qc, input, folder, workers=workers, force=force, **options, tally=_counted, key_numbers=numbers)
