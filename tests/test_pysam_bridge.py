"""RawWriter (bamflow.kernels.pysam_bridge): pysam AlignedSegments written as a
raw BAM stream, checked against htslib itself (pysam "wbu" output, whose BGZF
is undone with gzip), read back with pysam, and read by the kernels."""

import array
import gzip
import os

import bamgen
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.bam.options import CollectOptions
from bamflow.kernels.bam import Collector, RecordChunks
from bamflow.kernels.pysam_bridge import RawWriter

REFS = (("chr1", 100_000_000), ("chr2", 50_000))
HDR = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6"}, "SQ": [{"SN": n, "LN": n_} for n, n_ in REFS]})
HEADER = bamgen.header(text=b"@HD\tVN:1.6\n", refs=REFS)
slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

QNAME = st.text(st.sampled_from([chr(c) for c in range(0x21, 0x7F) if c != 0x40]), min_size=1, max_size=254)
INT_TYPES = {"c": (-128, 127), "C": (0, 255), "s": (-32768, 32767), "S": (0, 65535), "i": (-(2**31), 2**31 - 1),
             "I": (0, 2**32 - 1)}
ARRAY_CODES = {"c": "b", "C": "B", "s": "h", "S": "H", "i": "i", "I": "I", "f": "f"}
FLOAT = st.floats(width=32, allow_nan=False, allow_infinity=False)
CONSUMES_QUERY = {0, 1, 4, 7, 8}


@st.composite
def tag_values(draw):
    typ = draw(st.sampled_from(["A", "Z", "H", "f", "B", *INT_TYPES]))
    if typ == "A":
        return typ, draw(st.sampled_from("AZaz!~"))
    if typ == "Z":
        return typ, draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
    if typ == "H":
        return typ, draw(st.binary(max_size=8)).hex().upper()
    if typ == "f":
        return typ, draw(FLOAT)
    if typ == "B":
        sub = draw(st.sampled_from(sorted(ARRAY_CODES)))
        elems = FLOAT if sub == "f" else st.integers(*INT_TYPES[sub])
        return typ, array.array(ARRAY_CODES[sub], draw(st.lists(elems, min_size=1, max_size=8)))
    return typ, draw(st.integers(*INT_TYPES[typ]))


@st.composite
def segments(draw):
    a = pysam.AlignedSegment(HDR)
    a.query_name = draw(QNAME)
    a.flag = draw(st.integers(0, 0xFFF))
    a.reference_id = draw(st.sampled_from([-1, 0, 1]))
    a.reference_start = -1 if a.reference_id < 0 else draw(st.integers(0, 40000))
    a.mapping_quality = draw(st.integers(0, 255))
    a.next_reference_id = draw(st.sampled_from([-1, 0, 1]))
    a.next_reference_start = -1 if a.next_reference_id < 0 else draw(st.integers(0, 40000))
    a.template_length = draw(st.integers(-(2**31), 2**31 - 1))
    cigar = draw(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8]), st.integers(1, 50)), max_size=8))
    qlen = sum(n for op, n in cigar if op in CONSUMES_QUERY)
    if not cigar:
        qlen = draw(st.integers(0, 30))
    if cigar:
        a.cigartuples = cigar
    if qlen:
        a.query_sequence = "".join(draw(st.lists(st.sampled_from("ACGTN="), min_size=qlen, max_size=qlen)))
        if draw(st.booleans()):
            a.query_qualities = array.array("B", draw(st.lists(st.integers(0, 93), min_size=qlen, max_size=qlen)))
    for tag in draw(st.lists(st.sampled_from(["XA", "XB", "YZ", "zz", "RG", "CB", "a1"]), max_size=6, unique=True)):
        typ, value = draw(tag_values())
        if typ == "B":
            a.set_tag(tag, value)
        else:
            a.set_tag(tag, value, value_type=typ)
    return a


def write_raw(reads, buffer_size=1 << 20, frames_after=()):
    """The RawWriter stream of reads (a frame after the reads whose index is in frames_after)."""
    with bamgen.Fds() as fds:
        fd, path = fds.writer()
        fds.forget(fd)  # close() closes it
        w = RawWriter(fd, HEADER, buffer_size)
        for i, read in enumerate(reads):
            assert w.write(read) == 1
            if i in frames_after:
                w.frame()
        assert w.records == len(reads)
        w.close()
        return fds.read(path)


def write_pysam(reads, tmp_path):
    """What htslib itself writes for reads: pysam "wbu" (BGZF level 0), gzip-decompressed."""
    path = str(tmp_path / "htslib.bam")
    with pysam.AlignmentFile(path, "wbu", header=HDR) as out:
        for read in reads:
            out.write(read)
    with open(path, "rb") as f:
        return gzip.decompress(f.read())


def read_back(data, tmp_path, name="raw.bam"):
    """pysam reading a raw (uncompressed) BAM stream: htslib detects it."""
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    with pysam.AlignmentFile(path, "rb", check_sq=False) as bam:
        return list(bam)


def same_read(a, b):
    assert a.query_name == b.query_name
    assert (a.flag, a.reference_id, a.reference_start, a.mapping_quality) == (
        b.flag, b.reference_id, b.reference_start, b.mapping_quality)
    assert (a.next_reference_id, a.next_reference_start, a.template_length) == (
        b.next_reference_id, b.next_reference_start, b.template_length)
    assert a.cigartuples == b.cigartuples
    assert a.query_sequence == b.query_sequence
    assert list(a.query_qualities or []) == list(b.query_qualities or [])
    assert a.get_tags(with_value_type=True) == b.get_tags(with_value_type=True)


@settings(slow, max_examples=40)
@given(st.lists(segments(), max_size=12), st.sampled_from([1, 7, 64, 1 << 20]))
def test_raw_writer_writes_what_htslib_writes(tmp_path_factory, reads, buffer_size):
    tmp_path = tmp_path_factory.mktemp("rw")
    raw = write_raw(reads, buffer_size)
    head, recs = bamgen.split_stream(raw)
    assert head == HEADER
    assert recs == bamgen.split_stream(write_pysam(reads, tmp_path))[1]  # byte for byte
    back = read_back(raw, tmp_path)
    assert len(back) == len(reads)
    for a, b in zip(back, reads, strict=True):
        same_read(a, b)
    # and the kernels take the stream as it is
    with bamgen.Fds() as fds:
        chunks = RecordChunks(fds.reader(raw), buffer_size=3)
        assert chunks.header() == HEADER
        got = []
        while c := chunks.next_chunk():
            got.append(c)
        assert b"".join(got) == b"".join(recs) and chunks.records == len(reads)


def long_read(n_ops, pattern, with_seq=True):
    a = pysam.AlignedSegment(HDR)
    a.query_name = f"long{n_ops}"
    a.reference_id = 0
    a.reference_start = 1234
    a.mapping_quality = 60
    a.cigartuples = [pattern[i % len(pattern)] for i in range(n_ops)]
    qlen = sum(n for op, n in a.cigartuples if op in CONSUMES_QUERY)
    if with_seq:
        a.query_sequence = "ACGTN" * (qlen // 5) + "A" * (qlen % 5)
        a.query_qualities = array.array("B", [i % 40 for i in range(qlen)])
    a.set_tag("NM", 3)
    a.set_tag("XB", array.array("f", [0.5, -1.0]))
    return a


@pytest.mark.parametrize("n_ops, pattern, with_seq", [
    (65535, [(0, 1), (1, 1)], True),                                  # the most a BAM CIGAR field holds
    (65536, [(0, 1), (1, 1)], True),                                  # one more: CG
    (70001, [(4, 2), (0, 3), (2, 1), (7, 2), (8, 1), (3, 5), (1, 1)], True),
    (66000, [(0, 2), (2, 1)], False),                                 # no sequence: a 0S placeholder
])
def test_long_cigar_goes_to_cg_and_comes_back(tmp_path, n_ops, pattern, with_seq):
    read = long_read(n_ops, pattern, with_seq)
    raw = write_raw([read], buffer_size=4096)
    rec = bamgen.split_stream(raw)[1][0]
    assert len(rec) > 1 << 16
    assert rec == bamgen.split_stream(write_pysam([read], tmp_path))[1][0]  # what htslib writes
    f = bamgen.parse_record(rec)
    if n_ops <= 65535:
        assert f["cigar"] == [(n, "MIDNSHP=X"[op]) for op, n in read.cigartuples]
        assert "CG" not in [t for t, _, _ in f["tags"]]
    else:
        ref_len = sum(n for op, n in read.cigartuples if op in (0, 2, 3, 7, 8))
        assert f["cigar"] == [(read.query_length if with_seq else 0, "S"), (ref_len, "N")]  # the placeholder
        tag, typ, (sub, ops) = f["tags"][-1]
        assert (tag, typ, sub) == ("CG", "B", "I")
        assert [(v & 0xF, v >> 4) for v in ops] == read.cigartuples
    (back,) = read_back(raw, tmp_path)
    assert back.cigartuples == read.cigartuples and not back.has_tag("CG")
    same_read(back, read)


def test_long_read_names(tmp_path):
    reads = []
    for n in (1, 2, 3, 4, 5, 8, 100, 253, 254):  # every padding of the name (htslib aligns the CIGAR to 4 bytes)
        a = pysam.AlignedSegment(HDR)
        a.query_name = "q" * n
        a.flag = 4
        a.query_sequence = "ACG"
        a.set_tag("NM", n)
        reads.append(a)
    raw = write_raw(reads)
    assert [bamgen.read_name(r) for r in bamgen.split_stream(raw)[1]] == ["q" * n for n in (1, 2, 3, 4, 5, 8, 100, 253,
                                                                                            254)]
    assert bamgen.split_stream(raw)[1] == bamgen.split_stream(write_pysam(reads, tmp_path))[1]


def test_frames_between_records_restore_input_order():
    """Workers writing with RawWriter, a frame after each chunk: Collector(order="input")."""
    reads = []
    for i in range(100):
        a = pysam.AlignedSegment(HDR)
        a.query_name = f"r{i}"
        a.flag = 4
        a.query_sequence = "ACGT" * (17000 if i % 17 == 0 else 3)
        reads.append(a)
    chunk, n = 7, 3
    streams = []
    for k in range(n):
        mine = [j for j in range(0, 100, chunk) if (j // chunk) % n == k]
        chunk_reads = [reads[i] for j in mine for i in range(j, min(j + chunk, 100))]
        ends = {idx for idx, read in enumerate(chunk_reads) if (int(read.query_name[1:]) + 1) % chunk == 0}
        streams.append(write_raw(chunk_reads, 5, frames_after=ends))
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = Collector([fds.reader(s) for s in streams], out, CollectOptions("input"), buffer_size=3).run()
        assert [bamgen.read_name(r) for r in bamgen.split_stream(fds.read(path))[1]] == [f"r{i}" for i in range(100)]
    assert stats["records"] == 100
    # a kernel that allows no frames names the first one
    with bamgen.Fds() as fds:
        chunks = RecordChunks(fds.reader(streams[0]), "w0: ")
        chunks.header()
        with pytest.raises(ValueError, match=r"^w0: record 7: block_size 0 < 32$"):
            while chunks.next_chunk():
                pass


def test_flush_and_close():
    a = pysam.AlignedSegment(HDR)
    a.query_name = "x"
    a.flag = 4
    with bamgen.Fds() as fds:
        fd, path = fds.writer()
        fds.forget(fd)
        w = RawWriter(fd, HEADER)
        w.write(a)
        assert fds.read(path) == b""  # buffered
        w.flush()
        one = fds.read(path)
        assert one[:len(HEADER)] == HEADER and bamgen.read_name(bamgen.split_stream(one)[1][0]) == "x"
        w.frame()
        w.write(a)
        w.close()
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
        w.close()  # twice is fine
        assert fds.read(path) == one + b"\0\0\0\0" + bamgen.split_stream(one)[1][0]
        assert w.records == 2


def test_write_refuses_what_bam_cannot_hold():
    with bamgen.Fds() as fds:
        fd, path = fds.writer()
        fds.forget(fd)
        w = RawWriter(fd, HEADER)
        a = pysam.AlignedSegment(HDR)
        a.query_name = "big"
        a.reference_id = 0
        a.reference_start = 2**31
        with pytest.raises(ValueError, match=r"^read 'big': positional data is too large for BAM$"):
            w.write(a)
        with pytest.raises(TypeError):
            w.write("not a read")
        assert w.records == 0
        w.close()
        assert fds.read(path) == HEADER


def test_unmapped_read_without_sequence(tmp_path):
    a = pysam.AlignedSegment(HDR)
    a.query_name = "empty"
    a.flag = 4
    raw = write_raw([a])
    assert bamgen.parse_record(bamgen.split_stream(raw)[1][0])["seq"] == ""
    assert bamgen.split_stream(raw)[1] == bamgen.split_stream(write_pysam([a], tmp_path))[1]
