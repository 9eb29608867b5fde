"""Which Dask cluster a run uses: a spec string, or a ``distributed.Client``.

=========================================================  ==============================================
spec                                                       cluster
=========================================================  ==============================================
``local:N``                                                a LocalCluster of N worker processes (one
                                                           thread each), started and closed by the run
``tcp://HOST:PORT`` (``tls://`` too)                       an existing scheduler; its workers stay
``slurm:jobs=N,cores=C,memory=M[,queue=Q,account=A,        dask-jobqueue: N batch jobs, each one Dask
walltime=T,processes=P,interface=I]`` (``pbs``, ``sge``,   worker of C cores (P worker processes with
``lsf`` alike)                                             ``processes``), closed by the run
=========================================================  ==============================================

Each bamflow task is itself a local workflow of several processes (reader,
distributor, kernels, compressor threads), so one Dask thread drives about
two cores; a LocalCluster therefore has one thread per worker process.
Dask worker processes are daemonic by default and Python forbids a daemonic
process to start children; bamflow's tasks need children, so clusters
started here run their workers non-daemonic, and a task lifts the flag in a
worker it finds daemonic (bamflow's jobs die with it all the same: each job
process gets a parent-death signal).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

JOBQUEUES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
JOBQUEUE_KEYS = ("jobs", "cores", "memory", "queue", "account", "walltime", "processes", "interface")
#: clusters started here: non-daemonic workers (bamflow's tasks start processes), no
#: statistical profiler sampling every task's stack, and glibc's default malloc
#: trimming (Dask's 64 KiB threshold slows the kernels' buffer churn down)
WORKER_CONFIG = {
    "distributed.worker.daemon": False,
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ": {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1},
}


class ClusterSpecError(ValueError):
    """A cluster spec that cannot be read; the message says what is expected."""


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed spec: ``kind`` is ``local``, ``address`` or a job queue (``slurm`` …)."""

    kind: str
    workers: int = 0  # local: worker processes; job queue: jobs
    address: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # job queue: cores, memory, queue, …

    @property
    def slots(self) -> int | None:
        """Tasks the cluster runs at once, as far as the spec says (None: ask the scheduler)."""
        if self.kind == "local":
            return self.workers
        if self.kind in JOBQUEUES:
            return self.workers * int(self.options["cores"])
        return None


def parse_cluster(spec: str) -> ClusterSpec:
    """Read a cluster spec (see the module doc); raises ClusterSpecError."""
    text = spec.strip()
    if re.match(r"^(tcp|tls|ucx|inproc)://", text):
        return ClusterSpec("address", address=text)
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if kind == "local":
        if not sep or not rest.isdigit() or int(rest) < 1:
            raise ClusterSpecError(f"cluster {spec!r}: local:N needs N >= 1 worker processes, e.g. local:4")
        return ClusterSpec("local", workers=int(rest))
    if kind in JOBQUEUES:
        options: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or not value.strip():
                raise ClusterSpecError(f"cluster {spec!r}: {item!r} is not KEY=VALUE")
            if key not in JOBQUEUE_KEYS:
                raise ClusterSpecError(f"cluster {spec!r}: unknown key {key!r}; keys: {', '.join(JOBQUEUE_KEYS)}")
            options[key] = value.strip()
        missing = [k for k in ("jobs", "cores", "memory") if k not in options]
        if missing:
            raise ClusterSpecError(f"cluster {spec!r}: {kind} needs jobs=N,cores=C,memory=M (missing: {', '.join(missing)})")
        for key in ("jobs", "cores", "processes"):
            if key in options:
                if not options[key].isdigit() or int(options[key]) < 1:
                    raise ClusterSpecError(f"cluster {spec!r}: {key} must be a whole number >= 1, not {options[key]!r}")
                options[key] = int(options[key])
        return ClusterSpec(kind, workers=options.pop("jobs"), options=options)
    raise ClusterSpecError(
        f"cluster {spec!r}: expected local:N, tcp://HOST:PORT or "
        "slurm|pbs|sge|lsf:jobs=N,cores=C,memory=M[,queue=Q,account=A,walltime=T]"
    )


def jobqueue_cluster(spec: ClusterSpec, **overrides: Any) -> Any:
    """The dask-jobqueue cluster of ``spec`` (no job submitted yet): workers run
    this Python, non-daemonic, with one bamflow task per Dask thread."""
    import dask_jobqueue

    cls = getattr(dask_jobqueue, JOBQUEUES[spec.kind])
    options = dict(spec.options)
    kwargs: dict[str, Any] = {
        "cores": options.pop("cores"),
        "memory": options.pop("memory"),
        "processes": options.pop("processes", 1),
        "python": sys.executable,
        "job_name": "bamflow",
        "job_script_prologue": ["export DASK_DISTRIBUTED__WORKER__DAEMON=False"],
    }
    kwargs.update(options)  # queue, account, walltime, interface
    kwargs.update(overrides)
    return cls(**kwargs)


def job_script(spec: str | ClusterSpec) -> str:
    """The batch script one job of a job-queue spec submits (for a look before running)."""
    parsed = parse_cluster(spec) if isinstance(spec, str) else spec
    if parsed.kind not in JOBQUEUES:
        raise ClusterSpecError(f"{parsed.kind} clusters submit no job script")
    cluster = jobqueue_cluster(parsed)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


@contextmanager
def connect(cluster: Any, *, log_directory: str | None = None) -> Iterator[tuple[Any, int | None]]:
    """A ``distributed.Client`` for ``cluster`` (a spec or a Client) and the
    number of tasks the spec says run at once (None: see the scheduler).
    Clusters started here are closed on the way out; a given Client is left
    open. ``log_directory``: where batch jobs write their output (a folder
    the compute nodes share; default: the submitting folder)."""
    try:
        import dask
        import distributed
    except ImportError as e:  # the extra is not installed
        raise ImportError("cluster runs need Dask: pip install 'bamflow[dask]' "
                          "(dask[distributed] and dask-jobqueue)") from e
    if isinstance(cluster, distributed.Client):
        yield cluster, None
        return
    if not isinstance(cluster, str):
        raise TypeError(f"cluster must be a spec string or a distributed.Client, not {type(cluster).__name__}")
    spec = parse_cluster(cluster)
    if spec.kind == "address":
        with distributed.Client(spec.address, set_as_default=False) as client:
            yield client, None
        return
    if spec.kind == "local":
        made = local_cluster(spec.workers)
    else:
        with dask.config.set(WORKER_CONFIG):
            made = jobqueue_cluster(spec, **({"log_directory": log_directory} if log_directory else {}))
            made.scale(jobs=spec.workers)
    try:
        with distributed.Client(made, set_as_default=False) as client:
            yield client, spec.slots
    finally:
        made.close()


def local_cluster(workers: int) -> Any:
    """A LocalCluster of ``workers`` processes, one thread each, forked from
    this process (no fresh interpreter importing everything again: ~1 s
    instead of ~3 s to start), with :data:`WORKER_CONFIG`."""
    import dask
    import distributed

    with dask.config.set({**WORKER_CONFIG, "distributed.worker.multiprocessing-method": "fork"}):
        return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=":0", memory_limit=0)


def lift_daemon_flag() -> None:
    """Let this (Dask worker) process start children: bamflow's jobs."""
    import multiprocessing

    process = multiprocessing.current_process()
    if process.daemon:
        process._config["daemon"] = False  # type: ignore[attr-defined]


def cluster_slots(client: Any) -> int:
    """Threads of the workers the scheduler has now (at least 1)."""
    info = client.scheduler_info()
    return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))


__all__ = [
    "ClusterSpec", "ClusterSpecError", "connect", "job_script", "jobqueue_cluster", "local_cluster", "parse_cluster",
]
