"""The qc preset on small pysam-made BAMs whose per-cell numbers are computed
here independently (a plain pysam loop + umi_tools' own UMIClusterer)."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

import pysam
import pytest
from bamfiles import header

import bamflow as bf
from bamflow.presets import qc as qc_mod
from bamflow.presets.qc import TSV_COLUMNS, call_cells, knee, qc

umi_tools_network = pytest.importorskip("umi_tools.network")

ACGT = "ACGT"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUTS = {"per_cell.tsv", "cells.txt", "summary.json", "knee.svg", "knee.png", "report.html"}
MITO = {"ENSG00003", "ENSG00007"}  # named MT-… in the test BAM (every other gene GENE…)


def gene_name(gx):
    return f"MT-ND{gx[-1]}" if gx in MITO else f"GENE{gx[-2:]}"


# -- a small 10x-style BAM --------------------------------------------------------------------


def _mutate(umi, rng):
    i = rng.randrange(len(umi))
    return umi[:i] + rng.choice([b for b in ACGT if b != umi[i]]) + umi[i + 1 :]


def make_bam(path, seed=7):
    """Cells of very different sizes (molecules with 1–6 reads, some reads with a
    one-base UMI error so that clustering matters), background barcodes, and
    every kind of read qc must account for: no CB, secondary, supplementary,
    unmapped, no UB, no GX, featureCounts' placeholders."""
    rng = random.Random(seed)
    hdr = header()
    reads = []

    def add(cb, ub, gx, flag=0):
        r = pysam.AlignedSegment(hdr)
        r.query_name = f"r{len(reads)}"
        r.query_sequence = "".join(rng.choice(ACGT) for _ in range(30))
        r.query_qualities = pysam.qualitystring_to_array("I" * 30)
        if flag & 4:
            r.flag = flag
            r.reference_id = -1
            r.reference_start = -1
        else:
            r.flag = flag
            r.reference_id = 0
            r.reference_start = rng.randrange(100_000)
            r.cigarstring = "30M"
            r.mapping_quality = 255
        tags = []
        if cb is not None:
            tags.append(("CB", cb))
        if ub is not None:
            tags.append(("UB", ub))
        if gx is not None:
            tags.append(("GX", gx))
            if not gx.startswith("__"):
                tags.append(("GN", gene_name(gx)))
        r.set_tags(tags)
        reads.append(r)

    barcodes = ["".join(rng.choice(ACGT) for _ in range(16)) + "-1" for _ in range(40)]
    for i, cb in enumerate(barcodes):
        molecules = 60 - 4 * i if i < 12 else rng.randrange(1, 4)  # 12 "cells", 28 background barcodes
        for _ in range(molecules):
            gene = f"ENSG{rng.randrange(25):05d}"
            umi = "".join(rng.choice(ACGT) for _ in range(10))
            for _ in range(rng.randrange(1, 7)):
                add(cb, _mutate(umi, rng) if rng.random() < 0.1 else umi, gene)
        for _ in range(rng.randrange(0, 4)):
            add(cb, "".join(rng.choice(ACGT) for _ in range(10)), None)  # no gene
            add(cb, None, f"ENSG{rng.randrange(25):05d}")  # no UMI
            add(cb, "AAAAACCCCC", "__no_feature")  # a placeholder: no gene
            add(cb, "AAAAACCCCC", "ENSG00001", flag=4)  # unmapped (its gene tag does not count)
            add(cb, "AAAAACCCCC", "ENSG00001", flag=256)  # secondary
            add(cb, "AAAAACCCCC", "ENSG00001", flag=2048)  # supplementary
    for _ in range(50):
        add(None, "CCCCCAAAAA", "ENSG00002")  # no cell barcode
    add(None, None, None, flag=4)
    rng.shuffle(reads)
    with pysam.AlignmentFile(str(path), "wb", header=hdr) as f:
        for r in reads:
            f.write(r)
    return len(reads)


def expected(path, method):
    """Per cell and in total, from a straightforward pysam loop."""
    cells = defaultdict(Counter)
    umis = defaultdict(lambda: defaultdict(Counter))  # cell → gene → umi → reads
    dropped = Counter()
    totals = Counter()
    reads_in = counted = 0
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        for r in f:
            reads_in += 1
            cb = r.get_tag("CB") if r.has_tag("CB") else ""
            primary = not (r.flag & 0x900)
            ub = r.get_tag("UB") if r.has_tag("UB") else ""
            gx = r.get_tag("GX") if r.has_tag("GX") and not r.is_unmapped else ""
            if gx.startswith("__") or gx.startswith("Unassigned"):
                gx = ""
            if primary:
                totals["primary_reads"] += 1
                totals["mapped"] += not r.is_unmapped
                totals["with_gene"] += bool(gx)
                totals["no_umi"] += not ub
            if not cb:
                dropped["no_cell"] += 1
                continue
            if not primary:
                dropped["not_primary"] += 1
                continue
            c = cells[cb]
            c["reads"] += 1
            c["mapped_reads"] += not r.is_unmapped
            c["gene_reads"] += bool(gx)
            c["no_umi_reads"] += not ub
            if r.is_unmapped:
                dropped["unmapped"] += 1
            elif not ub:
                dropped["no_umi"] += 1
            elif not gx:
                dropped["no_gene"] += 1
            else:
                counted += 1
                c["counted_reads"] += 1
                umis[cb][gx][ub.encode()] += 1
    for cb, c in cells.items():
        clusterer = umi_tools_network.UMIClusterer(cluster_method=method)
        per_gene = {gx: len(clusterer(dict(u), threshold=1)) for gx, u in umis[cb].items()}
        c["umis"] = sum(per_gene.values())
        c["genes"] = sum(1 for m in per_gene.values() if m >= 1)
        c["distinct_umis"] = sum(len(u) for u in umis[cb].values())
        c["mito_umis"] = sum(m for gx, m in per_gene.items() if gx in MITO)
    reads_per_umi = Counter(n for genes in umis.values() for u in genes.values() for n in u.values())
    return {"reads_in": reads_in, "counted": counted, "dropped": dropped, "cells": cells, "totals": totals,
            "reads_per_umi": reads_per_umi}


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def bam(tmp_path_factory):
    path = tmp_path_factory.mktemp("qc") / "in.bam"
    make_bam(path)
    return path


@pytest.fixture(scope="module")
def run(bam, tmp_path_factory):
    """One directional run shared by the tests that only look at its outputs."""
    out = tmp_path_factory.mktemp("qc_out") / "out"
    return out, qc(bam, out, workers=2, threads=1)


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["directional", "unique"])
def test_per_cell_values_match_an_independent_count(bam, tmp_path, method):
    out = tmp_path / "out"
    summary = qc(bam, out, method=method, workers=3, threads=1)
    exp = expected(bam, method)
    rows = read_tsv(out / "per_cell.tsv")
    assert list(rows[0].keys()) == list(TSV_COLUMNS)
    assert {r["barcode"] for r in rows} == set(exp["cells"])
    for r in rows:
        e = exp["cells"][r["barcode"]]
        for col in ("reads", "umis", "genes", "counted_reads", "distinct_umis", "mapped_reads", "gene_reads", "no_umi_reads",
                    "mito_umis"):
            assert int(r[col]) == e[col], (r["barcode"], col)
        if e["umis"]:
            assert float(r["fraction_mito"]) == pytest.approx(e["mito_umis"] / e["umis"], abs=1e-5)
        if e["counted_reads"]:
            assert float(r["duplication_rate"]) == pytest.approx(1 - e["umis"] / e["counted_reads"], abs=1e-5)
            assert float(r["saturation"]) == pytest.approx(1 - e["distinct_umis"] / e["counted_reads"], abs=1e-5)
        else:
            assert r["duplication_rate"] == "NA"
        assert float(r["fraction_mapped"]) == pytest.approx(e["mapped_reads"] / e["reads"], abs=1e-5)
        assert float(r["fraction_with_gene"]) == pytest.approx(e["gene_reads"] / e["reads"], abs=1e-5)
        assert float(r["fraction_no_umi"]) == pytest.approx(e["no_umi_reads"] / e["reads"], abs=1e-5)
    # sorted by UMIs (then reads) decreasing
    keys = [(-int(r["umis"]), -int(r["reads"]), r["barcode"]) for r in rows]
    assert keys == sorted(keys)
    if method == "directional":  # the UMI errors were merged: fewer molecules than distinct UMIs
        assert sum(int(r["umis"]) for r in rows) < sum(int(r["distinct_umis"]) for r in rows)
    assert summary["umis"] == sum(e["umis"] for e in exp["cells"].values())


def test_summary_totals_and_books(run, bam):
    out, summary = run
    exp = expected(bam, "directional")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k != "per_worker"}
    assert summary["reads_in"] == exp["reads_in"]
    assert summary["counted"] == exp["counted"]
    assert {k: v for k, v in summary["dropped"].items() if v} == dict(exp["dropped"])
    assert set(exp["dropped"]) == {"no_cell", "not_primary", "unmapped", "no_umi", "no_gene"}  # the BAM has them all
    assert summary["reads_in"] == summary["counted"] + sum(summary["dropped"].values())
    assert summary["reads_with_cell"] == sum(c["reads"] for c in exp["cells"].values())
    for key in ("primary_reads", "mapped", "with_gene", "no_umi"):
        assert summary["totals"][key] == exp["totals"][key], key
    assert summary["totals"]["fraction_no_umi"] == pytest.approx(exp["totals"]["no_umi"] / exp["totals"]["primary_reads"])
    total_umis = sum(c["umis"] for c in exp["cells"].values())
    assert summary["duplication_rate"] == pytest.approx(1 - total_umis / exp["counted"])
    assert summary["barcodes"] == len(exp["cells"])
    # the automatic call finds the 12 big cells (≥ 16 molecules) and not the background (≤ 3)
    assert summary["cell_call"]["rule"] == "knee"
    assert summary["cells"] == 12
    called = [c for c in exp["cells"].values() if c["umis"] >= summary["cell_call"]["threshold_umis"]]
    assert summary["median_umis_per_cell"] == statistics.median(c["umis"] for c in called)
    assert summary["median_genes_per_cell"] == statistics.median(c["genes"] for c in called)
    rows = read_tsv(out / "per_cell.tsv")
    assert sum(int(r["is_cell"]) for r in rows) == 12
    assert all(r["is_cell"] == "1" for r in rows[:12])


def test_min_umis_decides_the_cells(bam, tmp_path):
    exp = expected(bam, "directional")
    threshold = sorted((c["umis"] for c in exp["cells"].values()), reverse=True)[4]  # the 5th largest
    summary = qc(bam, tmp_path / "o", min_umis=threshold, workers=1, threads=1)
    want = {cb for cb, c in exp["cells"].items() if c["umis"] >= threshold}
    rows = read_tsv(tmp_path / "o" / "per_cell.tsv")
    assert {r["barcode"] for r in rows if r["is_cell"] == "1"} == want
    assert summary["cells"] == len(want) >= 5
    assert summary["cell_call"] == {"rule": "min_umis", "threshold_umis": threshold, "knee_rank": None, "cells": len(want)}
    assert summary["umis_in_cells"] == sum(exp["cells"][cb]["umis"] for cb in want)


def test_knee_finds_the_cliff():
    rng = random.Random(1)
    cells = [int(rng.lognormvariate(8, 0.6)) for _ in range(3000)]
    background = [max(1, int(rng.lognormvariate(1, 0.8))) for _ in range(50_000)]
    umis = sorted(cells + background, reverse=True)
    assert abs(knee(umis) - 3000) <= 30
    umis_outlier = sorted(cells + background + [10**7], reverse=True)  # a huge top barcode does not move it
    assert abs(knee(umis_outlier) - 3001) <= 30
    assert knee([1000] * 100 + [5] * 1000) == 100
    assert knee([3, 1]) == 2 and knee([]) == 0
    call = call_cells([1000] * 100 + [5] * 1000 + [0] * 10, None)
    assert call == {"rule": "knee", "threshold_umis": 1000, "knee_rank": 100, "cells": 100}


# -- plots and report -----------------------------------------------------------------------


def test_plots_are_valid(run):
    out, summary = run
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == OUTPUTS  # (and the folder's claim)
    data = (out / "knee.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    assert summary["plots"]["knee.png"] is True
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        with Image.open(out / "knee.png") as im:
            im.verify()
        with Image.open(out / "knee.png") as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    svg = ET.parse(out / "knee.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    polyline = svg.find("{http://www.w3.org/2000/svg}polyline")
    points = polyline.get("points").split()
    assert len(points) >= 2
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys)  # UMIs fall with rank: SVG y grows downwards


def test_report_is_self_contained(run):
    out, summary = run
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<svg" in text and "<polyline" in text  # the plots, inline
    # works offline: no URL, no file or stylesheet it would fetch; scripts only inline
    assert re.search(r"http://|https://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I) is None
    assert re.search(r"\b(src|href)\s*=|@import|url\(|<link", text, re.I) is None
    assert all(tag in ("<script>", '<script type="application/json" id="qc-data">')
               for tag in re.findall(r"<script[^>]*>", text))
    rows = read_tsv(out / "per_cell.tsv")
    for r in rows[:12]:  # the top cells, in the table
        assert f">{r['barcode']}</td>" in text
    assert f"{summary['reads_in']:,}" in text and f"<td>{summary['reads_in']}</td>" not in text  # formatted
    for label in ("Estimated number of cells", "Mean reads per cell", "Median genes per cell", "Median UMIs per cell",
                  "Sequencing saturation", "Fraction reads in cells", "Median mitochondrial UMIs"):
        assert f'<div class="label">{label}</div>' in text
    assert f'<div class="value">{summary["cells"]:,}</div>' in text
    assert f'<div class="value">{100 * summary["saturation"]:.1f}%</div>' in text
    for panel in ("rank", "umis-per-cell", "genes-per-cell", "saturation", "mito", "barcodes"):
        assert f'id="{panel}"' in text
    assert "Few cells" in text  # 12 cells: a warning, as in summary.json
    assert [w["title"] for w in summary["warnings"]][0] == "Few cells"


def test_the_barcode_data_cannot_break_out_of_the_page(tmp_path):
    """A barcode is data from the BAM: in the table and the script's JSON it stays text."""
    summary = {"input": "x.bam", "method": "unique", "cells": 1, "cell_call": {"rule": "min_umis", "threshold_umis": 1,
               "knee_rank": None, "cells": 1}, "warnings": [], "mito": None, "saturation": 0.5, "reads_in": 3,
               "reads_with_cell": 3, "counted": 2, "dropped": {}, "barcodes": 1, "umis": 1, "umis_in_cells": 1,
               "fraction_counted_reads_in_cells": 1.0, "median_umis_per_cell": 1, "median_genes_per_cell": 1,
               "mean_reads_per_cell": 3, "duplication_rate": 0.5,
               "totals": {"primary_reads": 3, "fraction_mapped": 1.0, "fraction_with_gene": 1.0, "fraction_no_umi": 0.0}}
    evil = "</script><img src=x onerror=alert(1)>"
    rows = qc_mod.cell_rows({evil: {"reads": 3, "umis": 1, "genes": 1, "counted": 2, "distinct_umis": 1, "mapped": 3,
                                    "with_gene": 3, "no_umi": 0, "mito_umis": 0}}, 1)
    text = qc_mod.report_html(summary, rows)
    assert evil not in text and "&lt;/script&gt;&lt;img" in text
    assert text.count("</script>") == 2


def test_saturation_curve_is_the_expectation_of_subsampling(run, bam):
    """saturation_curve's formula against subsampling the counted reads for real."""
    out, summary = run
    exp = expected(bam, "directional")
    curve = summary["saturation_curve"]
    assert len(curve) == qc_mod.SATURATION_POINTS and curve[-1]["fraction_of_reads"] == 1.0
    assert curve[-1]["saturation"] == pytest.approx(summary["saturation"])
    assert curve[-1]["mean_reads_per_cell"] == pytest.approx(summary["mean_reads_per_cell"])
    assert [c["saturation"] for c in curve] == sorted(c["saturation"] for c in curve)  # more reads, more saturated
    reads = [k for k, n in exp["reads_per_umi"].items() for _ in range(n)]  # reads per distinct (cell, gene, UMI)
    rng = random.Random(5)
    half = next(c for c in curve if c["fraction_of_reads"] == 0.5)
    draws = []
    for _ in range(300):
        seen = [sum(rng.random() < 0.5 for _ in range(k)) for k in reads]
        draws.append(1 - sum(1 for s in seen if s) / sum(seen))
    assert statistics.mean(draws) == pytest.approx(half["saturation"], abs=0.01)


def test_mitochondrial_fraction_and_cells_file(run, bam):
    out, summary = run
    exp = expected(bam, "directional")
    called = [r for r in read_tsv(out / "per_cell.tsv") if r["is_cell"] == "1"]
    assert (out / "cells.txt").read_text().split() == [r["barcode"] for r in called]
    mito = summary["mito"]
    assert mito["gene_name_tag"] == "GN" and mito["mito_genes"] == len(MITO)
    fractions = [exp["cells"][r["barcode"]]["mito_umis"] / exp["cells"][r["barcode"]]["umis"] for r in called]
    assert mito["median_fraction_per_cell"] == pytest.approx(statistics.median(fractions))
    assert mito["fraction_umis_in_cells"] == pytest.approx(
        sum(exp["cells"][r["barcode"]]["mito_umis"] for r in called) / sum(int(r["umis"]) for r in called))


def test_without_gene_names_there_is_no_mitochondrial_fraction(bam, tmp_path):
    summary = qc(bam, tmp_path / "o", gene_name_tag="XX", workers=1, threads=1)  # a tag no read has
    assert summary["mito"] is None
    rows = read_tsv(tmp_path / "o" / "per_cell.tsv")
    assert {r["fraction_mito"] for r in rows} == {"NA"}
    text = (tmp_path / "o" / "report.html").read_text()
    assert "Median mitochondrial UMIs" not in text and "no read has a gene name" in text


def test_warnings():
    base = {"cells": 5000, "fraction_counted_reads_in_cells": 0.9, "reads_with_cell": 90,
            "totals": {"primary_reads": 100}, "mito": {"median_fraction_per_cell": 0.05}}
    assert qc_mod._warnings(base) == []
    bad = dict(base, cells=40, fraction_counted_reads_in_cells=0.5, reads_with_cell=50,
               mito={"median_fraction_per_cell": 0.3})
    titles = [w["title"] for w in qc_mod._warnings(bad)]
    assert titles == ["Few cells", "Low fraction of reads in cells", "Few reads with a cell barcode",
                      "High mitochondrial fraction"]


def test_without_matplotlib_png_is_skipped(bam, tmp_path, monkeypatch):
    # make "from matplotlib… import …" fail in this (the writing) process
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    summary = qc(bam, tmp_path / "o", workers=1, threads=1)
    names = {p.name for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")}
    assert names == OUTPUTS - {"knee.png"}
    assert summary["plots"]["knee.png"] is False and "knee.png" not in summary["outputs"]
    assert "<svg" in (tmp_path / "o" / "report.html").read_text()


# -- failures leave nothing -----------------------------------------------------------------


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def test_out_dir_under_a_regular_file(bam, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = _all_files(tmp_path)
    with pytest.raises(bf.WorkflowError, match="not a folder"):
        qc(bam, blocker / "out", workers=1, threads=1)
    with pytest.raises(bf.WorkflowError, match="not a folder"):
        qc(bam, blocker, workers=1, threads=1)
    assert _all_files(tmp_path) == before and blocker.read_text() == "x"


def test_missing_input_makes_no_folder(tmp_path):
    with pytest.raises(bf.WorkflowError):
        qc(tmp_path / "missing.bam", tmp_path / "a" / "b", workers=1, threads=1)
    assert _all_files(tmp_path) == []


def test_failure_while_writing_leaves_nothing(bam, tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    qc(bam, existing, workers=1, threads=1)
    earlier = {name: (existing / name).read_bytes() for name in os.listdir(existing)}

    def broken(*args, **kwargs):
        raise OSError("disk full")  # after per_cell.tsv and the knee plots were written

    monkeypatch.setattr(qc_mod, "report_html", broken)
    with pytest.raises(OSError, match="disk full"):
        qc(bam, tmp_path / "new" / "out", workers=1, threads=1)
    assert [f for f in _all_files(tmp_path) if not f.startswith("existing")] == []  # the folders it made are gone too
    with pytest.raises(OSError, match="disk full"):
        qc(bam, existing, workers=1, threads=1, force=True)
    assert {name: (existing / name).read_bytes() for name in os.listdir(existing)} == earlier  # the earlier run's, whole


def test_books_that_do_not_add_up_raise(bam, tmp_path, monkeypatch):
    real = qc_mod.gather

    def lossy(w, jobs):
        reads_in, merged, per_worker = real(w, jobs)
        return reads_in + 1, merged, per_worker  # one read more came in than was accounted for

    monkeypatch.setattr(qc_mod, "gather", lossy)
    with pytest.raises(bf.WorkflowError, match="do not add up"):
        qc(bam, tmp_path / "o", workers=1, threads=1)
    assert _all_files(tmp_path) == []


def test_bad_arguments(bam, tmp_path):
    with pytest.raises(ValueError, match="method"):
        qc(bam, tmp_path / "o", method="nope")
    with pytest.raises(ValueError, match="min_umis"):
        qc(bam, tmp_path / "o", min_umis=-1)
    assert _all_files(tmp_path) == []
