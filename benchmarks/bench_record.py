"""bamflow.Record, map_batches and the BGZF writer: the targets of issue 12.

Comparisons, each run as interleaved pairs A B A B … (fresh processes, as
bench_bam.py measures them: wall, CPU of the process tree, largest process
RSS, peak summed PSS), medians and min-max:

* w6-vs-w1     W6 (count reads per cell, tag XC) with ``map_reduce`` on
               ``bamflow.Record`` vs W1, the pass-through pipeline (target: ≤ 1.25×).
* w6-vs-pysam  the same W6 vs a single-process pysam script with
               ``threads=2`` for reading and writing (target: ≥ 3× faster).
* w6-modes     W6 with ``record="bamflow"`` vs ``record="pysam"`` (context).
* id-vs-samtools  ``map_reads(identity)`` (Record) vs ``samtools view -@2 -b`` (target: ≤ 1.15×).
* batches      a ``map_batches`` tag filter, codec excluded: the worker loop
               (``bamflow.bam.batches.run_batches``) in one process on the raw
               stream, to /dev/null (target: ≥ 5 M records/s per worker);
               and end to end through ``map_batches``.
* codec        the BGZF encoders on the raw stream, one thread: size and CPU
               seconds per codec and level (the writer's choice for level 6).

    python benchmarks/bench_record.py --input /tmp/sim2M.bam --pairs 5

Internal: ``--run-one SYSTEM`` runs one measured command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_bam  # noqa: E402  (measure, machine_info, med, the W1 pipeline and its worker)

SAMTOOLS = bench_bam.SAMTOOLS


# -- the map_batches filter (module level: picklable) ---------------------------------------------


def keep_single_mapped_cells(batch):
    """The map_batches tag filter: reads with NH:i:1 and a CB among the cells kept."""
    return (batch.tag("NH") == 1) & batch.isin("CB", CELLS)


CELLS = None


def load_cells(path: str) -> None:
    """The filter's cells: every other CB of the input (from bench_bam's prepare)."""
    global CELLS
    from bamflow.kernels._records import ValueTable

    with open(path) as f:
        cells = sorted(json.load(f))
    CELLS = ValueTable(cells[::2])


# -- the measured commands ---------------------------------------------------------------------------


def run_one(system: str, inp: str, out: str, stats_path: str | None, extra: str | None) -> int:
    """bench_bam.py's commands where they exist (W1, W6, map_reads(identity) and
    its pysam script), with the record kind and pysam's threads made explicit."""
    import functools

    import pysam

    import bamflow as bf
    from bamflow.bam.workflow import BamWorkflow

    # bench_bam's W1 passes level=None for the default, which BAM_writer no longer takes
    writer = BamWorkflow.BAM_writer
    BamWorkflow.BAM_writer = lambda self, *a, level=None, **kw: writer(self, *a, **({} if level is None else
                                                                                    {"level": level}), **kw)
    if system in ("w6.record", "w6.pysam-mode"):
        bf.map_reduce = functools.partial(bf.map_reduce, record="bamflow" if system == "w6.record" else "pysam")
        return bench_bam.run_one("w6.bamflow", inp, out, stats_path)
    if system == "w6.pysam-threads2":  # bench_bam's single-process pysam script, with 2 BGZF threads
        pysam.AlignmentFile = functools.partial(pysam.AlignmentFile, threads=2)
        return bench_bam.run_one("w6.pysam", inp, out, stats_path)
    if system == "id.record":
        bf.map_reads = functools.partial(bf.map_reads, record="bamflow")
        return bench_bam.run_one("w1.map_reads", inp, out, stats_path)
    if system == "w1.bamflow":
        return bench_bam.run_one("w1.bamflow", inp, out, stats_path)
    if system != "batches.filter":
        raise SystemExit(f"unknown system {system}")
    load_cells(extra)
    bench_bam._capture_workflows()
    r = bf.map_batches(inp, keep_single_mapped_cells, out, tags=["NH", "CB"], workers=2, start_method="fork")
    stats = {"records": r.written, "reads_in": r.reads_in, "job_stats": bench_bam.CAPTURED[-1].job_stats}
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(stats, f, default=str)
    return 0


def self_cmd(system: str, inp: str, out: str, stats: str, extra: str | None = None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--run-one", system, "--input", inp, "--output", out,
           "--stats", stats]
    return cmd + (["--extra", extra] if extra else [])


# -- pairs -------------------------------------------------------------------------------------------


def systems(inp: str, work: str, cells: str) -> dict[str, tuple]:
    """label -> (command, output, stats path) of every measured system."""
    o = lambda name: os.path.join(work, name)  # noqa: E731
    return {
        "W1 pass-through pipeline": (self_cmd("w1.bamflow", inp, o("w1.bam"), o("w1.json")), o("w1.bam"),
                                     o("w1.json")),
        "W6 map_reduce, bamflow.Record": (self_cmd("w6.record", inp, o("w6r.bam"), o("w6r.json")), o("w6r.bam"),
                                          o("w6r.json")),
        "W6 map_reduce, pysam records": (self_cmd("w6.pysam-mode", inp, o("w6p.bam"), o("w6p.json")), o("w6p.bam"),
                                         o("w6p.json")),
        "W6 pysam script, threads=2": (self_cmd("w6.pysam-threads2", inp, o("w6s.bam"), o("w6s.json")),
                                       o("w6s.bam"), o("w6s.json")),
        "map_reads(identity), bamflow.Record": (self_cmd("id.record", inp, o("id.bam"), o("id.json")), o("id.bam"),
                                                o("id.json")),
        "samtools view -@2 -b": ([SAMTOOLS, "view", "-@2", "-b", "-o", o("st.bam"), inp], o("st.bam"), None),
        "map_batches tag filter (end to end)": (self_cmd("batches.filter", inp, o("mb.bam"), o("mb.json"), cells),
                                                o("mb.bam"), o("mb.json")),
    }


PAIRS = {
    "w6-vs-w1": ("W6 map_reduce, bamflow.Record", "W1 pass-through pipeline", 1.25, "at most"),
    "w6-vs-pysam": ("W6 map_reduce, bamflow.Record", "W6 pysam script, threads=2", 1 / 3, "at most"),
    "w6-modes": ("W6 map_reduce, bamflow.Record", "W6 map_reduce, pysam records", None, None),
    "id-vs-samtools": ("map_reads(identity), bamflow.Record", "samtools view -@2 -b", 1.15, "at most"),
}


def run_pairs(name: str, table: dict, n_pairs: int, log) -> dict:
    a, b, _, _ = PAIRS[name]
    runs: dict[str, list[dict]] = {a: [], b: []}
    for i in range(n_pairs):
        for label in (a, b):
            cmd, out, stats_path = table[label]
            if stats_path and os.path.exists(stats_path):
                os.unlink(stats_path)
            m = bench_bam.measure(cmd, 900)
            if m["exit"] == 0:
                m["bytes"] = os.path.getsize(out) if os.path.exists(out) else None
                if stats_path and os.path.exists(stats_path):
                    with open(stats_path) as f:
                        m["stats"] = json.load(f)
            log(f"{name} pair {i} {label}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s "
                f"rss {m['max_rss_kb'] // 1024} MB pss {m['tree_pss_kb'] // 1024} MB exit {m['exit']}")
            if m["exit"] != 0:
                log("  stderr: " + m["stderr"][-600:])
            runs[label].append(m)
    return runs


# -- the kernels alone: map_batches' worker, and the codecs ------------------------------------------


def batch_kernel(raw: str, cells: str, repeats: int, log) -> dict:
    """run_batches on the raw stream in this process, to /dev/null: records/s per worker."""
    from bamflow.bam.batches import run_batches

    load_cells(cells)
    out: dict[str, list] = {}
    functions = {
        "NH == 1 and CB in a set (2 tags, isin in C)": (keep_single_mapped_cells, ["NH", "CB"]),
        "NH == 1 (1 tag)": (lambda batch: batch.tag("NH") == 1, ["NH"]),
        "keep all, no tags (the loop alone)": (lambda batch: None, []),
    }
    for rep in range(repeats):
        for label, (func, tags) in functions.items():
            in_fd = os.open(raw, os.O_RDONLY)
            out_fd = os.open(os.devnull, os.O_WRONLY)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            result = run_batches(in_fd, out_fd, func, tags, 10000)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            os.close(in_fd)
            os.close(out_fd)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            entry = {"wall": wall, "cpu": cpu, "records": result["reads_in"], "kept": result["written"],
                     "mrec_s": result["reads_in"] / wall / 1e6}
            out.setdefault(label, []).append(entry)
            log(f"batch kernel rep{rep} {label}: {wall:.3f}s wall {cpu:.3f}s cpu, {entry['mrec_s']:.2f} M records/s, "
                f"kept {result['written']}")
    return out


def codecs(raw: str, repeats: int, log) -> dict:
    """Each BGZF codec on the whole raw stream, one thread, interleaved: size, CPU s."""
    import deflate
    import isal.isal_zlib

    from bamflow.bam import bgzf

    with open(raw, "rb") as f:
        data = f.read()
    blocks = [data[i:i + bgzf.BLOCK_SIZE] for i in range(0, len(data), bgzf.BLOCK_SIZE)]
    table = {
        "libdeflate 6 (level 6 without zlib-ng)": lambda b: deflate.deflate_compress(b, 6),
        "zlib-ng 5 (level 6 with zlib-ng)": bgzf._compressor(6, "auto"),
        "libdeflate 5": lambda b: deflate.deflate_compress(b, 5),
        "libdeflate 7": lambda b: deflate.deflate_compress(b, 7),
        "ISA-L 1 (level fast)": lambda b: isal.isal_zlib.compress(b, 1, wbits=-15),
    }
    if bgzf.codec_of(6) != ("zlib-ng", 5):
        del table["zlib-ng 5 (level 6 with zlib-ng)"]
        log("codec: zlib-ng is not installed")
    out: dict[str, list] = {}
    for rep in range(repeats):
        for label, fn in table.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            size = sum(len(fn(b)) + 26 for b in blocks) + 28
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            out.setdefault(label, []).append({"cpu": cpu, "bytes": size})
            log(f"codec rep{rep} {label}: {size:,d} bytes, {cpu:.2f} CPU s, {len(data) / cpu / 1e6:.0f} MB/s")
    return {"raw_bytes": len(data), "codecs": out}


# -- reporting -----------------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def table_pairs(name: str, runs: dict) -> str:
    a, b, target, how = PAIRS[name]
    lines = [f"#### {name}: {a} vs {b}", "",
             "| system | runs ok | wall s median (min–max) | CPU s median (min–max) | max RSS MB | tree PSS MB | "
             "output MB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    walls = {}
    for label in (a, b):
        ok = [m for m in runs[label] if m["exit"] == 0]
        walls[label] = [m["wall"] for m in ok]
        if not ok:
            lines.append(f"| {label} | 0/{len(runs[label])} | – | – | – | – | – |")
            continue
        lines.append(f"| {label} | {len(ok)}/{len(runs[label])} | {spread(walls[label])} | "
                     f"{spread([m['cpu'] for m in ok])} | {max(m['max_rss_kb'] for m in ok) / 1024:.0f} | "
                     f"{max(m['tree_pss_kb'] for m in ok) / 1024:.0f} | "
                     f"{statistics.median([m['bytes'] or 0 for m in ok]) / 1e6:.1f} |")
    if walls[a] and walls[b]:
        ratio = statistics.median(walls[a]) / statistics.median(walls[b])
        pair_ratios = [x / y for x, y in zip(walls[a], walls[b], strict=False)]
        met = "" if target is None else f"; target {how} {target:.2f}: **{'met' if ratio <= target else 'missed'}**"
        lines += ["", f"Ratio of medians {ratio:.3f} (per pair {min(pair_ratios):.3f}–{max(pair_ratios):.3f}){met}."]
    return "\n".join(lines) + "\n"


def table_jobs(runs: dict) -> str:
    return bench_bam.table_jobs(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="/tmp/sim2M.bam")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--comparisons", default="w6-vs-w1,w6-vs-pysam,id-vs-samtools,w6-modes,batches,codec")
    p.add_argument("--work", default=os.path.join(HERE, "out", "record"))
    p.add_argument("--run-one")
    p.add_argument("--output")
    p.add_argument("--stats")
    p.add_argument("--extra")
    args = p.parse_args(argv)
    if args.run_one:
        return run_one(args.run_one, args.input, args.output, args.stats, args.extra)

    os.makedirs(args.work, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(args.work, "bench_record.log"))])
    log = logging.getLogger("bench_record").info

    wanted = args.comparisons.split(",")
    report: dict = {"machine": bench_bam.machine_info(), "input": args.input, "pairs": args.pairs,
                    "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    log(f"machine: {report['machine']}")
    log(f"uptime before: {report['uptime_before']}")
    prep = bench_bam.prepare(args.input, args.work)  # the index and the CB counts
    cells = os.path.join(args.work, "cb_counts.json")
    table = systems(args.input, args.work, cells)
    md = []
    for name in PAIRS:
        if name in wanted:
            runs = run_pairs(name, table, args.pairs, log)
            report[name] = runs
            md += [table_pairs(name, runs), table_jobs(runs)]
            print("\n".join(md[-2:]), flush=True)
    raw = os.path.join(args.work, "raw_stream.bam")
    if "batches" in wanted or "codec" in wanted:
        from bamflow.bam.bgzf import BgzfReader

        with BgzfReader(args.input, threads=2) as r, open(raw, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    if "batches" in wanted:
        kernel = batch_kernel(raw, cells, args.pairs, log)
        report["batch_kernel"] = kernel
        lines = ["#### map_batches worker loop alone (raw stream → /dev/null, one process, batch_size 10000)", "",
                 "| function | M records/s median (min–max) | wall s | CPU s | kept |", "| --- | --- | --- | --- | --- |"]
        for label, runs in kernel.items():
            lines.append(f"| {label} | {spread([r['mrec_s'] for r in runs])} | {spread([r['wall'] for r in runs], '{:.3f}')} | "
                         f"{spread([r['cpu'] for r in runs], '{:.3f}')} | {runs[0]['kept']:,d} |")
        md.append("\n".join(lines) + "\n")
        cmd, out, stats_path = table["map_batches tag filter (end to end)"]
        runs = []
        for i in range(args.pairs):
            m = bench_bam.measure(cmd, 900)
            if m["exit"] == 0 and os.path.exists(stats_path):
                with open(stats_path) as f:
                    m["stats"] = json.load(f)
            log(f"map_batches end to end {i}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s exit {m['exit']}")
            runs.append(m)
        report["batches_end_to_end"] = runs
        ok = [m for m in runs if m["exit"] == 0]
        if ok:
            md.append(f"map_batches tag filter end to end (level 6 output): wall {spread([m['wall'] for m in ok])} s, "
                      f"CPU {spread([m['cpu'] for m in ok])} s, kept {ok[0]['stats']['records']:,d} of "
                      f"{ok[0]['stats']['reads_in']:,d}\n")
            md.append(table_jobs({"map_batches tag filter (end to end)": ok}))
        print("\n".join(md[-3:]), flush=True)
    if "codec" in wanted:
        c = codecs(raw, 3, log)
        report["codec"] = c
        base = statistics.median([r["cpu"] for r in c["codecs"]["libdeflate 6 (level 6 without zlib-ng)"]])
        base_size = c["codecs"]["libdeflate 6 (level 6 without zlib-ng)"][0]["bytes"]
        lines = [f"#### BGZF codecs on the raw stream ({c['raw_bytes'] / 1e6:.0f} MB), one thread, 3 interleaved runs",
                 "", "| codec | output bytes | size vs libdeflate 6 | CPU s median (min–max) | CPU vs libdeflate 6 |",
                 "| --- | --- | --- | --- | --- |"]
        for label, runs in c["codecs"].items():
            cpu = [r["cpu"] for r in runs]
            lines.append(f"| {label} | {runs[0]['bytes']:,d} | {runs[0]['bytes'] / base_size - 1:+.2%} | {spread(cpu)} | "
                         f"{statistics.median(cpu) / base:.2f}× |")
        md.append("\n".join(lines) + "\n")
        print(md[-1], flush=True)
    if os.path.exists(raw):
        os.unlink(raw)
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    log(f"uptime after: {report['uptime_after']}")
    report["prep"] = prep
    with open(os.path.join(args.work, "bench_record.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.work, "bench_record.md"), "w") as f:
        f.write(f"uptime before: {report['uptime_before']}\n\nuptime after: {report['uptime_after']}\n\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
