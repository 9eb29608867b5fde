# cython: language_level=3
"""The bridge between pysam's records and bamflow's raw record streams.

A worker that hands reads to user code as ``pysam.AlignedSegment`` objects
writes what the code returns with :class:`RawWriter`: straight from the
record's ``bam1_t`` to a raw BAM stream (what htslib's ``bam_write1`` writes,
without BGZF), so that the worker's output is ordinary bamflow stream data:
it can carry chunk-end frames, and nothing sits in an htslib buffer that a
collector would wait for.
"""

from libc.stdint cimport INT32_MAX, INT32_MIN, int64_t, uint8_t, uint32_t

from pysam.libcalignedsegment cimport AlignedSegment
from pysam.libchtslib cimport bam1_core_t, bam1_t

from bamflow.kernels._io cimport OutBuf, OutBufs, out_flush, out_put
from bamflow.kernels._records cimport put_u32

# a chunk-end frame (see bamflow.kernels._records)
cdef const char *FRAME = b"\0\0\0\0"


cdef inline int64_t _ref_length(const uint32_t *cigar, uint32_t n) noexcept nogil:
    cdef int64_t length = 0
    cdef uint32_t i, op
    for i in range(n):
        op = cigar[i] & 0xF
        if op == 0 or op == 2 or op == 3 or op == 7 or op == 8:  # M D N = X
            length += cigar[i] >> 4
    return length


cdef class RawWriter:
    """A raw BAM stream on ``fd``: ``header`` (raw header bytes) first, then the
    records given to :meth:`write` and the frames of :meth:`frame`. The
    descriptor is closed by :meth:`close`."""
    cdef OutBufs outs
    cdef OutBuf *out
    cdef int fd
    cdef bint closed

    def __cinit__(self, int fd, bytes header, Py_ssize_t buffer_size=1 << 20):
        self.fd = fd
        self.outs = OutBufs([fd], buffer_size)
        self.out = &self.outs.bufs[0]
        out_put(self.out, <const char *> header, len(header))

    cpdef int write(self, AlignedSegment read) except -1:
        """Append one record, as htslib's bam_write1 encodes it (a CIGAR of
        more than 65,535 operations moves to the CG tag)."""
        cdef bam1_t *b = read._delegate
        cdef const bam1_core_t *c = &b.core
        cdef uint8_t fixed[36]
        cdef uint32_t name_len = c.l_qname - c.l_extranul
        cdef uint32_t block_len = <uint32_t> b.l_data - c.l_extranul + 32
        cdef uint32_t cigar_start, cigar_end
        cdef int64_t ref_len
        cdef bint long_cigar = c.n_cigar > 0xFFFF
        cdef uint8_t fake[8]
        cdef uint8_t cg[8]
        if name_len > 255:
            raise ValueError(f"read name {read.query_name!r} is longer than 254 characters")
        if c.pos > INT32_MAX or c.mpos > INT32_MAX or c.isize < INT32_MIN or c.isize > INT32_MAX:
            raise ValueError(f"read {read.query_name!r}: positional data is too large for BAM")
        if long_cigar:
            block_len += 16  # CG:B:I + count, and the two-operation placeholder CIGAR
        put_u32(fixed, block_len)
        put_u32(fixed + 4, <uint32_t> c.tid)
        put_u32(fixed + 8, <uint32_t> c.pos)
        put_u32(fixed + 12, (<uint32_t> c.bin << 16) | (<uint32_t> c.qual << 8) | name_len)
        put_u32(fixed + 16, (<uint32_t> c.flag << 16) | (2 if long_cigar else c.n_cigar))
        put_u32(fixed + 20, <uint32_t> c.l_qseq)
        put_u32(fixed + 24, <uint32_t> c.mtid)
        put_u32(fixed + 28, <uint32_t> c.mpos)
        put_u32(fixed + 32, <uint32_t> c.isize)
        out_put(self.out, <const char *> fixed, 36)
        out_put(self.out, <const char *> b.data, name_len)
        if not long_cigar:
            out_put(self.out, <const char *> b.data + c.l_qname, b.l_data - c.l_qname)
        else:
            cigar_start = c.l_qname
            cigar_end = cigar_start + 4 * c.n_cigar
            ref_len = _ref_length(<const uint32_t *> (b.data + cigar_start), c.n_cigar)
            if ref_len >= 1 << 28:
                raise ValueError(f"read {read.query_name!r}: a CIGAR of reference length {ref_len} cannot be stored")
            put_u32(fake, (<uint32_t> c.l_qseq << 4) | 4)           # <read length>S
            put_u32(fake + 4, (<uint32_t> ref_len << 4) | 3)        # <reference length>N
            out_put(self.out, <const char *> fake, 8)
            out_put(self.out, <const char *> b.data + cigar_end, b.l_data - cigar_end)
            cg[0] = b'C'
            cg[1] = b'G'
            cg[2] = b'B'
            cg[3] = b'I'
            put_u32(cg + 4, c.n_cigar)
            out_put(self.out, <const char *> cg, 8)
            out_put(self.out, <const char *> b.data + cigar_start, 4 * c.n_cigar)
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
