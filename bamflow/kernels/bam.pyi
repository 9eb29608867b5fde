from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bamflow.bam.options import CollectOptions, DistributeOptions

class _DistributeStats(TypedDict):
    records: int
    per_output: list[int]
    dropped_missing_tag: int
    unassigned: int
    header_bytes: int
    bytes: int
    tags_seen: list[str]

class DistributeStats(_DistributeStats, total=False):
    values: dict[bytes, int]  # with count_values

class CollectStats(TypedDict):
    records: int
    per_input: list[int]
    header_bytes: int

FRAME: bytes

class Distributor:
    def __init__(
        self,
        in_fd: int,
        out_fds: Iterable[int],
        options: DistributeOptions,
        *,
        unassigned_fd: int = -1,
        header_fd: int = -1,
        progress: memoryview | None = None,
        source: str = "",
        buffer_size: int = 1 << 20,
        out_buffer_size: int = 1 << 16,
    ) -> None: ...
    def run(self) -> DistributeStats: ...

class Collector:
    def __init__(
        self,
        in_fds: Iterable[int],
        out_fd: int,
        options: CollectOptions,
        *,
        header_fd: int = -1,
        progress: memoryview | None = None,
        buffer_size: int = 1 << 20,
        out_buffer_size: int = 1 << 20,
    ) -> None: ...
    def run(self) -> CollectStats: ...

class RecordChunks:
    records: int
    def __init__(
        self, fd: int, source: str = "", progress: memoryview | None = None, chunk_bytes: int = 1 << 20,
        buffer_size: int = 1 << 20,
    ) -> None: ...
    def header(self) -> bytes: ...
    def next_chunk(self) -> bytes: ...

def distribute_bam(in_fd: int, out_fds: Iterable[int], options: DistributeOptions, **kwargs: Any) -> DistributeStats: ...
def collect_bam(in_fds: Iterable[int], out_fd: int, options: CollectOptions, **kwargs: Any) -> CollectStats: ...
