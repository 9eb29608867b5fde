"""map_batches: column batches of reads (numpy), keep masks and new tag
columns, checked against pysam reading the same reads; batch boundaries,
frames and input order; the worker loop on its own (arrays kept past a
batch); and the failure paths, each a clear error with nothing published."""

from collections import Counter

import bamgen
import numpy as np
import pysam
import pytest
from bamfiles import read_records, write_bam
from conftest import assert_clean

import bamflow as bf
from bamflow import WorkflowError
from bamflow.bam.batches import run_batches
from bamflow.kernels._records import ValueTable

# -- batch functions (module level: importable by the workers) --------------------------------------


def keep_nh1_mark_length(batch):
    return batch.tag("NH") == 1, {"XN": batch.query_length.astype(np.int32)}


def keep_listed_cells(batch):
    return batch.isin("CB", CELLS)


def every_kind_of_column(batch):
    n = batch.n
    idx = np.arange(n)
    masked = np.ma.masked_array(idx.astype(np.int16), mask=idx % 3 == 0)
    return {
        "Xa": idx.astype(np.int8) - 60,
        "Xb": (idx % 250).astype(np.uint8),
        "Xc": -idx.astype(np.int16),
        "Xd": idx.astype(np.uint16) + 60000,
        "Xe": -idx.astype(np.int32) * 1000,
        "Xf": idx.astype(np.uint32) + 3_000_000_000,
        "Xg": idx.astype(np.int64),                  # small int64: i
        "Xh": idx.astype(np.int64) + 3_000_000_000,  # large int64: I
        "Xi": (idx / 4).astype(np.float32),
        "Xj": np.array([f"n{i}" for i in idx]),       # str (numpy U)
        "Xk": np.array([f"b{i}".encode() for i in idx]),
        "Xl": np.array([None if i % 2 else f"o{i}" for i in idx], dtype=object),
        "Xm": masked,
        "Xn": idx % 2 == 0,                          # bool: C
        "UB": np.array([b"replaced"] * n),            # replaces the reads' UB
    }


def describe_batch(batch):
    """Columns a test checks against pysam, tagged onto each read."""
    cb_str = batch.tag("CB", kind="str")
    nh = batch.tag("NH")
    gn_present = batch.has_tag("GN").astype(np.uint8)
    buffer, offsets = batch.names
    assert [buffer[offsets[i]:offsets[i + 1]].decode() for i in range(batch.n)] == \
        [batch.name(i) for i in range(batch.n)]
    seqs, seq_offsets = batch.sequences
    return {
        "Y1": batch.flag.astype(np.int32),
        "Y2": batch.reference_id,
        "Y3": batch.reference_start,
        "Y4": batch.mapping_quality,
        "Y5": batch.template_length,
        "Y6": batch.next_reference_id,
        "Y7": cb_str,
        "Y8": nh.astype(np.int32),
        "Y9": gn_present,
        "YA": np.array([seqs[seq_offsets[i]:seq_offsets[i + 1]] for i in range(batch.n)], dtype=bytes),
        "YB": np.full(batch.n, batch.n, np.int32),
    }


def raise_in_batch(batch):
    raise RuntimeError("batch boom")


def wrong_dtype_mask(batch):
    return np.ones(batch.n, np.int64)


def short_mask(batch):
    return np.ones(batch.n - 1, bool)


def short_column(batch):
    return {"XS": np.zeros(batch.n + 1, np.int32)}


def bad_tag_name(batch):
    return {"1X": np.zeros(batch.n, np.int32)}


def unrequested_tag(batch):
    return batch.tag("UB")


CELLS = None


# -- through the workflow --------------------------------------------------------------------------

def test_keep_mask_and_a_new_tag_in_input_order(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=3000)
    out = tmp_path / "out.bam"
    stats = bf.map_batches(src, keep_nh1_mark_length, out, tags=["NH"], batch_size=97, workers=3, timeout=60)
    expected = [r.to_string() + f"\tXN:i:{r.query_length}" for r in reads if r.get_tag("NH") == 1]
    assert read_records(out)[1] == expected
    assert (stats.reads_in, stats.written) == (3000, len(expected))
    assert stats.dropped == ({"by_function": 3000 - len(expected)} if len(expected) < 3000 else {})


def test_isin_keeps_listed_cells(tmp_path):
    global CELLS
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=2000, int_cb=False)
    cells = sorted({r.get_tag("CB") for r in reads if r.has_tag("CB")})[::3]
    CELLS = ValueTable(cells)  # (fork: the workers see it)
    out = tmp_path / "out.bam"
    bf.map_batches(src, keep_listed_cells, out, tags="CB", batch_size=128, timeout=60, start_method="fork")
    expected = [r.to_string() for r in reads if r.has_tag("CB") and r.get_tag("CB") in cells]
    assert read_records(out)[1] == expected


def test_every_column_dtype_becomes_the_right_tag(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=400)
    out = tmp_path / "out.bam"
    bf.map_batches(src, every_kind_of_column, out, batch_size=50, workers=2, timeout=60)
    with pysam.AlignmentFile(str(out), check_sq=False) as bam:
        got = list(bam)
    assert len(got) == len(reads)
    for k, (read, orig) in enumerate(zip(got, reads, strict=True)):
        i = k % 50  # the index within its batch
        tags = dict((t, (v, typ)) for t, v, typ in read.get_tags(with_value_type=True))
        assert tags["Xa"] == (np.int8(i) - 60, "c")
        assert tags["Xb"] == (i % 250, "C")
        assert tags["Xc"] == (-i, "s")
        assert tags["Xd"] == (i + 60000, "S")
        assert tags["Xe"] == (-i * 1000, "i")
        assert tags["Xf"][1] == "I" and read.get_tag("Xf") == i + 3_000_000_000
        assert tags["Xg"] == (i, "i")
        assert tags["Xh"][1] == "I" and read.get_tag("Xh") == i + 3_000_000_000
        assert tags["Xi"] == (i / 4, "f")
        assert tags["Xj"] == (f"n{i}", "Z") and tags["Xk"] == (f"b{i}", "Z")
        assert ("Xl" in tags) == (i % 2 == 0) and (i % 2 or tags["Xl"] == (f"o{i}", "Z"))
        assert ("Xm" in tags) == (i % 3 != 0) and (i % 3 == 0 or tags["Xm"] == (i, "s"))
        assert tags["Xn"] == (int(i % 2 == 0), "C")
        # UB replaced: the new value goes last, the other tags keep their order
        assert read.get_tags()[-1] == ("UB", "replaced")
        others = [(t, v) for t, v in orig.get_tags() if t != "UB"]
        assert [(t, v) for t, v in read.get_tags() if not t.startswith("X") and t != "UB"] == others
        assert (read.query_name, read.query_sequence) == (orig.query_name, orig.query_sequence)


def test_columns_equal_pysams_values(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=700, int_cb=False)
    out = tmp_path / "out.bam"
    bf.map_batches(src, describe_batch, out, tags=["CB", "NH", "GN"], batch_size=64, timeout=60)
    with pysam.AlignmentFile(str(out), check_sq=False) as bam:
        got = list(bam)
    for read, orig in zip(got, reads, strict=True):
        assert read.get_tag("Y1") == orig.flag
        assert read.get_tag("Y2") == orig.reference_id
        assert read.get_tag("Y3") == orig.reference_start
        assert read.get_tag("Y4") == orig.mapping_quality
        assert read.get_tag("Y5") == orig.template_length
        assert read.get_tag("Y6") == orig.next_reference_id
        assert read.get_tag("Y7") == (orig.get_tag("CB") if orig.has_tag("CB") else "")
        assert read.get_tag("Y8") == orig.get_tag("NH")
        assert read.get_tag("Y9") == orig.has_tag("GN")
        assert read.get_tag("YA") == orig.query_sequence
    sizes = Counter(read.get_tag("YB") for read in got)
    assert set(sizes) <= {64, 700 % 64, 700 - 64 * (700 // 64)} and sum(sizes.values()) == 700


def test_by_tag_and_any_order(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=1500, no_cb=0.1)
    out = tmp_path / "out.bam"
    stats = bf.map_batches(src, keep_nh1_mark_length, out, tags=["NH"], by="CB", order="any", missing="drop",
                           timeout=60)
    expected = [r.to_string() + f"\tXN:i:{r.query_length}" for r in reads if r.has_tag("CB") and r.get_tag("NH") == 1]
    assert Counter(read_records(out)[1]) == Counter(expected)
    assert stats.dropped["missing_tag"] == sum(1 for r in reads if not r.has_tag("CB"))


# -- failures ---------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize(("func", "tags", "words"), [
    (raise_in_batch, (), "batch boom"),
    (wrong_dtype_mask, (), "a keep mask is a bool array"),
    (short_mask, (), "a keep mask is a bool array"),
    (short_column, (), "a column of shape"),
    (bad_tag_name, (), "a BAM tag name is a letter"),
    (unrequested_tag, ("CB",), "tag UB was not requested"),
])
def test_failures(tmp_path, func, tags, words):
    src = tmp_path / "in.bam"
    write_bam(src, n=500)
    out = tmp_path / "out.bam"
    with pytest.raises(WorkflowError) as info:
        bf.map_batches(src, func, out, tags=tags, batch_size=64, timeout=60)
    message = str(info.value).splitlines()[0]
    assert "map_batches.worker" in message and words in message
    assert not out.exists()
    assert_clean(output_dir=str(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        bf.map_batches(tmp_path / "x", raise_in_batch, tmp_path / "y", batch_size=0)
    with pytest.raises(ValueError, match="at most 16"):
        bf.map_batches(tmp_path / "x", raise_in_batch, tmp_path / "y", tags=[f"X{i}" for i in range(10)] +
                       [f"Y{i}" for i in range(7)])
    with pytest.raises(ValueError, match="order='input'"):
        bf.map_batches(tmp_path / "x", raise_in_batch, tmp_path / "y", by="CB")


# -- the worker loop on its own -----------------------------------------------------------------------

def raw_stream(records, frames_after=()):
    header = bamgen.header()
    body = []
    for i, rec in enumerate(records):
        body.append(rec)
        if i in frames_after:
            body.append(b"\0\0\0\0")
    return header, header + b"".join(body)


def run_raw(data, func, tags=(), batch_size=10):
    with bamgen.Fds() as fds:
        in_fd = fds.reader(data)
        out_fd, path = fds.writer()
        result = run_batches(in_fd, out_fd, func, tags, batch_size)
        return result, fds.read(path)


def test_arrays_kept_past_their_batch_stay_right():
    recs = [bamgen.record(f"r{i}", ref_id=0, pos=i, flag=0, seq="ACGT", cigar=((4, "M"),),
                          tags=[("XI", "i", i), ("XZ", "Z", f"z{i}")]) for i in range(95)]
    header, data = raw_stream(recs)
    kept = []

    def keep_views(batch):
        kept.append((batch.data, batch.offsets.copy(), batch.tag("XI"), batch.tag("XZ"), batch))
        return None

    result, out = run_raw(data, keep_views, tags=["XI", "XZ"], batch_size=10)
    assert result["reads_in"] == result["written"] == 95 and result["batches"] == 10
    assert out == data
    i = 0
    for raw, offsets, ints, texts, batch in kept:
        for k in range(len(offsets) - 1):
            assert bytes(raw[offsets[k]:offsets[k + 1]]) == recs[i]
            assert ints[k] == i and texts[k] == f"z{i}".encode()
            assert batch.tag("XI")[k] == i  # the batch itself, read again later
            i += 1
    assert i == 95


def test_a_batch_used_after_its_turn_is_refused():
    """A batch's records are read where the reader put them; once the kernel
    moved on, decoding from the old batch raises instead of reading other bytes."""
    from bamflow.kernels.record import BatchKernel, tag_values

    _, data = raw_stream([bamgen.record(f"r{i}", tags=[("XI", "i", i)]) for i in range(5)])
    with bamgen.Fds() as fds:
        kernel = BatchKernel(fds.reader(data), fds.writer()[0], ["XI"], 2)
        kernel.start()

        def columns():
            return [np.empty(2, t) for t in (np.uint16, np.int32, np.int32, np.uint8, np.int32, np.int32, np.int32,
                                             np.int32)] + [np.empty(3, np.int64), np.empty((1, 2), np.int64)]

        first = columns()
        assert kernel.next_batch(*first) == 2
        generation = kernel.generation
        kept = kernel.copy_batch()
        kernel.write_batch(None, [])
        assert kernel.next_batch(*columns()) == 2
        out = [np.empty(2, np.int64), np.empty(2, np.float64), np.empty(2, np.uint8)]
        with pytest.raises(RuntimeError, match="this batch is over"):
            tag_values(kernel, generation, first[-1][0], *out)
        tag_values(kept, 0, first[-1][0], *out)  # its copy stays right
        assert list(out[0]) == [0, 1]


def test_frames_end_batches_and_pass_on():
    recs = [bamgen.record(f"r{i}", tags=[("XI", "i", i)]) for i in range(30)]
    header, data = raw_stream(recs, frames_after={4, 9, 10, 29})
    sizes = []

    def drop_odd(batch):
        sizes.append(batch.n)
        return batch.tag("XI") % 2 == 0

    result, out = run_raw(data, drop_odd, tags=["XI"], batch_size=4)
    assert sizes == [4, 1, 4, 1, 1, 4, 4, 4, 4, 3]
    kept = [recs[i] if i % 2 == 0 else None for i in range(30)]
    expected = []
    for i, rec in enumerate(kept):
        if rec is not None:
            expected.append(rec)
        if i in {4, 9, 10, 29}:
            expected.append(b"\0\0\0\0")
    assert out == header + b"".join(expected)
    assert (result["reads_in"], result["written"]) == (30, 15)


def test_tag_kinds_and_missing_values():
    recs = [bamgen.record("a", tags=[("XT", "i", 777), ("XF", "f", 1.5), ("XB", "B", ("c", [1]))]),
            bamgen.record("b", tags=[("XT", "Z", "abc"), ("XF", "i", 2)]),
            bamgen.record("c", tags=[("XT", "A", "q")])]
    _, data = raw_stream(recs)
    seen = {}

    def look(batch):
        seen["str"] = batch.tag("XT")
        seen["str_missing"] = batch.tag("XF", kind="float", missing=-1.0)
        seen["has"] = batch.has_tag("XF")
        seen["isin"] = batch.isin("XT", ["777", "q"])
        for kind in ("int", "float"):
            with pytest.raises(ValueError, match="strings"):
                batch.tag("XT", kind=kind)
        with pytest.raises(ValueError, match="B array"):
            batch.tag("XB")
        with pytest.raises(ValueError, match="kind must be"):
            batch.tag("XF", kind="complex")
        with pytest.raises(KeyError, match="was not requested"):
            batch.tag("NH")
        return None

    run_raw(data, look, tags=["XT", "XF", "XB"], batch_size=10)
    assert list(seen["str"]) == [b"777", b"abc", b"q"]  # canonical: integers in decimal
    assert list(seen["str_missing"]) == [1.5, 2.0, -1.0]
    assert list(seen["has"]) == [True, True, False]
    assert list(seen["isin"]) == [True, False, True]


def test_empty_stream():
    _, data = raw_stream([])
    result, out = run_raw(data, keep_nh1_mark_length, tags=["NH"])
    assert result["reads_in"] == result["batches"] == 0
    assert out == bamgen.header()


def test_the_kernel_refuses_short_columns():
    from bamflow.kernels.record import BatchKernel

    _, data = raw_stream([bamgen.record("a")])
    with bamgen.Fds() as fds:
        kernel = BatchKernel(fds.reader(data), fds.writer()[0], (), 10)
        kernel.start()
        short = [np.empty(5, t) for t in (np.uint16, np.int32, np.int32, np.uint8, np.int32, np.int32, np.int32,
                                           np.int32)]
        with pytest.raises(ValueError, match="shorter than the batch size"):
            kernel.next_batch(*short, np.empty(11, np.int64), np.empty((1, 10), np.int64))


def test_records_larger_than_the_input_buffer():
    """Records of 5 MB (the kernel reads 4 MiB at first): the buffer grows mid-batch."""
    big = [bamgen.record(f"big{i}", tags=[("XB", "B", ("i", list(range(i, i + 1_300_000)))), ("XI", "i", i)])
           for i in range(3)]
    small = [bamgen.record(f"s{i}", tags=[("XI", "i", 10 + i)]) for i in range(5)]
    recs = [small[0], big[0], small[1], big[1], big[2], *small[2:]]
    header, data = raw_stream(recs)
    seen = []

    def keep_even(batch):
        values = batch.tag("XI")
        seen.extend(values.tolist())
        return values % 2 == 0

    result, out = run_raw(data, keep_even, tags=["XI"], batch_size=3)
    assert seen == [10, 0, 11, 1, 2, 12, 13, 14]
    assert out == header + b"".join(r for r, v in zip(recs, seen, strict=True) if v % 2 == 0)
    assert result["reads_in"] == 8
