"""Single-cell presets: bamflow dedup / count / tag / histogram against umi_tools and pysam.

Workloads (one input BAM, one run of this script, systems interleaved within
each repeat, medians):

* dedup      ``bamflow dedup --method directional IN -o OUT`` vs ``umi_tools dedup
             --extract-umi-method=tag --umi-tag=UB --cell-tag=CB --per-cell
             --method=directional``; kept reads counted with ``samtools view -c``.
* count      ``bamflow count --gene-tag GX IN -o DIR`` vs ``umi_tools count --per-gene
             --gene-tag=GX --per-cell --extract-umi-method=tag --umi-tag=UB
             --cell-tag=CB``, on the input and on ``samtools view -b -F 256`` of it
             (umi_tools bundles secondary alignments per reference); the tables
             are compared entry by entry (umi_tools cuts the barcode at ``-``).
* tag        FASTQ pair (10x v3: R1 28 bp, R2 90 bp, gzip; generated here,
             deterministic, cached in benchmarks/data/) → ``bamflow tag`` (default
             level and ``--level fast``) vs ``umi_tools extract`` (two FASTQ.gz
             outputs: a different output, the same barcode/UMI extraction).
* histogram  ``bamflow histogram --tag CB`` vs a minimal pysam loop counting CB of
             non-secondary, non-supplementary reads.
* umi        issue 10 (UMI kernels in C): interleaved pairs A B A B of ``bamflow
             count`` (2 workers) against ``samtools view -@2 -u IN -o /dev/null``,
             1 against 2 workers for count and dedup, ``bamflow dedup
             --random-seed 1`` (umi_tools' reads, one worker), and ``umi_tools
             count`` / ``umi_tools dedup --random-seed 1`` against bamflow; the load
             average before and after each group; agreement: umi_tools' dedup output
             and bamflow's record for record, the count tables entry by entry.
             ``--big`` adds bamflow's peak memory on a second (larger) BAM. Not in the
             default ``--workloads``: ``--workloads umi``.

Measuring is bench_bam.py's ``measure``: every command a fresh subprocess in its
own session, wall via ``time.monotonic``, CPU = user+sys of the process tree
(``os.wait4``), ``ru_maxrss`` (largest process) and the sampled peak of the
summed PSS of the session. After the timed runs, ``dedup`` and ``count`` run
once more through ``--run-one cli`` (the same CLI ``main`` in-process with
``Workflow.run`` wrapped) to record per-job CPU (``Workflow.job_stats``).

    python benchmarks/bench_presets.py --input /tmp/sim2M.bam --repeats 2 --slow-repeats 1
    python benchmarks/bench_presets.py --input /tmp/sim2M.bam --workloads umi --pairs-fast 5 --pairs-slow 2 \
        --big /tmp/sim8M.bam --samtools /usr/bin/samtools

Internal: ``--run-one SYSTEM`` runs one measured command.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_bam import CAPTURED, _capture_workflows, count_records, machine_info, measure, med  # noqa: E402

SAMTOOLS = shutil.which("samtools") or "samtools"


def _script(name: str) -> str:
    """This Python's own console script (not a version manager's shim, which costs ~0.2 s a start)."""
    own = os.path.join(sys.prefix, "bin", name)
    return own if os.path.exists(own) else (shutil.which(name) or name)


BAMFLOW = _script("bamflow")
UMI_TOOLS = _script("umi_tools")
DATA = os.path.join(HERE, "data")


# -- the measured in-process commands ---------------------------------------------------


def run_one(system: str, inp: str, out: str, stats_path: str | None, rest: list[str]) -> int:
    stats: dict = {}
    if system == "hist.pysam":
        import pysam

        counts: dict = {}
        n = 0
        with pysam.AlignmentFile(inp, "rb") as src:
            for read in src:
                n += 1
                if read.is_secondary or read.is_supplementary:
                    continue
                try:
                    cb = read.get_tag("CB")
                except KeyError:
                    continue
                counts[cb] = counts.get(cb, 0) + 1
        with open(out, "w") as f:
            for cb, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                f.write(f"{c}\t{cb}\n")
        stats = {"reads_in": n, "written": sum(counts.values()), "values": len(counts)}
    elif system == "cli":  # the bamflow CLI in this process, recording job_stats
        from bamflow.cli.main import main as cli_main

        _capture_workflows()
        code = 0
        sys.argv = ["bamflow", *rest]
        try:
            cli_main()
        except SystemExit as e:
            code = e.code or 0
        stats = {"exit": code, "job_stats": [w.job_stats for w in CAPTURED]}
    elif system == "make-fastq":  # in a child: the parent's peak RSS leaks into every child's ru_maxrss
        stats = {"fastq": make_fastq_pair(int(rest[0]))}
    elif system == "umi-agree":
        stats = umi_agreement(inp)
    elif system == "agree":
        with open(inp) as f:
            job = json.load(f)
        stats = agreement(job["workload"], job["prep"], job["work"])
    else:
        raise SystemExit(f"unknown system {system}")
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(stats, f, default=str)
    return 0


def self_cmd(system: str, inp: str, out: str, stats: str, rest: list[str] = ()) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--run-one", system, "--input", inp, "--output", out, "--stats", stats]
    return cmd + (["--", *rest] if rest else [])


# -- inputs -----------------------------------------------------------------------------------


def make_fastq_pair(pairs: int, seed: int = 7, cells: int = 2000) -> tuple[str, str]:
    """10x v3 pair: R1 = 16 bp CB (one of ``cells``) + 12 bp UMI, R2 = 90 bp; gzip level 1; cached."""
    import numpy as np

    os.makedirs(DATA, exist_ok=True)
    r1p = os.path.join(DATA, f"presets_{pairs}_s{seed}_R1.fq.gz")
    r2p = os.path.join(DATA, f"presets_{pairs}_s{seed}_R2.fq.gz")
    if os.path.exists(r1p) and os.path.exists(r2p):
        return r1p, r2p
    rng = np.random.default_rng(seed)
    acgt = np.frombuffer(b"ACGT", dtype=np.uint8)
    barcodes = acgt[rng.integers(0, 4, size=(cells, 16))]
    quals = np.frombuffer(b"FFFF:,", dtype=np.uint8)
    chunk = 100_000
    with gzip.open(r1p + ".tmp", "wb", compresslevel=1) as f1, gzip.open(r2p + ".tmp", "wb", compresslevel=1) as f2:
        for start in range(0, pairs, chunk):
            k = min(chunk, pairs - start)
            r1 = np.concatenate([barcodes[rng.integers(0, cells, size=k)], acgt[rng.integers(0, 4, size=(k, 12))]], axis=1)
            r2 = acgt[rng.integers(0, 4, size=(k, 90))]
            q1 = quals[rng.integers(0, len(quals), size=(k, 28))]
            q2 = quals[rng.integers(0, len(quals), size=(k, 90))]
            b1, b2 = [], []
            for i in range(k):
                name = f"@BENCH:1:FC:1:{start + i + 1}"
                b1.append(b"%s 1:N:0:0\n%s\n+\n%s\n" % (name.encode(), r1[i].tobytes(), q1[i].tobytes()))
                b2.append(b"%s 2:N:0:0\n%s\n+\n%s\n" % (name.encode(), r2[i].tobytes(), q2[i].tobytes()))
            f1.write(b"".join(b1))
            f2.write(b"".join(b2))
    os.replace(r1p + ".tmp", r1p)
    os.replace(r2p + ".tmp", r2p)
    return r1p, r2p


def primary_bam(inp: str, work: str) -> str:
    out = os.path.join(work, "primary_F256.bam")
    if not (os.path.exists(out) and os.path.getmtime(out) > os.path.getmtime(inp)):
        subprocess.run([SAMTOOLS, "view", "-@2", "-b", "-F", "256", "-o", out, inp], check=True)
        subprocess.run([SAMTOOLS, "index", out], check=True)
    return out


# -- systems ---------------------------------------------------------------------------------


def systems(workload: str, inp: str, work: str, prep: dict) -> list[tuple[str, bool, callable]]:
    """(label, slow, make() -> (cmd, output, stats_path, timeout)); slow ones run --slow-repeats times."""
    o = lambda name: os.path.join(work, name)  # noqa: E731
    if workload == "dedup":
        return [
            (
                "bamflow dedup",
                False,
                lambda: (
                    [
                        BAMFLOW,
                        "dedup",
                        "--method",
                        "directional",
                        inp,
                        "-o",
                        o("bf_dedup.bam"),
                        "--progress",
                        "none",
                        "--stats",
                        o("bf_dedup.json"),
                    ],
                    o("bf_dedup.bam"),
                    o("bf_dedup.json"),
                    900,
                ),
            ),
            (
                "umi_tools dedup",
                True,
                lambda: (
                    [
                        UMI_TOOLS,
                        "dedup",
                        "-I",
                        inp,
                        "-S",
                        o("ut_dedup.bam"),
                        "--extract-umi-method=tag",
                        "--umi-tag=UB",
                        "--cell-tag=CB",
                        "--per-cell",
                        "--method=directional",
                    ],
                    o("ut_dedup.bam"),
                    None,
                    1800,
                ),
            ),
        ]
    if workload == "count":
        out = []
        for tag, src, slow in (("", inp, False), (" (-F 256 input)", prep["primary"], True)):
            sfx = "_F256" if tag else ""
            out += [
                (
                    f"bamflow count{tag}",
                    slow,
                    lambda src=src, sfx=sfx: (
                        [
                            BAMFLOW,
                            "count",
                            "--gene-tag",
                            "GX",
                            src,
                            "-o",
                            o(f"bf_count{sfx}"),
                            "--force",
                            "--progress",
                            "none",
                            "--stats",
                            o(f"bf_count{sfx}.json"),
                        ],
                        o(f"bf_count{sfx}"),
                        o(f"bf_count{sfx}.json"),
                        900,
                    ),
                ),
                (
                    f"umi_tools count{tag}",
                    slow,
                    lambda src=src, sfx=sfx: (
                        [
                            UMI_TOOLS,
                            "count",
                            "--per-gene",
                            "--gene-tag=GX",
                            "--per-cell",
                            "--extract-umi-method=tag",
                            "--umi-tag=UB",
                            "--cell-tag=CB",
                            "-I",
                            src,
                            "-S",
                            o(f"ut_counts{sfx}.tsv.gz"),
                        ],
                        o(f"ut_counts{sfx}.tsv.gz"),
                        None,
                        1800,
                    ),
                ),
            ]
        return out
    if workload == "tag":
        r1, r2 = prep["fastq"]
        return [
            (
                "bamflow tag (level 6)",
                False,
                lambda: (
                    [
                        BAMFLOW,
                        "tag",
                        "--layout",
                        "10x-v3",
                        r1,
                        r2,
                        "-o",
                        o("bf_tag.bam"),
                        "--progress",
                        "none",
                        "--stats",
                        o("bf_tag.json"),
                    ],
                    o("bf_tag.bam"),
                    o("bf_tag.json"),
                    900,
                ),
            ),
            (
                "bamflow tag --level fast",
                False,
                lambda: (
                    [
                        BAMFLOW,
                        "tag",
                        "--layout",
                        "10x-v3",
                        r1,
                        r2,
                        "-o",
                        o("bf_tag_fast.bam"),
                        "--level",
                        "fast",
                        "--progress",
                        "none",
                        "--stats",
                        o("bf_tag_fast.json"),
                    ],
                    o("bf_tag_fast.bam"),
                    o("bf_tag_fast.json"),
                    900,
                ),
            ),
            (
                "umi_tools extract",
                True,
                lambda: (
                    [
                        UMI_TOOLS,
                        "extract",
                        "--bc-pattern=CCCCCCCCCCCCCCCCNNNNNNNNNNNN",
                        "-I",
                        r1,
                        "--read2-in",
                        r2,
                        "--read2-out",
                        o("ut_out2.fq.gz"),
                        "-S",
                        o("ut_out1.fq.gz"),
                    ],
                    o("ut_out2.fq.gz"),
                    None,
                    1800,
                ),
            ),
        ]
    if workload == "histogram":
        return [
            (
                "bamflow histogram --tag CB",
                False,
                lambda: (
                    [
                        BAMFLOW,
                        "histogram",
                        "--tag",
                        "CB",
                        inp,
                        "-o",
                        o("bf_hist.txt"),
                        "--progress",
                        "none",
                        "--stats",
                        o("bf_hist.json"),
                    ],
                    o("bf_hist.txt"),
                    o("bf_hist.json"),
                    900,
                ),
            ),
            (
                "pysam loop (CB, skip secondary/supplementary)",
                False,
                lambda: (
                    self_cmd("hist.pysam", inp, o("py_hist.txt"), o("py_hist.json")),
                    o("py_hist.txt"),
                    o("py_hist.json"),
                    900,
                ),
            ),
        ]
    raise ValueError(workload)


def run_workload(workload, inp, work, prep, repeats, slow_repeats, log) -> dict:
    results: dict[str, list[dict]] = {}
    for rep in range(max(repeats, slow_repeats)):
        for label, slow, make in systems(workload, inp, work, prep):
            if rep >= (slow_repeats if slow else repeats):
                continue
            cmd, out, stats_path, timeout = make()
            if stats_path and os.path.exists(stats_path):
                os.unlink(stats_path)
            m = measure(cmd, timeout)
            m["cmd"] = cmd
            m["output"] = out
            if m["exit"] == 0 and stats_path and os.path.exists(stats_path):
                with open(stats_path) as f:
                    m["stats"] = json.load(f)
            log(
                f"{workload} rep{rep} {label}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s rss {m['max_rss_kb'] // 1024} MB "
                f"pss {m['tree_pss_kb'] // 1024} MB exit {m['exit']}{' TIMEOUT' if m['timeout'] else ''}"
            )
            if m["exit"] != 0:
                log("  stderr: " + m["stderr"].strip()[-600:])
            results.setdefault(label, []).append(m)
    return results


# -- agreement -----------------------------------------------------------------------------------


def read_counts_table(path: str, strip_suffix: bool) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    table = {}
    with opener(path, "rt") as f:
        header = f.readline().split()
        assert header == ["gene", "cell", "count"], header
        for line in f:
            gene, cell, n = line.rstrip("\n").split("\t")
            if strip_suffix:
                cell = cell.split("-", 1)[0]  # umi_tools' --cell-tag-split
            table[(gene, cell)] = int(n)
    return table


def compare_counts(bf_dir: str, ut_path: str) -> dict:
    bf = read_counts_table(os.path.join(bf_dir, "counts.tsv"), True)
    ut = read_counts_table(ut_path, False)
    keys = set(bf) | set(ut)
    differ = [k for k in keys if bf.get(k, 0) != ut.get(k, 0)]
    genes = sorted({k[0] for k in differ})
    return {
        "bamflow_entries": len(bf),
        "umi_tools_entries": len(ut),
        "bamflow_molecules": sum(bf.values()),
        "umi_tools_molecules": sum(ut.values()),
        "entries_differing": len(differ),
        "genes_differing": len(genes),
        "only_bamflow": sum(1 for k in keys if k not in ut),
        "only_umi_tools": sum(1 for k in keys if k not in bf),
        "identical": not differ,
    }


def read_hist(path: str) -> dict:
    d = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            c, v = line.rstrip("\n").split("\t")
            d[v] = int(c)
    return d


def fastq_records(path: str) -> int:
    with gzip.open(path, "rb") as f:
        return sum(1 for _ in f) // 4


def agreement(workload: str, prep: dict, work: str) -> dict:
    o = lambda name: os.path.join(work, name)  # noqa: E731
    if workload == "dedup":
        return {"bamflow_kept": count_records(o("bf_dedup.bam")), "umi_tools_kept": count_records(o("ut_dedup.bam"))}
    if workload == "count":
        out = {"full": compare_counts(o("bf_count"), o("ut_counts.tsv.gz"))}
        if os.path.exists(o("ut_counts_F256.tsv.gz")):
            out["F256"] = compare_counts(o("bf_count_F256"), o("ut_counts_F256.tsv.gz"))
            bf_full = read_counts_table(o("bf_count/counts.tsv"), False)
            bf_prim = read_counts_table(o("bf_count_F256/counts.tsv"), False)
            out["bamflow_full_equals_F256"] = bf_full == bf_prim
        return out
    if workload == "tag":
        return {
            "pairs": prep["pairs"],
            "bamflow_records": count_records(o("bf_tag.bam")),
            "bamflow_fast_records": count_records(o("bf_tag_fast.bam")),
            "umi_tools_read2_records": fastq_records(o("ut_out2.fq.gz")) if os.path.exists(o("ut_out2.fq.gz")) else None,
            "sizes_MB": {
                name: round(os.path.getsize(o(name)) / 1e6, 1)
                for name in ("bf_tag.bam", "bf_tag_fast.bam", "ut_out1.fq.gz", "ut_out2.fq.gz")
                if os.path.exists(o(name))
            },
        }
    if workload == "histogram":
        bf, py = read_hist(o("bf_hist.txt")), read_hist(o("py_hist.txt"))
        return {
            "identical": bf == py,
            "values": len(bf),
            "reads_counted": sum(bf.values()),
            "pysam_reads_counted": sum(py.values()),
        }
    return {}


# -- issue 10: UMI kernels in C --------------------------------------------------------------------


def umi_commands(inp: str, work: str, samtools: str) -> dict[str, list[str]]:
    o = lambda name: os.path.join(work, name)  # noqa: E731
    bf = lambda *a: [BAMFLOW, *a, "--progress", "none"]  # noqa: E731
    tag = ["--extract-umi-method=tag", "--umi-tag=UB", "--cell-tag=CB", "--per-cell"]
    return {
        "samtools view -@2 -u": [samtools, "view", "-@2", "-u", inp, "-o", "/dev/null"],
        "bamflow count -w 2": bf("count", "--gene-tag", "GX", "--formats", "tsv", "-w", "2", inp, "-o", o("u_count2"), "--force",
                                 "--stats", o("u_count2.json")),
        "bamflow count -w 1": bf("count", "--gene-tag", "GX", "--formats", "tsv", "-w", "1", inp, "-o", o("u_count1"), "--force",
                                 "--stats", o("u_count1.json")),
        "bamflow count -w 2 (mtx,tsv,h5ad)": bf("count", "--gene-tag", "GX", "-w", "2", inp, "-o", o("u_count_all"), "--force",
                                                "--stats", o("u_count_all.json")),
        "umi_tools count": [UMI_TOOLS, "count", "--per-gene", "--gene-tag=GX", *tag, "-I", inp, "-S", o("u_ut_counts.tsv"),
                            "--random-seed=1", "-L", o("u_ut_count.log")],
        "bamflow dedup -w 2": bf("dedup", inp, "-o", o("u_dedup2.bam"), "-w", "2", "--stats", o("u_dedup2.json")),
        "bamflow dedup -w 1": bf("dedup", inp, "-o", o("u_dedup1.bam"), "-w", "1", "--stats", o("u_dedup1.json")),
        "bamflow dedup --random-seed 1": bf("dedup", inp, "-o", o("u_dedup_seed.bam"), "--random-seed", "1",
                                            "--cell-tag-split=-", "--stats", o("u_dedup_seed.json")),
        "umi_tools dedup": [UMI_TOOLS, "dedup", *tag, "--method=directional", "--random-seed=1", "-I", inp, "-S",
                            o("u_ut_dedup.bam"), "-L", o("u_ut_dedup.log")],
    }


UMI_GROUPS = (
    # (systems run in turn, A B A B …; slow: the --pairs-slow count of rounds)
    (("bamflow count -w 2", "samtools view -@2 -u"), False),
    (("bamflow count -w 1", "bamflow count -w 2"), False),
    (("bamflow dedup -w 1", "bamflow dedup -w 2", "bamflow dedup --random-seed 1"), False),
    (("bamflow count -w 2 (mtx,tsv,h5ad)", "bamflow count -w 2"), False),
    (("umi_tools count", "bamflow count -w 2"), True),
    (("umi_tools dedup", "bamflow dedup -w 2", "bamflow dedup --random-seed 1"), True),
)


def umi_agreement(work: str) -> dict:
    """umi_tools' dedup output against bamflow's (--random-seed 1), record for record, and the
    count tables entry by entry (bamflow keeps the whole barcode; umi_tools cuts it at '-')."""
    import pysam

    o = lambda name: os.path.join(work, name)  # noqa: E731
    out: dict = {}
    if os.path.exists(o("u_ut_dedup.bam")) and os.path.exists(o("u_dedup_seed.bam")):
        with pysam.AlignmentFile(o("u_ut_dedup.bam")) as a, pysam.AlignmentFile(o("u_dedup_seed.bam")) as b:
            n = differ = 0
            first = None
            for x, y in zip(a, b, strict=False):
                n += 1
                if x.to_string() != y.to_string():
                    differ += 1
                    first = first or n
            rest_a, rest_b = sum(1 for _ in a), sum(1 for _ in b)
        out["dedup_seed_records"] = n + rest_b
        out["dedup_seed_umi_tools_records"] = n + rest_a
        out["dedup_seed_records_differing"] = differ + rest_a + rest_b
        out["dedup_seed_first_difference"] = first
    if os.path.exists(o("u_ut_counts.tsv")):
        out["count"] = compare_counts(o("u_count2"), o("u_ut_counts.tsv"))
    for name in ("u_dedup1.bam", "u_dedup2.bam"):
        if os.path.exists(o(name)):
            out[name + "_records"] = count_records(o(name))
    return out


def run_umi_workload(args, work: str, log) -> tuple[dict, str]:
    cmds = umi_commands(args.input, work, args.samtools)
    report: dict = {"groups": []}
    md = ["#### issue 10: UMI presets (interleaved; medians)", ""]
    for names, slow in UMI_GROUPS:
        rounds = args.pairs_slow if slow else args.pairs_fast
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:
                m = measure(cmds[name], 3600)
                runs[name].append(m)
                log(f"umi {name}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s rss {m['max_rss_kb'] // 1024} MB "
                    f"pss {m['tree_pss_kb'] // 1024} MB exit {m['exit']} load {os.getloadavg()[0]:.2f}")
                if m["exit"] != 0:
                    log("  stderr: " + m["stderr"].strip()[-600:])
        load_after = os.getloadavg()
        report["groups"].append({"systems": names, "runs": runs, "load_before": load_before, "load_after": load_after})
        md.append(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min)")
        md.append("")
        md.append("| system | runs | wall s median (min–max) | CPU s median (min–max) | largest process RSS MB "
                  "| tree PSS peak MB |")
        md.append("|---|---|---|---|---|---|")
        for name, ms in runs.items():
            ok = [m for m in ms if m["exit"] == 0]
            if not ok:
                md.append(f"| {name} | 0/{len(ms)} | – | – | – | – |")
                continue
            walls, cpus = [m["wall"] for m in ok], [m["cpu"] for m in ok]
            md.append(f"| {name} | {len(ok)}/{len(ms)} | {med(walls):.2f} ({min(walls):.2f}–{max(walls):.2f}) "
                      f"| {med(cpus):.2f} ({min(cpus):.2f}–{max(cpus):.2f}) | {max(m['max_rss_kb'] for m in ok) / 1024:.0f} "
                      f"| {max(m['tree_pss_kb'] for m in ok) / 1024:.0f} |")
        md.append("")
    if args.big:
        o = lambda name: os.path.join(work, name)  # noqa: E731
        for name, cmd in (("count -w 2", [BAMFLOW, "count", "--gene-tag", "GX", "--formats", "tsv", "-w", "2", args.big,
                                          "-o", o("u_big_count"), "--force", "--progress", "none"]),
                          ("dedup -w 2", [BAMFLOW, "dedup", args.big, "-o", o("u_big_dedup.bam"), "-w", "2", "--progress",
                                          "none"])):
            m = measure(cmd, 3600)
            report.setdefault("big", {})[name] = m
            log(f"umi big {name}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s rss {m['max_rss_kb'] // 1024} MB "
                f"pss {m['tree_pss_kb'] // 1024} MB exit {m['exit']}")
            md.append(f"{os.path.basename(args.big)}: bamflow {name}: wall {m['wall']:.2f} s, CPU {m['cpu']:.2f} s, "
                      f"largest process {m['max_rss_kb'] / 1024:.0f} MB, tree PSS {m['tree_pss_kb'] / 1024:.0f} MB")
        md.append("")
    # in a child: reading two 760k-record BAMs with pysam would raise this process's peak RSS
    agree_json = os.path.join(work, "umi_agree.json")
    subprocess.run(self_cmd("umi-agree", work, "-", agree_json), check=True)
    with open(agree_json) as f:
        report["agreement"] = json.load(f)
    log(f"umi agreement: {report['agreement']}")
    md.append("agreement: `" + json.dumps(report["agreement"]) + "`\n")
    return report, "\n".join(md)


# -- reporting -------------------------------------------------------------------------------------


def table(title: str, res: dict, ref_label: str, reads: int | None) -> str:
    lines = [
        f"#### {title}",
        "",
        "| system | runs | wall s | CPU s | max process RSS MB | tree PSS peak MB | reads/s (wall) "
        "| speed-up (ref wall / wall) | CPU ratio (ref / this) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref = [m for m in res.get(ref_label, []) if m["exit"] == 0]
    ref_wall = med([m["wall"] for m in ref]) if ref else None
    ref_cpu = med([m["cpu"] for m in ref]) if ref else None
    for label, runs in res.items():
        ok = [m for m in runs if m["exit"] == 0]
        if not ok:
            lines.append(f"| {label} | 0/{len(runs)} (exit {runs[0]['exit']}) | – | – | – | – | – | – | – |")
            continue
        wall, cpu = med([m["wall"] for m in ok]), med([m["cpu"] for m in ok])
        rss = max(m["max_rss_kb"] for m in ok) / 1024
        pss = max(m["tree_pss_kb"] for m in ok) / 1024
        rps = f"{reads / wall:,.0f}" if reads else "–"
        sp = f"{ref_wall / wall:.2f}×" if ref_wall else "–"
        cr = f"{ref_cpu / cpu:.2f}×" if ref_cpu else "–"
        walls = ", ".join(f"{m['wall']:.2f}" for m in ok)
        lines.append(
            f"| {label} | {len(ok)}/{len(runs)} ({walls}) | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {pss:.0f} "
            f"| {rps} | {sp} | {cr} |"
        )
    return "\n".join(lines) + "\n"


def table_jobs(label: str, job_stats: list[dict]) -> str:
    lines = [f"{label}:", "", "| job | wall s | CPU s | max RSS MB |", "|---|---|---|---|"]
    for js in job_stats:
        for job, v in js.items():
            lines.append(f"| {job} | {v['wall_seconds']:.2f} | {v['cpu_seconds']:.2f} | {v['max_rss_kb'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="/tmp/sim2M.bam")
    p.add_argument("--workloads", default="dedup,count,tag,histogram")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--slow-repeats", type=int, default=1, help="umi_tools dedup/extract and the -F 256 count runs")
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--work", default=os.path.join(HERE, "out", "presets"))
    p.add_argument("--no-job-stats", action="store_true")
    p.add_argument("--pairs-fast", type=int, default=5, help="umi: rounds of the interleaved runs under 20 s")
    p.add_argument("--pairs-slow", type=int, default=2, help="umi: rounds with umi_tools")
    p.add_argument("--big", default=None, help="umi: a larger BAM for bamflow's peak memory")
    p.add_argument("--samtools", default=SAMTOOLS, help="umi: the samtools to compare with")
    p.add_argument("--run-one")
    p.add_argument("--output")
    p.add_argument("--stats")
    args = p.parse_args(argv)
    if args.run_one:
        return run_one(args.run_one, args.input, args.output, args.stats, rest)

    os.makedirs(args.work, exist_ok=True)
    logf = open(os.path.join(args.work, "bench_presets.log"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        logf.write(line + "\n")
        logf.flush()

    wl = args.workloads.split(",")
    report = {"machine": machine_info(), "input": args.input, "repeats": args.repeats, "slow_repeats": args.slow_repeats}
    log(f"machine: {report['machine']}")
    log(f"parent max RSS (floor of every child's ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    if not os.path.exists(args.input + ".bai"):
        subprocess.run([args.samtools, "index", args.input], check=True)
    prep: dict = {"reads_in": count_records(args.input), "pairs": args.pairs}
    if "count" in wl:
        prep["primary"] = primary_bam(args.input, args.work)
        prep["primary_reads"] = count_records(prep["primary"])
    if "tag" in wl:
        t0 = time.monotonic()
        fq_json = os.path.join(args.work, "fastq.json")
        subprocess.run(self_cmd("make-fastq", "-", "-", fq_json, [str(args.pairs)]), check=True)
        with open(fq_json) as f:
            prep["fastq"] = json.load(f)["fastq"]
        log(f"fastq pair {prep['fastq']} ready in {time.monotonic() - t0:.1f}s")
    report["prep"] = prep
    log(f"prep: {prep}")
    refs = {
        "dedup": "umi_tools dedup",
        "count": "umi_tools count",
        "tag": "umi_tools extract",
        "histogram": "pysam loop (CB, skip secondary/supplementary)",
    }
    md = []
    if "umi" in wl:
        report["umi"], text = run_umi_workload(args, args.work, log)
        md.append(text)
        print(text, flush=True)
    for w in ("dedup", "count", "tag", "histogram"):
        if w not in wl:
            continue
        res = run_workload(w, args.input, args.work, prep, args.repeats, args.slow_repeats, log)
        # in a child process: the tables are large, and Linux carries the parent's peak RSS
        # (hiwater_rss of the forked/vforked image) into each later child's ru_maxrss
        job_json, agree_json = os.path.join(args.work, "agree_in.json"), os.path.join(args.work, "agree_out.json")
        with open(job_json, "w") as f:
            json.dump({"workload": w, "prep": prep, "work": args.work}, f)
        subprocess.run(self_cmd("agree", job_json, "-", agree_json), check=True)
        with open(agree_json) as f:
            agree = json.load(f)
        log(f"{w} agreement: {agree}")
        report[w] = {"results": res, "agreement": agree}
        reads = args.pairs if w == "tag" else prep["reads_in"]
        md.append(
            table(f"{w} ({f'{args.pairs} FASTQ pairs' if w == 'tag' else os.path.basename(args.input)})", res, refs[w], reads)
        )
        md.append("agreement: `" + json.dumps(agree) + "`\n")
        print("\n".join(md[-2:]), flush=True)
    if not args.no_job_stats:
        o = lambda name: os.path.join(args.work, name)  # noqa: E731
        jobs = {}
        for w, cli in (
            ("dedup", ["dedup", "--method", "directional", args.input, "-o", o("js_dedup.bam"), "--progress", "none"]),
            ("count", ["count", "--gene-tag", "GX", args.input, "-o", o("js_count"), "--force", "--progress", "none"]),
        ):
            if w not in wl:
                continue
            m = measure(self_cmd("cli", args.input, "-", o(f"js_{w}.json"), cli), 900)
            with open(o(f"js_{w}.json")) as f:
                st = json.load(f)
            jobs[w] = {"wall": m["wall"], "cpu": m["cpu"], "job_stats": st["job_stats"]}
            log(f"job_stats {w}: wall {m['wall']:.2f}s cpu {m['cpu']:.2f}s")
            md.append(
                f"bamflow {w} per job (one run, wall {m['wall']:.2f} s, tree CPU {m['cpu']:.2f} s)\n\n"
                + table_jobs(f"bamflow {' '.join(cli[:1])}", st["job_stats"])
            )
            print(md[-1], flush=True)
        report["job_stats"] = jobs
    report["machine_end"] = {
        "parent_max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    log(f"end: {report['machine_end']}")
    with open(os.path.join(args.work, "bench_presets.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.work, "bench_presets.md"), "w") as f:
        f.write("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
