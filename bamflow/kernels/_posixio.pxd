# Low-level POSIX I/O shared by the kernels: full writes, EINTR-safe reads,
# and the wait for a FIFO's first writer (see bamflow/fifo.py for why).
# Every helper returns -1 with errno set on failure; callers raise OSError.

from libc.errno cimport errno, EINTR
from libc.stdint cimport uint64_t, uint8_t
from posix.unistd cimport read, write


cdef extern from "<poll.h>" nogil:
    ctypedef unsigned long nfds_t
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, nfds_t nfds, int timeout)
    enum:
        POLLIN
        POLLHUP
        POLLERR
        POLLNVAL


cdef inline Py_ssize_t write_all(int fd, const char *data, Py_ssize_t length) noexcept nogil:
    """Write all of data; 0 on success, -1 with errno set on failure."""
    cdef Py_ssize_t done = 0, n
    while done < length:
        n = write(fd, data + done, length - done)
        if n < 0:
            if errno == EINTR:
                continue
            return -1
        done += n
    return 0


cdef inline Py_ssize_t read_some(int fd, char *into, Py_ssize_t capacity) noexcept nogil:
    """One read(2) retried on EINTR: bytes read, 0 at end of file, -1 on error."""
    cdef Py_ssize_t n
    while True:
        n = read(fd, into, capacity)
        if n < 0 and errno == EINTR:
            continue
        return n


cdef inline int wait_readable(int fd) noexcept nogil:
    """Block until fd has data or its writer hung up.

    A FIFO opened for reading with O_NONBLOCK reports end-of-file to read(2)
    until a writer connects; poll(2) does not, so poll once before reading.
    """
    cdef pollfd p
    cdef int rc
    p.fd = fd
    p.events = POLLIN
    while True:
        rc = poll(&p, 1, -1)
        if rc < 0:
            if errno == EINTR:
                continue
            return -1
        return 0


cdef inline uint64_t fnv1a64(const uint8_t *data, Py_ssize_t length) noexcept nogil:
    """FNV-1a, 64 bit: a key hash that is the same on every run and machine."""
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(length):
        h ^= data[i]
        h *= 1099511628211ULL
    return h


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    enum:
        FIONREAD


cdef inline long long pipe_backlog(int fd) noexcept nogil:
    """Bytes waiting to be read in the pipe behind fd (0 if unknown)."""
    cdef int waiting = 0
    if ioctl(fd, FIONREAD, &waiting) < 0:
        return 0
    return waiting
