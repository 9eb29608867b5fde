"""The BAM layer's workflow builder: the engine's :class:`~bamflow.engine.Workflow`
plus the BAM stages (``bamflow.Workflow`` is this class).

    BAM_reader ─▶ distribute_bam ─▶ workers ─▶ collect_bam ─▶ BAM_writer
                        └──────────── header ──────▲

:meth:`BamWorkflow.scatter` assembles that whole shape once, for every BAM
command that shards reads over worker processes (map_reads, map_reduce,
dedup, count, qc, correct, split): it returns the handles of the jobs it
added, and :meth:`Scatter.check_flow` checks that every stage passed on
what it got. :meth:`BamWorkflow.regions` is the other shape, for an
indexed coordinate-sorted file (:func:`~bamflow.bam.partition.plan_regions`)::

    read_partition_i ─▶ worker_i ─▶ [BAM_writer_i ─▶ join in order]   (i < N)

(each part compressed by its own writer, part 0's with the header; the
join copies the compressed blocks, :func:`~bamflow.bam.concat.join_parts`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..engine.errors import WorkflowError
from ..engine.fifo import FIFO
from ..engine.files import InputFile, write_all
from ..engine.job import Job
from ..engine.publish import STDOUT_NAMES
from ..engine.workflow import Workflow, _as_output
from . import stages
from .bgzf import EOF_BLOCK
from .concat import join_parts
from .options import CollectOptions, DecodeOptions, DistributeOptions, EncodeOptions
from .partition import RegionPlan, read_partition

# FIFO specs are immutable: safe as defaults
BAM_READER_OUTPUT = FIFO("input_bam", "wb")


def refuse_overwrite(inputs: Iterable[str | os.PathLike[str]], output: str | os.PathLike[str] | None) -> None:
    """Raise WorkflowError if ``output`` is one of ``inputs`` (by name, or the
    same file by another name): no command writes over what it reads."""
    if output is None or os.fspath(output) in STDOUT_NAMES:
        return
    try:
        target = os.stat(output)
    except OSError:
        target = None
    for path in inputs:
        path = os.fspath(path)
        if path in ("-", "/dev/stdin"):
            continue
        same = os.path.abspath(path) == os.path.abspath(output)
        if not same and target is not None:
            try:
                same = os.path.samestat(target, os.stat(path))
            except OSError:
                same = False
        if same:
            raise WorkflowError(f"the output {os.fspath(output)} is the input {path}: choose another output")


def _end_stdout_stream() -> None:
    """The BGZF EOF marker after a BAM written to standard output, once the run succeeded."""
    write_all(1, memoryview(EOF_BLOCK))


class BamWorkflow(Workflow):
    """A :class:`~bamflow.engine.Workflow` with the BAM stages as builder methods.

    Each stage's options are one dataclass (bamflow.bam.options), given as
    ``options=`` or as its fields among the keyword arguments; the other
    keyword arguments go to the job function.
    """

    def BAM_reader(
        self,
        input: str | os.PathLike[str] = "-",
        *,
        output: FIFO = BAM_READER_OUTPUT,
        options: DecodeOptions | None = None,
        func: Callable[..., Any] = stages.decode_bam,
        job_name: str = "{workflow}.BAM_reader{n}",
        **kwargs: Any,
    ) -> BamWorkflow:
        """Decode a BAM, uncompressed BAM or SAM file (``-``: stdin) into a raw BAM
        stream (:class:`~bamflow.bam.options.DecodeOptions`: ``threads``)."""
        options, kwargs = DecodeOptions.take(options, kwargs)
        self.add_job(func=func, job_name=job_name, input=InputFile(os.fspath(input)), output=output, options=options,
                     **kwargs)
        return self

    bam_reader = BAM_reader

    def distribute_bam(
        self,
        input: Any,
        outputs: Any,
        *,
        unassigned: Any = None,
        header_fifo: Any = None,
        options: DistributeOptions | None = None,
        func: Callable[..., Any] = stages.distribute_records,
        job_name: str = "{workflow}.dist{n}",
        **kwargs: Any,
    ) -> BamWorkflow:
        """Deal the records of a raw BAM stream to ``outputs``
        (:class:`~bamflow.bam.options.DistributeOptions`: ``by``, ``chunk_size``,
        ``missing``, ``header_broadcast``, ``frame_chunks``, ``count_values``).
        Reads without the key tag go to ``unassigned`` with ``missing="unassigned"``;
        ``header_fifo`` gets the header."""
        options, kwargs = DistributeOptions.take(options, kwargs)
        self.add_job(
            func=func, job_name=job_name, input=input, outputs=outputs, options=options, unassigned=unassigned,
            header_fifo=header_fifo, **kwargs,
        )
        return self

    def collect_bam(
        self,
        inputs: Any,
        output: Any,
        *,
        header_fifo: Any = None,
        options: CollectOptions | None = None,
        func: Callable[..., Any] = stages.collect_records,
        job_name: str = "{workflow}.collect{n}",
        **kwargs: Any,
    ) -> BamWorkflow:
        """Merge BAM record streams into one raw BAM stream, header first
        (:class:`~bamflow.bam.options.CollectOptions`: ``order``)."""
        options, kwargs = CollectOptions.take(options, kwargs)
        self.add_job(
            func=func, job_name=job_name, inputs=inputs, output=_as_output(output), header_fifo=header_fifo,
            options=options, **kwargs,
        )
        return self

    def BAM_writer(
        self,
        input: Any,
        output: Any = "-",
        *,
        options: EncodeOptions | None = None,
        func: Callable[..., Any] = stages.encode_bam,
        job_name: str = "{workflow}.BAM_writer{n}",
        **kwargs: Any,
    ) -> BamWorkflow:
        """Write a raw BAM stream as BAM, uncompressed BAM or SAM, adding one @PG line
        (:class:`~bamflow.bam.options.EncodeOptions`: ``level``, ``threads``,
        ``fmt``, ``command_line``; the default command line names this workflow)."""
        options, kwargs = EncodeOptions.take(options, kwargs)
        if options.command_line is None:
            options = dataclasses.replace(options, command_line=f"{self.name} (bamflow Python API)")
        to_stdout = isinstance(output, (str, os.PathLike)) and os.fspath(output) in STDOUT_NAMES
        if to_stdout and options.fmt != "sam" and options.end_marker:
            # stdout cannot be published by renaming: its end marker waits for the run's success,
            # so that a failed run's stream never passes `samtools quickcheck`
            options = dataclasses.replace(options, end_marker=False)
            self.on_success(_end_stdout_stream)
        self.add_job(func=func, job_name=job_name, input=input, output=_as_output(output), options=options, **kwargs)
        return self

    bam_writer = BAM_writer

    def scatter(
        self,
        input: str | os.PathLike[str],
        worker: Callable[..., Any],
        *,
        workers: int,
        distribute: DistributeOptions,
        worker_kwargs: dict[str, Any] | None = None,
        decode: DecodeOptions = DecodeOptions(),
        output: str | os.PathLike[str] | None = None,
        collect: CollectOptions = CollectOptions(),
        encode: EncodeOptions = EncodeOptions(),
        unassigned_worker: Callable[..., Any] | None = None,
        unassigned_kwargs: dict[str, Any] | None = None,
        pass_unassigned: bool = False,
    ) -> Scatter:
        """The usual BAM workflow, assembled once::

            BAM_reader ─▶ distribute_bam ─▶ worker × N ──▶ [collect_bam ─▶ BAM_writer ─▶ output]
                               └─(missing key)─▶ unassigned_worker ─┘ (with pass_unassigned)

        Each worker is called as ``worker(input=FIFO path, output=FIFO path or
        None, **worker_kwargs)`` (unmanaged: it opens them itself) and returns
        a dict with ``reads_in`` (reads it was handed) and ``written`` (records
        it wrote; None if it cannot tell). ``unassigned_worker`` (with
        ``distribute.missing="unassigned"``) gets the reads without the key,
        with ``unassigned_kwargs``. Returns the jobs' handles.
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        refuse_overwrite([input], output)
        if (distribute.missing == "unassigned") != (unassigned_worker is not None):
            raise ValueError("missing='unassigned' and an unassigned worker go together")
        if encode.sort_order is None and collect.order not in ("input", "coordinate"):
            encode = dataclasses.replace(encode, sort_order="unsorted")  # the workers' outputs interleave
        writes = output is not None
        self.BAM_reader(input=input, output=FIFO("decoded", "wb"), options=decode)
        reader = self.last[0]
        self.distribute_bam(
            input=FIFO("decoded", "rb"),
            outputs=FIFO("share{n}", "wb", n=workers),
            unassigned=FIFO("unassigned", "wb") if unassigned_worker is not None else None,
            header_fifo=FIFO("header", "wb") if writes else None,
            options=distribute,
            source=stages.source_name(os.fspath(input)),
        )
        distributor = self.last[0]
        self.workers(
            input=FIFO("share{n}", "rb"),
            output=FIFO("mapped{n}", "wb") if writes else None,
            func=worker,
            n=workers,
            manage_fifos=False,
            **(worker_kwargs or {}),
        )
        worker_jobs = list(self.last)
        unassigned_job = None
        n_streams = workers
        if unassigned_worker is not None:
            passes = writes and pass_unassigned
            self.add_job(
                func=unassigned_worker,
                job_name="{workflow}.unassigned{n}",
                manage_fifos=False,
                input=FIFO("unassigned", "rb"),
                output=FIFO(f"mapped{workers}", "wb") if passes else None,
                **(unassigned_kwargs or {}),
            )
            unassigned_job = self.last[0]
            n_streams += passes
        collector = writer = None
        if writes:
            self.collect_bam(
                inputs=FIFO("mapped{n}", "rb", n=n_streams), header_fifo=FIFO("header", "rb"),
                output=FIFO("collected", "wb"), options=collect,
            )
            collector = self.last[0]
            self.BAM_writer(input=FIFO("collected", "rb"), output=output, options=encode)
            writer = self.last[0]
        return Scatter(reader, distributor, worker_jobs, unassigned_job, collector, writer,
                       passes_unassigned=writes and pass_unassigned and unassigned_worker is not None,
                       key_tags=distribute.by if distribute.by_tags else ())

    def regions(
        self,
        plan: RegionPlan,
        worker: Callable[..., Any],
        *,
        worker_kwargs: dict[str, Any] | None = None,
        threads: int = 1,
        output: str | os.PathLike[str] | None = None,
        encode: EncodeOptions = EncodeOptions(),
        spool_folder: str | None = None,
    ) -> Regions:
        """Each partition of ``plan`` (whole references) read by its own job
        (BGZF inflated in ``threads`` threads) straight into its own worker,
        no decode or distribute process; with ``output`` (BAM) each worker's
        records are compressed by their own writer (``encode``, its threads
        split over the N writers: ``encode.threads // N`` each when that is
        more than 1, else inline), part 0's with the header, the others
        without, and joined in partition order (the parts are disjoint and in
        coordinate order) without recompressing: the later parts wait,
        compressed, in unnamed files in ``spool_folder`` (None: the temporary
        folder) meanwhile. Workers are called as in :meth:`scatter`."""
        path = plan.partitions[0].path
        refuse_overwrite([path], output)
        writes = output is not None
        if writes and encode.fmt != "bam":
            raise ValueError(f"a region run writes BAM, not {encode.fmt}")
        readers = []
        for part in plan.partitions:
            self.add_job(func=read_partition, job_name="{workflow}.partition{n}", output=FIFO(f"part{part.index}", "wb"),
                         partition=part, header=plan.layout.header, threads=threads)
            readers.append(self.last[0])
        n = len(plan.partitions)
        self.workers(
            input=FIFO("part{n}", "rb"),
            output=FIFO("mapped{n}", "wb") if writes else None,
            func=worker,
            n=n,
            manage_fifos=False,
            **(worker_kwargs or {}),
        )
        worker_jobs = list(self.last)
        writers: list[Job] = []
        joiner = None
        if writes:
            if encode.command_line is None:
                encode = dataclasses.replace(encode, command_line=f"{self.name} (bamflow Python API)")
            # one writer per part, so that the deflate (most of a run's CPU) is shared; helper threads only
            # where each writer gets more than one core's worth
            each = dataclasses.replace(encode, threads=encode.threads // n if encode.threads // n > 1 else 0,
                                       end_marker=False)
            for i in range(n):
                self.add_job(func=stages.encode_bam, job_name="{workflow}.BAM_writer{n}", input=FIFO(f"mapped{i}", "rb"),
                             output=FIFO(f"bgzf{i}", "wb"),
                             options=each if i == 0 else dataclasses.replace(each, header=False))
                writers.append(self.last[0])
            to_stdout = isinstance(output, (str, os.PathLike)) and os.fspath(output) in STDOUT_NAMES
            if to_stdout:  # its end marker once the run succeeded (see BAM_writer)
                self.on_success(_end_stdout_stream)
            self.add_job(func=join_parts, job_name="{workflow}.join{n}", inputs=FIFO("bgzf{n}", "rb", n=n),
                         output=_as_output(output), folder=spool_folder, end_marker=not to_stdout)
            joiner = self.last[0]
        return Regions(plan, readers, worker_jobs, writers, joiner)


@dataclass
class Scatter:
    """Handles of the jobs :meth:`BamWorkflow.scatter` added."""

    reader: Job
    distributor: Job
    workers: list[Job]
    unassigned: Job | None
    collector: Job | None
    writer: Job | None
    passes_unassigned: bool = False
    key_tags: tuple[str, ...] = ()
    flow: dict[str, Any] = field(default_factory=dict)

    def check_flow(self, w: Workflow) -> dict[str, Any]:
        """Check that every stage passed on what it got: the reads dealt to the
        workers are the reads they were handed, the records they wrote are the
        records collected, and those the records written out; the key tags are
        on some read. Raises WorkflowError naming the stages that disagree;
        returns the counts."""
        dist = w.result(self.distributor)
        require_tags(self.key_tags, dist["records"], dist["tags_seen"])
        per_worker = w.result(self.workers)
        unassigned = w.result(self.unassigned) if self.unassigned is not None else None
        dealt = dist["records"] - dist["dropped_missing_tag"] - dist["unassigned"]
        handed = sum(r["reads_in"] for r in per_worker)
        problems = []
        if dealt != handed:
            problems.append(f"{dealt} reads dealt to the workers, {handed} read by them")
        if unassigned is not None and unassigned["reads_in"] != dist["unassigned"]:
            problems.append(f"{dist['unassigned']} reads without the key, {unassigned['reads_in']} read by their worker")
        flow: dict[str, Any] = {"reads_in": dist["records"], "dealt": dealt, "per_worker": per_worker}
        if self.collector is not None:
            collected = w.result(self.collector)["records"]
            written = [r.get("written") for r in per_worker]
            if self.passes_unassigned and unassigned is not None:
                written.append(unassigned.get("written"))
            if None not in written and sum(written) != collected:
                problems.append(f"{sum(written)} records written by the workers, {collected} collected")
            encoded = w.result(self.writer)["records"] if self.writer is not None else collected
            if encoded != collected:
                problems.append(f"{collected} records collected, {encoded} written out")
            flow["collected"] = collected
        if problems:
            raise WorkflowError("reads do not add up between stages: " + "; ".join(problems))
        self.flow = flow
        return flow

    def require_tags(self, w: Workflow, tags: Iterable[str]) -> None:
        """Raise WorkflowError if one of ``tags`` is on none of the reads (a
        mistyped tag name), naming the tags that were seen; reads that lack a
        tag others carry are the workers' counted drops."""
        dist = w.result(self.distributor)
        require_tags(tags, dist["records"], dist["tags_seen"])


@dataclass
class Regions:
    """Handles of the jobs :meth:`BamWorkflow.regions` added; checked as a
    :class:`Scatter` is (``check_flow``, ``require_tags``), with the workers'
    own counts: each worker read every byte its partition's reader wrote,
    and as many reads as the index counts on its references; each part's
    writer compressed the records its worker wrote, and the join copied
    every byte the writers wrote."""

    plan: RegionPlan
    readers: list[Job]
    workers: list[Job]
    writers: list[Job]
    joiner: Job | None
    unassigned: Job | None = None
    flow: dict[str, Any] = field(default_factory=dict)

    def check_flow(self, w: Workflow) -> dict[str, Any]:
        read = w.result(self.readers)
        per_worker = w.result(self.workers)
        problems = []
        for i, (r, got, want) in enumerate(zip(read, per_worker, self.plan.records, strict=True)):
            if r["bytes"] + r["header_bytes"] != got["bytes"]:
                problems.append(f"partition {i}: {r['bytes'] + r['header_bytes']} bytes read, {got['bytes']} taken by "
                                f"its worker")
            if got["reads_in"] != want:
                lo, hi = self.plan.refs[i]
                problems.append(f"partition {i} (references {lo}-{hi - 1}): {got['reads_in']} reads, its index counts "
                                f"{want}")
        reads_in = sum(r["reads_in"] for r in per_worker)
        flow: dict[str, Any] = {"reads_in": reads_in, "dealt": reads_in, "per_worker": per_worker}
        if self.joiner is not None:
            encoded = w.result(self.writers)
            for i, (got, out) in enumerate(zip(per_worker, encoded, strict=True)):
                if got["written"] != out["records"]:
                    problems.append(f"part {i}: {got['written']} records written by its worker, {out['records']} "
                                    f"compressed")
            joined = w.result(self.joiner)["part_bytes"]
            compressed = [out["bytes"] for out in encoded]
            if joined != compressed:
                problems.append(f"parts of {compressed} compressed bytes, {joined} joined")
            flow["collected"] = sum(out["records"] for out in encoded)
        if problems:
            raise WorkflowError("reads do not add up between stages: " + "; ".join(problems))
        self.flow = flow
        return flow

    def require_tags(self, w: Workflow, tags: Iterable[str]) -> None:
        """As :meth:`Scatter.require_tags`, from the tags the workers saw (``note_tags``)."""
        per_worker = w.result(self.workers)
        seen = {t for r in per_worker for t in r.get("tags_seen", ())}
        require_tags(tags, sum(r["reads_in"] for r in per_worker), seen)


def require_tags(tags: Iterable[str], reads: int, tags_seen: Iterable[str]) -> None:
    """The check of a keyed command: every tag it keys on is on at least one
    read (when there are reads at all)."""
    seen = set(tags_seen)
    for tag in tags:
        if reads and tag not in seen:
            listed = " ".join(sorted(seen)) or "none"
            raise WorkflowError(f"tag {tag} is on none of {reads:,} reads; tags seen: {listed}")
