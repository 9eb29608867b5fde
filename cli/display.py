"""What a run shows while it runs and when it ends: a live view on a terminal,
short log lines elsewhere, or one JSON object a line (``--progress json``).

The supervisor hands a :class:`~bamflow.engine.progress.Snapshot` about twice
a second: every job's counters, CPU use and what it waits for, and which
stage is the bottleneck. :class:`Board` turns successive snapshots into rates
per job and per stage (a stage: the jobs of one kind, ``worker`` for
``worker0`` … ``worker31``), the overall fraction done and the ETA;
:class:`ProgressDisplay` draws them.

The live view fits the terminal: one line for the bar and ETA (always the
first line, so it is never cut off), a table, one line naming the bottleneck.
When every job cannot have its own row, the largest stages fold into one row
each, with the min / median / max of their jobs' rates.
"""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from bamflow.engine.progress import CPU, INPUT, OTHER, OUTPUT, WORKING, JobProgress, stage_of

MB = 1 << 20
LOG_EVERY = 5.0  # seconds between two log lines
JSON_EVERY = 1.0  # seconds between two JSON progress objects
RATE_WINDOW = 2.0  # seconds over which the live rates are measured
LOG_WIDTH = 160  # a log line is at most this long
WIDE = 100  # terminals at least this wide get the wait columns

STATE_STYLE = {"done": "green", "failed": "bold red", "stopped": "yellow", "stalled": "bold red"}
ACTIVITY_TEXT = {
    WORKING: "working",
    CPU: "needs CPU",  # ready to run, no core free: the machine is the limit
    INPUT: "← input",
    OUTPUT: "output →",
    OTHER: "waiting",
    "stalled": "stalled",
}
JSON_STATE = {CPU: "waiting_cpu", INPUT: "waiting_input", OUTPUT: "waiting_output", OTHER: "waiting"}
STARVED = 0.25  # jobs waiting this share of their time for a core: the machine has too few


def human(n: float) -> str:
    """1234 → 1.2k; 0 → 0."""
    for unit in ("", "k", "M", "G"):
        if abs(n) < 999.95:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _short(job: str) -> str:
    return job.split(".", 1)[-1]


# -- the numbers ----------------------------------------------------------------------------


@dataclass
class JobView:
    """One job as shown: its latest snapshot row and rates."""

    row: JobProgress
    records_per_s: float = 0.0
    bytes_per_s: float = 0.0
    history: deque = field(default_factory=deque)  # (time, records, bytes_in)

    @property
    def name(self) -> str:
        return _short(self.row.job)

    @property
    def stage(self) -> str:
        return self.row.stage or stage_of(self.row.job)

    @property
    def activity(self) -> str:
        if self.row.state != "running":
            return self.row.state
        return self.row.activity or "running"


@dataclass
class StageView:
    """The jobs of one stage, together."""

    name: str
    jobs: list[JobView]
    bottleneck: bool = False

    @property
    def label(self) -> str:
        """A one-job stage by its job's name (as errors and ps name it), else "worker ×8"."""
        return self.jobs[0].name if len(self.jobs) == 1 else f"{self.name} ×{len(self.jobs)}"

    @property
    def records(self) -> int:
        return sum(j.row.records for j in self.jobs)

    @property
    def bytes_in(self) -> int:
        return sum(j.row.bytes_in for j in self.jobs)

    @property
    def records_per_s(self) -> float:
        return sum(j.records_per_s for j in self.jobs)

    @property
    def bytes_per_s(self) -> float:
        return sum(j.bytes_per_s for j in self.jobs)

    @property
    def cpu(self) -> float | None:
        known = [j.row.cpu for j in self.jobs if j.row.cpu is not None]
        return sum(known) if known else None

    @property
    def estimated(self) -> bool:
        return any(j.row.estimated_records for j in self.jobs)

    @property
    def state(self) -> str:
        """The most common state (for running jobs: what they do)."""
        states = [j.activity for j in self.jobs]
        if "stalled" in states:
            return "stalled"
        if "failed" in states:
            return "failed"
        return max(dict.fromkeys(states), key=states.count)

    def share(self, what: str) -> float | None:
        """The mean share of its jobs' time in ``what`` ("working", "waiting_cpu", …)."""
        values = [getattr(j.row, what) for j in self.jobs if getattr(j.row, what) is not None]
        return statistics.mean(values) if values else None

    def busy(self) -> float | None:
        """The busiest job's share of time working or ready to work (waiting for a core)."""
        values = [(j.row.working or 0.0) + (j.row.waiting_cpu or 0.0) for j in self.jobs if j.row.working is not None]
        return max(values) if values else None

    def spread(self, per_second: bool = True) -> tuple[float, float, float]:
        values = [j.records_per_s if per_second else j.row.records for j in self.jobs]
        return min(values), statistics.median(values), max(values)


class Board:
    """Every job seen so far (all phases of the run), their rates, the fraction
    done and the ETA, and how long each stage was the bottleneck."""

    def __init__(self, total_bytes: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_bytes = total_bytes
        self.clock = clock
        self.started = clock()
        self.jobs: dict[str, JobView] = {}
        self.bottleneck: str | None = None
        self.bottleneck_seconds: dict[str, float] = {}
        self.sampler_seconds: dict[int, float] = {}  # per phase (a snapshot list's identity is not kept: by order)
        self._phase_sampler = 0.0
        self._last_update: float | None = None
        self._progress_since: float | None = None

    def update(self, snapshot: Sequence[JobProgress]) -> None:
        now = self.clock()
        if self._last_update is not None and self.bottleneck is not None:
            self.bottleneck_seconds[self.bottleneck] = self.bottleneck_seconds.get(self.bottleneck, 0.0) + now - self._last_update
        self._last_update = now
        for row in snapshot:
            view = self.jobs.get(row.job)
            if view is None:
                view = self.jobs[row.job] = JobView(row)
            view.row = row
            history = view.history
            history.append((now, row.records, row.bytes_in))
            while len(history) > 2 and now - history[1][0] >= RATE_WINDOW:
                history.popleft()
            if row.state != "running":  # the average over its life
                view.records_per_s = row.records / row.seconds if row.seconds > 0 else 0.0
                view.bytes_per_s = row.bytes_in / row.seconds if row.seconds > 0 else 0.0
            elif len(history) >= 2 and now > history[0][0]:
                dt = now - history[0][0]
                view.records_per_s = max(0.0, (row.records - history[0][1]) / dt)
                view.bytes_per_s = max(0.0, (row.bytes_in - history[0][2]) / dt)
        self.bottleneck = getattr(snapshot, "bottleneck", None)
        sampler = getattr(snapshot, "sampler_seconds", 0.0)
        if sampler < self._phase_sampler:  # a new phase: its supervisor starts from 0
            self.sampler_seconds[len(self.sampler_seconds)] = self._phase_sampler
        self._phase_sampler = sampler
        if self._progress_since is None and any(j.row.bytes_in or j.row.records for j in self.jobs.values()):
            self._progress_since = now

    @property
    def sampler_total(self) -> float:
        return sum(self.sampler_seconds.values()) + self._phase_sampler

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def stages(self) -> list[StageView]:
        groups: dict[str, list[JobView]] = {}
        for view in self.jobs.values():
            groups.setdefault(view.stage, []).append(view)
        return [StageView(name, views, bottleneck=name == self.bottleneck) for name, views in groups.items()]

    def running(self) -> bool:
        return any(v.row.state == "running" for v in self.jobs.values())

    # -- how far along ---------------------------------------------------------------------

    def fraction(self) -> float | None:
        """The share of the input the pipeline has worked through: the input the
        first job consumed, less what is still inside the pipeline (the records
        the first counting stage has passed on that the jobs after it have not
        read yet). None when the input's size is not known (stdin)."""
        if not self.total_bytes or not self.jobs:
            return None
        rows = [v.row for v in self.jobs.values()]
        by_name = {r.job: r for r in rows}
        linked = any(r.upstream for r in rows)
        sources = [r for r in rows if not r.upstream] if linked else rows[:1]  # no links known: the first job reads
        consumed = sum(r.bytes_in for r in sources) if sources else rows[0].bytes_in
        fraction = min(1.0, consumed / self.total_bytes)
        source_names = {r.job for r in sources}
        first = next((r for r in rows if r.upstream and set(r.upstream) <= source_names and r.records
                      and not r.estimated_records), None)
        if first is not None:
            after = [r for r in rows if r.upstream == (first.job,)]
            if after and all(r.job in by_name for r in after):
                fraction *= min(1.0, sum(r.records for r in after) / first.records)
        if not self.running() and all(r.state == "done" for r in rows):
            return 1.0
        return fraction

    def eta_seconds(self, fraction: float | None) -> float | None:
        """Seconds left at the pace since the first record or byte moved; None when
        unknown (no input size, too early, or past the last read while jobs still work)."""
        if fraction is None:
            return None
        if fraction >= 0.999:
            return None if self.running() else 0.0
        if self._progress_since is None:
            return None
        spent = self.clock() - self._progress_since
        if fraction <= 0.0 or spent < 1.0:
            return None
        return spent * (1 - fraction) / fraction

    def eta(self, fraction: float | None) -> str:
        seconds = self.eta_seconds(fraction)
        if seconds is not None:
            return duration(seconds)
        return "finishing" if fraction is not None and fraction >= 0.999 else "?"

    # -- the bottleneck ---------------------------------------------------------------------

    def bottleneck_text(self, final: bool = False, short: bool = False) -> str:
        """One sentence: which stage limits the run, and who waits for it (``short``:
        only which, for log lines)."""
        stalled = [v for v in self.jobs.values() if v.row.activity == "stalled" and v.row.state == "running"]
        if stalled and not final:
            names = ", ".join(f"{v.name} ({duration(v.row.stalled)})" for v in stalled[:3])
            return f"stalled, no progress: {names}"
        if final:
            if not self.bottleneck_seconds:
                return "bottleneck: none stood out"
            stage = max(self.bottleneck_seconds, key=lambda s: self.bottleneck_seconds[s])
            share = self.bottleneck_seconds[stage] / max(self.elapsed, 1e-9)
            view = next((s for s in self.stages() if s.name == stage), None)
            busy = view.busy() if view else None
            what = f", busy {busy:.0%} of its time" if busy is not None else ""
            return f"bottleneck: {self._label(stage)} ({share:.0%} of the run{what})" + self._starved()
        if self.bottleneck is None:
            return ("bottleneck: none stands out" + self._starved()) if self.running() else ""
        stage = next(s for s in self.stages() if s.name == self.bottleneck)
        busy = stage.busy()
        text = f"bottleneck: {stage.label}" + (f" (busy {busy:.0%})" if busy is not None else "")
        if short:
            return text
        waiter = self._waiter(stage)
        if waiter is not None:
            view, share, direction = waiter
            text += f"; {view.name} waits to {direction} {share:.0%} of the time"
        return text + self._starved()

    def _starved(self) -> str:
        """A note when a stage waits for a free CPU core much of its time: then the
        machine (more busy processes than cores), not the stage's code, is the limit."""
        shares = {s.label: s.share("waiting_cpu") or 0.0 for s in self.stages()}
        if not shares:
            return ""
        label = max(shares, key=lambda k: shares[k])
        if shares[label] < STARVED:
            return ""
        return f"; {label} waits for a free CPU core {shares[label]:.0%} of the time (the machine is busy)"

    def _label(self, stage: str) -> str:
        jobs = [v for v in self.jobs.values() if v.stage == stage]
        return jobs[0].name if len(jobs) == 1 else f"{stage} ×{len(jobs)}"

    def _waiter(self, stage: StageView) -> tuple[JobView, float, str] | None:
        members = {v.row.job for v in stage.jobs}
        best = None
        for view in self.jobs.values():
            row = view.row
            if row.job in members or row.state != "running" or row.waits_on not in members:
                continue
            if (row.waiting_output or 0) >= (row.waiting_input or 0):
                share, direction = row.waiting_output or 0.0, "write"
            else:
                share, direction = row.waiting_input or 0.0, "read"
            if best is None or share > best[1]:
                best = (view, share, direction)
        return best


# -- the live view --------------------------------------------------------------------------


def _cpu(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}%"


def _rate_cells(records_per_s: float, bytes_per_s: float) -> tuple[str, str]:
    return (human(records_per_s) if records_per_s else "", f"{bytes_per_s / MB:.1f}" if bytes_per_s else "")


def _state_text(state: str, stalled: float = 0.0) -> Text:
    text = ACTIVITY_TEXT.get(state, state)
    if state == "stalled" and stalled:
        text = f"stalled {duration(stalled)}"
    return Text(text, style=STATE_STYLE.get(state, "cyan" if state in (WORKING, "running") else ""))


def _waits(row_in: float | None, row_out: float | None, cpu: float | None = None) -> str:
    if row_in is None and row_out is None:
        return ""
    text = f"in {row_in or 0:.0%} out {row_out or 0:.0%}"
    return text + (f" cpu {cpu:.0%}" if cpu else "")


def layout_rows(stages: list[StageView], room: int) -> list[StageView | JobView]:
    """One row per job if they fit in ``room`` rows; else the largest stages fold
    into one row each until they do (then the rest is cut, with a last row
    saying how many stages are not shown)."""
    folded: set[str] = set()
    by_size = sorted((s for s in stages if len(s.jobs) > 1), key=lambda s: -len(s.jobs))

    def count() -> int:
        return sum(1 if s.name in folded else len(s.jobs) for s in stages)

    for stage in by_size:
        if count() <= room:
            break
        folded.add(stage.name)
    rows: list[StageView | JobView] = []
    for stage in stages:
        if stage.name in folded or len(stage.jobs) == 1:
            rows.append(stage)
        else:
            rows.extend(stage.jobs)
    return rows


def _grid(header: list[str], rows: list[list[Text]], right: set[int], width: int, shrink: Sequence[int]) -> list[Text]:
    """Rows as lines of fixed-width columns, one space apart, at most ``width``
    wide: the ``shrink`` columns are cut (with …) first, then the last columns
    dropped. Plain text assembly, so that a frame costs little (rich's Table
    measures every cell: ten times the time)."""
    cells = [[Text(h, style="bold") for h in header]] + rows
    widths = [max(cell[i].cell_len for cell in cells) for i in range(len(header))]
    for i in shrink:
        excess = sum(widths) + len(widths) - 1 - width
        if excess <= 0:
            break
        widths[i] = max(len(header[i]), widths[i] - excess, 4)
    while len(widths) > 1 and sum(widths) + len(widths) - 1 > width:
        widths.pop()
    lines = []
    for n, cell in enumerate(cells):
        line = Text(no_wrap=True, overflow="ellipsis")
        for i, w in enumerate(widths):
            text = cell[i].copy()
            if text.cell_len > w:
                text.truncate(w, overflow="ellipsis")
            pad = " " * (w - text.cell_len)
            if i:
                line.append(" ")
            if i in right:
                line.append(pad)
                line.append_text(text)
            else:
                line.append_text(text)
                line.append(pad)
        line.rstrip()
        lines.append(line)
        if n == 0:
            lines.append(Text("─" * min(width, sum(widths) + len(widths) - 1)))
    return lines


def _row_cells(r: StageView | JobView, wide: bool, spread: bool) -> list[Text]:
    if isinstance(r, StageView):
        bottleneck, label, estimated = r.bottleneck, r.label, r.estimated
        state = _state_text(r.state, max((j.row.stalled for j in r.jobs), default=0.0))
        records, rates, cpu = r.records, _rate_cells(r.records_per_s, r.bytes_per_s), r.cpu
        waits = _waits(r.share("waiting_input"), r.share("waiting_output"), r.share("waiting_cpu"))
        waits_for = _short(r.jobs[0].row.waits_on) if len(r.jobs) == 1 else ""
        span = "/".join(human(v) for v in r.spread()) if len(r.jobs) > 1 else ""
    else:
        row = r.row
        bottleneck, label, estimated = row.bottleneck, r.name, row.estimated_records
        state = _state_text(r.activity, row.stalled)
        records, rates, cpu = row.records, _rate_cells(r.records_per_s, r.bytes_per_s), row.cpu
        waits = _waits(row.waiting_input, row.waiting_output, row.waiting_cpu)
        waits_for, span = _short(row.waits_on), ""
    cells = [
        Text(("▶ " if bottleneck else "") + label, style="bold yellow" if bottleneck else ""),
        state,
        Text(("~" if estimated else "") + human(records) if records else ""),
        Text(rates[0]),
        Text(rates[1]),
        Text(_cpu(cpu)),
    ]
    if wide:
        cells += [Text(waits), Text(waits_for)]
    if spread:
        cells.append(Text(span))
    return cells


def render_live(board: Board, title: str, width: int, height: int) -> Group:
    """The live view for a terminal of ``width`` × ``height``: the bar and ETA
    first, a row per job (or per stage, folded to fit), the bottleneck last."""
    fraction = board.fraction()
    elapsed = duration(board.elapsed)
    top = Table.grid(padding=(0, 1), expand=True)
    top.add_column(no_wrap=True)
    if fraction is None:
        top.add_column(no_wrap=True, justify="right", ratio=1)
        top.add_row(Text(title, style="bold"), Text(f"{elapsed} elapsed (input size unknown)"))
    else:
        top.add_column(ratio=1)
        top.add_column(no_wrap=True, justify="right")
        top.add_row(Text(title, style="bold"), ProgressBar(total=1.0, completed=fraction),
                    Text(f"{fraction:>4.0%} {elapsed} ETA {board.eta(fraction)}"))
    room = max(1, height - 5)  # the bar, the table header and its rule, the bottleneck line, the cursor line
    rows = layout_rows(board.stages(), room)
    wide = width >= WIDE
    spread = any(isinstance(r, StageView) and len(r.jobs) > 1 for r in rows)
    header = ["stage", "state", "records", "rec/s", "MB/s", "CPU"]
    if wide:
        header += ["waits", "waits for"]
    if spread:
        header.append("rec/s min/med/max")
    shown = rows if len(rows) <= room else rows[: room - 1]
    cells = [_row_cells(r, wide, spread) for r in shown]
    if len(rows) > room:
        cells.append([Text(f"… {len(rows) - len(shown)} more", style="dim")] + [Text("")] * (len(header) - 1))
    shrink = [0, 1] + ([7, 6] if wide else [])
    lines = _grid(header, cells, right={2, 3, 4, 5}, width=width, shrink=shrink)
    text = board.bottleneck_text()
    spare = room - len(cells)  # a long sentence takes a second line when there is one
    style = "bold red" if text.startswith("stalled") else "yellow"
    wrapped = textwrap.wrap(text, width) or [""]
    status = [Text(line, style=style) for line in wrapped[: 1 + (spare > 0)]]
    if len(wrapped) > len(status):
        status[-1].truncate(width - 1)
        status[-1].append("…")
    return Group(top, *lines, *status)


def log_line(board: Board, title: str) -> str:
    """A short line for a log (not a terminal): done, ETA, reads, the bottleneck,
    then the stages as long as the line stays within LOG_WIDTH."""
    fraction = board.fraction()
    done = f"{fraction:.0%}" if fraction is not None else "?%"
    head = f"{title}: {done} {duration(board.elapsed)} ETA {board.eta(fraction)}"
    stages = board.stages()
    counting = next((s for s in stages if s.records and not s.estimated), None)
    if counting is not None:
        head += f" | {human(counting.records)} reads {human(counting.records_per_s)}/s"
    bottleneck = board.bottleneck_text(short=True)
    parts = [head] + ([bottleneck] if bottleneck else [])
    line = " | ".join(parts)
    for stage in stages:
        piece = f"{stage.label} {human(stage.records_per_s)}/s" + (f" {_cpu(stage.cpu)}" if stage.cpu is not None else "")
        if len(line) + len(piece) + 3 > LOG_WIDTH:
            break
        line += (" | " if line == " | ".join(parts) else ", ") + piece
    return line if len(line) <= LOG_WIDTH else line[: LOG_WIDTH - 1] + "…"


def stage_dicts(board: Board, whole_run: bool = False) -> list[dict[str, Any]]:
    """Per stage, for JSON: name, jobs, state, records, bytes, rates, CPU, shares."""
    out = []
    for stage in board.stages():
        def share(what: str, stage: StageView = stage) -> float | None:
            value = stage.share(what)
            return None if value is None else round(value, 3)

        out.append({
            "name": stage.name,
            "jobs": len(stage.jobs),
            "state": JSON_STATE.get(stage.state, stage.state),
            "records": stage.records,
            "records_estimated": stage.estimated,
            "bytes": stage.bytes_in,
            "records_per_s": round(stage.records_per_s, 1),
            "mb_per_s": round(stage.bytes_per_s / MB, 3),
            "cpu": None if stage.cpu is None else round(stage.cpu, 1),
            "cpu_seconds": round(sum(j.row.cpu_seconds or 0.0 for j in stage.jobs), 3),
            "working": share("working"),
            "waiting_cpu": share("waiting_cpu"),
            "waiting_input": share("waiting_input"),
            "waiting_output": share("waiting_output"),
            "stalled": stage.state == "stalled",
            "bottleneck": stage.bottleneck and not whole_run,
        })
    return out


D = TypeVar("D", bound="LiveDisplay")


class LiveDisplay:
    """What the displays share: ``on_progress`` around a run in one of four modes.

    ``mode``: "live" (redrawn on every update), "log" (a short line every few
    seconds), "json" (an object a line, about once a second) or "none".
    Subclasses turn what ``on_progress`` gets into a state and say how a state
    looks: :meth:`render` (live), :meth:`line` (log), :meth:`progress_object`
    (json).
    """

    json_at_exit = False  # also write the last state's object when the run ends

    def __init__(self, console: Console, mode: str, title: str, clock: Callable[[], float]) -> None:
        self.console = console
        self.mode = mode
        self.title = title
        self.clock = clock
        self._last_line = clock()
        self._live: Live | None = None
        self._latest: Any = None

    def __enter__(self: D) -> D:
        if self.mode == "live":
            self._live = Live(console=self.console, auto_refresh=False, transient=False, vertical_overflow="crop")
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            if self._latest is not None:
                self._live.update(self.render(self._latest), refresh=True)
            self._live.__exit__(None, None, None)
            self._live = None
        elif self.mode == "json" and self.json_at_exit and self._latest is not None:  # however short the run
            self.emit(self.progress_object(self._latest))

    def show(self, state: Any) -> None:
        """Show ``state`` as the mode says (log and json lines at most every few seconds)."""
        self._latest = state
        now = self.clock()
        if self._live is not None:
            self._live.update(self.render(state), refresh=True)
        elif self.mode == "log" and now - self._last_line >= LOG_EVERY:
            self._last_line = now
            self.console.print(self.line(state), highlight=False, soft_wrap=True, markup=False)
        elif self.mode == "json" and now - self._last_line >= JSON_EVERY:
            self._last_line = now
            self.emit(self.progress_object(state))

    def emit(self, obj: dict[str, Any]) -> None:
        self.console.file.write(json.dumps(obj, default=str) + "\n")
        self.console.file.flush()

    def render(self, state: Any) -> RenderableType:
        raise NotImplementedError

    def line(self, state: Any) -> str:
        raise NotImplementedError

    def progress_object(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError


class ProgressDisplay(LiveDisplay):
    """``on_progress`` of a run on this machine (its jobs' snapshots); use as
    a context manager around the run. ``total_bytes`` (the input's size, if
    known) gives the fraction and ETA. Modes as :class:`LiveDisplay`."""

    def __init__(self, console: Console, mode: str, total_bytes: int | None, title: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(console, mode, title, clock)
        self.board = Board(total_bytes, clock)
        self._last_line = self.board.started
        self._latest = self.board

    @property
    def started(self) -> float:
        return self.board.started

    def __call__(self, snapshot: Sequence[JobProgress]) -> None:
        self.board.update(snapshot)
        self.show(self.board)

    def render(self, board: Board) -> RenderableType:
        width, height = self.console.size
        return render_live(board, self.title, width, height)

    def line(self, board: Board) -> str:
        return log_line(board, self.title)

    def progress_object(self, board: Board) -> dict[str, Any]:
        fraction = board.fraction()
        eta = board.eta_seconds(fraction)
        return {
            "event": "progress",
            "command": self.title,
            "elapsed": round(board.elapsed, 3),
            "fraction": None if fraction is None else round(fraction, 4),
            "eta": None if eta is None else round(eta, 1),
            "bottleneck": board.bottleneck,
            "stages": stage_dicts(board),
        }


# -- a run on a Dask cluster ------------------------------------------------------------------


class ClusterDisplay(LiveDisplay):
    """``on_progress`` of a run on a Dask cluster (a
    :class:`bamflow.distributed.ClusterProgress`): per phase the tasks done,
    running and failed; per Dask worker its throughput. Modes as
    :class:`LiveDisplay`."""

    board = None  # (no stages of one machine to summarise)
    json_at_exit = True

    def __init__(self, console: Console, mode: str, title: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(console, mode, title, clock)

    def __call__(self, progress: Any) -> None:
        self.show(progress)

    def line(self, progress: Any) -> str:
        """One short log line: the phase running, its tasks, the workers' rate."""
        phase = next((p for p in progress.phases if p.name == progress.phase), None)
        tasks = "" if phase is None else f" {phase.done}/{phase.total} tasks done, {phase.running} running, {phase.failed} failed"
        rate = sum(w.records_per_second for w in progress.workers)
        return textwrap.shorten(f"{self.title} [{progress.elapsed:.0f} s] {progress.phase}:{tasks}; "
                                f"{len(progress.workers)} workers, {human(rate)} records/s", LOG_WIDTH)

    def render(self, progress: Any) -> RenderableType:
        phases = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("phase", "state", "done", "running", "failed", "waiting", "records", "s"):
            phases.add_column(column, justify="left" if column in ("phase", "state") else "right")
        for p in progress.phases:
            phases.add_row(p.name, p.state, str(p.done), str(p.running), str(p.failed), str(p.waiting),
                           human(p.records), f"{p.seconds:.0f}")
        workers = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("worker", "running", "done", "records", "records/s"):
            workers.add_column(column, justify="left" if column == "worker" else "right")
        for w in progress.workers:
            workers.add_row(f"{w.host} {w.worker.rsplit(':', 1)[-1]}", str(w.running), str(w.done), human(w.records),
                            human(w.records_per_second))
        head = Text(f"{self.title} on a cluster: {progress.phase}, {progress.elapsed:.0f} s"
                    + (f" — dashboard {progress.dashboard}" if progress.dashboard else ""), style="bold")
        return Group(head, phases, workers)

    def progress_object(self, progress: Any) -> dict[str, Any]:
        return {
            "event": "progress",
            "command": self.title,
            "elapsed": round(progress.elapsed, 3),
            "phase": progress.phase,
            "phases": [{"name": p.name, "state": p.state, "total": p.total, "done": p.done, "running": p.running,
                        "failed": p.failed, "records": p.records} for p in progress.phases],
            "workers": [{"worker": w.worker, "host": w.host, "running": w.running, "done": w.done,
                         "records": w.records, "records_per_second": round(w.records_per_second, 1)}
                        for w in progress.workers],
        }


# -- after the run --------------------------------------------------------------------------


PERCENT_WORDS = ("fraction", "saturation", "rate")  # key numbers named so are shares: shown as percentages


def key_number(name: str, value: Any) -> str:
    """A key number as a person reads it: 1,234 · 58.9% (a share, by its name) · 12.3."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if any(word in name for word in PERCENT_WORDS):
        return f"{value:.1%}"
    if isinstance(value, int) or value == int(value):
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"


def summary_title(title: str, reads_in: int, seconds: float) -> Text:
    rate = f", {human(reads_in / seconds)} reads/s" if seconds > 0 else ""
    return Text(f"{title}: done in {seconds:.1f} s{rate}", style="bold")


def summary_table(title: str, reads_in: int, written: dict[str, int], dropped: dict[str, int], seconds: float,
                  key_numbers: dict[str, Any] | None = None) -> Table:
    """Where every read went, and the command's own key numbers."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("reads")
    table.add_column("", justify="right")
    table.add_row("in", f"{reads_in:,}")
    total_written = sum(written.values())
    table.add_row("written", f"{total_written:,}")
    if 1 < len(written) <= 8:
        for name, count in written.items():
            table.add_row(f"  {name}", f"{count:,}")
    elif len(written) > 8:
        table.add_row(f"  ({len(written):,} outputs)", "")
    elif written:
        name = next(iter(written))
        if name and name != "-":
            table.add_row(f"  {name}", "")
    for reason, count in dropped.items():
        table.add_row(f"dropped: {reason}", f"{count:,}")
    for name, value in (key_numbers or {}).items():
        table.add_row(name.replace("_", " "), key_number(name, value))
    return table


def stage_table(board: Board) -> Table | None:
    """Per stage over the whole run: records, rate, CPU, and how its time went."""
    stages = board.stages()
    if not stages:
        return None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("stage", no_wrap=True, overflow="ellipsis", max_width=18)
    table.add_column("records", justify="right", no_wrap=True)
    table.add_column("rec/s", justify="right", no_wrap=True)
    table.add_column("MB/s", justify="right", no_wrap=True)
    table.add_column("CPU", justify="right", no_wrap=True)
    table.add_column("busy", justify="right", no_wrap=True)
    table.add_column("waits in/out", justify="right", no_wrap=True)
    stage_time = {name: seconds for name, seconds in board.bottleneck_seconds.items()}
    final = max(stage_time, key=lambda s: stage_time[s]) if stage_time else None
    for stage in stages:
        working = stage.busy()
        wait_in, wait_out = stage.share("waiting_input"), stage.share("waiting_output")
        marker = "▶ " if stage.name == final else ""
        table.add_row(
            Text(marker + stage.label, style="bold yellow" if marker else ""),
            ("~" if stage.estimated else "") + f"{stage.records:,}" if stage.records else "",
            human(stage.records_per_s) if stage.records_per_s else "",
            f"{stage.bytes_per_s / MB:.1f}" if stage.bytes_per_s else "",
            _cpu(stage.cpu),
            "" if working is None else f"{working:.0%}",
            "" if wait_in is None else f"{wait_in:.0%}/{(wait_out or 0):.0%}",
        )
    return table


def print_final(console: Console, board: Board | None, title: Text, table: Table) -> None:
    """The summary after a run (terminal or log): reads, key numbers, stages, bottleneck."""
    console.print(title)
    console.print(table)
    if board is None:
        return
    stages = stage_table(board)
    if stages is not None and board.jobs:
        console.print(stages)
        console.print(Text(board.bottleneck_text(final=True), style="yellow"), soft_wrap=True)


def quiet_line(title: str, reads_in: int, written: dict[str, int], dropped: dict[str, int], seconds: float,
               key_numbers: dict[str, Any] | None, bottleneck: str) -> str:
    reasons = f" {dropped}" if dropped else ""
    line = (f"{title}: {reads_in:,} reads in, {sum(written.values()):,} written, "
            f"{sum(dropped.values()):,} dropped{reasons} in {seconds:.1f} s")
    if key_numbers:
        line += "; " + ", ".join(f"{k.replace('_', ' ')} {key_number(k, v)}" for k, v in key_numbers.items())
    if bottleneck and "none stood out" not in bottleneck:
        line += f"; {bottleneck}"
    return line
