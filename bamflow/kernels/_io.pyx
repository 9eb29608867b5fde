# cython: language_level=3
"""Output staging shared by the kernels (see _io.pxd)."""

from libc.errno cimport errno
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport strerror


cdef int raise_errno(str what) except -1:
    cdef int err = errno
    raise OSError(err, f"{what}: {strerror(err).decode()}")


cdef class OutBufs:
    def __cinit__(self, fds, Py_ssize_t cap):
        cdef Py_ssize_t i
        cdef list fd_list = [int(fd) for fd in fds]
        if cap < 1:
            raise ValueError("output buffer size must be >= 1")
        self.n = len(fd_list)
        self.bufs = <OutBuf *> calloc(self.n if self.n else 1, sizeof(OutBuf))
        if self.bufs == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.bufs[i].fd = fd_list[i]
            self.bufs[i].cap = cap
            self.bufs[i].data = <char *> malloc(cap)
            if self.bufs[i].data == NULL:
                raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.bufs != NULL:
            for i in range(self.n):
                free(self.bufs[i].data)
            free(self.bufs)

    cdef int flush_all(self) except -1:
        cdef Py_ssize_t i
        for i in range(self.n):
            out_flush(&self.bufs[i])
        return 0

    def records(self):
        """What was counted per output."""
        return [self.bufs[i].records for i in range(self.n)]
