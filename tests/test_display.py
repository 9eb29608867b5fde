"""The live view, log lines and JSON progress (cli/display.py), from snapshots as
the supervisor sends them: rendered to terminals of a fixed size and read back."""

from __future__ import annotations

import io
import json

import pytest
from bamfiles import write_bam
from bamflow.cli.display import LOG_WIDTH, Board, ProgressDisplay, log_line, render_live
from bamflow.cli.main import app
from rich.console import Console
from typer.testing import CliRunner

from bamflow.engine.progress import JobProgress, Snapshot

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(name, records, bytes_in, *, state="running", upstream=(), activity="working", working=0.9, cpu=95.0,
        waits_on="", bottleneck=False, estimated=False, seconds=10.0, waiting_input=0.0, waiting_output=0.0):
    return JobProgress(
        f"shard.{name}", state, records, bytes_in, 0, 0, seconds, stage=name.rstrip("0123456789"), cpu=cpu,
        cpu_seconds=cpu / 100 * seconds, activity=activity, working=working, waiting_cpu=0.0,
        waiting_input=waiting_input, waiting_output=waiting_output, waits_on=waits_on, bottleneck=bottleneck,
        estimated_records=estimated, upstream=upstream,
    )


def shard_snapshot(t: float, writers: int = 33, state: str = "running") -> Snapshot:
    """reader → dist → writers, the distributor the bottleneck; t: seconds in."""
    done = int(100_000 * t)
    rows = [
        job("BAM_reader0", done, int(4 * MB * t), activity="output", working=0.1, cpu=20, waiting_output=0.9,
            waits_on="shard.dist0", estimated=True, state=state),
        job("dist0", done, int(40 * MB * t), upstream=("shard.BAM_reader0",), bottleneck=state == "running", cpu=99,
            working=0.97, state=state),
    ]
    for i in range(writers):
        rows.append(job(f"BAM_writer{i}", done // writers * (1 + (i % 3 == 0)) // 1, int(40 * MB * t / writers),
                        upstream=("shard.dist0",), activity="input", working=0.1, cpu=12, waiting_input=0.9,
                        waits_on="shard.dist0", state=state))
    snap = Snapshot(rows)
    snap.bottleneck = "dist" if state == "running" else None
    snap.elapsed = t
    return snap


def board_after(seconds: float, writers: int = 33, total=200 * MB) -> tuple[Board, Clock]:
    clock = Clock()
    board = Board(total, clock)
    for step in range(int(seconds * 2) + 1):
        clock.now = 100.0 + step / 2
        board.update(shard_snapshot(step / 2, writers))
    return board, clock


def render(board: Board, width: int, height: int) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, height=height, force_terminal=True, color_system=None, legacy_windows=False)
    console.print(render_live(board, "bamflow shard", width, height))
    return out.getvalue().rstrip("\n").split("\n")


def test_80x24_folds_the_workers_and_keeps_the_bar_and_eta():
    board, _ = board_after(10)
    lines = render(board, 80, 24)
    assert len(lines) <= 23  # one line left for the cursor: nothing scrolls away
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    first = lines[0]
    assert first.startswith("bamflow shard") and "━" in first and "ETA" in first and "%" in first
    text = "\n".join(lines)
    assert "BAM_writer ×33" in text and "BAM_writer7" not in text  # folded into one row
    assert "min/med/max" in text
    folded = next(line for line in lines if "BAM_writer ×33" in line)
    assert folded.count("/") == 2  # the spread of the 33 writers' rates
    assert "▶ dist0" in text  # the bottleneck row
    status = " ".join(lines[-2:])  # the bottleneck, on the one or two lines left
    assert "bottleneck: dist0 (busy 97%); BAM_reader0 waits to write 90% of the time" in status


def test_a_tall_terminal_shows_every_worker():
    board, _ = board_after(10)
    lines = render(board, 120, 60)
    text = "\n".join(lines)
    for i in range(33):
        assert f"BAM_writer{i} " in text
    assert "×33" not in text and "min/med/max" not in text
    assert "waits" in lines[1] and "in 90% out 0%" in text  # the wider view adds the waits
    assert len(lines) <= 59 and all(len(line) <= 120 for line in lines)


def test_a_small_terminal_still_shows_the_bar():
    board, _ = board_after(5, writers=3)
    many = Board(200 * MB, Clock())
    rows = Snapshot(job(f"stage{chr(97 + i)}0", 1000, MB) for i in range(30))  # 30 stages, none foldable
    many.update(rows)
    for b in (board, many):
        lines = render(b, 60, 10)
        assert len(lines) <= 9 and all(len(line) <= 60 for line in lines)
        assert lines[0].startswith("bamflow shard")
    assert "more" in "\n".join(render(many, 60, 10))


def test_eta_counts_the_data_still_inside_the_pipeline():
    """The reader has read all the input, the workers half of it: 50% done, not 100%."""
    clock = Clock()
    board = Board(100 * MB, clock)
    snap = Snapshot([
        job("BAM_reader0", 0, 100 * MB, activity="output"),
        job("dist0", 1000, 400 * MB, upstream=("w.BAM_reader0",)),
        job("worker0", 250, 100 * MB, upstream=("w.dist0",)),
        job("worker1", 250, 100 * MB, upstream=("w.dist0",)),
        job("collect0", 400, 100 * MB, upstream=("w.dist0", "w.worker0", "w.worker1")),  # not a direct reader
    ])
    for row in snap:
        row.job = "w." + row.job.split(".", 1)[1]
    board.update(snap)
    assert board.fraction() == pytest.approx(0.5)
    clock.now += 10
    assert board.eta(0.5) == "10s"
    done = Snapshot(job(r.job.split(".", 1)[1], r.records, r.bytes_in, state="done", upstream=r.upstream) for r in snap)
    for row in done:
        row.job = "w." + row.job.split(".", 1)[1]
    board.update(done)
    assert board.fraction() == 1.0 and board.eta(1.0) == "0s"


def test_log_lines_stay_short():
    board, _ = board_after(10, writers=33)
    line = log_line(board, "bamflow shard")
    assert len(line) <= LOG_WIDTH and "\n" not in line
    assert line.startswith("bamflow shard: ") and "ETA" in line and "bottleneck: dist" in line


def test_json_progress_objects():
    clock = Clock()
    out = io.StringIO()
    console = Console(file=out, width=80)
    display = ProgressDisplay(console, "json", 200 * MB, "bamflow shard", clock=clock)
    with display:
        for step in range(7):
            clock.now = 100.0 + step / 2
            display(shard_snapshot(step / 2))
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(objects) == 3  # about once a second: at 1.0, 2.0 and 3.0 s
    last = objects[-1]
    assert last["event"] == "progress" and last["bottleneck"] == "dist"
    assert 0 < last["fraction"] < 1 and last["eta"] > 0
    stages = {s["name"]: s for s in last["stages"]}
    assert set(stages) == {"BAM_reader", "dist", "BAM_writer"} and stages["BAM_writer"]["jobs"] == 33
    for stage in stages.values():
        assert {"name", "records", "bytes", "cpu", "state"} <= set(stage)
    assert stages["dist"]["state"] == "working" and stages["BAM_writer"]["state"] == "waiting_input"
    assert stages["dist"]["records"] == 300_000 and stages["dist"]["cpu"] == 99


runner = CliRunner()


def test_progress_json_from_the_command_line(tmp_path):
    src = tmp_path / "in.bam"
    write_bam(src, n=3000, n_cells=30)
    result = runner.invoke(app, ["shard", "--by", "CB", "-n", "3", str(src), "-o", str(tmp_path / "o"), "--progress", "json"])
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    summary = objects[-1]
    assert summary["event"] == "summary" and summary["reads_in"] == 3000
    assert sum(summary["written"].values()) == 3000
    assert {s["name"] for s in summary["stages"]} == {"BAM_reader", "dist", "BAM_writer"}
    assert all(s["state"] == "done" for s in summary["stages"])
    assert summary["key_numbers"]["values"] == 30
    failed = runner.invoke(app, ["shard", str(tmp_path / "nope.bam"), "-o", str(tmp_path / "x"), "--progress", "json"])
    assert failed.exit_code == 2
    broken = tmp_path / "broken.bam"
    broken.write_bytes(src.read_bytes()[:2000])
    failed = runner.invoke(app, ["shard", str(broken), "-o", str(tmp_path / "x"), "--progress", "json"])
    assert failed.exit_code == 1
    error = json.loads(failed.stderr.strip().splitlines()[-1])
    assert error["event"] == "error" and error["exit_status"] == 1 and "BAM_reader0" in error["message"]


def test_live_view_of_a_real_run_on_a_fixed_terminal(tmp_path):
    """A whole run drawn on an 80×24 terminal: every frame fits, the last one says done."""
    src = tmp_path / "in.bam"
    write_bam(src, n=5000, n_cells=40)
    out = io.StringIO()
    console = Console(file=out, width=80, height=24, force_terminal=True, color_system=None, legacy_windows=False)
    frames = []
    from bamflow.bam.shard import shard

    display = ProgressDisplay(console, "none", src.stat().st_size, "bamflow shard")

    def on_progress(snapshot):
        display(snapshot)
        frames.append(render(display.board, 80, 24))

    shard(src, tmp_path / "o", by="CB", n=32, on_progress=on_progress)
    assert frames
    for lines in frames:
        assert len(lines) <= 23 and all(len(line) <= 80 for line in lines)
        assert lines[0].startswith("bamflow shard") and "ETA" in lines[0]
    last = "\n".join(frames[-1])
    assert "100%" in frames[-1][0] and "BAM_writer ×33" in last and "done" in last
