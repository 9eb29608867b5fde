"""Presets tag (FASTQ → unaligned BAM), correct (cell barcodes) and histogram
(reads per tag value), each checked against an independent computation."""

from __future__ import annotations

import gzip
import io
import random
import sys

import pysam
import pytest

import bamflow
from bamflow.presets.correct import correct, load_whitelist
from bamflow.presets.histogram import histogram
from bamflow.presets.tag import LAYOUTS, parse_layout, tag

# -- tag ---------------------------------------------------------------------------------

EXPECTED_SLICES = {  # written out by hand from the published layouts, not from LAYOUTS
    "10x-v2": ([(0, 16)], [(16, 26)]),
    "10x-v3": ([(0, 16)], [(16, 28)]),
    "dropseq": ([(0, 12)], [(12, 20)]),
    "visium": ([(0, 16)], [(16, 28)]),
    "slideseq": ([(0, 8), (26, 32)], [(32, 41)]),
}


def make_pairs(n=200, seed=1, r1_len=50, short_every=0):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        l1 = 10 if short_every and i % short_every == 3 else r1_len
        l2 = rng.choice([1, 31, 90, 91])
        s1 = "".join(rng.choice("ACGTN") for _ in range(l1))
        q1 = "".join(chr(33 + rng.randrange(2, 42)) for _ in range(l1))
        s2 = "".join(rng.choice("ACGTNacgt") for _ in range(l2))
        q2 = "".join(chr(33 + rng.randrange(0, 42)) for _ in range(l2))
        pairs.append((f"read:{i}", s1, q1, s2, q2))
    return pairs


def write_fastq(path, records, compress):
    text = "".join(f"@{name}\n{seq}\n+\n{qual}\n" for name, seq, qual in records).encode()
    if compress:
        text = gzip.compress(text)
    path.write_bytes(text)
    return str(path)


def write_pair(tmp_path, pairs, compress=True, suffixes=("/1 1:N:0:ACGT", "/2 2:N:0:ACGT")):
    ext = ".fq.gz" if compress else ".fq"
    r1 = write_fastq(tmp_path / f"r1{ext}", [(n + suffixes[0], s1, q1) for n, s1, q1, _, _ in pairs], compress)
    r2 = write_fastq(tmp_path / f"r2{ext}", [(n + suffixes[1], s2, q2) for n, _, _, s2, q2 in pairs], compress)
    return r1, r2


def cut(seq, segs):
    return "".join(seq[a:b] for a, b in segs)


@pytest.mark.parametrize("layout", sorted(EXPECTED_SLICES))
@pytest.mark.parametrize("compress", [True, False])
def test_tag_layouts(tmp_path, layout, compress):
    pairs = make_pairs(short_every=7)
    r1, r2 = write_pair(tmp_path, pairs, compress)
    out = str(tmp_path / "out.bam")
    stats = tag(r1, r2, out, layout=layout, sample="S1", read_group="RG7")
    cb_segs, umi_segs = EXPECTED_SLICES[layout]
    need = max(b for a, b in cb_segs + umi_segs)
    kept = [p for p in pairs if len(p[1]) >= need]
    assert stats["reads_in"] == len(pairs)
    assert stats["written"] == len(kept)
    assert stats["dropped"] == ({"too_short": len(pairs) - len(kept)} if len(kept) < len(pairs) else {})
    with pysam.AlignmentFile(out, check_sq=False) as f:
        header = f.header.to_dict()
        reads = list(f)
    assert header["HD"]["VN"] == "1.6" and header["HD"]["SO"] == "unsorted"
    assert header["RG"] == [{"ID": "RG7", "SM": "S1"}]
    assert [pg["PN"] for pg in header["PG"]] == ["bamflow"]
    assert len(reads) == len(kept)
    for read, (name, s1, q1, s2, q2) in zip(reads, kept, strict=True):
        assert read.query_name == name
        assert read.flag == 4 and read.is_unmapped
        assert read.query_sequence == (s2.upper() if s2 else None)
        assert list(read.query_qualities) == [ord(c) - 33 for c in q2]
        assert read.get_tag("CR") == cut(s1, cb_segs)
        assert read.get_tag("CY") == cut(q1, cb_segs)
        assert read.get_tag("UR") == cut(s1, umi_segs)
        assert read.get_tag("UY") == cut(q1, umi_segs)
        assert read.get_tag("RG") == "RG7"
        assert [t for t, _ in read.get_tags()] == ["CR", "CY", "UR", "UY", "RG"]


def test_tag_layout_table_matches_the_documented_slices():
    for layout, (cb, umi) in EXPECTED_SLICES.items():
        assert parse_layout(layout) == {"CB": cb, "UMI": umi}
    assert set(LAYOUTS) == set(EXPECTED_SLICES)


def test_tag_custom_layout_and_stdin(tmp_path, monkeypatch):
    pairs = make_pairs(n=50, seed=2)
    r1, r2 = write_pair(tmp_path, pairs, compress=False, suffixes=("", " comment"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(open(r2, "rb").read())))
    out = str(tmp_path / "custom.bam")
    stats = tag(r1, "-", out, layout="CB=r1[2:6]+r1[10:12], UMI=r1[0:2]")
    assert stats["written"] == 50
    with pysam.AlignmentFile(out, check_sq=False) as f:
        for read, (name, s1, _q1, _s2, _q2) in zip(f, pairs, strict=True):
            assert read.query_name == name
            assert read.get_tag("CR") == s1[2:6] + s1[10:12]
            assert read.get_tag("UR") == s1[0:2]
            assert read.get_tag("RG") == "sample"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("10x-v9", "unknown layout"),
        ("CB=r1[0:16]", "no UMI"),
        ("CB=r1[0:16],UMI=r2[0:10]", "not a slice of read 1"),
        ("CB=r1[0:16],UMI=r1[16:10]", "empty slice"),
        ("CB=r1[0:16],XX=r1[16:28]", "should be CB"),
        ("CB=r1[0:16],CB=r1[0:4],UMI=r1[16:28]", "given twice"),
        ("CB=r1[0:a],UMI=r1[16:28]", "not a slice"),
    ],
)
def test_tag_bad_layout(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(spec)
    r1, r2 = write_pair(tmp_path, make_pairs(n=3))
    with pytest.raises(ValueError, match=message):
        tag(r1, r2, str(tmp_path / "x.bam"), layout=spec)
    assert not (tmp_path / "x.bam").exists()


def test_tag_pairs_out_of_sync(tmp_path):
    pairs = make_pairs(n=30)
    r1 = write_fastq(tmp_path / "r1.fq", [(n + "/1", s1, q1) for n, s1, q1, _, _ in pairs], False)
    shifted = pairs[:11] + pairs[12:] + pairs[11:12]
    r2 = write_fastq(tmp_path / "r2.fq", [(n + "/2", s2, q2) for n, _, _, s2, q2 in shifted], False)
    out = tmp_path / "x.bam"
    with pytest.raises(bamflow.WorkflowError, match=r"pair 12 is out of sync: read 1 is named 'read:11/1', read 2 'read:12/2'"):
        tag(r1, r2, str(out))
    assert not out.exists() and not list(tmp_path.glob("x.bam.tmp*"))


def test_tag_pairs_of_different_lengths(tmp_path):
    pairs = make_pairs(n=30)
    r1 = write_fastq(tmp_path / "r1.fq", [(n, s1, q1) for n, s1, q1, _, _ in pairs], False)
    r2 = write_fastq(tmp_path / "r2.fq", [(n, s2, q2) for n, _, _, s2, q2 in pairs[:25]], False)
    with pytest.raises(bamflow.WorkflowError, match=r"r2.fq ends at record 25"):
        tag(r1, r2, str(tmp_path / "x.bam"))


def test_tag_truncated_gzip(tmp_path):
    pairs = make_pairs(n=3000)
    r1, r2 = write_pair(tmp_path, pairs)
    data = open(r2, "rb").read()
    open(r2, "wb").write(data[: len(data) // 2])
    out = tmp_path / "x.bam"
    with pytest.raises(bamflow.WorkflowError, match=r"r2.fq.gz.*(truncated|corrupt)"):
        tag(r1, r2, str(out))
    assert not out.exists() and not list(tmp_path.glob("x.bam.tmp*"))


def test_tag_malformed_fastq(tmp_path):
    r1 = tmp_path / "r1.fq"
    r2 = tmp_path / "r2.fq"
    r1.write_text("@a\n" + "A" * 30 + "\n+\n" + "F" * 30 + "\n")
    r2.write_text("@a\nACGT\n+\nFF\n")
    with pytest.raises(bamflow.WorkflowError, match="malformed FASTQ"):
        tag(str(r1), str(r2), str(tmp_path / "x.bam"))


# -- correct -----------------------------------------------------------------------------

WL = ["AAAAAAAA", "AAAAAAAC", "GGGGGGGG", "GGGGGGGT", "TTTTTTTT", "TTTTTCTA", "CCCCCCCC"]


def q(values):
    return "".join(chr(33 + v) for v in values)


def correct_cases():
    """(CR, CY) of hand-made reads; None = no CR tag."""
    cases = []
    cases += [("AAAAAAAA", q([30] * 8))] * 10  # exact
    cases += [("AAAAAAAC", q([30] * 8))] * 10  # exact
    cases += [("GGGGGGGG", q([30] * 8))] * 100  # exact; its neighbour GGGGGGGT has no exact read
    cases += [("TTTTTTTT", q([30] * 8))] * 5
    cases += [("TTTTTCTA", q([30] * 8))] * 5
    cases += [
        ("AAAAAAAG", q([30] * 8)),  # two candidates, equal priors: ambiguous
        ("GGGGGGGA", q([30] * 8)),  # (100+1) vs (0+1): corrected to GGGGGGGG
        ("GGGGGGGN", q([30] * 7 + [2])),  # N: same candidates at that position
        ("TTTTTTTA", q([30] * 7 + [2])),  # quality decides: the low-quality last base → TTTTTTTT
        ("TTTTTTTA", q([30] * 5 + [2, 30, 30])),  # ... or base 5 → TTTTTCTA
        ("TTTTTTTA", q([30] * 8)),  # equal qualities and priors: ambiguous
        ("TTTTTTTA", q([30] * 5 + [40, 30, 20])),  # Q40 counts as Q33 (Cell Ranger's cap): posterior 0.952, ambiguous
        ("CCCCCCCA", q([40] * 8)),  # single candidate (no exact read): pseudocount makes it 1.0
        ("CACACACA", q([30] * 8)),  # nothing near: uncorrectable
        ("AAAAAAA", q([30] * 7)),  # wrong length: uncorrectable
        ("NNAAAAAA", q([30] * 8)),  # two Ns: uncorrectable
        (None, None),  # no CR
    ]
    return cases


def write_cr_bam(path, cases, extra_secondary=()):
    h = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6", "SO": "unsorted"}, "SQ": [{"SN": "c", "LN": 1000}]})
    with pysam.AlignmentFile(str(path), "wb", header=h) as f:
        for i, (cr, cy) in enumerate(list(cases) + [(c, q([30] * len(c)), ) for c in extra_secondary]):
            r = pysam.AlignedSegment(h)
            r.query_name = f"q{i}"
            r.query_sequence = "ACGTA"
            r.query_qualities = [30] * 5
            if i >= len(cases):
                r.flag = 256
                r.reference_id, r.reference_start, r.cigarstring, r.mapping_quality = 0, 10, "5M", 3
            else:
                r.flag = 4
            tags = [("CR", cr), ("CY", cy)] if cr is not None else []
            r.set_tags(tags + [("NH", 1)])
            f.write(r)


def expected_cb(cases_all, whitelist, pseudocount=1.0, threshold=0.975):
    """Straightforward: counts from all primary reads, brute-force Hamming distance over the whitelist."""
    counts = {}
    for cr, _ in cases_all:
        if cr in whitelist:
            counts[cr] = counts.get(cr, 0) + 1
    out = []
    for cr, cy in cases_all:
        if cr is None:
            out.append(("missing_tag", None))
        elif cr in whitelist:
            out.append(("exact", cr + "-1"))
        else:
            cands = []
            for w in whitelist:
                if len(w) == len(cr):
                    diff = [i for i in range(len(w)) if w[i] != cr[i]]
                    if len(diff) == 1 and cr.count("N") <= 1 and ("N" not in cr or cr[diff[0]] == "N"):
                        qual = min(33, ord(cy[diff[0]]) - 33)
                        cands.append(((counts.get(w, 0) + pseudocount) * 10 ** (-qual / 10), w))
            if not cands:
                out.append(("uncorrectable", None))
            else:
                best = max(cands)
                if best[0] / sum(c[0] for c in cands) > threshold:
                    out.append(("corrected", best[1] + "-1"))
                else:
                    out.append(("ambiguous", None))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_correct_hand_made_cases(tmp_path, workers):
    cases = correct_cases()
    rng = random.Random(4)
    rng.shuffle(cases)
    bam = tmp_path / "in.bam"
    # secondary records: not counted for the priors (else AAAAAAAG would resolve to AAAAAAAC)
    write_cr_bam(bam, cases, extra_secondary=["AAAAAAAC"] * 50)
    wl = tmp_path / "wl.txt"
    wl.write_text("\n".join(WL) + "\n")
    out = tmp_path / "out.bam"
    stats = correct(str(bam), str(out), whitelist=str(wl), workers=workers)
    expected = expected_cb(cases, set(WL)) + [("exact", "AAAAAAAC-1")] * 50
    with pysam.AlignmentFile(str(out), check_sq=False) as f:
        reads = list(f)
    assert [r.query_name for r in reads] == [f"q{i}" for i in range(len(expected))]  # input order kept
    got = [r.get_tag("CB") if r.has_tag("CB") else None for r in reads]
    assert got == [cb for _, cb in expected]
    outcome = {}
    for kind, _ in expected:
        outcome[kind] = outcome.get(kind, 0) + 1
    for kind in ("exact", "corrected", "ambiguous", "uncorrectable", "missing_tag"):
        assert stats[kind] == outcome.get(kind, 0), kind
    assert stats["reads_in"] == stats["written"] == len(expected)
    # the hand-made expectations, spelled out
    by_key = {}
    for (cr, cy), cb in zip(cases, got[: len(cases)], strict=True):
        by_key.setdefault((cr, cy), set()).add(cb)
    assert by_key[("GGGGGGGA", q([30] * 8))] == {"GGGGGGGG-1"}
    assert by_key[("AAAAAAAG", q([30] * 8))] == {None}
    assert by_key[("TTTTTTTA", q([30] * 7 + [2]))] == {"TTTTTTTT-1"}
    assert by_key[("TTTTTTTA", q([30] * 5 + [2, 30, 30]))] == {"TTTTTCTA-1"}
    assert by_key[("CCCCCCCA", q([40] * 8))] == {"CCCCCCCC-1"}
    assert by_key[("TTTTTTTA", q([30] * 5 + [40, 30, 20]))] == {None}
    assert by_key[("GGGGGGGN", q([30] * 7 + [2]))] == {"GGGGGGGG-1"}


def test_correct_random_against_brute_force(tmp_path):
    rng = random.Random(9)
    wl = sorted({"".join(rng.choice("ACGT") for _ in range(10)) for _ in range(300)})
    # close pairs, so that candidates compete
    for w in wl[:40]:
        wl.append(w[:4] + rng.choice("ACGT") + w[5:])
    wl = sorted(set(wl))
    cases = []
    for _ in range(3000):
        bc = list(rng.choice(wl[:120]))
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            bc[rng.randrange(10)] = rng.choice("ACGTN")
        cases.append(("".join(bc), q([rng.randrange(2, 41) for _ in range(10)])))
    bam = tmp_path / "in.bam"
    write_cr_bam(bam, cases)
    (tmp_path / "wl.txt.gz").write_bytes(gzip.compress(("\n".join(wl) + "\n").encode()))
    stats = correct(str(bam), str(tmp_path / "out.bam"), whitelist=str(tmp_path / "wl.txt.gz"), suffix="-1")
    expected = expected_cb(cases, set(wl))
    with pysam.AlignmentFile(str(tmp_path / "out.bam"), check_sq=False) as f:
        got = [r.get_tag("CB") if r.has_tag("CB") else None for r in f]
    assert got == [cb for _, cb in expected]
    assert stats["corrected"] > 100 and stats["ambiguous"] > 0 and stats["uncorrectable"] > 0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the whitelist is empty"),
        (b"ACGT\nACGA\nACG\n", "line 3: barcode of 3 characters"),
        (b"ACGT\nACNT\n", "line 2: character 'N'"),
        (b"ACGT\n\nACGA\n", "line 2 is empty"),
        (b"ACGT\nacgt\n", "line 2: character 'a'"),
        (b"ACGT\tx\n", "line 1: character"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_correct_malformed_whitelist(tmp_path, content, message, compress):
    path = tmp_path / ("wl.txt.gz" if compress else "wl.txt")
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(ValueError, match=message) as e:
        load_whitelist(str(path))
    assert str(path) in str(e.value)
    bam = tmp_path / "in.bam"
    write_cr_bam(bam, [("ACGT", q([30] * 4))])
    with pytest.raises(ValueError, match=message):
        correct(str(bam), str(tmp_path / "out.bam"), whitelist=str(path))


def test_whitelist_membership_and_crlf(tmp_path):
    rng = random.Random(3)
    wl = {"".join(rng.choice("ACGT") for _ in range(16)) for _ in range(5000)}
    path = tmp_path / "wl.txt"
    path.write_bytes(("\r\n".join(sorted(wl)) + "\r\n").encode())
    loaded = load_whitelist(str(path))
    assert len(loaded) == len(wl)
    for w in list(wl)[:500]:
        assert w.encode() in loaded
        other = w[:7] + "ACGT"[("ACGT".index(w[7]) + 1) % 4] + w[8:]
        assert (other.encode() in loaded) == (other in wl)
        brute = [(i, (other[:i] + b + other[i + 1 :]).encode()) for i in range(16) for b in "ACGT"
                 if b != other[i] and other[:i] + b + other[i + 1 :] in wl]
        assert loaded.neighbors(other.encode()) == brute


# -- histogram ---------------------------------------------------------------------------


def write_hist_bam(path, n=3000, seed=5, int_tag=False):
    rng = random.Random(seed)
    h = pysam.AlignmentHeader.from_dict({"HD": {"VN": "1.6"}, "SQ": [{"SN": "c", "LN": 10000}]})
    cells = ["".join(rng.choice("ACGT") for _ in range(8)) for _ in range(30)]
    with pysam.AlignmentFile(str(path), "wb", header=h) as f:
        for i in range(n):
            r = pysam.AlignedSegment(h)
            r.query_name = f"r{i}"
            r.query_sequence = "ACGT"
            r.query_qualities = [30] * 4
            r.flag = rng.choice([0, 16, 256, 2048, 1024, 0, 0, 272])
            r.reference_id, r.reference_start, r.cigarstring = 0, rng.randrange(9000), "4M"
            r.mapping_quality = rng.choice([0, 3, 10, 60, 255])
            k = rng.randrange(30) ** 2 % 31  # uneven counts with ties
            choice = rng.random()
            if choice < 0.05:
                pass
            elif choice < 0.07:
                r.set_tag("CB", "")
            else:
                r.set_tag("CB", k if int_tag else cells[k])
            f.write(r)


def pysam_counts(path, tag="CB", min_mapq=0, skip_dups=False):
    counts = {}
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        for r in f:
            if r.is_secondary or r.is_supplementary or r.mapping_quality < min_mapq:
                continue
            if skip_dups and r.is_duplicate:
                continue
            if r.has_tag(tag) and str(r.get_tag(tag)) != "":
                v = str(r.get_tag(tag))
                counts[v] = counts.get(v, 0) + 1
    return counts


def read_hist(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    return lines


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("gz", [False, True])
def test_histogram_matches_pysam(tmp_path, workers, gz):
    bam = tmp_path / "in.bam"
    write_hist_bam(bam)
    out = tmp_path / ("h.tsv.gz" if gz else "h.tsv")
    stats = histogram(str(bam), str(out), workers=workers)
    expected = pysam_counts(bam)
    lines = read_hist(out)
    assert lines[0] == f"#INPUT={bam}\tTAG=CB\tFILTER_PCR_DUPLICATES=false\tREAD_QUALITY=0"
    rows = [line.split("\t") for line in lines[1:]]
    assert {v: int(c) for c, v in rows} == expected
    assert rows == sorted(rows, key=lambda r: (-int(r[0]), r[1]))  # count descending, then value
    assert len({c for c, _ in rows}) < len(rows)  # there are ties to order
    assert stats["written"] == sum(expected.values())
    assert stats["reads_in"] == 3000 == stats["written"] + sum(stats["dropped"].values())
    assert stats["dropped"]["secondary"] > 0 and stats["dropped"]["supplementary"] > 0


def test_histogram_mapq_duplicates_int_tag(tmp_path):
    bam = tmp_path / "in.bam"
    write_hist_bam(bam, int_tag=True, seed=8)
    out = tmp_path / "h.tsv"
    stats = histogram(str(bam), str(out), read_quality=10, filter_pcr_duplicates=True, header=False, workers=1)
    rows = [line.split("\t") for line in read_hist(out)]
    assert {v: int(c) for c, v in rows} == pysam_counts(bam, min_mapq=10, skip_dups=True)
    assert stats["dropped"]["low_mapq"] > 0 and stats["dropped"]["duplicate"] > 0
    with pytest.raises(ValueError, match="same option"):
        histogram(str(bam), str(out), read_quality=10, min_mapq=5)


def test_histogram_keeps_secondary_when_asked(tmp_path):
    bam = tmp_path / "in.bam"
    write_hist_bam(bam, n=500)
    out = tmp_path / "h.tsv"
    histogram(str(bam), str(out), skip_secondary=False, header=False)
    counts = {}
    with pysam.AlignmentFile(str(bam), check_sq=False) as f:
        for r in f:
            if r.has_tag("CB") and r.get_tag("CB") != "":
                counts[r.get_tag("CB")] = counts.get(r.get_tag("CB"), 0) + 1
    assert {v: int(c) for c, v in (line.split("\t") for line in read_hist(out))} == counts
