"""A job: one function run in its own process, with its FIFOs opened for it.

:func:`run_job` is the entry point of every job process. It binds the job's
arguments (FIFO specs become open files or paths, output files become their
temporary paths), calls the function, and sends one message back to the
supervisor: ``("ok", result, usage)`` or ``("error", failure, usage)``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import progress
from .fifo import FIFO, FifoFile, open_read_end, open_write_ends, wrap_fd
from .files import InputFile, OutputFile
from .publish import STDOUT_NAMES

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


@dataclass(eq=False)
class Job:
    """What to run in one process: ``func(*args, **kwargs)``.

    A Job is also the handle of that job: :meth:`Workflow.result` takes it
    (jobs compare by identity).

    Arguments may hold :class:`FIFO` specs (alone or in lists),
    :class:`InputFile` and :class:`OutputFile`. With ``manage_fifos`` the
    function receives opened file objects for its FIFOs, else their paths.
    """

    name: str
    func: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    manage_fifos: bool = True

    def specs(self) -> list[Any]:
        """Every FIFO / InputFile / OutputFile among the arguments (in lists too)."""
        found: list[Any] = []

        def collect(spec: Any) -> Any:
            found.append(spec)
            return spec

        self.map_args(collect)
        return found

    def fifo_ends(self) -> list[tuple[str, bool]]:
        """(FIFO name, is_reader) for every FIFO end this job opens."""
        return [(name, spec.is_reader) for spec in self.specs() if isinstance(spec, FIFO) for name in spec.names()]

    def map_args(self, convert: Callable[[Any], Any]) -> tuple[tuple, dict[str, Any]]:
        """args and kwargs with every spec replaced by ``convert(spec)``."""

        def walk(value: Any) -> Any:
            if isinstance(value, (FIFO, InputFile, OutputFile)):
                return convert(value)
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, tuple):
                return tuple(walk(v) for v in value)
            return value

        return tuple(walk(a) for a in self.args), {k: walk(v) for k, v in self.kwargs.items()}


@dataclass
class Failure:
    """What a job reports when its function raised."""

    summary: str  # "ValueError: bad record"
    traceback: str
    time: float  # time.monotonic() when it was caught: comparable across processes
    broken_pipe: bool  # a consequence of another job's end, rarely the cause


def _become_job_process(parent_pid: int | None) -> None:
    """Own process group (so the supervisor can stop a job with its children),
    default signal actions, and death together with the supervisor."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if parent_pid is not None and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # the supervisor died before prctl
            os._exit(1)


def _close_inherited_fds(fds: list[int]) -> None:
    """Close the supervisor's descriptors this process inherited (its ends of
    the other jobs' result pipes and exit sentinels): a job holds O(1)
    descriptors besides its own, whatever the number of jobs."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # not inherited (spawn, forkserver)


def _owns_stdout(job: Job) -> bool:
    return any(isinstance(s, OutputFile) and s.path in STDOUT_NAMES for s in job.specs())


def _name_process(job: Job) -> None:
    """Name the process after its stage, as ps and top show it (``bamflow:dist0``)."""
    short = job.name.rsplit(".", 1)[-1]
    title = f"bamflow:{short}"
    if len(title) > 15:  # the kernel keeps 15 bytes
        title = short[-15:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(title.encode()), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _open_fifos(job: Job, fifo_paths: dict[str, str], pipe_size: int) -> tuple[dict[str, FifoFile], list[FifoFile]]:
    """Open this job's FIFO ends: all read ends first, then all write ends."""
    specs = [s for s in job.specs() if isinstance(s, FIFO)]
    read_names = [name for s in specs if s.is_reader for name in s.names()]
    write_names = [name for s in specs if not s.is_reader for name in s.names()]
    modes = {name: s.mode for s in specs for name in s.names()}
    opened: dict[str, FifoFile] = {}
    try:
        for name in read_names:
            opened[name] = wrap_fd(open_read_end(fifo_paths[name], pipe_size), modes[name], name)
        fds = open_write_ends([fifo_paths[name] for name in write_names], pipe_size)
        for name, fd in zip(write_names, fds, strict=True):
            opened[name] = wrap_fd(fd, modes[name], name)
    except BaseException:
        _abandon_files(list(opened.values()))
        raise
    return opened, list(opened.values())


def _close_files(files: list[FifoFile]) -> None:
    """Close every file (flushing writers); raises the first error after closing all."""
    first_error: BaseException | None = None
    for f in files:
        try:
            f.close()
        except BaseException as e:  # keep closing the others: downstream must see EOF
            try:
                os.close(f.fileno())
            except (OSError, ValueError):
                pass
            first_error = first_error or e
    if first_error is not None:
        raise first_error


def _abandon_files(files: list[FifoFile]) -> None:
    """Close the descriptors without flushing: after a failure, a writer must not
    block on a reader that is not reading (the process exits with os._exit, so
    no buffered data is flushed later)."""
    for f in files:
        try:
            os.close(f.fileno())
        except (OSError, ValueError):
            pass


def _usage(t0: float) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_seconds": time.monotonic() - t0,
        "cpu_seconds": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        "max_rss_kb": float(max(own.ru_maxrss, children.ru_maxrss)),
    }


def _is_broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def run_job(
    job: Job,
    fifo_paths: dict[str, str],
    temp_outputs: dict[str, str],
    earlier_outputs: dict[str, str],
    pipe_size: int,
    conn: Any,
    parent_pid: int | None,
    counters: tuple[str, int] | None = None,
    inherited: list[int] | None = None,
) -> None:
    """Entry point of a job process (see module docstring). ``inherited``: the
    supervisor's descriptors to close (see :func:`_close_inherited_fds`)."""
    t0 = time.monotonic()
    _become_job_process(parent_pid)
    _close_inherited_fds(inherited or [])
    _name_process(job)
    if counters is not None:
        progress._attach_current(*counters)
    if not _owns_stdout(job):
        # stdout may be the run's data stream: a print() in user code goes to stderr
        sys.stdout.flush()
        os.dup2(2, 1)
    files: list[FifoFile] = []
    try:
        opened: dict[str, FifoFile] = {}
        if job.manage_fifos:
            opened, files = _open_fifos(job, fifo_paths, pipe_size)

        def bind(spec: Any) -> Any:
            if isinstance(spec, FIFO):
                names = spec.names()
                handles = [opened[n] for n in names] if job.manage_fifos else [fifo_paths[n] for n in names]
                return handles if spec.is_collection else handles[0]
            if isinstance(spec, OutputFile):
                return temp_outputs[spec.key]
            # an earlier phase's output is read where it is being written
            return earlier_outputs.get(spec.key, spec.path)

        args, kwargs = job.map_args(bind)
        result = job.func(*args, **kwargs)
        _close_files(files)
        message: tuple = ("ok", result, _usage(t0))
    except BaseException as e:
        failed_at = time.monotonic()  # before closing: downstream jobs see EOF then
        _abandon_files(files)
        failure = Failure(
            summary=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
            traceback=traceback.format_exc(),
            time=failed_at,
            broken_pipe=_is_broken_pipe(e),
        )
        message = ("error", failure, _usage(t0))
    try:
        conn.send(message)
    except Exception as e:  # the result could not be pickled
        failure = Failure(
            summary=f"job result could not be sent to the supervisor: {type(e).__name__}: {e}",
            traceback=traceback.format_exc(),
            time=time.monotonic(),
            broken_pipe=False,
        )
        message = ("error", failure, _usage(t0))
        conn.send(message)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if message[0] != "ok":
        os._exit(1)
