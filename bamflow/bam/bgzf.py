"""BGZF (blocked gzip, SAM spec section 4.1) writer and reader for BAM stages.

Reading goes through the one BGZF block reader (bamflow.kernels._bgzf), the
same checks the kernels apply to BGZF inside their streams.

A BGZF file is a series of gzip members ("blocks"), each holding at most 64 KiB
of uncompressed and at most 64 KiB of compressed data, whose gzip header carries
an extra subfield ``BC`` with the block's total size minus one; it ends with a
fixed 28-byte empty block, the EOF marker. Because blocks are independent they
are compressed and decompressed in parallel here, in worker threads
(libdeflate and ISA-L release the GIL), while the bytes stay in order.

:class:`BgzfWriter` and :class:`BgzfReader` are binary file-likes over a path,
an fd or a binary file object (pipes and FIFOs included: nothing seeks).
Neither is safe to share between threads.
"""

from __future__ import annotations

import io
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, BinaryIO, Literal

import deflate
import isal.isal_zlib

from ..kernels._bgzf import BgzfError, check_end, inflate_block, scan_block

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_LEVEL",
    "DEFAULT_LEVEL_ZLIB_NG",
    "EOF_BLOCK",
    "FAST_LEVEL",
    "MAX_BLOCK_SIZE",
    "BgzfError",
    "BgzfReader",
    "BgzfWriter",
    "codec_of",
    "compress_block",
    "detect_format",
    "is_bgzf",
]

#: Most uncompressed bytes per block, as htslib (BGZF_BLOCK_SIZE). Chosen so that
#: even incompressible data stored verbatim fits in MAX_BLOCK_SIZE.
BLOCK_SIZE = 0xFF00
#: Most bytes of a whole block, header and footer included (BSIZE is 16 bits).
MAX_BLOCK_SIZE = 0x10000
#: libdeflate level whose output is within 1.5% of ``samtools view -b``'s default
#: (measured: docs/bgzf.md); samtools itself uses libdeflate level 7 equivalent.
#: With backend "auto" and the zlib-ng package installed, this level is
#: compressed by zlib-ng level 5 instead (:data:`DEFAULT_LEVEL_ZLIB_NG`).
DEFAULT_LEVEL = 6
#: zlib-ng's level that stands in for libdeflate's DEFAULT_LEVEL: on 10x-style
#: BAM records within 0.6% of its size at 0.84x its CPU time (docs/bgzf.md).
DEFAULT_LEVEL_ZLIB_NG = 5
#: ISA-L level 1: ~5x faster than DEFAULT_LEVEL, ~15-20% larger output.
FAST_LEVEL: Literal["fast"] = "fast"

_HEADER = struct.Struct("<4BI2BH")  # ID1 ID2 CM FLG MTIME XFL OS XLEN: the fixed 12 bytes
_BGZF_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00"  # + BSIZE-1
_HEADER_LEN = len(_BGZF_HEADER) + 2  # 18
_FOOTER = struct.Struct("<II")  # CRC32 ISIZE
_OVERHEAD = _HEADER_LEN + _FOOTER.size  # 26
#: The standard empty block that ends every BGZF file.
EOF_BLOCK = _BGZF_HEADER + b"\x1b\x00\x03\x00" + b"\x00" * 8

Level = int | str  # an int, or FAST_LEVEL
Backend = Literal["auto", "libdeflate", "isal", "zlib-ng"]
Source = int | str | os.PathLike[str] | BinaryIO


# --- compression -----------------------------------------------------------


def check_level(level: Level, backend: Backend = "auto") -> Level:
    """``level`` if ``backend`` has it (libdeflate 0-12, ISA-L 0-3, zlib-ng
    0-9, or :data:`FAST_LEVEL`); else ValueError."""
    if level == FAST_LEVEL:
        if backend in ("libdeflate", "zlib-ng"):
            raise ValueError("level 'fast' is ISA-L level 1; it needs backend 'auto' or 'isal'")
        return level
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(f"level must be an int or {FAST_LEVEL!r}, not {level!r}")
    if backend == "isal":
        if not 0 <= level <= 3:
            raise ValueError(f"ISA-L levels are 0-3, not {level}")
        return level
    if backend == "zlib-ng":
        if _zlib_ng() is None:
            raise ValueError("backend 'zlib-ng' needs the zlib-ng package (pip install zlib-ng)")
        if not 0 <= level <= 9:
            raise ValueError(f"zlib-ng levels are 0-9, not {level}")
        return level
    if backend not in ("auto", "libdeflate"):
        raise ValueError(f"backend must be 'auto', 'libdeflate', 'isal' or 'zlib-ng', not {backend!r}")
    if not 0 <= level <= 12:
        raise ValueError(f"libdeflate levels are 0-12 (0: stored, no compression), not {level}")
    return level


def _zlib_ng() -> object | None:
    """zlib-ng's zlib module, or None if the zlib-ng package is not installed."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return None
    return zlib_ng


def _zlib_ng_compressor(level: int) -> Callable[[bytes], bytes]:
    zlib_ng: Any = _zlib_ng()
    deflated = zlib_ng.DEFLATED

    def compress(data: bytes) -> bytes:
        # a compressobj, not zlib_ng.compress(), which holds the GIL while it works
        packer = zlib_ng.compressobj(level, deflated, -15)
        return packer.compress(data) + packer.flush()

    return compress


def codec_of(level: Level, backend: Backend = "auto") -> tuple[str, int]:
    """(library, its level) that compresses ``level`` with ``backend``: FAST_LEVEL
    is ISA-L 1; with "auto", DEFAULT_LEVEL is zlib-ng's DEFAULT_LEVEL_ZLIB_NG
    when the zlib-ng package is installed (the same size within 1%, faster)
    and libdeflate's level otherwise; other ints are libdeflate levels."""
    check_level(level, backend)
    if level == FAST_LEVEL:
        return "isal", 1
    assert isinstance(level, int)
    if backend == "auto":
        if level == DEFAULT_LEVEL and _zlib_ng() is not None:
            return "zlib-ng", DEFAULT_LEVEL_ZLIB_NG
        return "libdeflate", level
    return backend, level


def _compressor(level: Level, backend: Backend) -> Callable[[bytes], bytes | bytearray]:
    """Return a function: uncompressed bytes -> raw deflate data, for ``level``/``backend``."""
    library, library_level = codec_of(level, backend)
    if library == "isal":
        return lambda data: isal.isal_zlib.compress(data, library_level, wbits=-15)
    if library == "zlib-ng":
        return _zlib_ng_compressor(library_level)
    return lambda data: deflate.deflate_compress(data, library_level)


def _stored(data: bytes) -> bytes:
    """Raw deflate of ``data`` as one final stored (uncompressed) block; len(data) <= 65535."""
    n = len(data)
    return b"\x01" + struct.pack("<HH", n, n ^ 0xFFFF) + data


def _pack_block(data: bytes, compress: Callable[[bytes], bytes | bytearray]) -> bytes:
    """One complete BGZF block holding ``data`` (at most BLOCK_SIZE bytes)."""
    cdata: bytes | bytearray = compress(data)
    if len(cdata) + _OVERHEAD > MAX_BLOCK_SIZE:
        # Cannot happen for BLOCK_SIZE inputs with a sane compressor, but a
        # stored block always fits: 65280 + 5 + 26 <= 65536.
        cdata = _stored(data)
    bsize = len(cdata) + _OVERHEAD
    return b"".join((_BGZF_HEADER, struct.pack("<H", bsize - 1), cdata, _FOOTER.pack(deflate.crc32(data), len(data))))


def compress_block(data: bytes, level: Level = DEFAULT_LEVEL, backend: Backend = "auto") -> bytes:
    """Return one BGZF block holding ``data`` (at most :data:`BLOCK_SIZE` bytes)."""
    if len(data) > BLOCK_SIZE:
        raise ValueError(f"a BGZF block holds at most {BLOCK_SIZE} bytes, not {len(data)}")
    return _pack_block(bytes(data), _compressor(level, backend))


def _endpoint(target: Source, flags: int, close: bool | None) -> tuple[str, int | None, BinaryIO | None, bool]:
    """(name, fd or None, file object or None, whether close() closes it) of a
    path (opened here with ``flags``; closed by default), fd or file object."""
    name = _source_name(target)
    if isinstance(target, (str, os.PathLike)):
        return name, os.open(target, flags, 0o666), None, True if close is None else close
    if isinstance(target, int):
        return name, target, None, bool(close)
    return name, None, target, bool(close)


def _source_name(obj: object) -> str:
    if isinstance(obj, int):
        return f"fd {obj}"
    if isinstance(obj, (str, os.PathLike)):
        return os.fsdecode(obj)
    name = getattr(obj, "name", None)
    return str(name) if isinstance(name, (str, int)) else repr(obj)


class BgzfWriter:
    """Binary writable file-like that writes BGZF, compressing blocks in parallel.

    ``output`` is a path (opened and created/truncated here), an fd or a binary
    file object; ``close_output`` (default: only if it is a path) says whether
    :meth:`close` closes it. ``level`` is a libdeflate level 0-12 (0 stores the
    data uncompressed) or ``"fast"`` (ISA-L level 1); ``backend="isal"`` makes an
    int level an ISA-L level 0-3, ``backend="zlib-ng"`` a zlib-ng level 0-9.
    With ``backend="auto"``, :data:`DEFAULT_LEVEL` is compressed by zlib-ng
    level 5 when zlib-ng is installed (:func:`codec_of`). ``threads`` compressing threads (0: compress in
    the calling thread) work on at most ``4 * threads`` blocks at a time, so
    memory stays bounded and a slow reader of the output slows the writer down.

    Compressed blocks are written in order from the calling thread, so an error
    writing the output (``BrokenPipeError``, ``OSError(ENOSPC)``) is raised by
    :meth:`write`, :meth:`flush` or :meth:`close`. The EOF marker is written only
    by a successful :meth:`close`: leaving a ``with`` block by an exception, or
    a failed write, ends the threads and leaves the output without it, so a
    failed run never looks complete to ``samtools quickcheck``.
    """

    def __init__(
        self,
        output: Source,
        *,
        level: Level = DEFAULT_LEVEL,
        threads: int = 2,
        backend: Backend = "auto",
        close_output: bool | None = None,
    ) -> None:
        self._compress = _compressor(level, backend)
        if threads < 0:
            raise ValueError(f"threads must be >= 0, not {threads}")
        self.name, self._fd, self._file, self._close_output = _endpoint(
            output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, close_output
        )
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bgzf-deflate") if threads else None
        self._max_pending = max(2, 4 * threads)
        self._pending: deque[Future[bytes]] = deque()
        self._buf = bytearray()
        self._error: BaseException | None = None
        self._closed = False
        self.uncompressed_bytes = 0  #: bytes accepted by write() so far
        self.compressed_bytes = 0  #: bytes written to the output so far

    # file-like protocol
    @property
    def closed(self) -> bool:
        return self._closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def __enter__(self) -> BgzfWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # Never close() here: an unclosed writer was abandoned, so no EOF marker.
        if not getattr(self, "_closed", True):
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        """Buffer ``data``, sending each full block off to be compressed; return len(data)."""
        self._check_usable()
        view = memoryview(data).cast("B")
        n = len(view)
        self.uncompressed_bytes += n
        start = 0
        if self._buf:
            start = min(n, BLOCK_SIZE - len(self._buf))
            self._buf += view[:start]
            if len(self._buf) < BLOCK_SIZE:
                return n
            self._submit(bytes(self._buf))
            self._buf.clear()
        # Whole blocks straight from the caller's data: one copy, no buffering.
        while n - start >= BLOCK_SIZE:
            self._submit(bytes(view[start : start + BLOCK_SIZE]))
            start += BLOCK_SIZE
        self._buf += view[start:]
        return n

    def flush_block(self) -> None:
        """End the current block now (if it holds data), e.g. after the BAM header.

        The next write() then starts a new block, so its virtual file offset has
        a zero in-block part; written data is not waited for.
        """
        self._check_usable()
        if self._buf:
            self._submit(bytes(self._buf))
            self._buf.clear()

    def flush(self) -> None:
        """End the current block and write every compressed block to the output."""
        self.flush_block()
        self._drain(0)
        self._flush_output()

    def close(self) -> None:
        """Flush, write the EOF marker, stop the threads, close the output if owned.

        After a failed write, closing re-raises that error and writes no EOF marker.
        """
        if self._closed:
            return
        if self._error is not None:
            error = self._error
            self.abort()
            raise error
        try:
            self.flush_block()
            self._drain(0)
            self._write_out(EOF_BLOCK)
            self._flush_output()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._close_fd_or_file()

    def abort(self) -> None:
        """Give up: drop buffered and in-flight blocks, write no EOF marker, stop the threads.

        Returns once no worker thread runs (each finishes at most its current block).
        """
        if self._closed:
            return
        self._closed = True
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._buf.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._close_fd_or_file()
        except OSError:
            pass  # already failing; the caller's exception is what matters

    # internals
    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"I/O operation on closed BgzfWriter ({self.name})")
        if self._error is not None:
            raise self._error

    def _submit(self, block: bytes) -> None:
        if self._pool is None:
            self._write_out(_pack_block(block, self._compress))
            return
        self._pending.append(self._pool.submit(_pack_block, block, self._compress))
        self._drain(self._max_pending - 1)

    def _drain(self, keep: int) -> None:
        """Write finished blocks in order; wait for the oldest while more than ``keep`` are in flight."""
        pending = self._pending
        while pending and (len(pending) > keep or pending[0].done()):
            try:
                block = pending.popleft().result()
            except BaseException as e:  # the block is lost: the stream cannot continue
                self._error = e
                raise
            self._write_out(block)

    def _write_out(self, block: bytes) -> None:
        try:
            if self._fd is not None:
                view = memoryview(block)
                while view:
                    view = view[os.write(self._fd, view) :]
            else:
                assert self._file is not None
                view = memoryview(block)
                while view:
                    written = self._file.write(view)  # raw (unbuffered) files may write part
                    if written is None:
                        raise BlockingIOError(f"{self.name}: non-blocking output is not supported")
                    view = view[written:]
        except BaseException as e:
            self._error = e
            raise
        self.compressed_bytes += len(block)

    def _flush_output(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except BaseException as e:
                self._error = e
                raise

    def _close_fd_or_file(self) -> None:
        if not self._close_output:
            return
        self._close_output = False
        if self._fd is not None:
            os.close(self._fd)
        elif self._file is not None:
            self._file.close()


# --- decompression ---------------------------------------------------------


def is_bgzf(first_bytes: bytes) -> bool:
    """True if ``first_bytes`` start with a BGZF block header.

    18 bytes give a definite answer. Fewer (at least 4) that start a gzip header
    with the FEXTRA flag count as BGZF: BgzfReader then checks the 'BC' subfield
    and names plain gzip. Without FEXTRA it is plain gzip, whatever follows.
    """
    if len(first_bytes) < 4 or first_bytes[:3] != b"\x1f\x8b\x08" or not first_bytes[3] & 4:
        return False
    try:
        scan_block(bytes(first_bytes), 0, 0, True, "")
    except BgzfError:
        return False
    return True


def detect_format(first_bytes: bytes) -> str:
    """Classify a file by its first bytes (a few hundred suffice).

    Returns "bgzf", "gzip" (gzip but not BGZF), "bam-raw" (uncompressed BAM),
    "sam" (text starting with '@' or a SAM alignment line), "empty" or "unknown".
    """
    if not first_bytes:
        return "empty"
    if first_bytes[:2] == b"\x1f\x8b":
        return "bgzf" if is_bgzf(first_bytes) else "gzip"
    if first_bytes[:4] == b"BAM\x01":
        return "bam-raw"
    if first_bytes[:1] == b"@":
        return "sam"
    fields = first_bytes.split(b"\n", 1)[0].split(b"\t")
    if len(fields) >= 11 and fields[1].isdigit() and fields[3].isdigit() and fields[4].isdigit():
        return "sam"
    return "unknown"


class BgzfReader(io.BufferedIOBase):
    """Binary readable file-like that decompresses BGZF, inflating blocks in parallel.

    ``input`` is a path, an fd or a binary file object; it is read strictly
    sequentially (pipes and FIFOs work) and closed by :meth:`close` only if it is
    a path (or ``close_input=True``). Every block's header, BSIZE, deflate data,
    CRC32 and ISIZE are checked, and the input must end with an empty block (the
    EOF marker): anything else raises :class:`BgzfError` naming the input and
    the byte offset of the bad block, once the data before it has been read.
    ``threads`` inflating threads (0: in the calling thread) work up to
    ``4 * threads`` blocks ahead.
    """

    _CHUNK = 1 << 20

    def __init__(self, input: Source, *, threads: int = 2, close_input: bool | None = None) -> None:
        super().__init__()
        if threads < 0:
            raise ValueError(f"threads must be >= 0, not {threads}")
        self.name, self._fd, self._file, self._close_input = _endpoint(input, os.O_RDONLY, close_input)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bgzf-inflate") if threads else None
        self._ahead = max(2, 4 * threads)
        self._pending: deque[Future[bytes | bytearray]] = deque()
        self._raw = bytearray()  # compressed bytes read but not yet parsed
        self._raw_offset = 0  # input offset of self._raw[0]
        self._input_done = False  # no more raw input
        self._scan_done = False  # every block queued (or an error queued)
        self._blocks = 0
        self._last_isize: int | None = None
        self._out = memoryview(b"")  # current decompressed block, unread part

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._close_input:
            self._close_input = False
            if self._fd is not None:
                os.close(self._fd)
            elif self._file is not None:
                self._file.close()
        super().close()

    def read_block(self) -> bytes:
        """Return the rest of the current block or the next non-empty block; b"" at the end."""
        self._check_open()
        if not self._out and not self._next_block():
            return b""
        data = bytes(self._out)
        self._out = memoryview(b"")
        return data

    def blocks(self) -> Iterator[bytes]:
        """Iterate over the decompressed blocks (see :meth:`read_block`)."""
        while block := self.read_block():
            yield block

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        if size is None or size < 0:
            parts = [bytes(self._out)]
            self._out = memoryview(b"")
            while self._next_block():
                parts.append(bytes(self._out))
                self._out = memoryview(b"")
            return b"".join(parts)
        if size == 0:
            return b""
        buf = bytearray(size)
        return bytes(buf[: self.readinto(buf)])

    def read1(self, size: int = -1) -> bytes:
        self._check_open()
        if not self._out and not self._next_block():
            return b""
        n = len(self._out) if size < 0 else min(size, len(self._out))
        data = bytes(self._out[:n])
        self._out = self._out[n:]
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        self._check_open()
        target = memoryview(b).cast("B")
        done = 0
        while done < len(target):
            if not self._out and not self._next_block():
                break
            n = min(len(target) - done, len(self._out))
            target[done : done + n] = self._out[:n]
            self._out = self._out[n:]
            done += n
        return done

    def readinto1(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        self._check_open()
        if not self._out and not self._next_block():
            return 0
        target = memoryview(b).cast("B")
        n = min(len(target), len(self._out))
        target[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def peek(self, size: int = 0) -> bytes:
        """Return buffered bytes without consuming them (the rest of the current block)."""
        self._check_open()
        if not self._out:
            self._next_block()
        return bytes(self._out)

    # internals
    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed BgzfReader ({self.name})")

    def _next_block(self) -> bool:
        """Make the next non-empty block current; False at the (valid) end of the input."""
        while True:
            self._fill_pending()
            if not self._pending:
                return False
            data = self._pending.popleft().result()
            if data:
                self._out = memoryview(data)
                return True

    def _fill_pending(self) -> None:
        while not self._scan_done and len(self._pending) < self._ahead:
            try:
                job = self._scan_block()
            except BgzfError as e:
                fut: Future[bytes | bytearray] = Future()
                fut.set_exception(e)
                self._pending.append(fut)
                self._scan_done = True
                return
            if job is None:
                self._scan_done = True
                return
            if self._pool is None:
                done: Future[bytes | bytearray] = Future()
                try:
                    done.set_result(job())
                except BgzfError as e:
                    done.set_exception(e)
                self._pending.append(done)
            else:
                self._pending.append(self._pool.submit(job))

    def _read_raw(self, need: int) -> bool:
        """Read input until ``need`` unparsed bytes are buffered; False if it ends first."""
        while len(self._raw) < need and not self._input_done:
            if self._fd is not None:
                chunk = os.read(self._fd, self._CHUNK)
            else:
                assert self._file is not None
                read1 = getattr(self._file, "read1", None)
                chunk = read1(self._CHUNK) if read1 is not None else self._file.read(self._CHUNK)
                if chunk is None:
                    raise BlockingIOError(f"{self.name}: non-blocking input is not supported")
            if not chunk:
                self._input_done = True
            self._raw += chunk
        return len(self._raw) >= need

    def _scan_block(self) -> Callable[[], bytes | bytearray] | None:
        """Check the next block's framing (the one BGZF block reader); return a
        job inflating it, or None at a valid end of the input."""
        offset = self._raw_offset
        while True:
            size, cstart, clen, crc, isize = scan_block(self._raw, 0, offset, self._blocks == 0, self.name)
            if size >= 0:
                break
            needed = cstart  # (incomplete: the block's size once its header is in, else 0)
            if not self._read_raw(max(needed, len(self._raw) + 1)):
                check_end(len(self._raw), needed, self._blocks, self._last_isize == 0, offset, self.name)
                return None
        block = bytes(self._raw[:size])
        del self._raw[:size]
        self._raw_offset += size
        self._blocks += 1
        self._last_isize = isize
        name = self.name
        return lambda: inflate_block(block, cstart, clen, crc, isize, offset, name)
