"""Start the jobs of one phase and watch them until all succeed or one fails.

The supervisor waits on two things at once: the result pipe of every job and
the sentinel of every process. So a job that raises, exits with a non-zero
status, or is killed (even by SIGKILL, which leaves no message) is seen at
once, and then every other job is stopped: after 0.2 s in which jobs ending
anyway may still report, SIGTERM to its process group, SIGKILL 0.5 s later. Nothing waits on a peer that will never come.

With an ``on_progress`` callback it also watches the job processes through
/proc several times a second (:class:`~bamflow.engine.progress.ProcessSampler`:
CPU time, and whether each job works or waits for a neighbour) and reports a
:class:`~bamflow.engine.progress.Snapshot` about every ``progress_interval``.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import progress
from .errors import WorkflowError
from .job import Failure, Job, run_job
from .progress import CounterBoard, ProcessSampler, Snapshot, Tracker


@dataclass
class Outcome:
    """How one job ended."""

    job: str
    exitcode: int | None = None
    result: Any = None
    failure: Failure | None = None
    usage: dict[str, float] = field(default_factory=dict)
    reported: bool = False  # the job sent its message
    stopped: bool = False  # stopped by the supervisor because another job failed
    seen_at: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.exitcode == 0 and self.reported and self.failure is None

    @property
    def failed(self) -> bool:
        """Ended badly on its own (a job that reported an error counts even if
        it was stopped before it could exit)."""
        if self.exitcode is None or self.succeeded:
            return False
        return not self.stopped or self.failure is not None

    def describe(self) -> str:
        if self.failure is not None:
            return self.failure.summary
        if self.exitcode is not None and self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"killed by {name}"
        if self.exitcode:
            return f"exited with status {self.exitcode}"
        return "exited without reporting a result"


class _Running:
    def __init__(self, job: Job, process: Any, conn: Any) -> None:
        self.job = job
        self.process = process
        self.conn = conn
        self.outcome = Outcome(job.name)


def _held_for(r: _Running) -> list[int]:
    """The supervisor's descriptors for a started job: its result pipe's read
    end, its exit sentinel and (fork) the pipe end that tells the child its
    parent is alive, which multiprocessing keeps in the Popen's finalizer."""
    fds = [r.conn.fileno(), r.process.sentinel]
    finalizer = getattr(getattr(r.process, "_popen", None), "finalizer", None)
    fds += [fd for fd in getattr(finalizer, "_args", ()) if isinstance(fd, int) and fd not in fds]
    return fds


def _drop_parent_alive_pipe(process: Any) -> None:
    """Close the pipe end by which a forked child could ask whether its parent
    lives (multiprocessing.parent_process): jobs learn that from
    PR_SET_PDEATHSIG instead, and the supervisor then holds two descriptors
    per job, not three. (The end is kept, with the sentinel, in the Popen's
    finalizer; where it is not found, nothing is changed.)"""
    finalizer = getattr(getattr(process, "_popen", None), "finalizer", None)
    args = getattr(finalizer, "_args", None)
    if isinstance(args, tuple) and len(args) == 2 and args[0] == process.sentinel and isinstance(args[1], int):
        os.close(args[1])
        finalizer._args = (args[0],)  # type: ignore[union-attr]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Supervisor:
    """Runs one phase: a set of jobs connected by FIFOs, all at once."""

    def __init__(
        self,
        jobs: list[Job],
        context: Any,
        fifo_paths: dict[str, str],
        temp_outputs: dict[str, str],
        earlier_outputs: dict[str, str],
        pipe_size: int,
        stop_grace: float = 0.5,
        report_grace: float = 0.2,
        counters_path: str | None = None,
        on_progress: Callable[[Snapshot], None] | None = None,
        progress_interval: float = 0.5,
        sample_interval: float | None = None,
        stall_after: float | None = None,
    ) -> None:
        self.jobs = jobs
        self.report_grace = report_grace
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        if sample_interval is None:  # several looks a second; fewer when there are many jobs to look at
            sample_interval = max(progress.SAMPLE_INTERVAL, progress.SAMPLE_PER_JOB * len(jobs))
        self.sample_interval = sample_interval
        self.board = CounterBoard(counters_path, len(jobs)) if counters_path else None
        self.sampler = ProcessSampler(
            [j.name for j in jobs], [j.fifo_ends() for j in jobs], fifo_paths,
            kinds=[f"{getattr(j.func, '__module__', '')}.{getattr(j.func, '__qualname__', repr(j.func))}" for j in jobs],
        )
        self.tracker = Tracker(self.sampler, progress.STALL_AFTER if stall_after is None else stall_after)
        self.started_at = time.monotonic()
        self.context = context
        self.fifo_paths = fifo_paths
        self.temp_outputs = temp_outputs
        self.earlier_outputs = earlier_outputs
        self.pipe_size = pipe_size
        self.stop_grace = stop_grace
        self.running: list[_Running] = []

    def run(self, deadline: float | None) -> dict[str, Outcome]:
        """Run every job; raises WorkflowError naming the job that failed first."""
        try:
            self._start_all()
            self._watch(deadline)
        finally:
            self.stop()
            if self.on_progress is not None:
                self.on_progress(self.snapshot())
            self.sampler.close()
            if self.board is not None:
                self.board.close()
        outcomes = {r.job.name: r.outcome for r in self.running}
        failed = [o for o in outcomes.values() if o.failed]
        if failed:
            raise self._error(failed, outcomes)
        return outcomes

    def _start_all(self) -> None:
        method = self.context.get_start_method()
        parent = os.getpid() if method in ("fork", "spawn") else None
        for index, job in enumerate(self.jobs):
            receiver, sender = self.context.Pipe(duplex=False)
            counters = (self.board.path, index) if self.board else None
            # the supervisor's own descriptors, which a forked job inherits and closes
            held = [receiver.fileno()] + [fd for r in self.running for fd in _held_for(r)]
            process = self.context.Process(
                target=run_job,
                args=(job, self.fifo_paths, self.temp_outputs, self.earlier_outputs, self.pipe_size, sender, parent,
                      counters, held if method == "fork" else None),
                name=job.name,
            )
            self.running.append(_Running(job, process, receiver))
            try:
                process.start()
            except BaseException:
                self.running.pop()
                receiver.close()
                raise
            finally:
                sender.close()
            try:
                os.setpgid(process.pid, process.pid)
            except OSError:
                pass  # the child did it itself (or already exec'd)
            _drop_parent_alive_pipe(process)
            if self.on_progress is not None:
                self.sampler.started(index, process.pid)

    def _watch(self, deadline: float | None) -> None:
        waiting: dict[Any, tuple[str, _Running]] = {}
        for r in self.running:
            waiting[r.conn] = ("message", r)
            waiting[r.process.sentinel] = ("exit", r)
        alive = len(self.running)
        next_report = next_sample = time.monotonic()
        while alive:
            now = time.monotonic()
            if self.on_progress is not None:
                if now >= next_sample:
                    self.sampler.sample(now)
                    next_sample = now + self.sample_interval
                if now >= next_report:
                    self.on_progress(self.snapshot())
                    next_report = now + self.progress_interval
            timeout = None if deadline is None else max(0.0, deadline - now)
            if self.on_progress is not None:
                wake = max(0.0, min(next_report, next_sample) - now)
                timeout = wake if timeout is None else min(timeout, wake)
            ready = multiprocessing.connection.wait(list(waiting), timeout=timeout)
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WorkflowError(f"workflow timed out; still running: {self._names_alive()}")
                continue
            for obj in ready:
                entry = waiting.pop(obj, None)
                if entry is None:  # a message already taken with its sentinel
                    continue
                kind, r = entry
                if kind == "message":
                    self._receive(r)
                else:
                    alive -= 1
                    if r.conn in waiting:  # a message sent just before exit
                        del waiting[r.conn]
                        self._receive(r)
                    r.process.join()
                    r.outcome.exitcode = r.process.exitcode
                    r.outcome.seen_at = time.monotonic()
                    self.sampler.ended(self.running.index(r))
                    if not r.outcome.succeeded:
                        return

    def _receive(self, r: _Running) -> None:
        try:
            if not r.conn.poll():
                return
            status, payload, usage = r.conn.recv()
        except (EOFError, OSError):
            return
        r.outcome.reported = True
        r.outcome.usage = usage
        if status == "ok":
            r.outcome.result = payload
        else:
            r.outcome.failure = payload

    def _let_failing_jobs_report(self) -> None:
        """Wait briefly for jobs that are ending anyway: a job failing at the same
        moment as another may be the cause, and must not be killed mid-report."""
        end = time.monotonic() + self.report_grace
        waiting: dict[Any, _Running] = {}
        for r in self.running:
            if r.process.exitcode is None:
                waiting[r.process.sentinel] = r
                if not r.conn.closed:
                    waiting[r.conn] = r
        while waiting and time.monotonic() < end:
            ready = multiprocessing.connection.wait(list(waiting), timeout=max(0.0, end - time.monotonic()))
            for obj in ready:
                r = waiting.pop(obj)
                if obj is r.conn:
                    self._receive(r)

    def snapshot(self) -> Snapshot:
        """Every job's state, counters and what the sampler saw, now (the jobs not
        started yet are left out)."""
        now = time.monotonic()
        rows = []
        for index, r in enumerate(self.running):
            if r.process.exitcode is None:
                state = "running"
            elif r.outcome.succeeded or (r.process.exitcode == 0 and r.outcome.failure is None):
                state = "done"
            elif r.outcome.stopped:
                state = "stopped"
            else:
                state = "failed"
            counters = self.board.read(index) if self.board else (0, 0, 0, 0)
            ended = now if r.process.exitcode is None or not r.outcome.seen_at else r.outcome.seen_at
            rows.append((state, counters, ended - self.started_at, r.outcome.result, r.outcome.usage))
        rows += [("starting", (0, 0, 0, 0), 0.0, None, {})] * (len(self.jobs) - len(rows))  # a failed start
        return self.tracker.snapshot(now, self.started_at, rows)

    def _names_alive(self) -> str:
        return ", ".join(r.job.name for r in self.running if r.process.is_alive()) or "none"

    def stop(self) -> None:
        """Stop every job still running: SIGTERM, then SIGKILL after the grace.
        Then collect how every job ended, including those that ended meanwhile."""
        self._let_failing_jobs_report()
        alive = [r for r in self.running if r.process.exitcode is None]
        for r in alive:
            r.outcome.stopped = True
            _signal_group(r.process.pid, signal.SIGTERM)
        end = time.monotonic() + self.stop_grace
        for r in alive:
            r.process.join(max(0.0, end - time.monotonic()))
        for r in alive:
            if r.process.exitcode is None:
                _signal_group(r.process.pid, signal.SIGKILL)
        for r in self.running:
            if r.outcome.exitcode is None:
                r.process.join()
                self._receive(r)
                r.outcome.exitcode = r.process.exitcode
                r.outcome.seen_at = time.monotonic()
            if r.outcome.succeeded:
                r.outcome.stopped = False
            r.conn.close()

    @staticmethod
    def _error(failed: list[Outcome], outcomes: dict[str, Outcome]) -> WorkflowError:
        # The cause, in order of likelihood: a job that died without a word
        # (killed: the out-of-memory killer, SIGKILL, os._exit) — its peers'
        # errors about short streams follow from it; then the first job that
        # raised; broken pipes (and SIGPIPE) last, they follow from another
        # job's end.
        def order(o: Outcome) -> tuple[bool, bool, float]:
            if o.failure is not None:
                return (o.failure.broken_pipe, True, o.failure.time)
            return (o.exitcode == -signal.SIGPIPE, False, o.seen_at)

        cause = min(failed, key=order)
        return WorkflowError(
            f"job '{cause.job}' failed: {cause.describe()}",
            job=cause.job,
            child_traceback=cause.failure.traceback if cause.failure else "",
            exitcode=cause.exitcode,
            exc_dict={o.job: (o.failure.traceback if o.failure else o.describe()) for o in failed},
            result_dict={o.job: o.result for o in outcomes.values() if o.succeeded},
        )
