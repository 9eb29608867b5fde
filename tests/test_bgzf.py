"""Tests of bamflow.bam.bgzf against independent decoders: gzip, samtools, pysam."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import subprocess
import threading
from pathlib import Path

import isal.igzip
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bamflow.bam.bgzf import (
    BLOCK_SIZE,
    DEFAULT_LEVEL,
    EOF_BLOCK,
    FAST_LEVEL,
    MAX_BLOCK_SIZE,
    BgzfError,
    BgzfReader,
    BgzfWriter,
    compress_block,
    detect_format,
    is_bgzf,
)

pytestmark = pytest.mark.timeout(60)

_QUALS = "F" * 40 + ":" * 5 + "," * 3 + "#" * 2


def write_sam(path: Path, n_records: int, *, seed: int = 3, sort: bool = False) -> None:
    """A 10x-style SAM: 90-bp reads from a random reference, binned qualities, CB/UB tags."""
    rng = random.Random(seed)
    ref_len = n_records * 4
    ref = "".join(rng.choices("ACGT", k=ref_len + 90))
    whitelist = ["".join(rng.choices("ACGT", k=16)) for _ in range(500)]
    starts = [rng.randrange(1, ref_len) for _ in range(n_records)]
    if sort:
        starts.sort()
    with open(path, "w", encoding="ascii") as f:
        f.write(f"@HD\tVN:1.6\tSO:{'coordinate' if sort else 'unsorted'}\n@SQ\tSN:chr1\tLN:{ref_len + 90}\n")
        for i, pos in enumerate(starts):
            seq = ref[pos - 1 : pos + 89]
            qual = "".join(rng.choices(_QUALS, k=90))
            umi = "".join(rng.choices("ACGT", k=12))
            f.write(
                f"r{i}\t{rng.choice((0, 16))}\tchr1\t{pos}\t255\t90M\t*\t0\t0\t{seq}\t{qual}\t"
                f"NH:i:1\tCB:Z:{rng.choice(whitelist)}-1\tUB:Z:{umi}\n"
            )


@pytest.fixture(scope="module")
def samtools_bam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A coordinate-sorted BAM of 30k records written by samtools at its default level."""
    d = tmp_path_factory.mktemp("bam")
    sam = d / "in.sam"
    write_sam(sam, 30_000, sort=True)
    bam = d / "samtools.bam"
    subprocess.run(["samtools", "view", "-b", "-o", str(bam), str(sam)], check=True)
    return bam


def blocks_of(data: bytes) -> list[tuple[int, int]]:
    """(BSIZE+1, ISIZE) of each block, parsed independently of bamflow.bam.bgzf."""
    out, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"\x1f\x8b\x08\x04"
        assert data[pos + 12 : pos + 16] == b"BC\x02\x00"
        size = struct.unpack_from("<H", data, pos + 16)[0] + 1
        out.append((size, struct.unpack_from("<I", data, pos + size - 4)[0]))
        pos += size
    return out


def sample(n: int, seed: int = 0) -> bytes:
    """Half incompressible random bytes, half BAM-like low-entropy text."""
    rng = random.Random(seed)
    half = n // 2
    return rng.randbytes(half) + "".join(rng.choices("ACGTFFFF:#", k=n - half)).encode()


def compress(data: bytes, **kwargs: object) -> bytes:
    bio = io.BytesIO()
    with BgzfWriter(bio, **kwargs) as w:  # type: ignore[arg-type]
        w.write(data)
    return bio.getvalue()


SIZES = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3_000_000]
# level 12 is slow: small sizes only
LEVEL_SIZES = [(lv, n) for lv in (0, 1, DEFAULT_LEVEL, FAST_LEVEL) for n in SIZES] + [(12, n) for n in SIZES[:5]]


@pytest.mark.parametrize(("level", "size"), LEVEL_SIZES)
@pytest.mark.parametrize("threads", [0, 1, 3])
def test_round_trip_sizes(size: int, level: int | str, threads: int) -> None:
    data = sample(size, seed=size)
    out = compress(data, level=level, threads=threads)
    assert out.endswith(EOF_BLOCK)
    assert gzip.decompress(out) == data  # independent multi-member decoder
    blocks = blocks_of(out)
    assert all(bsize <= MAX_BLOCK_SIZE and isize <= BLOCK_SIZE for bsize, isize in blocks)
    assert sum(isize for _, isize in blocks) == size
    assert len(blocks) == -(-size // BLOCK_SIZE) + 1  # full blocks, the rest, EOF
    with BgzfReader(io.BytesIO(out), threads=threads) as r:
        assert r.read() == data
        assert r.read() == b""


def test_incompressible_block_is_stored_when_compressor_expands_it() -> None:
    """ISA-L level 0 inflates random bytes to ~80 KB; the block must still fit, stored."""
    data = random.Random(1).randbytes(BLOCK_SIZE)
    block = compress_block(data, 0, backend="isal")
    assert len(block) == BLOCK_SIZE + 5 + 26 <= MAX_BLOCK_SIZE
    assert gzip.decompress(block) == data
    out = compress(data * 3, level=0, backend="isal", threads=2)
    assert gzip.decompress(out) == data * 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(max_size=5000) | st.integers(0, 150_000), max_size=12),
    flushes=st.sets(st.integers(0, 11)),
    read_size=st.integers(1, 100_000),
    threads=st.integers(0, 3),
)
def test_round_trip_any_writes_and_reads(chunks: list[bytes | int], flushes: set[int], read_size: int, threads: int) -> None:
    """Any sequence of writes and flush_block() calls reads back the same, in any read size."""
    rng = random.Random(len(chunks))
    pieces = [c if isinstance(c, bytes) else rng.randbytes(c) for c in chunks]
    bio = io.BytesIO()
    with BgzfWriter(bio, level=1, threads=threads) as w:
        for i, piece in enumerate(pieces):
            assert w.write(piece) == len(piece)
            if i in flushes:
                w.flush_block()
    data = b"".join(pieces)
    out = bio.getvalue()
    assert gzip.decompress(out) == data
    with BgzfReader(io.BytesIO(out), threads=threads) as r:
        got = bytearray()
        while part := r.read(read_size):
            got += part
    assert got == data


def test_flush_block_starts_a_new_block() -> None:
    bio = io.BytesIO()
    with BgzfWriter(bio, threads=1) as w:
        w.write(b"header")
        w.flush_block()
        w.flush_block()  # nothing buffered: no empty block
        w.write(b"x" * 10)
    assert [isize for _, isize in blocks_of(bio.getvalue())] == [6, 10, 0]
    with BgzfReader(io.BytesIO(bio.getvalue())) as r:
        assert list(r.blocks()) == [b"header", b"x" * 10]


def test_real_bam_recompressed_passes_samtools_and_pysam(samtools_bam: Path, tmp_path: Path) -> None:
    raw = isal.igzip.decompress(samtools_bam.read_bytes())
    assert detect_format(raw) == "bam-raw"
    ours = tmp_path / "ours.bam"
    with BgzfWriter(ours, threads=2) as w:
        w.write(raw)
    subprocess.run(["samtools", "quickcheck", "-v", str(ours)], check=True)
    subprocess.run(["samtools", "index", str(ours)], check=True)
    count = subprocess.run(["samtools", "view", "-c", str(ours)], check=True, capture_output=True, text=True)
    assert int(count.stdout) == 30_000
    region = subprocess.run(["samtools", "view", "-c", str(ours), "chr1:1000-2000"], check=True, capture_output=True, text=True)
    assert int(region.stdout) > 0  # the index works
    with pysam.AlignmentFile(str(ours), "rb") as a, pysam.AlignmentFile(str(samtools_bam), "rb") as b:
        assert str(a.header) == str(b.header)
        assert [r.to_string() for r in a] == [r.to_string() for r in b]
    # Default level stays within 5% of samtools' default size (measured: +1.4%).
    assert os.path.getsize(ours) <= 1.05 * os.path.getsize(samtools_bam)


def test_fast_level_bam_is_valid(samtools_bam: Path, tmp_path: Path) -> None:
    raw = isal.igzip.decompress(samtools_bam.read_bytes())
    ours = tmp_path / "fast.bam"
    with BgzfWriter(ours, level=FAST_LEVEL, threads=2) as w:
        w.write(raw)
    subprocess.run(["samtools", "quickcheck", "-v", str(ours)], check=True)
    with pysam.AlignmentFile(str(ours), "rb") as a:
        assert sum(1 for _ in a) == 30_000
    assert os.path.getsize(ours) < 1.3 * os.path.getsize(samtools_bam)


@pytest.mark.parametrize("threads", [0, 2])
def test_reader_reads_samtools_bam_from_a_fifo(samtools_bam: Path, tmp_path: Path, threads: int) -> None:
    """A FIFO written by samtools: sequential reads, no seeking."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(["samtools", "view", "-b", "--no-PG", "-o", str(fifo), str(samtools_bam)])
    try:
        with BgzfReader(fifo, threads=threads) as r:
            data = r.read()
    finally:
        assert proc.wait(timeout=30) == 0
    assert data == isal.igzip.decompress(samtools_bam.read_bytes())


@pytest.mark.parametrize("kind", ["buffered", "raw", "fd"])
def test_writer_into_a_pipe_read_by_samtools(samtools_bam: Path, kind: str) -> None:
    """Into samtools' stdin as a buffered file, an unbuffered io.FileIO, a bare fd."""
    raw = isal.igzip.decompress(samtools_bam.read_bytes())
    proc = subprocess.Popen(["samtools", "view", "-c", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    output = {"buffered": proc.stdin, "raw": io.FileIO(proc.stdin.fileno(), "wb", closefd=False), "fd": proc.stdin.fileno()}[kind]
    with BgzfWriter(output, threads=2) as w:  # type: ignore[arg-type]
        w.write(raw)
    proc.stdin.close()
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 0 and int(out) == 30_000


def test_reader_as_text_file_via_textiowrapper(tmp_path: Path) -> None:
    lines = [f"line {i}\n" for i in range(50_000)]
    path = tmp_path / "t.gz"
    with BgzfWriter(path) as w:
        w.write("".join(lines).encode())
    with BgzfReader(path) as r, io.TextIOWrapper(r, encoding="ascii") as text:
        assert list(text) == lines


# --- corrupt and truncated input -------------------------------------------


@pytest.fixture(scope="module")
def three_blocks() -> tuple[bytes, list[int]]:
    """A BGZF file of three data blocks and EOF, and the offset of each block."""
    data = sample(BLOCK_SIZE * 3, seed=9)
    out = compress(data, level=1, threads=0)
    offsets, pos = [], 0
    for size, _ in blocks_of(out):
        offsets.append(pos)
        pos += size
    return out, offsets


def read_error(data: bytes, tmp_path: Path, threads: int = 2) -> tuple[BgzfError, int]:
    """Read ``data`` from a file; return the BgzfError and how many bytes came before it."""
    path = tmp_path / "bad.bam"
    path.write_bytes(data)
    got = 0
    with BgzfReader(path, threads=threads) as r, pytest.raises(BgzfError) as info:
        while block := r.read_block():
            got += len(block)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return info.value, got


@pytest.mark.parametrize("threads", [0, 2])
def test_corrupt_deflate_data(three_blocks: tuple[bytes, list[int]], tmp_path: Path, threads: int) -> None:
    out, offsets = three_blocks
    bad = bytearray(out)
    bad[offsets[1] + 18 : offsets[1] + 60] = b"\xff" * 42
    err, got = read_error(bytes(bad), tmp_path, threads)
    assert err.offset == offsets[1] and f"at byte offset {offsets[1]}" in str(err)
    assert "corrupt" in str(err)
    assert got == BLOCK_SIZE  # the good block before it was delivered


def test_crc_mismatch(three_blocks: tuple[bytes, list[int]], tmp_path: Path) -> None:
    out, offsets = three_blocks
    bad = bytearray(out)
    bad[offsets[3] - 8] ^= 0x01  # CRC32 of block 2
    err, _ = read_error(bytes(bad), tmp_path)
    assert err.offset == offsets[2] and "CRC32 mismatch" in str(err)


def test_isize_mismatch(three_blocks: tuple[bytes, list[int]], tmp_path: Path) -> None:
    out, offsets = three_blocks
    bad = bytearray(out)
    struct.pack_into("<I", bad, offsets[1] - 4, BLOCK_SIZE - 1)  # ISIZE of block 0
    err, got = read_error(bytes(bad), tmp_path)
    assert err.offset == 0 and got == 0 and "ISIZE" in str(err)


def test_corrupt_header(three_blocks: tuple[bytes, list[int]], tmp_path: Path) -> None:
    out, offsets = three_blocks
    bad = bytearray(out)
    bad[offsets[2]] = 0x00
    err, got = read_error(bytes(bad), tmp_path)
    assert err.offset == offsets[2] and "header" in str(err) and got == 2 * BLOCK_SIZE


@pytest.mark.parametrize("cut", [5, 17, 100, 5000])
def test_truncated_block(three_blocks: tuple[bytes, list[int]], tmp_path: Path, cut: int) -> None:
    out, offsets = three_blocks
    err, got = read_error(out[: offsets[2] + cut], tmp_path)
    assert err.offset == offsets[2] and "truncated" in str(err) and got == 2 * BLOCK_SIZE


def test_missing_eof_marker(three_blocks: tuple[bytes, list[int]], tmp_path: Path) -> None:
    out, offsets = three_blocks
    err, got = read_error(out[: offsets[3]], tmp_path)
    assert "no BGZF EOF marker: file is truncated" in str(err) and err.offset == offsets[3]
    assert got == 3 * BLOCK_SIZE


def test_plain_gzip_is_named(tmp_path: Path) -> None:
    err, _ = read_error(gzip.compress(b"hello\n"), tmp_path)
    assert "plain gzip, not BGZF" in str(err) and err.offset == 0


def test_empty_and_non_gzip_input(tmp_path: Path) -> None:
    err, _ = read_error(b"", tmp_path)
    assert "empty input" in str(err)
    err, _ = read_error(b"@HD\tVN:1.6\n", tmp_path)
    assert "not BGZF" in str(err) and err.offset == 0


def test_bgzf_error_is_a_value_error() -> None:
    assert issubclass(BgzfError, ValueError)


# --- writer failures ---------------------------------------------------------


def bgzf_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bgzf-")]


def test_broken_pipe_reaches_the_caller() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    w = BgzfWriter(write_fd, threads=2)
    try:
        with pytest.raises(BrokenPipeError):
            for _ in range(50):
                w.write(sample(BLOCK_SIZE * 2))
            w.close()
        with pytest.raises(BrokenPipeError):  # close after a failure: same error, no EOF
            w.close()
        assert w.closed
    finally:
        os.close(write_fd)
    assert not bgzf_threads()


def test_disk_full_reaches_the_caller() -> None:
    with open("/dev/full", "wb", buffering=0) as f:
        with pytest.raises(OSError) as info:
            with BgzfWriter(f, threads=2) as w:
                w.write(sample(BLOCK_SIZE * 4))
        assert info.value.errno == 28  # ENOSPC
    assert not bgzf_threads()


def test_abandoned_writer_writes_no_eof_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "abandoned.bam"
    with pytest.raises(RuntimeError, match="stage failed"):
        with BgzfWriter(path, threads=3) as w:
            w.write(sample(BLOCK_SIZE * 40))
            raise RuntimeError("stage failed")
    assert w.closed and not bgzf_threads()
    assert not path.read_bytes().endswith(EOF_BLOCK)
    assert subprocess.run(["samtools", "quickcheck", str(path)]).returncode != 0
    with pytest.raises(ValueError, match="closed"):
        w.write(b"x")


def test_garbage_collected_writer_writes_no_eof(tmp_path: Path) -> None:
    path = tmp_path / "dropped.bam"
    w = BgzfWriter(path, threads=2)
    w.write(b"data" * 100_000)
    del w
    assert not path.read_bytes().endswith(EOF_BLOCK)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BgzfWriter(io.BytesIO(), level=13)
    with pytest.raises(ValueError):
        BgzfWriter(io.BytesIO(), level=4, backend="isal")
    with pytest.raises(ValueError):
        BgzfWriter(io.BytesIO(), level="fast", backend="libdeflate")
    with pytest.raises(ValueError):
        compress_block(b"x" * (BLOCK_SIZE + 1))


# --- format detection ----------------------------------------------------------


def test_detect_format(samtools_bam: Path) -> None:
    head = samtools_bam.read_bytes()[:512]
    assert is_bgzf(head) and detect_format(head) == "bgzf"
    assert is_bgzf(EOF_BLOCK)
    gz = gzip.compress(b"x")
    assert not is_bgzf(gz) and detect_format(gz) == "gzip"
    assert detect_format(isal.igzip.decompress(samtools_bam.read_bytes())[:512]) == "bam-raw"
    assert detect_format(b"@HD\tVN:1.6\n") == "sam"
    assert detect_format(b"r1\t0\tchr1\t100\t255\t5M\t*\t0\t0\tACGTA\tFFFFF\n") == "sam"
    assert detect_format(b"") == "empty"
    assert detect_format(b"hello world") == "unknown"
    assert not is_bgzf(b"\x1f\x8b")
    # A 4-byte peek can only see the FEXTRA flag; BgzfReader checks the rest.
    assert detect_format(head[:4]) == "bgzf" and detect_format(gz[:4]) == "gzip"


def test_writer_copies_data_the_caller_reuses() -> None:
    buf = bytearray(b"a" * (BLOCK_SIZE * 2 + 10))
    bio = io.BytesIO()
    with BgzfWriter(bio, threads=2) as w:
        w.write(buf)
        buf[:] = b"b" * len(buf)  # a caller refilling its buffer while blocks compress
        w.write(memoryview(buf)[:5])
    assert gzip.decompress(bio.getvalue()) == b"a" * (BLOCK_SIZE * 2 + 10) + b"bbbbb"


# --- the codec behind each level -----------------------------------------------------

def test_codec_of_each_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from bamflow.bam import bgzf

    assert bgzf.codec_of(FAST_LEVEL) == ("isal", 1)
    assert bgzf.codec_of(5) == ("libdeflate", 5)
    assert bgzf.codec_of(DEFAULT_LEVEL, "libdeflate") == ("libdeflate", DEFAULT_LEVEL)
    assert bgzf.codec_of(2, "isal") == ("isal", 2)
    assert bgzf.codec_of(DEFAULT_LEVEL) == ("zlib-ng", bgzf.DEFAULT_LEVEL_ZLIB_NG)  # zlib-ng is installed here
    monkeypatch.setattr(bgzf, "_zlib_ng", lambda: None)  # where it is not: libdeflate's level
    assert bgzf.codec_of(DEFAULT_LEVEL) == ("libdeflate", DEFAULT_LEVEL)
    with pytest.raises(ValueError, match="needs the zlib-ng package"):
        bgzf.check_level(5, "zlib-ng")


@pytest.mark.parametrize("level", [0, 1, 5, 9])
@pytest.mark.parametrize("threads", [0, 2])
def test_zlib_ng_backend_round_trip(level: int, threads: int) -> None:
    data = sample(3 * BLOCK_SIZE + 17, seed=level)
    out = compress(data, level=level, backend="zlib-ng", threads=threads)
    assert gzip.decompress(out) == data
    with BgzfReader(io.BytesIO(out)) as r:
        assert r.read() == data
    with pytest.raises(ValueError):
        compress(data, level=10, backend="zlib-ng")
    with pytest.raises(ValueError):
        compress(data, level=FAST_LEVEL, backend="zlib-ng")


def test_default_level_keeps_its_size_within_one_percent(samtools_bam: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The default level, by zlib-ng 5, against libdeflate 6 on BAM records: the same size within 1%,
    a BAM that samtools and pysam read; without zlib-ng it is libdeflate 6 itself."""
    from bamflow.bam import bgzf

    raw = isal.igzip.decompress(samtools_bam.read_bytes())
    by_default = compress(raw, level=DEFAULT_LEVEL, threads=2)
    libdeflate = compress(raw, level=DEFAULT_LEVEL, backend="libdeflate", threads=2)
    assert abs(len(by_default) / len(libdeflate) - 1) <= 0.01
    assert by_default != libdeflate  # (another codec did it)
    ours = tmp_path / "ours.bam"
    ours.write_bytes(by_default)
    subprocess.run(["samtools", "quickcheck", "-v", str(ours)], check=True)
    with pysam.AlignmentFile(str(ours), "rb") as a:
        assert sum(1 for _ in a) == 30_000
    monkeypatch.setattr(bgzf, "_zlib_ng", lambda: None)
    assert compress(raw, level=DEFAULT_LEVEL, threads=2) == libdeflate
