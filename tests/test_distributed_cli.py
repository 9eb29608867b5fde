"""`--cluster` on the command line: the same outputs as without it, and the
cluster's progress (phases, workers) in the display."""

import json
import subprocess

import pysam
import pytest

pytest.importorskip("distributed")

EXAMPLE = "test_data/example.bam"


def names_in(path):
    with pysam.AlignmentFile(str(path)) as f:
        return sorted(r.query_name for r in f)


def test_shard_on_a_local_cluster_equals_the_local_run(tmp_path):
    local = subprocess.run(["bamflow", "shard", "-q", "-n", "4", "-o", str(tmp_path / "local"), EXAMPLE],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    run = subprocess.run(["bamflow", "shard", "-n", "4", "--cluster", "local:2", "--progress", "json",
                          "-o", str(tmp_path / "cluster"), EXAMPLE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "summary" and events[-1]["reads_in"] == 10000
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and {p["name"] for p in progress[-1]["phases"]} >= {"map"}
    for i in range(4):
        name = f"shard_{i:03d}.bam"
        assert names_in(tmp_path / "cluster" / name) == names_in(tmp_path / "local" / name)
    assert (tmp_path / "cluster" / "manifest.tsv").read_text() == (tmp_path / "local" / "manifest.tsv").read_text()


def test_cluster_options_need_cluster(tmp_path):
    r = subprocess.run(["bamflow", "shard", "--partitions", "3", "-o", str(tmp_path / "x"), EXAMPLE],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "go with --cluster" in r.stderr


def test_dedup_and_count_on_a_local_cluster_equal_the_local_runs(tmp_path):
    """--cluster on the UMI commands: dedup keeps the same reads, count writes the same table."""
    for command, local_out, cluster_out in (("dedup", tmp_path / "local.bam", tmp_path / "cluster.bam"),
                                            ("count", tmp_path / "local_counts", tmp_path / "cluster_counts")):
        extra = ["--formats", "tsv"] if command == "count" else []
        local = subprocess.run(["bamflow", command, "-q", *extra, "-o", str(local_out), EXAMPLE],
                               capture_output=True, text=True, timeout=120)
        assert local.returncode == 0, local.stderr
        run = subprocess.run(["bamflow", command, "-q", *extra, "--cluster", "local:2", "-o", str(cluster_out), EXAMPLE],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert names_in(tmp_path / "cluster.bam") == names_in(tmp_path / "local.bam")
    local_rows = sorted((tmp_path / "local_counts" / "counts.tsv").read_text().splitlines())
    assert local_rows and sorted((tmp_path / "cluster_counts" / "counts.tsv").read_text().splitlines()) == local_rows


def test_dedup_on_a_cluster_needs_an_output_file(tmp_path):
    r = subprocess.run(["bamflow", "dedup", "--cluster", "local:1", EXAMPLE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "with --cluster the output is a file" in r.stderr
