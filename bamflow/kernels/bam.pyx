# cython: language_level=3
"""BAM kernels: split a raw (uncompressed) BAM stream over N outputs, merge N back.

A raw BAM stream is what BGZF decompression of a ``.bam`` file gives:
``BAM\\1``, ``l_text``, the header text, ``n_ref`` references, then records,
each a little-endian ``uint32`` ``block_size`` followed by that many bytes
(SAM specification, section 4.2). Both kernels work on file descriptors and
raw buffers; no Python object is made per record (only error messages make
some). Record indexes in error messages are 0-based and count records of the
stream in question.

Canonical tag value bytes (used to hash and to compare tag values):
``Z``/``H`` the string without its NUL; ``A`` the character; the integer types
``c C s S i I`` the value as a decimal ASCII integer (so ``CB:i:5`` stored as
``C`` or as ``I`` gives ``b"5"``); ``f`` the 4 raw little-endian bytes; ``B``
the subtype character, the 4 count bytes and the raw array bytes. Several
tags combine as ``value1 + b"\\0" + value2 ...``.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy
from posix.unistd cimport close

from bamflow.kernels._posixio cimport (
    POLLERR, POLLHUP, POLLIN, POLLNVAL, fnv1a64, pipe_backlog, poll, pollfd, wait_readable,
    write_all,
)
from bamflow.kernels._records cimport (
    MAX_TAGS, HdrState, InBuf, OutBuf, Scratch, _append_canonical, _aux_offset, _fill,
    _find_tags, _flush, _free_outbufs, _hdr_init, _hdr_step, _init_inbuf, _name_of,
    _new_outbufs, _parse_tags, _put, _raise_errno, _read_header, _reserve, _u32,
)

# The record that ends a chunk when order must be kept (distribute_bam's
# mark_chunks, collect_bam's order="input"): an unmapped read with this name.
CHUNK_END_NAME = b"bamflow:chunk-end"


def _chunk_end_record() -> bytes:
    import struct

    name = CHUNK_END_NAME + b"\x00"
    # refID pos l_read_name mapq bin n_cigar flag l_seq next_refID next_pos tlen
    fixed = struct.pack("<iiBBHHHIiii", -1, -1, len(name), 255, 4680, 0, 4, 0, -1, -1, 0)
    return struct.pack("<I", len(fixed) + len(name)) + fixed + name


CHUNK_END_RECORD = _chunk_end_record()


cdef inline bint _is_chunk_end(const uint8_t *rec, uint32_t block_size) noexcept:
    cdef Py_ssize_t l = len(CHUNK_END_NAME) + 1
    return block_size >= 32 + l and rec[8] == l and memcmp(rec + 32, <const char *> CHUNK_END_NAME, l) == 0


# -- header parsing: the resumable parser is in _records --

def split_header(const unsigned char[:] data not None):
    """Length of the raw BAM header (magic to the last reference) at the start of data.

    Raises ValueError ``not a BAM stream (...)`` or ``truncated BAM header``.
    """
    cdef HdrState st
    cdef Py_ssize_t n = data.shape[0]
    _hdr_init(&st)
    if n == 0:
        raise ValueError("not a BAM stream (empty)")
    if _hdr_step(&st, &data[0], n, "") == 1:
        return st.off
    raise ValueError("truncated BAM header")


def stable_hash(const unsigned char[:] key not None) -> int:
    """FNV-1a (64 bit) of ``key``: how records are sharded (``% n``)."""
    if key.shape[0] == 0:
        return fnv1a64(NULL, 0)
    return fnv1a64(&key[0], key.shape[0])


# -- counting key values (a C hash table: no Python object per record) ---------

cdef struct Tally:
    uint64_t *hashes      # 0: empty slot
    long long *counts
    Py_ssize_t *key_offset
    Py_ssize_t *key_length
    Py_ssize_t cap        # a power of two
    Py_ssize_t size
    uint8_t *arena        # the key bytes
    Py_ssize_t arena_used
    Py_ssize_t arena_cap


cdef int _tally_init(Tally *t, Py_ssize_t cap) except -1:
    t.cap = cap
    t.size = 0
    t.arena_used = 0
    t.arena_cap = 1 << 16
    t.hashes = <uint64_t *> calloc(cap, sizeof(uint64_t))
    t.counts = <long long *> calloc(cap, sizeof(long long))
    t.key_offset = <Py_ssize_t *> calloc(cap, sizeof(Py_ssize_t))
    t.key_length = <Py_ssize_t *> calloc(cap, sizeof(Py_ssize_t))
    t.arena = <uint8_t *> malloc(t.arena_cap)
    if t.hashes == NULL or t.counts == NULL or t.key_offset == NULL or t.key_length == NULL or t.arena == NULL:
        raise MemoryError()
    return 0


cdef void _tally_free(Tally *t) noexcept:
    free(t.hashes)
    free(t.counts)
    free(t.key_offset)
    free(t.key_length)
    free(t.arena)
    t.hashes = NULL
    t.counts = NULL
    t.key_offset = NULL
    t.key_length = NULL
    t.arena = NULL


cdef int _tally_grow(Tally *t) except -1:
    cdef Tally bigger
    cdef Py_ssize_t i, j
    _tally_init(&bigger, 2 * t.cap)
    free(bigger.arena)
    bigger.arena = t.arena
    bigger.arena_used = t.arena_used
    bigger.arena_cap = t.arena_cap
    for i in range(t.cap):
        if t.hashes[i]:
            j = <Py_ssize_t> (t.hashes[i] & <uint64_t> (bigger.cap - 1))
            while bigger.hashes[j]:
                j = (j + 1) & (bigger.cap - 1)
            bigger.hashes[j] = t.hashes[i]
            bigger.counts[j] = t.counts[i]
            bigger.key_offset[j] = t.key_offset[i]
            bigger.key_length[j] = t.key_length[i]
    bigger.size = t.size
    t.arena = NULL
    _tally_free(t)
    t[0] = bigger
    return 0


cdef int _tally_add(Tally *t, const uint8_t *key, Py_ssize_t length, uint64_t h) except -1:
    cdef Py_ssize_t i
    cdef uint8_t *grown
    if h == 0:
        h = 1
    i = <Py_ssize_t> (h & <uint64_t> (t.cap - 1))
    while t.hashes[i]:
        if t.hashes[i] == h and t.key_length[i] == length and memcmp(t.arena + t.key_offset[i], key, length) == 0:
            t.counts[i] += 1
            return 0
        i = (i + 1) & (t.cap - 1)
    if t.arena_used + length > t.arena_cap:
        grown = <uint8_t *> realloc(t.arena, 2 * t.arena_cap + length)
        if grown == NULL:
            raise MemoryError()
        t.arena = grown
        t.arena_cap = 2 * t.arena_cap + length
    memcpy(t.arena + t.arena_used, key, length)
    t.hashes[i] = h
    t.counts[i] = 1
    t.key_offset[i] = t.arena_used
    t.key_length[i] = length
    t.arena_used += length
    t.size += 1
    if 2 * t.size > t.cap:
        _tally_grow(t)
    return 0


cdef dict _tally_dict(Tally *t):
    cdef dict result = {}
    cdef Py_ssize_t i
    for i in range(t.cap):
        if t.hashes[i]:
            result[(<const char *> t.arena + t.key_offset[i])[:t.key_length[i]]] = t.counts[i]
    return result


# -- distribute -------------------------------------------------------------------

def distribute_bam(
    int in_fd,
    out_fds,
    *,
    by=None,
    Py_ssize_t chunk_size=1000,
    str missing="error",
    int unassigned_fd=-1,
    int header_fd=-1,
    bint header_broadcast=True,
    bint mark_chunks=False,
    bint count_values=False,
    progress=None,
    Py_ssize_t buffer_size=1 << 20,
    Py_ssize_t out_buffer_size=1 << 16,
):
    """Send the records of the raw BAM stream on ``in_fd`` to ``out_fds``.

    The header (magic to the last reference) goes to every output (and to
    ``unassigned_fd``) when ``header_broadcast``, so that each is a complete raw
    BAM stream, and to ``header_fd``, which this function closes right after.

    ``by=None``: round-robin in chunks of ``chunk_size`` records; with
    ``mark_chunks`` every whole chunk is followed by :data:`CHUNK_END_RECORD`,
    so that ``collect_bam(order="input")`` can put the input order back.
    ``by="name"``: output ``fnv1a64(read name) % n``, so mates meet.
    ``by=[b"CB", ...]``: output ``fnv1a64(canonical tag values joined by NUL) % n``.
    A record missing one of the tags: ``missing="error"`` raises ValueError,
    ``"drop"`` drops it, ``"unassigned"`` writes it to ``unassigned_fd``.

    Every record's fixed part is checked; the aux block is walked (and so
    checked) only when distributing by tags, and only up to the last tag wanted.

    ``progress``: an int64 memoryview (bamflow.progress slot) updated with
    records, bytes read and the input pipe's backlog at every buffer refill.

    With ``count_values`` (by tags only), the result also has ``values``:
    canonical key bytes → number of records, counted in a C hash table.

    Returns a dict: ``records``, ``per_output``, ``dropped_missing_tag``,
    ``unassigned``, ``header_bytes``, ``bytes`` (read).
    """
    cdef list fds = [int(fd) for fd in out_fds]
    cdef Py_ssize_t n_out = len(fds)
    if n_out < 1:
        raise ValueError("distribute_bam needs at least one output")
    if chunk_size < 1 or buffer_size < 1 or out_buffer_size < 1:
        raise ValueError("chunk_size, buffer_size and out_buffer_size must be >= 1")
    if missing not in ("error", "drop", "unassigned"):
        raise ValueError(f"missing must be 'error', 'drop' or 'unassigned', not {missing!r}")
    cdef int mode = 0  # 0 round-robin, 1 name, 2 tags
    cdef uint16_t tags[MAX_TAGS]
    cdef const uint8_t *found[MAX_TAGS]
    cdef list tag_names = []
    cdef int n_tags = 0
    if by is None:
        mode = 0
    elif isinstance(by, str) and by == "name":
        mode = 1
    elif isinstance(by, (bytes, bytearray, str)):
        raise ValueError(f"by must be None, 'name' or a list of tags like [b'CB'], not {by!r}")
    else:
        mode = 2
        n_tags = _parse_tags(by, tags, tag_names)
    cdef int miss = 0 if missing == "error" else (1 if missing == "drop" else 2)
    if mode == 2 and miss == 2 and unassigned_fd < 0:
        raise ValueError("missing='unassigned' needs unassigned_fd")
    if mark_chunks and mode != 0:
        raise ValueError("mark_chunks needs round-robin distribution (by=None)")
    if count_values and mode != 2:
        raise ValueError("count_values needs distribution by tags")
    cdef long long[::1] prog = progress
    cdef Tally tally
    tally.hashes = tally.counts = NULL
    tally.key_offset = tally.key_length = NULL
    tally.arena = NULL
    cdef uint64_t h
    cdef bytes chunk_end = CHUNK_END_RECORD
    cdef bint has_unassigned = unassigned_fd >= 0
    if has_unassigned:
        fds.append(unassigned_fd)

    cdef OutBuf *outs = NULL
    cdef OutBuf *un = NULL
    cdef InBuf ib
    cdef HdrState st
    cdef Scratch key
    cdef Py_ssize_t i, avail, aux, need, header_bytes = 0
    cdef uint32_t bs
    cdef const uint8_t *rec
    cdef Py_ssize_t target = 0, in_chunk = 0
    cdef long long records = 0, dropped = 0, unassigned = 0, bytes_read = 0
    cdef int k = 0

    ib.data = NULL
    ib.wire = NULL
    key.data = NULL
    key.used = key.cap = 0
    try:
        outs = _new_outbufs(fds, out_buffer_size)
        if has_unassigned:
            un = &outs[n_out]
        _init_inbuf(&ib, in_fd, buffer_size)
        if count_values:
            _tally_init(&tally, 1 << 12)
        _read_header(&ib, &st, "")
        header_bytes = st.off
        bytes_read = ib.end
        if header_fd >= 0:
            if write_all(header_fd, ib.data + ib.start, header_bytes) < 0:
                _raise_errno("write header")
            close(header_fd)
            header_fd = -1
        if header_broadcast:
            for i in range(n_out + has_unassigned):
                _put(&outs[i], ib.data + ib.start, header_bytes)
        ib.start += header_bytes

        while True:
            avail = ib.end - ib.start
            if avail >= 4:
                bs = _u32(<const uint8_t *> ib.data + ib.start)
                if avail - 4 >= <Py_ssize_t> bs:
                    rec = <const uint8_t *> ib.data + ib.start + 4
                    aux = _aux_offset(rec, bs, records)
                    if mode == 0:
                        outs[target].records += 1
                        _put(&outs[target], ib.data + ib.start, 4 + bs)
                        in_chunk += 1
                        if in_chunk == chunk_size:
                            if mark_chunks:
                                _put(&outs[target], <const char *> chunk_end, len(chunk_end))
                            in_chunk = 0
                            target += 1
                            if target == n_out:
                                target = 0
                    elif mode == 1:
                        i = fnv1a64(rec + 32, rec[8] - 1) % <uint64_t> n_out
                        outs[i].records += 1
                        _put(&outs[i], ib.data + ib.start, 4 + bs)
                    else:
                        if _find_tags(rec, bs, aux, tags, n_tags, found, records) == n_tags:
                            key.used = 0
                            for k in range(n_tags):
                                if k:
                                    _reserve(&key, 1)
                                    key.data[key.used] = 0
                                    key.used += 1
                                _append_canonical(&key, found[k])
                            h = fnv1a64(key.data, key.used)
                            if count_values:
                                _tally_add(&tally, key.data, key.used, h)
                            i = h % <uint64_t> n_out
                            outs[i].records += 1
                            _put(&outs[i], ib.data + ib.start, 4 + bs)
                        else:
                            for k in range(n_tags):
                                if found[k] == NULL:
                                    break
                            if miss == 0:
                                raise ValueError(f"read {_name_of(rec, bs)!r} has no {tag_names[k]} tag "
                                                 f"(record {records})")
                            elif miss == 1:
                                dropped += 1
                            else:
                                unassigned += 1
                                _put(un, ib.data + ib.start, 4 + bs)
                    records += 1
                    ib.start += 4 + bs
                    continue
                need = 4 + <Py_ssize_t> bs
            else:
                need = 4
            if ib.eof:
                if avail:
                    raise ValueError(f"BAM stream ends inside record {records}")
                break
            if prog is not None:
                prog[0] = records
                prog[1] = bytes_read
                prog[3] = pipe_backlog(in_fd)
            bytes_read += _fill(&ib, need)

        for i in range(n_out + has_unassigned):
            _flush(&outs[i])
        if prog is not None:
            prog[0] = records
            prog[1] = bytes_read
            prog[3] = 0
        result = {
            "records": records,
            "per_output": [outs[i].records for i in range(n_out)],
            "dropped_missing_tag": dropped,
            "unassigned": unassigned,
            "header_bytes": header_bytes,
            "bytes": bytes_read,
        }
        if count_values:
            result["values"] = _tally_dict(&tally)
        return result
    finally:
        _tally_free(&tally)
        if header_fd >= 0:
            close(header_fd)
        free(ib.data)
        free(ib.wire)
        free(key.data)
        _free_outbufs(outs, n_out + has_unassigned)


# -- collect ----------------------------------------------------------------------

cdef struct Source:
    InBuf ib
    HdrState hdr
    bint header_done
    bint done           # merge: no head record left
    uint64_t pos_key    # coordinate key of the head record
    Scratch key         # tag key of the head record
    Scratch prev        # tag key of the previous record
    bint has_key        # the head record carries the tag
    bint prev_has_key
    uint64_t prev_pos_key
    long long index     # record index of the head record


cdef int _poll_fill(Source *srcs, Py_ssize_t n_in, pollfd *pfds, Py_ssize_t *index,
                    OutBuf *out, Py_ssize_t must, Py_ssize_t need_must,
                    Py_ssize_t read_ahead) except -1:
    """Wait until some input (``must`` always included, if >= 0) is readable and
    read once from each readable one. Inputs holding ``read_ahead`` bytes are
    left alone (except ``must``). Returns the number of inputs polled."""
    cdef Py_ssize_t i, k = 0, need, got
    cdef long long backlog
    cdef int rc
    for i in range(n_in):
        if srcs[i].ib.eof:
            continue
        if i != must and read_ahead > 0 and srcs[i].ib.end - srcs[i].ib.start >= read_ahead:
            continue
        pfds[k].fd = srcs[i].ib.fd
        pfds[k].events = POLLIN
        pfds[k].revents = 0
        index[k] = i
        k += 1
    if k == 0:
        return 0
    rc = poll(pfds, k, 0)
    if rc == 0:
        _flush(out)  # nothing ready: hand over what we hold before blocking
        while True:
            rc = poll(pfds, k, -1)
            if rc < 0 and errno == EINTR:  # EINTR
                continue
            break
    if rc < 0:
        _raise_errno("poll")
    backlog = 0
    for i in range(k):
        if pfds[i].revents & POLLNVAL:
            raise OSError(9, f"poll: input {index[i]}: bad file descriptor {pfds[i].fd}")
        if pfds[i].revents & (POLLIN | POLLHUP | POLLERR):
            need = need_must if index[i] == must else 0
            got = _fill(&srcs[index[i]].ib, need)
            if out.progress != NULL:
                out.progress[1] += got
                backlog += pipe_backlog(pfds[i].fd)
    if out.progress != NULL:
        out.progress[0] = out.records
        out.progress[3] = backlog
    return k


cdef inline Py_ssize_t _complete_record(InBuf *ib) noexcept nogil:
    """Size (4 + block_size) of the record at ib.start if it is all buffered, else
    -(bytes needed) (-4 while the block_size itself is incomplete)."""
    cdef Py_ssize_t avail = ib.end - ib.start
    cdef uint32_t bs
    if avail < 4:
        return -4
    bs = _u32(<const uint8_t *> ib.data + ib.start)
    if avail - 4 >= <Py_ssize_t> bs:
        return 4 + <Py_ssize_t> bs
    return -(4 + <Py_ssize_t> bs)


def collect_bam(
    in_fds,
    int out_fd,
    *,
    str order="any",
    int header_fd=-1,
    tag=None,
    Py_ssize_t buffer_size=1 << 20,
    Py_ssize_t out_buffer_size=1 << 20,
    Py_ssize_t read_ahead=0,
    progress=None,
):
    """Merge the raw BAM streams of ``in_fds`` into one raw BAM stream on ``out_fd``.

    Each input starts with its own header, which is skipped; the output's
    header is the whole of ``header_fd`` (a raw BAM header) if given, else the
    first input's header.

    ``order="any"``: whole records from whichever input has data.
    ``order="input"``: chunks in turn, each ended by a :data:`CHUNK_END_RECORD`
    (dropped here), as ``distribute_bam(mark_chunks=True)`` dealt them: the
    input order comes back whatever the workers dropped or added. Other inputs
    are read ahead without limit while one is awaited, so workers never stall.
    ``order="coordinate"``: k-way merge by (refID as unsigned, so unmapped
    reads with refID -1 come last, pos), ties by input index; an input that is
    not so sorted raises ValueError.
    ``order="tag"`` with ``tag=b"CB"``: k-way merge by the canonical bytes of
    that tag's value (see the module doc), compared bytewise; records without
    the tag sort FIRST (before any value, even an empty one). An input not so
    sorted raises ValueError.

    Merges keep the inputs in a binary heap keyed by (head record key, input
    index). A merge must wait for the input whose head record is smallest;
    while it waits it reads ahead on the others (up to ``read_ahead`` bytes
    each; 0, the default, is no limit: a limit can deadlock workers fed by one
    distributor, since the awaited worker may need the distributor to move on).
    ``"any"`` checks only each record's ``block_size``; merges check each
    record's fixed part (and ``"tag"`` walks the aux block up to the tag).

    ``progress``: an int64 memoryview (bamflow.progress slot) updated with
    records written and bytes buffered while waiting for input.

    Returns a dict: ``records``, ``per_input``, ``header_bytes``.
    """
    cdef list fds = [int(fd) for fd in in_fds]
    cdef Py_ssize_t n_in = len(fds)
    if order not in ("any", "input", "coordinate", "tag"):
        raise ValueError(f"order must be 'any', 'input', 'coordinate' or 'tag', not {order!r}")
    if buffer_size < 1 or out_buffer_size < 1:
        raise ValueError("buffer_size and out_buffer_size must be >= 1")
    if header_fd < 0 and n_in == 0:
        raise ValueError("collect_bam needs an input or a header_fd")
    cdef int mode = {"any": 0, "coordinate": 1, "tag": 2, "input": 3}[order]
    cdef uint16_t tags[1]
    cdef const uint8_t *found[1]
    cdef list tag_names = []
    if mode == 2:
        if tag is None:
            raise ValueError("order='tag' needs tag, e.g. tag=b'CB'")
        _parse_tags([tag], tags, tag_names)

    cdef Source *srcs = NULL
    cdef pollfd *pfds = NULL
    cdef Py_ssize_t *index = NULL
    cdef Py_ssize_t *heap = NULL
    cdef Py_ssize_t n_heap = 0
    cdef OutBuf out
    cdef InBuf hib
    cdef HdrState hst
    cdef Source *s
    cdef Py_ssize_t i, j, size, upto, best, header_bytes = 0, live
    cdef long long count
    cdef uint32_t bs
    cdef int c
    cdef const uint8_t *rec
    cdef Scratch tmp

    cdef long long[::1] prog = progress
    out.fd = out_fd
    out.cap = out_buffer_size
    out.used = 0
    out.records = 0
    out.data = NULL
    out.progress = &prog[0] if prog is not None else NULL
    hib.data = NULL
    hib.wire = NULL
    try:
        out.data = <char *> malloc(out_buffer_size)
        srcs = <Source *> calloc(n_in if n_in else 1, sizeof(Source))
        pfds = <pollfd *> calloc(n_in if n_in else 1, sizeof(pollfd))
        index = <Py_ssize_t *> calloc(n_in if n_in else 1, sizeof(Py_ssize_t))
        heap = <Py_ssize_t *> calloc(n_in if n_in else 1, sizeof(Py_ssize_t))
        if out.data == NULL or srcs == NULL or pfds == NULL or index == NULL or heap == NULL:
            raise MemoryError()
        for i in range(n_in):
            _init_inbuf(&srcs[i].ib, fds[i], buffer_size)
            _hdr_init(&srcs[i].hdr)

        # -- the output header
        if header_fd >= 0:
            _init_inbuf(&hib, header_fd, buffer_size)
            if wait_readable(header_fd) < 0:
                _raise_errno("poll")
            while not hib.eof:
                _fill(&hib, 0)
            _read_header(&hib, &hst, "header_fd: ")
            if hst.off != hib.end:
                raise ValueError(f"header_fd: {hib.end - hst.off} bytes after the BAM header")
            header_bytes = hst.off
            _put(&out, hib.data, header_bytes)
        else:
            _read_header(&srcs[0].ib, &srcs[0].hdr, "input 0: ")
            header_bytes = srcs[0].hdr.off
            _put(&out, srcs[0].ib.data + srcs[0].ib.start, header_bytes)

        if mode == 0:
            while True:
                # take every complete record (after its input's header) in one go
                for i in range(n_in):
                    s = &srcs[i]
                    if not s.header_done:
                        if s.ib.end == s.ib.start:
                            continue
                        if _hdr_step(&s.hdr, <const uint8_t *> s.ib.data + s.ib.start,
                                     s.ib.end - s.ib.start, f"input {i}: ") == 0:
                            continue
                        s.ib.start += s.hdr.off
                        s.header_done = True
                    upto = s.ib.start
                    count = 0
                    while s.ib.end - upto >= 4:
                        bs = _u32(<const uint8_t *> s.ib.data + upto)
                        if s.ib.end - upto - 4 < <Py_ssize_t> bs:
                            break
                        if bs < 32:
                            raise ValueError(f"input {i}: record {s.ib.records + count}: "
                                             f"block_size {bs} < 32")
                        upto += 4 + bs
                        count += 1
                    if count:
                        _put(&out, s.ib.data + s.ib.start, upto - s.ib.start)
                        s.ib.records += count
                        out.records += count
                        s.ib.start = upto
                # end of stream checks, then read more
                live = 0
                for i in range(n_in):
                    s = &srcs[i]
                    if s.ib.eof:
                        if not s.header_done:
                            if s.ib.end == s.ib.start:
                                raise ValueError(f"input {i}: not a BAM stream (empty)")
                            raise ValueError(f"input {i}: truncated BAM header")
                        if s.ib.end > s.ib.start:
                            raise ValueError(f"input {i}: BAM stream ends inside record {s.ib.records}")
                    else:
                        live += 1
                if live == 0:
                    break
                _poll_fill(srcs, n_in, pfds, index, &out, -1, 0, 0)
        elif mode == 3:
            _collect_in_turn(srcs, n_in, pfds, index, &out)
        else:
            # every input's header first (each worker writes its header first)
            for i in range(n_in):
                s = &srcs[i]
                if not (header_fd < 0 and i == 0):
                    _read_header(&s.ib, &s.hdr, f"input {i}: ")
                s.ib.start += s.hdr.off
                s.header_done = True
                s.index = -1
            # load the head record of every input
            for i in range(n_in):
                _advance(srcs, n_in, i, pfds, index, &out, read_ahead, mode, tags, found)
            # a binary heap of input indexes, ordered by (head key, input index)
            for i in range(n_in):
                if not srcs[i].done:
                    heap[n_heap] = i
                    n_heap += 1
                    _sift_up(srcs, mode, heap, n_heap - 1)
            while n_heap:
                best = heap[0]
                s = &srcs[best]
                size = 4 + <Py_ssize_t> _u32(<const uint8_t *> s.ib.data + s.ib.start)
                _put(&out, s.ib.data + s.ib.start, size)
                out.records += 1
                s.ib.records += 1
                s.ib.start += size
                _advance(srcs, n_in, best, pfds, index, &out, read_ahead, mode, tags, found)
                if s.done:
                    n_heap -= 1
                    heap[0] = heap[n_heap]
                _sift_down(srcs, mode, heap, n_heap, 0)

        _flush(&out)
        if out.progress != NULL:
            out.progress[0] = out.records
            out.progress[3] = 0
        return {
            "records": out.records,
            "per_input": [srcs[i].ib.records for i in range(n_in)],
            "header_bytes": header_bytes,
        }
    finally:
        free(out.data)
        free(hib.data)
        free(hib.wire)
        if srcs != NULL:
            for i in range(n_in):
                free(srcs[i].ib.data)
                free(srcs[i].ib.wire)
                free(srcs[i].key.data)
                free(srcs[i].prev.data)
        free(srcs)
        free(pfds)
        free(index)
        free(heap)


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


cdef inline bint _before(Source *srcs, int mode, Py_ssize_t a, Py_ssize_t b) noexcept:
    """Whether input a's head record goes out before input b's (ties: lower index)."""
    cdef int c
    if mode == 1:
        if srcs[a].pos_key != srcs[b].pos_key:
            return srcs[a].pos_key < srcs[b].pos_key
    else:
        c = _key_cmp(srcs[a].has_key, &srcs[a].key, srcs[b].has_key, &srcs[b].key)
        if c:
            return c < 0
    return a < b


cdef void _sift_up(Source *srcs, int mode, Py_ssize_t *heap, Py_ssize_t i) noexcept:
    cdef Py_ssize_t parent, tmp
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(srcs, mode, heap[i], heap[parent]):
            break
        tmp = heap[i]
        heap[i] = heap[parent]
        heap[parent] = tmp
        i = parent


cdef void _sift_down(Source *srcs, int mode, Py_ssize_t *heap, Py_ssize_t n, Py_ssize_t i) noexcept:
    cdef Py_ssize_t child, tmp
    while True:
        child = 2 * i + 1
        if child >= n:
            return
        if child + 1 < n and _before(srcs, mode, heap[child + 1], heap[child]):
            child += 1
        if not _before(srcs, mode, heap[child], heap[i]):
            return
        tmp = heap[i]
        heap[i] = heap[child]
        heap[child] = tmp
        i = child


cdef int _advance(Source *srcs, Py_ssize_t n_in, Py_ssize_t i, pollfd *pfds, Py_ssize_t *index,
                  OutBuf *out, Py_ssize_t read_ahead, int mode, uint16_t *tags,
                  const uint8_t **found) except -1:
    """Make the next record of input i its head (reading as needed), compute its
    key and check the input's order; mark the input done at its end."""
    cdef Source *s = &srcs[i]
    cdef Py_ssize_t size, aux
    cdef const uint8_t *rec
    cdef uint32_t bs
    cdef uint64_t key
    cdef Scratch swap
    cdef str what
    while True:
        size = _complete_record(&s.ib)
        if size > 0:
            break
        if s.ib.eof:
            if s.ib.end > s.ib.start:
                raise ValueError(f"input {i}: BAM stream ends inside record {s.ib.records}")
            s.done = True
            return 0
        _poll_fill(srcs, n_in, pfds, index, out, i, -size, read_ahead)
    rec = <const uint8_t *> s.ib.data + s.ib.start + 4
    bs = <uint32_t> (size - 4)
    try:
        aux = _aux_offset(rec, bs, s.ib.records)
        if mode == 1:
            key = (<uint64_t> _u32(rec) << 32) | <uint64_t> (_u32(rec + 4) ^ 0x80000000u)
            if s.index >= 0 and key < s.pos_key:
                raise ValueError(f"is not coordinate-sorted at record {s.ib.records} "
                                 f"(read {_name_of(rec, bs)!r})")
            s.pos_key = key
        else:
            swap = s.prev
            s.prev = s.key
            s.key = swap
            s.prev_has_key = s.has_key
            s.key.used = 0
            s.has_key = _find_tags(rec, bs, aux, tags, 1, found, s.ib.records) == 1
            if s.has_key:
                _append_canonical(&s.key, found[0])
            if s.index >= 0 and _key_cmp(s.has_key, &s.key, s.prev_has_key, &s.prev) < 0:
                raise ValueError(f"is not sorted by tag {(<const char *> &tags[0])[:2].decode('latin-1')} "
                                 f"at record {s.ib.records} (read {_name_of(rec, bs)!r})")
    except ValueError as e:
        raise ValueError(f"input {i}: {e}" if str(e).startswith("record") else f"input {i} {e}") from None
    s.index = s.ib.records
    return 0


cdef int _collect_in_turn(Source *srcs, Py_ssize_t n_in, pollfd *pfds, Py_ssize_t *index,
                          OutBuf *out) except -1:
    """order="input": records of input ``cur`` up to its chunk-end marker, then
    the next input; an input at its end is finished."""
    cdef Py_ssize_t cur = 0, finished = 0, size
    cdef Source *s
    cdef const uint8_t *rec
    while finished < n_in:
        s = &srcs[cur]
        if s.done:
            cur = (cur + 1) % n_in
            continue
        if not s.header_done:
            if s.ib.end > s.ib.start and _hdr_step(&s.hdr, <const uint8_t *> s.ib.data + s.ib.start,
                                                   s.ib.end - s.ib.start, f"input {cur}: ") == 1:
                s.ib.start += s.hdr.off
                s.header_done = True
                continue
            if s.ib.eof:
                if s.ib.end == s.ib.start:
                    raise ValueError(f"input {cur}: not a BAM stream (empty)")
                raise ValueError(f"input {cur}: truncated BAM header")
            _poll_fill(srcs, n_in, pfds, index, out, cur, s.hdr.need, 0)
            continue
        size = _complete_record(&s.ib)
        if size > 0:
            rec = <const uint8_t *> s.ib.data + s.ib.start + 4
            if size < 36:
                raise ValueError(f"input {cur}: record {s.ib.records}: block_size {size - 4} < 32")
            s.ib.start += size
            if _is_chunk_end(rec, <uint32_t> (size - 4)):
                cur = (cur + 1) % n_in
            else:
                _put(out, <const char *> rec - 4, size)
                s.ib.records += 1
                out.records += 1
            continue
        if s.ib.eof:
            if s.ib.end > s.ib.start:
                raise ValueError(f"input {cur}: BAM stream ends inside record {s.ib.records}")
            s.done = True
            finished += 1
            cur = (cur + 1) % n_in
            continue
        _poll_fill(srcs, n_in, pfds, index, out, cur, -size, 0)
    return 0


cdef class RecordCounter:
    """Counts the records of a raw BAM record stream fed in pieces of any size
    (after the header), jumping from one block_size to the next."""

    cdef readonly long long records
    cdef Py_ssize_t skip         # bytes of the current record still to pass
    cdef uint8_t partial[4]      # block_size bytes seen so far
    cdef int have

    def feed(self, const unsigned char[:] data not None):
        cdef Py_ssize_t i = 0, n = data.shape[0], take
        while i < n:
            if self.skip:
                take = self.skip if self.skip < n - i else n - i
                self.skip -= take
                i += take
                continue
            while self.have < 4 and i < n:
                self.partial[self.have] = data[i]
                self.have += 1
                i += 1
            if self.have == 4:
                self.skip = <Py_ssize_t> _u32(self.partial)
                if self.skip < 32:
                    raise ValueError(f"record {self.records}: block_size {self.skip} < 32")
                self.have = 0
                self.records += 1

    def finish(self) -> int:
        """The record count; raises ValueError if the stream ended inside a record."""
        if self.skip or self.have:
            raise ValueError(f"BAM stream ends inside record {self.records - 1 if self.skip else self.records}")
        return self.records
