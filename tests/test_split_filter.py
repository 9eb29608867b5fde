"""filter_reads and split_reads on real BAM files, checked with pysam and samtools."""

import gzip
import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter

import pysam
import pytest
from bamfiles import header, write_bam

from bamflow import WorkflowError
from bamflow.bam.split import filter_reads, safe_name, split_reads

SAMTOOLS = shutil.which("samtools")


def samtools(*args):
    assert SAMTOOLS, "samtools must be installed for these checks"
    return subprocess.run([SAMTOOLS, *args], capture_output=True, text=True, timeout=60)


def records(path):
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return [r.to_string() for r in f]


def cb_of(line):
    """The CB value (as text) of a SAM line, or None."""
    for field in line.split("\t")[11:]:
        if field.startswith("CB:"):
            return field.split(":", 2)[2]
    return None


def pg_lines(path):
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return [line for line in str(f.header).splitlines() if line.startswith("@PG")]


def manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.tsv"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "value\tfile\treads"
    return {value: (name, int(reads)) for value, name, reads in (line.split("\t") for line in lines[1:])}


@pytest.fixture
def bam(tmp_path):
    path = tmp_path / "in.bam"
    write_bam(path, n=3000, n_cells=40)
    return path


# -- filter ------------------------------------------------------------------------------


def expected_filter(path, listed, invert=False):
    """An independent pysam loop: reads with a CB, in (not in) ``listed``."""
    out = []
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        for r in f:
            if r.has_tag("CB") and (str(r.get_tag("CB")) in listed) != invert:
                out.append(r.to_string())
    return out


@pytest.mark.parametrize("invert", [False, True])
def test_filter_keeps_exactly_the_listed_reads(bam, tmp_path, invert):
    all_cells = sorted({cb_of(line) for line in records(bam)} - {None})
    listed = set(all_cells[::3])
    out = tmp_path / "out.bam"
    stats = filter_reads(bam, out, values=sorted(listed), invert=invert)
    expected = expected_filter(bam, listed, invert)
    got = records(out)
    assert got == expected  # same reads, same order
    assert len(got) > 0
    assert stats["kept"] == len(expected)
    assert stats["records_in"] == 3000
    assert stats["records_in"] == stats["kept"] + stats["dropped_not_listed"] + stats["dropped_missing_tag"]
    assert stats["dropped_missing_tag"] == sum(1 for line in records(bam) if cb_of(line) is None) > 0
    assert samtools("quickcheck", str(out)).returncode == 0
    assert len(pg_lines(out)) == len(pg_lines(bam)) + 1
    assert "PN:bamflow" in pg_lines(out)[-1]


def test_filter_integer_cb(tmp_path):
    src = tmp_path / "int.bam"
    write_bam(src, n=1500, n_cells=20, int_cb=True)
    out = tmp_path / "out.bam"
    stats = filter_reads(src, out, values=[3, "5", b"7"])
    expected = expected_filter(src, {"3", "5", "7"})
    assert records(out) == expected and len(expected) > 0
    assert stats["kept"] == len(expected)


def test_filter_big_list_from_file(bam, tmp_path):
    all_cells = sorted({cb_of(line) for line in records(bam)} - {None})
    real = set(all_cells[:25])
    rng = random.Random(7)
    decoys = {"".join(rng.choice("ACGT") for _ in range(16)) + "-2" for _ in range(200_000)}
    values = list(decoys | real)
    rng.shuffle(values)
    listing = tmp_path / "barcodes.tsv.gz"
    with gzip.open(listing, "wt") as f:
        f.write("\r\n".join(values) + "\r\n")  # CRLF and gzip, as some tools write them
    out = tmp_path / "out.bam"
    start = time.monotonic()
    stats = filter_reads(bam, out, values=listing)
    assert time.monotonic() - start < 30
    assert stats["values"] == len(values)
    assert records(out) == expected_filter(bam, real)
    assert stats["kept"] == len(expected_filter(bam, real))


def test_filter_empty_output_and_bad_tag(bam, tmp_path):
    out = tmp_path / "none.bam"
    stats = filter_reads(bam, out, values=["nope"])
    assert stats["kept"] == 0 and records(out) == []
    with pytest.raises(ValueError):
        filter_reads(bam, tmp_path / "x.bam", tag="CBX", values=["a"])


# -- split -------------------------------------------------------------------------------


def check_split(src, out_dir, stats, selected=None, min_reads=0):
    """Every read with a (selected) CB is in exactly the file of its value;
    every file is valid, has one new @PG, and the manifest says so."""
    by_value = Counter()
    expected = Counter()
    for line in records(src):
        cb = cb_of(line)
        if cb is not None and (selected is None or cb in selected):
            by_value[cb] += 1
            expected[(cb, line)] += 1
    kept_values = {v for v, n in by_value.items() if n >= min_reads}
    entries = manifest(out_dir)
    assert set(entries) == kept_values
    names = sorted(n for n in os.listdir(out_dir) if n.endswith(".bam"))
    assert sorted(name for name, _ in entries.values()) == names
    hidden = sorted(n for n in os.listdir(out_dir) if n.startswith("."))
    assert hidden == [".bamflow-outputs", ".bamflow.lock"]  # no temporary file or scratch folder left
    listed = json.loads((out_dir / ".bamflow-outputs").read_text())["outputs"]
    assert listed == sorted(names + ["manifest.tsv"])
    got = Counter()
    src_pg = len(pg_lines(src))
    for value, (name, reads) in entries.items():
        path = os.path.join(out_dir, name)
        lines = records(path)
        assert len(lines) == reads == by_value[value]
        for line in lines:
            assert cb_of(line) == value
            got[(value, line)] += 1
        pgs = pg_lines(path)
        assert len(pgs) == src_pg + 1 and "PN:bamflow" in pgs[-1]
    assert got == Counter({k: n for k, n in expected.items() if k[0] in kept_values})
    assert stats["files"] == len(names)
    assert stats["written"] == sum(reads for _, reads in entries.values())
    assert stats["records_in"] == stats["written"] + sum(stats["dropped"].values())
    assert stats["dropped"]["below_min_reads"] == sum(n for v, n in by_value.items() if v not in kept_values)
    if names:
        result = samtools("quickcheck", *[os.path.join(out_dir, n) for n in names])
        assert result.returncode == 0, result.stdout + result.stderr
    return entries


@pytest.mark.parametrize("workers", [1, 3])
def test_split_every_read_in_the_file_of_its_value(bam, tmp_path, workers):
    out_dir = tmp_path / "split"
    stats = split_reads(bam, out_dir, workers=workers)
    entries = check_split(bam, out_dir, stats)
    assert len(entries) == 40
    assert stats["dropped"]["missing_tag"] > 0 and stats["dropped"]["not_selected"] == 0


def test_split_selected_values(bam, tmp_path):
    all_cells = sorted({cb_of(line) for line in records(bam)} - {None})
    chosen = set(all_cells[5:12]) | {"NOT-PRESENT-1"}
    listing = tmp_path / "cells.txt"
    listing.write_text("\n".join(sorted(chosen)) + "\n")
    stats = split_reads(bam, tmp_path / "a", values=listing)
    check_split(bam, tmp_path / "a", stats, selected=chosen)
    assert stats["files"] == 7 and stats["dropped"]["not_selected"] > 0
    stats = split_reads(bam, tmp_path / "b", values=sorted(chosen), workers=3)
    check_split(bam, tmp_path / "b", stats, selected=chosen)


@pytest.mark.parametrize("budget", [256 << 20, 1])
def test_split_min_reads(tmp_path, budget):
    src = tmp_path / "skewed.bam"
    hdr = header()
    rng = random.Random(5)
    with pysam.AlignmentFile(str(src), "wb", header=hdr) as f:
        for i in range(6000):
            r = pysam.AlignedSegment(hdr)
            r.query_name = f"q{i}"
            r.query_sequence = "".join(rng.choice("ACGT") for _ in range(150))
            r.query_qualities = pysam.qualitystring_to_array("F" * 150)
            r.flag = 4
            # a few big cells, many small ones
            cell = f"big{rng.randrange(4)}" if rng.random() < 0.8 else f"small{rng.randrange(300)}"
            r.set_tag("CB", cell)
            f.write(r)
    out_dir = tmp_path / "out"
    stats = split_reads(src, out_dir, min_reads=10, memory_budget=budget, workers=2)
    entries = check_split(src, out_dir, stats, min_reads=10)
    assert {f"big{i}" for i in range(4)} <= set(entries)
    assert stats["dropped"]["below_min_reads"] > 0
    assert any(v.startswith("small") for v in entries)  # some small cells do reach 10


def test_split_groups(bam, tmp_path):
    all_cells = sorted({cb_of(line) for line in records(bam)} - {None})
    groups = {cell: ("T cell" if i % 3 == 0 else "B/cell" if i % 3 == 1 else "NK") for i, cell in enumerate(all_cells[:30])}
    tsv = tmp_path / "groups.tsv"
    tsv.write_text("".join(f"{c}\t{g}\n" for c, g in groups.items()))
    out_dir = tmp_path / "out"
    stats = split_reads(bam, out_dir, groups=tsv, workers=3, min_reads=1)
    entries = manifest(out_dir)
    assert set(entries) == {"T cell", "B/cell", "NK"}
    expected = Counter()
    for line in records(bam):
        cb = cb_of(line)
        if cb in groups:
            expected[(groups[cb], line)] += 1
    got = Counter()
    for group, (name, reads) in entries.items():
        path = out_dir / name
        assert path.parent == out_dir
        lines = records(path)
        assert len(lines) == reads
        got.update((group, line) for line in lines)
        assert len(pg_lines(path)) == len(pg_lines(bam)) + 1
    assert got == expected
    assert samtools("quickcheck", *[str(out_dir / n) for n, _ in entries.values()]).returncode == 0
    assert stats["written"] == sum(expected.values())
    assert stats["dropped"]["not_selected"] == sum(1 for line in records(bam) if cb_of(line) not in groups and cb_of(line))
    with pytest.raises(ValueError, match="groups"):
        bad = tmp_path / "bad.tsv"
        bad.write_text("AAA\tx\nAAA\ty\n")
        split_reads(bam, tmp_path / "bad", groups=bad)


HOSTILE = ["../../x", "a/b", "a_b", "a:b", "a b", "", ".hidden", "..", ".", "x" * 300, "x" * 299 + "y",
           "value", "manifest.tsv", "a\\b", "grüße", "-rf", "CON"]


def test_split_hostile_values_stay_inside_out_dir(tmp_path):
    src = tmp_path / "hostile.bam"
    hdr = header()
    with pysam.AlignmentFile(str(src), "wb", header=hdr) as f:
        for i in range(len(HOSTILE) * 5):
            r = pysam.AlignedSegment(hdr)
            r.query_name = f"h{i}"
            r.query_sequence = "ACGT"
            r.flag = 4
            r.set_tag("CB", HOSTILE[i % len(HOSTILE)])
            f.write(r)
    root = tmp_path / "deep" / "er"
    out_dir = root / "out"
    stats = split_reads(src, out_dir, workers=2)
    # an empty value is no value (the canonical rule): those reads lack the tag
    values = [v for v in HOSTILE if v]
    assert stats["dropped"]["missing_tag"] == 5
    assert sorted(os.listdir(tmp_path)) == ["deep", "hostile.bam"]
    assert os.listdir(root) == ["out"]
    names = [n for n in os.listdir(out_dir) if not n.startswith(".bamflow")]
    assert all(os.path.isfile(out_dir / n) for n in names)
    assert len(names) == len(values) + 1 and "manifest.tsv" in names
    assert all(not n.startswith(".") and "/" not in n and len(n.encode()) < 200 for n in names)
    entries = manifest(out_dir)
    escaped = {v.replace("\\", "\\\\") for v in values}
    assert set(entries) == escaped
    assert len({name for name, _ in entries.values()}) == len(values)
    assert entries["a_b"][0] == "a_b.bam"  # plain names stay as they are
    for value in values:
        name, reads = entries[value.replace("\\", "\\\\")]
        assert name == safe_name(value.encode())
        assert reads == 5
        assert [cb_of(line) for line in records(out_dir / name)] == [value] * 5
    assert stats["files"] == len(values) and stats["written"] == len(values) * 5


def test_split_20000_values_under_ulimit_256(tmp_path):
    src = tmp_path / "many.bam"
    hdr = header()
    with pysam.AlignmentFile(str(src), "wb", header=hdr) as f:
        for i in range(40_000):
            r = pysam.AlignedSegment(hdr)
            r.query_name = f"m{i}"
            r.query_sequence = "ACGTACGTAC"
            r.flag = 4
            r.set_tag("CB", f"C{(i * 7919) % 20_000:05d}-1")
            f.write(r)
    out_dir = tmp_path / "out"

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    # through the command line, as a user would run it
    start = time.monotonic()
    result = subprocess.run(
        ["bamflow", "split", "--by", "CB", "-q", "-o", str(out_dir), str(src)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "40,000 reads in, 40,000 written, 0 dropped" in result.stderr
    assert elapsed < 60
    names = [n for n in os.listdir(out_dir) if n.endswith(".bam")]
    assert len(names) == 20_000
    entries = manifest(out_dir)
    assert len(entries) == 20_000 and all(reads == 2 for _, reads in entries.values())
    for name in random.Random(1).sample(names, 20):
        lines = records(out_dir / name)
        assert len(lines) == 2 and {cb_of(line) + ".bam" for line in lines} == {name}
    sample = [str(out_dir / n) for n in names[:500]]
    assert samtools("quickcheck", *sample).returncode == 0


def test_split_failure_leaves_nothing_complete(bam, tmp_path):
    # an output folder that cannot be made (works as root too)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WorkflowError, match="is not a folder"):
        split_reads(bam, blocker / "out")
    assert blocker.read_text() == "x"
    # a failure mid-run: truncated input after outputs were appended to
    src = tmp_path / "big.bam"
    hdr = header()
    with pysam.AlignmentFile(str(src), "wb", header=hdr) as f:
        rng = random.Random(2)
        for i in range(30_000):
            r = pysam.AlignedSegment(hdr)
            r.query_name = f"t{i}"
            r.query_sequence = "".join(rng.choice("ACGT") for _ in range(100))
            r.flag = 4
            r.set_tag("CB", f"cell{i % 3}")
            f.write(r)
    data = src.read_bytes()
    broken = tmp_path / "broken.bam"
    broken.write_bytes(data[: len(data) * 9 // 10])
    out_dir = tmp_path / "out"
    with pytest.raises(WorkflowError):
        split_reads(broken, out_dir, workers=2)
    assert not out_dir.exists()  # the failed run removed the folder it made
    # and the whole file works
    stats = split_reads(src, out_dir, workers=2)
    assert stats["files"] == 3 and stats["written"] == 30_000


def test_safe_name_is_injective_and_plain():
    raws = [v.encode() for v in HOSTILE] + [b"\x00", b"\xff", b"a\x00b", b"a\x01b"]
    names = [safe_name(r, "p_") for r in raws]
    assert len(set(names)) == len(raws)
    for n in names:
        assert n.startswith("p_") and n.endswith(".bam") and "/" not in n and "\0" not in n
    assert safe_name(b"ACGT-1") == "ACGT-1.bam"
