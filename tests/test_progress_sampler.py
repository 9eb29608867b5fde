"""The supervisor's view of running jobs (bamflow.engine.progress): CPU time and
what each job waits for, read from /proc; the bottleneck; stalled jobs; the
records of jobs that cannot count their own; and what watching costs.

The pipelines here are three line jobs, produce → relay → consume, one of
them made slow on purpose (a busy loop per line): the slow one must be named
the bottleneck, and its neighbours must be seen waiting for it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest
from bamfiles import write_bam

from bamflow.engine import progress
from bamflow.engine.fifo import FIFO
from bamflow.engine.progress import INPUT, OUTPUT, WORKING, stage_of
from bamflow.engine.workflow import Workflow

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

LINE = b"x" * 99 + b"\n"


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def produce(output, lines, slow):
    for _ in range(lines):
        if slow:
            _spin(slow)
        output.write(LINE)


def relay(input, output, slow):
    for line in input:
        if slow:
            _spin(slow)
        output.write(line)


def consume(input, slow):
    n = 0
    for _ in input:
        if slow:
            _spin(slow)
        n += 1
    return {"records": n}


def pipeline(slow_stage: str, lines: int = 40_000, per_line: float = 50e-6) -> tuple[Workflow, list]:
    """produce → relay → consume; ``slow_stage`` spends ``per_line`` seconds per line."""
    w = Workflow("t", start_method="fork", pipe_size=1 << 16)  # small pipes: nobody runs far ahead
    w.add_job(func=produce, job_name="{workflow}.produce{n}", output=FIFO("a", "wb"), lines=lines,
              slow=per_line if slow_stage == "produce" else 0)
    w.add_job(func=relay, job_name="{workflow}.relay{n}", input=FIFO("a", "rb"), output=FIFO("b", "wb"),
              slow=per_line if slow_stage == "relay" else 0)
    w.add_job(func=consume, job_name="{workflow}.consume{n}", input=FIFO("b", "rb"),
              slow=per_line if slow_stage == "consume" else 0)
    snapshots: list = []
    w.run(on_progress=snapshots.append, timeout=60)
    return w, snapshots


def _row(snapshot, stage):
    return next(r for r in snapshot if r.stage == stage)


@pytest.mark.parametrize("slow", ["produce", "relay", "consume"])
def test_the_slow_stage_is_the_bottleneck_and_its_neighbours_wait_for_it(slow):
    w, snapshots = pipeline(slow)
    assert w.result_dict["t.consume0"] == {"records": 40_000}
    live = [s for s in snapshots if s.elapsed >= 0.9 and all(r.state == "running" for r in s)]
    assert len(live) >= 2, [s.elapsed for s in snapshots]
    named = [s.bottleneck for s in live]
    assert named.count(slow) >= len(live) * 0.6, named
    last = live[-1]
    slow_row = _row(last, slow)
    assert slow_row.bottleneck and slow_row.activity in (WORKING, "cpu")
    assert (slow_row.working or 0) + (slow_row.waiting_cpu or 0) >= 0.6
    assert slow_row.cpu_seconds and slow_row.cpu_seconds > 0.3
    order = ["produce", "relay", "consume"]
    i = order.index(slow)
    for upstream in order[:i]:  # blocked writing into the slow stage's direction
        row = _row(last, upstream)
        assert row.activity == OUTPUT and row.waiting_output >= 0.5, row
    for downstream in order[i + 1 :]:  # blocked reading
        row = _row(last, downstream)
        assert row.activity == INPUT and row.waiting_input >= 0.5, row
    neighbour = order[i + 1] if i + 1 < len(order) else order[i - 1]
    assert _row(last, neighbour).waits_on == f"t.{slow}0"
    # the end: every job done, the shares over its whole life, the bottleneck over
    final = snapshots[-1]
    assert final.bottleneck is None and all(r.state == "done" for r in final)
    assert _row(final, slow).working + (_row(final, slow).waiting_cpu or 0) > 0.5
    assert _row(final, "consume").records == 40_000  # its result, as it does not count itself


def stop_and_go(output):
    output.write(LINE * 10)
    output.flush()
    time.sleep(2.5)  # no records, no bytes, no CPU: stalled, not waiting for anyone


def test_a_job_without_progress_is_stalled(monkeypatch):
    monkeypatch.setattr(progress, "STALL_AFTER", 1.0)
    w = Workflow("s", start_method="fork")
    w.add_job(func=stop_and_go, job_name="{workflow}.sleepy{n}", output=FIFO("a", "wb"))
    w.add_job(func=consume, job_name="{workflow}.consume{n}", input=FIFO("a", "rb"), slow=0)
    snapshots: list = []
    w.run(on_progress=snapshots.append, timeout=30)
    stalled = [s for s in snapshots if _row(s, "sleepy").activity == "stalled"]
    assert stalled, [(s.elapsed, _row(s, "sleepy").activity) for s in snapshots]
    assert all(_row(s, "sleepy").stalled >= 1.0 for s in stalled)
    early = [s for s in snapshots if s.elapsed < 0.8]
    assert all(_row(s, "sleepy").activity != "stalled" for s in early)
    # the reader waits for a writer that does nothing: the whole pipeline stands still
    assert any(_row(s, "consume").activity == "stalled" for s in stalled)


def run_a_program(output):
    """Wait for a child process that burns 2 s of CPU (however long that takes on a busy machine):
    long enough for snapshots (every 0.5 s) after the sampler first sees the child."""
    burn = "import time\nwhile time.process_time() < 2.0: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    output.write(LINE)


def test_the_cpu_of_a_jobs_child_processes_counts():
    w = Workflow("c", start_method="fork")
    w.add_job(func=run_a_program, job_name="{workflow}.parent{n}", output=FIFO("a", "wb"))
    w.add_job(func=consume, job_name="{workflow}.consume{n}", input=FIFO("a", "rb"), slow=0)
    snapshots: list = []
    w.run(on_progress=snapshots.append, timeout=60)
    running = [_row(s, "parent") for s in snapshots if _row(s, "parent").state == "running" and s.elapsed > 0.6]
    assert running and max(r.cpu or 0 for r in running) > 10  # the child's CPU, while it runs
    assert max(r.cpu_seconds or 0 for r in running) > 0.2
    assert any(r.activity in (WORKING, "cpu") for r in running)  # waiting for a working child is work
    assert _row(snapshots[-1], "parent").cpu_seconds > 1.9


def quiet_worker(input, output, pause):
    """A pysam worker that does not touch its progress counters (as user code may not)."""
    import pysam

    n = 0
    with pysam.AlignmentFile(input, "rb", check_sq=False) as reads:
        for _ in reads:
            n += 1
            if n % 2000 == 0:
                time.sleep(pause)
    return {"reads_in": n, "written": None}


def test_workers_that_do_not_count_are_estimated_live_and_exact_at_the_end(tmp_path):
    from bamflow.bam.options import DistributeOptions
    from bamflow.bam.workflow import BamWorkflow

    src = tmp_path / "in.bam"
    write_bam(src, n=20_000, n_cells=50)
    w = BamWorkflow("est", start_method="fork")
    jobs = w.scatter(str(src), quiet_worker, workers=2, distribute=DistributeOptions(by=("CB",), missing="drop"),
                     worker_kwargs={"pause": 0.3})
    snapshots: list = []
    w.run(on_progress=snapshots.append, timeout=60)
    running = [_row(s, "worker") for s in snapshots if _row(s, "worker").state == "running" and s.elapsed > 0.3]
    assert any(r.records and r.estimated_records and r.estimated_bytes for r in running)  # from /proc/PID/io
    final = snapshots[-1]
    workers = [r for r in final if r.stage == "worker"]
    assert [r.records for r in workers] == [p["reads_in"] for p in w.result(jobs.workers)]  # exact, from their results
    assert not any(r.estimated_records for r in workers)
    reader = _row(final, "BAM_reader")
    assert reader.records == 20_000 and reader.estimated_records  # what its only consumer read
    assert all(r.bytes_in > 0 for r in final)


def test_stage_names():
    assert stage_of("qc.worker12") == "worker"
    assert stage_of("shard.BAM_writer3") == "BAM_writer"
    assert stage_of("x.dist0") == "dist"
    assert stage_of("7") == "7"
    # add_job's job0, job1 running different functions are different stages; workers one
    names = ["w.job0", "w.job1", "w.worker0", "w.worker1"]
    assert progress._stages(names, ["a", "b", "c", "c"]) == ["job0", "job1", "worker", "worker"]


def test_watching_costs_little():
    """The sampler's CPU time against the run's: well below 2%."""
    w, snapshots = pipeline("relay", lines=60_000)
    final = snapshots[-1]
    run_cpu = sum(r.cpu_seconds or 0 for r in final)
    assert run_cpu > 1.0
    assert final.sampler_seconds / run_cpu < 0.02, (final.sampler_seconds, run_cpu)
    looks = statistics.mean(len(s) for s in snapshots)
    assert looks == 3
