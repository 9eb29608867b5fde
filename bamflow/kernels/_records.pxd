# cython: language_level=3
# Building blocks shared by the kernels, defined once in _records.pyx and
# cimported by bam.pyx and select.pyx (lines.pyx: the output staging and
# _raise_errno). Structs and the tiny per-byte helpers are here in full
# (``cdef inline``: compiled into each kernel, no call across modules); the
# other functions are declared here with exactly the signatures of their
# definitions in _records.pyx, and are called through Cython's C-API capsule.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t

cdef enum:
    MAX_TAGS = 16


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return <uint32_t> p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16) | (<uint32_t> p[3] << 24)


cdef inline uint16_t _u16(const uint8_t *p) noexcept nogil:
    return <uint16_t> (p[0] | (p[1] << 8))


cdef int _raise_errno(str what) except -1
cdef str _name_of(const uint8_t *rec, uint32_t block_size)


# -- output staging ---------------------------------------------------------------

cdef struct OutBuf:
    int fd
    char *data
    Py_ssize_t used
    Py_ssize_t cap
    long long records
    long long *progress  # a bamflow.progress slot, or NULL

cdef int _flush(OutBuf *o) except -1
cdef int _put(OutBuf *o, const char *data, Py_ssize_t length) except -1
cdef OutBuf *_new_outbufs(list fds, Py_ssize_t cap) except NULL
cdef void _free_outbufs(OutBuf *outs, Py_ssize_t n) noexcept


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

cdef int _init_inbuf(InBuf *ib, int fd, Py_ssize_t cap) except -1
cdef Py_ssize_t _fill(InBuf *ib, Py_ssize_t need) except -1


# -- header parsing (resumable, so that a header arriving byte by byte costs O(n)) --

cdef struct HdrState:
    Py_ssize_t off      # bytes of header parsed so far
    Py_ssize_t need     # bytes (from the header's start) needed for the next step
    int stage           # 0 magic+l_text, 1 n_ref, 2 references, 3 done
    int32_t n_ref
    int32_t refs_done

cdef void _hdr_init(HdrState *st) noexcept
cdef int _hdr_step(HdrState *st, const uint8_t *p, Py_ssize_t n, str where) except -1
cdef int _read_header(InBuf *ib, HdrState *st, str where) except -1


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
                    long long index) except -1

cdef struct Scratch:
    uint8_t *data
    Py_ssize_t used
    Py_ssize_t cap

cdef int _reserve(Scratch *s, Py_ssize_t more) except -1
cdef int _append_canonical(Scratch *s, const uint8_t *tv) except -1
cdef int _parse_tags(object by, uint16_t *tags, list names) except -1
