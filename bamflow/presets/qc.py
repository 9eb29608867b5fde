"""Per-cell quality control in one parallel pass, sharded by cell barcode.

    decode ─▶ distribute by CB ─▶ qc worker × N      (per cell: reads, flags, {gene: {umi: reads}} → molecules)
                  └─(no CB)─▶ unassigned worker      (counts them: no_cell, and their flags for the totals)

Each worker sees whole cells. Per primary read of a cell it notes whether the
read is mapped, has a gene, has a UMI; reads that are mapped and have both a
UMI and a gene ("counted" reads) go into ``{gene: {umi: reads}}`` of their
cell, which is clustered with umi_tools' ``method``
(:func:`bamflow.presets.umi.count_molecules`) at the end, like
:mod:`bamflow.presets.count` does.

Every read falls in exactly one class, checked in this order (the books:
``reads_in = counted + sum(dropped)``):

- ``no_cell``: no (or an empty) ``cell_tag``;
- ``not_primary``: a secondary (0x100) or supplementary (0x800) alignment;
- ``unmapped`` (0x4);
- ``no_umi``: no (or an empty) ``umi_tag``;
- ``no_gene``: no ``gene_tag``, an empty one, or a featureCounts placeholder
  (``__no_feature`` …, ``Unassigned_*``);
- else ``counted``.

Outputs in ``out_dir`` (written under temporary names, renamed together at
the end; nothing is left behind on failure): ``per_cell.tsv``,
``summary.json``, ``knee.svg``, ``knee.png`` (only when matplotlib is
importable) and ``report.html`` (self-contained: inline SVG plot, no
external references). See docs/presets/qc.md for every column and field.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from ..bam.options import DecodeOptions
from ..bam.workflow import BamWorkflow
from ..engine.errors import WorkflowError
from ..engine.publish import Publication
from .dedup import by_cell, gather
from .umi import METHODS, cluster_umis

log = logging.getLogger("bamflow")

NOT_A_GENE = re.compile(r"^(__|Unassigned)")  # featureCounts' placeholders (umi_tools' skip regex)
REASONS = ("no_cell", "not_primary", "unmapped", "no_umi", "no_gene")
TOP_CELLS = 50  # rows of the top-cells table in report.html

# per-cell integer fields a worker returns, in this order
FIELDS = ("reads", "counted", "mapped", "with_gene", "no_umi", "distinct_umis", "umis", "genes")
TSV_COLUMNS = (
    "barcode",
    "reads",
    "umis",
    "genes",
    "duplication_rate",
    "saturation",
    "counted_reads",
    "distinct_umis",
    "mapped_reads",
    "gene_reads",
    "no_umi_reads",
    "fraction_mapped",
    "fraction_with_gene",
    "fraction_no_umi",
    "is_cell",
)


# -- reading --------------------------------------------------------------------------------


def _tag(read: Any, tag: str) -> Any:
    try:
        value = read.get_tag(tag)
    except KeyError:
        return None
    return None if value == "" else value


def _flags(read: Any, umi_tag: str, gene_tag: str) -> tuple[bool, Any, Any]:
    """(mapped, umi or None, gene or None) of a read; a gene only on a mapped read."""
    mapped = not read.is_unmapped
    umi = _tag(read, umi_tag)
    if umi is not None and not isinstance(umi, str):
        umi = str(umi)
    gene = _tag(read, gene_tag) if mapped else None
    if gene is not None:
        gene = str(gene)
        if NOT_A_GENE.search(gene):
            gene = None
    return mapped, umi, gene


def _reason(mapped: bool, umi: Any, gene: Any) -> str | None:
    if not mapped:
        return "unmapped"
    if umi is None:
        return "no_umi"
    if gene is None:
        return "no_gene"
    return None


def _totals_of(primary: int, mapped: int, with_gene: int, no_umi: int) -> dict[str, int]:
    return {"primary_reads": primary, "mapped": mapped, "with_gene": with_gene, "no_umi": no_umi}


def qc_worker(input: str, output: str | None, *, method: str, cell_tag: str, umi_tag: str, gene_tag: str) -> dict[str, Any]:
    """One worker (whole cells): per cell the integer ``FIELDS``; the books."""
    import pysam

    cells: dict[str, list[int]] = {}  # cell → [reads, counted, mapped, with_gene, no_umi]
    umis: dict[str, dict[str, dict[str, int]]] = {}  # cell → gene → umi → reads
    dropped: dict[str, int] = {}
    reads_in = counted = 0
    t_primary = t_mapped = t_gene = t_no_umi = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        for read in reads:
            reads_in += 1
            cell = _tag(read, cell_tag)
            if cell is None:  # the distributor sends these elsewhere; here only if the tag is empty
                dropped["no_cell"] = dropped.get("no_cell", 0) + 1
                continue
            if read.is_secondary or read.is_supplementary:
                dropped["not_primary"] = dropped.get("not_primary", 0) + 1
                continue
            cell = str(cell)
            mapped, umi, gene = _flags(read, umi_tag, gene_tag)
            c = cells.get(cell)
            if c is None:
                c = cells[cell] = [0, 0, 0, 0, 0]
            c[0] += 1
            t_primary += 1
            if mapped:
                c[2] += 1
                t_mapped += 1
            if gene is not None:
                c[3] += 1
                t_gene += 1
            if umi is None:
                c[4] += 1
                t_no_umi += 1
            reason = _reason(mapped, umi, gene)
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            counted += 1
            c[1] += 1
            per_gene = umis.setdefault(cell, {}).setdefault(gene, {})
            per_gene[umi] = per_gene.get(umi, 0) + 1
    per_cell: dict[str, dict[str, int]] = {}
    for cell, c in cells.items():
        genes = umis.pop(cell, {})
        molecules = [len(cluster_umis(u, method)) for u in genes.values()]
        per_cell[cell] = dict(
            zip(
                FIELDS,
                (*c, sum(len(u) for u in genes.values()), sum(molecules), sum(1 for m in molecules if m >= 1)),
                strict=True,
            )
        )
    return {
        "reads_in": reads_in,
        "written": None,
        "counted": counted,
        "dropped": dropped,
        "cells": per_cell,
        "totals": _totals_of(t_primary, t_mapped, t_gene, t_no_umi),
    }


def qc_unassigned_worker(input: str, output: str | None, *, umi_tag: str, gene_tag: str) -> dict[str, Any]:
    """Reads without the cell tag: all ``no_cell``; their flags count in the totals."""
    import pysam

    reads_in = primary = mapped_n = gene_n = no_umi_n = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        for read in reads:
            reads_in += 1
            if read.is_secondary or read.is_supplementary:
                continue
            primary += 1
            mapped, umi, gene = _flags(read, umi_tag, gene_tag)
            mapped_n += mapped
            gene_n += gene is not None
            no_umi_n += umi is None
    return {
        "reads_in": reads_in,
        "dropped": {"no_cell": reads_in} if reads_in else {},
        "totals": _totals_of(primary, mapped_n, gene_n, no_umi_n),
    }


# -- cell calling ---------------------------------------------------------------------------


KNEE_WINDOW = 0.05  # decades of barcode rank over which the drop is measured
KNEE_EXCLUDE_TOP = 50  # top barcodes never start the steepest window (as DropletUtils' exclude.from)


def knee(umis_desc: Sequence[int]) -> int:
    """The number of cells by the steepest fall of the barcode-rank curve.

    On the log–log curve (y = log10 UMIs at rank r, barcodes with ≥ 1 UMI):
    for every start rank r past the top ``min(50, n // 10)`` barcodes, the
    window [r, r2], r2 = max(r + 1, ceil(r · 10^0.05)), falls by
    (y(r) − y(r2)) / (log10 r2 − log10 r); the steepest window (first on
    ties) holds the cliff between cells and background. Within it the cut is
    the largest single step y(i) − y(i + 1) (first on ties): the cells are the
    top i barcodes. Returns i; all barcodes with ≥ 1 UMI if there are fewer
    than 3 of them.
    """
    ys = [math.log10(u) for u in umis_desc if u >= 1]
    n = len(ys)
    if n < 3:
        return n
    start = max(1, min(KNEE_EXCLUDE_TOP, n // 10))
    best, window = -1.0, (start, start + 1)
    for r in range(start, n):
        r2 = max(r + 1, math.ceil(r * 10**KNEE_WINDOW))
        if r2 > n:
            break
        fall = (ys[r - 1] - ys[r2 - 1]) / (math.log10(r2) - math.log10(r))
        if fall > best + 1e-12:
            best, window = fall, (r, r2)
    r, r2 = window
    cut, step = r, -1.0
    for i in range(r, r2):
        if ys[i - 1] - ys[i] > step + 1e-12:
            cut, step = i, ys[i - 1] - ys[i]
    return cut


def call_cells(umis_desc: Sequence[int], min_umis: int | None) -> dict[str, Any]:
    """{"rule", "threshold_umis", "knee_rank", "cells"}: cells are the barcodes
    with ≥ threshold UMIs; the threshold is ``min_umis`` or the UMIs at the knee."""
    if min_umis is not None:
        threshold = int(min_umis)
        rank = None
        rule = "min_umis"
    else:
        rank = knee(umis_desc)
        threshold = umis_desc[rank - 1] if rank else 1
        rule = "knee"
    cells = sum(1 for u in umis_desc if u >= threshold)
    return {"rule": rule, "threshold_umis": threshold, "knee_rank": rank, "cells": cells}


# -- plots ----------------------------------------------------------------------------------


def _steps(umis_desc: Sequence[int]) -> list[tuple[int, int]]:
    """The (rank, UMIs) points that draw the curve exactly: the first and last
    rank of every run of equal UMIs (barcodes with ≥ 1 UMI)."""
    points: list[tuple[int, int]] = []
    n = len(umis_desc)
    for i, u in enumerate(umis_desc):
        if u < 1:
            break
        if i == 0 or umis_desc[i - 1] != u or i == n - 1 or umis_desc[i + 1] != u:
            points.append((i + 1, u))
    return points


def knee_svg(
    umis_desc: Sequence[int], threshold: int | None, *, standalone: bool = True, width: int = 640, height: int = 420
) -> str:
    """A log–log barcode-rank plot as SVG text (no dependency). ``standalone``
    adds the XML namespace (a .svg file); without it the SVG is for inlining in
    HTML5, which needs none (so the report holds no URL at all)."""
    ml, mr, mt, mb = 70, 20, 20, 50
    pw, ph = width - ml - mr, height - mt - mb
    points = _steps(umis_desc)
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out = [f'<svg{ns} width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">']
    out.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>')
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no barcode with a UMI</text></svg>')
        return "\n".join(out)
    x_max = max(1.0, math.ceil(math.log10(points[-1][0]) + 1e-9))
    y_max = max(1.0, math.ceil(math.log10(points[0][1]) + 1e-9))

    def px(rank: float) -> float:
        return ml + pw * math.log10(rank) / x_max

    def py(u: float) -> float:
        return mt + ph * (1 - math.log10(u) / y_max)

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for d in range(int(x_max) + 1):
        x = px(10**d)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{10**d:g}</text>')
    for d in range(int(y_max) + 1):
        y = py(10**d)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{10**d:g}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 10}" text-anchor="middle">barcode rank</text>')
    out.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {mt + ph / 2})">UMIs</text>')
    if threshold is not None and threshold >= 1:
        y = py(threshold)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{ml + pw - 4}" y="{y - 4:.1f}" text-anchor="end" fill="#d62728">cells: ≥ {threshold} UMIs</text>')
    coords = " ".join(f"{px(r):.1f},{py(u):.1f}" for r, u in points)
    out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{coords}"/>')
    out.append("</svg>")
    return "\n".join(out)


def knee_png(umis_desc: Sequence[int], threshold: int | None) -> bytes | None:
    """The plot as PNG with matplotlib (Agg, no pyplot); None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    points = _steps(umis_desc)
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if points:
        ax.plot([r for r, _ in points], [u for _, u in points], color="#1f77b4", lw=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if threshold is not None and threshold >= 1:
            ax.axhline(threshold, color="#d62728", ls="--", lw=1, label=f"cells: ≥ {threshold} UMIs")
            ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "no barcode with a UMI", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("barcode rank")
    ax.set_ylabel("UMIs")
    ax.grid(True, which="major", color="#ddd")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png.getvalue()


# -- tables and report ----------------------------------------------------------------------


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _fmt(value: Any) -> str:
    if value is None:
        return "NA"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def cell_rows(cells: dict[str, dict[str, int]], threshold: int) -> list[dict[str, Any]]:
    """One row per barcode (``TSV_COLUMNS``), sorted by UMIs, then reads (both
    decreasing), then barcode."""
    rows: list[dict[str, Any]] = []
    for barcode, c in cells.items():
        rows.append(
            {
                "barcode": barcode,
                "reads": c["reads"],
                "umis": c["umis"],
                "genes": c["genes"],
                "duplication_rate": None if not c["counted"] else 1 - c["umis"] / c["counted"],
                "saturation": None if not c["counted"] else 1 - c["distinct_umis"] / c["counted"],
                "counted_reads": c["counted"],
                "distinct_umis": c["distinct_umis"],
                "mapped_reads": c["mapped"],
                "gene_reads": c["with_gene"],
                "no_umi_reads": c["no_umi"],
                "fraction_mapped": _ratio(c["mapped"], c["reads"]),
                "fraction_with_gene": _ratio(c["with_gene"], c["reads"]),
                "fraction_no_umi": _ratio(c["no_umi"], c["reads"]),
                "is_cell": int(c["umis"] >= threshold and c["umis"] >= 1),
            }
        )
    rows.sort(key=lambda r: (-r["umis"], -r["reads"], r["barcode"]))
    return rows


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    call = summary["cell_call"]
    rule = (
        f"≥ {call['threshold_umis']} UMIs ("
        + ("min_umis" if call["rule"] == "min_umis" else f"knee at rank {call['knee_rank']}")
        + ")"
    )
    rows: list[tuple[str, Any]] = [
        ("reads in", summary["reads_in"]),
        ("reads with a cell barcode", summary["reads_with_cell"]),
        ("reads counted (cell, mapped, UMI, gene)", summary["counted"]),
    ]
    rows += [(f"dropped: {k}", v) for k, v in summary["dropped"].items()]
    rows += [
        ("barcodes seen", summary["barcodes"]),
        ("cells", summary["cells"]),
        ("cell rule", rule),
        ("UMIs (all barcodes)", summary["umis"]),
        ("UMIs in cells", summary["umis_in_cells"]),
        ("fraction of counted reads in cells", summary["fraction_counted_reads_in_cells"]),
        ("median UMIs per cell", summary["median_umis_per_cell"]),
        ("median genes per cell", summary["median_genes_per_cell"]),
        ("mean reads per cell", summary["mean_reads_per_cell"]),
        ("duplication rate", summary["duplication_rate"]),
        ("saturation", summary["saturation"]),
        ("fraction mapped (primary reads)", summary["totals"]["fraction_mapped"]),
        ("fraction with gene (primary reads)", summary["totals"]["fraction_with_gene"]),
        ("fraction without UMI (primary reads)", summary["totals"]["fraction_no_umi"]),
        ("UMI method", summary["method"]),
    ]
    return rows


def report_html(summary: dict[str, Any], rows: list[dict[str, Any]], svg: str, top: int = TOP_CELLS) -> str:
    """A self-contained HTML page: summary table, inline SVG knee plot, top cells."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>bamflow qc</title>',
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f4f4f4}"
        "td:first-child,th:first-child{text-align:left;font-family:monospace}</style></head><body>",
        f"<h1>bamflow qc: {e(os.path.basename(summary['input']))}</h1>",
        '<h2>Summary</h2><table id="summary">',
    ]
    for key, value in _summary_rows(summary):
        parts.append(f"<tr><th>{e(key)}</th><td>{e(_fmt(value))}</td></tr>")
    parts.append("</table>")
    parts.append('<h2>Barcode rank</h2><div id="knee">' + svg + "</div>")
    shown = rows[:top]
    parts.append(f'<h2>Top {len(shown)} barcodes by UMIs</h2><table id="top-cells"><tr>')
    parts.append("".join(f"<th>{e(c)}</th>" for c in TSV_COLUMNS) + "</tr>")
    for r in shown:
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(r[c]))}</td>" for c in TSV_COLUMNS) + "</tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


# -- the preset -----------------------------------------------------------------------------


def qc(
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    cell_tag: str = "CB",
    umi_tag: str = "UB",
    gene_tag: str = "GX",
    method: str = "directional",
    min_umis: int | None = None,
    workers: int = 2,
    threads: int = 2,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Per-cell QC of a 10x-style BAM in one parallel pass (sharded by cell).

    Per barcode: reads (primary), UMIs (molecules: UMI clusters per gene,
    ``method`` as umi_tools, summed over genes), genes detected (≥ 1 UMI),
    duplication rate ``1 − UMIs / counted reads`` (counted = mapped, with UMI
    and gene), saturation ``1 − distinct (gene, UMI) / counted reads``,
    fractions mapped / with gene / without UMI. Cells: barcodes with ≥
    ``min_umis`` UMIs, or, if None, with ≥ the UMIs at the knee of the
    barcode-rank curve (:func:`knee`).

    Writes ``per_cell.tsv``, ``summary.json``, ``knee.svg``, ``knee.png``
    (if matplotlib is importable) and ``report.html`` into ``out_dir``
    (created if needed), all or nothing. Returns the summary (as in
    summary.json). Raises WorkflowError if the reads do not add up
    (``reads_in != counted + sum(dropped)``) or ``out_dir`` cannot be a folder.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if min_umis is not None and min_umis < 0:
        raise ValueError(f"min_umis must be >= 0, not {min_umis}")
    input, out_dir = os.fspath(input), os.fspath(out_dir)
    w = BamWorkflow("qc", start_method=start_method)
    jobs = w.scatter(
        input,
        qc_worker,
        workers=workers,
        distribute=by_cell(cell_tag),
        worker_kwargs=dict(method=method, cell_tag=cell_tag, umi_tag=umi_tag, gene_tag=gene_tag),
        decode=DecodeOptions(threads),
        unassigned_worker=qc_unassigned_worker,
        unassigned_kwargs=dict(umi_tag=umi_tag, gene_tag=gene_tag),
    )
    with Publication() as pub:
        pub.make_folder(out_dir)  # before the pass: a bad folder fails at once
        w.run(timeout=timeout, on_progress=on_progress, publication=pub)
        summary = _summarize(pub, w, jobs, input, out_dir, method, min_umis)
        pub.commit()
    log.info("qc %s → %s: %s cells of %s barcodes", input, out_dir, summary["cells"], summary["barcodes"])
    return summary


def _summarize(
    pub: Publication, w: BamWorkflow, jobs: Any, input: str, out_dir: str, method: str, min_umis: int | None
) -> dict[str, Any]:
    """Check the books, write every output into ``pub``; returns the summary."""
    reads_in, merged, per_worker = gather(w, jobs)
    cells: dict[str, dict[str, int]] = {}
    for r in per_worker:
        for barcode, c in r.get("cells", {}).items():
            if barcode in cells:  # cannot happen: the distributor keeps a cell in one worker
                raise WorkflowError(f"qc: barcode {barcode} was seen by two workers")
            cells[barcode] = c
    dropped = {k: merged.get("dropped", {}).get(k, 0) for k in REASONS}
    dropped.update({k: v for k, v in merged.get("dropped", {}).items() if k not in dropped})
    counted = merged.get("counted", 0)
    if reads_in != counted + sum(dropped.values()):
        raise WorkflowError(f"qc: reads do not add up: {reads_in} in, {counted} counted, dropped {dropped}")
    reads_with_cell = sum(c["reads"] for c in cells.values())
    if reads_with_cell != reads_in - dropped["no_cell"] - dropped["not_primary"]:
        raise WorkflowError(f"qc: reads do not add up: {reads_with_cell} reads in cells, {reads_in} in, dropped {dropped}")
    if counted != sum(c["counted"] for c in cells.values()):
        raise WorkflowError("qc: counted reads do not add up over the cells")

    umis_desc = sorted((c["umis"] for c in cells.values()), reverse=True)
    call = call_cells(umis_desc, min_umis)
    rows = cell_rows(cells, call["threshold_umis"])
    called = [r for r in rows if r["is_cell"]]
    if len(called) != call["cells"]:
        raise WorkflowError("qc: cell call is inconsistent")  # cannot happen
    t = merged.get("totals", {})
    primary = t.get("primary_reads", 0)
    total_umis = sum(r["umis"] for r in rows)
    summary: dict[str, Any] = {
        "input": input,
        "method": method,
        "reads_in": reads_in,
        "reads_with_cell": reads_with_cell,
        "counted": counted,
        "dropped": dropped,
        "barcodes": len(rows),
        "cells": len(called),
        "cell_call": call,
        "umis": total_umis,
        "umis_in_cells": sum(r["umis"] for r in called),
        "reads_in_cells": sum(r["reads"] for r in called),
        "fraction_counted_reads_in_cells": _ratio(sum(r["counted_reads"] for r in called), counted),
        "median_umis_per_cell": statistics.median(r["umis"] for r in called) if called else None,
        "median_genes_per_cell": statistics.median(r["genes"] for r in called) if called else None,
        "mean_reads_per_cell": _ratio(sum(r["reads"] for r in called), len(called)),
        "duplication_rate": None if not counted else 1 - total_umis / counted,
        "saturation": None if not counted else 1 - sum(r["distinct_umis"] for r in rows) / counted,
        "totals": {
            **_totals_of(primary, t.get("mapped", 0), t.get("with_gene", 0), t.get("no_umi", 0)),
            "fraction_mapped": _ratio(t.get("mapped", 0), primary),
            "fraction_with_gene": _ratio(t.get("with_gene", 0), primary),
            "fraction_no_umi": _ratio(t.get("no_umi", 0), primary),
        },
        "outputs": {},
        "plots": {},
    }

    threshold = call["threshold_umis"] if call["cells"] else None
    path = {n: os.path.join(out_dir, n) for n in ("per_cell.tsv", "knee.svg", "knee.png", "report.html", "summary.json")}
    pub.write_tsv(path["per_cell.tsv"], TSV_COLUMNS, ([_fmt(r[c]) for c in TSV_COLUMNS] for r in rows))
    pub.write_text(path["knee.svg"], knee_svg(umis_desc, threshold) + "\n")
    png = knee_png(umis_desc, threshold)
    if png is None:
        log.warning("qc: matplotlib is not installed; writing knee.svg but not knee.png")
    else:
        pub.write_bytes(path["knee.png"], png)
    summary["plots"] = {"knee.svg": True, "knee.png": png is not None, "report.html": "inline SVG"}
    summary["outputs"] = {n: p for n, p in path.items() if n != "knee.png" or png is not None}
    pub.write_text(path["report.html"], report_html(summary, rows, knee_svg(umis_desc, threshold, standalone=False)))
    pub.write_text(path["summary.json"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    summary["per_worker"] = [{k: v for k, v in r.items() if k != "cells"} for r in per_worker]
    return summary


__all__ = ["qc", "qc_worker", "knee", "call_cells", "knee_svg", "knee_png", "report_html", "TSV_COLUMNS"]
