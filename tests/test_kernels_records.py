"""The one record layer (bamflow.kernels._records), checked through every kernel
that reads records: Distributor (round-robin, by name, by tag), Collector (every
order), RecordChunks, Filter, Splitter, TagCounter and Corrector.

Streams are built with tests/bamgen.py (struct.pack, independently of the
kernels); expected values come from bamgen's reference canonical()/fnv1a64 and
from brute-force Python, never from the code under test. Every kernel reads a
real file descriptor (a temporary file, or a pipe fed by a forked child).
"""

import collections
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from array import array

import bamgen
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.bam.options import CollectOptions, DistributeOptions
from bamflow.kernels._bgzf import BgzfError
from bamflow.kernels._records import RecordReader, Tags, ValueTable, parse_header, stable_hash, value_key
from bamflow.kernels.bam import FRAME, Collector, Distributor, RecordChunks
from bamflow.kernels.presets import Corrector, TagCounter
from bamflow.kernels.select import Filter, Splitter

HEADER = bamgen.header()  # two references: chr1, chr2
SOURCE = "in.bam: "
SIZES = (1, 2, 3, 5, 7, 64, 1 << 16)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def names_of(data, header=True):
    """Read names of a raw stream (with a header) or of headerless record bytes."""
    recs = bamgen.split_stream(data)[1] if header else bamgen.split_records(data)
    return [bamgen.read_name(r) for r in recs if len(r) > 4]  # a frame (block_size 0) has no name


# -- every kernel that reads records, run the same way ----------------------------------------
#
# A runner takes (fds, in_fd, buffer_size, source) and returns (records read,
# read names passed on, or None for a kernel that only counts). Records given
# to them carry CB:Z:AAA unless a test says otherwise, are unmapped, and so
# are sorted both by coordinate and by CB.

def _distribute(by):
    def run(fds, in_fd, buf, source):
        outs = [fds.writer() for _ in range(3)]
        stats = Distributor(in_fd, [fd for fd, _ in outs], DistributeOptions(by=by, missing="drop"),
                            source=source, buffer_size=buf, out_buffer_size=buf).run()
        return stats["records"], sorted(n for _, p in outs for n in names_of(fds.read(p)))
    return run


def _collect(order):
    def run(fds, in_fd, buf, source):
        out, path = fds.writer()
        stats = Collector([in_fd], out, CollectOptions(order), buffer_size=buf, out_buffer_size=buf).run()
        return stats["per_input"][0], names_of(fds.read(path))
    return run


def _chunks(fds, in_fd, buf, source):
    chunks = RecordChunks(in_fd, source, chunk_bytes=max(buf, 40), buffer_size=buf)
    assert chunks.header()[:4] == b"BAM\x01"
    got = []
    while data := chunks.next_chunk():
        got += names_of(data, header=False)
    return chunks.records, got


def _filter(fds, in_fd, buf, source):
    out, path = fds.writer()
    stats = Filter(in_fd, out, ValueTable([b"AAA"]), ["CB"], source=source, buffer_size=buf,
                   out_buffer_size=buf).run()
    return stats["records_in"], names_of(fds.read(path))


def _split(fds, in_fd, buf, source):
    got = []
    stats = Splitter(in_fd, ["CB"], lambda out, key, data: got.extend(names_of(data, header=False)),
                     flush_size=max(buf, 40), source=source, buffer_size=buf).run()
    return stats["records"], got


def _count(fds, in_fd, buf, source):
    table, stats, _ = TagCounter(in_fd, "CB", skip_secondary=False, source=source, buffer_size=buf).run()
    return stats["records"], None


def _correct(fds, in_fd, buf, source):
    out, path = fds.writer()
    stats = Corrector(in_fd, out, "CB", "CY", "XC", lambda raw, qual: (0, raw, True), source=source,
                      buffer_size=buf, out_buffer_size=buf).run()
    return stats["records"], names_of(fds.read(path))


KERNELS = {
    "distribute-round-robin": _distribute(None),
    "distribute-name": _distribute("name"),
    "distribute-tag": _distribute("CB"),
    "collect-any": _collect("any"),
    "collect-input": _collect("input"),
    "collect-coordinate": _collect("coordinate"),
    "collect-tag": _collect("tag:CB"),
    "record-chunks": _chunks,
    "filter": _filter,
    "split": _split,
    "count": _count,
    "correct": _correct,
}
UNORDERED = {"distribute-round-robin", "distribute-name", "distribute-tag"}
FRAMES_ALLOWED = {"collect-input", "correct"}


def prefix(kernel, source=SOURCE):
    """How the kernel's messages start: the collector names its inputs itself."""
    return "input 0: " if kernel.startswith("collect") else source


def bgzf_source(kernel):
    return "input 0" if kernel.startswith("collect") else SOURCE.rstrip(": ")


def run_kernel(kernel, data, buf=1 << 16, source=SOURCE):
    with bamgen.Fds() as fds:
        return KERNELS[kernel](fds, fds.reader(data), buf, source)


def rec(name, **kw):
    kw.setdefault("tags", [("CB", "Z", "AAA")])
    return bamgen.record(name, **kw)


def assert_one_error(excinfo):
    """One plain message: a single line, no chained exception."""
    message = str(excinfo.value)
    assert "\n" not in message
    assert excinfo.value.__cause__ is None


all_kernels = pytest.mark.parametrize("kernel", sorted(KERNELS))


# -- records cross buffer refills in every kernel ---------------------------------------------

def mixed_stream():
    """Small records, records over 64 KB (a long sequence, a long B array), a
    254-character read name, and a real read named like the old chunk-end marker."""
    recs = [
        rec("r0"),
        rec("bamflow:chunk-end"),
        rec("big-seq", seq="ACGT" * 17000, tags=[("XA", "i", 1), ("CB", "Z", "AAA")]),
        rec("n" * 254, tags=[("CB", "Z", "AAA"), ("XF", "f", 0.5)]),
        rec("big-array", tags=[("XY", "B", ("I", list(range(17000)))), ("CB", "Z", "AAA")]),
        rec("r5", seq="ACGTN", qual=b"\x01\x02\x03\x04\x05"),
        rec("bamflow:chunk-end"),
    ]
    return HEADER + b"".join(recs), [bamgen.read_name(r) for r in recs]


@all_kernels
def test_tiny_buffers_every_kernel(kernel):
    data, names = mixed_stream()
    for buf in SIZES:
        records, got = run_kernel(kernel, data, buf)
        assert records == len(names), (kernel, buf)
        if got is not None:
            assert got == (sorted(names) if kernel in UNORDERED else names), (kernel, buf)


@all_kernels
def test_chunk_end_name_is_an_ordinary_read(kernel):
    """Chunk ends are frames now: a read named bamflow:chunk-end is just a read."""
    data = HEADER + b"".join(rec(n) for n in ["bamflow:chunk-end", "a", "bamflow:chunk-end"])
    records, got = run_kernel(kernel, data, 3)
    assert records == 3
    if got is not None:
        assert sorted(got) == sorted(["bamflow:chunk-end", "a", "bamflow:chunk-end"])


def test_chunk_end_name_counted_by_tag_counter():
    data = HEADER + rec("bamflow:chunk-end") + rec("x", tags=[("CB", "Z", "C")])
    with bamgen.Fds() as fds:
        table, stats, _ = TagCounter(fds.reader(data), "CB").run()
    assert table.counts() == {b"AAA": 1, b"C": 1} and stats["counted"] == 2


# -- malformed records: one clear error naming the record, in every kernel ---------------------

def _bad(**kw):
    kw.setdefault("tags", [("CB", "Z", "AAA")])
    return bamgen.record("bad", **kw)


BASE = _bad(seq="ACGTA")  # l_read_name 4, n_cigar 0, l_seq 5
BS_OFF, NAME_LEN_OFF, NCIGAR_OFF, LSEQ_OFF = 0, 4 + 8, 4 + 12, 4 + 16
REF_OFF, MATE_REF_OFF = 4, 4 + 20
REC2 = r"record 2(?: \(read 'bad'\))?: "  # the read name where it is known
AUX2 = r"record 2 \(read 'bad'\): "       # aux checks come after the name: it is known
MALFORMED = [
    ("block_size 20", struct.pack("<I", 20) + b"\0" * 20, REC2 + r"block_size 20 < 32"),
    ("block_size 31", struct.pack("<I", 31) + b"\0" * 31, REC2 + r"block_size 31 < 32"),
    ("block_size 2^28+1", bamgen.patch(BASE, BS_OFF, "<I", (1 << 28) + 1), REC2 + r"block_size 268435457 > 268435456"),
    ("block_size > 2^31", bamgen.patch(BASE, BS_OFF, "<I", 0x80000010), REC2 + r"block_size 2147483664 > 268435456"),
    ("block_size 2^32-1", bamgen.patch(BASE, BS_OFF, "<I", 0xFFFFFFFF), REC2 + r"block_size 4294967295 > 268435456"),
    ("l_read_name past the end", bamgen.patch(BASE, NAME_LEN_OFF, "<B", 250), REC2 + r"l_read_name 250\b.*block_size"),
    ("l_read_name 0", bamgen.patch(BASE, NAME_LEN_OFF, "<B", 0), REC2 + r"l_read_name 0\b"),
    ("n_cigar past the end", bamgen.patch(BASE, NCIGAR_OFF, "<H", 5000), REC2 + r".*n_cigar_op 5000\b"),
    ("l_seq past the end", bamgen.patch(BASE, LSEQ_OFF, "<I", 1000), REC2 + r".*l_seq 1000\b"),
    ("l_seq 2^30", bamgen.patch(BASE, LSEQ_OFF, "<I", 1 << 30), REC2 + r".*l_seq 1073741824\b"),
    ("l_seq 2^32-1", bamgen.patch(BASE, LSEQ_OFF, "<I", 0xFFFFFFFF), REC2 + r".*l_seq 4294967295\b"),
    ("name not NUL-terminated", bamgen.patch(BASE, 4 + 32 + 3, "<B", ord("x")), REC2 + r".*not NUL-terminated"),
    ("refID = n_ref", bamgen.patch(BASE, REF_OFF, "<i", 2), REC2 + r"refID 2 is not in the header's 2 references"),
    ("refID -2", bamgen.patch(BASE, REF_OFF, "<i", -2), REC2 + r"refID -2 is not in"),
    ("mate refID = n_ref", bamgen.patch(BASE, MATE_REF_OFF, "<i", 2), REC2 + r"mate refID 2 is not in"),
    ("mate refID -7", bamgen.patch(BASE, MATE_REF_OFF, "<i", -7), REC2 + r"mate refID -7 is not in"),
    ("Z without NUL", _bad(raw_aux=b"XZZabc"), AUX2 + r".*\bXZ\b.*runs past"),
    ("H without NUL", _bad(raw_aux=b"XHH0A"), AUX2 + r".*\bXH\b.*runs past"),
    ("Z at the very end", _bad(raw_aux=b"XZZ"), AUX2 + r".*\bXZ\b.*runs past"),
    ("i with 2 bytes left", _bad(raw_aux=b"XIi\x01\x02"), AUX2 + r".*\bXI\b.*runs past"),
    ("f with 3 bytes left", _bad(raw_aux=b"XFf\x01\x02\x03"), AUX2 + r".*\bXF\b.*runs past"),
    ("s with 1 byte left", _bad(raw_aux=b"XSs\x01"), AUX2 + r".*\bXS\b.*runs past"),
    ("A with no byte", _bad(raw_aux=b"XAA"), AUX2 + r".*\bXA\b.*runs past"),
    ("B count past the end", _bad(raw_aux=b"XBBI" + struct.pack("<I", 3) + b"\0" * 8), AUX2 + r".*\bXB\b.*runs past"),
    ("B count 2^32-1", _bad(raw_aux=b"XBBi" + struct.pack("<I", 0xFFFFFFFF) + b"\0" * 8), AUX2 + r".*\bXB\b.*runs past"),
    ("B header cut short", _bad(raw_aux=b"XBBc\x01\x00"), AUX2 + r".*\bXB\b.*runs past"),
    ("bad type byte", _bad(raw_aux=b"XQq\x01"), AUX2 + r"bad type 'q' of tag '?XQ'?"),
    ("NUL type byte", _bad(raw_aux=b"XQ\x00\x01"), AUX2 + r"bad type '\\x00' of tag '?XQ'?"),
    ("bad B subtype", _bad(raw_aux=b"XBBq" + struct.pack("<I", 1) + b"\0"), AUX2 + r"bad B array subtype 'q' of tag '?XB'?"),
    ("B subtype A", _bad(raw_aux=b"XBBA" + struct.pack("<I", 1) + b"\0"), AUX2 + r"bad B array subtype 'A' of tag '?XB'?"),
    ("two bytes of aux", _bad(raw_aux=b"XQ"), AUX2 + r"aux data runs past the record end"),
    ("one byte of aux", _bad(raw_aux=b"X"), AUX2 + r"aux data runs past the record end"),
]


@all_kernels
@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_record_every_kernel(kernel, case):
    _, raw, message = case
    data = HEADER + rec("g0") + rec("g1") + raw + rec("g3")
    for buf in (1, 7, 1 << 16):
        with pytest.raises(ValueError, match="^" + re.escape(prefix(kernel)) + message) as excinfo:
            run_kernel(kernel, data, buf)
        assert type(excinfo.value) is ValueError
        assert_one_error(excinfo)


@all_kernels
def test_malformed_record_message_without_source(kernel):
    data = HEADER + rec("g0") + _bad(raw_aux=b"XQq\x01")
    expected = "^input 0: " if kernel.startswith("collect") else "^"
    with pytest.raises(ValueError, match=expected + r"record 1 \(read 'bad'\): bad type"):
        run_kernel(kernel, data, 5, source="")


@all_kernels
def test_truncated_stream_every_kernel(kernel):
    third = rec("r2", seq="ACGT" * 30, tags=[("CB", "Z", "AAA"), ("XB", "B", ("s", [1, 2, 3]))])
    whole = HEADER + rec("r0") + rec("r1") + third
    at = len(whole) - len(third)
    for buf in (1, 5, 1 << 16):
        for cut in (1, 2, 3, 4, 5, 20, 35, 36, 37, 40, len(third) - 1):
            with pytest.raises(ValueError, match="^" + re.escape(prefix(kernel)) + r"BAM stream ends inside record 2$"):
                run_kernel(kernel, whole[:at + cut], buf)
        assert run_kernel(kernel, whole[:at], buf)[0] == 2  # ends right after record 1: fine
        assert run_kernel(kernel, whole, buf)[0] == 3


@all_kernels
def test_truncated_or_foreign_header_every_kernel(kernel):
    p = re.escape(prefix(kernel))
    for buf in (1, 7, 1 << 16):
        with pytest.raises(ValueError, match=f"^{p}not a BAM stream \\(empty\\)$"):
            run_kernel(kernel, b"", buf)
        for cut in (1, 3, 4, 7, 8, 9, 20, len(HEADER) - 9, len(HEADER) - 4, len(HEADER) - 1):
            with pytest.raises(ValueError, match=f"^{p}truncated BAM header$"):
                run_kernel(kernel, HEADER[:cut], buf)
        with pytest.raises(ValueError, match=f"^{p}not a BAM stream \\(magic b'@"):  # as many bytes as were read
            run_kernel(kernel, b"@HD\tVN:1.6\n", buf)
        assert run_kernel(kernel, HEADER, buf)[0] == 0


CORRUPT_HEADERS = [
    ("l_text 0x7FFFFFF0", b"BAM\x01" + struct.pack("<I", 0x7FFFFFF0), r"corrupt BAM header: l_text 2147483632"),
    ("l_text -1", b"BAM\x01" + struct.pack("<i", -1), r"corrupt BAM header: l_text -1\b"),
    ("l_text 2^30+1", b"BAM\x01" + struct.pack("<I", (1 << 30) + 1), r"corrupt BAM header: l_text 1073741825"),
    ("n_ref 0x7FFFFFF0", b"BAM\x01" + struct.pack("<iI", 0, 0x7FFFFFF0), r"corrupt BAM header: n_ref 2147483632"),
    ("n_ref -3", b"BAM\x01" + struct.pack("<ii", 0, -3), r"corrupt BAM header: n_ref -3\b"),
    ("n_ref 2^26+1", b"BAM\x01" + struct.pack("<iI", 0, (1 << 26) + 1), r"corrupt BAM header: n_ref 67108865"),
    ("l_name 0", b"BAM\x01" + struct.pack("<iii", 0, 1, 0), r"corrupt BAM header: reference 0 has a name of length 0"),
    ("l_name 2^31-1", b"BAM\x01" + struct.pack("<iii", 0, 1, 0x7FFFFFFF),
     r"corrupt BAM header: reference 0 has a name of length 2147483647"),
]


@all_kernels
@pytest.mark.parametrize("case", CORRUPT_HEADERS, ids=[c[0] for c in CORRUPT_HEADERS])
def test_corrupt_header_rejected_at_once(kernel, case):
    """Rejected from the first bytes: the rest of the stream is not needed."""
    _, head, message = case
    for buf in (1, 1 << 16):
        with pytest.raises(ValueError, match="^" + re.escape(prefix(kernel)) + message):
            run_kernel(kernel, head, buf)


MEMORY_SCRIPT = textwrap.dedent("""
    import os, re, resource, struct, sys, time
    sys.path.insert(0, {tests!r})
    import bamgen
    import test_kernels_records as t

    H = bamgen.header()
    good = t.rec("g0")
    cases = [
        (H + good + struct.pack("<I", 0x80000010) + b"\\0" * 36, "block_size 2147483664 > "),
        (H + good + struct.pack("<I", 0xFFFFFFFF) + b"\\0" * 36, "block_size 4294967295 > "),
        (H + good + bamgen.patch(good, 0, "<I", 1 << 28), "BAM stream ends inside record 1"),
        (H + good + bamgen.patch(bamgen.patch(good, 0, "<I", 1 << 28), 4 + 16, "<I", 1 << 29), "l_seq 536870912"),
        (b"BAM\\x01" + struct.pack("<I", 0x7FFFFFF0) + b"@HD", "l_text 2147483632"),
        (b"BAM\\x01" + struct.pack("<I", 1 << 30) + b"@HD\\tVN:1.6\\n", "truncated BAM header"),
        (b"BAM\\x01" + struct.pack("<iI", 0, 1 << 26) + struct.pack("<i", 5) + b"chr1\\0" + struct.pack("<i", 9),
         "truncated BAM header"),
    ]
    vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + (160 << 20)  # room for the buffers, not for a 256 MiB record or a 1 GiB header
    if hard != resource.RLIM_INFINITY and hard < limit:
        print("SKIP")
        sys.exit(0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    for data, message in cases:
        for kernel in sorted(t.KERNELS):
            for buf in (1, 1 << 16):
                start = time.monotonic()
                try:
                    t.run_kernel(kernel, data, buf)
                except MemoryError:
                    print("FAIL", kernel, buf, message, "MemoryError")
                    sys.exit(1)
                except ValueError as e:
                    if message not in str(e):
                        print("FAIL", kernel, buf, message, repr(str(e)))
                        sys.exit(1)
                else:
                    print("FAIL", kernel, buf, message, "no error")
                    sys.exit(1)
                if time.monotonic() - start > 2:
                    print("FAIL", kernel, buf, message, "slow")
                    sys.exit(1)
    print("OK")
""")


def test_huge_lengths_fail_fast_without_allocating():
    """A block_size, l_seq, l_text or n_ref read from the stream never sizes an
    allocation: under an address-space limit of 160 MiB above the start, every
    kernel fails fast with the ValueError (not MemoryError)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(tests=TESTS_DIR)], capture_output=True,
                          text=True, timeout=100, cwd=TESTS_DIR)
    if proc.stdout.strip() == "SKIP":
        pytest.skip("the hard address-space limit is too low for this test")
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


# -- frames --------------------------------------------------------------------------------

@all_kernels
def test_frames_only_where_allowed(kernel):
    data = HEADER + rec("r0") + FRAME + rec("r1") + FRAME
    if kernel in FRAMES_ALLOWED:
        for buf in (1, 3, 1 << 16):
            assert run_kernel(kernel, data, buf) == (2, ["r0", "r1"])
    else:
        for buf in (1, 3, 1 << 16):
            with pytest.raises(ValueError, match="^" + re.escape(prefix(kernel)) + r"record 1: block_size 0 < 32"):
                run_kernel(kernel, data, buf)


# -- BGZF around the stream -------------------------------------------------------------------

@all_kernels
def test_bgzf_input_is_unwrapped(kernel):
    data, names = mixed_stream()
    for block, level in ((0xFF00, 6), (1000, 0), (37, 1)):
        wrapped = bamgen.bgzf(data, block=block, level=level)
        for buf in (1, 7, 1 << 16):
            records, got = run_kernel(kernel, wrapped, buf)
            assert records == len(names)
            if got is not None:
                assert got == (sorted(names) if kernel in UNORDERED else names)


def _corrupt_bgzf_cases():
    data, _ = mixed_stream()
    blocks = [bamgen.bgzf_block(data[i:i + 5000]) for i in range(0, len(data), 5000)]
    off2 = len(blocks[0]) + len(blocks[1])  # the third block's offset
    third = data[10000:15000]
    before = b"".join(blocks[:2])
    after = b"".join(blocks[3:]) + bamgen.BGZF_EOF
    total = sum(len(b) for b in blocks)
    cases = [
        ("crc", before + bamgen.bgzf_block(third, crc=zlib.crc32(third) ^ 1) + after,
         rf"at byte offset {off2}: corrupt BGZF block: CRC32 mismatch"),
        ("isize too big", before + bamgen.bgzf_block(third, isize=len(third) + 1) + after,
         rf"at byte offset {off2}: corrupt BGZF block: .*ISIZE says {len(third) + 1}"),
        ("isize too small", before + bamgen.bgzf_block(third, isize=len(third) - 1) + after,
         rf"at byte offset {off2}: corrupt BGZF block: .*ISIZE says {len(third) - 1}"),
        ("isize > 64 KiB", before + bamgen.bgzf_block(third, isize=70000) + after,
         rf"at byte offset {off2}: corrupt BGZF block: ISIZE 70000 exceeds 65536"),
        ("stored isize wrong", before + bamgen.bgzf_block(third, level=0, isize=len(third) - 3) + after,
         rf"at byte offset {off2}: corrupt BGZF block: .*ISIZE says {len(third) - 3}"),
        ("corrupt deflate", before + bamgen.patch(bamgen.bgzf_block(third), 18, "<B", 0xFF) + after,
         rf"at byte offset {off2}: corrupt BGZF block"),
        ("truncated block", before + blocks[2][:30],
         rf"at byte offset {off2}: truncated BGZF block: 30 of its {len(blocks[2])} bytes present"),
        ("truncated block header", before + blocks[2][:10],
         rf"at byte offset {off2}: truncated BGZF block header"),
        ("no EOF marker", b"".join(blocks), rf"at byte offset {total}: no BGZF EOF marker"),
        ("bad magic later", before + b"\x1f\x8c" + blocks[2][2:] + after,
         rf"at byte offset {off2}: corrupt BGZF block header \(bad gzip magic\)"),
        ("garbage after EOF", b"".join(blocks) + bamgen.BGZF_EOF + b"BAM\x01",
         rf"at byte offset {total + 28}: corrupt BGZF block header \(bad gzip magic\)"),
        ("plain gzip", zlib.compressobj(6, zlib.DEFLATED, 31).compress(data) + b"", r"at byte offset 0: plain gzip, not BGZF"),
        ("compression method", bamgen.patch(blocks[0], 2, "<B", 7) + b"".join(blocks[1:]) + bamgen.BGZF_EOF,
         r"at byte offset 0: corrupt BGZF block header: compression method 7"),
    ]
    return cases


CORRUPT_BGZF = _corrupt_bgzf_cases()


@all_kernels
@pytest.mark.parametrize("case", CORRUPT_BGZF, ids=[c[0] for c in CORRUPT_BGZF])
def test_corrupt_bgzf_names_the_offset(kernel, case):
    _, wrapped, message = case
    for buf in (1, 1 << 16):
        with pytest.raises(BgzfError, match="^" + re.escape(bgzf_source(kernel)) + ": " + message):
            run_kernel(kernel, wrapped, buf)


@all_kernels
def test_bgzf_empty_payload(kernel):
    """BGZF holding nothing (just the EOF marker) is an empty stream, not a BGZF error."""
    with pytest.raises(ValueError, match="^" + re.escape(prefix(kernel)) + r"not a BAM stream \(empty\)$"):
        run_kernel(kernel, bamgen.BGZF_EOF)
    with pytest.raises(ValueError, match="^" + re.escape(prefix(kernel)) + r"truncated BAM header$"):
        run_kernel(kernel, bamgen.bgzf(HEADER[:-1]))


@all_kernels
def test_pysam_uncompressed_bam_is_read(kernel, tmp_path):
    """What a pysam worker writes ("wbu": BGZF level 0 around the stream)."""
    path = str(tmp_path / "w.bam")
    hdr = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6"}, "SQ": [{"SN": "chr1", "LN": 100000},
                                                                       {"SN": "chr2", "LN": 50000}]})
    names = [f"p{i}" for i in range(300)]
    with pysam.AlignmentFile(path, "wbu", header=hdr) as out:
        for name in names:
            a = pysam.AlignedSegment(hdr)
            a.query_name = name
            a.flag = 4
            a.reference_id = a.next_reference_id = -1
            a.reference_start = a.next_reference_start = -1
            a.query_sequence = "ACGT" * 40
            a.set_tag("CB", "AAA")
            out.write(a)
    with open(path, "rb") as f:
        wrapped = f.read()
    assert wrapped[:2] == b"\x1f\x8b"
    for buf in (1, 1 << 16):
        records, got = run_kernel(kernel, wrapped, buf)
        assert records == len(names)
        if got is not None:
            assert got == (sorted(names) if kernel in UNORDERED else names)


def test_bgzf_through_a_pipe_whose_first_read_is_one_byte():
    data, names = mixed_stream()
    r, wait = bamgen.feed(bamgen.bgzf(data, block=3000), piece=777, head=1, head_pause=1.0)
    try:
        with bamgen.Fds() as fds:
            out, path = fds.writer()
            stats = Filter(r, out, ValueTable([b"AAA"]), ["CB"], source=SOURCE).run()
            assert stats["kept"] == len(names)
            assert names_of(fds.read(path)) == names
    finally:
        os.close(r)
        wait()


def test_raw_stream_through_a_pipe_one_byte_first():
    """The same for a raw stream (no BGZF) works, in pieces of any size."""
    data, names = mixed_stream()
    r, wait = bamgen.feed(data, piece=333, pause_every=50, head=1, head_pause=0.1)
    try:
        with bamgen.Fds() as fds:
            out, path = fds.writer()
            stats = Filter(r, out, ValueTable([b"AAA"]), ["CB"], source=SOURCE, buffer_size=3).run()
            assert stats["kept"] == len(names) and names_of(fds.read(path)) == names
    finally:
        os.close(r)
        assert wait() == 0


GIL_SCRIPT = textwrap.dedent("""
    import os, sys, threading
    sys.path.insert(0, {tests!r})
    import bamgen
    from bamflow.kernels._records import ValueTable
    from bamflow.kernels.select import Filter
    data = bamgen.header() + b"".join(bamgen.record(f"r{{i}}", tags=[("CB", "Z", "AAA")], seq="ACGT" * 100)
                                      for i in range(2000))
    r, w = os.pipe()
    def write():
        for i in range(0, len(data), 1000):
            os.write(w, data[i:i + 1000])
        os.close(w)
    threading.Thread(target=write, daemon=True).start()
    out = os.open(os.devnull, os.O_WRONLY)
    print(Filter(r, out, ValueTable([b"AAA"]), ["CB"]).run()["kept"])
""")


def test_kernel_lets_a_writer_thread_run():
    try:
        proc = subprocess.run([sys.executable, "-c", GIL_SCRIPT.format(tests=TESTS_DIR)], capture_output=True,
                              text=True, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: the kernel blocked in read(2) holding the GIL")
    assert proc.stdout.strip() == "2000", proc.stderr


# -- the canonical tag value, the same in every kernel ---------------------------------------

INT_RANGES = {"c": (-128, 127), "C": (0, 255), "s": (-32768, 32767), "S": (0, 65535),
              "i": (-(2**31), 2**31 - 1), "I": (0, 2**32 - 1)}


def int_widths(v):
    return [t for t, (lo, hi) in INT_RANGES.items() if lo <= v <= hi]


@st.composite
def key_value(draw):
    """(type, value) of a key tag, or None (absent)."""
    kind = draw(st.sampled_from(["int", "int", "Z", "Z", "A", "H", "absent", "empty"]))
    if kind == "int":
        v = draw(st.one_of(st.integers(-130, 300), st.sampled_from([-(2**31), 2**31 - 1, 2**32 - 1, 65535, -32768])))
        return (draw(st.sampled_from(int_widths(v))), v)
    if kind == "Z":  # sometimes the decimal text of an integer, which is the same key
        return ("Z", draw(st.one_of(st.sampled_from(["7", "-7", "300", "A", "AC", "07"]),
                                    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                                            max_size=4))))
    if kind == "A":
        return ("A", draw(st.sampled_from("7AZ-")))
    if kind == "H":
        return ("H", draw(st.sampled_from(["1A", "07", "FF00"])))
    if kind == "empty":
        return ("Z", "")
    return None


@st.composite
def keyed_records(draw):
    out = []
    for i in range(draw(st.integers(0, 30))):
        kv = draw(key_value())
        tags = [("XA", "i", i)]
        if kv is not None:
            tags.append(("XK", *kv))
        if draw(st.booleans()):
            tags.append(("XF", "f", 1.5))  # floats elsewhere in the record are fine
        tags = draw(st.permutations(tags))
        out.append((f"r{i}", kv, bamgen.record(f"r{i}", tags=tags)))
    return out


def ref_key(kv):
    """The canonical key from bamgen's reference, None if missing (absent or empty)."""
    if kv is None:
        return None
    key = bamgen.canonical(*kv)
    return key or None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_records(), st.integers(1, 6), st.sampled_from(SIZES))
def test_canonical_key_in_every_kernel(recs, n, buf):
    data = HEADER + b"".join(raw for _, _, raw in recs)
    keys = {name: ref_key(kv) for name, kv, _ in recs}
    present = [k for k in keys.values() if k is not None]
    chosen = set(present[::2])
    with bamgen.Fds() as fds:
        # Distributor: stable hash of the canonical key % n
        outs = [fds.writer() for _ in range(n)]
        stats = Distributor(fds.reader(data), [fd for fd, _ in outs],
                            DistributeOptions(by="XK", missing="drop", count_values=True), buffer_size=buf).run()
        for k, (_, path) in enumerate(outs):
            for name in names_of(fds.read(path)):
                assert bamgen.fnv1a64(keys[name]) % n == k
        assert stats["dropped_missing_tag"] == sum(k is None for k in keys.values())
        assert stats["values"] == dict(collections.Counter(present))
        # Filter: a set of canonical keys
        out, path = fds.writer()
        fstats = Filter(fds.reader(data), out, ValueTable(sorted(chosen)), ["XK"], buffer_size=buf).run()
        assert names_of(fds.read(path)) == [name for name, _, _ in recs if keys[name] in chosen]
        assert fstats["dropped_missing_tag"] == stats["dropped_missing_tag"]
        # TagCounter
        table, cstats, _ = TagCounter(fds.reader(data), "XK", buffer_size=buf).run()
        assert table.counts() == dict(collections.Counter(present))
        assert list(table.counts()) == list(dict.fromkeys(present))  # order of first appearance
        # Splitter: one output per key, in order of first appearance
        groups = collections.defaultdict(list)
        sstats = Splitter(fds.reader(data), ["XK"], lambda o, key, blob: groups[key].extend(names_of(blob, False)),
                          buffer_size=buf).run()
        assert dict(groups) == {k: [name for name, _, _ in recs if keys[name] == k] for k in set(present)}
        assert [key for _, key, _, _ in sstats["outputs"]] == list(dict.fromkeys(present))
        # Collector tag merge: sorted by canonical bytes, missing first
        order = sorted(recs, key=lambda r: (keys[r[0]] is not None, keys[r[0]] or b""))
        out, path = fds.writer()
        Collector([fds.reader(HEADER + b"".join(raw for _, _, raw in order))], out, CollectOptions("tag:XK"),
                  buffer_size=buf).run()
        assert names_of(fds.read(path)) == [name for name, _, _ in order]


def test_integer_widths_and_strings_are_one_key():
    recs = [bamgen.record(f"r{i}", tags=[("CB", t, 77)]) for i, t in enumerate("cCsSiI")]
    recs += [bamgen.record("z", tags=[("CB", "Z", "77")]), bamgen.record("h", tags=[("CB", "H", "77")]),
             bamgen.record("neg", tags=[("CB", "c", -77)]), bamgen.record("negz", tags=[("CB", "Z", "-77")]),
             bamgen.record("big", tags=[("CB", "I", 4294967295)]), bamgen.record("min", tags=[("CB", "i", -(2**31))]),
             bamgen.record("a", tags=[("CB", "A", "7")]), bamgen.record("seven", tags=[("CB", "Z", "7")])]
    with bamgen.Fds() as fds:
        table, stats, _ = TagCounter(fds.reader(HEADER + b"".join(recs)), "CB", buffer_size=3).run()
    assert table.counts() == {b"77": 8, b"-77": 2, b"4294967295": 1, b"-2147483648": 1, b"7": 2}


@pytest.mark.parametrize("typ, value, kind", [("f", 1.5, "a float"), ("B", ("C", [1, 2]), "an array"),
                                              ("B", ("f", []), "an array")])
def test_float_or_array_key_is_an_error_in_every_keyed_kernel(typ, value, kind):
    data = HEADER + rec("g0") + bamgen.record("bad", tags=[("XA", "i", 1), ("CB", typ, value)]) + rec("g2")
    message = rf"^{re.escape(SOURCE)}record 1 \(read 'bad'\): tag CB holds {kind} \(type {typ}\)"
    for kernel in ("distribute-tag", "filter", "split", "count"):
        for buf in (1, 1 << 16):
            with pytest.raises(ValueError, match=message):
                run_kernel(kernel, data, buf)
    with pytest.raises(ValueError, match=rf"^input 0: record 1 \(read 'bad'\): tag CB holds {kind}"):
        run_kernel("collect-tag", data)
    # the other kernels do not use CB as a key: the record is fine there
    for kernel in ("distribute-round-robin", "distribute-name", "collect-any", "collect-coordinate", "record-chunks"):
        assert run_kernel(kernel, data)[0] == 3


def test_float_key_after_a_missing_tag_is_just_missing():
    """Several tags: a record missing the first is missing, whatever the second holds."""
    data = HEADER + bamgen.record("x", tags=[("UB", "f", 2.0)]) + bamgen.record("y", tags=[("CB", "Z", "A"),
                                                                                            ("UB", "Z", "U")])
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        stats = Filter(fds.reader(data), out, ValueTable([b"A\0U"]), ["CB", "UB"]).run()
        assert stats == {"records_in": 2, "kept": 1, "dropped_not_listed": 0, "dropped_missing_tag": 1,
                         "tags_seen": ["CB", "UB"]}
        with pytest.raises(ValueError, match=r"record 0 \(read 'x'\): tag UB holds a float"):
            Filter(fds.reader(data), out, ValueTable([b"A"]), ["UB", "CB"]).run()


def test_first_of_repeated_tags_is_the_key():
    data = HEADER + bamgen.record("x", tags=[("CB", "Z", "first"), ("CB", "Z", "second")])
    with bamgen.Fds() as fds:
        table, _, _ = TagCounter(fds.reader(data), "CB").run()
    assert table.counts() == {b"first": 1}


# -- tags seen, progress -------------------------------------------------------------------------

def test_tags_seen_is_every_tag_of_every_record():
    recs = [bamgen.record("a", tags=[("CB", "Z", "A"), ("zz", "i", 1)]),
            bamgen.record("b", tags=[("XB", "B", ("f", [1.0])), ("a1", "A", "x"), ("CB", "Z", "C")]),
            bamgen.record("c")]
    data = HEADER + b"".join(recs)
    expected = sorted(["CB", "zz", "XB", "a1"])
    with bamgen.Fds() as fds:
        out, _ = fds.writer()
        assert Distributor(fds.reader(data), [out], DistributeOptions()).run()["tags_seen"] == expected
        assert Filter(fds.reader(data), out, ValueTable(), ["CB"]).run()["tags_seen"] == expected
        assert Splitter(fds.reader(data), ["CB"], lambda *a: None).run()["tags_seen"] == expected
        assert TagCounter(fds.reader(data), "CB").run()[2] == expected


def test_progress_slot_counts_records_and_bytes():
    data, names = mixed_stream()
    with bamgen.Fds() as fds:
        slot = array("q", [0, 0, 0, 0])
        out, _ = fds.writer()
        Distributor(fds.reader(data), [out], DistributeOptions(), progress=memoryview(slot), buffer_size=5).run()
        assert slot[0] == len(names) and slot[1] == len(data)
        slot = array("q", [0, 0, 0, 0])
        Collector([fds.reader(data), fds.reader(data)], out, CollectOptions("any"), progress=memoryview(slot)).run()
        assert slot[0] == 2 * len(names) and slot[1] == 2 * len(data)
        slot = array("q", [0, 0, 0, 0])
        wrapped = bamgen.bgzf(data, block=5000)
        TagCounter(fds.reader(wrapped), "CB", progress=memoryview(slot)).run()
        assert slot[0] == len(names) and slot[1] == len(wrapped)  # bytes read: the wire bytes


# -- Tags, RecordReader construction ------------------------------------------------------------

def test_tags():
    t = Tags(["CB", b"UB", bytearray(b"x1")])
    assert t.n == 3 and t.names == ("CB", "UB", "x1")
    assert Tags([f"T{c}" for c in "0123456789ABCDEF"]).n == 16
    for bad in (["C"], ["CBX"], [b""], [3], ["CB", "U"]):
        with pytest.raises(ValueError, match="a BAM tag has two characters"):
            Tags(bad)
    with pytest.raises(ValueError, match="at most 16 tags"):
        Tags([f"T{c}" for c in "0123456789ABCDEFG"])


def test_record_reader_arguments():
    with pytest.raises(ValueError, match="buffer_size must be >= 1"):
        RecordReader(0, buffer_size=0)
    reader = RecordReader(0)
    with pytest.raises(ValueError, match="the header has not been read"):
        _ = reader.header_bytes
    assert reader.tags_seen == [] and reader.records == 0


# -- parse_header --------------------------------------------------------------------------------

REF_NAMES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(REF_NAMES, st.integers(1, 2**31 - 1)), max_size=6), st.binary(max_size=40),
       st.binary(max_size=10))
def test_parse_header(refs, text, tail):
    head = bamgen.header(text=text, refs=refs)
    expected = (len(head), text, [(n.encode(), length) for n, length in refs])
    assert parse_header(head) == expected
    assert parse_header(head + tail) == expected
    for cut in range(len(head)):
        with pytest.raises(EOFError):
            parse_header(head[:cut])


def test_parse_header_rejects():
    for data, message in [
        (b"@HD\t", r"^x: not a BAM stream \(starts with b'@HD\\t'\)$"),
        (b"@", r"^x: not a BAM stream \(starts with b'@'\)$"),
        (b"\x1f\x8b\x08\x04", r"^x: not a BAM stream"),
        (b"BAM\x01" + struct.pack("<i", -1), r"^x: corrupt BAM header: l_text -1\b"),
        (b"BAM\x01" + struct.pack("<I", 0x7FFFFFF0), r"^x: corrupt BAM header: l_text 2147483632\b"),
        (b"BAM\x01" + struct.pack("<iI", 0, 0x7FFFFFF0), r"^x: corrupt BAM header: n_ref 2147483632\b"),
        (b"BAM\x01" + struct.pack("<iii", 0, 1, 0), r"^x: corrupt BAM header: reference 0 has a name of length 0$"),
        (b"BAM\x01" + struct.pack("<iii", 0, 2, 2) + b"a\0" + struct.pack("<ii", 5, -4),
         r"^x: corrupt BAM header: reference 1 has a name of length -4$"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_header(data, "x: ")


# -- stable_hash, ValueTable ---------------------------------------------------------------------

@given(st.binary(max_size=64))
def test_stable_hash_is_fnv1a64(key):
    assert stable_hash(key) == bamgen.fnv1a64(key)
    assert stable_hash(bytearray(key)) == stable_hash(memoryview(key)) == bamgen.fnv1a64(key)


def test_stable_hash_known_values():
    # published FNV-1a 64 test vectors
    assert stable_hash(b"") == 0xCBF29CE484222325
    assert stable_hash(b"a") == 0xAF63DC4C8601EC8C
    assert stable_hash(b"foobar") == 0x85944171F73967E8


def test_value_table_add_and_outputs():
    vt = ValueTable()
    assert len(vt) == 0 and vt.values() == [] and vt.max_output() == -1
    assert vt.add(b"AAA") is True and vt.add("AAA") is False
    assert vt.add(77) is True and 77 in vt and "77" in vt and b"77" in vt
    assert vt.add("grüße") is True and "grüße".encode() in vt
    assert vt.add(b"") is True and b"" in vt
    assert vt.values() == [b"AAA", b"77", "grüße".encode(), b""]
    assert [vt.output_of(v) for v in vt.values()] == [0, 1, 2, 3]
    assert vt.output_of(b"absent") == -1 and b"absent" not in vt
    assert vt.value_at(1) == b"77"
    with pytest.raises(IndexError):
        vt.value_at(4)
    with pytest.raises(IndexError):
        vt.value_at(-1)
    # explicit outputs; several values may share one
    vt = ValueTable()
    assert vt.add(b"x", 5) and vt.add(b"y", 5) and vt.add(b"z", 2)
    assert vt.output_of(b"x") == vt.output_of(b"y") == 5 and vt.max_output() == 5
    assert vt.add(b"x", 5) is False  # the same output again: fine
    assert vt.add(b"x") is False     # no output given: fine
    with pytest.raises(ValueError, match=r"value b'x' given for outputs 5 and 3"):
        vt.add(b"x", 3)
    assert vt.output_of(b"x") == 5
    assert vt.counts() == {b"x": 0, b"y": 0, b"z": 0} and vt.count_of(b"x") == 0 and vt.count_of(b"q") == 0


def test_value_table_add_values():
    vt = ValueTable()
    assert vt.add_values(b"a\nb\r\n\nc\n") == 3
    assert vt.values() == [b"a", b"b", b"c"]
    assert vt.add_values(b"c\nd") == 1 and vt.values()[-1] == b"d"
    vt = ValueTable()
    assert vt.add_values(b"a\r\n\nb\r", strip_cr=False, skip_empty=False) == 3
    assert vt.values() == [b"a\r", b"", b"b\r"]
    vt = ValueTable()
    assert vt.add_values(b"a,b,,a,", sep=b",") == 2 and vt.values() == [b"a", b"b"]
    assert vt.add_values(b"") == 0
    vt = ValueTable()
    assert vt.add_values(b"x\ny\n", out=4) == 2 and vt.output_of(b"x") == vt.output_of(b"y") == 4
    with pytest.raises(ValueError, match=r"value b'y' given for outputs 4 and 1"):
        vt.add_values(b"z\ny", out=1)
    with pytest.raises(ValueError, match="sep must be one byte"):
        vt.add_values(b"a", sep=b"ab")
    assert ValueTable(b"p;q;p", sep=b";").values() == [b"p", b"q"]
    assert ValueTable(memoryview(b"p\nq")).values() == [b"p", b"q"]
    assert ValueTable([b"m", "n", 3]).values() == [b"m", b"n", b"3"]


def test_value_table_grows_and_keeps_order():
    values = [f"CB{i:07d}-{i % 7}".encode() for i in range(60000)]
    vt = ValueTable(b"\n".join(values))
    assert len(vt) == 60000 and vt.values() == values
    assert all(v in vt for v in values[::97]) and b"CB9999999-0" not in vt
    assert [vt.output_of(values[i]) for i in (0, 1, 59999)] == [0, 1, 59999]
    # duplicate-free add in one go; lengths from 0 to long
    vt = ValueTable()
    longs = [b"x" * n for n in range(0, 3000, 7)]
    for v in longs:
        vt.add(v)
    assert vt.values() == longs


@given(st.lists(st.binary(max_size=8), max_size=200))
def test_value_table_is_an_ordered_set(values):
    vt = ValueTable()
    for v in values:
        vt.add(v)
    assert vt.values() == list(dict.fromkeys(values))
    assert all(v in vt for v in values)


def test_value_key():
    assert value_key(b"AC") == b"AC" and value_key("grüße") == "grüße".encode()
    assert value_key(-12) == b"-12" and value_key(2**40) == b"1099511627776"
    assert value_key(("AAA", 7, b"x")) == b"AAA\x007\x00x"  # several tags: joined by NUL
    assert value_key(bytearray(b"q")) == b"q" and value_key(memoryview(b"q")) == b"q"
    for bad in (True, 1.5, None, [b"A"], object()):
        with pytest.raises(TypeError, match="a value is str, bytes, int or a tuple of them"):
            value_key(bad)
    vt = ValueTable([("A", 7)])
    assert b"A\x007" in vt and ("A", 7) in vt and vt.output_of(("A", "7")) == 0


def test_filter_with_tuple_values():
    recs = [bamgen.record("a", tags=[("CB", "Z", "A"), ("UB", "C", 7)]),
            bamgen.record("b", tags=[("CB", "Z", "A"), ("UB", "Z", "8")]),
            bamgen.record("c", tags=[("UB", "i", 7), ("CB", "A", "A")])]
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        Filter(fds.reader(HEADER + b"".join(recs)), out, ValueTable([("A", 7)]), ["CB", "UB"]).run()
        assert names_of(fds.read(path)) == ["a", "c"]


# -- the aux walker against the specification ------------------------------------------------

ELEM = {"c": 1, "C": 1, "s": 2, "S": 2, "i": 4, "I": 4, "f": 4}


def spec_aux_tags(aux):
    """The tag names of an aux block, walked as SAM spec 4.2.4 says; None if a
    field is malformed or runs past the end."""
    off, tags = 0, []
    while off < len(aux):
        if len(aux) - off < 3:
            return None
        tag, typ = aux[off:off + 2], chr(aux[off + 2])
        off += 3
        if typ in "AcC":
            n = 1
        elif typ in "sS":
            n = 2
        elif typ in "iIf":
            n = 4
        elif typ in "ZH":
            z = aux.find(b"\0", off)
            if z < 0:
                return None
            n = z - off + 1
        elif typ == "B":
            if len(aux) - off < 5 or chr(aux[off]) not in ELEM:
                return None
            n = 5 + ELEM[chr(aux[off])] * struct.unpack_from("<I", aux, off + 1)[0]
        else:
            return None
        if off + n > len(aux):
            return None
        tags.append(tag.decode("latin-1"))
        off += n
    return tags


AUX_FIELDS = st.one_of(
    st.tuples(st.sampled_from(["CB", "XA", "zz"]), st.just("Z"), st.text("ACGT", max_size=5)),
    st.tuples(st.sampled_from(["XH", "YH"]), st.just("H"), st.sampled_from(["", "0A", "FF00"])),
    st.tuples(st.sampled_from(["XA", "XI"]), st.sampled_from(list("cCsSiI")), st.integers(0, 100)),
    st.tuples(st.just("XF"), st.just("f"), st.just(2.5)),
    st.tuples(st.just("XC"), st.just("A"), st.just("q")),
    st.tuples(st.just("XB"), st.just("B"), st.tuples(st.sampled_from(list("cCsSiIf")), st.lists(st.integers(0, 9),
                                                                                                    max_size=4))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(AUX_FIELDS, max_size=6), st.sampled_from(["none", "cut", "byte", "append"]), st.data())
def test_aux_walker_agrees_with_the_specification(fields, mutation, data):
    aux = bytearray(b"".join(bamgen.encode_tag(*f) for f in fields))
    if mutation == "cut" and aux:
        del aux[data.draw(st.integers(0, len(aux) - 1)):]
    elif mutation == "byte" and aux:
        aux[data.draw(st.integers(0, len(aux) - 1))] = data.draw(st.integers(0, 255))
    elif mutation == "append":
        aux += data.draw(st.binary(min_size=1, max_size=9))
    aux = bytes(aux)
    tags = spec_aux_tags(aux)
    stream_ = HEADER + bamgen.record("g") + bamgen.record("r", raw_aux=aux)
    with bamgen.Fds() as fds:
        out, path = fds.writer()
        if tags is None:
            with pytest.raises(ValueError, match=r"^record 1 \(read 'r'\): "):
                Distributor(fds.reader(stream_), [out], DistributeOptions(), buffer_size=3).run()
        else:
            stats = Distributor(fds.reader(stream_), [out], DistributeOptions(), buffer_size=3).run()
            assert fds.read(path) == stream_  # passed on unchanged
            assert stats["tags_seen"] == sorted(set(tags))
