# cython: language_level=3
"""Line kernels: split a byte stream of lines over N outputs, and merge N back.

Both loops work on file descriptors and raw buffers; no Python object is made
per line (only header lines offered to a Python predicate become ``str``).
Lines end at ``\\n``; a last line without one gets one, so that lines from
different streams can never run together.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove
from posix.unistd cimport close

from bamflow.kernels._posixio cimport (
    POLLERR, POLLHUP, POLLIN, fnv1a64, poll, pollfd, read_some, wait_readable,
    write_all,
)
# output staging (one buffer per output), shared with the BAM kernels; an
# OutBuf's ``records`` counts the lines written to it
from bamflow.kernels._io cimport OutBuf, OutBufs, out_flush as _flush, out_put as _put, raise_errno as _raise_errno


cdef inline long long _count_lines(const char *p, Py_ssize_t n) noexcept nogil:
    cdef long long count = 0
    cdef const char *end = p + n
    cdef const char *hit
    while p < end:
        hit = <const char *> memchr(p, b'\n', end - p)
        if hit == NULL:
            break
        count += 1
        p = hit + 1
    return count


# -- distribute -------------------------------------------------------------------

def distribute_lines(
    int in_fd,
    out_fds,
    options,
    *,
    int header_fd=-1,
    Py_ssize_t buffer_size=1 << 20,
    Py_ssize_t out_buffer_size=1 << 16,
):
    """Send the lines read from ``in_fd`` to ``out_fds``.

    Leading header lines (those for which ``header_prefix`` matches or
    ``header_detect(str_line)`` is true) go to ``header_fd`` and, with
    ``header_broadcast``, to every output. ``header_fd`` is owned by this
    function: it is closed as soon as the header ends, so that a collector
    waiting for the header can go on. Other lines go round-robin in chunks of
    ``chunk_size`` lines, or, with ``key_field >= 0``, to the output chosen by a
    stable hash of that ``field_sep``-separated field (0-based).

    ``options`` (bamflow.engine.lines.LineDistributeOptions): ``chunk_size``,
    ``header_detect_func``, ``header_prefix``, ``header_broadcast``, ``by``
    (the key field), ``field_sep``.

    Returns a dict: ``lines`` (body lines), ``header_lines``, ``bytes`` (read),
    ``per_output`` (body lines per output).
    """
    cdef Py_ssize_t chunk_size = options.chunk_size
    cdef bint header_broadcast = options.header_broadcast
    header_detect = options.header_detect_func
    cdef bytes header_prefix = options.prefix_bytes
    cdef Py_ssize_t key_field = -1 if options.by is None else options.by
    cdef bytes field_sep = options.field_sep.encode()
    cdef list fds = [int(fd) for fd in out_fds]
    cdef Py_ssize_t n_out = len(fds)
    if n_out < 1:
        raise ValueError("distribute_lines needs at least one output")
    if chunk_size < 1 or buffer_size < 1 or out_buffer_size < 1:
        raise ValueError("chunk_size, buffer_size and out_buffer_size must be >= 1")
    if len(field_sep) != 1:
        raise ValueError("field_sep must be a single byte")
    if header_prefix is not None and len(header_prefix) == 0:
        raise ValueError("header_prefix must not be empty")

    cdef bint detect_header = header_prefix is not None or header_detect is not None
    cdef const char *prefix = NULL
    cdef Py_ssize_t prefix_len = 0
    if header_prefix is not None:
        prefix = header_prefix
        prefix_len = len(header_prefix)
    cdef char sep = field_sep[0]

    cdef OutBufs staging = OutBufs(fds, out_buffer_size)
    cdef OutBuf *outs = staging.bufs
    cdef char *buf = NULL
    cdef char *grown
    cdef Py_ssize_t cap = buffer_size, start = 0, end = 0, n, i
    cdef const char *line
    cdef const char *nl
    cdef const char *key
    cdef const char *key_end
    cdef const char *hit
    cdef Py_ssize_t line_len
    cdef bint eof = False, is_header
    cdef Py_ssize_t target = 0, in_chunk = 0
    cdef long long body_lines = 0, header_lines = 0, bytes_read = 0

    try:
        if header_fd >= 0 and not detect_header:
            close(header_fd)  # no header to look for: it is empty
            header_fd = -1
        buf = <char *> malloc(cap + 1)  # +1: room for a newline added at EOF
        if buf == NULL:
            raise MemoryError()
        if wait_readable(in_fd) < 0:
            _raise_errno("poll")
        while not eof:
            # make room, then read
            if start == end:
                start = end = 0
            elif end == cap:
                if start > 0:
                    memmove(buf, buf + start, end - start)
                    end -= start
                    start = 0
                else:
                    grown = <char *> realloc(buf, 2 * cap + 1)
                    if grown == NULL:
                        raise MemoryError()
                    buf = grown
                    cap *= 2
            n = read_some(in_fd, buf + end, cap - end)
            if n < 0:
                _raise_errno("read")
            if n == 0:
                eof = True
                if end > start and buf[end - 1] != b'\n':
                    buf[end] = b'\n'
                    end += 1
            else:
                bytes_read += n
                end += n

            # dispatch every complete line in buf[start:end]
            while start < end:
                line = buf + start
                nl = <const char *> memchr(line, b'\n', end - start)
                if nl == NULL:
                    break
                line_len = nl - line + 1
                if detect_header:
                    if prefix != NULL:
                        is_header = line_len >= prefix_len and memcmp(line, prefix, prefix_len) == 0
                    else:
                        is_header = bool(header_detect(
                            PyBytes_FromStringAndSize(line, line_len).decode("utf-8", "surrogateescape")
                        ))
                    if is_header:
                        header_lines += 1
                        if header_fd >= 0 and write_all(header_fd, line, line_len) < 0:
                            _raise_errno("write header")
                        if header_broadcast:
                            for i in range(n_out):
                                _put(&outs[i], line, line_len)
                        start += line_len
                        continue
                    detect_header = False
                    if header_fd >= 0:
                        close(header_fd)
                        header_fd = -1

                if key_field >= 0:
                    key = line
                    key_end = nl
                    for i in range(key_field):
                        hit = <const char *> memchr(key, sep, key_end - key)
                        if hit == NULL:
                            key = key_end
                            break
                        key = hit + 1
                    hit = <const char *> memchr(key, sep, key_end - key)
                    if hit != NULL:
                        key_end = hit
                    target = fnv1a64(<const uint8_t *> key, key_end - key) % <uint64_t> n_out
                    _put(&outs[target], line, line_len)
                    outs[target].records += 1
                else:
                    _put(&outs[target], line, line_len)
                    outs[target].records += 1
                    in_chunk += 1
                    if in_chunk == chunk_size:
                        in_chunk = 0
                        target += 1
                        if target == n_out:
                            target = 0
                body_lines += 1
                start += line_len

        if header_fd >= 0:
            close(header_fd)
            header_fd = -1
        for i in range(n_out):
            _flush(&outs[i])
        return {
            "lines": body_lines,
            "header_lines": header_lines,
            "bytes": bytes_read,
            "per_output": [outs[i].records for i in range(n_out)],
        }
    finally:
        if header_fd >= 0:
            close(header_fd)
        free(buf)


# -- collect ----------------------------------------------------------------------

cdef struct LineInBuf:
    int fd
    char *data
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t cap
    Py_ssize_t scan        # round-robin: lines before `scan` are counted in `scan_lines`
    Py_ssize_t scan_lines
    bint eof
    bint done
    long long lines


cdef int _fill_lines(LineInBuf *ib) except -1:
    """Read once into ib (growing it when full); sets eof at end of stream."""
    cdef char *grown
    cdef Py_ssize_t n
    if ib.start == ib.end:
        ib.start = ib.end = ib.scan = 0
    elif ib.end == ib.cap:
        if ib.start > 0:
            memmove(ib.data, ib.data + ib.start, ib.end - ib.start)
            ib.end -= ib.start
            ib.scan -= ib.start
            ib.start = 0
        else:
            grown = <char *> realloc(ib.data, 2 * ib.cap + 1)
            if grown == NULL:
                raise MemoryError()
            ib.data = grown
            ib.cap *= 2
    n = read_some(ib.fd, ib.data + ib.end, ib.cap - ib.end)
    if n < 0:
        _raise_errno("read")
    if n == 0:
        ib.eof = True
        if ib.end > ib.start and ib.data[ib.end - 1] != b'\n':
            ib.data[ib.end] = b'\n'   # the +1 spare byte of every buffer
            ib.end += 1
    ib.end += n
    return 0


cdef int _emit(LineInBuf *ib, OutBuf *out, Py_ssize_t upto, long long lines) except -1:
    _put(out, ib.data + ib.start, upto - ib.start)
    ib.lines += lines
    out.records += lines
    ib.start = upto
    ib.scan = upto
    ib.scan_lines = 0
    return 0


cdef Py_ssize_t _last_newline(LineInBuf *ib) noexcept nogil:
    cdef Py_ssize_t i = ib.end
    while i > ib.start:
        i -= 1
        if ib.data[i] == b'\n':
            return i + 1
    return -1


cdef int _poll_inputs(LineInBuf *ins, Py_ssize_t n_in, pollfd *pfds, Py_ssize_t *index,
                      OutBuf *out, Py_ssize_t must, Py_ssize_t read_ahead,
                      int lone_timeout_ms) except -2:
    """Read once from every readable input that is not at EOF.

    Inputs holding ``read_ahead`` bytes or more (0: no limit) are not read,
    except ``must`` (-1 for none). If ``must`` is the only input left to wait
    on because all others are that far ahead, wait at most ``lone_timeout_ms``.
    Returns the number of inputs polled, 0 if that wait timed out, or -1 if
    every input is at EOF.
    """
    cdef Py_ssize_t i, k = 0, capped = 0
    cdef int rc, timeout_ms = -1
    for i in range(n_in):
        if ins[i].eof:
            continue
        if i != must and read_ahead > 0 and ins[i].end - ins[i].start >= read_ahead:
            capped += 1
            continue
        pfds[k].fd = ins[i].fd
        pfds[k].events = POLLIN
        pfds[k].revents = 0
        index[k] = i
        k += 1
    if k == 0:
        return -1
    if k == 1 and index[0] == must and capped > 0:
        timeout_ms = lone_timeout_ms
    rc = poll(pfds, k, 0)
    if rc == 0:
        _flush(out)  # nothing ready: hand over what we hold before blocking
        rc = poll(pfds, k, timeout_ms)
    if rc < 0:
        _raise_errno("poll")
    if rc == 0:
        return 0
    for i in range(k):
        if pfds[i].revents & (POLLIN | POLLHUP | POLLERR):
            _fill_lines(&ins[index[i]])
    return k


def collect_lines(
    in_fds,
    int out_fd,
    options,
    *,
    int header_fd=-1,
    Py_ssize_t buffer_size=1 << 20,
    Py_ssize_t out_buffer_size=1 << 20,
    Py_ssize_t read_ahead=32 << 20,
    int stall_ms=1000,
):
    """Merge the lines of ``in_fds`` into ``out_fd``, after the header.

    The whole of ``header_fd`` (if given) is copied first. ``order="any"``
    passes on whole lines from whichever input has data: it never waits for
    a particular input, so workers that drop or add lines cannot stall it.
    ``order="round-robin"`` takes ``chunk_size`` lines from each input in turn,
    restoring the input order of a round-robin distribution when every worker
    writes one line per line it reads. It reads ahead on the other inputs up
    to ``read_ahead`` bytes each while it waits for the current one, so that it
    cannot deadlock the workers; if all of them are that far ahead and the
    current input stays silent for ``stall_ms``, it passes on a chunk out of
    turn (counted in ``out_of_turn``) instead of stalling.

    ``options`` (bamflow.engine.lines.LineCollectOptions): ``order``, ``chunk_size``.

    Returns a dict: ``lines``, ``header_lines``, ``per_input``, ``out_of_turn``.
    """
    cdef str order = options.order
    cdef Py_ssize_t chunk_size = options.chunk_size
    cdef list fds = [int(fd) for fd in in_fds]
    cdef Py_ssize_t n_in = len(fds)
    if order not in ("any", "round-robin"):
        raise ValueError(f"order must be 'any' or 'round-robin', not {order!r}")
    if chunk_size < 1 or buffer_size < 1 or out_buffer_size < 1:
        raise ValueError("chunk_size, buffer_size and out_buffer_size must be >= 1")
    cdef bint round_robin = order == "round-robin"

    cdef LineInBuf *ins = NULL
    cdef pollfd *pfds = NULL
    cdef Py_ssize_t *index = NULL
    cdef OutBufs staging = OutBufs([out_fd], out_buffer_size)
    cdef OutBuf *out = staging.bufs
    cdef LineInBuf header
    cdef Py_ssize_t i, cur = 0, finished = 0, upto, fullest
    cdef long long header_lines = 0, out_of_turn = 0
    cdef const char *hit

    header.data = NULL
    try:
        ins = <LineInBuf *> calloc(n_in if n_in else 1, sizeof(LineInBuf))
        pfds = <pollfd *> calloc(n_in if n_in else 1, sizeof(pollfd))
        index = <Py_ssize_t *> calloc(n_in if n_in else 1, sizeof(Py_ssize_t))
        if ins == NULL or pfds == NULL or index == NULL:
            raise MemoryError()
        for i in range(n_in):
            ins[i].fd = fds[i]
            ins[i].cap = buffer_size
            ins[i].data = <char *> malloc(buffer_size + 1)
            if ins[i].data == NULL:
                raise MemoryError()

        if header_fd >= 0:
            header.fd = header_fd
            header.cap = buffer_size
            header.start = header.end = header.scan = 0
            header.eof = False
            header.data = <char *> malloc(buffer_size + 1)
            if header.data == NULL:
                raise MemoryError()
            if wait_readable(header_fd) < 0:
                _raise_errno("poll")
            while not header.eof:
                _fill_lines(&header)
                upto = _last_newline(&header)
                if upto > 0:
                    header_lines += _count_lines(header.data + header.start, upto - header.start)
                    _put(out, header.data + header.start, upto - header.start)
                    header.start = upto

        if not round_robin:
            while True:
                if _poll_inputs(ins, n_in, pfds, index, out, -1, 0, -1) < 0:
                    break
                for i in range(n_in):
                    if ins[i].end > ins[i].start:
                        upto = _last_newline(&ins[i])
                        if upto > 0:
                            _emit(&ins[i], out, upto,
                                  _count_lines(ins[i].data + ins[i].start, upto - ins[i].start))
        else:
            while finished < n_in:
                if ins[cur].done:
                    cur = (cur + 1) % n_in
                    continue
                # count newlines until a whole chunk is buffered
                while ins[cur].scan_lines < chunk_size and ins[cur].scan < ins[cur].end:
                    hit = <const char *> memchr(ins[cur].data + ins[cur].scan, b'\n',
                                                ins[cur].end - ins[cur].scan)
                    if hit == NULL:
                        ins[cur].scan = ins[cur].end
                        break
                    ins[cur].scan = hit - ins[cur].data + 1
                    ins[cur].scan_lines += 1
                if ins[cur].scan_lines == chunk_size or (ins[cur].eof and ins[cur].scan == ins[cur].end):
                    _emit(&ins[cur], out, ins[cur].scan, ins[cur].scan_lines)
                    if ins[cur].eof and ins[cur].start == ins[cur].end:
                        ins[cur].done = True
                        finished += 1
                    cur = (cur + 1) % n_in
                    continue
                if _poll_inputs(ins, n_in, pfds, index, out, cur, read_ahead, stall_ms) == 0:
                    # every other input is read_ahead bytes ahead and the current
                    # one stayed silent: pass a chunk on out of turn, not stall
                    fullest = -1
                    for i in range(n_in):
                        if i != cur and not ins[i].eof and (
                            fullest < 0 or ins[i].end - ins[i].start > ins[fullest].end - ins[fullest].start
                        ):
                            fullest = i
                    upto = _last_newline(&ins[fullest])
                    if upto > 0:
                        _emit(&ins[fullest], out, upto,
                              _count_lines(ins[fullest].data + ins[fullest].start,
                                           upto - ins[fullest].start))
                        out_of_turn += 1
                    else:
                        _fill_lines(&ins[fullest])  # one line longer than read_ahead

        _flush(out)
        return {
            "lines": out.records,
            "header_lines": header_lines,
            "per_input": [ins[i].lines for i in range(n_in)],
            "out_of_turn": out_of_turn,
        }
    finally:
        free(header.data)
        if ins != NULL:
            for i in range(n_in):
                free(ins[i].data)
        free(ins)
        free(pfds)
        free(index)
