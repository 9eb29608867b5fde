"""Bad inputs through every command (docs/reliability.md): each run ends with
exit status 1, exactly one error line naming the file and the fault, and
leaves no output file, FIFO folder or process behind.

The inputs are made by tests/hostile.py. Every command runs as a real
process in its own session, so that leftover processes can be found."""

import os
import subprocess
import sys
import time

import hostile
import pytest

TIMEOUT = 60


def run_isolated(args, tmp, stdin=None):
    """Run ``bamflow ARGS`` in its own session with a private TMPDIR; returns
    (exit status, stderr lines, session id)."""
    env = dict(os.environ, TMPDIR=str(tmp / "tmpdir"), COLUMNS="200")
    (tmp / "tmpdir").mkdir(exist_ok=True)
    p = subprocess.Popen(
        ["bamflow", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin, env=env, start_new_session=True,
    )
    out, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, [line for line in err.decode(errors="replace").splitlines() if line.strip()], p.pid, out


def processes_in_session(sid):
    """PIDs of the processes whose session id is ``sid`` (the run's own session)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: session
            found.append(int(name))
    return found


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    made = {maker.__name__: maker(folder) for maker in hostile.STRUCTURAL + hostile.KEY_TYPES}
    (folder / "ident.py").write_text("def keep(read):\n    return read\n")
    (folder / "list.txt").write_text("CELL01-1\nCELL02-1\n")
    (folder / "whitelist.txt").write_text("ACGTACGTACGTACGT\n")
    return folder, made


def command(name, src, out, folder):
    """The command line of ``name`` reading ``src`` and writing under ``out``."""
    return {
        "shard": ["shard", "-q", "-o", str(out / "shards"), str(src)],
        "split": ["split", "-q", "-o", str(out / "cells"), str(src)],
        "filter": ["filter", "-q", "--barcodes", str(folder / "list.txt"), str(src), "-o", str(out / "kept.bam")],
        "run": ["run", "-q", f"{folder / 'ident.py'}:keep", str(src), "-o", str(out / "mapped.bam")],
        "correct": ["correct", "-q", "--whitelist", str(folder / "whitelist.txt"), str(src), "-o", str(out / "cb.bam")],
        "histogram": ["histogram", "-q", "--tag", "CB", str(src), "-o", str(out / "hist.txt")],
        "dedup": ["dedup", "-q", str(src), "-o", str(out / "dedup.bam")],
        "count": ["count", "-q", str(src), "-o", str(out / "counts")],
        "qc": ["qc", "-q", str(src), "-o", str(out / "qc")],
    }[name]


COMMANDS = ["shard", "split", "filter", "run", "correct", "histogram", "dedup", "count", "qc"]
KEYED = ["shard", "split", "filter", "histogram", "dedup", "count", "qc"]
EVERY_COMMAND_FAULTS = ["truncated", "refid_past_references", "aux_cut_short", "malformed_sam", "empty"]


def check_failed_cleanly(name, args, tmp, want):
    out = tmp / "out"
    out.mkdir()
    status, lines, sid, _ = run_isolated(args, tmp)
    assert status == 1, (args, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"bamflow {name}: error:"), lines
    assert want in lines[0], lines
    assert files_under(out) == [], "a failed run left files"
    assert files_under(tmp / "tmpdir") == [] and os.listdir(tmp / "tmpdir") == [], "FIFOs or temporary files left"
    deadline = time.monotonic() + 5
    while processes_in_session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in_session(sid) == [], "processes of the run are still alive"


@pytest.mark.parametrize("fault", sorted(f.__name__ for f in hostile.STRUCTURAL))
def test_every_fault_fails_cleanly_in_shard(inputs, tmp_path, fault):
    folder, made = inputs
    src, want = made[fault]
    check_failed_cleanly("shard", command("shard", src, tmp_path / "out", folder), tmp_path, want)


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("fault", EVERY_COMMAND_FAULTS)
def test_every_command_fails_cleanly(inputs, tmp_path, name, fault):
    folder, made = inputs
    src, want = made[fault]
    check_failed_cleanly(name, command(name, src, tmp_path / "out", folder), tmp_path, want)


@pytest.mark.parametrize("name", KEYED)
@pytest.mark.parametrize("fault", [f.__name__ for f in hostile.KEY_TYPES])
def test_a_key_tag_that_is_not_a_value_fails(inputs, tmp_path, name, fault):
    folder, made = inputs
    src, want = made[fault]
    check_failed_cleanly(name, command(name, src, tmp_path / "out", folder), tmp_path, want)


@pytest.mark.parametrize("name, args", [
    ("shard", ["shard", "--by", "XB"]),
    ("split", ["split", "--by", "XB"]),
    ("filter", ["filter", "--tag", "XB", "--barcodes", "LIST"]),
    ("histogram", ["histogram", "--tag", "XB"]),
])
def test_a_wrong_tag_name_fails_naming_the_tags_seen(tmp_path, name, args):
    src = hostile.good(tmp_path)
    (tmp_path / "list.txt").write_text("x\n")
    out = tmp_path / "out"
    args = [str(tmp_path / "list.txt") if a == "LIST" else a for a in args] + ["-q", "-o"]
    single = {"histogram": "result.txt", "filter": "result.bam"}
    args += [str(out / single.get(name, "dir"))]
    check_failed_cleanly(name, [*args, str(src)], tmp_path, "tag XB is on none of 300 reads; tags seen: CB GN GX UB")


def test_a_tag_others_carry_stays_a_counted_drop(tmp_path):
    """Reads without the tag are drops, not an error, when other reads carry it."""
    import bamgen

    recs = hostile.good_records(20) + [bamgen.record("untagged", ref_id=0, pos=900, flag=0, cigar=[(4, "M")], seq="ACGT")]
    src = hostile.write(tmp_path, "some.bam", hostile.bgzf(hostile.header() + b"".join(recs)))
    status, lines, _, _ = run_isolated(["shard", "-q", "--missing", "drop", "-o", str(tmp_path / "s"), str(src)], tmp_path)
    assert status == 0, lines
    assert "1 dropped" in lines[0]


# -- a failed run never looks complete; user code cannot corrupt the data stream -------------

EOF_MARKER = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def test_a_failed_run_to_stdout_has_no_eof_marker(tmp_path):
    src = hostile.good(tmp_path)
    (tmp_path / "late.py").write_text(
        "def fail_late(read):\n"
        "    if read.query_name == 'r250':\n"
        "        raise RuntimeError('user code failed')\n"
        "    return read\n"
    )
    status, lines, _, out = run_isolated(["run", "-q", "--chunk-size", "10", f"{tmp_path / 'late.py'}:fail_late", str(src),
                                          "-o", "-"], tmp_path)
    assert status == 1 and "user code failed" in lines[0]
    assert not out.endswith(EOF_MARKER)
    (tmp_path / "partial.bam").write_bytes(out)
    import pysam

    with pytest.raises(pysam.SamtoolsError):  # no EOF marker: `samtools quickcheck` fails
        pysam.samtools.quickcheck(str(tmp_path / "partial.bam"))


def test_a_successful_run_to_stdout_ends_with_the_eof_marker(tmp_path):
    import pysam

    src = hostile.good(tmp_path)
    (tmp_path / "noisy.py").write_text("def keep(read):\n    print('hello from user code')\n    return read\n")
    status, lines, _, out = run_isolated(["run", "-q", f"{tmp_path / 'noisy.py'}:keep", str(src), "-o", "-"], tmp_path)
    assert status == 0, lines
    assert out.endswith(EOF_MARKER)
    assert any("hello from user code" in line for line in lines)  # print() went to stderr
    (tmp_path / "out.bam").write_bytes(out)
    pysam.samtools.quickcheck(str(tmp_path / "out.bam"))
    with pysam.AlignmentFile(str(tmp_path / "out.bam")) as f:
        assert sum(1 for _ in f) == 300


# -- the header tells the truth ----------------------------------------------------------------

def header_of(path):
    import pysam

    with pysam.AlignmentFile(str(path)) as f:
        return f.header.to_dict().get("HD", {})


def test_sort_order_says_unsorted_when_the_order_changes(tmp_path):
    import bamflow

    src = hostile.good(tmp_path)  # @HD SO:coordinate, sorted
    assert header_of(src)["SO"] == "coordinate"
    bamflow.map_reads(src, lambda r: r, tmp_path / "any.bam", by="CB", order="any")
    assert header_of(tmp_path / "any.bam")["SO"] == "unsorted"
    bamflow.map_reads(src, lambda r: r, tmp_path / "kept.bam")  # input order
    assert header_of(tmp_path / "kept.bam")["SO"] == "coordinate"
    bamflow.map_reads(src, lambda r: r, tmp_path / "merged.bam", by="CB", order="coordinate")
    assert header_of(tmp_path / "merged.bam")["SO"] == "coordinate"
    import pysam

    pysam.index(str(tmp_path / "merged.bam"))  # what claims coordinate order can be indexed
    bamflow.shard(src, tmp_path / "shards", n=3)
    for name in ("shard_000.bam", "shard_001.bam", "shard_002.bam"):
        assert header_of(tmp_path / "shards" / name)["SO"] == "coordinate"  # a subset in input order is sorted
        pysam.index(str(tmp_path / "shards" / name))


# -- output folders --------------------------------------------------------------------------

def test_a_folder_with_an_earlier_run_is_refused_then_replaced_whole_with_force(tmp_path):
    import pysam

    import bamflow

    src = hostile.good(tmp_path)
    out = tmp_path / "shards"
    bamflow.shard(src, out, n=4)
    pysam.index(str(out / "shard_003.bam"))
    with pytest.raises(bamflow.WorkflowError, match="earlier run.*force"):
        bamflow.shard(src, out, n=2)
    assert sorted(os.listdir(out)) == sorted([".bamflow-outputs", ".bamflow.lock", "manifest.tsv", "unassigned.bam",
                                              "shard_000.bam", "shard_001.bam", "shard_002.bam", "shard_003.bam",
                                              "shard_003.bam.bai"])
    bamflow.shard(src, out, n=2, force=True)
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "manifest.tsv", "shard_000.bam", "shard_001.bam", "unassigned.bam"]  # no stale shard or index


def test_files_bamflow_did_not_write_are_never_removed(tmp_path):
    import bamflow

    src = hostile.good(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(bamflow.WorkflowError, match="did not write"):
        bamflow.shard(src, out, n=2, force=True)
    assert os.listdir(out) == ["notes.txt"] or sorted(os.listdir(out)) == [".bamflow.lock", "notes.txt"]


def test_two_runs_into_one_folder_cannot_both_succeed(tmp_path):
    src = hostile.good(tmp_path)
    out = tmp_path / "shared"
    out.mkdir()
    script = (
        "import sys, bamflow, fcntl, os\n"
        "bamflow.shard(sys.argv[1], sys.argv[2], n=2, force=True)\n"
    )
    # hold the folder's lock as a running bamflow run does, then start a second run
    import fcntl

    lock = os.open(out / ".bamflow.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        r = subprocess.run([sys.executable, "-c", script, str(src), str(out)], capture_output=True, text=True,
                           timeout=TIMEOUT)
    finally:
        os.close(lock)
    assert r.returncode != 0 and "another bamflow run is writing into the output folder" in r.stderr
    assert sorted(os.listdir(out)) == [".bamflow.lock"]


def test_output_equal_to_input_is_refused(tmp_path):
    src = hostile.good(tmp_path)
    status, lines, _, _ = run_isolated(["histogram", "-q", str(src), "-o", str(src)], tmp_path)
    assert status == 1 and "is the input" in lines[0]
    import bamflow

    with pytest.raises(bamflow.WorkflowError, match="is the input"):
        bamflow.map_reads(src, lambda r: r, src)
    os.symlink(src, tmp_path / "alias.bam")
    with pytest.raises(bamflow.WorkflowError, match="is the input"):
        bamflow.filter_reads(src, tmp_path / "alias.bam", values=["CELL01-1"])


# -- descriptors, inputs -------------------------------------------------------------------------

def test_sixteen_shards_and_twelve_workers_under_ulimit_64(tmp_path):
    src = hostile.good(tmp_path)
    (tmp_path / "ident.py").write_text("def keep(read):\n    return read\n")
    for args in (["shard", "-q", "-o", str(tmp_path / "s16"), str(src)],
                 ["run", "-q", "-w", "12", f"{tmp_path / 'ident.py'}:keep", str(src), "-o", str(tmp_path / "r.bam")]):
        r = subprocess.run(["bash", "-c", 'ulimit -n 64 && exec "$@"', "bash", "bamflow", *args],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", "-c", 'ulimit -n 64 && exec "$@"', "bash", "bamflow", "shard", "-q", "-n", "60",
                        "-o", str(tmp_path / "s60"), str(src)], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 1 and "ulimit -n" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s60").exists()


def test_correct_reads_stdin(tmp_path):
    import bamgen

    recs = [bamgen.record(f"q{i}", tags=[("CR", "Z", "ACGTACGTACGTACGT"), ("CY", "Z", "I" * 16)]) for i in range(50)]
    src = hostile.write(tmp_path, "raw.bam", hostile.bgzf(hostile.header() + b"".join(recs)))
    (tmp_path / "wl.txt").write_text("ACGTACGTACGTACGT\n")
    with open(src, "rb") as stdin:
        status, lines, _, _ = run_isolated(["correct", "-q", "--whitelist", str(tmp_path / "wl.txt"), "-",
                                            "-o", str(tmp_path / "cb.bam")], tmp_path, stdin=stdin)
    assert status == 0, lines
    import pysam

    with pysam.AlignmentFile(str(tmp_path / "cb.bam"), check_sq=False) as f:
        assert [r.get_tag("CB") for r in f] == ["ACGTACGTACGTACGT-1"] * 50
    assert [n for n in os.listdir(tmp_path) if n.startswith(".bamflow")] == []  # the stdin copy is gone


def test_a_truncated_gzip_list_is_one_error_line(tmp_path):
    import gzip

    src = hostile.good(tmp_path)
    (tmp_path / "list.txt.gz").write_bytes(gzip.compress(b"CELL01-1\n" * 1000)[:-20])
    status, lines, _, _ = run_isolated(["filter", "-q", "--barcodes", str(tmp_path / "list.txt.gz"), str(src),
                                        "-o", str(tmp_path / "k.bam")], tmp_path)
    assert status == 1 and len(lines) == 1 and "truncated or corrupt gzip" in lines[0]
    assert not (tmp_path / "k.bam").exists()


def test_tag_stopped_by_sigterm_leaves_nothing(tmp_path):
    import signal

    fifo1 = tmp_path / "r1.fq"
    os.mkfifo(fifo1)
    (tmp_path / "r2.fq").write_text("@a\nACGT\n+\nIIII\n")
    p = subprocess.Popen(["bamflow", "tag", "-q", str(fifo1), str(tmp_path / "r2.fq"), "-o", str(tmp_path / "u.bam")],
                         stderr=subprocess.PIPE, start_new_session=True)
    writer = open(fifo1, "w")  # opened, never finished: tag waits for more FASTQ
    writer.write("@a\n")
    writer.flush()
    time.sleep(1.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=TIMEOUT)
    writer.close()
    assert p.returncode != 0
    assert sorted(os.listdir(tmp_path)) == ["r1.fq", "r2.fq", "tmpdir"] or sorted(os.listdir(tmp_path)) == ["r1.fq", "r2.fq"]


def test_force_on_the_command_line(tmp_path):
    src = hostile.good(tmp_path)
    out = tmp_path / "shards"
    assert run_isolated(["shard", "-q", "-o", str(out), str(src)], tmp_path)[0] == 0
    status, lines, _, _ = run_isolated(["shard", "-q", "-n", "2", "-o", str(out), str(src)], tmp_path)
    assert status == 1 and len(lines) == 1 and "use --force" in lines[0]
    assert len([n for n in os.listdir(out) if n.startswith("shard_")]) == 16  # untouched
    status, lines, _, _ = run_isolated(["shard", "-q", "-n", "2", "--force", "-o", str(out), str(src)], tmp_path)
    assert status == 0, lines
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "manifest.tsv", "shard_000.bam", "shard_001.bam", "unassigned.bam"]


def test_count_claims_its_folder_as_shard_does(tmp_path):
    """count's folder: an earlier run's tables are refused, then replaced whole
    with --force (no stale table of a format no longer asked for)."""
    example = os.path.join(os.path.dirname(__file__), "..", "test_data", "example.bam")
    out = tmp_path / "counts"
    assert run_isolated(["count", "-q", "--formats", "mtx,tsv", "-o", str(out), example], tmp_path)[0] == 0
    status, lines, _, _ = run_isolated(["count", "-q", "--formats", "tsv", "-o", str(out), example], tmp_path)
    assert status == 1 and len(lines) == 1 and "use --force" in lines[0]
    status, lines, _, _ = run_isolated(["count", "-q", "--formats", "tsv", "--force", "-o", str(out), example], tmp_path)
    assert status == 0, lines
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["counts.tsv"]


def test_timeout_on_the_command_line_stops_a_stalled_run(tmp_path):
    fifo = tmp_path / "never.bam"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that never writes: the reader waits forever
    try:
        started = time.monotonic()
        status, lines, sid, _ = run_isolated(["shard", "-q", "--timeout", "2", "-o", str(tmp_path / "s"), str(fifo)],
                                             tmp_path)
    finally:
        os.close(writer)
    assert time.monotonic() - started < 30
    assert status == 1 and len(lines) == 1 and "timed out" in lines[0]
    assert not (tmp_path / "s").exists()
    assert processes_in_session(sid) == []


def test_a_closed_stdout_ends_quietly(tmp_path):
    src = hostile.write(tmp_path, "big.bam", hostile.bgzf(hostile.header() + b"".join(hostile.good_records(20000))))
    (tmp_path / "ident.py").write_text("def keep(read):\n    return read\n")
    p = subprocess.Popen(["bamflow", "run", "-q", f"{tmp_path / 'ident.py'}:keep", str(src), "-o", "-"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    p.stdout.read(100)  # like `| head -c 100`
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=TIMEOUT)
    assert p.returncode == 141 and err.strip() == b""
