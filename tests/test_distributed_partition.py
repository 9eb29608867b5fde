"""Partitions of a BAM (bamflow.bam.partition) and the BGZF joins of
the gather (bamflow.bam.concat), without a cluster: every record in
exactly one partition for any K, from .bai, .csi, a stale index and a scan,
on files whose records start mid-block."""

import os
import shutil
import struct

import pysam
import pytest

from bamflow.bam.bgzf import EOF_BLOCK, BgzfReader, BgzfWriter
from bamflow.bam.concat import concat_bams
from bamflow.bam.partition import layout_of, partition_bytes, plan_partitions, record_ok
from bamflow.distributed import cluster as clusters
from bamflow.engine.errors import WorkflowError
from bamflow.simulate import simulate_bam

pytestmark = pytest.mark.timeout(120)


def raw_of(path):
    with BgzfReader(path, threads=0) as r:
        return r.read()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A coordinate-sorted BAM (with .bai and .csi copies), the same records
    rewritten so that records straddle BGZF blocks and share the header's block."""
    d = tmp_path_factory.mktemp("partition")
    sorted_bam = str(d / "sorted.bam")
    simulate_bam(sorted_bam, n_reads=6000, n_barcodes=120, n_cells=30, seed=5)
    bai = str(d / "bai.bam")
    csi = str(d / "csi.bam")
    for copy in (bai, csi):
        shutil.copy(sorted_bam, copy)
    pysam.index(bai)
    pysam.index("-c", csi)
    data = raw_of(sorted_bam)
    packed = str(d / "packed.bam")
    with BgzfWriter(packed, level=1, threads=0) as w:  # no block ends after the header
        w.write(data)
    return {"sorted": sorted_bam, "bai": bai, "csi": csi, "packed": packed, "raw": data}


def records_of(raw):
    """The record bytes after the header of a raw BAM stream."""
    l_text = struct.unpack_from("<i", raw, 4)[0]
    p = 8 + l_text
    n_ref = struct.unpack_from("<i", raw, p)[0]
    p += 4
    for _ in range(n_ref):
        p += 4 + struct.unpack_from("<i", raw, p)[0] + 4
    return raw[p:]


@pytest.mark.parametrize("name", ["sorted", "bai", "csi", "packed"])
@pytest.mark.parametrize("k", [1, 2, 7, 16])
def test_partitions_hold_every_record_once(files, name, k):
    plan = plan_partitions(files[name], k)
    expected = {"bai": "index (.bai)", "csi": "index (.csi)"}.get(name, "scan") if k > 1 else "whole file"
    assert plan.source.startswith(expected)
    assert len(plan.partitions) == k  # enough record starts for every target
    joined = b"".join(b"".join(partition_bytes(p, threads=0)) for p in plan.partitions)
    assert joined == records_of(files["raw"])
    starts = [p.start for p in plan.partitions]
    assert starts == sorted(set(starts))
    assert all(a.end == b.start for a, b in zip(plan.partitions, plan.partitions[1:], strict=False))
    if name in ("bai", "csi"):
        assert plan.index_records == 6000


def test_packed_file_splits_inside_blocks(files):
    plan = plan_partitions(files["packed"], 7)
    assert any(p.start[1] for p in plan.partitions[1:])  # record starts found mid-block
    assert layout_of(files["packed"]).first[1] > 0  # the first record shares the header's block


def test_stale_index_is_not_trusted(files, tmp_path):
    """An index of another file (newer than the BAM) names offsets where no record
    starts: the plan notices and scans instead."""
    target = str(tmp_path / "other.bam")
    shutil.copy(files["packed"], target)
    shutil.copy(files["bai"] + ".bai", target + ".bai")
    plan = plan_partitions(target, 5)
    assert plan.source == "scan"
    joined = b"".join(b"".join(partition_bytes(p, threads=0)) for p in plan.partitions)
    assert joined == records_of(files["raw"])


def test_older_index_is_ignored(files, tmp_path):
    target = str(tmp_path / "x.bam")
    shutil.copy(files["bai"], target)
    shutil.copy(files["bai"] + ".bai", target + ".bai")
    os.utime(target + ".bai", (1, 1))
    assert plan_partitions(target, 3).source == "scan"


def test_not_bgzf_or_truncated(files, tmp_path):
    sam = tmp_path / "x.sam"
    sam.write_text("@HD\tVN:1.6\n")
    with pytest.raises(ValueError, match="not a BGZF"):
        plan_partitions(str(sam), 2)
    cut = tmp_path / "cut.bam"
    cut.write_bytes(open(files["sorted"], "rb").read()[:-len(EOF_BLOCK)])
    with pytest.raises(ValueError, match="EOF marker"):
        plan_partitions(str(cut), 2)


def test_record_validation(files):
    records = records_of(files["raw"])
    size = record_ok(records, 0, 25)
    assert size == 4 + struct.unpack_from("<i", records, 0)[0]
    assert record_ok(records, 1, 25) == 0  # not a record start
    assert record_ok(records, 0, 0) == 0  # reference id out of range
    _, _, _, l_name, _, _, n_cigar, _, l_seq = struct.unpack_from("<iiiBBHHHi", records, 0)
    aux = 36 + l_name + 4 * n_cigar + (l_seq + 1) // 2 + l_seq
    broken = bytearray(records[:size])
    broken[aux + 2] = ord("Q")  # no such aux type
    assert record_ok(bytes(broken), 0, 25) == 0
    broken = bytearray(records[:size])
    broken[36 + l_name - 1] = ord("x")  # the read name is not NUL-terminated
    assert record_ok(bytes(broken), 0, 25) == 0


def test_concat_bams_joins_blocks(files, tmp_path):
    """Two BAMs with one header joined: the header once, the records of both, one EOF."""
    out = str(tmp_path / "joined.bam")
    result = concat_bams([files["sorted"], files["packed"]], out)
    assert result["parts"] == 2
    data = raw_of(out)
    records = records_of(files["raw"])
    assert data == files["raw"] + records
    with open(out, "rb") as f:
        assert f.read().count(EOF_BLOCK) == 1
    other = str(tmp_path / "other.bam")
    with pysam.AlignmentFile(other, "wb", header={"HD": {"VN": "1.6"}, "SQ": [{"SN": "x", "LN": 10}]}):
        pass
    with pytest.raises(WorkflowError, match="header differs"):
        concat_bams([files["sorted"], other], str(tmp_path / "bad.bam"))


# -- cluster specs (no cluster needed) -----------------------------------------------------


@pytest.mark.parametrize("spec, kind, workers, slots", [
    ("local:3", "local", 3, 3),
    ("tcp://127.0.0.1:8786", "address", 0, None),
    ("slurm:jobs=4,cores=8,memory=16GB,queue=short,account=lab,walltime=01:00:00", "slurm", 4, 32),
    ("PBS:jobs=2,cores=4,memory=8GB", "pbs", 2, 8),
    ("lsf:jobs=1,cores=2,memory=4GB,processes=2", "lsf", 1, 2),
])
def test_cluster_specs(spec, kind, workers, slots):
    parsed = clusters.parse_cluster(spec)
    assert (parsed.kind, parsed.workers, parsed.slots) == (kind, workers, slots)


@pytest.mark.parametrize("spec, message", [
    ("local:0", "N >= 1"),
    ("local", "N >= 1"),
    ("slurm:jobs=2,cores=4", "missing: memory"),
    ("slurm:jobs=x,cores=4,memory=1GB", "whole number"),
    ("slurm:jobs=1,cores=1,memory=1GB,color=red", "unknown key"),
    ("slurm:jobs", "KEY=VALUE"),
    ("yarn:1", "expected local:N"),
])
def test_bad_cluster_specs(spec, message):
    with pytest.raises(clusters.ClusterSpecError, match=message):
        clusters.parse_cluster(spec)


def test_slurm_job_script():
    """The batch script dask-jobqueue submits for a SLURM spec: the resources asked,
    this Python, workers allowed to start processes."""
    pytest.importorskip("dask_jobqueue")
    script = clusters.job_script("slurm:jobs=2,cores=4,memory=8GB,queue=short,account=lab,walltime=00:30:00")
    for line in ("#SBATCH -p short", "#SBATCH -A lab", "#SBATCH -n 1", "#SBATCH --cpus-per-task=4", "#SBATCH -t 00:30:00",
                 "export DASK_DISTRIBUTED__WORKER__DAEMON=False"):
        assert line in script, line
    assert "#SBATCH --mem=" in script
    import sys

    assert sys.executable in script
    assert "--nthreads 4" in script


def test_tsv_fields_read_back():
    """(the count gather reads what Publication.write_tsv writes, escapes included)"""
    from bamflow.distributed.tasks import _unescape
    from bamflow.engine.publish import escape_field

    for value in (b"plain", b"tab\there", b"back\\slash", b"nl\nx", b"\xff\xfe"):
        assert _unescape(escape_field(value).encode("utf-8", "surrogateescape")) == value
