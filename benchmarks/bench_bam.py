"""BAM workloads and stage throughput: bamflow against samtools, mrfifo, sinto and pysam.

Workloads (all on the same input BAM, in one run, interleaved, medians of
``--repeats`` runs):

* W1  pass-through: decode → distribute (header FIFO) → 2 Python workers that
      copy their binary stream line by line → collect (input order) → BAM at
      the default level and at ``level="fast"``; ``bamflow.map_reads(identity)``;
      peers ``samtools view -@2 -b`` / ``-1`` and mrfifo 0.8.23's README
      workflow (SAM text through samtools view, 2 pass_through workers).
* W6  count reads per cell and tag each read XC:i:<running count>:
      ``bamflow.map_reduce(by="CB", workers=2, missing="drop")`` vs a
      single-process pysam script and an mrfifo workflow on SAM text.
* W2  shard by CB into 8: ``bamflow shard`` vs ``sinto filterbarcodes`` (8
      groups, round-robin over the BAM's CB values).
* W3  one BAM per cell with >= 100 reads: ``bamflow.split_reads`` (or
      ``bamflow split`` when the CLI has it) vs sinto (one group per cell)
      and ``samtools split -d CB`` (timeout, capped open files).
* mem peak memory of W2/W3 on a second, larger BAM (``--big``).
* stages: decode, encode, distribute and collect kernels alone, M records/s.

Every measured command is a fresh subprocess (its own session); wall time is
``time.monotonic`` around it, CPU time is user+sys of the whole process tree
from ``os.wait4`` (every descendant is reaped by its parent), peak memory is
(a) ``ru_maxrss`` from ``os.wait4``: the largest single process of the tree,
and (b) the peak over time of the summed PSS (``/proc/PID/smaps_rollup``) of
every process in the run's session, sampled every 0.2 s.

    python benchmarks/bench_bam.py --input /tmp/sim2M.bam --big /tmp/sim8M.bam
    python benchmarks/bench_bam.py --workloads w1,w6 --repeats 5

Internal: ``--run-one SYSTEM`` runs one measured command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
SAMTOOLS = shutil.which("samtools") or "samtools"


# -- worker functions (module level: picklable) ----------------------------------------


def pass_through(input, output):
    """The seed example's worker, on the binary record stream (as tests/test_bam_stages.py)."""
    n = 0
    for line in input:
        n += 1
        output.write(line)
    return n


def identity(read):
    return read


def count_and_tag(reads, out):
    """W6 per-read logic for bamflow.map_reduce (every read has CB: missing='drop')."""
    counts = {}
    for read in reads:
        cb = read.get_tag("CB")
        n = counts.get(cb, 0) + 1
        counts[cb] = n
        read.set_tag("XC", n, "i")
        out.write(read)
    return counts


def count_and_tag_text(input, output):
    """W6 for mrfifo: SAM text lines; reads without CB are dropped."""
    counts = {}
    for line in input:
        i = line.find("\tCB:Z:")
        if i < 0:
            continue
        j = line.find("\t", i + 6)
        cb = line[i + 6 : j if j >= 0 else len(line) - 1]
        n = counts.get(cb, 0) + 1
        counts[cb] = n
        output.write(f"{line[:-1]}\tXC:i:{n}\n")
    return counts


def mrfifo_pass_through(input, output):
    i = 0
    for line in input:
        i += 1
        output.write(line)
    return i


def _is_header(line):
    return line.startswith("@")


# -- the measured commands (run in a fresh process by --run-one) -----------------------

CAPTURED = []


def _capture_workflows():
    """Keep every bamflow Workflow that runs, to read its job_stats afterwards."""
    try:  # the engine's module (bamflow.workflow before the engine had its own package)
        import bamflow.engine.workflow as wfm
    except ImportError:
        import bamflow.workflow as wfm  # type: ignore[no-redef]

    original = wfm.Workflow.run

    def run(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            CAPTURED.append(self)

    wfm.Workflow.run = run


def run_one(system: str, inp: str, out: str, stats_path: str | None) -> int:
    stats: dict = {}
    if system.startswith("w1.bamflow"):
        import bamflow as bf
        from bamflow import FIFO

        level = "fast" if system.endswith("-fast") else None
        # chunk boundaries: frames (since the record layer) or marker reads (before), for before/after runs
        framing = {"frame_chunks": True} if hasattr(bf, "BamWorkflow") else {"mark_chunks": True}
        w = (
            bf.Workflow("w1")
            .BAM_reader(input=inp, output=FIFO("input_bam", "wb"))
            .distribute_bam(
                input=FIFO("input_bam", "rb"),
                outputs=FIFO("dist{n}", "wb", n=2),
                header_fifo=FIFO("header", "wb"),
                **framing,
            )
            .workers(input=FIFO("dist{n}", "rb"), output=FIFO("out{n}", "wb"), func=pass_through, n=2)
            .collect_bam(
                inputs=FIFO("out{n}", "rb", n=2), header_fifo=FIFO("header", "rb"), output=FIFO("out_bam", "wb"), order="input"
            )
            .BAM_writer(input=FIFO("out_bam", "rb"), output=out, **({"level": level} if level else {}))
            .run()
        )
        stats = {"job_stats": w.job_stats, "records": w.result_dict["w1.collect0"]["records"]}
    elif system == "w1.map_reads":
        import bamflow as bf

        _capture_workflows()
        r = bf.map_reads(inp, identity, out, workers=2)
        stats = {"records": r.written, "job_stats": CAPTURED[-1].job_stats}
    elif system in ("w1.mrfifo", "w6.mrfifo"):
        import mrfifo as mf

        func = mrfifo_pass_through if system == "w1.mrfifo" else count_and_tag_text
        n, chunk_size = 2, int(os.environ.get("BENCH_MRFIFO_CHUNK", "1"))
        w = (
            mf.Workflow(system.replace(".", "_"))
            .BAM_reader(input=inp)
            .distribute(
                input=mf.FIFO("input_sam", "rt"),
                outputs=mf.FIFO("dist{n}", "wt", n=n),
                chunk_size=chunk_size,
                header_detect_func=_is_header,
                header_broadcast=False,
                header_fifo=mf.FIFO("header", "wt"),
            )
            .workers(input=mf.FIFO("dist{n}", "rt"), output=mf.FIFO("out{n}", "wt"), func=func, n=n)
            .collect(
                inputs=mf.FIFO("out{n}", "rt", n=n),
                header_fifo=mf.FIFO("header", "rt"),
                output=mf.FIFO("out_sam", "wt"),
                chunk_size=chunk_size,
            )
            .funnel(input=mf.FIFO("out_sam", "rt"), output=out, _manage_fifos=False, func=mf.parts.bam_writer)
            .run()
        )
        stats = {"records": w.result_dict.get(f"{system.replace('.', '_')}.collect0")}
    elif system == "w6.bamflow":
        import bamflow as bf

        _capture_workflows()
        r = bf.map_reduce(inp, count_and_tag, output=out, by="CB", workers=2, missing="drop")
        stats = {"records": r.written, "cells": len(r.result), "job_stats": CAPTURED[-1].job_stats}
    elif system == "w6.pysam":
        import pysam

        counts: dict = {}
        written = 0
        with pysam.AlignmentFile(inp, "rb") as src, pysam.AlignmentFile(out, "wb", template=src) as dst:
            for read in src:
                try:
                    cb = read.get_tag("CB")
                except KeyError:
                    continue
                n = counts.get(cb, 0) + 1
                counts[cb] = n
                read.set_tag("XC", n, "i")
                dst.write(read)
                written += 1
        stats = {"records": written, "cells": len(counts)}
    elif system == "w3.bamflow-api":
        import bamflow as bf

        split_reads = getattr(bf, "split_reads", None)
        if split_reads is None:  # not exported at the top level (yet)
            from bamflow.bam.split import split_reads
        _capture_workflows()
        r = split_reads(inp, out, by="CB", min_reads=100)
        stats = {"records": r["written"], "files": r["files"], "job_stats": CAPTURED[-1].job_stats}
    else:
        raise SystemExit(f"unknown system {system}")
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(stats, f, default=str)
    return 0


# -- measuring -------------------------------------------------------------------------


def _session_pss_kb(sid: int) -> int:
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[3]) != sid:  # state ppid pgrp session
                continue
            with open(f"/proc/{name}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], timeout: float, limits: dict | None = None) -> dict:
    """Run ``cmd`` in its own session; wall, tree CPU (os.wait4), ru_maxrss and sampled tree PSS."""

    def preexec():
        for res, value in (limits or {}).items():
            resource.setrlimit(res, (value, value))

    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec if limits else None
    )
    peak = [0]
    done = threading.Event()
    timed_out = threading.Event()
    err_chunks: list[bytes] = []

    def sampler():
        while not done.wait(0.2):
            peak[0] = max(peak[0], _session_pss_kb(proc.pid))

    def drain():
        err_chunks.append(proc.stderr.read())

    def on_timeout():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        done.set()
    wall = time.monotonic() - t0
    threads[1].join(5)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or timed_out.is_set():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
    return {
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "max_rss_kb": ru.ru_maxrss,
        "tree_pss_kb": peak[0],
        "exit": code,
        "timeout": timed_out.is_set(),
        "stderr": b"".join(err_chunks).decode(errors="replace")[-2000:],
    }


def count_records(path: str) -> int | None:
    r = subprocess.run([SAMTOOLS, "view", "-c", "-@2", path], capture_output=True, text=True)
    return int(r.stdout) if r.returncode == 0 else None


def dir_stats(path: str) -> tuple[int, int]:
    files = size = 0
    for entry in os.scandir(path):
        if entry.is_file() and entry.name.endswith(".bam"):
            files += 1
            size += entry.stat().st_size
    return files, size


# -- workloads ---------------------------------------------------------------------------


def self_cmd(system: str, inp: str, out: str, stats: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--run-one", system, "--input", inp, "--output", out, "--stats", stats]


def systems_for(workload: str, inp: str, work: str, prep: dict, slow: bool) -> list[tuple[str, callable]]:
    """(label, make(rep) -> (cmd, output, stats_path, limits, timeout)) per system."""
    bamflow_exe = shutil.which("bamflow") or "bamflow"
    sinto_exe = shutil.which("sinto") or "sinto"
    o = lambda name: os.path.join(work, name)  # noqa: E731
    if workload == "w1":
        return [
            (
                "samtools view -@2 -b",
                lambda: ([SAMTOOLS, "view", "-@2", "-b", "-o", o("w1_samtools.bam"), inp], o("w1_samtools.bam"), None, None, 900),
            ),
            (
                "bamflow workflow (level 6)",
                lambda: (
                    self_cmd("w1.bamflow", inp, o("w1_bamflow.bam"), o("w1_bamflow.json")),
                    o("w1_bamflow.bam"),
                    o("w1_bamflow.json"),
                    None,
                    900,
                ),
            ),
            (
                "samtools view -@2 -1",
                lambda: (
                    [SAMTOOLS, "view", "-@2", "-1", "-o", o("w1_samtools1.bam"), inp],
                    o("w1_samtools1.bam"),
                    None,
                    None,
                    900,
                ),
            ),
            (
                "bamflow workflow (fast)",
                lambda: (
                    self_cmd("w1.bamflow-fast", inp, o("w1_bamflow_fast.bam"), o("w1_bamflow_fast.json")),
                    o("w1_bamflow_fast.bam"),
                    o("w1_bamflow_fast.json"),
                    None,
                    900,
                ),
            ),
            (
                "bamflow.map_reads(identity)",
                lambda: (
                    self_cmd("w1.map_reads", inp, o("w1_map_reads.bam"), o("w1_map_reads.json")),
                    o("w1_map_reads.bam"),
                    o("w1_map_reads.json"),
                    None,
                    900,
                ),
            ),
            (
                "mrfifo 0.8.23 README workflow",
                lambda: (
                    self_cmd("w1.mrfifo", inp, o("w1_mrfifo.bam"), o("w1_mrfifo.json")),
                    o("w1_mrfifo.bam"),
                    o("w1_mrfifo.json"),
                    None,
                    900,
                ),
            ),
        ]
    if workload == "w6":
        return [
            (
                "bamflow.map_reduce(by=CB)",
                lambda: (
                    self_cmd("w6.bamflow", inp, o("w6_bamflow.bam"), o("w6_bamflow.json")),
                    o("w6_bamflow.bam"),
                    o("w6_bamflow.json"),
                    None,
                    900,
                ),
            ),
            (
                "pysam script (1 process)",
                lambda: (
                    self_cmd("w6.pysam", inp, o("w6_pysam.bam"), o("w6_pysam.json")),
                    o("w6_pysam.bam"),
                    o("w6_pysam.json"),
                    None,
                    900,
                ),
            ),
            (
                "mrfifo 0.8.23 (SAM text)",
                lambda: (
                    self_cmd("w6.mrfifo", inp, o("w6_mrfifo.bam"), o("w6_mrfifo.json")),
                    o("w6_mrfifo.bam"),
                    o("w6_mrfifo.json"),
                    None,
                    900,
                ),
            ),
        ]
    if workload == "w2":

        def bamflow_shard():
            d = o("w2_bamflow")
            shutil.rmtree(d, ignore_errors=True)
            return (
                [
                    bamflow_exe,
                    "shard",
                    "--by",
                    "CB",
                    "-n",
                    "8",
                    "-o",
                    d,
                    "--progress",
                    "none",
                    "--stats",
                    o("w2_bamflow.json"),
                    inp,
                ],
                d,
                o("w2_bamflow.json"),
                None,
                900,
            )

        def sinto8():
            d = o("w2_sinto")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            return ([sinto_exe, "filterbarcodes", "-b", inp, "-c", prep["cells8"], "-p", "2", "--outdir", d], d, None, None, 1800)

        out = [
            (
                "samtools view -@2 -b (round trip)",
                lambda: ([SAMTOOLS, "view", "-@2", "-b", "-o", o("w2_samtools.bam"), inp], o("w2_samtools.bam"), None, None, 900),
            ),
            ("bamflow shard --by CB -n 8", bamflow_shard),
        ]
        if slow:
            out.append(("sinto filterbarcodes -p 2 (8 groups)", sinto8))
        return out
    if workload == "w3":

        def bamflow_split():
            d = o("w3_bamflow")
            shutil.rmtree(d, ignore_errors=True)
            if prep.get("split_cli"):
                cmd = [
                    bamflow_exe,
                    "split",
                    "--by",
                    "CB",
                    "--min-reads",
                    "100",
                    "-o",
                    d,
                    "--progress",
                    "none",
                    "--stats",
                    o("w3_bamflow.json"),
                    inp,
                ]
            else:
                cmd = self_cmd("w3.bamflow-api", inp, d, o("w3_bamflow.json"))
            return (cmd, d, o("w3_bamflow.json"), None, 900)

        def sinto_cells():
            d = o("w3_sinto")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            return (
                [sinto_exe, "filterbarcodes", "-b", inp, "-c", prep["cells100"], "-p", "2", "--outdir", d],
                d,
                None,
                None,
                1800,
            )

        def samtools_split():
            d = o("w3_samtools_split")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            return (
                [SAMTOOLS, "split", "-d", "CB", "-f", os.path.join(d, "%*_%!.%."), inp],
                d,
                None,
                {resource.RLIMIT_NOFILE: 1024},
                120,
            )

        out = [("bamflow split (>=100 reads)", bamflow_split)]
        if slow:
            out += [
                ("sinto filterbarcodes -p 2 (1 group/cell)", sinto_cells),
                ("samtools split -d CB (ulimit -n 1024, 120 s)", samtools_split),
            ]
        return out
    raise ValueError(workload)


def prepare(inp: str, work: str) -> dict:
    """CB read counts (samtools view | parse), sinto cell tables, index."""
    prep: dict = {}
    if not os.path.exists(inp + ".bai"):
        subprocess.run([SAMTOOLS, "index", inp], check=True)
    counts_path = os.path.join(work, "cb_counts.json")
    if os.path.exists(counts_path) and os.path.getmtime(counts_path) > os.path.getmtime(inp):
        with open(counts_path) as f:
            counts = json.load(f)
    else:
        counts = Counter()
        p = subprocess.Popen([SAMTOOLS, "view", "-@2", inp], stdout=subprocess.PIPE)
        for line in p.stdout:
            i = line.find(b"\tCB:Z:")
            if i >= 0:
                j = line.find(b"\t", i + 6)
                counts[line[i + 6 : j if j >= 0 else len(line) - 1].decode()] += 1
        p.wait()
        with open(counts_path, "w") as f:
            json.dump(counts, f)
    cells = sorted(counts)
    prep["cells8"] = os.path.join(work, "cells_8groups.tsv")
    with open(prep["cells8"], "w") as f:
        for i, cb in enumerate(cells):
            f.write(f"{cb}\tgroup{i % 8}\n")
    big = [cb for cb in cells if counts[cb] >= 100]
    prep["cells100"] = os.path.join(work, "cells_min100.tsv")
    with open(prep["cells100"], "w") as f:
        for cb in big:
            f.write(f"{cb}\t{cb}\n")
    prep["n_cells"] = len(cells)
    prep["n_cells_100"] = len(big)
    prep["reads_cells_100"] = sum(counts[cb] for cb in big)
    prep["reads_with_cb"] = sum(counts.values())
    prep["split_cli"] = (
        subprocess.run([shutil.which("bamflow") or "bamflow", "split", "--help"], capture_output=True).returncode == 0
    )
    return prep


def describe_output(out: str) -> dict:
    if os.path.isdir(out):
        files, size = dir_stats(out)
        return {"files": files, "bytes": size}
    if os.path.exists(out):
        return {"files": 1, "bytes": os.path.getsize(out), "records": count_records(out)}
    return {"files": 0, "bytes": 0}


def run_workload(workload: str, inp: str, work: str, prep: dict, repeats: int, slow_repeats: int, log, only: str = "") -> dict:
    results: dict[str, list[dict]] = {}
    for rep in range(max(repeats, slow_repeats)):
        slow = rep < slow_repeats
        for label, make in systems_for(workload, inp, work, prep, slow):
            if rep >= repeats and not label.startswith(("sinto", "samtools split")):
                continue
            if only and not label.startswith(only):
                continue
            cmd, out, stats_path, limits, timeout = make()
            if stats_path and os.path.exists(stats_path):
                os.unlink(stats_path)
            m = measure(cmd, timeout, limits)
            m["cmd"] = cmd
            if m["exit"] == 0:
                m.update(describe_output(out))
                if stats_path and os.path.exists(stats_path):
                    with open(stats_path) as f:
                        m["stats"] = json.load(f)
                    if m.get("records") is None:
                        for key in ("records", "reads_written", "written"):
                            if isinstance(m["stats"].get(key), int):
                                m["records"] = m["stats"][key]
                                break
            elif os.path.isdir(out):
                m.update(dir_stats_dict(out))
            log(
                f"{workload} rep{rep} {label}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s rss {m['max_rss_kb'] // 1024} MB "
                f"pss {m['tree_pss_kb'] // 1024} MB exit {m['exit']}{' TIMEOUT' if m['timeout'] else ''} "
                f"{ {k: m.get(k) for k in ('files', 'bytes', 'records')} }"
            )
            if m["exit"] != 0:
                log("  stderr: " + m["stderr"].strip().replace("\n", "\n  ")[-600:])
            results.setdefault(label, []).append(m)
            # outputs are not kept (disk); keep the last of each
    return results


def dir_stats_dict(out: str) -> dict:
    files, size = dir_stats(out)
    return {"files": files, "bytes": size}


# -- stage throughput ----------------------------------------------------------------------


def stage_bench(inp: str, work: str, repeats: int, log) -> dict:
    """Each stage alone in this process, from files to /dev/null; M records/s."""
    from bamflow.bam.bgzf import DEFAULT_LEVEL, BgzfReader, BgzfWriter
    from bamflow.bam.options import CollectOptions, DistributeOptions
    from bamflow.kernels.bam import collect_bam, distribute_bam

    raw = os.path.join(work, "stage_raw.bam")  # raw BAM stream: BAM\1, header, records
    parts = [os.path.join(work, f"stage_part{i}.bam") for i in range(2)]  # with chunk-end frames
    plain = [os.path.join(work, f"stage_plain{i}.bam") for i in range(2)]  # without
    with BgzfReader(inp, threads=2) as r, open(raw, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    with open(raw, "rb") as f:
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in parts]
        res = distribute_bam(f.fileno(), fds, DistributeOptions(frame_chunks=True))
        for fd in fds:
            os.close(fd)
        f.seek(0)
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in plain]
        distribute_bam(f.fileno(), fds, DistributeOptions())
        for fd in fds:
            os.close(fd)
    records = res["records"]
    raw_bytes = os.path.getsize(raw)
    log(f"stages: {records} records, raw stream {raw_bytes / 1e6:.0f} MB")
    devnull = os.open(os.devnull, os.O_WRONLY)
    buf = bytearray(1 << 20)

    def decode(threads):
        with BgzfReader(inp, threads=threads) as r:
            while True:
                n = r.readinto(buf)
                if not n:
                    break
                os.write(devnull, memoryview(buf)[:n])

    def encode(threads, level):
        with open(raw, "rb", buffering=0) as f, BgzfWriter(devnull, level=level, threads=threads) as w:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                w.write(memoryview(buf)[:n])

    def distribute(by):
        with open(raw, "rb", buffering=0) as f:
            r = distribute_bam(f.fileno(), [devnull, devnull], DistributeOptions(by=by, missing="drop"))
        assert r["records"] == records

    def collect(order):
        fs = [open(p, "rb", buffering=0) for p in (parts if order == "input" else plain)]
        try:
            r = collect_bam([f.fileno() for f in fs], devnull, CollectOptions(order))
        finally:
            for f in fs:
                f.close()
        assert r["records"] == records, r

    stages = [
        ("decode (BgzfReader, threads=1)", lambda: decode(1)),
        ("decode (BgzfReader, threads=2)", lambda: decode(2)),
        ("encode level 6 (BgzfWriter, threads=1)", lambda: encode(1, DEFAULT_LEVEL)),
        ("encode level 6 (BgzfWriter, threads=2)", lambda: encode(2, DEFAULT_LEVEL)),
        ("encode fast (BgzfWriter, threads=1)", lambda: encode(1, "fast")),
        ("encode fast (BgzfWriter, threads=2)", lambda: encode(2, "fast")),
        ("distribute kernel, round-robin, 2 outputs", lambda: distribute(None)),
        ("distribute kernel, by CB, 2 outputs", lambda: distribute("CB")),
        ("collect kernel, order=any, 2 inputs", lambda: collect("any")),
        ("collect kernel, order=input (frames), 2 inputs", lambda: collect("input")),
    ]
    out: dict[str, list[dict]] = {}
    for rep in range(repeats):
        for label, fn in stages:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            out.setdefault(label, []).append(
                {"wall": wall, "cpu": cpu, "mrec_s": records / wall / 1e6, "mb_s": raw_bytes / wall / 1e6}
            )
            log(f"stage rep{rep} {label}: {wall:.2f}s wall, {cpu:.2f}s cpu, {records / wall / 1e6:.2f} M rec/s")
    os.close(devnull)
    for p in [raw, *parts, *plain]:
        os.unlink(p)
    return {"records": records, "raw_bytes": raw_bytes, "stages": out}


# -- reporting --------------------------------------------------------------------------------


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_size(b):
    return f"{b / 1e6:.1f}" if b else "–"


def table_workload(name: str, results: dict, ref_label: str | None) -> str:
    lines = [
        f"#### {name}",
        "",
        "| system | runs ok | wall s (median) | CPU s (median) | max process RSS MB | tree PSS peak MB "
        "| output MB | files | records | wall / ref | CPU / ref |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ref = results.get(ref_label) if ref_label else None
    ref_ok = [m for m in ref if m["exit"] == 0] if ref else []
    ref_wall = med([m["wall"] for m in ref_ok]) if ref_ok else None
    ref_cpu = med([m["cpu"] for m in ref_ok]) if ref_ok else None
    for label, runs in results.items():
        ok = [m for m in runs if m["exit"] == 0]
        if not ok:
            why = "timeout" if any(m["timeout"] for m in runs) else f"exit {runs[0]['exit']}"
            w = med([m["wall"] for m in runs])
            lines.append(
                f"| {label} | 0/{len(runs)} ({why}) | {w:.2f} | {med([m['cpu'] for m in runs]):.2f} | "
                f"{med([m['max_rss_kb'] for m in runs]) / 1024:.0f} | {med([m['tree_pss_kb'] for m in runs]) / 1024:.0f} | "
                f"{fmt_size(med([m.get('bytes') for m in runs]))} | {med([m.get('files') for m in runs])} | – | – | – |"
            )
            continue
        wall = med([m["wall"] for m in ok])
        cpu = med([m["cpu"] for m in ok])
        rec = med([m.get("records") or (m.get("stats") or {}).get("records") for m in ok])
        lines.append(
            f"| {label} | {len(ok)}/{len(runs)} | {wall:.2f} | {cpu:.2f} | {max(m['max_rss_kb'] for m in ok) / 1024:.0f} | "
            f"{max(m['tree_pss_kb'] for m in ok) / 1024:.0f} | {fmt_size(med([m.get('bytes') for m in ok]))} | "
            f"{med([m.get('files') for m in ok])} | "
            f"{rec if rec is not None else '–'} | {wall / ref_wall:.2f} | {cpu / ref_cpu:.2f} |"
            if ref_wall
            else f"| {label} | {len(ok)}/{len(runs)} | {wall:.2f} | {cpu:.2f} | {max(m['max_rss_kb'] for m in ok) / 1024:.0f} | "
            f"{max(m['tree_pss_kb'] for m in ok) / 1024:.0f} | {fmt_size(med([m.get('bytes') for m in ok]))} | "
            f"{med([m.get('files') for m in ok])} | "
            f"{rec if rec is not None else '–'} | – | – |"
        )
    return "\n".join(lines) + "\n"


def table_jobs(results: dict) -> str:
    """Per-job CPU/wall/RSS (median over runs) of every bamflow run that reported job_stats."""
    lines = []
    for label, runs in results.items():
        js = [m["stats"]["job_stats"] for m in runs if m.get("stats") and m["stats"].get("job_stats")]
        if not js:
            continue
        lines += [f"{label}:", "", "| job | wall s | CPU s | max RSS MB |", "| --- | --- | --- | --- |"]
        for job in js[0]:
            vals = [j[job] for j in js if job in j]
            lines.append(
                f"| {job} | {med([v['wall_seconds'] for v in vals]):.2f} | {med([v['cpu_seconds'] for v in vals]):.2f} | "
                f"{med([v['max_rss_kb'] for v in vals]) / 1024:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def table_stages(st: dict) -> str:
    lines = [
        f"{st['records']} records, raw stream {st['raw_bytes'] / 1e6:.0f} MB; "
        f"median of {len(next(iter(st['stages'].values())))} runs",
        "",
        "| stage | wall s | CPU s | M records/s | MB/s (uncompressed) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, runs in st["stages"].items():
        lines.append(
            f"| {label} | {med([r['wall'] for r in runs]):.2f} | {med([r['cpu'] for r in runs]):.2f} | "
            f"{med([r['mrec_s'] for r in runs]):.2f} | {med([r['mb_s'] for r in runs]):.0f} |"
        )
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    from importlib.metadata import version

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("bamflow", "mrfifo", "sinto", "umi_tools", "pysam"):
        try:
            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "not installed"
    sam = subprocess.run([SAMTOOLS, "--version"], capture_output=True).stdout.decode(errors="replace").splitlines()
    versions["samtools"] = " / ".join(sam[:2])
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
        "git": commit,
        "loadavg": os.getloadavg(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="/tmp/sim2M.bam")
    p.add_argument("--big", default=None, help="a larger BAM for the W2/W3 memory check (e.g. /tmp/sim8M.bam)")
    p.add_argument("--workloads", default="w1,w6,w2,w3,mem,stages")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow-repeats", type=int, default=1, help="repeats for sinto and samtools split")
    p.add_argument("--work", default=os.path.join(HERE, "out", "bam"))
    p.add_argument("--json", default=None)
    p.add_argument("--run-one")
    p.add_argument("--output")
    p.add_argument("--stats")
    args = p.parse_args(argv)
    if args.run_one:
        return run_one(args.run_one, args.input, args.output, args.stats)

    os.makedirs(args.work, exist_ok=True)
    logf = open(os.path.join(args.work, "bench_bam.log"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        logf.write(line + "\n")
        logf.flush()

    wl = args.workloads.split(",")
    report = {"machine": machine_info(), "input": args.input, "repeats": args.repeats, "slow_repeats": args.slow_repeats}
    log(f"machine: {report['machine']}")
    prep = prepare(args.input, args.work)
    report["prep"] = prep
    log(f"prep: {prep}")
    md = []
    refs = {"w1": "samtools view -@2 -b", "w6": "pysam script (1 process)", "w2": "samtools view -@2 -b (round trip)", "w3": None}
    titles = {
        "w1": "W1 pass-through",
        "w6": "W6 count reads per cell + XC tag",
        "w2": "W2 shard by CB into 8",
        "w3": "W3 one BAM per cell (>= 100 reads)",
    }
    for w in ("w1", "w6", "w2", "w3"):
        if w not in wl:
            continue
        res = run_workload(w, args.input, args.work, prep, args.repeats, args.slow_repeats, log)
        report[w] = res
        md.append(table_workload(f"{titles[w]} ({os.path.basename(args.input)})", res, refs[w]))
        md.append(table_jobs(res))
        print("\n".join(md[-2:]), flush=True)
    if "mem" in wl and args.big:
        os.makedirs(os.path.join(args.work, "big"), exist_ok=True)
        bprep = prepare(args.big, os.path.join(args.work, "big"))
        res = {}
        for w in ("w2", "w3"):
            r = run_workload(w, args.big, os.path.join(args.work, "big"), bprep, 1, 0, log, only="bamflow")
            res.update({f"{w}: {k}": v for k, v in r.items() if k.startswith("bamflow")})
        report["mem_big"] = res
        md.append(table_workload(f"Memory at {os.path.basename(args.big)}", res, None))
        md.append(table_jobs(res))
        print("\n".join(md[-2:]), flush=True)
    if "stages" in wl:
        st = stage_bench(args.input, args.work, args.repeats, log)
        report["stages"] = st
        md.append("#### Stage throughput\n\n" + table_stages(st))
        print(md[-1], flush=True)
    json_path = args.json or os.path.join(args.work, "bench_bam.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.work, "bench_bam.md"), "w") as f:
        f.write("\n".join(md))
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
