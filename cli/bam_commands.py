"""The BAM commands: shard, split, filter, run."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    FORCE,
    INPUT,
    Common,
    Tally,
    _existing_file,
    _per_output,
    _written_to,
    command,
    folder_output,
    output_option,
    stream_output,
    workers_option,
)


@command("Example: bamflow shard --by CB in.bam   (16 shards in in.shards/)", cluster=True)
def shard(
    input: Annotated[str, INPUT],
    output: Annotated[Path | None, output_option("Folder for the shards (created if missing). Default: INPUT.shards")] = None,
    by: str = typer.Option("CB", "--by", help="Tag(s) to shard by (CB, or CB,UB), or 'name' for read names."),
    n: int = typer.Option(16, "-n", "--shards", min=1, help="Number of shards."),
    missing: str = typer.Option("unassigned", "--missing", help="Reads without the tag: unassigned (own file), drop, error."),
    prefix: str = typer.Option("shard", "--prefix", help="Shard file names: PREFIX_000.bam …"),
    force: bool = FORCE,
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
    folder = folder_output(output, input, "shards")

    def key_numbers(result: dict[str, Any]) -> dict[str, Any]:
        balance = result["balance"]
        numbers: dict[str, Any] = {"values": result["values"]}
        if balance:
            numbers["balance"] = (
                f"{balance['min']:,.0f}–{balance['max']:,.0f} reads per shard, "
                f"max/mean {balance['max_over_mean']:.2f}, CV {balance['cv']:.3f}"
            )
        if result.get("manifest"):
            numbers["manifest"] = result["manifest"]
        return numbers

    common.run(
        shard_bam, input, folder, by=by, n=n, missing=missing, prefix=prefix, force=force, tally=_per_output,
        key_numbers=key_numbers, output=folder if output is None else None,
    )


@command("Example: bamflow split --by CB --min-reads 100 in.bam   (one BAM per cell in in.cells/)", cluster=True)
def split(
    input: Annotated[str, INPUT],
    output: Annotated[
        Path | None, output_option("Folder for the outputs (created if missing). Default: INPUT.cells (or .groups, .split)")
    ] = None,
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
    force: bool = FORCE,
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

    folder = folder_output(output, input, "groups" if groups is not None else "cells" if by == "CB" else "split")

    def tally(result: dict[str, Any]) -> Tally:
        return result["records_in"], {f"{result['files']:,} files": result["written"]}, result["dropped"]

    def key_numbers(result: dict[str, Any]) -> dict[str, Any]:
        return {"files": result["files"], "manifest": result.get("manifest")}

    options = dict(by=by, values=barcodes, groups=groups, min_reads=min_reads, memory_budget=memory << 20, prefix=prefix,
                   force=force)
    common.run(split_reads, input, folder, workers=workers, **options, tally=tally, key_numbers=key_numbers,
               output=folder if output is None else None)


@command("Example: bamflow filter --barcodes cells.txt in.bam > subset.bam")
def filter(
    input: Annotated[str, INPUT],
    output: Annotated[str | None, output_option("Output BAM (default: standard output, unless a terminal).")] = None,
    barcodes: Path = typer.Option(
        ..., "--barcodes", callback=_existing_file, help="Values to keep, one per line (gzip ok); any number."
    ),
    tag: str = typer.Option("CB", "--by", "--tag", help="The tag (or tags, CB,UB) to look up."),
    invert: bool = typer.Option(False, "--invert", help="Keep the reads whose value is NOT listed."),
    *,
    common: Common,
) -> None:
    """Keep the reads whose tag value is in a list (like subset-bam or samtools view -D).

    Reads without the tag are dropped (and counted), with or without --invert.
    """
    from bamflow.bam.split import filter_reads

    output = stream_output(output)

    def tally(result: dict[str, Any]) -> Tally:
        dropped = {"not_listed": result["dropped_not_listed"], "missing_tag": result["dropped_missing_tag"]}
        return result["records_in"], {output: result["kept"]}, dropped

    common.run(filter_reads, input, output, tag=tag, values=barcodes, invert=invert, tally=tally,
               key_numbers=lambda result: {"kept": result["kept"], "values listed": result.get("values")})


@command("Example: bamflow run my_module:fix_read --by CB -w 4 in.bam -o out.bam")
def run(
    function: Annotated[
        str, typer.Argument(help="MODULE:FUNC or path/to/file.py:FUNC; FUNC(read) returns the read, None or reads.")
    ],
    input: Annotated[str, INPUT],
    output: Annotated[str | None, output_option("Output BAM (default: standard output, unless a terminal).")] = None,
    by: str | None = typer.Option(None, "--by", help="Send reads with the same tag value(s) (CB, CB,UB) or 'name' together."),
    workers: int = workers_option(),
    order: str = typer.Option("input", "--order", help="Output order: input, any, coordinate, tag:XX."),
    missing: str = typer.Option("error", "--missing", help="Reads without the --by tag: error or drop."),
    chunk_size: int = typer.Option(1000, "--chunk-size", min=1, help="Reads dealt to a worker at a time (without --by)."),
    fmt: str = typer.Option("bam", "--format", help="Output format: bam, ubam (uncompressed) or sam."),
    record: str = typer.Option(
        "bamflow", "--record", help="What FUNC gets: bamflow (a bamflow.Record, fast) or pysam (a pysam.AlignedSegment)."
    ),
    *,
    common: Common,
) -> None:
    """Run your per-read Python function over a BAM in parallel worker processes."""
    from bamflow.bam.api import map_reads

    if missing not in ("error", "drop"):
        raise typer.BadParameter("must be error or drop", param_hint="--missing")
    if record not in ("bamflow", "pysam"):
        raise typer.BadParameter("must be bamflow or pysam", param_hint="--record")
    if fmt not in ("bam", "ubam", "sam"):
        raise typer.BadParameter("must be bam, ubam or sam", param_hint="--format")
    if not (order in ("input", "any", "coordinate") or (order.startswith("tag:") and len(order) == 6)):
        raise typer.BadParameter("must be input, any, coordinate or tag:XX", param_hint="--order")
    if order == "input" and by is not None:
        order = "any"  # sharding by a key cannot keep the input order
    output = stream_output(output)
    func = _load_function(function)
    options = dict(by=by, order=order, chunk_size=chunk_size, missing=missing, fmt=fmt, record=record)

    def key_numbers(result: dict[str, Any]) -> dict[str, Any]:
        return {"added by the function": result.get("added", 0)} if result.get("added") else {}

    common.run(map_reads, input, func, output, workers=workers, **options, tally=_written_to(output), key_numbers=key_numbers)


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
