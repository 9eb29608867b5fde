# cython: language_level=3
"""The one BAM record layer of the kernels (see _records.pxd for what is shared).

A raw BAM stream is what BGZF decompression of a ``.bam`` file gives:
``BAM\\1``, ``l_text``, the header text, ``n_ref`` references, then records,
each a little-endian ``uint32`` block_size followed by that many bytes
(SAM specification, section 4.2). Between bamflow's stages a stream may also
carry *frames*: a block_size of 0 (never a record, which has at least 32
bytes) marks the end of a chunk where the input order must be restored.

Canonical tag value (one rule, used wherever a tag value is a key: sharding,
split, filter, histograms, the presets): ``Z``/``H`` the string's bytes,
``A`` the character, the integer types ``c C s S i I`` the value in decimal
ASCII (so ``CB:i:777``, ``CB:C:…`` and ``CB:Z:777`` are one value); an empty
string counts as a missing tag; ``f`` and ``B`` values are not keys (an
error naming the record). Several tags join their values with NUL.
"""

import sys

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, strlen

from bamflow.kernels._bgzf cimport BgzfBlock, bgzf_check_end, bgzf_inflate, bgzf_scan
from bamflow.kernels._io cimport io_read, io_wait
from bamflow.kernels._posixio cimport fnv1a64, pipe_backlog
from bamflow.kernels._tables cimport AUX_FIXED

if sys.byteorder != "little":  # BamCore is read in place
    raise ImportError("bamflow's kernels need a little-endian machine")


# -- messages ----------------------------------------------------------------------------

cdef str read_name(const Rec *r):
    """The read name of a record whose fixed part was checked, for messages."""
    cdef Py_ssize_t l = r.data[8]
    if l < 1 or FIXED_SIZE + l > r.size:
        return "?"
    return (<const char *> r.data + FIXED_SIZE)[:l - 1].decode("utf-8", "replace")


cdef str tag_text(uint16_t code):
    return chr(code & 0xFF) + chr(code >> 8)


cdef str describe(object source, long long index, const Rec *r):
    """``"in.bam: record 12 (read 'x')"``: how every message names a record."""
    if r == NULL or r.size < FIXED_SIZE:
        return f"{source}record {index}"
    return f"{source}record {index} (read {read_name(r)!r})"


# -- scratch bytes --------------------------------------------------------------------------

cdef int scratch_reserve(Scratch *s, Py_ssize_t more) except -1:
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


cdef int scratch_put(Scratch *s, const void *data, Py_ssize_t n) except -1:
    scratch_reserve(s, n)
    if n:
        memcpy(s.data + s.used, data, n)
    s.used += n
    return 0


cdef int scratch_put_decimal(Scratch *s, int64_t v) except -1:
    """Append v in decimal (as SAM text writes an integer)."""
    cdef uint8_t digits[20]
    cdef int k = 0
    cdef uint64_t u = <uint64_t> v
    scratch_reserve(s, 21)
    if v < 0:
        s.data[s.used] = 45  # '-'
        s.used += 1
        u = (<uint64_t> 0) - u  # (INT64_MIN too)
    while True:
        digits[k] = <uint8_t> (48 + u % 10)
        k += 1
        u //= 10
        if u == 0:
            break
    while k > 0:
        k -= 1
        s.data[s.used] = digits[k]
        s.used += 1
    return 0


cdef void scratch_free(Scratch *s) noexcept:
    free(s.data)
    s.data = NULL
    s.used = s.cap = 0


# -- aux values -------------------------------------------------------------------------------

cdef inline Py_ssize_t _elem_size(uint8_t sub) noexcept nogil:
    if sub == b'c' or sub == b'C':
        return 1
    if sub == b's' or sub == b'S':
        return 2
    if sub == b'i' or sub == b'I' or sub == b'f':
        return 4
    return 0


cdef Py_ssize_t aux_value_size(const uint8_t *tv, const uint8_t *end) noexcept nogil:
    """Bytes of the value after the type byte at ``tv``: -1 for a bad type byte,
    -2 when the value runs past ``end``, -3 for a bad B-array subtype."""
    cdef uint8_t t = tv[0]
    cdef const uint8_t *z
    cdef Py_ssize_t room = end - (tv + 1)
    cdef Py_ssize_t elem
    cdef uint64_t total
    if t == b'A' or t == b'c' or t == b'C':
        return 1 if room >= 1 else -2
    if t == b's' or t == b'S':
        return 2 if room >= 2 else -2
    if t == b'i' or t == b'I' or t == b'f':
        return 4 if room >= 4 else -2
    if t == b'Z' or t == b'H':
        if room < 1:
            return -2
        z = <const uint8_t *> memchr(tv + 1, 0, room)
        return -2 if z == NULL else (z - tv)
    if t == b'B':
        if room < 5:
            return -2
        elem = _elem_size(tv[1])
        if elem == 0:
            return -3
        total = 5 + <uint64_t> elem * u32(tv + 2)
        return <Py_ssize_t> total if total <= <uint64_t> room else -2
    return -1


cdef const uint8_t *_aux_walk(const uint8_t *p, const uint8_t *end, const uint16_t *codes, int n_want,
                              const uint8_t **found, uint8_t *seen) noexcept nogil:
    """Walk the aux fields in [p, end): NULL if every value lies inside, else
    the field that does not (see aux_value_size for why). ``found[k]`` is set
    to the type byte of ``codes[k]`` (first occurrence) or NULL; ``seen`` (or
    NULL) gets a bit per tag code. The hot path of every record check."""
    cdef int k
    cdef signed char fixed
    cdef uint16_t code
    cdef Py_ssize_t size
    cdef const uint8_t *z
    for k in range(n_want):
        found[k] = NULL
    while p < end:
        if end - p < 4:  # a tag, a type and at least one byte of value
            return p
        code = tag_code(p)
        fixed = AUX_FIXED[p[2]]
        if fixed > 0:
            if end - p < 3 + fixed:
                return p
            size = fixed
        elif p[2] == b'Z' or p[2] == b'H':  # the common variable-length case, inline
            z = <const uint8_t *> memchr(p + 3, 0, end - (p + 3))
            if z == NULL:
                return p
            size = z - (p + 2)
        else:
            size = aux_value_size(p + 2, end)
            if size < 0:
                return p
        if seen != NULL:
            seen[code >> 3] |= 1 << (code & 7)
        for k in range(n_want):
            if codes[k] == code and found[k] == NULL:
                found[k] = p + 2
        p += 3 + size
    return NULL


cdef const uint8_t *find_tag(const Rec *r, uint16_t code) noexcept nogil:
    """The type byte of tag ``code`` in a checked record, or NULL (sizes as in _aux_walk)."""
    cdef const uint8_t *p = r.data + r.aux
    cdef const uint8_t *end = r.data + r.size
    cdef signed char fixed
    while p < end:
        if tag_code(p) == code:
            return p + 2
        fixed = AUX_FIXED[p[2]]
        if fixed > 0:
            p += 3 + fixed
        elif p[2] == b'Z' or p[2] == b'H':
            p = <const uint8_t *> memchr(p + 3, 0, end - (p + 3)) + 1
        else:
            p += 3 + aux_value_size(p + 2, end)
    return NULL


cdef int tag_key(Scratch *out, const uint8_t *tv) except -3:
    """Append the canonical bytes of the checked value at ``tv`` (its type byte)
    to ``out``: KEY_FOUND, KEY_MISSING (an empty string) or KEY_BAD_TYPE."""
    cdef uint8_t typ = tv[0]
    cdef const uint8_t *v = tv + 1
    cdef int64_t x
    cdef Py_ssize_t n
    if typ == b'Z' or typ == b'H':
        n = <Py_ssize_t> strlen(<const char *> v)  # the record check found its NUL
        if n == 0:
            return KEY_MISSING
        scratch_put(out, v, n)
        return KEY_FOUND
    if typ == b'A':
        scratch_put(out, v, 1)
        return KEY_FOUND
    if typ == b'c':
        x = <int8_t> v[0]
    elif typ == b'C':
        x = v[0]
    elif typ == b's':
        x = <int16_t> u16(v)
    elif typ == b'S':
        x = u16(v)
    elif typ == b'i':
        x = <int32_t> u32(v)
    elif typ == b'I':
        x = u32(v)
    else:
        return KEY_BAD_TYPE
    scratch_put_decimal(out, x)
    return KEY_FOUND


cdef class Tags:
    """Tag names for the kernels: ``Tags(("CB", "UB"))`` or ``Tags([b"CB"])``."""

    def __cinit__(self, names):
        cdef list clean = []
        self.n = 0
        for name in names:
            if isinstance(name, str):
                name = name.encode("ascii")
            if not isinstance(name, (bytes, bytearray)) or len(name) != 2:
                raise ValueError(f"a BAM tag has two characters, not {name!r}")
            if self.n == MAX_TAGS:
                raise ValueError(f"at most {MAX_TAGS} tags")
            self.codes[self.n] = <uint16_t> (name[0] | (name[1] << 8))
            clean.append(bytes(name).decode("latin-1"))
            self.n += 1
        self.names = tuple(clean)

    cdef int key_of(self, Scratch *out, const uint8_t **found, object source, long long index,
                    const Rec *r) except -1:
        """The canonical key of the found values (joined by NUL) in ``out``:
        KEY_FOUND, or KEY_MISSING if a tag is absent or empty. A value that
        cannot be a key (f, B) raises ValueError naming the record."""
        cdef int k, got
        out.used = 0
        for k in range(self.n):
            if found[k] == NULL:
                return KEY_MISSING
            if k:
                scratch_put(out, b"\0", 1)
            got = tag_key(out, found[k])
            if got == KEY_MISSING:
                return KEY_MISSING
            if got == KEY_BAD_TYPE:
                kind = "a float" if found[k][0] == b'f' else "an array"
                raise ValueError(f"{describe(source, index, r)}: tag {self.names[k]} holds {kind} "
                                 f"(type {chr(found[k][0])}); a key tag must hold a string or an integer")
        return KEY_FOUND

    def __repr__(self):
        return f"Tags({self.names!r})"


# -- the stream --------------------------------------------------------------------------------

cdef class RecordReader:
    """Records of the raw BAM stream on ``fd`` (or BGZF around one), checked.

    ``source`` prefixes every message (``"in.bam: "``); ``allow_frames``
    accepts chunk-end frames (block_size 0); ``progress`` is a bamflow.progress
    slot (int64 memoryview) updated at every read, or None. ``buffer_size`` is
    the first read size; the buffer grows (at most doubling per read, so
    memory follows the data that arrived, never a length read from the
    stream) to hold the largest record.

    Usage from a kernel: ``read_header()``, then ``next()`` until
    STREAM_END. ``parse()`` is the non-blocking step (NEED_MORE with
    ``need`` set); parsed records stay in the buffer until ``release()``.
    """

    def __cinit__(self, int fd, object source="", bint allow_frames=False, object progress=None,
                  Py_ssize_t buffer_size=1 << 20, bint note_tags=False):
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.fd = fd
        self.source = source
        self.allow_frames = allow_frames
        self.cap = buffer_size
        self.buf = <uint8_t *> malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        self.start = self.pos = self.end = 0
        self.eof = False
        self.sniffed = self.bgzf = False
        self.wire = NULL
        self.hdr.off = 0
        self.hdr.need = 8
        self.hdr.stage = 0
        self.hdr.n_ref = 0
        self.hdr.refs_done = 0
        self.header_done = False
        self.n_ref = -1
        self.progress = NULL
        if progress is not None:
            self._attach(progress)
        self.seen_tags = NULL
        if note_tags:
            self.seen_tags = <uint8_t *> calloc(1 << 13, 1)
            if self.seen_tags == NULL:
                raise MemoryError()

    cdef int _attach(self, long long[::1] slot) except -1:
        self.progress_owner = slot  # keeps the slot's memory alive
        self.progress = &slot[0]
        return 0

    def __dealloc__(self):
        free(self.buf)
        free(self.wire)
        free(self.seen_tags)

    @property
    def tags_seen(self):
        """The tags seen on any record, sorted (with ``note_tags``)."""
        cdef int code
        if self.seen_tags == NULL:
            return []
        return sorted(tag_text(code) for code in range(1 << 16) if self.seen_tags[code >> 3] & (1 << (code & 7)))

    # -- reading ----------------------------------------------------------------------

    cdef Py_ssize_t fill(self) except -1:
        """Read once (blocking); returns the bytes read (0 at the end of the input)."""
        cdef Py_ssize_t n, kept, want
        cdef uint8_t *grown
        if self.start > 0:  # parsed records before ``start`` are released: move the rest down
            kept = self.end - self.start
            if kept:
                memmove(self.buf, self.buf + self.start, kept)
            self.pos -= self.start
            self.end = kept
            self.start = 0
        want = self.pos + self.need
        if self.end == self.cap or want > self.cap:
            grown = <uint8_t *> realloc(self.buf, 2 * self.cap)
            if grown == NULL:
                raise MemoryError()
            self.buf = grown
            self.cap *= 2
        if self.bgzf:
            return self._fill_wire()
        # a FIFO read end opened with O_NONBLOCK reads as ended until its writer
        # connects; poll(2) waits for the writer (see bamflow/engine/fifo.py)
        if not self.sniffed:
            io_wait(self.fd, f"{self.source}poll")
        n = io_read(self.fd, <char *> self.buf + self.end, self.cap - self.end, f"{self.source}read")
        self.bytes_read += n
        if n == 0:
            self.eof = True
        self.end += n
        if not self.sniffed and (self.end >= 2 or self.eof):
            self.sniffed = True
            if self.end >= 2 and self.buf[0] == 0x1f and self.buf[1] == 0x8b:
                self._switch_to_bgzf()
        self.report()
        return n

    cdef int _switch_to_bgzf(self) except -1:
        """What was read is BGZF: move it to the wire buffer and unwrap it."""
        self.bgzf = True
        self.wcap = 1 << 17
        while self.wcap < self.end:
            self.wcap *= 2
        self.wire = <uint8_t *> malloc(self.wcap)
        if self.wire == NULL:
            raise MemoryError()
        memcpy(self.wire, self.buf, self.end)
        self.wstart = 0
        self.wend = self.end
        self.wire_eof = self.eof
        self.eof = False
        self.start = self.pos = self.end = 0
        self.blocks = 0
        self.last_empty = False
        self.wire_offset = 0
        self._unwrap()
        return 0

    cdef Py_ssize_t _fill_wire(self) except -1:
        cdef Py_ssize_t n = 0
        cdef uint8_t *grown
        if not self.wire_eof:
            if self.wstart > 0:
                memmove(self.wire, self.wire + self.wstart, self.wend - self.wstart)
                self.wend -= self.wstart
                self.wstart = 0
            if self.wend == self.wcap:
                grown = <uint8_t *> realloc(self.wire, 2 * self.wcap)
                if grown == NULL:
                    raise MemoryError()
                self.wire = grown
                self.wcap *= 2
            n = io_read(self.fd, <char *> self.wire + self.wend, self.wcap - self.wend, f"{self.source}read")
            self.bytes_read += n
            self.wend += n
            if n == 0:
                self.wire_eof = True
        self._unwrap()
        self.report()
        return n

    cdef int _unwrap(self) except -1:
        """Move the payload of every whole BGZF block on the wire into buf."""
        cdef BgzfBlock b
        cdef Py_ssize_t size
        cdef uint8_t *grown
        while True:
            size = bgzf_scan(self.wire + self.wstart, self.wend - self.wstart, &b, self.wire_offset,
                             self.blocks == 0, self.source.rstrip(": ") or "stream")
            if size < 0:
                self.wneed = b.size
                break
            while self.end + <Py_ssize_t> b.isize > self.cap:
                grown = <uint8_t *> realloc(self.buf, 2 * self.cap)
                if grown == NULL:
                    raise MemoryError()
                self.buf = grown
                self.cap *= 2
            self.end += bgzf_inflate(self.wire + self.wstart, &b, self.buf + self.end, self.wire_offset,
                                     self.source.rstrip(": ") or "stream")
            self.wstart += size
            self.wire_offset += size
            self.blocks += 1
            self.last_empty = b.isize == 0
        if self.wire_eof:
            bgzf_check_end(self.wend - self.wstart, self.wneed, self.blocks, self.last_empty,
                           self.wire_offset, self.source.rstrip(": ") or "stream")
            self.eof = True
        return 0

    cdef void report(self) noexcept:
        if self.progress != NULL:
            self.progress[0] = self.records
            self.progress[1] = self.bytes_read
            self.progress[3] = 0 if self.eof else pipe_backlog(self.fd)

    # -- the header ---------------------------------------------------------------------

    cdef int parse_header(self) except -1:
        """Parse on without reading: 1 when the whole header is in buf[start:], else 0."""
        cdef int32_t v
        cdef const uint8_t *p = self.buf + self.start
        cdef Py_ssize_t n = self.end - self.start
        cdef HdrState *st = &self.hdr
        if self.header_done:
            return 1
        while True:
            if st.stage == 0:
                if n == 0 or (not self.sniffed and not self.eof):
                    st.need = 8  # (what the first bytes are, BGZF or not, is decided by fill())
                    return 0
                if memcmp(p, b"BAM\x01", n if n < 4 else 4) != 0:
                    hint = "; BGZF-compressed? decompress first" if n >= 2 and p[0] == 0x1f and p[1] == 0x8b else ""
                    raise ValueError(f"{self.source}not a BAM stream "
                                     f"(magic {(<const char *> p)[:(n if n < 4 else 4)]!r}{hint})")
                if n < 8:
                    st.need = 8
                    return 0
                v = <int32_t> u32(p + 4)
                if v < 0 or v > MAX_HEADER_TEXT:
                    raise ValueError(f"{self.source}corrupt BAM header: l_text {v} "
                                     f"(at most {MAX_HEADER_TEXT} allowed)")
                st.off = 8 + <Py_ssize_t> v
                st.stage = 1
            elif st.stage == 1:
                if n < st.off + 4:
                    st.need = st.off + 4
                    return 0
                v = <int32_t> u32(p + st.off)
                if v < 0 or v > MAX_REFERENCES:
                    raise ValueError(f"{self.source}corrupt BAM header: n_ref {v} "
                                     f"(at most {MAX_REFERENCES} allowed)")
                st.n_ref = v
                st.off += 4
                st.stage = 2
            elif st.stage == 2:
                if st.refs_done == st.n_ref:
                    st.stage = 3
                    self.header_done = True
                    self.header_len = st.off
                    self.n_ref = st.n_ref
                    self.header_copy = PyBytes_FromStringAndSize(<const char *> p, st.off)
                    self.pos = self.start + st.off  # records start after the header
                    return 1
                if n < st.off + 4:
                    st.need = st.off + 4
                    return 0
                v = <int32_t> u32(p + st.off)
                if v < 1 or v > 1 << 16:
                    raise ValueError(f"{self.source}corrupt BAM header: reference {st.refs_done} "
                                     f"has a name of length {v}")
                if n < st.off + 4 + v + 4:
                    st.need = st.off + 4 + v + 4
                    return 0
                st.off += 4 + v + 4
                st.refs_done += 1
            else:
                return 1

    cdef int read_header(self) except -1:
        """Block until the whole header is in; raises at the end of the input."""
        while not self.parse_header():
            if self.eof:
                if self.end == self.start:
                    raise ValueError(f"{self.source}not a BAM stream (empty)")
                raise ValueError(f"{self.source}truncated BAM header")
            self.need = self.hdr.need - (self.pos - self.start)
            if self.need < 1:
                self.need = 1
            self.fill()
        return 0

    cdef const uint8_t *header(self) noexcept:
        """The raw header (header_len bytes) until the first release()."""
        return self.buf + self.start

    # -- records ---------------------------------------------------------------------------

    cdef int parse(self, Rec *r, Tags want, const uint8_t **found) except -2:
        """The next record at ``pos``, checked, or a frame, without reading.

        Returns GOT_RECORD (``r`` set; with ``want``, ``found[k]`` is the type
        byte of tag k or NULL), GOT_FRAME, STREAM_END, or NEED_MORE (``need``:
        the bytes wanted at ``pos``). Raises ValueError naming the record.
        """
        cdef Py_ssize_t avail = self.end - self.pos
        cdef const uint8_t *p = self.buf + self.pos
        cdef const uint8_t *data
        cdef const BamCore *c
        cdef uint32_t bs
        cdef uint64_t fields
        cdef long long index = self.records
        if avail < 4:
            if self.eof:
                if avail:
                    raise ValueError(f"{self.source}BAM stream ends inside record {index}")
                return STREAM_END
            self.need = 4
            return NEED_MORE
        bs = u32(p)
        r.data = p + 4
        r.size = bs
        if bs == 0 and self.allow_frames:
            self.pos += 4
            self.frames += 1
            return GOT_FRAME
        if bs < FIXED_SIZE:
            raise ValueError(f"{self.source}record {index}: block_size {bs} < {FIXED_SIZE}")
        if bs > MAX_RECORD:
            raise ValueError(f"{self.source}record {index}: block_size {bs} > {MAX_RECORD}: corrupt record")
        if avail < 4 + FIXED_SIZE:
            if self.eof:
                raise ValueError(f"{self.source}BAM stream ends inside record {index}")
            self.need = 4 + FIXED_SIZE
            return NEED_MORE
        data = p + 4
        c = core_of(data)
        # the variable-length fields must fit before the buffer grows to block_size
        fields = (<uint64_t> FIXED_SIZE + c.l_read_name + 4 * <uint64_t> c.n_cigar
                  + ((<uint64_t> c.l_seq + 1) >> 1) + c.l_seq)
        if c.l_read_name < 1 or fields > bs:
            raise ValueError(f"{describe(self.source, index, NULL)}: l_read_name {c.l_read_name}, "
                             f"n_cigar_op {c.n_cigar} and l_seq {c.l_seq} do not fit in block_size {bs}")
        if c.refid < -1 or c.refid >= self.n_ref:
            raise ValueError(f"{describe(self.source, index, NULL)}: refID {c.refid} is not in the "
                             f"header's {self.n_ref} references")
        if c.next_refid < -1 or c.next_refid >= self.n_ref:
            raise ValueError(f"{describe(self.source, index, NULL)}: mate refID {c.next_refid} is not in "
                             f"the header's {self.n_ref} references")
        if avail < 4 + <Py_ssize_t> bs:
            if self.eof:
                raise ValueError(f"{self.source}BAM stream ends inside record {index}")
            self.need = 4 + <Py_ssize_t> bs
            return NEED_MORE
        if data[FIXED_SIZE + c.l_read_name - 1] != 0:
            raise ValueError(f"{self.source}record {index}: the read name is not NUL-terminated")
        r.cigar = FIXED_SIZE + c.l_read_name
        r.seq = r.cigar + 4 * c.n_cigar
        r.qual = r.seq + ((c.l_seq + 1) >> 1)
        r.aux = r.qual + c.l_seq
        self._walk_aux(r, want, found, index)
        self.pos += 4 + <Py_ssize_t> bs
        self.records += 1
        return GOT_RECORD

    cdef int _walk_aux(self, const Rec *r, Tags want, const uint8_t **found, long long index) except -1:
        """Check every aux value of ``r``; note where the wanted tags are."""
        cdef const uint16_t *codes = NULL
        cdef int n_want = 0
        cdef const uint8_t *bad
        if want is not None:
            codes = want.codes
            n_want = want.n
        bad = _aux_walk(r.data + r.aux, r.data + r.size, codes, n_want, found, self.seen_tags)
        if bad != NULL:
            self._aux_error(r, bad, index)
        return 0

    cdef int _aux_error(self, const Rec *r, const uint8_t *p, long long index) except -1:
        """Raise the error of the aux field at ``p`` (found bad by _aux_walk)."""
        cdef const uint8_t *end = r.data + r.size
        cdef Py_ssize_t size
        if end - p < 3:
            raise ValueError(f"{describe(self.source, index, r)}: aux data runs past the record end")
        name = (<const char *> p)[:2].decode("latin-1")
        size = aux_value_size(p + 2, end)
        if size == -1:
            raise ValueError(f"{describe(self.source, index, r)}: bad type {chr(p[2])!r} of tag {name}")
        if size == -3:
            raise ValueError(f"{describe(self.source, index, r)}: bad B array subtype {chr(p[3])!r} of tag {name}")
        raise ValueError(f"{describe(self.source, index, r)}: the value of tag {name} runs past the record end")

    cdef int next(self, Rec *r, Tags want, const uint8_t **found) except -2:
        """Like parse(), reading as needed: never NEED_MORE."""
        cdef int got
        while True:
            got = self.parse(r, want, found)
            if got != NEED_MORE:
                return got
            self.fill()

    cdef void release(self) noexcept:
        """Everything parsed so far may be overwritten by the next fill()."""
        self.start = self.pos

    cdef int at_end(self) except -1:
        """Raise unless every byte was parsed (for callers that stop at STREAM_END)."""
        if self.pos != self.end:
            raise ValueError(f"{self.source}BAM stream ends inside record {self.records}")
        return 0

    @property
    def header_bytes(self):
        """The raw header (magic to the last reference), once read."""
        if not self.header_done:
            raise ValueError("the header has not been read")
        return self.header_copy


def parse_header(const uint8_t[::1] data not None, str source=""):
    """(length, text bytes, [(name, length)]) of the raw BAM header at the start
    of ``data``: the one BAM header parser, for bamflow.bam.header. Raises
    EOFError if ``data`` ends inside the header, ValueError if it is not one."""
    cdef Py_ssize_t n = data.shape[0], off, l_text, n_ref, i, l_name
    if n < 4:
        if n and memcmp(&data[0], b"BAM\x01", n) != 0:
            raise ValueError(f"{source}not a BAM stream (starts with {bytes(data[:n])!r})")
        raise EOFError
    if memcmp(&data[0], b"BAM\x01", 4) != 0:
        raise ValueError(f"{source}not a BAM stream (starts with {bytes(data[:4])!r})")
    if n < 8:
        raise EOFError
    l_text = <int32_t> u32(&data[4])
    if l_text < 0 or l_text > MAX_HEADER_TEXT:
        raise ValueError(f"{source}corrupt BAM header: l_text {l_text} (at most {MAX_HEADER_TEXT} allowed)")
    off = 8 + l_text
    if n < off + 4:
        raise EOFError
    text = bytes(data[8:off])
    n_ref = <int32_t> u32(&data[off])
    if n_ref < 0 or n_ref > MAX_REFERENCES:
        raise ValueError(f"{source}corrupt BAM header: n_ref {n_ref} (at most {MAX_REFERENCES} allowed)")
    off += 4
    refs = []
    for i in range(n_ref):
        if n < off + 4:
            raise EOFError
        l_name = <int32_t> u32(&data[off])
        if l_name < 1 or l_name > 1 << 16:
            raise ValueError(f"{source}corrupt BAM header: reference {i} has a name of length {l_name}")
        if n < off + 8 + l_name:
            raise EOFError
        name = bytes(data[off + 4:off + 4 + l_name]).rstrip(b"\0")
        refs.append((name, <int32_t> u32(&data[off + 4 + l_name])))
        off += 8 + l_name
    return off, text, refs


# -- the hash table of tag values -----------------------------------------------------------------

cdef class ValueTable:
    """Tag values (canonical bytes; several tags joined by NUL) with an output
    number and a count each: the one hash table of the kernels (open
    addressing on FNV-1a 64, keys in one arena, insertion order kept).

    ``add_values(blob, sep)`` adds every ``sep``-separated value of ``blob`` in
    one call (the fast way to load millions of values).
    """

    def __cinit__(self, *args, **kwargs):
        cdef Py_ssize_t i
        self.cap = 1024
        self.slots = <Slot *> malloc(self.cap * sizeof(Slot))
        self.arena_cap = 1 << 14
        self.arena = <uint8_t *> malloc(self.arena_cap)
        self.order_cap = 1024
        self.order = <Py_ssize_t *> malloc(self.order_cap * sizeof(Py_ssize_t))
        if self.slots == NULL or self.arena == NULL or self.order == NULL:
            raise MemoryError()
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

    cdef Py_ssize_t find(self, const uint8_t *key, Py_ssize_t length, uint64_t h) noexcept:
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

    cdef Py_ssize_t insert(self, const uint8_t *key, Py_ssize_t length, uint64_t h, int32_t out) except -1:
        """Add key (output ``out``; -1: its own number, the count of keys before
        it; count 0) unless present; returns its slot."""
        cdef Py_ssize_t i = self.find(key, length, h)
        cdef Py_ssize_t new_cap
        cdef uint8_t *grown
        cdef Py_ssize_t *grown_order
        if self.slots[i].off >= 0:
            return i
        if 10 * (self.n + 1) > 7 * self.cap:
            self._grow()
            i = self.find(key, length, h)
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
        self.slots[i].count = 0
        self.arena_used += length
        self.order[self.n] = i
        self.n += 1
        return i

    cdef Py_ssize_t lookup(self, const uint8_t *key, Py_ssize_t length) noexcept:
        """The slot of key, or -1."""
        cdef Py_ssize_t i = self.find(key, length, fnv1a64(key, length))
        return i if self.slots[i].off >= 0 else -1

    cdef Py_ssize_t tally(self, const uint8_t *key, Py_ssize_t length) except -1:
        """Count one more of key (added if new); returns its slot."""
        cdef Py_ssize_t i = self.insert(key, length, fnv1a64(key, length), -1)
        self.slots[i].count += 1
        return i

    def add(self, value, int out=-1):
        """Add one value (str: UTF-8; int: decimal); returns True if it was new.
        ``out``: its output number (-1: the number of values added before it).
        A value already present with another output number raises ValueError."""
        cdef bytes b = value_key(value)
        cdef Py_ssize_t before = self.n, i
        i = self.insert(<const uint8_t *> b, len(b), fnv1a64(<const uint8_t *> b, len(b)), out)
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
                i = self.insert(base + start, length, fnv1a64(base + start, length), out)
                if out >= 0 and self.slots[i].out != out:
                    raise ValueError(f"value {(<const char *> base + start)[:length]!r} given for "
                                     f"outputs {self.slots[i].out} and {out}")
            if hit == NULL:
                break
            start = end + 1
        return self.n - before

    def __contains__(self, value):
        cdef bytes b = value_key(value)
        return self.lookup(<const uint8_t *> b, len(b)) >= 0

    def output_of(self, value):
        """The output number of value, or -1 if absent."""
        cdef bytes b = value_key(value)
        cdef Py_ssize_t i = self.lookup(<const uint8_t *> b, len(b))
        return self.slots[i].out if i >= 0 else -1

    def count_of(self, value):
        """How many times value was counted (0 if absent)."""
        cdef bytes b = value_key(value)
        cdef Py_ssize_t i = self.lookup(<const uint8_t *> b, len(b))
        return self.slots[i].count if i >= 0 else 0

    def value_at(self, Py_ssize_t k):
        """The k-th value added (0-based)."""
        if not 0 <= k < self.n:
            raise IndexError(k)
        cdef Slot *s = &self.slots[self.order[k]]
        return (<const char *> self.arena + s.off)[:s.length]

    def values(self):
        """Every value, in the order added."""
        return [self.value_at(k) for k in range(self.n)]

    def counts(self):
        """{value: count} for every value, in the order added."""
        cdef Py_ssize_t k
        cdef Slot *s
        cdef dict result = {}
        for k in range(self.n):
            s = &self.slots[self.order[k]]
            result[(<const char *> self.arena + s.off)[:s.length]] = s.count
        return result

    def max_output(self):
        """The largest output number, -1 if empty."""
        cdef Py_ssize_t k
        cdef int32_t best = -1
        for k in range(self.n):
            if self.slots[self.order[k]].out > best:
                best = self.slots[self.order[k]].out
        return best


cpdef bytes value_key(value):
    """A value as a key of the tables (the canonical rule, from Python): str
    (UTF-8), bytes, int (decimal), or a tuple of them (several tags: joined by NUL)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    if isinstance(value, tuple):
        return b"\0".join([value_key(v) for v in value])
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"a value is str, bytes, int or a tuple of them, not {value!r}")


def stable_hash(const unsigned char[:] key not None) -> int:
    """FNV-1a (64 bit) of ``key``: how records are sharded (``% n``)."""
    if key.shape[0] == 0:
        return fnv1a64(NULL, 0)
    return fnv1a64(&key[0], key.shape[0])
