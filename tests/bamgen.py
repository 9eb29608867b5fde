"""Build raw (uncompressed) BAM streams with struct.pack, independently of the
kernels, following the SAM specification section 4.2; plus reference
implementations of the canonical tag bytes and of FNV-1a for the tests.

Also (for the kernel tests): a record parser (parse_record), a BGZF writer
built on zlib (bgzf, bgzf_block: corrupt footers on request), real file
descriptors over temporary files (Fds) and pipes fed by a forked child (feed)."""

import functools
import os
import struct
import tempfile
import time
import zlib

SEQ_CODES = {c: i for i, c in enumerate("=ACMGRSVTWYHKDBN")}
B_FORMATS = {"c": "b", "C": "B", "s": "h", "S": "H", "i": "i", "I": "I", "f": "f"}
INT_FORMATS = {"c": "b", "C": "B", "s": "h", "S": "H", "i": "i", "I": "I"}


def header(text=b"@HD\tVN:1.6\tSO:unsorted\n", refs=(("chr1", 100000), ("chr2", 50000))):
    """Raw BAM header bytes: magic, l_text, text, n_ref, references."""
    out = [b"BAM\x01", struct.pack("<i", len(text)), text, struct.pack("<i", len(refs))]
    for name, length in refs:
        raw = name.encode() + b"\x00"
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<i", length)]
    return b"".join(out)


def reg2bin(beg, end):
    """The BAI bin of [beg, end), as in the specification section 5.3."""
    end -= 1
    if beg >> 14 == end >> 14:
        return ((1 << 15) - 1) // 7 + (beg >> 14)
    if beg >> 17 == end >> 17:
        return ((1 << 12) - 1) // 7 + (beg >> 17)
    if beg >> 20 == end >> 20:
        return ((1 << 9) - 1) // 7 + (beg >> 20)
    if beg >> 23 == end >> 23:
        return ((1 << 6) - 1) // 7 + (beg >> 23)
    if beg >> 26 == end >> 26:
        return ((1 << 3) - 1) // 7 + (beg >> 26)
    return 0


def encode_tag(tag, typ, value):
    """One aux field: 2-char tag, type char, value bytes."""
    head = tag.encode() if isinstance(tag, str) else tag
    if typ == "A":
        body = value if isinstance(value, bytes) else value.encode()
        assert len(body) == 1
    elif typ in INT_FORMATS:
        body = struct.pack("<" + INT_FORMATS[typ], value)
    elif typ == "f":
        body = struct.pack("<f", value)
    elif typ in "ZH":
        body = (value if isinstance(value, bytes) else value.encode()) + b"\x00"
    elif typ == "B":
        sub, values = value
        body = sub.encode() + struct.pack("<I", len(values)) + struct.pack(f"<{len(values)}{B_FORMATS[sub]}", *values)
    else:
        raise ValueError(typ)
    return head + typ.encode() + body


def canonical(typ, value):
    """The canonical bytes of a tag value, as the kernels are meant to hash them."""
    if typ == "A":
        return value if isinstance(value, bytes) else value.encode()
    if typ in INT_FORMATS:
        return str(value).encode()
    if typ == "f":
        return struct.pack("<f", value)
    if typ in "ZH":
        return value if isinstance(value, bytes) else value.encode()
    sub, values = value
    return sub.encode() + struct.pack("<I", len(values)) + struct.pack(f"<{len(values)}{B_FORMATS[sub]}", *values)


@functools.lru_cache(maxsize=256)
def pack_seq(seq):
    """4-bit packed bases (two per byte, the first in the high nibble)."""
    packed = bytearray((len(seq) + 1) // 2)
    for i, base in enumerate(seq):
        code = SEQ_CODES[base]
        packed[i // 2] |= code << 4 if i % 2 == 0 else code
    return bytes(packed)


def record(name, *, ref_id=-1, pos=-1, mapq=255, flag=4, seq="", qual=None, cigar=(),
           next_ref_id=-1, next_pos=-1, tlen=0, tags=(), raw_aux=b""):
    """One record with its block_size prefix. tags: (tag, type, value) triples."""
    raw_name = (name.encode() if isinstance(name, str) else name) + b"\x00"
    l_seq = len(seq)
    packed = pack_seq(seq)
    if qual is None:
        qual = b"\xff" * l_seq
    ref_len = sum(n for n, op in cigar if op in "MDN=X")
    bin_ = reg2bin(pos, pos + max(ref_len, 1)) if pos >= 0 else 4680
    ops = "MIDNSHP=X"
    body = b"".join([
        struct.pack("<iiBBHHHIiii", ref_id, pos, len(raw_name), mapq, bin_, len(cigar), flag,
                    l_seq, next_ref_id, next_pos, tlen),
        raw_name,
        b"".join(struct.pack("<I", n << 4 | ops.index(op)) for n, op in cigar),
        bytes(packed),
        qual,
        b"".join(encode_tag(*t) for t in tags),
        raw_aux,
    ])
    return struct.pack("<I", len(body)) + body


def split_stream(data):
    """(header bytes, list of record bytes incl. block_size) of a raw BAM stream."""
    assert data[:4] == b"BAM\x01", data[:4]
    (l_text,) = struct.unpack_from("<i", data, 4)
    off = 8 + l_text
    (n_ref,) = struct.unpack_from("<i", data, off)
    off += 4
    for _ in range(n_ref):
        (l_name,) = struct.unpack_from("<i", data, off)
        off += 4 + l_name + 4
    head = data[:off]
    records = []
    while off < len(data):
        (size,) = struct.unpack_from("<I", data, off)
        assert off + 4 + size <= len(data), "truncated record"
        records.append(data[off:off + 4 + size])
        off += 4 + size
    return head, records


def read_name(rec):
    """Read name (str) of a record with its block_size prefix."""
    l_name = rec[4 + 8]
    return rec[36:36 + l_name - 1].decode()


def coordinate_key(rec):
    ref_id, pos = struct.unpack_from("<ii", rec, 4)
    return (ref_id & 0xFFFFFFFF, pos)


def fnv1a64(data):
    """Reference FNV-1a (64 bit), written from the published definition."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return h


# -- helpers added for the kernel tests ------------------------------------------------------

CIGAR_OPS = "MIDNSHP=X"
_SEQ_LETTERS = "=ACMGRSVTWYHKDBN"
#: the standard 28-byte empty BGZF block that ends a BGZF file (SAM spec 4.1.2)
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def patch(raw, offset, fmt, value):
    """raw (bytes) with struct ``fmt`` packed at ``offset``."""
    raw = bytearray(raw)
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


def bgzf_block(payload, *, level=6, crc=None, isize=None):
    """One BGZF block of ``payload`` (at most 65280 bytes), written with zlib;
    ``crc``/``isize`` override the footer (to build corrupt blocks)."""
    assert len(payload) <= 0xFF00
    if level == 0:
        n = len(payload)
        cdata = b"\x01" + struct.pack("<HH", n, n ^ 0xFFFF) + payload
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15)
        cdata = comp.compress(payload) + comp.flush()
    bsize = 18 + len(cdata) + 8
    head = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00" + struct.pack("<H", bsize - 1)
    foot = struct.pack("<II", zlib.crc32(payload) if crc is None else crc, len(payload) if isize is None else isize)
    return head + cdata + foot


def bgzf(data, *, block=0xFF00, level=6, eof=True):
    """``data`` as BGZF: blocks of at most ``block`` uncompressed bytes, then
    (with ``eof``) the EOF marker."""
    blocks = [bgzf_block(data[i:i + block], level=level) for i in range(0, len(data), block)]
    return b"".join(blocks) + (BGZF_EOF if eof else b"")


def parse_record(rec):
    """The fields of a record (with its block_size prefix) as a dict, decoded
    with struct from the specification; ``tags`` is a list of (tag, type, value)
    with B values as (subtype, list)."""
    (size,) = struct.unpack_from("<I", rec, 0)
    assert size == len(rec) - 4, (size, len(rec))
    (ref_id, pos, l_name, mapq, bin_, n_cigar, flag, l_seq, next_ref_id, next_pos,
     tlen) = struct.unpack_from("<iiBBHHHIiii", rec, 4)
    off = 36
    name = rec[off:off + l_name - 1]
    assert rec[off + l_name - 1] == 0
    off += l_name
    cigar = []
    for _ in range(n_cigar):
        (v,) = struct.unpack_from("<I", rec, off)
        cigar.append((v >> 4, CIGAR_OPS[v & 0xF]))
        off += 4
    packed = rec[off:off + (l_seq + 1) // 2]
    seq = "".join(_SEQ_LETTERS[(packed[i // 2] >> 4) if i % 2 == 0 else (packed[i // 2] & 0xF)] for i in range(l_seq))
    off += (l_seq + 1) // 2
    qual = bytes(rec[off:off + l_seq])
    off += l_seq
    tags = []
    while off < len(rec):
        tag = rec[off:off + 2].decode()
        typ = chr(rec[off + 2])
        off += 3
        if typ == "A":
            value = rec[off:off + 1].decode()
            off += 1
        elif typ in INT_FORMATS or typ == "f":
            fmt = "<" + (INT_FORMATS.get(typ) or "f")
            (value,) = struct.unpack_from(fmt, rec, off)
            off += struct.calcsize(fmt)
        elif typ in "ZH":
            end = rec.index(b"\x00", off)
            value = rec[off:end].decode()
            off = end + 1
        elif typ == "B":
            sub = chr(rec[off])
            (count,) = struct.unpack_from("<I", rec, off + 1)
            fmt = f"<{count}{B_FORMATS[sub]}"
            value = (sub, list(struct.unpack_from(fmt, rec, off + 5)))
            off += 5 + struct.calcsize(fmt)
        else:
            raise ValueError(f"bad tag type {typ!r}")
        tags.append((tag, typ, value))
    assert off == len(rec)
    return {"ref_id": ref_id, "pos": pos, "name": name.decode(), "mapq": mapq, "bin": bin_, "flag": flag,
            "cigar": cigar, "seq": seq, "qual": qual, "next_ref_id": next_ref_id, "next_pos": next_pos,
            "tlen": tlen, "tags": tags}


class Fds:
    """Real file descriptors over temporary files, all closed at the end::

        with Fds() as fds:
            in_fd = fds.reader(data)        # a file holding data, open for reading
            out_fd, path = fds.writer()     # an empty file, open for writing
            ...; fds.read(path)
    """

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        self.count = 0
        self.open = []

    def path(self, data=b""):
        path = os.path.join(self.dir.name, f"{self.count}.bin")
        self.count += 1
        with open(path, "wb") as f:
            f.write(data)
        return path

    def reader(self, data):
        fd = os.open(self.path(data), os.O_RDONLY)
        self.open.append(fd)
        return fd

    def writer(self):
        path = self.path()
        fd = os.open(path, os.O_WRONLY)
        self.open.append(fd)
        return fd, path

    def forget(self, fd):
        """fd was closed by its user."""
        self.open.remove(fd)

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self.open:
            try:
                os.close(fd)
            except OSError:
                pass
        self.dir.cleanup()


def feed(data, piece=4096, pause_every=0, pause=0.001, head=0, head_pause=0.2):
    """A pipe fed with ``data`` by a forked child: first ``head`` bytes alone
    (then a pause of ``head_pause`` s, so that the reader sees them alone),
    then writes of ``piece`` bytes (pausing ``pause`` s after every
    ``pause_every`` writes); returns (read fd, wait).

    The kernels keep the GIL while they block on a read, so the writer must
    not be a thread of this process. ``wait()`` reaps the child (call it after
    closing the read end) and returns its exit status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running any Python cleanup
        status = 0
        try:
            os.close(r)
            view = memoryview(data)
            if head:
                os.write(w, view[:head])
                time.sleep(head_pause)
            for k, i in enumerate(range(head, len(view), piece)):
                os.write(w, view[i:i + piece])
                if pause_every and k % pause_every == pause_every - 1:
                    time.sleep(pause)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)

    def wait():
        return os.waitpid(pid, 0)[1]

    return r, wait


def split_records(data):
    """The records (with their block_size) of headerless record bytes; a
    block_size of 0 (a chunk-end frame) comes out as b"\\0\\0\\0\\0"."""
    out = []
    off = 0
    while off < len(data):
        (size,) = struct.unpack_from("<I", data, off)
        assert off + 4 + size <= len(data), "truncated record"
        out.append(bytes(data[off:off + 4 + size]))
        off += 4 + size
    return out
