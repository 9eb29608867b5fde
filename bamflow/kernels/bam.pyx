# cython: language_level=3
"""BAM stream kernels: deal the records of a raw BAM stream to N outputs
(:class:`Distributor`), merge N streams back into one (:class:`Collector`),
and hand a stream on in checked whole-record chunks (:class:`RecordChunks`,
for the writer).

Every record goes through the one record layer (bamflow.kernels._records):
its block_size, fixed fields, references, read name and aux values are
checked before it is used or passed on. No Python object is made per record.
Record indexes in messages are 0-based and count records of the stream in
question.
"""

from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp
from posix.unistd cimport close

from bamflow.kernels._io cimport OutBuf, OutBufs, io_poll, io_write, out_flush, out_put
from bamflow.kernels._posixio cimport POLLERR, POLLHUP, POLLIN, POLLNVAL, fnv1a64, pipe_backlog, pollfd
from bamflow.kernels._records cimport (
    GOT_FRAME, GOT_RECORD, KEY_FOUND, MAX_TAGS, NEED_MORE, STREAM_END, BamCore, Rec, RecordReader,
    Scratch, Tags, ValueTable, core_of, describe, scratch_free, scratch_put,
)

# A chunk-end frame: a block_size of 0, never a record (see bamflow/bam/stages.py).
FRAME = b"\0\0\0\0"


# -- distribute -------------------------------------------------------------------

cdef class Distributor:
    """Deal the records of the raw BAM stream on ``in_fd`` to ``out_fds``.

    ``options`` (bamflow.bam.options.DistributeOptions) says how: ``by`` None
    (round-robin in chunks of ``chunk_size`` records; with ``frame_chunks``
    a chunk-end frame follows every whole chunk, so that a collector can
    restore the input order), ``"name"`` (``fnv1a64(read name) % n``: mates
    meet) or a tuple of tags (``fnv1a64(canonical key) % n``); ``missing``
    (reads whose key tag is absent or empty): "error", "drop" or
    "unassigned" (to ``unassigned_fd``); ``header_broadcast`` (the header to
    every output, so that each is a complete BAM stream); ``count_values``
    (reads per key value, in a ValueTable: ``values`` in the result).

    The header also goes to ``header_fd``, which is closed right after it.
    """
    cdef RecordReader reader
    cdef OutBufs outs
    cdef Py_ssize_t n_out
    cdef OutBuf *unassigned
    cdef int header_fd
    cdef Tags tags
    cdef ValueTable table
    cdef Scratch key
    cdef object options
    cdef object source
    cdef long long dropped
    cdef long long unassigned_count

    def __cinit__(self, int in_fd, out_fds, options, *, int unassigned_fd=-1, int header_fd=-1,
                  progress=None, source="", Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 16):
        cdef list fds = [int(fd) for fd in out_fds]
        self.header_fd = header_fd
        self.n_out = len(fds)
        if self.n_out < 1:
            raise ValueError("distribute needs at least one output")
        self.options = options
        self.source = source
        by = options.by
        if by is not None and by != "name":
            self.tags = Tags(by)
            if options.missing == "unassigned":
                if unassigned_fd < 0:
                    raise ValueError("missing='unassigned' needs an unassigned output")
                fds.append(unassigned_fd)
        if options.count_values:
            self.table = ValueTable()
        self.reader = RecordReader(in_fd, source, False, progress, buffer_size, True)
        self.outs = OutBufs(fds, out_buffer_size)
        self.unassigned = &self.outs.bufs[self.n_out] if len(fds) > self.n_out else NULL

    def __dealloc__(self):
        scratch_free(&self.key)
        if self.header_fd >= 0:
            close(self.header_fd)

    def run(self):
        """Deal every record; returns {records, per_output, dropped_missing_tag,
        unassigned, header_bytes, bytes, tags_seen[, values]}."""
        cdef Py_ssize_t i
        cdef const uint8_t *header
        self.reader.read_header()
        header = self.reader.header()
        if self.header_fd >= 0:
            io_write(self.header_fd, <const char *> header, self.reader.header_len, "write header")
            close(self.header_fd)
            self.header_fd = -1
        if self.options.header_broadcast:
            for i in range(self.outs.n):
                out_put(&self.outs.bufs[i], <const char *> header, self.reader.header_len)
        self.reader.release()
        by = self.options.by
        if by is None:
            self._round_robin(self.options.chunk_size, self.options.frame_chunks)
        elif by == "name":
            self._by_name()
        else:
            self._by_tags(self.options.missing)
        self.outs.flush_all()
        self.reader.report()
        result = {
            "records": self.reader.records,
            "per_output": [self.outs.bufs[i].records for i in range(self.n_out)],
            "dropped_missing_tag": self.dropped,
            "unassigned": self.unassigned_count,
            "header_bytes": self.reader.header_len,
            "bytes": self.reader.bytes_read,
            "tags_seen": self.reader.tags_seen,
        }
        if self.table is not None:
            result["values"] = self.table.counts()
        return result

    cdef int _round_robin(self, Py_ssize_t chunk_size, bint frame_chunks) except -1:
        cdef Rec r
        cdef int got
        cdef Py_ssize_t target = 0, in_chunk = 0
        cdef OutBuf *o
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        while True:
            got = self.reader.next(&r, None, NULL)
            if got == STREAM_END:
                return 0
            o = &self.outs.bufs[target]
            o.records += 1
            out_put(o, <const char *> r.data - 4, 4 + r.size)
            self.reader.release()
            in_chunk += 1
            if in_chunk == chunk_size:
                if frame_chunks:
                    out_put(o, b"\0\0\0\0", 4)
                in_chunk = 0
                target += 1
                if target == self.n_out:
                    target = 0

    cdef int _by_name(self) except -1:
        cdef Rec r
        cdef Py_ssize_t i
        while self.reader.next(&r, None, NULL) != STREAM_END:
            i = fnv1a64(r.data + 32, r.data[8] - 1) % <uint64_t> self.n_out
            self.outs.bufs[i].records += 1
            out_put(&self.outs.bufs[i], <const char *> r.data - 4, 4 + r.size)
            self.reader.release()
        return 0

    cdef int _by_tags(self, str missing) except -1:
        cdef Rec r
        cdef const uint8_t *found[MAX_TAGS]
        cdef Py_ssize_t i
        cdef uint64_t h
        cdef int policy = 0 if missing == "error" else (1 if missing == "drop" else 2)
        cdef int k
        while self.reader.next(&r, self.tags, found) != STREAM_END:
            if self.tags.key_of(&self.key, found, self.source, self.reader.records - 1, &r) == KEY_FOUND:
                h = fnv1a64(self.key.data, self.key.used)
                if self.table is not None:
                    self.table.slots[self.table.insert(self.key.data, self.key.used, h, -1)].count += 1
                i = h % <uint64_t> self.n_out
                self.outs.bufs[i].records += 1
                out_put(&self.outs.bufs[i], <const char *> r.data - 4, 4 + r.size)
            elif policy == 0:
                for k in range(self.tags.n):
                    if found[k] == NULL or ((found[k][0] == b'Z' or found[k][0] == b'H') and found[k][1] == 0):
                        break
                raise ValueError(f"{describe(self.source, self.reader.records - 1, &r)} has no "
                                 f"{self.tags.names[k]} tag (or an empty one)")
            elif policy == 1:
                self.dropped += 1
            else:
                self.unassigned_count += 1
                self.unassigned.records += 1
                out_put(self.unassigned, <const char *> r.data - 4, 4 + r.size)
            self.reader.release()
        return 0


def distribute_bam(int in_fd, out_fds, options, **kwargs):
    """Run a :class:`Distributor` (same arguments); returns its result."""
    return Distributor(in_fd, out_fds, options, **kwargs).run()


# -- collect ----------------------------------------------------------------------

cdef struct Head:
    bint done            # merge: no head record left
    bint has_head        # merge: a parsed record waits at the reader's start
    uint64_t pos_key     # coordinate key of the head record
    Scratch key          # tag key of the head record
    Scratch prev         # tag key of the previous record
    bint has_key
    bint prev_has_key
    bint has_prev


cdef class Collector:
    """Merge the raw BAM streams (or BGZF around them: pysam workers) of
    ``in_fds`` into one raw BAM stream on ``out_fd``.

    Each input starts with its own header, which is skipped; the output's
    header is the whole of ``header_fd`` (a raw BAM header) if given, else
    the first input's header. ``options.order``:

    - ``"any"``: whole records from whichever input has data;
    - ``"input"``: chunks in turn, each ended by a chunk-end frame (or by the
      end of its input): the input order comes back whatever the workers
      dropped or added. The other inputs are read ahead without limit while
      one is awaited, so workers never stall;
    - ``"coordinate"``: k-way merge by (refID as unsigned, so unmapped reads
      with refID -1 come last, pos), ties by input index;
    - ``"tag:XX"``: k-way merge by the canonical bytes of tag XX, compared
      bytewise; records without the tag first. An input that is not so
      sorted raises ValueError naming it.

    A merge waits for the input whose head record is smallest and reads
    ahead on the others without limit (a limit can deadlock workers fed by
    one distributor).
    """
    cdef list readers
    cdef PyObject **rd
    cdef Head *heads
    cdef pollfd *pfds
    cdef Py_ssize_t *index
    cdef Py_ssize_t *heap
    cdef Py_ssize_t n_in
    cdef OutBufs outs
    cdef OutBuf *out
    cdef int header_fd
    cdef object order
    cdef Tags tag
    cdef long long[::1] progress
    cdef bint has_progress
    cdef Py_ssize_t buffer_size

    def __cinit__(self, in_fds, int out_fd, options, *, int header_fd=-1, progress=None,
                  Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20):
        cdef Py_ssize_t i
        cdef list fds = [int(fd) for fd in in_fds]
        self.n_in = len(fds)
        self.header_fd = header_fd
        self.buffer_size = buffer_size
        order = options.order
        if order.startswith("tag:"):
            self.tag = Tags([order[4:]])
            order = "tag"
        if order not in ("any", "input", "coordinate", "tag"):
            raise ValueError(f"order must be any, input, coordinate or tag:XX, not {options.order!r}")
        if header_fd < 0 and self.n_in == 0:
            raise ValueError("collect needs an input or a header_fd")
        self.order = order
        self.readers = [RecordReader(fds[i], f"input {i}: ", order == "input", None, buffer_size)
                        for i in range(self.n_in)]
        cdef Py_ssize_t m = self.n_in if self.n_in else 1
        self.rd = <PyObject **> calloc(m, sizeof(PyObject *))
        self.heads = <Head *> calloc(m, sizeof(Head))
        self.pfds = <pollfd *> calloc(m, sizeof(pollfd))
        self.index = <Py_ssize_t *> calloc(m, sizeof(Py_ssize_t))
        self.heap = <Py_ssize_t *> calloc(m, sizeof(Py_ssize_t))
        if self.rd == NULL or self.heads == NULL or self.pfds == NULL or self.index == NULL or self.heap == NULL:
            raise MemoryError()
        for i in range(self.n_in):
            self.rd[i] = <PyObject *> self.readers[i]
        self.outs = OutBufs([out_fd], out_buffer_size)
        self.out = &self.outs.bufs[0]
        if progress is not None:
            self.progress = progress
            self.has_progress = True

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.heads != NULL:
            for i in range(self.n_in):
                scratch_free(&self.heads[i].key)
                scratch_free(&self.heads[i].prev)
        free(self.rd)
        free(self.heads)
        free(self.pfds)
        free(self.index)
        free(self.heap)

    cdef inline RecordReader _r(self, Py_ssize_t i):
        return <RecordReader> self.rd[i]

    def run(self):
        """Merge every input; returns {records, per_input, header_bytes}."""
        cdef Py_ssize_t i, header_bytes
        header_bytes = self._write_header()
        if self.order == "any":
            self._any()
        elif self.order == "input":
            self._in_turn()
        else:
            self._merge(self.order == "coordinate")
        out_flush(self.out)
        self._report(0)
        return {
            "records": self.out.records,
            "per_input": [self._r(i).records for i in range(self.n_in)],
            "header_bytes": header_bytes,
        }

    cdef Py_ssize_t _write_header(self) except -1:
        cdef RecordReader h
        cdef Py_ssize_t length
        if self.header_fd >= 0:
            h = RecordReader(self.header_fd, "header: ", False, None, self.buffer_size)
            h.read_header()
            length = h.header_len
            out_put(self.out, <const char *> h.header(), length)
            h.release()
            while not h.eof:  # the header FIFO holds the header and nothing else
                h.need = 1
                h.fill()
            if h.end != h.start:
                raise ValueError(f"header: {h.end - h.start} bytes after the BAM header")
            return length
        self._r(0).read_header()
        length = self._r(0).header_len
        out_put(self.out, <const char *> self._r(0).header(), length)
        self._r(0).release()
        return length

    cdef int _header_of(self, Py_ssize_t i) except -1:
        """Parse input i's header if it is in (it is not passed on): 1 when done."""
        cdef RecordReader r = self._r(i)
        if r.header_done:
            return 1
        if r.parse_header():
            r.release()
            return 1
        if r.eof:
            if r.end == r.start:
                raise ValueError(f"input {i}: not a BAM stream (empty)")
            raise ValueError(f"input {i}: truncated BAM header")
        r.need = r.hdr.need - (r.pos - r.start)
        return 0

    cdef void _report(self, long long backlog) noexcept:
        cdef Py_ssize_t i
        cdef long long total = 0
        if not self.has_progress:
            return
        for i in range(self.n_in):
            total += self._r(i).bytes_read
        self.progress[0] = self.out.records
        self.progress[1] = total
        self.progress[3] = backlog

    cdef int _poll_fill(self, Py_ssize_t must) except -1:
        """Wait until some input (``must``, if >= 0, always among those waited
        on) is readable, and read once from each readable one."""
        cdef Py_ssize_t i, k = 0
        cdef int rc
        cdef long long backlog = 0
        cdef RecordReader r
        for i in range(self.n_in):
            r = self._r(i)
            if r.eof:
                continue
            self.pfds[k].fd = r.fd
            self.pfds[k].events = POLLIN
            self.pfds[k].revents = 0
            self.index[k] = i
            k += 1
        if k == 0:
            return 0
        rc = io_poll(self.pfds, k, 0, "poll")
        if rc == 0:
            out_flush(self.out)  # nothing ready: hand over what we hold before blocking
            io_poll(self.pfds, k, -1, "poll")
        for i in range(k):
            if self.pfds[i].revents & POLLNVAL:
                raise OSError(9, f"poll: input {self.index[i]}: bad file descriptor {self.pfds[i].fd}")
            if self.pfds[i].revents & (POLLIN | POLLHUP | POLLERR):
                self._r(self.index[i]).fill()
                if self.has_progress:
                    backlog += pipe_backlog(self.pfds[i].fd)
        self._report(backlog)
        return k

    cdef int _any(self) except -1:
        cdef Py_ssize_t i, live
        cdef RecordReader r
        cdef Rec rec
        cdef int got
        while True:
            live = 0
            for i in range(self.n_in):
                r = self._r(i)
                if not self._header_of(i):
                    live += 1
                    continue
                while True:  # every complete record, passed on in one piece
                    got = r.parse(&rec, None, NULL)
                    if got != GOT_RECORD:
                        break
                    self.out.records += 1
                if r.pos > r.start:
                    out_put(self.out, <const char *> r.buf + r.start, r.pos - r.start)
                    r.release()
                if got == NEED_MORE:
                    live += 1
            if live == 0:
                return 0
            self._poll_fill(-1)

    cdef int _in_turn(self) except -1:
        cdef Py_ssize_t cur = 0, finished = 0
        cdef RecordReader r
        cdef Rec rec
        cdef int got
        cdef Py_ssize_t records_start
        while finished < self.n_in:
            r = self._r(cur)
            if self.heads[cur].done:
                cur = (cur + 1) % self.n_in
                continue
            if not self._header_of(cur):
                self._poll_fill(cur)
                continue
            while True:
                records_start = r.pos
                got = r.parse(&rec, None, NULL)
                if got == GOT_RECORD:
                    self.out.records += 1
                    continue
                break
            # everything parsed before this step is output; a frame is not
            if got == GOT_FRAME:
                if records_start > r.start:
                    out_put(self.out, <const char *> r.buf + r.start, records_start - r.start)
                r.release()
                cur = (cur + 1) % self.n_in
            elif got == STREAM_END:
                if r.pos > r.start:
                    out_put(self.out, <const char *> r.buf + r.start, r.pos - r.start)
                r.release()
                self.heads[cur].done = True
                finished += 1
                cur = (cur + 1) % self.n_in
            else:
                if r.pos > r.start:
                    out_put(self.out, <const char *> r.buf + r.start, r.pos - r.start)
                    r.release()
                self._poll_fill(cur)
        return 0

    # -- merges --

    cdef int _merge(self, bint by_position) except -1:
        cdef Py_ssize_t i, best, n_heap = 0
        cdef RecordReader r
        for i in range(self.n_in):  # every input's header first (each worker writes its header first)
            r = self._r(i)
            while not self._header_of(i):
                r.fill()
        for i in range(self.n_in):
            self._advance(i, by_position)
        for i in range(self.n_in):
            if not self.heads[i].done:
                self.heap[n_heap] = i
                n_heap += 1
                self._sift_up(by_position, n_heap - 1)
        while n_heap:
            best = self.heap[0]
            r = self._r(best)
            out_put(self.out, <const char *> r.buf + r.start, r.pos - r.start)  # exactly its head record
            self.out.records += 1
            r.release()
            self.heads[best].has_head = False
            self._advance(best, by_position)
            if self.heads[best].done:
                n_heap -= 1
                self.heap[0] = self.heap[n_heap]
            self._sift_down(by_position, n_heap, 0)
        return 0

    cdef int _advance(self, Py_ssize_t i, bint by_position) except -1:
        """Parse input i's next record as its head (reading as needed), note its
        key and check the input's order; mark the input done at its end."""
        cdef RecordReader r = self._r(i)
        cdef Head *h = &self.heads[i]
        cdef Rec rec
        cdef const uint8_t *found[1]
        cdef const BamCore *c
        cdef uint64_t key
        cdef Scratch swap
        cdef int got
        while True:
            got = r.parse(&rec, self.tag, found)
            if got != NEED_MORE:
                break
            self._poll_fill(i)
        if got == STREAM_END:
            h.done = True
            return 0
        h.has_head = True
        if by_position:
            c = core_of(rec.data)
            key = (<uint64_t> <uint32_t> c.refid << 32) | <uint64_t> (<uint32_t> c.pos ^ 0x80000000u)
            if h.has_prev and key < h.pos_key:
                raise ValueError(f"{describe(r.source, r.records - 1, &rec)}: the input is not coordinate-sorted")
            h.pos_key = key
        else:
            swap = h.prev
            h.prev = h.key
            h.key = swap
            h.prev_has_key = h.has_key
            h.has_key = self.tag.key_of(&h.key, found, r.source, r.records - 1, &rec) == KEY_FOUND
            if h.has_prev and _key_cmp(h.has_key, &h.key, h.prev_has_key, &h.prev) < 0:
                raise ValueError(f"{describe(r.source, r.records - 1, &rec)}: the input is not sorted by tag "
                                 f"{self.tag.names[0]}")
        h.has_prev = True
        return 0

    cdef inline bint _before(self, bint by_position, Py_ssize_t a, Py_ssize_t b) noexcept:
        """Whether input a's head record goes out before input b's (ties: lower index)."""
        cdef int c
        if by_position:
            if self.heads[a].pos_key != self.heads[b].pos_key:
                return self.heads[a].pos_key < self.heads[b].pos_key
        else:
            c = _key_cmp(self.heads[a].has_key, &self.heads[a].key, self.heads[b].has_key, &self.heads[b].key)
            if c:
                return c < 0
        return a < b

    cdef void _sift_up(self, bint by_position, Py_ssize_t i) noexcept:
        cdef Py_ssize_t parent, tmp
        while i > 0:
            parent = (i - 1) >> 1
            if not self._before(by_position, self.heap[i], self.heap[parent]):
                break
            tmp = self.heap[i]
            self.heap[i] = self.heap[parent]
            self.heap[parent] = tmp
            i = parent

    cdef void _sift_down(self, bint by_position, Py_ssize_t n, Py_ssize_t i) noexcept:
        cdef Py_ssize_t child, tmp
        while True:
            child = 2 * i + 1
            if child >= n:
                return
            if child + 1 < n and self._before(by_position, self.heap[child + 1], self.heap[child]):
                child += 1
            if not self._before(by_position, self.heap[child], self.heap[i]):
                return
            tmp = self.heap[i]
            self.heap[i] = self.heap[child]
            self.heap[child] = tmp
            i = child


cdef inline int _key_cmp(bint a_has, Scratch *a, bint b_has, Scratch *b) noexcept:
    """Order of tag keys: records without the tag first, then bytewise."""
    cdef Py_ssize_t n
    cdef int c
    if a_has != b_has:
        return -1 if not a_has else 1
    if not a_has:
        return 0
    n = a.used if a.used < b.used else b.used
    c = memcmp(a.data, b.data, n) if n else 0
    if c:
        return c
    return (a.used > b.used) - (a.used < b.used)


def collect_bam(in_fds, int out_fd, options, **kwargs):
    """Run a :class:`Collector` (same arguments); returns its result."""
    return Collector(in_fds, out_fd, options, **kwargs).run()


# -- the writer's pass ------------------------------------------------------------------------

cdef class RecordChunks:
    """The records of a raw BAM stream in checked chunks of whole records: what
    the BAM writer compresses, and how it counts what it wrote.

    ``header()`` returns the raw header; each ``next_chunk()`` returns the
    bytes of the next whole records (about ``chunk_bytes``), b"" at the end.
    """
    cdef RecordReader reader
    cdef Py_ssize_t chunk_bytes

    def __cinit__(self, int fd, source="", progress=None, Py_ssize_t chunk_bytes=1 << 20,
                  Py_ssize_t buffer_size=1 << 20):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, not {chunk_bytes}")
        self.reader = RecordReader(fd, source, False, progress, buffer_size)
        self.chunk_bytes = chunk_bytes

    def header(self):
        self.reader.read_header()
        data = self.reader.header_bytes
        self.reader.release()
        return data

    def next_chunk(self):
        cdef Rec rec
        cdef int got
        cdef RecordReader r = self.reader
        while r.pos - r.start < self.chunk_bytes:
            got = r.parse(&rec, None, NULL)
            if got == GOT_RECORD:
                continue
            if got == STREAM_END or r.pos > r.start:
                break
            r.fill()
        data = (<const char *> r.buf + r.start)[:r.pos - r.start]
        r.release()
        r.report()
        return data

    @property
    def records(self):
        return self.reader.records
