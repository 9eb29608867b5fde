"""Property tests of the BAM stream kernels (bamflow.kernels.bam: Distributor,
Collector, RecordChunks) on real file descriptors.

Streams are built by tests/bamgen.py with struct.pack (independently of the
kernels); buffer sizes go down to one byte so that every record boundary
falls across a refill, and some records are over 64 KB. The checks of the
shared record layer (malformed records, headers, BGZF) run through every
kernel in test_kernels_records.py.
"""

import os
import re
import struct

import bamgen
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.bam.options import CollectOptions, DistributeOptions
from bamflow.kernels.bam import FRAME, Collector, Distributor, RecordChunks, collect_bam, distribute_bam

HEADER = bamgen.header()
small_sizes = st.sampled_from([1, 2, 3, 5, 7, 64, 1 << 16])
INT_RANGES = {"c": (-128, 127), "C": (0, 255), "s": (-32768, 32767), "S": (0, 65535),
              "i": (-(2**31), 2**31 - 1), "I": (0, 2**32 - 1)}
BARCODES = ["AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCGC-1", "TTTGTCATCTTTCCTC-1", "A", ""]
ZCHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FLOATS = st.floats(width=32, allow_nan=False, allow_infinity=False)
INTS = {t: st.integers(*r) for t, r in INT_RANGES.items()}
SCALARS = {
    "A": st.sampled_from("ACGTxyz!~"),
    "f": FLOATS,
    "Z": st.text(ZCHARS, max_size=12),
    "H": st.binary(max_size=6).map(lambda b: b.hex().upper()),
    **INTS,
}
TYPES = sorted([*SCALARS, "B"])
SUBTYPES = list("cCsSiIf")
ELEMENTS = {**INTS, "f": FLOATS}


def draw_value(draw, typ):
    """A value of type typ: every type, B arrays of every subtype included."""
    if typ == "B":
        sub = draw(st.sampled_from(SUBTYPES))
        return (sub, draw(st.lists(ELEMENTS[sub], max_size=6)))
    return draw(SCALARS[typ])


def int_widths(v):
    """The integer types that can hold v."""
    return [t for t, (lo, hi) in INT_RANGES.items() if lo <= v <= hi]


class KeyError_(Exception):
    """A key tag holds a float or an array: the kernel must raise."""


class Rec:
    """A generated record: its bytes and what went into it."""

    def __init__(self, name, tags, **kw):
        self.name = name
        self.tags = {}
        for t, typ, v in tags:
            self.tags.setdefault(t, (typ, v))  # the first of repeated tags counts
        self.raw = bamgen.record(name, tags=tags, **kw)

    def key(self, names):
        """Canonical bytes of the given tags joined by NUL; None if one is
        missing (absent or an empty string), checked in order; raises KeyError_
        for a float or array met before a missing tag."""
        parts = []
        for n in names:
            if n not in self.tags:
                return None
            typ, value = self.tags[n]
            if typ in "fB":
                raise KeyError_(n)
            part = bamgen.canonical(typ, value)
            if typ in "ZH" and not part:
                return None
            parts.append(part)
        return b"\x00".join(parts)


@st.composite
def records(draw, max_size=25, names=None, big=True):
    out = []
    for i in range(draw(st.integers(0, max_size))):
        tag_names = draw(st.lists(st.sampled_from(["T0", "T1", "T2", "T3", "T4", "ZZ"]), max_size=5, unique=True))
        fields = [(t, typ, draw_value(draw, typ)) for t in tag_names for typ in [draw(st.sampled_from(TYPES))]]
        if draw(st.booleans()):
            fields.append(("CB", "Z", draw(st.sampled_from(BARCODES))))
        if draw(st.booleans()):
            v = draw(st.integers(-5, 300))
            fields.append(("XI", draw(st.sampled_from(int_widths(v))), v))
        size = draw(st.sampled_from([None] * 12 + (["seq", "array"] if big else [])))
        if size == "array":
            fields.append(("XY", "B", ("I", BIG_ARRAY)))
        seq = BIG_SEQ if size == "seq" else draw(st.text("ACGTN", max_size=12))
        fields = draw(st.permutations(fields))
        name = draw(st.sampled_from(names)) if names else f"r{i}"
        ref_id = draw(st.sampled_from([-1, 0, 1]))
        pos = -1 if ref_id < 0 else draw(st.integers(0, 40))
        out.append(Rec(name, fields, ref_id=ref_id, pos=pos, flag=4 if ref_id < 0 else 0,
                       seq=seq, cigar=[(len(seq), "M")] if seq and ref_id >= 0 else ()))
    return out


BIG_SEQ = "ACGT" * 17500      # records over 64 KB
BIG_ARRAY = list(range(17000))


def stream(recs, head=HEADER):
    return head + b"".join(r.raw for r in recs)


def run_distribute(data, n, options, keep=None, **kwargs):
    """Distribute data into n files; returns (stats, outputs, header, unassigned)
    (paths instead of bytes with ``keep``, a bamgen.Fds that outlives the call)."""
    fds = keep or bamgen.Fds()
    try:
        in_fd = fds.reader(data)
        outs = [fds.writer() for _ in range(n)]
        header_fd, header_path = fds.writer()
        un_fd, un_path = fds.writer()
        fds.forget(header_fd)  # the kernel owns it: it closes it after the header
        stats = Distributor(in_fd, [fd for fd, _ in outs], options, header_fd=header_fd, unassigned_fd=un_fd,
                            **kwargs).run()
        with pytest.raises(OSError):
            os.close(header_fd)  # closed by the kernel
        if keep:
            return stats, [p for _, p in outs], fds.read(header_path), un_path
        return stats, [fds.read(p) for _, p in outs], fds.read(header_path), fds.read(un_path)
    finally:
        if keep is None:
            fds.__exit__(None, None, None)


def run_collect(datas, order="any", header=None, **kwargs):
    """Collect the streams in datas; returns (stats, output bytes)."""
    with bamgen.Fds() as fds:
        ins = [fds.reader(d) for d in datas]
        out, path = fds.writer()
        header_fd = fds.reader(header) if header is not None else -1
        stats = Collector(ins, out, CollectOptions(order), header_fd=header_fd, **kwargs).run()
        return stats, fds.read(path)


def got_records(data):
    return bamgen.split_stream(data)[1]


# -- distribute: round-robin ---------------------------------------------------------------

@settings(slow, max_examples=25)
@given(records(), st.integers(1, 4), st.integers(1, 4), small_sizes, small_sizes)
def test_round_robin_reproduces_chunks(recs, n, chunk, buf, out_buf):
    stats, outs, head, unassigned = run_distribute(stream(recs), n, DistributeOptions(chunk_size=chunk),
                                                   buffer_size=buf, out_buffer_size=out_buf)
    chunks = [recs[i:i + chunk] for i in range(0, len(recs), chunk)]
    expected = [HEADER + b"".join(r.raw for j, c in enumerate(chunks) if j % n == k for r in c) for k in range(n)]
    assert outs == expected
    assert head == HEADER and unassigned == b""  # no tags: no unassigned output
    assert stats["records"] == len(recs)
    assert stats["per_output"] == [len(got_records(o)) for o in outs]
    assert stats["header_bytes"] == len(HEADER)
    assert stats["bytes"] == len(stream(recs))
    assert stats["dropped_missing_tag"] == stats["unassigned"] == 0
    assert stats["tags_seen"] == sorted({t for r in recs for t in r.tags})
    assert "values" not in stats


@settings(slow, max_examples=25)
@given(records(), st.integers(1, 4), st.integers(1, 4), small_sizes, small_sizes)
def test_round_robin_frames_after_every_full_chunk(recs, n, chunk, buf, out_buf):
    stats, outs, _, _ = run_distribute(stream(recs), n, DistributeOptions(chunk_size=chunk, frame_chunks=True),
                                       buffer_size=buf, out_buffer_size=out_buf)
    chunks = [recs[i:i + chunk] for i in range(0, len(recs), chunk)]
    expected = [HEADER + b"".join(b"".join(r.raw for r in c) + (FRAME if len(c) == chunk else b"")
                                  for j, c in enumerate(chunks) if j % n == k) for k in range(n)]
    assert outs == expected
    assert stats["per_output"] == [sum(len(c) for j, c in enumerate(chunks) if j % n == k) for k in range(n)]


def test_frame_is_four_zero_bytes():
    assert FRAME == b"\0\0\0\0"


def test_no_header_broadcast():
    recs = [Rec(f"r{i}", []) for i in range(5)]
    stats, outs, head, unassigned = run_distribute(stream(recs), 2, DistributeOptions(chunk_size=2,
                                                                                      header_broadcast=False))
    assert head == HEADER and unassigned == b""
    assert outs == [recs[0].raw + recs[1].raw + recs[4].raw, recs[2].raw + recs[3].raw]
    assert stats["header_bytes"] == len(HEADER)


def test_header_only_stream():
    stats, outs, head, _ = run_distribute(HEADER, 3, DistributeOptions())
    assert outs == [HEADER] * 3 and head == HEADER and stats["records"] == 0 and stats["per_output"] == [0, 0, 0]


def test_header_fd_is_optional_and_closed_by_the_kernel():
    recs = [Rec(f"r{i}", []) for i in range(3)]
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = distribute_bam(fds.reader(stream(recs)), [out], DistributeOptions())
        assert fds.read(path) == stream(recs) and stats["records"] == 3


# -- distribute: by tag, by name -----------------------------------------------------------

KEY_SETS = [["CB"], ["XI"], ["CB", "XI"], ["XI", "CB"], ["T0"], ["T1", "T2"]]


@settings(slow, max_examples=25)
@given(records(), st.integers(1, 5), small_sizes, small_sizes, st.sampled_from(KEY_SETS),
       st.sampled_from(["drop", "unassigned"]), st.booleans())
def test_by_tag_matches_reference_hash(recs, n, buf, out_buf, tags, missing, count):
    """Shards by fnv1a64(canonical key) % n; keys are checked in stream order, so a
    float or array key raises naming the first such record."""
    options = DistributeOptions(by=tuple(tags), missing=missing, count_values=count)
    expected = [[] for _ in range(n)]
    missed = []
    values = {}
    for i, r in enumerate(recs):
        try:
            key = r.key(tags)
        except KeyError_ as e:
            message = rf"^record {i} \(read '{r.name}'\): tag {e.args[0]} holds (a float|an array) \(type [fB]\)"
            with pytest.raises(ValueError, match=message):
                run_distribute(stream(recs), n, options, buffer_size=buf, out_buffer_size=out_buf)
            return
        if key is None:
            missed.append(r.raw)
        else:
            expected[bamgen.fnv1a64(key) % n].append(r.raw)
            values[key] = values.get(key, 0) + 1
    stats, outs, _, unassigned = run_distribute(stream(recs), n, options, buffer_size=buf, out_buffer_size=out_buf)
    assert [got_records(o) for o in outs] == expected
    assert stats["per_output"] == [len(e) for e in expected]
    assert stats["records"] == len(recs)
    if missing == "drop":
        assert stats["dropped_missing_tag"] == len(missed) and stats["unassigned"] == 0
        assert unassigned == b""  # no unassigned output with "drop": its file is never written
    else:
        assert stats["unassigned"] == len(missed) and stats["dropped_missing_tag"] == 0
        assert unassigned == HEADER + b"".join(missed)
    if count:
        assert stats["values"] == values and list(stats["values"]) == list(values)  # first-seen order
    else:
        assert "values" not in stats


def test_integer_tag_widths_hash_alike():
    recs = [Rec(f"r{i}", [("CB", t, v)]) for i, (t, v) in enumerate(
        [(t, 5) for t in "cCsSiI"] + [(t, -7) for t in "csi"] + [(t, 4000000000) for t in "I"])]
    recs.append(Rec("z", [("CB", "Z", "5")]))  # the string "5" hashes like the integer 5
    recs.append(Rec("h", [("CB", "H", "5")]))
    n = 7
    _, outs, _, _ = run_distribute(stream(recs), n, DistributeOptions(by="CB"), buffer_size=3)
    got = {bamgen.read_name(raw): k for k, o in enumerate(outs) for raw in got_records(o)}
    five = bamgen.fnv1a64(b"5") % n
    assert all(got[f"r{i}"] == five for i in range(6)) and got["z"] == got["h"] == five
    assert all(got[f"r{i}"] == bamgen.fnv1a64(b"-7") % n for i in range(6, 9))
    assert got["r9"] == bamgen.fnv1a64(b"4000000000") % n


SAMPLES = [("A", "x"), ("c", -3), ("C", 200), ("s", -300), ("S", 60000), ("i", -70000), ("I", 3000000000),
           ("Z", "ACGT-1"), ("H", "1AE301"), ("c", -128), ("i", -(2**31)), ("I", 2**32 - 1)]


@pytest.mark.parametrize("typ, value", SAMPLES)
def test_every_key_type_canonical_bytes(typ, value):
    """One record per type, hashed alone: checks the canonical bytes of each type."""
    rec = Rec("q", [("T0", "i", 1), ("XX", typ, value), ("T1", "Z", "after"), ("XB", "B", ("f", [1.0]))])
    for n in (3, 5, 11):
        stats, outs, _, _ = run_distribute(stream([rec]), n, DistributeOptions(by="XX", count_values=True),
                                           buffer_size=2)
        k = bamgen.fnv1a64(bamgen.canonical(typ, value)) % n
        assert [len(got_records(o)) for o in outs] == [int(i == k) for i in range(n)], typ
        assert stats["values"] == {bamgen.canonical(typ, value): 1}


@pytest.mark.parametrize("sub", list("cCsSiIf"))
def test_array_keys_raise_for_every_subtype(sub):
    value = (sub, [1, 2]) if sub != "f" else (sub, [0.5])
    recs = [Rec("ok", [("XX", "Z", "v")]), Rec("arr", [("XX", "B", value)])]
    with pytest.raises(ValueError, match=r"^in: record 1 \(read 'arr'\): tag XX holds an array \(type B\)"):
        run_distribute(stream(recs), 2, DistributeOptions(by="XX", missing="drop"), source="in: ")


@settings(slow, max_examples=25)
@given(records(names=["m1", "m2", "m3", "pair/x", "a" * 200, "bamflow:chunk-end"]), st.integers(1, 5), small_sizes)
def test_by_name_mates_meet(recs, n, buf):
    stats, outs, _, _ = run_distribute(stream(recs), n, DistributeOptions(by="name"), buffer_size=buf)
    for k, o in enumerate(outs):
        for raw in got_records(o):
            assert bamgen.fnv1a64(bamgen.read_name(raw).encode()) % n == k
    # each output keeps the input order of its records
    for k, o in enumerate(outs):
        assert got_records(o) == [r.raw for r in recs if bamgen.fnv1a64(r.name.encode()) % n == k]
    assert sorted(raw for o in outs for raw in got_records(o)) == sorted(r.raw for r in recs)
    assert stats["records"] == len(recs) and sum(stats["per_output"]) == len(recs)


def test_missing_tag_error_names_record_read_and_tag():
    recs = [Rec(f"r{i}", [("CB", "Z", "AAA")]) for i in range(17)] + [Rec("r17", [("UB", "Z", "x")])]
    with pytest.raises(ValueError, match=r"^in\.bam: record 17 \(read 'r17'\) has no CB tag \(or an empty one\)$"):
        run_distribute(stream(recs), 2, DistributeOptions(by="CB"), source="in.bam: ")
    with pytest.raises(ValueError, match=r"^record 0 \(read 'r0'\) has no UB tag"):
        run_distribute(stream(recs), 2, DistributeOptions(by=("CB", "UB")))
    recs = [Rec(f"r{i}", [("UB", "Z", "x")] + [("CB", "i", i)] * (i != 17)) for i in range(20)]
    with pytest.raises(ValueError, match=r"^record 17 \(read 'r17'\) has no CB tag"):
        run_distribute(stream(recs), 2, DistributeOptions(by=("UB", "CB"), missing="error"), buffer_size=1)
    recs = [Rec("r0", [("CB", "Z", "A")]), Rec("empty", [("CB", "Z", "")])]
    with pytest.raises(ValueError, match=r"^record 1 \(read 'empty'\) has no CB tag \(or an empty one\)$"):
        run_distribute(stream(recs), 2, DistributeOptions(by="CB"))


def test_missing_unassigned_and_drop_counts():
    recs = [Rec(f"r{i}", [("CB", "Z", "AAA")] if i % 3 else ([("CB", "Z", "")] if i % 2 else []))
            for i in range(30)]
    stats, outs, _, unassigned = run_distribute(stream(recs), 3, DistributeOptions(by="CB", missing="unassigned"))
    assert stats["unassigned"] == 10 and stats["dropped_missing_tag"] == 0
    assert [bamgen.read_name(r) for r in got_records(unassigned)] == [f"r{i}" for i in range(0, 30, 3)]
    assert sum(stats["per_output"]) == 20 and stats["records"] == 30
    stats, outs, _, unassigned = run_distribute(stream(recs), 3, DistributeOptions(by="CB", missing="drop"))
    assert stats["dropped_missing_tag"] == 10 and unassigned == b""
    assert sum(len(got_records(o)) for o in outs) == 20
    # without header broadcast the unassigned output holds records only
    stats, outs, _, unassigned = run_distribute(stream(recs), 3, DistributeOptions(
        by="CB", missing="unassigned", header_broadcast=False))
    assert bamgen.split_records(unassigned) == [r.raw for r in recs[::3]]


def test_outputs_are_bam_that_pysam_reads():
    recs = [Rec(f"read{i}", [("CB", "Z", BARCODES[i % 3]), ("XI", "C", i % 200), ("XF", "f", 0.25),
                             ("XA", "A", "q"), ("XB", "B", ("s", [-1, i])), ("XS", "s", -i)],
                ref_id=i % 2, pos=i, flag=0, seq="ACGTN"[: i % 5 + 1], cigar=[(i % 5 + 1, "M")])
            for i in range(40)]
    recs.append(Rec("big", [("CB", "Z", BARCODES[0]), ("XY", "B", ("I", list(range(20000))))],
                    seq="ACGT" * 9000))
    with bamgen.Fds() as fds:
        stats, paths, _, _ = run_distribute(stream(recs), 3, DistributeOptions(by="CB"), keep=fds, buffer_size=7)
        seen = []
        for k, path in enumerate(paths):
            with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
                assert list(bam.references) == ["chr1", "chr2"]
                for aln in bam:
                    seen.append(aln.query_name)
                    rec = next(r for r in recs if r.name == aln.query_name)
                    assert bamgen.fnv1a64(aln.get_tag("CB").encode()) % 3 == k
                    if aln.query_name == "big":
                        assert list(aln.get_tag("XY")) == list(range(20000))
                        assert aln.query_sequence == "ACGT" * 9000
                    else:
                        assert aln.get_tag("XI") == rec.tags["XI"][1]
                        assert list(aln.get_tag("XB")) == rec.tags["XB"][1][1]
                        assert aln.get_tag("XA") == "q" and aln.get_tag("XF") == 0.25
                        assert aln.reference_start == rec.tags["XI"][1] % 200 == int(aln.query_name[4:])
        assert sorted(seen) == sorted(r.name for r in recs)


def test_distribute_reads_bgzf_input():
    recs = [Rec(f"r{i}", [("CB", "Z", BARCODES[i % 4])], seq="ACGT" * (i * 40)) for i in range(60)]
    data = stream(recs)
    wrapped = bamgen.bgzf(data, block=1500)
    stats, outs, head, _ = run_distribute(wrapped, 3, DistributeOptions(by="CB"), buffer_size=5)
    plain = run_distribute(data, 3, DistributeOptions(by="CB"))[1]
    assert outs == plain and head == HEADER
    assert stats["bytes"] == len(wrapped) and stats["records"] == 60


def test_distribute_arguments():
    data = stream([Rec("r", [])])
    with bamgen.Fds() as fds:
        with pytest.raises(ValueError, match=r"^distribute needs at least one output$"):
            Distributor(fds.reader(data), [], DistributeOptions())
        out, _ = fds.writer()
        with pytest.raises(ValueError, match=r"^missing='unassigned' needs an unassigned output$"):
            Distributor(fds.reader(data), [out], DistributeOptions(by="CB", missing="unassigned"))
    for kwargs, message in [
        ({"by": "CBX"}, r"a BAM tag name is a letter and a letter or digit"),
        ({"by": ("CB", "1X")}, r"a BAM tag name is a letter and a letter or digit"),
        ({"missing": "skip"}, r"^missing must be one of error, drop, unassigned"),
        ({"chunk_size": 0}, r"^chunk_size must be >= 1"),
        ({"frame_chunks": True, "by": "name"}, r"^frame_chunks needs round-robin"),
        ({"count_values": True}, r"^count_values needs distribution by tags"),
    ]:
        with pytest.raises(ValueError, match=message):
            DistributeOptions(**kwargs)
    assert DistributeOptions(by="CB,UB").by == ("CB", "UB")


# -- collect -----------------------------------------------------------------------------------

def split_among(draw, recs, k):
    owners = [draw(st.integers(0, k - 1)) for _ in recs]
    return [[r for r, o in zip(recs, owners, strict=True) if o == i] for i in range(k)]


@settings(slow, max_examples=25)
@given(st.data(), records(), st.integers(1, 4), small_sizes, small_sizes, st.booleans())
def test_collect_any_is_multiset_union(data, recs, k, buf, out_buf, use_header_fd):
    parts = split_among(data.draw, recs, k)
    other_header = bamgen.header(text=b"@HD\tVN:1.6\n@CO\tcollected\n", refs=[("chrX", 5), ("chrY", 9)])
    stats, out = run_collect([stream(p) for p in parts], header=other_header if use_header_fd else None,
                             buffer_size=buf, out_buffer_size=out_buf)
    head, got = bamgen.split_stream(out)
    assert head == (other_header if use_header_fd else HEADER)
    assert sorted(got) == sorted(r.raw for r in recs)
    for p in parts:  # each input's own order is kept
        mine = [r.raw for r in p]
        theirs = set(mine)
        assert [raw for raw in got if raw in theirs] == mine or len(theirs) < len(mine)
    assert stats["per_input"] == [len(p) for p in parts]
    assert stats["records"] == len(recs) and stats["header_bytes"] == len(head)


@settings(slow, max_examples=25)
@given(st.data(), records(), st.integers(1, 4), small_sizes)
def test_collect_coordinate_merges_sorted_inputs(data, recs, k, buf):
    parts = [sorted(p, key=lambda r: bamgen.coordinate_key(r.raw)) for p in split_among(data.draw, recs, k)]
    stats, out = run_collect([stream(p) for p in parts], "coordinate", buffer_size=buf, out_buffer_size=buf)
    expected = sorted(((bamgen.coordinate_key(r.raw), i, j, r.raw) for i, p in enumerate(parts)
                       for j, r in enumerate(p)))
    assert got_records(out) == [e[-1] for e in expected]
    assert stats["per_input"] == [len(p) for p in parts] and stats["records"] == len(recs)


def tag_sort_key(r, tag):
    key = r.key([tag])
    return (key is not None, key or b"")


@settings(slow, max_examples=25)
@given(st.data(), records(), st.integers(1, 4), small_sizes, st.sampled_from(["CB", "XI", "T0"]))
def test_collect_tag_merges_sorted_inputs(data, recs, k, buf, tag):
    """Merge by the canonical bytes of the tag, bytewise; without the tag (or
    empty) first; ties by input. A float or array value raises."""
    try:
        parts = [sorted(p, key=lambda r: tag_sort_key(r, tag)) for p in split_among(data.draw, recs, k)]
    except KeyError_:
        bad = [r for r in recs if r.tags.get(tag, ("Z",))[0] in "fB"]
        with pytest.raises(ValueError, match=rf"^input \d+: record \d+ \(read 'r\d+'\): tag {tag} holds"):
            run_collect([stream(bad)], f"tag:{tag}", buffer_size=buf)
        return
    stats, out = run_collect([stream(p) for p in parts], f"tag:{tag}", buffer_size=buf)
    expected = sorted(((tag_sort_key(r, tag), i, j, r.raw) for i, p in enumerate(parts) for j, r in enumerate(p)))
    assert got_records(out) == [e[-1] for e in expected]
    assert stats["records"] == len(recs)


def test_collect_tag_compares_canonical_bytes():
    """Integers compare as their decimal text ("10" < "9"), across stored types."""
    a = [Rec("a1", [("CB", "C", 10)]), Rec("a2", [("CB", "Z", "5")]), Rec("a3", [("CB", "i", 9)])]
    b = [Rec("b0", []), Rec("b1", [("CB", "Z", "10")]), Rec("b2", [("CB", "s", -1)]), Rec("b3", [("CB", "A", "9")])]
    a.sort(key=lambda r: tag_sort_key(r, "CB"))
    b.sort(key=lambda r: tag_sort_key(r, "CB"))
    _, out = run_collect([stream(a), stream(b)], "tag:CB", buffer_size=2)
    assert [bamgen.read_name(r) for r in got_records(out)] == ["b0", "b2", "a1", "b1", "a2", "a3", "b3"]


def test_collect_coordinate_rejects_unsorted_input():
    sorted_part = [Rec(f"s{i}", [], ref_id=0, pos=i, flag=0) for i in range(10)]
    unsorted = [Rec(f"u{i}", [], ref_id=0, pos=p, flag=0) for i, p in enumerate([1, 2, 5, 3])]
    with pytest.raises(ValueError, match=r"^input 1: record 3 \(read 'u3'\): the input is not coordinate-sorted$"):
        run_collect([stream(sorted_part), stream(unsorted)], "coordinate")
    # unmapped (refID -1) records come after every mapped one, so this is sorted ...
    tail = [Rec("m", [], ref_id=1, pos=0, flag=0), Rec("u", [], ref_id=-1, pos=-1)]
    stats, out = run_collect([stream(tail), stream(sorted_part)], "coordinate", buffer_size=1)
    assert [bamgen.read_name(r) for r in got_records(out)][-2:] == ["m", "u"]
    # ... and this is not
    with pytest.raises(ValueError, match=r"^input 0: record 1 \(read 'm'\): the input is not coordinate-sorted$"):
        run_collect([stream(tail[::-1])], "coordinate")
    # reference order is by refID, not name; equal positions are fine
    ok = [Rec("a", [], ref_id=0, pos=7, flag=0), Rec("b", [], ref_id=0, pos=7, flag=0),
          Rec("c", [], ref_id=1, pos=0, flag=0)]
    assert run_collect([stream(ok)], "coordinate")[0]["records"] == 3
    with pytest.raises(ValueError, match=r"record 1 \(read 'b'\): the input is not coordinate-sorted"):
        run_collect([stream(ok[::-1][:2])], "coordinate")


def test_collect_tag_rejects_unsorted_input():
    recs = [Rec("a", [("CB", "Z", "AAA")]), Rec("b", [("CB", "Z", "CCC")]), Rec("c", [("CB", "Z", "BBB")])]
    with pytest.raises(ValueError, match=r"^input 0: record 2 \(read 'c'\): the input is not sorted by tag CB$"):
        run_collect([stream(recs)], "tag:CB")
    # records without the tag (or with an empty one) sort first
    recs = [Rec("x", []), Rec("a", [("CB", "Z", "")]), Rec("b", [("CB", "Z", "A")]), Rec("y", [])]
    with pytest.raises(ValueError, match=r"^input 0: record 3 \(read 'y'\): the input is not sorted by tag CB$"):
        run_collect([stream(recs)], "tag:CB")
    assert run_collect([stream(recs[:3])], "tag:CB")[0]["records"] == 3


@pytest.mark.parametrize("order", ["any", "input", "coordinate", "tag:CB"])
def test_collect_malformed_inputs_named(order):
    recs = [Rec(f"r{i}", [], ref_id=0, pos=i, flag=0) for i in range(4)]
    good = stream(recs)
    for buf in (3, 1 << 16):
        with pytest.raises(ValueError, match=r"^input 1: BAM stream ends inside record 3$"):
            run_collect([good, good[:-5]], order, buffer_size=buf)
        with pytest.raises(ValueError, match=r"^input 2: not a BAM stream \(empty\)$"):
            run_collect([good, good, b""], order, buffer_size=buf)
        with pytest.raises(ValueError, match=r"^input 0: not a BAM stream \(magic b'@H"):
            run_collect([b"@HD\tVN:1.6\n", good], order, buffer_size=buf)
        with pytest.raises(ValueError, match=r"^input 1: truncated BAM header$"):
            run_collect([good, HEADER[:-1]], order, buffer_size=buf)
        with pytest.raises(ValueError, match=r"^input 1: record 1: block_size 8 < 32$"):
            run_collect([good, HEADER + recs[0].raw + struct.pack("<I", 8) + b"\0" * 8], order, buffer_size=buf)
        with pytest.raises(ValueError, match=r"^header: truncated BAM header$"):
            run_collect([good], order, header=HEADER[:-3], buffer_size=buf)
        with pytest.raises(ValueError, match=r"^header: 2 bytes after the BAM header$"):
            run_collect([good], order, header=HEADER + b"xx", buffer_size=buf)


@pytest.mark.parametrize("order", ["any", "coordinate", "tag:CB"])
def test_collect_frames_are_errors_outside_input_order(order):
    recs = [Rec(f"r{i}", [("CB", "Z", "A")], ref_id=0, pos=i, flag=0) for i in range(4)]
    data = HEADER + recs[0].raw + recs[1].raw + FRAME + recs[2].raw
    with pytest.raises(ValueError, match=r"^input 1: record 2: block_size 0 < 32$"):
        run_collect([stream(recs), data], order)


def test_collect_header_fd_only():
    other = bamgen.header(text=b"@CO\tonly\n", refs=[])
    stats, out = run_collect([], "any", header=other)
    assert out == other and stats == {"records": 0, "per_input": [], "header_bytes": len(other)}
    # the output's header comes from header_fd whatever the inputs' headers
    recs = [Rec("r", [])]
    stats, out = run_collect([stream(recs, bamgen.header(text=b"@CO\tinput\n"))], "input", header=other)
    assert out == other + recs[0].raw


def test_collect_arguments():
    with pytest.raises(ValueError, match=r"^collect needs an input or a header_fd$"):
        Collector([], 1, CollectOptions("any"))

    class Odd:
        order = "name"

    with pytest.raises(ValueError, match=r"^order must be any, input, coordinate or tag:XX, not 'name'$"):
        Collector([0], 1, Odd())
    for order in ("name", "tag:C", "tag:CBX", "tag:CB,UB"):
        with pytest.raises(ValueError):
            CollectOptions(order)


@pytest.mark.parametrize("order", ["any", "input", "coordinate", "tag:CB"])
def test_collect_bgzf_and_raw_inputs_mixed(order, tmp_path):
    """Workers written by pysam ("wbu": BGZF level 0) next to raw streams."""
    hdr = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6"}, "SQ": [{"SN": "chr1", "LN": 100000},
                                                                       {"SN": "chr2", "LN": 50000}]})
    parts = [[Rec(f"i{i}j{j}", [("CB", "Z", f"{j:03d}")], ref_id=0, pos=j * 3 + i, flag=0, seq="ACGT" * (j * 30),
                  cigar=[(j * 120, "M")] if j else ()) for j in range(40)] for i in range(3)]
    datas = []
    for i, p in enumerate(parts):
        if i == 1:  # written by pysam
            path = str(tmp_path / "w.bam")
            with pysam.AlignmentFile(path, "wbu", header=hdr) as out:
                for r in p:
                    out.write(pysam.AlignedSegment.fromstring(_sam_line(r), hdr))
            with open(path, "rb") as f:
                datas.append(f.read())
            assert datas[-1][:2] == b"\x1f\x8b"
        elif i == 2:
            datas.append(bamgen.bgzf(stream(p), block=999))
        else:
            datas.append(stream(p))
    for buf in (1, 1 << 16):
        stats, out = run_collect(datas, order, buffer_size=buf)
        names = [bamgen.read_name(r) for r in got_records(out)]
        if order in ("coordinate", "tag:CB"):
            assert names == [f"i{i}j{j}" for j in range(40) for i in range(3)]
        elif order == "input":
            assert names == [r.name for p in parts for r in p]
        else:
            assert sorted(names) == sorted(r.name for p in parts for r in p)
        assert stats["per_input"] == [40, 40, 40]
        # the records pysam wrote are the same records
        assert sorted(r for r in got_records(out) if b"i1j" in r) == sorted(
            bamgen.split_stream(run_collect([datas[1]], "any")[1])[1])


def _sam_line(r):
    f = bamgen.parse_record(r.raw)
    cigar = "".join(f"{n}{op}" for n, op in f["cigar"]) or "*"
    tags = "\t".join(f"{t}:{typ}:{v}" for t, typ, v in f["tags"])
    return "\t".join([f["name"], str(f["flag"]), "chr1" if f["ref_id"] == 0 else "*", str(f["pos"] + 1),
                      str(f["mapq"]), cigar, "*", "0", "0", f["seq"] or "*", "*", tags])


# -- collect: input order from frames ------------------------------------------------------------

@st.composite
def worker_edits(draw, n_records):
    """Per record what a worker does: drop it, keep it, or keep it and add 1-2 reads."""
    return [draw(st.sampled_from(["drop", "keep", "keep", "add1", "add2"])) for _ in range(n_records)]


def worker(stream_bytes, edits_by_name, big=False):
    """What a worker that passes frames on writes for a distributed stream."""
    head, items = bamgen.split_stream(stream_bytes)  # a frame comes out as b"\0\0\0\0"
    out = [head]
    for raw in items:
        if raw == FRAME:
            out.append(FRAME)
            continue
        edit = edits_by_name[bamgen.read_name(raw)]
        if edit != "drop":
            out.append(raw)
        for extra in range(int(edit[-1]) if edit.startswith("add") else 0):
            name = f"{bamgen.read_name(raw)}+{extra}"
            out.append(bamgen.record(name, seq="ACGT" * (9000 if big and extra else 2)))
    return b"".join(out)


def expected_after_workers(recs, edits_by_name):
    names = []
    for r in recs:
        edit = edits_by_name[r.name]
        if edit != "drop":
            names.append(r.name)
        names += [f"{r.name}+{extra}" for extra in range(int(edit[-1]) if edit.startswith("add") else 0)]
    return names


@settings(slow, max_examples=25)
@given(st.data(), st.integers(0, 40), st.integers(1, 4), st.integers(1, 5), small_sizes, small_sizes, st.booleans())
def test_collect_input_order_restored_whatever_workers_drop_or_add(data, n_recs, n, chunk, buf, out_buf, wrap):
    recs = [Rec(f"r{i}", [("CB", "Z", "A")], seq="ACGT" * data.draw(st.sampled_from([1, 2, 17000]))) for i in
            range(n_recs)]
    edits = dict(zip([r.name for r in recs], data.draw(worker_edits(n_recs)), strict=True))
    _, outs, _, _ = run_distribute(stream(recs), n, DistributeOptions(chunk_size=chunk, frame_chunks=True))
    workers = [worker(o, edits, big=True) for o in outs]
    if wrap:
        workers = [bamgen.bgzf(w, block=4000) for w in workers]
    stats, out = run_collect(workers, "input", buffer_size=buf, out_buffer_size=out_buf)
    assert [bamgen.read_name(r) for r in got_records(out)] == expected_after_workers(recs, edits)
    assert stats["records"] == len(expected_after_workers(recs, edits))
    assert bamgen.split_stream(out)[0] == HEADER


def test_collect_input_order_with_empty_chunks_and_uneven_ends():
    """Chunks a worker emptied are bare frames; an input may end early."""
    a = HEADER + FRAME + bamgen.record("a1") + FRAME + FRAME
    b = HEADER + bamgen.record("b0") + bamgen.record("b0x") + FRAME + FRAME
    c = HEADER + bamgen.record("c0") + FRAME
    stats, out = run_collect([a, b, c], "input", buffer_size=1)
    # turn 0: a (nothing), b0 b0x, c0; turn 1: a1, b (nothing), c ends; turn 2: a (nothing) ...
    assert [bamgen.read_name(r) for r in got_records(out)] == ["b0", "b0x", "c0", "a1"]
    assert stats["per_input"] == [1, 2, 1]


@pytest.mark.timeout(60)
def test_collect_input_order_over_pipes():
    """Workers at different speeds, over real pipes fed by other processes."""
    recs = [Rec(f"r{i}", [("CB", "Z", "A")], seq="ACGT" * (17000 if i % 13 == 0 else 3)) for i in range(200)]
    edits = {r.name: ("drop" if i % 7 == 3 else "add1" if i % 5 == 1 else "keep") for i, r in enumerate(recs)}
    _, outs, _, _ = run_distribute(stream(recs), 3, DistributeOptions(chunk_size=4, frame_chunks=True))
    feeders = [bamgen.feed(worker(o, edits), piece=p, pause_every=e) for o, p, e in
               zip(outs, (7, 1000, 65536), (500, 5, 1), strict=True)]
    try:
        with bamgen.Fds() as fds:
            out, path = fds.writer()
            stats = Collector([r for r, _ in feeders], out, CollectOptions("input"), buffer_size=64).run()
            assert [bamgen.read_name(r) for r in got_records(fds.read(path))] == expected_after_workers(recs, edits)
            assert stats["records"] == len(expected_after_workers(recs, edits))
    finally:
        for r, wait in feeders:
            os.close(r)
            assert wait() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["any", "coordinate", "tag:CB"])
def test_collect_over_pipes_with_big_records(order):
    """Real pipes with writers in other processes; records > 64 KB cross many reads."""
    parts = [[Rec(f"p{i}r{j}", [("CB", "Z", f"{j:04d}"), ("XY", "B", ("i", list(range(j * 7000))))],
                  ref_id=0, pos=j * 3 + i, flag=0, seq="ACGT" * (j * 50)) for j in range(12)] for i in range(3)]
    feeders = [bamgen.feed(stream(p), piece=c, pause_every=10) for p, c in zip(parts, (1000, 4096, 65536),
                                                                                strict=True)]
    try:
        with bamgen.Fds() as fds:
            out, path = fds.writer()
            stats = collect_bam([r for r, _ in feeders], out, CollectOptions(order), buffer_size=64)
            got = got_records(fds.read(path))
    finally:
        for r, wait in feeders:
            os.close(r)
            wait()
    assert sorted(got) == sorted(r.raw for p in parts for r in p)
    if order != "any":
        assert [bamgen.read_name(r) for r in got] == [f"p{i}r{j}" for j in range(12) for i in range(3)]
    else:
        for p in parts:
            mine = [r.raw for r in p]
            assert [raw for raw in got if raw in set(mine)] == mine
    assert stats["per_input"] == [12, 12, 12]


@pytest.mark.timeout(60)
def test_distribute_over_pipe_then_pysam():
    """A stream arriving through a pipe in odd-sized pieces, distributed by name."""
    recs = [Rec(f"q{i // 2}", [("CB", "Z", "AC")], ref_id=0, pos=i, flag=0, seq="ACGT" * (i * 400),
                cigar=[(i * 1600, "M")] if i else ()) for i in range(30)]
    r, wait = bamgen.feed(stream(recs), piece=777, pause_every=20)
    try:
        with bamgen.Fds() as fds:
            outs = [fds.writer() for _ in range(3)]
            stats = distribute_bam(r, [fd for fd, _ in outs], DistributeOptions(by="name"), buffer_size=5)
            assert stats["records"] == 30
            names = []
            for k, (_, path) in enumerate(outs):
                with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
                    got = [aln.query_name for aln in bam]
                assert all(bamgen.fnv1a64(n.encode()) % 3 == k for n in got)
                names += got
            assert sorted(names) == sorted(r.name for r in recs)
    finally:
        os.close(r)
        wait()


def test_collect_coordinate_many_inputs():
    """Enough inputs for a deep heap; equal keys keep the input order."""
    k = 70
    parts = [[Rec(f"i{i}j{j}", [], ref_id=(j * 7 + i) % 3 - 1, pos=0 if (j * 7 + i) % 3 else -1, flag=0)
              for j in range(6)] for i in range(k)]
    parts = [sorted(p, key=lambda r: bamgen.coordinate_key(r.raw)) for p in parts]
    stats, out = run_collect([stream(p) for p in parts], "coordinate", buffer_size=5)
    expected = sorted((bamgen.coordinate_key(r.raw), i, j, r.raw) for i, p in enumerate(parts)
                      for j, r in enumerate(p))
    assert got_records(out) == [e[-1] for e in expected]
    assert stats["per_input"] == [6] * k


def test_collect_bam_wrapper():
    recs = [Rec(f"r{i}", []) for i in range(3)]
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = collect_bam([fds.reader(stream(recs))], out, CollectOptions())
        assert fds.read(path) == stream(recs) and stats["records"] == 3


# -- RecordChunks ---------------------------------------------------------------------------------

@settings(slow, max_examples=25)
@given(records(), st.integers(1, 200000), small_sizes, st.booleans())
def test_record_chunks_are_whole_records(recs, chunk_bytes, buf, wrap):
    data = stream(recs)
    with bamgen.Fds() as fds:
        chunks = RecordChunks(fds.reader(bamgen.bgzf(data, block=3000) if wrap else data), "x: ",
                              chunk_bytes=chunk_bytes, buffer_size=buf)
        assert chunks.header() == HEADER
        got = []
        biggest = max((len(r.raw) for r in recs), default=0)
        while chunk := chunks.next_chunk():
            assert isinstance(chunk, bytes)
            assert len(chunk) < chunk_bytes + biggest  # stops at the first record reaching chunk_bytes
            got.append(chunk)
        assert chunks.next_chunk() == b""  # and stays at the end
        assert [raw for c in got for raw in bamgen.split_records(c)] == [r.raw for r in recs]
        assert chunks.records == len(recs)


def test_record_chunks_errors_name_the_record():
    recs = [bamgen.record(f"r{i}") for i in range(3)]
    with bamgen.Fds() as fds:
        chunks = RecordChunks(fds.reader(HEADER + b"".join(recs) + recs[0][:-1]), "collected: ", chunk_bytes=50)
        chunks.header()
        with pytest.raises(ValueError, match=r"^collected: BAM stream ends inside record 3$"):
            while chunks.next_chunk():
                pass
        chunks = RecordChunks(fds.reader(HEADER + recs[0] + bamgen.record("x", raw_aux=b"XQq\x01")), "collected: ")
        chunks.header()
        with pytest.raises(ValueError, match=re.escape("collected: record 1 (read 'x'): bad type 'q'")):
            chunks.next_chunk()


@pytest.mark.parametrize("chunk_bytes", [0, -5])
def test_record_chunks_rejects_chunk_bytes_below_one(chunk_bytes):
    recs = [bamgen.record("a"), bamgen.record("b")]
    with bamgen.Fds() as fds:
        try:
            chunks = RecordChunks(fds.reader(HEADER + b"".join(recs)), chunk_bytes=chunk_bytes)
        except ValueError:
            return
        chunks.header()
        assert chunks.next_chunk() == b"".join(recs)
