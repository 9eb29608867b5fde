"""W1 and W2 of bench_bam.py for two builds of bamflow in one run, interleaved
(A B A B …): did a change make the pass-through pipeline or sharding slower?

    # the build before the change: export it and build its kernels in place
    git archive COMMIT bamflow setup.py pyproject.toml README.md cli | tar -x -C /tmp/before
    (cd /tmp/before && python setup.py build_ext --inplace && ln -s ../cli bamflow/cli)
    python benchmarks/bench_before_after.py --before /tmp/before --input /tmp/sim2M.bam --pairs 5

Each measured command is a fresh process with PYTHONPATH set to one build
(the other build is not importable from it); wall, tree CPU and peak memory
as bench_bam.py measures them. Prints a Markdown table of medians and
min–max, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_bam  # noqa: E402  (measure, W1's measured command)


def commands(build: str, label: str, inp: str, work: str) -> dict[str, tuple[list[str], str]]:
    """The measured commands of one build: W1 (the seed workflow, 2 workers,
    level 6) and W2 (bamflow shard --by CB -n 8)."""
    out_w1 = os.path.join(work, f"w1_{label}.bam")
    out_w2 = os.path.join(work, f"w2_{label}")
    env = ["env", f"PYTHONPATH={build}"]
    w1 = [*env, sys.executable, os.path.join(HERE, "bench_bam.py"), "--run-one", "w1.bamflow", "--input", inp,
          "--output", out_w1, "--stats", os.path.join(work, f"w1_{label}.json")]
    cli = "import sys; from bamflow.cli.main import main; sys.argv[0] = 'bamflow'; main()"
    w2 = [*env, sys.executable, "-c", cli, "shard", "--by", "CB", "-n", "8", "-o", out_w2, "--progress", "none", inp]
    return {"W1": (w1, out_w1), "W2": (w2, out_w2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier build (a folder with bamflow/ built in place)")
    p.add_argument("--after", default=os.path.dirname(HERE), help="the later build (default: this checkout)")
    p.add_argument("--input", default="/tmp/sim2M.bam")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--work", default=os.path.join(HERE, "out", "before_after"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    builds = {"before": args.before, "after": args.after}
    runs: dict[tuple[str, str], list[dict]] = {}
    load_before = os.getloadavg()
    for pair in range(args.pairs):
        for workload in ("W1", "W2"):
            for label, build in builds.items():
                cmd, out = commands(build, label, args.input, args.work)[workload]
                if os.path.isdir(out):
                    shutil.rmtree(out)
                m = bench_bam.measure(cmd, 900)
                if m["exit"] != 0:
                    print(f"{workload} {label} failed: {m.get('stderr', '')[-500:]}", file=sys.stderr)
                    return 1
                runs.setdefault((workload, label), []).append(m)
                print(f"pair {pair + 1} {workload} {label}: {m['wall']:.2f} s wall, {m['cpu']:.2f} s CPU", file=sys.stderr)
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    print("| workload | build | wall s median (min–max) | CPU s median | peak RSS MB (largest process) | after/before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload in ("W1", "W2"):
        before = statistics.median(m["wall"] for m in runs[(workload, "before")])
        for label in builds:
            ms = runs[(workload, label)]
            walls = [m["wall"] for m in ms]
            wall = statistics.median(walls)
            print(f"| {workload} | {label} | {wall:.2f} ({min(walls):.2f}–{max(walls):.2f}) | "
                  f"{statistics.median(m['cpu'] for m in ms):.2f} | "
                  f"{statistics.median(m['max_rss_kb'] for m in ms) / 1024:.0f} | "
                  f"{wall / before:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{w} {label}": ms for (w, label), ms in runs.items()}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
