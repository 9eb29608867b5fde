"""Partitions of one BAM file: disjoint ranges of records that K tasks read
on their own, and the job that decodes one range into a raw BAM stream.

A BGZF file is addressed by *virtual offsets*: (offset of a compressed
block in the file, offset inside its uncompressed data). A partition is the
half-open range [start, end) of two virtual offsets that are record starts,
so the partitions of a plan hold every record exactly once, in file order,
whatever their number.

Split points come from the BAM's index when it has one (``.bai`` or
``.csi``: every chunk begin and end and every linear-index entry is a record
start), else from a scan near each target byte offset, as Disq and spark-bam
do it: find the next BGZF block (its header, BSIZE, and the blocks that
follow it must all hold up), inflate a few blocks, and take the first offset
where a chain of records validates field by field (block_size, reference
ids, read name, CIGAR operations, qualities, and every aux value ending
exactly at the record's end). A split point from an index is validated the
same way, so a stale index is never trusted blindly.

:func:`read_partition` is the stage a map task starts with: it writes the
file's header and then the records of its range as one raw BAM stream, which
the normal stages (distribute, encode, the presets' kernels) read as they
read any decoded BAM.

:func:`plan_regions` cuts a coordinate-sorted, indexed file at reference
starts instead, balanced by the index's read counts per reference: the
UMI presets' workers each read whole references this way (no bundle spans
two of them). This module is the BAM layer's; ``bamflow.distributed``'s
map tasks use it too.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..engine import progress
from ..engine.files import fd_of, write_all
from ..kernels._bgzf import inflate_block, scan_block
from .bgzf import EOF_BLOCK, BgzfError, BgzfReader, detect_format
from .header import BamFormatError, BamHeader

log = logging.getLogger("bamflow")

VOffset = tuple[int, int]  # (compressed block offset, offset in its uncompressed data)
MAX_BLOCK = 1 << 16
CHAIN = 6  # records that must validate one after the other at a split point from a scan
WINDOW = 4 * MAX_BLOCK  # uncompressed bytes inflated to validate a record chain
MAX_RECORD = 1 << 28  # as the record layer: a block_size above 256 MiB is not a record
_FIXED = struct.Struct("<iiiBBHHHiiii")  # block_size … tlen: the 36 bytes before the read name
_AUX_SIZES = {ord(c): n for c, n in (("A", 1), ("c", 1), ("C", 1), ("s", 2), ("S", 2), ("i", 4), ("I", 4), ("f", 4))}
_NAME_BYTES = bytes(range(0x21, 0x7F))


@dataclass(frozen=True)
class Partition:
    """Records [start, end) of ``path``: what one map task reads."""

    path: str
    index: int
    start: VOffset
    end: VOffset

    @property
    def compressed_bytes(self) -> int:
        return max(0, self.end[0] - self.start[0])


@dataclass
class Layout:
    """Where a BGZF BAM's parts are: the raw header, the first record, the end of the data."""

    path: str
    header: bytes  # the raw header (BAM magic … references)
    n_ref: int
    first: VOffset  # the first record (or the end, for a file without records)
    data_end: int  # offset of the EOF marker block
    size: int


@dataclass
class Plan:
    """A file cut into partitions; ``source`` says where the split points came from."""

    layout: Layout
    partitions: list[Partition]
    source: str  # "index (.bai)", "index (.csi)", "scan", "whole file"
    index_records: int | None = None  # records the index counts (mapped + unmapped + no coordinate), if it says


# -- blocks ------------------------------------------------------------------------------------


def _read_at(f: Any, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def read_block(f: Any, offset: int, name: str) -> tuple[int, bytes]:
    """(size of the compressed block at ``offset``, its checked payload)."""
    head = _read_at(f, offset, MAX_BLOCK)
    size, cstart, clen, crc, isize = scan_block(head, 0, offset, False, name)
    if size < 0:
        raise BamFormatError(f"{name}: truncated BGZF block at byte offset {offset}")
    return size, bytes(inflate_block(head[:size], cstart, clen, crc, isize, offset, name))


def block_sizes(f: Any, offset: int, name: str) -> tuple[int, int]:
    """(compressed size, uncompressed size) of the block at ``offset``, read from
    its header and footer only."""
    head = _read_at(f, offset, 18)
    _, bsize, _, _, _ = scan_block(head, 0, offset, False, name)  # 18 bytes: never a whole block
    if not bsize:
        raise BamFormatError(f"{name}: truncated BGZF block at byte offset {offset}")
    footer = _read_at(f, offset + bsize - 4, 4)
    if len(footer) < 4:
        raise BamFormatError(f"{name}: truncated BGZF block at byte offset {offset}")
    return bsize, struct.unpack("<I", footer)[0]


def normalize(f: Any, v: VOffset, data_end: int, name: str) -> VOffset:
    """The same position with an in-block offset inside its block (an offset at
    a block's end is the next block's start)."""
    c, u = v
    while c < data_end:
        bsize, isize = block_sizes(f, c, name)
        if u < isize:
            return c, u
        c, u = c + bsize, u - isize
    return data_end, 0


def layout_of(path: str) -> Layout:
    """Read the header of a BGZF BAM and find its first record and the EOF marker.

    Raises BamFormatError for a file that is not BGZF or has no EOF marker."""
    name = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if detect_format(f.read(512)) != "bgzf":
            raise BamFormatError(f"{name}: not a BGZF-compressed BAM file")
        f.seek(max(0, size - len(EOF_BLOCK)))
        if f.read() != EOF_BLOCK:
            raise BamFormatError(f"{name}: no BGZF EOF marker: file is truncated")
        data_end = size - len(EOF_BLOCK)
        data = b""
        offset = 0
        starts: list[tuple[int, int]] = []  # (block offset, uncompressed offset of its start)
        while True:
            if offset >= data_end:
                raise BamFormatError(f"{name}: ends inside the BAM header")
            bsize, payload = read_block(f, offset, name)
            starts.append((offset, len(data)))
            data += payload
            offset += bsize
            try:
                header, length = BamHeader.from_bytes(data, name)
                break
            except EOFError:
                continue
        for block, at in reversed(starts):
            if at <= length:
                first = normalize(f, (block, length - at), data_end, name)
                break
    return Layout(path, data[:length], len(header.references), first, data_end, size)


# -- records -------------------------------------------------------------------------------------


def _aux_ok(data: bytes | memoryview, p: int, end: int) -> bool:
    """Whether the aux values in data[p:end] walk to exactly ``end``."""
    while p < end:
        if p + 3 > end:
            return False
        t0, t1, typ = data[p], data[p + 1], data[p + 2]
        if not (65 <= t0 <= 90 or 97 <= t0 <= 122) or not (48 <= t1 <= 57 or 65 <= t1 <= 90 or 97 <= t1 <= 122):
            return False
        p += 3
        size = _AUX_SIZES.get(typ)
        if size is not None:
            p += size
        elif typ in (90, 72):  # Z, H: NUL-terminated
            nul = bytes(data[p:end]).find(b"\0")
            if nul < 0:
                return False
            p += nul + 1
        elif typ == 66:  # B: subtype, count, values
            if p + 5 > end:
                return False
            sub = _AUX_SIZES.get(data[p])
            if sub is None or data[p] == 65:
                return False
            count = struct.unpack_from("<I", data, p + 1)[0]
            p += 5 + sub * count
        else:
            return False
    return p == end


def record_ok(data: bytes | memoryview, p: int, n_ref: int) -> int:
    """The size of a valid record at ``data[p:]`` (block_size included); 0 if it
    is not one; -1 if its fixed fields hold up but it runs past ``data``."""
    if p + 36 > len(data):
        return -1 if p + 4 <= len(data) else 0
    (bs, ref, pos, l_name, _mapq, _bin, n_cigar, _flag, l_seq, mate_ref, mate_pos, _tlen) = _FIXED.unpack_from(data, p)
    if not 32 <= bs <= MAX_RECORD or not -1 <= ref < n_ref or not -1 <= mate_ref < n_ref:
        return 0
    if pos < -1 or mate_pos < -1 or l_name < 1 or l_seq < 0:
        return 0
    fixed = 32 + l_name + 4 * n_cigar + (l_seq + 1) // 2 + l_seq
    if fixed > bs:
        return 0
    end = p + 4 + bs
    if p + 36 + l_name > len(data):
        return -1
    name = bytes(data[p + 36 : p + 36 + l_name])
    if name[-1] != 0 or name[:-1].translate(None, _NAME_BYTES):
        return 0
    if end > len(data):
        return -1
    q = p + 36 + l_name
    for i in range(n_cigar):
        if data[q + 4 * i] & 0xF > 8:
            return 0
    q += 4 * n_cigar + (l_seq + 1) // 2
    qual = bytes(data[q : q + l_seq])
    if qual and qual[0] == 0xFF:
        if qual.strip(b"\xff"):
            return 0
    elif qual and max(qual) > 93:
        return 0
    return 4 + bs if _aux_ok(data, q + l_seq, end) else 0


def chain_ok(data: bytes | memoryview, p: int, n_ref: int, at_end: bool) -> bool:
    """Whether a chain of records starts at ``data[p:]``: CHAIN valid records in a
    row, or valid records up to the end of ``data`` (exactly, if ``at_end``: the
    end of the file's data; else the last one may run past it)."""
    for _ in range(CHAIN):
        if p == len(data):
            return True
        size = record_ok(data, p, n_ref)
        if size == 0 or (size < 0 and at_end):
            return False
        if size < 0:
            return True
        p += size
    return True


def _inflate_window(f: Any, c: int, data_end: int, name: str) -> tuple[bytes, list[tuple[int, int, int]], bool]:
    """Inflate blocks from ``c`` until WINDOW bytes or the data's end: (data,
    [(block offset, start in data, uncompressed size)], whether the window reaches the end)."""
    data = bytearray()
    blocks = []
    while c < data_end and len(data) < WINDOW:
        bsize, payload = read_block(f, c, name)
        blocks.append((c, len(data), len(payload)))
        data += payload
        c += bsize
    return bytes(data), blocks, c >= data_end


def first_record_from(f: Any, c: int, layout: Layout) -> VOffset | None:
    """The first record start at or after block ``c`` (a block start), found by
    validating record chains; None if there is none before the end."""
    while c < layout.data_end:
        data, blocks, at_end = _inflate_window(f, c, layout.data_end, layout.path)
        for u in range(blocks[0][2]):
            if chain_ok(data, u, layout.n_ref, at_end):
                return c, u
        c = blocks[1][0] if len(blocks) > 1 else layout.data_end  # no record starts in this block
    return None


def next_block_start(f: Any, target: int, layout: Layout) -> int | None:
    """The offset of the first BGZF block at or after ``target`` whose header and
    the headers of the next blocks (up to three, or to the end) all hold up."""
    name = layout.path
    offset = max(target, layout.first[0])
    while offset < layout.data_end:
        window = _read_at(f, offset, 4 * MAX_BLOCK)
        at = 0
        while True:
            at = window.find(b"\x1f\x8b\x08\x04", at)
            if at < 0 or at + 18 > len(window):
                break
            if _block_chain_ok(f, offset + at, layout, name):
                return offset + at
            at += 1
        offset += max(1, len(window) - 18)
    return None


def _block_chain_ok(f: Any, offset: int, layout: Layout, name: str) -> bool:
    for _ in range(3):
        if offset == layout.data_end:
            return True
        if offset > layout.data_end:
            return False
        head = _read_at(f, offset, 18)
        try:
            size, needed, _, _, _ = scan_block(head, 0, offset, False, name)
        except BgzfError:
            return False
        if size < 0 and not needed:
            return False
        offset += size if size >= 0 else needed
    return True


def split_by_scan(f: Any, target: int, layout: Layout) -> VOffset | None:
    """A record start near (at or after) the compressed offset ``target``."""
    c = next_block_start(f, target, layout)
    return None if c is None else first_record_from(f, c, layout)


def validate_split(f: Any, v: VOffset, layout: Layout) -> bool:
    """Whether a record chain starts at ``v`` (a split point from an index)."""
    c, u = v
    if c >= layout.data_end:
        return c == layout.data_end and u == 0
    data, blocks, at_end = _inflate_window(f, c, layout.data_end, layout.path)
    return u < len(data) and chain_ok(data, u, layout.n_ref, at_end)


# -- indexes ------------------------------------------------------------------------------------


@dataclass
class IndexOffsets:
    kind: str
    offsets: list[VOffset]  # record starts (and ends) the index names, sorted
    records: int | None  # mapped + unmapped + without coordinate, when the index says
    # per reference, from its pseudo-bin: (records, first record, end of its records); None: no pseudo-bin
    refs: list[tuple[int, VOffset, VOffset] | None] = field(default_factory=list)
    no_coordinate: int | None = None  # reads without a coordinate (at the end of the file)


def _voffset(v: int) -> VOffset:
    return v >> 16, v & 0xFFFF


def parse_bai(data: bytes, offsets: bool = True) -> IndexOffsets:
    """Every virtual offset a .bai names (not with ``offsets=False``: the
    pseudo-bins only), and the record count of its pseudo-bins."""
    if data[:4] != b"BAI\x01":
        raise ValueError("not a .bai index")
    return _parse_bins(data, 4, csi=False, pseudo=37450, offsets=offsets)


def parse_csi(data: bytes, offsets: bool = True) -> IndexOffsets:
    """Every virtual offset a .csi (inflated) names, and its pseudo-bins' record count."""
    if data[:4] != b"CSI\x01":
        raise ValueError("not a .csi index")
    _min_shift, depth, l_aux = struct.unpack_from("<iii", data, 4)
    return _parse_bins(data, 16 + l_aux, csi=True, pseudo=((1 << ((depth + 1) * 3)) - 1) // 7 + 1, offsets=offsets)


def _parse_bins(data: bytes, p: int, *, csi: bool, pseudo: int, offsets: bool = True) -> IndexOffsets:
    """The references of a .bai (bins, then a linear index) or a .csi (bins with
    their loffset), from ``p`` on: chunk begins and ends and linear offsets."""
    (n_ref,) = struct.unpack_from("<i", data, p)
    p += 4
    found: set[int] = set()
    records = 0
    complete = True
    refs: list[tuple[int, VOffset, VOffset] | None] = []
    bin_head = struct.Struct("<IQi" if csi else "<Ii")
    for _ in range(n_ref):
        (n_bin,) = struct.unpack_from("<i", data, p)
        p += 4
        has_pseudo = False
        refs.append(None)
        for _ in range(n_bin):
            head = bin_head.unpack_from(data, p)
            p += bin_head.size
            n_chunk = head[-1]
            if not offsets and head[0] != pseudo:
                p += 16 * n_chunk
                continue
            chunks = struct.unpack_from(f"<{2 * n_chunk}Q", data, p)
            p += 16 * n_chunk
            if head[0] == pseudo:
                has_pseudo = True
                records += chunks[2] + chunks[3]  # n_mapped, n_unmapped
                refs[-1] = (chunks[2] + chunks[3], _voffset(chunks[0]), _voffset(chunks[1]))  # ref_beg, ref_end
                continue
            found.update(chunks)
            if csi and head[1]:
                found.add(head[1])  # loffset
        if not csi:
            (n_intv,) = struct.unpack_from("<i", data, p)
            p += 4
            if offsets:
                found.update(v for v in struct.unpack_from(f"<{n_intv}Q", data, p) if v)
            p += 8 * n_intv
        complete = complete and (has_pseudo or n_bin == 0)
    no_coordinate = None
    if p + 8 <= len(data):
        no_coordinate = struct.unpack_from("<Q", data, p)[0]  # reads without a coordinate
        records += no_coordinate
    else:
        complete = False
    return IndexOffsets("csi" if csi else "bai", [_voffset(v) for v in sorted(found)], records if complete else None,
                        refs, no_coordinate)


def find_index(path: str) -> str | None:
    """The index beside ``path`` (x.bam.bai, x.bai, x.bam.csi) that is not older than it."""
    stem = path[:-4] if path.endswith(".bam") else path
    for candidate in (path + ".bai", stem + ".bai", path + ".csi"):
        try:
            if os.path.getmtime(candidate) >= os.path.getmtime(path):
                return candidate
            log.warning("%s is older than %s: not used", candidate, path)
        except OSError:
            continue
    return None


def read_index(path: str, offsets: bool = True) -> IndexOffsets:
    """The index at ``path``; ``offsets=False``: its pseudo-bins only (counts and reference spans)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".csi"):
        with BgzfReader(io.BytesIO(data), threads=0) as reader:
            return parse_csi(reader.read(), offsets)
    return parse_bai(data, offsets)


# -- plans ------------------------------------------------------------------------------------


def plan_partitions(path: str, k: int, *, use_index: bool = True) -> Plan:
    """Cut ``path`` into (at most) ``k`` partitions of about equal compressed size.

    Split points come from the index when there is one (and each is
    validated), else from scans; a target offset the index has no record
    start near (within half a partition) is scanned for. Fewer than ``k``
    partitions come out of a file with fewer record starts to choose from."""
    if k < 1:
        raise ValueError(f"partitions must be >= 1, not {k}")
    layout = layout_of(path)
    end: VOffset = (layout.data_end, 0)
    index = None
    source = "scan"
    if use_index:
        index_path = find_index(path)
        if index_path is not None:
            try:
                index = read_index(index_path)
                source = f"index (.{index.kind})"
            except (ValueError, struct.error, BgzfError) as e:
                log.warning("%s: not a usable index (%s); scanning instead", index_path, e)
    first = layout.first
    span = layout.data_end - first[0]
    splits: set[VOffset] = set()
    with open(path, "rb") as f:
        candidates = [v for v in index.offsets if first[0] <= v[0] < end[0]] if index else []
        scanned = False
        for i in range(1, k):
            target = first[0] + span * i // k
            chosen = _nearest(candidates, target, span / (2 * k))
            if chosen is not None and not _index_split_ok(f, chosen, layout):
                log.warning("%s: its index names %s, where no record starts; scanning instead", path, chosen)
                candidates, chosen, index = [], None, None
                source = "scan"
            elif chosen is not None:
                chosen = normalize(f, chosen, layout.data_end, path)
            if chosen is None:
                chosen = split_by_scan(f, target, layout)
                scanned = True
            if chosen is not None and first < chosen < end:
                splits.add(chosen)
        if index is not None and scanned:
            source += " and scan"
    bounds = [first, *sorted(splits), end]
    parts = [Partition(path, i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]
    return Plan(layout, parts, source if k > 1 else "whole file", index.records if index else None)


def _index_split_ok(f: Any, v: VOffset, layout: Layout) -> bool:
    """Whether an index's offset is a record start of this file (an index of
    another file, or of an earlier version of it, names other places)."""
    try:
        return validate_split(f, normalize(f, v, layout.data_end, layout.path), layout)
    except (BgzfError, BamFormatError, struct.error):
        return False


def _nearest(candidates: list[VOffset], target: int, tolerance: float) -> VOffset | None:
    import bisect

    if not candidates:
        return None
    i = bisect.bisect_left(candidates, (target, 0))
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(candidates) and abs(candidates[j][0] - target) <= tolerance:
            if best is None or abs(candidates[j][0] - target) < abs(best[0] - target):
                best = candidates[j]
    return best


@dataclass
class RegionPlan:
    """A coordinate-sorted, indexed file cut at reference starts: partition i
    holds references ``refs[i]`` (first, last + 1) whole, ``records[i]``
    records as the index counts them; the last one also holds the reads
    without a coordinate."""

    layout: Layout
    partitions: list[Partition]
    refs: list[tuple[int, int]]
    records: list[int]
    source: str

    @property
    def total(self) -> int:
        return sum(self.records)


def plan_regions(path: str, k: int) -> tuple[RegionPlan | None, str]:
    """Cut a coordinate-sorted BAM with an index into at most ``k`` partitions of
    whole references, balanced by the index's record counts per reference.

    Returns (plan, "") or (None, why not): not a regular BGZF file, not
    ``@HD SO:coordinate``, no index not older than the file, an index without
    record counts or of another file (its offsets are checked against the
    records found there), or fewer than two references with reads."""
    if k < 2:
        return None, "one worker"
    try:
        if not os.path.isfile(path):
            return None, "the input is not a regular file"
        layout = layout_of(path)
    except (OSError, BamFormatError, BgzfError) as e:
        return None, f"not read by parts ({e})"
    header, _ = BamHeader.from_bytes(layout.header, path)
    if header.sort_order != "coordinate":
        return None, "the input is not coordinate-sorted (@HD SO)"
    index_path = find_index(path)
    if index_path is None:
        return None, "no index (.bai/.csi) not older than the input"
    try:
        index = read_index(index_path, offsets=False)
    except (OSError, ValueError, struct.error, BgzfError) as e:
        return None, f"{index_path} is not a usable index ({e})"
    if index.records is None or len(index.refs) != layout.n_ref:
        return None, f"{index_path} has no record counts for this file's references"
    with_reads = [(r, ref) for r, ref in enumerate(index.refs) if ref is not None and ref[0] > 0]
    if len(with_reads) < 2:
        return None, "fewer than two references hold reads"
    counts = [ref[0] for _, ref in with_reads]
    counts[-1] += index.no_coordinate or 0
    total = sum(counts)
    # cut before with_reads[b] for each target: the prefix sum nearest to total * i / k, increasing
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    cuts: list[int] = []
    for i in range(1, k):
        low = cuts[-1] + 1 if cuts else 1
        if low >= len(counts):
            break
        b = min(range(low, len(counts)), key=lambda j: abs(prefix[j] - total * i / k))
        cuts.append(b)
    cuts = sorted(set(cuts))
    end: VOffset = (layout.data_end, 0)
    with open(path, "rb") as f:
        begins = []
        for b in [0, *cuts]:
            r, (_, beg, _) = with_reads[b]
            if not _index_split_ok(f, beg, layout):
                return None, f"{index_path} names {beg} for reference {r}, where no record starts"
            begin = normalize(f, beg, layout.data_end, path)
            if begin != layout.first and b == 0:
                return None, f"{index_path}: its first reference does not start at the first record"
            if b and key_at(path, begin) >> 32 != r:
                return None, f"{index_path}: the record at {begin} is not on reference {r}"
            if b and normalize(f, with_reads[b - 1][1][2], layout.data_end, path) != begin:
                return None, f"{index_path}: reference {r} does not start where the one before it ends"
            begins.append(begin)
    bounds = [*begins, end]
    firsts = [with_reads[b][0] for b in [0, *cuts]]
    lasts = [with_reads[b - 1][0] + 1 for b in cuts] + [layout.n_ref]
    edges = [0, *cuts, len(counts)]
    parts = [Partition(path, i, a, z) for i, (a, z) in enumerate(zip(bounds, bounds[1:], strict=False))]
    return RegionPlan(layout, parts, list(zip(firsts, lasts, strict=True)),
                      [prefix[b] - prefix[a] for a, b in zip(edges, edges[1:], strict=False)],
                      f"index (.{index.kind})"), ""


# -- coordinates ------------------------------------------------------------------------------------


def position_key(ref: int, pos: int) -> int:
    """The order collect_bam(order="coordinate") merges by: reference id as
    unsigned (unplaced reads last), then position."""
    return ((ref & 0xFFFFFFFF) << 32) | ((pos & 0xFFFFFFFF) ^ 0x80000000)


def key_at(path: str, v: VOffset) -> int:
    """The position key of the record at ``v``."""
    with open(path, "rb") as f:
        data = b""
        c = v[0]
        while len(data) < v[1] + 12:
            size, payload = read_block(f, c, path)
            data += payload
            c += size
    _, ref, pos = struct.unpack_from("<iii", data, v[1])
    return position_key(ref, pos)


def split_points(path: str, keys: list[int]) -> list[VOffset]:
    """Where the records of a coordinate-sorted BAM cross each of the sorted
    ``keys``: the virtual offset of its first record whose position key is at
    least the key (the end for none), preceded by the first record and
    followed by the end, so the ranges between them split the file by
    coordinate. One pass over the records' block_size chain."""
    import bisect

    layout = layout_of(path)
    end: VOffset = (layout.data_end, 0)
    points: list[VOffset] = [end] * len(keys)
    j = 0
    buf = b""
    starts: list[tuple[int, int]] = []  # (offset in buf where a block's data starts, the block's offset)
    p = 0  # the next record's start in buf
    c = layout.first[0]
    with open(path, "rb") as f:
        while j < len(keys) and c < layout.data_end:
            size, payload = read_block(f, c, path)
            if not starts:
                buf, starts, p = payload, [(0, c)], layout.first[1]
            else:
                starts = [(o - p, cc) for o, cc in starts]
                while len(starts) > 1 and starts[1][0] <= 0:
                    starts.pop(0)
                buf = buf[p:] + payload
                starts.append((len(buf) - len(payload), c))
                p = 0
            while j < len(keys) and p + 12 <= len(buf):
                block_size, ref, pos = struct.unpack_from("<iii", buf, p)
                key = ((ref & 0xFFFFFFFF) << 32) | ((pos & 0xFFFFFFFF) ^ 0x80000000)
                while j < len(keys) and key >= keys[j]:
                    i = bisect.bisect_right(starts, (p, 1 << 62)) - 1
                    points[j] = (starts[i][1], p - starts[i][0])
                    j += 1
                if p + 4 + block_size > len(buf):
                    break  # the rest of this record is in the next block
                p += 4 + block_size
            c += size
        return [layout.first, *[normalize(f, v, layout.data_end, path) for v in points], end]


# -- the reader stage -----------------------------------------------------------------------------


class _Range(io.RawIOBase):
    """Bytes [start, stop) of a file, then the BGZF EOF marker (so that the
    BGZF reader sees a complete stream)."""

    def __init__(self, f: Any, start: int, stop: int) -> None:
        super().__init__()
        self.f = f
        self.left = stop - start
        self.tail = memoryview(EOF_BLOCK)
        self.name = getattr(f, "name", "")
        self.slot = progress.current().slot  # bytes read: the live display's MB/s
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.left > 0:
            n = self.f.readinto(view[: min(len(view), self.left)])
            if not n:
                raise BamFormatError(f"{self.name}: ends {self.left} bytes early (changed while read?)")
            self.left -= n
            self.slot[1] += n
            return n
        n = min(len(view), len(self.tail))
        view[:n] = self.tail[:n]
        self.tail = self.tail[n:]
        return n


def partition_bytes(partition: Partition, threads: int = 2) -> Iterator[bytes]:
    """The uncompressed record bytes of ``partition``, in pieces."""
    (c0, u0), (c1, u1) = partition.start, partition.end
    name = partition.path
    with open(partition.path, "rb", buffering=0) as f:
        skip = u0
        if c0 < c1:
            with BgzfReader(io.BufferedReader(_Range(f, c0, c1), 1 << 20), threads=threads) as reader:
                while block := reader.read1(1 << 20):
                    if skip:
                        cut = min(skip, len(block))
                        block, skip = block[cut:], skip - cut
                    if block:
                        yield block
        if u1:
            _, payload = read_block(f, c1, name)
            if len(payload) < u1:
                raise BamFormatError(f"{name}: a partition ends at {c1}:{u1}, past its block's {len(payload)} bytes")
            piece = payload[skip:u1]
            if piece:
                yield piece


def read_partition(output: Any, *, partition: Partition, header: bytes, threads: int = 2) -> dict[str, Any]:
    """The job: ``header`` (the file's raw BAM header), then the records of
    ``partition``, as one raw BAM stream on ``output``."""
    with ExitStack() as stack:
        out_fd = fd_of(output, True, stack)
        write_all(out_fd, memoryview(header))
        total = 0
        for piece in partition_bytes(partition, threads):
            write_all(out_fd, memoryview(piece))
            total += len(piece)
    return {"bytes": total, "header_bytes": len(header)}


__all__ = [
    "Layout",
    "Partition",
    "Plan",
    "RegionPlan",
    "VOffset",
    "chain_ok",
    "layout_of",
    "parse_bai",
    "parse_csi",
    "partition_bytes",
    "plan_partitions",
    "plan_regions",
    "position_key",
    "read_partition",
    "record_ok",
    "split_points",
]
