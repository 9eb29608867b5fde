"""bamflow beyond one machine: the same commands as tasks on a Dask cluster.

A run becomes tasks, each a normal local bamflow workflow (its processes
and FIFOs) on one part of the input; only small arguments travel through
Dask (paths, virtual offsets, bucket numbers, counts), the data moves
through a shared filesystem (``scratch``)::

    plan (driver)     map × K                     reduce × R                 gather
    ─────────────     ───────                     ──────────                 ──────
    split points  ─▶  partition k ─▶ buckets  ─▶  bucket b: the preset   ─▶  one BAM (blocks joined or merged),
    (index/scan)      by cell hash                (dedup, count, …)          matrices stacked, manifests;
                                                                             books checked, then published

:func:`dedup`, :func:`count`, :func:`shard`, :func:`split_reads`, :func:`correct` take the local functions'
arguments plus ``cluster=`` (``local:N``, ``tcp://HOST:PORT``,
``slurm|pbs|sge|lsf:jobs=N,cores=C,memory=M[,…]``, or a
``distributed.Client``); see docs/distributed.md. Needs the ``dask`` extra
(``dask[distributed]``, ``dask-jobqueue``); importing this package does not.
"""

from ..bam.partition import Partition, Plan, plan_partitions
from .api import ClusterArgs, correct, count, dedup, shard, split_reads
from .cluster import ClusterSpec, ClusterSpecError, connect, job_script, parse_cluster
from .executor import ClusterProgress, DistributedError, PhaseProgress, WorkerProgress

__all__ = [
    "ClusterArgs",
    "ClusterProgress",
    "ClusterSpec",
    "ClusterSpecError",
    "DistributedError",
    "Partition",
    "PhaseProgress",
    "Plan",
    "WorkerProgress",
    "connect",
    "correct",
    "count",
    "dedup",
    "job_script",
    "parse_cluster",
    "plan_partitions",
    "shard",
    "split_reads",
]
