"""bamflow.distributed against the same commands without a cluster, and the
per-task times behind docs/distributed.md's scaling model.

    python benchmarks/bench_distributed.py compare --input /tmp/sim2M.bam --repeats 3
    python benchmarks/bench_distributed.py tasks --input /tmp/sim2M.bam --partitions 1,2,4,8,16
    python benchmarks/bench_distributed.py model --tasks-json out/tasks.json

``compare``: for dedup, count and shard (-n 16), pairs run interleaved
(local, cluster, local, cluster, …), each a fresh Python process whose CPU
time and peak memory are those of its whole process tree (the LocalCluster's
workers and every bamflow job are its descendants; memory: the tree's summed
PSS, sampled every 0.2 s). The
cluster run is ``cluster="local:2"`` (a LocalCluster of 2 worker processes
started and stopped by the run, as ``--cluster local:2`` does); ``--warm``
adds runs on a cluster started beforehand (an existing scheduler). Every
cluster output is checked against the local output of the same pair
(decompressed BAM, decompressed tables). ``uptime`` is printed before and after.

``tasks``: dedup on a warm LocalCluster with K partitions (and K buckets):
the seconds of every task of every phase, the bytes the shuffle wrote.

``model``: from those per-task times, the simulated time of a run on 1-64
nodes (see docs/distributed.md, "Cost model").
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out", "distributed")
COMMANDS = ("dedup", "count", "shard")
CL = "bench_distributed"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# -- one run, in its own process -------------------------------------------------------------


def run_one(command: str, mode: str, input: str, output: str, address: str | None) -> dict:
    import bamflow
    from bamflow import distributed as bd
    from bamflow.presets.count import count
    from bamflow.presets.dedup import dedup

    cluster = address if mode == "warm" else mode
    t = time.perf_counter()
    if command == "dedup":
        if mode == "local":
            stats = dedup(input, output, command_line=CL)
        else:
            stats = bd.dedup(input, output, cluster=cluster, command_line=CL)
    elif command == "count":
        if mode == "local":
            stats = count(input, output)
        else:
            stats = bd.count(input, output, cluster=cluster)
    else:
        if mode == "local":
            stats = bamflow.shard(input, output, n=16, command_line=CL).as_dict()
        else:
            result = bd.shard(input, output, n=16, cluster=cluster, command_line=CL)
            stats = {**result.as_dict(), "cluster": result.job_stats.get("cluster")}
    return {"seconds": time.perf_counter() - t, "cluster": stats.get("cluster")}


def tree_rss(pid: int) -> int:
    """Memory of a process and all its descendants now: their proportional set
    sizes (PSS: a page shared by forked processes counts once in all), or
    their RSS where PSS cannot be read."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
    return total


def spawn(command: str, mode: str, input: str, output: str, address: str | None) -> dict:
    """Run one measurement in a child process: its wall time, the CPU time of
    its whole process tree (RUSAGE_CHILDREN), and the peak of the tree's summed PSS
    (sampled every 0.2 s)."""
    import resource

    argv = [sys.executable, __file__, "run-one", command, mode, input, output, address or ""]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:  # (its output is one short line: no pipe fills up)
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and every descendant it reaped
    if proc.returncode:
        raise SystemExit(f"{command} {mode} failed")
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result.update(wall=wall, cpu=cpu, peak_rss_mb=peak / 2**20)
    return result


# -- checks ------------------------------------------------------------------------------------


def bam_data(path: str) -> bytes:
    from bamflow.bam.bgzf import BgzfReader

    with BgzfReader(path, threads=2) as r:
        return r.read()


def same_output(command: str, a: str, b: str) -> bool:
    if command == "dedup":
        return bam_data(a) == bam_data(b)
    names = sorted(n for n in os.listdir(a) if not n.startswith("."))
    if names != sorted(n for n in os.listdir(b) if not n.startswith(".")):
        return False
    for name in names:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if name.endswith(".bam"):
            same = bam_data(pa) == bam_data(pb)
        elif name.endswith(".gz"):
            same = gzip.open(pa).read() == gzip.open(pb).read()
        elif name.endswith(".h5ad"):
            same = h5ad_equal(pa, pb)
        else:
            same = open(pa, "rb").read() == open(pb, "rb").read()
        if not same:
            print(f"  differs: {name}", file=sys.stderr)
            return False
    return True


def h5ad_equal(a: str, b: str) -> bool:
    import anndata

    x, y = anndata.read_h5ad(a), anndata.read_h5ad(b)
    return (x.obs_names.equals(y.obs_names) and x.var.equals(y.var) and (x.X != y.X).nnz == 0)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def compare(args: argparse.Namespace) -> None:
    os.makedirs(OUT, exist_ok=True)
    modes = ["local", "local:2"]
    address = None
    cluster = None
    if args.warm:
        from bamflow.distributed.cluster import local_cluster

        cluster = local_cluster(2)
        address = cluster.scheduler_address
        modes.append("warm")
    print(f"load before: {uptime()}")
    results: dict = {}
    for command in args.commands.split(","):
        for repeat in range(args.repeats):
            outputs = {}
            for mode in modes:
                out = os.path.join(OUT, f"{command}-{mode.replace(':', '')}" + (".bam" if command == "dedup" else ""))
                remove(out)
                r = spawn(command, mode, args.input, out, address)
                results.setdefault(command, {}).setdefault(mode, []).append(r)
                outputs[mode] = out
                print(f"{command} {mode} #{repeat + 1}: {r['wall']:.2f} s, CPU {r['cpu']:.1f} s, "
                      f"peak memory {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
            for mode in modes[1:]:
                if not same_output(command, outputs["local"], outputs[mode]):
                    raise SystemExit(f"FAIL: {command} {mode} differs from the local run")
            for out in outputs.values():
                remove(out)
    print(f"load after: {uptime()}")
    print("\n| command | mode | wall s (median, min-max) | speed vs local | CPU s | peak memory MB (tree's PSS) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for command, by_mode in results.items():
        base = statistics.median(r["wall"] for r in by_mode["local"])
        for mode, runs in by_mode.items():
            walls = [r["wall"] for r in runs]
            med = statistics.median(walls)
            print(f"| {command} | {mode} | {med:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {base / med:.2f}x | "
                  f"{statistics.median(r['cpu'] for r in runs):.1f} | "
                  f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": uptime(), "results": results}, f, indent=1)
    if cluster is not None:
        cluster.close()


# -- per-task times ----------------------------------------------------------------------------


def tasks(args: argparse.Namespace) -> None:
    import distributed

    from bamflow import distributed as bd
    from bamflow.distributed.cluster import local_cluster

    os.makedirs(OUT, exist_ok=True)
    cluster = local_cluster(args.workers)
    client = distributed.Client(cluster, set_as_default=False)
    print(f"load before: {uptime()}")
    rows = []
    out = os.path.join(OUT, "tasks.bam")
    bd.dedup(args.input, out, cluster=client, partitions=2, buckets=2, command_line=CL)  # warm the workers
    for k in [int(x) for x in args.partitions.split(",")]:
        remove(out)
        t = time.perf_counter()
        stats = bd.dedup(args.input, out, cluster=client, partitions=k, buckets=k, command_line=CL,
                         gather_ranges=k if args.ranges else 1,
                         shuffle_level=int(args.shuffle_level) if (args.shuffle_level or "").isdigit() else args.shuffle_level)
        wall = time.perf_counter() - t
        secs = stats["cluster"]["task_seconds"]
        cpu = stats["cluster"]["task_cpu_seconds"]
        row = {"k": k, "wall": wall, "reads": stats["reads_in"], "kept": stats["kept"],
               "raw_bytes": stats["cluster"]["raw_bytes"], "shuffle_bytes": stats["cluster"]["shuffle_bytes"],
               "input_bytes": os.path.getsize(args.input), "output_bytes": os.path.getsize(out),
               **{f"{phase}_tasks": secs[phase] for phase in secs}, **{f"{phase}_cpu": cpu[phase] for phase in cpu}}
        rows.append(row)
        print(f"K={k}: {wall:.2f} s; " + "; ".join(f"{p}: {len(s)} tasks, mean {statistics.mean(s):.2f} s, "
                                                     f"max {max(s):.2f} s, CPU {sum(cpu[p]):.1f} s"
                                                     for p, s in secs.items()), file=sys.stderr)
    print(f"load after: {uptime()}")
    phases = [p for p in ("map", "reduce", "merge", "gather") if any(f"{p}_tasks" in r for r in rows)]
    print("\n| K | run s | " + " | ".join(f"{p}: tasks, mean / max s, CPU s" for p in phases) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in phases) + " |")
    for r in rows:
        cells = []
        for p in phases:
            t = r.get(f"{p}_tasks")
            cells.append(f"{len(t)}, {statistics.mean(t):.2f} / {max(t):.2f}, {sum(r[f'{p}_cpu']):.1f}" if t else "-")
        print(f"| {r['k']} | {r['wall']:.2f} | " + " | ".join(cells) + " |")
    with open(args.json or os.path.join(OUT, "tasks.json"), "w") as f:
        json.dump({"load": uptime(), "workers": args.workers, "rows": rows}, f, indent=1)
    remove(out)
    client.close()
    cluster.close()


# -- the model ---------------------------------------------------------------------------------


def model(args: argparse.Namespace) -> None:
    """Simulated run time of dedup on N nodes of ``cores`` cores for ``reads``
    reads, from the measured per-task CPU seconds and bytes (docs/distributed.md)."""
    with open(args.tasks_json) as f:
        data = json.load(f)
    row = next(r for r in data["rows"] if r["k"] == args.k)
    reads = row["reads"]
    ranged = "merge_cpu" in row  # the gather split by coordinate range: its merges run in parallel
    per_read = {phase: sum(row.get(f"{phase}_cpu", [0.0])) / reads for phase in ("map", "reduce", "merge", "gather")}
    if ranged:
        per_read["gather"] += per_read.pop("merge")
    else:
        per_read.pop("merge")
    raw = row["raw_bytes"] / reads  # decompressed bytes a read
    shuffled = row.get("shuffle_bytes", row["raw_bytes"]) / reads  # what the shuffle writes and reads a read
    packed = row["input_bytes"] / reads
    out_packed = row["output_bytes"] / reads
    kept = row["kept"] / reads
    total = args.reads
    print(f"measured (K={row['k']}): CPU µs a read: map {per_read['map'] * 1e6:.2f}, reduce "
          f"{per_read['reduce'] * 1e6:.2f}, gather {per_read['gather'] * 1e6:.2f}; {raw:.0f} raw bytes a read, "
          f"{shuffled:.0f} through the shuffle "
          f"({packed:.0f} compressed), {kept:.2f} of the reads kept")
    print(f"\n{total / 1e6:.0f}M reads; nodes of {args.cores} cores; shared filesystem {args.fs_gbps:g} GB/s in all; "
          f"{args.task_start:g} s to start a task; the gather's compression on {args.gather_threads} threads, its merge "
          f"at most {args.merge_rate / 1e6:g} M reads/s\n")
    print("| nodes | map s | reduce s | gather s | filesystem s | total s | speed-up | limited by |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    first = None
    for nodes in (1, 2, 4, 8, 16, 32, 64):
        cores = nodes * args.cores
        fs = args.fs_gbps * 1e9
        # map: read the input, write the shuffle; reduce: read it, write level-0 output; gather: read that, write the BAM
        map_io = total * (packed + shuffled) / fs
        reduce_io = total * (shuffled + kept * shuffled) / fs  # (the reduce tasks' outputs: at the shuffle's level)
        gather_io = total * (kept * shuffled + out_packed) / fs
        map_s = max(total * per_read["map"] / cores, map_io) + args.task_start
        reduce_s = max(total * per_read["reduce"] / cores, reduce_io) + args.task_start
        if ranged:  # one merge task per range, all at once; the join copies blocks
            gather_s = max(total * per_read["gather"] / cores, total * kept / args.merge_rate / min(nodes * 4, 64),
                           gather_io) + args.task_start
        else:
            gather_s = max(total * per_read["gather"] / min(args.gather_threads, args.cores), total * kept / args.merge_rate,
                           gather_io) + args.task_start
        t = map_s + reduce_s + gather_s
        first = first or t
        io_bound = map_io + reduce_io >= total * (per_read["map"] + per_read["reduce"]) / cores
        limit = "gather" if gather_s > map_s + reduce_s else ("filesystem" if io_bound else "map + reduce CPU")
        print(f"| {nodes} | {map_s:.0f} | {reduce_s:.0f} | {gather_s:.0f} | {map_io + reduce_io + gather_io:.0f} | "
              f"{t:.0f} | {first / t:.1f}x | {limit} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--input", default="/tmp/sim2M.bam")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--commands", default=",".join(COMMANDS))
    c.add_argument("--warm", action="store_true", help="also runs on a cluster started beforehand")
    c.add_argument("--json")
    t = sub.add_parser("tasks")
    t.add_argument("--input", default="/tmp/sim2M.bam")
    t.add_argument("--partitions", default="1,2,4,8,16")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--ranges", action="store_true", help="merge in K coordinate ranges (as on several hosts)")
    t.add_argument("--shuffle-level", default=None, help="BGZF level of the shuffle's files (default: raw)")
    t.add_argument("--json")
    m = sub.add_parser("model")
    m.add_argument("--tasks-json", default=os.path.join(OUT, "tasks.json"))
    m.add_argument("--reads", type=float, default=1e9)
    m.add_argument("--cores", type=int, default=32)
    m.add_argument("--fs-gbps", type=float, default=5.0)
    m.add_argument("--task-start", type=float, default=1.0)
    m.add_argument("--k", type=int, default=16, help="the measured row (partitions) to model from")
    m.add_argument("--gather-threads", type=int, default=8)
    m.add_argument("--merge-rate", type=float, default=5e6, help="reads/s the gather's coordinate merge passes")
    r = sub.add_parser("run-one")
    for name in ("command", "mode", "input", "output", "address"):
        r.add_argument(name)
    args = parser.parse_args()
    if args.what == "run-one":
        print(json.dumps(run_one(args.command, args.mode, args.input, args.output, args.address or None)))
    elif args.what == "compare":
        compare(args)
    elif args.what == "tasks":
        tasks(args)
    else:
        model(args)


if __name__ == "__main__":
    main()
