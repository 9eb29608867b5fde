"""Deterministic simulator of 10x Genomics-style aligned single-cell BAMs.

Used for benchmarks (millions of reads) and tests (thousands). The output
looks like a Cell Ranger ``possorted_genome_bam.bam``: GRCh38-like
references, one read group, a ``cellranger`` @PG, raw/corrected cell
barcodes (CR/CB) and UMIs (UR/UB), gene tags (GX/GN) and PCR duplicates.
Same arguments and seed give a byte-identical file. See ``docs/simulate.md``.

    python -m bamflow.simulate OUT.bam --reads 2000000 --seed 1 --sort coordinate
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from bisect import bisect
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from operator import itemgetter

import pysam

__all__ = ["REFERENCES", "SimulationSummary", "simulate_bam", "main"]

#: GRCh38 primary chromosomes (name, length).
REFERENCES: tuple[tuple[str, int], ...] = (
    ("chr1", 248956422), ("chr2", 242193529), ("chr3", 198295559), ("chr4", 190214555),
    ("chr5", 181538259), ("chr6", 170805979), ("chr7", 159345973), ("chr8", 145138636),
    ("chr9", 138394717), ("chr10", 133797422), ("chr11", 135086622), ("chr12", 133275309),
    ("chr13", 114364328), ("chr14", 107043718), ("chr15", 101991189), ("chr16", 90338345),
    ("chr17", 83257441), ("chr18", 80373285), ("chr19", 58617616), ("chr20", 64444167),
    ("chr21", 46709983), ("chr22", 50818468), ("chrX", 156040895), ("chrY", 57227415),
    ("chrM", 16569),
)

_MITO_GENES = ("MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
               "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB")
_NAMED_GENES = ("MALAT1", "ACTB", "GAPDH", "B2M", "TMSB4X", "EEF1A1", "FTL", "FTH1", "RPL13",
                "RPS27", "TPT1", "MT2A", "LYZ", "CD74", "HLA-DRA", "S100A9", "NEAT1", "CD3E",
                "MS4A1", "NKG7")
_SORTS = ("coordinate", "unsorted", "CB")
_FORMATS = ("bam", "ubam", "sam")
_POOL = 1 << 20  # length of the random base / quality pools reads are sliced from


@dataclass(frozen=True)
class SimulationSummary:
    """What was written; every count is of BAM records (secondaries included)."""

    path: str
    seed: int
    sort: str
    format: str
    n_records: int
    n_primary: int
    n_secondary: int
    n_molecules: int
    n_duplicates: int  # primary reads that are not the first read of their molecule
    n_no_cb: int
    n_no_ub: int
    n_no_gene: int
    n_umi_error: int  # UB present and UR != UB (one substitution)
    n_cb_corrected: int  # CB present and CR != CB without "-1"
    n_spliced: int
    n_soft_clipped: int
    n_with_tx: int
    n_barcodes: int  # distinct CB values
    n_cells: int  # barcodes with >= min_cell_reads records
    min_cell_reads: int
    max_reads_per_barcode: int
    n_genes_seen: int
    seconds: float
    file_size: int | None

    @property
    def frac_no_cb(self) -> float:
        return self.n_no_cb / self.n_records

    @property
    def frac_no_ub(self) -> float:
        return self.n_no_ub / self.n_records

    @property
    def frac_no_gene(self) -> float:
        return self.n_no_gene / self.n_records

    @property
    def frac_umi_error(self) -> float:
        return self.n_umi_error / self.n_records

    @property
    def frac_secondary(self) -> float:
        return self.n_secondary / self.n_records

    @property
    def frac_duplicates(self) -> float:
        return self.n_duplicates / self.n_primary

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("frac_no_cb", "frac_no_ub", "frac_no_gene", "frac_umi_error", "frac_secondary", "frac_duplicates"):
            d[name] = round(getattr(self, name), 5)
        return d


def _kmer_table(k: int) -> list[str]:
    return ["".join(p) for p in itertools.product("ACGT", repeat=k)]


def _mutate(rng: random.Random, seq: str, alphabet: str = "ACGT") -> str:
    """``seq`` with one position replaced by a different letter of ``alphabet``."""
    i = rng.randrange(len(seq))
    new = rng.choice([b for b in alphabet if b != seq[i]])
    return seq[:i] + new + seq[i + 1:]


def _read_name(rid: int) -> str:
    """A unique Illumina-looking read name for read number ``rid``."""
    lane = rid % 4 + 1
    rid //= 4
    tile = 1101 + rid % 64
    rid //= 64
    return f"SIM00123:7:HSIMBCXX7:{lane}:{tile}:{1000 + rid % 30000}:{1000 + rid // 30000}"


def simulate_bam(
    path: str,
    *,
    n_reads: int = 2_000_000,
    n_barcodes: int = 20_000,
    n_cells: int = 4_400,
    seed: int = 1,
    sort: str = "coordinate",
    level: int | None = None,
    read_length: int = 90,
    n_genes: int = 3_000,
    format: str | None = None,
    frac_no_cb: float = 0.08,
    frac_no_ub: float = 0.02,
    frac_no_gene: float = 0.25,
    frac_umi_error: float = 0.03,
    frac_cb_corrected: float = 0.02,
    frac_secondary: float = 0.02,
    frac_spliced: float = 0.10,
    frac_soft_clipped: float = 0.05,
    frac_tx: float = 0.5,
    mean_reads_per_molecule: float = 2.5,
    min_cell_reads: int = 100,
    ambient_reads: tuple[int, int] = (1, 20),
    cell_sigma: float = 1.0,
    gene_sigma: float = 1.8,
    mark_duplicates: bool = False,
    sample: str = "sample1",
) -> SimulationSummary:
    """Write a simulated Cell Ranger-like aligned BAM to ``path`` and describe it.

    ``n_reads`` is the exact number of records written (secondary alignments
    included). Barcodes: the first ``n_cells`` of ``n_barcodes`` are cells with
    ``min_cell_reads`` records plus a lognormal(0, ``cell_sigma``) share of the
    rest; the others are ambient with ``ambient_reads`` (inclusive range)
    records each; ``frac_no_cb`` of the records have a CR but no CB. The
    ``frac_*`` arguments are probabilities, so the realised fractions (see the
    returned summary) are close to, not exactly, the requested ones.

    ``sort``: "coordinate" (by reference and position), "CB" (by CB, then
    coordinate; reads without CB last) or "unsorted" (shuffled records).
    ``format``: "bam", "ubam" (uncompressed BAM) or "sam"; default from the
    suffix of ``path`` (".sam" → SAM, else BAM). ``level``: BGZF level 0-9.
    """
    t0 = time.perf_counter()
    if sort not in _SORTS:
        raise ValueError(f"sort must be one of {_SORTS}, not {sort!r}")
    if format is None:
        format = "sam" if str(path).endswith(".sam") else "bam"
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, not {format!r}")
    if level is not None and not (0 <= level <= 9 and format == "bam"):
        raise ValueError("level must be 0-9 and needs format 'bam'")
    if not 0 < n_cells <= n_barcodes:
        raise ValueError("need 0 < n_cells <= n_barcodes")
    if read_length < 40:
        raise ValueError("read_length must be >= 40")
    lo_amb, hi_amb = ambient_reads
    if not 1 <= lo_amb <= hi_amb < min_cell_reads:
        raise ValueError("ambient_reads must be a range within 1 .. min_cell_reads-1")
    for name, value in (("frac_no_cb", frac_no_cb), ("frac_no_gene", frac_no_gene), ("frac_secondary", frac_secondary),
                        ("frac_cb_corrected", frac_cb_corrected), ("frac_spliced", frac_spliced),
                        ("frac_soft_clipped", frac_soft_clipped), ("frac_tx", frac_tx)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1)")
    if not (0 <= frac_no_ub and 0 <= frac_umi_error and frac_no_ub + frac_umi_error < 1):
        raise ValueError("frac_no_ub + frac_umi_error must be in [0, 1)")
    if frac_spliced + frac_soft_clipped >= 1:
        raise ValueError("frac_spliced + frac_soft_clipped must be < 1")
    if mean_reads_per_molecule < 1:
        raise ValueError("mean_reads_per_molecule must be >= 1")

    rng = random.Random(seed)
    L = read_length
    ref_names = [n for n, _ in REFERENCES]
    ref_lens = [ln for _, ln in REFERENCES]
    mito_tid = ref_names.index("chrM")
    ref_cum = list(itertools.accumulate(ref_lens))

    def random_locus(span: int) -> tuple[int, int]:
        tid = bisect(ref_cum, rng.random() * ref_cum[-1])
        return tid, rng.randrange(ref_lens[tid] - span)

    # ---- header (Cell Ranger-like) ----
    rg_id = f"{sample}:0:1:HSIMBCXX7:1"
    cl = (f"cellranger count --id={sample} --transcriptome=refdata-gex-GRCh38-2020-A "
          f"--fastqs=fastqs --sample={sample} --create-bam=true")
    header = pysam.AlignmentHeader.from_dict({
        "HD": {"VN": "1.6", "SO": "coordinate" if sort == "coordinate" else "unsorted"},
        "SQ": [{"SN": n, "LN": ln} for n, ln in REFERENCES],
        "RG": [{"ID": rg_id, "SM": sample, "LB": "0.1", "PU": "1", "PL": "ILLUMINA"}],
        "PG": [{"ID": "cellranger", "PN": "cellranger", "VN": "7.1.0", "CL": cl}],
        "CO": ["10x_bam_to_fastq:R1(CR:CY,UR:UY)", "10x_bam_to_fastq:R2(SEQ:QUAL)",
               f"bamflow.simulate seed={seed} n_reads={n_reads} n_barcodes={n_barcodes} n_cells={n_cells} sort={sort}"],
    })

    # ---- genes: position, strand, expression weight ----
    gene_rows = []  # (tid, start, length, strand, id, name, transcripts)
    used_ids: set[int] = set()
    n_mito = min(len(_MITO_GENES), n_genes)
    for g in range(n_genes):
        while True:
            num = rng.randrange(100_000, 300_000)
            if num not in used_ids:
                used_ids.add(num)
                break
        if g < n_mito:
            tid, length = mito_tid, rng.randint(300, 1500)
            start = rng.randrange(ref_lens[mito_tid] - length)
            name = _MITO_GENES[g]
        else:
            tid = bisect(ref_cum[:mito_tid], rng.random() * ref_cum[mito_tid - 1])
            length = rng.randint(2_000, 60_000)
            start = rng.randrange(ref_lens[tid] - length - 10_000)
            k = g - n_mito
            name = _NAMED_GENES[k] if k < len(_NAMED_GENES) else f"SIMG{k:05d}"
        txs = tuple(f"ENST{num * 10 + t:011d}" for t in range(rng.randint(1, 3)))
        gene_rows.append((tid, start, length, "-" if rng.random() < 0.5 else "+", f"ENSG{num:011d}", name, txs))
    gene_w = [rng.lognormvariate(0.0, gene_sigma) * (4.0 if g < n_mito else 1.0) for g in range(n_genes)]
    gene_cum = list(itertools.accumulate(gene_w))
    gene_total = gene_cum[-1]

    # ---- barcodes and their record budgets ----
    kmer8 = _kmer_table(8)
    kmer6 = _kmer_table(6)
    seen: set[str] = set()
    barcodes: list[str] = []
    while len(barcodes) < n_barcodes:
        x = rng.getrandbits(32)
        bc = kmer8[x >> 16] + kmer8[x & 0xFFFF]
        if bc not in seen:
            seen.add(bc)
            barcodes.append(bc)
    n_no_cb_target = round(frac_no_cb * n_reads)
    ambient = [rng.randint(lo_amb, hi_amb) for _ in range(n_barcodes - n_cells)]
    rest = n_reads - n_no_cb_target - sum(ambient) - min_cell_reads * n_cells
    if rest < 0:
        raise ValueError(
            f"n_reads={n_reads} is too small for {n_cells} cells of >= {min_cell_reads} reads, "
            f"{n_barcodes - n_cells} ambient barcodes and {frac_no_cb:.0%} reads without CB; "
            "lower n_barcodes / n_cells or raise n_reads")
    w = [rng.lognormvariate(0.0, cell_sigma) for _ in range(n_cells)]
    wsum = sum(w)
    shares = [rest * x / wsum for x in w]
    cells = [min_cell_reads + int(s) for s in shares]
    left = rest - sum(cells) + min_cell_reads * n_cells
    for i in sorted(range(n_cells), key=lambda i: int(shares[i]) - shares[i])[:left]:  # largest remainders
        cells[i] += 1
    budgets = cells + ambient
    cb_rank = {bc: r for r, bc in enumerate(sorted(barcodes))}
    # reads without CB come in small groups sharing one uncorrectable raw barcode
    groups: list[tuple[int, str, int]] = [(i, barcodes[i], budgets[i]) for i in range(n_barcodes)]
    left = n_no_cb_target
    while left > 0:
        k = min(left, rng.randint(1, 5))
        left -= k
        while True:
            x = rng.getrandbits(32)
            raw = kmer8[x >> 16] + kmer8[x & 0xFFFF]
            if raw not in seen:
                break
        if rng.random() < 0.2:
            raw = _mutate(rng, raw, "ACGTN")
        groups.append((-1, raw, k))

    # ---- pools that sequences and qualities are sliced from ----
    base_pool = "".join(rng.choices("ACGT", k=_POOL + L))
    qual_pool = "".join(rng.choices("F:,#", weights=(85, 8, 5, 2), k=_POOL + L))
    bc_qual = [qual_pool[o:o + 16] for o in range(0, 64 * 97, 97)]
    umi_qual = [qual_pool[o:o + 12] for o in range(0, 64 * 89, 89)]

    p_geom = 1.0 / mean_reads_per_molecule  # extra reads per molecule ~ Geometric, mean m - 1
    log_q = math.log(1.0 - p_geom) if p_geom < 1.0 else None
    p_sec = frac_secondary / (1.0 - frac_secondary)  # per primary, so ~frac_secondary of all records
    p_splice_end = frac_spliced
    p_clip_end = frac_spliced + frac_soft_clipped
    p_umi_err_end = frac_no_ub + frac_umi_error
    qualities = [qual_pool[o:o + L] for o in range(0, 4096 * 251, 251)]

    entries: list[tuple[int, int, int, list[str]]] = []  # (tid, pos, cb_rank, lines)
    rid = 0
    n_mol = n_dup = n_sec = n_no_cb = n_no_ub = n_no_gene = n_umi_err = n_cb_corr = 0
    n_spliced = n_clipped = n_tx = 0
    per_cb = [0] * n_barcodes
    genes_seen: set[int] = set()
    rnd = rng.random

    for bidx, bc, budget in groups:
        has_cb = bidx >= 0
        rank = cb_rank[bc] if has_cb else n_barcodes
        cb_tag = f"\tCB:Z:{bc}-1" if has_cb else ""
        rem = budget
        while rem > 0:
            size = 1 if log_q is None else 1 + int(math.log(1.0 - rnd()) / log_q)
            if size > rem:
                size = rem
            rem -= size
            n_mol += 1
            x = rng.getrandbits(24)
            umi = kmer6[x >> 12] + kmer6[x & 0xFFF]
            # shape of the alignment
            u = rnd()
            if u < p_splice_end:
                a = rng.randint(10, L - 10)
                gap = rng.randint(100, 5_000)
                cigar, span, kind = f"{a}M{gap}N{L - a}M", L + gap, 1
            elif u < p_clip_end:
                c = rng.randint(1, 30)
                cigar = f"{c}S{L - c}M" if rnd() < 0.5 else f"{L - c}M{c}S"
                span, kind = L - c, 2
            else:
                cigar, span, kind = f"{L}M", L, 0
            if rnd() < frac_no_gene:
                gidx = -1
                tid, pos = random_locus(span)
                if tid == mito_tid and kind == 1:  # no introns in chrM
                    tid, pos = 0, pos
                strand = 16 if rnd() < 0.5 else 0
                gene_tags = ""
                re_ = "I" if rnd() < 0.6 else "N"
                tx_tags = ""
            else:
                gidx = bisect(gene_cum, rnd() * gene_total)
                if gidx >= n_genes:
                    gidx = n_genes - 1
                gtid, gstart, glen, gstrand, gid, gname, txs = gene_rows[gidx]
                if gtid == mito_tid and kind == 1:
                    cigar, span, kind = f"{L}M", L, 0
                tid = gtid
                pos = gstart + int(rnd() * glen)
                if pos > ref_lens[tid] - span:
                    pos = ref_lens[tid] - span
                strand = 16 if gstrand == "-" else 0
                gene_tags = f"\tGX:Z:{gid}\tGN:Z:{gname}"
                re_ = "E"
                tx_tags = (f"\tTX:Z:{txs[int(rnd() * len(txs))]},{'-' if strand else '+'}{int(rnd() * 3000) + 1},{cigar}"
                           if kind != 1 and rnd() < frac_tx else "")
                genes_seen.add(gidx)
            off = int(rnd() * _POOL)
            seq = base_pool[off:off + L]
            aligned = L if kind != 2 else span
            lines: list[str] = []
            for j in range(size):
                # per read: barcode/UMI tags
                if has_cb:
                    if rnd() < frac_cb_corrected:
                        cr = _mutate(rng, bc)
                        n_cb_corr += 1
                    else:
                        cr = bc
                else:
                    cr = bc
                u = rnd()
                if u < frac_no_ub:
                    ur = _mutate(rng, umi, "N")
                    ub_tag = ""
                elif u < p_umi_err_end:
                    ur = _mutate(rng, umi)
                    ub_tag = f"\tUB:Z:{umi}"
                else:
                    ur = umi
                    ub_tag = f"\tUB:Z:{umi}"
                nm = 0 if (u := rnd()) < 0.75 else (1 if u < 0.93 else 2)
                as_ = aligned - 2 - 2 * nm - (1 if kind == 1 else 0)
                xf = (25 if j == 0 else 17) if (gidx >= 0 and has_cb and ub_tag) else 0
                secondary = rem > 0 and rnd() < p_sec
                nh_hi = "NH:i:2\tHI:i:1" if secondary else "NH:i:1\tHI:i:1"
                mapq = 3 if secondary else 255
                flag = strand | (1024 if (mark_duplicates and j > 0) else 0)
                name = _read_name(rid)
                rid += 1
                qual = qualities[int(rnd() * 4096)]
                tags = (f"\tAS:i:{as_}\tnM:i:{nm}{tx_tags}{gene_tags}\tRE:A:{re_}\txf:i:{xf}"
                        f"\tCR:Z:{cr}\tCY:Z:{bc_qual[int(rnd() * 64)]}{cb_tag}\tUR:Z:{ur}\tUY:Z:{umi_qual[int(rnd() * 64)]}"
                        f"{ub_tag}\tRG:Z:{rg_id}")
                lines.append(
                    f"{name}\t{flag}\t{ref_names[tid]}\t{pos + 1}\t{mapq}\t{cigar}\t*\t0\t0\t{seq}\t{qual}\t{nh_hi}{tags}")
                n_records_mol = 2 if secondary else 1
                if j > 0:
                    n_dup += 1
                n_spliced += n_records_mol if kind == 1 else 0
                n_clipped += n_records_mol if kind == 2 else 0
                n_tx += 1 if tx_tags else 0
                n_no_gene += n_records_mol if gidx < 0 else 0
                n_no_ub += n_records_mol if not ub_tag else 0
                n_umi_err += n_records_mol if (ub_tag and ur != umi) else 0
                if has_cb:
                    per_cb[bidx] += n_records_mol
                else:
                    n_no_cb += n_records_mol
                if secondary:
                    rem -= 1
                    n_sec += 1
                    stid, spos = random_locus(L)
                    if stid == mito_tid:
                        stid = 0
                    sflag = 256 | (16 if rnd() < 0.5 else 0)
                    sline = (f"{name}\t{sflag}\t{ref_names[stid]}\t{spos + 1}\t3\t{L}M\t*\t0\t0\t{seq}\t{qual}"
                             f"\tNH:i:2\tHI:i:2{tags}").replace(f"\txf:i:{xf}\t", "\txf:i:0\t", 1)
                    if tx_tags:  # the TX alignment belongs to the primary
                        sline = sline.replace(tx_tags, "", 1)
                    entries.append((stid, spos, rank, [sline]))
            entries.append((tid, pos, rank, lines))

    # ---- order and write ----
    ordered: Iterator[str]
    if sort == "coordinate":
        entries.sort(key=itemgetter(0, 1))
        ordered = (line for e in entries for line in e[3])
    elif sort == "CB":
        entries.sort(key=itemgetter(2, 0, 1))
        ordered = (line for e in entries for line in e[3])
    else:
        flat = [line for e in entries for line in e[3]]
        del entries
        rng.shuffle(flat)
        ordered = iter(flat)
    opts = None
    if format == "sam":
        mode = "w"
    elif format == "ubam":
        mode = "wbu"
    else:
        mode = "wb0" if level == 0 else "wb"
    # pysam accepts only "wb"/"wb0"/"wbu" as modes; other levels go through htslib's "level" option
    opts = [f"level={level}".encode()] if level not in (None, 0) else None
    n_written = 0
    fromstring = pysam.AlignedSegment.fromstring
    with pysam.AlignmentFile(path, mode, header=header, format_options=opts) as out:  # type: ignore[arg-type]
        write = out.write
        for line in ordered:
            write(fromstring(line, header))
            n_written += 1
    assert n_written == n_reads == rid + n_sec, (n_written, n_reads, rid, n_sec)

    file_size = os.path.getsize(path) if path != "-" and os.path.isfile(path) else None
    return SimulationSummary(
        path=str(path), seed=seed, sort=sort, format=format,
        n_records=n_written, n_primary=rid, n_secondary=n_sec, n_molecules=n_mol, n_duplicates=n_dup,
        n_no_cb=n_no_cb, n_no_ub=n_no_ub, n_no_gene=n_no_gene, n_umi_error=n_umi_err, n_cb_corrected=n_cb_corr,
        n_spliced=n_spliced, n_soft_clipped=n_clipped, n_with_tx=n_tx,
        n_barcodes=sum(1 for c in per_cb if c > 0), n_cells=sum(1 for c in per_cb if c >= min_cell_reads),
        min_cell_reads=min_cell_reads, max_reads_per_barcode=max(per_cb),
        n_genes_seen=len(genes_seen), seconds=round(time.perf_counter() - t0, 3), file_size=file_size,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bamflow.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output BAM (or .sam; '-' for stdout)")
    p.add_argument("--reads", type=int, default=2_000_000, help="records to write (default 2000000)")
    p.add_argument("--barcodes", type=int, default=None,
                   help="distinct CB values (default 20000, scaled down by reads/2000000 below 2M reads)")
    p.add_argument("--cells", type=int, default=None,
                   help="barcodes with >= 100 reads (default 4400, scaled down like --barcodes)")
    p.add_argument("--genes", type=int, default=3_000, help="gene pool size (default 3000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sort", choices=_SORTS, default="coordinate")
    p.add_argument("--format", choices=_FORMATS, default=None, help="default: from the suffix of OUT")
    p.add_argument("--level", type=int, default=None, help="BGZF compression level 0-9")
    p.add_argument("--read-length", type=int, default=90)
    p.add_argument("--no-cb", type=float, default=0.08, help="fraction of reads without CB")
    p.add_argument("--no-ub", type=float, default=0.02, help="fraction of reads without UB")
    p.add_argument("--no-gene", type=float, default=0.25, help="fraction of reads without GX/GN")
    p.add_argument("--umi-error", type=float, default=0.03, help="fraction of reads with a 1-base error in UR")
    p.add_argument("--secondary", type=float, default=0.02, help="fraction of records that are secondary (flag 256)")
    p.add_argument("--mark-duplicates", action="store_true", help="set flag 1024 on PCR duplicates")
    a = p.parse_args(argv)
    scale = min(1.0, a.reads / 2_000_000)
    if a.cells is None:
        a.cells = max(1, round(4_400 * scale))
    if a.barcodes is None:
        a.barcodes = max(a.cells, round(20_000 * scale))
    try:
        s = simulate_bam(
            a.out, n_reads=a.reads, n_barcodes=a.barcodes, n_cells=a.cells, n_genes=a.genes, seed=a.seed, sort=a.sort,
            format=a.format, level=a.level, read_length=a.read_length, frac_no_cb=a.no_cb, frac_no_ub=a.no_ub,
            frac_no_gene=a.no_gene, frac_umi_error=a.umi_error, frac_secondary=a.secondary,
            mark_duplicates=a.mark_duplicates)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(s.to_dict(), indent=1), file=sys.stderr if a.out == "-" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
