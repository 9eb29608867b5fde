# cython: language_level=3
"""Building blocks shared by the kernels (see _records.pxd for what is shared
and how): output staging, input buffering with BGZF unwrapping, resumable BAM
header parsing, and record helpers (aux walk, canonical tag value bytes).

The structs and the ``cdef inline`` helpers (_u16, _u32, _aux_offset,
_b_elem_size) are defined in _records.pxd; this module defines the rest.
"""

from libc.errno cimport errno
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, strerror, strlen

from isal.isal_zlib import decompress as _inflate

from bamflow.kernels._posixio cimport read_some, wait_readable, write_all


cdef int _raise_errno(str what) except -1:
    cdef int err = errno
    raise OSError(err, f"{what}: {strerror(err).decode()}")


cdef str _name_of(const uint8_t *rec, uint32_t block_size):
    """The read name of a record (for messages), as safely as the record allows."""
    cdef Py_ssize_t l = rec[8] if block_size >= 32 else 0
    if l < 1 or 32 + l > block_size:
        return "?"
    return (<const char *> rec + 32)[:l - 1].decode("utf-8", "replace")


# -- output staging ---------------------------------------------------------------

cdef int _flush(OutBuf *o) except -1:
    if o.used:
        if write_all(o.fd, o.data, o.used) < 0:
            _raise_errno("write")
        o.used = 0
    return 0


cdef int _put(OutBuf *o, const char *data, Py_ssize_t length) except -1:
    if o.used + length > o.cap:
        _flush(o)
        if length >= o.cap:
            if write_all(o.fd, data, length) < 0:
                _raise_errno("write")
            return 0
    memcpy(o.data + o.used, data, length)
    o.used += length
    return 0


cdef OutBuf *_new_outbufs(list fds, Py_ssize_t cap) except NULL:
    cdef Py_ssize_t i, n = len(fds)
    cdef OutBuf *outs = <OutBuf *> calloc(n if n else 1, sizeof(OutBuf))
    if outs == NULL:
        raise MemoryError()
    for i in range(n):
        outs[i].fd = fds[i]
        outs[i].cap = cap
        outs[i].data = <char *> malloc(cap)
        if outs[i].data == NULL:
            _free_outbufs(outs, n)
            raise MemoryError()
    return outs


cdef void _free_outbufs(OutBuf *outs, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    if outs == NULL:
        return
    for i in range(n):
        free(outs[i].data)
    free(outs)


# -- input buffering --------------------------------------------------------------

cdef int _reserve_data(InBuf *ib, Py_ssize_t more) except -1:
    """Room for ``more`` bytes at ib.end."""
    cdef char *grown
    cdef Py_ssize_t new_cap
    if ib.end + more <= ib.cap:
        return 0
    new_cap = 2 * ib.cap
    if new_cap < ib.end + more:
        new_cap = ib.end + more
    grown = <char *> realloc(ib.data, new_cap)
    if grown == NULL:
        raise MemoryError()
    ib.data = grown
    ib.cap = new_cap
    return 0


cdef Py_ssize_t _fill(InBuf *ib, Py_ssize_t need) except -1:
    """Read once into ib, first making room for ``need`` bytes from ``start``."""
    cdef Py_ssize_t n
    if ib.start == ib.end:
        ib.start = ib.end = 0
    elif ib.start > 0:  # at most one partial record is left: cheap to move
        memmove(ib.data, ib.data + ib.start, ib.end - ib.start)
        ib.end -= ib.start
        ib.start = 0
    if ib.end == ib.cap or need > ib.cap:
        _reserve_data(ib, need - ib.end if need - ib.end > 1 else 1)
    if ib.bgzf:
        return _fill_bgzf(ib)
    n = read_some(ib.fd, ib.data + ib.end, ib.cap - ib.end)
    if n < 0:
        _raise_errno("read")
    if n == 0:
        ib.eof = True
    ib.end += n
    if not ib.sniffed and (ib.end >= 2 or ib.eof):
        ib.sniffed = True
        if ib.end >= 2 and <uint8_t> ib.data[0] == 0x1f and <uint8_t> ib.data[1] == 0x8b:
            # BGZF: what was read is wire bytes, not BAM bytes
            ib.bgzf = True
            ib.wcap = 1 << 17
            if ib.wcap < ib.end:
                ib.wcap = ib.end
            ib.wire = <char *> malloc(ib.wcap)
            if ib.wire == NULL:
                raise MemoryError()
            memcpy(ib.wire, ib.data, ib.end)
            ib.wstart = 0
            ib.wend = ib.end
            ib.end = ib.start = 0
            eof = ib.eof
            ib.eof = False
            _unwrap_bgzf(ib)
            if eof:
                _end_of_wire(ib)
    return n


cdef Py_ssize_t _fill_bgzf(InBuf *ib) except -1:
    cdef char *grown
    cdef Py_ssize_t n
    if ib.wstart == ib.wend:
        ib.wstart = ib.wend = 0
    elif ib.wstart > 0:
        memmove(ib.wire, ib.wire + ib.wstart, ib.wend - ib.wstart)
        ib.wend -= ib.wstart
        ib.wstart = 0
    if ib.wend == ib.wcap:
        grown = <char *> realloc(ib.wire, 2 * ib.wcap)
        if grown == NULL:
            raise MemoryError()
        ib.wire = grown
        ib.wcap *= 2
    n = read_some(ib.fd, ib.wire + ib.wend, ib.wcap - ib.wend)
    if n < 0:
        _raise_errno("read")
    ib.wend += n
    _unwrap_bgzf(ib)
    if n == 0:
        _end_of_wire(ib)
    return n


cdef int _end_of_wire(InBuf *ib) except -1:
    if ib.wend > ib.wstart:
        raise ValueError(f"BGZF stream ends inside a block at offset {ib.wire_offset}")
    ib.eof = True
    return 0


cdef int _unwrap_bgzf(InBuf *ib) except -1:
    """Move the payload of every whole BGZF block in the wire buffer to data.

    Stored (level 0) blocks are copied; compressed ones are inflated."""
    cdef const uint8_t *p
    cdef const uint8_t *cdata
    cdef Py_ssize_t avail, xlen, q, total, clen
    cdef long bsize
    cdef uint32_t isize
    cdef bytes inflated
    while True:
        avail = ib.wend - ib.wstart
        if avail < 12:
            return 0
        p = <const uint8_t *> ib.wire + ib.wstart
        if p[0] != 0x1f or p[1] != 0x8b or p[2] != 8 or not (p[3] & 4):
            raise ValueError(f"not a BGZF block at offset {ib.wire_offset}")
        xlen = _u16(p + 10)
        if avail < 12 + xlen:
            return 0
        bsize = -1
        q = 12
        while q + 4 <= 12 + xlen:
            if p[q] == 66 and p[q + 1] == 67 and _u16(p + q + 2) == 2 and q + 6 <= 12 + xlen:
                bsize = _u16(p + q + 4)
            q += 4 + _u16(p + q + 2)
        if bsize < 0:
            raise ValueError(f"gzip block without a BGZF size field at offset {ib.wire_offset}")
        total = bsize + 1
        if total < 12 + xlen + 8:
            raise ValueError(f"bad BGZF block size at offset {ib.wire_offset}")
        if avail < total:
            return 0
        isize = _u32(p + total - 4)
        cdata = p + 12 + xlen
        clen = total - 12 - xlen - 8
        if isize:
            _reserve_data(ib, isize)
            p = <const uint8_t *> ib.wire + ib.wstart  # (the wire buffer did not move)
            cdata = p + 12 + xlen
            if clen == isize + 5 and cdata[0] == 1 and _u16(cdata + 1) == isize and _u16(cdata + 3) == (~isize & 0xffff):
                memcpy(ib.data + ib.end, cdata + 5, isize)
            else:
                try:
                    inflated = _inflate((<const char *> cdata)[:clen], -15)
                except Exception as e:
                    raise ValueError(f"corrupt BGZF block at offset {ib.wire_offset}: {e}") from None
                if <uint32_t> len(inflated) != isize:
                    raise ValueError(f"corrupt BGZF block at offset {ib.wire_offset}: size mismatch")
                memcpy(ib.data + ib.end, <const char *> inflated, isize)
            ib.end += isize
        ib.wstart += total
        ib.wire_offset += total


cdef int _init_inbuf(InBuf *ib, int fd, Py_ssize_t cap) except -1:
    ib.fd = fd
    ib.cap = cap
    ib.start = ib.end = 0
    ib.eof = False
    ib.records = 0
    ib.sniffed = ib.bgzf = False
    ib.wire = NULL
    ib.wstart = ib.wend = ib.wcap = 0
    ib.wire_offset = 0
    ib.data = <char *> malloc(cap)
    if ib.data == NULL:
        raise MemoryError()
    return 0


# -- header parsing (resumable, so that a header arriving byte by byte costs O(n)) --

cdef void _hdr_init(HdrState *st) noexcept:
    st.off = 0
    st.need = 8
    st.stage = 0
    st.n_ref = 0
    st.refs_done = 0


cdef int _hdr_step(HdrState *st, const uint8_t *p, Py_ssize_t n, str where) except -1:
    """Parse on from st.off over p[0:n]; 1 when the header is complete, else 0
    with st.need set. Raises ValueError on a stream that is not a BAM header."""
    cdef int32_t v
    while True:
        if st.stage == 0:
            if memcmp(p, b"BAM\x01", n if n < 4 else 4) != 0:
                hint = "; BGZF-compressed? decompress first" if n >= 2 and p[0] == 0x1f and p[1] == 0x8b else ""
                raise ValueError(f"{where}not a BAM stream (magic {(<const char *> p)[:(n if n < 4 else 4)]!r}{hint})")
            if n < 8:
                st.need = 8
                return 0
            v = <int32_t> _u32(p + 4)
            if v < 0:
                raise ValueError(f"{where}bad BAM header (l_text {v})")
            st.off = 8 + <Py_ssize_t> v
            st.stage = 1
        elif st.stage == 1:
            if n < st.off + 4:
                st.need = st.off + 4
                return 0
            v = <int32_t> _u32(p + st.off)
            if v < 0:
                raise ValueError(f"{where}bad BAM header (n_ref {v})")
            st.n_ref = v
            st.off += 4
            st.stage = 2
        elif st.stage == 2:
            if st.refs_done == st.n_ref:
                st.stage = 3
                st.need = st.off
                return 1
            if n < st.off + 4:
                st.need = st.off + 4
                return 0
            v = <int32_t> _u32(p + st.off)
            if v < 1:
                raise ValueError(f"{where}bad BAM header (reference {st.refs_done}: l_name {v})")
            if n < st.off + 4 + v + 4:
                st.need = st.off + 4 + v + 4
                return 0
            st.off += 4 + v + 4
            st.refs_done += 1
        else:
            return 1


cdef int _read_header(InBuf *ib, HdrState *st, str where) except -1:
    """Block until ib holds the whole header at ib.data[ib.start:]; raises at EOF."""
    _hdr_init(st)
    while True:
        if ib.end - ib.start > 0 and _hdr_step(st, <const uint8_t *> ib.data + ib.start,
                                               ib.end - ib.start, where) == 1:
            return 0
        if ib.eof:
            if ib.end == ib.start:
                raise ValueError(f"{where}not a BAM stream (empty)")
            raise ValueError(f"{where}truncated BAM header")
        if wait_readable(ib.fd) < 0:
            _raise_errno("poll")
        _fill(ib, st.need)


# -- records ----------------------------------------------------------------------

cdef int _find_tags(const uint8_t *rec, uint32_t block_size, Py_ssize_t aux,
                    const uint16_t *tags, int n_tags, const uint8_t **found,
                    long long index) except -1:
    """Walk the aux block; found[i] = the type char of tags[i] (value follows) or NULL.

    Stops as soon as every tag is found. Returns the number found.
    """
    cdef const uint8_t *p = rec + aux
    cdef const uint8_t *end = rec + block_size
    cdef const uint8_t *z
    cdef uint16_t t
    cdef uint8_t typ
    cdef Py_ssize_t size, elem
    cdef int i, n_found = 0
    for i in range(n_tags):
        found[i] = NULL
    while p < end:
        if end - p < 3:
            raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): aux data runs past the record end")
        t = _u16(p)
        typ = p[2]
        if typ == b'A' or typ == b'c' or typ == b'C':
            size = 1
        elif typ == b's' or typ == b'S':
            size = 2
        elif typ == b'i' or typ == b'I' or typ == b'f':
            size = 4
        elif typ == b'Z' or typ == b'H':
            z = <const uint8_t *> memchr(p + 3, 0, end - (p + 3))
            if z == NULL:
                raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): "
                                 f"unterminated {chr(typ)} tag {(<const char *> p)[:2].decode('latin-1')}")
            size = z - (p + 3) + 1
        elif typ == b'B':
            if end - p < 8:
                raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): aux data runs past the record end")
            elem = _b_elem_size(p[3])
            if elem == 0:
                raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): "
                                 f"bad B array subtype {chr(p[3])!r} in tag {(<const char *> p)[:2].decode('latin-1')}")
            size = 5 + elem * <Py_ssize_t> _u32(p + 4)
        else:
            raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): "
                             f"bad tag type {chr(typ)!r} in tag {(<const char *> p)[:2].decode('latin-1')}")
        if size > end - (p + 3):
            raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): aux data runs past the record end")
        for i in range(n_tags):
            if tags[i] == t and found[i] == NULL:
                found[i] = p + 2
                n_found += 1
                if n_found == n_tags:
                    return n_found
        p += 3 + size
    return n_found


cdef int _reserve(Scratch *s, Py_ssize_t more) except -1:
    cdef Py_ssize_t new_cap
    cdef uint8_t *grown
    if s.used + more <= s.cap:
        return 0
    new_cap = 2 * s.cap + more + 64
    grown = <uint8_t *> realloc(s.data, new_cap)
    if grown == NULL:
        raise MemoryError()
    s.data = grown
    s.cap = new_cap
    return 0


cdef int _append_canonical(Scratch *s, const uint8_t *tv) except -1:
    """Append the canonical bytes of the tag value at tv (its type char) to s.

    The aux walk has already checked that the value lies inside the record.
    """
    cdef uint8_t typ = tv[0]
    cdef const uint8_t *v = tv + 1
    cdef int64_t x
    cdef uint64_t ux
    cdef Py_ssize_t n
    cdef uint8_t digits[24]
    cdef int k
    if typ == b'Z' or typ == b'H':
        n = <Py_ssize_t> strlen(<const char *> v)  # the aux walk found its NUL
        _reserve(s, n)
        memcpy(s.data + s.used, v, n)
        s.used += n
        return 0
    if typ == b'A':
        _reserve(s, 1)
        s.data[s.used] = v[0]
        s.used += 1
        return 0
    if typ == b'f':
        _reserve(s, 4)
        memcpy(s.data + s.used, v, 4)
        s.used += 4
        return 0
    if typ == b'B':
        n = 5 + _b_elem_size(v[0]) * <Py_ssize_t> _u32(v + 1)
        _reserve(s, n)
        memcpy(s.data + s.used, v, n)
        s.used += n
        return 0
    if typ == b'c':
        x = <int8_t> v[0]
    elif typ == b'C':
        x = v[0]
    elif typ == b's':
        x = <int16_t> _u16(v)
    elif typ == b'S':
        x = _u16(v)
    elif typ == b'i':
        x = <int32_t> _u32(v)
    else:  # 'I'
        x = _u32(v)
    _reserve(s, 21)
    if x < 0:
        s.data[s.used] = 45  # '-'
        s.used += 1
        ux = <uint64_t> (-x)
    else:
        ux = <uint64_t> x
    k = 0
    while True:
        digits[k] = <uint8_t> (48 + ux % 10)  # '0' + digit
        k += 1
        ux //= 10
        if ux == 0:
            break
    while k > 0:
        k -= 1
        s.data[s.used] = digits[k]
        s.used += 1
    return 0


cdef int _parse_tags(object by, uint16_t *tags, list names) except -1:
    cdef int n = 0
    for tag in by:
        if isinstance(tag, str):
            tag = tag.encode("ascii")
        if not isinstance(tag, (bytes, bytearray)) or len(tag) != 2:
            raise ValueError(f"tags must be 2-byte names like b'CB', not {tag!r}")
        if n == MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags")
        tags[n] = <uint16_t> (tag[0] | (tag[1] << 8))
        names.append(bytes(tag).decode("latin-1"))
        n += 1
    if n == 0:
        raise ValueError("by needs at least one tag")
    return n
