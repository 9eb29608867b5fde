"""Support for the UMI tests (tests/test_umi_*.py): small BAMs made with pysam
(single-end and paired-end, tags and read-name UMIs) and umi_tools, the
reference, run in a helper process that imports it once and forks a child
per command (a fresh umi_tools process costs ~1.5 CPU seconds of imports).

The data are made to reach every branch umi_tools' get_bundles has: PCR
duplicates with equal MAPQ (its random draws) and lower MAPQ, one-mismatch
UMI errors, UMIs with N, soft clips at both ends (short and > 4 bp:
``--spliced-is-unique``), spliced reads, two read lengths, gaps below and
above 1 kb between reads (its flush), three references, secondary
alignments carrying the gene on another reference, featureCounts-style
unassigned genes, reads without UMI, cell or gene, unmapped reads, NH tags
and cells that differ only after ``-``. Paired-end data add proper pairs
(TLEN), chimeric pairs, pairs with an unmapped mate and unpaired reads.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pysam
import pytest

REFS = [("chr1", 300_000), ("chr2", 200_000), ("chr3", 60_000)]
CELLS = ["AACCGGTTAACC-1", "ACGTACGTACGT-1", "TTGGCCAATTGG-1", "GATTACAGATTA-1", "GATTACAGATTA-2", "CCCCAAAAGGGG-1"]
GENES = [(f"ENSG{g:05d}", f"GENE{g}") for g in range(10)]


def _umi(rng: random.Random, length: int = 8) -> str:
    return "".join(rng.choice("ACGT") for _ in range(length))


def _mutate(umi: str, rng: random.Random, alphabet: str = "ACGT") -> str:
    i = rng.randrange(len(umi))
    return umi[:i] + rng.choice([b for b in alphabet if b != umi[i]]) + umi[i + 1 :]


def header(sort_order: str = "coordinate") -> pysam.AlignmentHeader:
    return pysam.AlignmentHeader.from_dict(
        {"HD": {"VN": "1.6", "SO": sort_order}, "SQ": [{"SN": n, "LN": ln} for n, ln in REFS]}
    )


class Maker:
    """Builds reads; ``reads`` in the end are sorted and written by :func:`write_bam`."""

    def __init__(self, seed: int, paired: bool) -> None:
        self.rng = random.Random(seed)
        self.paired = paired
        self.hdr = header()
        self.reads: list[pysam.AlignedSegment] = []
        self.serial = 0

    def record(self, name, tid, pos, reverse, cigar, tags, mapq=255, flag=0, length=50, mate=None, tlen=0):
        r = pysam.AlignedSegment(self.hdr)
        r.query_name = name
        r.query_sequence = "".join(self.rng.choice("ACGT") for _ in range(length))
        if tid < 0:
            r.flag = flag | 4
            r.reference_id, r.reference_start = -1, -1
        else:
            r.flag = flag | (16 if reverse else 0)
            r.reference_id, r.reference_start = tid, pos
            if not flag & 4:
                r.cigarstring = cigar
                r.mapping_quality = mapq
        if mate is not None:
            r.next_reference_id, r.next_reference_start = mate
            r.template_length = tlen
        r.set_tags(tags)
        self.reads.append(r)
        return r

    def name(self) -> str:
        self.serial += 1
        return f"q{self.serial}"

    def molecule(self, tid, start, reverse, cell, gene, umi, copies, length=50):
        """A molecule's PCR copies: the same 5' end (some soft-clipped, a few
        spliced), UMI errors, MAPQ ties and lower MAPQs."""
        rng = self.rng
        for _ in range(copies):
            u = _mutate(umi, rng) if rng.random() < 0.12 else umi
            if rng.random() < 0.03:
                u = _mutate(u, rng, "ACGTN")
            s, cigar = start, f"{length}M"
            x = rng.random()
            if x < 0.12:  # a 5' soft clip, same 5' end
                clip = rng.choice([2, 3, 7])
                if reverse:
                    cigar = f"{length - clip}M{clip}S"
                else:
                    s, cigar = start + clip, f"{clip}S{length - clip}M"
            elif x < 0.20:  # a 3' soft clip (> 4 bp counts as spliced)
                clip = rng.choice([3, 6])
                cigar = f"{clip}S{length - clip}M" if reverse else f"{length - clip}M{clip}S"
                if reverse:
                    s = start + clip
            elif x < 0.26:  # spliced
                a = rng.randrange(10, length - 10)
                cigar = f"{a}M{rng.choice([150, 800])}N{length - a}M"
                if reverse:
                    s = start - rng.choice([150, 800])
            mapq = rng.choice([255, 255, 255, 255, 3, 1])
            tags = [("UB", u), ("GX", gene[0]), ("GN", gene[1]), ("XS", "Assigned"), ("NH", rng.choice([1, 1, 1, 2]))]
            if cell is not None:
                tags.insert(0, ("CB", cell))
            if self.paired:
                self.pair(tid, max(0, s), reverse, cigar, tags, mapq, length)
            else:
                self.record(self.name(), tid, max(0, s), reverse, cigar, tags, mapq=mapq, length=length)

    def pair(self, tid, pos, reverse, cigar, tags, mapq, length):
        """A proper pair (mostly), or a chimeric one, one with an unmapped mate, or an unpaired read."""
        rng = self.rng
        name = self.name()
        x = rng.random()
        if x < 0.05:  # unpaired
            self.record(name, tid, pos, reverse, cigar, tags, mapq=mapq, length=length)
            return
        insert = rng.choice([200, 200, 250, 320])
        mate_tid, mate_pos = tid, (pos - insert + length if reverse else pos + insert - length)
        mate_pos = max(0, mate_pos)
        chimeric = x < 0.10
        unmapped_mate = 0.10 <= x < 0.15
        if chimeric:
            mate_tid, mate_pos = (tid + 1) % len(REFS), rng.randrange(1000, 50_000)
        tlen = 0 if chimeric else (insert if not reverse else -insert)
        flag1 = 0x1 | 0x40 | (0x20 if not reverse else 0) | (0x2 if not chimeric else 0)
        if unmapped_mate:
            self.record(name, tid, pos, reverse, cigar, tags, mapq=mapq, flag=0x1 | 0x40 | 0x8, length=length,
                        mate=(tid, pos), tlen=0)
            self.record(name, tid, pos, False, cigar, tags, flag=0x1 | 0x80 | 0x4 | (0x20 if reverse else 0),
                        length=length, mate=(tid, pos), tlen=0)
            return
        self.record(name, tid, pos, reverse, cigar, tags, mapq=mapq, flag=flag1, length=length,
                    mate=(mate_tid, mate_pos), tlen=tlen)
        flag2 = 0x1 | 0x80 | (0x20 if reverse else 0) | (0x2 if not chimeric else 0)
        self.record(name, mate_tid, mate_pos, not reverse, f"{length}M", tags, mapq=255, flag=flag2, length=length,
                    mate=(tid, pos), tlen=-tlen)


def make_reads(seed: int = 11, paired: bool = False, molecules: int = 260) -> tuple[pysam.AlignmentHeader, list]:
    m = Maker(seed, paired)
    rng = m.rng
    loci = [(tid, base) for tid, (_, ln) in enumerate(REFS) for base in range(2000, ln - 5000, 12_000)]
    for _ in range(molecules):
        tid, base = rng.choice(loci)
        gene = GENES[(tid * 7 + base // 12_000) % len(GENES)]
        start = base + rng.choice([0, rng.randrange(0, 900), rng.randrange(0, 4000)])
        cell = rng.choice(CELLS)
        length = 50 if rng.random() < 0.85 else 40
        umi = _umi(rng)
        m.molecule(tid, start, rng.random() < 0.5, cell, gene, umi, rng.choice([1, 1, 2, 3, 5, 8]), length)
        if rng.random() < 0.15:  # another molecule at the very same place (its UMI one mismatch away)
            m.molecule(tid, start, rng.random() < 0.5, cell, gene, _mutate(umi, rng), rng.choice([1, 2]), length)
    # a gene's secondary alignments on another reference (umi_tools: one bundle per reference)
    for k in range(6):
        cell, umi = rng.choice(CELLS), _umi(rng)
        for tid in (0, 2):
            tags = [("CB", cell), ("UB", umi), ("GX", GENES[0][0]), ("GN", GENES[0][1]), ("XS", "Assigned")]
            m.record(m.name(), tid, 40_000 + 100 * k, False, "50M", tags, mapq=3, flag=0 if tid == 0 else 256)
    # reads that cannot be used
    for _ in range(10):
        tid, base = rng.choice(loci)
        cell, umi, gene = rng.choice(CELLS), _umi(rng), rng.choice(GENES)
        m.record(m.name(), tid, base + 50, False, "50M", [("UB", umi), ("GX", gene[0])])  # no cell
        m.record(m.name(), tid, base + 60, True, "50M", [("CB", cell), ("GX", gene[0])])  # no UMI
        m.record(m.name(), tid, base + 70, False, "50M", [("CB", cell), ("UB", umi)])  # no gene
        m.record(m.name(), tid, base + 80, False, "50M", [("CB", cell), ("UB", umi), ("GX", "__no_feature"),
                                                            ("XS", "Unassigned_NoFeatures")])
        m.record(m.name(), tid, base + 90, True, "50M", [("CB", cell), ("UB", umi), ("GX", gene[0]),
                                                           ("XS", "Unassigned_Ambiguity")])
        m.record(m.name(), tid, base + 95, False, "50M", [("CB", cell), ("UB", umi), ("GX", gene[0])], mapq=0)
        m.record(m.name(), -1, -1, False, "", [("CB", cell), ("UB", umi)])  # unmapped
    m.reads.sort(key=lambda r: (r.reference_id if r.reference_id >= 0 else 1 << 30, r.reference_start))
    return m.hdr, m.reads


def write_bam(path, hdr, reads, rename=None, sort_order="coordinate", index=True) -> str:
    """Write ``reads`` (renamed by ``rename(read)`` if given) and index the file."""
    d = hdr.to_dict()
    d["HD"]["SO"] = sort_order
    h = pysam.AlignmentHeader.from_dict(d)
    with pysam.AlignmentFile(str(path), "wb", header=h) as f:
        for r in reads:
            if rename is not None:
                r = pysam.AlignedSegment.fromstring(r.to_string(), h)
                r.query_name = rename(r)
            f.write(r)
    if index and sort_order == "coordinate":
        pysam.index(str(path))
    return str(path)


def sam_lines(path) -> list[str]:
    """The records of a BAM as SAM lines (what 'equal line for line' compares)."""
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return [r.to_string() for r in f]


def header_without_bamflow(path) -> dict:
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        d = f.header.to_dict()
    d["PG"] = [pg for pg in d.get("PG", []) if pg.get("PN") != "bamflow"]
    return {k: v for k, v in d.items() if v}


# -- umi_tools, forked from one process that imported it ---------------------------------------

_SERVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    import umi_tools.count, umi_tools.count_tab, umi_tools.dedup, umi_tools.group  # noqa: F401
    for line in sys.stdin:
        argv, err = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
                module = sys.modules["umi_tools." + argv[0]]
                module.main(["umi_tools"] + argv)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\\n")
        sys.stdout.flush()
    """
)


class UmiTools:
    """Runs ``umi_tools COMMAND ARGS…`` in a child forked from a process that imported umi_tools."""

    def __init__(self, workdir) -> None:
        self.workdir = str(workdir)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no thread pools to fork over
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=self.workdir, env=env)
        self.n = 0

    def __call__(self, command: str, *args: str) -> None:
        self.n += 1
        err = os.path.join(self.workdir, f"umi_tools_{self.n}.err")
        log = os.path.join(self.workdir, f"umi_tools_{self.n}.log")
        argv = [command, *[str(a) for a in args]]
        if command != "count_tab" or "-L" not in argv:
            argv += ["-L", log]
        self.proc.stdin.write(json.dumps([argv, err]) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())
        if code != 0:
            with open(err) as f:
                raise AssertionError(f"umi_tools {' '.join(argv)} failed:\n{f.read()[-3000:]}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")  # (ended with its module: later tests check that no child process is left)
def umi_tools(tmp_path_factory):
    runner = UmiTools(tmp_path_factory.mktemp("umi_tools"))
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def single_end(tmp_path_factory):
    d = tmp_path_factory.mktemp("single_end")
    hdr, reads = make_reads(11, paired=False)
    return {"dir": d, "bam": write_bam(d / "se.bam", hdr, reads), "reads": reads, "hdr": hdr}


@pytest.fixture(scope="session")
def paired_end(tmp_path_factory):
    d = tmp_path_factory.mktemp("paired_end")
    hdr, reads = make_reads(12, paired=True, molecules=200)
    return {"dir": d, "bam": write_bam(d / "pe.bam", hdr, reads), "reads": reads, "hdr": hdr}


def test_the_data_reach_umi_tools_branches():
    """The generator makes what the comparisons rely on."""
    hdr, reads = make_reads(11)
    cigars = [r.cigarstring or "" for r in reads]
    assert any("N" in c for c in cigars) and any(c.endswith("S") for c in cigars) and any("S" in c[:3] for c in cigars)
    assert any(r.is_secondary for r in reads) and any(r.is_unmapped for r in reads)
    assert any("N" in r.get_tag("UB") for r in reads if r.has_tag("UB"))
    starts = sorted(r.reference_start for r in reads if r.reference_id == 0)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert max(gaps) > 1000 and min(gaps) < 1000
    _, pairs = make_reads(12, paired=True, molecules=200)
    flags = [r.flag for r in pairs]
    assert any(f & 0x80 for f in flags) and any(f & 0x8 and f & 0x40 for f in flags) and any(not f & 1 for f in flags)
    assert any(r.is_paired and r.reference_id != r.next_reference_id for r in pairs if not r.is_unmapped)
