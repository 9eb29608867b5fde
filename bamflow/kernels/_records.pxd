# cython: language_level=3
# The one BAM record layer of the kernels (SAM specification section 4.2),
# defined in _records.pyx and cimported by bam.pyx, select.pyx and presets.pyx:
#
# - BamCore: the fixed fields of a record, by name (no byte offsets elsewhere);
# - RecordReader: the one "next record" routine. It reads a raw BAM stream
#   (or BGZF around one, unwrapped by the one BGZF block reader, _bgzf) from a
#   file descriptor, parses its header, and returns records only after
#   checking block_size (>= 32, at most MAX_RECORD), the variable-length
#   fields against it (before any buffer grows to it), refID and mate refID
#   against the reference list, the read name, and every aux value;
# - the one aux walker (aux_value_size) and the one canonical rule for a tag
#   value used as a key (tag_key);
# - ValueTable: the one hash table of tag values (sets, maps to outputs, counts).
#
# The tiny helpers are here in full (``cdef inline``: compiled into each
# kernel); the rest is called through Cython's C-API capsule.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    FIXED_SIZE = 32              # bytes of BamCore
    MAX_RECORD = 1 << 28         # a block_size above 256 MiB is taken as corrupt
    MAX_HEADER_TEXT = 1 << 30    # l_text above 1 GiB: corrupt
    MAX_REFERENCES = 1 << 26     # n_ref above 67 M: corrupt
    MAX_TAGS = 16

# what RecordReader.parse/next return
cdef enum:
    NEED_MORE = -1
    STREAM_END = 0
    GOT_RECORD = 1
    GOT_FRAME = 2                # a chunk-end frame: block_size 0 (see bamflow/bam/stages.py)

# what tag_key returns besides an error
cdef enum:
    KEY_MISSING = 0              # the tag is absent, or an empty string
    KEY_FOUND = 1
    KEY_BAD_TYPE = -2            # f or B: not a key


cdef packed struct BamCore:
    int32_t refid
    int32_t pos
    uint8_t l_read_name
    uint8_t mapq
    uint16_t bin
    uint16_t n_cigar
    uint16_t flag
    uint32_t l_seq
    int32_t next_refid
    int32_t next_pos
    int32_t tlen


cdef struct Rec:
    const uint8_t *data          # the record after its block_size: BamCore, name, cigar, seq, qual, aux
    uint32_t size                # block_size
    uint32_t cigar               # offsets of the variable-length fields in data
    uint32_t seq
    uint32_t qual
    uint32_t aux


cdef inline const BamCore *core_of(const uint8_t *data) noexcept nogil:
    return <const BamCore *> data


cdef inline uint32_t u32(const uint8_t *p) noexcept nogil:
    return <uint32_t> p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16) | (<uint32_t> p[3] << 24)


cdef inline uint16_t u16(const uint8_t *p) noexcept nogil:
    return <uint16_t> (p[0] | (p[1] << 8))


cdef inline void put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint16_t tag_code(const uint8_t *p) noexcept nogil:
    return <uint16_t> (p[0] | (p[1] << 8))


cdef str read_name(const Rec *r)
cdef str tag_text(uint16_t code)
cdef str describe(object source, long long index, const Rec *r)


# -- growable scratch bytes ------------------------------------------------------------

cdef struct Scratch:
    uint8_t *data
    Py_ssize_t used
    Py_ssize_t cap

cdef int scratch_reserve(Scratch *s, Py_ssize_t more) except -1
cdef int scratch_put(Scratch *s, const void *data, Py_ssize_t n) except -1
cdef int scratch_put_decimal(Scratch *s, int64_t v) except -1
cdef void scratch_free(Scratch *s) noexcept


# -- aux values --------------------------------------------------------------------------

cdef Py_ssize_t aux_value_size(const uint8_t *tv, const uint8_t *end) noexcept nogil
cdef int tag_key(Scratch *out, const uint8_t *tv) except -3
cdef const uint8_t *find_tag(const Rec *r, uint16_t code) noexcept nogil


cdef class Tags:
    """Up to MAX_TAGS two-character tag names (already validated by the BAM layer)."""
    cdef uint16_t codes[MAX_TAGS]
    cdef readonly int n
    cdef readonly tuple names
    cdef int key_of(self, Scratch *out, const uint8_t **found, object source, long long index,
                    const Rec *r) except -1


# -- the stream ----------------------------------------------------------------------------

cdef struct HdrState:
    Py_ssize_t off
    Py_ssize_t need
    int stage
    int32_t n_ref
    int32_t refs_done


cdef class RecordReader:
    cdef int fd
    cdef object source              # prefix of messages, e.g. "in.bam: " or "input 2: "
    cdef uint8_t *buf
    cdef Py_ssize_t cap
    cdef Py_ssize_t start           # first byte not yet released
    cdef Py_ssize_t pos             # parse cursor (start <= pos <= end)
    cdef Py_ssize_t end
    cdef Py_ssize_t need            # bytes wanted at pos when parse said NEED_MORE
    cdef bint eof
    cdef bint allow_frames
    # BGZF around the stream (pysam writes uncompressed BAM as BGZF level 0)
    cdef bint sniffed
    cdef bint bgzf
    cdef uint8_t *wire
    cdef Py_ssize_t wcap
    cdef Py_ssize_t wstart
    cdef Py_ssize_t wend
    cdef Py_ssize_t wneed
    cdef bint wire_eof
    cdef long long wire_offset
    cdef long long blocks
    cdef bint last_empty
    # header
    cdef HdrState hdr
    cdef readonly bint header_done
    cdef readonly Py_ssize_t header_len
    cdef readonly int32_t n_ref
    cdef bytes header_copy
    # counts
    cdef readonly long long records
    cdef readonly long long frames
    cdef readonly long long bytes_read
    cdef uint8_t *seen_tags          # a bit per tag code seen on any record, or NULL
    cdef long long *progress        # records, bytes read, -, backlog (a bamflow.progress slot) or NULL
    cdef object progress_owner

    cdef Py_ssize_t fill(self) except -1
    cdef int parse_header(self) except -1
    cdef int read_header(self) except -1
    cdef const uint8_t *header(self) noexcept
    cdef int parse(self, Rec *r, Tags want, const uint8_t **found) except -2
    cdef int next(self, Rec *r, Tags want, const uint8_t **found) except -2
    cdef void release(self) noexcept
    cdef int at_end(self) except -1
    cdef void report(self) noexcept
    cdef int _attach(self, long long[::1] slot) except -1
    cdef int _switch_to_bgzf(self) except -1
    cdef Py_ssize_t _fill_wire(self) except -1
    cdef int _unwrap(self) except -1
    cdef int _walk_aux(self, const Rec *r, Tags want, const uint8_t **found, long long index) except -1
    cdef int _aux_error(self, const Rec *r, const uint8_t *p, long long index) except -1


# -- the hash table of tag values ----------------------------------------------------------

cdef struct Slot:
    uint64_t hash
    Py_ssize_t off                  # of the key in the arena; -1: empty slot
    Py_ssize_t length
    int32_t out
    long long count


cdef class ValueTable:
    cdef Slot *slots
    cdef Py_ssize_t cap
    cdef readonly Py_ssize_t n
    cdef uint8_t *arena
    cdef Py_ssize_t arena_used
    cdef Py_ssize_t arena_cap
    cdef Py_ssize_t *order          # slot of the i-th key added
    cdef Py_ssize_t order_cap

    cdef Py_ssize_t find(self, const uint8_t *key, Py_ssize_t length, uint64_t h) noexcept
    cdef Py_ssize_t insert(self, const uint8_t *key, Py_ssize_t length, uint64_t h, int32_t out) except -1
    cdef Py_ssize_t lookup(self, const uint8_t *key, Py_ssize_t length) noexcept
    cdef Py_ssize_t tally(self, const uint8_t *key, Py_ssize_t length) except -1
    cdef int _grow(self) except -1
