"""What the live progress counters and display cost.

1. Kernel level: CPU time of distribute_bam on a raw BAM, with and without a
   progress slot (the counters are a few stores and one FIONREAD per buffer).
2. End to end: `bamflow shard` with `--progress none` and `--progress live`
   (the supervisor rendering the rich table twice a second), wall and CPU of
   the whole process tree.

    python benchmarks/bench_counters.py [--bam /tmp/sim2M.bam] [--repeats 7]

Runs are interleaved and medians reported; compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time


def kernel_cpu(raw: str, with_counters: bool, by: list[bytes] | None) -> float:
    from bamflow.bam.options import DistributeOptions
    from bamflow.engine.progress import JobCounters
    from bamflow.kernels.bam import distribute_bam

    fd = os.open(raw, os.O_RDONLY)
    outs = [os.open(os.devnull, os.O_WRONLY) for _ in range(4)]
    slot = JobCounters.detached().slot if with_counters else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    distribute_bam(fd, outs, DistributeOptions(by=by, missing="drop"), progress=slot)
    after = resource.getrusage(resource.RUSAGE_SELF)
    for x in [fd, *outs]:
        os.close(x)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def shard_run(bam: str, mode: str) -> tuple[float, float]:
    out = tempfile.mkdtemp(prefix="bench-counters-")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(
        ["bamflow", "shard", "--by", "CB", "-n", "8", "-o", out, bam, "--progress", mode],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bam", default="/tmp/sim2M.bam")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import isal.igzip

    raw = os.path.join(tempfile.mkdtemp(prefix="bench-counters-"), "raw.bam")
    with open(args.bam, "rb") as f, open(raw, "wb") as out:
        out.write(isal.igzip.decompress(f.read()))
    print("| measurement | without | with | cost |")
    print("| --- | ---: | ---: | ---: |")
    for label, by in (("distribute_bam round-robin, CPU s", None), ("distribute_bam by CB, CPU s", "CB")):
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for with_counters in (False, True):
                runs[with_counters].append(kernel_cpu(raw, with_counters, by))
        a, b = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"| {label} | {a:.3f} | {b:.3f} | {100 * (b - a) / a:+.1f}% |")
    os.unlink(raw)
    shard: dict[str, list[tuple[float, float]]] = {"none": [], "live": []}
    for _ in range(max(3, args.repeats // 2)):
        for mode in ("none", "live"):
            shard[mode].append(shard_run(args.bam, mode))
    for i, what in ((0, "wall s"), (1, "CPU s (process tree)")):
        a = statistics.median(x[i] for x in shard["none"])
        b = statistics.median(x[i] for x in shard["live"])
        print(f"| bamflow shard -n 8, {what}: --progress none vs live | {a:.2f} | {b:.2f} | {100 * (b - a) / a:+.1f}% |")


if __name__ == "__main__":
    main()
