# cython: language_level=3
# I/O shared by every kernel (lines and BAM records alike):
# - io_read / io_write / io_wait / io_poll: the system calls, with the GIL
#   released while they block (so that threads of the same process, such as
#   the BGZF writer's, go on) and EINTR retried after checking for signals
#   (so that Ctrl-C and SIGTERM reach a kernel blocked on a pipe);
# - output staging: one buffer per output file descriptor, written out with
#   full writes. The struct and its two hot functions are here in full
#   (``cdef inline``: compiled into each kernel); :class:`OutBufs` owns the memory.

from libc.string cimport memcpy

from bamflow.kernels._posixio cimport pollfd


cdef int raise_errno(str what) except -1
cdef Py_ssize_t io_read(int fd, char *into, Py_ssize_t capacity, str what) except -1
cdef int io_write(int fd, const char *data, Py_ssize_t length, str what) except -1
cdef int io_wait(int fd, str what) except -1
cdef int io_poll(pollfd *fds, Py_ssize_t n, int timeout_ms, str what) except -1


cdef struct OutBuf:
    int fd
    char *data
    Py_ssize_t used
    Py_ssize_t cap
    long long records      # what the caller counts: lines, records


cdef inline int out_flush(OutBuf *o) except -1:
    if o.used:
        io_write(o.fd, o.data, o.used, "write")
        o.used = 0
    return 0


cdef inline int out_put(OutBuf *o, const char *data, Py_ssize_t length) except -1:
    """Stage ``length`` bytes; data larger than the buffer is written through."""
    if o.used + length > o.cap:
        out_flush(o)
        if length >= o.cap:
            io_write(o.fd, data, length, "write")
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
