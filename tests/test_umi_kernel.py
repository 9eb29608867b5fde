"""The UMI kernel (bamflow.kernels.umi) on its own: its clustering against the
plain-Python reference (bamflow.presets.umi) and umi_tools' UMIClusterer on
random bundles (hypothesis) and edge cases, its Mersenne Twister against
Python's random, the table formatting, count_tab's line reader, and the
errors the kernel raises on bad records and options."""

from __future__ import annotations

import io
import os
import random
import struct

import pysam
import pytest
import umi_tools.network as umi_tools_network
from hypothesis import given, settings
from hypothesis import strategies as st

from bamflow.kernels.umi import (
    CountTab,
    UmiKernel,
    cluster_umis,
    count_molecules,
    format_table,
    mean_distances,
    mt_random_sequence,
)
from bamflow.presets import umi as reference
from bamflow.presets.umi import METHODS


def _mutations(umi: bytes, rng: random.Random, alphabet: bytes) -> bytes:
    i = rng.randrange(len(umi))
    return umi[:i] + bytes([rng.choice(alphabet)]) + umi[i + 1 :]


@st.composite
def bundles(draw, alphabet=b"ACGT", max_len=10):
    """A bundle as umi_tools sees it: UMIs of one length in their order of
    appearance (families of near neighbours), with read counts."""
    length = draw(st.integers(min_value=1, max_value=max_len))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    n = draw(st.sampled_from([1, 2, 3, 5, 8, 20, 40, 90]))
    rng = random.Random(seed)
    roots = [bytes(rng.choice(alphabet) for _ in range(length)) for _ in range(max(1, n // 5))]
    counts: dict[bytes, int] = {}
    for _ in range(n):
        u = rng.choice(roots)
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            u = _mutations(u, rng, alphabet)
        counts[u] = counts.get(u, 0) + rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 7, 10, 30])
    return counts


@settings(max_examples=400, deadline=None)
@given(bundles(), st.sampled_from([1, 1, 2, 3]))
def test_kernel_equals_the_python_reference(counts, threshold):
    """Groups, their order and each group's order (representative first) equal the reference's."""
    for method in METHODS:
        assert cluster_umis(counts, method=method, threshold=threshold) == reference.cluster_umis(counts, method, threshold)


@settings(max_examples=250, deadline=None)
@given(bundles(alphabet=b"ACGTN"), st.sampled_from([0, 1, 2]))
def test_kernel_equals_umi_tools(counts, threshold):
    """umi_tools' own UMIClusterer (it uses a substring index above 25 UMIs): the same
    groups in the same order; adjacency's non-representative members come in its set
    order, so only as sets there. UMIs with N take the byte-by-byte path."""
    for method in METHODS:
        theirs = umi_tools_network.UMIClusterer(cluster_method=method)(dict(counts), threshold=threshold)
        ours = cluster_umis(counts, method=method, threshold=threshold)
        if method == "adjacency":
            assert [(g[0], set(g)) for g in ours] == [(g[0], set(g)) for g in theirs]
        else:
            assert ours == theirs


@pytest.mark.parametrize("method", METHODS)
def test_clustering_edge_cases(method):
    ref = reference.cluster_umis
    assert cluster_umis({}, method=method) == [] == ref({}, method)
    assert cluster_umis({b"ACGT": 3}, method=method) == [[b"ACGT"]] == ref({b"ACGT": 3}, method)
    equal = {b"AAAA": 2, b"AAAT": 2, b"AATT": 2, b"TTTT": 2}  # ties: the bundle's order, then the alphabet
    assert cluster_umis(equal, method=method) == ref(equal, method)
    long = {b"A" * 40: 5, b"A" * 39 + b"C": 1, b"C" * 40: 2}  # longer than 32 bases: compared byte by byte
    assert cluster_umis(long, method=method) == ref(long, method)
    mixed = {b"AAAA": 4, b"AAA": 1, b"AAAT": 1}  # other lengths are never neighbours (umi_tools asserts)
    assert cluster_umis(mixed, method=method) == ref(mixed, method)
    assert {u for g in cluster_umis(mixed, method=method) for u in g} <= set(mixed)
    assert cluster_umis({b"AC": 1, b"AG": 1}, method=method, threshold=0) == ref({b"AC": 1, b"AG": 1}, method, 0)


def test_clustering_examples():
    counts = {b"AAAA": 10, b"AAAT": 3, b"AATT": 1, b"GGGG": 5, b"GGGC": 5}
    assert cluster_umis(counts, method="cluster") == [[b"AAAA", b"AAAT", b"AATT"], [b"GGGC", b"GGGG"]]
    assert len(cluster_umis(counts, method="directional")) == 3  # 10 >= 2*3-1 and 3 >= 2*1-1; 5 and 5 do not join
    # adjacency: AAAA alone does not cover AATT, so AAAT leads a group too (and takes AATT)
    assert cluster_umis(counts, method="adjacency") == [[b"AAAA"], [b"AAAT", b"AATT"], [b"GGGC", b"GGGG"]]
    assert cluster_umis({"AAAA": 1, "AAAT": 1}, "directional") == [[b"AAAA", b"AAAT"]]  # str UMIs too
    assert count_molecules(counts, "directional") == 3 and count_molecules({}, "unique") == 0
    with pytest.raises(ValueError, match="method must be one of"):
        cluster_umis(counts, method="nope")
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        cluster_umis(counts, threshold=-1)


def test_enumeration_and_pairs_agree():
    """Big bundles find neighbours by enumerating substitutions, small ones by
    comparing pairs: the same graph either way (checked on the reference)."""
    rng = random.Random(4)
    for n, length, threshold in ((400, 10, 1), (300, 12, 2), (60, 6, 1)):
        counts = {}
        while len(counts) < n:
            counts[bytes(rng.choice(b"ACGT") for _ in range(length))] = rng.randrange(1, 20)
        for method in ("cluster", "directional"):
            assert cluster_umis(counts, method=method, threshold=threshold) == reference.cluster_umis(counts, method, threshold)


@pytest.mark.parametrize("seed", [0, 1, 7, 123456789, 2**40 + 3, -5])
def test_mersenne_twister_is_pythons(seed):
    """The kernel's draws are random.random()'s, from random.Random(seed)'s state (umi_tools' random.seed)."""
    rng = random.Random(seed)
    expected = [rng.random() for _ in range(1500)]  # past a twist of the state
    assert mt_random_sequence(random.Random(seed).getstate(), 1500) == expected


def test_mean_distances():
    import numpy as np

    umis = [b"AAAA", b"AAAT", b"TTTT", b"AAAA"]
    idx = np.array([0, 1, 2, 3], dtype=np.int64)
    pairs = [(a, b) for i, a in enumerate(idx) for b in idx[i + 1 :]]
    expected = sum(sum(x != y for x, y in zip(umis[a], umis[b], strict=True)) for a, b in pairs) / len(pairs)
    assert mean_distances(umis, idx) == expected
    assert mean_distances(umis, np.array([2], dtype=np.int64)) == -1.0
    with pytest.raises(ZeroDivisionError):
        mean_distances(umis, np.array([], dtype=np.int64))


def test_format_table():
    import numpy as np

    genes = [b"G1", b"G\t2"]
    cells = [b"A", b"B\\"]
    g = np.array([0, 0, 1], dtype=np.int64)
    c = np.array([0, 1, 1], dtype=np.int64)
    n = np.array([3, 1, 12], dtype=np.int64)
    assert format_table(genes, cells, g, c, n, "tsv") == b"G1\tA\t3\nG1\tB\\\\\t1\nG\\t2\tB\\\\\t12\n"
    assert format_table(genes, None, g, None, n, "tsv") == b"G1\t3\nG1\t1\nG\\t2\t12\n"
    assert format_table(None, None, g + 1, c + 1, n, "mtx") == b"1 1 3\n1 2 1\n2 2 12\n"
    assert format_table(genes, cells, g, c, n, "wide") == b"G1\t3\t1\nG\\t2\t0\t12\n"
    assert format_table(genes, cells, g[:0], c[:0], n[:0], "tsv") == b""
    with pytest.raises(ValueError, match="differ in length"):
        format_table(genes, cells, g, c[:2], n, "tsv")
    with pytest.raises(ValueError, match="kind must be"):
        format_table(genes, cells, g, c, n, "csv")


def test_count_tab_reads_pieces_as_a_whole():
    """Lines split anywhere between feeds give the same table."""
    rng = random.Random(2)
    lines = []
    for gene in ("G1", "G2", "G1"):  # a gene in two runs: two groups, as umi_tools reads it
        for _ in range(30):
            lines.append(f"r{rng.randrange(999)}_C{rng.randrange(3)}_{''.join(rng.choice('ACGT') for _ in range(5))}\t{gene}\n")
    lines[3] = "  " + lines[3].rstrip("\n") + " \r\n"  # umi_tools strips each line
    data = "".join(lines).encode()
    whole = CountTab("directional", 1, "_", True)
    expected = whole.feed(data) + whole.finish()
    assert expected.count(b"\tG1\t") == 6 and whole.lines == 90 == whole.reads
    for size in (1, 2, 3, 7, 64):
        k = CountTab("directional", 1, "_", True)
        out = b"".join(k.feed(data[i : i + size]) for i in range(0, len(data), size)) + k.finish()
        assert out == expected


def test_count_tab_errors():
    with pytest.raises(ValueError, match="line 2: does not contain 2 columns"):
        k = CountTab()
        k.feed(b"r1_AC\tG1\nr2_AC G1\n")
    with pytest.raises(ValueError, match="line 1: does not contain 2 columns"):
        CountTab().feed(b"r1_AC\tG1\tx\n")
    with pytest.raises(ValueError, match="no cell barcode and UMI"):
        CountTab(per_cell=True).feed(b"r1\tG1\n")
    with pytest.raises(ValueError, match="must not be empty"):
        CountTab(sep="")


# -- the kernel on records ---------------------------------------------------------------------------


def _bam(tmp_path, records, sort_order="coordinate") -> bytes:
    """A BAM file of pysam records (the kernel reads BGZF as it reads a raw stream); its bytes."""
    hdr = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6", "SO": sort_order}, "SQ": [{"SN": "c", "LN": 10_000}]})
    path = tmp_path / "made.bam"
    with pysam.AlignmentFile(str(path), "wb", header=hdr) as f:
        for make in records:
            f.write(make(hdr))
    return path.read_bytes()


def _raw(bam: bytes) -> bytes:
    """The raw BAM stream inside a BAM file's BGZF (what the decode stage hands on)."""
    from bamflow.bam.bgzf import BgzfReader

    with BgzfReader(io.BytesIO(bam), threads=0) as r:
        return r.read()


def _read(pos, tags, name="r", flag=0):
    def make(hdr):
        r = pysam.AlignedSegment(hdr)
        r.query_name, r.query_sequence, r.flag = name, "ACGT", flag
        r.reference_id, r.reference_start, r.cigarstring, r.mapping_quality = 0, pos, "4M", 60
        r.set_tags(tags)
        return r

    return make


def _run(stream: bytes, config: dict, tmp_path) -> dict:
    path = tmp_path / "in.raw"
    path.write_bytes(stream)
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "out.raw", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return UmiKernel(fd, out, config, source="in: ").run()
    finally:
        os.close(fd)
        os.close(out)


CONFIG = dict(mode="dedup", umi_tag="UB", cell_tag="CB", per_cell=True)


def test_kernel_counts_every_read(tmp_path):
    stream = _bam(tmp_path, [
        _read(10, [("CB", "A"), ("UB", "ACGT")], "a"),
        _read(10, [("CB", "A"), ("UB", "ACGT")], "b"),
        _read(10, [("CB", "A"), ("UB", "")], "c"),  # an empty UMI: missing
        _read(20, [("UB", "ACGT")], "d"),
        _read(30, [("CB", "A"), ("UB", 77)], "e"),  # an integer tag: its decimal value
        _read(40, [("CB", "A"), ("UB", "ACGT")], "f", flag=4),
    ])
    result = _run(stream, CONFIG, tmp_path)
    assert result["reads_in"] == 6 and result["kept"] == 2 == result["written"]
    assert result["dropped"] == {"duplicate": 1, "no_umi": 1, "no_cell": 1, "unmapped": 1}


def test_kernel_errors_name_the_record(tmp_path):
    stream = _bam(tmp_path, [_read(10, [("CB", "A"), ("UB", 1.5)], "floaty")])
    with pytest.raises(ValueError, match=r"in: record 0 \(read 'floaty'\): tag UB holds a float"):
        _run(stream, CONFIG, tmp_path)
    stream = _bam(tmp_path, [_read(50, [("CB", "A"), ("UB", "AC")], "late"), _read(10, [("CB", "A"), ("UB", "AC")], "early")])
    with pytest.raises(ValueError, match="SO:coordinate but read early .c:11. is out of order"):
        _run(stream, CONFIG, tmp_path)
    with pytest.raises(ValueError, match="--chrom chrZ is not a reference"):
        _run(_bam(tmp_path, [_read(1, [])]), {**CONFIG, "chrom": "chrZ"}, tmp_path)
    with pytest.raises(ValueError, match="not a BAM stream"):
        _run(b"hello world", CONFIG, tmp_path)
    truncated = _raw(_bam(tmp_path, [_read(10, [("CB", "A"), ("UB", "AC")])]))[:-5]
    with pytest.raises(ValueError, match="ends inside record"):
        _run(truncated, CONFIG, tmp_path)


def test_kernel_rejects_bad_options(tmp_path):
    stream = _bam(tmp_path, [])
    for bad, message in (
        ({"method": "nope"}, "method must be one of"),
        ({"umi_sep": ""}, "umi_separator must not be empty"),
        ({"cell_tag_split": b""}, "cell_tag_split must not be empty"),
        ({"mode": "nope"}, "not in tuple"),
        ({"umi_tag": "U"}, "two characters"),
    ):
        with pytest.raises(ValueError, match=message):
            _run(stream, {**CONFIG, **bad}, tmp_path)


def test_unsorted_stream_is_held_and_sorted_out(tmp_path):
    """Without SO:coordinate the kernel holds everything and writes in coordinate order."""
    reads = [_read(pos, [("CB", "A"), ("UB", umi)], f"r{pos}") for pos, umi in ((50, "AA"), (10, "CC"), (30, "GG"))]
    _run(_bam(tmp_path, reads, sort_order="unsorted"), CONFIG, tmp_path)  # out: a raw stream
    data = (tmp_path / "out.raw").read_bytes()
    from bamflow.kernels._records import parse_header

    off, _, _ = parse_header(data)
    positions = []
    while off < len(data):
        (size,) = struct.unpack_from("<i", data, off)
        positions.append(struct.unpack_from("<i", data, off + 8)[0])
        off += 4 + size
    assert positions == [10, 30, 50]
