"""shard, dedup, count, split_reads and correct on a Dask cluster: the same
results as the local functions, the work spread over the cluster's workers.

Every function takes the local function's arguments (checked against its
signature before any cluster starts) plus:

- ``cluster``: a spec (``local:N``, ``tcp://HOST:PORT``,
  ``slurm:jobs=N,cores=C,memory=M,…``; see :mod:`bamflow.distributed.cluster`)
  or a ``distributed.Client``;
- ``partitions``: map tasks (default: the cluster's task slots, and at
  least one per GiB of input); ``buckets``: reduce tasks (default: the
  slots); ``scratch``: a folder on a filesystem every worker shares
  (default: beside the output);
- ``shuffle_level``: BGZF level of the shuffle's files (default: raw on one
  machine, ``"fast"`` where the tasks spread over several hosts);
- ``retries``: how often a task that raised is run again (0: a task's
  error fails the run at once; a task whose worker died is always run
  again); ``timeout``: seconds for the whole run;
- ``on_progress``: called with a :class:`~bamflow.distributed.executor.ClusterProgress`.

``workers`` and ``threads`` are bamflow's worker processes and BGZF threads
*inside* each task (``workers`` defaults to 1). The result is the local
function's, plus ``"cluster"``: partitions, buckets, where the split points
came from, each phase's task seconds and CPU seconds, the bytes moved.
See docs/distributed.md.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..bam.bgzf import detect_format
from ..bam.header import BamHeader
from ..bam.header import command_line as process_command_line
from ..bam.partition import Plan, plan_partitions
from ..bam.workflow import refuse_overwrite, require_tags
from ..engine.errors import WorkflowError
from ..engine.publish import Publication
from ..engine.workflow import merge_counts
from . import tasks
from .cluster import cluster_slots, connect
from .executor import ClusterProgress, Run

log = logging.getLogger("bamflow")

GIB = 1 << 30


@dataclass
class ClusterArgs:
    """The arguments every cluster function takes besides the local function's
    (given among its keyword arguments: :meth:`take`)."""

    cluster: Any
    partitions: int | None = None
    buckets: int | None = None
    scratch: str | os.PathLike[str] | None = None
    retries: int = 0
    timeout: float | None = None
    on_progress: Callable[[ClusterProgress], None] | None = None
    hook: Callable[..., Any] | None = None  # tests (``_hook=``): called in every task's progress callback
    shuffle_level: int | str | None = "auto"  # BGZF level of the shuffle's files (None: raw; auto: see session)

    NAMES = ("partitions", "buckets", "scratch", "retries", "timeout", "on_progress", "_hook", "shuffle_level")

    @classmethod
    def take(cls, cluster: Any, kwargs: dict[str, Any]) -> tuple[ClusterArgs, dict[str, Any]]:
        """The cluster's arguments among ``kwargs``, and the rest (the local
        function's); a spec that cannot be read raises ClusterSpecError here."""
        from .cluster import parse_cluster

        if isinstance(cluster, str):
            parse_cluster(cluster)
        rest = dict(kwargs)
        given = {name.lstrip("_"): rest.pop(name) for name in cls.NAMES if name in rest}
        return cls(cluster, **given), rest


def bind(preset: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments ``preset`` (a local function) would get, its defaults
    filled in and its ``**options`` spread out; a TypeError as it would raise
    one, before any cluster starts."""
    signature = inspect.signature(preset)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def umi_options(preset: Callable[..., Any], a: dict[str, Any], **fixed: Any) -> Any:
    """The :class:`~bamflow.presets.dedup.UmiOptions` among a UMI preset's
    ``**options`` (checked as the preset checks them: a TypeError names the
    arguments it does not know, before any cluster starts)."""
    from ..presets.dedup import UmiOptions

    named = set(inspect.signature(preset).parameters)
    opts, rest = UmiOptions.take({**{k: v for k, v in a.items() if k not in named}, **fixed})
    if rest:
        raise TypeError(f"{preset.__name__}() got unexpected keyword arguments: {', '.join(sorted(rest))}")
    return opts


def task_kwargs(arguments: dict[str, Any], *drop: str, **override: Any) -> dict[str, Any]:
    """What a task passes to the preset: its arguments less the input and
    output (the task's own) and what the run handles itself."""
    return {**{k: v for k, v in arguments.items() if k not in drop and k != "on_progress"}, **override}


@contextmanager
def session(name: str, args: ClusterArgs, pub: Publication, base: str, phases: Sequence[str]) -> Iterator[tuple[Run, int]]:
    """A cluster, a scratch folder (inside ``base`` unless ``args.scratch``), a Run;
    everything is closed and removed on the way out."""
    if args.scratch is None:
        folder = pub.scratch_folder(base, f"{name}-dask")
    else:
        folder = tempfile.mkdtemp(prefix=f".bamflow-{name}-", dir=os.fspath(args.scratch))
    try:
        with connect(args.cluster, log_directory=os.path.join(folder, "logs")) as (client, slots):
            with Run(client, folder, name, phases, on_progress=args.on_progress, retries=args.retries,
                     hook=args.hook, timeout=args.timeout) as run:
                run.multi_host = several_hosts(args.cluster, client)
                if args.shuffle_level == "auto":  # compressed where the shuffle crosses a network
                    args.shuffle_level = "fast" if run.multi_host else None
                yield run, slots or cluster_slots(client)
                run.finish()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def several_hosts(cluster: Any, client: Any) -> bool:
    """Whether the run's tasks spread over machines: a batch-job cluster, or
    workers on more than one host now."""
    from .cluster import JOBQUEUES, parse_cluster

    if isinstance(cluster, str) and parse_cluster(cluster).kind in JOBQUEUES:
        return True
    hosts = {w.get("host") for w in client.scheduler_info().get("workers", {}).values()}
    return len(hosts) > 1


def adopt(pub: Publication, source: str, final: str) -> str:
    """Move a file a task completed in scratch to ``final``'s place in the publication."""
    target = pub.path(final)
    try:
        os.replace(source, target)
    except OSError:  # scratch on another filesystem
        shutil.move(source, target)
    return final


def partitionable(path: str) -> bool:
    """Whether ``path`` is a BGZF file (the others are read whole, in one task)."""
    if path in ("-", "/dev/stdin"):
        raise ValueError("a cluster run reads a file on a shared filesystem, not standard input")
    with open(path, "rb") as f:
        return detect_format(f.read(512)) == "bgzf"


def plan(path: str, args: ClusterArgs, slots: int) -> Plan:
    k = args.partitions or max(slots, -(-os.path.getsize(path) // GIB))
    result = plan_partitions(path, k)
    log.info("%s: %d partitions (%s)", path, len(result.partitions), result.source)
    return result


def map_books(plan: Plan, maps: list[dict[str, Any]]) -> int:
    """Records the map tasks read; checked against the index's count when it has one."""
    total = sum(m["records"] for m in maps)
    if plan.index_records is not None and total != plan.index_records:
        raise WorkflowError(f"{plan.layout.path}: the partitions hold {total} records, its index counts "
                            f"{plan.index_records}")
    return total


def cluster_summary(run: Run, plan: Plan | None, buckets: int | None,
                    maps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the run's result says of the cluster side: partitions, buckets,
    where the split points came from, each task's seconds and CPU seconds,
    and the raw bytes the map tasks read (and, in a shuffle, wrote)."""
    return {
        "raw_bytes": sum(m.get("bytes", 0) for m in maps or ()),
        "shuffle_bytes": sum(m.get("files_bytes", 0) for m in maps or ()),
        "partitions": len(plan.partitions) if plan else 1,
        "split_points": plan.source if plan else "whole file",
        "buckets": buckets,
        "task_seconds": {phase: [round(s, 3) for s in secs] for phase, secs in run.task_seconds.items()},
        "task_cpu_seconds": {phase: [round(s, 3) for s in secs] for phase, secs in run.task_cpu.items()},
        "seconds": round(run.snapshot().elapsed, 3),
    }


# -- the shuffle by cell -------------------------------------------------------------------------------


@dataclass
class Shuffle:
    """The map phase of a per-cell run and what the reduce tasks get."""

    run: Run
    plan: Plan
    buckets: int
    maps: list[dict[str, Any]]
    reads_in: int
    sorted_input: bool
    level: int | str | None = None  # the shuffle files' BGZF level (None: raw)
    reduced: list[int] = field(default_factory=list)  # the buckets that get a reduce task

    def reduce(self, preset: Callable[..., Any], output: str, kwargs: dict[str, Any],
               reads_key: str = "reads_in", split_keys: list[int] | None = None) -> list[dict[str, Any]]:
        """Run ``preset`` on every non-empty bucket (reads without a cell join
        the first of them); checks that each read what the maps dealt it."""
        per_bucket = [sum(m["per_bucket"][b] for m in self.maps) for b in range(self.buckets)]
        unassigned = sum(m["unassigned"] for m in self.maps)
        self.reduced = [b for b in range(self.buckets) if per_bucket[b]] or [0]
        scratch, k = self.run.scratch, len(self.maps)
        calls = []
        for i, b in enumerate(self.reduced):
            calls.append(dict(
                preset=preset,
                parts=[os.path.join(scratch, "map", str(m), tasks.bucket_name(b)) for m in range(k)],
                unassigned=[os.path.join(scratch, "map", str(m), tasks.UNASSIGNED) for m in range(k)]
                if i == 0 and unassigned else [],
                header_bytes=len(self.plan.layout.header),
                sorted_input=self.sorted_input,
                output=output,
                kwargs=kwargs,
                split_keys=split_keys,
                compressed=self.level is not None,
            ))
        results = self.run.phase("reduce", tasks.reduce_preset, calls, labels=[f"bucket {b}" for b in self.reduced])
        for i, (b, r) in enumerate(zip(self.reduced, results, strict=True)):
            expected = per_bucket[b] + (unassigned if i == 0 else 0)
            if r[reads_key] != expected:
                raise WorkflowError(f"reads do not add up: bucket {b} was dealt {expected} reads, its task read "
                                    f"{r[reads_key]}")
        return results

    def output(self, i: int, name: str) -> str:
        """A file of the i-th reduce task."""
        return os.path.join(self.run.scratch, "reduce", str(i), name)


def shuffle(run: Run, path: str, args: ClusterArgs, slots: int, cell_tag: str | tuple[str, ...], threads: int,
            start_method: str | None) -> Shuffle:
    """Partition ``path`` and deal every partition's reads into buckets by cell."""
    layout_plan = plan(path, args, slots)
    buckets = args.buckets or slots
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, not {buckets}")
    header = layout_plan.layout.header
    key = (cell_tag,) if isinstance(cell_tag, str) else tuple(cell_tag)
    calls = [dict(partition=p, header=header, key=key, buckets=buckets, threads=threads,
                  start_method=start_method, level=args.shuffle_level) for p in layout_plan.partitions]
    maps = run.phase("map", tasks.map_buckets, calls, labels=[f"{p.start}-{p.end}" for p in layout_plan.partitions])
    reads_in = map_books(layout_plan, maps)
    sorted_input = BamHeader.from_bytes(header, path)[0].sort_order == "coordinate"
    return Shuffle(run, layout_plan, buckets, maps, reads_in, sorted_input, args.shuffle_level)


def summed(results: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for r in results:
        total = merge_counts(total, {k: r[k] for k in keys if k in r})
    return total


def _whole(run: Run, preset: Callable[..., Any], input: str, outputs: dict[str, str],
           kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The preset on the whole input in one task; returns its stats and its folder."""
    (stats,) = run.phase("whole", tasks.whole_input, [dict(preset=preset, input=input, outputs=outputs, kwargs=kwargs)])
    return stats, os.path.join(run.scratch, "whole", "0")


# -- dedup -------------------------------------------------------------------------------------------


DEDUP_SUMMED = ("reads_in", "kept", "mates", "written", "dropped", "molecules", "positions")


def dedup(input: str | os.PathLike[str], output: str | os.PathLike[str], *, cluster: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`bamflow.presets.dedup.dedup` on a cluster: its arguments, plus
    the cluster's (see the module doc); ``workers`` (default 1) and
    ``threads`` are each reduce task's.

    Map tasks deal reads into buckets by cell; each reduce task runs
    ``dedup`` on one bucket; the gather merges the buckets' outputs by
    coordinate when the input is coordinate-sorted (recompressing, as the
    local run writes them), else joins them block by block. ``gather_ranges``:
    merge in that many coordinate ranges at once (each reduce task finds
    where its output crosses them), the ranges' BAMs then joined block by
    block; default: one per partition on a cluster of several hosts, one
    merge on a single machine (where it uses every core already). The output
    equals the local run's with ``workers=buckets``; with other bucket
    counts only reads at one coordinate may come in another order. Runs
    that umi_tools' semantics keep in one worker (``random_seed``,
    ``output_stats``, ``no_sort_output``, ``paired``, cells from read
    names) run in one task."""
    from ..presets import dedup as preset

    args, kwargs = ClusterArgs.take(cluster, kwargs)
    ranges = kwargs.pop("gather_ranges", None)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("start_method", tasks.START_METHOD)
    kwargs.setdefault("command_line", process_command_line())
    a = bind(preset.dedup, input, output, **kwargs)
    opts = umi_options(preset.dedup, a)
    input, output = os.fspath(input), os.fspath(output)
    refuse_overwrite([input], output)
    why = opts.needs_one_worker("dedup") or ("output_stats" if a["output_stats"] is not None else None) or (
        "no_sort_output" if a["no_sort_output"] else None) or (None if partitionable(input) else "not BGZF")
    with Publication() as pub:
        base = os.path.dirname(os.path.abspath(output))
        with session("dedup", args, pub, base, ["whole"] if why else ["map", "reduce", "gather"]) as (run, slots):
            if why:
                log.info("dedup on a cluster: one task (%s)", why)
                outputs = {"output": "out.bam", **({"output_stats": "stats"} if a["output_stats"] is not None else {})}
                stats, folder = _whole(run, preset.dedup, input, outputs, task_kwargs(a, "input", *outputs))
                adopt(pub, os.path.join(folder, "out.bam"), output)
                for name in sorted(os.listdir(folder)):
                    if name.startswith("stats_"):
                        adopt(pub, os.path.join(folder, name), os.fspath(a["output_stats"]) + name[len("stats"):])
                stats["cluster"] = cluster_summary(run, None, None)
            else:
                stats = _dedup_sharded(run, pub, args, slots, input, output, opts, a, ranges)
        pub.commit()
    log.info("dedup %s → %s on a cluster: %s", input, output, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


def _dedup_sharded(run: Run, pub: Publication, args: ClusterArgs, slots: int, input: str, output: str, opts: Any,
                   a: dict[str, Any], ranges: int | None) -> dict[str, Any]:
    from ..bam.options import DEFAULT_LEVEL
    from ..presets import dedup as preset

    sh = shuffle(run, input, args, slots, opts.cell_tag, a["threads"], a["start_method"])
    merge = sh.sorted_input
    level = DEFAULT_LEVEL if a["level"] is None else a["level"]
    keys = range_keys(run, sh.plan, ranges) if merge else []
    between = (args.shuffle_level or 0) if merge else a["level"]  # a merge recompresses what the reduce tasks write
    reduced = sh.reduce(preset.dedup, "out.bam", task_kwargs(a, "input", "output", level=between),
                        split_keys=keys or None)
    require_tags(opts.tags(), sh.reads_in, set().union(*(m["tags_seen"] for m in sh.maps)))
    parts = [sh.output(i, "out.bam") for i in range(len(reduced))]
    if keys:  # merge by coordinate range in parallel, then join the ranges' BAMs
        calls = [dict(ranges=[(part, r["split_points"][g], r["split_points"][g + 1]) for part, r in zip(parts, reduced,
                                                                                                     strict=True)],
                      header=_header_of(parts[0]), level=level, threads=a["threads"])
                 for g in range(len(keys) + 1)]
        merged = run.phase("merge", tasks.merge_range, calls, labels=[f"range {g}" for g in range(len(calls))])
        gathered = {"records": sum(m["records"] for m in merged)}
        join_files(run, pub, [(os.path.basename(output), [os.path.join(run.scratch, "merge", str(g), "part.bam")
                                                          for g in range(len(calls))])],
                   os.path.dirname(os.path.abspath(output)), slots)
    else:
        (gathered,) = run.phase("gather", tasks.gather_bam, [dict(parts=parts, output="out.bam", merge=merge,
                                                                  level=level, threads=a["threads"])])
        adopt(pub, os.path.join(run.scratch, "gather", "0", "out.bam"), output)
    stats = summed(reduced, DEDUP_SUMMED)
    stats["dropped"] = dict(sorted(stats.get("dropped", {}).items()))
    preset.books(stats, "kept+mates", "kept")
    dealt(stats, sh.reads_in)
    expected = stats["reads_in"] if a["mark"] else stats["kept"] + stats["mates"]
    if stats["written"] != expected or gathered["records"] not in (None, stats["written"]):
        raise WorkflowError(f"reads do not add up: {stats['written']} written by the reduce tasks, "
                            f"{gathered['records']} gathered, expected {expected}")
    stats.update(mark=a["mark"], method=opts.method, workers=len(reduced), per_worker=per_task(reduced, DEDUP_SUMMED),
                 cluster=cluster_summary(run, sh.plan, sh.buckets, sh.maps))
    return stats


def range_keys(run: Run, plan: Plan, ranges: int | None) -> list[int]:
    """Coordinates that split a sorted output into about ``ranges`` parts (None:
    one per partition when the cluster's workers are on more than one host,
    else none: on one machine a single merge uses every core already), taken
    from where the input's partitions start."""
    from ..bam.partition import key_at

    if ranges is None:
        ranges = len(plan.partitions) if run.multi_host else 1
    if ranges <= 1 or len(plan.partitions) < 2:
        return []
    step = len(plan.partitions) / ranges
    starts = sorted({round(i * step) for i in range(1, ranges)} - {0})
    return sorted({key_at(plan.layout.path, plan.partitions[i].start) for i in starts if i < len(plan.partitions)})


def _header_of(path: str) -> bytes:
    from ..bam.partition import layout_of

    return layout_of(path).header


def dealt(stats: dict[str, Any], reads_dealt: int) -> None:
    """The shuffle's books: the reduce tasks read what the map tasks dealt."""
    if stats["reads_in"] != reads_dealt:
        raise WorkflowError(f"reads do not add up: {reads_dealt} reads dealt, {stats['reads_in']} read by the reduce tasks")


def per_task(results: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in (*keys, "_worker", "_seconds", "_cpu") if k in r} for r in results]


# -- count ----------------------------------------------------------------------------------------------


COUNT_SUMMED = ("reads_in", "counted", "dropped", "molecules_all_bundles", "overwritten")


def count(input: str | os.PathLike[str], out: str | os.PathLike[str], *, cluster: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`bamflow.presets.count.count` on a cluster: its arguments, plus
    the cluster's (see the module doc).

    Each reduce task counts one bucket of cells (``count`` writing its
    matrix); the gather stacks the buckets' cells (a cell is in one bucket,
    genes are united) and writes the tables with count's own writer, so the
    outputs equal the local run's. ``cells`` and ``min_umis`` choose the
    columns once, on the merged table. Counting without ``per_cell`` runs in
    one task. ``force``: replace an earlier run's outputs in ``out``."""
    from ..presets import count as preset

    args, kwargs = ClusterArgs.take(cluster, kwargs)
    force = kwargs.pop("force", False)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("start_method", tasks.START_METHOD)
    a = bind(preset.count, input, out, **kwargs)
    opts = umi_options(preset.count, a, gene_tag=None if a.get("per_contig") else a["gene_tag"], per_gene=True)
    unknown = set(a["formats"]) - set(preset.FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {', '.join(preset.FORMATS)}")
    listed = preset.read_cells(a["cells"]) if a["cells"] is not None else None
    input, out = os.fspath(input), os.fspath(out)
    why = opts.needs_one_worker("count") or (None if partitionable(input) else "not BGZF")
    with Publication() as pub:
        pub.claim_folder(out, force=force, inputs=[input])
        with session("count", args, pub, out, ["whole"] if why else ["map", "reduce", "gather"]) as (run, slots):
            if why:
                log.info("count on a cluster: one task (%s)", why)
                stats, folder = _whole(run, preset.count, input, {"out": "out"},
                                       task_kwargs(a, "input", "out", cells=listed))
                folder = os.path.join(folder, "out")
                stats["cluster"] = cluster_summary(run, None, None)
            else:
                stats = _count_sharded(run, args, slots, input, opts, a, listed)
                folder = os.path.join(run.scratch, "gather", "0", "out")
            stats["outputs"] = {name: adopt(pub, os.path.join(folder, name), os.path.join(out, name))
                                for name in sorted(os.listdir(folder)) if not name.startswith(".")}
        pub.commit()
    log.info("count %s → %s on a cluster: %s", input, out, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


def _count_sharded(run: Run, args: ClusterArgs, slots: int, input: str, opts: Any, a: dict[str, Any],
                   listed: list[str] | None) -> dict[str, Any]:
    from ..presets import count as preset
    from ..presets.dedup import books

    sh = shuffle(run, input, args, slots, opts.cell_tag, a["threads"], a["start_method"])
    reduced = sh.reduce(preset.count, "counts", task_kwargs(
        a, "input", "out", "cells", "min_umis", "wide_format_cell_counts", formats=["mtx"]))
    (table,) = run.phase("gather", tasks.gather_counts, [dict(
        parts=[sh.output(i, "counts") for i in range(len(reduced))], formats=list(a["formats"]), cells=listed,
        min_umis=a["min_umis"], wide=a["wide_format_cell_counts"])])
    stats = summed(reduced, COUNT_SUMMED)
    stats["dropped"] = dict(sorted(stats.get("dropped", {}).items()))
    books(stats, "counted", "counted")
    dealt(stats, sh.reads_in)
    if table["molecules_all_cells"] != sum(r.get("molecules", 0) for r in reduced):
        raise WorkflowError("the merged count table does not hold the molecules the reduce tasks counted")
    stats.update({k: v for k, v in table.items() if k not in ("molecules_all_cells", "cells_in_buckets", "outputs")})
    stats.update(method=opts.method, workers=len(reduced), per_worker=per_task(reduced, COUNT_SUMMED),
                 cluster=cluster_summary(run, sh.plan, sh.buckets, sh.maps))
    return stats


# -- shard ----------------------------------------------------------------------------------------------


def shard(input: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, cluster: Any, **kwargs: Any) -> Any:
    """:func:`bamflow.shard` on a cluster (its arguments, plus the cluster's):
    each map task shards its partition exactly as ``shard`` does (the same
    hash, writers, level and @PG); the gather joins each shard's parts block
    by block, in partition order, so every shard holds the reads the local
    run puts there, in the same order, and the manifest is the same.
    Returns a :class:`~bamflow.bam.shard.ShardResult`."""
    from ..bam.options import DistributeOptions, EncodeOptions, parse_key
    from ..bam.shard import ShardResult, balance_report, shard_file_name
    from ..bam.shard import shard as local

    args, kwargs = ClusterArgs.take(cluster, kwargs)
    kwargs.setdefault("command_line", process_command_line())
    a = bind(local, input, out_dir, **kwargs)
    key, n = parse_key(a["by"]), a["n"]
    if key is None or n < 1 or not a["prefix"] or os.sep in a["prefix"] or a["prefix"].startswith(".") or "\0" in a["prefix"]:
        raise ValueError(f"shard: by must name tags or 'name' (not {a['by']!r}), n >= 1 (not {n}), and prefix a plain "
                         f"file name start (not {a['prefix']!r})")
    by_tags = isinstance(key, tuple)
    missing = a["missing"] if by_tags else "error"
    DistributeOptions(by=key, missing=missing)  # checks missing
    encode = EncodeOptions(**({} if a["level"] is None else {"level": a["level"]}), threads=1,
                           command_line=a["command_line"])
    unassigned = by_tags and missing == "unassigned"
    names = [shard_file_name(a["prefix"], i, n) for i in range(n)] + (["unassigned.bam"] if unassigned else [])
    manifest = by_tags and a["manifest"]
    input, out_dir = os.fspath(input), os.fspath(out_dir)
    if not partitionable(input):
        raise ValueError(f"{input}: a cluster shard reads BGZF-compressed BAM; run bamflow.shard on it")
    with Publication() as pub:
        pub.claim_folder(out_dir, force=a["force"], inputs=[input])
        phases = ["map", "gather", *(["manifest"] if manifest else [])]
        with session("shard", args, pub, out_dir, phases) as (run, slots):
            layout_plan = plan(input, args, slots)
            maps = run.phase("map", tasks.map_shard, [dict(
                partition=p, header=layout_plan.layout.header, key=key, n=n, missing=missing, names=names,
                encode=encode, count_values=manifest, threads=a["threads"], start_method=a["start_method"])
                for p in layout_plan.partitions])
            reads_in = map_books(layout_plan, maps)
            if by_tags:
                require_tags(key, reads_in, set().union(*(m["tags_seen"] for m in maps)))
            written = {name: sum(m["written"][i] for m in maps) for i, name in enumerate(names)}
            dropped_tag = sum(m["dropped_missing_tag"] for m in maps)
            if reads_in != sum(written.values()) + dropped_tag:
                raise WorkflowError(f"reads do not add up: {reads_in} in, {written} written, {dropped_tag} dropped")
            k = len(maps)
            files = [(name, [os.path.join(run.scratch, "map", str(m), name) for m in range(k)]) for name in names]
            join_files(run, pub, files, out_dir, slots)
            result = ShardResult(reads_in=reads_in, written=written,
                                 dropped={"missing_tag": dropped_tag} if dropped_tag else {}, manifest=None,
                                 balance=balance_report([written[name] for name in names[:n]]))
            if manifest:
                (made,) = run.phase("manifest", tasks.gather_manifest, [dict(
                    parts=[os.path.join(run.scratch, "map", str(m), "values.pickle") for m in range(k)],
                    names=names[:n])])
                if made["reads"] != sum(written[name] for name in names[:n]):
                    raise WorkflowError("the manifest's read counts do not add up to the reads written to shards")
                result.values = made["values"]
                result.manifest = adopt(pub, os.path.join(run.scratch, "manifest", "0", "manifest.tsv"),
                                        os.path.join(out_dir, "manifest.tsv"))
            result.job_stats = {"cluster": cluster_summary(run, layout_plan, None, maps)}  # type: ignore[dict-item]
        pub.commit()
    log.info("shard %s → %s on a cluster: %s", input, out_dir, result.as_dict())
    return result


def join_files(run: Run, pub: Publication, files: list[tuple[str, list[str]]], out_dir: str, slots: int) -> dict[str, str]:
    """Each (name, parts): one file in ``out_dir``, a lone part moved, several
    joined block by block by gather tasks (``slots`` of them at most)."""
    joined = [(name, parts) for name, parts in files if len(parts) > 1]
    groups = [joined[i::slots] for i in range(min(slots, len(joined)))]
    if groups:
        run.phase("gather", tasks.gather_files, [dict(files=g) for g in groups])
    made = {name: os.path.join(run.scratch, "gather", str(i), name) for i, g in enumerate(groups) for name, _ in g}
    for name, parts in files:
        adopt(pub, made.get(name, parts[0]), os.path.join(out_dir, name))
    return made


# -- split_reads ---------------------------------------------------------------------------------------


def split_reads(input: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, cluster: Any,
                **kwargs: Any) -> dict[str, Any]:
    """:func:`bamflow.split_reads` on a cluster (its arguments, plus the
    cluster's): each reduce task splits one bucket of values; a value's file
    comes whole from one task (moved, not copied) and the manifest lists
    them as the local run does. With ``groups`` a group gathers cells from
    several buckets: its file joins their parts block by block, in bucket
    order, and ``min_reads`` applies to the group's total."""
    from ..bam.options import parse_tags
    from ..bam.split import MANIFEST
    from ..bam.split import split_reads as preset

    args, kwargs = ClusterArgs.take(cluster, kwargs)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("start_method", tasks.START_METHOD)
    kwargs.setdefault("command_line", process_command_line())
    a = bind(preset, input, out_dir, **kwargs)
    tags = parse_tags(a["by"])
    groups, min_reads = a["groups"], a["min_reads"] or 0
    if a["values"] is not None and groups is not None:
        raise ValueError("give values or groups, not both")
    input, out_dir = os.fspath(input), os.fspath(out_dir)
    if not partitionable(input):
        raise ValueError(f"{input}: a cluster split reads BGZF-compressed BAM; run bamflow.split_reads on it")
    with Publication() as pub:
        pub.claim_folder(out_dir, force=a["force"], inputs=[input])
        with session("split", args, pub, out_dir, ["map", "reduce", "gather"]) as (run, slots):
            sh = shuffle(run, input, args, slots, tags, max(1, a["threads"]), a["start_method"])
            reduced = sh.reduce(preset, "out", task_kwargs(a, "input", "out_dir", "force",
                                                           min_reads=None if groups is not None else a["min_reads"]),
                                reads_key="records_in")
            rows: dict[str, list[tuple[str, int, str]]] = {}  # file → (value as written, reads, its folder)
            for i in range(len(reduced)):
                folder = sh.output(i, "out")
                with open(os.path.join(folder, MANIFEST), encoding="utf-8", newline="\n") as f:
                    next(f)
                    for line in f:
                        value, name, reads = line.rstrip("\n").split("\t")
                        rows.setdefault(name, []).append((value, int(reads), folder))
            keep = {n: r for n, r in sorted(rows.items()) if groups is None or sum(x[1] for x in r) >= min_reads}
            join_files(run, pub, [(n, [os.path.join(x[2], n) for x in r]) for n, r in keep.items()], out_dir, slots)
            with pub.open(os.path.join(out_dir, MANIFEST), "w") as f:  # the values as the tasks escaped them
                f.write("value\tfile\treads\n")
                f.writelines(f"{r[0][0]}\t{n}\t{sum(x[1] for x in r)}\n" for n, r in keep.items())
            written = sum(x[1] for r in keep.values() for x in r)
            dropped = summed(reduced, ("dropped",))["dropped"]
            dropped["below_min_reads"] = dropped.get("below_min_reads", 0) + sum(
                x[1] for n, r in rows.items() if n not in keep for x in r)
            stats = {"written": written, "files": len(keep), "dropped": dropped,
                     "manifest": os.path.join(out_dir, MANIFEST), "records_in": sh.reads_in}
            if sh.reads_in != written + sum(dropped.values()):
                raise WorkflowError(f"split_reads: reads do not add up: {stats}")
            stats["cluster"] = cluster_summary(run, sh.plan, sh.buckets, sh.maps)
        pub.commit()
    log.info("split_reads %s → %s on a cluster: %s", input, out_dir, stats)
    return stats


# -- correct -------------------------------------------------------------------------------------------


def correct(input: str | os.PathLike[str], output: str | os.PathLike[str], *, cluster: Any,
            **kwargs: Any) -> dict[str, Any]:
    """:func:`bamflow.presets.correct.correct` on a cluster (its arguments,
    plus the cluster's). Both passes run per partition: the first counts the
    raw barcodes (summed over the partitions: the counts the local first
    pass finds), the second corrects each partition with those counts and
    compresses it; the parts are joined block by block in partition order,
    so the output holds the local run's records in the local run's (the
    input's) order. ``whitelist``: a path every worker can read, or a loaded
    Whitelist (sent through scratch)."""
    import pickle

    from ..bam.options import EncodeOptions, parse_tags
    from ..kernels.presets import CORRECT_STATS, Whitelist
    from ..presets.correct import _describe, load_whitelist
    from ..presets.correct import correct as preset

    args, kwargs = ClusterArgs.take(cluster, kwargs)
    start_method = kwargs.pop("start_method", None)
    a = bind(preset, input, output, **kwargs)
    whitelist = a["whitelist"]
    tags = parse_tags([a["tag_in"], a["qual_tag"], a["tag_out"]])
    input, output = os.fspath(input), os.fspath(output)
    refuse_overwrite([input], output)
    if not partitionable(input):
        raise ValueError(f"{input}: a cluster correct reads BGZF-compressed BAM; run bamflow's correct on it")
    wl = whitelist if isinstance(whitelist, Whitelist) else load_whitelist(whitelist)
    encode = EncodeOptions(**({} if a["level"] is None else {"level": a["level"]}), threads=a["threads"],
                           command_line=a["command_line"] or f"bamflow correct (Python API) whitelist={_describe(whitelist)}")
    base = os.path.dirname(os.path.abspath(output))
    with Publication() as pub:
        with session("correct", args, pub, base, ["count", "correct", "gather"]) as (run, slots):
            layout_plan = plan(input, args, slots)
            header, parts = layout_plan.layout.header, layout_plan.partitions
            counted = run.phase("count", tasks.map_count_tag, [dict(
                partition=p, header=header, tag=tags[0], threads=a["threads"], start_method=start_method) for p in parts])
            reads_in = map_books(layout_plan, counted)
            require_tags([tags[0]], reads_in, set().union(*(c["tags_seen"] for c in counted)))
            totals: dict[bytes, int] = {}
            for i in range(len(parts)):
                with open(os.path.join(run.scratch, "count", str(i), "counts.pickle"), "rb") as f:
                    for value, n in pickle.load(f).items():
                        totals[value] = totals.get(value, 0) + n
            counts_path = os.path.join(run.scratch, "exact_counts.pickle")
            with open(counts_path, "wb") as f:
                pickle.dump({bc: n for bc, n in totals.items() if bc in wl}, f, protocol=pickle.HIGHEST_PROTOCOL)
            wl_path = os.path.abspath(os.fspath(whitelist)) if not isinstance(whitelist, Whitelist) else os.path.join(
                run.scratch, "whitelist.pickle")
            if isinstance(whitelist, Whitelist):
                with open(wl_path, "wb") as f:
                    pickle.dump((whitelist.length, whitelist.to_bytes()), f, protocol=pickle.HIGHEST_PROTOCOL)
            corrected = run.phase("correct", tasks.map_correct, [dict(
                partition=p, header=header, whitelist=wl_path, packed_whitelist=isinstance(whitelist, Whitelist),
                counts=counts_path, tags=tags, suffix=a["suffix"], pseudocount=a["pseudocount"],
                threshold=a["threshold"], encode=encode, threads=a["threads"], start_method=start_method) for p in parts])
            join_files(run, pub, [(os.path.basename(output), [os.path.join(run.scratch, "correct", str(i), "part.bam")
                                                              for i in range(len(parts))])], base, slots)
            total = summed(corrected, (*CORRECT_STATS, "written"))
            outcomes = sum(total[k] for k in CORRECT_STATS[1:6])
            if not reads_in == total["records"] == outcomes:
                raise WorkflowError(f"reads do not add up: {reads_in} in, {total['records']} corrected, "
                                    f"{outcomes} by outcome {total}")
            stats: dict[str, Any] = {"reads_in": reads_in, "written": total["written"], "dropped": {},
                                     **{k: total[k] for k in CORRECT_STATS[1:6]}, "whitelist": len(wl),
                                     "barcodes_seen": len(totals), "per_worker": corrected,
                                     "cluster": cluster_summary(run, layout_plan, None, counted)}
        pub.commit()
    log.info("correct %s → %s on a cluster: %s", input, output, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


__all__ = ["ClusterArgs", "bind", "correct", "count", "dedup", "shard", "split_reads"]
