from collections.abc import Mapping
from typing import Any

import numpy as np

METHODS: tuple[str, ...]
DROP_REASONS: tuple[str, ...]
MODES: tuple[str, ...]

def cluster_umis(counts: Mapping[bytes | str, int], method: str = "directional", threshold: int = 1) -> list[list[bytes]]: ...
def count_molecules(counts: Mapping[bytes | str, int], method: str = "directional", threshold: int = 1) -> int: ...
def mt_random_sequence(state: tuple[Any, ...], n: int) -> list[float]: ...
def mean_distances(umis: list[bytes], idx: np.ndarray) -> float: ...
def format_table(
    genes: list[bytes] | None, cells: list[bytes] | None, gene_idx: np.ndarray, cell_idx: np.ndarray | None,
    counts: np.ndarray, kind: str,
) -> bytes: ...

class Clusterer:
    positions: int
    total_umis: int
    max_umis: int
    def __init__(self, method: str = "directional", threshold: int = 1) -> None: ...

class UmiKernel:
    def __init__(
        self, in_fd: int, out_fd: int, config: dict[str, Any], *, tsv_fd: int = -1, source: str = "",
        progress: memoryview | None = None, buffer_size: int = 1 << 20, out_buffer_size: int = 1 << 20,
    ) -> None: ...
    def run(self) -> dict[str, Any]: ...

class CountTab:
    lines: int
    reads: int
    molecules: int
    def __init__(
        self, method: str = "directional", threshold: int = 1, sep: str | bytes = "_", per_cell: bool = False,
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> bytes: ...
    def finish(self) -> bytes: ...
