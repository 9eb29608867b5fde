from collections.abc import Iterable
from typing import Literal, TypedDict

class _DistributeStats(TypedDict):
    records: int
    per_output: list[int]
    dropped_missing_tag: int
    unassigned: int
    header_bytes: int
    bytes: int

class DistributeStats(_DistributeStats, total=False):
    values: dict[bytes, int]  # with count_values

class CollectStats(TypedDict):
    records: int
    per_input: list[int]
    header_bytes: int

CHUNK_END_NAME: bytes
CHUNK_END_RECORD: bytes

def split_header(data: bytes | bytearray | memoryview) -> int: ...
def distribute_bam(
    in_fd: int,
    out_fds: Iterable[int],
    *,
    by: Literal["name"] | Iterable[bytes | str] | None = None,
    chunk_size: int = 1000,
    missing: str = "error",
    unassigned_fd: int = -1,
    header_fd: int = -1,
    header_broadcast: bool = True,
    mark_chunks: bool = False,
    count_values: bool = False,
    progress: memoryview | None = None,
    buffer_size: int = 1 << 20,
    out_buffer_size: int = 1 << 16,
) -> DistributeStats: ...
def collect_bam(
    in_fds: Iterable[int],
    out_fd: int,
    *,
    order: str = "any",
    header_fd: int = -1,
    tag: bytes | str | None = None,
    buffer_size: int = 1 << 20,
    out_buffer_size: int = 1 << 20,
    read_ahead: int = 0,
    progress: memoryview | None = None,
) -> CollectStats: ...
def stable_hash(key: bytes) -> int: ...

class RecordCounter:
    records: int
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    def finish(self) -> int: ...
