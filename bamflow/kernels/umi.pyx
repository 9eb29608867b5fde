# cython: language_level=3
"""UMI kernels of the dedup, count and group presets: umi_tools' bundling and
UMI clustering over raw BAM records, in C.

:class:`UmiKernel` reads a raw BAM stream through the one record layer
(bamflow.kernels._records: every record is checked, tag values follow its
canonical rule) and does what ``umi_tools dedup``, ``count`` and ``group``
(UMI-tools 1.1.6) do, without a Python object per record:

- **bundles** exactly as umi_tools' ``get_bundles`` defines them: per
  reference; position mode: the 5' end including soft clips, strand, the
  splice offset (``--spliced-is-unique``), TLEN (``--paired``), read length
  (``--read-length``) and cell; per-gene mode: gene (or contig) and cell.
  Bundles are flushed as umi_tools flushes them (a gap of more than 1,000 bp
  between reads, or a new reference; per gene: a new reference), in the order
  it yields them (positions, then keys, sorted);
- the **representative read** of a UMI is the read of highest MAPQ; among
  equal MAPQ umi_tools draws at random (a reservoir of Python's ``random``).
  With ``seed_state`` (``random.Random(seed).getstate()``) the same Mersenne
  Twister draws are made in the same order (and ``--subset`` draws too), so
  the same reads are kept; without it the first read is kept (and
  ``--subset`` keeps a read by a hash of its name);
- UMIs are packed 2 bits a base (ACGT, at most 32 bases); neighbours are
  found by enumerating substitutions (O(n·3L) at threshold 1) or, for few
  UMIs, by comparing all pairs (XOR and popcount); UMIs with other
  characters are compared byte by byte. The five methods and their tie rules
  are umi_tools' (``network.UMIClusterer``); :func:`cluster_umis` exposes
  them for the tests, which compare them with bamflow.presets.umi;
- output: dedup writes the kept records (or every record, 0x400 set on the
  duplicates) in umi_tools' output order (its ``samtools sort`` of the order
  it writes: reference, position, strand, then the order written); count
  fills arrays; group writes every record with UG/BX tags and the group
  table.
"""

import sys

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memset, strlen

from bamflow.kernels._tables cimport pack2
from bamflow.kernels._io cimport OutBuf, OutBufs, out_flush, out_put
from bamflow.kernels._posixio cimport fnv1a64
from bamflow.kernels._records cimport (
    GOT_FRAME, KEY_FOUND, KEY_MISSING, MAX_TAGS, STREAM_END, BamCore, Rec, RecordReader, Scratch, Tags, ValueTable,
    core_of, describe, put_u32, scratch_free, scratch_put, scratch_put_decimal, scratch_reserve, tag_key, u32,
)

if sys.byteorder != "little":
    raise ImportError("bamflow's kernels need a little-endian machine")

METHODS = ("unique", "percentile", "cluster", "adjacency", "directional")
cdef enum:
    M_UNIQUE = 0
    M_PERCENTILE = 1
    M_CLUSTER = 2
    M_ADJACENCY = 3
    M_DIRECTIONAL = 4


cdef extern from *:
    """
    static inline int bf_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    """
    int bf_popcount64(unsigned long long x) nogil


cdef int _method_code(str method) except -1:
    try:
        return METHODS.index(method)
    except ValueError:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}") from None


# -- growable arrays ----------------------------------------------------------------------------

cdef int _grow(void **p, Py_ssize_t *cap, Py_ssize_t need, Py_ssize_t item) except -1:
    """Make ``*p`` hold at least ``need`` items of ``item`` bytes (doubling)."""
    cdef Py_ssize_t new_cap
    cdef void *q
    if need <= cap[0]:
        return 0
    new_cap = cap[0] * 2 if cap[0] else 16
    while new_cap < need:
        new_cap *= 2
    q = realloc(p[0], new_cap * item)
    if q == NULL:
        raise MemoryError()
    p[0] = q
    cap[0] = new_cap
    return 0


cdef Py_ssize_t _regrow(void **p, Py_ssize_t cap, Py_ssize_t need, Py_ssize_t item) except -1:
    """One of several parallel arrays that share a capacity: grow ``*p`` from
    ``cap`` to hold ``need`` items; returns the new capacity (the same for all)."""
    _grow(p, &cap, need, item)
    return cap


# -- a stable merge sort of int32 indexes with a context comparator -----------------------------

ctypedef int (*cmp_fn)(void *ctx, int32_t a, int32_t b) noexcept


cdef int _msort(int32_t *a, Py_ssize_t n, cmp_fn cmp, void *ctx, int32_t **tmp, Py_ssize_t *tmp_cap) except -1:
    """Sort ``a[:n]`` stably by ``cmp`` (bottom-up merge sort; insertion sort for short runs)."""
    cdef Py_ssize_t width, lo, mid, hi, i, j, k, run = 16
    cdef int32_t *src
    cdef int32_t *dst
    cdef int32_t *swap
    cdef int32_t x
    if n < 2:
        return 0
    lo = 0
    while lo < n:
        hi = lo + run if lo + run < n else n
        for i in range(lo + 1, hi):
            x = a[i]
            j = i - 1
            while j >= lo and cmp(ctx, a[j], x) > 0:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = x
        lo = hi
    if n <= run:
        return 0
    _grow(<void **> tmp, tmp_cap, n, sizeof(int32_t))
    src = a
    dst = tmp[0]
    width = run
    while width < n:
        lo = 0
        while lo < n:
            mid = lo + width if lo + width < n else n
            hi = lo + 2 * width if lo + 2 * width < n else n
            i = lo
            j = mid
            k = lo
            while i < mid and j < hi:
                if cmp(ctx, src[j], src[i]) < 0:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
            lo = hi
        swap = src
        src = dst
        dst = swap
        width *= 2
    if src != a:
        memcpy(a, src, n * sizeof(int32_t))
    return 0


# -- Mersenne Twister (Python's random.random(), from its state) ---------------------------------

cdef struct MT:
    uint32_t mt[624]
    int index


cdef void _mt_twist(MT *s) noexcept:
    cdef int kk
    cdef uint32_t y
    cdef uint32_t *mt = s.mt
    for kk in range(624 - 397):
        y = (mt[kk] & 0x80000000u) | (mt[kk + 1] & 0x7fffffffu)
        mt[kk] = mt[kk + 397] ^ (y >> 1) ^ (0x9908b0dfu if y & 1 else 0u)
    for kk in range(624 - 397, 623):
        y = (mt[kk] & 0x80000000u) | (mt[kk + 1] & 0x7fffffffu)
        mt[kk] = mt[kk + (397 - 624)] ^ (y >> 1) ^ (0x9908b0dfu if y & 1 else 0u)
    y = (mt[623] & 0x80000000u) | (mt[0] & 0x7fffffffu)
    mt[623] = mt[396] ^ (y >> 1) ^ (0x9908b0dfu if y & 1 else 0u)
    s.index = 0


cdef inline uint32_t _mt_u32(MT *s) noexcept:
    cdef uint32_t y
    if s.index >= 624:
        _mt_twist(s)
    y = s.mt[s.index]
    s.index += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9d2c5680u
    y ^= (y << 15) & 0xefc60000u
    y ^= y >> 18
    return y


cdef inline double _mt_random(MT *s) noexcept:
    """CPython's random_random: 53 random bits from two 32-bit outputs."""
    cdef uint32_t a = _mt_u32(s) >> 5
    cdef uint32_t b = _mt_u32(s) >> 6
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)


cdef int _mt_set_state(MT *s, object state) except -1:
    """``state``: what ``random.Random(seed).getstate()`` returns."""
    version, internal, _ = state
    if version != 3 or len(internal) != 625:
        raise ValueError("seed_state must be random.Random(seed).getstate()")
    for k in range(624):
        s.mt[k] = <uint32_t> internal[k]
    s.index = <int> internal[624]
    return 0


def mt_random_sequence(state, int n):
    """``n`` draws of random.random() from ``state`` (for the tests)."""
    cdef MT s
    _mt_set_state(&s, state)
    return [_mt_random(&s) for _ in range(n)]


# -- UMIs ------------------------------------------------------------------------------------------

cdef uint64_t LOW_BITS = 0x5555555555555555ULL


cdef inline int _packed_distance(uint64_t a, uint64_t b) noexcept:
    cdef uint64_t x = a ^ b
    return bf_popcount64((x | (x >> 1)) & LOW_BITS)


# -- the clusterer ---------------------------------------------------------------------------------

cdef struct CSlot:
    uint64_t code
    int32_t v


cdef class Clusterer:
    """umi_tools' UMIClusterer over arrays: the UMIs of one bundle in their
    order (``codes``/``lens`` when packed, else ``ptrs``/``lens``), their
    read ``counts``; ``run`` leaves the groups in ``members`` (UMI indexes,
    each group's representative first) and ``starts`` (n_groups + 1 offsets)."""
    cdef int method
    cdef int threshold
    # input
    cdef Py_ssize_t n
    cdef bint packed
    cdef uint64_t *codes
    cdef const uint8_t **ptrs
    cdef int32_t *lens
    cdef int64_t *counts
    cdef int32_t length               # the bundle's UMI length while it can be packed
    cdef Py_ssize_t in_cap
    # output
    cdef int32_t *members
    cdef int32_t *starts
    cdef Py_ssize_t n_groups
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t out_cap
    cdef Py_ssize_t starts_cap
    # graph (CSR)
    cdef int32_t *edges               # pairs (a, b)
    cdef Py_ssize_t n_edges
    cdef Py_ssize_t edges_cap
    cdef int32_t *adj_start
    cdef int32_t *adj
    cdef Py_ssize_t adj_cap
    cdef Py_ssize_t adj_start_cap
    # work
    cdef int32_t *order
    cdef int32_t *comp
    cdef int32_t *queue
    cdef int32_t *mark
    cdef int32_t *observed
    cdef int32_t stamp
    cdef int32_t *tmp
    cdef Py_ssize_t tmp_cap
    cdef Py_ssize_t work_cap
    cdef CSlot *table
    cdef Py_ssize_t table_cap
    cdef int64_t *sortbuf
    cdef Py_ssize_t sortbuf_cap
    # statistics (umi_tools' positions, total and max UMIs per position)
    cdef readonly long long positions
    cdef readonly long long total_umis
    cdef readonly long long max_umis

    def __cinit__(self, str method="directional", int threshold=1):
        self.method = _method_code(method)
        if threshold < 0:
            raise ValueError(f"the edit distance threshold must be >= 0, not {threshold}")
        self.threshold = threshold

    def __dealloc__(self):
        free(self.codes)
        free(self.ptrs)
        free(self.lens)
        free(self.counts)
        free(self.members)
        free(self.starts)
        free(self.edges)
        free(self.adj_start)
        free(self.adj)
        free(self.order)
        free(self.comp)
        free(self.queue)
        free(self.mark)
        free(self.observed)
        free(self.tmp)
        free(self.table)
        free(self.sortbuf)

    cdef int reserve(self, Py_ssize_t n) except -1:
        """Room for a bundle of ``n`` UMIs (call before filling the inputs)."""
        cdef Py_ssize_t c
        if n > self.in_cap:
            c = _regrow(<void **> &self.codes, self.in_cap, n, sizeof(uint64_t))
            c = _regrow(<void **> &self.ptrs, self.in_cap, n, sizeof(uint8_t *))
            c = _regrow(<void **> &self.lens, self.in_cap, n, sizeof(int32_t))
            c = _regrow(<void **> &self.counts, self.in_cap, n, sizeof(int64_t))
            self.in_cap = c
        if n > self.work_cap:
            c = _regrow(<void **> &self.order, self.work_cap, n, sizeof(int32_t))
            c = _regrow(<void **> &self.comp, self.work_cap, n, sizeof(int32_t))
            c = _regrow(<void **> &self.queue, self.work_cap, n, sizeof(int32_t))
            c = _regrow(<void **> &self.mark, self.work_cap, n, sizeof(int32_t))
            c = _regrow(<void **> &self.observed, self.work_cap, n, sizeof(int32_t))
            memset(self.mark, 0, c * sizeof(int32_t))
            memset(self.observed, 0, c * sizeof(int32_t))
            self.stamp = 0
            self.work_cap = c
        _grow(<void **> &self.members, &self.out_cap, n, sizeof(int32_t))
        _grow(<void **> &self.starts, &self.starts_cap, n + 1, sizeof(int32_t))
        self.n = n
        self.packed = True
        self.length = -1
        return 0

    cdef inline void set_umi(self, Py_ssize_t i, const uint8_t *p, int32_t n, int64_t count) noexcept:
        """UMI i (of the n reserved): its bytes and reads; packed while every UMI so far is."""
        cdef uint64_t code = 0
        cdef bint packed = self.packed and pack2(p, n, &code)
        self.set_coded(i, code, packed, p, n, count)

    cdef inline void set_coded(self, Py_ssize_t i, uint64_t code, bint packed, const uint8_t *p, int32_t n,
                               int64_t count) noexcept:
        """UMI i given by its 2-bit code (``packed``) or its bytes ``p``."""
        self.ptrs[i] = p
        self.lens[i] = n
        self.counts[i] = count
        self.codes[i] = code
        if self.packed:
            if self.length < 0:
                self.length = n
            if not packed or n != self.length:
                self.packed = False

    cdef inline int32_t _new_stamp(self) noexcept:
        self.stamp += 1
        return self.stamp

    # -- ordering -------------------------------------------------------------------

    cdef int _alpha_cmp(self, int32_t a, int32_t b) noexcept:
        """Python's bytes order of UMIs a and b."""
        cdef int32_t la, lb
        cdef int c
        if self.packed:
            return (self.codes[a] > self.codes[b]) - (self.codes[a] < self.codes[b])
        la = self.lens[a]
        lb = self.lens[b]
        c = memcmp(self.ptrs[a], self.ptrs[b], la if la < lb else lb) if (la and lb) else 0
        if c:
            return c
        return (la > lb) - (la < lb)

    cdef int _add_edge(self, int32_t a, int32_t b) except -1:
        _grow(<void **> &self.edges, &self.edges_cap, 2 * (self.n_edges + 1), sizeof(int32_t))
        self.edges[2 * self.n_edges] = a
        self.edges[2 * self.n_edges + 1] = b
        self.n_edges += 1
        return 0

    # -- neighbours ----------------------------------------------------------------

    cdef int _edges_by_pairs(self) except -1:
        cdef Py_ssize_t i, j, k
        cdef int32_t la, d
        cdef int t = self.threshold
        cdef const uint8_t *p
        cdef const uint8_t *q
        for i in range(self.n):
            for j in range(i + 1, self.n):
                if self.packed:
                    if _packed_distance(self.codes[i], self.codes[j]) <= t:
                        self._add_edge(<int32_t> i, <int32_t> j)
                else:
                    la = self.lens[i]
                    if la != self.lens[j]:
                        continue  # UMIs of different lengths are never neighbours
                    p = self.ptrs[i]
                    q = self.ptrs[j]
                    d = 0
                    for k in range(la):
                        if p[k] != q[k]:
                            d += 1
                            if d > t:
                                break
                    if d <= t:
                        self._add_edge(<int32_t> i, <int32_t> j)
        return 0

    cdef Py_ssize_t _table_find(self, uint64_t code) noexcept:
        cdef Py_ssize_t mask = self.table_cap - 1
        cdef Py_ssize_t i = <Py_ssize_t> ((code * 0x9E3779B97F4A7C15ULL) >> 20) & mask
        while self.table[i].v >= 0:
            if self.table[i].code == code:
                return self.table[i].v
            i = (i + 1) & mask
        return -1

    cdef int _enumerate(self, int32_t i, uint64_t code, int first_pos, int depth, int length) except -1:
        """Every code at ``depth`` more substitutions (at positions >= first_pos) from ``code``."""
        cdef int p, b, shift
        cdef uint64_t base, alt
        cdef Py_ssize_t j
        for p in range(first_pos, length):
            shift = 2 * (length - 1 - p)
            base = (code >> shift) & 3
            for b in range(4):
                if <uint64_t> b == base:
                    continue
                alt = (code & ~(<uint64_t> 3 << shift)) | (<uint64_t> b << shift)
                j = self._table_find(alt)
                if j > i:
                    self._add_edge(i, <int32_t> j)
                if depth > 1:
                    self._enumerate(i, alt, p + 1, depth - 1, length)
        return 0

    cdef int _edges_by_substitutions(self) except -1:
        cdef Py_ssize_t i, need = 1, mask, k
        while need < 2 * self.n:
            need *= 2
        if need > self.table_cap:
            free(self.table)
            self.table = <CSlot *> malloc(need * sizeof(CSlot))
            if self.table == NULL:
                self.table_cap = 0
                raise MemoryError()
            self.table_cap = need
        for k in range(self.table_cap):
            self.table[k].v = -1
        mask = self.table_cap - 1
        for i in range(self.n):
            k = <Py_ssize_t> ((self.codes[i] * 0x9E3779B97F4A7C15ULL) >> 20) & mask
            while self.table[k].v >= 0:
                k = (k + 1) & mask
            self.table[k].code = self.codes[i]
            self.table[k].v = <int32_t> i
        for i in range(self.n):
            self._enumerate(<int32_t> i, self.codes[i], 0, self.threshold, self.lens[0])
        return 0

    cdef int _build_graph(self, bint directed) except -1:
        """Neighbour lists (CSR) within the threshold; directed: a → b only if
        count(a) >= 2·count(b) − 1 (umi_tools' directional edges)."""
        cdef Py_ssize_t i, k, need, length, cost, t
        cdef int32_t a, b
        cdef double enum_cost = 0, c = 1
        self.n_edges = 0
        if self.threshold > 0 and self.n > 1:
            length = self.lens[0] if self.packed else 0
            if self.packed:
                # substitutions: sum over d of C(L, d)·3^d lookups a UMI, against n comparisons
                for t in range(1, self.threshold + 1):
                    if t > length:
                        break
                    c = c * (length - t + 1) / t * 3
                    enum_cost += c
            if self.packed and enum_cost < self.n and self.threshold <= length:
                self._edges_by_substitutions()
            else:
                self._edges_by_pairs()
        need = self.n + 1
        _grow(<void **> &self.adj_start, &self.adj_start_cap, need, sizeof(int32_t))
        _grow(<void **> &self.adj, &self.adj_cap, 2 * self.n_edges + 1, sizeof(int32_t))
        for i in range(need):
            self.adj_start[i] = 0
        for k in range(self.n_edges):
            a = self.edges[2 * k]
            b = self.edges[2 * k + 1]
            if not directed or self.counts[a] >= 2 * self.counts[b] - 1:
                self.adj_start[a + 1] += 1
            if not directed or self.counts[b] >= 2 * self.counts[a] - 1:
                self.adj_start[b + 1] += 1
        for i in range(self.n):
            self.adj_start[i + 1] += self.adj_start[i]
        # fill, using queue as the write cursor per node
        for i in range(self.n):
            self.queue[i] = self.adj_start[i]
        for k in range(self.n_edges):
            a = self.edges[2 * k]
            b = self.edges[2 * k + 1]
            if not directed or self.counts[a] >= 2 * self.counts[b] - 1:
                self.adj[self.queue[a]] = b
                self.queue[a] += 1
            if not directed or self.counts[b] >= 2 * self.counts[a] - 1:
                self.adj[self.queue[b]] = a
                self.queue[b] += 1
        return 0

    # -- groups ----------------------------------------------------------------------

    cdef inline void _open_group(self) noexcept:
        self.starts[self.n_groups] = <int32_t> self._out_len
        self.n_groups += 1

    cdef inline void _put(self, int32_t u) noexcept:
        self.members[self._out_len] = u
        self._out_len += 1

    cdef inline void _close(self) noexcept:
        self.starts[self.n_groups] = <int32_t> self._out_len

    cdef Py_ssize_t _component(self, int32_t start, int32_t stamp) noexcept:
        """Breadth-first search from ``start`` over ``adj``: the nodes reached into ``comp``."""
        cdef Py_ssize_t head = 0, tail = 0, k
        cdef int32_t node, other
        self.comp[tail] = start
        tail += 1
        self.mark[start] = stamp
        while head < tail:
            node = self.comp[head]
            head += 1
            for k in range(self.adj_start[node], self.adj_start[node + 1]):
                other = self.adj[k]
                if self.mark[other] != stamp:
                    self.mark[other] = stamp
                    self.comp[tail] = other
                    tail += 1
        return tail

    cdef int run(self) except -1:
        """Group the n UMIs filled in (see the class doc)."""
        cdef Py_ssize_t n = self.n, i, k, size, j, covered, cstart
        cdef int32_t u, v, stamp, found_stamp, obs_stamp, lead_stamp
        cdef double threshold
        cdef bint directed = self.method == M_DIRECTIONAL
        self.n_groups = 0
        self._out_len = 0
        if self.stamp > (1 << 30):  # stamps restart before they could wrap
            memset(self.mark, 0, self.work_cap * sizeof(int32_t))
            memset(self.observed, 0, self.work_cap * sizeof(int32_t))
            self.stamp = 0
        self.positions += 1
        self.total_umis += n
        if n > self.max_umis:
            self.max_umis = n
        if n == 0:
            self._close()
            return 0
        if self.method == M_UNIQUE:
            for i in range(n):
                self._open_group()
                self._put(<int32_t> i)
            self._close()
            return 0
        if self.method == M_PERCENTILE:
            if n == 1:
                self._open_group()
                self._put(0)
                self._close()
                return 0
            threshold = self._median() / 100.0
            for i in range(n):
                if self.counts[i] > threshold:
                    self._open_group()
                    self._put(<int32_t> i)
            self._close()
            return 0
        self._build_graph(directed)
        # nodes by count, descending; ties in the bundle's order (Python's stable sort)
        for i in range(n):
            self.order[i] = <int32_t> i
        _msort(self.order, n, <cmp_fn> _cmp_count_desc, <void *> self, &self.tmp, &self.tmp_cap)
        found_stamp = self._new_stamp()
        obs_stamp = self._new_stamp()
        for i in range(n):
            u = self.order[i]
            if self.observed[u] == found_stamp:
                continue
            stamp = self._new_stamp()
            size = self._component(u, stamp)
            for k in range(size):
                self.observed[self.comp[k]] = found_stamp
            if size == 1:
                self._open_group()
                self._put(u)
                if self.method == M_DIRECTIONAL:
                    self._set_observed(u, obs_stamp)
                continue
            # the component, sorted alphabetically, then stably by count (descending)
            _msort(self.comp, size, <cmp_fn> _cmp_alpha, <void *> self, &self.tmp, &self.tmp_cap)
            _msort(self.comp, size, <cmp_fn> _cmp_count_desc_only, <void *> self, &self.tmp, &self.tmp_cap)
            if self.method == M_CLUSTER:
                self._open_group()
                for k in range(size):
                    self._put(self.comp[k])
            elif self.method == M_DIRECTIONAL:
                # nodes taken by an earlier group are left out (mark == obs_stamp: observed)
                self._open_group()
                for k in range(size):
                    v = self.comp[k]
                    if self._is_observed(v, obs_stamp):
                        continue
                    self._set_observed(v, obs_stamp)
                    self._put(v)
            else:
                self._adjacency_groups(size)
        self._close()
        return 0

    # "observed" (directional) lives in a side array so that BFS marks do not clobber it
    cdef inline bint _is_observed(self, int32_t v, int32_t obs_stamp) noexcept:
        return self.queue[v] == -obs_stamp

    cdef inline void _set_observed(self, int32_t v, int32_t obs_stamp) noexcept:
        self.queue[v] = -obs_stamp

    cdef int _adjacency_groups(self, Py_ssize_t size) except -1:
        """umi_tools' _group_adjacency for one component (``comp``, by count then
        alphabet): the fewest top UMIs whose neighbourhoods cover it lead groups;
        each lead takes its neighbours not yet taken (alphabetically)."""
        cdef Py_ssize_t k, m, n_leads = 0, covered = 0, first
        cdef int32_t u, v, cover_stamp, taken_stamp
        cover_stamp = self._new_stamp()
        for k in range(size):
            u = self.comp[k]
            n_leads += 1
            if self.mark[u] != cover_stamp:
                self.mark[u] = cover_stamp
                covered += 1
            for m in range(self.adj_start[u], self.adj_start[u + 1]):
                v = self.adj[m]
                if self.mark[v] != cover_stamp:
                    self.mark[v] = cover_stamp
                    covered += 1
            if covered == size:
                break
        taken_stamp = self._new_stamp()
        for k in range(n_leads):
            self.mark[self.comp[k]] = taken_stamp
        for k in range(n_leads):
            u = self.comp[k]
            self._open_group()
            self._put(u)
            first = self._out_len
            for m in range(self.adj_start[u], self.adj_start[u + 1]):
                v = self.adj[m]
                if self.mark[v] != taken_stamp:
                    self.mark[v] = taken_stamp
                    self._put(v)
            _msort(self.members + first, self._out_len - first, <cmp_fn> _cmp_alpha, <void *> self,
                   &self.tmp, &self.tmp_cap)
        return 0

    cdef double _median(self) except? -1:
        cdef Py_ssize_t n = self.n, i
        _grow(<void **> &self.sortbuf, &self.sortbuf_cap, n, sizeof(int64_t))
        for i in range(n):
            self.sortbuf[i] = self.counts[i]
        _sort_i64(self.sortbuf, n)
        if n & 1:
            return <double> self.sortbuf[n // 2]
        return (<double> self.sortbuf[n // 2 - 1] + <double> self.sortbuf[n // 2]) / 2.0


cdef int _cmp_count_desc(void *ctx, int32_t a, int32_t b) noexcept:
    cdef Clusterer c = <Clusterer> ctx
    if c.counts[a] != c.counts[b]:
        return -1 if c.counts[a] > c.counts[b] else 1
    return (a > b) - (a < b)


cdef int _cmp_count_desc_only(void *ctx, int32_t a, int32_t b) noexcept:
    cdef Clusterer c = <Clusterer> ctx
    if c.counts[a] != c.counts[b]:
        return -1 if c.counts[a] > c.counts[b] else 1
    return 0


cdef int _cmp_alpha(void *ctx, int32_t a, int32_t b) noexcept:
    return (<Clusterer> ctx)._alpha_cmp(a, b)


cdef void _sort_i64(int64_t *a, Py_ssize_t n) noexcept:
    """Heap sort (ascending): for medians."""
    cdef Py_ssize_t start = n // 2, end = n, root, child
    cdef int64_t t
    while end > 1:
        if start > 0:
            start -= 1
        else:
            end -= 1
            t = a[end]
            a[end] = a[0]
            a[0] = t
        root = start
        while 2 * root + 1 < end:
            child = 2 * root + 1
            if child + 1 < end and a[child] < a[child + 1]:
                child += 1
            if a[root] < a[child]:
                t = a[root]
                a[root] = a[child]
                a[child] = t
                root = child
            else:
                break


cdef int _fill_clusterer(Clusterer cl, list umis, list counts) except -1:
    cdef Py_ssize_t n = len(umis), i
    cdef bytes u
    cl.reserve(n)
    for i in range(n):
        u = umis[i]
        cl.set_umi(i, <const uint8_t *> PyBytes_AS_STRING(u), <int32_t> PyBytes_GET_SIZE(u), counts[i])
    return 0


def cluster_umis(counts, str method="directional", int threshold=1):
    """Group the UMIs of ``counts`` ({umi: reads}, in the bundle's order) as
    umi_tools' ``UMIClusterer(method)(counts, threshold)`` does: a list of
    groups (lists of UMIs), each group's representative first. The same
    call as bamflow.presets.umi.cluster_umis, in C."""
    cdef list umis = [u.encode() if isinstance(u, str) else bytes(u) for u in counts]
    cdef Clusterer cl = Clusterer(method, threshold)
    _fill_clusterer(cl, umis, list(counts.values()))
    cl.run()
    return [[umis[cl.members[k]] for k in range(cl.starts[g], cl.starts[g + 1])] for g in range(cl.n_groups)]


def count_molecules(counts, str method="directional", int threshold=1):
    """The number of UMI groups among ``counts`` ({umi: reads}): len(cluster_umis(...)) without the lists."""
    cdef list umis = [u.encode() if isinstance(u, str) else bytes(u) for u in counts]
    cdef Clusterer cl = Clusterer(method, threshold)
    _fill_clusterer(cl, umis, list(counts.values()))
    cl.run()
    return cl.n_groups


# == the engine ====================================================================================

# what a read is dropped for (the order of umi_tools' checks in get_bundles)
DROP_REASONS = (
    "other_chrom", "read2", "unpaired", "unmapped", "mate_unmapped", "chimeric", "subset", "low_mapq",
    "no_umi", "no_cell", "no_gene", "gene_filtered", "no_cigar", "duplicate", "umi_not_whitelisted",
    "umi_discarded",
)
cdef enum:
    R_OTHER_CHROM = 0
    R_READ2 = 1
    R_UNPAIRED = 2
    R_UNMAPPED = 3
    R_MATE_UNMAPPED = 4
    R_CHIMERIC = 5
    R_SUBSET = 6
    R_LOW_MAPQ = 7
    R_NO_UMI = 8
    R_NO_CELL = 9
    R_NO_GENE = 10
    R_GENE_FILTERED = 11
    R_NO_CIGAR = 12
    R_DUPLICATE = 13
    R_NOT_WHITELISTED = 14
    R_DISCARDED = 15
    N_REASONS = 16
    R_OK = -1
    R_SINGLE = -2             # group: written as it is ("single_read")

MODES = ("dedup", "count", "group")
cdef enum:
    MODE_DEDUP = 0
    MODE_COUNT = 1
    MODE_GROUP = 2

cdef enum:
    UMI_TAG = 0
    UMI_READ_ID = 1
    UMI_UMIS = 2

# what to do with unmapped mates, chimeric pairs and unpaired reads (umi_tools' choices)
cdef enum:
    USE = 0
    DISCARD = 1
    OUTPUT = 2

# mark mode: the fate of a held record
cdef enum:
    ST_PENDING = 0
    ST_KEPT = 1
    ST_DUP = 2
    ST_UNEXAMINED = 3

cdef enum:
    WINDOW = 1000             # umi_tools' flush distance
    CHUNK_BYTES = 1 << 20


# -- a hash table of int32 values with their 64-bit hashes (linear probing, deletions) ------------

cdef struct HSlot:
    uint64_t h
    int32_t v


cdef struct HTab:
    HSlot *s
    Py_ssize_t cap
    Py_ssize_t n


cdef int ht_init(HTab *t, Py_ssize_t cap) except -1:
    cdef Py_ssize_t i
    t.s = <HSlot *> malloc(cap * sizeof(HSlot))
    if t.s == NULL:
        raise MemoryError()
    for i in range(cap):
        t.s[i].v = -1
    t.cap = cap
    t.n = 0
    return 0


cdef int ht_insert(HTab *t, uint64_t h, int32_t v) except -1:
    cdef Py_ssize_t i, mask, k
    cdef HSlot *old
    cdef Py_ssize_t old_cap
    if 10 * (t.n + 1) > 7 * t.cap:
        old = t.s
        old_cap = t.cap
        ht_init(t, 2 * old_cap)
        mask = t.cap - 1
        for k in range(old_cap):
            if old[k].v >= 0:
                i = <Py_ssize_t> (old[k].h & <uint64_t> mask)
                while t.s[i].v >= 0:
                    i = (i + 1) & mask
                t.s[i] = old[k]
                t.n += 1
        free(old)
    mask = t.cap - 1
    i = <Py_ssize_t> (h & <uint64_t> mask)
    while t.s[i].v >= 0:
        i = (i + 1) & mask
    t.s[i].h = h
    t.s[i].v = v
    t.n += 1
    return 0


cdef void ht_remove(HTab *t, uint64_t h, int32_t v) noexcept:
    """Remove value v (stored with hash h); backward-shift deletion."""
    cdef Py_ssize_t mask = t.cap - 1, i, j, home
    i = <Py_ssize_t> (h & <uint64_t> mask)
    while t.s[i].v != v:
        if t.s[i].v < 0:
            return
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if t.s[j].v < 0:
            break
        home = <Py_ssize_t> (t.s[j].h & <uint64_t> mask)
        # the entry at j may move to i unless its home lies cyclically in (i, j]
        if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
            continue
        t.s[i] = t.s[j]
        i = j
    t.s[i].v = -1
    t.n -= 1


cdef int32_t _pool_take(void **items, Py_ssize_t *cap, Py_ssize_t *used, int32_t *free_head, Py_ssize_t size,
                        Py_ssize_t link) except -1:
    """The index of a free item of a growable array of structs: one given back
    (a free list runs through the int32 at byte ``link`` of each), or a new one."""
    cdef int32_t k = free_head[0]
    if k >= 0:
        free_head[0] = (<int32_t *> (<char *> items[0] + k * size + link))[0]
        return k
    _grow(items, cap, used[0] + 1, size)
    used[0] += 1
    return <int32_t> (used[0] - 1)


cdef inline uint64_t mix64(uint64_t x) noexcept:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


# -- records held in memory: chunks freed when their last record goes ----------------------------

cdef struct Chunk:
    uint8_t *data
    Py_ssize_t used
    Py_ssize_t cap
    Py_ssize_t live


cdef struct Held:
    uint8_t *data             # block_size (4 bytes) + the record
    uint32_t size             # bytes, the 4 included
    int32_t chunk
    int32_t tid
    int32_t pos               # reference start (output order)
    int64_t pos5              # 5' end incl. soft clips (group table)
    int64_t seq               # input index; -1: free
    int64_t fifo_tag          # = seq while it bounds what may still come; -1 once decided or freed
    int32_t next              # next record of the same UMI (all-reads modes); free list
    int32_t entry
    int32_t pair              # --paired: the PairKey this read 1 would claim a mate of, or -1
    uint8_t rev
    uint8_t state


cdef struct Entry:            # one UMI of one bundle
    int32_t bundle
    int32_t next              # the bundle's next UMI (insertion order); free list
    uint64_t code             # 2-bit code, or a hash of the bytes
    const uint8_t *ubytes     # not packed: a copy of the UMI
    int32_t uchunk
    int32_t ulen
    uint8_t packed
    int64_t count
    int64_t ties              # umi_tools' read_counts (the reservoir)
    int32_t best              # held record of the best read, or -1
    int32_t best_mapq
    int64_t best_det
    int32_t head              # all-reads modes: held records in input order
    int32_t tail
    int64_t stat_id           # --output-stats: the UMI's id
    uint64_t hash


cdef struct Bundle:
    int32_t tid
    int64_t pos               # 5' position, or gene id (per gene)
    int32_t rev
    int64_t spliced
    int32_t tlen
    int32_t rlen
    int32_t cell              # -1: not per cell
    int32_t first             # entries in insertion order
    int32_t last
    int32_t n_umis
    int64_t n_reads
    int32_t open_idx          # index in the list of open bundles; next free bundle when free
    uint64_t hash


cdef struct OutItem:
    uint64_t k1               # (uint32 refID) << 32 | (uint32) (pos + 1): samtools sort's order
    uint64_t k2               # strand << 63 | class << 61 | rank
    int32_t held


cdef struct PairKey:          # --paired: the mate a kept read 1 needs (umi_tools' TwoPassPairWriter)
    const uint8_t *name
    int32_t name_len
    int32_t name_chunk
    int32_t tid               # where the mate is
    int32_t pos
    int32_t n_pending         # read 1 records still undecided
    int32_t kept_tid          # refID of a kept read 1, or -2
    int32_t mate              # held read 2, or -1
    uint8_t mate_done         # the mate was written
    uint64_t hash
    int64_t serial            # tells a live entry from a reused one (deadlines); -1: free
    int32_t next_free


# where each pooled struct keeps its free-list link (see _pool_take)
cdef Held _held0
cdef Bundle _bundle0
cdef Entry _entry0
cdef PairKey _pair0
cdef Py_ssize_t LINK_HELD = <char *> &_held0.next - <char *> &_held0
cdef Py_ssize_t LINK_BUNDLE = <char *> &_bundle0.open_idx - <char *> &_bundle0
cdef Py_ssize_t LINK_ENTRY = <char *> &_entry0.next - <char *> &_entry0
cdef Py_ssize_t LINK_PAIR = <char *> &_pair0.next_free - <char *> &_pair0


cdef inline bint _key_before(uint64_t a1, uint64_t a2, uint64_t b1, uint64_t b2) noexcept:
    return a1 < b1 or (a1 == b1 and a2 < b2)


cdef inline uint64_t _pos_key(int32_t tid, int32_t pos) noexcept:
    return (<uint64_t> <uint32_t> tid << 32) | <uint64_t> <uint32_t> (pos + 1)


cdef inline Py_ssize_t _find_bytes(const uint8_t *s, Py_ssize_t n, const uint8_t *pat, Py_ssize_t m) noexcept:
    """Index of the first ``pat`` in ``s``, or -1."""
    cdef Py_ssize_t i
    if m == 0 or m > n:
        return -1
    for i in range(n - m + 1):
        if s[i] == pat[0] and memcmp(s + i, pat, m) == 0:
            return i
    return -1


cdef inline Py_ssize_t _rfind_bytes(const uint8_t *s, Py_ssize_t n, const uint8_t *pat, Py_ssize_t m) noexcept:
    cdef Py_ssize_t i
    if m == 0 or m > n:
        return -1
    i = n - m
    while i >= 0:
        if s[i] == pat[0] and memcmp(s + i, pat, m) == 0:
            return i
        i -= 1
    return -1


cdef class UmiKernel:
    """umi_tools' ``dedup``, ``count`` or ``group`` over the raw BAM stream on
    ``in_fd``; records (dedup, group) go to ``out_fd`` as a raw BAM stream,
    the group table to ``tsv_fd``. ``config``: a dict of the options (see
    bamflow.presets.dedup.UmiOptions.kernel_config for the keys). ``run()`` returns the
    counts (reads in, written, dropped by reason, ...) and, for count, the
    (gene, cell, molecules) arrays.
    """
    # -- configuration
    cdef int mode
    cdef bint classify
    cdef int method
    cdef int threshold
    cdef int umi_method
    cdef bytes umi_sep
    cdef bytes umi_split
    cdef bytes umi_delim
    cdef bytes cell_split
    cdef bytes cell_delim
    cdef bint per_cell
    cdef bint cell_from_tag              # the cell from cell_tag whatever the UMI's place (tag mode: always)
    cdef bint per_gene
    cdef bint per_contig
    cdef bint paired
    cdef int unmapped_reads
    cdef int chimeric_pairs
    cdef int unpaired_reads
    cdef bint return_unmapped
    cdef bint ignore_umi
    cdef bint ignore_tlen
    cdef bint spliced
    cdef double soft_clip_threshold
    cdef bint read_length
    cdef bint whole_contig
    cdef object chrom
    cdef int32_t chrom_tid
    cdef double subset
    cdef bint seeded
    cdef MT mt
    cdef int mapping_quality
    cdef int det                       # 0 none, 1 NH, 2 X0, 3 XT
    cdef bint mark
    cdef bint no_sort
    cdef object whitelist              # set of bytes or None
    cdef bint output_stats
    cdef bytes group_tag
    cdef object skip_search            # callable(str) -> match or None
    cdef object source
    # -- tags
    cdef Tags tags
    cdef int t_umi, t_cell, t_gene, t_assigned, t_name, t_det
    # -- stream
    cdef RecordReader reader
    cdef OutBufs outs
    cdef OutBuf *out
    cdef OutBuf *tsv
    cdef bint sorted_input
    cdef list ref_names                # bytes
    cdef int32_t *ref_gene             # per-contig: the gene id of each reference
    cdef int32_t n_ref
    # -- values
    cdef ValueTable cells
    cdef ValueTable genes
    cdef ValueTable skip_cache
    cdef ValueTable stat_umis
    cdef dict gene_names
    cdef Scratch umi_buf
    cdef Scratch cell_buf
    cdef Scratch gene_buf
    cdef Scratch assigned_buf
    cdef Scratch work
    cdef Scratch unpacked
    # -- bundles and UMIs
    cdef Bundle *bundles
    cdef Py_ssize_t bundles_cap
    cdef int32_t free_bundle
    cdef Py_ssize_t n_bundles_used
    cdef int32_t *open_list
    cdef Py_ssize_t open_cap
    cdef Py_ssize_t n_open
    cdef HTab bundle_tab
    cdef Entry *entries
    cdef Py_ssize_t entries_cap
    cdef int32_t free_entry
    cdef Py_ssize_t n_entries_used
    cdef HTab entry_tab
    cdef Clusterer cl
    cdef int32_t *flush_list
    cdef Py_ssize_t flush_cap
    cdef int32_t *sort_tmp
    cdef Py_ssize_t sort_tmp_cap
    cdef int32_t *bundle_entries
    cdef Py_ssize_t bundle_entries_cap
    cdef int32_t *cell_rank              # at a flush: each cell's rank among the flushed bundles' cells
    cdef int32_t *cell_stamp
    cdef Py_ssize_t cell_rank_cap
    cdef int32_t *gene_rank
    cdef int32_t *gene_stamp
    cdef Py_ssize_t gene_rank_cap
    cdef int32_t *distinct
    cdef Py_ssize_t distinct_cap
    cdef int32_t flush_serial
    cdef uint8_t *name_seen              # count: genes whose name was noted
    cdef Py_ssize_t name_seen_cap
    cdef int32_t last_gene               # the previous read's gene (consecutive reads share it), -2: skipped
    cdef bint last_gene_valid
    cdef ValueTable _rank_table
    # -- held records
    cdef Chunk *chunks
    cdef Py_ssize_t chunks_cap
    cdef Py_ssize_t n_chunks
    cdef int32_t cur_chunk
    cdef int32_t free_chunk_slot
    cdef Held *held
    cdef Py_ssize_t held_cap
    cdef int32_t free_held
    cdef Py_ssize_t n_held
    cdef int32_t *fifo_idx
    cdef int64_t *fifo_seq
    cdef Py_ssize_t fifo_cap
    cdef Py_ssize_t fifo_head
    cdef Py_ssize_t fifo_len
    # -- output order
    cdef OutItem *heap
    cdef Py_ssize_t heap_cap
    cdef Py_ssize_t heap_n
    cdef int64_t rank
    cdef int64_t unique_id
    # -- pairs
    cdef PairKey *pairs
    cdef Py_ssize_t pairs_cap
    cdef int32_t free_pair
    cdef Py_ssize_t n_pairs_used
    cdef int64_t pair_serial
    cdef HTab pair_tab
    cdef OutItem *dl_heap              # deadlines: k1 = position key, held = pair index
    cdef Py_ssize_t dl_cap
    cdef Py_ssize_t dl_n
    cdef int32_t *deferred             # mates waiting for their reference to be scanned (see _found_mate)
    cdef Py_ssize_t deferred_cap
    cdef Py_ssize_t deferred_n
    cdef int32_t visited_tid           # the reference umi_tools' pair writer is on
    # -- position state (umi_tools' last_pos, last_chr)
    cdef int32_t last_tid
    cdef int64_t last_start
    cdef uint64_t last_order_key
    cdef int32_t cur_tid
    cdef int32_t cur_pos
    # -- counts
    cdef long long dropped[N_REASONS]
    cdef long long reads_in
    cdef long long written
    cdef long long kept
    cdef long long mates
    cdef long long singles
    cdef long long counted
    cdef long long molecules
    cdef long long groups_out
    cdef long long grouped
    cdef long long draws
    # -- count results
    cdef int32_t *res                 # (gene, cell, count) triples
    cdef Py_ssize_t res_cap
    cdef Py_ssize_t res_n
    cdef HTab res_tab
    cdef long long overwritten
    # -- --output-stats
    cdef int64_t *st_pre               # (UMI id, reads) of every bundle's UMIs
    cdef Py_ssize_t st_pre_cap
    cdef Py_ssize_t st_pre_n
    cdef int64_t *st_post              # (UMI id, reads) of the kept groups
    cdef Py_ssize_t st_post_cap
    cdef Py_ssize_t st_post_n
    cdef int64_t *st_sizes                # per bundle: UMIs before, after
    cdef double *st_avg                   # per bundle: mean distance before, after
    cdef Py_ssize_t st_b_cap
    cdef Py_ssize_t st_b_n

    def __cinit__(self, int in_fd, int out_fd, dict config, *, int tsv_fd=-1, source="", progress=None,
                  Py_ssize_t buffer_size=1 << 20, Py_ssize_t out_buffer_size=1 << 20):
        cdef list names = []
        cdef list fds = []
        self.source = source
        self.mode = MODES.index(config.get("mode", "dedup"))
        self.classify = config.get("classify", False)
        self.method = _method_code(config.get("method", "directional"))
        self.threshold = config.get("threshold", 1)
        self.cl = Clusterer(config.get("method", "directional"), self.threshold)
        self.umi_method = ("tag", "read_id", "umis").index(config.get("umi_method", "tag"))
        self.umi_sep = _opt_bytes(config.get("umi_sep", "_"))
        self.umi_split = _opt_bytes(config.get("umi_tag_split"))
        self.umi_delim = _opt_bytes(config.get("umi_tag_delim"))
        self.cell_split = _opt_bytes(config.get("cell_tag_split"))
        self.cell_delim = _opt_bytes(config.get("cell_tag_delim"))
        for value, what in ((self.umi_sep, "umi_separator"), (self.umi_split, "umi_tag_split"),
                            (self.umi_delim, "umi_tag_delim"), (self.cell_split, "cell_tag_split"),
                            (self.cell_delim, "cell_tag_delim")):
            if value is not None and len(value) == 0:
                raise ValueError(f"{what} must not be empty")
        self.per_cell = config.get("per_cell", False)
        self.cell_from_tag = self.per_cell and (self.umi_method == UMI_TAG or config.get("cell_from_tag", False))
        self.per_gene = config.get("per_gene", False)
        self.per_contig = config.get("per_contig", False)
        self.paired = config.get("paired", False)
        choices = ("use", "discard", "output")
        self.unmapped_reads = choices.index(config.get("unmapped_reads", "discard"))
        self.chimeric_pairs = choices.index(config.get("chimeric_pairs", "use"))
        self.unpaired_reads = choices.index(config.get("unpaired_reads", "use"))
        self.return_unmapped = self.mode == MODE_GROUP and self.unmapped_reads in (USE, OUTPUT)
        self.ignore_umi = config.get("ignore_umi", False)
        self.ignore_tlen = config.get("ignore_tlen", False)
        self.spliced = config.get("spliced", False)
        self.soft_clip_threshold = config.get("soft_clip_threshold", 4)
        self.read_length = config.get("read_length", False)
        self.whole_contig = config.get("whole_contig", False)
        self.chrom = config.get("chrom")
        self.chrom_tid = -2
        subset = config.get("subset")
        self.subset = subset if subset else 0.0
        seed_state = config.get("seed_state")
        self.seeded = seed_state is not None
        if self.seeded:
            _mt_set_state(&self.mt, seed_state)
        self.mapping_quality = config.get("mapping_quality", 0) or 0
        self.det = (None, "NH", "X0", "XT").index(config.get("detection_method"))
        self.mark = config.get("mark", False)
        self.no_sort = config.get("no_sort", False)
        wl = config.get("whitelist")
        self.whitelist = set(wl) if wl else None
        self.output_stats = config.get("output_stats", False)
        self.group_tag = config.get("umi_group_tag", "BX").encode()
        skip = config.get("skip_regex")
        if skip and self.per_gene and not self.per_contig:
            import re
            self.skip_search = re.compile(skip).search
        # tags wanted in one walk of each record's aux fields
        self.t_umi = self.t_cell = self.t_gene = self.t_assigned = self.t_name = self.t_det = -1
        if self.umi_method == UMI_TAG:
            self.t_umi = _want(names, config["umi_tag"])
        if self.cell_from_tag:
            self.t_cell = _want(names, config["cell_tag"])
        if self.per_gene and not self.per_contig:
            self.t_gene = _want(names, config["gene_tag"])
            self.t_assigned = _want(names, config.get("assigned_tag") or config["gene_tag"])
        if config.get("name_tag") and self.mode == MODE_COUNT and self.per_gene and not self.per_contig:
            self.t_name = _want(names, config["name_tag"])
        if self.det:
            self.t_det = _want(names, ("NH", "X0", "XT")[self.det - 1])
        self.tags = Tags(names)
        self.reader = RecordReader(in_fd, source, False, progress, buffer_size, bool(config.get("note_tags", False)))
        if out_fd >= 0:
            fds.append(out_fd)
        if tsv_fd >= 0:
            fds.append(tsv_fd)
        self.outs = OutBufs(fds, out_buffer_size)
        self.out = &self.outs.bufs[0] if out_fd >= 0 else NULL
        self.tsv = &self.outs.bufs[len(fds) - 1] if tsv_fd >= 0 else NULL
        self.cells = ValueTable()
        self.genes = ValueTable()
        self.skip_cache = ValueTable()
        self.stat_umis = ValueTable()
        self.gene_names = {}
        ht_init(&self.bundle_tab, 1024)
        ht_init(&self.entry_tab, 1024)
        ht_init(&self.res_tab, 1024)
        ht_init(&self.pair_tab, 1024)
        self.free_bundle = self.free_entry = self.free_held = self.free_pair = -1
        self.free_chunk_slot = -1
        self.cur_chunk = -1
        self.last_tid = -2
        self.cur_tid = -1
        self.cur_pos = -1
        self.visited_tid = -1
        self.last_gene_valid = False

    def __dealloc__(self):
        cdef Py_ssize_t i
        scratch_free(&self.umi_buf)
        scratch_free(&self.cell_buf)
        scratch_free(&self.gene_buf)
        scratch_free(&self.assigned_buf)
        scratch_free(&self.work)
        scratch_free(&self.unpacked)
        free(self.bundles)
        free(self.open_list)
        free(self.bundle_tab.s)
        free(self.entries)
        free(self.entry_tab.s)
        free(self.flush_list)
        free(self.sort_tmp)
        free(self.bundle_entries)
        free(self.cell_rank)
        free(self.cell_stamp)
        free(self.gene_rank)
        free(self.gene_stamp)
        free(self.distinct)
        free(self.name_seen)
        if self.chunks != NULL:
            for i in range(self.n_chunks):
                free(self.chunks[i].data)
        free(self.chunks)
        free(self.held)
        free(self.fifo_idx)
        free(self.fifo_seq)
        free(self.heap)
        free(self.pairs)
        free(self.pair_tab.s)
        free(self.dl_heap)
        free(self.deferred)
        free(self.ref_gene)
        free(self.res)
        free(self.res_tab.s)
        free(self.st_pre)
        free(self.st_post)
        free(self.st_sizes)
        free(self.st_avg)

    # == memory for held records =================================================================

    cdef uint8_t *_alloc(self, Py_ssize_t n, int32_t *chunk) except NULL:
        cdef Chunk *c
        cdef Py_ssize_t cap
        cdef int32_t k
        if self.cur_chunk >= 0:
            c = &self.chunks[self.cur_chunk]
            if c.used + n <= c.cap:
                chunk[0] = self.cur_chunk
                c.live += 1
                c.used += n
                return c.data + c.used - n
            if c.live == 0:  # nothing in it lives any more: start over
                c.used = 0
                if n <= c.cap:
                    chunk[0] = self.cur_chunk
                    c.live = 1
                    c.used = n
                    return c.data
        # a new chunk (a free slot if there is one)
        if self.free_chunk_slot >= 0:
            k = self.free_chunk_slot
            self.free_chunk_slot = <int32_t> self.chunks[k].used
        else:
            _grow(<void **> &self.chunks, &self.chunks_cap, self.n_chunks + 1, sizeof(Chunk))
            k = <int32_t> self.n_chunks
            self.n_chunks += 1
        cap = CHUNK_BYTES if n <= CHUNK_BYTES else n
        c = &self.chunks[k]
        c.data = <uint8_t *> malloc(cap)
        if c.data == NULL:
            raise MemoryError()
        c.cap = cap
        c.used = n
        c.live = 1
        # the previous current chunk is freed once its last record goes
        if self.cur_chunk >= 0 and self.chunks[self.cur_chunk].live == 0:
            self._free_chunk(self.cur_chunk)
        self.cur_chunk = k
        chunk[0] = k
        return c.data

    cdef void _free_chunk(self, int32_t k) noexcept:
        free(self.chunks[k].data)
        self.chunks[k].data = NULL
        self.chunks[k].cap = 0
        self.chunks[k].used = self.free_chunk_slot
        self.free_chunk_slot = k

    cdef inline void _release_chunk(self, int32_t k) noexcept:
        cdef Chunk *c = &self.chunks[k]
        c.live -= 1
        if c.live == 0 and k != self.cur_chunk:
            self._free_chunk(k)

    cdef int32_t _hold(self, const Rec *r, int32_t tid, int32_t pos, uint8_t rev, int64_t pos5,
                       uint8_t state) except -2:
        """Copy record r into memory; returns its held index."""
        cdef int32_t h
        cdef Held *x
        h = _pool_take(<void **> &self.held, &self.held_cap, &self.n_held, &self.free_held, sizeof(Held), LINK_HELD)
        x = &self.held[h]
        x.data = self._alloc(4 + r.size, &x.chunk)
        put_u32(x.data, r.size)
        memcpy(x.data + 4, r.data, r.size)
        x.size = 4 + r.size
        x.tid = tid
        x.pos = pos
        x.rev = rev
        x.pos5 = pos5
        x.seq = self.reader.records - 1
        x.fifo_tag = x.seq
        x.next = -1
        x.entry = -1
        x.pair = -1
        x.state = state
        # the arrival order (the bound of what may still come; mark mode's output order)
        if self.fifo_len == self.fifo_cap:
            self._grow_fifo()
        self.fifo_idx[(self.fifo_head + self.fifo_len) % self.fifo_cap] = h
        self.fifo_seq[(self.fifo_head + self.fifo_len) % self.fifo_cap] = x.seq
        self.fifo_len += 1
        return h

    cdef int _grow_fifo(self) except -1:
        cdef Py_ssize_t new_cap = self.fifo_cap * 2 if self.fifo_cap else 1024, i
        cdef int32_t *idx = <int32_t *> malloc(new_cap * sizeof(int32_t))
        cdef int64_t *seq = <int64_t *> malloc(new_cap * sizeof(int64_t))
        if idx == NULL or seq == NULL:
            free(idx)
            free(seq)
            raise MemoryError()
        for i in range(self.fifo_len):
            idx[i] = self.fifo_idx[(self.fifo_head + i) % self.fifo_cap]
            seq[i] = self.fifo_seq[(self.fifo_head + i) % self.fifo_cap]
        free(self.fifo_idx)
        free(self.fifo_seq)
        self.fifo_idx = idx
        self.fifo_seq = seq
        self.fifo_cap = new_cap
        self.fifo_head = 0
        return 0

    cdef void _unhold(self, int32_t h) noexcept:
        cdef Held *x = &self.held[h]
        self._release_chunk(x.chunk)
        x.seq = -1
        x.fifo_tag = -1
        x.data = NULL
        x.next = self.free_held
        self.free_held = h

    cdef inline bint _fifo_front(self, int32_t *h) noexcept:
        """The oldest held record still held (stale entries are dropped)."""
        cdef int32_t i
        while self.fifo_len:
            i = self.fifo_idx[self.fifo_head]
            if self.held[i].fifo_tag == self.fifo_seq[self.fifo_head]:
                h[0] = i
                return True
            self.fifo_head = (self.fifo_head + 1) % self.fifo_cap
            self.fifo_len -= 1
        return False

    # == output ===================================================================================

    cdef int _write_held(self, int32_t h) except -1:
        cdef Held *x = &self.held[h]
        out_put(self.out, <const char *> x.data, x.size)
        self.out.records += 1
        self.written += 1
        return 0

    cdef int _push_out(self, int32_t h, int cls, int64_t seq) except -1:
        """Queue held record h for output in samtools sort's order (refID,
        position, strand), ties by class then ``seq`` (the order umi_tools wrote)."""
        cdef Held *x = &self.held[h]
        cdef OutItem item
        cdef Py_ssize_t i, parent
        if self.no_sort:  # umi_tools' --no-sort-output: as written
            self._write_held(h)
            self._unhold(h)
            return 0
        item.k1 = _pos_key(x.tid, x.pos)
        item.k2 = (<uint64_t> x.rev << 63) | (<uint64_t> cls << 61) | <uint64_t> seq
        item.held = h
        x.fifo_tag = -1  # decided: no longer a bound
        _grow(<void **> &self.heap, &self.heap_cap, self.heap_n + 1, sizeof(OutItem))
        i = self.heap_n
        self.heap_n += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _key_before(item.k1, item.k2, self.heap[parent].k1, self.heap[parent].k2):
                break
            self.heap[i] = self.heap[parent]
            i = parent
        self.heap[i] = item
        return 0

    cdef void _heap_pop(self, OutItem *heap, Py_ssize_t *n) noexcept:
        cdef Py_ssize_t i = 0, child
        cdef OutItem last
        n[0] -= 1
        if n[0] == 0:
            return
        last = heap[n[0]]
        while True:
            child = 2 * i + 1
            if child >= n[0]:
                break
            if child + 1 < n[0] and _key_before(heap[child + 1].k1, heap[child + 1].k2, heap[child].k1, heap[child].k2):
                child += 1
            if not _key_before(heap[child].k1, heap[child].k2, last.k1, last.k2):
                break
            heap[i] = heap[child]
            i = child
        heap[i] = last

    cdef int _emit(self, bint final) except -1:
        """Write what can no longer be preceded by anything still to come."""
        cdef int32_t h
        cdef uint64_t b1
        cdef Held *x
        cdef uint8_t *flag
        if self.out == NULL:
            return 0
        if self.mark:
            while self._fifo_front(&h):
                x = &self.held[h]
                if x.state == ST_PENDING:
                    break
                flag = x.data + 4 + 14
                if x.state == ST_KEPT:
                    flag[1] &= ~0x04  # 0x400 is bit 2 of the flag's high byte
                elif x.state == ST_DUP:
                    flag[1] |= 0x04
                self._write_held(h)
                self._unhold(h)
            return 0
        if final or not self.sorted_input:
            if not final:
                return 0
            while self.heap_n:
                h = self.heap[0].held
                self._heap_pop(self.heap, &self.heap_n)
                self._write_held(h)
                self._unhold(h)
            return 0
        # the bound: the oldest record still held, and the current read (input is sorted)
        b1 = _pos_key(self.cur_tid, self.cur_pos)
        if self._fifo_front(&h):
            x = &self.held[h]
            if _pos_key(x.tid, x.pos) < b1:
                b1 = _pos_key(x.tid, x.pos)
        while self.heap_n:
            # strictly before (b1, forward strand), or at it with class 0 (later ranks are larger)
            if self.heap[0].k1 < b1 or (self.heap[0].k1 == b1 and (self.heap[0].k2 >> 61) == 0):
                h = self.heap[0].held
                self._heap_pop(self.heap, &self.heap_n)
                self._write_held(h)
                self._unhold(h)
            else:
                break
        return 0

    # == reading barcodes ========================================================================

    cdef int _transform(self, Scratch *s, bytes split, bytes delim) except -1:
        """umi_tools' --*-tag-split (keep what is before the first ``split``) and
        --*-tag-delimiter (remove every ``delim``)."""
        cdef Py_ssize_t i, k, m, w
        cdef const uint8_t *d
        if split is not None:
            i = _find_bytes(s.data, s.used, <const uint8_t *> PyBytes_AS_STRING(split), len(split))
            if i >= 0:
                s.used = i
        if delim is not None:
            d = <const uint8_t *> PyBytes_AS_STRING(delim)
            m = len(delim)
            i = 0
            w = 0
            while i < s.used:
                if i + m <= s.used and s.data[i] == d[0] and memcmp(s.data + i, d, m) == 0:
                    i += m
                    continue
                s.data[w] = s.data[i]
                w += 1
                i += 1
            s.used = w
        return 0

    cdef int _tag_value(self, Scratch *s, const uint8_t *tv, int t, const Rec *r) except -3:
        """The canonical value of a found tag into ``s``: KEY_FOUND or KEY_MISSING."""
        cdef int got
        s.used = 0
        if tv == NULL:
            return KEY_MISSING
        got = tag_key(s, tv)
        if got == KEY_FOUND or got == KEY_MISSING:
            return got
        raise ValueError(f"{describe(self.source, self.reader.records - 1, r)}: tag {self.tags.names[t]} "
                         f"holds a float or an array; a UMI, cell or gene tag holds a string or an integer")

    cdef int _barcodes(self, const Rec *r, const uint8_t **found, bint need_umi) except -3:
        """The UMI (umi_buf) and, per cell, the cell (cell_buf) as umi_tools'
        barcode getters take them: R_OK, R_NO_UMI or R_NO_CELL."""
        cdef const uint8_t *name = r.data + 32
        cdef Py_ssize_t n = r.data[8] - 1, last, prev, lsep, i, j, start
        cdef const uint8_t *sep
        cdef bint got_umi = False, got_cell = False
        self.umi_buf.used = 0
        self.cell_buf.used = 0
        if self.umi_method == UMI_TAG:
            if need_umi:
                if not self._tag_field(&self.umi_buf, found[self.t_umi], self.t_umi, r, self.umi_split,
                                       self.umi_delim):
                    return R_NO_UMI
            return self._tag_cell(r, found)
        if self.umi_method == UMI_READ_ID:
            sep = <const uint8_t *> PyBytes_AS_STRING(self.umi_sep)
            lsep = len(self.umi_sep)
            last = _rfind_bytes(name, n, sep, lsep)
            if last < 0:  # no separator: umi_tools takes the whole name as the UMI; bamflow drops it
                return R_NO_UMI
            if need_umi:
                scratch_put(&self.umi_buf, name + last + lsep, n - last - lsep)
                if self.umi_buf.used == 0:
                    return R_NO_UMI
            if self.cell_from_tag:
                return self._tag_cell(r, found)
            if self.per_cell:
                prev = _rfind_bytes(name, last, sep, lsep)
                start = prev + lsep if prev >= 0 else 0
                scratch_put(&self.cell_buf, name + start, last - start)
                if self.cell_buf.used == 0:
                    return R_NO_CELL
            return R_OK
        # umis: name fields separated by ":", "UMI_..." and "CELL_..."
        i = 0
        while i <= n:
            j = i
            while j < n and name[j] != 58:  # ':'
                j += 1
            if j - i >= 4 and memcmp(name + i, b"UMI_", 4) == 0:
                self.umi_buf.used = 0
                scratch_put(&self.umi_buf, name + i + 4, j - i - 4)
                got_umi = True
            elif self.per_cell and not self.cell_from_tag and j - i >= 5 and memcmp(name + i, b"CELL_", 5) == 0:
                self.cell_buf.used = 0
                scratch_put(&self.cell_buf, name + i + 5, j - i - 5)
                got_cell = True
            i = j + 1
        if need_umi and (not got_umi or self.umi_buf.used == 0):
            return R_NO_UMI
        if not need_umi:
            self.umi_buf.used = 0
        if self.cell_from_tag:
            return self._tag_cell(r, found)
        if self.per_cell and (not got_cell or self.cell_buf.used == 0):
            return R_NO_CELL
        return R_OK

    cdef int _tag_cell(self, const Rec *r, const uint8_t **found) except -3:
        """The cell from its tag (cut and joined as asked): R_OK or R_NO_CELL."""
        if not self.per_cell:
            return R_OK
        if not self._tag_field(&self.cell_buf, found[self.t_cell], self.t_cell, r, self.cell_split,
                               self.cell_delim):
            return R_NO_CELL
        return R_OK

    cdef int _tag_field(self, Scratch *s, const uint8_t *tv, int t, const Rec *r, bytes split,
                        bytes delim) except -1:
        """The UMI or cell from tag ``t`` into ``s``, cut and joined as asked
        (umi_tools' --umi-tag-split/-delimiter, --cell-tag-split/-delimiter):
        1 if the tag is there and the value left is not empty, else 0."""
        if self._tag_value(s, tv, t, r) != KEY_FOUND:
            return 0
        if split is not None or delim is not None:
            self._transform(s, split, delim)
        return s.used != 0

    # == the record path ===========================================================================

    cdef int _filters(self, const Rec *r, const BamCore *c, const uint8_t **found) except -3:
        """umi_tools' get_bundles checks, in its order, up to the barcodes:
        R_OK, R_SINGLE (group: written as it is) or a drop reason."""
        cdef uint16_t flag = c.flag
        cdef double draw
        if c.refid < 0 and not self.return_unmapped:  # umi_tools' fetch() never reads these
            return R_UNMAPPED
        if flag & 0x80:  # read 2
            if self.mode == MODE_GROUP and (not (flag & 4) or self.return_unmapped):
                return R_SINGLE
            return R_READ2
        if self.paired and not (flag & 1):
            if self.unpaired_reads == DISCARD:
                return R_UNPAIRED
            if self.unpaired_reads == OUTPUT and self.mode == MODE_GROUP:
                return R_SINGLE
        if flag & 4 or c.refid < 0:
            if self.return_unmapped:
                return R_SINGLE
            return R_UNMAPPED
        if self.paired and flag & 8:
            if self.unmapped_reads != USE:
                if self.return_unmapped:
                    return R_SINGLE
                return R_MATE_UNMAPPED
        if flag & 1 and c.refid != c.next_refid:
            if self.chimeric_pairs == DISCARD:
                return R_CHIMERIC
            if self.chimeric_pairs == OUTPUT and self.mode == MODE_GROUP:
                return R_SINGLE
        if self.subset > 0:
            if self.seeded:
                draw = _mt_random(&self.mt)
                self.draws += 1
            else:  # no seed: a hash of the read name (mates agree; any worker gets the same answer)
                draw = (fnv1a64(r.data + 32, r.data[8] - 1) >> 11) * (1.0 / 9007199254740992.0)
            if draw >= self.subset:
                return R_SUBSET
        if self.mapping_quality and c.mapq < self.mapping_quality:
            return R_LOW_MAPQ
        if self.ignore_umi and not self.per_cell:
            self.umi_buf.used = 0
            self.cell_buf.used = 0
            return R_OK
        return self._barcodes(r, found, not self.ignore_umi)

    cdef int _record(self, Rec *r, const uint8_t **found) except -1:
        cdef const BamCore *c = core_of(r.data)
        cdef int32_t tid = c.refid, pos = c.pos
        cdef uint64_t order_key = _pos_key(tid, pos)
        cdef int reason
        cdef int64_t start = 0, pos5 = 0, spliced = 0, gene = 0
        cdef int32_t cell = -1, b, e
        self.reads_in += 1
        if self.sorted_input:
            if order_key < self.last_order_key:
                name = (<const char *> r.data + 32)[:r.data[8] - 1].decode("utf-8", "replace")
                where = self.ref_names[tid].decode("utf-8", "replace") if tid >= 0 else "*"
                raise ValueError(f"{self.source}the header says @HD SO:coordinate but read {name} ({where}:{pos + 1}) "
                                 f"is out of order; sort the input or fix its header")
            self.last_order_key = order_key
        self.cur_tid = tid
        self.cur_pos = pos
        if self.dl_n:
            self._deadlines(order_key)
        if self.chrom_tid != -2 and tid != self.chrom_tid:
            return self._drop(R_OTHER_CHROM, r, c)
        if self.output_stats and not (c.flag & 0x84) and tid >= 0:
            # umi_tools' random_read_generator: the UMIs of every mapped read 1
            if self._barcodes(r, found, True) == R_OK:
                self.stat_umis.tally(self.umi_buf.data, self.umi_buf.used)
        reason = self._filters(r, c, found)
        if reason == R_SINGLE:
            return self._single(r, c)
        if reason != R_OK:
            if reason == R_READ2 and self.paired and self.mode == MODE_DEDUP and not self.classify and not self.mark:
                return self._mate_arrives(r, c)
            return self._drop(reason, r, c)
        if self.classify:  # the unassigned worker: these reads lack the cell tag
            return self._drop(R_NO_CELL, r, c)
        if self.per_cell:
            cell = self.cells.slots[self.cells.insert(self.cell_buf.data, self.cell_buf.used,
                                                      fnv1a64(self.cell_buf.data, self.cell_buf.used), -1)].out
        if self.per_gene:
            if self.per_contig:
                gene = self._contig_gene(tid)
            else:
                if found[self.t_assigned] == NULL or found[self.t_gene] == NULL:
                    return self._drop(R_NO_GENE, r, c)
                gene = self._gene(found, r)
                if gene == -1:
                    return self._drop(R_NO_GENE, r, c)  # an empty gene string
                if gene == -2:
                    return self._drop(R_GENE_FILTERED, r, c)
            if self.sorted_input:
                if self.last_tid != -2 and tid != self.last_tid:
                    self._flush(True, 0)
                self.last_tid = tid
            if self.mode == MODE_GROUP:
                self._position(r, c, &start, &pos5, &spliced)
            b = self._bundle(tid, gene, 0, 0, 0, 0, cell)
        else:
            if c.n_cigar == 0:
                return self._drop(R_NO_CIGAR, r, c)
            self._position(r, c, &start, &pos5, &spliced)
            if self.sorted_input:
                if self.whole_contig:
                    if tid != self.last_tid:
                        self._flush(True, 0)
                elif tid != self.last_tid:
                    self._flush(True, 0)
                elif start > self.last_start + WINDOW:
                    self._flush(False, start - WINDOW)
                self.last_start = start
                self.last_tid = tid
            b = self._bundle(tid, pos5, 1 if c.flag & 16 else 0, spliced if self.spliced else 0,
                             c.tlen if self.paired and not self.ignore_tlen else 0,
                             <int32_t> c.l_seq if self.read_length else 0, cell)
        e = self._entry(b)
        self._update(b, e, r, c, pos5, found)
        if self.t_name >= 0 and found[self.t_name] != NULL:
            self._note_name(gene, found[self.t_name], r)
        if self.out != NULL:
            self._emit(False)
        return 0

    cdef int64_t _gene(self, const uint8_t **found, const Rec *r) except -3:
        """The read's gene id; -1: an empty gene; -2: the assigned tag matches
        --skip-tags-regex. The previous read's answer is reused when both tags
        hold the same values (coordinate-sorted reads mostly share a gene)."""
        cdef const uint8_t *tv = found[self.t_gene]
        cdef const uint8_t *av = found[self.t_assigned]
        cdef Py_ssize_t n
        cdef bint same_tag = self.t_gene == self.t_assigned
        if self.last_gene_valid and tv[0] == b'Z' and (same_tag or av[0] == b'Z'):
            if _z_equals(tv + 1, &self.gene_buf) and (same_tag or _z_equals(av + 1, &self.assigned_buf)):
                return self.last_gene
        self.last_gene_valid = False
        if self._tag_value(&self.gene_buf, tv, self.t_gene, r) != KEY_FOUND:
            return -1
        self._tag_value(&self.assigned_buf, av, self.t_assigned, r)
        if self.skip_search is not None and self._skipped():
            self.last_gene = -2  # skipped genes are not counted, nor listed
        else:
            self.last_gene = self.genes.slots[self.genes.insert(self.gene_buf.data, self.gene_buf.used,
                                                                fnv1a64(self.gene_buf.data, self.gene_buf.used), -1)].out
        self.last_gene_valid = True
        return self.last_gene

    cdef bint _skipped(self) except -1:
        """umi_tools' --skip-tags-regex on the assigned tag (one regex search per distinct value)."""
        cdef Py_ssize_t slot = self.skip_cache.lookup(self.assigned_buf.data, self.assigned_buf.used)
        if slot < 0:
            value = (<const char *> self.assigned_buf.data)[:self.assigned_buf.used].decode("utf-8", "surrogateescape")
            hit = 1 if self.skip_search(value) is not None else 0
            slot = self.skip_cache.insert(self.assigned_buf.data, self.assigned_buf.used,
                                          fnv1a64(self.assigned_buf.data, self.assigned_buf.used), hit)
        return self.skip_cache.slots[slot].out == 1

    cdef int32_t _contig_gene(self, int32_t tid) except -1:
        """--per-contig: the reference name is the gene."""
        cdef bytes name
        cdef Py_ssize_t i
        if self.ref_gene[tid] < 0:
            name = self.ref_names[tid]
            i = self.genes.insert(<const uint8_t *> PyBytes_AS_STRING(name), len(name),
                                  fnv1a64(<const uint8_t *> PyBytes_AS_STRING(name), len(name)), -1)
            self.ref_gene[tid] = self.genes.slots[i].out
        return self.ref_gene[tid]

    cdef int _note_name(self, int64_t gene, const uint8_t *tv, const Rec *r) except -1:
        cdef Py_ssize_t old = self.name_seen_cap, i
        if gene < self.name_seen_cap and self.name_seen[gene]:
            return 0
        if gene >= self.name_seen_cap:
            _grow(<void **> &self.name_seen, &self.name_seen_cap, gene + 1, 1)
            for i in range(old, self.name_seen_cap):
                self.name_seen[i] = 0
        self.name_seen[gene] = 1
        self.work.used = 0
        if tag_key(&self.work, tv) == KEY_FOUND:
            self.gene_names[gene] = (<const char *> self.work.data)[:self.work.used]
        return 0

    cdef int _position(self, const Rec *r, const BamCore *c, int64_t *start, int64_t *pos5,
                       int64_t *spliced) except -1:
        """umi_tools' get_read_position: (start, 5' end incl. soft clips, splice offset or 0)."""
        cdef const uint8_t *cig = r.data + r.cigar
        cdef uint32_t n = c.n_cigar, k, v, op, length
        cdef uint32_t first_op, first_len, last_op, last_len
        cdef int64_t rlen = 0
        cdef bint has_n = False, check
        if n == 0:
            start[0] = pos5[0] = c.pos
            spliced[0] = 0
            return 0
        for k in range(n):
            v = u32(cig + 4 * k)
            op = v & 0xF
            if op == 0 or op == 2 or op == 3 or op == 7 or op == 8:
                rlen += v >> 4
            if op == 3:
                has_n = True
        v = u32(cig)
        first_op = v & 0xF
        first_len = v >> 4
        v = u32(cig + 4 * (n - 1))
        last_op = v & 0xF
        last_len = v >> 4
        spliced[0] = 0
        if c.flag & 16:
            pos5[0] = c.pos + rlen + (last_len if last_op == 4 else 0)
            start[0] = c.pos
            check = has_n or (first_op == 4 and first_len > self.soft_clip_threshold)
            if check:
                spliced[0] = self._find_splice(r, cig, n, True)
        else:
            pos5[0] = c.pos - (first_len if first_op == 4 else 0)
            start[0] = pos5[0]
            check = has_n or (last_op == 4 and last_len > self.soft_clip_threshold)
            if check:
                spliced[0] = self._find_splice(r, cig, n, False)
        return 0

    cdef int64_t _find_splice(self, const Rec *r, const uint8_t *cig, uint32_t n, bint reverse) except -1:
        """umi_tools' find_splice (on the reversed CIGAR for reverse reads): the
        offset of the first N or S after a leading soft clip; 0 (False) if none."""
        cdef int64_t offset = 0
        cdef uint32_t k, i, v, op
        cdef uint32_t first = 0
        v = u32(cig + 4 * ((n - 1) if reverse else 0))
        if (v & 0xF) == 4:
            offset = v >> 4
            first = 1
        for k in range(first, n):
            i = (n - 1 - k) if reverse else k
            v = u32(cig + 4 * i)
            op = v & 0xF
            if op == 3 or op == 4:
                return offset
            if op == 0 or op == 2 or op == 7 or op == 8:
                offset += v >> 4
            elif op == 1 or op == 5 or op == 6:
                continue
            else:
                raise ValueError(f"{describe(self.source, self.reader.records - 1, r)}: bad CIGAR operation {op}")
        return 0

    cdef int _drop(self, int reason, const Rec *r, const BamCore *c) except -1:
        self.dropped[reason] += 1
        if self.mark:  # written as it is
            self._hold(r, c.refid, c.pos, 1 if c.flag & 16 else 0, 0, ST_UNEXAMINED)
            self._emit(False)
        return 0

    cdef int _single(self, const Rec *r, const BamCore *c) except -1:
        """group: a read written without a group (umi_tools' "single_read")."""
        cdef int32_t h
        self.singles += 1
        if self.out == NULL:  # the group table only: nothing to write
            return 0
        h = self._hold(r, c.refid, c.pos, 1 if c.flag & 16 else 0, 0, ST_KEPT)
        self._push_out(h, 0, self.rank)
        self.rank += 1
        self._emit(False)
        return 0

    # == bundles =====================================================================================

    cdef int32_t _bundle(self, int32_t tid, int64_t pos, int32_t rev, int64_t spliced, int32_t tlen, int32_t rlen,
                         int32_t cell) except -1:
        cdef uint64_t h = mix64(<uint64_t> <uint32_t> tid * 0x9E3779B97F4A7C15ULL ^ <uint64_t> pos)
        cdef Py_ssize_t mask, i
        cdef int32_t b
        cdef Bundle *x
        h = mix64(h ^ (<uint64_t> rev << 1) ^ (<uint64_t> spliced * 0xC2B2AE3D27D4EB4FULL))
        h = mix64(h ^ (<uint64_t> <uint32_t> tlen << 32) ^ <uint64_t> <uint32_t> rlen)
        h = mix64(h ^ <uint64_t> <uint32_t> cell)
        mask = self.bundle_tab.cap - 1
        i = <Py_ssize_t> (h & <uint64_t> mask)
        while self.bundle_tab.s[i].v >= 0:
            if self.bundle_tab.s[i].h == h:
                x = &self.bundles[self.bundle_tab.s[i].v]
                if (x.tid == tid and x.pos == pos and x.rev == rev and x.spliced == spliced and x.tlen == tlen
                        and x.rlen == rlen and x.cell == cell):
                    return self.bundle_tab.s[i].v
            i = (i + 1) & mask
        b = _pool_take(<void **> &self.bundles, &self.bundles_cap, &self.n_bundles_used, &self.free_bundle,
                       sizeof(Bundle), LINK_BUNDLE)
        x = &self.bundles[b]
        x.tid = tid
        x.pos = pos
        x.rev = rev
        x.spliced = spliced
        x.tlen = tlen
        x.rlen = rlen
        x.cell = cell
        x.first = x.last = -1
        x.n_umis = 0
        x.n_reads = 0
        x.hash = h
        ht_insert(&self.bundle_tab, h, b)
        _grow(<void **> &self.open_list, &self.open_cap, self.n_open + 1, sizeof(int32_t))
        x.open_idx = <int32_t> self.n_open
        self.open_list[self.n_open] = b
        self.n_open += 1
        return b

    cdef int32_t _entry(self, int32_t b) except -1:
        """The bundle's entry of the UMI in umi_buf (added if new)."""
        cdef uint64_t code = 0, h
        cdef bint packed = pack2(self.umi_buf.data, self.umi_buf.used, &code)
        cdef int32_t ulen = <int32_t> self.umi_buf.used, e
        cdef Py_ssize_t mask, i
        cdef Entry *x
        cdef uint8_t *copy
        if not packed:
            code = fnv1a64(self.umi_buf.data, ulen)
        h = mix64(self.bundles[b].hash ^ mix64(code ^ (<uint64_t> ulen << 58) ^ (<uint64_t> packed << 57)))
        mask = self.entry_tab.cap - 1
        i = <Py_ssize_t> (h & <uint64_t> mask)
        while self.entry_tab.s[i].v >= 0:
            if self.entry_tab.s[i].h == h:
                x = &self.entries[self.entry_tab.s[i].v]
                if (x.bundle == b and x.ulen == ulen and x.packed == packed and x.code == code
                        and (packed or memcmp(x.ubytes, self.umi_buf.data, ulen) == 0)):
                    return self.entry_tab.s[i].v
            i = (i + 1) & mask
        e = _pool_take(<void **> &self.entries, &self.entries_cap, &self.n_entries_used, &self.free_entry,
                       sizeof(Entry), LINK_ENTRY)
        x = &self.entries[e]
        x.bundle = b
        x.next = -1
        x.code = code
        x.ulen = ulen
        x.packed = packed
        x.ubytes = NULL
        x.uchunk = -1
        if not packed:
            copy = self._alloc(ulen if ulen else 1, &x.uchunk)
            memcpy(copy, self.umi_buf.data, ulen)
            x.ubytes = copy
        x.count = 0
        x.ties = 0
        x.best = -1
        x.best_mapq = -1
        x.best_det = 0
        x.head = x.tail = -1
        x.stat_id = -1
        x.hash = h
        ht_insert(&self.entry_tab, h, e)
        if self.bundles[b].last >= 0:
            self.entries[self.bundles[b].last].next = e
        else:
            self.bundles[b].first = e
        self.bundles[b].last = e
        self.bundles[b].n_umis += 1
        return e

    cdef int64_t _det_value(self, const Rec *r, const uint8_t **found) except? -1:
        """--multimapping-detection-method: NH/X0 (lower is better) or XT == U (1 is better)."""
        cdef const uint8_t *tv = found[self.t_det]
        if self.det == 3:
            return 1 if tv != NULL and tv[0] == b'A' and tv[1] == b'U' else 0
        self.work.used = 0
        if tv == NULL or tag_key(&self.work, tv) != KEY_FOUND:
            return 1 << 62
        return int((<const char *> self.work.data)[:self.work.used])

    cdef int _update(self, int32_t b, int32_t e, const Rec *r, const BamCore *c, int64_t pos5,
                     const uint8_t **found) except -1:
        """umi_tools' update_dicts: count the read; keep the best read (dedup) or all reads (group)."""
        cdef Entry *x = &self.entries[e]
        cdef int32_t h
        cdef uint8_t rev = 1 if c.flag & 16 else 0
        cdef int64_t det = 0
        cdef bint taken = False
        cdef double draw
        x.count += 1
        self.bundles[b].n_reads += 1
        if self.mode == MODE_COUNT:
            return 0
        if self.mode == MODE_GROUP:
            h = self._hold(r, c.refid, c.pos, rev, pos5, ST_PENDING)
            self.held[h].entry = e
            if x.tail >= 0:
                self.held[x.tail].next = h
            else:
                x.head = h
            x.tail = h
            return 0
        # dedup: the best read of the UMI
        if self.det:
            det = self._det_value(r, found)
        if x.count == 1 or x.best_mapq < c.mapq:
            x.ties = 0
            return self._replace_best(e, r, c, det)
        if x.best_mapq > c.mapq:
            return self._lose(r, c)
        # equal MAPQ: the multimapping tag, then umi_tools' reservoir draw
        if self.det == 1 or self.det == 2:
            if x.best_det < det:
                return self._lose(r, c)
            if x.best_det > det:
                self._replace_best(e, r, c, det)
                taken = True
                self.entries[e].ties = 0
        elif self.det == 3:
            if x.best_det == 1:
                return self._lose(r, c)
            if det == 1:
                self._replace_best(e, r, c, det)
                taken = True
                self.entries[e].ties = 0
        x = &self.entries[e]
        x.ties += 1
        if self.seeded:
            draw = _mt_random(&self.mt)
            self.draws += 1
            if draw < 1.0 / x.ties and not taken:
                self._replace_best(e, r, c, det)
                taken = True
        if taken:
            return 0
        return self._lose(r, c)

    cdef int _lose(self, const Rec *r, const BamCore *c) except -1:
        """A read that is not (or no longer) the best of its UMI: a duplicate."""
        if self.mark:
            self._hold(r, c.refid, c.pos, 1 if c.flag & 16 else 0, 0, ST_DUP)
        return 0

    cdef int _replace_best(self, int32_t e, const Rec *r, const BamCore *c, int64_t det) except -1:
        cdef Entry *x = &self.entries[e]
        cdef int32_t old = x.best, h
        if old >= 0:
            if self.mark:
                self.held[old].state = ST_DUP
            else:
                self._claim_gone(old)
                self._unhold(old)
        h = self._hold(r, c.refid, c.pos, 1 if c.flag & 16 else 0, 0, ST_PENDING)
        x = &self.entries[e]
        x.best = h
        x.best_mapq = c.mapq
        x.best_det = det
        self.held[h].entry = e
        if self.paired and not self.mark and c.flag & 1 and not (c.flag & 8):
            self._claim(h, r, c)
        return 0

    # == flushing and deciding bundles ============================================================

    cdef int _flush(self, bint everything, int64_t upto) except -1:
        """Yield the open bundles at positions <= upto (or all), in umi_tools'
        order: position (or gene), then key (strand, splice, TLEN, length), then cell."""
        cdef Py_ssize_t i = 0, n = 0, k
        cdef int32_t b
        if self.n_open == 0:
            return 0
        _grow(<void **> &self.flush_list, &self.flush_cap, self.n_open, sizeof(int32_t))
        while i < self.n_open:
            b = self.open_list[i]
            if everything or self.bundles[b].pos <= upto:
                self.flush_list[n] = b
                n += 1
                self.n_open -= 1  # take it out: the last open bundle moves to i
                if i < self.n_open:
                    self.open_list[i] = self.open_list[self.n_open]
                    self.bundles[self.open_list[i]].open_idx = <int32_t> i
            else:
                i += 1
        # (count per cell, one reference a flush: the order changes nothing)
        if n > 1 and not (self.mode == MODE_COUNT and self.per_cell and self.sorted_input):
            self.flush_serial += 1
            if self.per_cell:
                self._ranks(self.cells, &self.cell_rank, &self.cell_stamp, &self.cell_rank_cap, n, False)
            if self.per_gene:
                self._ranks(self.genes, &self.gene_rank, &self.gene_stamp, &self.gene_rank_cap, n, True)
            _msort(self.flush_list, n, <cmp_fn> _cmp_bundles, <void *> self, &self.sort_tmp, &self.sort_tmp_cap)
        for k in range(n):
            self._decide(self.flush_list[k])
        return 0

    cdef int _ranks(self, ValueTable t, int32_t **rank, int32_t **stamp, Py_ssize_t *cap, Py_ssize_t n,
                    bint genes) except -1:
        """The bytes order of the cells (or genes) of the bundles being flushed, as
        ranks: the bundles then sort on numbers."""
        cdef Py_ssize_t k, m = 0, c1, c2, i
        cdef int32_t v
        cdef Bundle *x
        if t.n > cap[0]:
            c1 = c2 = cap[0]
            _grow(<void **> rank, &c1, t.n, sizeof(int32_t))
            _grow(<void **> stamp, &c2, t.n, sizeof(int32_t))
            for i in range(cap[0], c2):
                stamp[0][i] = 0
            cap[0] = c2
        _grow(<void **> &self.distinct, &self.distinct_cap, n, sizeof(int32_t))
        for k in range(n):
            x = &self.bundles[self.flush_list[k]]
            v = <int32_t> x.pos if genes else x.cell
            if v >= 0 and stamp[0][v] != self.flush_serial:
                stamp[0][v] = self.flush_serial
                self.distinct[m] = v
                m += 1
        self._rank_table = t
        _msort(self.distinct, m, <cmp_fn> _cmp_table_values, <void *> self, &self.sort_tmp, &self.sort_tmp_cap)
        for k in range(m):
            rank[0][self.distinct[k]] = <int32_t> k
        return 0

    cdef int _cmp_value(self, ValueTable t, int32_t a, int32_t b) noexcept:
        """bytes order of values a and b of table t (ids; -1 before everything)."""
        cdef Py_ssize_t la, lb
        cdef const uint8_t *pa
        cdef const uint8_t *pb
        cdef int c
        if a == b:
            return 0
        if a < 0 or b < 0:
            return -1 if a < b else 1
        la = t.slots[t.order[a]].length
        lb = t.slots[t.order[b]].length
        pa = t.arena + t.slots[t.order[a]].off
        pb = t.arena + t.slots[t.order[b]].off
        c = memcmp(pa, pb, la if la < lb else lb) if (la and lb) else 0
        if c:
            return c
        return (la > lb) - (la < lb)

    cdef int _decide(self, int32_t b) except -1:
        """Cluster one bundle's UMIs and act on the groups (see the class doc)."""
        cdef Bundle *x = &self.bundles[b]
        cdef Py_ssize_t n = x.n_umis, k, g
        cdef int32_t e, lead
        cdef Entry *en
        cdef Clusterer cl = self.cl
        _grow(<void **> &self.bundle_entries, &self.bundle_entries_cap, n, sizeof(int32_t))
        cl.reserve(n)
        e = x.first
        k = 0
        while e >= 0:
            en = &self.entries[e]
            self.bundle_entries[k] = e
            cl.set_coded(k, en.code, en.packed, en.ubytes, en.ulen, en.count)
            k += 1
            e = en.next
        if not cl.packed:  # compare bytes: unpack the packed ones into the scratch
            self._unpacked_ptrs(n)
        if self.mode == MODE_DEDUP and self.ignore_umi:
            cl.n_groups = 1  # one read per bundle, no clustering (umi_tools' --ignore-umi)
            cl.members[0] = 0
            cl.starts[0] = 0
            cl.starts[1] = 1
        else:
            cl.run()
        if self.mode == MODE_DEDUP:
            self._decide_dedup(b, n)
        elif self.mode == MODE_COUNT:
            self._decide_count(b)
        else:
            self._decide_group(b, n)
        # free the bundle and its UMIs
        for k in range(n):
            e = self.bundle_entries[k]
            en = &self.entries[e]
            ht_remove(&self.entry_tab, en.hash, e)
            if en.uchunk >= 0:
                self._release_chunk(en.uchunk)
            en.next = self.free_entry
            self.free_entry = e
        x = &self.bundles[b]
        ht_remove(&self.bundle_tab, x.hash, b)
        x.open_idx = self.free_bundle
        self.free_bundle = b
        return 0

    cdef int _unpacked_ptrs(self, Py_ssize_t n) except -1:
        """Bytes of every UMI of the bundle (packed ones spelled out) for byte comparison."""
        cdef Py_ssize_t k, total = 0, off = 0, i
        cdef Entry *en
        cdef Clusterer cl = self.cl
        for k in range(n):
            en = &self.entries[self.bundle_entries[k]]
            if en.packed:
                total += en.ulen
        self.unpacked.used = 0
        scratch_reserve(&self.unpacked, total + 1)
        for k in range(n):
            en = &self.entries[self.bundle_entries[k]]
            if en.packed:
                for i in range(en.ulen):
                    self.unpacked.data[off + i] = b"ACGT"[(en.code >> (2 * (en.ulen - 1 - i))) & 3]
                cl.ptrs[k] = self.unpacked.data + off
                off += en.ulen
        return 0

    cdef bytes _umi_bytes(self, int32_t e):
        cdef Entry *en = &self.entries[e]
        cdef bytes out
        cdef char *p
        cdef int32_t i
        if not en.packed:
            return (<const char *> en.ubytes)[:en.ulen]
        out = PyBytes_FromStringAndSize(NULL, en.ulen)
        p = PyBytes_AS_STRING(out)
        for i in range(en.ulen):
            p[i] = b"ACGT"[(en.code >> (2 * (en.ulen - 1 - i))) & 3]
        return out

    cdef int _decide_dedup(self, int32_t b, Py_ssize_t n) except -1:
        cdef Clusterer cl = self.cl
        cdef Py_ssize_t g, k
        cdef int32_t lead, h, e
        cdef int64_t group_reads, kept_here = 0, not_listed = 0, n_reads = self.bundles[b].n_reads
        cdef Entry *en
        cdef bint stats = self.output_stats and not self.ignore_umi
        cdef Py_ssize_t post_first = self.st_post_n
        for g in range(cl.n_groups):
            lead = self.bundle_entries[cl.members[cl.starts[g]]]
            if self.whitelist is not None or stats:
                group_reads = 0
                for k in range(cl.starts[g], cl.starts[g + 1]):
                    group_reads += self.entries[self.bundle_entries[cl.members[k]]].count
                if self.whitelist is not None and self._umi_bytes(lead).decode("utf-8", "surrogateescape") \
                        not in self.whitelist:
                    not_listed += group_reads
                    continue
                if stats:
                    self._stat_post(lead, group_reads)
            en = &self.entries[lead]
            h = en.best
            en.best = -1
            kept_here += 1
            if self.mark:
                self.held[h].state = ST_KEPT
            else:
                if self.paired and not (self.held[h].data[4 + 14] & 8):
                    self._visit(self.held[h].tid)
                self._claim_kept(h)
                self._push_out(h, 0, self.rank)
                self.rank += 1
        # the best reads of the other UMIs are duplicates
        for k in range(n):
            e = self.bundle_entries[k]
            h = self.entries[e].best
            if h >= 0:
                self.entries[e].best = -1
                if self.mark:
                    self.held[h].state = ST_DUP
                else:
                    self._claim_gone(h)
                    self._unhold(h)
        self.kept += kept_here
        self.dropped[R_NOT_WHITELISTED] += not_listed
        self.dropped[R_DUPLICATE] += n_reads - kept_here - not_listed
        self.molecules += kept_here
        if stats:
            if kept_here:
                self._stat_bundle(n, post_first)
            else:
                self.st_post_n = post_first
        return 0

    cdef int _decide_count(self, int32_t b) except -1:
        cdef Bundle *x = &self.bundles[b]
        cdef Py_ssize_t i, mask
        cdef uint64_t h
        cdef int32_t gene = <int32_t> x.pos, cell = x.cell, r
        self.counted += x.n_reads
        self.molecules += self.cl.n_groups
        if cell >= 0:  # per cell: one count per (gene, cell); a later reference's count replaces it (umi_tools)
            h = mix64((<uint64_t> <uint32_t> gene << 32) | <uint64_t> <uint32_t> cell)
            mask = self.res_tab.cap - 1
            i = <Py_ssize_t> (h & <uint64_t> mask)
            while self.res_tab.s[i].v >= 0:
                r = self.res_tab.s[i].v
                if self.res_tab.s[i].h == h and self.res[3 * r] == gene and self.res[3 * r + 1] == cell:
                    self.res[3 * r + 2] = <int32_t> self.cl.n_groups
                    self.overwritten += 1
                    return 0
                i = (i + 1) & mask
            ht_insert(&self.res_tab, h, <int32_t> self.res_n)
        self._add_result(gene, cell, <int32_t> self.cl.n_groups)
        return 0

    cdef int _add_result(self, int32_t gene, int32_t cell, int32_t count) except -1:
        _grow(<void **> &self.res, &self.res_cap, 3 * (self.res_n + 1), sizeof(int32_t))
        self.res[3 * self.res_n] = gene
        self.res[3 * self.res_n + 1] = cell
        self.res[3 * self.res_n + 2] = count
        self.res_n += 1
        return 0

    cdef int _decide_group(self, int32_t b, Py_ssize_t n) except -1:
        cdef Clusterer cl = self.cl
        cdef Py_ssize_t g, k
        cdef int32_t lead, e, h, nxt
        cdef int64_t group_reads, uid
        cdef bytes top
        cdef Entry *en
        for g in range(cl.n_groups):
            lead = self.bundle_entries[cl.members[cl.starts[g]]]
            group_reads = 0
            for k in range(cl.starts[g], cl.starts[g + 1]):
                group_reads += self.entries[self.bundle_entries[cl.members[k]]].count
            top = self._umi_bytes(lead)
            uid = self.unique_id
            self.unique_id += 1
            self.groups_out += 1
            for k in range(cl.starts[g], cl.starts[g + 1]):
                e = self.bundle_entries[cl.members[k]]
                h = self.entries[e].head
                self.entries[e].head = -1
                while h >= 0:
                    nxt = self.held[h].next
                    if self.tsv != NULL:
                        self._group_row(b, e, h, top, group_reads, uid)
                    if self.out != NULL:
                        self._retag(h, uid, top)
                        self._push_out(h, 0, self.rank)
                        self.rank += 1
                    else:
                        self._unhold(h)
                    self.grouped += 1
                    h = nxt
        self.molecules += cl.n_groups
        # reads of UMIs in no group (percentile)
        for k in range(n):
            e = self.bundle_entries[k]
            h = self.entries[e].head
            if h >= 0:
                self.dropped[R_DISCARDED] += self.entries[e].count
                while h >= 0:
                    nxt = self.held[h].next
                    self._unhold(h)
                    h = nxt
                self.entries[e].head = -1
        return 0

    cdef int _retag(self, int32_t h, int64_t uid, bytes top) except -1:
        """pysam's set_tag('UG', uid) then set_tag(<group tag>, top): each drops the
        first such tag and appends the new one (UG as C, S or I by its size)."""
        cdef Held *x = &self.held[h]
        cdef Scratch *w = &self.work
        cdef const uint8_t *rec = x.data + 4
        cdef uint32_t size = x.size - 4
        cdef const BamCore *c = core_of(rec)
        cdef Py_ssize_t aux = 32 + c.l_read_name + 4 * c.n_cigar + ((c.l_seq + 1) >> 1) + c.l_seq
        cdef uint8_t ug[7]
        cdef Py_ssize_t ug_len
        cdef int32_t chunk
        cdef uint8_t *fresh
        cdef const char *gt = PyBytes_AS_STRING(self.group_tag)
        w.used = 0
        scratch_put(w, rec, size)
        _drop_first_tag(w, aux, b"UG")
        ug[0] = b'U'
        ug[1] = b'G'
        if uid <= 255:
            ug[2] = b'C'
            ug[3] = <uint8_t> uid
            ug_len = 4
        elif uid <= 65535:
            ug[2] = b'S'
            ug[3] = uid & 0xFF
            ug[4] = (uid >> 8) & 0xFF
            ug_len = 5
        else:
            ug[2] = b'I'
            put_u32(ug + 3, <uint32_t> uid)
            ug_len = 7
        scratch_put(w, ug, ug_len)
        _drop_first_tag(w, aux, <const uint8_t *> gt)
        scratch_put(w, gt, 2)
        scratch_put(w, b"Z", 1)
        scratch_put(w, PyBytes_AS_STRING(top), len(top))
        scratch_put(w, b"\0", 1)
        fresh = self._alloc(4 + w.used, &chunk)
        put_u32(fresh, <uint32_t> w.used)
        memcpy(fresh + 4, w.data, w.used)
        self._release_chunk(x.chunk)
        x.data = fresh
        x.size = <uint32_t> (4 + w.used)
        x.chunk = chunk
        return 0

    cdef int _group_row(self, int32_t b, int32_t e, int32_t h, bytes top, int64_t group_reads,
                        int64_t uid) except -1:
        """umi_tools group's --group-out line: read_id contig position gene umi
        umi_count final_umi final_umi_count unique_id (fields escaped as write_tsv does)."""
        cdef Held *x = &self.held[h]
        cdef const uint8_t *rec = x.data + 4
        cdef Scratch *w = &self.work
        cdef bytes gene
        w.used = 0
        _put_field(w, rec + 32, rec[8] - 1)
        scratch_put(w, b"\t", 1)
        _put_bytes(w, self.ref_names[x.tid])
        scratch_put(w, b"\t", 1)
        scratch_put_decimal(w, x.pos5)
        scratch_put(w, b"\t", 1)
        if not self.per_gene:
            scratch_put(w, b"NA", 2)
        else:
            gene = self.genes.value_at(self.bundles[b].pos)
            _put_bytes(w, gene)
        scratch_put(w, b"\t", 1)
        _put_bytes(w, self._umi_bytes(e))
        scratch_put(w, b"\t", 1)
        scratch_put_decimal(w, self.entries[e].count)
        scratch_put(w, b"\t", 1)
        _put_bytes(w, top)
        scratch_put(w, b"\t", 1)
        scratch_put_decimal(w, group_reads)
        scratch_put(w, b"\t", 1)
        scratch_put_decimal(w, uid)
        scratch_put(w, b"\n", 1)
        out_put(self.tsv, <const char *> w.data, w.used)
        self.tsv.records += 1
        return 0

    # == --output-stats ===============================================================================

    cdef int64_t _stat_id(self, int32_t e) except -1:
        cdef Entry *en = &self.entries[e]
        cdef bytes u
        if en.stat_id < 0:
            u = self._umi_bytes(e)
            en.stat_id = self.stat_umis.slots[self.stat_umis.insert(
                <const uint8_t *> PyBytes_AS_STRING(u), len(u), fnv1a64(<const uint8_t *> PyBytes_AS_STRING(u), len(u)),
                -1)].out
        return en.stat_id

    cdef int _stat_post(self, int32_t lead, int64_t group_reads) except -1:
        _grow(<void **> &self.st_post, &self.st_post_cap, 2 * (self.st_post_n + 1), sizeof(int64_t))
        self.st_post[2 * self.st_post_n] = self._stat_id(lead)
        self.st_post[2 * self.st_post_n + 1] = group_reads
        self.st_post_n += 1
        return 0

    cdef double _mean_distance(self, const int64_t *pairs, Py_ssize_t n) except? -2:
        """umi_tools' get_average_umi_distance over n (UMI id, reads) pairs: -1 for one UMI."""
        cdef Py_ssize_t i, j, m = 0
        cdef int64_t total = 0
        if n < 2:
            return -1.0
        for i in range(n):
            for j in range(i + 1, n):
                total += _stat_distance(self.stat_umis, pairs[2 * i], pairs[2 * j])
                m += 1
        return <double> total / <double> m

    cdef int _stat_bundle(self, Py_ssize_t n, Py_ssize_t post_first) except -1:
        """Pre- and post-deduplication UMIs of a bundle with kept reads, in yield order."""
        cdef Py_ssize_t k, c, n_post = self.st_post_n - post_first
        cdef int32_t e
        _grow(<void **> &self.st_pre, &self.st_pre_cap, 2 * (self.st_pre_n + n), sizeof(int64_t))
        for k in range(n):
            e = self.bundle_entries[k]
            self.st_pre[2 * (self.st_pre_n + k)] = self._stat_id(e)
            self.st_pre[2 * (self.st_pre_n + k) + 1] = self.entries[e].count
        if 2 * (self.st_b_n + 1) > self.st_b_cap:  # (two numbers a bundle)
            c = _regrow(<void **> &self.st_sizes, self.st_b_cap, 2 * (self.st_b_n + 1), sizeof(int64_t))
            c = _regrow(<void **> &self.st_avg, self.st_b_cap, 2 * (self.st_b_n + 1), sizeof(double))
            self.st_b_cap = c
        self.st_sizes[2 * self.st_b_n] = n
        self.st_sizes[2 * self.st_b_n + 1] = n_post
        self.st_avg[2 * self.st_b_n] = self._mean_distance(self.st_pre + 2 * self.st_pre_n, n)
        self.st_avg[2 * self.st_b_n + 1] = self._mean_distance(self.st_post + 2 * post_first, n_post)
        self.st_pre_n += n
        self.st_b_n += 1
        return 0

    # == --paired: the mate of each kept read 1 ===========================================================

    cdef uint64_t _pair_hash(self, const uint8_t *name, Py_ssize_t nlen, int32_t tid, int32_t pos) noexcept:
        return mix64(fnv1a64(name, nlen) ^ (_pos_key(tid, pos) * 0x9E3779B97F4A7C15ULL))

    cdef int32_t _pair_find(self, const uint8_t *name, Py_ssize_t nlen, int32_t tid, int32_t pos,
                            uint64_t h) noexcept:
        cdef Py_ssize_t mask = self.pair_tab.cap - 1
        cdef Py_ssize_t i = <Py_ssize_t> (h & <uint64_t> mask)
        cdef PairKey *p
        while self.pair_tab.s[i].v >= 0:
            if self.pair_tab.s[i].h == h:
                p = &self.pairs[self.pair_tab.s[i].v]
                if p.tid == tid and p.pos == pos and p.name_len == nlen and memcmp(p.name, name, nlen) == 0:
                    return self.pair_tab.s[i].v
            i = (i + 1) & mask
        return -1

    cdef int32_t _pair_new(self, const uint8_t *name, Py_ssize_t nlen, int32_t tid, int32_t pos,
                           uint64_t h) except -1:
        cdef int32_t k
        cdef PairKey *p
        cdef uint8_t *copy
        k = _pool_take(<void **> &self.pairs, &self.pairs_cap, &self.n_pairs_used, &self.free_pair, sizeof(PairKey),
                       LINK_PAIR)
        p = &self.pairs[k]
        copy = self._alloc(nlen if nlen else 1, &p.name_chunk)
        memcpy(copy, name, nlen)
        p.name = copy
        p.name_len = <int32_t> nlen
        p.tid = tid
        p.pos = pos
        p.n_pending = 0
        p.kept_tid = -2
        p.mate = -1
        p.mate_done = 0
        p.hash = h
        p.serial = self.pair_serial
        self.pair_serial += 1
        ht_insert(&self.pair_tab, h, k)
        return k

    cdef void _pair_free(self, int32_t k) noexcept:
        cdef PairKey *p = &self.pairs[k]
        ht_remove(&self.pair_tab, p.hash, k)
        self._release_chunk(p.name_chunk)
        p.serial = -1
        p.next_free = self.free_pair
        self.free_pair = k

    cdef int _deadline(self, int32_t k, int32_t tid, int32_t pos) except -1:
        cdef OutItem item
        cdef Py_ssize_t i, parent
        item.k1 = _pos_key(tid, pos)
        item.k2 = <uint64_t> self.pairs[k].serial
        item.held = k
        _grow(<void **> &self.dl_heap, &self.dl_cap, self.dl_n + 1, sizeof(OutItem))
        i = self.dl_n
        self.dl_n += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self.dl_heap[parent].k1 <= item.k1:
                break
            self.dl_heap[i] = self.dl_heap[parent]
            i = parent
        self.dl_heap[i] = item
        return 0

    cdef int _claim(self, int32_t h, const Rec *r, const BamCore *c) except -1:
        """A read 1 that may be kept: it would claim the mate at (next refID, next pos)."""
        cdef const uint8_t *name = r.data + 32
        cdef Py_ssize_t nlen = r.data[8] - 1
        cdef uint64_t hh = self._pair_hash(name, nlen, c.next_refid, c.next_pos)
        cdef int32_t k = self._pair_find(name, nlen, c.next_refid, c.next_pos, hh)
        if k < 0:
            k = self._pair_new(name, nlen, c.next_refid, c.next_pos, hh)
        self.pairs[k].n_pending += 1
        self.held[h].pair = k
        return 0

    cdef int _claim_gone(self, int32_t h) except -1:
        cdef int32_t k = self.held[h].pair
        if k < 0:
            return 0
        self.held[h].pair = -1
        self.pairs[k].n_pending -= 1
        return self._settle(k)

    cdef int _claim_kept(self, int32_t h) except -1:
        cdef int32_t k = self.held[h].pair
        if k < 0:
            return 0
        self.held[h].pair = -1
        self.pairs[k].n_pending -= 1
        self.pairs[k].kept_tid = self.held[h].tid
        if self.pairs[k].mate >= 0 and not self.pairs[k].mate_done:
            self._write_mate(k)
        return self._settle(k)

    cdef int _write_mate(self, int32_t k) except -1:
        """The mate of pair k's kept read 1 arrived: umi_tools' TwoPassPairWriter
        writes it when it scans the mate's reference, which it does when it
        leaves a reference it wrote a read 1 on (with its mate mapped); at the
        end it reads on from where its last scan stopped. So a mate on the read
        1's reference is written after that reference's read 1s (class 1); one
        on a later reference when the writer gets there (class 1), or at the
        end if the writer never gets past it (class 2); one on an earlier
        reference never."""
        cdef PairKey *p = &self.pairs[k]
        cdef int32_t m = p.mate
        cdef int32_t y = self.held[m].tid
        p.mate = -1
        p.mate_done = 1
        if y == p.kept_tid or y == self.visited_tid:  # the writer is (or will be) there
            self.mates += 1
            self._push_out(m, 1, self.held[m].seq)
        elif <uint32_t> y < <uint32_t> p.kept_tid:
            self.dropped[R_READ2] += 1
            self._unhold(m)
        else:
            _grow(<void **> &self.deferred, &self.deferred_cap, self.deferred_n + 1, sizeof(int32_t))
            self.deferred[self.deferred_n] = m
            self.deferred_n += 1
        return 0

    cdef int _visit(self, int32_t tid) except -1:
        """The pair writer writes a read 1 on ``tid``: mates waiting for its scan of
        ``tid`` will be written there; those on references it passed, never."""
        cdef Py_ssize_t i, k = 0
        cdef int32_t m, y
        if tid == self.visited_tid:
            return 0
        self.visited_tid = tid
        for i in range(self.deferred_n):
            m = self.deferred[i]
            y = self.held[m].tid
            if y == tid:
                self.mates += 1
                self._push_out(m, 1, self.held[m].seq)
            elif <uint32_t> y < <uint32_t> tid:
                self.dropped[R_READ2] += 1
                self._unhold(m)
            else:
                self.deferred[k] = m
                k += 1
        self.deferred_n = k
        return 0

    cdef int _settle(self, int32_t k) except -1:
        cdef PairKey *p = &self.pairs[k]
        if p.n_pending > 0:
            return 0
        if p.kept_tid != -2:
            if p.mate_done:
                self._pair_free(k)
            else:  # wait for the mate until the input passes its position
                self._deadline(k, p.tid, p.pos)
            return 0
        if p.mate >= 0:
            self.dropped[R_READ2] += 1
            self._unhold(p.mate)
            p.mate = -1
        self._pair_free(k)
        return 0

    cdef int _mate_arrives(self, const Rec *r, const BamCore *c) except -1:
        """A read 2 (--paired): written if it is the mate of a kept read 1."""
        cdef const uint8_t *name = r.data + 32
        cdef Py_ssize_t nlen = r.data[8] - 1
        cdef uint64_t hh
        cdef int32_t k, h
        if c.flag & 4 or c.flag & 8 or c.refid < 0:  # never a mate in umi_tools' TwoPassPairWriter
            self.dropped[R_READ2] += 1
            return 0
        hh = self._pair_hash(name, nlen, c.refid, c.pos)
        k = self._pair_find(name, nlen, c.refid, c.pos, hh)
        if k >= 0:
            if self.pairs[k].mate_done or self.pairs[k].mate >= 0:  # the first one found is the mate
                self.dropped[R_READ2] += 1
                return 0
            h = self._hold(r, c.refid, c.pos, 1 if c.flag & 16 else 0, 0, ST_PENDING)
            self.pairs[k].mate = h
            if self.pairs[k].kept_tid != -2:
                self._write_mate(k)
                self._settle(k)
        elif _pos_key(c.next_refid, c.next_pos) < _pos_key(c.refid, c.pos):
            self.dropped[R_READ2] += 1  # its read 1 came before and was not kept
            return 0
        else:  # its read 1 is still to come
            h = self._hold(r, c.refid, c.pos, 1 if c.flag & 16 else 0, 0, ST_PENDING)
            k = self._pair_new(name, nlen, c.refid, c.pos, hh)
            self.pairs[k].mate = h
            self._deadline(k, c.next_refid, c.next_pos)
        self._emit(False)
        return 0

    cdef int _deadlines(self, uint64_t now) except -1:
        """Pairs whose read 1 (or mate) can no longer come: drop or forget them."""
        cdef OutItem item
        cdef int32_t k
        while self.dl_n and self.dl_heap[0].k1 < now:
            item = self.dl_heap[0]
            self._heap_pop_dl()
            k = item.held
            if self.pairs[k].serial != <int64_t> item.k2 or self.pairs[k].n_pending > 0:
                continue
            if self.pairs[k].kept_tid == -2 and self.pairs[k].mate >= 0:
                self.dropped[R_READ2] += 1
                self._unhold(self.pairs[k].mate)
                self.pairs[k].mate = -1
            self._pair_free(k)
        return 0

    cdef void _heap_pop_dl(self) noexcept:
        cdef Py_ssize_t i = 0, child
        cdef OutItem last
        self.dl_n -= 1
        if self.dl_n == 0:
            return
        last = self.dl_heap[self.dl_n]
        while True:
            child = 2 * i + 1
            if child >= self.dl_n:
                break
            if child + 1 < self.dl_n and self.dl_heap[child + 1].k1 < self.dl_heap[child].k1:
                child += 1
            if self.dl_heap[child].k1 >= last.k1:
                break
            self.dl_heap[i] = self.dl_heap[child]
            i = child
        self.dl_heap[i] = last

    cdef int _finish_pairs(self) except -1:
        cdef Py_ssize_t k, i
        for k in range(self.n_pairs_used):
            if self.pairs[k].serial >= 0:
                if self.pairs[k].mate >= 0:
                    self.dropped[R_READ2] += 1
                    self._unhold(self.pairs[k].mate)
                    self.pairs[k].mate = -1
                self._pair_free(<int32_t> k)
        self.dl_n = 0
        for i in range(self.deferred_n):  # found by the final read to the end of the file
            self.mates += 1
            self._push_out(self.deferred[i], 2, self.held[self.deferred[i]].seq)
        self.deferred_n = 0
        return 0

    # == the run ==============================================================================================

    cdef int _setup(self) except -1:
        """What the header says: references, sort order, the --chrom reference."""
        from bamflow.kernels._records import parse_header
        cdef Py_ssize_t i
        _, text, refs = parse_header(self.reader.header_bytes, self.source)
        self.ref_names = [name for name, _ in refs]
        self.n_ref = <int32_t> len(refs)
        self.ref_gene = <int32_t *> malloc((self.n_ref + 1) * sizeof(int32_t))
        if self.ref_gene == NULL:
            raise MemoryError()
        for i in range(self.n_ref):
            self.ref_gene[i] = -1
        self.sorted_input = False
        for line in text.split(b"\n"):
            if line.startswith(b"@HD\t"):
                self.sorted_input = b"SO:coordinate" in line.split(b"\t")
        if self.chrom is not None:
            want = self.chrom.encode() if isinstance(self.chrom, str) else bytes(self.chrom)
            if want not in self.ref_names:
                raise ValueError(f"{self.source}--chrom {want.decode(errors='replace')} is not a reference of the input")
            self.chrom_tid = <int32_t> self.ref_names.index(want)
        return 0

    def run(self):
        """Read every record; returns the counts (see the class doc)."""
        cdef Rec r
        cdef const uint8_t *found[MAX_TAGS]
        cdef int got
        self.reader.read_header()
        self._setup()
        if self.out != NULL:
            out_put(self.out, <const char *> self.reader.header(), self.reader.header_len)
        self.reader.release()
        while True:
            got = self.reader.next(&r, self.tags, found)
            if got == STREAM_END:
                break
            self._record(&r, found)
            self.reader.release()
        self.cur_tid = -1
        self.cur_pos = -1
        self._flush(True, 0)
        self._finish_pairs()
        self._emit(True)
        self.outs.flush_all()
        self.reader.report()
        return self._result()

    cdef dict _result(self):
        cdef Py_ssize_t k
        result = {
            "reads_in": self.reads_in,
            "written": self.written,
            "kept": self.kept,
            "mates": self.mates,
            "singles": self.singles,
            "grouped": self.grouped,
            "counted": self.counted,
            "molecules": self.molecules,
            "groups": self.groups_out,
            "dropped": {DROP_REASONS[k]: self.dropped[k] for k in range(N_REASONS) if self.dropped[k]},
            "positions": self.cl.positions,
            "total_umis": self.cl.total_umis,
            "max_umis": self.cl.max_umis,
            "draws": self.draws,
            "sorted": self.sorted_input,
            "tsv_rows": self.tsv.records if self.tsv != NULL else 0,
            "bytes": self.reader.bytes_read,
        }
        if self.reader.seen_tags != NULL:
            result["tags_seen"] = self.reader.tags_seen
        if self.mode == MODE_COUNT:
            result.update(
                genes=self.genes.values(),
                cells=self.cells.values(),
                entries=(<char *> self.res)[:3 * self.res_n * sizeof(int32_t)] if self.res_n else b"",
                names={self.genes.value_at(g): name for g, name in self.gene_names.items()},
                overwritten=self.overwritten,
            )
        if self.output_stats:
            result["stats"] = dict(
                umis=self.stat_umis.values(),
                frequencies=list(self.stat_umis.counts().values()),
                pre=_i64_bytes(self.st_pre, 2 * self.st_pre_n),
                post=_i64_bytes(self.st_post, 2 * self.st_post_n),
                sizes=_i64_bytes(self.st_sizes, 2 * self.st_b_n),
                mean_distances=(<char *> self.st_avg)[:2 * self.st_b_n * sizeof(double)] if self.st_b_n else b"",
            )
        return result


cdef inline bint _z_equals(const uint8_t *z, const Scratch *s) noexcept:
    """Whether the NUL-terminated string at z (a checked Z value) is s's bytes."""
    cdef Py_ssize_t i
    for i in range(s.used):
        if z[i] != s.data[i]:  # also stops at z's NUL
            return False
    return z[s.used] == 0


cdef bytes _i64_bytes(int64_t *a, Py_ssize_t n):
    return (<char *> a)[:n * sizeof(int64_t)] if n else b""


cdef int64_t _stat_distance(ValueTable t, int64_t a, int64_t b) noexcept:
    """Hamming distance of two UMIs of the stats table (umi_tools' edit_distance)."""
    cdef Py_ssize_t la = t.slots[t.order[a]].length, lb = t.slots[t.order[b]].length, i
    cdef const uint8_t *pa = t.arena + t.slots[t.order[a]].off
    cdef const uint8_t *pb = t.arena + t.slots[t.order[b]].off
    cdef int64_t d = 0
    if la != lb:
        return la if la > lb else lb
    for i in range(la):
        if pa[i] != pb[i]:
            d += 1
    return d


cdef int _cmp_bundles(void *ctx, int32_t a, int32_t b) noexcept:
    """umi_tools' yield order: sorted(positions), then sorted(keys): ((strand,
    splice, TLEN, length), cell) or, per gene, (gene, cell); genes and cells by
    their ranks (the bytes order, see UmiKernel._ranks)."""
    cdef UmiKernel k = <UmiKernel> ctx
    cdef Bundle *x = &k.bundles[a]
    cdef Bundle *y = &k.bundles[b]
    cdef int32_t rx, ry
    if x.tid != y.tid:
        return -1 if <uint32_t> x.tid < <uint32_t> y.tid else 1
    if k.per_gene:
        rx = k.gene_rank[x.pos]
        ry = k.gene_rank[y.pos]
        if rx != ry:
            return -1 if rx < ry else 1
    else:
        if x.pos != y.pos:
            return -1 if x.pos < y.pos else 1
        if x.rev != y.rev:
            return -1 if x.rev < y.rev else 1
        if x.spliced != y.spliced:
            return -1 if x.spliced < y.spliced else 1
        if x.tlen != y.tlen:
            return -1 if x.tlen < y.tlen else 1
        if x.rlen != y.rlen:
            return -1 if x.rlen < y.rlen else 1
    if x.cell == y.cell:
        return 0
    rx = k.cell_rank[x.cell] if x.cell >= 0 else -1
    ry = k.cell_rank[y.cell] if y.cell >= 0 else -1
    return -1 if rx < ry else 1


cdef int _cmp_table_values(void *ctx, int32_t a, int32_t b) noexcept:
    cdef UmiKernel k = <UmiKernel> ctx
    return k._cmp_value(k._rank_table, a, b)


cdef int _want(list names, str tag) except -1:
    """The index of ``tag`` among the tags read from each record (added if new)."""
    if tag in names:
        return names.index(tag)
    names.append(tag)
    return len(names) - 1


cdef object _opt_bytes(object value):
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


cdef int _drop_first_tag(Scratch *w, Py_ssize_t aux, const uint8_t *tag) except -1:
    """Remove the first aux field named ``tag`` from the record in ``w`` (checked aux data)."""
    cdef Py_ssize_t p = aux, size
    cdef const uint8_t *end = w.data + w.used
    while p + 3 <= w.used:
        size = _aux_size(w.data + p + 2, end)
        if w.data[p] == tag[0] and w.data[p + 1] == tag[1]:
            memcpy(w.data + p, w.data + p + 3 + size, w.used - (p + 3 + size))
            w.used -= 3 + size
            return 1
        p += 3 + size
    return 0


cdef Py_ssize_t _aux_size(const uint8_t *tv, const uint8_t *end) noexcept:
    cdef uint8_t t = tv[0]
    cdef uint32_t count
    cdef Py_ssize_t elem
    if t == b'A' or t == b'c' or t == b'C':
        return 1
    if t == b's' or t == b'S':
        return 2
    if t == b'i' or t == b'I' or t == b'f':
        return 4
    if t == b'Z' or t == b'H':
        return <Py_ssize_t> strlen(<const char *> tv + 1) + 1
    # B: subtype, count, values
    elem = 1 if tv[1] in (b'c', b'C') else (2 if tv[1] in (b's', b'S') else 4)
    count = u32(tv + 2)
    return 5 + elem * count


cdef int _put_field(Scratch *w, const uint8_t *s, Py_ssize_t n) except -1:
    """A table field escaped as bamflow's write_tsv does (\\\\ \\t \\n \\r \\0)."""
    cdef Py_ssize_t i, start = 0
    cdef uint8_t ch
    for i in range(n):
        ch = s[i]
        if ch == 92 or ch == 9 or ch == 10 or ch == 13 or ch == 0:
            scratch_put(w, s + start, i - start)
            if ch == 92:
                scratch_put(w, b"\\\\", 2)
            elif ch == 9:
                scratch_put(w, b"\\t", 2)
            elif ch == 10:
                scratch_put(w, b"\\n", 2)
            elif ch == 13:
                scratch_put(w, b"\\r", 2)
            else:
                scratch_put(w, b"\\0", 2)
            start = i + 1
    scratch_put(w, s + start, n - start)
    return 0


cdef int _put_bytes(Scratch *w, bytes b) except -1:
    return _put_field(w, <const uint8_t *> PyBytes_AS_STRING(b), len(b))


def mean_distances(list umis, const int64_t[::1] idx not None):
    """umi_tools' get_average_umi_distance of ``[umis[i] for i in idx]``: the
    mean Hamming distance over all pairs; -1.0 for one UMI."""
    cdef Py_ssize_t n = idx.shape[0], i, j, k, la, lb, pairs = 0
    cdef int64_t total = 0, d
    cdef const char *a
    cdef const char *b
    cdef bytes ua, ub
    if n == 1:
        return -1.0
    if n == 0:
        raise ZeroDivisionError("no UMIs")
    for i in range(n):
        ua = umis[idx[i]]
        a = PyBytes_AS_STRING(ua)
        la = PyBytes_GET_SIZE(ua)
        for j in range(i + 1, n):
            ub = umis[idx[j]]
            b = PyBytes_AS_STRING(ub)
            lb = PyBytes_GET_SIZE(ub)
            if la != lb:
                d = la if la > lb else lb
            else:
                d = 0
                for k in range(la):
                    if a[k] != b[k]:
                        d += 1
            total += d
            pairs += 1
    return <double> total / <double> pairs


def format_table(list genes, list cells, const int64_t[::1] gene_idx not None, cell_idx,
                 const int64_t[::1] counts not None, str kind):
    """Lines of a count table from arrays (no Python object per line):
    ``"tsv"``: ``gene<TAB>cell<TAB>count`` (``cells`` None: ``gene<TAB>count``);
    ``"mtx"``: ``row col count`` (numbers as given); ``"wide"``: one line per
    gene, ``gene`` then the count in each of ``cells`` (entries sorted by
    gene, then by ``cell_idx``, the column). Names are escaped as write_tsv does."""
    cdef Py_ssize_t n = gene_idx.shape[0], i, j, col, n_cols
    cdef Scratch w
    cdef const int64_t[::1] ci
    cdef int64_t gene
    cdef bytes out
    w.data = NULL
    w.used = w.cap = 0
    if cell_idx is not None:
        ci = cell_idx
        if ci.shape[0] != n:
            raise ValueError("gene and cell index arrays differ in length")
    if counts.shape[0] != n:
        raise ValueError("index and count arrays differ in length")
    try:
        if kind == "mtx":
            for i in range(n):
                scratch_put_decimal(&w, gene_idx[i])
                scratch_put(&w, b" ", 1)
                scratch_put_decimal(&w, ci[i])
                scratch_put(&w, b" ", 1)
                scratch_put_decimal(&w, counts[i])
                scratch_put(&w, b"\n", 1)
        elif kind == "tsv":
            for i in range(n):
                _put_bytes(&w, genes[gene_idx[i]])
                scratch_put(&w, b"\t", 1)
                if cells is not None:
                    _put_bytes(&w, cells[ci[i]])
                    scratch_put(&w, b"\t", 1)
                scratch_put_decimal(&w, counts[i])
                scratch_put(&w, b"\n", 1)
        elif kind == "wide":
            n_cols = len(cells)
            i = 0
            while i < n:
                gene = gene_idx[i]
                _put_bytes(&w, genes[gene])
                col = 0
                while col < n_cols:
                    scratch_put(&w, b"\t", 1)
                    if i < n and gene_idx[i] == gene and ci[i] == col:
                        scratch_put_decimal(&w, counts[i])
                        i += 1
                    else:
                        scratch_put(&w, b"0", 1)
                    col += 1
                while i < n and gene_idx[i] == gene:  # (a repeated column: its first count was written)
                    i += 1
                scratch_put(&w, b"\n", 1)
        else:
            raise ValueError(f"kind must be tsv, mtx or wide, not {kind!r}")
        out = (<char *> w.data)[:w.used] if w.used else b""
    finally:
        scratch_free(&w)
    return out


# == count_tab ======================================================================================

cdef inline bint _is_space(uint8_t c) noexcept:
    return c == 32 or (9 <= c <= 13)


cdef class CountTab:
    """umi_tools count_tab over text: lines ``read_id<TAB>gene`` (genes in runs),
    the UMI (and, ``per_cell``, the cell) at the end of the read id after
    ``sep`` (``…_CELL_UMI``). Per gene (a run of lines) and cell, the number of
    UMI groups. ``feed(data)`` takes any piece of the input and returns the
    output lines it completed; ``finish()`` the rest."""
    cdef Clusterer cl
    cdef bint per_cell
    cdef bytes sep
    cdef Scratch carry
    cdef Scratch out
    cdef bytes gene
    cdef ValueTable cells
    cdef ValueTable pairs
    cdef Scratch key
    cdef int32_t *bucket
    cdef Py_ssize_t bucket_cap
    cdef int32_t *starts
    cdef Py_ssize_t starts_cap
    cdef readonly long long lines
    cdef readonly long long reads
    cdef readonly long long molecules

    def __cinit__(self, str method="directional", int threshold=1, sep="_", bint per_cell=False):
        self.cl = Clusterer(method, threshold)
        self.per_cell = per_cell
        self.sep = sep.encode() if isinstance(sep, str) else bytes(sep)
        if not self.sep:
            raise ValueError("the barcode separator must not be empty")
        self.gene = None

    def __dealloc__(self):
        scratch_free(&self.carry)
        scratch_free(&self.out)
        scratch_free(&self.key)
        free(self.bucket)
        free(self.starts)

    def feed(self, const uint8_t[:] data not None):
        cdef Py_ssize_t n = data.shape[0], i = 0, j
        if n == 0:
            return b""
        scratch_put(&self.carry, &data[0], n)
        while True:
            j = i
            while j < self.carry.used and self.carry.data[j] != 10:
                j += 1
            if j >= self.carry.used:
                break
            self._line(self.carry.data + i, j - i)
            i = j + 1
        if i:
            memcpy(self.carry.data, self.carry.data + i, self.carry.used - i)
            self.carry.used -= i
        return self._take()

    def finish(self):
        if self.carry.used:
            self._line(self.carry.data, self.carry.used)
            self.carry.used = 0
        self._gene_done()
        return self._take()

    cdef bytes _take(self):
        cdef bytes b = (<char *> self.out.data)[:self.out.used] if self.out.used else b""
        self.out.used = 0
        return b

    cdef int _line(self, const uint8_t *s, Py_ssize_t n) except -1:
        cdef Py_ssize_t a = 0, b = n, tab = -1, k, last, prev, start, lsep = len(self.sep)
        cdef const uint8_t *sep = <const uint8_t *> PyBytes_AS_STRING(self.sep)
        cdef Py_ssize_t slot
        cdef int32_t cell
        self.lines += 1
        while a < b and _is_space(s[a]):
            a += 1
        while b > a and _is_space(s[b - 1]):
            b -= 1
        for k in range(a, b):
            if s[k] == 9:
                if tab >= 0:
                    tab = -2
                    break
                tab = k
        if tab < 0:
            raise ValueError(f"line {self.lines}: does not contain 2 columns (read id, gene)")
        if self.gene is None or len(self.gene) != b - tab - 1 or memcmp(PyBytes_AS_STRING(self.gene), s + tab + 1, b - tab - 1) != 0:
            self._gene_done()
            self.gene = (<const char *> s + tab + 1)[:b - tab - 1]
            self.cells = ValueTable()
            self.pairs = ValueTable()
        last = _rfind_bytes(s + a, tab - a, sep, lsep)
        self.key.used = 0
        if self.per_cell:
            if last < 0:
                raise ValueError(f"line {self.lines}: no cell barcode and UMI in the read id (…{self.sep.decode()}CELL"
                                 f"{self.sep.decode()}UMI)")
            prev = _rfind_bytes(s + a, last, sep, lsep)
            start = prev + lsep if prev >= 0 else 0
            scratch_put(&self.key, s + a + start, last - start)
        slot = self.cells.insert(self.key.data, self.key.used, fnv1a64(self.key.data, self.key.used), -1)
        cell = self.cells.slots[slot].out
        scratch_put(&self.key, b"\0", 1)
        start = last + lsep if last >= 0 else 0
        scratch_put(&self.key, s + a + start, tab - a - start)
        slot = self.pairs.insert(self.key.data, self.key.used, fnv1a64(self.key.data, self.key.used), cell)
        self.pairs.slots[slot].count += 1
        self.reads += 1
        return 0

    cdef int _gene_done(self) except -1:
        """Cluster each cell's UMIs of the gene just ended (cells in their order)."""
        cdef ValueTable t = self.pairs
        cdef Py_ssize_t n, k, c, n_cells, m, i
        cdef int32_t cell
        cdef const uint8_t *kp
        cdef const uint8_t *z
        cdef Clusterer cl = self.cl
        cdef bint packed
        cdef int32_t length
        cdef bytes cell_name
        if self.gene is None or t is None or t.n == 0 or len(self.gene) == 0:
            return 0
        n = t.n
        n_cells = self.cells.n
        _grow(<void **> &self.starts, &self.starts_cap, n_cells + 1, sizeof(int32_t))
        _grow(<void **> &self.bucket, &self.bucket_cap, n, sizeof(int32_t))
        for c in range(n_cells + 1):
            self.starts[c] = 0
        for k in range(n):
            self.starts[t.slots[t.order[k]].out + 1] += 1
        for c in range(n_cells):
            self.starts[c + 1] += self.starts[c]
        for k in range(n):  # a counting sort by cell keeps each cell's UMIs in their order
            cell = t.slots[t.order[k]].out
            self.bucket[self.starts[cell]] = <int32_t> k
            self.starts[cell] += 1
        for c in range(n_cells, 0, -1):
            self.starts[c] = self.starts[c - 1]
        self.starts[0] = 0
        for c in range(n_cells):
            m = self.starts[c + 1] - self.starts[c]
            cl.reserve(m)
            for i in range(m):
                k = self.bucket[self.starts[c] + i]
                kp = t.arena + t.slots[t.order[k]].off
                z = <const uint8_t *> memchr(kp, 0, t.slots[t.order[k]].length)
                cl.set_umi(i, z + 1, <int32_t> (t.slots[t.order[k]].length - (z + 1 - kp)), t.slots[t.order[k]].count)
            cl.run()
            self.molecules += cl.n_groups
            if self.per_cell:
                cell_name = self.cells.value_at(c)
                _put_bytes(&self.out, cell_name)
                scratch_put(&self.out, b"\t", 1)
            _put_bytes(&self.out, self.gene)
            scratch_put(&self.out, b"\t", 1)
            scratch_put_decimal(&self.out, cl.n_groups)
            scratch_put(&self.out, b"\n", 1)
        self.pairs = None
        return 0
