"""Shard a BAM by cell barcode (or any tags, or read name) into N BAMs.

    decode ─▶ distribute by key ─▶ shard0 ─▶ encode ─▶ DIR/shard_000.bam
                                 ├▶ ...    ─▶ encode ─▶ ...
                                 └▶ unassigned ─▶ encode ─▶ DIR/unassigned.bam

All reads with one key value land in one shard (a stable hash of the full
value, the same on every run and machine). A manifest lists every value with
its shard and read count; the books must balance or the run fails.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.errors import WorkflowError
from ..engine.fifo import FIFO
from ..engine.publish import Publication
from ..kernels._records import stable_hash
from .header import command_line as process_command_line
from .options import DecodeOptions, DistributeOptions, EncodeOptions, parse_key
from .stages import source_name
from .workflow import BamWorkflow, require_tags

log = logging.getLogger("bamflow")



@dataclass
class ShardResult:
    """What :func:`shard` wrote, and the books."""

    reads_in: int
    written: dict[str, int]  # output file → reads
    dropped: dict[str, int]
    manifest: str | None
    values: int = 0
    balance: dict[str, float] = field(default_factory=dict)
    job_stats: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reads_in": self.reads_in,
            "written": dict(self.written),
            "reads_written": sum(self.written.values()),
            "dropped": dict(self.dropped),
            "manifest": self.manifest,
            "values": self.values,
            "balance": dict(self.balance),
            "job_stats": dict(self.job_stats),
        }


def shard_file_name(prefix: str, index: int, n: int) -> str:
    return f"{prefix}_{index:0{max(3, len(str(n - 1)))}d}.bam"


def balance_report(reads_per_shard: Sequence[int]) -> dict[str, float]:
    """min, max, mean reads per shard; max/mean (1.0 is perfect) and the CV."""
    if not reads_per_shard:
        return {}
    mean = statistics.fmean(reads_per_shard)
    return {
        "min": float(min(reads_per_shard)),
        "max": float(max(reads_per_shard)),
        "mean": mean,
        "max_over_mean": max(reads_per_shard) / mean if mean else 0.0,
        "cv": statistics.pstdev(reads_per_shard) / mean if mean else 0.0,
    }


def shard(
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    by: str | Sequence[str] = "CB",
    n: int = 16,
    missing: str = "unassigned",
    threads: int = 2,
    level: int | str | None = None,
    prefix: str = "shard",
    manifest: bool = True,
    force: bool = False,
    command_line: str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> ShardResult:
    """Split ``input`` into ``n`` BAMs in ``out_dir`` so that all reads with the
    same ``by`` value(s) (``"CB"``, ``"CB,UB"``, or ``"name"`` for read names)
    are in the same file. Reads without the tag: ``missing="unassigned"``
    (to ``unassigned.bam``), ``"drop"`` (counted) or ``"error"``.
    ``threads`` decompress the input; each shard compresses in its own process.
    A folder holding an earlier run's outputs is refused unless ``force``
    (which replaces them whole; see bamflow.engine.publish).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    key = parse_key(by)
    if key is None:
        raise ValueError("shard needs by= a tag (e.g. 'CB'), tags ('CB,UB') or 'name'")
    by_tags = isinstance(key, tuple)
    distribute = DistributeOptions(by=key, missing=missing if by_tags else "error", count_values=by_tags and manifest)
    if os.sep in prefix or "\0" in prefix or prefix.startswith(".") or not prefix:
        raise ValueError(f"prefix must be a plain file name start, not {prefix!r}")
    out_dir = os.fspath(out_dir)
    encode = EncodeOptions(
        **({} if level is None else {"level": level}), threads=1, command_line=command_line or process_command_line()
    )
    unassigned = distribute.by_tags and missing == "unassigned"
    names = [shard_file_name(prefix, i, n) for i in range(n)] + (["unassigned.bam"] if unassigned else [])

    w = BamWorkflow("shard")
    w.BAM_reader(input=os.fspath(input), output=FIFO("decoded", "wb"), options=DecodeOptions(threads))
    w.distribute_bam(
        input=FIFO("decoded", "rb"),
        outputs=FIFO("shard{n}", "wb", n=n),
        unassigned=FIFO("unassigned", "wb") if unassigned else None,
        options=distribute,
        source=source_name(os.fspath(input)),
    )
    distributor = w.last[0]
    writers = []
    for i, name in enumerate(names):
        fifo = FIFO("unassigned" if i == n else f"shard{i}", "rb")
        w.BAM_writer(input=fifo, output=os.path.join(out_dir, name), options=encode)
        writers.append(w.last[0])
    results: list[ShardResult] = []

    def check(w: BamWorkflow) -> None:
        """The books, before any shard appears: every read the distributor dealt
        is in its shard (counted by that shard's writer), or dropped."""
        dist = w.result(distributor)
        if by_tags:
            require_tags(key, dist["records"], dist["tags_seen"])
        dealt = list(dist["per_output"]) + ([dist["unassigned"]] if unassigned else [])
        written = {name: r["records"] for name, r in zip(names, w.result(writers), strict=True)}
        if list(written.values()) != dealt:
            raise WorkflowError(f"reads do not add up: dealt to shards {dealt}, written {list(written.values())}")
        dropped = {"missing_tag": dist["dropped_missing_tag"]} if dist["dropped_missing_tag"] else {}
        if dist["records"] != sum(written.values()) + sum(dropped.values()):
            raise WorkflowError(f"reads do not add up: {dist['records']} in, {written} written, {dropped} dropped")
        if "values" in dist and sum(dist["values"].values()) != sum(dist["per_output"]):
            raise WorkflowError("the manifest's read counts do not add up to the reads written to shards")
        results.append(
            ShardResult(
                reads_in=dist["records"],
                written=written,
                dropped=dropped,
                manifest=None,
                balance=balance_report(dist["per_output"]),
                job_stats=dict(w.job_stats),
            )
        )

    with Publication() as pub:
        pub.claim_folder(out_dir, force=force, inputs=[os.fspath(input)])
        w.run(timeout=timeout, on_progress=on_progress, check=check, publication=pub)
        result = results[0]
        dist = w.result(distributor)
        if "values" in dist:
            result.values = len(dist["values"])
            result.manifest = write_manifest(pub, os.path.join(out_dir, "manifest.tsv"), dist["values"], names[:n])
        pub.commit()
    log.info("shard %s → %s: %s", input, out_dir, result.as_dict())
    return result


def write_manifest(pub: Publication, path: str, values: dict[bytes, int], shard_names: list[str]) -> str:
    """value, shard file and reads per key value (TSV, sorted by value), published with the shards."""
    rows = ((value, shard_names[stable_hash(value) % len(shard_names)], values[value]) for value in sorted(values))
    return pub.write_tsv(path, ("value", "shard", "reads"), rows)
