"""Tests of bamflow.simulate: the properties are checked on the written file
(read back with pysam), not taken from the summary the simulator returns."""

import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter, defaultdict

import pysam
import pytest

from bamflow.simulate import REFERENCES, SimulationSummary, main, simulate_bam

N_READS = 20_000
SMALL = dict(n_reads=N_READS, n_barcodes=400, n_cells=80)  # 2M/20k/4.4k scaled by 1/100 (cells: ~1/55)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hamming(a, b):
    assert len(a) == len(b)
    return sum(x != y for x, y in zip(a, b, strict=True))


def read_all(path):
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return f.header.to_dict(), list(f)


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "coord.bam"
    summary = simulate_bam(str(path), seed=7, sort="coordinate", **SMALL)
    header, records = read_all(path)
    return path, summary, header, records


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    paths = [tmp_path / f"{name}.bam" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4), strict=True):
        simulate_bam(str(path), seed=seed, n_reads=5_000, n_barcodes=100, n_cells=20)
    assert sha256(paths[0]) == sha256(paths[1])
    assert sha256(paths[0]) != sha256(paths[2])


@pytest.mark.skipif(shutil.which("samtools") is None, reason="samtools not installed")
def test_samtools_quickcheck_and_count(coord):
    path = coord[0]
    subprocess.run(["samtools", "quickcheck", "-v", str(path)], check=True)
    out = subprocess.run(["samtools", "view", "-c", str(path)], check=True, capture_output=True, text=True)
    assert int(out.stdout) == N_READS


def test_header_looks_like_cellranger(coord):
    _, _, header, _ = coord
    assert header["HD"]["VN"] == "1.6" and header["HD"]["SO"] == "coordinate"
    assert [(sq["SN"], sq["LN"]) for sq in header["SQ"]] == list(REFERENCES)
    assert len(header["SQ"]) == 25 and header["SQ"][0]["SN"] == "chr1" and header["SQ"][-1]["SN"] == "chrM"
    (rg,) = header["RG"]
    assert {"ID", "SM", "PL", "LB"} <= set(rg)
    (pg,) = header["PG"]
    assert pg["ID"] == "cellranger" and pg["PN"] == "cellranger" and str(pg["VN"]).startswith("7.")
    assert pg["CL"].startswith("cellranger count")
    assert header["CO"]


def test_coordinate_sorted_and_every_record_valid(coord):
    _, summary, header, records = coord
    assert len(records) == N_READS == summary.n_records
    keys = [(r.reference_id, r.reference_start) for r in records]
    assert keys == sorted(keys)
    lengths = dict(REFERENCES)
    rg_id = header["RG"][0]["ID"]
    for r in records:
        assert not r.is_unmapped and r.reference_end <= lengths[r.reference_name]
        assert r.flag in (0, 16, 256, 272)
        assert r.query_length == 90 and len(r.query_sequence) == 90 and set(r.query_sequence) <= set("ACGT")
        assert len(r.query_qualities) == 90
        assert r.get_tag("RG") == rg_id
        assert r.mapping_quality == (255 if r.get_tag("NH") == 1 else 3)


def test_tags_and_their_types(coord):
    _, _, _, records = coord
    always = {"NH": "C", "HI": "C", "AS": "C", "nM": "C", "RE": "A", "xf": "C", "CR": "Z", "CY": "Z", "UR": "Z", "UY": "Z",
              "RG": "Z"}
    seen = Counter()
    for r in records:
        tags = {t: typ for t, _, typ in r.get_tags(with_value_type=True)}
        for t, typ in always.items():
            # pysam reports the smallest integer type that holds the value; "i" in SAM
            assert t in tags and (tags[t] == typ or (typ == "C" and tags[t] in "cCsSiI")), (t, tags)
        seen.update(tags.keys())
        assert len(r.get_tag("CR")) == 16 and len(r.get_tag("CY")) == 16
        assert len(r.get_tag("UR")) == 12 and len(r.get_tag("UY")) == 12
        if r.has_tag("CB"):
            cb = r.get_tag("CB")
            assert len(cb) == 18 and cb.endswith("-1") and set(cb[:16]) <= set("ACGT")
            assert hamming(r.get_tag("CR"), cb[:16]) <= 1
        if r.has_tag("UB"):
            assert len(r.get_tag("UB")) == 12 and hamming(r.get_tag("UR"), r.get_tag("UB")) <= 1
        else:
            assert "N" in r.get_tag("UR")
        if r.has_tag("GX"):
            assert r.has_tag("GN") and r.get_tag("GX").startswith("ENSG") and r.get_tag("RE") == "E"
        else:
            assert not r.has_tag("GN") and not r.has_tag("TX") and r.get_tag("RE") in "NI"
        if r.has_tag("TX"):
            tx, pos, cigar = r.get_tag("TX").split(",")
            assert tx.startswith("ENST") and pos[0] in "+-" and cigar == r.cigarstring
        if r.get_tag("xf") != 0:
            assert r.has_tag("GX") and r.has_tag("CB") and r.has_tag("UB") and r.get_tag("xf") in (17, 25)
    for optional in ("CB", "UB", "GX", "GN", "TX"):
        assert 0 < seen[optional] < len(records), optional


def test_realised_fractions_near_requested(coord):
    _, summary, _, records = coord
    n = len(records)
    no_cb = sum(not r.has_tag("CB") for r in records)
    no_ub = sum(not r.has_tag("UB") for r in records)
    no_gene = sum(not r.has_tag("GX") for r in records)
    umi_err = sum(r.has_tag("UB") and r.get_tag("UR") != r.get_tag("UB") for r in records)
    secondary = sum(r.is_secondary for r in records)
    assert abs(no_cb / n - 0.08) < 0.005
    assert abs(no_ub / n - 0.02) < 0.006
    assert abs(no_gene / n - 0.25) < 0.03
    assert abs(umi_err / n - 0.03) < 0.008
    assert abs(secondary / n - 0.02) < 0.006
    # the summary reports what is in the file
    assert (summary.n_no_cb, summary.n_no_ub, summary.n_no_gene, summary.n_umi_error, summary.n_secondary) == (
        no_cb, no_ub, no_gene, umi_err, secondary)


def test_cigars_mostly_plain_some_spliced_some_clipped(coord):
    _, _, _, records = coord
    cigars = Counter("N" if "N" in r.cigarstring else "S" if "S" in r.cigarstring else r.cigarstring for r in records)
    n = len(records)
    assert cigars["90M"] / n > 0.75
    assert 0.06 < cigars["N"] / n < 0.14
    assert 0.03 < cigars["S"] / n < 0.08
    assert set(cigars) == {"90M", "N", "S"}


def test_cells_and_ambient_barcodes(coord):
    _, summary, _, records = coord
    per_cb = Counter(r.get_tag("CB") for r in records if r.has_tag("CB"))
    assert len(per_cb) == SMALL["n_barcodes"]
    cells = [c for c in per_cb.values() if c >= 100]
    assert len(cells) == SMALL["n_cells"] == summary.n_cells
    ambient = [c for c in per_cb.values() if c < 100]
    assert min(ambient) >= 1 and max(ambient) <= 20
    assert max(cells) > 3 * sorted(cells)[len(cells) // 2]  # heavy tail above the median cell


def test_pcr_duplicates_share_position_strand_and_sequence(coord):
    _, summary, _, records = coord
    molecules = defaultdict(list)
    for r in records:
        if not r.is_secondary and r.has_tag("CB") and r.has_tag("UB"):
            molecules[(r.get_tag("CB"), r.get_tag("UB"), r.reference_id, r.reference_start)].append(r)
    sizes = Counter(len(v) for v in molecules.values())
    assert sizes[1] > 0 and sum(c for s, c in sizes.items() if s >= 3) > 100
    for reads in molecules.values():
        assert len({(r.is_reverse, r.cigarstring, r.query_sequence, r.get_tag("GX") if r.has_tag("GX") else None)
                    for r in reads}) == 1
    assert 0.4 < summary.frac_duplicates < 0.7


def test_secondary_records_have_a_primary(coord):
    _, _, _, records = coord
    primaries = {r.query_name: r for r in records if not r.is_secondary}
    secondaries = [r for r in records if r.is_secondary]
    assert secondaries
    for s in secondaries:
        p = primaries[s.query_name]
        assert (p.get_tag("NH"), p.get_tag("HI"), s.get_tag("NH"), s.get_tag("HI")) == (2, 1, 2, 2)
        assert s.query_sequence == p.query_sequence and s.get_tag("UR") == p.get_tag("UR")
    assert len(primaries) == len(records) - len(secondaries)  # read names are unique among primaries


def test_other_sort_orders_hold_the_same_records(tmp_path, coord):
    def lines(path):
        with pysam.AlignmentFile(str(path)) as f:
            return f.header.to_dict()["HD"]["SO"], [r.to_string() for r in f]

    so_coord, by_coord = lines(coord[0])
    simulate_bam(str(tmp_path / "cb.bam"), seed=7, sort="CB", **SMALL)
    simulate_bam(str(tmp_path / "un.bam"), seed=7, sort="unsorted", **SMALL)
    so_cb, by_cb = lines(tmp_path / "cb.bam")
    so_un, unsorted = lines(tmp_path / "un.bam")
    assert so_coord == "coordinate" and so_cb == "unsorted" and so_un == "unsorted"
    assert sorted(by_cb) == sorted(unsorted) == sorted(by_coord)
    assert unsorted != by_coord and by_cb != by_coord

    with pysam.AlignmentFile(str(tmp_path / "cb.bam")) as f:
        cbs = [r.get_tag("CB") if r.has_tag("CB") else None for r in f]
    n_with = sum(cb is not None for cb in cbs)
    assert all(cb is None for cb in cbs[n_with:])  # reads without CB at the end
    assert cbs[:n_with] == sorted(cbs[:n_with])

    with pysam.AlignmentFile(str(tmp_path / "un.bam")) as f:
        keys = [(r.reference_id, r.reference_start) for r in f]
    assert keys != sorted(keys)


def test_mark_duplicates_level_and_formats(tmp_path):
    small = dict(n_reads=3_000, n_barcodes=50, n_cells=10, seed=2)
    plain = simulate_bam(str(tmp_path / "p.bam"), **small)
    marked = simulate_bam(str(tmp_path / "d.bam"), mark_duplicates=True, **small)
    with pysam.AlignmentFile(str(tmp_path / "p.bam")) as f:
        assert not any(r.is_duplicate for r in f)
    with pysam.AlignmentFile(str(tmp_path / "d.bam")) as f:
        assert sum(r.is_duplicate for r in f) == marked.n_duplicates == plain.n_duplicates > 0
    sizes = {}
    for level in (0, 1, 9):
        s = simulate_bam(str(tmp_path / f"l{level}.bam"), level=level, **small)
        sizes[level] = s.file_size
    assert sizes[0] > sizes[1] > sizes[9]
    u = simulate_bam(str(tmp_path / "u.bam"), format="ubam", **small)
    assert u.file_size > sizes[1]
    sam = simulate_bam(str(tmp_path / "x.sam"), **small)
    assert sam.format == "sam"
    with open(tmp_path / "x.sam") as f:
        text = f.read()
    assert text.startswith("@HD\tVN:1.6\tSO:coordinate")
    assert text.count("\n") == 3_000 + 1 + 25 + 1 + 1 + 3  # records, HD, SQ, RG, PG, 3 CO
    with pysam.AlignmentFile(str(tmp_path / "x.sam")) as f, pysam.AlignmentFile(str(tmp_path / "p.bam")) as g:
        assert [r.to_string() for r in f] == [r.to_string() for r in g]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        simulate_bam(str(tmp_path / "a.bam"), n_reads=1_000, n_barcodes=400, n_cells=80)
    with pytest.raises(ValueError, match="sort"):
        simulate_bam(str(tmp_path / "a.bam"), sort="name", **SMALL)
    with pytest.raises(ValueError, match="level"):
        simulate_bam(str(tmp_path / "a.bam"), level=11, **SMALL)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.bam"
    assert main([str(out), "--reads", "4000", "--seed", "5", "--sort", "unsorted"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_records"] == 4000 and summary["sort"] == "unsorted" and summary["n_cells"] == 9  # 4400 * 4000/2M
    again = tmp_path / "again.bam"
    proc = subprocess.run([sys.executable, "-m", "bamflow.simulate", str(again), "--reads", "4000", "--seed", "5",
                           "--sort", "unsorted"], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["n_records"] == 4000
    assert sha256(out) == sha256(again)
    assert set(SimulationSummary.__dataclass_fields__) <= set(summary)
