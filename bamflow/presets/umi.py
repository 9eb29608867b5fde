"""UMI clustering: umi_tools' grouping methods, in plain Python.

``cluster_umis(counts, method)`` returns what
``umi_tools.network.UMIClusterer(cluster_method=method)(counts, threshold=1)``
returns: a list of groups (lists of UMIs), the group's representative
("top") UMI first. The UMIs of one group are one molecule; the number of
groups is the number of molecules.

Methods (edit distance = Hamming distance, at most ``threshold``, 1 by default):

- ``unique``: every UMI is its own group.
- ``percentile``: UMIs with a count above 1% of the median count are kept,
  each as its own group (the others are discarded, in no group).
- ``cluster``: connected components of the graph "Hamming distance <= 1".
- ``adjacency``: per component, the fewest highest-count UMIs whose
  neighbourhoods cover it lead groups: lead + its neighbours not yet taken.
- ``directional``: edge a → b when ``count(a) >= 2 * count(b) - 1``; from each
  UMI in decreasing count order (ties: the order of ``counts``), everything it
  reaches that no earlier group took.

The order of ``counts`` matters where umi_tools' does: equal counts are
visited in the order of the mapping (Python's stable sort), and a group's
members are ordered by count, ties alphabetically, exactly as umi_tools
orders them, so the representative UMI is the same.

The work per call is small (one position, or one gene of one cell); the
code aims at being clearly the same algorithm as umi_tools', not fast: it is
the reference the C kernel (bamflow.kernels.umi) is tested against.
UMIs of different lengths are never neighbours (umi_tools asserts that
all UMIs of a bundle have one length; here they simply do not join).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TypeVar

METHODS = ("unique", "percentile", "cluster", "adjacency", "directional")

U = TypeVar("U", str, bytes)  # a UMI


def hamming_neighbours(umis: Sequence[U], threshold: int = 1) -> dict[U, set[U]]:
    """Every UMI's neighbours at Hamming distance 1 to ``threshold`` (same length only)."""
    neighbours: dict[U, set[U]] = {u: set() for u in umis}
    n = len(umis)
    if n < 2 or threshold < 1:
        return neighbours
    if threshold > 1:  # compare all pairs
        for i in range(n):
            for j in range(i + 1, n):
                a, b = umis[i], umis[j]
                if len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) <= threshold:
                    neighbours[a].add(b)
                    neighbours[b].add(a)
        return neighbours
    length = len(umis[0])
    if n * n <= 8 * n * max(length, 1):
        # few UMIs: compare all pairs
        for i in range(n):
            a = umis[i]
            for j in range(i + 1, n):
                b = umis[j]
                if len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1:
                    neighbours[a].add(b)
                    neighbours[b].add(a)
        return neighbours
    # many UMIs: index each UMI under its one-position wildcards (u with position i masked)
    buckets: dict[tuple[int, int, object], list[U]] = {}
    for u in umis:
        for i in range(len(u)):
            buckets.setdefault((len(u), i, u[:i] + u[i + 1 :]), []).append(u)
    for members in buckets.values():
        if len(members) > 1:
            for a in members:
                neighbours[a].update(members)
    for u, nbrs in neighbours.items():
        nbrs.discard(u)
    return neighbours


def _reachable(start: U, edges: Mapping[U, set[U]]) -> set[U]:
    """Breadth-first search: every node reachable from ``start`` (itself included)."""
    seen = {start}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for other in edges[node]:
                if other not in seen:
                    seen.add(other)
                    nxt.append(other)
        frontier = nxt
    return seen


def _components(umis: list[U], edges: Mapping[U, set[U]], counts: Mapping[U, int]) -> list[list[U]]:
    """umi_tools' _get_connected_components_adjacency: start from each not yet
    found UMI in decreasing count order; each component sorted alphabetically.
    (With directed edges the "components" are reachable sets and may overlap.)"""
    found: set[U] = set()
    components = []
    for node in sorted(umis, key=lambda u: counts[u], reverse=True):
        if node not in found:
            component = sorted(_reachable(node, edges))
            found.update(component)
            components.append(component)
    return components


def _by_count(umis: list[U], counts: Mapping[U, int]) -> list[U]:
    return sorted(umis, key=lambda u: counts[u], reverse=True)


def cluster_umis(counts: Mapping[U, int], method: str = "directional", threshold: int = 1) -> list[list[U]]:
    """Group the UMIs of ``counts`` (UMI → reads) as umi_tools' UMIClusterer does
    with ``threshold`` (its --edit-distance-threshold); each group's
    representative UMI comes first."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    umis = list(counts)
    if not umis:
        return []
    if method == "unique":
        return [[u] for u in umis]
    if method == "percentile":
        if len(umis) == 1:
            return [umis]
        cutoff = statistics.median(counts.values()) / 100
        return [[u] for u in umis if counts[u] > cutoff]

    neighbours = hamming_neighbours(umis, threshold)
    if method == "directional":
        edges = {a: {b for b in nbrs if counts[a] >= 2 * counts[b] - 1} for a, nbrs in neighbours.items()}
        observed: set[U] = set()
        groups = []
        for component in _components(umis, edges, counts):
            group = [u for u in _by_count(component, counts) if u not in observed]
            observed.update(group)
            groups.append(group)
        return groups

    components = _components(umis, neighbours, counts)
    if method == "cluster":
        return [_by_count(c, counts) for c in components]

    # adjacency
    groups = []
    for component in components:
        if len(component) == 1:
            groups.append(component)
            continue
        ranked = _by_count(component, counts)
        members = set(component)
        leads: list[U] = []
        covered: set[U] = set()
        for u in ranked:  # the fewest top UMIs whose neighbourhoods cover the component
            leads.append(u)
            covered.add(u)
            covered.update(neighbours[u])
            if members <= covered:
                break
        taken = set(leads)
        for lead in leads:
            groups.append([lead] + sorted(neighbours[lead] - taken))
            taken.update(neighbours[lead])
    return groups


def count_molecules(counts: Mapping[U, int], method: str = "directional", threshold: int = 1) -> int:
    """The number of UMI groups (molecules) among ``counts``."""
    return len(cluster_umis(counts, method, threshold))
