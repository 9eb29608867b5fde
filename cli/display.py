"""Live per-stage throughput for the command line (rich), or log lines.

The supervisor hands a snapshot of every job's counters about twice a
second; this turns successive snapshots into rates. On a terminal it draws
one row per stage and worker plus an overall bar; elsewhere (or with -q) it
writes a log line every few seconds. A final summary table follows the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from bamflow.engine.progress import JobProgress

MB = 1 << 20
LOG_EVERY = 5.0


@dataclass
class _Rate:
    records: float = 0.0
    bytes_in: float = 0.0


def _short(job: str) -> str:
    return job.split(".", 1)[-1]


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


class ProgressDisplay:
    """Callable for ``on_progress``; use as a context manager around the run.

    ``mode``: "live" (rich rows, refreshed on every snapshot), "log" (a line
    every few seconds) or "none". ``total_bytes`` (the input's size, if known)
    gives the overall percentage and ETA from the bytes the reader consumed.
    """

    def __init__(self, console: Console, mode: str, total_bytes: int | None, title: str) -> None:
        self.console = console
        self.mode = mode
        self.total_bytes = total_bytes
        self.title = title
        self.started = time.monotonic()
        self._previous: dict[str, tuple[float, JobProgress]] = {}
        self._rates: dict[str, _Rate] = {}
        self._last: list[JobProgress] = []
        self._last_log = self.started
        self._live: Live | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.mode == "live":
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(None, None, None)
            self._live = None
            self.console.print()

    def __call__(self, snapshot: list[JobProgress]) -> None:
        now = time.monotonic()
        for job in snapshot:
            before = self._previous.get(job.job)
            if before is not None and now > before[0]:
                dt = now - before[0]
                rate = self._rates.setdefault(job.job, _Rate())
                rate.records = (job.records - before[1].records) / dt
                rate.bytes_in = (job.bytes_in - before[1].bytes_in) / dt
            self._previous[job.job] = (now, job)
        self._last = snapshot
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
        elif self.mode == "log" and now - self._last_log >= LOG_EVERY:
            self._last_log = now
            self.console.print(self._log_line(), highlight=False, soft_wrap=True)

    # -- what is shown ---------------------------------------------------------------

    def _fraction(self) -> float | None:
        if not self.total_bytes or not self._last:
            return None
        consumed = self._last[0].bytes_in  # the first job reads the input
        return min(1.0, consumed / self.total_bytes)

    def _eta(self, fraction: float | None) -> str:
        elapsed = time.monotonic() - self.started
        if fraction is None or fraction <= 0.0:
            return "?"
        if fraction >= 1.0:
            return "0s"
        return f"{elapsed * (1 - fraction) / fraction:.0f}s"

    def _log_line(self) -> str:
        fraction = self._fraction()
        done = f"{fraction:.0%}" if fraction is not None else "?%"
        parts = [f"{self.title}: {done} after {time.monotonic() - self.started:.0f}s, ETA {self._eta(fraction)}"]
        for job in self._last:
            rate = self._rates.get(job.job, _Rate())
            if job.records or rate.records:
                parts.append(f"{_short(job.job)} {_human(job.records)} reads ({_human(rate.records)}/s)")
        return "; ".join(parts)

    def _render(self) -> Group:
        table = Table(title=self.title, title_justify="left", expand=False, pad_edge=False)
        for column, justify in (
            ("stage", "left"),
            ("state", "left"),
            ("records", "right"),
            ("records/s", "right"),
            ("MB/s", "right"),
            ("backlog MB", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        colours = {"running": "cyan", "done": "green", "failed": "bold red", "stopped": "yellow"}
        for job in self._last:
            running = job.state == "running"
            if running:  # the rate of the last interval
                rate = self._rates.get(job.job, _Rate())
            else:  # the average over the job's life
                rate = _Rate(job.records / job.seconds, job.bytes_in / job.seconds) if job.seconds > 0 else _Rate()
            table.add_row(
                _short(job.job),
                Text(job.state, style=colours.get(job.state, "")),
                _human(job.records) if job.records else "",
                _human(rate.records) if rate.records else "",
                f"{rate.bytes_in / MB:.1f}" if rate.bytes_in else "",
                f"{job.backlog / MB:.1f}" if running else "",
            )
        fraction = self._fraction()
        elapsed = time.monotonic() - self.started
        overall: Text | Group
        if fraction is None:
            overall = Text(f"{elapsed:.0f}s elapsed (input size unknown)")
        else:
            overall = Group(
                ProgressBar(total=1.0, completed=fraction, width=50),
                Text(f"{fraction:.0%}  {elapsed:.0f}s elapsed, ETA {self._eta(fraction)}"),
            )
        return Group(table, overall)


def summary_table(title: str, reads_in: int, written: dict[str, int], dropped: dict[str, int], seconds: float) -> Table:
    """The table printed after a run: where every read went."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("reads", justify="right")
    table.add_row("in", f"{reads_in:,}")
    total_written = sum(written.values())
    table.add_row("written", f"{total_written:,}")
    if len(written) <= 20:
        for name, count in written.items():
            table.add_row(f"  {name}", f"{count:,}")
    else:
        table.add_row(f"  ({len(written):,} outputs)", "")
    for reason, count in dropped.items():
        table.add_row(f"dropped: {reason}", f"{count:,}")
    table.add_row("time", f"{seconds:.2f} s")
    table.add_row("throughput", f"{reads_in / seconds / 1e6:.2f} M reads/s" if seconds > 0 else "")
    return table
