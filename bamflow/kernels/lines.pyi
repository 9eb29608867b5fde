from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from bamflow.engine.lines import LineCollectOptions, LineDistributeOptions

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

class LineDistributor:
    def __init__(
        self,
        in_fd: int,
        out_fds: Iterable[int],
        options: LineDistributeOptions,
        *,
        header_fd: int = -1,
        buffer_size: int = 1 << 20,
        out_buffer_size: int = 1 << 16,
    ) -> None: ...
    def run(self) -> DistributeStats: ...

class LineCollector:
    def __init__(
        self,
        in_fds: Iterable[int],
        out_fd: int,
        options: LineCollectOptions,
        *,
        header_fd: int = -1,
        buffer_size: int = 1 << 20,
        out_buffer_size: int = 1 << 20,
        read_ahead: int = 32 << 20,
        stall_ms: int = 1000,
    ) -> None: ...
    def run(self) -> CollectStats: ...

# the one-call forms: LineDistributor(...).run() and LineCollector(...).run()
def distribute_lines(in_fd: int, out_fds: Iterable[int], options: LineDistributeOptions, **kwargs: Any) -> DistributeStats: ...
def collect_lines(in_fds: Iterable[int], out_fd: int, options: LineCollectOptions, **kwargs: Any) -> CollectStats: ...
