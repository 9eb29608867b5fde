# cython: language_level=3
"""bamflow.Record: a zero-copy view of one BAM record, and the kernels that
hand records to Python: per record (:class:`MapRecords`, :class:`RecordIterator`)
or per column batch (:class:`BatchKernel`).

Records come from the one record layer (``_records.RecordReader``), checked.
A :class:`Record` made by a kernel points into the reader's buffer: nothing
is decoded or copied until a property asks. Fixed fields are edited in place;
an edit that changes a length (a name, CIGAR, sequence, a tag added or
removed) splices the record's own copy, so the record's bytes are always a
valid BAM record and writing it is one copy of those bytes.

Views and the reader's buffer. Parsed records stay in the reader's buffer
until the kernel refills it. Every view registers with its :class:`_Source`;
before a refill the source *detaches* the views still alive (user code kept
them: in a list, as a loop variable of ``map_reduce``): each copies its bytes
into memory it owns. A record that nobody kept costs no copy, and a record
kept for any time stays valid.

The semantics are pysam's (``pysam.AlignedSegment``) for the common subset,
checked property by property against pysam in tests/test_record.py; a CIGAR
of more than 65,535 operations lives in the ``CG`` tag (with a
``<l_seq>S<ref_len>N`` placeholder), read and written as htslib does.
Differences from pysam are listed in docs/api.md.
"""

import array as _array_module
import re as _re
import sys as _sys

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython cimport array as c_array
from libc.stdint cimport (
    INT8_MIN, INT16_MIN, INT32_MAX, INT32_MIN, UINT8_MAX, UINT16_MAX, UINT32_MAX, int8_t, int16_t, int32_t,
    int64_t, uint8_t, uint16_t, uint32_t, uint64_t,
)
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from bamflow.kernels._tables cimport AUX_FIXED, SEQ_LETTERS, SEQ_NT16
from bamflow.kernels._io cimport OutBuf, OutBufs, out_flush, out_put
from bamflow.kernels._records cimport (
    FIXED_SIZE, GOT_FRAME, KEY_FOUND, MAX_RECORD, MAX_TAGS, NEED_MORE, STREAM_END, BamCore, Rec, RecordReader,
    Scratch, Tags, ValueTable, aux_value_size, find_tag, put_u32, scratch_free, tag_code, tag_key, u16, u32,
)

if _sys.byteorder != "little":  # BamCore is read in place
    raise ImportError("bamflow's kernels need a little-endian machine")

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void *PyUnicode_DATA(object o)

# a chunk-end frame (see bamflow.kernels._records)
cdef const char *FRAME = b"\0\0\0\0"

cdef enum:
    MAX_NAME = 254                      # characters of a read name (l_read_name <= 255)
    SHORT_CIGAR = 0xFFFF                # at most this many operations in the CIGAR field
    LONG_CIGAR = 1 << 29                # htslib's bound on the operations a CG tag may hold
    MAX_REF_SPAN = 1 << 28              # reference length a placeholder CIGAR can state

# -- tables --------------------------------------------------------------------------------

cdef const char *CIGAR_LETTERS = b"MIDNSHP=XB"
cdef uint16_t PAIR_TEXT[256]           # a packed byte -> its two letters
cdef char ARRAY_TYPECODE[256]          # B subtype -> array.array typecode

for _i in range(256):
    ARRAY_TYPECODE[_i] = 0
for _i in range(256):
    PAIR_TEXT[_i] = <uint16_t> SEQ_LETTERS[_i >> 4] | (<uint16_t> SEQ_LETTERS[_i & 15] << 8)
for _c, _a in (("c", "b"), ("C", "B"), ("s", "h"), ("S", "H"), ("i", "i"), ("I", "I"), ("f", "f")):
    ARRAY_TYPECODE[ord(_c)] = ord(_a)

# array.array typecode -> BAM B subtype (pysam's map)
_SUBTYPE_OF_ARRAY = {"b": "c", "B": "C", "h": "s", "H": "S", "i": "i", "I": "I", "f": "f"}
CIGAR_REGEX = _re.compile(r"(\d+)([MIDNSHP=XB])")
_array_template = _array_module.array("B")

if _array_module.array("i").itemsize != 4 or _array_module.array("h").itemsize != 2:
    raise ImportError("bamflow.Record needs 4-byte C ints")


# -- small helpers ---------------------------------------------------------------------------

cdef inline int64_t reg2bin(int64_t beg, int64_t end) noexcept nogil:
    """htslib's hts_reg2bin(beg, end, 14, 5)."""
    cdef int level, s = 14
    cdef int64_t t = ((1 << 15) - 1) // 7
    end -= 1
    level = 5
    while level > 0:
        if (beg >> s) == (end >> s):
            return t + (beg >> s)
        level -= 1
        s += 3
        t -= 1 << ((level << 1) + level)
    return 0


cdef enum:  # the CIGAR operations (bits by code) that consume the reference, the query
    CONSUMES_REF = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 7) | (1 << 8)      # M D N = X
    CONSUMES_QUERY = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 7) | (1 << 8)    # M I S = X


cdef inline int64_t cigar_length(const uint8_t *ops, uint32_t n, uint32_t consuming) noexcept nogil:
    """Bases the CIGAR operations consume on the reference or the query (``consuming``)."""
    cdef int64_t total = 0
    cdef uint32_t k, v
    for k in range(n):
        v = u32(ops + 4 * k)
        if consuming & (1u << (v & 0xF)):
            total += v >> 4
    return total


cdef inline void decode_sequence(const uint8_t *packed, uint32_t l, uint8_t *out) noexcept nogil:
    """The ``l`` bases packed two per byte at ``packed``, as letters, into ``out``."""
    cdef uint32_t k
    cdef uint16_t pair
    for k in range(l >> 1):
        pair = PAIR_TEXT[packed[k]]
        out[2 * k] = pair & 0xFF
        out[2 * k + 1] = pair >> 8
    if l & 1:
        out[l - 1] = SEQ_LETTERS[packed[l >> 1] >> 4]


cdef inline object ascii_text(Py_ssize_t n, uint8_t **out):
    """A new str of ``n`` ASCII characters, to be written at ``out[0]``."""
    cdef object text = PyUnicode_New(n, 127)
    out[0] = <uint8_t *> PyUnicode_DATA(text)
    return text


cdef inline void fill_rec(Rec *r, const uint8_t *b, uint32_t size) noexcept nogil:
    """The field offsets of the (checked) record at ``b``."""
    cdef const BamCore *c = <const BamCore *> b
    r.data = b
    r.size = size
    r.cigar = FIXED_SIZE + c.l_read_name
    r.seq = r.cigar + 4 * <uint32_t> c.n_cigar
    r.qual = r.seq + ((c.l_seq + 1) >> 1)
    r.aux = r.qual + c.l_seq


cdef int tag_code_of(object tag, uint16_t *code) except -1:
    """``code`` of a two-character tag name (str or bytes): 1, or 0 if it has not two characters."""
    cdef Py_UCS4 a, b
    cdef const unsigned char *p
    if isinstance(tag, str):
        if len(<str> tag) != 2:
            return 0
        a = (<str> tag)[0]
        b = (<str> tag)[1]
        if a > 255 or b > 255:
            return 0
        code[0] = <uint16_t> (<uint32_t> a | (<uint32_t> b << 8))
        return 1
    if isinstance(tag, (bytes, bytearray)):
        if len(tag) != 2:
            return 0
        code[0] = <uint16_t> (tag[0] | (tag[1] << 8))
        return 1
    raise TypeError(f"a tag name is a str or bytes of two characters, not {tag!r}")


cdef str tag_name(uint16_t code):
    return chr(code & 0xFF) + chr(code >> 8)


cdef object decode_text(const uint8_t *p, Py_ssize_t n):
    """A Z/H value or read name as pysam gives it: UTF-8, strictly."""
    return PyUnicode_DecodeUTF8(<const char *> p, n, NULL)


cdef object aux_value(const uint8_t *t):
    """The Python value of the checked aux value whose type byte is at ``t`` (pysam's types)."""
    cdef uint8_t typ = t[0]
    cdef const uint8_t *v = t + 1
    cdef uint32_t count
    cdef Py_ssize_t size
    cdef c_array.array values
    cdef float f
    if typ == b'c':
        return <int8_t> v[0]
    if typ == b'C':
        return v[0]
    if typ == b's':
        return <int16_t> u16(v)
    if typ == b'S':
        return u16(v)
    if typ == b'i':
        return <int32_t> u32(v)
    if typ == b'I':
        return u32(v)
    if typ == b'f':
        memcpy(&f, v, 4)
        return f
    if typ == b'A':
        return chr(v[0])
    if typ == b'Z' or typ == b'H':
        size = 0
        while v[size] != 0:
            size += 1
        return decode_text(v, size)
    if typ == b'B':
        count = u32(v + 1)
        values = c_array.clone(_array_module.array(chr(ARRAY_TYPECODE[v[0]])), count, False)
        if count:
            memcpy(values.data.as_voidptr, v + 5, count * values.ob_descr.itemsize)
        return values
    raise ValueError(f"unknown aux type {chr(typ)!r}")


cdef str aux_type_text(const uint8_t *t, bint with_subtype):
    """pysam's value type: ``"i"``, ``"Z"``, …; arrays ``"B"`` (get_tags) or ``"Bc"`` (get_tag)."""
    if t[0] == b'B' and with_subtype:
        return "B" + chr(t[1])
    return chr(t[0])


cdef inline Py_ssize_t aux_field_size(const uint8_t *p, const uint8_t *end) noexcept nogil:
    """Bytes of the whole checked aux field at ``p`` (tag, type and value)."""
    return 3 + aux_value_size(p + 2, end)


cdef bytes encode_tag(uint16_t code, object value, object value_type):
    """One aux field (tag, type, value) as pysam's set_tag would store it.
    Raises as pysam does for values it cannot store (ValueError, TypeError,
    OverflowError), and ValueError for what BAM cannot hold (a NUL inside a
    string; the htslib-only type ``d``)."""
    cdef uint8_t typ = 0
    cdef bytes text, out
    cdef uint8_t head[3]
    head[0] = code & 0xFF
    head[1] = code >> 8
    if value_type is not None:
        if isinstance(value_type, bytes):
            value_type = value_type.decode("ascii")
        if not isinstance(value_type, str) or len(value_type) == 0 or value_type[0] not in "aAsSIcCZidfH":
            raise ValueError(f"can't guess type or invalid type code specified: {value} {value_type}")
        typ = ord(value_type[0])
    elif isinstance(value, int):
        if value < 0:
            typ = b'c' if value >= INT8_MIN else b's' if value >= INT16_MIN else b'i' if value >= INT32_MIN else 0
        else:
            typ = b'C' if value <= UINT8_MAX else b'S' if value <= UINT16_MAX else b'I' if value <= UINT32_MAX else 0
    elif isinstance(value, float):
        typ = b'f'
    elif isinstance(value, (str, bytes)):
        typ = b'Z'
    elif isinstance(value, (_array_module.array, list, tuple)):
        return encode_array(code, value)
    if typ == 0:
        raise ValueError(f"can't guess type or invalid type code specified: {value} {value_type}")
    if typ == b'd':
        raise ValueError("type 'd' (double) is htslib's own, not a BAM type; use 'f'")
    if typ == b'a':
        typ = b'A'
    head[2] = typ
    if typ == b'Z' or typ == b'H' or typ == b'A':
        if isinstance(value, str):
            text = (<str> value).encode("utf-8")
        elif isinstance(value, bytes):
            text = value
        else:
            raise TypeError("Argument must be string, bytes or unicode.")
        if typ == b'A':
            if len(text) < 1:
                raise ValueError("a value of type A is one character")
            return (<const char *> head)[:3] + text[:1]
        if b"\0" in text:
            raise ValueError(f"a string tag value cannot hold a NUL character: {value!r}")
        return (<const char *> head)[:3] + text + b"\0"
    out = PyBytes_FromStringAndSize(NULL, 3 + AUX_FIXED[typ])
    encode_fixed(<uint8_t *> PyBytes_AS_STRING(out), code, value, typ)
    return out


cdef inline uint8_t fixed_type(object value, object value_type):
    """The type of a value set_tag can encode without a Python object (an int
    or float, typed or not: c C s S i I f), else 0 (the general path decides)."""
    cdef Py_UCS4 t
    if value_type is None:
        if type(value) is int:
            if value < 0:
                return b'c' if value >= INT8_MIN else b's' if value >= INT16_MIN else b'i' if value >= INT32_MIN else 0
            return b'C' if value <= UINT8_MAX else b'S' if value <= UINT16_MAX else b'I' if value <= UINT32_MAX else 0
        if type(value) is float:
            return b'f'
        return 0
    if type(value_type) is str and len(<str> value_type) >= 1 and (type(value) is int or type(value) is float):
        t = (<str> value_type)[0]
        if t == u'c' or t == u'C' or t == u's' or t == u'S' or t == u'i' or t == u'I' or t == u'f':
            return <uint8_t> t
    return 0


# the range of each integer type, and its C name (for the errors, as Cython's conversions word them)
_INT_RANGES = {ord("c"): (INT8_MIN, 127, "int8_t"), ord("C"): (0, UINT8_MAX, "uint8_t"),
               ord("s"): (INT16_MIN, 32767, "int16_t"), ord("S"): (0, UINT16_MAX, "uint16_t"),
               ord("i"): (INT32_MIN, INT32_MAX, "int32_t"), ord("I"): (0, UINT32_MAX, "uint32_t")}


cdef int encode_fixed(uint8_t *out, uint16_t code, object value, uint8_t typ) except -1:
    """Write the aux field of a fixed-size value (3 + AUX_FIXED[typ] bytes) at
    ``out``; values that do not fit raise as pysam's conversions do
    (OverflowError; TypeError for what is not a number)."""
    cdef float f
    cdef int64_t x
    if typ == b'f':
        f = value
        memcpy(out + 3, &f, 4)
    else:
        x = value  # (a float is truncated, as by pysam)
        low, high, name = _INT_RANGES[typ]
        if x < low:
            raise OverflowError(f"can't convert negative value to {name}" if low == 0 else
                                f"value too small to convert to {name}")
        if x > high:
            raise OverflowError(f"value too large to convert to {name}")
        memcpy(out + 3, &x, AUX_FIXED[typ])  # little-endian: the low bytes
    out[0] = code & 0xFF
    out[1] = code >> 8
    out[2] = typ
    return 0


cdef bytes encode_array(uint16_t code, object value):
    """A B-array aux field from an array.array (its typecode decides) or a
    list/tuple (pysam's rule: the smallest integer type holding its range,
    or f when its smallest element is a float)."""
    cdef str sub
    cdef object low, high
    if isinstance(value, _array_module.array):
        sub = _SUBTYPE_OF_ARRAY.get(value.typecode)
        if sub is None:
            raise ValueError(f"unsupported type code '{value.typecode}'")
        data = value.tobytes()
        count = len(value)
    else:
        if len(value) == 0:
            raise ValueError("min() arg is an empty sequence")
        low = min(value)
        high = max(value)
        if isinstance(low, float):
            sub = "f"
        elif isinstance(low, int):
            if low < 0:
                sub = "c" if low >= -128 and high <= 127 else "s" if low >= -32768 and high <= 32767 else "i"
                if low < INT32_MIN or high > INT32_MAX:
                    raise ValueError("at least one signed integer out of range of BAM/SAM specification")
            else:
                sub = "C" if high <= 255 else "S" if high <= 65535 else "I" if high <= UINT32_MAX else ""
                if not sub:
                    raise ValueError("at least one integer out of range of BAM/SAM specification")
        else:
            raise ValueError(f"invalid value type for a B array: {type(low).__name__}")
        data = _array_module.array(ARRAY_TYPECODE[ord(sub)].to_bytes(1, "little").decode(), value).tobytes()
        count = len(value)
    if count > UINT32_MAX:
        raise ValueError("a B array holds at most 2**32 - 1 values")
    return (tag_name(code).encode("latin-1") + b"B" + sub.encode() + (<uint32_t> count).to_bytes(4, "little")
            + data)


# -- the header and the source of records ----------------------------------------------------

def _bgzf_stored(bytes data):
    """``data`` as a small BGZF file (deflate level 1 blocks, then the EOF
    block): what pysam opens without a warning."""
    import struct
    import zlib

    blocks = []
    for i in range(0, len(data), 0xFF00):
        chunk = data[i:i + 0xFF00]
        packer = zlib.compressobj(1, zlib.DEFLATED, -15)
        body = packer.compress(chunk) + packer.flush()
        blocks.append(b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x06\0BC\x02\0" + struct.pack("<H", len(body) + 25)
                      + body + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
    blocks.append(bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000"))
    return b"".join(blocks)


@cython.final
cdef class RecordHeader:
    """The header of a record stream: its raw bytes, the reference names and
    lengths, and (built when first asked for) the same header as a
    ``pysam.AlignmentHeader``."""
    cdef readonly bytes raw
    cdef readonly str text
    cdef readonly tuple references
    cdef readonly tuple lengths
    cdef readonly int32_t n_ref
    cdef dict _tids
    cdef object _pysam

    def __init__(self, bytes raw not None, str source=""):
        from bamflow.kernels._records import parse_header

        length, text, refs = parse_header(raw, source)
        self.raw = raw[:length]
        self.text = text.rstrip(b"\0").decode("utf-8", "surrogateescape")
        self.references = tuple(name.decode("utf-8", "surrogateescape") for name, _ in refs)
        self.lengths = tuple(n for _, n in refs)
        self.n_ref = len(refs)
        self._tids = None
        self._pysam = None

    cdef str name_of(self, int32_t tid):
        return self.references[tid]

    cpdef int32_t tid_of(self, str name) except -2:
        """The reference id of ``name``, or -1 if the header has no such reference."""
        if self._tids is None:
            self._tids = {n: i for i, n in reversed(list(enumerate(self.references)))}
        return self._tids.get(name, -1)

    @property
    def pysam(self):
        """This header as a ``pysam.AlignmentHeader`` (made once, by pysam
        reading the raw header, as a pysam worker would)."""
        if self._pysam is None:
            import tempfile

            import pysam

            with tempfile.NamedTemporaryFile(suffix=".bam") as f:
                f.write(_bgzf_stored(self.raw))
                f.flush()
                with pysam.AlignmentFile(f.name, "rb", check_sq=False) as bam:
                    self._pysam = bam.header
        return self._pysam

    def __repr__(self):
        return f"RecordHeader({self.n_ref} references)"


@cython.final
cdef class _Source:
    """Where views come from: the reader (whose buffer they point into), the
    header, and the views still alive (borrowed pointers: a view removes
    itself when it dies, and is detached before the buffer is refilled)."""
    cdef RecordReader reader
    cdef RecordHeader header
    cdef PyObject **views
    cdef Py_ssize_t n_views
    cdef Py_ssize_t cap_views
    cdef readonly long long detached      # views copied out before a refill (kept by user code)

    def __cinit__(self):
        self.views = NULL
        self.n_views = self.cap_views = 0

    def __dealloc__(self):
        free(self.views)

    cdef Record view(self, Rec *r):
        """A new view of the checked record ``r`` (in the reader's buffer)."""
        cdef Record rec = Record.__new__(Record)
        cdef PyObject **grown
        cdef Py_ssize_t cap
        if self.n_views == self.cap_views:
            cap = 2 * self.cap_views + 16
            grown = <PyObject **> realloc(self.views, cap * sizeof(PyObject *))
            if grown == NULL:
                raise MemoryError()
            self.views = grown
            self.cap_views = cap
        rec.b = <uint8_t *> r.data
        rec.size = r.size
        rec.src = self
        rec.slot = self.n_views
        self.views[self.n_views] = <PyObject *> rec
        self.n_views += 1
        return rec

    cdef void forget(self, Record rec) noexcept:
        """``rec`` stops being a view (it died, or owns its bytes now)."""
        cdef Py_ssize_t i = rec.slot
        cdef Record last
        self.n_views -= 1
        if i != self.n_views:
            last = <Record> self.views[self.n_views]
            self.views[i] = <PyObject *> last
            last.slot = i
        rec.slot = -1

    cdef int detach_all(self) except -1:
        """Every view still alive copies its bytes: the buffer may be refilled."""
        cdef Record rec
        while self.n_views:
            rec = <Record> self.views[self.n_views - 1]
            rec._own(rec.size)  # forgets the view
            self.detached += 1
        return 0

    cdef int refill(self) except -1:
        """Read more input (the parse said NEED_MORE): views are detached first."""
        self.detach_all()
        self.reader.release()
        self.reader.fill()
        return 0

    cdef int start(self, OutBuf *out) except -1:
        """Read the header (and copy it to ``out``, unless NULL)."""
        self.reader.read_header()
        self.header = RecordHeader(self.reader.header_bytes, self.reader.source)
        if out != NULL:
            out_put(out, <const char *> self.reader.header(), self.reader.header_len)
        self.reader.release()
        return 0


cdef _Source make_source(int fd, object source, bint allow_frames, object progress, Py_ssize_t buffer_size):
    cdef _Source src = _Source()
    src.reader = RecordReader(fd, source, allow_frames, progress, buffer_size, False)
    return src


# -- the record ---------------------------------------------------------------------------------

cdef enum:  # how a CoreField is stored and set
    I32 = 0
    U8 = 1
    U16 = 2
    TID = 3                      # int32, a reference id of the header or -1
    REF_NAME = 4                 # the same field by name (None or "*": -1; "=" for the mate: the read's own)


@cython.final
cdef class CoreField:
    """A fixed field of Record (at ``offset`` in BamCore), read and written in
    place, with pysam's conversions and checks; ``edits``: htslib checks it
    against the CIGAR (see Record._check); ``update_bin``: pysam recomputes
    the bin when it is set."""
    cdef int offset
    cdef int kind
    cdef bint edits
    cdef bint update_bin

    def __cinit__(self, int offset, int kind, bint edits=False, bint update_bin=False):
        self.offset = offset
        self.kind = kind
        self.edits = edits
        self.update_bin = update_bin

    def __get__(self, obj, owner):
        cdef Record rec
        cdef int32_t tid
        if obj is None:
            return self
        rec = <Record?> obj
        if self.kind == U8:
            return rec.b[self.offset]
        if self.kind == U16:
            return u16(rec.b + self.offset)
        if self.kind == REF_NAME:
            tid = <int32_t> u32(rec.b + self.offset)
            return None if tid < 0 else rec.src.header.name_of(tid)
        return <int32_t> u32(rec.b + self.offset)

    def __set__(self, obj, value):
        cdef Record rec = <Record?> obj
        cdef uint8_t *p = rec.b + self.offset
        cdef uint8_t u8
        cdef uint16_t u16v
        cdef int32_t i32
        if self.kind == U8:
            u8 = value
            p[0] = u8
        elif self.kind == U16:
            u16v = value
            memcpy(p, &u16v, 2)
        else:
            if self.kind == REF_NAME:
                i32 = rec._core().refid if (value == "=" and self.offset == 20) else rec._tid_of_name(value)
            elif self.kind == TID:
                i32 = rec._check_tid(value)
            else:
                i32 = value
            memcpy(p, &i32, 4)
        if self.edits:
            rec.edited = True
        if self.update_bin:
            rec._update_bin()


@cython.final
cdef class FlagBit:
    """A flag property of Record (``is_reverse``…), as pysam's: True when the
    bit is set (``inverted``: when it is not); setting ``is_unmapped`` or
    ``is_mapped`` recomputes the bin, as pysam does."""
    cdef uint16_t bit
    cdef bint inverted
    cdef bint update_bin

    def __cinit__(self, uint16_t bit, bint inverted=False, bint update_bin=False):
        self.bit = bit
        self.inverted = inverted
        self.update_bin = update_bin

    def __get__(self, obj, owner):
        if obj is None:
            return self
        return ((<Record?> obj)._core().flag & self.bit != 0) != self.inverted

    def __set__(self, obj, value):
        cdef Record rec = <Record?> obj
        if bool(value) != self.inverted:
            rec._core().flag |= self.bit
        else:
            rec._core().flag &= ~self.bit
        rec.edited = True
        if self.update_bin:
            rec._update_bin()



@cython.final
@cython.no_gc
@cython.freelist(16)
cdef class Record:
    """One BAM record, with pysam's ``AlignedSegment`` names and semantics
    for the common subset (see docs/api.md): decoded when a property is
    read, edited in place, re-serialised only where an edit changes a length.

    Records are made by bamflow's workers (``map_reads``, ``map_reduce``,
    ``bamflow run``) and by :func:`open_records`; ``copy.copy(record)`` gives
    an independent copy. :meth:`to_pysam` gives a ``pysam.AlignedSegment``
    for everything else.
    """
    cdef uint8_t *b              # the record (BamCore first); its block_size is the 4 bytes before
    cdef uint32_t size           # block_size
    cdef uint8_t *mem            # owned memory: block_size + record + room; NULL for a view
    cdef Py_ssize_t cap          # bytes at mem
    cdef _Source src
    cdef Py_ssize_t slot         # index among src's views, -1 when not a view
    cdef bint edited             # a field that htslib checks against another changed (see _check)

    def __init__(self):
        raise TypeError("Records are made by bamflow's workers and open_records(); copy.copy() copies one")

    def __dealloc__(self):
        if self.slot >= 0 and self.src is not None:
            self.src.forget(self)
        free(self.mem)

    # -- memory ------------------------------------------------------------------------

    cdef int _own(self, Py_ssize_t size) except -1:
        """Make the bytes our own, with room for a record of ``size`` bytes."""
        cdef Py_ssize_t cap
        cdef uint8_t *grown
        if size > MAX_RECORD:
            raise ValueError(f"read {self.query_name!r}: the record would be {size} bytes, more than BAM allows "
                             f"({MAX_RECORD})")
        if self.mem != NULL and size + 4 <= self.cap:
            return 0
        cap = size + 4 + (size >> 2) + 64
        if self.mem == NULL:
            grown = <uint8_t *> malloc(cap)
            if grown == NULL:
                raise MemoryError()
            memcpy(grown, self.b - 4, self.size + 4)
            if self.slot >= 0:
                self.src.forget(self)
        else:
            grown = <uint8_t *> realloc(self.mem, cap)
            if grown == NULL:
                raise MemoryError()
        self.mem = grown
        self.cap = cap
        self.b = grown + 4
        return 0

    cdef uint8_t *_splice(self, uint32_t offset, uint32_t old_len, Py_ssize_t new_len) except NULL:
        """Replace ``old_len`` bytes at ``offset`` by room for ``new_len``; returns where they go."""
        cdef Py_ssize_t delta = new_len - <Py_ssize_t> old_len
        cdef Py_ssize_t tail = <Py_ssize_t> self.size - offset - old_len
        if delta > 0:
            self._own(self.size + delta)
        if delta != 0:
            memmove(self.b + offset + new_len, self.b + offset + old_len, tail)
            self.size = <uint32_t> (self.size + delta)
            put_u32(self.b - 4, self.size)
        return self.b + offset

    cdef inline BamCore *_core(self) noexcept:
        return <BamCore *> self.b

    cdef int _check(self) except -1:
        """Raise ValueError if htslib would refuse to read this record back
        (bam_read1: a mapped read whose CIGAR does not consume its sequence):
        called before an edited record is written."""
        cdef uint32_t n
        cdef const uint8_t *ops = self._cigar(&n)
        cdef const BamCore *c = self._core()
        if n > 0 and c.l_seq > 0 and not (c.flag & 4) and cigar_length(ops, n, CONSUMES_QUERY) != c.l_seq:
            raise ValueError(f"read {self.query_name!r} was edited into an invalid record: its CIGAR "
                             f"{self.cigarstring} covers {cigar_length(ops, n, CONSUMES_QUERY)} bases of its {c.l_seq}-base "
                             f"sequence (htslib refuses such records)")
        self.edited = False
        return 0

    cdef inline void _rec(self, Rec *r) noexcept:
        fill_rec(r, self.b, self.size)

    # -- the CIGAR, where it lives ----------------------------------------------------------

    cdef const uint8_t *_long_cigar_tag(self) noexcept:
        """The CG tag holding the real CIGAR (as htslib's bam_tag2cigar reads
        it: a ``<l_seq>S…`` placeholder, mapped, CG:B:I or CG:B:i with at least
        as many operations), or NULL."""
        cdef Rec r
        cdef const BamCore *c = self._core()
        cdef const uint8_t *cg
        cdef uint32_t first, n
        if c.n_cigar == 0 or c.refid < 0 or c.pos < 0:
            return NULL
        self._rec(&r)
        first = u32(self.b + r.cigar)
        if (first & 0xF) != 4 or (first >> 4) != c.l_seq:
            return NULL
        cg = find_tag(&r, 0x4743)  # "CG"
        if cg == NULL or cg[0] != b'B' or not (cg[1] == b'I' or cg[1] == b'i'):
            return NULL
        n = u32(cg + 2)
        if n < c.n_cigar or n >= LONG_CIGAR:
            return NULL
        return cg - 2

    cdef const uint8_t *_cigar(self, uint32_t *n) noexcept:
        """The real CIGAR operations (``n`` of them): in the CIGAR field or the CG tag."""
        cdef const uint8_t *cg = self._long_cigar_tag()
        if cg != NULL:
            n[0] = u32(cg + 4)
            return cg + 8
        n[0] = self._core().n_cigar
        return self.b + FIXED_SIZE + self._core().l_read_name

    cdef int64_t _end(self) noexcept:
        """htslib's bam_endpos."""
        cdef uint32_t n
        cdef const uint8_t *ops
        cdef int64_t rlen = 0
        if not (self._core().flag & 4):
            ops = self._cigar(&n)
            rlen = cigar_length(ops, n, CONSUMES_REF)
        if rlen == 0:
            rlen = 1
        return self._core().pos + rlen

    cdef void _update_bin(self) noexcept:
        """pysam's update_bin: the bin of the alignment (one base when unmapped or without CIGAR)."""
        cdef BamCore *c = self._core()
        cdef uint32_t n
        self._cigar(&n)
        if (c.flag & 4) or n == 0:
            c.bin = <uint16_t> reg2bin(c.pos, <int64_t> c.pos + 1)
        else:
            c.bin = <uint16_t> reg2bin(c.pos, self._end())

    # -- aux fields -------------------------------------------------------------------------

    cdef const uint8_t *_find(self, uint16_t code) noexcept:
        """The type byte of tag ``code`` as pysam sees it (a CG tag holding the CIGAR is hidden), or NULL."""
        cdef Rec r
        cdef const uint8_t *t
        self._rec(&r)
        t = find_tag(&r, code)
        if t != NULL and code == 0x4743 and self._long_cigar_tag() == t - 2:
            return NULL
        return t

    cdef uint32_t _aux_end(self) except? 0:
        """Where a new aux field goes: the end, or before a CG tag holding the
        CIGAR (htslib writes that one last; moved there first if it is not)."""
        cdef const uint8_t *cg = self._long_cigar_tag()
        cdef uint32_t start, length
        cdef bytes field
        if cg == NULL:
            return self.size
        start = <uint32_t> (cg - self.b)
        length = 8 + 4 * u32(cg + 4)
        if start + length != self.size:
            field = (<const char *> cg)[:length]
            self._splice(start, length, 0)
            memcpy(self._splice(self.size, 0, length), <const char *> field, length)
            start = self.size - length
        return start

    cdef int _delete_field(self, const uint8_t *t) except -1:
        """Remove the aux field whose type byte is at ``t``."""
        cdef uint32_t start = <uint32_t> (t - 2 - self.b)
        self._splice(start, <uint32_t> aux_field_size(t - 2, self.b + self.size), 0)
        return 0

    # -- identity ----------------------------------------------------------------------------

    @property
    def query_name(self):
        """The read name (None for an empty name), as pysam."""
        cdef uint8_t l = self._core().l_read_name
        if l <= 1:
            return None
        return decode_text(self.b + FIXED_SIZE, l - 1)

    @query_name.setter
    def query_name(self, name):
        cdef bytes raw
        if name is None or len(name) == 0:
            return
        if len(name) > MAX_NAME:
            raise ValueError(f"query length out of range {len(name)} > {MAX_NAME}")
        raw = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        if len(raw) > MAX_NAME or b"\0" in raw:
            raise ValueError(f"a read name has at most {MAX_NAME} bytes and no NUL: {name!r}")
        cdef uint8_t old = self._core().l_read_name
        cdef uint8_t *p = self._splice(FIXED_SIZE, old, len(raw) + 1)
        memcpy(p, <const char *> raw, len(raw))
        p[len(raw)] = 0
        self._core().l_read_name = <uint8_t> (len(raw) + 1)

    flag = CoreField(14, U16, edits=True)
    reference_id = CoreField(0, TID, edits=True)
    reference_name = CoreField(0, REF_NAME, edits=True)
    reference_start = CoreField(4, I32, edits=True, update_bin=True)
    mapping_quality = CoreField(9, U8)
    next_reference_id = CoreField(20, TID)
    next_reference_name = CoreField(20, REF_NAME)
    next_reference_start = CoreField(24, I32)
    template_length = CoreField(28, I32)
    is_paired = FlagBit(0x1)
    is_proper_pair = FlagBit(0x2)
    is_unmapped = FlagBit(0x4, update_bin=True)
    is_mapped = FlagBit(0x4, inverted=True, update_bin=True)
    mate_is_unmapped = FlagBit(0x8)
    mate_is_mapped = FlagBit(0x8, inverted=True)
    is_reverse = FlagBit(0x10)
    is_forward = FlagBit(0x10, inverted=True)
    mate_is_reverse = FlagBit(0x20)
    mate_is_forward = FlagBit(0x20, inverted=True)
    is_read1 = FlagBit(0x40)
    is_read2 = FlagBit(0x80)
    is_secondary = FlagBit(0x100)
    is_qcfail = FlagBit(0x200)
    is_duplicate = FlagBit(0x400)
    is_supplementary = FlagBit(0x800)

    # -- positions ------------------------------------------------------------------------------

    cdef int32_t _check_tid(self, object tid) except -2:
        cdef int32_t t = tid
        if t != -1 and not (0 <= t < self.src.header.n_ref):
            raise ValueError(f"reference id {t} does not exist in header")
        return t

    cdef int32_t _tid_of_name(self, object name) except -2:
        cdef int32_t t
        if name is None or name == "*":
            return -1
        t = self.src.header.tid_of(name)
        if t < 0:
            raise ValueError(f"reference {name} does not exist in header")
        return t

    @property
    def reference_end(self):
        """One past the last aligned reference base; None when unmapped or without CIGAR."""
        cdef uint32_t n
        self._cigar(&n)
        if (self._core().flag & 4) or n == 0:
            return None
        return self._end()

    @property
    def reference_length(self):
        """reference_end - reference_start; None when unmapped or without CIGAR."""
        end = self.reference_end
        return None if end is None else end - self._core().pos

    @property
    def query_length(self):
        return self._core().l_seq

    # -- CIGAR ----------------------------------------------------------------------------------

    @property
    def cigartuples(self):
        """[(operation, length), …] (pysam's order), or None without CIGAR."""
        cdef uint32_t n, k, v
        cdef const uint8_t *ops = self._cigar(&n)
        if n == 0:
            return None
        cdef list out = [None] * n
        for k in range(n):
            v = u32(ops + 4 * k)
            out[k] = (v & 0xF, v >> 4)
        return out

    @cigartuples.setter
    def cigartuples(self, values):
        cdef list ops = list(values) if values is not None else []
        cdef Py_ssize_t n = len(ops), k
        cdef bytes packed = PyBytes_FromStringAndSize(NULL, 4 * n)
        cdef uint8_t *p = <uint8_t *> PyBytes_AS_STRING(packed)
        cdef uint32_t op, length
        for k in range(n):
            op, length = ops[k]
            if op > 9 or length >= MAX_REF_SPAN:
                raise ValueError(f"bad CIGAR operation {ops[k]!r}: operations are 0-9, lengths below 2**28")
            put_u32(p + 4 * k, (length << 4) | op)
        self._set_cigar(p, n)

    cdef int _set_cigar(self, const uint8_t *ops, Py_ssize_t n) except -1:
        """Store ``n`` operations: in the CIGAR field, or (more than 65,535) as
        htslib writes them, a placeholder and a CG:B:I tag at the end."""
        cdef const uint8_t *cg = self._long_cigar_tag()
        cdef uint32_t cigar_at = FIXED_SIZE + self._core().l_read_name
        cdef int64_t ref_len
        cdef uint8_t placeholder[8]
        cdef uint8_t head[8]
        if n >= LONG_CIGAR:
            raise ValueError(f"a CIGAR of {n} operations is more than BAM can hold")
        if cg != NULL:  # the old CIGAR lived in CG: drop it
            self._splice(<uint32_t> (cg - self.b), 8 + 4 * u32(cg + 4), 0)
        if n <= SHORT_CIGAR:
            memcpy(self._splice(cigar_at, 4 * self._core().n_cigar, 4 * n), ops, 4 * n)
            self._core().n_cigar = <uint16_t> n
        else:
            ref_len = cigar_length(ops, <uint32_t> n, CONSUMES_REF)
            if ref_len >= MAX_REF_SPAN:
                raise ValueError(f"read {self.query_name!r}: a CIGAR of {n} operations spanning {ref_len} "
                                 f"reference bases cannot be stored in BAM")
            put_u32(placeholder, (self._core().l_seq << 4) | 4)
            put_u32(placeholder + 4, (<uint32_t> ref_len << 4) | 3)
            memcpy(self._splice(cigar_at, 4 * self._core().n_cigar, 8), placeholder, 8)
            self._core().n_cigar = 2
            head[0] = b'C'
            head[1] = b'G'
            head[2] = b'B'
            head[3] = b'I'
            put_u32(head + 4, <uint32_t> n)
            memcpy(self._splice(self.size, 0, 8), head, 8)
            memcpy(self._splice(self.size, 0, 4 * n), ops, 4 * n)
        self._update_bin()
        self.edited = True
        return 0

    @property
    def cigarstring(self):
        """The CIGAR as text (``"90M"``), or None without CIGAR."""
        ops = self.cigartuples
        if ops is None:
            return None
        return "".join([f"{length}{chr(CIGAR_LETTERS[op]) if op < 10 else '?'}" for op, length in ops])

    @cigarstring.setter
    def cigarstring(self, cigar):
        if cigar is None or len(cigar) == 0 or cigar == "*":
            self.cigartuples = []
        else:
            self.cigartuples = [("MIDNSHP=XB".index(op), int(length)) for length, op in CIGAR_REGEX.findall(cigar)]

    # -- sequence and qualities ---------------------------------------------------------------------

    @property
    def query_sequence(self):
        """The bases as stored (None without a sequence)."""
        cdef uint32_t l = self._core().l_seq
        cdef Rec r
        cdef uint8_t *out
        if l == 0:
            return None
        self._rec(&r)
        text = ascii_text(l, &out)
        decode_sequence(self.b + r.seq, l, out)
        return text

    @query_sequence.setter
    def query_sequence(self, seq):
        cdef bytes raw
        cdef Py_ssize_t l, k
        cdef Rec r
        cdef uint8_t *p
        cdef const uint8_t *s
        cdef const uint8_t *cg
        if seq is None or len(seq) == 0 or seq == "*":
            raw = b""
        else:
            raw = seq.encode("ascii") if isinstance(seq, str) else bytes(seq)
        l = len(raw)
        if l > MAX_RECORD:
            raise ValueError("sequence too long for BAM")
        cg = self._long_cigar_tag()
        self._rec(&r)
        p = self._splice(r.seq, (self._core().l_seq + 1) // 2 + self._core().l_seq, (l + 1) // 2 + l)
        s = <const uint8_t *> PyBytes_AS_STRING(raw)
        memset(p, 0, (l + 1) // 2)
        for k in range(l):
            p[k >> 1] |= SEQ_NT16[s[k]] << (4 * (1 - (k & 1)))
        memset(p + (l + 1) // 2, 0xFF, l)
        self._core().l_seq = <uint32_t> l
        self.edited = True
        if cg != NULL:  # the placeholder states the read length
            p = self.b + FIXED_SIZE + self._core().l_read_name
            put_u32(p, (<uint32_t> l << 4) | 4)

    cdef const uint8_t *_qualities(self) noexcept:
        """The base qualities, or NULL when there are none (pysam: none when the first is 0xFF)."""
        cdef Rec r
        if self._core().l_seq == 0:
            return NULL
        self._rec(&r)
        return NULL if self.b[r.qual] == 0xFF else self.b + r.qual

    @property
    def query_qualities(self):
        """Base qualities (array('B'), no +33), or None when absent."""
        cdef const uint8_t *q = self._qualities()
        if q == NULL:
            return None
        cdef c_array.array out = c_array.clone(_array_template, self._core().l_seq, False)
        memcpy(out.data.as_voidptr, q, self._core().l_seq)
        return out

    @query_qualities.setter
    def query_qualities(self, values):
        cdef uint32_t l = self._core().l_seq, k = 0
        cdef Rec r
        cdef uint8_t *q
        cdef uint8_t v
        if isinstance(values, str):
            self.query_qualities_str = values
            return
        self._rec(&r)
        q = self.b + r.qual
        cdef Py_ssize_t n = len(values) if values is not None else 0
        if n == 0:
            memset(q, 0xFF, l)
            return
        if n != l:
            raise ValueError(f"quality ({n}) and sequence ({l}) length mismatch")
        if isinstance(values, _array_module.array) and values.typecode == "B":
            memcpy(q, (<c_array.array> values).data.as_voidptr, l)
            return
        cdef bytes staged = PyBytes_FromStringAndSize(NULL, l)
        cdef uint8_t *s = <uint8_t *> PyBytes_AS_STRING(staged)
        for value in values:
            v = value
            s[k] = v
            k += 1
        memcpy(q, s, l)

    @property
    def query_qualities_str(self):
        cdef const uint8_t *q = self._qualities()
        cdef uint32_t k
        cdef uint8_t *out
        if q == NULL:
            return None
        text = ascii_text(self._core().l_seq, &out)
        for k in range(self._core().l_seq):
            out[k] = q[k] + 33
        return text

    @query_qualities_str.setter
    def query_qualities_str(self, text):
        cdef uint32_t l = self._core().l_seq, k
        cdef Rec r
        cdef bytes raw
        self._rec(&r)
        cdef Py_ssize_t n = len(text) if text is not None else 0
        if n == 0 or text == "*":
            memset(self.b + r.qual, 0xFF, l)
            return
        if n != l:
            raise ValueError(f"quality ({n}) and sequence ({l}) length mismatch")
        raw = text.encode("ascii")
        for k in range(l):
            self.b[r.qual + k] = <uint8_t> (raw[k] - 33)

    # -- tags ------------------------------------------------------------------------------------------

    cpdef object get_tag(self, tag, with_value_type=False):
        """The value of ``tag`` (pysam's types); KeyError if absent."""
        cdef uint16_t code
        cdef const uint8_t *t = NULL
        if tag_code_of(tag, &code):
            t = self._find(code)
        if t == NULL:
            raise KeyError(f"tag '{tag}' not present")
        if with_value_type:
            return aux_value(t), aux_type_text(t, True)
        return aux_value(t)

    cpdef bint has_tag(self, tag) except -1:
        cdef uint16_t code
        if not tag_code_of(tag, &code):
            return False
        return self._find(code) != NULL

    def get_tags(self, with_value_type=False):
        """[(tag, value), …] (with the type: (tag, value, type)) in record order."""
        cdef Rec r
        cdef const uint8_t *p
        cdef const uint8_t *end
        cdef const uint8_t *hidden = self._long_cigar_tag()
        cdef list out = []
        self._rec(&r)
        p = self.b + r.aux
        end = self.b + self.size
        while p < end:
            if p != hidden:
                if with_value_type:
                    out.append((tag_name(tag_code(p)), aux_value(p + 2), aux_type_text(p + 2, False)))
                else:
                    out.append((tag_name(tag_code(p)), aux_value(p + 2)))
            p += aux_field_size(p, end)
        return out

    cpdef set_tag(self, tag, value, value_type=None, replace=True):
        """Set ``tag`` to ``value`` as pysam does: the type from ``value_type``
        or from the value (int: the smallest integer type, float: f, str: Z,
        list/tuple/array: B); the tag moves to the end. None deletes it."""
        cdef uint16_t code
        cdef const uint8_t *t
        cdef bytes field = None
        cdef uint8_t fixed[8]
        cdef const uint8_t *data
        cdef Py_ssize_t length
        cdef uint32_t end
        cdef uint8_t typ
        if not tag_code_of(tag, &code):
            raise ValueError(f"Invalid tag: {tag}")
        if code == 0x4743 and self._long_cigar_tag() != NULL:
            raise ValueError(f"read {self.query_name!r} keeps its CIGAR of more than 65,535 operations in the "
                             f"CG tag; set cigartuples instead")
        if value is None:
            if replace:
                t = self._find(code)
                if t != NULL:
                    self._delete_field(t)
            return
        typ = fixed_type(value, value_type)
        if typ:  # an int or a float: encoded here, no Python object
            encode_fixed(fixed, code, value, typ)
            data = fixed
            length = 3 + AUX_FIXED[typ]
        else:
            field = encode_tag(code, value, value_type)
            data = <const uint8_t *> PyBytes_AS_STRING(field)
            length = len(field)
        end = self._aux_end()  # (may move a CG tag: before any pointer is taken)
        if replace:
            t = self._find(code)
            if t != NULL:
                if t - 2 + length == self.b + end and aux_field_size(t - 2, self.b + self.size) == length:
                    memcpy(<uint8_t *> t - 2, data, length)  # the last field, the same size: in place
                    return
                self._delete_field(t)
                end = self._aux_end()
        memcpy(self._splice(end, 0, length), data, length)

    def set_tags(self, tags):
        """Replace every tag by ``tags``: (tag, value) or (tag, value, type) items."""
        cdef Rec r
        cdef bytes fields = b""
        cdef uint16_t code
        cdef const uint8_t *cg = self._long_cigar_tag()
        cdef bytes kept = b"" if cg == NULL else (<const char *> cg)[:8 + 4 * u32(cg + 4)]
        parts = []
        for item in (tags or ()):
            if len(item) == 2:
                name, value = item
                value_type = None
            elif len(item) == 3:
                name, value, value_type = item
            else:
                raise ValueError(f"malformatted tag: {item}")
            if not tag_code_of(name, &code):
                raise ValueError(f"Invalid tag: {name}")
            if value is None:
                continue
            parts.append(encode_tag(code, value, value_type))
        fields = b"".join(parts) + kept
        self._rec(&r)
        memcpy(self._splice(r.aux, self.size - r.aux, len(fields)), <const char *> fields, len(fields))

    # -- the rest, and copies ---------------------------------------------------------------------------

    @property
    def header(self):
        """The header as a ``pysam.AlignmentHeader``."""
        return self.src.header.pysam

    @property
    def record_header(self):
        """The header as bamflow reads it (:class:`RecordHeader`: raw bytes, references)."""
        return self.src.header

    @property
    def is_view(self):
        """True while the record's bytes are in the worker's input buffer (not yet copied)."""
        return self.slot >= 0

    def to_bytes(self):
        """The record as BAM stores it, block_size first."""
        return (<const char *> self.b - 4)[:self.size + 4]

    def __copy__(self):
        cdef Record rec = Record.__new__(Record)
        rec.mem = <uint8_t *> malloc(self.size + 4)
        if rec.mem == NULL:
            raise MemoryError()
        memcpy(rec.mem, self.b - 4, self.size + 4)
        rec.cap = self.size + 4
        rec.b = rec.mem + 4
        rec.size = self.size
        rec.src = self.src
        rec.slot = -1
        rec.edited = self.edited
        return rec

    def __deepcopy__(self, memo):
        return self.__copy__()

    copy = __copy__

    def to_pysam(self):
        """This record as a ``pysam.AlignedSegment`` (a copy: edits to it do not
        change this record), as htslib's bam_read1 would read these bytes."""
        from bamflow.kernels.pysam_bridge import segment_from_parts

        return segment_from_parts(*self.pysam_parts(), self.header)

    def pysam_parts(self):
        """What htslib's bam_read1 makes of these bytes, for building a bam1_t:
        (fixed fields (32 bytes, n_cigar and bin as htslib sets them), read name,
        CIGAR operations, packed sequence and qualities, aux fields without a
        CG tag holding the CIGAR, the number of CIGAR operations)."""
        cdef Rec r
        cdef uint32_t n
        cdef const uint8_t *ops = self._cigar(&n)
        cdef const uint8_t *cg = self._long_cigar_tag()
        cdef BamCore core
        cdef int64_t rlen
        self._rec(&r)
        memcpy(&core, self.b, FIXED_SIZE)
        if n > 0:
            rlen = 0 if (core.flag & 4) else cigar_length(ops, n, CONSUMES_REF)
            core.bin = <uint16_t> reg2bin(core.pos, <int64_t> core.pos + (rlen if rlen else 1))
            if core.l_seq > 0 and not (core.flag & 4) and cigar_length(ops, n, CONSUMES_QUERY) != core.l_seq:
                raise ValueError(f"CIGAR and query sequence lengths differ for {self.query_name}")
        if cg == NULL:
            aux = (<const char *> self.b + r.aux)[:self.size - r.aux]
        else:
            aux = ((<const char *> self.b + r.aux)[:cg - self.b - r.aux]
                   + (<const char *> cg)[8 + 4 * n:self.b + self.size - cg])
        return ((<const char *> &core)[:FIXED_SIZE], (<const char *> self.b + FIXED_SIZE)[:core.l_read_name],
                (<const char *> ops)[:4 * n], (<const char *> self.b + r.seq)[:r.aux - r.seq], aux, n)

    def __getattr__(self, name):
        """pysam's read-only extras (get_aligned_pairs, get_blocks, to_string, …),
        answered by a pysam copy (slower: the copy is made each time)."""
        if name in _DELEGATED:
            return getattr(self.to_pysam(), name)
        raise AttributeError(f"'bamflow.Record' object has no attribute {name!r}")

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        cdef Record o = <Record> other
        return self.size == o.size and memcmp(self.b, o.b, self.size) == 0

    def __hash__(self):
        return hash((<const char *> self.b)[:self.size])

    def __repr__(self):
        ref = self.reference_name if self._core().refid >= 0 else self._core().refid
        return (f"<Record({self.query_name!r}, flags={self.flag}={self.flag:#x}, ref={ref!r}, "
                f"zpos={self.reference_start}, mapq={self.mapping_quality}, cigar={self.cigarstring!r}, ...)>")

    def __str__(self):
        return "\t".join(map(str, (self.query_name, self.flag, self.reference_name or "*",
                                   self.reference_start + 1, self.mapping_quality, self.cigarstring,
                                   self.next_reference_name or "*", self.next_reference_start + 1,
                                   self.template_length, self.query_sequence, self.query_qualities,
                                   self.get_tags())))


_DELEGATED = frozenset({
    "get_aligned_pairs", "get_blocks", "get_reference_positions", "get_overlap", "get_cigar_stats",
    "infer_query_length", "infer_read_length", "get_reference_sequence", "get_forward_sequence",
    "get_forward_qualities", "query_alignment_sequence", "query_alignment_qualities",
    "query_alignment_qualities_str", "query_alignment_start", "query_alignment_end", "query_alignment_length",
    "modified_bases", "modified_bases_forward", "to_string", "tostring", "to_dict", "bin",
})


# -- writing records ---------------------------------------------------------------------------------

ctypedef int (*put_fn)(OutBuf *out, object read) except -1
cdef put_fn put_pysam = NULL  # pysam_bridge's encoder of pysam reads, fetched when first needed


cdef Py_ssize_t put_result(OutBuf *out, object item) except -1:
    """Write one record a user function gave: a Record (its bytes) or a
    pysam.AlignedSegment (as htslib's bam_write1 encodes it). Returns 1."""
    cdef Record rec
    global put_pysam
    if type(item) is Record:
        rec = <Record> item
        if rec.edited:
            rec._check()
        out_put(out, <const char *> rec.b - 4, rec.size + 4)
        return 1
    if type(item).__name__ != "AlignedSegment":
        raise TypeError(f"expected a bamflow.Record or a pysam.AlignedSegment, not {type(item).__name__}")
    if put_pysam == NULL:
        from bamflow.kernels.pysam_bridge import PUT_SEGMENT

        put_pysam = <put_fn> PyCapsule_GetPointer(PUT_SEGMENT, b"bamflow.kernels.pysam_bridge.put_segment")
    put_pysam(out, item)
    return 1


cdef Py_ssize_t put_results(OutBuf *out, object result) except -1:
    """Write what a per-read function returned: a record, None (nothing) or an
    iterable of records. Returns the number of records written."""
    cdef Py_ssize_t n = 0
    if type(result) is Record:
        return put_result(out, result)
    if result is None:
        return 0
    if isinstance(result, (list, tuple)):
        for item in result:
            n += put_result(out, item)
        return n
    if type(result).__name__ == "AlignedSegment":
        return put_result(out, result)
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise TypeError(f"the function returned {type(result).__name__}: expected a bamflow.Record, "
                        f"a pysam.AlignedSegment, None or a list of records")
    for item in result:
        n += put_result(out, item)
    return n


cdef class RecordWriter:
    """A raw BAM stream on ``fd`` (closed by :meth:`close`): the header, then
    the records given to :meth:`write` (``bamflow.Record`` or
    ``pysam.AlignedSegment``) and the chunk-end frames of :meth:`frame`: the
    ``out`` of a ``map_reduce`` function, and the writer of pysam workers
    (``bamflow.kernels.pysam_bridge.RawWriter``)."""
    cdef OutBufs outs
    cdef OutBuf *out
    cdef int fd
    cdef bint closed

    def __cinit__(self, int fd, bytes header not None, Py_ssize_t buffer_size=1 << 20):
        self.fd = fd
        self.outs = OutBufs([fd], buffer_size)
        self.out = &self.outs.bufs[0]
        out_put(self.out, <const char *> header, len(header))

    cpdef int write(self, read) except -1:
        """Append one record; returns 1."""
        if self.closed:
            raise ValueError("write to a closed RecordWriter")
        put_result(self.out, read)
        self.out.records += 1
        return 1

    def frame(self):
        """Mark the end of a chunk (for a collector that restores the input order)."""
        out_put(self.out, FRAME, 4)

    def flush(self):
        out_flush(self.out)

    def close(self):
        """Write what is buffered and close the descriptor."""
        import os

        if not self.closed:
            self.closed = True
            try:
                out_flush(self.out)
            finally:
                os.close(self.fd)

    @property
    def records(self):
        return self.out.records


# -- per-read kernels ---------------------------------------------------------------------------------

cdef class MapRecords:
    """The worker of ``map_reads(record="bamflow")``: reads the raw stream on
    ``in_fd``, calls ``func(record)`` for each record and writes what it
    returns (a Record, a pysam.AlignedSegment, None or a list of them) to
    ``out_fd`` as a raw stream; chunk-end frames pass through."""
    cdef _Source src
    cdef OutBufs outs
    cdef object func

    def __cinit__(self, int in_fd, int out_fd, func, *, source="", progress=None, Py_ssize_t buffer_size=1 << 20,
                  Py_ssize_t out_buffer_size=1 << 20):
        self.src = make_source(in_fd, source, True, progress, buffer_size)
        self.outs = OutBufs([out_fd], out_buffer_size)
        self.func = func

    def run(self):
        """Returns {reads_in, written, dropped_by_function, added, frames, kept_by_function}."""
        cdef Rec r
        cdef int got
        cdef Py_ssize_t n
        cdef long long reads_in = 0, written = 0, dropped = 0, added = 0
        cdef OutBuf *out = &self.outs.bufs[0]
        cdef RecordReader reader = self.src.reader
        cdef object func = self.func
        cdef object result
        self.src.start(out)
        while True:
            got = reader.parse(&r, None, NULL)
            if got == NEED_MORE:
                self.src.refill()
                continue
            if got == STREAM_END:
                break
            if got == GOT_FRAME:
                out_put(out, FRAME, 4)
                continue
            reads_in += 1
            result = func(self.src.view(&r))
            n = put_results(out, result)
            result = None
            written += n
            if n == 0:
                dropped += 1
            elif n > 1:
                added += n - 1
        out_flush(out)
        reader.report()
        return {"reads_in": reads_in, "written": written, "dropped_by_function": dropped, "added": added,
                "frames": reader.frames, "kept_by_function": self.src.detached}


cdef class RecordIterator:
    """The records of the raw stream (or BAM file) on ``fd``, as :class:`Record`
    views: the ``reads`` of a ``map_reduce(record="bamflow")`` function.
    Frames are skipped. ``count``: the records handed out so far."""
    cdef _Source src
    cdef readonly long long count

    def __cinit__(self, int fd, *, source="", progress=None, Py_ssize_t buffer_size=1 << 20, bint frames=True):
        self.src = make_source(fd, source, frames, progress, buffer_size)
        self.src.start(NULL)

    @property
    def header(self):
        """The stream's :class:`RecordHeader`."""
        return self.src.header

    def __iter__(self):
        return self

    def __next__(self):
        cdef Rec r
        cdef int got
        cdef RecordReader reader = self.src.reader
        while True:
            got = reader.parse(&r, None, NULL)
            if got == NEED_MORE:
                self.src.refill()
            elif got == STREAM_END:
                reader.report()
                raise StopIteration
            elif got != GOT_FRAME:
                self.count += 1
                return self.src.view(&r)


def open_records(path, *, source=None):
    """Iterate the records of a BAM file (or raw BAM stream) at ``path`` as
    :class:`Record` objects, checked by the record layer (one thread)."""
    import os

    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        it = RecordIterator(fd, source=f"{os.fspath(path)}: " if source is None else source, frames=False)
    except BaseException:
        os.close(fd)
        raise
    return _ClosingIterator(it, fd)


class _ClosingIterator:
    """An iterator that closes its descriptor at its end (or when collected)."""

    def __init__(self, it, fd):
        self._it = it
        self._fd = fd
        self.header = it.header

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self):
        import os

        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


# -- column batches -------------------------------------------------------------------------------------

@cython.final
cdef class Arena:
    """The bytes of a batch that user code kept (or asked for as ``data``):
    a copy, viewed by numpy through the buffer protocol (read-only)."""
    cdef uint8_t *data
    cdef readonly Py_ssize_t used

    def __cinit__(self, const uint8_t[::1] data not None):
        self.used = data.shape[0]
        self.data = <uint8_t *> malloc(self.used if self.used else 1)
        if self.data == NULL:
            raise MemoryError()
        if self.used:
            memcpy(self.data, &data[0], self.used)

    def __dealloc__(self):
        free(self.data)

    def __len__(self):
        return self.used

    def __getbuffer__(self, Py_buffer *view, int flags):
        view.buf = self.data
        view.obj = self
        view.len = self.used
        view.readonly = 1
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = &self.used
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef const uint8_t *batch_bytes(object source, long long generation) except NULL:
    """The bytes of a batch: its Arena copy, or (while the batch lasts) the kernel's input buffer."""
    cdef BatchKernel kernel
    if type(source) is Arena:
        return (<Arena> source).data
    kernel = <BatchKernel?> source
    if kernel.generation != generation:
        raise RuntimeError("this batch is over (its reads were written and its buffer reused): use a batch "
                           "during the call of func, or keep the arrays taken from it")
    return kernel.reader.buf + kernel.reader.start


cdef struct NewTag:
    uint16_t code
    uint8_t typ                 # BAM type: c C s S i I f Z
    const uint8_t *present      # [n]: set this tag on record i?
    const int64_t *ints         # [n] for the integer types
    const float *floats         # [n] for f
    const uint8_t *strings      # [n, width] NUL-padded, for Z
    Py_ssize_t width


cdef struct Cut:
    uint32_t start
    uint32_t length


cdef class BatchKernel:
    """The worker kernel of ``map_batches``: reads records into batches of
    columns (no Python object per record) and writes the kept records of
    each batch, with new tags, to ``out_fd``.

    ``next_batch(columns…)`` fills the given column arrays (at least
    ``batch_size`` long) with the next batch: up to ``batch_size`` records,
    ending early at a chunk-end frame; returns its size (0: the end). The
    batch's records stay where the reader read them (nothing is copied)
    until ``write_batch(keep, tags)`` has written them and the next batch
    begins; ``copy_batch()`` copies them for a batch that user code keeps.
    ``offsets`` and ``tag_pos`` (the offset of a requested tag's type byte,
    -1 if absent) are relative to the batch's first byte; the tag columns
    are decoded only when asked (:func:`tag_values`, :func:`tag_keys`), from
    ``batch_bytes``.
    """
    cdef RecordReader reader
    cdef OutBufs outs
    cdef Tags tags
    cdef Py_ssize_t batch_size
    cdef readonly Py_ssize_t n              # records in the current batch
    cdef readonly long long generation      # counts batches: a Batch of another generation is over
    cdef int64_t[::1] offsets               # of the current batch's records (n + 1), from its first byte
    cdef bint frame_pending                 # the current batch ended at a frame
    cdef readonly bint ended
    cdef readonly long long reads_in
    cdef readonly long long written
    cdef readonly bytes header

    def __cinit__(self, int in_fd, int out_fd, tags=(), Py_ssize_t batch_size=10000, *, source="",
                  progress=None, Py_ssize_t buffer_size=1 << 22, Py_ssize_t out_buffer_size=1 << 20):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.reader = RecordReader(in_fd, source, True, progress, buffer_size, False)
        self.outs = OutBufs([out_fd], out_buffer_size)
        self.tags = Tags(tags)
        self.batch_size = batch_size

    def start(self):
        """Read the header and write it out; returns it (raw bytes)."""
        self.reader.read_header()
        self.header = self.reader.header_bytes
        out_put(&self.outs.bufs[0], <const char *> self.reader.header(), self.reader.header_len)
        self.reader.release()
        return self.header

    def next_batch(self, uint16_t[::1] flag, int32_t[::1] reference_id, int32_t[::1] reference_start,
                   uint8_t[::1] mapping_quality, int32_t[::1] template_length, int32_t[::1] next_reference_id,
                   int32_t[::1] next_reference_start, int32_t[::1] query_length, int64_t[::1] offsets,
                   int64_t[:, ::1] tag_pos):
        """Fill the columns with the next batch; returns its size (0 at the end)."""
        cdef Rec r
        cdef int got, k
        cdef Py_ssize_t i = 0, at, end = 0
        cdef const uint8_t *start
        cdef const BamCore *c
        cdef const uint8_t *found[MAX_TAGS]
        cdef int n_tags = self.tags.n
        cdef Py_ssize_t limit = self.batch_size
        cdef RecordReader reader = self.reader
        if (flag.shape[0] < limit or reference_id.shape[0] < limit or reference_start.shape[0] < limit
                or mapping_quality.shape[0] < limit or template_length.shape[0] < limit
                or next_reference_id.shape[0] < limit or next_reference_start.shape[0] < limit
                or query_length.shape[0] < limit or offsets.shape[0] < limit + 1
                or tag_pos.shape[0] < n_tags or (n_tags and tag_pos.shape[1] < limit)):
            raise ValueError("next_batch: column arrays shorter than the batch size")
        self.generation += 1
        reader.release()  # the last batch was written (or copied by the Batch that was kept)
        self.frame_pending = False
        while i < limit and not self.ended:
            got = reader.parse(&r, self.tags, found)
            if got == NEED_MORE:
                reader.fill()  # (the batch's records are not released: moved down, or the buffer grows)
                continue
            if got == STREAM_END:
                self.ended = True
                break
            if got == GOT_FRAME:
                if i:  # the chunk ends the batch; its frame follows the batch's records
                    self.frame_pending = True
                    break
                out_put(&self.outs.bufs[0], FRAME, 4)  # the chunk ended with the last batch
                reader.release()
                continue
            start = r.data - 4
            at = start - (reader.buf + reader.start)  # from the batch's first byte
            end = at + 4 + r.size
            c = <const BamCore *> r.data
            flag[i] = c.flag
            reference_id[i] = c.refid
            reference_start[i] = c.pos
            mapping_quality[i] = c.mapq
            template_length[i] = c.tlen
            next_reference_id[i] = c.next_refid
            next_reference_start[i] = c.next_pos
            query_length[i] = c.l_seq
            offsets[i] = at
            for k in range(n_tags):
                tag_pos[k, i] = -1 if found[k] == NULL else at + (found[k] - start)
            i += 1
        offsets[i] = end
        self.offsets = offsets
        self.n = i
        self.reads_in += i
        return i

    def copy_batch(self):
        """A copy of the current batch's bytes (an Arena), for a Batch kept past its turn."""
        cdef const uint8_t *base = self.reader.buf + self.reader.start
        if self.n == 0:
            return Arena(b"")
        return Arena(<const uint8_t[:self.offsets[self.n]]> base)

    def write_batch(self, const uint8_t[::1] keep, list new_tags):
        """Write the records of the current batch whose ``keep`` is nonzero (all,
        with ``keep`` None), each with the tags of ``new_tags`` set: a list of
        (tag, BAM type, present (uint8[n]), values) where values are int64[n]
        (types c C s S i I), float32[n] (f) or uint8[n, width] (Z: NUL-padded).
        A tag set here replaces the record's first field of that name (the
        new field goes at the end, as pysam's set_tag). Then the frame that
        ended the batch, if any. Returns the records written."""
        cdef Py_ssize_t i, run_start = -1, n = self.n, written = 0
        cdef OutBuf *out = &self.outs.bufs[0]
        cdef const uint8_t *a = self.reader.buf + self.reader.start
        if keep is not None and keep.shape[0] != n:
            raise ValueError(f"the keep mask has {keep.shape[0]} entries for a batch of {n} records")
        if n and not new_tags:
            for i in range(n + 1):
                if i < n and (keep is None or keep[i]):
                    if run_start < 0:
                        run_start = i
                    written += 1
                elif run_start >= 0:  # a run of kept records: one copy
                    out_put(out, <const char *> a + self.offsets[run_start],
                            self.offsets[i] - self.offsets[run_start])
                    run_start = -1
        elif n:
            written = self._write_with_tags(keep, new_tags)
        if self.frame_pending:
            out_put(out, FRAME, 4)
            self.frame_pending = False
        self.written += written
        out.records += written
        return written

    cdef Py_ssize_t _write_with_tags(self, const uint8_t[::1] keep, list new_tags) except -1:
        cdef NewTag specs[MAX_TAGS]
        cdef Cut cuts[MAX_TAGS]
        cdef Cut swap
        cdef Py_ssize_t i, k, j, n = self.n, written = 0, n_new = len(new_tags), slen
        cdef int n_cuts
        cdef OutBuf *out = &self.outs.bufs[0]
        cdef const uint8_t *rec
        cdef const uint8_t *t
        cdef const uint8_t *s
        cdef uint32_t size, new_size, at
        cdef Rec r
        cdef uint8_t head[4]
        cdef const uint8_t[::1] present
        cdef const int64_t[::1] ints
        cdef const float[::1] floats
        cdef const uint8_t[:, ::1] strings
        cdef list keep_alive = []
        if n_new > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} new tags per batch")
        for k in range(n_new):
            name, typ_text, present_col, values = new_tags[k]
            if not tag_code_of(name, &specs[k].code):
                raise ValueError(f"Invalid tag: {name}")
            specs[k].typ = ord(typ_text)
            present = present_col
            if present.shape[0] != n:
                raise ValueError(f"tag {name}: {present.shape[0]} values for a batch of {n} records")
            specs[k].present = &present[0]
            keep_alive.append(present)
            if specs[k].typ == b'Z':
                strings = values
                if strings.shape[0] != n:
                    raise ValueError(f"tag {name}: {strings.shape[0]} values for a batch of {n} records")
                specs[k].width = strings.shape[1]
                specs[k].strings = &strings[0, 0] if strings.shape[1] else NULL
                keep_alive.append(strings)
            elif specs[k].typ == b'f':
                floats = values
                if floats.shape[0] != n:
                    raise ValueError(f"tag {name}: {floats.shape[0]} values for a batch of {n} records")
                specs[k].floats = &floats[0]
                keep_alive.append(floats)
            elif AUX_FIXED[specs[k].typ] > 0 and specs[k].typ != b'A':
                ints = values
                if ints.shape[0] != n:
                    raise ValueError(f"tag {name}: {ints.shape[0]} values for a batch of {n} records")
                specs[k].ints = &ints[0]
                keep_alive.append(ints)
            else:
                raise ValueError(f"tag {name}: type {typ_text!r} cannot be set from a column")
        for i in range(n):
            if keep is not None and not keep[i]:
                continue
            rec = self.reader.buf + self.reader.start + self.offsets[i] + 4
            size = u32(rec - 4)
            fill_rec(&r, rec, size)
            new_size = size
            n_cuts = 0
            for k in range(n_new):  # the fields replaced: cut them (once each), in record order
                if not specs[k].present[i]:
                    continue
                t = find_tag(&r, specs[k].code)
                if t != NULL:
                    at = <uint32_t> (t - 2 - rec)
                    for j in range(n_cuts):
                        if cuts[j].start == at:
                            break
                    else:
                        cuts[n_cuts].start = at
                        cuts[n_cuts].length = <uint32_t> aux_field_size(t - 2, rec + size)
                        new_size -= cuts[n_cuts].length
                        j = n_cuts
                        while j > 0 and cuts[j - 1].start > cuts[j].start:
                            swap = cuts[j - 1]
                            cuts[j - 1] = cuts[j]
                            cuts[j] = swap
                            j -= 1
                        n_cuts += 1
                if specs[k].typ == b'Z':
                    new_size += 4 + _padded_length(specs[k].strings, i, specs[k].width)
                else:
                    new_size += 3 + AUX_FIXED[specs[k].typ]
            if new_size > MAX_RECORD:
                raise ValueError(f"record {i} of the batch would be {new_size} bytes, more than BAM allows")
            put_u32(head, new_size)
            out_put(out, <const char *> head, 4)
            at = 0
            for j in range(n_cuts):
                out_put(out, <const char *> rec + at, cuts[j].start - at)
                at = cuts[j].start + cuts[j].length
            out_put(out, <const char *> rec + at, size - at)
            for k in range(n_new):
                if not specs[k].present[i]:
                    continue
                head[0] = specs[k].code & 0xFF
                head[1] = specs[k].code >> 8
                head[2] = specs[k].typ
                out_put(out, <const char *> head, 3)
                if specs[k].typ == b'Z':
                    slen = _padded_length(specs[k].strings, i, specs[k].width)
                    if slen:
                        out_put(out, <const char *> specs[k].strings + i * specs[k].width, slen)
                    out_put(out, "\0", 1)
                elif specs[k].typ == b'f':
                    out_put(out, <const char *> &specs[k].floats[i], 4)
                else:  # little-endian: the low bytes of the int64 first
                    out_put(out, <const char *> &specs[k].ints[i], AUX_FIXED[specs[k].typ])
            written += 1
        return written

    def finish(self):
        """Flush the output; returns {reads_in, written, frames}."""
        out_flush(&self.outs.bufs[0])
        self.reader.report()
        return {"reads_in": self.reads_in, "written": self.written, "frames": self.reader.frames}


cdef inline Py_ssize_t _padded_length(const uint8_t *strings, Py_ssize_t i, Py_ssize_t width) noexcept nogil:
    """Length of row i of a NUL-padded string column."""
    cdef Py_ssize_t l = 0
    cdef const uint8_t *s
    if width == 0:
        return 0
    s = strings + i * width
    while l < width and s[l] != 0:
        l += 1
    return l


# -- decoding columns of a batch (called once per batch and column) -------------------------------------

def tag_values(source, long long generation, const int64_t[::1] pos, int64_t[::1] ints, double[::1] floats,
               uint8_t[::1] kinds):
    """Decode a tag column: for each record, ``kinds`` is 0 (absent), 1
    (integer: ``ints``), 2 (float f: ``floats``), 3 (string Z/H/A), 4 (B array).
    Returns the longest string (for sizing a string column)."""
    cdef Py_ssize_t i, n = pos.shape[0], longest = 0, l
    cdef const uint8_t *t
    cdef uint8_t typ
    cdef float f
    cdef int64_t x
    cdef const uint8_t *data = batch_bytes(source, generation)
    if ints.shape[0] < n or floats.shape[0] < n or kinds.shape[0] < n:
        raise ValueError("tag_values: output columns shorter than the tag column")
    for i in range(n):
        if pos[i] < 0:
            kinds[i] = 0
            ints[i] = 0
            floats[i] = 0
            continue
        t = data + pos[i]
        typ = t[0]
        ints[i] = 0
        floats[i] = 0
        if typ == b'c':
            ints[i] = <int8_t> t[1]
        elif typ == b'C':
            ints[i] = t[1]
        elif typ == b's':
            ints[i] = <int16_t> u16(t + 1)
        elif typ == b'S':
            ints[i] = u16(t + 1)
        elif typ == b'i':
            ints[i] = <int32_t> u32(t + 1)
        elif typ == b'I':
            ints[i] = u32(t + 1)
        elif typ == b'f':
            memcpy(&f, t + 1, 4)
            floats[i] = f
            kinds[i] = 2
            continue
        elif typ == b'A':
            kinds[i] = 3
            if longest < 1:
                longest = 1
            continue
        elif typ == b'Z' or typ == b'H':
            kinds[i] = 3
            l = 0
            while t[1 + l] != 0:
                l += 1
            if l > longest:
                longest = l
            continue
        else:
            kinds[i] = 4
            continue
        kinds[i] = 1
    for i in range(n):  # an integer as text: its decimal digits (and sign)
        if kinds[i] == 1:
            l = 1 + (ints[i] < 0)
            x = ints[i] if ints[i] >= 0 else -ints[i]
            while x >= 10:
                x //= 10
                l += 1
            if l > longest:
                longest = l
    return longest


def tag_keys(source, long long generation, const int64_t[::1] pos, uint8_t[:, ::1] text=None,
             ValueTable table=None, uint8_t[::1] hits=None):
    """The canonical values of a tag column (bamflow's one rule: strings as
    they are, integers in decimal; absent or empty: none), into the rows of
    ``text`` (zero-filled, wide enough: see :func:`tag_values`), and/or
    looked up in ``table``: ``hits[i]`` = 1 if record i's value is in it.
    Floats and arrays raise ValueError (they are not keys)."""
    cdef Py_ssize_t i, n = pos.shape[0]
    cdef Scratch key
    cdef int got
    cdef const uint8_t *data = batch_bytes(source, generation)
    if (text is not None and text.shape[0] < n) or (table is not None and (hits is None or hits.shape[0] < n)):
        raise ValueError("tag_keys: outputs shorter than the tag column")
    key.data = NULL
    key.used = key.cap = 0
    try:
        for i in range(n):
            if hits is not None:
                hits[i] = 0
            if pos[i] < 0:
                continue
            key.used = 0
            got = tag_key(&key, data + pos[i])
            if got == KEY_FOUND:
                if text is not None:
                    if key.used > text.shape[1]:
                        raise ValueError("tag_keys: the text column is too narrow")
                    memcpy(&text[i, 0], key.data, key.used)
                if table is not None:
                    hits[i] = table.lookup(key.data, key.used) >= 0
            elif got != 0:
                raise ValueError(f"record {i} of the batch: a float or array tag value is not a key")
    finally:
        scratch_free(&key)


def name_column(source, long long generation, const int64_t[::1] offsets, Py_ssize_t n):
    """(concatenated read names, offsets[n + 1]) of the batch's records."""
    cdef Py_ssize_t i, total = 0, at = 0
    cdef const uint8_t *rec
    cdef const uint8_t *data = batch_bytes(source, generation)
    for i in range(n):
        total += data[offsets[i] + 4 + 8] - 1
    cdef bytes buf = PyBytes_FromStringAndSize(NULL, total)
    cdef char *p = PyBytes_AS_STRING(buf)
    cdef c_array.array starts = c_array.clone(_array_module.array("q"), n + 1, False)
    cdef int64_t *o = <int64_t *> starts.data.as_voidptr
    cdef Py_ssize_t l
    for i in range(n):
        rec = data + offsets[i] + 4
        l = rec[8] - 1
        o[i] = at
        memcpy(p + at, rec + FIXED_SIZE, l)
        at += l
    o[n] = at
    return buf, starts


def sequence_column(source, long long generation, const int64_t[::1] offsets, Py_ssize_t n):
    """(concatenated decoded sequences, offsets[n + 1]) of the batch's records."""
    cdef Py_ssize_t i, total = 0, at = 0
    cdef const uint8_t *rec
    cdef Rec r
    cdef uint32_t l
    cdef const uint8_t *data = batch_bytes(source, generation)
    for i in range(n):
        total += u32(data + offsets[i] + 4 + 16)
    cdef bytes buf = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t *p = <uint8_t *> PyBytes_AS_STRING(buf)
    cdef c_array.array starts = c_array.clone(_array_module.array("q"), n + 1, False)
    cdef int64_t *o = <int64_t *> starts.data.as_voidptr
    for i in range(n):
        rec = data + offsets[i] + 4
        fill_rec(&r, rec, u32(rec - 4))
        l = (<const BamCore *> rec).l_seq
        o[i] = at
        decode_sequence(rec + r.seq, l, p + at)
        at += l
    o[n] = at
    return buf, starts
