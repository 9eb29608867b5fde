"""UMI counts per gene (and cell), as ``umi_tools count`` does it (UMI-tools
1.1.6), with C kernels.

    decode ─▶ distribute by CB ─▶ UMI kernel × N   (count: per (cell, gene) bundle, molecules in arrays)
                  └─(no CB)─▶ unassigned kernel    (counts why)

    or, indexed and coordinate-sorted:  read partition i (whole references) ─▶ UMI kernel i

The kernel (:class:`bamflow.kernels.umi.UmiKernel`, mode ``count``) bundles
reads as umi_tools' ``get_bundles`` does with ``--per-gene``: per reference,
gene (``gene_tag``, or the reference with ``per_contig``) and cell,
position ignored; a reference's bundles are clustered when the next
reference starts. Per bundle the number of UMI groups is the count. The
kernel returns arrays (gene, cell, count); the tables are formatted from
them in C, without a Python loop per entry.

Outputs in ``out/``:

- ``counts.tsv``: umi_tools' table — with ``per_cell``: ``gene cell count``,
  sorted by gene then cell (``wide_format_cell_counts``: genes × cells);
  without: ``gene count``, one line per bundle in umi_tools' order;
- ``matrix.mtx.gz``, ``barcodes.tsv.gz``, ``features.tsv.gz`` (10x layout,
  genes × cells) and ``counts.h5ad`` (cells × genes, when anndata is
  installed): per cell only.

A gene whose reads lie on several references (secondary alignments carry
the gene tag) is one bundle per reference in umi_tools; its ``--per-cell``
table keeps the last reference's count, and so does bamflow (every output),
so that the tables are equal; ``stats["overwritten"]`` says how many
(gene, cell) counts were replaced that way.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..engine.publish import Publication
from .dedup import SUMMED, UmiOptions, books, gather, run_umi

log = logging.getLogger("bamflow")

FORMATS = ("mtx", "tsv", "h5ad")


def count(
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    gene_tag: str | None = "GX",
    name_tag: str | None = "GN",
    cells: Sequence[str] | str | os.PathLike[str] | None = None,
    min_umis: int | None = None,
    formats: Sequence[str] = FORMATS,
    wide_format_cell_counts: bool = False,
    force: bool = False,
    workers: int = 2,
    threads: int = 2,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Count UMI molecules per gene (and cell) like ``umi_tools count --per-gene``.

    ``options``: :class:`~bamflow.presets.dedup.UmiOptions` fields
    (umi_tools' names: ``method``, ``umi_tag``, ``cell_tag``, ``per_cell``,
    ``per_contig``, ``skip_tags_regex``, ``mapping_quality``, …); counting is
    always per gene (``gene_tag``, or ``per_contig=True``). ``cells`` fixes
    the columns: a list, a file with one barcode a line (gzip too), or qc's
    ``per_cell.tsv`` (its ``barcode`` header skipped; with an ``is_cell``
    column, the called cells only); listed cells without reads are zero
    columns. Else ``min_umis`` keeps cells with at least that many molecules;
    else every cell seen. ``formats``: ``mtx``, ``tsv``, ``h5ad`` (without
    ``per_cell`` only ``tsv``). ``out`` is claimed as qc and shard claim
    theirs: a folder holding an earlier run's outputs is refused unless
    ``force`` (then replaced whole when this run commits). Returns ``{"reads_in", "counted", "dropped",
    "cells", "cells_seen", "genes", "molecules", "outputs", "per_worker", …}``.
    """
    if "per_gene" in options and not options["per_gene"]:
        raise ValueError("count is always per gene (umi_tools count hardcodes --per-gene)")
    if options.get("per_contig"):
        gene_tag = None
    opts, rest = UmiOptions.take({**options, "gene_tag": gene_tag, "per_gene": True})
    if rest:
        raise TypeError(f"count() got unexpected keyword arguments: {', '.join(sorted(rest))}")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    if not opts.per_cell and set(formats) - {"tsv"}:
        raise ValueError("without per_cell only the tsv format is written (umi_tools' gene/count table)")
    if wide_format_cell_counts and not opts.per_cell:
        raise ValueError("wide_format_cell_counts needs per_cell")
    if min_umis is not None and min_umis < 1:
        raise ValueError(f"min_umis must be >= 1, not {min_umis}")
    listed = read_cells(cells) if cells is not None else None
    input, out = os.fspath(input), os.fspath(out)
    extra = {"name_tag": name_tag if name_tag and name_tag != opts.gene_tag else None}
    run = run_umi("count", input, opts, "count", output=None, workers=workers, threads=threads, extra=extra,
                  start_method=start_method)
    stats: dict[str, Any] = {}

    def check(w: Any) -> None:
        reads_in, merged, per_worker = gather(w, run.jobs, SUMMED)
        run.jobs.require_tags(w, opts.tags())
        stats.update(reads_in=reads_in, counted=merged.get("counted", 0),
                     dropped=dict(sorted(merged.get("dropped", {}).items())),
                     molecules_all_bundles=merged.get("molecules", 0), overwritten=merged.get("overwritten", 0),
                     workers=run.workers, sharding=run.sharding, per_worker=per_worker)
        books(stats, "counted", "counted")

    with Publication() as pub:
        pub.claim_folder(out, force=force, inputs=[input])  # before the pass: a bad folder fails at once
        run.w.run(timeout=timeout, on_progress=on_progress, check=check, publication=pub)
        table = CountTable.merge(stats.pop("per_worker"), opts.per_cell)
        stats["overwritten"] += table.overwritten
        stats["per_worker"] = [{k: v for k, v in r.items() if k not in RESULT_ARRAYS} for r in run.w.result(run.jobs.workers)]
        stats.update(table.write(pub, out, formats, listed, min_umis, wide_format_cell_counts))
        pub.commit()
    stats["method"] = opts.method
    log.info("count %s → %s: %s", input, out, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


RESULT_ARRAYS = ("genes", "cells", "entries", "names")


def read_cells(cells: Sequence[str] | str | os.PathLike[str]) -> list[str]:
    """Barcodes: a list, or a file (gzip too) with one a line (first column);
    qc's ``per_cell.tsv``: its header line skipped, and with an ``is_cell``
    column only the rows that are cells."""
    if not isinstance(cells, (str, os.PathLike)):
        return [str(c) for c in cells]
    path = os.fspath(cells)
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rt") if gz else open(path)) as f:
        rows = [line.rstrip("\r\n").split("\t") for line in f]
    is_cell = None
    if rows and rows[0][0] == "barcode":
        header = rows.pop(0)
        is_cell = header.index("is_cell") if "is_cell" in header else None
    listed = [r[0].strip() for r in rows if r and r[0].strip() and (is_cell is None or r[is_cell] == "1")]
    if not listed:
        raise ValueError(f"{path}: no cell barcodes in it")
    return list(dict.fromkeys(listed))


class CountTable:
    """The (gene, cell, molecules) entries of every worker, on global gene and cell numbers."""

    def __init__(self, genes: list[bytes], cells: list[bytes], gene_idx: Any, cell_idx: Any, counts: Any,
                 names: dict[bytes, bytes], per_cell: bool) -> None:
        self.genes, self.cells = genes, cells
        self.gene_idx, self.cell_idx, self.counts = gene_idx, cell_idx, counts
        self.names, self.per_cell = names, per_cell

    overwritten = 0  # (gene, cell) counts of an earlier worker replaced by a later one's

    @classmethod
    def merge(cls, per_worker: list[dict[str, Any]], per_cell: bool) -> CountTable:
        """Map each worker's gene and cell numbers to sorted global ones. Workers
        by cell share genes; workers by region (whole references, in order)
        share cells, and a gene on references of two workers (secondary
        alignments) keeps the later worker's count per cell, as one worker
        keeps the last reference's."""
        import numpy as np

        results = [r for r in per_worker if "genes" in r]
        genes = sorted({g for r in results for g in r["genes"]})
        cells = sorted({c for r in results for c in r["cells"]})
        gene_pos = {g: i for i, g in enumerate(genes)}
        cell_pos = {c: i for i, c in enumerate(cells)}
        gi, ci, cn = [], [], []
        names: dict[bytes, bytes] = {}
        for r in results:
            gmap = np.array([gene_pos[g] for g in r["genes"]] + [-1], dtype=np.int64)
            cmap = np.array([cell_pos[c] for c in r["cells"]] + [-1], dtype=np.int64)
            entries = np.frombuffer(r["entries"], dtype=np.int32).reshape(-1, 3)  # gene, cell, count
            gi.append(gmap[entries[:, 0]])
            ci.append(cmap[entries[:, 1]])  # -1 (no cell) → -1
            cn.append(entries[:, 2].astype(np.int64))
            for g, name in r["names"].items():
                names.setdefault(g, name)
        g, c, n = _joined(gi), _joined(ci), _joined(cn)
        overwritten = 0
        if per_cell and len(results) > 1 and len(g):
            key = g * (len(cells) + 1) + (c + 1)
            _, last = np.unique(key[::-1], return_index=True)  # the last entry of each (gene, cell)
            keep = np.sort(len(key) - 1 - last)
            overwritten = len(key) - len(keep)
            g, c, n = g[keep], c[keep], n[keep]
        table = cls(genes, cells, g, c, n, names, per_cell)
        table.overwritten = overwritten
        return table

    def write(self, pub: Publication, out: str, formats: Sequence[str], listed: list[str] | None, min_umis: int | None,
              wide: bool) -> dict[str, Any]:
        import numpy as np

        from ..kernels.umi import format_table

        outputs: dict[str, str] = {}
        if not self.per_cell:
            if "tsv" in formats:  # umi_tools: one line per bundle, in its order
                path = os.path.join(out, "counts.tsv")
                with pub.open(path, "wb") as f:
                    f.write(b"gene\tcount\n")
                    _write_rows(f, self.genes, None, None, self.gene_idx, None, self.counts, "tsv")
                outputs["counts.tsv"] = path
            return {"genes": len(self.genes), "molecules": int(self.counts.sum()), "outputs": outputs}
        cell_names = [c.decode("utf-8", "surrogateescape") for c in self.cells]
        totals = np.bincount(self.cell_idx, weights=self.counts, minlength=len(self.cells)).astype(np.int64)
        if listed is not None:
            columns = listed
        elif min_umis is not None:
            columns = [c for c, t in zip(cell_names, totals, strict=True) if t >= min_umis]
        else:
            columns = cell_names
        # column of every seen cell (-1: not a column)
        where = {c: j for j, c in enumerate(columns)}
        col_of = np.array([where.get(c, -1) for c in cell_names] + [-1], dtype=np.int64)
        cols = col_of[self.cell_idx]
        keep = cols >= 0
        g, c, n = self.gene_idx[keep], cols[keep], self.counts[keep]
        if "tsv" in formats:  # umi_tools: sorted by gene, then cell (as Python sorts the strings)
            path = os.path.join(out, "counts.tsv")
            col_bytes = [x.encode("utf-8", "surrogateescape") for x in columns]
            by_name = sorted(range(len(columns)), key=col_bytes.__getitem__)
            rank = np.empty(len(columns), dtype=np.int64)
            rank[by_name] = np.arange(len(columns))
            sorted_cols = [col_bytes[j] for j in by_name]
            r = rank[c]
            order = np.lexsort((r, g))
            with pub.open(path, "wb") as f:
                if wide:
                    f.write(b"gene\t" + b"\t".join(escape(x) for x in sorted_cols) + b"\n")
                    f.write(format_table(self.genes, sorted_cols, g[order], r[order], n[order], "wide"))
                else:
                    f.write(b"gene\tcell\tcount\n")
                    _write_rows(f, self.genes, sorted_cols, order, g, r, n, "tsv")
            outputs["counts.tsv"] = path
        if "mtx" in formats:
            outputs.update(self._mtx(pub, out, columns, g, c, n))
        if "h5ad" in formats:
            path = self._h5ad(pub, os.path.join(out, "counts.h5ad"), columns, g, c, n)
            if path is not None:
                outputs["counts.h5ad"] = path
        return {
            "cells": len(columns),
            "cells_seen": len(self.cells),
            "genes": len(self.genes),
            "molecules": int(n.sum()),
            "outputs": outputs,
        }

    def _feature_rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for gene in self.genes:
            name = self.names.get(gene, gene)
            rows.append((gene.decode("utf-8", "surrogateescape"), name.decode("utf-8", "surrogateescape"), "Gene Expression"))
        return rows

    def _mtx(self, pub: Publication, out: str, columns: list[str], g: Any, c: Any, n: Any) -> dict[str, str]:
        """10x layout: matrix.mtx.gz (genes × cells, by column then row), barcodes.tsv.gz, features.tsv.gz."""
        import isal.igzip
        import numpy as np

        order = np.lexsort((g, c))
        paths = {name: os.path.join(out, name) for name in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz")}
        head = ("%%MatrixMarket matrix coordinate integer general\n"
                '%metadata_json: {"software_version": "bamflow", "format_version": 2}\n'
                f"{len(self.genes)} {len(columns)} {len(n)}\n").encode()
        with open(pub.path(paths["matrix.mtx.gz"]), "wb") as raw, \
                isal.igzip.IGzipFile(fileobj=raw, mode="wb", compresslevel=2, mtime=0) as f:  # fast; reproducible
            f.write(head)
            _write_rows(f, None, None, order, g + 1, c + 1, n, "mtx")
        pub.write_tsv(paths["barcodes.tsv.gz"], None, ((x,) for x in columns))
        pub.write_tsv(paths["features.tsv.gz"], None, self._feature_rows())
        return paths

    def _h5ad(self, pub: Publication, path: str, columns: list[str], g: Any, c: Any, n: Any) -> str | None:
        """cells × genes AnnData (CSR int32), var: gene_ids, gene_names; None without anndata."""
        try:
            import anndata
            import numpy as np
            import pandas as pd
            import scipy.sparse as sp
        except ImportError:
            log.warning("count: anndata is not installed; not writing %s (pip install anndata)", path)
            return None
        x = sp.csr_matrix((n.astype(np.int32), (c, g)), shape=(len(columns), len(self.genes)))
        features = self._feature_rows()
        adata = anndata.AnnData(
            X=x,
            obs=pd.DataFrame(index=pd.Index(columns, name="barcode")),
            var=pd.DataFrame({"gene_ids": [f[0] for f in features], "gene_names": [f[1] for f in features]},
                             index=pd.Index([f[0] for f in features], name="gene")),
        )
        adata.write_h5ad(pub.path(path))
        return path


CHUNK = 1 << 16  # table rows formatted at a time (bounded memory)


def _write_rows(f: Any, genes: list[bytes] | None, cells: list[bytes] | None, order: Any, g: Any, c: Any, n: Any,
                kind: str) -> None:
    """Rows ``order`` (None: all, as they are) of the (gene, cell, count) arrays, formatted in C, a chunk at a time."""
    from ..kernels.umi import format_table

    total = len(n) if order is None else len(order)
    for i in range(0, total, CHUNK):
        idx = slice(i, i + CHUNK) if order is None else order[i:i + CHUNK]
        f.write(format_table(genes, cells, g[idx], None if c is None else c[idx], n[idx], kind))


def _joined(parts: list[Any]) -> Any:
    import numpy as np

    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def escape(value: bytes) -> bytes:
    """A table field as write_tsv escapes it."""
    from ..engine.publish import escape_field

    return escape_field(value).encode("utf-8", "surrogateescape")


__all__ = ["count", "read_cells", "CountTable", "FORMATS"]
