"""The bamflow command line: in-process (typer's CliRunner) and as a real
subprocess, with pipes, the live display and every exit status."""

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pysam
import pytest
import typer
from bamfiles import read_records, write_bam
from bamflow.cli.display import ProgressDisplay
from bamflow.cli.main import app
from rich.console import Console
from typer.testing import CliRunner

from bamflow.engine.progress import JobProgress

runner = CliRunner()
SAMTOOLS = shutil.which("samtools")


def cells_of(path):
    with pysam.AlignmentFile(str(path), check_sq=False) as f:
        return [(r.query_name, r.get_tag("CB") if r.has_tag("CB") else None) for r in f]


@pytest.fixture
def bam(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=3000, no_cb=0.05, n_cells=60)
    return src, reads


def test_shard_is_an_exact_partition_with_manifest(tmp_path, bam):
    src, reads = bam
    out = tmp_path / "shards"
    result = runner.invoke(app, ["shard", "--by", "CB", "-n", "4", "-o", str(out), str(src), "--stats", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    shards = sorted(p for p in os.listdir(out) if p.startswith("shard_"))
    assert shards == [f"shard_{i:03d}.bam" for i in range(4)]
    where = {}
    names = []
    for name in shards:
        for read_name, cb in cells_of(out / name):
            assert cb is not None
            assert where.setdefault(cb, name) == name, f"cell {cb} is in two shards"
            names.append(read_name)
    unassigned = cells_of(out / "unassigned.bam")
    assert all(cb is None for _, cb in unassigned)
    names += [n for n, _ in unassigned]
    assert Counter(names) == Counter(r.query_name for r in reads)
    # the manifest agrees with an independent count
    expected = Counter(r.get_tag("CB") for r in reads if r.has_tag("CB"))
    rows = [line.rstrip("\n").split("\t") for line in open(out / "manifest.tsv")][1:]
    assert {v: int(n) for v, _, n in rows} == dict(expected)
    assert {v: s for v, s, _ in rows} == where
    stats = json.load(open(tmp_path / "s.json"))
    assert stats["reads_in"] == len(reads) and stats["reads_written"] == len(reads)
    assert "balance" in result.stderr and "max/mean" in result.stderr
    for name in shards:
        assert subprocess.run([SAMTOOLS, "quickcheck", str(out / name)]).returncode == 0


def test_shard_from_a_samtools_pipe_as_a_subprocess(tmp_path, bam):
    src, reads = bam
    out = tmp_path / "shards"
    producer = subprocess.Popen([SAMTOOLS, "view", "-u", str(src)], stdout=subprocess.PIPE)
    done = subprocess.run(
        ["bamflow", "shard", "--by", "CB", "-n", "3", "--missing", "drop", "-q", "-o", str(out), "-"],
        stdin=producer.stdout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    producer.stdout.close()
    assert producer.wait(timeout=30) == 0
    assert done.returncode == 0, done.stderr
    got = [n for i in range(3) for n, _ in cells_of(out / f"shard_{i:03d}.bam")]
    assert Counter(got) == Counter(r.query_name for r in reads if r.has_tag("CB"))
    assert not (out / "unassigned.bam").exists()
    dropped = sum(1 for r in reads if not r.has_tag("CB"))
    assert f"{dropped:,} dropped" in done.stderr
    assert done.stdout == ""
    pg = read_records(out / "shard_000.bam")[0]["PG"][-1]
    assert pg["PN"] == "bamflow" and pg["CL"] == f"bamflow shard --by CB -n 3 --missing drop -q -o {out} -"


def test_shard_by_read_name_keeps_mates_together(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=800)
    out = tmp_path / "shards"
    result = runner.invoke(app, ["shard", "--by", "name", "-n", "5", "-o", str(out), str(src), "--progress", "none"])
    assert result.exit_code == 0, result.output
    assert not (out / "manifest.tsv").exists() and not (out / "unassigned.bam").exists()
    total = sum(len(read_records(out / f"shard_{i:03d}.bam")[1]) for i in range(5))
    assert total == len(reads)


def test_run_a_function_from_a_file(tmp_path, bam):
    src, reads = bam
    script = tmp_path / "my_fix.py"
    script.write_text("def fix(read):\n    read.set_tag('XF', read.query_name.upper())\n    return read\n")
    out = tmp_path / "out.bam"
    result = runner.invoke(app, ["run", f"{script}:fix", "-w", "3", str(src), "-o", str(out), "--progress", "log"])
    assert result.exit_code == 0, result.output
    assert read_records(out)[1] == [r.to_string() + f"\tXF:Z:{r.query_name.upper()}" for r in reads]
    assert [pg["PN"] for pg in read_records(out)[0]["PG"]].count("bamflow") == 1


def test_live_display_shows_a_row_per_worker(tmp_path, bam):
    src, _ = bam
    script = tmp_path / "slowish.py"
    script.write_text("def f(read):\n    return read\n")
    result = runner.invoke(
        app, ["run", f"{script}:f", "-w", "3", str(src), "-o", str(tmp_path / "o.bam"), "--progress", "live"]
    )
    assert result.exit_code == 0, result.output
    for row in ("BAM_reader0", "dist0", "worker0", "worker1", "worker2", "collect0", "BAM_writer0"):
        assert row in result.stderr
    assert "rec/s" in result.stderr and "CPU" in result.stderr and "bottleneck" in result.stderr


def test_display_on_a_forced_terminal():
    """Rows, states, rates and the overall bar, from snapshots as the supervisor sends them."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120, color_system=None)
    snap = [
        JobProgress("w.BAM_reader0", "running", 0, 500 << 20, 0, 0, 1.0),
        JobProgress("w.worker0", "running", 1000, 10 << 20, 0, 3 << 20, 1.0),
        JobProgress("w.worker1", "failed", 10, 1 << 20, 0, 0, 1.0),
    ]
    later = [
        JobProgress("w.BAM_reader0", "running", 0, 750 << 20, 0, 0, 2.0),
        JobProgress("w.worker0", "running", 501000, 60 << 20, 0, 2 << 20, 2.0),
        JobProgress("w.worker1", "failed", 10, 1 << 20, 0, 0, 1.0),
    ]
    with ProgressDisplay(console, "live", 1000 << 20, "test") as display:
        display(snap)
        display(later)
    text = buffer.getvalue()
    for expected in ("worker0", "worker1", "failed", "running", "501.0k", "75%", "ETA"):
        assert expected in text


def test_usage_errors_exit_2(tmp_path, bam):
    src, _ = bam
    cases = [
        ["shard", "-"],  # stdin has no name to name the output folder after: -o is needed
        ["shard", "-o", str(tmp_path / "x"), "--level", "13", str(src)],
        ["shard", "-o", str(tmp_path / "x"), "--missing", "ignore", str(src)],
        ["shard", "-o", str(tmp_path / "x"), str(tmp_path / "missing.bam")],
        ["shard", "-o", str(tmp_path / "x"), "--bogus", str(src)],
        ["run", "no_colon", str(src), "-o", str(tmp_path / "o.bam")],
        ["run", "not_a_module_xyz:f", str(src), "-o", str(tmp_path / "o.bam")],
        ["run", "os:f", str(src), "-o", str(tmp_path / "o.bam"), "--order", "sideways"],
        ["dedup", "--method", "bogus", str(src), "-o", str(tmp_path / "o.bam")],
        ["shard", "--by", "CBX", "-o", str(tmp_path / "x"), str(src)],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
    assert not (tmp_path / "o.bam").exists()


def test_runtime_error_is_one_line_and_exit_1(tmp_path, bam):
    src, _ = bam
    broken = tmp_path / "broken.bam"
    broken.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "shards"
    result = runner.invoke(app, ["shard", "-o", str(out), "-q", str(broken)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bamflow shard: error: job 'shard.BAM_reader0' failed")
    assert "Traceback" not in result.stderr
    assert not out.exists()  # the failed run removed the folder it made
    debug = runner.invoke(app, ["shard", "-o", str(out), "-q", "--debug", str(broken)])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_version_and_help():
    done = subprocess.run(["bamflow", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("shard", "run"):
        assert command in done.stdout
    assert "bamflow shard --by CB" in done.stdout
    assert subprocess.run([sys.executable, "-m", "bamflow.cli", "--version"], capture_output=True, text=True).returncode in (0, 1)


def test_split_and_filter_commands(tmp_path, bam):
    src, reads = bam
    per_cell = Counter(r.get_tag("CB") for r in reads if r.has_tag("CB"))
    big = sorted(cb for cb, n in per_cell.items() if n >= 50)
    assert 0 < len(big) < len(per_cell)
    out = tmp_path / "cells"
    result = runner.invoke(app, ["split", "--by", "CB", "--min-reads", "50", "-o", str(out), str(src), "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p[:-4] for p in os.listdir(out) if p.endswith(".bam")) == big
    for cb in big[:3]:
        assert [c for _, c in cells_of(out / f"{cb}.bam")] == [cb] * per_cell[cb]
    listed = tmp_path / "keep.txt"
    listed.write_text("\n".join(big[:5]) + "\n")
    for invert in (False, True):
        subset = tmp_path / f"subset{invert}.bam"
        args = ["filter", "--barcodes", str(listed), str(src), "-o", str(subset), "-q"] + (["--invert"] if invert else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        kept = [n for n, _ in cells_of(subset)]
        expected = [r.query_name for r in reads if r.has_tag("CB") and (r.get_tag("CB") in big[:5]) != invert]
        assert kept == expected
    assert runner.invoke(app, ["filter", str(src), "-o", str(tmp_path / "x.bam")]).exit_code == 2  # no --barcodes
    bad = runner.invoke(app, ["split", "-o", str(out), "--barcodes", str(listed), "--groups", str(listed), str(src)])
    assert bad.exit_code == 2


def test_histogram_and_tag_commands(tmp_path, bam):
    src, reads = bam
    out = tmp_path / "hist.txt"
    result = runner.invoke(app, ["histogram", "--tag", "CB", str(src), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text().splitlines() if not line.startswith("#")]
    counted = {value: int(n) for n, value in rows}
    assert counted == dict(Counter(r.get_tag("CB") for r in reads if r.has_tag("CB") and not r.is_secondary))
    assert [int(n) for n, _ in rows] == sorted((int(n) for n, _ in rows), reverse=True)

    r1, r2 = tmp_path / "r1.fq", tmp_path / "r2.fq"
    with open(r1, "w") as f1, open(r2, "w") as f2:
        for i in range(200):
            f1.write(f"@p{i} 1:N\n{'ACGT' * 7}\n+\n{'I' * 28}\n")
            f2.write(f"@p{i} 2:N\n{'GATTACA' * 10}\n+\n{'F' * 70}\n")
    ubam = tmp_path / "u.bam"
    result = runner.invoke(app, ["tag", "--layout", "10x-v3", str(r1), str(r2), "-o", str(ubam), "-q"])
    assert result.exit_code == 0, result.output
    with pysam.AlignmentFile(str(ubam), check_sq=False) as f:
        tagged = list(f)
    assert [r.query_name for r in tagged] == [f"p{i}" for i in range(200)]
    assert {(r.get_tag("CR"), r.get_tag("UR")) for r in tagged} == {(("ACGT" * 7)[:16], ("ACGT" * 7)[16:28])}
    assert runner.invoke(app, ["tag", str(r1), str(tmp_path / "nope.fq"), "-o", str(ubam)]).exit_code == 2


def test_dedup_and_count_commands(tmp_path):
    src = tmp_path / "in.bam"
    write_bam(src, n=1500, order="coordinate")
    out = tmp_path / "dedup.bam"
    result = runner.invoke(app, ["dedup", str(src), "-o", str(out), "-q", "--stats", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    stats = json.load(open(tmp_path / "d.json"))
    assert stats["reads_in"] == 1500 and stats["reads_in"] == stats["kept"] + sum(stats["dropped"].values())
    assert len(read_records(out)[1]) == stats["kept"]
    counts = tmp_path / "counts"
    result = runner.invoke(app, ["count", "--gene-tag", "GN", "--name-tag", "GN", str(src), "-o", str(counts), "-q"])
    assert result.exit_code == 0, result.output
    assert {"matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz", "counts.tsv"} <= set(os.listdir(counts))


def test_qc_command(tmp_path):
    src = tmp_path / "in.bam"
    write_bam(src, n=1200, order="coordinate")
    out = tmp_path / "qc"
    result = runner.invoke(app, ["qc", "--gene-tag", "GN", "--min-umis", "5", str(src), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.load(open(out / "summary.json"))
    assert summary["reads_in"] == 1200
    rows = [line.split("\t") for line in (out / "per_cell.tsv").read_text().splitlines()[1:]]
    assert {row[0] for row in rows} == {cb for _, cb in cells_of(src) if cb}
    assert (out / "report.html").read_text().count("<svg") >= 1


# -- the shared options: declared once, taken by every command ------------------------------------

COMMANDS = ("shard", "split", "filter", "tag", "correct", "histogram", "dedup", "count", "qc", "run")
WITHOUT_LEVEL = ("histogram", "count", "qc")  # their functions take no compression level


def click_commands():
    return typer.main.get_command(app).commands


def options_of(command):
    return {param.name: param for param in click_commands()[command].params}


def test_every_command_takes_the_shared_options():
    assert set(COMMANDS) <= set(click_commands())  # (and the UMI commands' others: group, count-tab)
    for command in COMMANDS:
        params = options_of(command)
        names = list(params)
        shared = ["threads", "level", "stats", "quiet", "progress", "debug", "timeout"]
        if command in WITHOUT_LEVEL:
            shared.remove("level")
        assert names[-len(shared) :] == shared, (command, names)  # after the command's own, in this order
        assert params["threads"].opts == ["-@", "--threads"] and params["threads"].default == 2
        assert params["stats"].opts == ["--stats"] and params["stats"].default is None
        assert params["quiet"].opts == ["-q", "--quiet"] and params["quiet"].default is False
        assert params["progress"].opts == ["--progress"] and params["progress"].default == "auto"
        assert params["debug"].opts == ["--debug"] and params["debug"].default is False
        assert params["timeout"].opts == ["--timeout"] and params["timeout"].default is None
        if "level" in params:
            assert params["level"].opts == ["--level"] and params["level"].default is None
        assert params["output"].opts[:2] == ["-o", "--output"]  # (dedup and count add umi_tools' -S/--stdout)
        if command not in ("dedup", "count"):  # (the UMI commands: cli/umi_commands.py)
            assert not params["output"].required  # a folder named after the input, or stdout
        for param in params.values():
            assert param.param_type_name == "argument" or param.help, (command, param.name)  # every option explains itself
        if "workers" in params:
            assert params["workers"].opts == ["-w", "--workers"]
            assert params["workers"].default == (1 if command == "histogram" else 2)
        help_text = runner.invoke(app, [command, "--help"]).output
        for flag in ("--threads", "--stats", "--quiet", "--progress", "--debug", "--timeout", "--output"):
            assert flag in help_text, (command, flag)
        assert ("--level" in help_text) == (command not in WITHOUT_LEVEL)


def test_shared_options_are_checked_before_the_run(tmp_path, bam, monkeypatch):
    src, _ = bam
    import bamflow.bam.shard

    def never(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(bamflow.bam.shard, "shard", never)
    out = tmp_path / "shards"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--stats", str(tmp_path / "no" / "such" / "folder" / "s.json")], "--stats"),
        (["--stats", str(a_file / "s.json")], "--stats"),
        (["--stats", str(tmp_path)], "--stats"),
        (["--level", "fastest"], "--level"),
        (["--level", "-1"], "--level"),
        (["--progress", "sometimes"], "--progress"),
        (["-@", "0"], "--threads"),
    ]
    for extra, hint in cases:
        result = runner.invoke(app, ["shard", "-o", str(out), str(src), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert hint in result.stderr, (extra, result.stderr)
    assert not out.exists()


def test_stats_to_a_read_only_folder_exits_2_before_the_run(tmp_path, bam, monkeypatch):
    src, _ = bam
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: let access() answer as for anyone else
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and os.fspath(path) != str(locked))
    try:
        result = runner.invoke(app, ["shard", "-o", str(tmp_path / "shards"), str(src), "--stats", str(locked / "s.json")])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2 and "cannot write to the folder" in result.stderr
    assert not (tmp_path / "shards").exists()


def test_stats_file_is_published_only_when_the_run_succeeds(tmp_path, bam):
    src, reads = bam
    broken = tmp_path / "broken.bam"
    broken.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    stats = stats_dir / "run.json"
    (tmp_path / "cells.txt").write_text("AAAA\n")
    for command in (["filter", "--barcodes", str(tmp_path / "cells.txt")], ["histogram"]):
        failed = runner.invoke(app, [*command, str(broken), "-o", str(tmp_path / "out"), "-q", "--stats", str(stats)])
        assert failed.exit_code == 1, failed.output
        assert len(failed.stderr.strip().splitlines()) == 1 and failed.stderr.startswith(f"bamflow {command[0]}: error: ")
        assert os.listdir(stats_dir) == []  # neither the stats file nor a temporary one
    done = runner.invoke(app, ["histogram", str(src), "-o", str(tmp_path / "hist.txt"), "-q", "--stats", str(stats)])
    assert done.exit_code == 0, done.output
    assert os.listdir(stats_dir) == ["run.json"]
    written = json.loads(stats.read_text())
    assert written["reads_in"] == len(reads) and written["seconds"] > 0


def test_shared_options_reach_the_python_api(tmp_path, bam, monkeypatch):
    """threads, the parsed level, the command line and the display go to the function; the
    input is checked and the summary printed, the same for every command."""
    src, _ = bam
    import bamflow.presets.dedup

    seen = {}

    def fake_dedup(input, output, **kwargs):
        seen.update(kwargs, input=input, output=output)
        return {"reads_in": 10, "written": 7, "kept": 7, "mates": 0, "workers": 5, "dropped": {"duplicate": 3}}

    monkeypatch.setattr(bamflow.presets.dedup, "dedup", fake_dedup)
    args = ["dedup", str(src), "-o", "-", "-@", "3", "-w", "5", "--method", "unique", "-q"]
    # the @PG command line is the process's own argv, which CliRunner does not set
    monkeypatch.setattr(sys, "argv", ["/usr/bin/bamflow", *args, "--level", "fast"])
    result = runner.invoke(app, [*args, "--level", "fast"])
    assert result.exit_code == 0, result.output
    assert seen["threads"] == 3 and seen["level"] == "fast" and seen["workers"] == 5 and seen["method"] == "unique"
    assert callable(seen["on_progress"])
    assert seen["command_line"] == f"bamflow dedup {src} -o - -@ 3 -w 5 --method unique -q --level fast"
    assert seen["input"] == str(src) and seen["output"] == "-"
    assert result.stderr.startswith("bamflow dedup: 10 reads in, 7 written, 3 dropped")
    seen.clear()
    assert runner.invoke(app, [*args, "--level", "9"]).exit_code == 0
    assert seen["level"] == 9  # parsed to an int


# -- conventions: outputs without -o, -h, one name per concept, each command's key numbers ----------


def test_shard_as_the_user_wrote_it_writes_a_folder_named_after_the_input(tmp_path, bam, monkeypatch):
    src, reads = bam
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["shard", "--by", "CB", "in.bam", "-q"])
    assert result.exit_code == 0, result.output
    shards = tmp_path / "in.shards"
    assert {"manifest.tsv", "shard_000.bam", "unassigned.bam"} <= {p.name for p in shards.iterdir()}
    assert len([p for p in shards.iterdir() if p.name.startswith("shard_")]) == 16
    assert "output in.shards" in result.stderr
    result = runner.invoke(app, ["split", "--by", "CB", "--min-reads", "50", "in.bam", "-q"])
    assert result.exit_code == 0, result.output
    assert any(p.suffix == ".bam" for p in (tmp_path / "in.cells").iterdir())


def test_one_output_goes_to_stdout_unless_it_is_a_terminal(tmp_path, bam):
    import pty

    src, reads = bam
    keep = tmp_path / "keep.txt"
    cells = sorted({r.get_tag("CB") for r in reads if r.has_tag("CB")})[:3]
    keep.write_text("\n".join(cells) + "\n")
    with open(tmp_path / "subset.bam", "wb") as out:
        done = subprocess.run(["bamflow", "filter", "--barcodes", str(keep), str(src), "-q"], stdout=out,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [c for _, c in cells_of(tmp_path / "subset.bam")] == [r.get_tag("CB") for r in reads
                                                               if r.has_tag("CB") and r.get_tag("CB") in cells]
    primary, secondary = pty.openpty()  # stdout a terminal: binary data there helps no one
    try:
        done = subprocess.run(["bamflow", "filter", "--barcodes", str(keep), str(src)], stdout=secondary,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(primary)
        os.close(secondary)
    assert done.returncode == 2 and "-o" in done.stderr and "terminal" in done.stderr


def test_dash_h_is_help():
    for args in (["-h"], ["shard", "-h"], ["qc", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_shell_completion():
    env = dict(os.environ, _BAMFLOW_COMPLETE="complete_bash", COMP_WORDS="bamflow sh", COMP_CWORD="1")
    done = subprocess.run(["bamflow"], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["shard"]
    env.update(COMP_WORDS="bamflow qc --umi", COMP_CWORD="2")
    done = subprocess.run(["bamflow"], env=env, capture_output=True, text=True, timeout=60)
    assert "--umi-tag" in done.stdout.split()
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_one_name_per_concept():
    from bamflow.cli.common import UMI_SOURCE

    for command in ("qc", "count"):
        assert "--umi-tag" in options_of(command)["umi_tag"].opts
    assert options_of("qc")["umi_tag"].opts == ["--umi-tag", "--umi"]  # the old spelling still works
    assert options_of("qc")["gene_name_tag"].opts == ["--gene-name-tag", "--name-tag"]
    for command in ("filter", "histogram"):
        assert options_of(command)["tag"].opts == ["--by", "--tag"]  # the key, as shard, split and run call it
    parse = UMI_SOURCE.callback
    assert [parse(v) for v in ("UB", "tag:UB", "read_name", "read_name_cell")] == [
        "tag:UB", "tag:UB", "read_name", "read_name_cell"]


def test_each_command_shows_its_own_key_numbers(tmp_path, bam, monkeypatch):
    src, _ = bam
    import bamflow.presets.correct

    def fake_correct(input, output, **kwargs):
        return {"reads_in": 10, "written": 10, "dropped": {}, "exact": 6, "corrected": 2, "ambiguous": 1,
                "uncorrectable": 1, "missing_tag": 0, "whitelist": 4, "barcodes_seen": 5}

    monkeypatch.setattr(bamflow.presets.correct, "correct", fake_correct)
    wl = tmp_path / "wl.txt"
    wl.write_text("AAAA\n")
    result = runner.invoke(app, ["correct", "--whitelist", str(wl), str(src), "-o", str(tmp_path / "c.bam")])
    assert result.exit_code == 0, result.output
    for row in ("exact", "corrected", "ambiguous", "uncorrectable"):
        assert row in result.stderr
    quiet = runner.invoke(app, ["correct", "--whitelist", str(wl), str(src), "-o", str(tmp_path / "c.bam"), "-q"])
    assert "exact 6, corrected 2, ambiguous 1, uncorrectable 1" in quiet.stderr


def test_drop_reasons_are_spelled_one_way(tmp_path, bam):
    from bamflow.cli.common import drop_reasons

    src, _ = bam
    keep = tmp_path / "keep.txt"
    keep.write_text("NOT-A-CELL\n")
    result = runner.invoke(app, ["filter", "--barcodes", str(keep), str(src), "-o", str(tmp_path / "f.bam")])
    assert result.exit_code == 0, result.output
    assert "dropped: not_listed" in result.stderr and "dropped: missing_tag" in result.stderr
    assert drop_reasons({"not listed": 1, "not_selected": 2, "missing tag": 3, "secondary": 4, "no_umi": 0}) == {
        "not_listed": 3, "missing_tag": 3, "not_primary": 4}


def test_qc_writes_its_folder_cells_and_web_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_bam(tmp_path / "in.bam", n=1500, order="coordinate")
    result = runner.invoke(app, ["qc", "--gene-tag", "GN", "--min-umis", "5", "in.bam"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "in.qc"
    summary = json.load(open(out / "summary.json"))
    cells = (out / "cells.txt").read_text().split()
    assert len(cells) == summary["cells"] > 0
    for key in ("cells", "median umis per cell", "saturation", "report"):
        assert key in result.stderr
    counts = runner.invoke(app, ["count", "--gene-tag", "GN", "--cells", str(out / "cells.txt"), "in.bam", "-o", "counts", "-q"])
    assert counts.exit_code == 0, counts.output
    import gzip

    with gzip.open(tmp_path / "counts" / "barcodes.tsv.gz", "rt") as f:
        assert set(f.read().split()) <= set(cells)
