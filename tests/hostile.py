"""Bad inputs, made by code: what a hostile or unlucky user gives bamflow.

Each maker writes one file into a folder and returns its path. The records
are built with bamgen (struct.pack, independent of bamflow) and wrapped in
BGZF with zlib, so that every fault is exactly the one named.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import bamgen

REFS = (("chr1", 100_000), ("chr2", 50_000))


def bgzf(data: bytes, eof: bool = True) -> bytes:
    """BGZF blocks of at most 64 KiB holding ``data``, then the EOF marker."""
    out = []
    for i in range(0, len(data), 0xFF00):
        chunk = data[i : i + 0xFF00]
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        cdata = c.compress(chunk) + c.flush()
        bsize = len(cdata) + 25
        out.append(
            b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00"
            + struct.pack("<H", bsize)
            + cdata
            + struct.pack("<II", zlib.crc32(chunk), len(chunk))
        )
    if eof:
        out.append(b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00\x1b\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    return b"".join(out)


def good_records(n: int = 200, start: int = 0) -> list[bytes]:
    """Mapped, tagged reads like a 10x BAM (CB, UB, GX, GN)."""
    recs = []
    for i in range(start, start + n):
        tags = [("CB", "Z", f"CELL{i % 7:02d}-1"), ("UB", "Z", "ACGTACGTAC"[i % 5 :] + "A" * (i % 5)),
                ("GX", "Z", f"G{i % 3}"), ("GN", "Z", f"Gene{i % 3}")]
        recs.append(bamgen.record(f"r{i}", ref_id=0, pos=100 + i, mapq=60, flag=0, cigar=[(20, "M")], seq="ACGT" * 5, tags=tags))
    return recs


def header(text: bytes = b"@HD\tVN:1.6\tSO:coordinate\n") -> bytes:
    return bamgen.header(text=text, refs=REFS)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# -- the faults: each returns the file and what the error must mention ------------------------

def truncated(folder: Path) -> tuple[Path, str]:
    data = bgzf(header() + b"".join(good_records(400)))
    return write(folder, "truncated.bam", data[: len(data) // 2]), "truncated"


def corrupt_block(folder: Path) -> tuple[Path, str]:
    data = bytearray(bgzf(header() + b"".join(good_records(400))))
    data[40] ^= 0xFF  # inside the first block's deflate data
    return write(folder, "corrupt.bam", bytes(data)), "corrupt"


def empty(folder: Path) -> tuple[Path, str]:
    return write(folder, "empty.bam", b""), "empty"


def not_bam(folder: Path) -> tuple[Path, str]:
    return write(folder, "notes.bam", b"this is not a BAM file\n" * 10), "not a BAM"


def plain_gzip(folder: Path) -> tuple[Path, str]:
    return write(folder, "plain.bam.gz", gzip.compress(header() + b"".join(good_records(10)))), "gzip"


def refid_past_references(folder: Path) -> tuple[Path, str]:
    recs = good_records(50)
    recs.append(bamgen.record("bad", ref_id=5, pos=10, flag=0, cigar=[(4, "M")], seq="ACGT", tags=[("CB", "Z", "CELL00-1")]))
    return write(folder, "refid.bam", bgzf(header() + b"".join(recs))), "refID 5"


def aux_cut_short(folder: Path) -> tuple[Path, str]:
    recs = good_records(50)
    bad = bytearray(recs[20])
    bad = bad[:-1]  # the last Z tag loses its NUL
    struct.pack_into("<I", bad, 0, len(bad) - 4)
    recs[20] = bytes(bad)
    return write(folder, "aux.bam", bgzf(header() + b"".join(recs))), "record 20"


def absurd_l_text(folder: Path) -> tuple[Path, str]:
    head = b"BAM\x01" + struct.pack("<i", 0x7FFFFFF0) + b"@HD\tVN:1.6\n"
    return write(folder, "ltext.bam", bgzf(head)), "l_text"


def block_size_too_small(folder: Path) -> tuple[Path, str]:
    recs = good_records(10)
    return write(folder, "small.bam", bgzf(header() + b"".join(recs) + struct.pack("<I", 7) + b"\0" * 7)), "block_size 7"


def block_size_huge(folder: Path) -> tuple[Path, str]:
    recs = good_records(10)
    return write(folder, "huge.bam", bgzf(header() + b"".join(recs) + struct.pack("<I", 0xFFFFFFF0) + b"\0" * 40)), \
        "block_size"


def malformed_sam(folder: Path) -> tuple[Path, str]:
    lines = ["@HD\tVN:1.6\tSO:unsorted", "@SQ\tSN:chr1\tLN:100000"]
    lines += [f"r{i}\t0\tchr1\t{100 + i}\t60\t4M\t*\t0\t0\tACGT\tIIII\tCB:Z:C1\tUB:Z:AAAA\tGX:Z:G1" for i in range(5)]
    lines.append("r5\tnotaflag\tchr1\t100\t60\t4M\t*\t0\t0\tACGT\tIIII")
    return write(folder, "bad.sam", ("\n".join(lines) + "\n").encode()), "line 8"


STRUCTURAL = [truncated, corrupt_block, empty, not_bam, plain_gzip, refid_past_references, aux_cut_short,
              absurd_l_text, block_size_too_small, block_size_huge, malformed_sam]


def float_key(folder: Path) -> tuple[Path, str]:
    recs = good_records(20)
    recs.append(bamgen.record("f", ref_id=0, pos=500, flag=0, cigar=[(4, "M")], seq="ACGT",
                              tags=[("CB", "f", 1.5), ("UB", "Z", "AAAA"), ("GX", "Z", "G1")]))
    return write(folder, "floatkey.bam", bgzf(header() + b"".join(recs))), "float"


def array_key(folder: Path) -> tuple[Path, str]:
    recs = good_records(20)
    recs.append(bamgen.record("b", ref_id=0, pos=500, flag=0, cigar=[(4, "M")], seq="ACGT",
                              tags=[("CB", "B", ("C", [1, 2])), ("UB", "Z", "AAAA"), ("GX", "Z", "G1")]))
    return write(folder, "arraykey.bam", bgzf(header() + b"".join(recs))), "array"


KEY_TYPES = [float_key, array_key]


def good(folder: Path) -> Path:
    return write(folder, "good.bam", bgzf(header() + b"".join(good_records(300))))
