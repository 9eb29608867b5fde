from collections.abc import Callable, Iterable
from typing import Any, TypedDict

from bamflow.kernels._records import ValueTable

class FilterStats(TypedDict):
    records_in: int
    kept: int
    dropped_not_listed: int
    dropped_missing_tag: int
    tags_seen: list[str]

class SplitStats(TypedDict):
    records: int
    missing_tag: int
    not_selected: int
    below_min_reads: int
    flushes: int
    tags_seen: list[str]
    outputs: list[tuple[int, bytes | None, int, bool]]

class Filter:
    def __init__(
        self, in_fd: int, out_fd: int, values: ValueTable, tags: Iterable[str | bytes], invert: bool = False, *,
        source: str = "", progress: memoryview | None = None, buffer_size: int = 1 << 20,
        out_buffer_size: int = 1 << 20,
    ) -> None: ...
    def run(self) -> FilterStats: ...

class Splitter:
    def __init__(
        self,
        in_fd: int,
        tags: Iterable[str | bytes],
        flush: Callable[[int, bytes | None, bytes], object],
        header: Callable[[bytes], object] | None = None,
        selected: ValueTable | None = None,
        *,
        flush_size: int = 1 << 16,
        memory_budget: int = 128 << 20,
        min_reads: int = 0,
        drop_below: bool = True,
        source: str = "",
        progress: memoryview | None = None,
        buffer_size: int = 1 << 20,
    ) -> None: ...
    def run(self) -> SplitStats: ...

def filter_records(
    in_fd: int, out_fd: int, values: ValueTable, tags: Iterable[str | bytes], invert: bool = False, **kwargs: Any
) -> FilterStats: ...
def split_records(
    in_fd: int,
    tags: Iterable[str | bytes],
    flush: Callable[[int, bytes | None, bytes], object],
    header: Callable[[bytes], object] | None = None,
    selected: ValueTable | None = None,
    **kwargs: Any,
) -> SplitStats: ...
