"""FASTQ pairs → unaligned BAM with raw cell barcode and UMI tags.

Read 1 carries the cell barcode and UMI, read 2 the cDNA. Each pair becomes
one unmapped record (flag 4): name = read 2's ID (up to the first space, a
trailing ``/1``/``/2`` removed), SEQ and QUAL of read 2, tags ``CR``
(raw barcode), ``CY`` (its qualities), ``UR`` (raw UMI), ``UY``, and ``RG``.

Layouts (0-based, end-exclusive slices of read 1; several joined with ``+``):

========== ========================= ==============
layout     CB                        UMI
========== ========================= ==============
10x-v2     r1[0:16]                  r1[16:26]
10x-v3     r1[0:16]                  r1[16:28]
dropseq    r1[0:12]                  r1[12:20]
visium     r1[0:16]                  r1[16:28]
slideseq   r1[0:8]+r1[26:32]         r1[32:41]
========== ========================= ==============

Slide-seqV2: read structure ``8C18X6C9M1X`` (Broad's slideseq-tools and
WARP's Slide-seq pipeline): 8 bp barcode, 18 bp linker, 6 bp barcode, 9 bp
UMI, then poly-T. A custom layout is a string such as
``"CB=r1[0:16],UMI=r1[16:28]"``.

A read 1 shorter than the layout needs (the largest slice end) is dropped
and counted as ``too_short``. Pairs out of sync, truncated or malformed
FASTQ are an error (WorkflowError) naming the file or pair number.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from typing import Any

from ..bam.header import BamHeader
from ..bam.header import command_line as process_command_line
from ..bam.workflow import refuse_overwrite
from ..engine.errors import WorkflowError
from ..engine.publish import Publication
from ..engine.signals import sigterm_raises

LAYOUTS = {
    "10x-v2": "CB=r1[0:16],UMI=r1[16:26]",
    "10x-v3": "CB=r1[0:16],UMI=r1[16:28]",
    "dropseq": "CB=r1[0:12],UMI=r1[12:20]",
    "visium": "CB=r1[0:16],UMI=r1[16:28]",
    "slideseq": "CB=r1[0:8]+r1[26:32],UMI=r1[32:41]",
}
BATCH = 10_000
_SLICE = re.compile(r"r1\[(\d+):(\d+)\]$")


def parse_layout(layout: str) -> dict[str, list[tuple[int, int]]]:
    """``"10x-v3"`` or ``"CB=r1[0:16],UMI=r1[16:28]"`` → {"CB": [(0, 16)], "UMI": [(16, 28)]}.
    Raises ValueError naming what is wrong."""
    spec = LAYOUTS.get(layout, layout)
    if "=" not in spec:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)} or a spec like "
                         "'CB=r1[0:16],UMI=r1[16:28]'")
    parts: dict[str, list[tuple[int, int]]] = {}
    for item in spec.split(","):
        key, eq, value = item.strip().partition("=")
        key = key.strip()
        if not eq or key not in ("CB", "UMI"):
            raise ValueError(f"layout {layout!r}: {item.strip()!r} should be CB=… or UMI=…")
        if key in parts:
            raise ValueError(f"layout {layout!r}: {key} given twice")
        segs = []
        for piece in value.split("+"):
            m = _SLICE.match(piece.strip())
            if not m:
                raise ValueError(f"layout {layout!r}: {piece.strip()!r} is not a slice of read 1 like r1[0:16]")
            a, b = int(m.group(1)), int(m.group(2))
            if b <= a:
                raise ValueError(f"layout {layout!r}: empty slice {piece.strip()!r}")
            segs.append((a, b))
        parts[key] = segs
    for key in ("CB", "UMI"):
        if key not in parts:
            raise ValueError(f"layout {layout!r}: no {key}=… part")
    return parts


def _open_fastq(path: str) -> Any:
    import dnaio

    if path == "-":
        return dnaio.open(sys.stdin.buffer)
    return dnaio.open(path)


def make_header(sample: str, read_group: str | None, command_line: str) -> BamHeader:
    rg = read_group or sample
    for name, value in (("sample", sample), ("read_group", rg)):
        if not value or any(c in value for c in "\t\n"):
            raise ValueError(f"{name} must be non-empty without tabs or newlines, not {value!r}")
    text = f"@HD\tVN:1.6\tSO:unsorted\tGO:query\n@RG\tID:{rg}\tSM:{sample}\n"
    return BamHeader(text, []).with_program(command_line)


def tag(
    read1: str | os.PathLike[str],
    read2: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    layout: str = "10x-v3",
    sample: str = "sample",
    read_group: str | None = None,
    threads: int = 2,
    level: int | str | None = None,
    command_line: str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Write an unaligned BAM from a FASTQ pair (gzip or plain; one of them may be ``-``).

    Returns stats: reads_in (pairs), written, dropped ({"too_short": n} if
    any), seconds, reads_per_second. Raises WorkflowError for out-of-sync
    pairs, truncated or malformed FASTQ; ValueError for a bad layout.
    """
    import dnaio

    from ..bam.bgzf import DEFAULT_LEVEL, BgzfWriter
    from ..kernels.presets import fastq_pairs_to_bam

    read1, read2, output = os.fspath(read1), os.fspath(read2), os.fspath(output)
    if read1 == "-" and read2 == "-":
        raise ValueError("only one of read1 and read2 can be '-' (stdin)")
    refuse_overwrite([read1, read2], output)
    segs = parse_layout(layout)
    need = max(b for parts in segs.values() for _, b in parts)
    header = make_header(sample, read_group, command_line or process_command_line())
    rg = (read_group or sample).encode()
    t0 = time.perf_counter()
    to_stdout = output in ("-", "/dev/stdout")
    pub = Publication()
    pairs = written = too_short = 0
    where = "reading the FASTQ pair"
    try:
        with sigterm_raises(), _open_fastq(read1) as f1, _open_fastq(read2) as f2:
            writer = BgzfWriter(sys.stdout.buffer if to_stdout else pub.path(output),
                                level=DEFAULT_LEVEL if level is None else level, threads=threads)
            try:
                writer.write(header.to_bytes())
                out = bytearray()
                while True:
                    if timeout is not None and time.perf_counter() - t0 > timeout:
                        raise WorkflowError(f"tag: timed out after {timeout:g} s")
                    where = f"reading {read1}"
                    b1 = list(itertools.islice(f1, BATCH))
                    where = f"reading {read2}"
                    b2 = list(itertools.islice(f2, BATCH))
                    if len(b1) != len(b2):
                        longer, shorter = (read1, read2) if len(b1) > len(b2) else (read2, read1)
                        raise WorkflowError(f"FASTQ pair out of sync: {shorter} ends at record "
                                            f"{pairs + min(len(b1), len(b2))}, {longer} has more records")
                    if not b1:
                        break
                    try:
                        w, s = fastq_pairs_to_bam(b1, b2, segs["CB"], segs["UMI"], need, rg, out, pairs + 1)
                    except ValueError as e:
                        raise WorkflowError(f"{read1} + {read2}: {e}") from None
                    pairs += len(b1)
                    written += w
                    too_short += s
                    writer.write(out)
                    out.clear()
                writer.close()
            except BaseException:
                writer.abort()
                raise
    except dnaio.exceptions.FastqFormatError as e:
        pub.abort()
        raise WorkflowError(f"{where}: malformed FASTQ: {e}") from None
    except (EOFError, OSError) as e:
        pub.abort()
        if isinstance(e, FileNotFoundError):
            raise WorkflowError(f"no such file: {e.filename}") from None
        raise WorkflowError(f"{where}: truncated or corrupt input ({type(e).__name__}: {e})") from None
    except BaseException:
        pub.abort()
        raise
    seconds = time.perf_counter() - t0
    stats = {
        "reads_in": pairs,
        "written": written,
        "dropped": {"too_short": too_short} if too_short else {},
        "seconds": round(seconds, 3),
        "reads_per_second": round(pairs / seconds) if seconds > 0 else 0,
    }
    if pairs != written + too_short:
        pub.abort()
        raise WorkflowError(f"reads do not add up: {stats}")
    pub.commit()
    return stats
