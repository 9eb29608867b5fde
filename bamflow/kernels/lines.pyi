from collections.abc import Callable, Iterable
from typing import TypedDict

class DistributeStats(TypedDict):
    lines: int
    header_lines: int
    bytes: int
    per_output: list[int]

class CollectStats(TypedDict):
    lines: int
    header_lines: int
    per_input: list[int]
    out_of_turn: int

def distribute_lines(
    in_fd: int,
    out_fds: Iterable[int],
    *,
    chunk_size: int = 1,
    header_fd: int = -1,
    header_broadcast: bool = False,
    header_detect: Callable[[str], object] | None = None,
    header_prefix: bytes | None = None,
    key_field: int = -1,
    field_sep: bytes = b"\t",
    buffer_size: int = 1 << 20,
    out_buffer_size: int = 1 << 16,
) -> DistributeStats: ...
def collect_lines(
    in_fds: Iterable[int],
    out_fd: int,
    *,
    header_fd: int = -1,
    order: str = "any",
    chunk_size: int = 1,
    buffer_size: int = 1 << 20,
    out_buffer_size: int = 1 << 20,
    read_ahead: int = 32 << 20,
    stall_ms: int = 1000,
) -> CollectStats: ...
