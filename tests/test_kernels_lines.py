"""Property tests of the line kernels on real file descriptors, with buffer
sizes down to one byte so that every line boundary falls across a refill."""

import os
import subprocess
import sys
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bamflow.engine.lines import LineCollectOptions, LineDistributeOptions
from bamflow.kernels.lines import collect_lines, distribute_lines

line_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n")
body_lines = st.lists(line_bytes.filter(lambda b: not b.startswith(b"@")), max_size=60)
header_lines = st.lists(st.binary(max_size=20).map(lambda b: b"@" + b.replace(b"\n", b"") + b"\n"), max_size=4)
small_sizes = st.sampled_from([1, 2, 3, 5, 7, 64, 1 << 16])


def fnv1a64(data: bytes) -> int:
    """Reference FNV-1a (64 bit), written from the published definition."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return h


def newline_lines(data: bytes) -> list[bytes]:
    """Lines ended by b"\\n" only (bytes.splitlines also splits at \\r)."""
    assert data == b"" or data.endswith(b"\n")
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


class Files:
    """Temporary regular files standing in for pipes (the kernels take any fd)."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        self.count = 0

    def new(self, data=b""):
        path = os.path.join(self.dir.name, str(self.count))
        self.count += 1
        with open(path, "wb") as f:
            f.write(data)
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.dir.cleanup()


BUFFERS = ("buffer_size", "out_buffer_size", "read_ahead", "stall_ms")


def split_options(cls, kwargs):
    """(options, buffer sizes) from the keyword arguments of a test."""
    options = cls(**{k: v for k, v in kwargs.items() if k not in BUFFERS})
    return options, {k: v for k, v in kwargs.items() if k in BUFFERS}


def run_distribute(data, n, **kwargs):
    """Distribute data into n files (+ a header file); returns (stats, outputs, header)."""
    options, kwargs = split_options(LineDistributeOptions, kwargs)
    with Files() as files:
        src = files.new(data)
        outs = [files.new() for _ in range(n)]
        header = files.new()
        in_fd = os.open(src, os.O_RDONLY)
        out_fds = [os.open(p, os.O_WRONLY) for p in outs]
        header_fd = os.open(header, os.O_WRONLY)  # the kernel owns and closes it
        try:
            stats = distribute_lines(in_fd, out_fds, options, header_fd=header_fd, **kwargs)
        finally:
            for fd in [in_fd, *out_fds]:
                os.close(fd)
        contents = [open(p, "rb").read() for p in outs]
        return stats, contents, open(header, "rb").read()


@settings(max_examples=150, deadline=None)
@given(
    header=header_lines,
    body=body_lines,
    n=st.integers(1, 5),
    chunk=st.integers(1, 4),
    buffer_size=small_sizes,
    out_buffer_size=small_sizes,
    broadcast=st.booleans(),
    strip_last_newline=st.booleans(),
)
def test_round_robin_distribution(header, body, n, chunk, buffer_size, out_buffer_size, broadcast, strip_last_newline):
    data = b"".join(header + body)
    if strip_last_newline and len((header + body)[-1:][0] if header + body else b"") > 1:
        data = data[:-1]  # the kernel must give the last line its newline back
    stats, outs, got_header = run_distribute(
        data,
        n,
        chunk_size=chunk,
        header_prefix=b"@",
        header_broadcast=broadcast,
        buffer_size=buffer_size,
        out_buffer_size=out_buffer_size,
    )
    head = b"".join(header)
    assert got_header == head
    for i in range(n):
        share = b"".join(line for j, line in enumerate(body) if (j // chunk) % n == i)
        assert outs[i] == (head if broadcast else b"") + share
    assert stats["lines"] == len(body)
    assert stats["header_lines"] == len(header)
    assert stats["bytes"] == len(data)
    assert stats["per_output"] == [sum(1 for j in range(len(body)) if (j // chunk) % n == i) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(st.binary(max_size=6).map(lambda b: b.replace(b"\n", b"").replace(b"\t", b"")), min_size=1, max_size=5),
    picks=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), max_size=50),
    n=st.integers(1, 7),
    field=st.integers(0, 2),
    buffer_size=small_sizes,
)
def test_distribution_by_key_field(keys, picks, n, field, buffer_size):
    lines = []
    for key_index, extra in picks:
        key = keys[key_index % len(keys)]
        fields = [b"a%d" % extra] * 3
        fields[field] = key
        lines.append(b"\t".join(fields[: field + 1 + extra % 2]) + b"\n")
    stats, outs, _ = run_distribute(b"".join(lines), n, by=field, buffer_size=buffer_size)
    for i in range(n):
        expected = b"".join(line for line in lines if fnv1a64(line[:-1].split(b"\t")[field]) % n == i)
        assert outs[i] == expected
    assert sum(stats["per_output"]) == len(lines)


def test_key_field_missing_hashes_the_empty_key():
    lines = [b"only-one-field\n", b"a\tb\n"]
    stats, outs, _ = run_distribute(b"".join(lines), 3, by=2)
    assert outs[fnv1a64(b"") % 3] == b"".join(lines)


def test_header_predicate_sees_text_and_ends_at_first_body_line():
    seen = []

    def detect(line):
        seen.append(line)
        return line.startswith("#")

    data = b"#h1 \xff\n#h2\nbody\n#not header\n"
    stats, outs, header = run_distribute(data, 2, header_detect_func=detect)
    assert header == b"#h1 \xff\n#h2\n"
    assert seen == ["#h1 \udcff\n", "#h2\n", "body\n"]
    assert outs == [b"body\n", b"#not header\n"]


def run_collect(inputs, header=None, **kwargs):
    options, kwargs = split_options(LineCollectOptions, kwargs)
    with Files() as files:
        in_paths = [files.new(d) for d in inputs]
        out = files.new()
        in_fds = [os.open(p, os.O_RDONLY) for p in in_paths]
        header_fd = os.open(files.new(header), os.O_RDONLY) if header is not None else -1
        out_fd = os.open(out, os.O_WRONLY)
        try:
            stats = collect_lines(in_fds, out_fd, options, header_fd=header_fd, **kwargs)
        finally:
            for fd in [*in_fds, out_fd] + ([header_fd] if header_fd >= 0 else []):
                os.close(fd)
        return stats, open(out, "rb").read()


@settings(max_examples=150, deadline=None)
@given(
    header=header_lines,
    body=body_lines,
    n=st.integers(1, 5),
    chunk=st.integers(1, 4),
    buffer_size=small_sizes,
    out_buffer_size=small_sizes,
)
def test_round_robin_collect_inverts_round_robin_distribution(header, body, n, chunk, buffer_size, out_buffer_size):
    _, outs, _ = run_distribute(b"".join(body), n, chunk_size=chunk)
    stats, merged = run_collect(
        outs,
        header=b"".join(header),
        order="round-robin",
        chunk_size=chunk,
        buffer_size=buffer_size,
        out_buffer_size=out_buffer_size,
    )
    assert merged == b"".join(header + body)
    assert stats["lines"] == len(body)
    assert stats["header_lines"] == len(header)
    assert stats["out_of_turn"] == 0


@settings(max_examples=150, deadline=None)
@given(
    streams=st.lists(st.lists(line_bytes, max_size=20), min_size=1, max_size=5),
    unterminated=st.lists(st.binary(min_size=1, max_size=5).map(lambda b: b.replace(b"\n", b"x")), max_size=5),
    buffer_size=small_sizes,
    order=st.sampled_from(["any", "round-robin"]),
)
def test_collect_passes_every_line_whole(streams, unterminated, buffer_size, order):
    """Any number of lines per input, last lines without newline: nothing lost or torn."""
    inputs = []
    expected = []
    for i, lines in enumerate(streams):
        data = b"".join(lines)
        expected += lines
        if i < len(unterminated):
            data += unterminated[i]
            expected.append(unterminated[i] + b"\n")
        inputs.append(data)
    stats, merged = run_collect(inputs, order=order, buffer_size=buffer_size)
    assert sorted(newline_lines(merged)) == sorted(expected)
    assert stats["lines"] == len(expected)
    assert stats["per_input"] == [
        len(lines) + (1 if i < len(unterminated) else 0) for i, lines in enumerate(streams)
    ]
    if len(streams) == 1:  # one input: its order is kept exactly
        assert merged == b"".join(expected)


def test_round_robin_collect_passes_lines_out_of_turn_instead_of_stalling():
    """Input 0 stays silent while the others are read_ahead bytes ahead: after
    stall_ms their lines go out of turn; none is lost, each input keeps its order."""
    late = [b"late%d\n" % i for i in range(3)]
    others = [[b"in%d-%d\n" % (k, i) for i in range(50)] for k in (1, 2)]
    with Files() as files:
        in_fds = [os.open(files.new(b"".join(lines)), os.O_RDONLY) for lines in others]
        out = files.new()
        out_fd = os.open(out, os.O_WRONLY)
        silent_r, silent_w = os.pipe()
        # another process (the kernel holds the GIL while it waits) writes input 0
        # once output has come, which before input 0's first chunk is out of turn
        wait_then_write = (
            "import os, sys, time\n"
            "deadline = time.monotonic() + 60\n"
            "while os.path.getsize(sys.argv[1]) == 0 and time.monotonic() < deadline:\n"
            "    time.sleep(0.01)\n"
            f"os.write(1, {b''.join(late)!r})\n"
        )
        writer = subprocess.Popen([sys.executable, "-c", wait_then_write, out], stdout=silent_w)
        os.close(silent_w)
        try:
            stats = collect_lines(
                [silent_r, *in_fds], out_fd, LineCollectOptions(order="round-robin"), buffer_size=8, read_ahead=16, stall_ms=20
            )
        finally:
            writer.wait()
            for fd in [silent_r, *in_fds, out_fd]:
                os.close(fd)
        merged = newline_lines(open(out, "rb").read())
    assert stats["out_of_turn"] >= 1
    assert stats["per_input"] == [3, 50, 50]
    assert merged[:1] != [late[0]]
    for lines in [late, *others]:
        assert [line for line in merged if line in lines] == lines


def _failing_detect(line):
    raise ZeroDivisionError("predicate failed")


@pytest.mark.parametrize(
    "n_out, kwargs, error",
    [
        (2, {"header_prefix": "@"}, None),
        (2, {}, None),
        (0, {"header_prefix": "@"}, ValueError),
        (2, {"header_prefix": "@", "buffer_size": 0}, ValueError),
        (2, {"header_detect_func": _failing_detect}, ZeroDivisionError),
    ],
)
def test_distribute_closes_header_fd_on_every_path(n_out, kwargs, error):
    options, kwargs = split_options(LineDistributeOptions, kwargs)
    header_r, header_w = os.pipe()
    os.set_blocking(header_r, False)
    with Files() as files:
        in_fd = os.open(files.new(b"@h\nbody\n"), os.O_RDONLY)
        out_fds = [os.open(files.new(), os.O_WRONLY) for _ in range(n_out)]
        try:
            if error is None:
                distribute_lines(in_fd, out_fds, options, header_fd=header_w, **kwargs)
            else:
                with pytest.raises(error):
                    distribute_lines(in_fd, out_fds, options, header_fd=header_w, **kwargs)
            # every write end closed: the header, then end of file (not EAGAIN)
            expected = b"@h\n" if error is None and options.detects_header else b""
            assert os.read(header_r, 100) == expected
            assert os.read(header_r, 100) == b""
        finally:
            for fd in [in_fd, header_r, *out_fds]:
                os.close(fd)
