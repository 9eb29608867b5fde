import os
import random

import pytest

# samtools as pysam bundles it (tests/bin/samtools): no system package needed
os.environ["PATH"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin") + os.pathsep + os.environ["PATH"]


@pytest.fixture(params=["fork", "spawn"])
def start_method(request):
    """Run a test under both start methods of multiprocessing."""
    return request.param


@pytest.fixture
def fifo_dir(tmp_path):
    """Where a workflow makes its FIFOs; the test checks that it ends up empty."""
    path = tmp_path / "fifos"
    path.mkdir()
    return str(path)


def child_pids(pid=None):
    """PIDs of the live children of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid != pid or state == "Z":
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"resource_tracker" in cmdline:  # multiprocessing's own helper (spawn), not a job
            continue
        found.append(int(entry))
    return found


def assert_clean(fifo_dir=None, output_dir=None):
    """No job process left, no FIFO left, no temporary output left."""
    assert child_pids() == [], "job processes were left running"
    if fifo_dir is not None:
        assert os.listdir(fifo_dir) == [], "FIFOs or their folder were left behind"
    if output_dir is not None:
        leftovers = [n for n in os.listdir(output_dir) if ".bamflow-" in n]
        assert leftovers == [], f"temporary outputs left: {leftovers}"


def write_lines(path, n, header=("@HD\tVN:1.6", "@CO\tgrüße aus Köln ✓"), seed=1, keys=50):
    """A SAM-like text file: header lines, then n tab-separated body lines.

    Returns (header_lines, body_lines) as lists of str with their newlines.
    """
    rng = random.Random(seed)
    head = [h + "\n" for h in header]
    body = [f"k{rng.randrange(keys)}\tread{i}\t{rng.randrange(10**6)}\t{'ACGT' * rng.randrange(1, 8)}\n" for i in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(head + body)
    return head, body
