# cython: language_level=3
"""Kernels of the single-cell presets (bamflow.presets): FASTQ pairs to unmapped
BAM records (``tag``), tag-value counting with flag/MAPQ filters (``histogram``
and the first pass of ``correct``), cell-barcode correction of raw records
(``correct``) and a 2-bit packed barcode whitelist.

The record kernels work on one buffer of a raw BAM stream (records after the
header) at a time and return how far they got, so the caller keeps the
incomplete record at the end for the next buffer.
"""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.ref cimport PyObject


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object, Py_ssize_t *) except NULL

# "=ACMGRSVTWYHKDBN" → 4-bit codes; everything else is N (15)
cdef uint8_t SEQ_CODE[256]
cdef int _i
for _i in range(256):
    SEQ_CODE[_i] = 15
for _i, _c in enumerate(list(b"=ACMGRSVTWYHKDBN")):
    SEQ_CODE[_c] = _i
    if 65 <= _c <= 90:
        SEQ_CODE[_c + 32] = _i

# A C G T → 0 1 2 3; anything else 255
cdef uint8_t BASE2[256]
for _i in range(256):
    BASE2[_i] = 255
BASE2[ord("A")] = 0
BASE2[ord("C")] = 1
BASE2[ord("G")] = 2
BASE2[ord("T")] = 3


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return <uint32_t> p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16) | (<uint32_t> p[3] << 24)


cdef inline void _put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


# -- growable output buffer ---------------------------------------------------------

cdef struct Out:
    uint8_t *data
    Py_ssize_t used
    Py_ssize_t cap


cdef int _out_reserve(Out *o, Py_ssize_t more) except -1:
    cdef Py_ssize_t cap = o.cap if o.cap else 1 << 16
    cdef uint8_t *p
    if o.used + more <= o.cap:
        return 0
    while cap < o.used + more:
        cap *= 2
    p = <uint8_t *> realloc(o.data, cap)
    if p == NULL:
        raise MemoryError()
    o.data = p
    o.cap = cap
    return 0


# -- tag: FASTQ pairs → unmapped BAM records -----------------------------------------

cdef inline Py_ssize_t _id_len(const char *name, Py_ssize_t n) noexcept:
    """Length of the read ID: up to the first space/tab, without a trailing /1 or /2."""
    cdef Py_ssize_t i = 0
    while i < n and name[i] != 32 and name[i] != 9:
        i += 1
    if i >= 2 and name[i - 2] == 47 and (name[i - 1] == 49 or name[i - 1] == 50):
        i -= 2
    return i


cdef int _put_z(Out *o, const char *tag, const char *s, const char *q, list segs, bint qual) except -1:
    """Append tag:Z: the concatenation of the segments of s (or of q minus nothing: raw qualities)."""
    cdef Py_ssize_t a, b
    _out_reserve(o, 3)
    o.data[o.used] = tag[0]
    o.data[o.used + 1] = tag[1]
    o.data[o.used + 2] = 90  # Z
    o.used += 3
    for a, b in segs:
        _out_reserve(o, b - a)
        memcpy(o.data + o.used, (q if qual else s) + a, b - a)
        o.used += b - a
    _out_reserve(o, 1)
    o.data[o.used] = 0
    o.used += 1
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
    cdef Out o
    cdef long long written = 0, short = 0
    cdef uint8_t *p
    cdef uint8_t c
    cdef Py_ssize_t rg_len = len(rg)
    if len(r2s) != n:
        raise ValueError("read 1 and read 2 batches differ in size")
    o.data = NULL
    o.used = 0
    o.cap = 0
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
            _out_reserve(&o, 36 + lname + (l2 + 1) // 2 + l2)
            p = o.data + start
            # block_size (later), refID, pos, l_read_name, mapq, bin, n_cigar, flag, l_seq, next_refID, next_pos, tlen
            _put_u32(p + 4, 0xFFFFFFFF)
            _put_u32(p + 8, 0xFFFFFFFF)
            p[12] = <uint8_t> lname
            p[13] = 0
            p[14] = 4680 & 0xFF
            p[15] = 4680 >> 8
            p[16] = 0
            p[17] = 0
            p[18] = 4
            p[19] = 0
            _put_u32(p + 20, <uint32_t> l2)
            _put_u32(p + 24, 0xFFFFFFFF)
            _put_u32(p + 28, 0xFFFFFFFF)
            _put_u32(p + 32, 0)
            memcpy(p + 36, n2, id2)
            p[36 + id2] = 0
            p += 36 + lname
            for k in range(0, l2 - 1, 2):
                p[k >> 1] = (SEQ_CODE[<uint8_t> s2[k]] << 4) | SEQ_CODE[<uint8_t> s2[k + 1]]
            if l2 & 1:
                p[l2 >> 1] = SEQ_CODE[<uint8_t> s2[l2 - 1]] << 4
            p += (l2 + 1) // 2
            for k in range(l2):
                c = <uint8_t> q2[k]
                if c < 33 or c > 126:
                    raise ValueError(f"FASTQ pair {first + i}: invalid quality character {chr(c)!r} in read 2")
                p[k] = c - 33
            o.used = start + 36 + lname + (l2 + 1) // 2 + l2
            _put_z(&o, b"CR", s1, q1, cb_segs, False)
            _put_z(&o, b"CY", s1, q1, cb_segs, True)
            _put_z(&o, b"UR", s1, q1, umi_segs, False)
            _put_z(&o, b"UY", s1, q1, umi_segs, True)
            if rg_len:
                _out_reserve(&o, rg_len + 4)
                memcpy(o.data + o.used, b"RGZ", 3)
                memcpy(o.data + o.used + 3, <const char *> rg, rg_len)
                o.data[o.used + 3 + rg_len] = 0
                o.used += rg_len + 4
            _put_u32(o.data + start, <uint32_t> (o.used - start - 4))
            written += 1
        out += (<char *> o.data)[:o.used] if o.used else b""
    finally:
        free(o.data)
    return written, short


# -- walking records -------------------------------------------------------------------

cdef inline Py_ssize_t _tag_size(const uint8_t *p, const uint8_t *end) except -2:
    """Size of the tag value whose type char is at p (type char excluded); -1 if corrupt."""
    cdef uint8_t t = p[0]
    cdef const uint8_t *q
    cdef Py_ssize_t esz
    cdef uint32_t count
    if t == 65 or t == 99 or t == 67:  # A c C
        return 1
    if t == 115 or t == 83:  # s S
        return 2
    if t == 105 or t == 73 or t == 102:  # i I f
        return 4
    if t == 90 or t == 72:  # Z H
        q = p + 1
        while q < end and q[0] != 0:
            q += 1
        if q >= end:
            return -1
        return q - p
    if t == 66:  # B
        if p + 6 > end:
            return -1
        esz = {99: 1, 67: 1, 115: 2, 83: 2, 105: 4, 73: 4, 102: 4}.get(p[1], 0)
        if esz == 0:
            return -1
        count = _u32(p + 2)
        return 5 + esz * count
    return -1


cdef const uint8_t *_find_tag(const uint8_t *rec, uint32_t block_size, const char *tag) except? NULL:
    """Pointer to the type char of tag in the record (rec: after block_size), or NULL."""
    cdef uint32_t l_name = rec[8], n_cigar = rec[12] | (rec[13] << 8), l_seq = _u32(rec + 16)
    cdef Py_ssize_t aux = 32 + l_name + 4 * n_cigar + (l_seq + 1) // 2 + l_seq
    cdef const uint8_t *p = rec + aux
    cdef const uint8_t *end = rec + block_size
    cdef Py_ssize_t size
    if aux > block_size:
        raise ValueError("corrupt BAM record (fields overrun its block_size)")
    while p + 3 <= end:
        if p[0] == tag[0] and p[1] == tag[1]:
            if _tag_size(p + 2, end) < 0:
                raise ValueError("corrupt BAM record (bad tag)")
            return p + 2
        size = _tag_size(p + 2, end)
        if size < 0 or p + 3 + size > end:
            raise ValueError("corrupt BAM record (bad tag)")
        p += 3 + size
    return NULL


cdef str _read_name(const uint8_t *rec, uint32_t block_size):
    cdef Py_ssize_t l = rec[8]
    if l < 1 or 32 + l > block_size:
        return "?"
    return (<const char *> rec + 32)[:l - 1].decode("utf-8", "replace")


cdef object _value_bytes(const uint8_t *tv, const uint8_t *end):
    """Histogram key of a tag value: string types as they are, integers in decimal; None if empty."""
    cdef uint8_t t = tv[0]
    cdef Py_ssize_t n
    if t == 90 or t == 72:
        n = _tag_size(tv, end) - 1
        if n <= 0:
            return None
        return PyBytes_FromStringAndSize(<const char *> tv + 1, n)
    if t == 65:
        return PyBytes_FromStringAndSize(<const char *> tv + 1, 1)
    if t == 99:
        return str(<signed char> tv[1]).encode()
    if t == 67:
        return str(tv[1]).encode()
    if t == 115:
        return str(<short> (tv[1] | (tv[2] << 8))).encode()
    if t == 83:
        return str(<unsigned short> (tv[1] | (tv[2] << 8))).encode()
    if t == 105:
        return str(<int32_t> _u32(tv + 1)).encode()
    if t == 73:
        return str(_u32(tv + 1)).encode()
    raise TypeError(f"tag type {chr(t)!r}: only string and integer tags can be counted")


def count_tag_values(const uint8_t[:] buf not None, Py_ssize_t start, bytes tag, bint skip_secondary,
                     bint skip_duplicates, int min_mapq, dict counts, long long[:] stats not None):
    """Count the values of ``tag`` over the complete records of ``buf[start:]``.

    A record is skipped (first reason counted in ``stats``) if it is a
    duplicate (with ``skip_duplicates``), its MAPQ < ``min_mapq``, it is
    secondary or supplementary (with ``skip_secondary``), or it has no (or an
    empty) value. stats: [records, counted, duplicate, low_mapq, secondary,
    supplementary, missing_tag]. Returns the offset of the first incomplete record.
    """
    cdef Py_ssize_t pos = start, n = buf.shape[0]
    cdef const uint8_t *base = &buf[0] if n else NULL
    cdef const uint8_t *rec
    cdef const uint8_t *tv
    cdef uint32_t bs
    cdef uint16_t flag
    cdef const char *t = tag
    cdef PyObject *old
    while pos + 4 <= n:
        bs = _u32(base + pos)
        if bs < 32:
            raise ValueError(f"corrupt BAM record {stats[0]} (block_size {bs})")
        if pos + 4 + bs > n:
            break
        rec = base + pos + 4
        pos += 4 + bs
        stats[0] += 1
        flag = rec[14] | (rec[15] << 8)
        if skip_duplicates and flag & 0x400:
            stats[2] += 1
            continue
        if rec[9] < min_mapq:
            stats[3] += 1
            continue
        if skip_secondary and flag & 0x100:
            stats[4] += 1
            continue
        if skip_secondary and flag & 0x800:
            stats[5] += 1
            continue
        try:
            tv = _find_tag(rec, bs, t)
            value = None if tv == NULL else _value_bytes(tv, rec + bs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"record {stats[0] - 1} ({_read_name(rec, bs)}): {e}") from None
        if value is None:
            stats[6] += 1
            continue
        stats[1] += 1
        old = PyDict_GetItem(counts, value)
        if old == NULL:
            PyDict_SetItem(counts, value, 1)
        else:
            PyDict_SetItem(counts, value, <object> old + 1)
    return pos


def correct_records(const uint8_t[:] buf not None, Py_ssize_t start, bytes tag_in, bytes qual_tag,
                    bytes tag_out, dict cache, object resolve, bytes marker_name, long long[:] stats not None):
    """Add ``tag_out``:Z to the complete records of ``buf[start:]`` that have ``tag_in``.

    The value comes from ``cache[raw]`` or else ``resolve(raw, qualities or
    None)``: a tuple (code, value or None), code 0 exact, 1 corrected, 2
    ambiguous, 3 uncorrectable. Records named ``marker_name`` pass unchanged
    and uncounted. stats: [records, exact, corrected, ambiguous,
    uncorrectable, missing_tag, markers]. Returns (offset of the first
    incomplete record, output bytes).
    """
    cdef Py_ssize_t pos = start, n = buf.shape[0], vlen, mlen = len(marker_name)
    cdef const uint8_t *base = &buf[0] if n else NULL
    cdef const uint8_t *rec
    cdef const uint8_t *tv
    cdef const uint8_t *qv
    cdef uint32_t bs
    cdef Out o
    cdef PyObject *hit
    cdef int code
    cdef const char *tin = tag_in
    cdef const char *tq = qual_tag
    cdef const char *tout = tag_out
    o.data = NULL
    o.used = 0
    o.cap = 0
    try:
        _out_reserve(&o, n - start + 1024)
        while pos + 4 <= n:
            bs = _u32(base + pos)
            if bs < 32:
                raise ValueError(f"corrupt BAM record {stats[0]} (block_size {bs})")
            if pos + 4 + bs > n:
                break
            rec = base + pos + 4
            if rec[8] == mlen + 1 and 32 + mlen < bs and memcmp(rec + 32, <const char *> marker_name, mlen) == 0:
                stats[6] += 1
                _out_reserve(&o, 4 + bs)
                memcpy(o.data + o.used, base + pos, 4 + bs)
                o.used += 4 + bs
                pos += 4 + bs
                continue
            stats[0] += 1
            try:
                if _find_tag(rec, bs, tout) != NULL:
                    raise ValueError(f"already has a {tag_out.decode()} tag")
                tv = _find_tag(rec, bs, tin)
                if tv != NULL and tv[0] != 90:
                    raise ValueError(f"tag {tag_in.decode()} is not a string (type {chr(tv[0])})")
                qv = NULL
                if tv != NULL:
                    qv = _find_tag(rec, bs, tq)
                    if qv != NULL and qv[0] != 90:
                        raise ValueError(f"tag {qual_tag.decode()} is not a string (type {chr(qv[0])})")
            except ValueError as e:
                raise ValueError(f"record {stats[0] - 1} ({_read_name(rec, bs)}): {e}") from None
            value = None
            if tv == NULL or tv[1] == 0:
                stats[5] += 1
            else:
                raw = PyBytes_FromStringAndSize(<const char *> tv + 1, _tag_size(tv, rec + bs) - 1)
                hit = PyDict_GetItem(cache, raw)
                if hit != NULL:
                    result = <object> hit
                else:
                    qual = None if qv == NULL else PyBytes_FromStringAndSize(<const char *> qv + 1, _tag_size(qv, rec + bs) - 1)
                    try:
                        result = resolve(raw, qual)
                    except ValueError as e:
                        raise ValueError(f"record {stats[0] - 1} ({_read_name(rec, bs)}): {e}") from None
                code = result[0]
                value = result[1]
                stats[1 + code] += 1
            if value is None:
                _out_reserve(&o, 4 + bs)
                memcpy(o.data + o.used, base + pos, 4 + bs)
                o.used += 4 + bs
            else:
                vlen = len(<bytes> value)
                _out_reserve(&o, 4 + bs + vlen + 4)
                _put_u32(o.data + o.used, bs + <uint32_t> vlen + 4)
                memcpy(o.data + o.used + 4, rec, bs)
                o.used += 4 + bs
                o.data[o.used] = tout[0]
                o.data[o.used + 1] = tout[1]
                o.data[o.used + 2] = 90
                memcpy(o.data + o.used + 3, <const char *> (<bytes> value), vlen)
                o.data[o.used + 3 + vlen] = 0
                o.used += vlen + 4
            pos += 4 + bs
        return pos, PyBytes_FromStringAndSize(<const char *> o.data, o.used)
    finally:
        free(o.data)


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
        cdef Py_ssize_t i, l = len(barcode)
        cdef uint64_t code = 0
        cdef uint8_t b
        if l != self.length:
            return False
        for i in range(l):
            b = BASE2[s[i]]
            if b == 255:
                return False
            code = (code << 2) | b
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
