"""dedup and count by region (docs/presets/dedup_count.md, "Workers"): on an
indexed coordinate-sorted BAM each worker reads its own references from the
file. The output equals the one-worker run's, record for record in order;
every input the region mode cannot serve falls back to the cell-sharded (or
one-worker) path with the same results; a corrupt input still fails with
one error and publishes nothing."""

import gzip
import os
import shutil
import struct
import subprocess
import sys

import pysam
import pytest
import test_umi_support as support
from test_reliability import check_failed_cleanly

from bamflow.bam.partition import partition_bytes, plan_regions
from bamflow.engine.errors import WorkflowError
from bamflow.presets.count import count
from bamflow.presets.dedup import dedup
from bamflow.presets.group import group

pytestmark = pytest.mark.timeout(300)
EOF_MARKER = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
SAMTOOLS = shutil.which("samtools") or os.path.join(os.path.dirname(__file__), "bin", "samtools")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A sorted, indexed BAM on three references (a gene's secondary
    alignments on two of them), reads without a cell, UMI or gene, and
    unmapped reads without a coordinate at the end."""
    folder = tmp_path_factory.mktemp("regions")
    hdr, reads = support.make_reads(seed=5, molecules=500)
    return folder, support.write_bam(folder / "in.bam", hdr, reads), hdr, reads


def records(path):
    """The records of a BAM as SAM lines, in file order."""
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return [r.to_string() for r in f]


def content(path):
    """A table's bytes (decompressed: the gzip header names the temporary file)."""
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_the_plan_covers_every_record_once_by_whole_references(data):
    folder, src, _, reads = data
    for k in (2, 3, 4, 7):
        plan, why = plan_regions(src, k)
        assert why == "" and plan is not None
        assert 2 <= len(plan.partitions) <= min(k, 3)  # never more parts than references with reads
        assert plan.total == len(reads)
        assert [p.end for p in plan.partitions[:-1]] == [p.start for p in plan.partitions[1:]]
        seen = []
        for part, (lo, hi), want in zip(plan.partitions, plan.refs, plan.records, strict=True):
            raw = b"".join(partition_bytes(part))
            got = 0
            p = 0
            while p < len(raw):
                size, ref = int.from_bytes(raw[p:p + 4], "little"), int.from_bytes(raw[p + 4:p + 8], "little", signed=True)
                assert lo <= ref < hi or (ref == -1 and part is plan.partitions[-1])
                seen.append(ref)
                got += 1
                p += 4 + size
            assert got == want
        assert len(seen) == len(reads) and seen[-1] == -1  # the unmapped reads: in the last part


@pytest.mark.parametrize("mark", [False, True], ids=["remove", "mark"])
def test_dedup_by_region_equals_one_worker(data, mark):
    folder, src, _, _ = data
    one = dedup(src, folder / f"one{mark}.bam", workers=1, mark=mark)
    assert one["sharding"] == "one"
    want = records(folder / f"one{mark}.bam")
    for n in (2, 3):
        out = folder / f"regions{n}{mark}.bam"
        stats = dedup(src, out, workers=n, mark=mark)
        assert stats["sharding"] == "region" and stats["workers"] == n
        assert records(out) == want  # the same records in the same order
        assert {k: stats[k] for k in ("reads_in", "kept", "written", "dropped", "molecules")} == \
            {k: one[k] for k in ("reads_in", "kept", "written", "dropped", "molecules")}


@pytest.mark.parametrize("per_cell", [True, False], ids=["per_cell", "per_gene"])
def test_count_by_region_equals_one_worker(data, per_cell):
    folder, src, _, _ = data
    kw = {} if per_cell else {"per_cell": False, "formats": ["tsv"]}
    one = count(src, folder / f"c1{per_cell}", workers=1, **kw)
    assert one["sharding"] == "one"
    names = sorted(os.listdir(folder / f"c1{per_cell}"))
    for n in (2, 3):
        out = folder / f"c{n}{per_cell}"
        stats = count(src, out, workers=n, **kw)
        assert stats["sharding"] == "region" and stats["workers"] == n
        for name in names:
            if name.endswith(".h5ad"):
                continue
            assert content(out / name) == content(folder / f"c1{per_cell}" / name), name
        for k in ("reads_in", "counted", "dropped", "molecules", "overwritten", "genes"):
            assert stats[k] == one[k], k
    if per_cell:
        assert one["overwritten"] > 0  # the gene on two references: the later one's count, across workers too


def test_group_stays_one_worker(data):
    """UG numbers run through all groups in umi_tools' order: group is not split."""
    folder, src, _, _ = data
    stats = group(src, folder / "grouped.bam")
    assert stats["sharding"] == "one" and stats["workers"] == 1


def _fallback(folder, src, name, reason_seen, want_sharding="cell", **kw):
    """dedup and count of ``src`` with 2 workers do not run by region and give
    the one-worker results."""
    one = dedup(src, folder / f"{name}1.bam", workers=1, **kw)
    two = dedup(src, folder / f"{name}2.bam", workers=2, **kw)
    assert two["sharding"] == want_sharding, reason_seen
    assert sorted(records(folder / f"{name}2.bam")) == sorted(records(folder / f"{name}1.bam"))
    assert two["kept"] == one["kept"] and two["dropped"] == one["dropped"]
    if kw.get("paired") or kw.get("random_seed") is not None:
        return
    c1 = count(src, folder / f"{name}c1", workers=1)
    c2 = count(src, folder / f"{name}c2", workers=2)
    assert c2["sharding"] == want_sharding
    assert (c2["counted"], c2["dropped"], c2["molecules"]) == (c1["counted"], c1["dropped"], c1["molecules"])
    for table in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"):
        assert content(folder / f"{name}c1" / table) == content(folder / f"{name}c2" / table), table


def test_unindexed_input_is_sharded_by_cell(data, tmp_path):
    _, _, hdr, reads = data
    src = support.write_bam(tmp_path / "plain.bam", hdr, reads, index=False)
    assert plan_regions(src, 2)[1].startswith("no index")
    _fallback(tmp_path, src, "plain", "no index")


def test_a_stale_index_is_not_used(data, tmp_path):
    _, src0, hdr, reads = data
    src = str(tmp_path / "stale.bam")
    shutil.copy(src0, src)
    shutil.copy(src0 + ".bai", src + ".bai")
    os.utime(src + ".bai", (1_000_000, 1_000_000))  # older than the BAM
    assert plan_regions(src, 2)[1].startswith("no index")
    _fallback(tmp_path, src, "stale", "stale index")


def test_the_index_of_another_file_is_not_trusted(data, tmp_path):
    _, _, hdr, reads = data
    other_hdr, other = support.make_reads(seed=9, molecules=120)
    other_src = support.write_bam(tmp_path / "other.bam", other_hdr, other)
    src = support.write_bam(tmp_path / "this.bam", hdr, reads, index=False)
    shutil.copy(other_src + ".bai", src + ".bai")
    plan, why = plan_regions(src, 2)
    assert plan is None and why, why
    _fallback(tmp_path, src, "foreign", why)


def test_unsorted_input_is_sharded_by_cell(data, tmp_path):
    _, _, hdr, reads = data
    src = support.write_bam(tmp_path / "unsorted.bam", hdr, reads, sort_order="unsorted")
    assert "coordinate" in plan_regions(src, 2)[1]
    _fallback(tmp_path, src, "unsorted", "unsorted")


def test_random_seed_and_paired_take_one_worker(data, tmp_path):
    folder, src, _, _ = data
    _fallback(tmp_path, src, "seeded", "random_seed", want_sharding="one", random_seed=3)
    hdr, reads = support.make_reads(seed=4, paired=True, molecules=150)
    paired = support.write_bam(tmp_path / "paired.bam", hdr, reads)
    _fallback(tmp_path, paired, "paired", "paired", want_sharding="one", paired=True)


def test_stdin_is_not_read_by_region(data, tmp_path):
    folder, src, _, _ = data
    out = tmp_path / "stdin.bam"
    code = ("import sys; from bamflow.presets.dedup import dedup; "
            f"print(dedup('-', {str(out)!r}, workers=2)['sharding'])")
    with open(src, "rb") as f:
        done = subprocess.run([sys.executable, "-c", code], stdin=f, capture_output=True, check=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.stdout.decode().split() == ["cell"]
    dedup(src, tmp_path / "file.bam", workers=1)
    assert sorted(records(out)) == sorted(records(tmp_path / "file.bam"))


def _corrupt_late_block(folder, src0):
    """A copy of ``src0`` with a byte of its last data block flipped, its index newer."""
    src = folder / "corrupt.bam"
    data = bytearray(open(src0, "rb").read())
    blocks = []
    p = 0
    while p < len(data) - 28:
        blocks.append(p)
        p += int.from_bytes(data[p + 16:p + 18], "little") + 1
    last = blocks[-1]
    data[last + 40] ^= 0xFF
    src.write_bytes(bytes(data))
    shutil.copy(src0 + ".bai", str(src) + ".bai")
    return src


def test_a_corrupt_block_in_region_mode_fails_cleanly(tmp_path):
    hdr, reads = support.make_reads(seed=6, molecules=2000)  # the damage lies past what the plan checks
    src = _corrupt_late_block(tmp_path, support.write_bam(tmp_path / "big.bam", hdr, reads))
    plan, why = plan_regions(str(src), 2)
    assert plan is not None, why  # the damage is past the split points: region mode runs
    with pytest.raises((WorkflowError, ValueError)):
        dedup(src, tmp_path / "never.bam", workers=2)
    assert not (tmp_path / "never.bam").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no part or temporary file left
    for name, out in (("dedup", "d.bam"), ("count", "counts")):
        run = tmp_path / name
        run.mkdir()
        check_failed_cleanly(name, [name, "-q", "-w", "2", str(src), "-o", str(run / "out" / out)], run, "corrupt.bam")


def test_a_csi_index_plans_the_same_parts(data, tmp_path):
    _, src0, _, _ = data
    src = str(tmp_path / "csi.bam")
    shutil.copy(src0, src)
    pysam.index(src, "-c")
    assert os.path.exists(src + ".csi") and not os.path.exists(src + ".bai")
    by_csi, why = plan_regions(src, 3)
    by_bai, _ = plan_regions(src0, 3)
    assert why == "" and by_csi.source == "index (.csi)"
    assert [(p.start, p.end) for p in by_csi.partitions] == [(p.start, p.end) for p in by_bai.partitions]
    assert by_csi.records == by_bai.records


def test_join_copies_the_parts_blocks_in_order_whatever_connects_first(data, tmp_path):
    """The join behind a region run's writers: part 1 (records only) kept
    aside while part 0 (with the header) connects late, the compressed
    bytes copied as they are, one EOF marker."""
    from jobfuncs import late_raw_stream

    from bamflow.bam.bgzf import BgzfWriter
    from bamflow.bam.concat import join_parts
    from bamflow.bam.workflow import BamWorkflow
    from bamflow.engine.fifo import FIFO

    _, src, _, _ = data
    plan, _ = plan_regions(src, 2)
    parts = []
    for i, p in enumerate(plan.partitions):
        path = tmp_path / f"part{i}"
        with open(path, "wb") as f:
            writer = BgzfWriter(f, threads=0)
            if i == 0:
                writer.write(plan.layout.header)
                writer.flush_block()
            writer.write(b"".join(partition_bytes(p)))
            writer.flush()
        parts.append(path.read_bytes())
        path.unlink()
    parts.insert(1, b"")  # a worker that wrote no records: its writer writes nothing
    w = BamWorkflow("join")
    for i, (data, delay) in enumerate(zip(parts, (0.3, 0.2, 0.1), strict=True)):
        w.add_job(func=late_raw_stream, job_name=f"{{workflow}}.part{i}", output=FIFO(f"p{i}", "wb"), data=data,
                  delay=delay)
    w.add_job(func=join_parts, job_name="{workflow}.join{n}", inputs=FIFO("p{n}", "rb", n=3),
              output=str(tmp_path / "joined.bam"), folder=str(tmp_path))
    w.run(timeout=60)
    joined = (tmp_path / "joined.bam").read_bytes()
    assert joined == b"".join(parts) + EOF_MARKER
    assert w.results("*.join*")[0]["part_bytes"] == [len(p) for p in parts]
    assert records(tmp_path / "joined.bam") == records(src)
    assert os.listdir(tmp_path) == ["joined.bam"]  # the kept part had no name


def bam_stream(path):
    """(header text, number of records) of a BAM, walking its decompressed
    stream to the end: a second header or a cut record would not parse."""
    raw = gzip.decompress(open(path, "rb").read())  # BGZF is gzip members
    assert raw[:4] == b"BAM\1"
    l_text = struct.unpack_from("<i", raw, 4)[0]
    text = raw[8:8 + l_text]
    p = 8 + l_text
    (n_ref,) = struct.unpack_from("<i", raw, p)
    p += 4
    for _ in range(n_ref):
        p += 4 + struct.unpack_from("<i", raw, p)[0] + 4
    n = 0
    while p < len(raw):
        size = struct.unpack_from("<i", raw, p)[0]
        assert 32 <= size <= len(raw) - p - 4
        p += 4 + size
        n += 1
    assert p == len(raw)
    return text, n


@pytest.mark.parametrize("mark", [False, True], ids=["remove", "mark"])
def test_a_region_output_is_one_valid_bam(data, tmp_path, mark):
    """The parts joined: one header (the one-worker run's, its @PG too), one
    EOF marker at the end, samtools-valid, indexable, every region fetched as
    the one-worker run's."""
    _, src, _, _ = data
    one, out = tmp_path / "one.bam", tmp_path / "regions.bam"
    dedup(src, one, workers=1, mark=mark, command_line="bamflow dedup (test)")
    stats = dedup(src, out, workers=3, mark=mark, command_line="bamflow dedup (test)")
    assert stats["sharding"] == "region" and stats["workers"] == 3
    text, n = bam_stream(out)
    assert (text, n) == (bam_stream(one)[0], stats["written"])
    assert text.count(b"@PG\tID:bamflow") == 1
    blob = out.read_bytes()
    assert blob.endswith(EOF_MARKER) and blob.count(EOF_MARKER) == 1
    assert subprocess.run([SAMTOOLS, "quickcheck", "-v", str(out)], capture_output=True).returncode == 0
    pysam.index(str(out))
    pysam.index(str(one))
    with pysam.AlignmentFile(str(out)) as a, pysam.AlignmentFile(str(one)) as b:
        assert [r.to_string() for r in a] == [r.to_string() for r in b]
        for ref in a.references:
            assert [r.to_string() for r in a.fetch(ref)] == [r.to_string() for r in b.fetch(ref)]
    assert sorted(os.listdir(tmp_path)) == ["one.bam", "one.bam.bai", "regions.bam", "regions.bam.bai"]


def test_a_region_run_to_stdout_ends_with_one_eof_marker(data, tmp_path):
    """To standard output: part 0 streamed, the later parts' blocks after it,
    the EOF marker once the run succeeded; a failed run writes none."""
    from test_reliability import run_isolated

    _, src, _, _ = data
    status, lines, _, out = run_isolated(["dedup", "-q", "-w", "2", str(src), "-o", "-"], tmp_path)
    assert status == 0, lines
    assert out.endswith(EOF_MARKER) and out.count(EOF_MARKER) == 1
    (tmp_path / "stdout.bam").write_bytes(out)
    dedup(src, tmp_path / "file.bam", workers=1)
    assert records(tmp_path / "stdout.bam") == records(tmp_path / "file.bam")
    hdr, reads = support.make_reads(seed=6, molecules=2000)
    bad = _corrupt_late_block(tmp_path, support.write_bam(tmp_path / "big.bam", hdr, reads))
    assert plan_regions(str(bad), 2)[0] is not None
    status, lines, _, out = run_isolated(["dedup", "-q", "-w", "2", str(bad), "-o", "-"], tmp_path)
    assert status == 1 and len(lines) == 1, lines
    assert not out.endswith(EOF_MARKER)
    assert os.listdir(tmp_path / "tmpdir") == []
