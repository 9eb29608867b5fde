"""Small BAM files for the tests, written with pysam (independently of bamflow)."""

from __future__ import annotations

import random

import pysam

REFERENCES = [("chr1", 1_000_000), ("chr2", 500_000), ("chrM", 16_569)]


def header(extra_pg=True):
    h = {
        "HD": {"VN": "1.6", "SO": "unsorted"},
        "SQ": [{"SN": name, "LN": length} for name, length in REFERENCES],
        "RG": [{"ID": "rg1", "SM": "sample"}],
        "CO": ["test file — grüße"],
    }
    if extra_pg:
        h["PG"] = [
            {"ID": "cellranger", "PN": "cellranger", "VN": "7.1.0"},
            {"ID": "samtools", "PN": "samtools", "PP": "cellranger"},
        ]
    return pysam.AlignmentHeader.from_dict(h)


def make_reads(n=2000, seed=3, n_cells=40, no_cb=0.05, int_cb=False, unmapped=0.03):
    """Reads with CB/UB/GN tags; some without CB; some unmapped."""
    rng = random.Random(seed)
    hdr = header()
    cells = ["".join(rng.choice("ACGT") for _ in range(16)) + "-1" for _ in range(n_cells)]
    reads = []
    for i in range(n):
        r = pysam.AlignedSegment(hdr)
        r.query_name = f"r{i}"
        length = rng.choice([50, 90])
        r.query_sequence = "".join(rng.choice("ACGT") for _ in range(length))
        r.query_qualities = pysam.qualitystring_to_array("".join(chr(33 + rng.randrange(2, 41)) for _ in range(length)))
        if rng.random() < unmapped:
            r.flag = 4
            r.reference_id = -1
            r.reference_start = -1
        else:
            r.flag = rng.choice([0, 16])
            r.reference_id = rng.randrange(len(REFERENCES))
            r.reference_start = rng.randrange(REFERENCES[r.reference_id][1] - 200)
            r.cigarstring = f"{length}M"
            r.mapping_quality = 255
        tags = []
        if rng.random() >= no_cb:
            cell = rng.randrange(n_cells)
            tags.append(("CB", cell if int_cb else cells[cell]))
        tags += [("UB", "".join(rng.choice("ACGT") for _ in range(12))), ("RG", "rg1"), ("NH", 1)]
        if rng.random() < 0.7:
            tags.append(("GN", f"GENE{rng.randrange(30)}"))
        r.set_tags(tags)
        reads.append(r)
    return hdr, reads


def sort_key(order):
    if order == "coordinate":
        return lambda r: (r.reference_id if r.reference_id >= 0 else 1 << 31, r.reference_start)
    if order == "CB":
        return lambda r: str(r.get_tag("CB")) if r.has_tag("CB") else ""
    return None


def write_bam(path, n=2000, seed=3, order="unsorted", mode="wb", **kwargs):
    """Write a BAM (mode 'wb'), uncompressed BAM ('wbu') or SAM ('w'); returns the reads."""
    hdr, reads = make_reads(n, seed, **kwargs)
    if order != "unsorted":
        reads.sort(key=sort_key(order))
        d = hdr.to_dict()
        d["HD"]["SO"] = "coordinate" if order == "coordinate" else "unsorted"
        if order == "CB":
            d["HD"]["GO"] = "query"
        hdr = pysam.AlignmentHeader.from_dict(d)
    with pysam.AlignmentFile(str(path), mode, header=hdr) as f:
        for r in reads:
            f.write(r)
    return reads


def read_records(path):
    """(header dict, [record as SAM line]) of a BAM/SAM file."""
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return f.header.to_dict(), [r.to_string() for r in f]


def without_bamflow_pg(header_dict):
    d = dict(header_dict)
    d["PG"] = [pg for pg in d.get("PG", []) if pg.get("PN") != "bamflow"]
    if not d["PG"]:
        del d["PG"]
    return d
