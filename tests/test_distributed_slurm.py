"""A cluster run through SLURM: dask-jobqueue submits a batch job that starts a
Dask worker, bamflow's tasks run in it. Runs where a SLURM controller answers
with an idle node (``bash .ci/slurm-start.sh`` starts a one-node cluster as
root); elsewhere it is skipped, and test_distributed_partition.py checks the
job script such a run submits."""

import os
import shutil
import subprocess

import pytest

import bamflow
from bamflow.bam.bgzf import BgzfReader
from bamflow.simulate import simulate_bam

pytest.importorskip("dask_jobqueue")

import bamflow.distributed as bd  # noqa: E402


def slurm_idle() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(s in ("idle", "mixed") for s in states.split())


pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not slurm_idle(), reason="no SLURM controller with an idle node (bash .ci/slurm-start.sh)"),
]


def raw_of(path):
    with BgzfReader(path, threads=0) as r:
        return r.read()


def test_shard_on_slurm(tmp_path):
    src = str(tmp_path / "in.bam")
    simulate_bam(src, n_reads=5000, n_barcodes=100, n_cells=20, seed=4)
    out, ref = str(tmp_path / "slurm"), str(tmp_path / "local")
    reports = []
    result = bd.shard(src, out, cluster=f"slurm:jobs=1,cores={min(2, os.cpu_count() or 1)},memory=2GB,walltime=00:10:00",
                      partitions=3, n=3, command_line="t", on_progress=reports.append)
    local = bamflow.shard(src, ref, n=3, command_line="t")
    assert result.written == local.written
    for name in sorted(os.listdir(ref)):
        if name.endswith(".bam"):
            assert raw_of(os.path.join(out, name)) == raw_of(os.path.join(ref, name)), name
    assert open(os.path.join(out, "manifest.tsv")).read() == open(os.path.join(ref, "manifest.tsv")).read()
    assert reports and reports[-1].workers  # a worker in a batch job did the work
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == sorted(
        n for n in os.listdir(ref) if not n.startswith("."))
