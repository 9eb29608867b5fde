# cython: language_level=3
"""Select and split kernels: keep the records of a raw BAM stream whose key
is (or is not) in a set (:class:`Filter`), or group records by key into
per-output buffers handed to a flush callback (:class:`Splitter`).

Keys are canonical tag values (bamflow.kernels._records: strings as they
are, integers in decimal; several tags joined by NUL); sets are
:class:`~bamflow.kernels._records.ValueTable` hash tables. Records come from
the one record reader, so every record is checked. No Python object is made
per record (the split callback runs once per flushed buffer).
"""

from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy

from bamflow.kernels._io cimport OutBuf, OutBufs, out_flush, out_put
from bamflow.kernels._posixio cimport fnv1a64
from bamflow.kernels._records cimport (
    KEY_FOUND, MAX_TAGS, STREAM_END, Rec, RecordReader, Scratch, Tags, ValueTable, scratch_free,
)


# -- filter -----------------------------------------------------------------------

cdef class Filter:
    """Copy the raw BAM stream on ``in_fd`` to ``out_fd`` (header unchanged),
    keeping the records whose key (canonical value of ``tags``) is in
    ``values`` (not in it, with ``invert``). Records without the tag(s) (or
    with an empty value) are always dropped, as by ``samtools view -D``."""
    cdef RecordReader reader
    cdef OutBufs outs
    cdef ValueTable values
    cdef Tags tags
    cdef bint invert
    cdef object source
    cdef Scratch key

    def __cinit__(self, int in_fd, int out_fd, ValueTable values not None, tags, bint invert=False, *,
                  source="", progress=None, Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20):
        self.reader = RecordReader(in_fd, source, False, progress, buffer_size, True)
        self.outs = OutBufs([out_fd], out_buffer_size)
        self.values = values
        self.tags = Tags(tags)
        self.invert = invert
        self.source = source

    def __dealloc__(self):
        scratch_free(&self.key)

    def run(self):
        """Returns {records_in, kept, dropped_not_listed, dropped_missing_tag, tags_seen}."""
        cdef Rec r
        cdef const uint8_t *found[MAX_TAGS]
        cdef OutBuf *out = &self.outs.bufs[0]
        cdef long long not_listed = 0, missing = 0
        cdef bint listed
        self.reader.read_header()
        out_put(out, <const char *> self.reader.header(), self.reader.header_len)
        self.reader.release()
        while self.reader.next(&r, self.tags, found) != STREAM_END:
            if self.tags.key_of(&self.key, found, self.source, self.reader.records - 1, &r) == KEY_FOUND:
                listed = self.values.lookup(self.key.data, self.key.used) >= 0
                if listed != self.invert:
                    out.records += 1
                    out_put(out, <const char *> r.data - 4, 4 + r.size)
                else:
                    not_listed += 1
            else:
                missing += 1
            self.reader.release()
        out_flush(out)
        self.reader.report()
        return {"records_in": self.reader.records, "kept": out.records, "dropped_not_listed": not_listed,
                "dropped_missing_tag": missing, "tags_seen": self.reader.tags_seen}


def filter_records(int in_fd, int out_fd, ValueTable values not None, tags, bint invert=False, **kwargs):
    """Run a :class:`Filter` (same arguments); returns its result."""
    return Filter(in_fd, out_fd, values, tags, invert, **kwargs).run()


# -- split ------------------------------------------------------------------------

cdef struct Out:
    char *data
    Py_ssize_t used
    Py_ssize_t cap
    long long reads
    bint written


cdef struct Rank:
    long long key
    Py_ssize_t id


cdef int _rank_desc(const void *a, const void *b) noexcept nogil:
    cdef long long x = (<const Rank *> a).key, y = (<const Rank *> b).key
    return (x < y) - (x > y)


cdef class Splitter:
    """Group the records of the raw BAM stream on ``in_fd`` by key (canonical
    value of ``tags``).

    ``selected=None``: every key is an output, numbered in order of first
    appearance. Else only keys in ``selected`` (a ValueTable) count, each going
    to its output number there (several keys may share one); other records
    are dropped (``not_selected``). Records without the tag(s): ``missing_tag``.

    Records are buffered per output; ``flush(out, key, data)`` receives the
    buffered records of output ``out`` (``key``: its bytes in open mode, else
    None) before its buffer would pass ``flush_size`` bytes (a larger record
    goes alone) if the output has at least ``min_reads`` reads, or when all
    buffers together pass ``memory_budget`` bytes (then the largest, those with
    ``min_reads`` reads first, until half the budget is free), and at the end.
    At the end, an output never flushed with fewer than ``min_reads`` reads is
    not flushed when ``drop_below`` (its reads count in ``below_min_reads``).
    ``header(header_bytes)`` is called with the raw header first.
    """
    cdef RecordReader reader
    cdef Tags tags
    cdef object source
    cdef Out *outs
    cdef Py_ssize_t n_outs
    cdef Py_ssize_t outs_cap
    cdef Py_ssize_t total_cap   # bytes allocated to buffers
    cdef object flush_cb
    cdef object header_cb
    cdef ValueTable keys        # open mode: keys → output numbers; else the selection
    cdef bint open_mode
    cdef long long flushes
    cdef Py_ssize_t flush_size
    cdef Py_ssize_t memory_budget
    cdef long long min_reads
    cdef bint drop_below
    cdef Scratch key

    def __cinit__(self, int in_fd, tags, flush, header=None, ValueTable selected=None, *,
                  Py_ssize_t flush_size=1 << 16, Py_ssize_t memory_budget=128 << 20,
                  long long min_reads=0, bint drop_below=True, source="", progress=None,
                  Py_ssize_t buffer_size=1 << 20):
        if flush_size < 1 or memory_budget < 1:
            raise ValueError("flush_size and memory_budget must be >= 1")
        self.reader = RecordReader(in_fd, source, False, progress, buffer_size, True)
        self.tags = Tags(tags)
        self.source = source
        self.flush_cb = flush
        self.header_cb = header
        self.open_mode = selected is None
        self.keys = ValueTable() if self.open_mode else selected
        self.flush_size = flush_size
        self.memory_budget = memory_budget
        self.min_reads = min_reads
        self.drop_below = drop_below
        if not self.open_mode:
            self._ensure(self.keys.max_output() + 1)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.outs != NULL:
            for i in range(self.n_outs):
                free(self.outs[i].data)
            free(self.outs)
        scratch_free(&self.key)

    cdef int _ensure(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t new_cap, i
        cdef Out *grown
        if n <= self.outs_cap:
            if n > self.n_outs:
                self.n_outs = n
            return 0
        new_cap = 2 * self.outs_cap if 2 * self.outs_cap >= n else n
        grown = <Out *> realloc(self.outs, new_cap * sizeof(Out))
        if grown == NULL:
            raise MemoryError()
        for i in range(self.outs_cap, new_cap):
            grown[i].data = NULL
            grown[i].used = grown[i].cap = 0
            grown[i].reads = 0
            grown[i].written = False
        self.outs = grown
        self.outs_cap = new_cap
        self.n_outs = n
        return 0

    cdef int _flush(self, Py_ssize_t i) except -1:
        cdef Out *o = &self.outs[i]
        cdef bytes data
        cdef object key = None
        if o.used == 0:
            return 0
        data = o.data[:o.used]
        if self.open_mode:
            key = self.keys.value_at(i)  # open mode: output i is the i-th key seen
        self.flush_cb(i, key, data)
        o = &self.outs[i]
        o.written = True
        o.used = 0
        free(o.data)
        o.data = NULL
        self.total_cap -= o.cap
        o.cap = 0
        self.flushes += 1
        return 0

    cdef int _shrink(self, Py_ssize_t target) except -1:
        """Flush buffers, largest first and outputs with ``min_reads`` reads
        before the others, until at most ``target`` bytes stay allocated."""
        cdef Py_ssize_t i, k = 0
        cdef Rank *ranks = <Rank *> malloc((self.n_outs if self.n_outs else 1) * sizeof(Rank))
        if ranks == NULL:
            raise MemoryError()
        try:
            for i in range(self.n_outs):
                if self.outs[i].used:
                    ranks[k].id = i
                    ranks[k].key = self.outs[i].cap + ((<long long> 1 << 50) if self.outs[i].reads >= self.min_reads else 0)
                    k += 1
            qsort(ranks, k, sizeof(Rank), _rank_desc)
            for i in range(k):
                if self.total_cap <= self.memory_budget // 2:
                    break
                self._flush(ranks[i].id)
        finally:
            free(ranks)
        return 0

    cdef int _add(self, int32_t oi, const Rec *r) except -1:
        cdef Out *o = &self.outs[oi]
        cdef Py_ssize_t size = 4 + <Py_ssize_t> r.size, new_cap
        cdef char *grown
        if o.used and o.used + size > self.flush_size and o.reads >= self.min_reads:
            # flush before the buffer would pass flush_size: buffers stay small
            # (below malloc's mmap threshold) and fill whole BGZF blocks
            self._flush(oi)
            o = &self.outs[oi]
        if o.used + size > o.cap:
            new_cap = 2 * o.cap if o.cap else 1024
            while new_cap < o.used + size:
                new_cap *= 2
            grown = <char *> realloc(o.data, new_cap)
            if grown == NULL:
                raise MemoryError()
            o.data = grown
            self.total_cap += new_cap - o.cap
            o.cap = new_cap
        memcpy(o.data + o.used, r.data - 4, size)
        o.used += size
        o.reads += 1
        if self.total_cap > self.memory_budget:
            self._shrink(self.memory_budget // 2)
        return 0

    def run(self):
        """Returns {records, missing_tag, not_selected, below_min_reads, flushes,
        tags_seen, outputs: [(out, key or None, reads, flushed), ...]} (every
        output with reads)."""
        cdef Rec r
        cdef const uint8_t *found[MAX_TAGS]
        cdef Py_ssize_t slot, i
        cdef uint64_t h
        cdef long long missing = 0, not_selected = 0, below = 0
        cdef ValueTable table = self.keys
        cdef Out *o
        self.reader.read_header()
        if self.header_cb is not None:
            self.header_cb(self.reader.header_bytes)
        self.reader.release()
        while self.reader.next(&r, self.tags, found) != STREAM_END:
            if self.tags.key_of(&self.key, found, self.source, self.reader.records - 1, &r) != KEY_FOUND:
                missing += 1
            else:
                h = fnv1a64(self.key.data, self.key.used)
                slot = table.find(self.key.data, self.key.used, h)
                if table.slots[slot].off < 0:
                    if self.open_mode:
                        slot = table.insert(self.key.data, self.key.used, h, -1)
                        self._ensure(table.n)
                    else:
                        slot = -1
                if slot < 0:
                    not_selected += 1
                else:
                    self._add(table.slots[slot].out, &r)
            self.reader.release()
        result = []
        for i in range(self.n_outs):
            o = &self.outs[i]
            if o.reads == 0:
                continue
            if self.drop_below and not o.written and o.reads < self.min_reads:
                below += o.reads
            else:
                self._flush(i)
                o = &self.outs[i]
            result.append((i, table.value_at(i) if self.open_mode else None, o.reads, bool(o.written)))
        self.reader.report()
        return {"records": self.reader.records, "missing_tag": missing, "not_selected": not_selected,
                "below_min_reads": below, "flushes": self.flushes, "tags_seen": self.reader.tags_seen,
                "outputs": result}


def split_records(int in_fd, tags, flush, header=None, ValueTable selected=None, **kwargs):
    """Run a :class:`Splitter` (same arguments); returns its result."""
    return Splitter(in_fd, tags, flush, header, selected, **kwargs).run()
