"""The tasks of a cluster run. Each runs on a Dask worker inside
:func:`~bamflow.distributed.executor.run_task`, as ``task(ctx, folder,
report, **arguments)``: it writes its files into ``folder`` (its attempt's
private folder), passes ``report`` as the ``on_progress`` of the local
workflows it runs, and returns a small dict.

Map (one per partition)::

    read_partition ─▶ distribute_bam by cell ─▶ bucket_0.bam … bucket_R-1.bam, unassigned.bam
                                                (raw BAM streams: header + records, no compression;
                                                 BGZF at the run's shuffle level, if it has one)

    shard's map:  read_partition ─▶ distribute_bam by key ─▶ BAM_writer × n (+ unassigned), as ``shard``
    correct's:    read_partition ─▶ count_worker (raw barcodes), then
                  read_partition ─▶ correct_worker (the run's counts) ─▶ BAM_writer

Reduce (one per bucket): its bucket's parts of every map task, joined in
partition order into one input (a cell's reads are all there, in input
order), then the preset's own public function on it (``dedup``, ``count``,
``split_reads`` …): a normal local bamflow run.

Gather: BAMs joined block by block (:func:`~bamflow.bam.concat.concat_bams`),
or merged by coordinate when the output must stay sorted — in one task
(:func:`gather_bam`), or one task per coordinate range (:func:`merge_range`)
whose BAMs are then joined; count tables stacked (a cell is in one bucket);
shard files and manifests joined.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from typing import Any

from ..bam.concat import concat_bams, concat_raw
from ..bam.options import CollectOptions, DistributeOptions, EncodeOptions
from ..bam.partition import Partition, VOffset, read_partition, split_points
from ..bam.stages import collect_records, distribute_records
from ..bam.workflow import BamWorkflow
from ..engine.errors import WorkflowError
from ..engine.fifo import FIFO
from ..engine.publish import Publication
from .executor import TaskContext

UNASSIGNED = "unassigned.bam"
#: how a task's workflows start their processes: a Dask worker's own default
#: is spawn, which would start a fresh interpreter for every job
START_METHOD = "fork"


def bucket_name(b: int) -> str:
    """A bucket's file in a map task's folder: a raw BAM stream, or BGZF with a shuffle level."""
    return f"bucket_{b}.bam"


def _reader(w: BamWorkflow, partition: Partition, header: bytes, threads: int) -> None:
    w.add_job(func=read_partition, job_name="{workflow}.partition{n}", output=FIFO("decoded", "wb"),
              partition=partition, header=header, threads=threads)


def _books(dist: dict[str, Any], outputs: list[int], what: str) -> None:
    """A map task's books: every record it read went to an output, or was dropped."""
    if dist["records"] != sum(outputs) + dist["unassigned"] + dist["dropped_missing_tag"]:
        raise WorkflowError(f"{what}: reads do not add up: {dist['records']} read, {sum(outputs)} to outputs, "
                            f"{dist['unassigned']} unassigned, {dist['dropped_missing_tag']} dropped")


# -- map ------------------------------------------------------------------------------------------


def map_buckets(ctx: TaskContext, folder: str, report: Any, *, partition: Partition, header: bytes,
                key: tuple[str, ...], buckets: int, threads: int, start_method: str | None = None,
                level: int | str | None = None) -> dict[str, Any]:
    """Deal the records of ``partition`` into ``buckets`` files by the stable
    hash of their ``key`` tags (the hash shard uses: a cell lands in one
    bucket); records without the key go to ``unassigned.bam``. The files
    are raw BAM streams, or with ``level`` BGZF at that level (dealt into
    raw files on the worker's own disk first, then compressed in ``threads``
    threads: less for the shared filesystem to carry, more CPU)."""
    import shutil
    import tempfile

    local = folder if level is None else tempfile.mkdtemp(prefix="bamflow-map-")
    names = [bucket_name(b) for b in range(buckets)] + [UNASSIGNED]
    try:
        w = BamWorkflow(f"map{ctx.index}", start_method=start_method or START_METHOD)
        _reader(w, partition, header, threads)
        w.distribute_bam(input=FIFO("decoded", "rb"), outputs=[os.path.join(local, n) for n in names[:-1]],
                         unassigned=os.path.join(local, UNASSIGNED),
                         options=DistributeOptions(by=key, missing="unassigned"), source=partition.path,
                         func=distribute_records)
        dist = w.last[0]
        w.run(on_progress=report)
        if level is not None:
            compress_files([(os.path.join(local, n), os.path.join(folder, n)) for n in names], level, threads)
    finally:
        if local != folder:
            shutil.rmtree(local, ignore_errors=True)
    result = w.result(dist)
    _books(result, result["per_output"], f"map task {ctx.index}")
    return {"records": result["records"], "per_bucket": list(result["per_output"]), "unassigned": result["unassigned"],
            "tags_seen": list(result["tags_seen"]), "bytes": result["bytes"],
            "files_bytes": sum(os.path.getsize(os.path.join(folder, n)) for n in names)}


def compress_files(pairs: list[tuple[str, str]], level: int | str, threads: int) -> None:
    """Each (raw BAM stream file, BGZF file to write), ``threads`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from ..bam.bgzf import BgzfWriter

    def one(pair: tuple[str, str]) -> None:
        source, target = pair
        with open(source, "rb") as f, BgzfWriter(target, level=level, threads=0) as w:
            while data := f.read(1 << 20):
                w.write(data)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, pairs))


def map_shard(ctx: TaskContext, folder: str, report: Any, *, partition: Partition, header: bytes, key: Any,
              n: int, missing: str, names: list[str], encode: EncodeOptions, count_values: bool, threads: int,
              start_method: str | None = None) -> dict[str, Any]:
    """``shard`` on one partition: the same distribution, the same writers
    (compressed at the run's level, its @PG); the reads per key value go to
    ``values.pickle`` for the manifest."""
    w = BamWorkflow(f"map{ctx.index}", start_method=start_method or START_METHOD)
    _reader(w, partition, header, threads)
    unassigned = len(names) > n
    w.distribute_bam(input=FIFO("decoded", "rb"), outputs=FIFO("shard{n}", "wb", n=n),
                     unassigned=FIFO("unassigned", "wb") if unassigned else None,
                     options=DistributeOptions(by=key, missing=missing, count_values=count_values),
                     source=partition.path)
    dist = w.last[0]
    writers = []
    for i, name in enumerate(names):
        w.add_job(func=_encode, job_name="{workflow}.BAM_writer{n}",
                  input=FIFO("unassigned" if i == n else f"shard{i}", "rb"), output=os.path.join(folder, name),
                  options=encode)
        writers.append(w.last[0])
    w.run(on_progress=report)
    result = w.result(dist)
    written = [r["records"] for r in w.result(writers)]
    dealt = list(result["per_output"]) + ([result["unassigned"]] if unassigned else [])
    if written != dealt:
        raise WorkflowError(f"map task {ctx.index}: reads do not add up: dealt to shards {dealt}, written {written}")
    _books(result, result["per_output"], f"map task {ctx.index}")
    if count_values:
        with open(os.path.join(folder, "values.pickle"), "wb") as f:
            pickle.dump(result.get("values", {}), f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"records": result["records"], "written": written, "dropped_missing_tag": result["dropped_missing_tag"],
            "tags_seen": list(result["tags_seen"]), "bytes": result["bytes"]}


def _encode(input: Any, output: str, options: EncodeOptions) -> dict[str, Any]:
    from ..bam.stages import encode_bam

    return encode_bam(input, output, options)


# -- reduce ---------------------------------------------------------------------------------------


def bucket_input(folder: str, parts: list[str], unassigned: list[str], header_bytes: int, sorted_input: bool,
                 report: Any, compressed: bool = False) -> str:
    """One input of a bucket from its parts (in partition order), the reads
    without a cell after them (merged by coordinate when the input is
    sorted): raw parts joined as a raw BAM stream, BGZF parts block by block."""
    if len(parts) == 1 and not unassigned:
        return parts[0]
    path = os.path.join(folder, "input.bam")
    if unassigned and sorted_input:  # keep the order the preset checks: merge by coordinate, ties to the cells
        w = BamWorkflow("bucket", start_method=START_METHOD)
        w.add_job(func=collect_records, job_name="{workflow}.collect{n}", inputs=parts + unassigned, output=path,
                  options=CollectOptions("coordinate"))
        w.run(on_progress=report)
        report.workflow_done()
    elif compressed:
        concat_bams(parts + unassigned, path)
    else:
        concat_raw(parts + unassigned, header_bytes, path)
    return path


def reduce_preset(ctx: TaskContext, folder: str, report: Any, *, preset: Callable[..., Any], parts: list[str],
                  unassigned: list[str], header_bytes: int, sorted_input: bool, output: str,
                  kwargs: dict[str, Any], split_keys: list[int] | None = None, compressed: bool = False) -> dict[str, Any]:
    """Run ``preset(input, folder/output, **kwargs)`` (a preset's public
    function) on the bucket; returns its stats. With ``split_keys`` (its
    output is a coordinate-sorted BAM): where that output crosses each key
    (``split_points``), for a gather by coordinate range."""
    source = bucket_input(folder, parts, unassigned, header_bytes, sorted_input, report, compressed)
    try:
        stats = preset(source, os.path.join(folder, output), on_progress=report, **kwargs)
    finally:
        if source.startswith(folder):
            os.unlink(source)
    stats = json.loads(json.dumps(stats, default=str))  # plain data (bytes and paths as text)
    if split_keys is not None:
        stats["split_points"] = split_points(os.path.join(folder, output), split_keys)
    return stats


# -- gather ---------------------------------------------------------------------------------------


def gather_bam(ctx: TaskContext, folder: str, report: Any, *, parts: list[str], output: str, merge: bool,
               level: int | str, threads: int) -> dict[str, Any]:
    """One BAM from the reduce outputs: merged by coordinate (recompressed at
    ``level``, in as many threads as the machine has cores, at least
    ``threads``: the gather runs alone, after every other task of the run) or
    joined block by block."""
    path = os.path.join(folder, output)
    threads = max(threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if not merge:
        return {**concat_bams(parts, path), "records": None}
    w = BamWorkflow("gather", start_method=START_METHOD)
    w.add_job(func=collect_records, job_name="{workflow}.collect{n}", inputs=parts, output=FIFO("merged", "wb"),
              options=CollectOptions("coordinate"))
    collector = w.last[0]
    w.BAM_writer(input=FIFO("merged", "rb"), output=path, options=EncodeOptions(level, threads, program=False))
    writer = w.last[0]
    w.run(on_progress=report)
    collected, written = w.result(collector)["records"], w.result(writer)["records"]
    if collected != written:
        raise WorkflowError(f"gather: {collected} records merged, {written} written")
    return {"records": written, "parts": len(parts)}


def merge_range(ctx: TaskContext, folder: str, report: Any, *, ranges: list[tuple[str, VOffset, VOffset]],
                header: bytes, level: int | str, threads: int) -> dict[str, Any]:
    """One coordinate range of the output: the records of every reduce output
    in that range (``ranges``: path, start, end), merged by coordinate and
    compressed into ``part.bam``; the parts of all ranges joined in order are
    the whole merge."""
    w = BamWorkflow("merge", start_method=START_METHOD)
    for i, (path, start, end) in enumerate(ranges):
        w.add_job(func=read_partition, job_name="{workflow}.partition{n}", output=FIFO(f"range{i}", "wb"),
                  partition=Partition(path, i, tuple(start), tuple(end)), header=header, threads=1)
    w.add_job(func=collect_records, job_name="{workflow}.collect{n}", inputs=FIFO("range{n}", "rb", n=len(ranges)),
              output=FIFO("merged", "wb"), options=CollectOptions("coordinate"))
    collector = w.last[0]
    w.BAM_writer(input=FIFO("merged", "rb"), output=os.path.join(folder, "part.bam"),
                 options=EncodeOptions(level, threads, program=False))
    writer = w.last[0]
    w.run(on_progress=report)
    collected, written = w.result(collector)["records"], w.result(writer)["records"]
    if collected != written:
        raise WorkflowError(f"merge task {ctx.index}: {collected} records merged, {written} written")
    return {"records": written}


def gather_files(ctx: TaskContext, folder: str, report: Any, *, files: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """BAMs (name, parts) joined block by block into ``folder``."""
    done = {}
    for name, parts in files:
        done[name] = concat_bams(parts, os.path.join(folder, name))["bytes"]
    return {"files": done}


def gather_manifest(ctx: TaskContext, folder: str, report: Any, *, parts: list[str], names: list[str]) -> dict[str, Any]:
    """shard's manifest from the map tasks' reads per value."""
    from ..bam.shard import write_manifest

    values: dict[bytes, int] = {}
    for part in parts:
        with open(part, "rb") as f:
            for value, n in pickle.load(f).items():
                values[value] = values.get(value, 0) + n
    with Publication() as pub:
        write_manifest(pub, os.path.join(folder, "manifest.tsv"), values, names)
        pub.commit()
    return {"values": len(values), "reads": sum(values.values())}


def gather_counts(ctx: TaskContext, folder: str, report: Any, *, parts: list[str], formats: list[str],
                  cells: list[str] | None, min_umis: int | None, wide: bool) -> dict[str, Any]:
    """count's tables from the reduce tasks' matrices: cells stacked (each is
    in one bucket), genes united, written by count's own table writer."""
    from ..presets.count import CountTable

    per_bucket = [read_count_matrix(p) for p in parts]
    table = CountTable.merge(per_bucket, True)
    molecules = int(table.counts.sum()) if len(table.counts) else 0
    if molecules != sum(b["molecules"] for b in per_bucket):
        raise WorkflowError("gather: the molecules of the merged table differ from the buckets' sum")
    out = os.path.join(folder, "out")
    with Publication() as pub:
        pub.make_folder(out)
        written = table.write(pub, out, formats, cells, min_umis, wide)
        pub.commit()
    written["molecules_all_cells"] = molecules
    written["cells_in_buckets"] = sum(len(b["cells"]) for b in per_bucket)
    return json.loads(json.dumps(written, default=str))


def read_count_matrix(folder: str) -> dict[str, Any]:
    """A count folder's matrix.mtx.gz, barcodes and features as the UMI kernel's
    result arrays (genes, cells, gene_ids, cell_ids, counts, names), which
    :meth:`~bamflow.presets.count.CountTable.merge` takes."""
    import gzip

    import numpy as np

    with gzip.open(os.path.join(folder, "features.tsv.gz"), "rb") as f:
        features = [_unescape(line.rstrip(b"\n")).split(b"\t") for line in f]
    with gzip.open(os.path.join(folder, "barcodes.tsv.gz"), "rb") as f:
        cells = [_unescape(line.rstrip(b"\n")) for line in f]
    with gzip.open(os.path.join(folder, "matrix.mtx.gz"), "rb") as f:
        text = f.read()
    body = text.split(b"\n")
    head = next(i for i, line in enumerate(body) if not line.startswith(b"%"))
    n_genes, n_cells, entries = (int(x) for x in body[head].split())
    rest = b"\n".join(body[head + 1 :])
    values = np.fromstring(rest, dtype=np.int64, sep=" ") if entries else np.zeros(0, dtype=np.int64)
    if values.size != 3 * entries or n_genes != len(features) or n_cells != len(cells):
        raise WorkflowError(f"{folder}: the matrix does not match its barcodes and features")
    triples = values.reshape(-1, 3)
    genes = [row[0] for row in features]
    names = {row[0]: row[1] for row in features if len(row) > 1 and row[1] != row[0]}
    zero_based = triples - np.array([1, 1, 0], dtype=np.int64)
    return {
        "genes": genes,
        "cells": cells,
        "entries": zero_based.astype(np.int32).tobytes(),  # (gene, cell, count) rows
        # the same as separate arrays, as CountTable.merge took them before "entries"
        "gene_ids": zero_based[:, 0].astype(np.int32).tobytes(),
        "cell_ids": zero_based[:, 1].astype(np.int32).tobytes(),
        "counts": zero_based[:, 2].astype(np.int32).tobytes(),
        "names": names,
        "molecules": int(zero_based[:, 2].sum()),
    }


_ESCAPES = {b"t": b"\t", b"n": b"\n", b"r": b"\r", b"0": b"\0", b"\\": b"\\"}


def _unescape(field: bytes) -> bytes:
    """The value of a field written by Publication.write_tsv."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 2] in _ESCAPES:
            out += _ESCAPES[field[i + 1 : i + 2]]
            i += 2
        elif field[i : i + 2] == b"\\x":
            out.append(int(field[i + 2 : i + 4], 16))
            i += 4
        else:
            out += field[i : i + 1]
            i += 1
    return bytes(out)


def map_count_tag(ctx: TaskContext, folder: str, report: Any, *, partition: Partition, header: bytes, tag: str,
                  threads: int, start_method: str | None = None) -> dict[str, Any]:
    """correct's first pass on one partition: reads per raw barcode (primary
    alignments), into ``counts.pickle``."""
    from ..presets.histogram import count_worker

    w = BamWorkflow(f"count{ctx.index}", start_method=start_method or START_METHOD)
    _reader(w, partition, header, threads)
    w.add_job(func=count_worker, job_name="{workflow}.count{n}", input=FIFO("decoded", "rb"), output=None, tag=tag,
              skip_secondary=True, skip_duplicates=False, min_mapq=0, manage_fifos=False)
    counter = w.last[0]
    w.run(on_progress=report)
    result = w.result(counter)
    stats = result["stats"]
    if stats["counted"] != sum(result["counts"].values()):
        raise WorkflowError(f"count task {ctx.index}: {stats['counted']} reads counted, "
                            f"{sum(result['counts'].values())} in its histogram")
    with open(os.path.join(folder, "counts.pickle"), "wb") as f:
        pickle.dump(result["counts"], f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"records": stats["records"], "stats": dict(stats), "tags_seen": list(result["tags_seen"]),
            "bytes": w.result(w.jobs()[0])["bytes"] + len(header)}


def map_correct(ctx: TaskContext, folder: str, report: Any, *, partition: Partition, header: bytes,
                whitelist: str, packed_whitelist: bool, counts: str, tags: tuple[str, str, str], suffix: str,
                pseudocount: float, threshold: float, encode: EncodeOptions, threads: int,
                start_method: str | None = None) -> dict[str, Any]:
    """correct's second pass on one partition, with the run's barcode counts:
    every read, in input order, tagged, compressed into ``part.bam``."""
    from ..presets.correct import Resolver, correct_worker, load_whitelist

    if packed_whitelist:
        from ..kernels.presets import Whitelist

        with open(whitelist, "rb") as f:
            length, packed = pickle.load(f)
        wl = Whitelist.from_bytes(packed, length)
    else:
        wl = load_whitelist(whitelist)
    with open(counts, "rb") as f:
        exact = pickle.load(f)
    resolver = Resolver(wl, exact, suffix.encode(), pseudocount, threshold)
    w = BamWorkflow(f"correct{ctx.index}", start_method=start_method or START_METHOD)
    _reader(w, partition, header, threads)
    w.add_job(func=correct_worker, job_name="{workflow}.worker{n}", input=FIFO("decoded", "rb"),
              output=FIFO("corrected", "wb"), resolver=resolver, tags=tags, manage_fifos=False)
    worker = w.last[0]
    w.add_job(func=_encode, job_name="{workflow}.BAM_writer{n}", input=FIFO("corrected", "rb"),
              output=os.path.join(folder, "part.bam"), options=encode)
    writer = w.last[0]
    w.run(on_progress=report)
    stats, written = w.result(worker), w.result(writer)["records"]
    if not stats["reads_in"] == stats["written"] == written:
        raise WorkflowError(f"correct task {ctx.index}: {stats['reads_in']} reads in, {written} written")
    return {k: v for k, v in stats.items() if isinstance(v, int)}


def whole_input(ctx: TaskContext, folder: str, report: Any, *, preset: Callable[..., Any], input: str,
                outputs: dict[str, str], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A run that cannot be split by cell: the preset on the whole input, in
    one task; ``outputs`` names its output arguments (files or folders in ``folder``)."""
    paths = {arg: os.path.join(folder, name) for arg, name in outputs.items()}
    stats = preset(input, on_progress=report, **paths, **kwargs)
    return json.loads(json.dumps(stats, default=str))


__all__ = [
    "bucket_input", "gather_bam", "gather_counts", "gather_files", "gather_manifest", "map_buckets", "map_correct",
    "map_count_tag", "map_shard", "merge_range",
    "read_count_matrix", "reduce_preset", "whole_input",
]
