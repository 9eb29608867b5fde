# cython: language_level=3
"""The bridge between pysam's records and bamflow's raw record streams.

A worker that hands reads to user code as ``pysam.AlignedSegment`` objects
writes what the code returns with :class:`RawWriter`: straight from the
record's ``bam1_t`` to a raw BAM stream (what htslib's ``bam_write1`` writes,
without BGZF), so that the worker's output is ordinary bamflow stream data:
it can carry chunk-end frames, and nothing sits in an htslib buffer that a
collector would wait for. RawWriter is bamflow.kernels.record's
RecordWriter, which also takes bamflow.Records: it encodes a pysam read with
this module's ``put_segment`` (behind the ``PUT_SEGMENT`` capsule).
:func:`segment_from_parts` builds a pysam read the way htslib's ``bam_read1``
would from a record's bytes (``bamflow.Record.to_pysam``).
"""

from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport INT32_MAX, INT32_MIN, int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport realloc
from libc.string cimport memcpy, memset

from pysam.libcalignedsegment cimport AlignedSegment
from pysam.libcalignmentfile cimport AlignmentHeader
from pysam.libchtslib cimport bam1_core_t, bam1_t

from bamflow.kernels._io cimport OutBuf, out_put
from bamflow.kernels._records cimport put_u32, u32

cdef inline int64_t _ref_length(const uint32_t *cigar, uint32_t n) noexcept nogil:
    cdef int64_t length = 0
    cdef uint32_t i, op
    for i in range(n):
        op = cigar[i] & 0xF
        if op == 0 or op == 2 or op == 3 or op == 7 or op == 8:  # M D N = X
            length += cigar[i] >> 4
    return length


cdef inline uint32_t _block_size(const bam1_t *b) noexcept nogil:
    """block_size of the record as bam_write1 writes it."""
    cdef uint32_t size = <uint32_t> b.l_data - b.core.l_extranul + 32
    if b.core.n_cigar > 0xFFFF:
        size += 16  # CG:B:I + count, and the two-operation placeholder CIGAR
    return size


cdef int put_segment(OutBuf *out, AlignedSegment read) except -1:
    """Stage one record in ``out``, as htslib's bam_write1 encodes it: the
    read name without its NUL padding (l_extranul), and a CIGAR of more than
    65,535 operations as a ``<l_seq>S<ref_len>N`` placeholder plus a CG:B:I
    tag at the end."""
    cdef bam1_t *b = read._delegate
    cdef const bam1_core_t *c = &b.core
    cdef uint8_t fixed[36]
    cdef uint32_t name_len = c.l_qname - c.l_extranul
    cdef uint32_t cigar_start, cigar_end
    cdef int64_t ref_len
    cdef bint long_cigar = c.n_cigar > 0xFFFF
    cdef uint8_t fake[8]
    cdef uint8_t cg[8]
    if name_len > 255:
        raise ValueError(f"read name {read.query_name!r} is longer than 254 characters")
    if c.pos > INT32_MAX or c.mpos > INT32_MAX or c.isize < INT32_MIN or c.isize > INT32_MAX:
        raise ValueError(f"read {read.query_name!r}: positional data is too large for BAM")
    put_u32(fixed, _block_size(b))
    put_u32(fixed + 4, <uint32_t> c.tid)
    put_u32(fixed + 8, <uint32_t> c.pos)
    put_u32(fixed + 12, (<uint32_t> c.bin << 16) | (<uint32_t> c.qual << 8) | name_len)
    put_u32(fixed + 16, (<uint32_t> c.flag << 16) | (2 if long_cigar else c.n_cigar))
    put_u32(fixed + 20, <uint32_t> c.l_qseq)
    put_u32(fixed + 24, <uint32_t> c.mtid)
    put_u32(fixed + 28, <uint32_t> c.mpos)
    put_u32(fixed + 32, <uint32_t> c.isize)
    out_put(out, <const char *> fixed, 36)
    out_put(out, <const char *> b.data, name_len)
    if not long_cigar:
        out_put(out, <const char *> b.data + c.l_qname, b.l_data - c.l_qname)
    else:
        cigar_start = c.l_qname
        cigar_end = cigar_start + 4 * c.n_cigar
        ref_len = _ref_length(<const uint32_t *> (b.data + cigar_start), c.n_cigar)
        if ref_len >= 1 << 28:
            raise ValueError(f"read {read.query_name!r}: a CIGAR of reference length {ref_len} cannot be stored")
        put_u32(fake, (<uint32_t> c.l_qseq << 4) | 4)           # <read length>S
        put_u32(fake + 4, (<uint32_t> ref_len << 4) | 3)        # <reference length>N
        out_put(out, <const char *> fake, 8)
        out_put(out, <const char *> b.data + cigar_end, b.l_data - cigar_end)
        cg[0] = b'C'
        cg[1] = b'G'
        cg[2] = b'B'
        cg[3] = b'I'
        put_u32(cg + 4, c.n_cigar)
        out_put(out, <const char *> cg, 8)
        out_put(out, <const char *> b.data + cigar_start, 4 * c.n_cigar)
    return 0


cdef int put_pysam(OutBuf *out, object read) except -1:
    """put_segment for any object: TypeError unless it is a pysam.AlignedSegment."""
    return put_segment(out, <AlignedSegment?> read)


#: put_pysam for bamflow.kernels.record's writers (a C function behind a capsule)
PUT_SEGMENT = PyCapsule_New(<void *> put_pysam, b"bamflow.kernels.pysam_bridge.put_segment", NULL)


def segment_from_parts(bytes core not None, bytes name not None, bytes cigar not None, bytes seq_qual not None,
                       bytes aux not None, uint32_t n_cigar, AlignmentHeader header):
    """A pysam AlignedSegment built the way htslib's bam_read1 builds its
    bam1_t (bamflow.Record.to_pysam): the fixed fields (32 bytes of BAM), the
    read name (NUL included; padded with NULs to a multiple of 4, the
    l_extranul), the CIGAR operations (all of them: a CIGAR of more than
    65,535 operations already taken from the CG tag), sequence and
    qualities, and the aux fields."""
    cdef const uint8_t *f = <const uint8_t *> core
    cdef uint32_t l_name = len(name), extranul, l_data
    cdef AlignedSegment seg
    cdef bam1_t *b
    cdef uint8_t *data
    if len(core) != 32 or l_name < 1 or l_name > 255:
        raise ValueError("segment_from_parts: bad fixed fields or read name")
    extranul = (4 - l_name % 4) % 4
    l_data = l_name + extranul + len(cigar) + len(seq_qual) + len(aux)
    seg = AlignedSegment(header)
    b = seg._delegate
    data = <uint8_t *> realloc(b.data, l_data if l_data else 1)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.m_data = l_data if l_data else 1
    b.l_data = l_data
    b.core.tid = <int32_t> u32(f)
    b.core.pos = <int32_t> u32(f + 4)
    b.core.l_qname = l_name + extranul
    b.core.l_extranul = extranul
    b.core.qual = f[9]
    b.core.bin = f[10] | (f[11] << 8)
    b.core.n_cigar = n_cigar
    b.core.flag = f[14] | (f[15] << 8)
    b.core.l_qseq = <int32_t> u32(f + 16)
    b.core.mtid = <int32_t> u32(f + 20)
    b.core.mpos = <int32_t> u32(f + 24)
    b.core.isize = <int32_t> u32(f + 28)
    memcpy(data, <const char *> name, l_name)
    memset(data + l_name, 0, extranul)
    data += l_name + extranul
    memcpy(data, <const char *> cigar, len(cigar))
    data += len(cigar)
    memcpy(data, <const char *> seq_qual, len(seq_qual))
    data += len(seq_qual)
    memcpy(data, <const char *> aux, len(aux))
    return seg


# The writer of raw record streams: pysam reads (through PUT_SEGMENT) and
# bamflow.Records alike, chunk-end frames, buffered, closed by close().
from bamflow.kernels.record import RecordWriter as RawWriter  # noqa: E402
