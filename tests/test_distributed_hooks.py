"""Faults injected into cluster tasks by tests/test_distributed.py (no tests here). The tasks
run on Dask workers, which import this module by name (the tests put this
folder on the workers' PYTHONPATH); each hook is called from a task's
progress callback with (task context, the attempt's folder)."""

import os
import signal
import time

MARKER = "killed-once"


def _files_written(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                if os.path.getsize(os.path.join(root, name)):
                    return True
            except OSError:
                continue
    return False


class KillWorkerOnce:
    """Kill the Dask worker running task ``index`` of ``phase`` (SIGKILL to its
    process) the first time that task runs, once it has written some output;
    ``marker_dir`` (outside scratch) records that it did."""

    def __init__(self, phase, index, marker_dir):
        self.phase, self.index, self.marker_dir = phase, index, marker_dir

    def __call__(self, ctx, folder):
        if ctx.phase != self.phase or ctx.index != self.index:
            return
        marker = os.path.join(self.marker_dir, MARKER)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # the retry: let it finish
        os.write(fd, f"{os.getpid()} {folder}\n".encode())
        os.close(fd)
        deadline = time.monotonic() + 5
        while not _files_written(folder) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


class FailTask:
    """Raise in task ``index`` of ``phase``, on every attempt."""

    def __init__(self, phase, index):
        self.phase, self.index = phase, index

    def __call__(self, ctx, folder):
        if ctx.phase == self.phase and ctx.index == self.index:
            raise ValueError(f"injected failure in {ctx.phase} task {ctx.index}")


class HoldUntilStop:
    """Hold every task of ``phase`` until its run says stop (the STOP file), 30 s at most."""

    def __init__(self, phase):
        self.phase = phase

    def __call__(self, ctx, folder):
        deadline = time.monotonic() + 30
        while ctx.phase == self.phase and time.monotonic() < deadline:
            if os.path.exists(os.path.join(ctx.scratch, "STOP")):
                return
            time.sleep(0.05)
