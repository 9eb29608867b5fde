"""Throughput of bamflow.bam.bgzf (compress and decompress) beside samtools and zlib.

Generates a deterministic, coordinate-sorted, 10x-style SAM (90-bp reads drawn
from a random reference so overlapping reads share sequence, NovaSeq-binned
qualities, CB/UB/CR/UR tags), turns it into a BAM with samtools, and unpacks
that to the raw (uncompressed) BAM byte stream every codec is then timed on.
Prints a markdown table: MB/s are of uncompressed data; CPU s counts all
threads of this process (or of samtools' children for the samtools rows).

    python benchmarks/bench_bgzf.py --records 1200000 --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import isal.igzip

from bamflow.bam.bgzf import DEFAULT_LEVEL, FAST_LEVEL, BgzfReader, BgzfWriter

_QUALS = "F" * 40 + ":" * 5 + "," * 3 + "#" * 2  # NovaSeq's four binned values


def write_sam(path: str | os.PathLike[str], n_records: int, *, seed: int = 1, read_len: int = 90) -> None:
    """Write a deterministic coordinate-sorted 10x-style SAM of ``n_records`` reads."""
    rng = random.Random(seed)
    ref_len = max(10 * read_len, n_records * 4)  # depth ~read_len/4: overlapping reads share sequence
    ref = "".join(rng.choices("ACGT", k=ref_len + read_len))
    whitelist = ["".join(rng.choices("ACGT", k=16)) for _ in range(3000)]
    starts = sorted(rng.randrange(1, ref_len) for _ in range(n_records))
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(f"@HD\tVN:1.6\tSO:coordinate\n@SQ\tSN:chr1\tLN:{ref_len + read_len}\n")
        f.write("@RG\tID:s1\tSM:s1\tPL:ILLUMINA\n@PG\tID:bench\tPN:bench_bgzf\n")
        for i, pos in enumerate(starts):
            seq = list(ref[pos - 1 : pos - 1 + read_len])
            for _ in range(rng.randrange(3)):  # a few sequencing errors
                seq[rng.randrange(read_len)] = rng.choice("ACGT")
            qual = "".join(rng.choices(_QUALS, k=read_len))
            cb = rng.choice(whitelist)
            umi = "".join(rng.choices("ACGT", k=12))
            flag = rng.choice((0, 16))
            f.write(
                f"A00123:8:H7KJ3DSXY:1:{1101 + i % 500}:{rng.randrange(30000)}:{rng.randrange(30000)}\t"
                f"{flag}\tchr1\t{pos}\t255\t{read_len}M\t*\t0\t0\t{''.join(seq)}\t{qual}\t"
                f"NH:i:1\tHI:i:1\tAS:i:{read_len - 2}\tnM:i:0\tRE:A:E\tRG:Z:s1\t"
                f"CR:Z:{cb}\tCY:Z:{qual[:16]}\tCB:Z:{cb}-1\tUR:Z:{umi}\tUY:Z:{qual[16:28]}\tUB:Z:{umi}\n"
            )


def make_raw_bam(workdir: str, n_records: int) -> tuple[bytes, str]:
    """Return (raw uncompressed BAM bytes, path of samtools' default-level BAM) for the synthetic SAM."""
    sam = os.path.join(workdir, "bench.sam")
    bam = os.path.join(workdir, "bench.bam")
    write_sam(sam, n_records)
    # --no-PG: a @PG line would hold the temporary folder's random name.
    subprocess.run(["samtools", "view", "-b", "--no-PG", "-o", bam, sam], check=True)
    os.unlink(sam)
    return isal.igzip.decompress(Path(bam).read_bytes()), bam


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


REPEAT = 1  # set by --repeat


def timed(fn: Callable[[], int], *, children: bool = False, repeat: int | None = None) -> tuple[float, float, int]:
    """Run ``fn`` ``repeat`` times; return (wall s, CPU s, int result) of the fastest run.

    The fastest of a few runs is the one least disturbed by other processes.
    """
    clock = _children_cpu if children else _cpu
    runs = []
    for _ in range(REPEAT if repeat is None else repeat):
        c0, t0 = clock(), time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - t0, clock() - c0, result))
    return min(runs)


def bgzf_compress(raw: bytes, out: str, level: int | str, threads: int) -> int:
    """Compress ``raw`` into ``out``; return the file's size."""
    with BgzfWriter(out, level=level, threads=threads) as w:
        w.write(raw)
    return os.path.getsize(out)


def bgzf_decompress(path: str, threads: int) -> int:
    """Decompress ``path`` block by block; return the uncompressed size."""
    n = 0
    with BgzfReader(path, threads=threads) as r:
        while block := r.read_block():
            n += len(block)
    return n


def run_size(argv: list[str], out: str) -> int:
    """Run ``argv``; return the size of ``out``."""
    subprocess.run(argv, check=True)
    return os.path.getsize(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_200_000, help="SAM records to generate (~350 B of raw BAM each)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--levels", nargs="+", default=["fast", "1", str(DEFAULT_LEVEL), "9"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    args = ap.parse_args()
    global REPEAT
    REPEAT = args.repeat

    with tempfile.TemporaryDirectory(prefix="bench_bgzf_") as workdir:
        t0 = time.perf_counter()
        raw, samtools_bam = make_raw_bam(workdir, args.records)
        mb = len(raw) / 1e6
        print(
            f"# {args.records} records, raw BAM {len(raw):,} B, samtools default BAM "
            f"{os.path.getsize(samtools_bam):,} B (setup {time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
        print(
            f"machine: nproc={os.cpu_count()}, {platform.processor() or platform.machine()}, "
            f"python {platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"load average before {os.getloadavg()[0]:.2f}"
        )
        print(f"data: {args.records:,} records, {mb:.1f} MB raw BAM; fastest of {args.repeat} run(s) per row\n")
        print("| codec | level | threads | op | size (B) | ratio vs samtools | wall s | CPU s | MB/s |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|")
        ref_size = os.path.getsize(samtools_bam)

        def row(codec: str, level: str, threads: int | str, op: str, size: int | None, wall: float, cpu: float) -> None:
            size_s = f"{size:,}" if size is not None else ""
            ratio = f"{size / ref_size:.3f}" if size is not None else ""
            print(
                f"| {codec} | {level} | {threads} | {op} | {size_s} | {ratio} | {wall:.2f} | {cpu:.2f} | {mb / wall:.0f} |",
                flush=True,
            )

        out = os.path.join(workdir, "out.bam")
        for level_s in args.levels:
            level: int | str = int(level_s) if level_s.isdigit() else level_s
            for threads in args.threads:
                wall, cpu, size = timed(partial(bgzf_compress, raw, out, level, threads))
                row("bamflow.bam.bgzf", level_s, threads, "compress", size, wall, cpu)
        # Decompression of samtools' own output, so every reader gets the same input.
        for threads in args.threads:
            wall, cpu, n = timed(partial(bgzf_decompress, samtools_bam, threads))
            assert n == len(raw)
            row("bamflow.bam.bgzf", "", threads, "decompress", None, wall, cpu)
        # samtools has no raw-BAM input: these rows include its BAM decoding and encoding.
        for threads in args.threads:
            # -@ N: N compressing threads beside the main one, as BgzfWriter(threads=N) beside the caller's.
            extra = ["-@", str(threads)]
            view_b = ["samtools", "view", "-b", *extra, "-o", out, samtools_bam]
            wall, cpu, size = timed(partial(run_size, view_b, out), children=True)
            row("samtools view -b (decode+encode)", "default", threads, "compress", size, wall, cpu)
            view_u = ["samtools", "view", "-u", *extra, "-o", out, samtools_bam]
            wall, cpu, _ = timed(partial(run_size, view_u, out), children=True)
            row("samtools view -u (decode+encode)", "", threads, "decompress", None, wall, cpu)

        wall, cpu, size = timed(lambda: len(zlib.compress(raw, 6)), repeat=1)  # slow; a reference only
        row("zlib.compress (one stream)", "6", 1, "compress", size, wall, cpu)
        gz = gzip.compress(raw, 6)
        wall, cpu, _ = timed(lambda: len(gzip.decompress(gz)), repeat=1)
        row("gzip.decompress (one stream)", "", 1, "decompress", None, wall, cpu)
        print(f"\nDEFAULT_LEVEL={DEFAULT_LEVEL}, FAST_LEVEL={FAST_LEVEL!r}")


if __name__ == "__main__":
    main()
