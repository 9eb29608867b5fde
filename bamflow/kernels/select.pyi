from collections.abc import Callable, Iterable
from typing import Any, TypedDict

class FilterStats(TypedDict):
    records_in: int
    kept: int
    dropped_not_listed: int
    dropped_missing_tag: int

class SplitStats(TypedDict):
    records: int
    missing_tag: int
    not_selected: int
    below_min_reads: int
    flushes: int
    outputs: list[tuple[int, bytes | None, int, bool]]

class ValueSet:
    def __init__(self, values: bytes | Iterable[bytes | str] | None = None, *, sep: bytes = b"\n") -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, value: bytes | str) -> bool: ...
    def add(self, value: bytes | str, out: int = -1) -> bool: ...
    def add_values(
        self, blob: bytes | bytearray | memoryview, sep: bytes = b"\n", out: int = -1,
        strip_cr: bool = True, skip_empty: bool = True,
    ) -> int: ...
    def output_of(self, value: bytes | str) -> int: ...
    def value_at(self, k: int) -> bytes: ...
    def values(self) -> list[bytes]: ...

def filter_records(
    in_fd: int, out_fd: int, values: ValueSet, tag: bytes | str | Iterable[bytes | str] = b"CB",
    invert: bool = False, *, buffer_size: int = 1 << 20, out_buffer_size: int = 1 << 20,
) -> dict[str, Any]: ...
def split_records(
    in_fd: int,
    tag: bytes | str | Iterable[bytes | str],
    flush: Callable[[int, bytes | None, bytes], object],
    header: Callable[[bytes], object] | None = None,
    selected: ValueSet | None = None,
    *,
    flush_size: int = 1 << 16,
    memory_budget: int = 128 << 20,
    min_reads: int = 0,
    drop_below: bool = True,
    buffer_size: int = 1 << 20,
) -> dict[str, Any]: ...
