"""bamflow.distributed on a LocalCluster of worker processes: shard, dedup and
count give the local functions' results for K = 1, 2, 7 partitions, on
indexed and unindexed input; a Dask worker killed mid-task; a task that
fails; scratch removed either way; progress reports."""

import gzip
import os
import shutil
import struct
import sys

import pysam
import pytest

import bamflow
from bamflow.bam.bgzf import BgzfReader, BgzfWriter
from bamflow.presets.count import count as local_count
from bamflow.presets.dedup import dedup as local_dedup
from bamflow.simulate import simulate_bam

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

import test_distributed_hooks as hooks  # noqa: E402

import bamflow.distributed as bd  # noqa: E402
from bamflow.distributed.cluster import local_cluster  # noqa: E402

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))
CL = "bamflow test"  # one @PG command line for local and cluster runs


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each, for the whole module (they import
    the fault hooks from this folder)."""
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = HERE + (os.pathsep + path if path else "")  # workers restarted after a kill spawn
    sys.path.insert(0, HERE)
    try:
        cluster = local_cluster(2)
        with distributed.Client(cluster, set_as_default=False) as c:
            yield c
        cluster.close()
    finally:
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path


def raw_of(path):
    with BgzfReader(path, threads=0) as r:
        return r.read()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Sorted (unindexed, and a copy with .bai), unsorted; 12,000 reads."""
    d = tmp_path_factory.mktemp("inputs")
    plain = str(d / "sorted.bam")
    simulate_bam(plain, n_reads=12000, n_barcodes=240, n_cells=60, seed=11)
    indexed = str(d / "indexed.bam")
    shutil.copy(plain, indexed)
    pysam.index(indexed)
    unsorted = str(d / "unsorted.bam")
    simulate_bam(unsorted, n_reads=12000, n_barcodes=240, n_cells=60, seed=11, sort="unsorted")
    return {"plain": plain, "indexed": indexed, "unsorted": unsorted}


@pytest.fixture(scope="module")
def expected(inputs, tmp_path_factory):
    """The local functions' outputs (the references)."""
    d = tmp_path_factory.mktemp("expected")
    out = {}
    for name in ("plain", "unsorted"):
        out[f"dedup-{name}"] = str(d / f"dedup-{name}.bam")
        out[f"dedup-{name}-stats"] = local_dedup(inputs[name], out[f"dedup-{name}"], workers=2, command_line=CL)
    out["shard"] = str(d / "shard")
    out["shard-stats"] = bamflow.shard(inputs["plain"], out["shard"], n=3, command_line=CL)
    out["count"] = str(d / "count")
    out["count-stats"] = local_count(inputs["plain"], out["count"], formats=("mtx", "tsv"))
    return out


def same_folder(a, b):
    """The files of two output folders hold the same data (gzip and BGZF decompressed)."""
    names = sorted(n for n in os.listdir(a) if not n.startswith("."))
    assert names == sorted(n for n in os.listdir(b) if not n.startswith("."))
    for name in names:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if name.endswith(".bam"):
            assert raw_of(pa) == raw_of(pb), name
        elif name.endswith(".gz"):
            assert gzip.open(pa).read() == gzip.open(pb).read(), name
        else:
            assert open(pa, "rb").read() == open(pb, "rb").read(), name


def no_scratch_left(folder):
    left = [n for n in os.listdir(folder) if n.endswith(".tmp") or "-dask" in n or n.startswith(".bamflow-parts")]
    assert left == [], f"scratch or temporary files left: {left}"


STATS = ("reads_in", "kept", "mates", "written", "dropped", "molecules", "positions")


@pytest.mark.parametrize("source", ["plain", "indexed"])
@pytest.mark.parametrize("k", [1, 2, 7])
def test_dedup_equals_local(client, inputs, expected, tmp_path, source, k):
    out = str(tmp_path / "out.bam")
    stats = bd.dedup(inputs[source], out, cluster=client, partitions=k, buckets=2, command_line=CL)
    assert raw_of(out) == raw_of(expected["dedup-plain"])
    assert {s: stats[s] for s in STATS} == {s: expected["dedup-plain-stats"][s] for s in STATS}
    assert stats["cluster"]["partitions"] == k
    assert stats["cluster"]["split_points"] == ("whole file" if k == 1 else
                                                "index (.bai)" if source == "indexed" else "scan")
    no_scratch_left(str(tmp_path))


@pytest.mark.parametrize("mark", [False, True])
def test_dedup_merged_by_ranges(client, inputs, expected, tmp_path, mark):
    """The gather split by coordinate range (as on a cluster of several hosts):
    each range merged and compressed by its own task, the ranges joined."""
    out = str(tmp_path / "out.bam")
    stats = bd.dedup(inputs["plain"], out, cluster=client, partitions=7, buckets=2, gather_ranges=4, mark=mark,
                     command_line=CL)
    assert len(stats["cluster"]["task_seconds"]["merge"]) == 4
    if mark:
        reference = str(tmp_path / "local.bam")
        local_dedup(inputs["plain"], reference, workers=2, mark=True, command_line=CL)
        with pysam.AlignmentFile(out) as a, pysam.AlignmentFile(reference) as b:
            got, want = [r.to_string() for r in a], [r.to_string() for r in b]
        assert sorted(got) == sorted(want)  # the reads without a cell may sit elsewhere among equal coordinates
        assert len(got) == 12000
    else:
        assert raw_of(out) == raw_of(expected["dedup-plain"])
    no_scratch_left(str(tmp_path))


def test_compressed_shuffle(client, inputs, expected, tmp_path):
    """Bucket files in BGZF (less for a shared filesystem to carry): the same results."""
    out = str(tmp_path / "out.bam")
    stats = bd.dedup(inputs["plain"], out, cluster=client, partitions=3, buckets=2, shuffle_level="fast",
                     command_line=CL)
    assert raw_of(out) == raw_of(expected["dedup-plain"])
    assert {s: stats[s] for s in STATS} == {s: expected["dedup-plain-stats"][s] for s in STATS}
    counts = str(tmp_path / "counts")
    bd.count(inputs["plain"], counts, cluster=client, partitions=3, buckets=3, shuffle_level=1, formats=("mtx", "tsv"))
    same_folder(counts, expected["count"])


def test_dedup_unsorted_input(client, inputs, expected, tmp_path):
    """Unsorted input: the reduce outputs are joined block by block (no
    recompression); the same reads as the local run (whose order varies from
    run to run: its collector takes whatever worker has data)."""
    out = str(tmp_path / "out.bam")
    stats = bd.dedup(inputs["unsorted"], out, cluster=client, partitions=3, buckets=3, command_line=CL)
    with pysam.AlignmentFile(out, check_sq=False) as a, pysam.AlignmentFile(expected["dedup-unsorted"], check_sq=False) as b:
        assert str(a.header) == str(b.header)
        assert sorted(r.to_string() for r in a) == sorted(r.to_string() for r in b)
    assert {s: stats[s] for s in STATS} == {s: expected["dedup-unsorted-stats"][s] for s in STATS}


@pytest.mark.parametrize("source", ["plain", "indexed"])
@pytest.mark.parametrize("k", [1, 2, 7])
def test_shard_equals_local(client, inputs, expected, tmp_path, source, k):
    out = str(tmp_path / "shards")
    result = bd.shard(inputs[source], out, cluster=client, partitions=k, n=3, command_line=CL)
    same_folder(out, expected["shard"])
    local = expected["shard-stats"]
    assert (result.reads_in, result.written, result.dropped, result.values) == (
        local.reads_in, local.written, local.dropped, local.values)
    no_scratch_left(out)


@pytest.mark.parametrize("source", ["plain", "indexed"])
@pytest.mark.parametrize("k", [1, 2, 7])
def test_count_equals_local(client, inputs, expected, tmp_path, source, k):
    out = str(tmp_path / "counts")
    stats = bd.count(inputs[source], out, cluster=client, partitions=k, buckets=3, formats=("mtx", "tsv"))
    same_folder(out, expected["count"])
    local = expected["count-stats"]
    for key in ("reads_in", "counted", "dropped", "cells", "genes", "molecules", "overwritten"):
        assert stats[key] == local[key], key
    no_scratch_left(out)


@pytest.mark.parametrize("source, k", [("plain", 7), ("indexed", 2)])
def test_split_equals_local(client, inputs, tmp_path, source, k):
    """One file per cell, each from one reduce task, the manifest as the local run's."""
    a, b = str(tmp_path / "cluster"), str(tmp_path / "local")
    stats = bd.split_reads(inputs[source], a, cluster=client, partitions=k, buckets=3, min_reads=50, command_line=CL)
    local = bamflow.split_reads(inputs["plain"], b, min_reads=50, command_line=CL)
    same_folder(a, b)
    assert {k: v for k, v in stats.items() if k not in ("cluster", "manifest")} == {
        k: v for k, v in local.items() if k != "manifest"}
    no_scratch_left(a)


def test_split_groups_join_buckets(client, inputs, tmp_path):
    """A group's cells are in several buckets: its file joins their parts (the
    same reads as the local run; their order follows the buckets)."""
    barcodes = open_barcodes(inputs["plain"])
    groups = tmp_path / "groups.tsv"
    groups.write_text("".join(f"{c}\tg{i % 3}\n" for i, c in enumerate(barcodes)))
    a, b = str(tmp_path / "cluster"), str(tmp_path / "local")
    stats = bd.split_reads(inputs["plain"], a, cluster=client, partitions=3, buckets=3, groups=str(groups),
                           min_reads=3500, command_line=CL)
    local = bamflow.split_reads(inputs["plain"], b, groups=str(groups), min_reads=3500, command_line=CL)
    assert {k: v for k, v in stats.items() if k not in ("cluster", "manifest")} == {
        k: v for k, v in local.items() if k != "manifest"}
    assert open(os.path.join(a, "manifest.tsv")).read() == open(os.path.join(b, "manifest.tsv")).read()
    for name in sorted(n for n in os.listdir(b) if n.endswith(".bam")):
        with pysam.AlignmentFile(os.path.join(a, name), check_sq=False) as x, \
                pysam.AlignmentFile(os.path.join(b, name), check_sq=False) as y:
            assert str(x.header) == str(y.header)
            assert sorted(r.to_string() for r in x) == sorted(r.to_string() for r in y)


@pytest.mark.parametrize("k", [1, 7])
def test_correct_equals_local(client, inputs, tmp_path, k):
    """Barcode counts summed over the partitions, each partition corrected with
    them: the local run's records, in the input's order."""
    from bamflow.presets.correct import correct as local_correct

    whitelist = tmp_path / "whitelist.txt"
    whitelist.write_text("".join(c.split("-")[0] + "\n" for c in open_barcodes(inputs["plain"])[::2]))
    a, b = str(tmp_path / "a.bam"), str(tmp_path / "b.bam")
    stats = bd.correct(inputs["indexed"], a, whitelist=str(whitelist), cluster=client, partitions=k, command_line=CL,
                       tag_out="XB")
    local = local_correct(inputs["plain"], b, whitelist=str(whitelist), command_line=CL, tag_out="XB")
    assert raw_of(a) == raw_of(b)
    keys = ("reads_in", "written", "exact", "corrected", "ambiguous", "uncorrectable", "missing_tag", "barcodes_seen")
    assert {x: stats[x] for x in keys} == {x: local[x] for x in keys}
    assert stats["corrected"] > 0 and stats["uncorrectable"] > 0


def test_count_cells_and_min_umis(client, inputs, tmp_path):
    """Column choices happen once, on the merged table."""
    listed = ["AAAA", *[c for c in open_barcodes(inputs["plain"])[:5]]]
    for kwargs in ({"cells": listed}, {"min_umis": 20}):
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        bd.count(inputs["plain"], a, cluster=client, partitions=2, buckets=2, formats=("mtx",), **kwargs)
        local_count(inputs["plain"], b, formats=("mtx",), **kwargs)
        same_folder(a, b)
        shutil.rmtree(a)
        shutil.rmtree(b)


def open_barcodes(path):
    with pysam.AlignmentFile(path) as f:
        return sorted({r.get_tag("CB") for r in f if r.has_tag("CB")})


def test_killed_worker_mid_task(client, inputs, expected, tmp_path):
    """The Dask worker running map task 1 is killed (SIGKILL) once that task has
    written part of its output: the scheduler runs the task again, the killed
    attempt's files are never read, and the result is the same as ever."""
    out = str(tmp_path / "out.bam")
    markers = tmp_path / "markers"
    markers.mkdir()
    reports = []
    stats = bd.dedup(inputs["plain"], out, cluster=client, partitions=3, buckets=2, command_line=CL,
                     _hook=hooks.KillWorkerOnce("map", 1, str(markers)), on_progress=reports.append)
    assert (markers / hooks.MARKER).exists()  # the kill happened
    assert raw_of(out) == raw_of(expected["dedup-plain"])  # nothing twice, nothing lost
    assert {s: stats[s] for s in STATS} == {s: expected["dedup-plain-stats"][s] for s in STATS}
    assert max(p.retried for r in reports for p in r.phases if p.name == "map") == 1
    no_scratch_left(str(tmp_path))
    client.wait_for_workers(2, timeout=60)


def test_failing_task_fails_the_run(client, inputs, tmp_path):
    """A task that raises fails the run with its traceback; nothing is
    published; scratch is removed, also from a scratch folder given."""
    out = str(tmp_path / "out.bam")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(bd.DistributedError) as info:
        bd.dedup(inputs["plain"], out, cluster=client, partitions=2, buckets=2, scratch=str(scratch),
                 _hook=hooks.FailTask("reduce", 1))
    first = str(info.value).splitlines()[0]
    assert first == "reduce task 2 of 2 (bucket 1) failed: ValueError: injected failure in reduce task 1"
    assert "test_distributed_hooks.py" in info.value.child_traceback
    assert not os.path.exists(out)
    assert os.listdir(scratch) == []
    no_scratch_left(str(tmp_path))


def test_timeout_stops_running_tasks(client, inputs, tmp_path):
    """A run that outlives its timeout fails; its running tasks see the STOP
    file and stop their workflows; nothing is published, scratch is removed."""
    out = str(tmp_path / "out.bam")
    reports = []
    with pytest.raises(bd.DistributedError, match="timed out after 1 s, in its map phase"):
        bd.dedup(inputs["plain"], out, cluster=client, partitions=2, buckets=2, timeout=1,
                 _hook=hooks.HoldUntilStop("map"), on_progress=reports.append)
    assert reports[-1].phases[0].state == "failed" and reports[-1].phases[0].running == 0
    assert not os.path.exists(out)
    no_scratch_left(str(tmp_path))


def corrupt_copy(path, target):
    """``path`` with one record in the middle made invalid (an aux value of no type)."""
    data = raw_of(path)
    l_text = struct.unpack_from("<i", data, 4)[0]
    p = 8 + l_text
    n_ref = struct.unpack_from("<i", data, p)[0]
    p += 4
    for _ in range(n_ref):
        p += 8 + struct.unpack_from("<i", data, p)[0]
    for _ in range(7000):
        p += 4 + struct.unpack_from("<i", data, p)[0]
    _, _, _, l_name, _, _, n_cigar, _, l_seq = struct.unpack_from("<iiiBBHHHi", data, p)
    aux = p + 36 + l_name + 4 * n_cigar + (l_seq + 1) // 2 + l_seq
    broken = bytearray(data)
    broken[aux + 2] = ord("Q")
    with BgzfWriter(target, threads=0) as w:
        w.write(bytes(broken))


def test_bad_record_fails_its_map_task(client, inputs, tmp_path):
    bad = str(tmp_path / "bad.bam")
    corrupt_copy(inputs["plain"], bad)
    out = str(tmp_path / "counts")
    with pytest.raises(bd.DistributedError, match=r"^map task \d of 4 \(.*\) failed: .*record"):
        bd.count(bad, out, cluster=client, partitions=4, buckets=2)
    assert not os.path.exists(out) or os.listdir(out) == []


def test_progress_reports(client, inputs, tmp_path):
    reports = []
    bd.count(inputs["plain"], str(tmp_path / "c"), cluster=client, partitions=3, buckets=2, formats=("tsv",),
             on_progress=reports.append)
    last = reports[-1]
    assert [p.name for p in last.phases] == ["map", "reduce", "gather"]
    assert [(p.total, p.done, p.failed, p.state) for p in last.phases] == [(3, 3, 0, "done"), (2, 2, 0, "done"),
                                                                         (1, 1, 0, "done")]
    assert last.phases[0].records == 12000
    assert last.workers and sum(w.done for w in last.workers) == 6
    assert all(w.worker.startswith("tcp://") for w in last.workers)
    assert any(p.running for r in reports for p in r.phases) or len(reports) > 3


def test_one_task_when_cells_cannot_be_split(client, inputs, expected, tmp_path):
    """umi_tools' random draws run through all cells: one task runs the whole input."""
    a, b = str(tmp_path / "a.bam"), str(tmp_path / "b.bam")
    stats = bd.dedup(inputs["plain"], a, cluster=client, random_seed=7, command_line=CL)
    local_dedup(inputs["plain"], b, random_seed=7, command_line=CL)
    assert raw_of(a) == raw_of(b)
    assert stats["cluster"]["partitions"] == 1 and list(stats["cluster"]["task_seconds"]) == ["whole"]


def test_one_task_outputs(client, inputs, tmp_path):
    """Runs in one task publish every output the local run writes: dedup's
    umi_tools stats tables, count's table without cells."""
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
    bd.dedup(inputs["plain"], str(tmp_path / "a" / "out.bam"), cluster=client, output_stats=str(tmp_path / "a" / "st"),
             random_seed=3, command_line=CL)
    local_dedup(inputs["plain"], str(tmp_path / "b" / "out.bam"), output_stats=str(tmp_path / "b" / "st"),
                random_seed=3, command_line=CL)
    same_folder(str(tmp_path / "a"), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "a")) == ["out.bam", "st_edit_distance.tsv", "st_per_umi.tsv",
                                                  "st_per_umi_per_position.tsv"]
    a, b = str(tmp_path / "ca"), str(tmp_path / "cb")
    bd.count(inputs["plain"], a, cluster=client, per_cell=False, formats=("tsv",))
    local_count(inputs["plain"], b, per_cell=False, formats=("tsv",))
    same_folder(a, b)


def test_local_spec_starts_and_stops_a_cluster(inputs, expected, tmp_path):
    out = str(tmp_path / "shards")
    bd.shard(inputs["plain"], out, cluster="local:1", partitions=2, n=3, command_line=CL)
    same_folder(out, expected["shard"])


def test_bad_arguments_fail_before_the_cluster(inputs, tmp_path):
    with pytest.raises(bd.ClusterSpecError):
        bd.dedup(inputs["plain"], str(tmp_path / "o.bam"), cluster="local:0")
    with pytest.raises(ValueError, match="standard input"):
        bd.dedup("-", str(tmp_path / "o.bam"), cluster="local:1")
    with pytest.raises(TypeError, match="unexpected keyword"):
        bd.dedup(inputs["plain"], str(tmp_path / "o.bam"), cluster="local:1", colour="red")
