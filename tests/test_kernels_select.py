"""The select kernels (bamflow.kernels.select): Filter keeps the records whose
key is (or is not) in a ValueTable; Splitter groups records by key into
buffers handed to a flush callback.

Expected results are computed by brute force over records built with
tests/bamgen.py. The record checks every kernel shares are tested in
test_kernels_records.py.
"""

import collections

import bamgen
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.kernels._records import ValueTable
from bamflow.kernels.select import Filter, Splitter, filter_records, split_records

HEADER = bamgen.header()
SIZES = st.sampled_from([1, 2, 3, 5, 7, 64, 1 << 16])
slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# (type, value, canonical key or None): strings, integers of several widths
# (7 and "7" are one key), empty strings (missing), absent tags
CB_CHOICES = [("Z", "AAA", b"AAA"), ("Z", "CCC", b"CCC"), ("Z", "GGG", b"GGG"), ("Z", "TTTT-1", b"TTTT-1"),
              ("C", 7, b"7"), ("i", 7, b"7"), ("Z", "7", b"7"), ("s", -3, b"-3"), ("A", "Q", b"Q"),
              ("Z", "", None), None]
UB_CHOICES = [("Z", "u1", b"u1"), ("Z", "u2", b"u2"), ("S", 9, b"9"), None]
ALL_CB_KEYS = sorted({c[2] for c in CB_CHOICES if c and c[2]})


class Rec:
    def __init__(self, i, cb, ub, big):
        self.name = f"r{i}"
        tags = [("XA", "i", i)]
        if cb is not None:
            tags.append(("CB", cb[0], cb[1]))
        if ub is not None:
            tags.append(("UB", ub[0], ub[1]))
        if i % 3 == 0:
            tags.append(("XF", "f", 0.5))
        self.cb = cb[2] if cb else None
        self.ub = ub[2] if ub else None
        self.raw = bamgen.record(self.name, tags=tags, seq=BIG_SEQ if big else "ACGT"[: i % 4])

    def key(self, tags):
        parts = [self.cb if t == "CB" else self.ub for t in tags]
        return None if any(p is None for p in parts) else b"\0".join(parts)


BIG_SEQ = "ACGT" * 17000


@st.composite
def records(draw, max_size=40):
    n = draw(st.integers(0, max_size))
    return [Rec(i, draw(st.sampled_from(CB_CHOICES)), draw(st.sampled_from(UB_CHOICES)),
                draw(st.integers(0, 15)) == 0) for i in range(n)]


def stream(recs):
    return HEADER + b"".join(r.raw for r in recs)


def run_filter(data, values, tags, invert=False, **kwargs):
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = Filter(fds.reader(data), out, values, tags, invert, **kwargs).run()
        return stats, fds.read(path)


def run_split(data, tags, selected=None, **kwargs):
    """Returns (stats, [(out, key, blob)] in callback order, header seen)."""
    flushed = []
    headers = []
    with bamgen.Fds() as fds:
        stats = Splitter(fds.reader(data), tags, lambda out, key, blob: flushed.append((out, key, blob)),
                         headers.append, selected, **kwargs).run()
    return stats, flushed, headers


# -- Filter -----------------------------------------------------------------------------------

@settings(slow, max_examples=40)
@given(records(), st.sets(st.sampled_from(ALL_CB_KEYS + [b"nope"])), st.booleans(), SIZES, SIZES,
       st.sampled_from([["CB"], ["CB", "UB"], ["UB", "CB"]]))
def test_filter_matches_brute_force(recs, chosen, invert, buf, out_buf, tags):
    if len(tags) > 1:  # pair keys: each chosen CB with u1 and 9
        chosen = {k + b"\0" + u for k in chosen for u in (b"u1", b"9")} if tags[0] == "CB" else \
            {u + b"\0" + k for k in chosen for u in (b"u1", b"9")}
    values = ValueTable(sorted(chosen))
    stats, out = run_filter(stream(recs), values, tags, invert, buffer_size=buf, out_buffer_size=out_buf)
    keys = [r.key(tags) for r in recs]
    kept = [r.raw for r, k in zip(recs, keys, strict=True) if k is not None and (k in chosen) != invert]
    head, got = bamgen.split_stream(out)
    assert head == HEADER
    assert got == kept  # in input order, byte for byte
    missing = sum(k is None for k in keys)
    assert stats["records_in"] == len(recs)
    assert stats["kept"] == len(kept)
    assert stats["dropped_missing_tag"] == missing
    assert stats["dropped_not_listed"] == len(recs) - len(kept) - missing
    assert stats["records_in"] == stats["kept"] + stats["dropped_not_listed"] + stats["dropped_missing_tag"]
    assert stats["tags_seen"] == sorted({t for r in recs for t, _, _ in bamgen.parse_record(r.raw)["tags"]})


def test_filter_integer_values_match_every_width():
    recs = [bamgen.record(f"r{t}", tags=[("CB", t, 42)]) for t in "cCsSiI"]
    recs += [bamgen.record("z", tags=[("CB", "Z", "42")]), bamgen.record("other", tags=[("CB", "i", 43)]),
             bamgen.record("h", tags=[("CB", "H", "42")])]
    stats, out = run_filter(HEADER + b"".join(recs), ValueTable([42]), ["CB"], buffer_size=2)
    assert [bamgen.read_name(r) for r in bamgen.split_stream(out)[1]] == [f"r{t}" for t in "cCsSiI"] + ["z", "h"]
    stats, out = run_filter(HEADER + b"".join(recs), ValueTable([42]), ["CB"], invert=True)
    assert [bamgen.read_name(r) for r in bamgen.split_stream(out)[1]] == ["other"]


def test_filter_invert_still_drops_missing_and_empty():
    recs = [bamgen.record("a", tags=[("CB", "Z", "A")]), bamgen.record("none"),
            bamgen.record("empty", tags=[("CB", "Z", "")]), bamgen.record("b", tags=[("CB", "Z", "B")])]
    stats, out = run_filter(HEADER + b"".join(recs), ValueTable([b"A"]), ["CB"], invert=True)
    assert [bamgen.read_name(r) for r in bamgen.split_stream(out)[1]] == ["b"]
    assert stats == {"records_in": 4, "kept": 1, "dropped_not_listed": 1, "dropped_missing_tag": 2, "tags_seen": ["CB"]}
    # an empty table keeps nothing, or (inverted) every record with the tag
    assert run_filter(HEADER + b"".join(recs), ValueTable(), ["CB"])[0]["kept"] == 0
    assert run_filter(HEADER + b"".join(recs), ValueTable(), ["CB"], invert=True)[0]["kept"] == 2


def test_filter_values_loaded_from_a_list_file():
    """A whitelist file with CRLF line ends and a blank line, loaded in one call."""
    recs = [bamgen.record(f"r{i}", tags=[("CB", "Z", f"BC{i % 5}-1")]) for i in range(50)]
    values = ValueTable()
    values.add_values(b"BC1-1\r\nBC3-1\r\n\r\n")
    stats, out = run_filter(HEADER + b"".join(recs), values, [b"CB"], buffer_size=7)
    assert [bamgen.read_name(r) for r in bamgen.split_stream(out)[1]] == [f"r{i}" for i in range(50) if i % 5 in (1, 3)]


def test_filter_output_is_bam_for_pysam(tmp_path):
    recs = [bamgen.record(f"r{i}", ref_id=0, pos=i, flag=0, seq="ACGT", cigar=[(4, "M")],
                          tags=[("CB", "Z", "A" if i % 2 else "C"), ("XB", "B", ("s", [i, -i]))]) for i in range(20)]
    path = str(tmp_path / "f.bam")
    with bamgen.Fds() as fds:
        import os
        out = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            filter_records(fds.reader(HEADER + b"".join(recs)), out, ValueTable([b"A"]), ["CB"])
        finally:
            os.close(out)
    with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
        got = [(a.query_name, a.reference_start, list(a.get_tag("XB"))) for a in bam]
    assert got == [(f"r{i}", i, [i, -i]) for i in range(1, 20, 2)]


def test_filter_arguments():
    with bamgen.Fds() as fds:
        out, _ = fds.writer()
        with pytest.raises(TypeError):
            Filter(fds.reader(HEADER), out, None, ["CB"])
        with pytest.raises(TypeError):
            Filter(fds.reader(HEADER), out, {b"A"}, ["CB"])
        with pytest.raises(ValueError, match="a BAM tag has two characters"):
            Filter(fds.reader(HEADER), out, ValueTable(), ["CBX"])


# -- Splitter ------------------------------------------------------------------------------------

def check_split(recs, tags, stats, flushed, expected_out, flush_size, min_reads, drop_below, pressure_free):
    """The invariants of a split; expected_out: key → output number (None: not selected).
    ``pressure_free``: the memory budget exceeds all the data, so only flush_size
    (with min_reads) flushes before the end."""
    by_out = collections.defaultdict(list)   # output → records flushed, in order
    for out, _, blob in flushed:
        parts = bamgen.split_records(blob)
        assert parts, "a flush holds at least one record"
        by_out[out].extend(parts)
    # records per output (input order), of the selected keys
    want = collections.defaultdict(list)
    missing = not_selected = 0
    for r in recs:
        k = r.key(tags)
        if k is None:
            missing += 1
        elif expected_out(k) is None:
            not_selected += 1
        else:
            want[expected_out(k)].append(r)
    dropped = 0
    outputs = []
    for o in sorted(want):
        reads = len(want[o])
        if pressure_free and drop_below and reads < min_reads:
            assert o not in by_out, f"output {o} has {reads} < {min_reads} reads, was never flushed early, but was kept"
        if o in by_out:
            assert by_out[o] == [r.raw for r in want[o]], f"output {o}: records lost, added or reordered"
        else:
            assert drop_below and reads < min_reads, f"output {o} dropped though it has {reads} reads"
            dropped += reads
        outputs.append((o, reads))
    assert set(by_out) <= set(want)
    assert stats["records"] == len(recs)
    assert stats["missing_tag"] == missing
    assert stats["not_selected"] == not_selected
    assert stats["below_min_reads"] == dropped
    assert stats["flushes"] == len(flushed)
    assert [(o, reads) for o, _, reads, _ in stats["outputs"]] == outputs
    for o, _, _, was_flushed in stats["outputs"]:
        assert was_flushed == (o in by_out)
    if not drop_below or min_reads <= 1:
        assert dropped == 0
    # flush_size: a flushed buffer passes it only with one record, or while the
    # output had fewer than min_reads reads when a record was added
    seen = collections.Counter()
    for out, _, blob in flushed:
        parts = bamgen.split_records(blob)
        size = len(parts[0])
        for j, part in enumerate(parts[1:], 1):
            size += len(part)
            reads_before = seen[out] + j
            assert size <= flush_size or reads_before < min_reads, (out, size, flush_size, reads_before, min_reads)
        seen[out] += len(parts)
    return by_out


@settings(slow, max_examples=40)
@given(records(), st.sampled_from([["CB"], ["CB", "UB"]]), st.integers(1, 3000), st.sampled_from([1, 500, 5000, 1 << 27]),
       st.integers(0, 4), st.booleans(), SIZES)
def test_split_open_mode(recs, tags, flush_size, budget, min_reads, drop_below, buf):
    stats, flushed, headers = run_split(stream(recs), tags, flush_size=flush_size, memory_budget=budget,
                                        min_reads=min_reads, drop_below=drop_below, buffer_size=buf)
    assert headers == [HEADER]
    # open mode: output i is the i-th key in order of first appearance
    keys = list(dict.fromkeys(k for k in (r.key(tags) for r in recs) if k is not None))
    number = {k: i for i, k in enumerate(keys)}
    check_split(recs, tags, stats, flushed, number.get, flush_size, min_reads, drop_below, budget == 1 << 27)
    for out, key, blob in flushed:
        assert key == keys[out]
        assert all(Rec_key(raw, tags) == key for raw in bamgen.split_records(blob))
    assert [key for _, key, _, _ in stats["outputs"]] == [k for k in keys if any(o == number[k] for o, *_ in
                                                                                  stats["outputs"])]


def Rec_key(raw, tags):
    """The key of a record, from bamgen's own parse (independent of Rec)."""
    fields = {t: (typ, v) for t, typ, v in reversed(bamgen.parse_record(raw)["tags"])}
    parts = [bamgen.canonical(*fields[t]) for t in tags]
    return b"\0".join(parts)


@settings(slow, max_examples=35)
@given(records(), st.dictionaries(st.sampled_from(ALL_CB_KEYS + [b"zzz"]), st.integers(0, 5)), st.integers(1, 3000),
       st.sampled_from([1, 2000, 1 << 27]), st.integers(0, 3), st.booleans(), SIZES)
def test_split_selected_mode(recs, outputs, flush_size, budget, min_reads, drop_below, buf):
    """Only the keys of the table count, each to its output number (several may share one)."""
    selected = ValueTable()
    for k, o in outputs.items():
        selected.add(k, o)
    stats, flushed, _ = run_split(stream(recs), ["CB"], selected, flush_size=flush_size, memory_budget=budget,
                                  min_reads=min_reads, drop_below=drop_below, buffer_size=buf)
    check_split(recs, ["CB"], stats, flushed, outputs.get, flush_size, min_reads, drop_below, budget == 1 << 27)
    assert all(key is None for _, key, _ in flushed)
    assert all(key is None for _, key, _, _ in stats["outputs"])
    for out, _, blob in flushed:
        assert all(outputs[Rec_key(raw, ["CB"])] == out for raw in bamgen.split_records(blob))


def test_split_flush_size_and_big_records():
    recs = [bamgen.record(f"r{i:02d}", tags=[("CB", "Z", "A")], seq="ACGT" * (17000 if i == 5 else 10))
            for i in range(12)]
    size = len(recs[0])
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], flush_size=3 * size, buffer_size=5)
    blobs = [bamgen.split_records(b) for _, _, b in flushed]
    assert [len(b) for b in blobs] == [3, 2, 1, 3, 3]  # the big record goes alone; buffers stay under flush_size
    assert [raw for b in blobs for raw in b] == recs
    assert stats["flushes"] == 5 and stats["outputs"] == [(0, b"A", 12, True)]


def test_split_memory_budget_forces_early_flushes():
    """Many keys, a huge flush_size: only the memory budget makes flushes before the end."""
    n_keys, per_key = 40, 25
    recs = [bamgen.record(f"r{i}", tags=[("CB", "Z", f"K{i % n_keys:02d}")], seq="ACGT" * 20)
            for i in range(n_keys * per_key)]
    index = {raw: i for i, raw in enumerate(recs)}
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], flush_size=1 << 30, memory_budget=64 << 10)
    assert stats["flushes"] > n_keys
    # the first flush happened early: it holds no record from the second half of the input
    assert max(index[raw] for raw in bamgen.split_records(flushed[0][2])) < len(recs) // 2
    by_key = collections.defaultdict(list)
    for _, key, blob in flushed:
        by_key[key].extend(bamgen.split_records(blob))
    assert by_key == {f"K{k:02d}".encode(): recs[k::n_keys] for k in range(n_keys)}
    # without the pressure: one flush per key, at the end
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], flush_size=1 << 30)
    assert stats["flushes"] == n_keys and [bamgen.split_records(b) for _, _, b in flushed] == [
        recs[k::n_keys] for k in range(n_keys)]


def test_split_min_reads():
    counts = {"A": 5, "B": 2, "C": 3, "D": 1}
    recs = [bamgen.record(f"{k}{j}", tags=[("CB", "Z", k)]) for j in range(5) for k in counts if j < counts[k]]
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], min_reads=3)
    assert sorted(key for _, key, _ in flushed) == [b"A", b"C"]
    assert stats["below_min_reads"] == 3 and stats["records"] == 11
    assert stats["outputs"] == [(0, b"A", 5, True), (1, b"B", 2, False), (2, b"C", 3, True), (3, b"D", 1, False)]
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], min_reads=3, drop_below=False)
    assert sorted(key for _, key, _ in flushed) == [b"A", b"B", b"C", b"D"] and stats["below_min_reads"] == 0
    # an output below min_reads keeps growing past flush_size until it reaches min_reads
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], min_reads=3, flush_size=1)
    a = [bamgen.split_records(b) for _, key, b in flushed if key == b"A"]
    assert [len(x) for x in a] == [3, 1, 1]


def test_split_output_flushed_under_pressure_is_not_dropped_later():
    """Documented: an output flushed before the end (here by the memory budget)
    is flushed at the end too, even with fewer than min_reads reads."""
    recs = [bamgen.record("big", tags=[("CB", "Z", "A")], seq="ACGT" * 5000)]
    recs += [bamgen.record(f"s{i}", tags=[("CB", "Z", "B")]) for i in range(6)]
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], min_reads=3, memory_budget=10000)
    assert (0, b"A", 1, True) in stats["outputs"] and stats["below_min_reads"] == 0
    assert [key for _, key, _ in flushed].count(b"A") == 1


def test_split_header_callback_comes_first_and_errors_propagate():
    events = []
    recs = [bamgen.record(f"r{i}", tags=[("CB", "Z", "A")]) for i in range(3)]
    with bamgen.Fds() as fds:
        Splitter(fds.reader(HEADER + b"".join(recs)), ["CB"], lambda o, k, b: events.append(("flush", o, k)),
                 lambda h: events.append(("header", h))).run()
        assert events == [("header", HEADER), ("flush", 0, b"A")]

        def boom(out, key, blob):
            raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            split_records(fds.reader(HEADER + b"".join(recs)), ["CB"], boom, flush_size=1)


def test_split_arguments():
    with bamgen.Fds() as fds:
        for kwargs in ({"flush_size": 0}, {"memory_budget": 0}):
            with pytest.raises(ValueError, match="flush_size and memory_budget must be >= 1"):
                Splitter(fds.reader(HEADER), ["CB"], lambda *a: None, **kwargs)
        with pytest.raises(TypeError):
            Splitter(fds.reader(HEADER), ["CB"], lambda *a: None, None, {b"A": 0})


def test_split_output_numbers_from_the_table():
    """Outputs are numbered by the table; unused numbers simply get nothing."""
    selected = ValueTable()
    selected.add(b"A", 4)
    selected.add(b"B", 1)
    selected.add(b"C", 4)
    recs = [bamgen.record(f"r{i}", tags=[("CB", "Z", "ABCD"[i % 4])]) for i in range(8)]
    stats, flushed, _ = run_split(HEADER + b"".join(recs), ["CB"], selected)
    assert [(o, [bamgen.read_name(r) for r in bamgen.split_records(b)]) for o, _, b in flushed] == [
        (1, ["r1", "r5"]), (4, ["r0", "r2", "r4", "r6"])]
    assert stats["not_selected"] == 2 and stats["outputs"] == [(1, None, 2, True), (4, None, 4, True)]
