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

Two passes: (1) count raw barcodes with the ``count_tag_values`` kernel
(histogram.count_values), (2) BAM_reader → distribute_bam (round-robin,
chunk markers) → ``workers`` × kernel ``correct_records`` → collect_bam
(input order) → BAM_writer (one @PG).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ..errors import WorkflowError
from ..fifo import FIFO
from ..workflow import Workflow
from .histogram import count_values, process_records, read_header

CORRECT_STATS = ("records", "exact", "corrected", "ambiguous", "uncorrectable", "missing_tag", "markers")
EXACT, CORRECTED, AMBIGUOUS, UNCORRECTABLE = 0, 1, 2, 3


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
        self.cache: dict[bytes, tuple[int, bytes | None]] = {}
        self.candidates: dict[bytes, list[tuple[int, bytes, float]]] = {}

    def __call__(self, raw: bytes, qual: bytes | None) -> tuple[int, bytes | None]:
        cands = self.candidates.get(raw)
        if cands is None:
            if raw in self.wl:
                result = (EXACT, raw + self.suffix)
                self.cache[raw] = result
                return result
            cands = [(pos, c, self.counts.get(c, 0) + self.pseudocount) for pos, c in self.wl.neighbors(raw)]
            if not cands or not any(prior > 0 for _, _, prior in cands):
                self.cache[raw] = (UNCORRECTABLE, None)
                return UNCORRECTABLE, None
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
            return CORRECTED, best + self.suffix
        return AMBIGUOUS, None


def correct_worker(input: Any, output: Any, resolver: Resolver, tag_in: bytes, qual_tag: bytes,
                   tag_out: bytes) -> dict[str, int]:
    """A job: add ``tag_out`` to the records of a raw BAM stream (chunk markers pass through)."""
    from array import array

    from ..kernels.bam import CHUNK_END_NAME
    from ..kernels.presets import correct_records

    stats = array("q", [0] * len(CORRECT_STATS))
    header, rest = read_header(input)
    output.write(header.to_bytes())
    output.flush()

    def kernel(buf: bytes, start: int) -> int:
        end, out = correct_records(buf, start, tag_in, qual_tag, tag_out, resolver.cache, resolver, CHUNK_END_NAME, stats)
        if out:
            output.write(out)
            output.flush()
        return end

    process_records(input, rest, kernel)
    return dict(zip(CORRECT_STATS, stats, strict=True))


def _check_tag(name: str, tag: str) -> bytes:
    if len(tag) != 2 or not tag.isascii():
        raise ValueError(f"{name}: a BAM tag has two characters, not {tag!r}")
    return tag.encode()


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
) -> dict[str, Any]:
    """Correct cell barcodes of ``input`` against ``whitelist`` (a path, or a loaded
    :class:`~bamflow.kernels.presets.Whitelist`) and write ``output`` with ``tag_out``.

    Returns stats: reads_in, written, dropped (always empty: every read is
    written), exact, corrected, ambiguous, uncorrectable, missing_tag,
    whitelist (size), whitelist_seconds, barcodes_seen. Raises WorkflowError
    if the counts do not add up or a job fails; ValueError for a malformed whitelist.
    """
    from ..kernels.presets import Whitelist

    tin, tq, tout = _check_tag("tag_in", tag_in), _check_tag("qual_tag", qual_tag), _check_tag("tag_out", tag_out)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    t0 = time.perf_counter()
    wl = whitelist if isinstance(whitelist, Whitelist) else load_whitelist(whitelist)
    wl_seconds = time.perf_counter() - t0

    # pass 1: reads per raw barcode; keep those in the whitelist
    counts, _ = count_values(input, tag_in, skip_secondary=True, threads=threads, workers=1, name="correct_count")
    exact_counts = {bc: n for bc, n in counts.items() if bc in wl}
    barcodes_seen = len(counts)
    del counts
    resolver = Resolver(wl, exact_counts, suffix.encode(), pseudocount, threshold)

    # pass 2
    w = Workflow("correct")
    w.BAM_reader(input=os.fspath(input), output=FIFO("decoded", "wb"), threads=threads)
    w.distribute_bam(
        input=FIFO("decoded", "rb"), outputs=FIFO("share{n}", "wb", n=workers),
        header_fifo=FIFO("header", "wb"), mark_chunks=True, chunk_size=2000,
    )
    w.workers(input=FIFO("share{n}", "rb"), output=FIFO("fixed{n}", "wb"), func=correct_worker, n=workers,
              resolver=resolver, tag_in=tin, qual_tag=tq, tag_out=tout)
    w.collect_and_write_bam(
        FIFO("fixed{n}", "rb", n=workers), os.fspath(output), order="input", level=level, threads=threads,
        command_line=command_line or f"bamflow correct (Python API) whitelist={_describe(whitelist)}",
    )
    stats: dict[str, Any] = {}

    def check(w: Workflow) -> None:
        """The books, before the output appears."""
        dealt = w.result_dict["correct.dist0"]["records"]
        collected = w.result_dict["correct.collect0"]["records"]
        per_worker = w.results("correct.worker*")
        totals = {k: sum(p[k] for p in per_worker) for k in CORRECT_STATS}
        stats.update({
            "reads_in": dealt,
            "written": collected,
            "dropped": {},
            **{k: totals[k] for k in CORRECT_STATS[1:6]},
            "whitelist": len(wl),
            "whitelist_seconds": round(wl_seconds, 3),
            "barcodes_seen": barcodes_seen,
            "per_worker": per_worker,
        })
        by_outcome = sum(totals[k] for k in CORRECT_STATS[1:6])
        encoded = w.result_dict["correct.BAM_writer0"]["records"]
        if not (dealt == totals["records"] == collected == by_outcome == encoded):
            raise WorkflowError(
                f"reads do not add up: {dealt} in, {totals['records']} seen by the workers, {collected} written, "
                f"{by_outcome} by outcome {totals}"
            )

    w.run(check=check, on_progress=on_progress)
    return stats
