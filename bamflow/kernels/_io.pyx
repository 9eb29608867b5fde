# cython: language_level=3
"""I/O shared by the kernels (see _io.pxd)."""

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EINTR, errno
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport strerror
from posix.unistd cimport read, write

from bamflow.kernels._posixio cimport POLLIN, nfds_t, poll, pollfd


cdef int raise_errno(str what) except -1:
    cdef int err = errno
    raise OSError(err, f"{what}: {strerror(err).decode()}")


cdef int _failed(int err, str what) except -1:
    """After a system call failed with ``err``: 0 to retry (EINTR, no signal
    handler raised), else raise."""
    if err == EINTR:
        PyErr_CheckSignals()  # a handler that raises (Ctrl-C) ends the call here
        return 0
    raise OSError(err, f"{what}: {strerror(err).decode()}")


cdef Py_ssize_t io_read(int fd, char *into, Py_ssize_t capacity, str what) except -1:
    """One read(2): bytes read, 0 at the end of the input."""
    cdef Py_ssize_t n
    cdef int err = 0
    while True:
        with nogil:
            n = read(fd, into, capacity)
            if n < 0:
                err = errno
        if n >= 0:
            return n
        _failed(err, what)


cdef int io_write(int fd, const char *data, Py_ssize_t length, str what) except -1:
    """Write all of ``data``."""
    cdef Py_ssize_t done = 0, n
    cdef int err = 0
    while done < length:
        with nogil:
            n = write(fd, data + done, length - done)
            if n < 0:
                err = errno
        if n < 0:
            _failed(err, what)
        else:
            done += n
    return 0


cdef int io_poll(pollfd *fds, Py_ssize_t n, int timeout_ms, str what) except -1:
    """poll(2): the number of descriptors ready, 0 on timeout."""
    cdef int rc
    cdef int err = 0
    while True:
        with nogil:
            rc = poll(fds, <nfds_t> n, timeout_ms)
            if rc < 0:
                err = errno
        if rc >= 0:
            return rc
        _failed(err, what)


cdef int io_wait(int fd, str what) except -1:
    """Block until ``fd`` has data or its (once connected) writer hung up: a
    FIFO opened with O_NONBLOCK reads as ended until its writer connects,
    poll(2) does not (see bamflow/engine/fifo.py)."""
    cdef pollfd p
    p.fd = fd
    p.events = POLLIN
    p.revents = 0
    io_poll(&p, 1, -1, what)
    return 0


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
