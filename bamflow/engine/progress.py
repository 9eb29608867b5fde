"""Live counters of running jobs, and where each job spends its time.

Two sources, combined by :class:`Tracker` into the :class:`JobProgress`
rows a progress display shows:

* **Counters** (:class:`CounterBoard`): every job of a phase owns one slot of
  int64 counters in a small file that the supervisor creates next to the
  phase's FIFOs; jobs (and their Cython kernels) update their slot in place
  through ``mmap`` — a few stores per buffer of data, never per record. A
  file, not ``multiprocessing.shared_memory``, so that the fork and spawn
  start methods behave the same and nothing outlives the run.
* **The processes themselves** (:class:`ProcessSampler`), read from ``/proc``
  by the supervisor several times a second: CPU time (threads and child
  processes included), and what the job's main thread is doing — running
  (*working*), ready to run but waiting for a free CPU core (*cpu*: the
  machine is busier than it has cores), blocked reading one of its input
  FIFOs (*input*: waiting for the job upstream), blocked writing an output
  FIFO (*output*: waiting for the job downstream) or sleeping elsewhere
  (*other*). A blocked read or
  write names its file descriptor (``/proc/PID/syscall``), whose FIFO names
  the job at the other end. Bytes read (``/proc/PID/io``) stand in for a job
  that does not count its own.

From the last two seconds of samples the tracker names the **bottleneck**:
the stage that works while its neighbours wait for it. A job that makes no
progress for a while (no records, no bytes, no CPU time) and is not just
waiting for a neighbour that does is **stalled**.
"""

from __future__ import annotations

import io
import mmap
import os
import platform
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# slot layout: [0] records, [1] bytes read, [2] bytes written, [3] bytes waiting
# in the input pipe (backlog); the rest is room to grow
SLOT_WORDS = 8
SLOT_BYTES = SLOT_WORDS * 8

SAMPLE_INTERVAL = 0.1  # seconds between two looks at /proc…
SAMPLE_PER_JOB = 0.004  # …at least this many seconds per job watched (100 jobs: a look every 0.4 s)
WINDOW = 2.0  # seconds of samples behind the live activity shares and the bottleneck
STALL_AFTER = 10.0  # seconds without progress after which a job is stalled
BUSY = 0.5  # a stage working at least this share of the window can be the bottleneck…
WAITED = 0.25  # …when a neighbour waited for it at least this share of the window

WORKING, CPU, INPUT, OUTPUT, OTHER = "working", "cpu", "input", "output", "other"
ACTIVITIES = (WORKING, CPU, INPUT, OUTPUT, OTHER)


class JobCounters:
    """One job's counters; ``slot`` is the int64 memoryview the kernels write to."""

    def __init__(self, slot: memoryview) -> None:
        self.slot = slot

    @classmethod
    def detached(cls) -> JobCounters:
        """Counters nobody reads (a stage run outside a workflow)."""
        return cls(memoryview(bytearray(SLOT_BYTES)).cast("q"))

    @classmethod
    def attach(cls, path: str, index: int) -> JobCounters:
        fd = os.open(path, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        return cls(memoryview(mapped)[index * SLOT_BYTES : (index + 1) * SLOT_BYTES].cast("q"))


_current = JobCounters.detached()


def current() -> JobCounters:
    """The counters of the job this process runs (detached ones outside a workflow)."""
    return _current


def _attach_current(path: str, index: int) -> None:
    global _current
    _current = JobCounters.attach(path, index)


@dataclass
class JobProgress:
    """A snapshot of one job, as a progress display shows it.

    The first seven fields are the job's own counters; the rest is what the
    supervisor measured from outside (``None`` or empty where it could not).
    """

    job: str
    state: str  # "running", "done", "failed", "stopped"
    records: int
    bytes_in: int
    bytes_out: int
    backlog: int
    seconds: float
    stage: str = ""  # the job's stage: its name without workflow and number ("worker" for w.worker3)
    cpu: float | None = None  # % of one core over the last WINDOW (over its life once ended); children included
    cpu_seconds: float | None = None
    activity: str = ""  # WORKING, CPU, INPUT, OUTPUT, OTHER or "stalled" (the most frequent in the window); "" unknown
    working: float | None = None  # shares of the last WINDOW (of its life once ended) spent working,
    waiting_cpu: float | None = None  # ready to run but without a free core,
    waiting_input: float | None = None  # blocked reading its input,
    waiting_output: float | None = None  # blocked writing its output
    waits_on: str = ""  # the job it waited for most in the window (at the other end of a pipe)
    stalled: float = 0.0  # seconds without progress, once that is at least STALL_AFTER and not a wait for a live neighbour
    bottleneck: bool = False  # its stage is the bottleneck now
    estimated_records: bool = False  # records estimated (the job does not count them itself)
    estimated_bytes: bool = False  # bytes_in estimated (bytes its process read: /proc/PID/io)
    upstream: tuple[str, ...] = ()  # the jobs that write its input FIFOs


class Snapshot(list):  # list[JobProgress], plus what concerns the whole phase
    """What ``on_progress`` receives: a list of :class:`JobProgress`, one per job,
    with ``bottleneck`` (the stage, or None), ``elapsed`` (seconds since the phase
    started) and ``sampler_seconds`` (CPU time the supervisor spent watching)."""

    bottleneck: str | None = None
    elapsed: float = 0.0
    sampler_seconds: float = 0.0


class CounterBoard:
    """The supervisor's side: creates the counter file and reads every slot."""

    def __init__(self, path: str, n_jobs: int) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(max(1, n_jobs) * SLOT_BYTES)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("q")

    def read(self, index: int) -> tuple[int, int, int, int]:
        base = index * SLOT_WORDS
        return self._view[base], self._view[base + 1], self._view[base + 2], self._view[base + 3]

    def close(self) -> None:
        self._view.release()
        self._map.close()


class CountingReader(io.RawIOBase):
    """A raw reader that adds the bytes it reads to the job's ``bytes_in``."""

    def __init__(self, raw: io.RawIOBase, counters: JobCounters) -> None:
        super().__init__()
        self._raw = raw
        self._slot = counters.slot
        self.name = getattr(raw, "name", "")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            self._slot[1] += n
        return n or 0

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            super().close()


def stage_of(job: str) -> str:
    """A job's stage: the name without the workflow ("qc.") and the job number ("3")."""
    return job.split(".", 1)[-1].rstrip("0123456789") or job


def _stages(names: Sequence[str], kinds: Sequence[str] | None) -> list[str]:
    """Each job's stage (:func:`stage_of`); jobs that share a stage name but run
    different functions (``job0``, ``job1`` of ``add_job``) are stages of their own."""
    stages = [stage_of(name) for name in names]
    if kinds is not None:
        functions: dict[str, set[str]] = {}
        for stage, kind in zip(stages, kinds, strict=True):
            functions.setdefault(stage, set()).add(kind)
        stages = [
            stage if len(functions[stage]) == 1 else name.split(".", 1)[-1]
            for stage, name in zip(stages, names, strict=True)
        ]
    return stages


# -- reading /proc --------------------------------------------------------------------------

# system call numbers, by machine: reads, writes, waits for input (poll and select: bamflow's
# kernels poll only their inputs), waits for child processes
_SYSCALLS = {
    "x86_64": ({0, 17, 19, 295}, {1, 18, 20, 296, 40, 275}, {7, 23, 232, 270, 271, 281, 441}, {61, 247}),
    "aarch64": ({63, 65, 67, 69}, {64, 66, 68, 70, 71, 76}, {22, 72, 73, 441}, {95, 260}),
}
# the same from the kernel function a sleeping thread waits in, where the system call is not readable
_WCHAN = {"pipe_read": INPUT, "pipe_write": OUTPUT, "do_sys_poll": INPUT, "do_select": INPUT, "ep_poll": INPUT}
_CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _pread(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("ascii", "replace")


CHILDREN_EVERY = 0.5  # seconds between two looks for a job's child processes
KEEP_OPEN = 16  # processes whose /proc files stay open between looks (3 descriptors each)
_PROC_FILES = ("stat", "schedstat", "syscall")
_MACHINE = platform.machine()


class _Process:
    """One process of a job. The /proc files of the first KEEP_OPEN processes
    stay open (a look is one pread each); the others are opened for each look,
    so the supervisor never holds more than a few dozen extra descriptors."""

    def __init__(self, pid: int, keep_open: bool) -> None:
        self.pid = pid
        self.fds: dict[str, int] = {}
        self.sched = (0, 0)
        if keep_open:
            for name in _PROC_FILES:
                try:
                    self.fds[name] = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    if name == "stat":
                        self.close()
                        raise
        try:
            self.read_stat()
        except (OSError, ValueError, IndexError):  # the process is gone
            self.close()
            raise
        try:
            self._read("syscall")
            self.has_syscall = True
        except OSError:  # not allowed, or no such file on this kernel: /proc/PID/wchan instead
            self.has_syscall = False

    def _read(self, name: str) -> str:
        fd = self.fds.get(name)
        if fd is not None:
            return _pread(fd)
        fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _pread(fd)
        finally:
            os.close(fd)

    def read_stat(self) -> tuple[str, float]:
        """(state letter, CPU seconds of the process and the children it has reaped)."""
        fields = self._read("stat").rsplit(")", 1)[1].split()
        return fields[0], sum(int(t) for t in fields[11:15]) / _CLOCK_TICK

    def waits_for_cpu(self) -> bool:
        """Whether the main thread, ready to run, spent more of the time since the
        last look waiting for a core than running (/proc/PID/schedstat)."""
        try:
            ran, waited = (int(v) for v in self._read("schedstat").split()[:2])
        except (OSError, ValueError):
            return False
        before, self.sched = self.sched, (ran, waited)
        return waited - before[1] > ran - before[0]

    def blocked_in(self) -> tuple[str, int | None] | None:
        """(kind, file descriptor) of the system call the main thread sleeps in: kind
        "read", "write", "poll", "wait" or "other"; None if it is not in one."""
        if not self.has_syscall:
            try:
                with open(f"/proc/{self.pid}/wchan") as f:
                    kind = _WCHAN.get(f.read().strip(), "other")
            except OSError:
                return None
            return {INPUT: "poll", OUTPUT: "write"}.get(kind, "other"), None
        text = self._read("syscall").split()
        if not text or text[0] == "running" or text[0] == "-1":
            return None
        number = int(text[0])
        reads, writes, polls, waits = _SYSCALLS.get(_MACHINE, _SYSCALLS["x86_64"])
        fd = int(text[1], 16) if len(text) > 1 else None
        if number in reads:
            return "read", fd
        if number in writes:
            return "write", fd
        if number in polls:
            return "poll", None
        if number in waits:
            return "wait", None
        return "other", None

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


@dataclass
class _Sample:
    activity: str
    waits_on: int | None  # job index at the other end of the pipe, if known
    upstream_wait: bool = False  # waiting for input without knowing which pipe (poll)


@dataclass
class _Watch:
    """What the tracker knows of one job."""

    index: int
    name: str
    stage: str
    inputs: list[str]
    outputs: list[str]
    pid: int | None = None  # started, /proc files not opened yet
    process: _Process | None = None
    children: dict[int, _Process] = field(default_factory=dict)
    children_at: float = 0.0
    samples: deque = field(default_factory=lambda: deque(maxlen=max(1, round(WINDOW / SAMPLE_INTERVAL))))
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIVITIES, 0))
    cpu: deque = field(default_factory=lambda: deque(maxlen=max(2, round(WINDOW / SAMPLE_INTERVAL) + 1)))
    cpu_seconds: float = 0.0
    inputs_at: float = -1e9
    open_writers: list[int] = field(default_factory=list)
    progress_key: tuple = ()
    progress_at: float = 0.0
    rchar: int = 0


class ProcessSampler:
    """Watches the processes of a phase's jobs through /proc (Linux; elsewhere it
    measures nothing). ``fifo_paths``: FIFO name → path, to name what a blocked
    read or write waits for; ``fifo_ends``: per job, (FIFO name, is_reader)."""

    def __init__(
        self,
        names: Sequence[str],
        fifo_ends: Sequence[Iterable[tuple[str, bool]]],
        fifo_paths: dict[str, str],
        kinds: Sequence[str] | None = None,
    ):
        self.jobs: list[_Watch] = []
        self.writer: dict[str, int] = {}
        self.reader: dict[str, int] = {}
        stages = _stages(names, kinds)
        for index, (name, ends) in enumerate(zip(names, fifo_ends, strict=True)):
            inputs = [f for f, is_reader in ends if is_reader]
            outputs = [f for f, is_reader in ends if not is_reader]
            self.jobs.append(_Watch(index, name, stages[index], inputs, outputs))
            self.writer.update((f, index) for f in outputs)
            self.reader.update((f, index) for f in inputs)
        self.fifo_of_path = {os.path.realpath(p): name for name, p in fifo_paths.items()}
        self.links: dict[tuple[int, int], tuple[float, str]] = {}  # (pid, fd) → (when, where it points)
        self.enabled = os.path.isdir("/proc/self/task")
        self.seconds = 0.0  # CPU time spent sampling
        self.kept = 0  # processes whose /proc files are held open

    def upstream(self, index: int) -> list[int]:
        return sorted({self.writer[f] for f in self.jobs[index].inputs if f in self.writer})

    def downstream(self, index: int) -> list[int]:
        return sorted({self.reader[f] for f in self.jobs[index].outputs if f in self.reader})

    def started(self, index: int, pid: int) -> None:
        """Job ``index`` runs as ``pid``. Its /proc files are opened at the first look,
        after every job has started: a job forked later must not inherit them."""
        if self.enabled:
            self.jobs[index].pid = pid

    def _open(self, job: _Watch) -> None:
        pid, job.pid = job.pid, None
        if pid is None:
            return
        try:
            job.process = _Process(pid, keep_open=self.kept < KEEP_OPEN)
        except (OSError, ValueError, IndexError):
            return
        self.kept += bool(job.process.fds)

    def ended(self, index: int) -> None:
        job = self.jobs[index]
        for p in [job.process, *job.children.values()]:
            if p is not None:
                self.kept -= bool(p.fds)
                p.close()
        job.process = job.pid = None
        job.children.clear()

    def close(self) -> None:
        for index in range(len(self.jobs)):
            self.ended(index)

    # -- one look ------------------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Look at every live job once: CPU time and what it is doing."""
        t0 = time.thread_time()
        for job in self.jobs:
            if job.pid is not None:
                self._open(job)
            if job.process is not None:
                try:
                    self._sample(job, now)
                except (OSError, ValueError, IndexError):  # it ended meanwhile
                    self.ended(job.index)
        self.seconds += time.thread_time() - t0

    def _sample(self, job: _Watch, now: float) -> None:
        assert job.process is not None
        state, cpu = job.process.read_stat()
        if state in "ZX":
            self.ended(job.index)
            return
        if now - job.children_at >= CHILDREN_EVERY:
            self._find_children(job, job.process)
            job.children_at = now
        busy_child = False
        for pid, child in list(job.children.items()):
            try:
                child_state, child_cpu = child.read_stat()
            except (OSError, ValueError, IndexError):
                child.close()
                del job.children[pid]
                continue
            cpu += child_cpu
            busy_child = busy_child or child_state in "RD"
        job.cpu_seconds = max(job.cpu_seconds, cpu)  # a child reaped between two looks: its time moves to cutime
        previous = job.cpu[-1] if job.cpu else None
        job.cpu.append((now, job.cpu_seconds))
        if state in "RD" or busy_child:
            starved = state == "R" and not busy_child and job.process.waits_for_cpu()
            sample = _Sample(CPU if starved else WORKING, None)
        else:
            sample = self._blocked(job, previous, now)
        job.samples.append(sample)
        job.totals[sample.activity] += 1

    def _blocked(self, job: _Watch, previous: tuple[float, float] | None, now: float) -> _Sample:
        assert job.process is not None
        blocked = job.process.blocked_in()
        if blocked is None:
            return _Sample(WORKING, None)
        kind, fd = blocked
        if kind in ("read", "write"):
            where = self._link(job.process.pid, fd, now) if fd is not None else ""
            fifo = self.fifo_of_path.get(where)
            if fifo is not None:
                other = self.writer.get(fifo) if kind == "read" else self.reader.get(fifo)
                return _Sample(INPUT if kind == "read" else OUTPUT, other)
            if where.startswith(("pipe:", "socket:", "/dev/pts", "/dev/tty")) or fd is None:
                return _Sample(INPUT if kind == "read" else OUTPUT, None)  # a pipe from or to another program
            return _Sample(WORKING, None)  # a file: waiting for the disk is work
        if kind == "poll":
            writers = self._open_inputs(job, now)
            return _Sample(INPUT, writers[0] if len(writers) == 1 else None, upstream_wait=True)
        # waiting for its threads (futex) or something else: working if its threads use the CPU
        if previous is not None and now > previous[0] and (job.cpu_seconds - previous[1]) / (now - previous[0]) > 0.3:
            return _Sample(WORKING, None)
        return _Sample(OTHER, None)

    def _link(self, pid: int, fd: int, now: float) -> str:
        key = (pid, fd)
        cached = self.links.get(key)
        if cached is not None and now - cached[0] < 2.0:
            return cached[1]
        try:  # the kernel's path of the file: symbolic links resolved, as fifo_of_path's keys
            where = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            where = ""
        self.links[key] = (now, where)
        return where

    def _open_inputs(self, job: _Watch, now: float) -> list[int]:
        """The jobs writing the input FIFOs the job still has open (what a poll waits for)."""
        if now - job.inputs_at >= 1.0 and job.process is not None:
            job.inputs_at = now
            try:
                fds = os.listdir(f"/proc/{job.process.pid}/fd")
            except OSError:
                fds = []
            fifos = {self.fifo_of_path.get(self._link(job.process.pid, int(fd), now)) for fd in fds}
            job.open_writers = sorted({self.writer[f] for f in job.inputs if f in fifos and f in self.writer})
        return job.open_writers

    def _find_children(self, job: _Watch, process: _Process) -> None:
        found: list[int] = []
        stack = [process]
        while stack:
            for pid in stack.pop().children():
                found.append(pid)
                child = job.children.get(pid)
                if child is None:
                    try:
                        child = job.children[pid] = _Process(pid, keep_open=False)
                    except (OSError, ValueError, IndexError):
                        continue
                stack.append(child)
        for pid in set(job.children) - set(found):
            job.children.pop(pid).close()

    def read_io(self, index: int) -> int:
        """Bytes the job's main process has read so far (``rchar``; 0 if unknown)."""
        job = self.jobs[index]
        if job.process is not None:
            try:
                with open(f"/proc/{job.process.pid}/io", "rb") as f:
                    job.rchar = int(f.readline().split()[1])
            except (OSError, ValueError, IndexError):
                pass
        return job.rchar

    # -- what the samples say ----------------------------------------------------------------

    def shares(self, index: int, whole_run: bool = False) -> dict[str, float] | None:
        """Share of the window (or of the whole run) spent in each activity."""
        job = self.jobs[index]
        if whole_run:
            total = sum(job.totals.values())
            return {a: n / total for a, n in job.totals.items()} if total else None
        if not job.samples:
            return None
        counts = dict.fromkeys(ACTIVITIES, 0)
        for s in job.samples:
            counts[s.activity] += 1
        return {a: n / len(job.samples) for a, n in counts.items()}

    def cpu_percent(self, index: int) -> float | None:
        samples = self.jobs[index].cpu
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return None
        return 100.0 * (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    def waited_for(self, index: int) -> dict[int, float]:
        """Share of job ``index``'s window spent waiting for each other job."""
        job = self.jobs[index]
        if not job.samples:
            return {}
        waits: dict[int, float] = {}
        upstream = job.open_writers or self.upstream(index)
        # a poll waits for any of its inputs: count it against those of their writers that
        # could be what it waits for (not a writer blocked on another job's pipe)
        feeding = [u for u in upstream if not self._blocked_on_other(u, index)] or upstream
        for s in job.samples:
            targets = [s.waits_on] if s.waits_on is not None else (feeding if s.upstream_wait else [])
            for t in targets:
                waits[t] = waits.get(t, 0.0) + 1.0 / len(job.samples)
        return waits

    def _blocked_on_other(self, index: int, reader: int) -> bool:
        samples = self.jobs[index].samples
        return bool(samples) and samples[-1].activity == OUTPUT and samples[-1].waits_on not in (None, reader)


class Tracker:
    """Turns counters and samples into the :class:`Snapshot` a display gets."""

    def __init__(self, sampler: ProcessSampler, stall_after: float = STALL_AFTER) -> None:
        self.sampler = sampler
        self.stall_after = stall_after

    def snapshot(
        self,
        now: float,
        started_at: float,
        rows: Sequence[tuple[str, tuple[int, int, int, int], float, Any, dict[str, float]]],
    ) -> Snapshot:
        """``rows``: per job (state, counters, seconds, result or None, usage), in job order;
        jobs in state "starting" (not started) are left out of the snapshot."""
        t0 = time.thread_time()
        sampler = self.sampler
        jobs = sampler.jobs
        out = Snapshot()
        for job, (state, counters, seconds, result, usage) in zip(jobs, rows, strict=True):
            records, bytes_in, bytes_out, backlog = counters
            out.append(
                JobProgress(
                    job.name, state, records, bytes_in, bytes_out, backlog, seconds, stage=job.stage,
                    upstream=tuple(jobs[i].name for i in sampler.upstream(job.index)),
                )
            )
            self._measured(out[-1], job, state, seconds, usage)
            if bytes_in == 0 and job.inputs and state in ("running", "done"):
                out[-1].bytes_in = sampler.read_io(job.index)
                out[-1].estimated_bytes = out[-1].bytes_in > 0
            if records == 0 and state == "done" and isinstance(result, dict):
                exact = result.get("records", result.get("reads_in"))
                if isinstance(exact, int) and not isinstance(exact, bool):
                    out[-1].records = exact
        self._estimate_records(out)
        self._stalls(out, now)
        out.bottleneck = self._bottleneck(out)
        for row in out:
            row.bottleneck = row.stage == out.bottleneck and row.state == "running"
        if any(row.state == "starting" for row in out):
            out[:] = [row for row in out if row.state != "starting"]
        out.elapsed = now - started_at
        sampler.seconds += time.thread_time() - t0
        out.sampler_seconds = sampler.seconds
        return out

    def _measured(self, row: JobProgress, job: _Watch, state: str, seconds: float, usage: dict[str, float]) -> None:
        sampler = self.sampler
        running = state == "running"
        shares = sampler.shares(job.index, whole_run=not running)
        if running:
            row.cpu = sampler.cpu_percent(job.index)
            row.cpu_seconds = job.cpu_seconds if job.cpu else None
        else:
            row.cpu_seconds = usage.get("cpu_seconds", job.cpu_seconds if job.cpu else None)
            wall = usage.get("wall_seconds", seconds)
            row.cpu = 100.0 * row.cpu_seconds / wall if row.cpu_seconds is not None and wall > 0 else None
        if shares is not None:
            row.working, row.waiting_cpu = shares[WORKING], shares[CPU]
            row.waiting_input, row.waiting_output = shares[INPUT], shares[OUTPUT]
            if running:
                row.activity = max(ACTIVITIES, key=lambda a: shares[a])
        if running:
            waits = sampler.waited_for(job.index)
            if waits:
                row.waits_on = sampler.jobs[max(waits, key=lambda i: waits[i])].name

    def _estimate_records(self, rows: list[JobProgress]) -> None:
        """Records of a job that does not count them: its bytes read over the mean
        record size of the stream upstream, or (a source job) the records its
        only consumer read. Bytes of a job that ended before its bytes were read
        from /proc: its records times that mean size."""
        sampler = self.sampler
        for job, row in zip(sampler.jobs, rows, strict=True):
            if row.state not in ("running", "done"):
                continue
            size = self._record_size(rows, job.index, set())
            if not row.records and size and row.bytes_in:
                row.records, row.estimated_records = int(row.bytes_in / size), True
            elif not row.records and not job.inputs:
                consumers = sampler.downstream(job.index)
                if len(consumers) == 1 and len(sampler.upstream(consumers[0])) == 1 and rows[consumers[0]].records:
                    row.records, row.estimated_records = rows[consumers[0]].records, True
            if not row.bytes_in and row.records and size and job.inputs:
                row.bytes_in, row.estimated_bytes = int(row.records * size), True

    def _record_size(self, rows: list[JobProgress], index: int, seen: set[int]) -> float | None:
        for up in self.sampler.upstream(index):
            if up in seen:
                continue
            seen.add(up)
            r = rows[up]
            counted = r.records > 0 and r.bytes_in > 0 and not (r.estimated_records or r.estimated_bytes)
            if counted and self.sampler.jobs[up].inputs:
                return r.bytes_in / r.records
            size = self._record_size(rows, up, seen)
            if size:
                return size
        return None

    def _stalls(self, rows: list[JobProgress], now: float) -> None:
        jobs = self.sampler.jobs
        for job, row in zip(jobs, rows, strict=True):
            key = (row.records, row.bytes_in, row.bytes_out, round(job.cpu_seconds, 2))
            if key != job.progress_key or not job.progress_at:
                job.progress_key, job.progress_at = key, now
        latest = max((j.progress_at for j in jobs), default=now)
        pipeline_moves = now - latest < self.stall_after
        for job, row in zip(jobs, rows, strict=True):
            idle = now - job.progress_at
            if row.state != "running" or idle < self.stall_after:
                continue
            if row.activity in (INPUT, OUTPUT) and pipeline_moves:
                continue  # waiting for a neighbour that is getting on with its work
            row.stalled, row.activity = idle, "stalled"

    def _bottleneck(self, rows: list[JobProgress]) -> str | None:
        """The stage that works while its neighbours wait for it (see module doc)."""
        sampler = self.sampler
        stages: dict[str, list[int]] = {}
        for job in sampler.jobs:
            stages.setdefault(job.stage, []).append(job.index)
        if len(stages) < 2:
            return None
        running = {s: [i for i in idx if rows[i].state == "running" and rows[i].working is not None] for s, idx in stages.items()}
        # a job ready to run but without a core would be working: it counts as busy
        busy = {s: max((rows[i].working or 0.0) + (rows[i].waiting_cpu or 0.0) for i in idx) for s, idx in running.items() if idx}
        if not busy:
            return None
        candidate = max(busy, key=lambda s: busy[s])
        if busy[candidate] < BUSY:
            return None
        members = set(stages[candidate])
        neighbours = {n for i in members for n in sampler.upstream(i) + sampler.downstream(i)} - members
        live = [n for n in neighbours if rows[n].state == "running"]
        if not live:
            return candidate
        waited = max(sum(w for t, w in sampler.waited_for(n).items() if t in members) for n in live)
        if waited >= WAITED and all(busy.get(sampler.jobs[n].stage, 0.0) < busy[candidate] for n in live):
            return candidate
        return None
