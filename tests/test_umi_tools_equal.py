"""dedup, group, count and count_tab against umi_tools 1.1.6, option by option,
on data made by tests/test_umi_support.py (single-end and paired-end, per cell
and not, per gene, tag, read-name and umis-style UMIs).

With ``--random-seed`` bamflow keeps the reads umi_tools keeps and writes them
in its order: the outputs are compared line for line (SAM text of every
record) and their headers apart from bamflow's @PG. bamflow's cell barcode is
the whole tag unless asked (``cell_tag_split="-"``, umi_tools' default), so
the runs here ask for it.
"""

from __future__ import annotations

import csv
import gzip
import os
import random
from collections import Counter

import pysam
import pytest
import test_umi_support
from test_umi_support import CELLS, header_without_bamflow, sam_lines, write_bam

from bamflow.presets.count import count
from bamflow.presets.dedup import dedup
from bamflow.presets.group import count_tab, group
from bamflow.presets.umi import METHODS

# the fixtures, as this module's own (so that the order of collection does not matter)
umi_tools, single_end, paired_end = test_umi_support.umi_tools, test_umi_support.single_end, test_umi_support.paired_end

TAG_UMIS = ["--extract-umi-method=tag", "--umi-tag=UB", "--cell-tag=CB"]
SEED = ["--random-seed=7"]


def assert_same_bam(theirs, ours, sorted_output=True):
    a, b = sam_lines(theirs), sam_lines(ours)
    assert len(a) == len(b), f"umi_tools wrote {len(a)} records, bamflow {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x == y, f"record {i} differs:\n{x}\n{y}"
    ut, bf = header_without_bamflow(theirs), header_without_bamflow(ours)
    if not sorted_output:  # umi_tools keeps the input's SO:coordinate on its unsorted output; bamflow says unsorted
        assert bf["HD"].pop("SO") == "unsorted" and ut["HD"].pop("SO") == "coordinate"
    assert ut == bf


def five_prime(r):
    """The 5' end including soft clips (umi_tools' get_read_position), from pysam."""
    cigar = r.cigartuples
    if r.is_reverse:
        return r.reference_end + (cigar[-1][1] if cigar[-1][0] == 4 else 0)
    return r.reference_start - (cigar[0][1] if cigar[0][0] == 4 else 0)


def kept_keys(path):
    """What decides a kept read up to umi_tools' draw: cell, reference, 5' end, strand, UMI, MAPQ."""
    with pysam.AlignmentFile(str(path)) as f:
        return Counter((r.get_tag("CB"), r.reference_id, five_prime(r), r.is_reverse, r.get_tag("UB"), r.mapping_quality)
                       for r in f)


def books(stats):
    assert stats["reads_in"] == stats["kept"] + stats["mates"] + sum(stats["dropped"].values())


# -- dedup -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_dedup_methods_line_for_line(single_end, umi_tools, method):
    d = single_end["dir"]
    umi_tools("dedup", "-I", single_end["bam"], "-S", d / "ut.bam", *TAG_UMIS, "--per-cell", f"--method={method}", *SEED)
    stats = dedup(single_end["bam"], d / "bf.bam", method=method, cell_tag_split="-", random_seed=7, timeout=60)
    assert_same_bam(d / "ut.bam", d / "bf.bam")
    books(stats)
    assert stats["workers"] == 1 and stats["per_worker"][0]["draws"] > 0  # umi_tools' draws were made


SINGLE_END_OPTIONS = [
    # (umi_tools options, bamflow options)
    (["--per-cell", "--spliced-is-unique"], dict(spliced_is_unique=True)),
    (["--per-cell", "--spliced-is-unique", "--soft-clip-threshold=2", "--read-length"],
     dict(spliced_is_unique=True, soft_clip_threshold=2, read_length=True)),
    (["--per-cell", "--subset=0.6", "--mapping-quality=2"], dict(subset=0.6, mapping_quality=2)),
    (["--per-cell", "--per-gene", "--gene-tag=GX"], dict(gene_tag="GX")),
    (["--per-cell", "--per-gene", "--gene-tag=GX", "--assigned-status-tag=XS", "--skip-tags-regex=^Unassigned"],
     dict(gene_tag="GX", assigned_status_tag="XS", skip_tags_regex="^Unassigned")),
    (["--per-cell", "--per-gene", "--per-contig", "--method=cluster"], dict(per_contig=True, method="cluster")),
    (["--per-cell", "--chrom=chr2", "--method=adjacency"], dict(chrom="chr2", method="adjacency")),
    (["--per-cell", "--edit-distance-threshold=2", "--method=directional"], dict(edit_distance_threshold=2)),
    (["--per-cell", "--buffer-whole-contig"], dict(buffer_whole_contig=True)),
    (["--per-cell", "--no-sort-output"], dict(no_sort_output=True)),
    ([], dict(per_cell=False)),
    (["--ignore-umi"], dict(ignore_umi=True, per_cell=False)),
]


@pytest.mark.parametrize("theirs, ours", SINGLE_END_OPTIONS, ids=[" ".join(t) or "not-per-cell" for t, _ in SINGLE_END_OPTIONS])
def test_dedup_options_line_for_line(single_end, umi_tools, theirs, ours):
    d = single_end["dir"]
    umi_tools("dedup", "-I", single_end["bam"], "-S", d / "ut.bam", *TAG_UMIS, *theirs, *SEED)
    stats = dedup(single_end["bam"], d / "bf.bam", cell_tag_split="-", random_seed=7, timeout=60, **ours)
    assert_same_bam(d / "ut.bam", d / "bf.bam", sorted_output=not ours.get("no_sort_output"))
    books(stats)


PAIRED_OPTIONS = [
    (["--paired"], dict(paired=True)),
    (["--paired", "--ignore-tlen", "--chimeric-pairs=discard"], dict(paired=True, ignore_tlen=True, chimeric_pairs="discard")),
    (["--paired", "--unmapped-reads=use", "--unpaired-reads=discard"],
     dict(paired=True, unmapped_reads="use", unpaired_reads="discard")),
    (["--paired", "--per-gene", "--gene-tag=GX", "--method=unique"], dict(paired=True, gene_tag="GX", method="unique")),
    ([], {}),  # paired-end data, single-end mode: read 2s are left out
]


@pytest.mark.parametrize("theirs, ours", PAIRED_OPTIONS, ids=[" ".join(t) or "single-end-mode" for t, _ in PAIRED_OPTIONS])
def test_dedup_paired_line_for_line(paired_end, umi_tools, theirs, ours):
    d = paired_end["dir"]
    umi_tools("dedup", "-I", paired_end["bam"], "-S", d / "ut.bam", *TAG_UMIS, "--per-cell", *theirs, *SEED)
    stats = dedup(paired_end["bam"], d / "bf.bam", cell_tag_split="-", random_seed=7, timeout=60, **ours)
    assert_same_bam(d / "ut.bam", d / "bf.bam")
    books(stats)
    if ours.get("paired"):
        assert stats["mates"] > 0
        names = Counter(line.split("\t")[0] for line in sam_lines(d / "bf.bam"))
        assert max(names.values()) == 2  # a read 1 and its mate


def _renamed(data, name, rename, keep=lambda r: True):
    src = data["dir"] / name
    if not src.exists():
        write_bam(src, data["hdr"], [r for r in data["reads"] if keep(r)], rename=rename)
    return src


def _cell(r):
    return r.get_tag("CB").split("-")[0]


@pytest.mark.parametrize(
    "style",
    ["read_id", "read_id_cell", "read_id_colon", "umis", "umis_cell"],
)
def test_dedup_read_name_umis_line_for_line(single_end, umi_tools, style):
    """UMIs (and cells) in read names: umi_tools' read_id (…_CELL_UMI) and umis (…:UMI_…:CELL_…)."""
    has_umi = (lambda r: r.has_tag("UB") and r.has_tag("CB")) if style.endswith("cell") else (lambda r: r.has_tag("UB"))
    if style == "read_id":
        src = _renamed(single_end, "rid.bam", lambda r: f"{r.query_name}_{r.get_tag('UB')}", has_umi)
        theirs, ours = ["--extract-umi-method=read_id"], dict(extract_umi_method="read_id", per_cell=False)
    elif style == "read_id_cell":
        src = _renamed(single_end, "ridc.bam", lambda r: f"{r.query_name}_{_cell(r)}_{r.get_tag('UB')}", has_umi)
        theirs, ours = ["--extract-umi-method=read_id", "--per-cell"], dict(umi="read_name_cell")
    elif style == "read_id_colon":
        src = _renamed(single_end, "ridcolon.bam", lambda r: f"{r.query_name}:{r.get_tag('UB')}", has_umi)
        theirs = ["--extract-umi-method=read_id", "--umi-separator=:"]
        ours = dict(extract_umi_method="read_id", umi_separator=":", per_cell=False)
    elif style == "umis":
        src = _renamed(single_end, "umis.bam", lambda r: f"{r.query_name}:UMI_{r.get_tag('UB')}", has_umi)
        theirs, ours = ["--extract-umi-method=umis"], dict(extract_umi_method="umis", per_cell=False)
    else:
        src = _renamed(single_end, "umisc.bam", lambda r: f"CELL_{_cell(r)}:{r.query_name}:UMI_{r.get_tag('UB')}", has_umi)
        theirs, ours = ["--extract-umi-method=umis", "--per-cell"], dict(extract_umi_method="umis", per_cell=True)
    d = single_end["dir"]
    umi_tools("dedup", "-I", src, "-S", d / "ut.bam", *theirs, *SEED)
    stats = dedup(src, d / "bf.bam", random_seed=7, timeout=60, **ours)
    assert_same_bam(d / "ut.bam", d / "bf.bam")
    books(stats)


def test_dedup_umi_tag_split_and_delimiter(single_end, umi_tools):
    """--umi-tag-split / --umi-tag-delimiter / --cell-tag-delimiter reshape the tags before use."""
    d = single_end["dir"]
    src = d / "tagged.bam"
    reads = []
    for r in single_end["reads"]:
        r = pysam.AlignedSegment.fromstring(r.to_string(), single_end["hdr"])
        if r.has_tag("UB"):
            u = r.get_tag("UB")
            r.set_tag("UB", f"{u[:4]}.{u[4:]}-x")
        if r.has_tag("CB"):
            c = r.get_tag("CB")
            r.set_tag("CB", c[:6] + ":" + c[6:])
        reads.append(r)
    write_bam(src, single_end["hdr"], reads)
    theirs = ["--per-cell", "--umi-tag-split=-", "--umi-tag-delimiter=.", "--cell-tag-delimiter=:"]
    umi_tools("dedup", "-I", src, "-S", d / "ut.bam", *TAG_UMIS, *theirs, *SEED)
    dedup(src, d / "bf.bam", umi_tag_split="-", umi_tag_delimiter=".", cell_tag_split="-", cell_tag_delimiter=":",
          random_seed=7, timeout=60)
    assert_same_bam(d / "ut.bam", d / "bf.bam")


def test_dedup_multimapping_detection(single_end, umi_tools):
    """--multimapping-detection-method NH: among equal MAPQ the lower NH wins (umi_tools needs NH on every read)."""
    d = single_end["dir"]
    reads = []
    for r in single_end["reads"]:
        r = pysam.AlignedSegment.fromstring(r.to_string(), single_end["hdr"])
        if not r.has_tag("NH"):
            r.set_tag("NH", 1)
        reads.append(r)
    src = write_bam(d / "nh.bam", single_end["hdr"], reads)
    umi_tools("dedup", "-I", src, "-S", d / "ut.bam", *TAG_UMIS, "--per-cell", "--multimapping-detection-method=NH", *SEED)
    dedup(src, d / "bf.bam", cell_tag_split="-", multimapping_detection_method="NH", random_seed=7, timeout=60)
    assert_same_bam(d / "ut.bam", d / "bf.bam")


def test_dedup_umi_whitelist(single_end, umi_tools, tmp_path):
    """--umi-whitelist (umi_tools needs its hidden --filter-umi too): groups whose top UMI is not listed go."""
    umis = sorted({r.get_tag("UB") for r in single_end["reads"] if r.has_tag("UB")})
    listed = random.Random(3).sample(umis, len(umis) // 2)
    wl = tmp_path / "wl.tsv"
    wl.write_text("# UMIs\n" + "".join(f"{u}\tcomment\n" for u in listed))
    umi_tools("dedup", "-I", single_end["bam"], "-S", tmp_path / "ut.bam", *TAG_UMIS, "--per-cell", "--filter-umi",
              f"--umi-whitelist={wl}", *SEED)
    stats = dedup(single_end["bam"], tmp_path / "bf.bam", cell_tag_split="-", umi_whitelist=wl, random_seed=7, timeout=60)
    assert_same_bam(tmp_path / "ut.bam", tmp_path / "bf.bam")
    assert stats["dropped"]["umi_not_whitelisted"] > 0
    books(stats)


def test_dedup_output_stats(single_end, umi_tools, tmp_path):
    """--output-stats: the three tables equal umi_tools' (the null columns draw from numpy as umi_tools does)."""
    umi_tools("dedup", "-I", single_end["bam"], "-S", tmp_path / "ut.bam", *TAG_UMIS, "--per-cell",
              f"--output-stats={tmp_path / 'ut'}", *SEED)
    stats = dedup(single_end["bam"], tmp_path / "bf.bam", cell_tag_split="-", output_stats=tmp_path / "bf", random_seed=7,
                  timeout=60)
    assert_same_bam(tmp_path / "ut.bam", tmp_path / "bf.bam")
    for suffix in ("_edit_distance.tsv", "_per_umi_per_position.tsv", "_per_umi.tsv"):
        assert (tmp_path / f"bf{suffix}").read_text() == (tmp_path / f"ut{suffix}").read_text(), suffix
    assert len(stats["outputs"]) == 3


def test_dedup_without_seed_is_deterministic_across_workers(single_end, umi_tools, tmp_path):
    """No seed: the first read among equal MAPQ, whatever the number of workers; the
    same UMI groups as umi_tools (its kept reads differ only where it drew)."""
    a = dedup(single_end["bam"], tmp_path / "w1.bam", workers=1, timeout=60)
    b = dedup(single_end["bam"], tmp_path / "w3.bam", workers=3, timeout=60)
    assert b["workers"] == 3 and a["workers"] == 1
    assert Counter(sam_lines(tmp_path / "w1.bam")) == Counter(sam_lines(tmp_path / "w3.bam"))
    assert a["dropped"] == b["dropped"] and a["kept"] == b["kept"]
    books(b)
    umi_tools("dedup", "-I", single_end["bam"], "-S", tmp_path / "ut.bam", *TAG_UMIS, "--per-cell", "--cell-tag-split=")

    assert kept_keys(tmp_path / "w3.bam") == kept_keys(tmp_path / "ut.bam")
    with pysam.AlignmentFile(str(tmp_path / "w3.bam")) as f:
        pos = [(r.reference_id, r.reference_start) for r in f]
    assert pos == sorted(pos)


def test_dedup_unsorted_input_keeps_the_same_reads(single_end, tmp_path):
    """Unsorted input (no SO:coordinate) is held whole: the same reads as from the sorted file."""
    shuffled = list(single_end["reads"])
    random.Random(5).shuffle(shuffled)
    src = write_bam(tmp_path / "shuffled.bam", single_end["hdr"], shuffled, sort_order="unsorted")
    dedup(single_end["bam"], tmp_path / "a.bam", workers=1, timeout=60)
    dedup(src, tmp_path / "b.bam", workers=2, timeout=60)

    assert kept_keys(tmp_path / "a.bam") == kept_keys(tmp_path / "b.bam")


# -- group -----------------------------------------------------------------------------------------


def _group_lines(path, order_free=False):
    lines = sam_lines(path)
    return sorted(lines) if order_free else lines


@pytest.mark.parametrize("method", METHODS)
def test_group_bam_and_table_line_for_line(single_end, umi_tools, method):
    """UG/BX tags and the --group-out table; adjacency's group members come in
    umi_tools' set order (Python's string hashing), so there as multisets."""
    d = single_end["dir"]
    umi_tools("group", "-I", single_end["bam"], "-S", d / "ug.bam", "--output-bam", f"--group-out={d / 'ug.tsv'}",
              *TAG_UMIS, "--per-cell", f"--method={method}")
    stats = group(single_end["bam"], d / "bg.bam", group_out=d / "bg.tsv", cell_tag_split="-", method=method, timeout=60)
    free = method == "adjacency"
    assert _group_lines(d / "ug.bam", free) == _group_lines(d / "bg.bam", free)
    ut, bf = (d / "ug.tsv").read_text().splitlines(), (d / "bg.tsv").read_text().splitlines()
    assert (sorted(ut) if free else ut) == (sorted(bf) if free else bf)
    assert header_without_bamflow(d / "ug.bam") == header_without_bamflow(d / "bg.bam")
    assert stats["reads_in"] == stats["grouped"] + stats["singles"] + sum(stats["dropped"].values())
    assert stats["table_rows"] == stats["grouped"] == len(bf) - 1


GROUP_OPTIONS = [
    (["--per-cell", "--per-gene", "--gene-tag=GX", "--umi-group-tag=XU"], dict(gene_tag="GX", umi_group_tag="XU"), "se"),
    (["--per-cell", "--unmapped-reads=output", "--chrom=chr1"], dict(unmapped_reads="output", chrom="chr1"), "se"),
    (["--per-cell", "--paired", "--chimeric-pairs=output"], dict(paired=True, chimeric_pairs="output"), "pe"),
    (["--per-cell", "--paired", "--unmapped-reads=use"], dict(paired=True, unmapped_reads="use"), "pe"),
]


@pytest.mark.parametrize("theirs, ours, data", GROUP_OPTIONS, ids=[" ".join(t) for t, _, _ in GROUP_OPTIONS])
def test_group_options_line_for_line(single_end, paired_end, umi_tools, theirs, ours, data):
    src = single_end if data == "se" else paired_end
    d = src["dir"]
    umi_tools("group", "-I", src["bam"], "-S", d / "ug.bam", "--output-bam", f"--group-out={d / 'ug.tsv'}", *TAG_UMIS,
              *theirs)
    stats = group(src["bam"], d / "bg.bam", group_out=d / "bg.tsv", cell_tag_split="-", timeout=60, **ours)
    assert sam_lines(d / "ug.bam") == sam_lines(d / "bg.bam")
    assert (d / "ug.tsv").read_text() == (d / "bg.tsv").read_text()
    assert stats["reads_in"] == stats["grouped"] + stats["singles"] + sum(stats["dropped"].values())
    if data == "pe":
        assert stats["singles"] > 0  # read 2s (and the "output" reads) go out without a group


def test_group_unpaired_output_written_once(paired_end, umi_tools, tmp_path):
    """--unpaired-reads=output: umi_tools writes such a read without a group and then,
    going on, once more in a group (its get_bundles yields it and does not stop);
    bamflow writes it once, without a group, and groups the other reads as
    umi_tools does when it discards unpaired reads."""
    umi_tools("group", "-I", paired_end["bam"], "-S", tmp_path / "ug.bam", "--output-bam", *TAG_UMIS, "--per-cell",
              "--paired", "--unpaired-reads=discard")
    stats = group(paired_end["bam"], tmp_path / "bg.bam", cell_tag_split="-", paired=True, unpaired_reads="output",
                  timeout=60)
    theirs, ours = sam_lines(tmp_path / "ug.bam"), sam_lines(tmp_path / "bg.bam")

    def grouped(lines):
        return [line for line in lines if "\tUG:i:" in line]

    assert grouped(ours) == grouped(theirs)
    unpaired = Counter(r.to_string() for r in paired_end["reads"] if not r.is_paired and not r.is_unmapped)
    read2s = Counter(line for line in theirs if "\tUG:i:" not in line)
    assert Counter(line for line in ours if "\tUG:i:" not in line) == unpaired + read2s
    assert stats["singles"] == sum(unpaired.values()) + sum(read2s.values())
    assert stats["reads_in"] == stats["grouped"] + stats["singles"] + sum(stats["dropped"].values())


def test_group_table_only(single_end, umi_tools, tmp_path):
    umi_tools("group", "-I", single_end["bam"], f"--group-out={tmp_path / 'ug.tsv'}", *TAG_UMIS, "--per-cell")
    stats = group(single_end["bam"], group_out=tmp_path / "bg.tsv", cell_tag_split="-", timeout=60)
    assert (tmp_path / "ug.tsv").read_text() == (tmp_path / "bg.tsv").read_text()
    assert stats["written"] == 0 and stats["table_rows"] == stats["grouped"]


# -- count -----------------------------------------------------------------------------------------


def _table(path):
    with open(path) as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.mark.parametrize("method", ["unique", "percentile", "cluster", "adjacency", "directional"])
def test_count_per_cell_equals_umi_tools(single_end, umi_tools, method):
    """A gene with (secondary) alignments on two references: umi_tools' table keeps the
    last reference's count, and so does bamflow's (stats["overwritten"])."""
    d = single_end["dir"]
    umi_tools("count", "-I", single_end["bam"], "-S", d / "uc.tsv", *TAG_UMIS, "--per-cell", "--per-gene",
              "--gene-tag=GX", f"--method={method}")
    out = d / f"bc_{method}"
    stats = count(single_end["bam"], out, cell_tag_split="-", method=method, formats=("tsv",), timeout=60)
    assert (out / "counts.tsv").read_text() == (d / "uc.tsv").read_text()
    assert stats["reads_in"] == stats["counted"] + sum(stats["dropped"].values())
    assert stats["overwritten"] > 0
    assert stats["molecules"] == sum(int(row[2]) for row in _table(out / "counts.tsv")[1:])


COUNT_OPTIONS = [
    (["--per-gene", "--gene-tag=GX"], dict(per_cell=False, formats=("tsv",))),
    (["--per-cell", "--per-gene", "--gene-tag=GX", "--wide-format-cell-counts"], dict(wide_format_cell_counts=True)),
    (["--per-cell", "--per-gene", "--per-contig"], dict(per_contig=True)),
    (["--per-cell", "--per-gene", "--gene-tag=GX", "--assigned-status-tag=XS", "--skip-tags-regex=^Unassigned",
      "--mapping-quality=2", "--edit-distance-threshold=2"],
     dict(assigned_status_tag="XS", skip_tags_regex="^Unassigned", mapping_quality=2, edit_distance_threshold=2)),
    (["--per-cell", "--per-gene", "--gene-tag=GX", "--subset=0.5", "--random-seed=7"], dict(subset=0.5, random_seed=7)),
]


@pytest.mark.parametrize("theirs, ours", COUNT_OPTIONS, ids=[" ".join(t) for t, _ in COUNT_OPTIONS])
def test_count_options_equal_umi_tools(single_end, umi_tools, theirs, ours, tmp_path):
    umi_tools("count", "-I", single_end["bam"], "-S", tmp_path / "uc.tsv", *TAG_UMIS, *theirs)
    opts = {"formats": ("tsv",), **ours}
    stats = count(single_end["bam"], tmp_path / "bc", cell_tag_split="-", timeout=60, **opts)
    assert (tmp_path / "bc" / "counts.tsv").read_text() == (tmp_path / "uc.tsv").read_text()
    assert stats["reads_in"] == stats["counted"] + sum(stats["dropped"].values())


def test_count_paired_end_and_read_names(paired_end, umi_tools, tmp_path):
    """Paired-end input (read 2s are not counted) and UMIs in read names."""
    umi_tools("count", "-I", paired_end["bam"], "-S", tmp_path / "uc.tsv", *TAG_UMIS, "--per-cell", "--per-gene",
              "--gene-tag=GX", "--paired")
    count(paired_end["bam"], tmp_path / "bc", cell_tag_split="-", paired=True, formats=("tsv",), timeout=60)
    assert (tmp_path / "bc" / "counts.tsv").read_text() == (tmp_path / "uc.tsv").read_text()
    src = _renamed(paired_end, "pe_rid.bam", lambda r: f"{r.query_name}_{_cell(r)}_{r.get_tag('UB')}",
                   lambda r: r.has_tag("UB") and r.has_tag("CB"))
    umi_tools("count", "-I", src, "-S", tmp_path / "uc2.tsv", "--extract-umi-method=read_id", "--per-cell", "--per-gene",
              "--gene-tag=GX")
    count(src, tmp_path / "bc2", extract_umi_method="read_id", formats=("tsv",), timeout=60)
    assert (tmp_path / "bc2" / "counts.tsv").read_text() == (tmp_path / "uc2.tsv").read_text()


def test_count_mtx_h5ad_and_cells(single_end, tmp_path):
    """The matrix holds the table's numbers; --cells takes a list, a file or qc's per_cell.tsv."""
    import anndata
    import scipy.io

    out = tmp_path / "all"
    stats = count(single_end["bam"], out, workers=3, timeout=60)
    tsv = {(g, c): int(n) for g, c, n in _table(out / "counts.tsv")[1:]}
    m = scipy.io.mmread(str(out / "matrix.mtx.gz")).tocsc()
    with gzip.open(out / "barcodes.tsv.gz", "rt") as f:
        barcodes = f.read().split()
    with gzip.open(out / "features.tsv.gz", "rt") as f:
        features = [line.rstrip("\n").split("\t") for line in f]
    assert barcodes == sorted(CELLS) and m.shape == (len(features), len(barcodes)) == (stats["genes"], stats["cells"])
    assert m.sum() == sum(tsv.values()) == stats["molecules"]
    genes = [f[0] for f in features]
    for (gene, cell), n in tsv.items():
        assert m[genes.index(gene), barcodes.index(cell)] == n
    assert all(f[2] == "Gene Expression" and f[1] == "GENE" + str(int(f[0][4:])) for f in features)
    a = anndata.read_h5ad(out / "counts.h5ad")
    assert list(a.obs_names) == barcodes and (a.X.toarray() == m.T.toarray()).all()
    # --cells: qc's per_cell.tsv (header skipped, called cells only), a plain list, a Python list
    per_cell = tmp_path / "per_cell.tsv"
    per_cell.write_text("barcode\treads\tis_cell\n" + f"{CELLS[1]}\t90\t1\n{CELLS[2]}\t80\t0\nTTTTTTTTTTTT-1\t1\t1\n")
    listed = tmp_path / "cells.txt.gz"
    with gzip.open(listed, "wt") as f:
        f.write(f"{CELLS[1]}\nTTTTTTTTTTTT-1\n")
    for cells in (per_cell, listed, [CELLS[1], "TTTTTTTTTTTT-1"]):
        s = count(single_end["bam"], tmp_path / "sel", cells=cells, formats=("mtx",), force=True, timeout=60)
        with gzip.open(tmp_path / "sel" / "barcodes.tsv.gz", "rt") as f:
            assert f.read().split() == [CELLS[1], "TTTTTTTTTTTT-1"]  # a listed cell without reads: a zero column
        sel = scipy.io.mmread(str(tmp_path / "sel" / "matrix.mtx.gz"))
        assert sel.shape == (stats["genes"], 2) and sel.sum() == sum(n for (g, c), n in tsv.items() if c == CELLS[1])
        assert s["cells"] == 2 and s["cells_seen"] == len(CELLS)
    totals = Counter()
    for (_, cell), n in tsv.items():
        totals[cell] += n
    threshold = sorted(totals.values())[2]
    s = count(single_end["bam"], tmp_path / "min", min_umis=threshold, formats=("tsv",), timeout=60)
    assert s["cells"] == sum(t >= threshold for t in totals.values())


# -- count_tab --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_cell", [False, True])
def test_count_tab_equals_umi_tools(single_end, umi_tools, tmp_path, per_cell):
    """read_id<TAB>gene lines (as featureCounts -R CORE gives, cut), genes in runs."""
    lines = []
    for r in single_end["reads"]:
        if r.has_tag("UB") and r.has_tag("GX") and r.has_tag("CB") and not r.is_unmapped:
            rid = f"{r.query_name}_{_cell(r)}_{r.get_tag('UB')}" if per_cell else f"{r.query_name}_{r.get_tag('UB')}"
            lines.append((r.get_tag("GX"), rid))
    lines.sort(key=lambda x: x[0])
    src = tmp_path / "assigned.tsv"
    src.write_text("".join(f"{rid}\t{gene}\n" for gene, rid in lines))
    extra = ["--per-cell"] if per_cell else []
    umi_tools("count_tab", "-I", src, "-S", tmp_path / "ut.tsv", *extra)
    stats = count_tab(src, tmp_path / "bf.tsv", per_cell=per_cell)
    assert (tmp_path / "bf.tsv").read_text() == (tmp_path / "ut.tsv").read_text()
    assert stats["reads_in"] == len(lines)
    with gzip.open(tmp_path / "assigned.tsv.gz", "wt") as f:  # gzip in, gzip out
        f.write(src.read_text())
    count_tab(tmp_path / "assigned.tsv.gz", tmp_path / "bf.tsv.gz", per_cell=per_cell)
    with gzip.open(tmp_path / "bf.tsv.gz", "rt") as f:
        assert f.read() == (tmp_path / "ut.tsv").read_text()


def test_outputs_are_coordinate_sorted_and_complete(single_end, tmp_path):
    """The written BAM is valid (pysam reads it, indexes it) and sorted."""
    dedup(single_end["bam"], tmp_path / "x.bam", timeout=60)
    pysam.index(str(tmp_path / "x.bam"))
    with pysam.AlignmentFile(str(tmp_path / "x.bam")) as f:
        pos = [(r.reference_id, r.reference_start) for r in f]
    assert pos == sorted(pos) and len(pos) > 0
    assert os.path.getsize(tmp_path / "x.bam") > 0
