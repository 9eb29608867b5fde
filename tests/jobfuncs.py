"""Job functions used by the tests. Module-level, so that the spawn start
method can import them in the job processes."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter


def pass_through(input, output):
    i = 0
    for line in input:
        i += 1
        output.write(line)
    return i


def is_header(line):
    return line.startswith("@")


def count_lines(input):
    return sum(1 for _ in input)


def count_by_key(input, output, field=0):
    """Pass lines on; return {key: count} of field ``field``."""
    counts = Counter()
    for line in input:
        counts[line.rstrip("\n").split("\t")[field]] += 1
        output.write(line)
    return dict(counts)


def record_header_and_pass(input, output):
    """Pass every line; return the header lines this worker saw."""
    header = []
    for line in input:
        if line.startswith("@"):
            header.append(line)
        output.write(line)
    return header


def upper_case(input, output):
    for line in input:
        output.write(line.upper())
    return None


def drop_every_other(input, output):
    kept = 0
    for i, line in enumerate(input):
        if i % 2 == 0:
            output.write(line)
            kept += 1
    return kept


def duplicate_lines(input, output):
    written = 0
    for line in input:
        output.write(line)
        output.write(line)
        written += 2
    return written


def _note_pid(pid_dir):
    if pid_dir:
        with open(os.path.join(pid_dir, f"{os.getpid()}.pid"), "w") as f:
            f.write(str(os.getpid()))


def raise_after(input, output, after=10, stamp=None, pid_dir=None):
    _note_pid(pid_dir)
    for i, line in enumerate(input):
        if i == after:
            if stamp:
                with open(stamp, "w") as f:
                    f.write(repr(time.monotonic()))
            raise ValueError(f"bad line {i}: {line.strip()!r}")
        output.write(line)


def exit_nonzero(input, output):
    for i, line in enumerate(input):
        if i == 5:
            os._exit(3)
        output.write(line)


def kill_self(input, output, stamp=None):
    for i, line in enumerate(input):
        if i == 5:
            if stamp:
                with open(stamp, "w") as f:
                    f.write(repr(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        output.write(line)


def sleep_forever(input, output, pid_dir=None):
    """A worker that never reads its input: it must be stopped by the supervisor."""
    _note_pid(pid_dir)
    time.sleep(3600)


def slow_pass_through(input, output, pid_dir=None, delay=0.001):
    _note_pid(pid_dir)
    for line in input:
        time.sleep(delay)
        output.write(line)


def return_unpicklable(input, output):
    for line in input:
        output.write(line)
    return lambda: None


def write_text_file(output, text=""):
    """A job with an output file and no FIFO."""
    with open(output, "w") as f:
        f.write(text)
    return len(text)


def read_text_file(input):
    with open(input) as f:
        return f.read()


def unmanaged_copy(input, output):
    """Receives FIFO paths (manage_fifos=False) and opens them itself."""
    assert isinstance(input, str) and isinstance(output, str)
    n = 0
    with open(input, "rb") as src, open(output, "wb") as dst:
        for line in src:
            dst.write(line)
            n += 1
    return n


def produce_lines(output, n=10, prefix="line"):
    for i in range(n):
        output.write(f"{prefix}{i}\n")
    return n


def pipe_sizes(input, output):
    """Report the buffer sizes of the pipes this job was given (managed)."""
    import fcntl

    sizes = (fcntl.fcntl(input.fileno(), 1032), fcntl.fcntl(output.fileno(), 1032))
    for line in input:
        output.write(line)
    return sizes


def unmanaged_pipe_size(input):
    """Open an unmanaged FIFO path plainly; report its buffer size once data came
    (the managed writer grows the pipe right after its open, before writing)."""
    import fcntl

    with open(input, "rb") as f:
        f.read()
        return fcntl.fcntl(f.fileno(), 1032)


# -- per-read functions for bamflow.map_reads / map_reduce ------------------------


def tag_with_length(read):
    """Set a tag derived from the read: its name's length."""
    read.set_tag("XL", len(read.query_name))
    return read


def drop_odd_numbered(read):
    """Keep reads whose name ends in an even digit; mark the kept ones."""
    if int(read.query_name[-1]) % 2:
        return None
    read.set_tag("XK", 1)
    return read


def emit_twice(read):
    """Return the read and a copy with a suffixed name."""
    import pysam

    copy = pysam.AlignedSegment.from_dict(read.to_dict(), read.header)
    copy.query_name = read.query_name + "_copy"
    return [read, copy]


def names_by_cell(reads, out):
    """map_reduce: {CB: [read names]} for this worker's share."""
    cells = {}
    for read in reads:
        cells.setdefault(read.get_tag("CB") if read.has_tag("CB") else "", []).append(read.query_name)
    return cells


def count_and_copy(reads, out):
    """map_reduce with an output: copy every read, count per CB."""
    counts = {}
    for read in reads:
        cb = read.get_tag("CB")
        counts[cb] = counts.get(cb, 0) + 1
        out.write(read)
    return counts


def write_then_die(output):
    """Write part of a stream, then die as the out-of-memory killer would kill it."""
    output.write(b"x" * 100)
    output.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def require_1000_bytes(input):
    """A consumer that fails on a short stream (a consequence, not a cause)."""
    data = input.read()
    if len(data) < 1000:
        raise ValueError(f"stream too short: {len(data)} bytes")
    return len(data)


def first_ten_reads(reads, out):
    """map_reduce: a function that stops before its share ends."""
    names = []
    for read in reads:
        names.append(read.query_name)
        if len(names) == 10:
            break
    return len(names)


def late_raw_stream(output, data, delay=0.3):
    """Write ``data`` (a raw BAM stream) after ``delay`` seconds: a writer that connects late."""
    time.sleep(delay)
    output.write(data)
    return len(data)
