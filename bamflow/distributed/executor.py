"""Running a bamflow run as Dask tasks: the driver's side (:class:`Run`) and
the wrapper every task runs in (:func:`run_task`).

::

    driver (this process)                          Dask workers (any machine)
    ─────────────────────                          ──────────────────────────
    Run: scratch folder on the shared filesystem
      phase "map":    submit K tasks ───────────▶  run_task: a local bamflow workflow
      (wait, report progress, stop on an error)       writes SCRATCH/map/.k.ATTEMPT.tmp/…,
                                                      renames it to SCRATCH/map/k when done;
                                                      returns a small dict (counts, names)
      phase "reduce": submit R tasks ───────────▶  …
      phase "gather": …
      check the books, publish, remove scratch

Only small arguments and results travel through Dask (paths, virtual
offsets, bucket numbers, counts); data moves through the shared filesystem.

**Atomic task outputs.** A task writes into a folder named for its attempt
and renames it to the task's folder when everything in it is complete; the
next phase reads only task folders. An attempt killed midway (its Dask
worker died) leaves an attempt folder nobody reads, and the scheduler runs
the task again elsewhere; a retry that finds the task's folder complete
(the first attempt finished, but its worker died before reporting) returns
what that attempt recorded. So a result never holds an output twice.

**Failures.** A task that raises fails the run: the driver cancels the
other tasks, tells the running ones to stop (a ``STOP`` file their workflow's
progress callback looks for: the workflow then stops its processes), waits
for them, and raises :class:`DistributedError` with the task's name and
traceback. The scheduler retries a task whose worker died (up to
``distributed.scheduler.allowed-failures`` times, 3 by default); an
exception is not retried unless ``retries`` says so (a deterministic error
would only fail again). Scratch is removed on success and on failure.

**Progress.** Each attempt writes a small JSON file (worker, records, bytes,
state) about twice a second from its workflow's progress callback; the
driver reads them and calls ``on_progress`` with a :class:`ClusterProgress`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.errors import WorkflowError

log = logging.getLogger("bamflow")

STOP = "STOP"
RESULT = "result.json"
PROGRESS_EVERY = 0.5  # seconds between two progress files of a task
STOP_WAIT = 60.0  # seconds the driver waits for running tasks to stop after a failure


class DistributedError(WorkflowError):
    """A cluster run failed. ``str()`` starts with one line naming the task
    (``map task 3 of 7 failed: ValueError: …``); ``task`` names it and
    ``child_traceback`` holds the task's traceback."""


class TaskStopped(WorkflowError):
    """A task stopped because its run is ending (another task failed)."""


# -- progress ------------------------------------------------------------------------------------


@dataclass
class PhaseProgress:
    """One phase of a run: its tasks done, running, failed (and retried)."""

    name: str
    total: int = 0
    done: int = 0
    running: int = 0
    failed: int = 0
    retried: int = 0  # tasks that needed more than one attempt so far
    records: int = 0  # records read by its tasks (finished ones and the running attempts)
    bytes_in: int = 0
    seconds: float = 0.0  # since the phase started (0 before)
    state: str = "waiting"  # waiting, running, done, failed, skipped (nothing to do: a run's last report)

    @property
    def waiting(self) -> int:
        return max(0, self.total - self.done - self.running - self.failed)


@dataclass
class WorkerProgress:
    """One Dask worker: its tasks of this run and its throughput."""

    worker: str  # the worker's address
    host: str
    running: int = 0
    done: int = 0
    records: int = 0  # records its tasks read (finished and running attempts)
    busy_seconds: float = 0.0  # seconds its tasks of this run have been running
    records_per_second: float = 0.0  # over the last report interval
    mean_records_per_second: float = 0.0  # records / busy_seconds


@dataclass
class ClusterProgress:
    """What ``on_progress`` receives, about twice a second and once at the end of each phase."""

    run: str  # the run's name (dedup, count, shard, …)
    phase: str  # the phase running now
    phases: list[PhaseProgress]
    workers: list[WorkerProgress]
    elapsed: float  # seconds since the run started
    dashboard: str | None = None  # the scheduler's dashboard, when it has one


# -- the task side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskContext:
    """What a task knows of its run (small: it travels with every task)."""

    scratch: str
    phase: str
    index: int
    total: int
    hook: Callable[..., Any] | None = None  # tests: called from the progress callback with (context, attempt dir)

    @property
    def final(self) -> str:
        return os.path.join(self.scratch, self.phase, str(self.index))

    def path(self, phase: str, index: int, name: str) -> str:
        """A file another task of this run completed."""
        return os.path.join(self.scratch, phase, str(index), name)


class _Reporter:
    """A task's workflow progress callback: writes the attempt's progress file,
    stops the workflow when the run is stopping, and calls the test hook."""

    def __init__(self, ctx: TaskContext, attempt: str, folder: str, worker: str) -> None:
        self.ctx = ctx
        self.folder = folder
        self.path = os.path.join(ctx.scratch, "progress", f"{ctx.phase}-{ctx.index}-{attempt}.json")
        self.info = {"phase": ctx.phase, "index": ctx.index, "attempt": attempt, "worker": worker,
                     "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.records = self.bytes_in = 0
        self.base_records = self.base_bytes = 0  # of the task's workflows that ended
        self.last = 0.0
        self.write("running")

    def __call__(self, snapshot: Sequence[Any]) -> None:
        if snapshot:
            self.records = self.base_records + max(p.records for p in snapshot)
            self.bytes_in = self.base_bytes + max(p.bytes_in for p in snapshot)
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            if os.path.exists(os.path.join(self.ctx.scratch, STOP)):
                raise TaskStopped(f"{self.ctx.phase} task {self.ctx.index}: stopped (the run is ending)")
            self.write("running")
        if self.ctx.hook is not None:
            self.ctx.hook(self.ctx, self.folder)

    def workflow_done(self) -> None:
        """A workflow of the task ended: its counts stay, the next one's add to them."""
        self.base_records, self.base_bytes = self.records, self.bytes_in

    def write(self, state: str, **extra: Any) -> None:
        data = {**self.info, "state": state, "records": self.records, "bytes_in": self.bytes_in,
                "updated": time.time(), **extra}
        temp = self.path + ".tmp"
        try:
            with open(temp, "w") as f:
                json.dump(data, f)
            os.replace(temp, self.path)
        except OSError:
            pass  # progress is best effort; the scratch folder may be going away


def run_task(ctx: TaskContext, func: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run ``func(ctx, folder, report, **kwargs)`` on a Dask worker: ``folder``
    is the attempt's private folder, renamed to the task's folder when
    ``func`` returned; returns its (small) result with where it ran."""
    from .cluster import lift_daemon_flag

    lift_daemon_flag()
    phase_dir = os.path.dirname(ctx.final)
    if not os.path.isdir(phase_dir):
        raise WorkflowError(f"{ctx.phase} task {ctx.index}: the scratch folder {ctx.scratch} is not visible on "
                            f"{socket.gethostname()}: give a scratch folder on a filesystem every worker shares")
    done = _recorded(ctx.final)
    if done is not None:  # an earlier attempt completed; its worker died before reporting
        return done
    attempt = secrets.token_hex(4)
    folder = os.path.join(phase_dir, f".{ctx.index}.{attempt}.tmp")
    os.mkdir(folder)
    worker = _worker_address()
    report = _Reporter(ctx, attempt, folder, worker)
    started, cpu = time.monotonic(), _cpu_seconds()
    try:
        result = func(ctx, folder, report, **kwargs)
        result = {**result, "_worker": worker, "_host": report.info["host"], "_seconds": time.monotonic() - started,
                  "_cpu": _cpu_seconds() - cpu, "_records": report.records, "_attempt": attempt}
        with open(os.path.join(folder, RESULT), "w") as f:
            json.dump(result, f)
        try:
            os.rename(folder, ctx.final)
        except OSError:  # another attempt finished first: its outputs stand, ours go
            shutil.rmtree(folder, ignore_errors=True)
            done = _recorded(ctx.final)
            if done is None:
                raise
            result = done
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        report.write("failed", error=f"{type(e).__name__}: {e}")
        raise
    report.write("done", seconds=result["_seconds"])
    return result


def _cpu_seconds() -> float:
    """CPU time of this worker process (its threads: a task's compression
    threads too) and of the child processes it reaped (a task's job
    processes, reaped before it returns). Exact with one task at a time per
    worker, as clusters started here run; with several threads a worker's
    concurrent tasks mix."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _recorded(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, RESULT)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


# -- the driver side --------------------------------------------------------------------------------


@dataclass
class _Phase:
    progress: PhaseProgress
    futures: list[Any] = field(default_factory=list)
    started: float | None = None


class Run:
    """One cluster run: its scratch folder, its phases, its progress reports.

    ``scratch`` is a folder this run owns (created by the caller, removed by
    :meth:`close`). Use as a context manager."""

    def __init__(self, client: Any, scratch: str, name: str, phases: Sequence[str], *,
                 on_progress: Callable[[ClusterProgress], None] | None = None, retries: int = 0,
                 hook: Callable[..., Any] | None = None, interval: float = 0.5, timeout: float | None = None) -> None:
        self.client = client
        self.scratch = scratch
        self.name = name
        self.token = secrets.token_hex(4)
        self.on_progress = on_progress
        self.retries = retries
        self.hook = hook
        self.interval = interval
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.multi_host = False  # whether its tasks spread over machines (the caller says)
        self.phases = {p: _Phase(PhaseProgress(p)) for p in phases}
        self.current = phases[0] if phases else ""
        self.task_seconds: dict[str, list[float]] = {}  # phase → seconds of each task
        self.task_cpu: dict[str, list[float]] = {}  # phase → CPU seconds of each task (its processes included)
        self._rates: dict[str, tuple[float, int]] = {}
        os.makedirs(os.path.join(scratch, "progress"), exist_ok=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the scratch folder (after the tasks of a failed run stopped)."""
        for _ in range(5):
            shutil.rmtree(self.scratch, ignore_errors=True)
            if not os.path.exists(self.scratch):
                return
            time.sleep(0.2)  # a stopping task was still writing
        log.warning("could not remove the scratch folder %s", self.scratch)

    def phase(self, name: str, func: Callable[..., dict[str, Any]], calls: Sequence[dict[str, Any]],
              labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Run ``func`` once per element of ``calls`` (keyword arguments) as the
        tasks of phase ``name``; returns their results in order."""
        if name not in self.phases:  # a phase not planned: before the ones still waiting
            items = list(self.phases.items())
            at = next((i for i, (_, p) in enumerate(items) if p.progress.state == "waiting"), len(items))
            items.insert(at, (name, _Phase(PhaseProgress(name))))
            self.phases = dict(items)
        phase = self.phases[name]
        self.current = name
        os.makedirs(os.path.join(self.scratch, name), exist_ok=True)
        phase.progress.total = len(calls)
        phase.progress.state = "running"
        phase.started = time.monotonic()
        for i, kwargs in enumerate(calls):
            ctx = TaskContext(self.scratch, name, i, len(calls), self.hook)
            key = f"bamflow-{self.name}-{name}-{i}-{self.token}"
            phase.futures.append(self.client.submit(run_task, ctx, func, kwargs, key=key, pure=False,
                                                    retries=self.retries))
        try:
            self._wait(phase, labels)
        except BaseException:
            phase.progress.state = "failed"
            self._stop(phase)
            self._report()
            raise
        results = [f.result() for f in phase.futures]
        phase.progress.state = "done"
        phase.progress.done = len(results)
        phase.progress.running = 0
        self.task_seconds[name] = [r["_seconds"] for r in results]
        self.task_cpu[name] = [r["_cpu"] for r in results]
        self._report()
        return results

    def finish(self) -> None:
        """The run succeeded: phases that had nothing to do are ``skipped``; a last report."""
        for phase in self.phases.values():
            if phase.progress.state == "waiting":
                phase.progress.state = "skipped"
        self._report()

    def _wait(self, phase: _Phase, labels: Sequence[str] | None) -> None:
        pending = list(phase.futures)
        while pending:
            wake = time.monotonic() + self.interval
            while time.monotonic() < wake and not any(f.status in ("error", "cancelled") for f in pending):
                if all(f.status == "finished" for f in pending):
                    break
                time.sleep(0.02)
            pending = [f for f in pending if f.status not in ("finished", "error", "cancelled")]
            failed = [i for i, f in enumerate(phase.futures) if f.status in ("error", "cancelled")]
            phase.progress.failed = len(failed)
            self._report()
            if failed:
                raise self._error(phase, failed[0], labels)
            if pending and self.deadline is not None and time.monotonic() > self.deadline:
                raise DistributedError(f"{self.name} timed out after {self.deadline - self.started:g} s, "
                                       f"in its {phase.progress.name} phase")

    def _error(self, phase: _Phase, i: int, labels: Sequence[str] | None) -> DistributedError:
        future = phase.futures[i]
        what = f"{phase.progress.name} task {i + 1} of {len(phase.futures)}"
        if labels is not None:
            what += f" ({labels[i]})"
        if future.status == "cancelled":
            return DistributedError(f"{what} was cancelled")
        exc = future.exception()
        tb = "".join(traceback.format_exception(type(exc), exc, future.traceback()))
        if type(exc).__name__ == "KilledWorker":
            first = (f"{what} failed: its Dask worker died on every attempt "
                     "(distributed.scheduler.allowed-failures); the workers' logs say why")
        else:
            first = f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        error = DistributedError(first + "\n" + tb)
        error.task = what  # type: ignore[attr-defined]
        error.child_traceback = tb  # type: ignore[attr-defined]
        error.__cause__ = exc
        return error

    def _stop(self, phase: _Phase) -> None:
        """Tell the running tasks to stop, cancel the rest, wait for them."""
        try:
            with open(os.path.join(self.scratch, STOP), "w"):
                pass
        except OSError:
            pass
        self.client.cancel([f for f in phase.futures if f.status == "pending"])
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline and self._running_attempts(phase.progress.name):
            time.sleep(0.1)

    def _running_attempts(self, phase: str) -> list[dict[str, Any]]:
        """Attempts of ``phase`` that still say they run, on workers still alive."""
        alive = set(self._workers_alive())
        return [a for a in self._attempts() if a["phase"] == phase and a["state"] == "running"
                and (not alive or a["worker"] in alive)]

    def _workers_alive(self) -> list[str]:
        try:
            return list(self.client.scheduler_info().get("workers", {}))
        except Exception:  # the scheduler is gone: nothing to wait for
            return []

    def _attempts(self) -> list[dict[str, Any]]:
        folder = os.path.join(self.scratch, "progress")
        found = []
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        for name in names:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(folder, name)) as f:
                        found.append(json.load(f))
                except (OSError, ValueError):
                    continue
        return found

    def snapshot(self) -> ClusterProgress:
        now = time.monotonic()
        attempts = self._attempts()
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        counts: dict[tuple[str, int], int] = {}
        for a in sorted(attempts, key=lambda a: a["started"]):
            key = (a["phase"], a["index"])
            latest[key] = a
            counts[key] = counts.get(key, 0) + 1
        workers: dict[str, WorkerProgress] = {}
        for phase in self.phases.values():
            p = phase.progress
            mine = [a for (name, _), a in latest.items() if name == p.name]
            p.running = sum(1 for a in mine if a["state"] == "running") if p.state == "running" else 0
            if p.state == "running":
                p.done = sum(1 for f in phase.futures if f.status == "finished")
            p.retried = sum(1 for (name, _), n in counts.items() if name == p.name and n > 1)
            p.records = sum(a["records"] for a in mine)
            p.bytes_in = sum(a["bytes_in"] for a in mine)
            if phase.started is not None and p.state == "running":
                p.seconds = now - phase.started
        for a in latest.values():
            w = workers.setdefault(a["worker"], WorkerProgress(a["worker"], a["host"]))
            w.records += a["records"]
            if a["state"] == "running":
                w.running += 1
                w.busy_seconds += max(0.0, time.time() - a["started"])
            else:
                w.done += a["state"] == "done"
                w.busy_seconds += a.get("seconds", max(0.0, a["updated"] - a["started"]))
        for w in workers.values():
            w.mean_records_per_second = w.records / w.busy_seconds if w.busy_seconds else 0.0
            before = self._rates.get(w.worker)
            if before is not None and now > before[0]:
                w.records_per_second = max(0.0, (w.records - before[1]) / (now - before[0]))
            self._rates[w.worker] = (now, w.records)
        try:
            dashboard = self.client.dashboard_link
        except Exception:  # no dashboard (LocalCluster without one), or the scheduler is gone
            dashboard = None
        return ClusterProgress(self.name, self.current, [p.progress for p in self.phases.values()],
                               sorted(workers.values(), key=lambda w: w.worker), now - self.started,
                               dashboard if isinstance(dashboard, str) else None)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.snapshot())


__all__ = [
    "ClusterProgress", "DistributedError", "PhaseProgress", "Run", "TaskContext", "TaskStopped", "WorkerProgress",
    "run_task",
]
