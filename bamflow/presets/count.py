"""Gene × cell UMI counts, like ``umi_tools count --per-gene --per-cell --gene-tag=GX``.

    decode ─▶ distribute by CB ─▶ count worker × N   (per cell: {gene: {umi: reads}} → molecules)
                  └─(no CB)─▶ unassigned worker      (counts why)

Each worker sees whole cells, collects the UMIs of every (cell, gene) with
their read counts, ignoring position (umi_tools' ``--per-gene``), clusters
them (:mod:`bamflow.presets.umi`) and returns per cell ``{gene: molecules}``.
Memory: one entry per distinct (cell, gene, UMI) of a worker's share.

Outputs in ``out/``: ``matrix.mtx.gz``, ``barcodes.tsv.gz``,
``features.tsv.gz`` (10x / ``scanpy.read_10x_mtx`` layout, genes × cells),
``counts.tsv`` (umi_tools ``count --per-cell`` long format: ``gene cell
count``, sorted by gene then cell) and ``counts.h5ad`` (cells × genes) when
anndata is installed.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..bam.options import DecodeOptions
from ..bam.workflow import BamWorkflow
from ..engine.errors import WorkflowError
from ..engine.publish import Publication
from .dedup import ReadKeys, by_cell, gather, unassigned_worker
from .umi import METHODS, cluster_umis

log = logging.getLogger("bamflow")

DEFAULT_GENE_FILTER = r"^(?!__|Unassigned)"  # keep; umi_tools skips "^(__|Unassigned)"
FORMATS = ("mtx", "tsv", "h5ad")


def count_worker(
    input: str,
    output: str | None,
    *,
    method: str,
    umi_tag: str,
    cell_tag: str,
    gene_tag: str,
    name_tag: str | None,
    gene_filter: str | None,
) -> dict[str, Any]:
    """One worker: {cell: {gene: molecules}}, gene names, read counts and drops."""
    import pysam

    keys = ReadKeys(f"tag:{umi_tag}", cell_tag, per_cell=True, gene_tag=gene_tag, skip_genes=None)
    keep = re.compile(gene_filter) if gene_filter else None
    umis: dict[str, dict[str, dict[str, int]]] = {}  # cell → gene → umi → reads
    names: dict[str, str] = {}
    dropped: dict[str, int] = {}
    reads_in = counted = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        for read in reads:
            reads_in += 1
            reason, umi, cell, gene = keys(read)
            if reason is None and keep is not None and not keep.search(str(gene)):
                reason = "gene_filtered"
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            gene = str(gene)
            counted += 1
            per_gene = umis.setdefault(cell, {}).setdefault(gene, {})
            per_gene[umi] = per_gene.get(umi, 0) + 1
            if name_tag is not None and gene not in names:
                try:
                    names[gene] = str(read.get_tag(name_tag))
                except KeyError:
                    pass
    counts = {cell: {gene: len(cluster_umis(u, method)) for gene, u in genes.items()} for cell, genes in umis.items()}
    return {"reads_in": reads_in, "written": None, "counted": counted, "dropped": dropped, "counts": counts,
            "names": names}


def _read_cells(cells: Sequence[str] | str | os.PathLike[str]) -> list[str]:
    if isinstance(cells, (str, os.PathLike)):
        opener = gzip.open if os.fspath(cells).endswith(".gz") else open
        with opener(cells, "rt") as f:
            listed = [line.split("\t")[0].strip() for line in f]
        return [c for c in listed if c]
    return [str(c) for c in cells]


def write_mtx(
    pub: Publication, out: str, genes: list[str], names: dict[str, str], cells: list[str],
    counts: dict[str, dict[str, int]],
) -> dict[str, str]:
    """10x layout: matrix.mtx.gz (genes × cells), barcodes.tsv.gz, features.tsv.gz."""
    gene_index = {g: i + 1 for i, g in enumerate(genes)}
    entries = [
        (gene_index[g], j + 1, n)
        for j, cell in enumerate(cells)
        for g, n in sorted(counts.get(cell, {}).items(), key=lambda gn: gene_index[gn[0]])
        if n
    ]
    paths = {name: os.path.join(out, name) for name in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz")}
    with pub.open(paths["matrix.mtx.gz"]) as f:
        f.write("%%MatrixMarket matrix coordinate integer general\n")
        f.write('%metadata_json: {"software_version": "bamflow", "format_version": 2}\n')
        f.write(f"{len(genes)} {len(cells)} {len(entries)}\n")
        f.writelines(f"{i} {j} {n}\n" for i, j, n in entries)
    pub.write_tsv(paths["barcodes.tsv.gz"], None, ((c,) for c in cells))
    pub.write_tsv(paths["features.tsv.gz"], None, ((g, names.get(g, g), "Gene Expression") for g in genes))
    return paths


def write_tsv(pub: Publication, path: str, counts: dict[str, dict[str, int]]) -> str:
    """umi_tools count --per-cell long format: gene, cell, count; sorted by gene then cell."""
    rows = sorted((g, c, n) for c, genes in counts.items() for g, n in genes.items() if n)
    return pub.write_tsv(path, ("gene", "cell", "count"), rows)


def write_h5ad(
    pub: Publication, path: str, genes: list[str], names: dict[str, str], cells: list[str],
    counts: dict[str, dict[str, int]],
) -> str | None:
    """cells × genes AnnData (CSR, int32), var: gene_ids, gene_names; None without anndata."""
    try:
        import anndata
        import numpy as np
        import pandas as pd
        import scipy.sparse as sp
    except ImportError:
        log.warning("count: anndata is not installed; not writing %s (pip install anndata)", path)
        return None
    gene_index = {g: i for i, g in enumerate(genes)}
    rows, cols, data = [], [], []
    for i, cell in enumerate(cells):
        for g, n in counts.get(cell, {}).items():
            if n:
                rows.append(i)
                cols.append(gene_index[g])
                data.append(n)
    x = sp.csr_matrix((np.asarray(data, dtype=np.int32), (rows, cols)), shape=(len(cells), len(genes)))
    adata = anndata.AnnData(
        X=x,
        obs=pd.DataFrame(index=pd.Index(cells, name="barcode")),
        var=pd.DataFrame({"gene_ids": genes, "gene_names": [names.get(g, g) for g in genes]}, index=pd.Index(genes, name="gene")),
    )
    adata.write_h5ad(pub.path(path))
    return path


def count(
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: str = "directional",
    gene_tag: str = "GX",
    name_tag: str | None = "GN",
    cell_tag: str = "CB",
    umi_tag: str = "UB",
    gene_filter: str | None = DEFAULT_GENE_FILTER,
    cells: Sequence[str] | str | os.PathLike[str] | None = None,
    min_umis: int | None = None,
    formats: Sequence[str] = FORMATS,
    workers: int = 2,
    threads: int = 2,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Count UMI molecules per gene and cell like ``umi_tools count --per-gene
    --per-cell --gene-tag=GX --extract-umi-method=tag --umi-tag=UB --cell-tag=CB``.

    A read counts for its (cell, gene) if it is mapped, not read 2, has the
    UMI, cell and gene tags, the gene is not empty and matches ``gene_filter``
    (a regex searched in the gene; the default skips featureCounts'
    ``__no_feature`` … and ``Unassigned_*``). Per (cell, gene) the UMIs are
    clustered with ``method``; the count is the number of clusters.
    ``cells`` (a list, or a file with one barcode a line, first column) fixes
    the columns (listed cells with no reads get zero columns); else
    ``min_umis`` keeps cells with at least that many molecules; else every
    cell seen. ``formats``: any of ``mtx``, ``tsv``, ``h5ad`` (skipped with a
    warning if anndata is missing). Returns ``{"reads_in", "counted",
    "dropped", "cells", "genes", "molecules", "outputs", "per_worker"}``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    input, out = os.fspath(input), os.fspath(out)
    os.makedirs(out, exist_ok=True)
    w = BamWorkflow("count", start_method=start_method)
    jobs = w.scatter(
        input,
        count_worker,
        workers=workers,
        distribute=by_cell(cell_tag),
        worker_kwargs=dict(
            method=method,
            umi_tag=umi_tag,
            cell_tag=cell_tag,
            gene_tag=gene_tag,
            name_tag=name_tag if name_tag != gene_tag else None,
            gene_filter=gene_filter,
        ),
        decode=DecodeOptions(threads),
        unassigned_worker=unassigned_worker,
        unassigned_kwargs=dict(umi=f"tag:{umi_tag}", cell_tag=cell_tag),
    )
    pub = Publication()
    with pub:
        w.run(timeout=timeout, on_progress=on_progress, publication=pub)
        stats = _count_outputs(pub, w, jobs, out, method, cells, min_umis, formats)
        pub.commit()
    log.info("count %s → %s: %s", input, out, {k: v for k, v in stats.items() if k != "per_worker"})
    return stats


def _count_outputs(
    pub: Publication, w: BamWorkflow, jobs: Any, out: str, method: str,
    cells: Sequence[str] | str | os.PathLike[str] | None, min_umis: int | None, formats: Sequence[str],
) -> dict[str, Any]:
    """Check the books, write the outputs into ``pub``; returns the stats."""
    reads_in, merged, per_worker = gather(w, jobs)
    counts: dict[str, dict[str, int]] = {str(c): g for c, g in merged.get("counts", {}).items()}
    names: dict[str, str] = {}  # per worker: merging would concatenate a name seen by two workers
    for r in per_worker:
        for g, name in r.get("names", {}).items():
            names.setdefault(g, name)
    dropped = dict(sorted(merged.get("dropped", {}).items()))
    counted = merged.get("counted", 0)
    if reads_in != counted + sum(dropped.values()):
        raise WorkflowError(f"reads do not add up: {reads_in} in, {counted} counted, dropped {dropped}")

    totals = {c: sum(g.values()) for c, g in counts.items()}
    if cells is not None:
        columns = _read_cells(cells)
    elif min_umis is not None:
        columns = sorted(c for c, t in totals.items() if t >= min_umis)
    else:
        columns = sorted(counts)
    selected = {c: counts.get(c, {}) for c in columns}
    genes = sorted({g for per_cell in counts.values() for g in per_cell})

    outputs: dict[str, str] = {}
    if "mtx" in formats:
        outputs.update(write_mtx(pub, out, genes, names, columns, selected))
    if "tsv" in formats:
        outputs["counts.tsv"] = write_tsv(pub, os.path.join(out, "counts.tsv"), selected)
    if "h5ad" in formats:
        path = write_h5ad(pub, os.path.join(out, "counts.h5ad"), genes, names, columns, selected)
        if path is not None:
            outputs["counts.h5ad"] = path
    stats = {
        "reads_in": reads_in,
        "counted": counted,
        "dropped": dropped,
        "cells": len(columns),
        "cells_seen": len(counts),
        "genes": len(genes),
        "molecules": sum(sum(g.values()) for g in selected.values()),
        "outputs": outputs,
        "method": method,
        "per_worker": [{k: v for k, v in r.items() if k not in ("counts", "names")} for r in per_worker],
    }
    return stats


__all__ = ["count", "count_worker", "write_mtx", "write_tsv", "write_h5ad"]
