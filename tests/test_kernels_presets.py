"""The kernels of the single-cell presets (bamflow.kernels.presets): TagCounter,
Corrector, fastq_pairs_to_bam and Whitelist.

Expected values come from brute force over records built with tests/bamgen.py
(and parsed back with bamgen.parse_record or pysam), never from the kernels.
"""

import collections
import itertools
import os
import pickle
import re
import struct

import bamgen
import dnaio
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.kernels.bam import FRAME
from bamflow.kernels.presets import CORRECT_STATS, COUNT_STATS, Corrector, TagCounter, Whitelist, fastq_pairs_to_bam

HEADER = bamgen.header()
SIZES = st.sampled_from([1, 2, 3, 5, 7, 64, 1 << 16])
slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CB_CHOICES = [("Z", "AAACCC-1", b"AAACCC-1"), ("Z", "GGGTTT-1", b"GGGTTT-1"), ("C", 12, b"12"), ("I", 12, b"12"),
              ("Z", "12", b"12"), ("s", -5, b"-5"), ("A", "x", b"x"), ("H", "0F", b"0F"), ("Z", "", None), None]
FLAGS = [0, 0, 0x10, 0x400, 0x100, 0x800, 0x900, 0x500, 0xC00, 0x4, 0x1 | 0x40]
MAPQS = [0, 1, 10, 30, 60, 255]


# -- TagCounter ------------------------------------------------------------------------------

@st.composite
def counted_records(draw):
    out = []
    for i in range(draw(st.integers(0, 60))):
        cb = draw(st.sampled_from(CB_CHOICES))
        flag = draw(st.sampled_from(FLAGS))
        mapq = draw(st.sampled_from(MAPQS))
        tags = [("XA", "i", i)] + ([("CB", cb[0], cb[1])] if cb else [])
        seq = "ACGT" * (17000 if draw(st.integers(0, 20)) == 0 else 2)
        out.append((flag, mapq, cb[2] if cb else None,
                    bamgen.record(f"r{i}", flag=flag, mapq=mapq, tags=draw(st.permutations(tags)), seq=seq)))
    return out


def brute_count(recs, skip_secondary, skip_duplicates, min_mapq):
    """The documented rule: the first reason a record is skipped counts."""
    stats = dict.fromkeys(COUNT_STATS, 0)
    counts = collections.Counter()
    order = []
    for flag, mapq, key, _ in recs:
        stats["records"] += 1
        if skip_duplicates and flag & 0x400:
            stats["duplicate"] += 1
        elif mapq < min_mapq:
            stats["low_mapq"] += 1
        elif skip_secondary and flag & 0x100:
            stats["secondary"] += 1
        elif skip_secondary and flag & 0x800:
            stats["supplementary"] += 1
        elif key is None:
            stats["missing_tag"] += 1
        else:
            stats["counted"] += 1
            counts[key] += 1
            order.append(key)
    return stats, {k: counts[k] for k in dict.fromkeys(order)}


@settings(slow, max_examples=40)
@given(counted_records(), st.booleans(), st.booleans(), st.sampled_from([0, 1, 11, 30, 255, 256]), SIZES)
def test_tag_counter_matches_brute_force(recs, skip_secondary, skip_duplicates, min_mapq, buf):
    with bamgen.Fds() as fds:
        table, stats, seen = TagCounter(fds.reader(HEADER + b"".join(r for *_, r in recs)), "CB",
                                        skip_secondary=skip_secondary, skip_duplicates=skip_duplicates,
                                        min_mapq=min_mapq, source="x: ", buffer_size=buf).run()
    want_stats, want_counts = brute_count(recs, skip_secondary, skip_duplicates, min_mapq)
    assert stats == want_stats
    assert table.counts() == want_counts and list(table.counts()) == list(want_counts)
    assert sum(stats[k] for k in COUNT_STATS[1:]) == stats["records"]  # every record counted once
    assert seen == sorted({t for *_, raw in recs for t, _, _ in bamgen.parse_record(raw)["tags"]})


def test_tag_counter_defaults_and_flags():
    recs = [bamgen.record("p", flag=0, tags=[("CB", "Z", "A")]),
            bamgen.record("sec", flag=0x100, tags=[("CB", "Z", "A")]),
            bamgen.record("sup", flag=0x800, tags=[("CB", "Z", "A")]),
            bamgen.record("both", flag=0x900, tags=[("CB", "Z", "A")]),
            bamgen.record("dup", flag=0x400, tags=[("CB", "Z", "B")]),
            bamgen.record("low", flag=0, mapq=0, tags=[("CB", "i", 3)])]
    data = HEADER + b"".join(recs)
    with bamgen.Fds() as fds:
        table, stats, _ = TagCounter(fds.reader(data), b"CB").run()  # skip_secondary on, duplicates counted
        assert table.counts() == {b"A": 1, b"B": 1, b"3": 1}
        assert stats["secondary"] == 2 and stats["supplementary"] == 1 and stats["duplicate"] == 0
        table, stats, _ = TagCounter(fds.reader(data), "CB", skip_secondary=False, skip_duplicates=True,
                                     min_mapq=1).run()
        assert table.counts() == {b"A": 4} and stats["duplicate"] == 1 and stats["low_mapq"] == 1
        assert table.count_of("A") == 4 and table.count_of(3) == 0


def test_tag_counter_arguments():
    with bamgen.Fds() as fds:
        for bad in ("C", "CBX", ""):
            with pytest.raises(ValueError, match="a BAM tag has two characters"):
                TagCounter(fds.reader(HEADER), bad)


# -- Corrector ---------------------------------------------------------------------------------

RAWS = ["AAAA", "AAAC", "CCCC", "GGGG", "NNNN", "TTTT"]


def resolver(calls):
    """A deterministic resolve(raw, qual) that records its calls: the code and
    cacheability depend on the raw value only; a value with 'C' is cacheable."""
    def resolve(raw, qual):
        calls.append((raw, qual))
        assert isinstance(raw, bytes) and (qual is None or isinstance(qual, bytes))
        code = {b"AAAA": 0, b"AAAC": 1, b"CCCC": 1, b"GGGG": 2, b"NNNN": 3, b"TTTT": 0}[raw]
        value = {0: raw, 1: b"AAAA" if raw == b"AAAC" else b"CCCA", 2: None, 3: None}[code]
        return code, value, b"C" in raw or raw == b"AAAA"
    return resolve


@st.composite
def corrector_input(draw):
    """(items, stream): items are FRAME or (name, raw or None or "", qual or None, record bytes)."""
    items = []
    for i in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 6)) == 0:
            items.append(FRAME)
            continue
        raw = draw(st.sampled_from(RAWS + [None, ""]))
        qual = draw(st.sampled_from([None, "IIII", "#I#I"]))
        tags = [("XA", "i", i)]
        if raw is not None:
            tags.append(("CR", "Z", raw))
        if qual is not None:
            tags.append(("CY", "Z", qual))
        tags = draw(st.permutations(tags))
        rec = bamgen.record(f"r{i}", tags=tags, seq="ACGT" * (17000 if draw(st.integers(0, 15)) == 0 else 1))
        items.append((f"r{i}", raw, qual, rec))
    return items, HEADER + b"".join(it if it == FRAME else it[3] for it in items)


def with_tag(rec, tag, value):
    """The record with tag:Z:value appended (block_size updated), built with struct."""
    body = rec[4:] + tag.encode() + b"Z" + value + b"\0"
    return struct.pack("<I", len(body)) + body


@settings(slow, max_examples=40)
@given(corrector_input(), SIZES, SIZES)
def test_corrector_matches_brute_force(inp, buf, out_buf):
    items, data = inp
    calls = []
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = Corrector(fds.reader(data), out, "CR", "CY", "CB", resolver(calls), buffer_size=buf,
                          out_buffer_size=out_buf).run()
        got = fds.read(path)
    # brute force: the same resolve, cached by hand
    expect_calls = []
    cache = {}
    want = [HEADER]
    want_stats = dict.fromkeys(CORRECT_STATS, 0)
    ref = resolver(expect_calls)
    for it in items:
        if it == FRAME:
            want.append(FRAME)
            want_stats["frames"] += 1
            continue
        name, raw, qual, rec = it
        want_stats["records"] += 1
        if not raw:
            want_stats["missing_tag"] += 1
            want.append(rec)
            continue
        if raw in cache:
            code, value = cache[raw]
        else:
            code, value, cacheable = ref(raw.encode(), qual.encode() if qual is not None else None)
            if cacheable:
                cache[raw] = (code, value)
        want_stats[CORRECT_STATS[1 + code]] += 1
        want.append(rec if value is None else with_tag(rec, "CB", value))
    assert got == b"".join(want)
    assert stats == want_stats
    assert calls == expect_calls  # cacheable answers asked once per raw value, with that record's qualities
    assert all(n == 1 for (raw, _), n in collections.Counter(calls).items() if b"C" in raw or raw == b"AAAA")


def test_corrector_output_read_by_pysam(tmp_path):
    recs = [bamgen.record(f"r{i}", ref_id=0, pos=i * 10, flag=0, seq="ACGTACGT", cigar=[(8, "M")],
                          tags=[("CR", "Z", RAWS[i % len(RAWS)]), ("CY", "Z", "IIII"), ("XB", "B", ("C", [i]))])
            for i in range(30)]
    path = str(tmp_path / "c.bam")
    with bamgen.Fds() as fds:
        out = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            stats = Corrector(fds.reader(HEADER + b"".join(recs)), out, "CR", "CY", "CB", resolver([])).run()
        finally:
            os.close(out)
    with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:  # htslib reads raw uncompressed BAM
        got = [(a.query_name, a.reference_start, a.get_tag("CR"),
                a.get_tag("CB") if a.has_tag("CB") else None, list(a.get_tag("XB"))) for a in bam]
    expect = {"AAAA": "AAAA", "AAAC": "AAAA", "CCCC": "CCCA", "GGGG": None, "NNNN": None, "TTTT": "TTTT"}
    assert got == [(f"r{i}", i * 10, RAWS[i % len(RAWS)], expect[RAWS[i % len(RAWS)]], [i]) for i in range(30)]
    assert stats["exact"] == 10 and stats["corrected"] == 10 and stats["ambiguous"] == 5 and stats["uncorrectable"] == 5


def run_corrector(data, resolve, tags=("CR", "CY", "CB"), source="in.bam: "):
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = Corrector(fds.reader(data), out, *tags, resolve, source=source).run()
        return stats, fds.read(path)


def test_corrector_errors_name_the_record():
    good = bamgen.record("g", tags=[("CR", "Z", "AAAA")])
    ok = lambda raw, qual: (0, raw, True)  # noqa: E731
    with pytest.raises(ValueError, match=r"^in\.bam: record 1 \(read 'has'\): already has a CB tag$"):
        run_corrector(HEADER + good + bamgen.record("has", tags=[("CB", "Z", "X"), ("CR", "Z", "AAAA")]), ok)
    with pytest.raises(ValueError, match=r"^in\.bam: record 1 \(read 'int'\): tag CR is not a string \(type i\)$"):
        run_corrector(HEADER + good + bamgen.record("int", tags=[("CR", "i", 5)]), ok)
    with pytest.raises(ValueError, match=r"^in\.bam: record 1 \(read 'q'\): tag CY is not a string \(type B\)$"):
        run_corrector(HEADER + good + bamgen.record("q", tags=[("CR", "Z", "CCCC"), ("CY", "B", ("C", [1]))]), ok)
    with pytest.raises(ValueError, match=r"^in\.bam: record 1 \(read 'g2'\): tag CR is not a string \(type f\)$"):
        run_corrector(HEADER + good + bamgen.record("g2", tags=[("CR", "f", 1.0)]), ok)

    def refuse(raw, qual):
        raise ValueError(f"cannot resolve {raw!r}")

    with pytest.raises(ValueError, match=r"^in\.bam: record 0 \(read 'g'\): cannot resolve b'AAAA'$"):
        run_corrector(HEADER + good, refuse)
    with pytest.raises(ValueError, match=r"record 1: block_size 3 < 32"):
        run_corrector(HEADER + good + struct.pack("<I", 3) + b"abc", ok)


def test_corrector_passes_frames_and_keeps_records_without_the_tag():
    recs = [bamgen.record("a", tags=[("CR", "Z", "AAAC")]), bamgen.record("b"),
            bamgen.record("c", tags=[("CR", "Z", "")])]
    data = HEADER + FRAME + recs[0] + FRAME + FRAME + recs[1] + recs[2] + FRAME
    stats, out = run_corrector(data, resolver([]))
    assert out == HEADER + FRAME + with_tag(recs[0], "CB", b"AAAA") + FRAME + FRAME + recs[1] + recs[2] + FRAME
    assert stats == {"records": 3, "exact": 0, "corrected": 1, "ambiguous": 0, "uncorrectable": 0,
                     "missing_tag": 2, "frames": 4}


def test_corrector_not_cacheable_is_asked_every_time():
    calls = []
    recs = [bamgen.record(f"r{i}", tags=[("CR", "Z", "GGGG"), ("CY", "Z", "#" * (i + 1))]) for i in range(3)]
    stats, _ = run_corrector(HEADER + b"".join(recs), resolver(calls))
    assert calls == [(b"GGGG", b"#"), (b"GGGG", b"##"), (b"GGGG", b"###")]
    assert stats["ambiguous"] == 3


def test_corrector_arguments():
    with bamgen.Fds() as fds:
        out, _ = fds.writer()
        with pytest.raises(ValueError, match="a BAM tag has two characters"):
            Corrector(fds.reader(HEADER), out, "CRX", "CY", "CB", resolver([]))


@pytest.mark.parametrize("code", [4, -1])
def test_corrector_rejects_unknown_codes(code):
    data = HEADER + bamgen.record("r", tags=[("CR", "Z", "AAAA")])
    with pytest.raises(ValueError):
        run_corrector(data, lambda raw, qual: (code, b"AAAA", True))


def test_corrector_rejects_a_str_value():
    data = HEADER + bamgen.record("r", tags=[("CR", "Z", "AAAA")])
    with pytest.raises(ValueError, match="a value is bytes"):
        run_corrector(data, lambda raw, qual: (1, "AAAC", True))


def test_corrector_rejects_a_value_with_nul():
    data = HEADER + bamgen.record("r", tags=[("CR", "Z", "AAAA")])
    try:
        _, out = run_corrector(data, lambda raw, qual: (1, b"AA\0AC", True))
    except ValueError:
        return
    bamgen.parse_record(bamgen.split_stream(out)[1][0])  # what the next stage would read


# -- fastq_pairs_to_bam ---------------------------------------------------------------------------

Fastq = collections.namedtuple("Fastq", "name sequence qualities")


def pair(name1, name2, s1, q1, s2, q2):
    return dnaio.SequenceRecord(name1, s1, q1), dnaio.SequenceRecord(name2, s2, q2)


@st.composite
def fastq_batches(draw):
    r1s, r2s, names = [], [], []
    for i in range(draw(st.integers(0, 20))):
        n1 = draw(st.integers(0, 30))
        n2 = draw(st.integers(0, 300))
        s1 = draw(st.text("ACGTN", min_size=n1, max_size=n1))
        q1 = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=n1, max_size=n1))
        s2 = draw(st.text("ACGTNacgtn", min_size=n2, max_size=n2))
        q2 = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=n2, max_size=n2))
        base = draw(st.sampled_from([f"read{i}", f"M0:{i}:x" + "y" * 200]))
        suffix1, suffix2 = draw(st.sampled_from([("", ""), ("/1", "/2"), (" 1:N:0", " 2:N:0"), ("/1 a", "/2\tb")]))
        a, b = pair(base + suffix1, base + suffix2, s1, q1, s2, q2)
        r1s.append(a)
        r2s.append(b)
        names.append(base)
    return r1s, r2s, names


@settings(slow, max_examples=40)
@given(fastq_batches(), st.sampled_from([[(0, 16)], [(0, 4), (6, 10)], []]), st.sampled_from([[(16, 26)], [(2, 3)]]),
       st.sampled_from([b"", b"sample-1"]), st.integers(1, 1000))
def test_fastq_pairs_to_bam(batch, cb_segs, umi_segs, rg, first):
    r1s, r2s, names = batch
    need = max([e for _, e in cb_segs + umi_segs])
    out = bytearray(b"kept")
    written, short = fastq_pairs_to_bam(r1s, r2s, cb_segs, umi_segs, need, rg, out, first)
    assert out[:4] == b"kept"
    kept = [(a, b, n) for a, b, n in zip(r1s, r2s, names, strict=True) if len(a.sequence) >= need]
    assert (written, short) == (len(kept), len(r1s) - len(kept))
    recs = bamgen.split_records(bytes(out[4:]))
    assert len(recs) == len(kept)
    for raw, (a, b, name) in zip(recs, kept, strict=True):
        f = bamgen.parse_record(raw)
        seg = lambda s, segs: "".join(s[x:y] for x, y in segs)  # noqa: E731
        assert f["name"] == name
        assert (f["ref_id"], f["pos"], f["mapq"], f["bin"], f["flag"], f["cigar"]) == (-1, -1, 0, 4680, 4, [])
        assert (f["next_ref_id"], f["next_pos"], f["tlen"]) == (-1, -1, 0)
        assert f["seq"] == b.sequence.upper()
        assert f["qual"] == bytes(ord(c) - 33 for c in b.qualities)
        want = [("CR", "Z", seg(a.sequence, cb_segs)), ("CY", "Z", seg(a.qualities, cb_segs)),
                ("UR", "Z", seg(a.sequence, umi_segs)), ("UY", "Z", seg(a.qualities, umi_segs))]
        if rg:
            want.append(("RG", "Z", rg.decode()))
        assert f["tags"] == want


def test_fastq_records_pass_the_kernels_and_pysam(tmp_path):
    r1s, r2s = zip(*[pair(f"q{i}/1", f"q{i}/2", "ACGTACGTAAAACCCCGGGGTTTT", "I" * 24, "ACGTN" * (i + 1),
                          "#" * 5 * (i + 1)) for i in range(50)], strict=True)
    out = bytearray()
    fastq_pairs_to_bam(list(r1s), list(r2s), [(0, 16)], [(16, 24)], 24, b"rg", out, 1)
    path = str(tmp_path / "u.bam")
    with open(path, "wb") as f:
        f.write(HEADER + out)
    with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
        got = [(a.query_name, a.query_sequence, a.get_tag("CR"), a.get_tag("UR"), a.get_tag("RG"), a.is_unmapped)
               for a in bam]
    assert got == [(f"q{i}", "ACGTN" * (i + 1), "ACGTACGTAAAACCCC", "GGGGTTTT", "rg", True) for i in range(50)]
    with bamgen.Fds() as fds:
        table, stats, _ = TagCounter(fds.reader(HEADER + out), "UR", buffer_size=3).run()
    assert table.counts() == {b"GGGGTTTT": 50}


def test_fastq_pairs_errors():
    ok1, ok2 = pair("a/1", "a/2", "ACGT", "IIII", "ACGT", "IIII")
    cases = [
        ([ok1, pair("b/1", "c/2", "ACGT", "IIII", "AC", "II")[0]], [ok2, pair("b/1", "c/2", "ACGT", "IIII", "AC", "II")[1]],
         r"^FASTQ pair 8 is out of sync: read 1 is named 'b/1', read 2 'c/2'$"),
        # dnaio refuses such records itself; the kernel checks anyway (any object with the three attributes)
        ([ok1, Fastq("x/1", "ACGT", "III")], [ok2, Fastq("x/2", "A", "I")],
         r"^FASTQ pair 8: sequence and quality lengths differ$"),
        ([ok1, Fastq("x/1", "ACGT", "IIII")], [ok2, Fastq("x/2", "AC", "I")],
         r"^FASTQ pair 8: sequence and quality lengths differ$"),
        ([ok1, pair("x", "x", "ACGT", "IIII", "AC", "I ")[0]], [ok2, pair("x", "x", "ACGT", "IIII", "AC", "I ")[1]],
         r"^FASTQ pair 8: invalid quality character ' ' in read 2$"),
        ([pair("n" * 255, "n" * 255, "ACGT", "IIII", "A", "I")[0]], [pair("n" * 255, "n" * 255, "ACGT", "IIII", "A",
                                                                         "I")[1]],
         r"^FASTQ pair 7: read name of 255 characters \(BAM allows 1-254\)$"),
        ([pair("/1", "/2", "ACGT", "IIII", "A", "I")[0]], [pair("/1", "/2", "ACGT", "IIII", "A", "I")[1]],
         r"^FASTQ pair 7: read name of 0 characters"),
    ]
    for r1s, r2s, message in cases:
        with pytest.raises(ValueError, match=message):
            fastq_pairs_to_bam(r1s, r2s, [(0, 2)], [(2, 4)], 4, b"", bytearray(), 7)
    with pytest.raises(ValueError, match="read 1 and read 2 batches differ in size"):
        fastq_pairs_to_bam([ok1], [], [(0, 2)], [(2, 4)], 4, b"", bytearray(), 1)
    # 254 characters is fine; a short read 1 is skipped before its qualities are looked at
    out = bytearray()
    assert fastq_pairs_to_bam([pair("n" * 254, "n" * 254, "ACGT", "IIII", "A", "I")[0], ok1],
                              [pair("n" * 254, "n" * 254, "ACGT", "IIII", "A", "I")[1], ok2],
                              [(0, 2)], [(2, 4)], 4, b"", out, 1) == (2, 0)
    assert fastq_pairs_to_bam([dnaio.SequenceRecord("s", "AC", "II")], [dnaio.SequenceRecord("s", "A", "I")],
                              [(0, 2)], [(2, 4)], 4, b"", out, 1) == (0, 1)


# -- Whitelist ----------------------------------------------------------------------------------

def brute_neighbors(barcode, wl, length):
    if len(barcode) != length:
        return []
    bad = [i for i, c in enumerate(barcode) if c not in b"ACGT"]
    if len(bad) > 1:
        return []
    found = []
    for i in (bad or range(length)):
        for c in b"ACGT":
            if not bad and c == barcode[i]:
                continue
            cand = barcode[:i] + bytes([c]) + barcode[i + 1:]
            if cand in wl:
                found.append((i, cand))
    return found


@settings(slow, max_examples=40)
@given(st.integers(1, 32).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.text("ACGT", min_size=n, max_size=n), min_size=1, max_size=40),
    st.lists(st.text("ACGTN", min_size=n, max_size=n), max_size=20))), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_whitelist_matches_brute_force(args, eol, final_eol):
    length, barcodes, queries = args
    blob = eol.join(b.encode() for b in barcodes) + (eol if final_eol else b"")
    wl = Whitelist()
    half = blob.rfind(b"\n", 0, len(blob) // 2) + 1  # two calls, each of whole lines
    lines = wl.add_lines(blob[:half], 1, "wl") + wl.add_lines(blob[half:], 1 + blob[:half].count(b"\n"), "wl")
    assert lines == len(barcodes)
    assert wl.finish("wl") == len(barcodes) - len(set(barcodes))
    assert len(wl) == len(set(barcodes)) and wl.length == length
    members = {b.encode() for b in barcodes}
    for q in [b.encode() for b in barcodes[:5]] + [q.encode() for q in queries] + [b"A" * (length + 1)]:
        assert (q in wl) == (q in members)
        assert wl.neighbors(q) == brute_neighbors(q, members, length)
    again = pickle.loads(pickle.dumps(wl))
    assert len(again) == len(wl) and again.length == length
    assert all(b.encode() in again for b in barcodes)
    assert Whitelist.from_bytes(wl.to_bytes(), length).neighbors(barcodes[0].encode()) == wl.neighbors(
        barcodes[0].encode())


def test_whitelist_errors_name_the_line():
    for blob, first, message in [
        (b"ACGT\n\nACGT", 1, r"^wl: line 2 is empty$"),
        (b"ACGT\nACG\n", 10, r"^wl: line 11: barcode of 3 characters, the first line has 4$"),
        (b"ACGT\nACGX", 1, r"^wl: line 2: character 'X' \(only A, C, G, T\)$"),
        (b"ACGT\nacgt", 1, r"^wl: line 2: character 'a'"),
        (b"A" * 33, 1, r"^wl: line 1: barcode of 33 characters \(at most 32\)$"),
    ]:
        with pytest.raises(ValueError, match=message):
            Whitelist().add_lines(blob, first, "wl")
    with pytest.raises(ValueError, match=r"^wl: the whitelist is empty$"):
        Whitelist().finish("wl")


def test_whitelist_neighbors_order_and_n():
    wl = Whitelist()
    wl.add_lines(b"\n".join(["".join(p).encode() for p in itertools.product("AC", repeat=3)]), 1, "wl")
    wl.finish("wl")
    assert wl.neighbors(b"AAA") == [(0, b"CAA"), (1, b"ACA"), (2, b"AAC")]
    assert wl.neighbors(b"ANA") == [(1, b"AAA"), (1, b"ACA")]
    assert wl.neighbors(b"NNA") == [] and wl.neighbors(b"AA") == [] and wl.neighbors(b"GGG") == []
    assert b"AAA" in wl and b"AAG" not in wl and b"aaa" not in wl and b"AAAA" not in wl


def test_count_and_correct_stat_names():
    assert COUNT_STATS == ("records", "counted", "duplicate", "low_mapq", "secondary", "supplementary", "missing_tag")
    assert CORRECT_STATS == ("records", "exact", "corrected", "ambiguous", "uncorrectable", "missing_tag", "frames")


def test_corrector_with_bgzf_input_and_source_in_messages():
    recs = [bamgen.record(f"r{i}", tags=[("CR", "Z", "AAAC")]) for i in range(300)]
    data = bamgen.bgzf(HEADER + b"".join(recs) + recs[0][:-2], block=1000)
    with pytest.raises(ValueError, match=re.escape("w3: BAM stream ends inside record 300")):
        run_corrector(data, resolver([]), source="w3: ")


SEGMENT_SCRIPT = """
import dnaio
from bamflow.kernels.presets import fastq_pairs_to_bam
r1 = [dnaio.SequenceRecord("a", "ACGT", "IIII")]
r2 = [dnaio.SequenceRecord("a", "ACGT", "IIII")]
for cb, umi, need in (([(0, 16)], [(16, 20)], 4), ([(3, 1)], [(0, 1)], 4)):
    try:
        fastq_pairs_to_bam(r1, r2, cb, umi, need, b"", bytearray(), 1)
    except ValueError:
        print("ValueError")
    else:
        print("accepted")
"""


def test_fastq_segments_must_fit_in_need():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SEGMENT_SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["ValueError", "ValueError"], (proc.returncode,
                                                                                            proc.stdout)
