# cython: language_level=3
"""Kernels of the single-cell presets (bamflow.presets): FASTQ pairs to unmapped
BAM records (``tag``), tag-value counting with flag/MAPQ filters
(:class:`TagCounter`: ``histogram`` and the first pass of ``correct``),
cell-barcode correction of records (:class:`Corrector`) and a 2-bit packed
barcode whitelist.

Records are read through the one record layer (bamflow.kernels._records):
every record is checked, tag values follow its one canonical rule.
"""

from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, strlen

from bamflow.kernels._tables cimport BASE2, SEQ_NT16, pack2
from bamflow.kernels._io cimport OutBuf, OutBufs, out_flush, out_put
from bamflow.kernels._posixio cimport fnv1a64
from bamflow.kernels._records cimport (
    GOT_FRAME, KEY_FOUND, STREAM_END, BamCore, Rec, RecordReader, Scratch, Tags, ValueTable, core_of,
    describe, find_tag, put_u32, scratch_free, scratch_put, scratch_reserve,
)


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object, Py_ssize_t *) except NULL

# -- tag: FASTQ pairs → unmapped BAM records -----------------------------------------

cdef inline Py_ssize_t _id_len(const char *name, Py_ssize_t n) noexcept:
    """Length of the read ID: up to the first space/tab, without a trailing /1 or /2."""
    cdef Py_ssize_t i = 0
    while i < n and name[i] != 32 and name[i] != 9:
        i += 1
    if i >= 2 and name[i - 2] == 47 and (name[i - 1] == 49 or name[i - 1] == 50):
        i -= 2
    return i


cdef int _put_z(Scratch *o, const char *tag, const char *s, list segs) except -1:
    """Append tag:Z: the concatenation of the segments of s."""
    cdef Py_ssize_t a, b
    scratch_put(o, tag, 2)
    scratch_put(o, b"Z", 1)
    for a, b in segs:
        scratch_put(o, s + a, b - a)
    scratch_put(o, b"\0", 1)
    return 0


def fastq_pairs_to_bam(list r1s, list r2s, list cb_segs, list umi_segs, Py_ssize_t need,
                       bytes rg, bytearray out, long long first):
    """Append one unmapped BAM record per pair (r1s[i], r2s[i]) (dnaio records) to ``out``.

    Read 2 gives the name (ID without /2), SEQ and QUAL; read 1 gives CR/CY
    (``cb_segs``: [(start, end)]) and UR/UY (``umi_segs``); ``rg`` (may be
    empty) becomes RG:Z. A read 1 shorter than ``need`` is skipped.
    ``first`` is the 1-based number of the first pair (for messages).
    Returns (records written, pairs skipped as too short).
    """
    cdef Py_ssize_t n = len(r1s), i, l1, l2, lq1, lq2, n1len, n2len, id1, id2, k, start, lname
    cdef const char *n1
    cdef const char *n2
    cdef const char *s1
    cdef const char *q1
    cdef const char *s2
    cdef const char *q2
    cdef Scratch o
    cdef long long written = 0, short = 0
    cdef uint8_t *p
    cdef BamCore *c
    cdef uint8_t ch
    cdef Py_ssize_t rg_len = len(rg)
    if len(r2s) != n:
        raise ValueError("read 1 and read 2 batches differ in size")
    for a, b in cb_segs + umi_segs:  # every segment must lie inside the read 1 length asked for
        if not 0 <= a < b <= need:
            raise ValueError(f"segment [{a}:{b}] does not lie within the first {need} bases of read 1")
    o.data = NULL
    o.used = o.cap = 0
    try:
        for i in range(n):
            rec1 = r1s[i]
            rec2 = r2s[i]
            n1 = PyUnicode_AsUTF8AndSize(rec1.name, &n1len)
            n2 = PyUnicode_AsUTF8AndSize(rec2.name, &n2len)
            id1 = _id_len(n1, n1len)
            id2 = _id_len(n2, n2len)
            if id1 != id2 or memcmp(n1, n2, id1) != 0:
                raise ValueError(
                    f"FASTQ pair {first + i} is out of sync: read 1 is named {rec1.name.split()[0]!r}, "
                    f"read 2 {rec2.name.split()[0]!r}")
            if id2 < 1 or id2 > 254:
                raise ValueError(f"FASTQ pair {first + i}: read name of {id2} characters (BAM allows 1-254)")
            s1 = PyUnicode_AsUTF8AndSize(rec1.sequence, &l1)
            if l1 < need:
                short += 1
                continue
            q1 = PyUnicode_AsUTF8AndSize(rec1.qualities, &lq1)
            s2 = PyUnicode_AsUTF8AndSize(rec2.sequence, &l2)
            q2 = PyUnicode_AsUTF8AndSize(rec2.qualities, &lq2)
            if lq1 != l1 or lq2 != l2:
                raise ValueError(f"FASTQ pair {first + i}: sequence and quality lengths differ")
            lname = id2 + 1
            start = o.used
            scratch_reserve(&o, 36 + lname + (l2 + 1) // 2 + l2)
            p = o.data + start
            c = <BamCore *> (p + 4)  # block_size is set once the tags are in
            c.refid = -1
            c.pos = -1
            c.l_read_name = <uint8_t> lname
            c.mapq = 0
            c.bin = 4680  # reg2bin(-1, 0)
            c.n_cigar = 0
            c.flag = 4
            c.l_seq = <uint32_t> l2
            c.next_refid = -1
            c.next_pos = -1
            c.tlen = 0
            memcpy(p + 36, n2, id2)
            p[36 + id2] = 0
            p += 36 + lname
            for k in range(0, l2 - 1, 2):
                p[k >> 1] = (SEQ_NT16[<uint8_t> s2[k]] << 4) | SEQ_NT16[<uint8_t> s2[k + 1]]
            if l2 & 1:
                p[l2 >> 1] = SEQ_NT16[<uint8_t> s2[l2 - 1]] << 4
            p += (l2 + 1) // 2
            for k in range(l2):
                ch = <uint8_t> q2[k]
                if ch < 33 or ch > 126:
                    raise ValueError(f"FASTQ pair {first + i}: invalid quality character {chr(ch)!r} in read 2")
                p[k] = ch - 33
            o.used = start + 36 + lname + (l2 + 1) // 2 + l2
            _put_z(&o, b"CR", s1, cb_segs)
            _put_z(&o, b"CY", q1, cb_segs)
            _put_z(&o, b"UR", s1, umi_segs)
            _put_z(&o, b"UY", q1, umi_segs)
            if rg_len:
                scratch_put(&o, b"RGZ", 3)
                scratch_put(&o, <const char *> rg, rg_len + 1)  # with the bytes' NUL
            put_u32(o.data + start, <uint32_t> (o.used - start - 4))
            written += 1
        if o.used:
            out += (<char *> o.data)[:o.used]
    finally:
        scratch_free(&o)
    return written, short


# -- counting tag values ---------------------------------------------------------------

COUNT_STATS = ("records", "counted", "duplicate", "low_mapq", "secondary", "supplementary", "missing_tag")


cdef class TagCounter:
    """Reads per canonical value of ``tag`` over the raw BAM stream on ``in_fd``.

    A record is skipped (the first reason counted) if it is a duplicate (with
    ``skip_duplicates``), its MAPQ < ``min_mapq``, it is secondary or
    supplementary (with ``skip_secondary``), or it has no (or an empty) value.
    ``run()`` returns (ValueTable of value → reads, {COUNT_STATS: n}, tags seen).
    """
    cdef RecordReader reader
    cdef Tags tag
    cdef object source
    cdef bint skip_secondary
    cdef bint skip_duplicates
    cdef int min_mapq
    cdef Scratch key

    def __cinit__(self, int in_fd, tag, *, bint skip_secondary=True, bint skip_duplicates=False, int min_mapq=0,
                  source="", progress=None, Py_ssize_t buffer_size=1 << 20):
        self.reader = RecordReader(in_fd, source, False, progress, buffer_size, True)
        self.tag = Tags([tag])
        self.source = source
        self.skip_secondary = skip_secondary
        self.skip_duplicates = skip_duplicates
        self.min_mapq = min_mapq

    def __dealloc__(self):
        scratch_free(&self.key)

    def run(self):
        cdef Rec r
        cdef const uint8_t *found[1]
        cdef const BamCore *c
        cdef long long stats[7]
        cdef int k
        cdef ValueTable table = ValueTable()
        for k in range(7):
            stats[k] = 0
        self.reader.read_header()
        self.reader.release()
        while self.reader.next(&r, self.tag, found) != STREAM_END:
            self.reader.release()
            stats[0] += 1
            c = core_of(r.data)
            if self.skip_duplicates and c.flag & 0x400:
                stats[2] += 1
            elif c.mapq < self.min_mapq:
                stats[3] += 1
            elif self.skip_secondary and c.flag & 0x100:
                stats[4] += 1
            elif self.skip_secondary and c.flag & 0x800:
                stats[5] += 1
            elif self.tag.key_of(&self.key, found, self.source, self.reader.records - 1, &r) != KEY_FOUND:
                stats[6] += 1
            else:
                stats[1] += 1
                table.tally(self.key.data, self.key.used)
        self.reader.report()
        return table, {COUNT_STATS[k]: stats[k] for k in range(7)}, self.reader.tags_seen


# -- correcting cell barcodes ----------------------------------------------------------

CORRECT_STATS = ("records", "exact", "corrected", "ambiguous", "uncorrectable", "missing_tag", "frames")


cdef class Corrector:
    """Add ``tag_out``:Z to the records of the raw BAM stream on ``in_fd`` that
    have ``tag_in``, writing every record (and every chunk-end frame) to ``out_fd``.

    The value comes from a cache of quality-independent answers or else
    ``resolve(raw, qualities or None)``: a tuple (code, value or None,
    cacheable), code 0 exact, 1 corrected, 2 ambiguous, 3 uncorrectable.
    """
    cdef RecordReader reader
    cdef OutBufs outs
    cdef uint16_t tag_in
    cdef uint16_t qual_tag
    cdef uint16_t tag_out
    cdef bytes tag_out_bytes
    cdef object resolve
    cdef ValueTable cache
    cdef list answers             # cache slot's output number → (code, value)
    cdef object source

    def __cinit__(self, int in_fd, int out_fd, tag_in, qual_tag, tag_out, resolve, *, source="", progress=None,
                  Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20):
        cdef Tags t = Tags([tag_in, qual_tag, tag_out])
        self.reader = RecordReader(in_fd, source, True, progress, buffer_size)
        self.outs = OutBufs([out_fd], out_buffer_size)
        self.tag_in = t.codes[0]
        self.qual_tag = t.codes[1]
        self.tag_out = t.codes[2]
        self.tag_out_bytes = t.names[2].encode()
        self.resolve = resolve
        self.cache = ValueTable()
        self.answers = []
        self.source = source

    cdef str _string_tag(self, const uint8_t *tv, uint16_t code, long long index, const Rec *r):
        if tv != NULL and tv[0] != b'Z':
            raise ValueError(f"{describe(self.source, index, r)}: tag {chr(code & 0xFF)}{chr(code >> 8)} "
                             f"is not a string (type {chr(tv[0])})")
        return None

    def run(self):
        """Returns {CORRECT_STATS: n}."""
        cdef Rec r
        cdef const uint8_t *tv
        cdef const uint8_t *qv
        cdef OutBuf *out = &self.outs.bufs[0]
        cdef long long stats[7]
        cdef long long index
        cdef Py_ssize_t vlen, slot, k
        cdef int code, got
        cdef uint8_t head[4]
        cdef object answer, value
        for k in range(7):
            stats[k] = 0
        self.reader.read_header()
        out_put(out, <const char *> self.reader.header(), self.reader.header_len)
        self.reader.release()
        while True:
            got = self.reader.next(&r, None, NULL)
            if got == STREAM_END:
                break
            if got == GOT_FRAME:
                stats[6] += 1
                out_put(out, b"\0\0\0\0", 4)
                self.reader.release()
                continue
            index = self.reader.records - 1
            stats[0] += 1
            if find_tag(&r, self.tag_out) != NULL:
                raise ValueError(f"{describe(self.source, index, &r)}: already has a "
                                 f"{self.tag_out_bytes.decode()} tag")
            tv = find_tag(&r, self.tag_in)
            self._string_tag(tv, self.tag_in, index, &r)
            value = None
            if tv == NULL or tv[1] == 0:
                stats[5] += 1
            else:
                vlen = <Py_ssize_t> strlen(<const char *> tv + 1)
                slot = self.cache.lookup(tv + 1, vlen)
                if slot >= 0:
                    answer = <object> PyList_GET_ITEM(self.answers, self.cache.slots[slot].out)
                else:
                    qv = find_tag(&r, self.qual_tag)
                    self._string_tag(qv, self.qual_tag, index, &r)
                    raw = (<const char *> tv + 1)[:vlen]
                    qual = None if qv == NULL else (<const char *> qv + 1)[:strlen(<const char *> qv + 1)]
                    try:
                        code, value, cacheable = self.resolve(raw, qual)
                    except ValueError as e:
                        raise ValueError(f"{describe(self.source, index, &r)}: {e}") from None
                    if not 0 <= code <= 3:
                        raise ValueError(f"resolve returned code {code} for {raw!r}; codes are 0-3")
                    if value is not None and (not isinstance(value, bytes) or b"\0" in value):
                        raise ValueError(f"resolve returned {value!r} for {raw!r}; a value is bytes without NUL")
                    answer = (code, value)
                    if cacheable:
                        self.cache.insert(tv + 1, vlen, _hash(tv + 1, vlen), len(self.answers))
                        self.answers.append(answer)
                code = answer[0]
                value = answer[1]
                stats[1 + code] += 1
            if value is None:
                out_put(out, <const char *> r.data - 4, 4 + r.size)
            else:
                vlen = len(<bytes?> value)
                put_u32(head, r.size + <uint32_t> vlen + 4)
                out_put(out, <const char *> head, 4)
                out_put(out, <const char *> r.data, r.size)
                out_put(out, <const char *> self.tag_out_bytes, 2)
                out_put(out, b"Z", 1)
                out_put(out, <const char *> (<bytes> value), vlen + 1)  # with the bytes' NUL
            out.records += 1
            self.reader.release()
        out_flush(out)
        self.reader.report()
        return {CORRECT_STATS[k]: stats[k] for k in range(7)}


cdef inline uint64_t _hash(const uint8_t *key, Py_ssize_t n) noexcept:
    return fnv1a64(key, n)


# -- whitelist: 2-bit packed, sorted uint64 ------------------------------------------------

cdef int _cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *> a)[0], y = (<const uint64_t *> b)[0]
    return (x > y) - (x < y)


cdef class Whitelist:
    """A set of equal-length ACGT barcodes (at most 32 bp), 2-bit packed in a
    sorted array of uint64: 8 bytes per barcode, binary-search membership."""

    cdef uint64_t *codes
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef public int length
    cdef bint finished

    def __cinit__(self):
        self.codes = NULL
        self.n = 0
        self.cap = 0
        self.length = 0
        self.finished = False

    def __dealloc__(self):
        free(self.codes)

    def add_lines(self, const uint8_t[:] data not None, long long first_line, str source):
        """Add the barcodes of ``data`` (whole lines; the last may lack its newline).
        Returns the number of lines read. An empty line, a line of another length
        or with characters other than ACGT raises ValueError naming the line."""
        cdef Py_ssize_t i = 0, j, end, n = data.shape[0], l
        cdef long long line = first_line
        cdef uint64_t code
        cdef uint8_t b
        cdef uint64_t *p
        while i < n:
            j = i
            while j < n and data[j] != 10:
                j += 1
            end = j
            if end > i and data[end - 1] == 13:
                end -= 1
            l = end - i
            if l == 0:
                raise ValueError(f"{source}: line {line} is empty")
            if l > 32:
                raise ValueError(f"{source}: line {line}: barcode of {l} characters (at most 32)")
            if self.length == 0:
                self.length = <int> l
            elif l != self.length:
                raise ValueError(f"{source}: line {line}: barcode of {l} characters, the first line has {self.length}")
            code = 0
            for k in range(i, end):
                b = BASE2[data[k]]
                if b == 255:
                    raise ValueError(f"{source}: line {line}: character {chr(data[k])!r} (only A, C, G, T)")
                code = (code << 2) | b
            if self.n == self.cap:
                self.cap = self.cap * 2 if self.cap else 1 << 16
                p = <uint64_t *> realloc(self.codes, self.cap * sizeof(uint64_t))
                if p == NULL:
                    raise MemoryError()
                self.codes = p
            self.codes[self.n] = code
            self.n += 1
            line += 1
            i = j + 1
        return line - first_line

    def finish(self, str source):
        """Sort and remove duplicates; returns the number of duplicates removed."""
        cdef Py_ssize_t i, k = 0
        if self.n == 0:
            raise ValueError(f"{source}: the whitelist is empty")
        qsort(self.codes, self.n, sizeof(uint64_t), _cmp_u64)
        for i in range(self.n):
            if k == 0 or self.codes[i] != self.codes[k - 1]:
                self.codes[k] = self.codes[i]
                k += 1
        dups = self.n - k
        self.n = k
        self.finished = True
        return dups

    def __len__(self):
        return self.n

    cdef bint _has(self, uint64_t code) noexcept:
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.codes[mid] < code:
                lo = mid + 1
            else:
                hi = mid
        return lo < self.n and self.codes[lo] == code

    def __contains__(self, bytes barcode):
        cdef const uint8_t *s = barcode
        cdef Py_ssize_t l = len(barcode)
        cdef uint64_t code = 0
        if l != self.length or not pack2(s, l, &code):
            return False
        return self._has(code)

    def neighbors(self, bytes barcode):
        """[(position, barcode)] of whitelist barcodes at Hamming distance 1, by position then A C G T.
        Positions holding a non-ACGT character (N) are the only ones that can be substituted:
        with one, only that position; with two or more, none."""
        cdef const uint8_t *s = barcode
        cdef Py_ssize_t i, l = len(barcode), bad = -1, nbad = 0
        cdef uint64_t code = 0, c
        cdef int shift, b
        cdef list found = []
        if l != self.length:
            return found
        for i in range(l):
            if BASE2[s[i]] == 255:
                bad = i
                nbad += 1
                code = code << 2
            else:
                code = (code << 2) | BASE2[s[i]]
        if nbad > 1:
            return found
        for i in range(l):
            if nbad and i != bad:
                continue
            shift = 2 * (l - 1 - i)
            for b in range(4):
                if nbad == 0 and b == BASE2[s[i]]:
                    continue
                c = (code & ~(<uint64_t> 3 << shift)) | (<uint64_t> b << shift)
                if self._has(c):
                    found.append((i, barcode[:i] + b"ACGT"[b:b + 1] + barcode[i + 1:]))
        return found

    def to_bytes(self):
        return (<char *> self.codes)[:self.n * sizeof(uint64_t)] if self.n else b""

    @staticmethod
    def from_bytes(bytes packed, int length):
        cdef Whitelist w = Whitelist()
        w.n = len(packed) // sizeof(uint64_t)
        w.cap = w.n if w.n else 1
        w.codes = <uint64_t *> malloc(w.cap * sizeof(uint64_t))
        if w.codes == NULL:
            raise MemoryError()
        if w.n:
            memcpy(w.codes, <const char *> packed, w.n * sizeof(uint64_t))
        w.length = length
        w.finished = True
        return w

    def __reduce__(self):
        return (Whitelist.from_bytes, (self.to_bytes(), self.length))
