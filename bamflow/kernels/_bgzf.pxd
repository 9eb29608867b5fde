# cython: language_level=3
# The one BGZF block reader (SAM specification section 4.1): every BGZF byte
# bamflow reads, in the Python-side reader (bamflow.bam.bgzf.BgzfReader) and in
# the kernels (worker outputs written by pysam), goes through these checks:
# gzip magic, CM, the BC subfield, BSIZE, ISIZE <= 64 KiB, the deflate data,
# CRC32, and an empty last block (the EOF marker).

from libc.stdint cimport uint8_t, uint32_t


cdef enum:
    BGZF_FIXED_HEADER = 12      # ID1 ID2 CM FLG MTIME XFL OS XLEN
    BGZF_FOOTER = 8             # CRC32 ISIZE
    BGZF_MAX_BLOCK = 65536      # BSIZE is 16 bits; ISIZE is at most this too


cdef struct BgzfBlock:
    Py_ssize_t size     # the whole block, header to footer (0: not known yet)
    Py_ssize_t cstart   # where its deflate data starts
    Py_ssize_t clen     # deflate data length
    uint32_t crc
    uint32_t isize


cdef Py_ssize_t bgzf_scan(const uint8_t *p, Py_ssize_t avail, BgzfBlock *b, long long offset,
                          bint first, object source) except -2
cdef Py_ssize_t bgzf_inflate(const uint8_t *block, const BgzfBlock *b, uint8_t *out,
                             long long offset, object source) except -1
cdef int bgzf_check_end(Py_ssize_t leftover, Py_ssize_t header_known, long long blocks,
                        bint last_empty, long long offset, object source) except -1
