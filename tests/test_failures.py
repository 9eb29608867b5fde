"""Failure paths: every one ends in bounded time with one clear error naming
the job, and leaves no process, FIFO or temporary output behind."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from conftest import assert_clean, write_lines
from jobfuncs import (
    exit_nonzero,
    kill_self,
    pass_through,
    raise_after,
    require_1000_bytes,
    return_unpicklable,
    sleep_forever,
    write_then_die,
)

import bamflow as bf
from bamflow import FIFO, Workflow, WorkflowError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def two_worker_workflow(tmp_path, fifo_dir, start_method, worker0, worker1=sleep_forever, lines=20000, **kw0):
    """reader → distribute → (worker0, worker1) → collect → out.txt"""
    src = tmp_path / "in.txt"
    write_lines(src, lines, header=())
    return (
        Workflow("fail", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("dist{n}", "wb", n=2))
        .add_job(input=FIFO("dist0", "rt"), output=FIFO("out0", "wt"), func=worker0, job_name="fail.worker0", **kw0)
        .add_job(input=FIFO("dist1", "rt"), output=FIFO("out1", "wt"), func=worker1, job_name="fail.worker1")
        .collect(inputs=FIFO("out{n}", "rb", n=2), output=str(tmp_path / "out.txt"))
    )


def run_expecting_failure(workflow, timeout=30):
    with pytest.raises(WorkflowError) as info:
        workflow.run(timeout=timeout)
    return info.value, time.monotonic()


def stamp_time(path):
    with open(path) as f:
        return float(f.read())


@pytest.mark.timeout(60)
def test_worker_raises(tmp_path, fifo_dir, start_method):
    stamp = str(tmp_path / "stamp")
    w = two_worker_workflow(tmp_path, fifo_dir, start_method, raise_after, after=10, stamp=stamp)
    error, ended = run_expecting_failure(w)
    assert error.job == "fail.worker0"
    assert str(error).splitlines()[0] == "job 'fail.worker0' failed: ValueError: bad line 10: " + repr(
        open(tmp_path / "in.txt").readlines()[20].strip()
    )
    assert "Traceback" in error.child_traceback and "raise ValueError" in error.child_traceback
    assert "fail.worker0" in w.exc_dict and "ValueError" in w.exc_dict["fail.worker0"]
    # worker1 never reads; it and everyone else were stopped within 2 s
    assert ended - stamp_time(stamp) < 2.0
    assert not (tmp_path / "out.txt").exists()
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.timeout(60)
def test_worker_exits_nonzero(tmp_path, fifo_dir, start_method):
    w = two_worker_workflow(tmp_path, fifo_dir, start_method, exit_nonzero)
    error, _ = run_expecting_failure(w)
    assert error.job == "fail.worker0"
    assert str(error) == "job 'fail.worker0' failed: exited with status 3"
    assert error.exitcode == 3
    assert not (tmp_path / "out.txt").exists()
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.timeout(60)
def test_worker_killed_by_sigkill(tmp_path, fifo_dir, start_method):
    """What the out-of-memory killer does: no message, no traceback, just gone."""
    stamp = str(tmp_path / "stamp")
    w = two_worker_workflow(tmp_path, fifo_dir, start_method, kill_self, stamp=stamp)
    error, ended = run_expecting_failure(w)
    assert error.job == "fail.worker0"
    assert str(error) == "job 'fail.worker0' failed: killed by SIGKILL"
    assert error.exitcode == -signal.SIGKILL
    assert ended - stamp_time(stamp) < 2.0
    assert not (tmp_path / "out.txt").exists()
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.timeout(60)
def test_upstream_broken_pipe_is_not_blamed(tmp_path, fifo_dir):
    """When a worker dies, the distributor's broken pipe is a consequence, not the cause."""
    w = two_worker_workflow(tmp_path, fifo_dir, "fork", raise_after, worker1=pass_through, lines=300_000, after=0)
    error, _ = run_expecting_failure(w)
    assert error.job == "fail.worker0"
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.timeout(60)
def test_unpicklable_result_is_a_failure(tmp_path, fifo_dir):
    w = two_worker_workflow(tmp_path, fifo_dir, "fork", return_unpicklable, worker1=pass_through, lines=100)
    error, _ = run_expecting_failure(w)
    assert error.job == "fail.worker0"
    assert "could not be sent to the supervisor" in str(error)
    assert not (tmp_path / "out.txt").exists()
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.timeout(60)
def test_timeout_stops_everything(tmp_path, fifo_dir):
    w = two_worker_workflow(tmp_path, fifo_dir, "fork", sleep_forever)
    started = time.monotonic()
    with pytest.raises(WorkflowError, match=r"workflow timed out; still running: .*fail\.worker0"):
        w.run(timeout=1.0)
    assert time.monotonic() - started < 3.0
    assert_clean(fifo_dir, tmp_path)


def test_unwritable_output_fails_before_start(tmp_path, fifo_dir):
    src = tmp_path / "in.txt"
    write_lines(src, 10)
    bad = tmp_path / "no" / "such" / "folder" / "out.txt"
    w = (
        Workflow("out", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .funnel(input=FIFO("input", "rb"), output=str(bad))
    )
    with pytest.raises(WorkflowError) as info:
        w.run()
    assert str(info.value) == (
        f"workflow 'out': out.funnel0: cannot write output '{bad}': folder '{bad.parent}' does not exist"
    )
    assert os.listdir(fifo_dir) == []  # nothing was started
    assert_clean(fifo_dir, tmp_path)


def test_output_under_a_file_fails_before_start(tmp_path, fifo_dir):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    w = Workflow("out", tmp_dir=fifo_dir).reader(input=str(blocker), output=FIFO("i", "wb"))
    w.funnel(input=FIFO("i", "rb"), output=str(blocker / "out.txt"))
    with pytest.raises(WorkflowError, match="cannot write output .* does not exist"):
        w.run()
    assert_clean(fifo_dir, tmp_path)


def test_missing_input_fails_before_start(tmp_path, fifo_dir):
    missing = tmp_path / "missing.txt"
    w = (
        Workflow("in", tmp_dir=fifo_dir)
        .reader(input=str(missing), output=FIFO("input", "wb"))
        .funnel(input=FIFO("input", "rb"), output=str(tmp_path / "out.txt"))
    )
    with pytest.raises(WorkflowError) as info:
        w.run()
    assert str(info.value) == f"workflow 'in': in.reader0: input file '{missing}' does not exist"
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.timeout(60)
def test_input_vanishing_at_run_time(tmp_path, fifo_dir, start_method):
    """A path not declared as InputFile is only found missing by the job itself."""
    missing = str(tmp_path / "gone.txt")
    w = (
        Workflow("in", start_method=start_method, tmp_dir=fifo_dir)
        .add_job(func=bf.parts.read_files, inputs=[missing], output=FIFO("input", "wb"), job_name="in.reader0")
        .funnel(input=FIFO("input", "rb"), output=str(tmp_path / "out.txt"))
    )
    error, _ = run_expecting_failure(w)
    assert error.job == "in.reader0"
    assert "FileNotFoundError" in str(error).splitlines()[0] and missing in str(error).splitlines()[0]
    assert not (tmp_path / "out.txt").exists()
    assert_clean(fifo_dir, tmp_path)


# -- signals to the supervisor: run the workflow in a child Python -----------------------

SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import bamflow as bf
    from jobfuncs import slow_pass_through
    from conftest import write_lines

    write_lines({src!r}, 100000, header=())
    (
        bf.Workflow("sig", tmp_dir={fifo_dir!r})
        .reader(input={src!r}, output=bf.FIFO("input", "wb"))
        .distribute(input=bf.FIFO("input", "rb"), outputs=bf.FIFO("d{{n}}", "wb", n=2))
        .workers(input=bf.FIFO("d{{n}}", "rt"), output=bf.FIFO("o{{n}}", "wt"), func=slow_pass_through,
                 pid_dir={pid_dir!r}, n=2)
        .collect(inputs=bf.FIFO("o{{n}}", "rb", n=2), output={out!r})
        .run()
    )
    """
)


def start_supervisor(tmp_path, fifo_dir):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = SUPERVISOR_SCRIPT.format(
        tests=TESTS_DIR, src=str(tmp_path / "in.txt"), fifo_dir=fifo_dir, pid_dir=str(pid_dir), out=str(tmp_path / "out.txt")
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(os.listdir(pid_dir)) < 2:  # both workers are running
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    time.sleep(0.2)
    return proc, [int(name.split(".")[0]) for name in os.listdir(pid_dir)]


def assert_gone(pids, within=2.0):
    deadline = time.monotonic() + within
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            assert time.monotonic() < deadline, f"job process {pid} is still running"
            time.sleep(0.02)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig, message", [(signal.SIGINT, b"KeyboardInterrupt"), (signal.SIGTERM, b"stopped by SIGTERM")])
def test_signal_to_supervisor_stops_and_cleans_up(tmp_path, fifo_dir, sig, message):
    proc, worker_pids = start_supervisor(tmp_path, fifo_dir)
    proc.send_signal(sig)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=10)
    assert time.monotonic() - started < 3.0
    assert proc.returncode != 0
    assert message in stderr
    assert_gone(worker_pids, within=0.5)
    assert os.listdir(fifo_dir) == []
    assert not (tmp_path / "out.txt").exists()
    assert [n for n in os.listdir(tmp_path) if ".bamflow-" in n] == []


@pytest.mark.timeout(60)
def test_supervisor_killed_takes_its_jobs_along(tmp_path, fifo_dir):
    """SIGKILL leaves the supervisor no time to clean up; its jobs still die with it."""
    proc, worker_pids = start_supervisor(tmp_path, fifo_dir)
    proc.kill()
    proc.wait(timeout=10)
    assert_gone(worker_pids, within=2.0)


def _run_wide_workflow(work, n, pipe_size):
    header, body = write_lines(os.path.join(work, "in.txt"), 3000, header=())
    (
        Workflow("budget", start_method="fork", pipe_size=pipe_size, tmp_dir=work)
        .reader(input=os.path.join(work, "in.txt"), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("d{n}", "wb", n=n))
        .collect(inputs=FIFO("d{n}", "rb", n=n), output=os.path.join(work, "out.txt"), order="round-robin")
        .run(timeout=60)
    )
    with open(os.path.join(work, "out.txt")) as f:
        assert f.readlines() == body


@pytest.mark.timeout(120)
def test_pipe_budget_exhausted_falls_back_to_smaller_buffers():
    """An unprivileged user's pipe budget (pipe-user-pages-soft) runs out with many
    large pipes; the workflow must still run, with smaller buffers."""
    with open("/proc/sys/fs/pipe-user-pages-soft") as f:
        soft_pages = int(f.read())
    n = 300
    pipe_size = 1 << 20
    assert soft_pages == 0 or n * pipe_size > soft_pages * os.sysconf("SC_PAGE_SIZE")
    work = tempfile.mkdtemp(prefix="bamflow-budget-")
    os.chmod(work, 0o777)
    try:
        pid = os.fork()
        if pid == 0:  # root has no pipe budget: become nobody (already unprivileged: stay)
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                _run_wide_workflow(work, n, pipe_size)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        subprocess.run(["rm", "-rf", work], check=True)


@pytest.mark.timeout(60)
def test_a_killed_producer_is_blamed_not_the_consumer_it_starved(tmp_path, fifo_dir):
    for _ in range(5):  # the order in which the supervisor sees the two ends varies
        w = (
            Workflow("blame", tmp_dir=fifo_dir)
            .add_job(output=FIFO("data", "wb"), func=write_then_die, job_name="blame.producer")
            .add_job(input=FIFO("data", "rb"), func=require_1000_bytes, job_name="blame.consumer")
        )
        error, _ = run_expecting_failure(w)
        assert error.job == "blame.producer" and "killed by SIGKILL" in str(error)
        assert "blame.consumer" in error.exc_dict  # its error is kept, as a consequence
    assert_clean(fifo_dir)
