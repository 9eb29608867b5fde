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

A gene whose name (``gene_name_tag``, e.g. GN) starts with ``MT-`` or ``mt-``
is mitochondrial; the UMIs of such genes give each cell's mitochondrial
fraction. Each worker also keeps how many reads every distinct (cell, gene,
UMI) had, from which the saturation curve (saturation at a fraction of the
reads) is computed exactly, without subsampling.

Outputs in ``out_dir`` (written under temporary names, renamed together at
the end; nothing is left behind on failure): ``per_cell.tsv``, ``cells.txt``
(the called cells, one barcode a line), ``summary.json``, ``knee.svg``,
``knee.png`` (only when matplotlib is importable) and ``report.html``: a web
summary (headline numbers, warnings, plots, a sortable table) that works
offline — inline style, SVG and script, no URL at all. See
docs/presets/qc.md for every column and field.
"""

from __future__ import annotations

import functools
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

from .. import __version__
from ..bam.options import DecodeOptions
from ..bam.workflow import BamWorkflow
from ..engine import progress
from ..engine.errors import WorkflowError
from ..engine.publish import Publication
from ..engine.workflow import merge_counts
from ..kernels.umi import count_molecules
from .dedup import by_cell, gather
from .umi import METHODS

log = logging.getLogger("bamflow")

NOT_A_GENE = re.compile(r"^(__|Unassigned)")  # featureCounts' placeholders (umi_tools' skip regex)
MITO_PREFIXES = ("MT-", "mt-")  # gene names of the mitochondrial genome (human, mouse)
REASONS = ("no_cell", "not_primary", "unmapped", "no_umi", "no_gene")
TOP_CELLS = 1000  # rows of the barcode table in report.html
REPORT_EVERY = 4096  # reads between two updates of a worker's progress counter

# the report's warnings: (summary key, limit, message); see _warnings
FEW_CELLS = 100  # fewer called cells than this
LOW_FRACTION_IN_CELLS = 0.70  # of the counted reads (Cell Ranger warns below 70%)
LOW_FRACTION_WITH_CELL = 0.75  # reads with a cell barcode
HIGH_MITO = 0.20  # median mitochondrial fraction of the cells' UMIs
SATURATION_POINTS = 20  # fractions of the reads at which the saturation curve is computed

# per-cell integer fields a worker returns, in this order
FIELDS = ("reads", "counted", "mapped", "with_gene", "no_umi", "distinct_umis", "umis", "genes", "mito_umis")
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
    "mito_umis",
    "fraction_mito",
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


def _is_mito(read: Any, gene: str, gene_name_tag: str | None) -> bool | None:
    """Whether the read's gene is mitochondrial by its name; None when the read
    carries no name (``gene_name_tag`` None: the gene tag holds the names)."""
    name = gene if not gene_name_tag else _tag(read, gene_name_tag)
    return None if name is None else str(name).startswith(MITO_PREFIXES)


def qc_worker(
    input: str,
    output: str | None,
    *,
    method: str,
    cell_tag: str,
    umi_tag: str,
    gene_tag: str,
    gene_name_tag: str | None = "GN",
) -> dict[str, Any]:
    """One worker (whole cells): per cell the integer ``FIELDS``; the books; how
    many distinct (cell, gene, UMI) had k reads (``reads_per_umi``: {k: n})."""
    import pysam

    slot = progress.current().slot
    cells: dict[str, list[int]] = {}  # cell → [reads, counted, mapped, with_gene, no_umi]
    umis: dict[str, dict[str, dict[str, int]]] = {}  # cell → gene → umi → reads
    mito: dict[str, bool] = {}  # gene → mitochondrial, for the genes whose name was seen
    dropped: dict[str, int] = {}
    reads_in = counted = 0
    t_primary = t_mapped = t_gene = t_no_umi = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        for read in reads:
            reads_in += 1
            if not reads_in % REPORT_EVERY:
                slot[0] = reads_in
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
            if gene not in mito:
                is_mito = _is_mito(read, gene, gene_name_tag)
                if is_mito is not None:
                    mito[gene] = is_mito
            per_gene = umis.setdefault(cell, {}).setdefault(gene, {})
            per_gene[umi] = per_gene.get(umi, 0) + 1
    slot[0] = reads_in
    per_cell: dict[str, dict[str, int]] = {}
    reads_per_umi: dict[int, int] = {}
    for cell, c in cells.items():
        genes = umis.pop(cell, {})
        molecules = {gene: count_molecules(u, method) for gene, u in genes.items()}
        for u in genes.values():
            for k in u.values():
                reads_per_umi[k] = reads_per_umi.get(k, 0) + 1
        values = (
            *c,
            sum(len(u) for u in genes.values()),
            sum(molecules.values()),
            sum(1 for m in molecules.values() if m >= 1),
            sum(m for gene, m in molecules.items() if mito.get(gene)),
        )
        per_cell[cell] = dict(zip(FIELDS, values, strict=True))
    return {
        "reads_in": reads_in,
        "written": None,
        "counted": counted,
        "dropped": dropped,
        "cells": per_cell,
        "totals": _totals_of(t_primary, t_mapped, t_gene, t_no_umi),
        "named_genes": len(mito),  # genes whose name was seen (the workers' sum is only checked for > 0)
        "mito_genes": sorted(gene for gene, is_mito in mito.items() if is_mito),
        "reads_per_umi": reads_per_umi,
    }


def qc_unassigned_worker(input: str, output: str | None, *, umi_tag: str, gene_tag: str) -> dict[str, Any]:
    """Reads without the cell tag: all ``no_cell``; their flags count in the totals."""
    import pysam

    slot = progress.current().slot
    reads_in = primary = mapped_n = gene_n = no_umi_n = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        for read in reads:
            reads_in += 1
            if not reads_in % REPORT_EVERY:
                slot[0] = reads_in
            if read.is_secondary or read.is_supplementary:
                continue
            primary += 1
            mapped, umi, gene = _flags(read, umi_tag, gene_tag)
            mapped_n += mapped
            gene_n += gene is not None
            no_umi_n += umi is None
    slot[0] = reads_in
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


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step + 1e-9)) + 1)]


def _tick_label(value: float) -> str:
    if value >= 1000 and value == int(value):
        return f"{value / 1000:g}k" if value < 10**6 else f"{value / 10**6:g}M"
    return f"{value:g}"


class _Plot:
    """An SVG chart frame: axes (linear, or log10 over whole decades), grid,
    labels; x() and y() map data to picture coordinates. ``standalone`` adds the
    XML namespace (an .svg file); HTML5 needs none, so the report holds no URL."""

    def __init__(
        self,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        *,
        x_log: bool = False,
        y_log: bool = False,
        width: int = 640,
        height: int = 400,
        standalone: bool = False,
        label: str = "",
    ) -> None:
        self.ml, self.mr, self.mt, self.mb = 70, 20, 20, 50
        self.width, self.height = width, height
        self.pw, self.ph = width - self.ml - self.mr, height - self.mt - self.mb
        self.x_log, self.y_log = x_log, y_log
        self.x_range = self._decades(x_range) if x_log else x_range
        self.y_range = self._decades(y_range) if y_log else y_range
        ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
        size = f'width="{width}" height="{height}"' if standalone else 'class="plot"'
        aria = f' role="img" aria-label="{html.escape(label)}"' if label else ""
        self.out = [
            f'<svg{ns} {size} viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12"{aria}>',
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        ]

    @staticmethod
    def _decades(span: tuple[float, float]) -> tuple[float, float]:
        low = math.floor(math.log10(max(span[0], 1e-12)) + 1e-9)
        high = max(low + 1, math.ceil(math.log10(max(span[1], 1e-12)) - 1e-9))
        return float(low), float(high)

    def _scale(self, v: float, span: tuple[float, float], log: bool) -> float:
        if log:
            v = math.log10(max(v, 1e-12))
        return (v - span[0]) / (span[1] - span[0]) if span[1] > span[0] else 0.0

    def x(self, v: float) -> float:
        return self.ml + self.pw * self._scale(v, self.x_range, self.x_log)

    def y(self, v: float) -> float:
        return self.mt + self.ph * (1 - self._scale(v, self.y_range, self.y_log))

    def _ticks(self, span: tuple[float, float], log: bool) -> list[float]:
        inside = lambda t: span[0] - 1e-9 <= (math.log10(t) if log else t) <= span[1] + 1e-9  # noqa: E731
        if not log:
            return [t for t in _nice_ticks(*span) if inside(t)]
        decades = range(math.floor(span[0]), math.ceil(span[1]) + 1)
        ticks = [10.0**d for d in decades if inside(10.0**d)]
        if len(ticks) < 3:  # a narrow range: 1, 2 and 5 in each decade
            ticks = [m * 10.0**d for d in decades for m in (1, 2, 5) if inside(m * 10.0**d)]
        return ticks

    def frame(self, x_label: str, y_label: str, *, x_format: Callable[[float], str] = _tick_label,
              y_format: Callable[[float], str] = _tick_label) -> None:
        ml, mt, pw, ph = self.ml, self.mt, self.pw, self.ph
        out = self.out
        out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
        for t in self._ticks(self.x_range, self.x_log):
            x = self.x(t)
            out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt}" stroke="#e4e4e4"/>')
            out.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{x_format(t)}</text>')
        for t in self._ticks(self.y_range, self.y_log):
            y = self.y(t)
            out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
            out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{y_format(t)}</text>')
        out.append(f'<text x="{ml + pw / 2}" y="{self.height - 10}" text-anchor="middle">{html.escape(x_label)}</text>')
        out.append(
            f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {mt + ph / 2})">'
            f"{html.escape(y_label)}</text>"
        )

    def message(self, text: str) -> str:
        self.out.append(f'<text x="{self.width / 2}" y="{self.height / 2}" text-anchor="middle">{html.escape(text)}</text>')
        return self.done()

    def done(self) -> str:
        self.out.append("</svg>")
        return "\n".join(self.out)


CELL_COLOUR, BACKGROUND_COLOUR, THRESHOLD_COLOUR = "#1f77b4", "#a0a0a0", "#d62728"


def knee_svg(
    umis_desc: Sequence[int],
    threshold: int | None,
    *,
    standalone: bool = True,
    width: int = 640,
    height: int = 420,
    cells: int | None = None,
) -> str:
    """A log–log barcode-rank plot as SVG text (no dependency). With ``cells``
    the curve of the top ``cells`` barcodes (the called cells) is drawn in blue,
    the background in grey, as in Cell Ranger's web summary. ``standalone``
    adds the XML namespace (a .svg file); without it the SVG is for inlining in
    HTML5, which needs none (so the report holds no URL at all)."""
    points = _steps(umis_desc)
    if not points:
        plot = _Plot((1, 10), (1, 10), x_log=True, y_log=True, width=width, height=height, standalone=standalone)
        return plot.message("no barcode with a UMI")
    plot = _Plot((1, points[-1][0]), (1, points[0][1]), x_log=True, y_log=True, width=width, height=height,
                 standalone=standalone, label="barcode rank plot")
    plot.frame("barcode rank", "UMIs")
    out = plot.out
    if threshold is not None and threshold >= 1:
        y = plot.y(threshold)
        out.append(f'<line x1="{plot.ml}" y1="{y:.1f}" x2="{plot.ml + plot.pw}" y2="{y:.1f}" '
                   f'stroke="{THRESHOLD_COLOUR}" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{plot.ml + plot.pw - 4}" y="{y - 4:.1f}" text-anchor="end" fill="{THRESHOLD_COLOUR}">'
                   f"cells: ≥ {threshold:,} UMIs</text>")
    if cells is None:
        parts = [(points, CELL_COLOUR, "")]
    else:
        inside = [p for p in points if p[0] <= cells]
        outside = [p for p in points if p[0] > cells]
        if inside and outside:
            outside.insert(0, inside[-1])  # one continuous curve
        parts = [(inside, CELL_COLOUR, "cells"), (outside, BACKGROUND_COLOUR, "background")]
    for part, colour, name in parts:
        if part:
            coords = " ".join(f"{plot.x(r):.1f},{plot.y(u):.1f}" for r, u in part)
            klass = f' class="{name}"' if name else ""
            out.append(f'<polyline{klass} fill="none" stroke="{colour}" stroke-width="2.5" points="{coords}"/>')
    if cells is not None:
        lx, ly = plot.ml + 12, plot.mt + plot.ph - 36
        for i, (colour, name) in enumerate(((CELL_COLOUR, "cells"), (BACKGROUND_COLOUR, "background"))):
            y = ly + 18 * i
            out.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 24}" y2="{y}" stroke="{colour}" stroke-width="3"/>')
            out.append(f'<text x="{lx + 30}" y="{y + 4}">{name}</text>')
    return plot.done()


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


def histogram_svg(values: Sequence[float], *, what: str, log: bool, bins: int = 30, limit: float | None = None,
                  percent: bool = False) -> str:
    """Cells per bin of ``values`` (log10-spaced bins with ``log``), bars with a
    tooltip each; ``limit`` draws a dashed line there."""
    width, height = 640, 300
    shown = [v for v in values if v > 0] if log else list(values)
    if len(shown) < 2:
        return _Plot((0, 1), (0, 1), width=width, height=height).message("too few cells for a distribution")
    low, high = min(shown), max(shown)
    if log:
        lo, hi = math.log10(low), math.log10(high)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        edges = [10 ** (lo + (hi - lo) * i / bins) for i in range(bins + 1)]
    else:
        lo, hi = (0.0, max(high, 1e-9)) if percent else (low, high if high > low else low + 1)
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for v in shown:
        position = (math.log10(v) - lo) / (hi - lo) if log else (v - lo) / (hi - lo)
        counts[min(bins - 1, max(0, int(position * bins)))] += 1
    plot = _Plot((edges[0], edges[-1]), (0, max(counts) * 1.08), x_log=log, width=width, height=height,
                 label=f"distribution of {what}")
    if log:
        plot.x_range = (lo, hi)  # the bins, not whole decades: the bars use the full width
    fmt = (lambda v: f"{v:.0%}") if percent else _tick_label
    plot.frame(what, "cells", x_format=fmt)
    for i, n in enumerate(counts):
        x0, x1 = plot.x(edges[i]), plot.x(edges[i + 1])
        y = plot.y(n)
        a, b = edges[i], edges[i + 1]
        span = f"{a:.1%}–{b:.1%}" if percent else f"{a:,.0f}–{b:,.0f}"
        plot.out.append(
            f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" height="{plot.y(0) - y:.1f}" '
            f'fill="{CELL_COLOUR}"><title>{span} {html.escape(what)}: {n:,} cells</title></rect>'
        )
    if limit is not None and edges[0] <= limit <= edges[-1]:
        x = plot.x(limit)
        plot.out.append(f'<line x1="{x:.1f}" y1="{plot.mt}" x2="{x:.1f}" y2="{plot.mt + plot.ph}" '
                        f'stroke="{THRESHOLD_COLOUR}" stroke-dasharray="5,4"/>')
    return plot.done()


def saturation_curve(reads_per_umi: dict[int, int], mean_reads_per_cell: float | None,
                     points: int = SATURATION_POINTS) -> list[dict[str, float]]:
    """Sequencing saturation had only a fraction p of the reads been sequenced:
    each distinct (cell, gene, UMI) with k reads is seen with probability
    1 − (1 − p)^k, so saturation(p) = 1 − E[distinct] / (p · reads). Exact in
    expectation (no subsampling); p = 1 gives the observed saturation."""
    reads = sum(k * n for k, n in reads_per_umi.items())
    if not reads:
        return []
    curve = []
    for i in range(1, points + 1):
        p = i / points
        distinct = sum(n * (1 - (1 - p) ** k) for k, n in reads_per_umi.items())
        curve.append({
            "fraction_of_reads": p,
            "mean_reads_per_cell": None if mean_reads_per_cell is None else p * mean_reads_per_cell,
            "saturation": 1 - distinct / (p * reads),
        })
    return curve


def saturation_svg(curve: list[dict[str, float]]) -> str:
    width, height = 640, 300
    if not curve:
        return _Plot((0, 1), (0, 1), width=width, height=height).message("no counted reads")
    by_cell = curve[-1]["mean_reads_per_cell"] is not None
    xs = [c["mean_reads_per_cell"] if by_cell else c["fraction_of_reads"] for c in curve]
    plot = _Plot((0, max(xs)), (0, 1), width=width, height=height, label="sequencing saturation curve")
    plot.frame("mean reads per cell" if by_cell else "fraction of the reads", "sequencing saturation",
               y_format=lambda v: f"{v:.0%}")
    coords = [(plot.x(x), plot.y(c["saturation"])) for x, c in zip(xs, curve, strict=True)]
    first = f"{plot.x(0):.1f},{plot.y(0):.1f} "
    plot.out.append(f'<polyline fill="none" stroke="{CELL_COLOUR}" stroke-width="2.5" '
                    f'points="{first}{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
    for (x, y), value, c in zip(coords, xs, curve, strict=True):
        label = f"{value:,.0f} reads per cell" if by_cell else f"{value:.0%} of the reads"
        plot.out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{CELL_COLOUR}">'
                        f'<title>{label}: saturation {c["saturation"]:.1%}</title></circle>')
    return plot.done()


# -- tables and report ----------------------------------------------------------------------


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _fmt(value: Any) -> str:
    if value is None:
        return "NA"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def cell_rows(cells: dict[str, dict[str, int]], threshold: int, mito_known: bool = True) -> list[dict[str, Any]]:
    """One row per barcode (``TSV_COLUMNS``), sorted by UMIs, then reads (both
    decreasing), then barcode. ``mito_known``: some gene had a name, so the
    mitochondrial fraction means something (else it is NA)."""
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
                "mito_umis": c.get("mito_umis", 0),
                "fraction_mito": _ratio(c.get("mito_umis", 0), c["umis"]) if mito_known else None,
                "is_cell": int(c["umis"] >= threshold and c["umis"] >= 1),
            }
        )
    rows.sort(key=lambda r: (-r["umis"], -r["reads"], r["barcode"]))
    return rows


def _count(n: Any) -> str:
    """A count as people read it: 1,234,567 (— when unknown)."""
    if n is None:
        return "—"
    return f"{n:,.0f}" if float(n) == int(n) else f"{n:,.1f}"


def _round(x: float | None) -> int | None:
    return None if x is None else round(x)


def _percent(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _warnings(summary: dict[str, Any]) -> list[dict[str, str]]:
    """What a reader should look at first, as Cell Ranger's web summary alerts."""
    found = []
    cells = summary["cells"]
    if cells < FEW_CELLS:
        found.append({"title": "Few cells", "detail": f"{cells:,} cells were called (fewer than {FEW_CELLS}); "
                      "check the barcode-rank plot, or set the threshold with --min-umis."})
    fic = summary["fraction_counted_reads_in_cells"]
    if fic is not None and fic < LOW_FRACTION_IN_CELLS:
        found.append({"title": "Low fraction of reads in cells", "detail": f"{fic:.1%} of the counted reads are in "
                      f"called cells (below {LOW_FRACTION_IN_CELLS:.0%}): high ambient RNA, or a cell call too strict."})
    with_cell = _ratio(summary["reads_with_cell"], summary["totals"]["primary_reads"])
    if with_cell is not None and with_cell < LOW_FRACTION_WITH_CELL:
        found.append({"title": "Few reads with a cell barcode", "detail": f"{with_cell:.1%} of the primary reads carry "
                      f"a cell barcode (below {LOW_FRACTION_WITH_CELL:.0%}): check the barcode tag and whitelist."})
    mito = summary["mito"]
    if mito is not None and mito["median_fraction_per_cell"] is not None and mito["median_fraction_per_cell"] > HIGH_MITO:
        found.append({"title": "High mitochondrial fraction", "detail": f"the median cell has "
                      f"{mito['median_fraction_per_cell']:.1%} of its UMIs from mitochondrial genes (above "
                      f"{HIGH_MITO:.0%}): stressed or broken cells."})
    return found


def _table(table_id: str, rows: list[tuple[str, str, str]]) -> str:
    """A metric table: (name, value, explanation shown on hover)."""
    e = html.escape
    cells = "".join(f'<tr title="{e(tip)}"><th>{e(name)}</th><td>{e(value)}</td></tr>' for name, value, tip in rows)
    return f'<table class="metrics" id="{table_id}">{cells}</table>'


def _cards(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The headline numbers: (label, value, what it is)."""
    mito = summary["mito"]
    cards = [
        ("Estimated number of cells", _count(summary["cells"]), _cell_rule(summary)),
        ("Mean reads per cell", _count(_round(summary["mean_reads_per_cell"])),
         "primary reads of the called cells, divided by the number of cells"),
        ("Median genes per cell", _count(summary["median_genes_per_cell"]), "genes with at least one UMI, median over the cells"),
        ("Median UMIs per cell", _count(summary["median_umis_per_cell"]),
         f"molecules ({summary['method']} UMI clustering per gene), median over the cells"),
        ("Sequencing saturation", _percent(summary["saturation"]),
         "1 − distinct (cell, gene, UMI) / counted reads: the share of reads that saw a molecule again"),
        ("Fraction reads in cells", _percent(summary["fraction_counted_reads_in_cells"]),
         "counted reads (mapped, with UMI and gene) whose barcode is a called cell"),
    ]
    if mito is not None and mito["mito_genes"]:
        cards.append(("Median mitochondrial UMIs", _percent(mito["median_fraction_per_cell"]),
                      f"share of a cell's UMIs in genes named MT-/mt- ({mito['gene_name_tag']}), median over the cells"))
    return cards


def _cell_rule(summary: dict[str, Any]) -> str:
    call = summary["cell_call"]
    how = "--min-umis" if call["rule"] == "min_umis" else f"the knee of the barcode-rank curve, rank {call['knee_rank']:,}"
    return f"barcodes with at least {call['threshold_umis']:,} UMIs ({how})"


def _metric_tables(summary: dict[str, Any]) -> str:
    t = summary["totals"]
    primary = t["primary_reads"]
    sequencing = [
        ("Number of reads", _count(summary["reads_in"]), "records in the BAM, secondary and supplementary included"),
        ("Primary reads", _count(primary), "records that are neither secondary nor supplementary"),
        ("Reads with a cell barcode", _percent(_ratio(summary["reads_with_cell"], primary)), "of the primary reads"),
        ("Reads mapped", _percent(t["fraction_mapped"]), "of the primary reads"),
        ("Reads with a gene", _percent(t["fraction_with_gene"]), "of the primary reads (mapped, gene tag not a placeholder)"),
        ("Reads without a UMI", _percent(t["fraction_no_umi"]), "of the primary reads"),
        ("Counted reads", _count(summary["counted"]), "with cell barcode, mapped, with UMI and gene"),
        ("Sequencing saturation", _percent(summary["saturation"]), "1 − distinct (cell, gene, UMI) / counted reads"),
        ("Duplication rate", _percent(summary["duplication_rate"]),
         f"1 − molecules / counted reads; molecules after {summary['method']} UMI clustering, so UMI errors count as copies"),
    ]
    mito = summary["mito"]
    cells = [
        ("Estimated number of cells", _count(summary["cells"]), _cell_rule(summary)),
        ("Barcodes seen", _count(summary["barcodes"]), "distinct cell barcodes on primary reads"),
        ("Fraction reads in cells", _percent(summary["fraction_counted_reads_in_cells"]), "of the counted reads"),
        ("Mean reads per cell", _count(_round(summary["mean_reads_per_cell"])), "primary reads of the cells / cells"),
        ("Median UMIs per cell", _count(summary["median_umis_per_cell"]), "over the called cells"),
        ("Median genes per cell", _count(summary["median_genes_per_cell"]), "over the called cells"),
        ("UMIs in cells", _count(summary["umis_in_cells"]), f"of {summary['umis']:,} UMIs on all barcodes"),
    ]
    if mito is None:
        cells.append(("Mitochondrial fraction", "—", "no read has a gene name to tell mitochondrial genes by"))
    elif not mito["mito_genes"]:
        cells.append(("Mitochondrial fraction", "—", f"no gene name ({mito['gene_name_tag']}) starts with MT- or mt-"))
    else:
        cells.append(("Median mitochondrial UMIs per cell", _percent(mito["median_fraction_per_cell"]),
                      f"{mito['mito_genes']:,} mitochondrial genes by name ({mito['gene_name_tag']})"))
        cells.append(("Mitochondrial UMIs in cells", _percent(mito["fraction_umis_in_cells"]), "of all UMIs in cells"))
    dropped = [(reason, _count(n), _DROP_TIPS.get(reason, "")) for reason, n in summary["dropped"].items()]
    return (
        '<div class="panel"><h2>Sequencing</h2>' + _table("sequencing", sequencing) + "</div>"
        '<div class="panel"><h2>Cells</h2>' + _table("cells", cells) + "</div>"
        '<div class="panel"><h2>Reads not counted</h2>' + _table("dropped", dropped) + "</div>"
    )


_DROP_TIPS = {
    "no_cell": "no cell barcode, or an empty one",
    "not_primary": "secondary or supplementary alignment",
    "unmapped": "not aligned",
    "no_umi": "no UMI, or an empty one",
    "no_gene": "no gene, or a featureCounts placeholder (__no_feature …)",
}

_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#f5f6f8}
header{background:#1d3557;color:#fff;padding:16px 24px}
header h1{margin:0;font-size:22px;font-weight:600;word-break:break-all}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
main{max-width:1200px;margin:0 auto;padding:16px}
h2{font-size:16px;margin:0 0 8px}
.warnings{margin:0 0 16px}
.warning{background:#fff4e5;border-left:5px solid #f0a020;padding:8px 12px;margin:0 0 8px;border-radius:4px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin:0 0 16px}
.card{background:#fff;border-radius:6px;padding:14px 12px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.card .value{font-size:26px;font-weight:600;color:#1d3557}
.card .label{font-size:13px;color:#555;margin-top:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,420px),1fr));gap:16px;margin:0 0 16px;
  align-items:start}
.panel{background:#fff;border-radius:6px;padding:14px;box-shadow:0 1px 3px rgba(0,0,0,.12);min-width:0}
.panel p.note{font-size:12px;color:#666;margin:6px 0 0}
svg.plot{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;font-size:13px}
table.metrics th{text-align:left;font-weight:normal;color:#444;padding:4px 8px 4px 0}
table.metrics td{text-align:right;font-weight:600;padding:4px 0}
table.metrics tr{border-bottom:1px solid #eee}
.scroll{max-height:480px;overflow:auto;border:1px solid #e4e4e4}
#barcodes{table-layout:fixed}
#barcodes th,#barcodes td{padding:4px 6px;text-align:right;border-bottom:1px solid #eee;overflow:hidden;
  text-overflow:ellipsis;white-space:nowrap}
#barcodes th{position:sticky;top:0;background:#f0f2f5;cursor:pointer;user-select:none}
#barcodes td.bc,#barcodes th.bc{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace;width:32%}
#barcodes th.rank{width:7%}
#barcodes tr.bg td{color:#888}
input#filter{padding:5px 8px;margin:0 0 8px;width:min(100%,320px);border:1px solid #ccc;border-radius:4px}
#tip{position:fixed;pointer-events:none;background:rgba(0,0,0,.8);color:#fff;padding:3px 7px;border-radius:3px;
  font-size:12px;display:none}
footer{font-size:12px;color:#666;text-align:center;padding:16px}
"""

# plain JavaScript, no library: the rank plot's tooltip, sorting and filtering the table
_SCRIPT = """
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('qc-data').textContent);
  var tip = document.getElementById('tip');
  function fmt(n) { return Math.round(n).toLocaleString('en-US'); }
  var svg = document.querySelector('#rank svg');
  var points = data.rank.points;
  if (svg && points.length) {
    var NS = svg.namespaceURI;
    var dot = document.createElementNS(NS, 'circle');
    dot.setAttribute('r', '5'); dot.setAttribute('fill', '#d62728'); dot.style.display = 'none';
    svg.appendChild(dot);
    var f = data.rank.frame;
    svg.addEventListener('mousemove', function (ev) {
      var box = svg.getBoundingClientRect();
      var x = (ev.clientX - box.left) * f.width / box.width;
      var t = (x - f.ml) / f.pw;
      if (t < 0 || t > 1) { dot.style.display = 'none'; tip.style.display = 'none'; return; }
      var rank = Math.max(1, Math.round(Math.pow(10, f.x0 + t * (f.x1 - f.x0))));
      var lo = 0, hi = points.length - 1;
      while (lo < hi) { var mid = (lo + hi) >> 1; if (points[mid][0] < rank) lo = mid + 1; else hi = mid; }
      var p = points[lo];
      if (rank > p[0]) { dot.style.display = 'none'; tip.style.display = 'none'; return; }
      var umis = p[1];
      var px = f.ml + f.pw * (Math.log10(rank) - f.x0) / (f.x1 - f.x0);
      var py = f.mt + f.ph * (1 - (Math.log10(umis) - f.y0) / (f.y1 - f.y0));
      dot.setAttribute('cx', px.toFixed(1)); dot.setAttribute('cy', py.toFixed(1)); dot.style.display = '';
      tip.textContent = 'rank ' + fmt(rank) + ': ' + fmt(umis) + ' UMIs, ' + (rank <= data.rank.cells ? 'cell' : 'background');
      tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; tip.style.display = 'block';
    });
    svg.addEventListener('mouseleave', function () { dot.style.display = 'none'; tip.style.display = 'none'; });
  }
  var table = document.getElementById('barcodes');
  if (table) {
    var body = table.tBodies[0];
    var order = {};
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener('click', function () {
        var rows = Array.prototype.slice.call(body.rows);
        var dir = order[col] = -(order[col] || 1);
        function key(row) {
          var s = row.cells[col].textContent.replace(/[,%]/g, ''), v = parseFloat(s);
          return isNaN(v) ? s : v;
        }
        rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * dir; });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
    var filter = document.getElementById('filter');
    filter.addEventListener('input', function () {
      var q = filter.value.trim().toUpperCase();
      Array.prototype.forEach.call(body.rows, function (row) {
        row.style.display = row.cells[1].textContent.toUpperCase().indexOf(q) >= 0 ? '' : 'none';
      });
    });
  }
})();
"""

_TABLE_COLUMNS = (("#", "rank"), ("barcode", "bc"), ("cell", ""), ("reads", ""), ("UMIs", ""), ("genes", ""),
                  ("saturation", ""), ("mito", ""))


def _barcode_table(rows: list[dict[str, Any]], top: int) -> str:
    e = html.escape
    shown = rows[:top]
    head = "".join(f'<th class="{k}">{e(name)}</th>' if k else f"<th>{e(name)}</th>" for name, k in _TABLE_COLUMNS)
    body = []
    for rank, r in enumerate(shown, 1):
        body.append(
            f'<tr{"" if r["is_cell"] else " class=bg"}><td>{rank:,}</td><td class="bc" title="{e(r["barcode"])}">'
            f'{e(r["barcode"])}</td><td>{"yes" if r["is_cell"] else "no"}</td><td>{r["reads"]:,}</td>'
            f'<td>{r["umis"]:,}</td><td>{r["genes"]:,}</td><td>{_percent(r["saturation"])}</td>'
            f'<td>{_percent(r["fraction_mito"])}</td></tr>'
        )
    more = f"the top {len(shown):,} of {len(rows):,} barcodes by UMIs; all of them in per_cell.tsv" if len(rows) > top \
        else f"all {len(rows):,} barcodes, by UMIs"
    return (
        '<div class="panel"><h2>Barcodes</h2><input id="filter" type="search" placeholder="find a barcode" '
        'aria-label="find a barcode"><div class="scroll"><table id="barcodes"><thead><tr>' + head + "</tr></thead><tbody>"
        + "".join(body) + f'</tbody></table></div><p class="note">{e(more)}; click a column to sort.</p></div>'
    )


def _mito_note(called: list[dict[str, Any]]) -> str:
    above = sum(1 for r in called if r["fraction_mito"] is not None and r["fraction_mito"] > HIGH_MITO)
    if not above:
        return f"No cell has more than {HIGH_MITO:.0%} of its UMIs from mitochondrial genes (a common filter)."
    return f"{above:,} cells have more than {HIGH_MITO:.0%} (dashed), a common filter for stressed or broken cells."


def _json_for_script(value: Any) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def report_html(summary: dict[str, Any], rows: list[dict[str, Any]], svg: str | None = None, top: int = TOP_CELLS,
                curve: list[dict[str, float]] | None = None) -> str:
    """The web summary: one self-contained HTML page (inline style, SVG and
    script; no URL), readable without JavaScript, interactive with it."""
    e = html.escape
    umis_desc = [r["umis"] for r in rows]
    called = [r for r in rows if r["is_cell"]]
    threshold = summary["cell_call"]["threshold_umis"] if summary["cells"] else None
    if svg is None:
        svg = knee_svg(umis_desc, threshold, standalone=False, cells=summary["cells"])
    points = _steps(umis_desc)
    frame = {"width": 640, "ml": 70, "mt": 20, "pw": 550, "ph": 350, "x0": 0.0, "x1": 1.0, "y0": 0.0, "y1": 1.0}
    if points:
        probe = _Plot((1, points[-1][0]), (1, points[0][1]), x_log=True, y_log=True, width=640, height=420)
        frame.update(ml=probe.ml, mt=probe.mt, pw=probe.pw, ph=probe.ph, x0=probe.x_range[0], x1=probe.x_range[1],
                     y0=probe.y_range[0], y1=probe.y_range[1])
    data = {"rank": {"points": points, "cells": summary["cells"], "frame": frame}}
    warnings = summary.get("warnings") or []
    mito = summary["mito"]
    name = os.path.basename(summary["input"]) or summary["input"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>bamflow qc: {e(name)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{e(name)}</h1><p>bamflow qc {e(__version__)} · {e(summary['input'])} · "
        f"UMI method {e(summary['method'])} · cells: {e(_cell_rule(summary))}</p></header><main>",
    ]
    if warnings:
        parts.append('<section class="warnings" id="warnings">' + "".join(
            f'<div class="warning"><strong>{e(w["title"])}</strong>: {e(w["detail"])}</div>' for w in warnings
        ) + "</section>")
    parts.append('<section class="cards" id="cards">' + "".join(
        f'<div class="card" title="{e(tip)}"><div class="value">{e(value)}</div><div class="label">{e(label)}</div></div>'
        for label, value, tip in _cards(summary)
    ) + "</section>")
    parts.append('<section class="grid">')
    parts.append('<div class="panel" id="rank"><h2>Barcode rank</h2>' + svg +
                 '<p class="note">UMIs per barcode, most first; called cells in blue. Point at the curve for a rank.</p></div>')
    parts.append(_metric_tables(summary))
    parts.append('<div class="panel" id="umis-per-cell"><h2>UMIs per cell</h2>'
                 + histogram_svg([r["umis"] for r in called], what="UMIs per cell", log=True) + "</div>")
    parts.append('<div class="panel" id="genes-per-cell"><h2>Genes per cell</h2>'
                 + histogram_svg([r["genes"] for r in called], what="genes per cell", log=True) + "</div>")
    parts.append('<div class="panel" id="saturation"><h2>Sequencing saturation</h2>' + saturation_svg(curve or [])
                 + '<p class="note">Saturation had only part of the reads been sequenced (computed from the reads per '
                 "UMI, no subsampling); a flat curve means more sequencing finds few new molecules.</p></div>")
    if mito is not None and mito["mito_genes"]:
        parts.append('<div class="panel" id="mito"><h2>Mitochondrial UMIs per cell</h2>' + histogram_svg(
            [r["fraction_mito"] for r in called if r["fraction_mito"] is not None], what="mitochondrial fraction",
            log=False, bins=40, limit=HIGH_MITO, percent=True) + f'<p class="note">{e(_mito_note(called))}</p></div>')
    parts.append("</section>")
    parts.append(_barcode_table(rows, top))
    parts.append(f'</main><footer>bamflow {e(__version__)} · per_cell.tsv, cells.txt and summary.json hold every number'
                 " shown here</footer>")
    parts.append('<div id="tip"></div>')
    parts.append(f'<script type="application/json" id="qc-data">{_json_for_script(data)}</script>')
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


# -- the preset -----------------------------------------------------------------------------


def qc(
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    cell_tag: str = "CB",
    umi_tag: str = "UB",
    gene_tag: str = "GX",
    gene_name_tag: str | None = "GN",
    method: str = "directional",
    min_umis: int | None = None,
    workers: int = 2,
    threads: int = 2,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Per-cell QC of a 10x-style BAM in one parallel pass (sharded by cell).

    Per barcode: reads (primary), UMIs (molecules: UMI clusters per gene,
    ``method`` as umi_tools, summed over genes), genes detected (≥ 1 UMI),
    duplication rate ``1 − UMIs / counted reads`` (counted = mapped, with UMI
    and gene), saturation ``1 − distinct (gene, UMI) / counted reads``,
    fractions mapped / with gene / without UMI, mitochondrial UMIs (genes
    whose ``gene_name_tag`` starts with MT- or mt-; None: ``gene_tag`` holds
    the names). Cells: barcodes with ≥ ``min_umis`` UMIs, or, if None, with ≥
    the UMIs at the knee of the barcode-rank curve (:func:`knee`).

    Writes ``per_cell.tsv``, ``cells.txt``, ``summary.json``, ``knee.svg``,
    ``knee.png`` (if matplotlib is importable) and ``report.html`` into
    ``out_dir`` (created if needed), all or nothing. Returns the summary (as
    in summary.json). Raises WorkflowError if the reads do not add up
    (``reads_in != counted + sum(dropped)``) or ``out_dir`` cannot be a folder;
    a folder holding an earlier run's outputs is refused unless ``force``.
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
        worker_kwargs=dict(method=method, cell_tag=cell_tag, umi_tag=umi_tag, gene_tag=gene_tag, gene_name_tag=gene_name_tag),
        decode=DecodeOptions(threads),
        unassigned_worker=qc_unassigned_worker,
        unassigned_kwargs=dict(umi_tag=umi_tag, gene_tag=gene_tag),
    )
    with Publication() as pub:
        pub.claim_folder(out_dir, force=force, inputs=[input])  # before the pass: a bad folder fails at once
        w.run(timeout=timeout, on_progress=on_progress, publication=pub,
              check=lambda w: jobs.require_tags(w, [umi_tag, gene_tag]))
        summary = _summarize(pub, w, jobs, input, out_dir, method, min_umis, gene_name_tag or gene_tag)
        pub.commit()
    log.info("qc %s → %s: %s cells of %s barcodes", input, out_dir, summary["cells"], summary["barcodes"])
    return summary


OUTPUT_NAMES = ("per_cell.tsv", "cells.txt", "knee.svg", "knee.png", "report.html", "summary.json")


def _summarize(
    pub: Publication, w: BamWorkflow, jobs: Any, input: str, out_dir: str, method: str, min_umis: int | None,
    gene_name_tag: str = "GN",
) -> dict[str, Any]:
    """Check the books, write every output into ``pub``; returns the summary."""
    reads_in, merged, per_worker = gather(w, jobs)
    merged = dict(merged)
    for key in ("totals", "named_genes", "mito_genes", "reads_per_umi"):  # qc's own fields, added up here
        merged[key] = functools.reduce(merge_counts, (r.get(key) for r in per_worker), None)
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
    named = merged.get("named_genes") or 0
    rows = cell_rows(cells, call["threshold_umis"], mito_known=named > 0)
    called = [r for r in rows if r["is_cell"]]
    if len(called) != call["cells"]:
        raise WorkflowError("qc: cell call is inconsistent")  # cannot happen
    t = merged.get("totals") or {}
    primary = t.get("primary_reads", 0)
    total_umis = sum(r["umis"] for r in rows)
    mean_reads = _ratio(sum(r["reads"] for r in called), len(called))
    reads_per_umi = {int(k): n for k, n in (merged.get("reads_per_umi") or {}).items()}
    umis_in_cells = sum(r["umis"] for r in called)
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
        "umis_in_cells": umis_in_cells,
        "reads_in_cells": sum(r["reads"] for r in called),
        "fraction_counted_reads_in_cells": _ratio(sum(r["counted_reads"] for r in called), counted),
        "median_umis_per_cell": statistics.median(r["umis"] for r in called) if called else None,
        "median_genes_per_cell": statistics.median(r["genes"] for r in called) if called else None,
        "mean_reads_per_cell": mean_reads,
        "duplication_rate": None if not counted else 1 - total_umis / counted,
        "saturation": None if not counted else 1 - sum(r["distinct_umis"] for r in rows) / counted,
        "totals": {
            **_totals_of(primary, t.get("mapped", 0), t.get("with_gene", 0), t.get("no_umi", 0)),
            "fraction_mapped": _ratio(t.get("mapped", 0), primary),
            "fraction_with_gene": _ratio(t.get("with_gene", 0), primary),
            "fraction_no_umi": _ratio(t.get("no_umi", 0), primary),
        },
        "mito": None if not named else {
            "gene_name_tag": gene_name_tag,
            "mito_genes": len(set(merged.get("mito_genes") or [])),
            "median_fraction_per_cell": statistics.median(r["fraction_mito"] for r in called if r["fraction_mito"] is not None)
            if any(r["fraction_mito"] is not None for r in called) else None,
            "fraction_umis_in_cells": _ratio(sum(r["mito_umis"] for r in called), umis_in_cells),
        },
        "saturation_curve": saturation_curve(reads_per_umi, mean_reads),
        "warnings": [],
        "outputs": {},
        "plots": {},
    }
    summary["warnings"] = _warnings(summary)

    threshold = call["threshold_umis"] if call["cells"] else None
    path = {n: os.path.join(out_dir, n) for n in OUTPUT_NAMES}
    pub.write_tsv(path["per_cell.tsv"], TSV_COLUMNS, ([_fmt(r[c]) for c in TSV_COLUMNS] for r in rows))
    pub.write_tsv(path["cells.txt"], None, ([r["barcode"]] for r in called))
    pub.write_text(path["knee.svg"], knee_svg(umis_desc, threshold, cells=call["cells"]) + "\n")
    png = knee_png(umis_desc, threshold)
    if png is None:
        log.warning("qc: matplotlib is not installed; writing knee.svg but not knee.png")
    else:
        pub.write_bytes(path["knee.png"], png)
    summary["plots"] = {"knee.svg": True, "knee.png": png is not None, "report.html": "inline SVG"}
    summary["outputs"] = {n: p for n, p in path.items() if n != "knee.png" or png is not None}
    pub.write_text(path["report.html"], report_html(summary, rows, curve=summary["saturation_curve"]))
    pub.write_text(path["summary.json"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    summary["per_worker"] = [
        {k: v for k, v in r.items() if k not in ("cells", "reads_per_umi", "mito_genes")} for r in per_worker
    ]
    return summary


def key_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers a person looks at first (the command's summary shows them)."""
    mito = summary.get("mito") or {}
    numbers = {
        "cells": summary["cells"],
        "mean_reads_per_cell": summary["mean_reads_per_cell"],
        "median_umis_per_cell": summary["median_umis_per_cell"],
        "median_genes_per_cell": summary["median_genes_per_cell"],
        "saturation": summary["saturation"],
        "fraction_reads_in_cells": summary["fraction_counted_reads_in_cells"],
    }
    if mito.get("mito_genes"):
        numbers["median_mito_fraction"] = mito["median_fraction_per_cell"]
    return numbers


__all__ = [
    "qc", "qc_worker", "knee", "call_cells", "knee_svg", "knee_png", "report_html", "saturation_curve",
    "key_numbers", "TSV_COLUMNS",
]
