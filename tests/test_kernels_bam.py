"""Property tests of the BAM kernels on real file descriptors.

Streams are built by tests/bamgen.py with struct.pack (independently of the
kernels); buffer sizes go down to one byte so that every record boundary
falls across a refill, and some records are over 64 KB.
"""

import os
import struct
import subprocess
import sys
import tempfile

import bamgen
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.kernels.bam import collect_bam, distribute_bam, split_header

HEADER = bamgen.header()
small_sizes = st.sampled_from([1, 2, 3, 5, 7, 64, 1 << 16])
INT_RANGES = {"c": (-128, 127), "C": (0, 255), "s": (-32768, 32767), "S": (0, 65535),
              "i": (-(2**31), 2**31 - 1), "I": (0, 2**32 - 1)}
BARCODES = ["AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCGC-1", "TTTGTCATCTTTCCTC-1", "A", ""]
ZCHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def element(sub):
    if sub == "f":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    return st.integers(*INT_RANGES[sub])


VALUES = {
    "A": st.sampled_from("ACGTxyz!~"),
    "f": st.floats(width=32, allow_nan=False, allow_infinity=False),
    "Z": st.text(ZCHARS, max_size=12),
    "H": st.binary(max_size=6).map(lambda b: b.hex().upper()),
    "B": st.sampled_from("cCsSiIf").flatmap(lambda s: st.tuples(st.just(s), st.lists(element(s), max_size=6))),
    **{t: st.integers(*r) for t, r in INT_RANGES.items()},
}
tag_field = st.sampled_from(sorted(VALUES)).flatmap(
    lambda t: st.tuples(st.sampled_from(["T0", "T1", "T2", "T3", "T4", "ZZ"]), st.just(t), VALUES[t]))


def int_widths(v):
    """The integer types that can hold v."""
    return [t for t, (lo, hi) in INT_RANGES.items() if lo <= v <= hi]


class Rec:
    """A generated record: its bytes and what went into it."""

    def __init__(self, name, tags, **kw):
        self.name = name
        self.tags = {t: (typ, v) for t, typ, v in tags}
        self.raw = bamgen.record(name, tags=tags, **kw)

    def key(self, names):
        """Canonical bytes of the given tags joined by NUL, or None if one is missing."""
        if any(n not in self.tags for n in names):
            return None
        return b"\x00".join(bamgen.canonical(*self.tags[n]) for n in names)


@st.composite
def records(draw, max_size=25, names=None):
    out = []
    for i in range(draw(st.integers(0, max_size))):
        fields = draw(st.lists(tag_field, max_size=5, unique_by=lambda f: f[0]))
        if draw(st.booleans()):
            fields.append(("CB", "Z", draw(st.sampled_from(BARCODES))))
        if draw(st.booleans()):
            v = draw(st.integers(-5, 300))
            fields.append(("XI", draw(st.sampled_from(int_widths(v))), v))
        big = draw(st.sampled_from([None] * 12 + ["seq", "array"]))
        if big == "array":
            fields.append(("XY", "B", ("I", list(range(17000)))))
        seq = "ACGT" * 17500 if big == "seq" else draw(st.text("ACGTN", max_size=12))
        fields = draw(st.permutations(fields))
        name = draw(st.sampled_from(names)) if names else f"r{i}"
        ref_id = draw(st.sampled_from([-1, 0, 1]))
        pos = -1 if ref_id < 0 else draw(st.integers(0, 40))
        out.append(Rec(name, fields, ref_id=ref_id, pos=pos, flag=4 if ref_id < 0 else 0,
                       seq=seq, cigar=[(len(seq), "M")] if seq and ref_id >= 0 else ()))
    return out


def stream(recs, head=HEADER):
    return head + b"".join(r.raw for r in recs)


class Files:
    """Temporary regular files standing in for pipes (the kernels take any fd)."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        self.count = 0

    def new(self, data=b""):
        path = os.path.join(self.dir.name, f"{self.count}.bam")
        self.count += 1
        with open(path, "wb") as f:
            f.write(data)
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.dir.cleanup()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def run_distribute(data, n, keep=None, **kwargs):
    """Distribute data into n files; returns (stats, outputs, header, unassigned).

    With keep (a Files), the output paths are returned instead of their bytes.
    """
    files = keep or Files()
    try:
        src = files.new(data)
        outs = [files.new() for _ in range(n)]
        header, unassigned = files.new(), files.new()
        in_fd = os.open(src, os.O_RDONLY)
        out_fds = [os.open(p, os.O_WRONLY) for p in outs]
        header_fd = os.open(header, os.O_WRONLY)
        un_fd = os.open(unassigned, os.O_WRONLY)
        try:
            try:
                stats = distribute_bam(in_fd, out_fds, header_fd=header_fd, unassigned_fd=un_fd, **kwargs)
            except ValueError:
                try:
                    os.close(header_fd)  # still open if the arguments were refused
                except OSError:
                    pass
                raise
            with pytest.raises(OSError):
                os.close(header_fd)  # the kernel closed it
        finally:
            for fd in [in_fd, un_fd, *out_fds]:
                os.close(fd)
        if keep:
            return stats, outs, read(header), unassigned
        return stats, [read(p) for p in outs], read(header), read(unassigned)
    finally:
        if keep is None:
            files.dir.cleanup()


def run_collect(datas, header=None, **kwargs):
    """Collect the streams in datas; returns (stats, output bytes)."""
    with Files() as files:
        ins = [os.open(files.new(d), os.O_RDONLY) for d in datas]
        out_path = files.new()
        out_fd = os.open(out_path, os.O_WRONLY)
        header_fd = os.open(files.new(header), os.O_RDONLY) if header is not None else -1
        try:
            stats = collect_bam(ins, out_fd, header_fd=header_fd, **kwargs)
        finally:
            for fd in ins + [out_fd] + ([header_fd] if header_fd >= 0 else []):
                os.close(fd)
        return stats, read(out_path)


# -- header ---------------------------------------------------------------------------------

@given(st.lists(st.tuples(st.text("abc123_", min_size=1, max_size=8), st.integers(1, 2**31 - 1)), max_size=5),
       st.binary(max_size=30))
def test_split_header(refs, text):
    head = bamgen.header(text=text, refs=refs)
    rec = bamgen.record("r1")
    assert split_header(head) == len(head)
    assert split_header(head + rec) == len(head)
    for cut in range(1, len(head)):
        with pytest.raises(ValueError, match=r"^truncated BAM header$"):
            split_header(head[:cut])


def test_split_header_not_bam():
    with pytest.raises(ValueError, match=r"^not a BAM stream \(empty\)$"):
        split_header(b"")
    with pytest.raises(ValueError, match=r"^not a BAM stream \(magic b'@HD\\t'\)$"):
        split_header(b"@HD\tVN:1.6\n")
    with pytest.raises(ValueError, match=r"BGZF-compressed\? decompress first"):
        split_header(b"\x1f\x8b\x08\x04\x00\x00\x00\x00")
    with pytest.raises(ValueError, match=r"^bad BAM header \(l_text -1\)$"):
        split_header(b"BAM\x01" + struct.pack("<i", -1))


# -- distribute -----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(), st.integers(1, 4), st.integers(1, 4), small_sizes, small_sizes)
def test_round_robin_reproduces_chunks(recs, n, chunk, buf, out_buf):
    stats, outs, head, unassigned = run_distribute(stream(recs), n, chunk_size=chunk,
                                                   buffer_size=buf, out_buffer_size=out_buf)
    chunks = [recs[i:i + chunk] for i in range(0, len(recs), chunk)]
    expected = [HEADER + b"".join(r.raw for j, c in enumerate(chunks) if j % n == k for r in c)
                for k in range(n)]
    assert outs == expected
    assert head == HEADER and unassigned == HEADER
    assert stats["records"] == len(recs)
    assert stats["per_output"] == [len(bamgen.split_stream(o)[1]) for o in outs]
    assert stats["header_bytes"] == len(HEADER)
    assert stats["bytes"] == len(stream(recs))
    assert stats["dropped_missing_tag"] == stats["unassigned"] == 0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(), st.integers(1, 5), small_sizes, small_sizes,
       st.sampled_from([["CB"], ["XI"], ["CB", "XI"], ["XI", "CB"], ["T0"], ["T1", "T2"]]),
       st.sampled_from(["drop", "unassigned"]))
def test_by_tag_matches_reference_hash(recs, n, buf, out_buf, tags, missing):
    stats, outs, _, unassigned = run_distribute(
        stream(recs), n, by=[t.encode() for t in tags], missing=missing,
        buffer_size=buf, out_buffer_size=out_buf)
    expected = [[] for _ in range(n)]
    missed = []
    for r in recs:
        key = r.key(tags)
        if key is None:
            missed.append(r.raw)
        else:
            expected[bamgen.fnv1a64(key) % n].append(r.raw)
    assert [bamgen.split_stream(o)[1] for o in outs] == expected
    assert stats["per_output"] == [len(e) for e in expected]
    assert stats["records"] == len(recs)
    if missing == "drop":
        assert stats["dropped_missing_tag"] == len(missed) and stats["unassigned"] == 0
        assert unassigned == HEADER
    else:
        assert stats["unassigned"] == len(missed) and stats["dropped_missing_tag"] == 0
        assert unassigned == HEADER + b"".join(missed)
    # equal values meet, whatever their stored type
    where = {}
    for k, e in enumerate(expected):
        for raw in e:
            where.setdefault(next(r.key(tags) for r in recs if r.raw == raw), set()).add(k)
    assert all(len(v) == 1 for v in where.values())


def test_integer_tag_widths_hash_alike():
    recs = [Rec(f"r{i}", [("CB", t, v)]) for i, (t, v) in enumerate(
        [(t, 5) for t in "cCsSiI"] + [(t, -7) for t in "csi"] + [(t, 4000000000) for t in "I"])]
    recs.append(Rec("z", [("CB", "Z", "5")]))  # the string "5" hashes like the integer 5
    n = 7
    _, outs, _, _ = run_distribute(stream(recs), n, by=[b"CB"], buffer_size=3)
    got = {bamgen.read_name(raw): k for k, o in enumerate(outs) for raw in bamgen.split_stream(o)[1]}
    five = bamgen.fnv1a64(b"5") % n
    assert all(got[f"r{i}"] == five for i in range(6)) and got["z"] == five
    assert all(got[f"r{i}"] == bamgen.fnv1a64(b"-7") % n for i in range(6, 9))
    assert got["r9"] == bamgen.fnv1a64(b"4000000000") % n


def test_every_tag_type_canonical_bytes():
    """One record per type, hashed alone: checks the canonical bytes of each type."""
    samples = [("A", "x"), ("c", -3), ("C", 200), ("s", -300), ("S", 60000), ("i", -70000),
               ("I", 3000000000), ("f", 1.5), ("Z", "ACGT-1"), ("H", "1AE301"),
               *[("B", (s, [1, 2, 3])) for s in "cCsSiI"], ("B", ("f", [0.5, -2.0])), ("B", ("I", []))]
    for typ, value in samples:
        rec = Rec("q", [("T0", "i", 1), ("XX", typ, value), ("T1", "Z", "after")])
        for n in (3, 5):
            _, outs, _, _ = run_distribute(stream([rec]), n, by=[b"XX"], buffer_size=2)
            k = bamgen.fnv1a64(bamgen.canonical(typ, value)) % n
            assert [len(bamgen.split_stream(o)[1]) for o in outs] == [int(i == k) for i in range(n)], typ


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records(names=["m1", "m2", "m3", "pair/x", "a" * 200]), st.integers(1, 5), small_sizes)
def test_by_name_mates_meet(recs, n, buf):
    stats, outs, _, _ = run_distribute(stream(recs), n, by="name", buffer_size=buf)
    where = {}
    for k, o in enumerate(outs):
        for raw in bamgen.split_stream(o)[1]:
            where.setdefault(bamgen.read_name(raw), set()).add(k)
    assert all(ks == {bamgen.fnv1a64(name.encode()) % n} for name, ks in where.items())
    assert sorted(raw for o in outs for raw in bamgen.split_stream(o)[1]) == sorted(r.raw for r in recs)
    assert stats["records"] == len(recs)


def test_missing_tag_error_names_read_and_tag():
    recs = [Rec(f"r{i}", [("CB", "Z", "AAA")]) for i in range(17)] + [Rec("r17", [("UB", "Z", "x")])]
    with pytest.raises(ValueError, match=r"^read 'r17' has no CB tag \(record 17\)$"):
        run_distribute(stream(recs), 2, by=[b"CB"])
    with pytest.raises(ValueError, match=r"^read 'r0' has no UB tag \(record 0\)$"):
        run_distribute(stream(recs), 2, by=[b"CB", b"UB"])
    with pytest.raises(ValueError, match=r"^read 'r17' has no CB tag \(record 17\)$"):
        run_distribute(stream([Rec(f"r{i}", [("UB", "Z", "x")] + [("CB", "i", i)] * (i != 17))
                               for i in range(20)]), 2, by=[b"UB", b"CB"], missing="error")


def test_missing_unassigned_and_drop_counts():
    recs = [Rec(f"r{i}", [("CB", "Z", "AAA")] if i % 3 else []) for i in range(30)]
    stats, outs, _, unassigned = run_distribute(stream(recs), 3, by=[b"CB"], missing="unassigned")
    assert stats["unassigned"] == 10 and stats["dropped_missing_tag"] == 0
    assert [bamgen.read_name(r) for r in bamgen.split_stream(unassigned)[1]] == [f"r{i}" for i in range(0, 30, 3)]
    assert sum(stats["per_output"]) == 20
    stats, outs, _, unassigned = run_distribute(stream(recs), 3, by=[b"CB"], missing="drop")
    assert stats["dropped_missing_tag"] == 10 and unassigned == HEADER
    assert sum(len(bamgen.split_stream(o)[1]) for o in outs) == 20


def test_no_header_broadcast():
    recs = [Rec(f"r{i}", []) for i in range(5)]
    stats, outs, head, unassigned = run_distribute(stream(recs), 2, chunk_size=2, header_broadcast=False)
    assert head == HEADER and unassigned == b""
    assert outs == [recs[0].raw + recs[1].raw + recs[4].raw, recs[2].raw + recs[3].raw]


def test_outputs_are_bam_that_pysam_reads():
    recs = [Rec(f"read{i}", [("CB", "Z", BARCODES[i % 3]), ("XI", "C", i % 200), ("XF", "f", 0.25),
                             ("XA", "A", "q"), ("XB", "B", ("s", [-1, i])), ("XS", "s", -i)],
                ref_id=i % 2, pos=i, flag=0, seq="ACGTN"[: i % 5 + 1], cigar=[(i % 5 + 1, "M")])
            for i in range(40)]
    recs.append(Rec("big", [("CB", "Z", BARCODES[0]), ("XY", "B", ("I", list(range(20000))))],
                    seq="ACGT" * 9000))
    with Files() as files:
        stats, paths, _, _ = run_distribute(stream(recs), 3, keep=files, by=[b"CB"], buffer_size=7)
        seen = []
        for path in paths:
            with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
                assert list(bam.references) == ["chr1", "chr2"]
                for aln in bam:
                    seen.append(aln.query_name)
                    rec = next(r for r in recs if r.name == aln.query_name)
                    assert aln.get_tag("CB") == rec.tags["CB"][1]
                    if aln.query_name == "big":
                        assert list(aln.get_tag("XY")) == list(range(20000))
                        assert aln.query_sequence == "ACGT" * 9000
                    else:
                        assert aln.get_tag("XI") == rec.tags["XI"][1]
                        assert list(aln.get_tag("XB")) == rec.tags["XB"][1][1]
                        assert aln.get_tag("XA") == "q" and aln.get_tag("XF") == 0.25
                        assert aln.reference_start == rec.tags["XI"][1] % 200 == int(aln.query_name[4:])
        assert sorted(seen) == sorted(r.name for r in recs)


# -- malformed input ------------------------------------------------------------------------

def _patched(raw, offset, fmt, value):
    raw = bytearray(raw)
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


@pytest.mark.parametrize("by", [None, "name", [b"CB"]])
@pytest.mark.parametrize("buf", [1, 5, 1 << 20])
def test_truncated_stream(by, buf):
    recs = [Rec(f"r{i}", [("CB", "Z", "AC")], seq="ACGT" * 30) for i in range(5)]
    data = stream(recs)
    for cut in (1, 3, 4, 50, len(recs[3].raw) - 1):
        end = len(HEADER) + sum(len(r.raw) for r in recs[:3]) + cut
        with pytest.raises(ValueError, match=r"^BAM stream ends inside record 3$"):
            run_distribute(data[:end], 2, by=by, buffer_size=buf)
    for end in (0, 2, 4, len(HEADER) - 1):
        with pytest.raises(ValueError, match=r"^(truncated BAM header|not a BAM stream \(empty\))$"):
            run_distribute(data[:end], 2, by=by, buffer_size=buf)


def test_not_bam_stream():
    with pytest.raises(ValueError, match=r"^not a BAM stream \(magic b'@HD\\t'\)$"):
        run_distribute(b"@HD\tVN:1.6\nr1\t4\t*\n", 2)
    with pytest.raises(ValueError, match=r"^not a BAM stream \(empty\)$"):
        run_distribute(b"", 2)


def test_malformed_records():
    good = Rec("r0", [("CB", "Z", "AC")]).raw
    bad_aux_end = Rec("r1", [("CB", "Z", "AC")], raw_aux=b"XZZabc").raw       # Z without NUL
    bad_b_count = Rec("r1", [], raw_aux=b"XBBI" + struct.pack("<I", 1000) + b"\0" * 8).raw
    bad_type = Rec("r1", [], raw_aux=b"XQq\x01").raw
    bad_sub = Rec("r1", [], raw_aux=b"XBBq" + struct.pack("<I", 1) + b"\0").raw
    short_aux = Rec("r1", [], raw_aux=b"XQ").raw
    small = struct.pack("<I", 20) + b"\0" * 20
    no_nul = _patched(good, 4 + 32 + 2, "<B", ord("x"))          # read name loses its NUL
    long_name = _patched(good, 4 + 8, "<B", 250)                  # l_read_name past the end
    zero_name = _patched(good, 4 + 8, "<B", 0)
    long_seq = _patched(good, 4 + 16, "<I", 1000)                 # l_seq past the end
    cases = [
        (bad_aux_end, r"^record 1 \(read 'r1'\): unterminated Z tag XZ$"),
        (bad_b_count, r"^record 1 \(read 'r1'\): aux data runs past the record end$"),
        (bad_type, r"^record 1 \(read 'r1'\): bad tag type 'q' in tag XQ$"),
        (bad_sub, r"^record 1 \(read 'r1'\): bad B array subtype 'q' in tag XB$"),
        (short_aux, r"^record 1 \(read 'r1'\): aux data runs past the record end$"),
        (small, r"^record 1: block_size 20 < 32$"),
        (no_nul, r"^record 1: l_read_name 3 inconsistent with the record$"),
        (long_name, r"^record 1: l_read_name 250 inconsistent with the record$"),
        (zero_name, r"^record 1: l_read_name 0 inconsistent with the record$"),
        (long_seq, r"^record 1 \(read 'r0'\): cigar/seq/qual run past the record end$"),
    ]
    for raw, message in cases:
        for buf in (1, 7, 1 << 16):
            with pytest.raises(ValueError, match=message):
                run_distribute(HEADER + good + raw + good, 2, by=[b"XX"], missing="drop", buffer_size=buf)


# -- collect --------------------------------------------------------------------------------

def split_among(draw, recs, k):
    owners = [draw(st.integers(0, k - 1)) for _ in recs]
    return [[r for r, o in zip(recs, owners, strict=True) if o == i] for i in range(k)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), records(), st.integers(1, 4), small_sizes, small_sizes, st.booleans())
def test_collect_any_is_multiset_union(data, recs, k, buf, out_buf, use_header_fd):
    parts = split_among(data.draw, recs, k)
    other_header = bamgen.header(text=b"@HD\tVN:1.6\n@CO\tcollected\n", refs=[("chrX", 5)])
    stats, out = run_collect([stream(p) for p in parts], header=other_header if use_header_fd else None,
                             buffer_size=buf, out_buffer_size=out_buf)
    head, got = bamgen.split_stream(out)
    assert head == (other_header if use_header_fd else HEADER)
    assert sorted(got) == sorted(r.raw for r in recs)
    for p in parts:  # each input's own order is kept
        mine = {r.raw for r in p}
        assert [raw for raw in got if raw in mine] == [r.raw for r in p] or len(mine) < len(p)
    assert stats["per_input"] == [len(p) for p in parts]
    assert stats["records"] == len(recs) and stats["header_bytes"] == len(head)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), records(), st.integers(1, 4), small_sizes)
def test_collect_coordinate_merges_sorted_inputs(data, recs, k, buf):
    parts = [sorted(p, key=lambda r: bamgen.coordinate_key(r.raw)) for p in split_among(data.draw, recs, k)]
    stats, out = run_collect([stream(p) for p in parts], order="coordinate", buffer_size=buf)
    expected = sorted(((bamgen.coordinate_key(r.raw), i, j, r.raw) for i, p in enumerate(parts)
                       for j, r in enumerate(p)))
    assert bamgen.split_stream(out)[1] == [e[-1] for e in expected]
    keys = [bamgen.coordinate_key(raw) for raw in bamgen.split_stream(out)[1]]
    assert keys == sorted(keys)
    assert stats["per_input"] == [len(p) for p in parts]


def tag_sort_key(r, tag="CB"):
    key = r.key([tag])
    return (key is not None, key or b"")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), records(), st.integers(1, 4), small_sizes, st.sampled_from(["CB", "XI", "T0"]))
def test_collect_tag_merges_sorted_inputs(data, recs, k, buf, tag):
    parts = [sorted(p, key=lambda r: tag_sort_key(r, tag)) for p in split_among(data.draw, recs, k)]
    stats, out = run_collect([stream(p) for p in parts], order="tag", tag=tag.encode(), buffer_size=buf)
    expected = sorted(((tag_sort_key(r, tag), i, j, r.raw) for i, p in enumerate(parts)
                       for j, r in enumerate(p)))
    assert bamgen.split_stream(out)[1] == [e[-1] for e in expected]
    assert stats["records"] == len(recs)


def test_collect_coordinate_rejects_unsorted_input():
    sorted_part = [Rec(f"s{i}", [], ref_id=0, pos=i, flag=0) for i in range(10)]
    unsorted = [Rec(f"u{i}", [], ref_id=0, pos=p, flag=0) for i, p in enumerate([1, 2, 5, 3])]
    with pytest.raises(ValueError, match=r"^input 1 is not coordinate-sorted at record 3 \(read 'u3'\)$"):
        run_collect([stream(sorted_part), stream(unsorted)], order="coordinate")
    # unmapped (refID -1) records come after every mapped one, so this is sorted ...
    tail = [Rec("m", [], ref_id=1, pos=0, flag=0), Rec("u", [], ref_id=-1, pos=-1)]
    stats, out = run_collect([stream(tail), stream(sorted_part)], order="coordinate", buffer_size=1)
    assert [bamgen.read_name(r) for r in bamgen.split_stream(out)[1]][-2:] == ["m", "u"]
    # ... and this is not
    with pytest.raises(ValueError, match=r"^input 0 is not coordinate-sorted at record 1 \(read 'm'\)$"):
        run_collect([stream(tail[::-1])], order="coordinate")


def test_collect_tag_rejects_unsorted_input():
    recs = [Rec("a", [("CB", "Z", "AAA")]), Rec("b", [("CB", "Z", "CCC")]), Rec("c", [("CB", "Z", "BBB")])]
    with pytest.raises(ValueError, match=r"^input 0 is not sorted by tag CB at record 2 \(read 'c'\)$"):
        run_collect([stream(recs)], order="tag", tag=b"CB")
    # records without the tag sort first
    recs = [Rec("x", []), Rec("a", [("CB", "Z", "")]), Rec("y", [])]
    with pytest.raises(ValueError, match=r"^input 0 is not sorted by tag CB at record 2 \(read 'y'\)$"):
        run_collect([stream(recs)], order="tag", tag=b"CB")


@pytest.mark.parametrize("order", ["any", "coordinate"])
def test_collect_malformed_inputs(order):
    recs = [Rec(f"r{i}", [], ref_id=0, pos=i, flag=0) for i in range(4)]
    good = stream(recs)
    with pytest.raises(ValueError, match=r"^input 1: BAM stream ends inside record 3$"):
        run_collect([good, good[:-5]], order=order, buffer_size=3)
    with pytest.raises(ValueError, match=r"^input 1: not a BAM stream \(empty\)$"):
        run_collect([good, b""], order=order)
    with pytest.raises(ValueError, match=r"^input 0: not a BAM stream \(magic b'@HD\\t'\)$"):
        run_collect([b"@HD\tVN:1.6\n", good], order=order)
    with pytest.raises(ValueError, match=r"^input 1: truncated BAM header$"):
        run_collect([good, HEADER[:-1]], order=order)
    with pytest.raises(ValueError, match=r"^input 0: record 1: block_size 8 < 32$"):
        run_collect([HEADER + recs[0].raw + struct.pack("<I", 8) + b"\0" * 8], order=order)
    with pytest.raises(ValueError, match=r"^header_fd: truncated BAM header$"):
        run_collect([good], header=HEADER[:-3], order=order)


def _writer(data, chunk):
    """A child process writing data to its stdout in chunks of ``chunk`` bytes."""
    code = ("import os, sys, time\n"
            "data = sys.stdin.buffer.read()\n"
            f"for i in range(0, len(data), {chunk}):\n"
            f"    os.write(1, data[i:i + {chunk}])\n"
            "    if i % 50000 == 0: time.sleep(0.001)\n")
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=w)
    os.close(w)
    proc.stdin.write(data)
    proc.stdin.close()
    return proc, r


@pytest.mark.timeout(30)
@pytest.mark.parametrize("order", ["any", "coordinate", "tag"])
def test_collect_over_pipes_with_big_records(order):
    """Real pipes with writers in other processes; records > 64 KB cross many reads."""
    parts = []
    for i in range(3):
        p = [Rec(f"p{i}r{j}", [("CB", "Z", f"{j:04d}"), ("XY", "B", ("i", list(range(j * 7000))))],
                 ref_id=0, pos=j * 3 + i, flag=0, seq="ACGT" * (j * 50))
             for j in range(12)]
        parts.append(p)
    procs, fds = zip(*[_writer(stream(p), c) for p, c in zip(parts, (1000, 4096, 65536), strict=True)], strict=True)
    with Files() as files:
        out_path = files.new()
        out_fd = os.open(out_path, os.O_WRONLY)
        try:
            stats = collect_bam(list(fds), out_fd, order=order, tag=b"CB", buffer_size=64)
        finally:
            os.close(out_fd)
            for fd in fds:
                os.close(fd)
            for p in procs:
                p.wait()
        got = bamgen.split_stream(read(out_path))[1]
    all_recs = [r for p in parts for r in p]
    assert sorted(got) == sorted(r.raw for r in all_recs)
    if order == "coordinate":
        assert [bamgen.read_name(r) for r in got] == [f"p{i}r{j}" for j in range(12) for i in range(3)]
    if order == "tag":
        assert [bamgen.read_name(r) for r in got] == [f"p{i}r{j}" for j in range(12) for i in range(3)]
    assert stats["per_input"] == [12, 12, 12]


@pytest.mark.timeout(30)
def test_distribute_over_pipe_then_pysam():
    """A stream arriving through a pipe in odd-sized pieces, distributed by name."""
    recs = [Rec(f"q{i // 2}", [("CB", "Z", "AC")], ref_id=0, pos=i, flag=0, seq="ACGT" * (i * 400),
                cigar=[(i * 1600, "M")] if i else ()) for i in range(30)]
    proc, r = _writer(stream(recs), 777)
    with Files() as files:
        outs = [files.new() for _ in range(3)]
        out_fds = [os.open(p, os.O_WRONLY) for p in outs]
        try:
            stats = distribute_bam(r, out_fds, by="name", buffer_size=5)
        finally:
            for fd in out_fds + [r]:
                os.close(fd)
            proc.wait()
        assert stats["records"] == 30
        names = []
        for k, path in enumerate(outs):
            with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
                got = [aln.query_name for aln in bam]
            assert all(bamgen.fnv1a64(n.encode()) % 3 == k for n in got)
            names += got
        assert sorted(names) == sorted(r.name for r in recs)


def test_collect_coordinate_many_inputs():
    """Enough inputs for a deep heap; equal keys keep the input order."""
    k = 70
    parts = [[Rec(f"i{i}j{j}", [], ref_id=(j * 7 + i) % 3 - 1, pos=0, flag=0) for j in range(6)]
             for i in range(k)]
    parts = [sorted(p, key=lambda r: bamgen.coordinate_key(r.raw)) for p in parts]
    stats, out = run_collect([stream(p) for p in parts], order="coordinate", buffer_size=5)
    expected = sorted((bamgen.coordinate_key(r.raw), i, j, r.raw) for i, p in enumerate(parts)
                      for j, r in enumerate(p))
    assert bamgen.split_stream(out)[1] == [e[-1] for e in expected]
    assert stats["per_input"] == [6] * k


def test_bad_arguments():
    data = stream([Rec("r", [])])
    for kwargs, message in [
        ({"by": [b"CBX"]}, r"^tags must be 2-byte names"),
        ({"by": b"CB"}, r"^by must be None, 'name' or a list of tags"),
        ({"by": []}, r"^by needs at least one tag$"),
        ({"missing": "skip"}, r"^missing must be 'error', 'drop' or 'unassigned'"),
        ({"chunk_size": 0}, r"^chunk_size, buffer_size and out_buffer_size must be >= 1$"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_distribute(data, 2, **kwargs)
    with pytest.raises(ValueError, match=r"^order='tag' needs tag"):
        run_collect([data], order="tag")
    with pytest.raises(ValueError, match=r"^order must be 'any', 'input', 'coordinate' or 'tag'"):
        run_collect([data], order="name")
