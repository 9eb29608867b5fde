"""Live counters of running jobs, for progress displays.

Every job of a phase owns one slot of int64 counters in a small file that the
supervisor creates next to the phase's FIFOs; jobs (and their Cython kernels)
update their slot in place through ``mmap`` — a few stores per buffer of
data, never per record — and the supervisor reads all slots when it reports
progress. A file, not ``multiprocessing.shared_memory``, so that the fork and
spawn start methods behave the same and nothing outlives the run.
"""

from __future__ import annotations

import io
import mmap
import os
from dataclasses import dataclass

# slot layout: [0] records, [1] bytes read, [2] bytes written, [3] bytes waiting
# in the input pipe (backlog); the rest is room to grow
SLOT_WORDS = 8
SLOT_BYTES = SLOT_WORDS * 8


class JobCounters:
    """One job's counters; ``slot`` is the int64 memoryview the kernels write to."""

    def __init__(self, slot: memoryview) -> None:
        self.slot = slot

    @classmethod
    def detached(cls) -> JobCounters:
        """Counters nobody reads (a stage run outside a workflow)."""
        return cls(memoryview(bytearray(SLOT_BYTES)).cast("q"))

    @classmethod
    def attach(cls, path: str, index: int) -> JobCounters:
        fd = os.open(path, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        return cls(memoryview(mapped)[index * SLOT_BYTES : (index + 1) * SLOT_BYTES].cast("q"))


_current = JobCounters.detached()


def current() -> JobCounters:
    """The counters of the job this process runs (detached ones outside a workflow)."""
    return _current


def _attach_current(path: str, index: int) -> None:
    global _current
    _current = JobCounters.attach(path, index)


@dataclass
class JobProgress:
    """A snapshot of one job, as a progress display shows it."""

    job: str
    state: str  # "running", "done", "failed", "stopped"
    records: int
    bytes_in: int
    bytes_out: int
    backlog: int
    seconds: float


class CounterBoard:
    """The supervisor's side: creates the counter file and reads every slot."""

    def __init__(self, path: str, n_jobs: int) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(max(1, n_jobs) * SLOT_BYTES)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("q")

    def read(self, index: int) -> tuple[int, int, int, int]:
        base = index * SLOT_WORDS
        return self._view[base], self._view[base + 1], self._view[base + 2], self._view[base + 3]

    def close(self) -> None:
        self._view.release()
        self._map.close()


class CountingReader(io.RawIOBase):
    """A raw reader that adds the bytes it reads to the job's ``bytes_in``."""

    def __init__(self, raw: io.RawIOBase, counters: JobCounters) -> None:
        super().__init__()
        self._raw = raw
        self._slot = counters.slot
        self.name = getattr(raw, "name", "")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            self._slot[1] += n
        return n or 0

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            super().close()
