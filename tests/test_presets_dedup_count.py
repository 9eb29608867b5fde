"""UMI presets against umi_tools: clustering (property test), dedup and count
on small 10x-style BAMs, compared with `umi_tools dedup` / `umi_tools count`
with matching options (run by tests/test_umi_support.py's umi_tools fixture:
forked from a process that imported umi_tools once). Option-by-option,
line-for-line comparisons are in tests/test_umi_tools_equal.py."""

from __future__ import annotations

import csv
import gzip
import os
import random
import shutil
import subprocess
from collections import Counter

import pysam
import pytest
import test_umi_support
import umi_tools.network as umi_tools_network  # the reference (installed by the README's test command)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_umi_support import write_bam

import bamflow as bf
from bamflow.presets.count import count
from bamflow.presets.dedup import dedup
from bamflow.presets.umi import METHODS, cluster_umis

umi_tools = test_umi_support.umi_tools  # the fixture (a module's own, so collection order does not matter)

REFS = [("chr1", 200_000), ("chr2", 100_000)]
UMI_LEN = 8


# -- clustering -----------------------------------------------------------------------------

umi_dicts = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.dictionaries(
        st.text(alphabet="ACGT", min_size=n, max_size=n).map(str.encode),
        st.sampled_from([1, 1, 1, 2, 2, 3, 4, 5, 7, 10, 30]),
        min_size=1,
        max_size=40,
    )
)


@settings(max_examples=300, deadline=None)
@given(umi_dicts)
def test_clusters_equal_umi_tools_for_every_method(counts):
    for method in METHODS:
        theirs = umi_tools_network.UMIClusterer(cluster_method=method)(dict(counts), threshold=1)
        ours = cluster_umis(counts, method)
        assert {frozenset(g) for g in ours} == {frozenset(g) for g in theirs}, method
        # the representative (first) UMI of every group is the same
        assert sorted(g[0] for g in ours) == sorted(g[0] for g in theirs), method


def test_clustering_examples():
    counts = {b"AAAA": 10, b"AAAT": 3, b"AATT": 1, b"GGGG": 5, b"GGGC": 5}
    assert {frozenset(g) for g in cluster_umis(counts, "cluster")} == {
        frozenset({b"AAAA", b"AAAT", b"AATT"}),
        frozenset({b"GGGG", b"GGGC"}),
    }
    # directional: 10 >= 2*3-1 and 3 >= 2*1-1 join; 5 and 5 do not (5 < 9)
    assert len(cluster_umis(counts, "directional")) == 3
    assert len(cluster_umis(counts, "adjacency")) == 3  # AAAA covers AAAT; AATT needs its own lead
    assert len(cluster_umis(counts, "unique")) == 5
    with pytest.raises(ValueError):
        cluster_umis(counts, "nope")


# -- test BAMs ------------------------------------------------------------------------------


def _mutate(umi, rng):
    i = rng.randrange(len(umi))
    return umi[:i] + rng.choice([b for b in "ACGT" if b != umi[i]]) + umi[i + 1 :]


def make_reads(seed=7, n_cells=6, n_genes=8):
    """Molecules with PCR duplicates and 1-mismatch UMI errors, several cells,
    genes (GX/GN), positions, strands and soft clips; plus reads without CB,
    UB or gene, with featureCounts-style unassigned genes, and unmapped reads.
    Returns (header, reads, expected drop reasons by read name)."""
    rng = random.Random(seed)
    hdr = pysam.AlignmentHeader.from_dict(
        {
            "HD": {"VN": "1.6", "SO": "coordinate"},
            "SQ": [{"SN": n, "LN": ln} for n, ln in REFS],
        }
    )
    cells = ["".join(rng.choice("ACGT") for _ in range(12)) + "-1" for _ in range(n_cells)]
    genes = []
    for g in range(n_genes):
        tid = g % 2
        genes.append((f"ENSG{g:05d}", f"GENE{g}", tid, 1000 + g * 9000))
    reads, why = [], {}
    serial = 0

    def add(tid, start, reverse, tags, cigar="50M", mapq=255, unmapped=False, flag_extra=0):
        nonlocal serial
        r = pysam.AlignedSegment(hdr)
        r.query_name = f"q{serial}"
        serial += 1
        r.query_sequence = "A" * 50
        if unmapped:
            r.flag = 4 | flag_extra
            r.reference_id, r.reference_start = -1, -1
        else:
            r.flag = (16 if reverse else 0) | flag_extra
            r.reference_id, r.reference_start = tid, start
            r.cigarstring = cigar
            r.mapping_quality = mapq
        r.set_tags(tags)
        reads.append(r)
        return r

    for gene_id, gene_name, tid, locus in genes:
        for cell in cells:
            for _ in range(rng.randrange(1, 9)):  # molecules
                umi = "".join(rng.choice("ACGT") for _ in range(UMI_LEN))
                start = locus + rng.randrange(0, 3000)
                reverse = rng.random() < 0.5
                for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):  # PCR duplicates
                    u = _mutate(umi, rng) if rng.random() < 0.15 else umi
                    s, cig = start, "50M"
                    if rng.random() < 0.2:  # same 5' end with a soft clip
                        if reverse:
                            s, cig = start + 3, "47M3S"
                        else:
                            s, cig = start + 3, "3S47M"
                    elif rng.random() < 0.1:  # another position of the same molecule
                        s = start + rng.randrange(1, 400)
                    add(
                        tid,
                        s,
                        reverse,
                        [("CB", cell), ("UB", u), ("GX", gene_id), ("GN", gene_name)],
                        cigar=cig,
                        mapq=rng.choice([255, 255, 3, 1]),
                        flag_extra=0x400 if rng.random() < 0.3 else 0,
                    )
    # reads that cannot be used, with what umi_tools (and we) call them
    for _ in range(12):
        cell, umi = rng.choice(cells), "".join(rng.choice("ACGT") for _ in range(UMI_LEN))
        gene_id, gene_name, tid, locus = rng.choice(genes)
        pos = locus + rng.randrange(3000)
        r = add(tid, pos, False, [("UB", umi), ("GX", gene_id)])
        why[r.query_name] = "no_cell"
        r = add(tid, pos, True, [("CB", cell), ("GX", gene_id)])
        why[r.query_name] = "no_umi"
        r = add(tid, pos, False, [("CB", cell), ("UB", umi)])
        why[r.query_name] = "no_gene"
        r = add(tid, pos, False, [("CB", cell), ("UB", umi), ("GX", "__no_feature")])
        why[r.query_name] = "gene_filtered"
        r = add(tid, pos, True, [("CB", cell), ("UB", umi), ("GX", "Unassigned_NoFeatures")])
        why[r.query_name] = "gene_filtered"
        r = add(-1, -1, False, [("CB", cell), ("UB", umi), ("GX", gene_id)], unmapped=True)
        why[r.query_name] = "unmapped"
        r = add(-1, -1, False, [("UB", umi)], unmapped=True)
        why[r.query_name] = "unmapped"
    reads.sort(key=lambda r: (r.reference_id if r.reference_id >= 0 else 1 << 30, r.reference_start))
    return hdr, reads, why


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("umi")
    hdr, reads, why = make_reads()
    return {"dir": d, "bam": write_bam(d / "in.bam", hdr, reads), "reads": reads, "why": why, "hdr": hdr}


def kept_keys(path, cell_of=lambda r: r.get_tag("CB").split("-")[0], umi_of=lambda r: r.get_tag("UB")):
    """(cell, reference, 5' position, strand, UMI, MAPQ) of every read; the CB's
    "-1" is cut as umi_tools does. The MAPQ shows that the best read was kept
    (umi_tools picks at random among reads of the highest MAPQ, bamflow the first)."""
    from bamflow.presets.dedup import read_position

    keys = Counter()
    with pysam.AlignmentFile(path) as f:
        for r in f:
            keys[(cell_of(r), r.reference_name, read_position(r), r.is_reverse, umi_of(r), r.mapping_quality)] += 1
    return keys


def group_sizes(keys):
    per = Counter()
    for (cell, ref, pos, strand, _, _), n in keys.items():
        per[(cell, ref, pos, strand)] += n
    return per


# -- dedup ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_dedup_equals_umi_tools(umi_tools, data, method):
    d = data["dir"]
    theirs = str(d / f"ut_{method}.bam")
    umi_tools(
        "dedup",
        "-I",
        data["bam"],
        "-S",
        theirs,
        "--extract-umi-method=tag",
        "--umi-tag=UB",
        "--cell-tag=CB",
        "--per-cell",
        f"--method={method}",
        "--random-seed=1",
        "-L",
        str(d / "ut.log"),
    )
    ours = str(d / f"bf_{method}.bam")
    stats = dedup(data["bam"], ours, method=method, workers=2, timeout=120)
    t, o = kept_keys(theirs), kept_keys(ours)
    assert sum(o.values()) == sum(t.values()) == stats["kept"]
    assert group_sizes(o) == group_sizes(t)  # kept reads per (cell, position, strand)
    assert o == t  # and the same representative UMIs
    assert stats["reads_in"] == len(data["reads"])
    assert stats["dropped"]["duplicate"] > 0
    # without genes, the gene problems are not problems: only unmapped/no_cell/no_umi are dropped
    why = Counter(v for v in data["why"].values() if v in ("unmapped", "no_cell", "no_umi"))
    assert {k: v for k, v in stats["dropped"].items() if k != "duplicate"} == dict(why)
    assert subprocess.run(["samtools", "quickcheck", ours]).returncode == 0 if shutil.which("samtools") else True
    with pysam.AlignmentFile(ours) as f:  # coordinate order kept
        pos = [(r.reference_id, r.reference_start) for r in f]
    assert pos == sorted(pos)


def test_dedup_per_gene_equals_umi_tools(umi_tools, data):
    d = data["dir"]
    theirs = str(d / "ut_gene.bam")
    umi_tools(
        "dedup",
        "-I",
        data["bam"],
        "-S",
        theirs,
        "--extract-umi-method=tag",
        "--umi-tag=UB",
        "--cell-tag=CB",
        "--per-cell",
        "--per-gene",
        "--gene-tag=GX",
        "--random-seed=1",
        "-L",
        str(d / "ut.log"),
    )
    ours = str(d / "bf_gene.bam")
    stats = dedup(data["bam"], ours, gene_tag="GX", timeout=120)

    def per_gene(path):
        with pysam.AlignmentFile(path) as f:
            return Counter((r.get_tag("CB").split("-")[0], r.get_tag("GX"), r.get_tag("UB")) for r in f)

    assert per_gene(ours) == per_gene(theirs)
    assert stats["dropped"]["gene_filtered"] == Counter(data["why"].values())["gene_filtered"]
    assert stats["dropped"]["no_gene"] == Counter(data["why"].values())["no_gene"]


@pytest.mark.parametrize("cell_in_name", [False, True])
def test_dedup_read_name_umis_equal_umi_tools(umi_tools, data, cell_in_name):
    d = data["dir"]

    def name(r):
        umi = r.get_tag("UB") if r.has_tag("UB") else ""
        if not umi:
            return r.query_name  # no "_": no UMI
        cell = r.get_tag("CB").split("-")[0] if r.has_tag("CB") else ""
        return f"{r.query_name}_{cell}_{umi}" if cell_in_name else f"{r.query_name}_{umi}"

    kept = [r for r in data["reads"] if r.has_tag("UB") and (r.has_tag("CB") or not cell_in_name)]
    src = write_bam(d / f"names{cell_in_name}.bam", data["hdr"], kept, rename=name)
    theirs = str(d / f"ut_names{cell_in_name}.bam")
    extra = ["--per-cell"] if cell_in_name else []
    umi_tools(
        "dedup", "-I", src, "-S", theirs, "--extract-umi-method=read_id", *extra, "--random-seed=1", "-L", str(d / "ut.log")
    )
    ours = str(d / f"bf_names{cell_in_name}.bam")
    mode = "read_name_cell" if cell_in_name else "read_name"
    stats = dedup(src, ours, umi=mode, per_cell=cell_in_name, timeout=120)

    def cell_of(r):
        return r.query_name.split("_")[-2] if cell_in_name else None

    def umi_of(r):
        return r.query_name.split("_")[-1]

    t, o = kept_keys(theirs, cell_of, umi_of), kept_keys(ours, cell_of, umi_of)
    assert o == t and sum(o.values()) == stats["kept"]
    assert stats["reads_in"] == stats["kept"] + sum(stats["dropped"].values())


def test_read_name_umi_with_tag_cell_equals_tag_mode(data):
    """umi="read_name" with per_cell: UMI from the name, cell from CB (sharded by CB)."""
    d = data["dir"]
    src = write_bam(
        d / "names_cb.bam",
        data["hdr"],
        data["reads"],
        rename=lambda r: f"{r.query_name}_{r.get_tag('UB')}" if r.has_tag("UB") else r.query_name,
    )
    a = dedup(src, str(d / "by_name.bam"), umi="read_name", workers=3, timeout=120)
    b = dedup(src, str(d / "by_tag.bam"), umi="tag:UB", workers=2, timeout=120)
    assert kept_keys(str(d / "by_name.bam")) == kept_keys(str(d / "by_tag.bam"))
    assert a["dropped"] == b["dropped"] and a["kept"] == b["kept"]


def test_mark_flags_exactly_what_remove_drops(data):
    d = data["dir"]
    removed, marked = str(d / "remove.bam"), str(d / "mark.bam")
    s_remove = dedup(data["bam"], removed, timeout=120)
    s_mark = dedup(data["bam"], marked, mark=True, timeout=120)
    with pysam.AlignmentFile(removed) as f:
        kept = {r.query_name for r in f}
    with pysam.AlignmentFile(marked) as f:
        reads = list(f)
    assert len(reads) == s_mark["reads_in"] == s_mark["written"] == len(data["reads"])
    examined = {r.query_name for r in data["reads"]} - {
        n for n, why in data["why"].items() if why in ("unmapped", "no_cell", "no_umi")
    }
    flagged = {r.query_name for r in reads if r.is_duplicate and r.query_name in examined}
    assert flagged == examined - kept
    assert len(flagged) == s_remove["dropped"]["duplicate"] == s_mark["dropped"]["duplicate"]
    # kept reads carry no 0x400 (the input had some set); unexamined reads are unchanged
    assert not any(r.is_duplicate for r in reads if r.query_name in kept)
    original = {r.query_name: r.flag for r in data["reads"]}
    assert all(r.flag == original[r.query_name] for r in reads if r.query_name not in examined)
    assert s_mark["kept"] == s_remove["kept"]
    assert {r.query_name for r in reads if not r.is_duplicate and r.query_name in examined} == kept


def test_unsorted_input_gives_the_same_reads(data):
    d = data["dir"]
    shuffled = list(data["reads"])
    random.Random(1).shuffle(shuffled)
    src = write_bam(d / "shuffled.bam", data["hdr"], shuffled, sort_order="unsorted")
    a, b = str(d / "from_sorted.bam"), str(d / "from_unsorted.bam")
    dedup(data["bam"], a, workers=1, timeout=120)
    dedup(src, b, workers=3, timeout=120)
    assert kept_keys(a) == kept_keys(b)


def test_coordinate_header_with_unsorted_reads_fails(data):
    d = data["dir"]
    shuffled = list(data["reads"])
    random.Random(2).shuffle(shuffled)
    src = d / "lying.bam"
    with pysam.AlignmentFile(str(src), "wb", header=data["hdr"]) as f:  # says SO:coordinate
        for r in shuffled:
            f.write(r)
    with pytest.raises(bf.WorkflowError, match="out of order"):
        dedup(str(src), str(d / "never.bam"), timeout=120)
    assert not os.path.exists(d / "never.bam")


def test_bad_inputs_are_counted_not_lost(tmp_path):
    hdr = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6", "SO": "unsorted"}, "SQ": [{"SN": "c", "LN": 1000}]})
    src = tmp_path / "bad.bam"
    with pysam.AlignmentFile(str(src), "wb", header=hdr) as f:
        for i, tags in enumerate(
            [[("CB", "A-1"), ("UB", "AC")], [("CB", "A-1")], [("UB", "AC")], [], [("CB", "A-1"), ("UB", "AC")]]
        ):
            r = pysam.AlignedSegment(hdr)
            r.query_name, r.query_sequence = f"r{i}", "ACGT"
            r.reference_id, r.reference_start, r.cigarstring = 0, 10, "4M"
            r.flag = 4 if i == 4 else 0
            r.set_tags(tags)
            f.write(r)
    stats = dedup(str(src), str(tmp_path / "out.bam"), start_method="spawn", timeout=60)
    assert stats["reads_in"] == 5 and stats["kept"] == 1
    assert stats["dropped"] == {"no_umi": 2, "no_cell": 1, "unmapped": 1}
    stats = dedup(str(src), str(tmp_path / "out2.bam"), umi="read_name", per_cell=False, timeout=60)
    assert stats["dropped"] == {"no_umi": 4, "unmapped": 1}  # no "_UMI" in the names
    with pytest.raises(bf.WorkflowError, match="tag GX is on none of 5 reads"):  # a mistyped tag fails the run
        count(str(src), tmp_path / "cnt", gene_tag="GX", formats=("tsv",), timeout=60)
    assert not os.path.exists(tmp_path / "cnt" / "counts.tsv")


# -- count ----------------------------------------------------------------------------------


def read_tsv(path, strip_suffix=False):
    with open(path) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["gene", "cell", "count"]
    return {(g, c.split("-")[0] if strip_suffix else c): int(n) for g, c, n in rows[1:]}


@pytest.mark.parametrize("method", METHODS)
def test_count_equals_umi_tools(umi_tools, data, method):
    d = data["dir"]
    theirs = str(d / f"ut_count_{method}.tsv")
    umi_tools(
        "count",
        "-I",
        data["bam"],
        "-S",
        theirs,
        "--extract-umi-method=tag",
        "--umi-tag=UB",
        "--cell-tag=CB",
        "--per-gene",
        "--gene-tag=GX",
        "--per-cell",
        f"--method={method}",
        "--random-seed=1",
        "-L",
        str(d / "ut.log"),
    )
    out = d / f"bf_count_{method}"
    stats = count(data["bam"], out, method=method, formats=("tsv",), timeout=120)
    ours = read_tsv(out / "counts.tsv", strip_suffix=True)
    assert ours == read_tsv(theirs)
    assert sum(ours.values()) == stats["molecules"]
    why = Counter(data["why"].values())
    assert stats["dropped"] == dict(why)
    assert stats["reads_in"] == len(data["reads"]) == stats["counted"] + sum(why.values())


def test_mtx_and_h5ad(data):
    import scipy.io

    out = data["dir"] / "mtx"
    stats = count(data["bam"], out, workers=3, timeout=120)
    tsv = read_tsv(out / "counts.tsv")
    m = scipy.io.mmread(str(out / "matrix.mtx.gz")).tocsc()
    with gzip.open(out / "barcodes.tsv.gz", "rt") as f:
        barcodes = f.read().split()
    with gzip.open(out / "features.tsv.gz", "rt") as f:
        features = [line.rstrip("\n").split("\t") for line in f]
    assert m.shape == (len(features), len(barcodes)) == (8, 6) == (stats["genes"], stats["cells"])
    assert m.sum() == sum(tsv.values()) == stats["molecules"] > 0
    assert all(len(f) == 3 and f[2] == "Gene Expression" and f[1] == "GENE" + str(int(f[0][4:])) for f in features)
    for (gene, cell), n in tsv.items():
        assert m[[f[0] for f in features].index(gene), barcodes.index(cell)] == n
    import anndata

    a = anndata.read_h5ad(out / "counts.h5ad")
    assert a.shape == (6, 8) and list(a.obs_names) == barcodes and a.X.sum() == m.sum()
    assert (a.X.toarray() == m.T.toarray()).all()


def test_count_cell_selection(data):
    out = data["dir"] / "sel"
    full = count(data["bam"], data["dir"] / "full", formats=("tsv",), timeout=120)
    totals = Counter()
    for (_, cell), n in read_tsv(data["dir"] / "full" / "counts.tsv").items():
        totals[cell] += n
    listed = [sorted(totals)[0], "TTTTTTTTTTTT-1"]
    stats = count(data["bam"], out, cells=listed, formats=("mtx",), timeout=120)
    with gzip.open(out / "barcodes.tsv.gz", "rt") as f:
        assert f.read().split() == listed  # listed order; a listed cell without reads is a zero column
    import scipy.io

    m = scipy.io.mmread(str(out / "matrix.mtx.gz"))
    assert m.shape == (full["genes"], 2) and m.sum() == totals[listed[0]]
    threshold = sorted(totals.values())[2]
    stats = count(data["bam"], out, min_umis=threshold, formats=("tsv",), force=True, timeout=120)  # (replaces the mtx)
    assert stats["cells"] == sum(t >= threshold for t in totals.values())


def test_count_keeps_the_last_reference_of_a_gene_as_umi_tools(tmp_path, umi_tools):
    """A secondary alignment on another reference keeps its gene tag: umi_tools
    bundles per reference and its --per-cell table keeps the last reference's
    count; bamflow's tables do the same (and say how often, ``overwritten``)."""
    hdr = pysam.AlignmentHeader.from_dict(
        {"HD": {"VN": "1.6", "SO": "coordinate"}, "SQ": [{"SN": n, "LN": ln} for n, ln in REFS]}
    )
    src = tmp_path / "x.bam"
    rows = [
        (0, 100, "AAAAAAAA", 0),
        (0, 150, "CCCCCCCC", 0),
        (0, 200, "CCCCCCCA", 0),  # 2 molecules on chr1
        (1, 500, "AAAAAAAA", 256),
    ]  # a secondary of the first, on chr2
    with pysam.AlignmentFile(str(src), "wb", header=hdr) as f:
        for i, (tid, pos, umi, flag) in enumerate(rows):
            r = pysam.AlignedSegment(hdr)
            r.query_name, r.query_sequence, r.flag = f"r{i}", "A" * 20, flag
            r.reference_id, r.reference_start, r.cigarstring, r.mapping_quality = tid, pos, "20M", 255
            r.set_tags([("CB", "CELL-1"), ("UB", umi), ("GX", "G1")])
            f.write(r)
    pysam.index(str(src))
    stats = count(str(src), tmp_path / "c", formats=("tsv",), method="cluster", cell_tag_split="-", timeout=60)
    umi_tools("count", "-I", src, "-S", tmp_path / "ut.tsv", "--extract-umi-method=tag", "--umi-tag=UB", "--cell-tag=CB",
              "--per-cell", "--per-gene", "--gene-tag=GX", "--method=cluster")
    assert read_tsv(tmp_path / "c" / "counts.tsv") == read_tsv(tmp_path / "ut.tsv") == {("G1", "CELL"): 1}
    assert stats["counted"] == 4 and stats["overwritten"] == 1 and stats["molecules_all_bundles"] == 3
