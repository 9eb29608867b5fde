"""The workflow engine: stages as OS processes, connected by named pipes.

Data flow of a typical workflow (each box is one process)::

                                         ┌──────────┐
                                 dist0 ─▶│ worker0  │─ out0 ─┐
    ┌────────┐ input ┌────────────┐      └──────────┘        ▼
    │ reader │──────▶│ distribute │─ ...                ┌─────────┐ output ┌────────┐
    └────────┘ FIFO  └────────────┘      ┌──────────┐   │ collect │──────▶│ funnel │─▶ file
                            │    distN ─▶│ workerN  │─▶ └─────────┘ FIFO  └────────┘
                            │            └──────────┘        ▲
                            └──────────── header FIFO ───────┘

    supervisor (this process): starts every job, then waits on their result
    pipes and process sentinels together; on the first failure it stops all
    jobs, removes the FIFOs and temporary outputs, and raises WorkflowError.

Roles:

* :class:`~bamflow.engine.fifo.FIFO` specs name the pipes; the builder methods
  (``reader``, ``distribute``, ``workers``, ``collect``, ``funnel``,
  ``add_job``) each add a :class:`~bamflow.engine.job.Job` holding such specs.
* :meth:`Workflow.run` validates the graph (every FIFO has exactly one writer
  and one reader job, inputs exist, outputs can be written) before anything
  starts, creates the FIFOs in a private temporary folder, and hands each
  phase to a :class:`~bamflow.engine.supervisor.Supervisor`.
* A job process (:func:`~bamflow.engine.job.run_job`) opens its FIFOs without
  deadlock (see :mod:`bamflow.engine.fifo`), calls the function and reports its
  return value or traceback.
* Outputs (:class:`~bamflow.engine.files.OutputFile`) are written under
  temporary names and published together once every job of the workflow
  has succeeded (:class:`~bamflow.engine.publish.Publication`).
* Every builder method returns the workflow (so calls chain, as in mrfifo);
  :attr:`Workflow.last` holds the jobs the latest call added: the handles
  with which :meth:`Workflow.result` reads what a job returned.
* A sub-workflow is a barrier: jobs declared before it finish, then it runs,
  then the jobs declared after it. FIFOs never cross such a barrier.

The engine knows nothing of BAM: the BAM stages add their builder methods in
a subclass (:class:`bamflow.bam.workflow.BamWorkflow`, which is what
``bamflow.Workflow`` names).
"""

from __future__ import annotations

import fnmatch
import functools
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, overload

from . import lines
from .errors import WorkflowError
from .fifo import FIFO, pipe_max_size
from .files import InputFile, OutputFile
from .job import Job
from .progress import JobProgress
from .publish import Publication
from .signals import sigterm_raises
from .supervisor import Supervisor

# FIFO specs are immutable: safe as defaults
READER_OUTPUT = FIFO("input", "wb")

W = TypeVar("W", bound="Workflow")


def merge_counts(a: Any, b: Any) -> Any:
    """Add two worker results: numbers add, mappings merge key by key (recursively)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = merge_counts(merged.get(key), value)
        return merged
    return a + b


def _as_output(value: Any) -> Any:
    return OutputFile(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else value


def _as_inputs(input: Any, inputs: Any) -> list[InputFile]:
    if (input is None) == (inputs is None):
        raise ValueError("give either input= or inputs=")
    paths = [input] if input is not None else list(inputs)
    return [p if isinstance(p, InputFile) else InputFile(os.fspath(p)) for p in paths]


class Workflow:
    """A builder for a graph of jobs connected by FIFOs; :meth:`run` runs it.

    After a successful run, ``result_dict`` maps each job name to its
    function's return value and ``job_stats`` to its time and memory use;
    after a failed one (``run`` raised :class:`WorkflowError`), ``exc_dict``
    maps each failed job to its traceback.
    """

    def __init__(
        self,
        name: str = "workflow",
        *,
        start_method: str | None = None,
        pipe_size: int | None = None,
        tmp_dir: str | None = None,
        stop_grace: float = 0.5,
    ) -> None:
        self.name = name
        self.start_method = start_method
        self.pipe_size = pipe_size
        self.tmp_dir = tmp_dir
        self.stop_grace = stop_grace
        self._items: list[Job | Workflow] = []
        self._name_counts: dict[str, int] = {}
        self._last: tuple[Job, ...] = ()
        self._on_success: list[Callable[[], None]] = []
        self.result_dict: dict[str, Any] = {}
        self.exc_dict: dict[str, str] = {}
        self.job_stats: dict[str, dict[str, float]] = {}

    # mrfifo spelled it both ways
    @property
    def results_dict(self) -> dict[str, Any]:
        return self.result_dict

    # -- building ---------------------------------------------------------------

    def _job_name(self, pattern: str) -> str:
        count = self._name_counts.get(pattern, 0)
        self._name_counts[pattern] = count + 1
        return pattern.replace("{workflow}", self.name).replace("{n}", str(count))

    def add_job(
        self,
        *args: Any,
        func: Callable[..., Any],
        job_name: str = "{workflow}.job{n}",
        manage_fifos: bool = True,
        _manage_fifos: bool | None = None,
        **kwargs: Any,
    ) -> Workflow:
        """Add one job running ``func(*args, **kwargs)``.

        FIFO specs among the arguments become open file objects (or paths, with
        ``manage_fifos=False``; ``_manage_fifos`` is mrfifo's spelling).
        """
        if not callable(func):
            raise TypeError(f"func must be callable, not {func!r}")
        managed = manage_fifos if _manage_fifos is None else _manage_fifos
        job = Job(self._job_name(job_name), func, args, kwargs, managed)
        self._items.append(job)
        self._last = (job,)
        return self

    def on_success(self, action: Callable[[], None]) -> Workflow:
        """Run ``action`` when the run's outputs are published (after every job
        succeeded and ``check`` passed): for what cannot be renamed into place,
        such as the end marker of a stream on standard output."""
        self._on_success.append(action)
        return self

    @property
    def last(self) -> tuple[Job, ...]:
        """The jobs added by the latest builder call (several for :meth:`workers`)."""
        return self._last

    def reader(
        self,
        input: str | None = None,
        *,
        inputs: list[str] | None = None,
        output: FIFO = READER_OUTPUT,
        func: Callable[..., Any] = lines.read_files,
        job_name: str = "{workflow}.reader{n}",
        **kwargs: Any,
    ) -> Workflow:
        """Copy one or more files (``-``: stdin) into ``output``, as they are."""
        return self.add_job(func=func, job_name=job_name, inputs=_as_inputs(input, inputs), output=output, **kwargs)

    def gz_reader(self, *args: Any, **kwargs: Any) -> Workflow:
        """Like :meth:`reader`, decompressing gzip inputs (plain ones pass as they are)."""
        kwargs.setdefault("func", lines.read_gz_or_plain)
        kwargs.setdefault("job_name", "{workflow}.gz_reader{n}")
        return self.reader(*args, **kwargs)

    def distribute(
        self,
        input: Any,
        outputs: Any,
        *,
        header_fifo: Any = None,
        options: lines.LineDistributeOptions | None = None,
        func: Callable[..., Any] = lines.distribute_lines,
        job_name: str = "{workflow}.dist{n}",
        **kwargs: Any,
    ) -> Workflow:
        """Split ``input`` over ``outputs``: round-robin in chunks of lines, or by key.

        How is :class:`~bamflow.engine.lines.LineDistributeOptions`, given as
        ``options=`` or as its fields (``chunk_size=``, ``by=``,
        ``header_prefix=`` …). ``by=k`` sends each line to the output chosen by
        a stable hash of its k-th ``field_sep``-separated field. Leading lines
        matching ``header_detect_func`` or ``header_prefix`` are the header:
        sent to ``header_fifo`` and/or, with ``header_broadcast``, to every output.
        """
        options, kwargs = lines.LineDistributeOptions.take(options, kwargs)
        if header_fifo and not options.detects_header:
            raise ValueError("header_fifo needs header_detect_func or header_prefix")
        return self.add_job(
            func=func, job_name=job_name, input=input, outputs=outputs, header_fifo=header_fifo or None,
            options=options, **kwargs,
        )

    def workers(
        self,
        *args: Any,
        func: Callable[..., Any],
        n: int = 4,
        job_name: str = "{workflow}.worker{n}",
        **kwargs: Any,
    ) -> Workflow:
        """Add ``n`` jobs running ``func``; ``{n}`` in FIFO names becomes 0 … n-1."""
        if n < 1:
            raise ValueError(f"workers needs n >= 1, not {n}")

        def for_worker(value: Any, i: int) -> Any:
            if isinstance(value, FIFO):
                return value.for_worker(i)
            if isinstance(value, (list, tuple)):
                return type(value)(for_worker(v, i) for v in value)
            return value

        added = []
        for i in range(n):
            self.add_job(
                *(for_worker(a, i) for a in args),
                func=func,
                job_name=job_name,
                **{k: for_worker(v, i) for k, v in kwargs.items()},
            )
            added.extend(self._last)
        self._last = tuple(added)
        return self

    def collect(
        self,
        inputs: Any,
        output: Any = "-",
        *,
        header_fifo: Any = None,
        options: lines.LineCollectOptions | None = None,
        func: Callable[..., Any] = lines.collect_lines,
        job_name: str = "{workflow}.collect{n}",
        **kwargs: Any,
    ) -> Workflow:
        """Merge ``inputs`` into ``output`` (a FIFO, a file path or ``-``), header first.

        :class:`~bamflow.engine.lines.LineCollectOptions` (``options=`` or its
        fields): ``order="any"`` takes whole lines from whichever input has
        data; ``order="round-robin"`` takes ``chunk_size`` lines from each in turn.
        """
        options, kwargs = lines.LineCollectOptions.take(options, kwargs)
        return self.add_job(
            func=func, job_name=job_name, inputs=inputs, output=_as_output(output), header_fifo=header_fifo or None,
            options=options, **kwargs,
        )

    def funnel(
        self,
        *args: Any,
        func: Callable[..., Any] = lines.write_file,
        job_name: str = "{workflow}.funnel{n}",
        **kwargs: Any,
    ) -> Workflow:
        """Add a job with a single output; a path given as ``output`` is atomic."""
        if "output" in kwargs:
            kwargs["output"] = _as_output(kwargs["output"])
        return self.add_job(*args, func=func, job_name=job_name, **kwargs)

    def subworkflow(self: W, name: str = "subworkflow") -> W:
        """A nested workflow that runs after the jobs declared before it.

        Add jobs to the returned builder; it shares this workflow's settings
        and its results land in this workflow's ``result_dict``.
        """
        sub = type(self)(
            name,
            start_method=self.start_method,
            pipe_size=self.pipe_size,
            tmp_dir=self.tmp_dir,
            stop_grace=self.stop_grace,
        )
        self._items.append(sub)
        return sub

    # -- inspecting -------------------------------------------------------------

    def phases(self) -> list[list[Job]]:
        """The jobs in groups that run one after the other (split at sub-workflows)."""
        groups: list[list[Job]] = []
        current: list[Job] = []
        for item in self._items:
            if isinstance(item, Workflow):
                if current:
                    groups.append(current)
                    current = []
                groups.extend(item.phases())
            else:
                current.append(item)
        if current:
            groups.append(current)
        return groups

    def _all_on_success(self) -> list[Callable[[], None]]:
        actions = list(self._on_success)
        for item in self._items:
            if isinstance(item, Workflow):
                actions += item._all_on_success()
        return actions

    def jobs(self) -> list[Job]:
        return [job for phase in self.phases() for job in phase]

    @overload
    def result(self, job: Job) -> Any: ...
    @overload
    def result(self, job: Sequence[Job]) -> list[Any]: ...
    def result(self, job: Job | Sequence[Job]) -> Any:
        """What ``job`` (a handle from :attr:`last`) returned; for a sequence of
        jobs, a list in that order."""
        if isinstance(job, Job):
            return self.result_dict[job.name]
        return [self.result_dict[j.name] for j in job]

    def results(self, pattern: str = "*") -> list[Any]:
        """Return values of the jobs whose names match the glob ``pattern``, in job order."""
        return [result for name, result in self.result_dict.items() if fnmatch.fnmatchcase(name, pattern)]

    def reduce(
        self,
        pattern: str = "*.worker*",
        combine: Callable[[Any, Any], Any] = merge_counts,
        initial: Any = None,
    ) -> Any:
        """Fold the results of the matching jobs with ``combine`` (default: sum counters)."""
        return functools.reduce(combine, self.results(pattern), initial)

    def validate(self) -> None:
        """Raise WorkflowError for a graph that could not run; starts nothing."""
        problems: list[str] = []
        written_before: set[str] = set()
        all_outputs: dict[str, str] = {}
        names = [job.name for job in self.jobs()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            problems.append(f"more than one job is named {', '.join(repeated)}")
        for phase in self.phases():
            writers: dict[str, list[str]] = {}
            readers: dict[str, list[str]] = {}
            for job in phase:
                for name, is_reader in job.fifo_ends():
                    (readers if is_reader else writers).setdefault(name, []).append(job.name)
            for name in sorted(set(writers) | set(readers)):
                w, r = writers.get(name, []), readers.get(name, [])
                if not w:
                    problems.append(f"FIFO '{name}' is read by {', '.join(r)} but written by no job")
                elif not r:
                    problems.append(f"FIFO '{name}' is written by {', '.join(w)} but read by no job")
                if len(w) > 1:
                    problems.append(f"FIFO '{name}' is written by more than one job: {', '.join(w)}")
                if len(r) > 1:
                    problems.append(f"FIFO '{name}' is read by more than one job: {', '.join(r)}")
            phase_outputs: set[str] = set()
            for job in phase:
                for spec in job.specs():
                    if isinstance(spec, InputFile) and spec.key not in written_before:
                        problem = spec.check()
                        if problem:
                            problems.append(f"{job.name}: {problem}")
                    elif isinstance(spec, OutputFile) and not spec.is_special:
                        path = spec.key
                        problem = spec.check()
                        if problem:
                            problems.append(f"{job.name}: {problem}")
                        if path in all_outputs:
                            problems.append(f"output '{spec.path}' is written by both {all_outputs[path]} and {job.name}")
                        all_outputs[path] = job.name
                        phase_outputs.add(path)
            written_before |= phase_outputs
        if problems:
            raise WorkflowError(f"workflow '{self.name}': " + "; ".join(problems))

    # -- running ----------------------------------------------------------------

    def run(
        self,
        timeout: float | None = None,
        on_progress: Callable[[list[JobProgress]], None] | None = None,
        progress_interval: float = 0.5,
        check: Callable[[Workflow], None] | None = None,
        publication: Publication | None = None,
    ) -> Workflow:
        """Run every phase; returns self, raises WorkflowError on any failure.

        ``timeout`` (seconds) bounds the whole run. ``on_progress`` is called
        about every ``progress_interval`` seconds (and once at the end of each
        phase) with a :class:`~bamflow.engine.progress.JobProgress` per job.
        ``check(workflow)`` runs after every job succeeded and before any
        output is published: if it raises (say, because the reads do not add
        up), no output appears. The outputs are published by ``publication``
        when given (the caller adds its own files, then commits it; a failed
        run aborts it), else by one of the run's own, committed here. SIGINT
        and SIGTERM stop every job and clean up before the exception
        propagates; they wait while outputs are being renamed, so that all or
        none appear.
        """
        self.validate()
        _check_descriptors(self.phases())
        self.result_dict.clear()
        self.exc_dict.clear()
        self.job_stats.clear()
        context = multiprocessing.get_context(self.start_method)
        pipe_size = self.pipe_size or pipe_max_size()
        deadline = None if timeout is None else time.monotonic() + timeout
        own = publication is None
        pub = Publication() if publication is None else publication
        for action in self._all_on_success():
            pub.on_commit(action)
        temp_outputs: dict[str, str] = {}
        fifo_dir = tempfile.mkdtemp(prefix=f"bamflow-{_safe_name(self.name, 40)}-", dir=self.tmp_dir)
        succeeded = False
        try:
            with sigterm_raises():
                for number, phase in enumerate(self.phases()):
                    # inputs are read where an earlier phase wrote them; a file
                    # this phase both reads and writes is read as it was
                    earlier_outputs = dict(temp_outputs)
                    for job in phase:
                        for spec in job.specs():
                            if isinstance(spec, OutputFile):
                                temp_outputs.setdefault(spec.key, pub.path(spec.path))
                    supervisor = Supervisor(
                        phase,
                        context,
                        self._make_fifos(phase, os.path.join(fifo_dir, str(number))),
                        temp_outputs,
                        earlier_outputs,
                        pipe_size,
                        self.stop_grace,
                        counters_path=os.path.join(fifo_dir, str(number), "counters"),
                        on_progress=on_progress,
                        progress_interval=progress_interval,
                    )
                    try:
                        outcomes = supervisor.run(deadline)
                    except WorkflowError as e:
                        self.exc_dict.update(e.exc_dict)
                        self.result_dict.update(e.result_dict)
                        e.exc_dict, e.result_dict = dict(self.exc_dict), dict(self.result_dict)
                        raise
                    for name, outcome in outcomes.items():
                        self.result_dict[name] = outcome.result
                        self.job_stats[name] = outcome.usage
                    shutil.rmtree(os.path.join(fifo_dir, str(number)), ignore_errors=True)
                if check is not None:
                    check(self)
                if own:
                    pub.commit()
                succeeded = True
        finally:
            shutil.rmtree(fifo_dir, ignore_errors=True)
            if not succeeded:
                pub.abort()
        return self

    @staticmethod
    def _make_fifos(phase: list[Job], folder: str) -> dict[str, str]:
        os.mkdir(folder, 0o700)
        names = sorted({name for job in phase for name, _ in job.fifo_ends()})
        paths = {}
        for i, name in enumerate(names):
            # FIFO names are free text; the file name must not be
            paths[name] = os.path.join(folder, f"{i}-{_safe_name(name, 60)}")
            os.mkfifo(paths[name], 0o600)
        return paths

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, jobs={[job.name for job in self.jobs()]})"


JOB_BASE_FDS = 12  # stdio, the result pipe, the sentinel pipes, the counters, libraries' own
SUPERVISOR_FDS_PER_JOB = 2  # result pipe, exit sentinel (see supervisor._drop_parent_alive_pipe)
SUPERVISOR_FDS = 8  # the counters file, the pipes of the job being started, a listing


def _check_descriptors(phases: list[list[Job]]) -> None:
    """Raise WorkflowError before anything starts if the open-file limit
    (``ulimit -n``) is too low for the supervisor or a job; the soft limit is
    first raised to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    need = max(
        max(
            open_now + SUPERVISOR_FDS + SUPERVISOR_FDS_PER_JOB * len(phase),
            max(JOB_BASE_FDS + len(job.fifo_ends()) + len(job.specs()) for job in phase),
        )
        for phase in phases
    ) if phases else 0
    if need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else need * 2, hard))
        return
    raise WorkflowError(
        f"this workflow needs about {need} open files, but the limit (ulimit -n) is {hard}: "
        f"raise it (ulimit -n {need * 2}) or use fewer workers, shards or outputs"
    )


def _safe_name(name: str, limit: int) -> str:
    """A free-text name as a file name part."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:limit]
