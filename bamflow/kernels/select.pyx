# cython: language_level=3
"""Select and split kernels: keep the records of a raw BAM stream whose tag
value is (or is not) in a set, or group records by tag value into per-value
buffers handed to a flush callback.

Keys are the *canonical tag value bytes* of bamflow.kernels.bam (``Z``/``H``:
the string; integers: decimal text; several tags joined by ``b"\\0"``). Sets
are C hash tables (open addressing, FNV-1a 64-bit hash, keys stored in an
arena and compared with memcmp): no Python object is made per record.

Input buffering (with BGZF unwrapping), header parsing, the aux walk and the
canonical tag bytes are the shared ones of bamflow.kernels._records.
"""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc, qsort
from libc.string cimport memchr, memcmp, memcpy

from bamflow.kernels._posixio cimport fnv1a64, write_all
from bamflow.kernels._records cimport (
    MAX_TAGS, HdrState, InBuf, Scratch, _append_canonical, _aux_offset, _fill, _find_tags,
    _init_inbuf, _parse_tags, _raise_errno, _read_header, _reserve, _u32,
)


# -- a set (or map to an output number) of keys: open addressing on FNV-1a 64 ------

cdef struct Slot:
    uint64_t hash
    Py_ssize_t off      # of the key in the arena; -1: empty slot
    Py_ssize_t length
    int32_t out


cdef class ValueSet:
    """A set of keys (bytes), each mapped to an output number.

    ``add_values(blob, sep)`` adds every ``sep``-separated value of ``blob`` in
    one call (the fast way to load millions of values). Keys are canonical tag
    value bytes; for several tags, join the values with ``b"\\0"``.
    """
    cdef Slot *slots
    cdef Py_ssize_t cap
    cdef Py_ssize_t n
    cdef uint8_t *arena
    cdef Py_ssize_t arena_used
    cdef Py_ssize_t arena_cap
    cdef Py_ssize_t *order   # slot of the i-th key added
    cdef Py_ssize_t order_cap

    def __cinit__(self):
        self.cap = 1024
        self.slots = <Slot *> malloc(self.cap * sizeof(Slot))
        self.arena_cap = 1 << 14
        self.arena = <uint8_t *> malloc(self.arena_cap)
        self.order_cap = 1024
        self.order = <Py_ssize_t *> malloc(self.order_cap * sizeof(Py_ssize_t))
        if self.slots == NULL or self.arena == NULL or self.order == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        for i in range(self.cap):
            self.slots[i].off = -1
        self.n = 0
        self.arena_used = 0

    def __dealloc__(self):
        free(self.slots)
        free(self.arena)
        free(self.order)

    def __init__(self, values=None, *, sep=b"\n"):
        if values is not None:
            if isinstance(values, (bytes, bytearray, memoryview)):
                self.add_values(values, sep)
            else:
                for v in values:
                    self.add(v)

    def __len__(self):
        return self.n

    cdef inline Py_ssize_t _find(self, const uint8_t *key, Py_ssize_t length, uint64_t h) noexcept:
        """The slot holding key, or the empty slot where it would go."""
        cdef Py_ssize_t mask = self.cap - 1
        cdef Py_ssize_t i = <Py_ssize_t> (h & <uint64_t> mask)
        cdef Slot *s
        while True:
            s = &self.slots[i]
            if s.off < 0:
                return i
            if s.hash == h and s.length == length and (length == 0 or memcmp(self.arena + s.off, key, length) == 0):
                return i
            i = (i + 1) & mask

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old_cap = self.cap, i, j, k
        cdef Slot *old = self.slots
        cdef Slot *fresh = <Slot *> malloc(2 * old_cap * sizeof(Slot))
        if fresh == NULL:
            raise MemoryError()
        for i in range(2 * old_cap):
            fresh[i].off = -1
        self.slots = fresh
        self.cap = 2 * old_cap
        for k in range(self.n):  # re-insert in insertion order, keeping ``order`` right
            i = self.order[k]
            j = <Py_ssize_t> (old[i].hash & <uint64_t> (self.cap - 1))
            while fresh[j].off >= 0:
                j = (j + 1) & (self.cap - 1)
            fresh[j] = old[i]
            self.order[k] = j
        free(old)
        return 0

    cdef Py_ssize_t _insert(self, const uint8_t *key, Py_ssize_t length, uint64_t h, int32_t out) except -1:
        """Add key (with output ``out``; -1: its own number, the count of keys
        before it) unless present; returns its slot."""
        cdef Py_ssize_t i = self._find(key, length, h)
        cdef Py_ssize_t new_cap
        cdef uint8_t *grown
        cdef Py_ssize_t *grown_order
        if self.slots[i].off >= 0:
            return i
        if 10 * (self.n + 1) > 7 * self.cap:
            self._grow()
            i = self._find(key, length, h)
        if self.arena_used + length > self.arena_cap:
            new_cap = 2 * self.arena_cap + length
            grown = <uint8_t *> realloc(self.arena, new_cap)
            if grown == NULL:
                raise MemoryError()
            self.arena = grown
            self.arena_cap = new_cap
        if self.n == self.order_cap:
            grown_order = <Py_ssize_t *> realloc(self.order, 2 * self.order_cap * sizeof(Py_ssize_t))
            if grown_order == NULL:
                raise MemoryError()
            self.order = grown_order
            self.order_cap *= 2
        if length:
            memcpy(self.arena + self.arena_used, key, length)
        self.slots[i].hash = h
        self.slots[i].off = self.arena_used
        self.slots[i].length = length
        self.slots[i].out = <int32_t> self.n if out < 0 else out
        self.arena_used += length
        self.order[self.n] = i
        self.n += 1
        return i

    cdef inline Py_ssize_t _lookup(self, const uint8_t *key, Py_ssize_t length) noexcept:
        """The slot of key, or -1."""
        cdef Py_ssize_t i = self._find(key, length, fnv1a64(key, length))
        return i if self.slots[i].off >= 0 else -1

    def add(self, value, int out=-1):
        """Add one value (str: UTF-8); returns True if it was new. ``out``: its
        output number (-1: the number of values added before it). A value
        already present with another output number raises ValueError."""
        cdef bytes b = value.encode() if isinstance(value, str) else bytes(value)
        cdef Py_ssize_t before = self.n, i
        i = self._insert(<const uint8_t *> b, len(b), fnv1a64(<const uint8_t *> b, len(b)), out)
        if self.n == before and out >= 0 and self.slots[i].out != out:
            raise ValueError(f"value {b!r} given for outputs {self.slots[i].out} and {out}")
        return self.n > before

    def add_values(self, const unsigned char[:] blob, sep=b"\n", int out=-1, bint strip_cr=True,
                   bint skip_empty=True):
        """Add every ``sep``-separated value of ``blob`` (a trailing separator is
        fine; with ``strip_cr`` a trailing ``\\r`` is cut; with ``skip_empty``
        empty values are skipped). Returns the number of new values."""
        cdef Py_ssize_t n = blob.shape[0], start = 0, end, length, before = self.n, i
        cdef const uint8_t *base
        cdef const uint8_t *hit
        cdef uint8_t c
        if len(sep) != 1:
            raise ValueError("sep must be one byte")
        c = (<bytes> bytes(sep))[0]
        if n == 0:
            return 0
        base = &blob[0]
        while start <= n:
            hit = <const uint8_t *> memchr(base + start, c, n - start) if start < n else NULL
            end = (hit - base) if hit != NULL else n
            length = end - start
            if strip_cr and length and base[start + length - 1] == 13:
                length -= 1
            if not (length == 0 and (skip_empty or hit == NULL)):
                i = self._insert(base + start, length, fnv1a64(base + start, length), out)
                if out >= 0 and self.slots[i].out != out:
                    raise ValueError(f"value {(<const char *> base + start)[:length]!r} given for "
                                     f"outputs {self.slots[i].out} and {out}")
            if hit == NULL:
                break
            start = end + 1
        return self.n - before

    def __contains__(self, value):
        cdef bytes b = value.encode() if isinstance(value, str) else bytes(value)
        return self._lookup(<const uint8_t *> b, len(b)) >= 0

    def output_of(self, value):
        """The output number of value, or -1 if absent."""
        cdef bytes b = value.encode() if isinstance(value, str) else bytes(value)
        cdef Py_ssize_t i = self._lookup(<const uint8_t *> b, len(b))
        return self.slots[i].out if i >= 0 else -1

    def value_at(self, Py_ssize_t k):
        """The k-th value added (0-based)."""
        if not 0 <= k < self.n:
            raise IndexError(k)
        cdef Slot *s = &self.slots[self.order[k]]
        return (<const char *> self.arena + s.off)[:s.length]

    def values(self):
        """Every value, in the order added."""
        cdef Py_ssize_t k
        cdef Slot *s
        out = []
        for k in range(self.n):
            s = &self.slots[self.order[k]]
            out.append((<const char *> self.arena + s.off)[:s.length])
        return out


cdef int _make_key(Scratch *key, const uint8_t **found, int n_tags) except -1:
    cdef int k
    key.used = 0
    for k in range(n_tags):
        if k:
            _reserve(key, 1)
            key.data[key.used] = 0
            key.used += 1
        _append_canonical(key, found[k])
    return 0


cdef int _tags_of(object tag, uint16_t *tags, list names) except -1:
    if isinstance(tag, str):
        tag = tag.split(",")
    elif isinstance(tag, (bytes, bytearray)):
        tag = bytes(tag).split(b",")
    return _parse_tags(tag, tags, names)


# -- filter -----------------------------------------------------------------------

def filter_records(int in_fd, int out_fd, ValueSet values not None, tag=b"CB", bint invert=False,
                   *, Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20):
    """Copy the raw BAM stream on ``in_fd`` to ``out_fd`` (header unchanged),
    keeping the records whose key (canonical bytes of ``tag``; ``"CB,UB"``:
    values joined by NUL) is in ``values`` (not in it, with ``invert``).
    Records without the tag(s) are always dropped, as by ``samtools view -D``.

    Returns {"records_in", "kept", "dropped_not_listed", "dropped_missing_tag"}.
    """
    cdef uint16_t tags[MAX_TAGS]
    cdef const uint8_t *found[MAX_TAGS]
    cdef list names = []
    cdef int n_tags = _tags_of(tag, tags, names)
    cdef InBuf ib
    cdef HdrState st
    cdef Scratch key
    cdef char *out = NULL
    cdef Py_ssize_t used = 0, avail, aux, need, size
    cdef uint32_t bs
    cdef const uint8_t *rec
    cdef long long records = 0, kept = 0, not_listed = 0, missing = 0
    cdef bint listed
    if buffer_size < 1 or out_buffer_size < 1:
        raise ValueError("buffer sizes must be >= 1")
    ib.data = NULL
    ib.wire = NULL
    key.data = NULL
    key.used = key.cap = 0
    try:
        out = <char *> malloc(out_buffer_size)
        if out == NULL:
            raise MemoryError()
        _init_inbuf(&ib, in_fd, buffer_size)
        _read_header(&ib, &st, "")
        if write_all(out_fd, ib.data + ib.start, st.off) < 0:
            _raise_errno("write")
        ib.start += st.off
        while True:
            avail = ib.end - ib.start
            if avail >= 4:
                bs = _u32(<const uint8_t *> ib.data + ib.start)
                if avail - 4 >= <Py_ssize_t> bs:
                    rec = <const uint8_t *> ib.data + ib.start + 4
                    aux = _aux_offset(rec, bs, records)
                    size = 4 + <Py_ssize_t> bs
                    if _find_tags(rec, bs, aux, tags, n_tags, found, records) == n_tags:
                        _make_key(&key, found, n_tags)
                        listed = values._lookup(key.data, key.used) >= 0
                        if listed != invert:
                            kept += 1
                            if used + size > out_buffer_size:
                                if write_all(out_fd, out, used) < 0:
                                    _raise_errno("write")
                                used = 0
                            if size > out_buffer_size:
                                if write_all(out_fd, <const char *> rec - 4, size) < 0:
                                    _raise_errno("write")
                            else:
                                memcpy(out + used, rec - 4, size)
                                used += size
                        else:
                            not_listed += 1
                    else:
                        missing += 1
                    records += 1
                    ib.start += size
                    continue
                need = 4 + <Py_ssize_t> bs
            else:
                need = 4
            if ib.eof:
                if avail:
                    raise ValueError(f"BAM stream ends inside record {records}")
                break
            _fill(&ib, need)
        if used and write_all(out_fd, out, used) < 0:
            _raise_errno("write")
        return {"records_in": records, "kept": kept, "dropped_not_listed": not_listed,
                "dropped_missing_tag": missing}
    finally:
        free(out)
        free(ib.data)
        free(ib.wire)
        free(key.data)


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


cdef class _Splitter:
    cdef Out *outs
    cdef Py_ssize_t n_outs
    cdef Py_ssize_t outs_cap
    cdef Py_ssize_t total_cap   # bytes allocated to buffers
    cdef object flush_cb
    cdef ValueSet keys          # open mode: keys → output numbers
    cdef bint open_mode
    cdef long long flushes

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.outs != NULL:
            for i in range(self.n_outs):
                free(self.outs[i].data)
            free(self.outs)

    cdef int _ensure(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t new_cap
        cdef Out *grown
        if n <= self.outs_cap:
            if n > self.n_outs:
                self.n_outs = n
            return 0
        new_cap = 2 * self.outs_cap if 2 * self.outs_cap >= n else n
        grown = <Out *> realloc(self.outs, new_cap * sizeof(Out))
        if grown == NULL:
            raise MemoryError()
        memset_outs(grown + self.outs_cap, new_cap - self.outs_cap)
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
        o = NULL  # the callback cannot move outs, but be safe
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

    cdef int _shrink(self, Py_ssize_t target, long long min_reads) except -1:
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
                    ranks[k].key = self.outs[i].cap + ((<long long> 1 << 50) if self.outs[i].reads >= min_reads else 0)
                    k += 1
            qsort(ranks, k, sizeof(Rank), _rank_desc)
            for i in range(k):
                if self.total_cap <= target:
                    break
                self._flush(ranks[i].id)
        finally:
            free(ranks)
        return 0


cdef void memset_outs(Out *o, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        o[i].data = NULL
        o[i].used = 0
        o[i].cap = 0
        o[i].reads = 0
        o[i].written = False


def split_records(int in_fd, tag, flush, header=None, ValueSet selected=None, *,
                  Py_ssize_t flush_size=1 << 16, Py_ssize_t memory_budget=128 << 20,
                  long long min_reads=0, bint drop_below=True, Py_ssize_t buffer_size=1 << 20):
    """Group the records of the raw BAM stream on ``in_fd`` by key (canonical
    bytes of ``tag``; ``"CB,UB"``: values joined by NUL).

    ``selected=None``: every key is an output, numbered in order of first
    appearance. Else only keys in ``selected`` count, each going to its output
    number there (several keys may share one); other records are dropped
    (``not_selected``). Records without the tag(s): ``missing_tag``.

    Records are buffered per output; ``flush(out, key, data)`` receives the
    buffered records of output ``out`` (``key``: its bytes in open mode, else
    None) before its buffer would pass ``flush_size`` bytes (a record larger
    than that goes alone) if the output has at
    least ``min_reads`` reads, or when all buffers together pass
    ``memory_budget`` bytes (then the largest, those with ``min_reads`` reads
    first, until half the budget is free), and at the end. At the end, an
    output never flushed with fewer than ``min_reads`` reads is not flushed
    when ``drop_below`` (its reads count in ``below_min_reads``).
    ``header(header_bytes)`` is called with the raw header first.

    Returns {"records", "missing_tag", "not_selected", "below_min_reads",
    "flushes", "outputs": [(out, key or None, reads, flushed), ...]} for every
    output with reads.
    """
    cdef uint16_t tags[MAX_TAGS]
    cdef const uint8_t *found[MAX_TAGS]
    cdef list names = []
    cdef int n_tags = _tags_of(tag, tags, names)
    cdef InBuf ib
    cdef HdrState st
    cdef Scratch key
    cdef Py_ssize_t avail, aux, need, size, slot, i, new_cap
    cdef uint32_t bs
    cdef const uint8_t *rec
    cdef uint64_t h
    cdef long long records = 0, missing = 0, not_selected = 0, below = 0
    cdef int32_t oi
    cdef Out *o
    cdef char *grown
    cdef _Splitter sp = _Splitter()
    cdef ValueSet table
    if flush_size < 1 or memory_budget < 1 or buffer_size < 1:
        raise ValueError("flush_size, memory_budget and buffer_size must be >= 1")
    sp.flush_cb = flush
    sp.open_mode = selected is None
    if sp.open_mode:
        sp.keys = ValueSet()
        table = sp.keys
    else:
        table = selected
        n = 0
        for v in range(selected.n):
            if selected.slots[selected.order[v]].out + 1 > n:
                n = selected.slots[selected.order[v]].out + 1
        sp._ensure(n)
    ib.data = NULL
    ib.wire = NULL
    key.data = NULL
    key.used = key.cap = 0
    try:
        _init_inbuf(&ib, in_fd, buffer_size)
        _read_header(&ib, &st, "")
        if header is not None:
            header(ib.data[ib.start:ib.start + st.off])
        ib.start += st.off
        while True:
            avail = ib.end - ib.start
            if avail >= 4:
                bs = _u32(<const uint8_t *> ib.data + ib.start)
                if avail - 4 >= <Py_ssize_t> bs:
                    rec = <const uint8_t *> ib.data + ib.start + 4
                    aux = _aux_offset(rec, bs, records)
                    size = 4 + <Py_ssize_t> bs
                    records += 1
                    ib.start += size
                    if _find_tags(rec, bs, aux, tags, n_tags, found, records - 1) != n_tags:
                        missing += 1
                        continue
                    _make_key(&key, found, n_tags)
                    h = fnv1a64(key.data, key.used)
                    if sp.open_mode:
                        slot = table._find(key.data, key.used, h)
                        if table.slots[slot].off < 0:
                            slot = table._insert(key.data, key.used, h, -1)
                            sp._ensure(table.n)
                    else:
                        slot = table._find(key.data, key.used, h)
                        if table.slots[slot].off < 0:
                            not_selected += 1
                            continue
                    oi = table.slots[slot].out
                    o = &sp.outs[oi]
                    if o.used and o.used + size > flush_size and o.reads >= min_reads:
                        # flush before the buffer would pass flush_size: buffers stay
                        # small (below malloc's mmap threshold) and fill whole blocks
                        sp._flush(oi)
                        o = &sp.outs[oi]
                    if o.used + size > o.cap:
                        new_cap = 2 * o.cap if o.cap else 1024
                        while new_cap < o.used + size:
                            new_cap *= 2
                        grown = <char *> realloc(o.data, new_cap)
                        if grown == NULL:
                            raise MemoryError()
                        o.data = grown
                        sp.total_cap += new_cap - o.cap
                        o.cap = new_cap
                    memcpy(o.data + o.used, rec - 4, size)
                    o.used += size
                    o.reads += 1
                    if sp.total_cap > memory_budget:
                        sp._shrink(memory_budget // 2, min_reads)
                    continue
                need = 4 + <Py_ssize_t> bs
            else:
                need = 4
            if ib.eof:
                if avail:
                    raise ValueError(f"BAM stream ends inside record {records}")
                break
            _fill(&ib, need)
        result = []
        for i in range(sp.n_outs):
            o = &sp.outs[i]
            if o.reads == 0:
                continue
            if drop_below and not o.written and o.reads < min_reads:
                below += o.reads
                kb = None
            else:
                sp._flush(i)
                o = &sp.outs[i]
            kb = None
            if sp.open_mode:
                kb = table.value_at(i)
            result.append((i, kb, o.reads, bool(o.written)))
        return {"records": records, "missing_tag": missing, "not_selected": not_selected,
                "below_min_reads": below, "flushes": sp.flushes, "outputs": result}
    finally:
        free(ib.data)
        free(ib.wire)
        free(key.data)
