# cython: language_level=3
# Output staging shared by every kernel (lines and BAM records alike): one
# buffer per output file descriptor, written out with full writes. The struct
# and its two hot functions are here in full (``cdef inline``: compiled into
# each kernel, no call across modules); :class:`OutBufs` owns the memory.

from libc.string cimport memcpy

from bamflow.kernels._posixio cimport write_all


cdef int raise_errno(str what) except -1


cdef struct OutBuf:
    int fd
    char *data
    Py_ssize_t used
    Py_ssize_t cap
    long long records      # what the caller counts: lines, records


cdef inline int out_flush(OutBuf *o) except -1:
    if o.used:
        if write_all(o.fd, o.data, o.used) < 0:
            raise_errno("write")
        o.used = 0
    return 0


cdef inline int out_put(OutBuf *o, const char *data, Py_ssize_t length) except -1:
    """Stage ``length`` bytes; data larger than the buffer is written through."""
    if o.used + length > o.cap:
        out_flush(o)
        if length >= o.cap:
            if write_all(o.fd, data, length) < 0:
                raise_errno("write")
            return 0
    memcpy(o.data + o.used, data, length)
    o.used += length
    return 0


cdef class OutBufs:
    """One staging buffer per output descriptor; frees them when collected.

    ``bufs[i]`` is the buffer of ``fds[i]``; the descriptors belong to the caller.
    """
    cdef OutBuf *bufs
    cdef Py_ssize_t n
    cdef int flush_all(self) except -1
