#!/usr/bin/env python3
"""Line-plumbing benchmark: bamflow against the peer mrfifo (0.8.23).

One workload, the same for both systems::

    reader ─▶ distribute (round-robin, chunk_size lines) ─▶ 2 Python workers ─▶ collect ─▶ file
                  └──────────────── header lines ('@...') ─────────────────────────┘

* input: a generated, deterministic file of SAM-like text lines (~100 bytes
  each, a few '@' header lines first), plain (uncompressed); cached under
  ``benchmarks/data/`` (git-ignored);
* reader: each system's gzip-capable reader (``gz_reader``), which passes a
  plain file through as it is (bamflow: magic-byte check; mrfifo: isal raises
  BadGzipFile and it falls back to plain reading);
* workers: the same module-level :func:`pass_through` in text mode for both;
* collect: mrfifo's collector is strictly round-robin; bamflow is run with
  ``order="round-robin"`` (like for like) and with ``order="any"`` (its
  default, which does not wait for a particular worker).

Each run is a fresh subprocess (``--run-one``); its wall time and the CPU time
(user+sys) of its whole process tree come from ``os.wait4``. Runs are
interleaved (bamflow, mrfifo, bamflow, mrfifo, ...) and medians are reported.
Every output is verified (size, line count, order-independent multiset
checksum of its lines, header first); a run that loses or changes a line is
reported as FAIL.

Usage::

    python benchmarks/bench_lines.py --lines 4000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
OUT_DIR = os.path.join(HERE, "out")
DATA_VERSION = 1  # bump when the generator changes: the cache file name has it

N_WORKERS = 2

# --background-load: burns one CPU until its parent (this script) is gone
BUSY_LOOP = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    for _ in range(1000000): pass\n"


# -- the worker: identical for both systems ------------------------------------


def pass_through(input, output):
    for line in input:
        output.write(line)


# -- input data -------------------------------------------------------------------

CHROMS = [f"chr{c}" for c in list(range(1, 23)) + ["X", "Y", "M"]]


def header_lines() -> list[str]:
    lines = ["@HD\tVN:1.6\tSO:unsorted\n"]
    for i, chrom in enumerate(CHROMS):
        lines.append(f"@SQ\tSN:{chrom}\tLN:{250_000_000 - i * 7_000_000}\n")
    lines.append("@RG\tID:A\tSM:sample\n")
    lines.append("@PG\tID:bench_lines\tPN:bench_lines\tVN:1\n")
    return lines


def generate(path: str, n_lines: int, seed: int = 20240917) -> None:
    """Write ``n_lines`` SAM-like body lines (after the header) to ``path``, deterministically."""
    rng = random.Random(seed)
    bases = "ACGT"
    quals = "".join(chr(c) for c in range(ord("#"), ord("J") + 1))
    seq_pool = ["".join(rng.choice(bases) for _ in range(32)) for _ in range(4096)]
    qual_pool = ["".join(rng.choice(quals) for _ in range(32)) for _ in range(4096)]
    flags = ["0", "16", "4", "256", "272", "1024"]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.writelines(header_lines())
        block: list[str] = []
        getrandbits = rng.getrandbits
        for i in range(n_lines):
            r = getrandbits(64)
            block.append(
                f"r{i:09d}\t{flags[r % 6]}\t{CHROMS[(r >> 3) % 25]}\t{(r >> 8) % 200_000_000 + 1}\t"
                f"{(r >> 36) % 61}\t32M\t*\t0\t0\t{seq_pool[(r >> 42) & 4095]}\t{qual_pool[(r >> 52) & 4095]}\n"
            )
            if len(block) == 65536:
                f.writelines(block)
                block.clear()
        f.writelines(block)
    os.replace(tmp, path)


def ensure_input(n_lines: int) -> str:
    os.makedirs(DATA_DIR, exist_ok=True)
    path = os.path.join(DATA_DIR, f"lines_{n_lines}_v{DATA_VERSION}.sam")
    if not os.path.exists(path):
        print(f"generating {path} ({n_lines:,} lines) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        generate(path, n_lines)
        print(f"  done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return path


# -- verification -------------------------------------------------------------------


def fingerprint(path: str) -> dict:
    """Size, line count and an order-independent checksum of the multiset of lines.

    The checksum is the sum of the lines' (keyed, per-process) hashes modulo
    2**64: it only compares files within one run of this script. A last line
    without a newline counts as if it had one.
    """
    n = 0
    total = 0
    head: list[bytes] = []
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            if not line.endswith(b"\n"):
                line += b"\n"
            if n < 64:
                head.append(line)
            n += 1
            total += hash(line)
    return {"bytes": os.path.getsize(path), "lines": n, "checksum": total % (1 << 64), "head": head}


def verify(expected: dict, n_header: int, output: str) -> tuple[bool, str]:
    if not os.path.exists(output):
        return False, "no output file"
    got = fingerprint(output)
    problems = []
    if got["lines"] != expected["lines"]:
        problems.append(f"{got['lines']} lines, expected {expected['lines']}")
    if got["bytes"] != expected["bytes"]:
        problems.append(f"{got['bytes']} bytes, expected {expected['bytes']}")
    if got["checksum"] != expected["checksum"]:
        problems.append("multiset checksum of lines differs")
    if got["head"][:n_header] != expected["head"][:n_header]:
        problems.append("output does not start with the header")
    return (not problems), "; ".join(problems) or "ok"


# -- one run of one system (in its own process) -------------------------------------


def run_bamflow(input_path: str, output: str, chunk_size: int, order: str) -> dict:
    import bamflow as bf

    t0 = time.monotonic()
    w = (
        bf.Workflow("lines")
        .gz_reader(input=input_path, output=bf.FIFO("input", "wb"))
        .distribute(
            input=bf.FIFO("input", "rb"),
            outputs=bf.FIFO("dist{n}", "wb", n=N_WORKERS),
            chunk_size=chunk_size,
            header_prefix="@",
            header_fifo=bf.FIFO("header", "wb"),
        )
        .workers(input=bf.FIFO("dist{n}", "rt"), output=bf.FIFO("out{n}", "wt"), func=pass_through, n=N_WORKERS)
        .collect(
            inputs=bf.FIFO("out{n}", "rb", n=N_WORKERS),
            header_fifo=bf.FIFO("header", "rb"),
            output=output,
            order=order,
            chunk_size=chunk_size,
        )
        .run()
    )
    wall = time.monotonic() - t0
    return {
        "wall": wall,
        "results": {k: v for k, v in w.result_dict.items()},
        "job_cpu": {k: round(v.get("cpu_seconds", float("nan")), 3) for k, v in w.job_stats.items()},
        "job_wall": {k: round(v.get("wall_seconds", float("nan")), 3) for k, v in w.job_stats.items()},
    }


def _is_header(line):
    return line.startswith("@")


def run_mrfifo(input_path: str, output: str, chunk_size: int) -> dict:
    import logging

    import mrfifo as mf

    # its reader logs a warning for every plain (not gzip) input: expected here
    logging.getLogger("mrfifo.parts.igzip_reader").setLevel(logging.ERROR)

    t0 = time.monotonic()
    w = mf.Workflow("lines")
    try:
        (
            w.gz_reader(inputs=[input_path], output=mf.FIFO("input_text", "wb"))
            .distribute(
                input=mf.FIFO("input_text", "rt"),
                outputs=mf.FIFO("dist{n}", "wt", n=N_WORKERS),
                chunk_size=chunk_size,
                header_detect_func=_is_header,
                header_fifo=mf.FIFO("header", "wt"),
            )
            .workers(input=mf.FIFO("dist{n}", "rt"), output=mf.FIFO("out{n}", "wt"), func=pass_through, n=N_WORKERS)
            .collect(
                inputs=mf.FIFO("out{n}", "rt", n=N_WORKERS),
                header_fifo=mf.FIFO("header", "rt"),
                output=output,
                chunk_size=chunk_size,
            )
            .run()
        )
        results = dict(w.result_dict)
        errors = dict(w.exc_dict)
    finally:
        # reap the Manager's server process here, so that its CPU time is in
        # our rusage and nothing is left behind
        w.manager.shutdown()
    wall = time.monotonic() - t0
    return {"wall": wall, "results": results, "errors": errors}


def run_one(args: argparse.Namespace) -> int:
    if args.run_one == "bamflow":
        report = run_bamflow(args.input, args.output, args.chunk_size, args.order)
    elif args.run_one == "mrfifo":
        report = run_mrfifo(args.input, args.output, args.chunk_size)
    else:
        raise SystemExit(f"unknown system {args.run_one!r}")
    with open(args.report, "w") as f:
        json.dump(report, f, default=repr)
    return 0


# -- the driver -----------------------------------------------------------------------


def _kill_tree(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def spawn_and_measure(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; returns its wall time, its process tree's CPU time, its exit status.

    ``os.wait4`` gives the rusage of the child including every descendant it
    reaped (all job processes, and mrfifo's Manager server). The child leads
    its own process group, so that a run that hangs (or Ctrl-C here) can be
    stopped with everything it started: mrfifo's jobs do not die with their
    parent.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_tree(proc.pid)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:
        _kill_tree(proc.pid)
        proc.wait()
        raise
    finally:
        timer.cancel()
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timed_out.is_set() or proc.returncode != 0:
        _kill_tree(proc.pid)  # whatever it left behind
    return {
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "max_rss_kb": ru.ru_maxrss,
        "exit": proc.returncode,
        "timeout": timed_out.is_set(),
    }


def variant_label(system: str, order: str | None) -> str:
    return system if system == "mrfifo" else f"bamflow ({order})"


def bamflow_source() -> str:
    """Where the runs import bamflow from, with its git commit when that is a checkout."""
    import importlib.util

    spec = importlib.util.find_spec("bamflow")
    if spec is None or not spec.submodule_search_locations:
        return "not found"
    folder = list(spec.submodule_search_locations)[0]
    where = folder
    try:
        commit = subprocess.run(
            ["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", folder, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
        where += f" (git {commit}{', with uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        pass
    return where


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("bamflow", "mrfifo"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "?"
    return {
        "bamflow_source": bamflow_source(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=4_000_000, help="body lines in the generated input")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="rounds of every variant run first and not counted (fresh memory is slow on this VM kind)",
    )
    p.add_argument("--chunk-sizes", default="1,1000", help="comma-separated distribute/collect chunk sizes (lines)")
    p.add_argument(
        "--bamflow-orders",
        default="round-robin,any",
        help="comma-separated collect orders to run bamflow with (round-robin is like-for-like with mrfifo)",
    )
    p.add_argument("--systems", default="bamflow,mrfifo")
    p.add_argument("--out-dir", default=OUT_DIR, help="where outputs go (deleted after verification)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before one run is killed (FAIL)")
    p.add_argument("--json", help="also write all raw measurements to this file")
    p.add_argument(
        "--background-load",
        type=int,
        default=0,
        help="busy-loop processes to keep running during all runs (simulates a shared, busy machine)",
    )
    # internal: one run of one system
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--order", default="round-robin", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.run_one:
        return run_one(args)

    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    systems = [s for s in args.systems.split(",") if s]
    variants: list[tuple[str, str | None]] = []
    for system in systems:
        if system == "bamflow":
            variants += [("bamflow", o) for o in args.bamflow_orders.split(",") if o]
        elif system == "mrfifo":
            variants.append(("mrfifo", None))
        else:
            p.error(f"unknown system {system!r}")
    # interleave: bamflow (first order), mrfifo, bamflow (other orders)
    order = [v for v in variants if v[0] == "bamflow"][:1]
    order += [v for v in variants if v[0] == "mrfifo"]
    order += [v for v in variants if v[0] == "bamflow"][1:]

    info = machine_info()
    input_path = ensure_input(args.lines)
    expected = fingerprint(input_path)
    n_header = len(header_lines())
    size_mb = expected["bytes"] / 1e6
    print(
        f"input: {input_path}: {expected['lines']:,} lines ({n_header} header), {size_mb:.1f} MB",
        file=sys.stderr,
        flush=True,
    )
    os.makedirs(args.out_dir, exist_ok=True)

    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid())]) for _ in range(args.background_load)]
    try:
        runs, warmup_failures = measure(args, order, chunk_sizes, input_path, expected, n_header)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    summarize(args, info, order, chunk_sizes, runs, warmup_failures, expected, n_header, size_mb)
    return 0 if all(r["ok"] for r in runs) and not warmup_failures else 1


def measure(
    args: argparse.Namespace,
    order: list[tuple[str, str | None]],
    chunk_sizes: list[int],
    input_path: str,
    expected: dict,
    n_header: int,
) -> tuple[list[dict], list[dict]]:
    """Run every variant, interleaved, warm-up rounds first; returns (runs, failed warm-up runs)."""
    runs: list[dict] = []
    warmup_failures: list[dict] = []
    for rep in range(-args.warmup, args.repeats):
        for chunk in chunk_sizes:
            for system, coll_order in order:
                label = variant_label(system, coll_order)
                output = os.path.join(args.out_dir, f"out_{system}_{chunk}.sam")
                report = os.path.join(args.out_dir, f"report_{system}_{chunk}.json")
                for stale in (output, report):
                    if os.path.exists(stale):
                        os.unlink(stale)
                cmd = [
                    sys.executable, os.path.abspath(__file__), "--run-one", system,
                    "--input", input_path, "--output", output, "--chunk-size", str(chunk),
                    "--order", coll_order or "round-robin", "--report", report,
                ]  # fmt: skip
                m = spawn_and_measure(cmd, args.timeout)
                inner: dict = {}
                if os.path.exists(report):
                    with open(report) as f:
                        inner = json.load(f)
                if m["timeout"]:
                    ok, why = False, f"timed out after {args.timeout:.0f} s"
                elif m["exit"] != 0:
                    ok, why = False, f"exit status {m['exit']}"
                elif inner.get("errors"):
                    ok, why = False, f"job errors: {inner['errors']}"
                else:
                    ok, why = verify(expected, n_header, output)
                if os.path.exists(output):
                    os.unlink(output)  # before it is written back to disk
                run = {
                    "repeat": rep,
                    "chunk_size": chunk,
                    "system": system,
                    "order": coll_order,
                    "label": label,
                    "ok": ok,
                    "check": why,
                    "proc_wall": m["wall"],
                    "wall": inner.get("wall", m["wall"]),
                    "cpu": m["cpu"],
                    "user": m.get("user"),
                    "sys": m.get("sys"),
                    "max_rss_kb": m.get("max_rss_kb"),
                    "job_cpu": inner.get("job_cpu"),
                    "job_wall": inner.get("job_wall"),
                    "results": inner.get("results"),
                }
                if rep >= 0:
                    runs.append(run)
                elif not ok:
                    warmup_failures.append(run)
                tag = "warm-up" if rep < 0 else f"{rep + 1}/{args.repeats}"
                print(
                    f"[{tag}] chunk={chunk:<5} {label:<22} wall {run['wall']:6.2f} s"
                    f" (process {m['wall']:6.2f} s)  cpu {m['cpu']:6.2f} s  {'PASS' if ok else 'FAIL: ' + why}",
                    file=sys.stderr,
                    flush=True,
                )
                if system == "bamflow" and run["job_cpu"]:
                    print(f"      job cpu s: {run['job_cpu']}", file=sys.stderr, flush=True)
    return runs, warmup_failures


def summarize(
    args: argparse.Namespace,
    info: dict,
    order: list[tuple[str, str | None]],
    chunk_sizes: list[int],
    runs: list[dict],
    warmup_failures: list[dict],
    expected: dict,
    n_header: int,
    size_mb: float,
) -> None:
    """Print the Markdown tables (medians, ratios, bamflow's per-job CPU); write --json."""
    n_total = expected["lines"]
    print()
    print("Command: " + " ".join(["python", os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:]))
    print(f"Machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}, Linux {info['kernel']}, {info['date']}")
    print(f"bamflow {info['versions']['bamflow']} from {info['bamflow_source']}, mrfifo {info['versions']['mrfifo']}")
    load_end = os.getloadavg()
    print(
        f"Load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in info['loadavg'])} at the start,"
        f" {' '.join(f'{x:.2f}' for x in load_end)} at the end"
    )
    print(
        f"Input: {n_total:,} lines ({n_header} header lines), {size_mb:.1f} MB plain text;"
        f" {N_WORKERS} workers; medians of {args.repeats} interleaved runs"
        + (f"; {args.background_load} busy-loop process(es) running alongside" if args.background_load else "")
    )
    print()
    print("| chunk | system | wall s | process wall s | CPU s | lines/s | MB/s | check |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    medians: dict[tuple[int, str], dict] = {}
    for chunk in chunk_sizes:
        for system, coll_order in order:
            label = variant_label(system, coll_order)
            rs = [r for r in runs if r["chunk_size"] == chunk and r["label"] == label]
            wall = statistics.median(r["wall"] for r in rs)
            proc_wall = statistics.median(r["proc_wall"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            n_ok = sum(r["ok"] for r in rs)
            check = "PASS" if n_ok == len(rs) else f"FAIL ({len(rs) - n_ok}/{len(rs)})"
            medians[(chunk, label)] = {"wall": wall, "cpu": cpu, "ok": n_ok == len(rs)}
            print(
                f"| {chunk} | {label} | {wall:.2f} | {proc_wall:.2f} | {cpu:.2f} | {n_total / wall / 1e6:.2f} M"
                f" | {size_mb / wall:.0f} | {check} |"
            )
    print()
    labels = {label for _, label in medians}
    if "mrfifo" in labels and any(label.startswith("bamflow") for label in labels):
        print("| chunk | bamflow collect order | mrfifo wall / bamflow wall | mrfifo CPU / bamflow CPU |")
        print("|---:|---|---:|---:|")
        for chunk in chunk_sizes:
            mr = medians.get((chunk, "mrfifo"))
            for system, coll_order in order:
                if system != "bamflow" or mr is None:
                    continue
                bm = medians[(chunk, variant_label(system, coll_order))]
                print(f"| {chunk} | {coll_order} | {mr['wall'] / bm['wall']:.2f} | {mr['cpu'] / bm['cpu']:.2f} |")
        print()
    # where bamflow's CPU goes
    job_rows = [r for r in runs if r["system"] == "bamflow" and r["job_cpu"]]
    if job_rows:
        print("bamflow per-job CPU seconds (median over repeats):")
        print()
        print("| chunk | collect order | " + " | ".join(_short(k) for k in job_rows[0]["job_cpu"]) + " |")
        print("|---:|---|" + "---:|" * len(job_rows[0]["job_cpu"]))
        for chunk in chunk_sizes:
            for system, coll_order in order:
                if system != "bamflow":
                    continue
                rs = [r for r in job_rows if r["chunk_size"] == chunk and r["order"] == coll_order]
                if not rs:
                    continue
                cells = [f"{statistics.median(r['job_cpu'][k] for r in rs):.2f}" for k in rs[0]["job_cpu"]]
                print(f"| {chunk} | {coll_order} | " + " | ".join(cells) + " |")
        print()

    for r in warmup_failures:
        print(f"FAIL in warm-up: chunk={r['chunk_size']} {r['label']}: {r['check']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": info, "args": vars(args), "runs": runs, "warmup_failures": warmup_failures},
                f,
                indent=1,
                default=repr,
            )


def _short(job_name: str) -> str:
    return job_name.split(".", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
