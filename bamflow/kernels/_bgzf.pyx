# cython: language_level=3
"""The one BGZF block reader (see _bgzf.pxd): block framing checks in C,
deflate and CRC32 by libdeflate (the ``deflate`` package, which releases the
GIL, so that bamflow.bam.bgzf.BgzfReader can inflate blocks in threads)."""

from cpython.buffer cimport PyBUF_READ
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

import deflate

_deflate_decompress = deflate.deflate_decompress
_crc32 = deflate.crc32
_DeflateError = deflate.DeflateError


class BgzfError(ValueError):
    """Input that is not valid BGZF. ``str()`` is one line naming the input and byte offset."""

    def __init__(self, message, *, source="", offset=None):
        where = f"{source}: " if source else ""
        at = f"at byte offset {offset}: " if offset is not None else ""
        super().__init__(f"{where}{at}{message}")
        self.source = source
        self.offset = offset


cdef inline uint16_t _u16(const uint8_t *p) noexcept nogil:
    return <uint16_t> (p[0] | (p[1] << 8))


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return <uint32_t> p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16) | (<uint32_t> p[3] << 24)


cdef Py_ssize_t _bc_subfield(const uint8_t *extra, Py_ssize_t xlen) noexcept nogil:
    """BSIZE from the gzip extra field's 'BC' subfield, or -1 if it has none."""
    cdef Py_ssize_t i = 0, slen
    while i + 4 <= xlen:
        slen = _u16(extra + i + 2)
        if extra[i] == 66 and extra[i + 1] == 67 and slen == 2 and i + 6 <= xlen:
            return _u16(extra + i + 4)
        i += 4 + slen
    return -1


cdef Py_ssize_t bgzf_scan(const uint8_t *p, Py_ssize_t avail, BgzfBlock *b, long long offset,
                          bint first, object source) except -2:
    """Check the framing of the block at ``p`` (``avail`` bytes there, at input
    offset ``offset``; ``first``: the input's first block). Returns the block's
    size when all of it is there, else -1 with ``b.size`` set to the size
    needed once the header is known (0 before). Raises BgzfError."""
    cdef Py_ssize_t xlen, bsize, size
    b.size = 0
    if avail < 4:
        if avail >= 1 and p[0] != 0x1f or avail >= 2 and p[1] != 0x8b:
            _bad_magic(p, avail, offset, first, source)
        return -1
    if p[0] != 0x1f or p[1] != 0x8b:
        _bad_magic(p, avail, offset, first, source)
    if p[2] != 8:
        raise BgzfError(f"corrupt BGZF block header: compression method {p[2]}, not 8 (deflate)",
                        source=source, offset=offset)
    if not (p[3] & 4):
        raise BgzfError("plain gzip, not BGZF (no 'BC' extra subfield in the gzip header); "
                        "recompress with bgzip or samtools", source=source, offset=offset)
    if avail < BGZF_FIXED_HEADER:
        return -1
    xlen = _u16(p + 10)
    if avail < BGZF_FIXED_HEADER + xlen:
        return -1
    bsize = _bc_subfield(p + BGZF_FIXED_HEADER, xlen)
    if bsize < 0:
        raise BgzfError("plain gzip, not BGZF (no 'BC' extra subfield in the gzip header); "
                        "recompress with bgzip or samtools", source=source, offset=offset)
    size = bsize + 1
    if size < BGZF_FIXED_HEADER + xlen + BGZF_FOOTER:
        raise BgzfError(f"corrupt BGZF block header: BSIZE {bsize} is smaller than the header",
                        source=source, offset=offset)
    b.size = size
    if avail < size:
        return -1
    b.cstart = BGZF_FIXED_HEADER + xlen
    b.clen = size - b.cstart - BGZF_FOOTER
    b.crc = _u32(p + size - BGZF_FOOTER)
    b.isize = _u32(p + size - 4)
    if b.isize > BGZF_MAX_BLOCK:
        raise BgzfError(f"corrupt BGZF block: ISIZE {b.isize} exceeds {BGZF_MAX_BLOCK}",
                        source=source, offset=offset)
    return size


cdef int _bad_magic(const uint8_t *p, Py_ssize_t avail, long long offset, bint first,
                    object source) except -1:
    cdef bytes start = (<const char *> p)[:avail if avail < 4 else 4]
    what = "not BGZF (nor gzip) data" if first else "corrupt BGZF block header (bad gzip magic)"
    raise BgzfError(f"{what}: starts with {start!r}", source=source, offset=offset)


cdef Py_ssize_t bgzf_inflate(const uint8_t *block, const BgzfBlock *b, uint8_t *out,
                             long long offset, object source) except -1:
    """Inflate a scanned block into ``out`` (room for ``b.isize`` bytes), checking
    the data against ISIZE and CRC32; returns ISIZE. Raises BgzfError."""
    cdef const uint8_t *cdata = block + b.cstart
    cdef uint32_t isize = b.isize
    cdef object data, view
    cdef Py_ssize_t got
    if (b.clen == <Py_ssize_t> isize + 5 and cdata[0] == 1 and _u16(cdata + 1) == isize
            and _u16(cdata + 3) == (~isize & 0xffff)):
        memcpy(out, cdata + 5, isize)  # one stored block (level 0): no inflating
    else:
        try:
            data = _deflate_decompress(PyMemoryView_FromMemory(<char *> cdata, b.clen, PyBUF_READ), isize)
        except _DeflateError:
            try:  # valid deflate data of another size than ISIZE says?
                got = len(_deflate_decompress(PyMemoryView_FromMemory(<char *> cdata, b.clen, PyBUF_READ),
                                              BGZF_MAX_BLOCK))
            except _DeflateError:
                raise BgzfError("corrupt BGZF block: corrupt deflate data", source=source, offset=offset) from None
            raise BgzfError(f"corrupt BGZF block: deflate data holds {got} bytes, ISIZE says {isize}",
                            source=source, offset=offset) from None
        got = len(data)
        if got != isize:
            raise BgzfError(f"corrupt BGZF block: deflate data holds {got} bytes, ISIZE says {isize}",
                            source=source, offset=offset)
        if isize:
            memcpy(out, <const char *> (<bytearray> data), isize)
    view = PyMemoryView_FromMemory(<char *> out, isize, PyBUF_READ)
    actual = _crc32(view)
    if actual != b.crc:
        raise BgzfError(f"corrupt BGZF block: CRC32 mismatch: footer says {b.crc:#010x}, data has {actual:#010x}",
                        source=source, offset=offset)
    return isize


cdef int bgzf_check_end(Py_ssize_t leftover, Py_ssize_t header_known, long long blocks,
                        bint last_empty, long long offset, object source) except -1:
    """At the end of the input: ``leftover`` unparsed bytes (``header_known``:
    the size of the incomplete block, 0 if its header was incomplete), after
    ``blocks`` blocks of which the last was empty or not. Raises BgzfError
    unless the input ended after a complete, empty last block."""
    if leftover:
        if header_known:
            raise BgzfError(f"truncated BGZF block: {leftover} of its {header_known} bytes present",
                            source=source, offset=offset)
        raise BgzfError(f"truncated BGZF block header: {leftover} bytes where a block header is expected",
                        source=source, offset=offset)
    if blocks == 0:
        raise BgzfError("empty input: no BGZF data at all", source=source, offset=None)
    if not last_empty:
        raise BgzfError("no BGZF EOF marker: file is truncated", source=source, offset=offset)
    return 0


# -- for the Python-side reader ----------------------------------------------------------

def scan_block(const uint8_t[::1] buf, Py_ssize_t start, long long offset, bint first, source):
    """(size, cstart, clen, crc, isize) of the block at ``buf[start:]``, or
    (-1, needed, 0, 0, 0) if incomplete (``needed``: its size once the header is
    known, else 0). Raises BgzfError."""
    cdef BgzfBlock b
    cdef Py_ssize_t avail = buf.shape[0] - start
    cdef Py_ssize_t size
    if avail <= 0:
        return (-1, 0, 0, 0, 0)
    size = bgzf_scan(&buf[start], avail, &b, offset, first, source)
    if size < 0:
        return (-1, b.size, 0, 0, 0)
    return (size, b.cstart, b.clen, b.crc, b.isize)


def inflate_block(const uint8_t[::1] block, Py_ssize_t cstart, Py_ssize_t clen, uint32_t crc, uint32_t isize,
                  long long offset, source):
    """The checked payload (bytearray) of a block scanned by :func:`scan_block`."""
    cdef BgzfBlock b
    cdef bytearray out = bytearray(isize)
    b.size = block.shape[0]
    b.cstart = cstart
    b.clen = clen
    b.crc = crc
    b.isize = isize
    if cstart + clen > block.shape[0]:
        raise ValueError("inflate_block: the block is shorter than its scan said")
    bgzf_inflate(&block[0], &b, <uint8_t *> (<char *> out) if isize else <uint8_t *> &block[0], offset, source)
    return out


def check_end(Py_ssize_t leftover, Py_ssize_t header_known, long long blocks, bint last_empty, long long offset,
              source):
    """See bgzf_check_end: raises BgzfError unless the input ended properly."""
    bgzf_check_end(leftover, header_known, blocks, last_empty, offset, source)
