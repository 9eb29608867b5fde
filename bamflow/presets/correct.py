"""Cell-barcode correction against a whitelist, as Cell Ranger does it.

Rule (Cell Ranger's ``correct_bc_error``, cellranger/stats.py; STARsolo's
``--soloCBmatchWLtype 1MM_multi_pseudocounts`` is the same model):

1. the raw barcode (``CR``) is in the whitelist → ``CB = CR + suffix`` (*exact*);
2. else every whitelist barcode at Hamming distance 1 is a candidate (a
   barcode with one ``N`` can only change at the ``N``; with two or more
   ``N`` there are none). Candidate ``c`` that differs at position ``i`` gets
   the likelihood ``(count(c) + pseudocount) * 10 ** (-min(33, Q_i) / 10)``:
   ``count(c)`` = reads of the input whose raw barcode is exactly ``c``
   (first pass; secondary and supplementary records not counted),
   ``pseudocount`` = 1, ``Q_i`` = Phred quality of base ``i`` from ``CY``
   (offset 33; without ``CY`` every base counts as Q33). The posterior of
   the best candidate is its likelihood over the sum of all; if it is
   ``> threshold`` (0.975, strictly greater as in Cell Ranger) the read gets
   ``CB = best + suffix`` (*corrected*), else no CB (*ambiguous*);
3. no candidate (or a raw barcode of another length) → no CB (*uncorrectable*);
4. no ``CR`` tag (or an empty one) → no CB (*missing_tag*).

Every read is written (tagged or not): ``reads_in == written``, and
``exact + corrected + ambiguous + uncorrectable + missing_tag == reads_in``.
STARsolo's plain ``1MM_multi`` uses no pseudocount (candidates need >= 1
exact read): ``pseudocount=0`` gives that.

Two passes: (1) count raw barcodes with the ``TagCounter`` kernel
(histogram.count_values), (2) a scatter: BAM_reader → distribute_bam
(round-robin, chunk-end frames) → ``workers`` × kernel
:class:`~bamflow.kernels.presets.Corrector` (frames passed on) → collect_bam
(input order) → BAM_writer (one @PG).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..bam.options import CollectOptions, DecodeOptions, DistributeOptions, EncodeOptions, parse_tags
from ..bam.workflow import BamWorkflow
from ..engine import progress
from ..engine.errors import WorkflowError
from ..engine.files import STDIN_NAMES, copy_stream, open_for_reading, open_for_writing
from ..engine.publish import STDOUT_NAMES
from ..kernels.presets import CORRECT_STATS, Corrector
from .histogram import count_values

EXACT, CORRECTED, AMBIGUOUS, UNCORRECTABLE = 0, 1, 2, 3
CHUNK_SIZE = 2000  # reads a worker gets at a time


def load_whitelist(path: str | os.PathLike[str]) -> Any:
    """A :class:`bamflow.kernels.presets.Whitelist` from a file of barcodes, one a line
    (gzip or plain). An empty file, an empty line, a line of another length or with
    characters other than ACGT raise ValueError naming the file and line."""
    import isal.igzip

    from ..kernels.presets import Whitelist

    path = os.fspath(path)
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    wl = Whitelist()
    line = 1
    pending = b""
    opener = isal.igzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                data = pending + chunk
                cut = data.rfind(b"\n") + 1
                if cut:
                    line += wl.add_lines(memoryview(data)[:cut], line, path)
                pending = data[cut:]
    except (EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read the whitelist ({e})") from None
    if pending:
        wl.add_lines(pending, line, path)
    wl.finish(path)
    return wl


class Resolver:
    """Decides a raw barcode's CB; caches what does not depend on qualities."""

    def __init__(self, whitelist: Any, exact_counts: dict[bytes, int], suffix: bytes, pseudocount: float,
                 threshold: float) -> None:
        self.wl = whitelist
        self.counts = exact_counts
        self.suffix = suffix
        self.pseudocount = pseudocount
        self.threshold = threshold
        self.candidates: dict[bytes, list[tuple[int, bytes, float]]] = {}

    def __call__(self, raw: bytes, qual: bytes | None) -> tuple[int, bytes | None, bool]:
        """(code, CB value or None, whether the answer holds whatever the qualities)."""
        cands = self.candidates.get(raw)
        if cands is None:
            if raw in self.wl:
                return EXACT, raw + self.suffix, True
            cands = [(pos, c, self.counts.get(c, 0) + self.pseudocount) for pos, c in self.wl.neighbors(raw)]
            if not cands or not any(prior > 0 for _, _, prior in cands):
                return UNCORRECTABLE, None, True
            if len(self.candidates) > 2_000_000:
                self.candidates.clear()
            self.candidates[raw] = cands
        if qual is not None and len(qual) != len(raw):
            raise ValueError(f"barcode {raw.decode(errors='replace')} has {len(qual)} qualities")
        best = None
        best_l = total = 0.0
        for pos, c, prior in cands:
            q = min(33, qual[pos] - 33) if qual is not None else 33
            likelihood = prior * 10.0 ** (-q / 10.0)
            total += likelihood
            if likelihood > best_l:
                best_l, best = likelihood, c
        if best is not None and best_l / total > self.threshold:
            return CORRECTED, best + self.suffix, False
        return AMBIGUOUS, None, False


def correct_worker(input: str, output: str, resolver: Resolver, tags: tuple[str, str, str]) -> dict[str, int]:
    """A job: add the corrected tag to the records of a raw BAM stream (kernel
    Corrector; chunk-end frames pass through)."""
    in_fd = open_for_reading(input)
    try:
        out_fd = open_for_writing(output)
        try:
            stats = Corrector(in_fd, out_fd, *tags, resolver, progress=progress.current().slot).run()
        finally:
            os.close(out_fd)
    finally:
        os.close(in_fd)
    return {**stats, "reads_in": stats["records"], "written": stats["records"]}


def _describe(whitelist: Any) -> str:
    return os.fspath(whitelist) if isinstance(whitelist, (str, os.PathLike)) else "<Whitelist>"


def correct(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    whitelist: Any,
    tag_in: str = "CR",
    qual_tag: str = "CY",
    tag_out: str = "CB",
    suffix: str = "-1",
    threads: int = 2,
    workers: int = 2,
    level: int | str | None = None,
    pseudocount: float = 1.0,
    threshold: float = 0.975,
    command_line: str | None = None,
    on_progress: Callable[[Any], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Correct cell barcodes of ``input`` against ``whitelist`` (a path, or a loaded
    :class:`~bamflow.kernels.presets.Whitelist`) and write ``output`` with ``tag_out``.

    Returns stats: reads_in, written, dropped (always empty: every read is
    written), exact, corrected, ambiguous, uncorrectable, missing_tag,
    whitelist (size), whitelist_seconds, barcodes_seen. Raises WorkflowError
    if the counts do not add up or a job fails; ValueError for a malformed whitelist.
    """
    from ..kernels.presets import Whitelist

    tags = parse_tags([tag_in, qual_tag, tag_out])
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    t0 = time.perf_counter()
    wl = whitelist if isinstance(whitelist, Whitelist) else load_whitelist(whitelist)
    wl_seconds = time.perf_counter() - t0

    with _rereadable(os.fspath(input), os.fspath(output)) as source:
        deadline = None if timeout is None else time.monotonic() + timeout
        return _correct(source, output, wl, wl_seconds, whitelist, tags, suffix, threads, workers, level, pseudocount,
                        threshold, command_line, on_progress, deadline)


@contextmanager
def _rereadable(input: str, output: str) -> Iterator[str]:
    """``input`` as a path that can be read twice: standard input is first
    copied to a hidden file beside the output (removed afterwards)."""
    if input not in STDIN_NAMES:
        yield input
        return
    folder = os.path.dirname(os.path.abspath(output)) if output not in STDOUT_NAMES else None
    fd, path = tempfile.mkstemp(prefix=".bamflow-stdin-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as spool:
            copy_stream(sys.stdin.buffer, spool.fileno())
        yield path
    finally:
        os.unlink(path)


def _correct(input: str, output: Any, wl: Any, wl_seconds: float, whitelist: Any, tags: tuple[str, ...],
             suffix: str, threads: int, workers: int, level: Any, pseudocount: float, threshold: float,
             command_line: str | None, on_progress: Any, deadline: float | None) -> dict[str, Any]:
    """The two passes of :func:`correct` over a path that can be read twice,
    both done by ``deadline`` (time.monotonic(); None: no limit)."""

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    tag_in = tags[0]
    # pass 1: reads per raw barcode; keep those in the whitelist
    counts, _ = count_values(input, tag_in, skip_secondary=True, threads=threads, workers=1, name="correct_count",
                             timeout=left())
    exact_counts = {bc: n for bc, n in counts.items() if bc in wl}
    barcodes_seen = len(counts)
    del counts
    resolver = Resolver(wl, exact_counts, suffix.encode(), pseudocount, threshold)

    # pass 2
    w = BamWorkflow("correct")
    jobs = w.scatter(
        os.fspath(input),
        correct_worker,
        workers=workers,
        distribute=DistributeOptions(chunk_size=CHUNK_SIZE, frame_chunks=True),
        worker_kwargs=dict(resolver=resolver, tags=tags),
        decode=DecodeOptions(threads),
        output=os.fspath(output),
        collect=CollectOptions("input"),
        encode=EncodeOptions(
            **({} if level is None else {"level": level}), threads=threads,
            command_line=command_line or f"bamflow correct (Python API) whitelist={_describe(whitelist)}",
        ),
    )
    stats: dict[str, Any] = {}

    def check(w: BamWorkflow) -> None:
        """The books, before the output appears."""
        flow = jobs.check_flow(w)
        per_worker = flow["per_worker"]
        totals = {k: sum(p[k] for p in per_worker) for k in CORRECT_STATS}
        stats.update({
            "reads_in": flow["reads_in"],
            "written": flow["collected"],
            "dropped": {},
            **{k: totals[k] for k in CORRECT_STATS[1:6]},
            "whitelist": len(wl),
            "whitelist_seconds": round(wl_seconds, 3),
            "barcodes_seen": barcodes_seen,
            "per_worker": per_worker,
        })
        by_outcome = sum(totals[k] for k in CORRECT_STATS[1:6])
        if not (flow["reads_in"] == totals["records"] == flow["collected"] == by_outcome):
            raise WorkflowError(
                f"reads do not add up: {flow['reads_in']} in, {totals['records']} seen by the workers, "
                f"{flow['collected']} written, {by_outcome} by outcome {totals}"
            )

    w.run(check=check, on_progress=on_progress, timeout=left())
    return stats
