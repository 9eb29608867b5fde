# cython: language_level=3
"""Select and split kernels: keep the records of a raw BAM stream whose tag
value is (or is not) in a set, or group records by tag value into per-value
buffers handed to a flush callback.

Keys are the *canonical tag value bytes* of bamflow.kernels.bam (``Z``/``H``:
the string; integers: decimal text; several tags joined by ``b"\\0"``). Sets
are C hash tables (open addressing, FNV-1a 64-bit hash, keys stored in an
arena and compared with memcmp): no Python object is made per record.

The block marked COPIED below is a verbatim copy of helpers from
bamflow/kernels/bam.pyx (InBuf/_fill with BGZF unwrapping, header parsing,
_find_tags, _append_canonical, _parse_tags); keep the two in step.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc, qsort
from libc.string cimport memchr, memcmp, memcpy, memmove, strerror, strlen
from posix.unistd cimport close

from isal.isal_zlib import decompress as _inflate

from bamflow.kernels._posixio cimport fnv1a64, read_some, wait_readable, write_all

cdef enum:
    MAX_TAGS = 16

# ---- COPIED from bamflow/kernels/bam.pyx (unchanged) -------------------------------

cdef int _raise_errno(str what) except -1:
    cdef int err = errno
    raise OSError(err, f"{what}: {strerror(err).decode()}")


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return <uint32_t> p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16) | (<uint32_t> p[3] << 24)


cdef inline uint16_t _u16(const uint8_t *p) noexcept nogil:
    return <uint16_t> (p[0] | (p[1] << 8))


cdef str _name_of(const uint8_t *rec, uint32_t block_size):
    """The read name of a record (for messages), as safely as the record allows."""
    cdef Py_ssize_t l = rec[8] if block_size >= 32 else 0
    if l < 1 or 32 + l > block_size:
        return "?"
    return (<const char *> rec + 32)[:l - 1].decode("utf-8", "replace")


# -- input buffering --------------------------------------------------------------

cdef struct InBuf:
    int fd
    char *data
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t cap
    bint eof
    long long records
    # a stream that starts with gzip magic is BGZF (pysam workers write
    # uncompressed BAM as BGZF level 0): its raw bytes wait in ``wire`` until
    # whole blocks can be unwrapped into ``data``
    bint sniffed
    bint bgzf
    char *wire
    Py_ssize_t wstart
    Py_ssize_t wend
    Py_ssize_t wcap
    long long wire_offset  # stream offset of wire[wstart], for messages


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

cdef struct HdrState:
    Py_ssize_t off      # bytes of header parsed so far
    Py_ssize_t need     # bytes (from the header's start) needed for the next step
    int stage           # 0 magic+l_text, 1 n_ref, 2 references, 3 done
    int32_t n_ref
    int32_t refs_done


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

cdef inline Py_ssize_t _aux_offset(const uint8_t *rec, uint32_t block_size, long long index) except -1:
    """Check a record's fixed part; return where its aux block starts."""
    cdef Py_ssize_t l_read_name, n_cigar, l_seq, off
    if block_size < 32:
        raise ValueError(f"record {index}: block_size {block_size} < 32")
    l_read_name = rec[8]
    n_cigar = _u16(rec + 12)
    l_seq = _u32(rec + 16)
    off = 32 + l_read_name
    if l_read_name < 1 or off > block_size or rec[off - 1] != 0:
        raise ValueError(f"record {index}: l_read_name {l_read_name} inconsistent with the record")
    off += 4 * n_cigar + ((l_seq + 1) >> 1) + l_seq
    if off > block_size:
        raise ValueError(f"record {index} (read {_name_of(rec, block_size)!r}): "
                         f"cigar/seq/qual run past the record end")
    return off


cdef inline Py_ssize_t _b_elem_size(uint8_t sub) noexcept nogil:
    if sub == b'c' or sub == b'C':
        return 1
    if sub == b's' or sub == b'S':
        return 2
    if sub == b'i' or sub == b'I' or sub == b'f':
        return 4
    return 0


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


cdef struct Scratch:
    uint8_t *data
    Py_ssize_t used
    Py_ssize_t cap


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


# ---- end of COPIED block ---------------------------------------------------------


# -- a set (or map to an output number) of keys: open addressing on FNV-1a 64 ------

cdef struct Slot:
    uint64_t hash
    Py_ssize_t off      # of the key in the arena; -1: empty slot
    Py_ssize_t length
    int32_t out


cdef class ValueSet:
    """A set of keys (bytes), each mapped to an output number.

    ``add_values(blob, sep)`` adds every ``sep``-separated value of ``blob`` in
    one call (the fast way to load millions of values). Keys are canonical tag
    value bytes; for several tags, join the values with ``b"\\0"``.
    """
    cdef Slot *slots
    cdef Py_ssize_t cap
    cdef Py_ssize_t n
    cdef uint8_t *arena
    cdef Py_ssize_t arena_used
    cdef Py_ssize_t arena_cap
    cdef Py_ssize_t *order   # slot of the i-th key added
    cdef Py_ssize_t order_cap

    def __cinit__(self):
        self.cap = 1024
        self.slots = <Slot *> malloc(self.cap * sizeof(Slot))
        self.arena_cap = 1 << 14
        self.arena = <uint8_t *> malloc(self.arena_cap)
        self.order_cap = 1024
        self.order = <Py_ssize_t *> malloc(self.order_cap * sizeof(Py_ssize_t))
        if self.slots == NULL or self.arena == NULL or self.order == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        for i in range(self.cap):
            self.slots[i].off = -1
        self.n = 0
        self.arena_used = 0

    def __dealloc__(self):
        free(self.slots)
        free(self.arena)
        free(self.order)

    def __init__(self, values=None, *, sep=b"\n"):
        if values is not None:
            if isinstance(values, (bytes, bytearray, memoryview)):
                self.add_values(values, sep)
            else:
                for v in values:
                    self.add(v)

    def __len__(self):
        return self.n

    cdef inline Py_ssize_t _find(self, const uint8_t *key, Py_ssize_t length, uint64_t h) noexcept:
        """The slot holding key, or the empty slot where it would go."""
        cdef Py_ssize_t mask = self.cap - 1
        cdef Py_ssize_t i = <Py_ssize_t> (h & <uint64_t> mask)
        cdef Slot *s
        while True:
            s = &self.slots[i]
            if s.off < 0:
                return i
            if s.hash == h and s.length == length and (length == 0 or memcmp(self.arena + s.off, key, length) == 0):
                return i
            i = (i + 1) & mask

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old_cap = self.cap, i, j, k
        cdef Slot *old = self.slots
        cdef Slot *fresh = <Slot *> malloc(2 * old_cap * sizeof(Slot))
        if fresh == NULL:
            raise MemoryError()
        for i in range(2 * old_cap):
            fresh[i].off = -1
        self.slots = fresh
        self.cap = 2 * old_cap
        for k in range(self.n):  # re-insert in insertion order, keeping ``order`` right
            i = self.order[k]
            j = <Py_ssize_t> (old[i].hash & <uint64_t> (self.cap - 1))
            while fresh[j].off >= 0:
                j = (j + 1) & (self.cap - 1)
            fresh[j] = old[i]
            self.order[k] = j
        free(old)
        return 0

    cdef Py_ssize_t _insert(self, const uint8_t *key, Py_ssize_t length, uint64_t h, int32_t out) except -1:
        """Add key (with output ``out``; -1: its own number, the count of keys
        before it) unless present; returns its slot."""
        cdef Py_ssize_t i = self._find(key, length, h)
        cdef Py_ssize_t new_cap
        cdef uint8_t *grown
        cdef Py_ssize_t *grown_order
        if self.slots[i].off >= 0:
            return i
        if 10 * (self.n + 1) > 7 * self.cap:
            self._grow()
            i = self._find(key, length, h)
        if self.arena_used + length > self.arena_cap:
            new_cap = 2 * self.arena_cap + length
            grown = <uint8_t *> realloc(self.arena, new_cap)
            if grown == NULL:
                raise MemoryError()
            self.arena = grown
            self.arena_cap = new_cap
        if self.n == self.order_cap:
            grown_order = <Py_ssize_t *> realloc(self.order, 2 * self.order_cap * sizeof(Py_ssize_t))
            if grown_order == NULL:
                raise MemoryError()
            self.order = grown_order
            self.order_cap *= 2
        if length:
            memcpy(self.arena + self.arena_used, key, length)
        self.slots[i].hash = h
        self.slots[i].off = self.arena_used
        self.slots[i].length = length
        self.slots[i].out = <int32_t> self.n if out < 0 else out
        self.arena_used += length
        self.order[self.n] = i
        self.n += 1
        return i

    cdef inline Py_ssize_t _lookup(self, const uint8_t *key, Py_ssize_t length) noexcept:
        """The slot of key, or -1."""
        cdef Py_ssize_t i = self._find(key, length, fnv1a64(key, length))
        return i if self.slots[i].off >= 0 else -1

    def add(self, value, int out=-1):
        """Add one value (str: UTF-8); returns True if it was new. ``out``: its
        output number (-1: the number of values added before it). A value
        already present with another output number raises ValueError."""
        cdef bytes b = value.encode() if isinstance(value, str) else bytes(value)
        cdef Py_ssize_t before = self.n, i
        i = self._insert(<const uint8_t *> b, len(b), fnv1a64(<const uint8_t *> b, len(b)), out)
        if self.n == before and out >= 0 and self.slots[i].out != out:
            raise ValueError(f"value {b!r} given for outputs {self.slots[i].out} and {out}")
        return self.n > before

    def add_values(self, const unsigned char[:] blob, sep=b"\n", int out=-1, bint strip_cr=True,
                   bint skip_empty=True):
        """Add every ``sep``-separated value of ``blob`` (a trailing separator is
        fine; with ``strip_cr`` a trailing ``\\r`` is cut; with ``skip_empty``
        empty values are skipped). Returns the number of new values."""
        cdef Py_ssize_t n = blob.shape[0], start = 0, end, length, before = self.n, i
        cdef const uint8_t *base
        cdef const uint8_t *hit
        cdef uint8_t c
        if len(sep) != 1:
            raise ValueError("sep must be one byte")
        c = (<bytes> bytes(sep))[0]
        if n == 0:
            return 0
        base = &blob[0]
        while start <= n:
            hit = <const uint8_t *> memchr(base + start, c, n - start) if start < n else NULL
            end = (hit - base) if hit != NULL else n
            length = end - start
            if strip_cr and length and base[start + length - 1] == 13:
                length -= 1
            if not (length == 0 and (skip_empty or hit == NULL)):
                i = self._insert(base + start, length, fnv1a64(base + start, length), out)
                if out >= 0 and self.slots[i].out != out:
                    raise ValueError(f"value {(<const char *> base + start)[:length]!r} given for "
                                     f"outputs {self.slots[i].out} and {out}")
            if hit == NULL:
                break
            start = end + 1
        return self.n - before

    def __contains__(self, value):
        cdef bytes b = value.encode() if isinstance(value, str) else bytes(value)
        return self._lookup(<const uint8_t *> b, len(b)) >= 0

    def output_of(self, value):
        """The output number of value, or -1 if absent."""
        cdef bytes b = value.encode() if isinstance(value, str) else bytes(value)
        cdef Py_ssize_t i = self._lookup(<const uint8_t *> b, len(b))
        return self.slots[i].out if i >= 0 else -1

    def value_at(self, Py_ssize_t k):
        """The k-th value added (0-based)."""
        if not 0 <= k < self.n:
            raise IndexError(k)
        cdef Slot *s = &self.slots[self.order[k]]
        return (<const char *> self.arena + s.off)[:s.length]

    def values(self):
        """Every value, in the order added."""
        cdef Py_ssize_t k
        cdef Slot *s
        out = []
        for k in range(self.n):
            s = &self.slots[self.order[k]]
            out.append((<const char *> self.arena + s.off)[:s.length])
        return out


cdef int _make_key(Scratch *key, const uint8_t **found, int n_tags) except -1:
    cdef int k
    key.used = 0
    for k in range(n_tags):
        if k:
            _reserve(key, 1)
            key.data[key.used] = 0
            key.used += 1
        _append_canonical(key, found[k])
    return 0


cdef int _tags_of(object tag, uint16_t *tags, list names) except -1:
    if isinstance(tag, str):
        tag = tag.split(",")
    elif isinstance(tag, (bytes, bytearray)):
        tag = bytes(tag).split(b",")
    return _parse_tags(tag, tags, names)


# -- filter -----------------------------------------------------------------------

def filter_records(int in_fd, int out_fd, ValueSet values not None, tag=b"CB", bint invert=False,
                   *, Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20):
    """Copy the raw BAM stream on ``in_fd`` to ``out_fd`` (header unchanged),
    keeping the records whose key (canonical bytes of ``tag``; ``"CB,UB"``:
    values joined by NUL) is in ``values`` (not in it, with ``invert``).
    Records without the tag(s) are always dropped, as by ``samtools view -D``.

    Returns {"records_in", "kept", "dropped_not_listed", "dropped_missing_tag"}.
    """
    cdef uint16_t tags[MAX_TAGS]
    cdef const uint8_t *found[MAX_TAGS]
    cdef list names = []
    cdef int n_tags = _tags_of(tag, tags, names)
    cdef InBuf ib
    cdef HdrState st
    cdef Scratch key
    cdef char *out = NULL
    cdef Py_ssize_t used = 0, avail, aux, need, size
    cdef uint32_t bs
    cdef const uint8_t *rec
    cdef long long records = 0, kept = 0, not_listed = 0, missing = 0
    cdef bint listed
    if buffer_size < 1 or out_buffer_size < 1:
        raise ValueError("buffer sizes must be >= 1")
    ib.data = NULL
    ib.wire = NULL
    key.data = NULL
    key.used = key.cap = 0
    try:
        out = <char *> malloc(out_buffer_size)
        if out == NULL:
            raise MemoryError()
        _init_inbuf(&ib, in_fd, buffer_size)
        _read_header(&ib, &st, "")
        if write_all(out_fd, ib.data + ib.start, st.off) < 0:
            _raise_errno("write")
        ib.start += st.off
        while True:
            avail = ib.end - ib.start
            if avail >= 4:
                bs = _u32(<const uint8_t *> ib.data + ib.start)
                if avail - 4 >= <Py_ssize_t> bs:
                    rec = <const uint8_t *> ib.data + ib.start + 4
                    aux = _aux_offset(rec, bs, records)
                    size = 4 + <Py_ssize_t> bs
                    if _find_tags(rec, bs, aux, tags, n_tags, found, records) == n_tags:
                        _make_key(&key, found, n_tags)
                        listed = values._lookup(key.data, key.used) >= 0
                        if listed != invert:
                            kept += 1
                            if used + size > out_buffer_size:
                                if write_all(out_fd, out, used) < 0:
                                    _raise_errno("write")
                                used = 0
                            if size > out_buffer_size:
                                if write_all(out_fd, <const char *> rec - 4, size) < 0:
                                    _raise_errno("write")
                            else:
                                memcpy(out + used, rec - 4, size)
                                used += size
                        else:
                            not_listed += 1
                    else:
                        missing += 1
                    records += 1
                    ib.start += size
                    continue
                need = 4 + <Py_ssize_t> bs
            else:
                need = 4
            if ib.eof:
                if avail:
                    raise ValueError(f"BAM stream ends inside record {records}")
                break
            _fill(&ib, need)
        if used and write_all(out_fd, out, used) < 0:
            _raise_errno("write")
        return {"records_in": records, "kept": kept, "dropped_not_listed": not_listed,
                "dropped_missing_tag": missing}
    finally:
        free(out)
        free(ib.data)
        free(ib.wire)
        free(key.data)


# -- split ------------------------------------------------------------------------

cdef struct Out:
    char *data
    Py_ssize_t used
    Py_ssize_t cap
    long long reads
    bint written


cdef struct Rank:
    long long key
    Py_ssize_t id


cdef int _rank_desc(const void *a, const void *b) noexcept nogil:
    cdef long long x = (<const Rank *> a).key, y = (<const Rank *> b).key
    return (x < y) - (x > y)


cdef class _Splitter:
    cdef Out *outs
    cdef Py_ssize_t n_outs
    cdef Py_ssize_t outs_cap
    cdef Py_ssize_t total_cap   # bytes allocated to buffers
    cdef object flush_cb
    cdef ValueSet keys          # open mode: keys → output numbers
    cdef bint open_mode
    cdef long long flushes

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.outs != NULL:
            for i in range(self.n_outs):
                free(self.outs[i].data)
            free(self.outs)

    cdef int _ensure(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t new_cap
        cdef Out *grown
        if n <= self.outs_cap:
            if n > self.n_outs:
                self.n_outs = n
            return 0
        new_cap = 2 * self.outs_cap if 2 * self.outs_cap >= n else n
        grown = <Out *> realloc(self.outs, new_cap * sizeof(Out))
        if grown == NULL:
            raise MemoryError()
        memset_outs(grown + self.outs_cap, new_cap - self.outs_cap)
        self.outs = grown
        self.outs_cap = new_cap
        self.n_outs = n
        return 0

    cdef int _flush(self, Py_ssize_t i) except -1:
        cdef Out *o = &self.outs[i]
        cdef bytes data
        cdef object key = None
        if o.used == 0:
            return 0
        data = o.data[:o.used]
        if self.open_mode:
            key = self.keys.value_at(i)  # open mode: output i is the i-th key seen
        o = NULL  # the callback cannot move outs, but be safe
        self.flush_cb(i, key, data)
        o = &self.outs[i]
        o.written = True
        o.used = 0
        free(o.data)
        o.data = NULL
        self.total_cap -= o.cap
        o.cap = 0
        self.flushes += 1
        return 0

    cdef int _shrink(self, Py_ssize_t target, long long min_reads) except -1:
        """Flush buffers, largest first and outputs with ``min_reads`` reads
        before the others, until at most ``target`` bytes stay allocated."""
        cdef Py_ssize_t i, k = 0
        cdef Rank *ranks = <Rank *> malloc((self.n_outs if self.n_outs else 1) * sizeof(Rank))
        if ranks == NULL:
            raise MemoryError()
        try:
            for i in range(self.n_outs):
                if self.outs[i].used:
                    ranks[k].id = i
                    ranks[k].key = self.outs[i].cap + ((<long long> 1 << 50) if self.outs[i].reads >= min_reads else 0)
                    k += 1
            qsort(ranks, k, sizeof(Rank), _rank_desc)
            for i in range(k):
                if self.total_cap <= target:
                    break
                self._flush(ranks[i].id)
        finally:
            free(ranks)
        return 0


cdef void memset_outs(Out *o, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        o[i].data = NULL
        o[i].used = 0
        o[i].cap = 0
        o[i].reads = 0
        o[i].written = False


def split_records(int in_fd, tag, flush, header=None, ValueSet selected=None, *,
                  Py_ssize_t flush_size=1 << 16, Py_ssize_t memory_budget=128 << 20,
                  long long min_reads=0, bint drop_below=True, Py_ssize_t buffer_size=1 << 20):
    """Group the records of the raw BAM stream on ``in_fd`` by key (canonical
    bytes of ``tag``; ``"CB,UB"``: values joined by NUL).

    ``selected=None``: every key is an output, numbered in order of first
    appearance. Else only keys in ``selected`` count, each going to its output
    number there (several keys may share one); other records are dropped
    (``not_selected``). Records without the tag(s): ``missing_tag``.

    Records are buffered per output; ``flush(out, key, data)`` receives the
    buffered records of output ``out`` (``key``: its bytes in open mode, else
    None) before its buffer would pass ``flush_size`` bytes (a record larger
    than that goes alone) if the output has at
    least ``min_reads`` reads, or when all buffers together pass
    ``memory_budget`` bytes (then the largest, those with ``min_reads`` reads
    first, until half the budget is free), and at the end. At the end, an
    output never flushed with fewer than ``min_reads`` reads is not flushed
    when ``drop_below`` (its reads count in ``below_min_reads``).
    ``header(header_bytes)`` is called with the raw header first.

    Returns {"records", "missing_tag", "not_selected", "below_min_reads",
    "flushes", "outputs": [(out, key or None, reads, flushed), ...]} for every
    output with reads.
    """
    cdef uint16_t tags[MAX_TAGS]
    cdef const uint8_t *found[MAX_TAGS]
    cdef list names = []
    cdef int n_tags = _tags_of(tag, tags, names)
    cdef InBuf ib
    cdef HdrState st
    cdef Scratch key
    cdef Py_ssize_t avail, aux, need, size, slot, i, new_cap
    cdef uint32_t bs
    cdef const uint8_t *rec
    cdef uint64_t h
    cdef long long records = 0, missing = 0, not_selected = 0, below = 0
    cdef int32_t oi
    cdef Out *o
    cdef char *grown
    cdef _Splitter sp = _Splitter()
    cdef ValueSet table
    if flush_size < 1 or memory_budget < 1 or buffer_size < 1:
        raise ValueError("flush_size, memory_budget and buffer_size must be >= 1")
    sp.flush_cb = flush
    sp.open_mode = selected is None
    if sp.open_mode:
        sp.keys = ValueSet()
        table = sp.keys
    else:
        table = selected
        n = 0
        for v in range(selected.n):
            if selected.slots[selected.order[v]].out + 1 > n:
                n = selected.slots[selected.order[v]].out + 1
        sp._ensure(n)
    ib.data = NULL
    ib.wire = NULL
    key.data = NULL
    key.used = key.cap = 0
    try:
        _init_inbuf(&ib, in_fd, buffer_size)
        _read_header(&ib, &st, "")
        if header is not None:
            header(ib.data[ib.start:ib.start + st.off])
        ib.start += st.off
        while True:
            avail = ib.end - ib.start
            if avail >= 4:
                bs = _u32(<const uint8_t *> ib.data + ib.start)
                if avail - 4 >= <Py_ssize_t> bs:
                    rec = <const uint8_t *> ib.data + ib.start + 4
                    aux = _aux_offset(rec, bs, records)
                    size = 4 + <Py_ssize_t> bs
                    records += 1
                    ib.start += size
                    if _find_tags(rec, bs, aux, tags, n_tags, found, records - 1) != n_tags:
                        missing += 1
                        continue
                    _make_key(&key, found, n_tags)
                    h = fnv1a64(key.data, key.used)
                    if sp.open_mode:
                        slot = table._find(key.data, key.used, h)
                        if table.slots[slot].off < 0:
                            slot = table._insert(key.data, key.used, h, -1)
                            sp._ensure(table.n)
                    else:
                        slot = table._find(key.data, key.used, h)
                        if table.slots[slot].off < 0:
                            not_selected += 1
                            continue
                    oi = table.slots[slot].out
                    o = &sp.outs[oi]
                    if o.used and o.used + size > flush_size and o.reads >= min_reads:
                        # flush before the buffer would pass flush_size: buffers stay
                        # small (below malloc's mmap threshold) and fill whole blocks
                        sp._flush(oi)
                        o = &sp.outs[oi]
                    if o.used + size > o.cap:
                        new_cap = 2 * o.cap if o.cap else 1024
                        while new_cap < o.used + size:
                            new_cap *= 2
                        grown = <char *> realloc(o.data, new_cap)
                        if grown == NULL:
                            raise MemoryError()
                        o.data = grown
                        sp.total_cap += new_cap - o.cap
                        o.cap = new_cap
                    memcpy(o.data + o.used, rec - 4, size)
                    o.used += size
                    o.reads += 1
                    if sp.total_cap > memory_budget:
                        sp._shrink(memory_budget // 2, min_reads)
                    continue
                need = 4 + <Py_ssize_t> bs
            else:
                need = 4
            if ib.eof:
                if avail:
                    raise ValueError(f"BAM stream ends inside record {records}")
                break
            _fill(&ib, need)
        result = []
        for i in range(sp.n_outs):
            o = &sp.outs[i]
            if o.reads == 0:
                continue
            if drop_below and not o.written and o.reads < min_reads:
                below += o.reads
                kb = None
            else:
                sp._flush(i)
                o = &sp.outs[i]
            kb = None
            if sp.open_mode:
                kb = table.value_at(i)
            result.append((i, kb, o.reads, bool(o.written)))
        return {"records": records, "missing_tag": missing, "not_selected": not_selected,
                "below_min_reads": below, "flushes": sp.flushes, "outputs": result}
    finally:
        free(ib.data)
        free(ib.wire)
        free(key.data)
