"""Build raw (uncompressed) BAM streams with struct.pack, independently of the
kernels, following the SAM specification section 4.2; plus reference
implementations of the canonical tag bytes and of FNV-1a for the tests."""

import struct

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


def record(name, *, ref_id=-1, pos=-1, mapq=255, flag=4, seq="", qual=None, cigar=(),
           next_ref_id=-1, next_pos=-1, tlen=0, tags=(), raw_aux=b""):
    """One record with its block_size prefix. tags: (tag, type, value) triples."""
    raw_name = (name.encode() if isinstance(name, str) else name) + b"\x00"
    l_seq = len(seq)
    packed = bytearray((l_seq + 1) // 2)
    for i, base in enumerate(seq):
        code = SEQ_CODES[base]
        packed[i // 2] |= code << 4 if i % 2 == 0 else code
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
