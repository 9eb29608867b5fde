# cython: language_level=3
"""Line kernels: split a byte stream of lines over N outputs
(:class:`LineDistributor`), and merge N streams of lines back into one
(:class:`LineCollector`); :func:`distribute_lines` and :func:`collect_lines`
run them.

Each input is a :class:`LineReader`, which owns its buffer; the outputs are
staged in the kernels' shared OutBufs (bamflow.kernels._io). Every object
frees what it owns when it is collected, so no loop needs a ``finally``.
Both loops work on file descriptors and raw buffers; no Python object is made
per line (only header lines offered to a Python predicate become ``str``).
Lines end at ``\\n``; a last line without one gets one, so that lines from
different streams can never run together.

This is a kernel of the engine layer: it uses only _io and _posixio, never
the BAM record layer.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memmove
from posix.unistd cimport close

# output staging (one buffer per output), shared with the BAM kernels; the
# distributor counts the body lines written to an OutBuf in its ``records``
from bamflow.kernels._io cimport OutBuf, OutBufs, io_poll, io_read, io_wait, io_write, out_flush, out_put
from bamflow.kernels._posixio cimport POLLERR, POLLHUP, POLLIN, fnv1a64, pollfd


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


cdef inline const char *_field(const char *line, const char *line_end, Py_ssize_t field,
                               char sep, Py_ssize_t *length) noexcept nogil:
    """Field ``field`` (0-based) of the ``sep``-separated line ending at
    ``line_end`` (its newline); the empty field at the end if it has fewer."""
    cdef const char *hit
    cdef Py_ssize_t i
    for i in range(field):
        hit = <const char *> memchr(line, sep, line_end - line)
        if hit == NULL:
            length[0] = 0
            return line_end
        line = hit + 1
    hit = <const char *> memchr(line, sep, line_end - line)
    length[0] = (line_end if hit == NULL else hit) - line
    return line


# -- one input ----------------------------------------------------------------------

@cython.final
cdef class LineReader:
    """The buffered lines of one input descriptor (not owned: never closed).

    ``data[start:end]`` has been read and not yet passed on. The buffer
    (``cap`` bytes and one spare, for the newline a last line may need) is
    made room in by moving its content down, and grows (doubling) only when
    one line fills it. ``scan``/``scan_lines`` hold how far round-robin
    collecting has counted the lines of the chunk it waits for, so that no
    byte is searched twice.
    """
    cdef int fd
    cdef char *data
    cdef Py_ssize_t start
    cdef Py_ssize_t end
    cdef Py_ssize_t cap
    cdef Py_ssize_t scan
    cdef Py_ssize_t scan_lines
    cdef bint eof
    cdef bint done              # round-robin collect: every line passed on
    cdef long long lines        # lines passed on by emit()
    cdef long long bytes_read

    def __cinit__(self, int fd, Py_ssize_t buffer_size):
        self.fd = fd
        self.cap = buffer_size
        self.data = <char *> malloc(buffer_size + 1)
        if self.data == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.data)

    cdef int fill(self) except -1:
        """Read once (blocking), after making room; at the end of the input set
        ``eof`` and end a last unterminated line with a newline."""
        cdef char *grown
        cdef Py_ssize_t n
        if self.start == self.end:
            self.start = self.end = self.scan = 0
        elif self.end == self.cap:
            if self.start > 0:
                memmove(self.data, self.data + self.start, self.end - self.start)
                self.end -= self.start
                self.scan -= self.start
                self.start = 0
            else:
                grown = <char *> realloc(self.data, 2 * self.cap + 1)
                if grown == NULL:
                    raise MemoryError()
                self.data = grown
                self.cap *= 2
        n = io_read(self.fd, self.data + self.end, self.cap - self.end, "read")
        if n == 0:
            self.eof = True
            if self.end > self.start and self.data[self.end - 1] != b'\n':
                self.data[self.end] = b'\n'   # the spare byte
                self.end += 1
        else:
            self.bytes_read += n
            self.end += n
        return 0

    cdef inline Py_ssize_t next_line(self) except -1:
        """Length of the whole line at ``data + start`` (newline included),
        reading as needed; 0 at the end of the input."""
        cdef const char *nl
        while True:
            if self.start < self.end:
                nl = <const char *> memchr(self.data + self.start, b'\n', self.end - self.start)
                if nl != NULL:
                    return nl - (self.data + self.start) + 1
            if self.eof:
                return 0
            self.fill()

    cdef bint chunk_ready(self, Py_ssize_t chunk_size) noexcept:
        """Count lines on from ``scan``; true once ``chunk_size`` lines, or at
        the end of the input all that is left, lie between start and scan."""
        cdef const char *hit
        while self.scan_lines < chunk_size and self.scan < self.end:
            hit = <const char *> memchr(self.data + self.scan, b'\n', self.end - self.scan)
            if hit == NULL:
                self.scan = self.end
                break
            self.scan = hit - self.data + 1
            self.scan_lines += 1
        return self.scan_lines == chunk_size or (self.eof and self.scan == self.end)

    cdef int emit(self, OutBuf *out, Py_ssize_t upto, long long lines) except -1:
        """Pass on ``data[start:upto]``, which holds ``lines`` whole lines."""
        out_put(out, self.data + self.start, upto - self.start)
        self.lines += lines
        self.start = self.scan = upto
        self.scan_lines = 0
        return 0

    cdef bint emit_whole_lines(self, OutBuf *out) except -1:
        """Pass on every whole line buffered; false if there is none."""
        cdef Py_ssize_t upto = self.end
        while upto > self.start:
            if self.data[upto - 1] == b'\n':
                self.emit(out, upto, _count_lines(self.data + self.start, upto - self.start))
                return True
            upto -= 1
        return False


# -- distribute ---------------------------------------------------------------------

cdef class LineDistributor:
    """Deal the lines read from ``in_fd`` to ``out_fds`` (see :func:`distribute_lines`).

    Owns ``header_fd`` from construction on: it is closed as soon as the
    header ends, or when the distributor is collected (after an error).
    """
    cdef LineReader reader
    cdef OutBufs outs
    cdef Py_ssize_t n_out
    cdef int header_fd
    cdef Py_ssize_t chunk_size
    cdef Py_ssize_t key_field      # -1: round-robin
    cdef char sep
    cdef bint header_broadcast
    cdef object header_detect
    cdef bytes header_prefix
    cdef long long header_lines

    def __cinit__(self, int in_fd, out_fds, options, *, int header_fd=-1,
                  Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 16):
        self.header_fd = header_fd
        self.chunk_size = options.chunk_size
        self.header_broadcast = options.header_broadcast
        self.header_detect = options.header_detect_func
        self.header_prefix = options.prefix_bytes
        self.key_field = -1 if options.by is None else options.by
        cdef bytes field_sep = options.field_sep.encode()
        cdef list fds = [int(fd) for fd in out_fds]
        self.n_out = len(fds)
        if self.n_out < 1:
            raise ValueError("distribute_lines needs at least one output")
        if self.chunk_size < 1 or buffer_size < 1 or out_buffer_size < 1:
            raise ValueError("chunk_size, buffer_size and out_buffer_size must be >= 1")
        if len(field_sep) != 1:
            raise ValueError("field_sep must be a single byte")
        if self.header_prefix is not None and len(self.header_prefix) == 0:
            raise ValueError("header_prefix must not be empty")
        self.sep = field_sep[0]
        self.outs = OutBufs(fds, out_buffer_size)
        self.reader = LineReader(in_fd, buffer_size)

    def __dealloc__(self):
        if self.header_fd >= 0:
            close(self.header_fd)

    cdef void _close_header(self) noexcept:
        if self.header_fd >= 0:
            close(self.header_fd)
            self.header_fd = -1

    def run(self):
        """Deal every line; returns {lines, header_lines, bytes, per_output}."""
        cdef Py_ssize_t i
        cdef bint detect_header = self.header_prefix is not None or self.header_detect is not None
        if not detect_header:
            self._close_header()  # no header to look for: it is empty
        io_wait(self.reader.fd, "poll")
        if detect_header:
            self._header()
        if self.key_field >= 0:
            self._by_key()
        else:
            self._round_robin()
        self.outs.flush_all()
        per_output = [self.outs.bufs[i].records for i in range(self.n_out)]
        return {
            "lines": sum(per_output),
            "header_lines": self.header_lines,
            "bytes": self.reader.bytes_read,
            "per_output": per_output,
        }

    cdef int _header(self) except -1:
        """Pass on the leading header lines, then close ``header_fd``; the first
        other line stays in the buffer for the body."""
        cdef LineReader r = self.reader
        cdef const char *prefix = NULL
        cdef Py_ssize_t prefix_len = 0, n, i
        cdef const char *line
        if self.header_prefix is not None:
            prefix = self.header_prefix
            prefix_len = len(self.header_prefix)
        while True:
            n = r.next_line()
            if n == 0:
                break
            line = r.data + r.start
            if prefix != NULL:
                if n < prefix_len or memcmp(line, prefix, prefix_len) != 0:
                    break
            elif not self.header_detect(
                PyBytes_FromStringAndSize(line, n).decode("utf-8", "surrogateescape")
            ):
                break
            self.header_lines += 1
            if self.header_fd >= 0:
                io_write(self.header_fd, line, n, "write header")
            if self.header_broadcast:
                for i in range(self.n_out):
                    out_put(&self.outs.bufs[i], line, n)
            r.start += n
        self._close_header()  # the header is complete: a collector waiting for it can go on
        return 0

    cdef int _round_robin(self) except -1:
        """Chunks of ``chunk_size`` lines to each output in turn."""
        cdef LineReader r = self.reader
        cdef OutBuf *out = &self.outs.bufs[0]
        cdef Py_ssize_t n, target = 0, in_chunk = 0
        while True:
            n = r.next_line()
            if n == 0:
                return 0
            out_put(out, r.data + r.start, n)
            out.records += 1
            r.start += n
            in_chunk += 1
            if in_chunk == self.chunk_size:
                in_chunk = 0
                target += 1
                if target == self.n_out:
                    target = 0
                out = &self.outs.bufs[target]

    cdef int _by_key(self) except -1:
        """Each line to output ``fnv1a64(field key_field) % n_out``."""
        cdef LineReader r = self.reader
        cdef OutBuf *out
        cdef Py_ssize_t n, key_len
        cdef const char *line
        cdef const char *key
        while True:
            n = r.next_line()
            if n == 0:
                return 0
            line = r.data + r.start
            key = _field(line, line + n - 1, self.key_field, self.sep, &key_len)
            out = &self.outs.bufs[fnv1a64(<const uint8_t *> key, key_len) % <uint64_t> self.n_out]
            out_put(out, line, n)
            out.records += 1
            r.start += n


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
    waiting for the header can go on (and on every error). Other lines go
    round-robin in chunks of ``chunk_size`` lines, or, with ``key_field >= 0``,
    to the output chosen by a stable hash of that ``field_sep``-separated field
    (0-based).

    ``options`` (bamflow.engine.lines.LineDistributeOptions): ``chunk_size``,
    ``header_detect_func``, ``header_prefix``, ``header_broadcast``, ``by``
    (the key field), ``field_sep``.

    Returns a dict: ``lines`` (body lines), ``header_lines``, ``bytes`` (read),
    ``per_output`` (body lines per output).
    """
    return LineDistributor(in_fd, out_fds, options, header_fd=header_fd, buffer_size=buffer_size,
                           out_buffer_size=out_buffer_size).run()


# -- collect ------------------------------------------------------------------------

cdef class LineCollector:
    """Merge the lines of ``in_fds`` into ``out_fd`` (see :func:`collect_lines`).

    The descriptors belong to the caller.
    """
    cdef list ins                  # a LineReader per input
    cdef Py_ssize_t n_in
    cdef pollfd *pfds              # scratch of _poll: the descriptors waited on,
    cdef Py_ssize_t *index         # and the input of each
    cdef OutBufs outs
    cdef OutBuf *out
    cdef int header_fd
    cdef bint round_robin
    cdef Py_ssize_t chunk_size
    cdef Py_ssize_t buffer_size
    cdef Py_ssize_t read_ahead
    cdef int stall_ms
    cdef long long header_lines
    cdef long long out_of_turn

    def __cinit__(self, in_fds, int out_fd, options, *, int header_fd=-1,
                  Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20,
                  Py_ssize_t read_ahead=32 << 20, int stall_ms=1000):
        cdef str order = options.order
        self.chunk_size = options.chunk_size
        cdef list fds = [int(fd) for fd in in_fds]
        if order not in ("any", "round-robin"):
            raise ValueError(f"order must be 'any' or 'round-robin', not {order!r}")
        if self.chunk_size < 1 or buffer_size < 1 or out_buffer_size < 1:
            raise ValueError("chunk_size, buffer_size and out_buffer_size must be >= 1")
        self.round_robin = order == "round-robin"
        self.header_fd = header_fd
        self.buffer_size = buffer_size
        self.read_ahead = read_ahead
        self.stall_ms = stall_ms
        self.outs = OutBufs([out_fd], out_buffer_size)
        self.out = &self.outs.bufs[0]
        self.n_in = len(fds)
        self.pfds = <pollfd *> calloc(self.n_in if self.n_in else 1, sizeof(pollfd))
        self.index = <Py_ssize_t *> calloc(self.n_in if self.n_in else 1, sizeof(Py_ssize_t))
        if self.pfds == NULL or self.index == NULL:
            raise MemoryError()
        self.ins = [LineReader(fd, buffer_size) for fd in fds]

    def __dealloc__(self):
        free(self.pfds)
        free(self.index)

    def run(self):
        """Copy the header, then merge; returns {lines, header_lines, per_input, out_of_turn}."""
        if self.header_fd >= 0:
            self._copy_header()
        if self.round_robin:
            self._round_robin()
        else:
            self._any()
        out_flush(self.out)
        per_input = [(<LineReader> r).lines for r in self.ins]
        return {
            "lines": sum(per_input),
            "header_lines": self.header_lines,
            "per_input": per_input,
            "out_of_turn": self.out_of_turn,
        }

    cdef int _copy_header(self) except -1:
        """Copy the whole of ``header_fd`` (in whole lines) before any body line."""
        cdef LineReader h = LineReader(self.header_fd, self.buffer_size)
        io_wait(self.header_fd, "poll")
        while not h.eof:
            h.fill()
            h.emit_whole_lines(self.out)
        self.header_lines = h.lines
        return 0

    cdef int _any(self) except -1:
        """Whole lines from whichever input has data, never waiting for one."""
        cdef LineReader r
        while self._poll(-1, 0, -1) >= 0:
            for r in self.ins:
                r.emit_whole_lines(self.out)
        return 0

    cdef int _round_robin(self) except -1:
        """``chunk_size`` lines from each input in turn; inputs that ended are
        skipped. While the current input is awaited, the others are read ahead
        up to ``read_ahead`` bytes; if all of them are that far ahead and it
        stays silent for ``stall_ms``, a chunk goes out of turn (see _out_of_turn)."""
        cdef LineReader r
        cdef Py_ssize_t cur = 0, finished = 0
        while finished < self.n_in:
            r = <LineReader> self.ins[cur]
            if r.done:
                cur = (cur + 1) % self.n_in
                continue
            if r.chunk_ready(self.chunk_size):
                r.emit(self.out, r.scan, r.scan_lines)
                if r.eof and r.start == r.end:
                    r.done = True
                    finished += 1
                cur = (cur + 1) % self.n_in
                continue
            if self._poll(cur, self.read_ahead, self.stall_ms) == 0:
                self._out_of_turn(cur)
        return 0

    cdef int _out_of_turn(self, Py_ssize_t cur) except -1:
        """Every input but ``cur`` is ``read_ahead`` bytes ahead and ``cur`` stayed
        silent: pass on the whole lines of the fullest other input (counted in
        ``out_of_turn``) instead of stalling the workers."""
        cdef LineReader r, fullest = None
        cdef Py_ssize_t i
        for i in range(self.n_in):
            r = <LineReader> self.ins[i]
            if i != cur and not r.eof and (fullest is None or r.end - r.start > fullest.end - fullest.start):
                fullest = r
        if fullest.emit_whole_lines(self.out):
            self.out_of_turn += 1
        else:
            fullest.fill()  # one line longer than read_ahead
        return 0

    cdef int _poll(self, Py_ssize_t must, Py_ssize_t read_ahead, int lone_timeout_ms) except -2:
        """Read once from every readable input that is not at its end.

        Inputs holding ``read_ahead`` bytes or more (0: no limit) are not read,
        except ``must`` (-1 for none). If ``must`` is the only input left to wait
        on because all others are that far ahead, wait at most ``lone_timeout_ms``.
        Returns the number of inputs polled, 0 if that wait timed out, or -1 if
        every input is at its end.
        """
        cdef LineReader r
        cdef Py_ssize_t i, polled = 0, capped = 0
        cdef int ready, timeout_ms = -1
        for i in range(self.n_in):
            r = <LineReader> self.ins[i]
            if r.eof:
                continue
            if read_ahead > 0 and i != must and r.end - r.start >= read_ahead:
                capped += 1
            else:
                self.pfds[polled] = pollfd(fd=r.fd, events=POLLIN, revents=0)
                self.index[polled] = i
                polled += 1
        if polled == 0:
            return -1
        if polled == 1 and capped > 0 and self.index[0] == must:
            timeout_ms = lone_timeout_ms
        ready = io_poll(self.pfds, polled, 0, "poll")
        if ready == 0:
            out_flush(self.out)  # nothing ready: hand over what we hold before blocking
            ready = io_poll(self.pfds, polled, timeout_ms, "poll")
        if ready == 0:
            return 0
        for i in range(polled):
            if self.pfds[i].revents & (POLLIN | POLLHUP | POLLERR):
                (<LineReader> self.ins[self.index[i]]).fill()
        return polled


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
    return LineCollector(in_fds, out_fd, options, header_fd=header_fd, buffer_size=buffer_size,
                         out_buffer_size=out_buffer_size, read_ahead=read_ahead,
                         stall_ms=stall_ms).run()
