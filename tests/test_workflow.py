"""End-to-end behaviour of the engine with real processes and real FIFOs.

Ported from mrfifo's suite (line counting over 4 workers, distribute → work →
collect, header routing, sub-workflows) with real assertions, under both the
fork and spawn start methods.
"""

import gzip
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import assert_clean, write_lines
from jobfuncs import (
    count_by_key,
    count_lines,
    drop_every_other,
    duplicate_lines,
    is_header,
    pass_through,
    pipe_sizes,
    produce_lines,
    read_text_file,
    record_header_and_pass,
    unmanaged_copy,
    unmanaged_pipe_size,
    upper_case,
    write_text_file,
)

import bamflow as bf
from bamflow import FIFO, Workflow, WorkflowError


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def test_seed_example_text_version(tmp_path, fifo_dir, start_method):
    """mrfifo's README example (BAM_reconstruct), almost verbatim, on SAM text."""
    sam = tmp_path / "tiny.sam"
    header, body = write_lines(sam, 2000)
    out = tmp_path / "reconstruct.sam"
    mf = bf
    n = 4
    chunk_size = 1
    w = (
        mf.Workflow("BAM_reconstruct", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(sam), output=mf.FIFO("input_sam", "wb"))
        .distribute(
            input=mf.FIFO("input_sam", "rt"),
            outputs=mf.FIFO("dist{n}", "wt", n=n),
            chunk_size=chunk_size,
            header_detect_func=is_header,
            header_broadcast=False,
            header_fifo=mf.FIFO("header", "wt"),
        )
        .workers(
            input=mf.FIFO("dist{n}", "rt"),
            output=mf.FIFO("out{n}", "wt"),
            func=pass_through,
            n=n,
        )
        .collect(
            inputs=mf.FIFO("out{n}", "rt", n=n),
            header_fifo=mf.FIFO("header", "rt"),
            output=mf.FIFO("out_sam", "wt"),
            chunk_size=chunk_size,
            order="round-robin",
        )
        .funnel(
            input=mf.FIFO("out_sam", "rt"),
            output=str(out),
            _manage_fifos=False,
            func=mf.parts.write_file,
        )
        .run()
    )
    assert read(out) == header + body  # round-robin collect restores the order
    assert [w.result_dict[f"BAM_reconstruct.worker{i}"] for i in range(n)] == [len(body[i::n]) for i in range(n)]
    assert w.result_dict["BAM_reconstruct.dist0"]["header_lines"] == len(header)
    assert_clean(fifo_dir, tmp_path)


def test_lines_counted_across_four_workers(tmp_path, fifo_dir, start_method):
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 5000, header=())
    w = (
        Workflow("count", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("dist{n}", "wb", n=4), chunk_size=7)
        .workers(input=FIFO("dist{n}", "rt"), func=count_lines, n=4)
        .run()
    )
    counts = w.results("count.worker*")
    assert sum(counts) == len(body)
    # chunks of 7 lines go round-robin, so each worker's share is known
    expected = [sum(1 for j in range(len(body)) if (j // 7) % 4 == i) for i in range(4)]
    assert counts == expected
    assert w.reduce() == len(body)
    assert_clean(fifo_dir)


@pytest.mark.parametrize("order", ["any", "round-robin"])
def test_distribute_work_collect(tmp_path, fifo_dir, start_method, order):
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 3000, header=())
    out = tmp_path / "out.txt"
    (
        Workflow("dwc", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("dist{n}", "wb", n=3), chunk_size=5)
        .workers(input=FIFO("dist{n}", "rt"), output=FIFO("out{n}", "wt"), func=upper_case, n=3)
        .collect(inputs=FIFO("out{n}", "rb", n=3), output=str(out), order=order, chunk_size=5)
        .run()
    )
    expected = [line.upper() for line in body]
    got = read(out)
    if order == "round-robin":
        assert got == expected
    else:
        assert Counter(got) == Counter(expected)
    assert_clean(fifo_dir, tmp_path)


def test_header_to_fifo_and_broadcast(tmp_path, fifo_dir, start_method):
    """Header lines reach every worker (broadcast) and the collector (header FIFO)."""
    src = tmp_path / "in.sam"
    header, body = write_lines(src, 400)
    out = tmp_path / "out.sam"
    w = (
        Workflow("hdr", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(
            input=FIFO("input", "rb"),
            outputs=FIFO("dist{n}", "wb", n=3),
            header_prefix="@",
            header_broadcast=True,
            header_fifo=FIFO("header", "wb"),
        )
        .workers(input=FIFO("dist{n}", "rt"), output=FIFO("out{n}", "wt"), func=record_header_and_pass, n=3)
        .collect(inputs=FIFO("out{n}", "rb", n=3), header_fifo=FIFO("header", "rb"), output=str(out))
        .run()
    )
    for i in range(3):
        assert w.result_dict[f"hdr.worker{i}"] == header
    got = read(out)
    # the header FIFO comes first; each worker also passed on its broadcast copy
    assert got[: len(header)] == header
    assert Counter(got[len(header) :]) == Counter(body + header * 3)
    assert_clean(fifo_dir, tmp_path)


def test_utf8_and_invalid_bytes_in_header_survive(tmp_path, fifo_dir):
    """A header predicate sees str even for bytes that are not UTF-8; bytes pass unchanged."""
    src = tmp_path / "in.sam"
    raw = b"@HD\tVN:1.6\n@CO\tgr\xc3\xbc\xc3\x9fe \xff\xfe broken\nr1\tx\n@not-header-after-body\n"
    src.write_bytes(raw)
    out = tmp_path / "out.sam"
    (
        Workflow("utf8", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(
            input=FIFO("input", "rb"),
            outputs=FIFO("dist{n}", "wb", n=2),
            header_detect_func=is_header,
            header_fifo=FIFO("header", "wb"),
        )
        .workers(input=FIFO("dist{n}", "rt"), output=FIFO("out{n}", "wt"), func=pass_through, n=2)
        .collect(inputs=FIFO("out{n}", "rb", n=2), header_fifo=FIFO("header", "rb"), output=str(out), order="round-robin")
        .run()
    )
    assert out.read_bytes() == raw
    assert_clean(fifo_dir, tmp_path)


def test_distribute_by_key_keeps_keys_together(tmp_path, fifo_dir, start_method):
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 4000, header=(), keys=37)
    out = tmp_path / "out.txt"
    w = (
        Workflow("bykey", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("dist{n}", "wb", n=4), by=0)
        .workers(input=FIFO("dist{n}", "rt"), output=FIFO("out{n}", "wt"), func=count_by_key, n=4)
        .collect(inputs=FIFO("out{n}", "rb", n=4), output=str(out))
        .run()
    )
    per_worker = w.results("bykey.worker*")
    seen = Counter()
    for counts in per_worker:
        for key in counts:
            seen[key] += 1
    assert all(v == 1 for v in seen.values()), "a key reached more than one worker"
    assert w.reduce() == dict(Counter(line.split("\t")[0] for line in body))
    assert Counter(read(out)) == Counter(body)
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.parametrize("worker", [drop_every_other, duplicate_lines])
@pytest.mark.parametrize("order", ["any", "round-robin"])
def test_workers_that_drop_or_add_lines_never_deadlock_the_collector(tmp_path, fifo_dir, worker, order):
    """mrfifo's round-robin collect hangs here; every line written must arrive."""
    src = tmp_path / "in.txt"
    # enough data to fill the pipes many times over
    header, body = write_lines(src, 200_000, header=())
    out = tmp_path / "out.txt"
    w = (
        Workflow("skew", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("dist{n}", "wb", n=2))
        # worker 0 changes the line count, worker 1 passes through
        .add_job(input=FIFO("dist0", "rt"), output=FIFO("out0", "wt"), func=worker)
        .add_job(input=FIFO("dist1", "rt"), output=FIFO("out1", "wt"), func=pass_through)
        .collect(inputs=FIFO("out{n}", "rb", n=2), output=str(out), order=order)
        .run(timeout=60)
    )
    share0, share1 = body[0::2], body[1::2]
    expected0 = share0[0::2] if worker is drop_every_other else [x for line in share0 for x in (line, line)]
    assert Counter(read(out)) == Counter(expected0 + share1)
    stats = w.result_dict["skew.collect0"]
    assert stats["lines"] == len(expected0) + len(share1)
    assert_clean(fifo_dir, tmp_path)


def test_three_hundred_outputs(tmp_path, fifo_dir):
    """mrfifo segfaults past 128 outputs; there is no fixed cap here."""
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 3000, header=())
    out = tmp_path / "out.txt"
    w = (
        Workflow("wide", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("d{n}", "wb", n=300))
        .collect(inputs=FIFO("d{n}", "rb", n=300), output=str(out), order="round-robin")
        .run(timeout=60)
    )
    assert read(out) == body
    assert w.result_dict["wide.dist0"]["per_output"] == [len(body[i::300]) for i in range(300)]
    assert_clean(fifo_dir, tmp_path)


def test_many_workers(tmp_path, fifo_dir):
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 2000, header=())
    out = tmp_path / "out.txt"
    (
        Workflow("many", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("d{n}", "wb", n=40))
        .workers(input=FIFO("d{n}", "rt"), output=FIFO("o{n}", "wt"), func=pass_through, n=40)
        .collect(inputs=FIFO("o{n}", "rb", n=40), output=str(out), order="round-robin")
        .run(timeout=60)
    )
    assert read(out) == body
    assert_clean(fifo_dir, tmp_path)


def test_subworkflows_run_in_declaration_order(tmp_path, fifo_dir, start_method):
    """A sub-workflow starts only after the jobs declared before it have finished."""
    first = tmp_path / "first.txt"
    second = tmp_path / "second.txt"
    w = Workflow("main", start_method=start_method, tmp_dir=fifo_dir)
    w.add_job(func=write_text_file, output=bf.OutputFile(str(first)), text="hello\n")
    sub = w.subworkflow("sub")
    # reads the file the main workflow wrote: it must exist and be complete
    sub.add_job(func=produce_lines, output=FIFO("lines", "wt"), n=3, prefix="x")
    sub.funnel(input=FIFO("lines", "rb"), output=str(second))
    w.add_job(func=read_text_file, input=bf.InputFile(str(second)))
    w.run()
    assert first.read_text() == "hello\n"
    assert second.read_text() == "x0\nx1\nx2\n"
    assert w.result_dict["main.job1"] == "x0\nx1\nx2\n"
    assert w.result_dict["sub.job0"] == 3
    assert [len(p) for p in w.phases()] == [1, 2, 1]
    assert_clean(fifo_dir, tmp_path)


def test_fifo_may_not_cross_a_subworkflow(tmp_path, fifo_dir):
    w = Workflow("cross", tmp_dir=fifo_dir)
    w.add_job(func=produce_lines, output=FIFO("lines", "wt"))
    w.subworkflow("sub").funnel(input=FIFO("lines", "rb"), output=str(tmp_path / "x.txt"))
    with pytest.raises(WorkflowError, match="FIFO 'lines' is written by cross.job0 but read by no job"):
        w.run()
    assert_clean(fifo_dir, tmp_path)


def test_unmanaged_fifos_receive_paths(tmp_path, fifo_dir, start_method):
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 500, header=())
    out = tmp_path / "out.txt"
    w = (
        Workflow("unmanaged", start_method=start_method, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .add_job(input=FIFO("input", "rb"), output=FIFO("copied", "wb"), func=unmanaged_copy, manage_fifos=False)
        .funnel(input=FIFO("copied", "rb"), output=str(out))
        .run()
    )
    assert read(out) == body
    assert w.result_dict["unmanaged.job0"] == len(body)
    assert_clean(fifo_dir, tmp_path)


@pytest.mark.parametrize("compress", [True, False])
def test_gz_reader_reads_gzip_and_plain_text(tmp_path, fifo_dir, compress):
    plain = tmp_path / "in.txt"
    header, body = write_lines(plain, 3000)
    src = plain
    if compress:
        src = tmp_path / "in.txt.gz"
        # two gzip members, as bgzip and cat-ed files make
        data = plain.read_bytes()
        src.write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]))
    out = tmp_path / "out.txt"
    (
        Workflow("gz", tmp_dir=fifo_dir)
        .gz_reader(inputs=[str(src), str(src)], output=FIFO("input", "wb"))
        .funnel(input=FIFO("input", "rb"), output=str(out))
        .run()
    )
    assert read(out) == (header + body) * 2
    assert_clean(fifo_dir, tmp_path)


def test_reader_from_stdin_to_stdout(tmp_path):
    """'-' means stdin and stdout, for readers and outputs alike."""
    script = (
        "import bamflow as bf\n"
        "bf.Workflow('pipe').gz_reader(input='-', output=bf.FIFO('i', 'wb'))"
        ".funnel(input=bf.FIFO('i', 'rb'), output='-').run()\n"
    )
    data = b"".join(b"line %d\n" % i for i in range(50000))
    done = subprocess.run(
        [sys.executable, "-c", script], input=gzip.compress(data), capture_output=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == data


def test_validation_names_fifo_and_jobs(tmp_path, fifo_dir):
    w = (
        Workflow("bad", tmp_dir=fifo_dir)
        .add_job(func=produce_lines, output=FIFO("a", "wt"))
        .add_job(func=count_lines, input=FIFO("b", "rt"))
        .add_job(func=count_lines, input=FIFO("c", "rt"))
        .add_job(func=produce_lines, output=FIFO("c", "wt"))
        .add_job(func=produce_lines, output=FIFO("c", "wt"))
    )
    with pytest.raises(WorkflowError) as info:
        w.run()
    message = str(info.value)
    assert "FIFO 'a' is written by bad.job0 but read by no job" in message
    assert "FIFO 'b' is read by bad.job1 but written by no job" in message
    assert "FIFO 'c' is written by more than one job: bad.job3, bad.job4" in message
    assert info.value.job is None
    assert os.listdir(fifo_dir) == []


def test_fifo_spec_rules():
    assert FIFO("d{n}", "wt", n=3).names() == ["d0", "d1", "d2"]
    assert FIFO("d{n}", "rt").for_worker(5).names() == ["d5"]
    assert FIFO("d{n}", "rt", n=2).for_worker(5).names() == ["d0", "d1"]
    with pytest.raises(ValueError):
        FIFO("x", "a")
    with pytest.raises(ValueError):
        FIFO("x", "r", n=2)  # a collection needs {n}


def test_merge_counts_and_reduce_pattern():
    assert bf.merge_counts({"a": 1, "b": {"x": 2}}, {"a": 2, "b": {"x": 1, "y": 1}}) == {"a": 3, "b": {"x": 3, "y": 1}}
    w = Workflow("r")
    w.result_dict.update({"r.worker0": {"a": 1}, "r.worker1": {"a": 2}, "r.dist0": {"a": 100}})
    assert w.reduce() == {"a": 3}
    assert w.reduce("r.*") == {"a": 103}


def test_pipe_buffers_are_enlarged(tmp_path, fifo_dir):
    """Every FIFO gets the requested buffer, also one whose reader is unmanaged."""
    src = tmp_path / "in.txt"
    write_lines(src, 100)
    size = 1 << 18  # not the kernel's 64 KiB default, and within pipe-max-size
    w = (
        Workflow("sizes", pipe_size=size, tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .add_job(input=FIFO("input", "rt"), output=FIFO("mid", "wt"), func=pipe_sizes)
        .add_job(input=FIFO("mid", "rb"), func=unmanaged_pipe_size, manage_fifos=False)
        .run()
    )
    assert w.result_dict["sizes.job0"] == (size, size)
    assert w.result_dict["sizes.job1"] == size
    assert_clean(fifo_dir)


def test_cli_is_installed_as_bamflow_cli():
    """cli/ installs as bamflow.cli behind the bamflow command."""
    done = subprocess.run(["bamflow", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"bamflow {bf.__version__}\n"



def test_a_file_read_and_rewritten_in_one_run_is_read_as_it_was(tmp_path, fifo_dir):
    """The output goes to a temporary name until the end, so rewriting in place is safe."""
    data = tmp_path / "data.txt"
    header, body = write_lines(data, 1000, header=())
    (
        Workflow("inplace", tmp_dir=fifo_dir)
        .reader(input=str(data), output=FIFO("input", "wb"))
        .add_job(input=FIFO("input", "rt"), output=FIFO("upper", "wt"), func=upper_case)
        .funnel(input=FIFO("upper", "rb"), output=str(data))
        .run(timeout=60)
    )
    assert read(data) == [line.upper() for line in body]
    assert_clean(fifo_dir, tmp_path)


def test_unmanaged_header_fifo_does_not_stall_the_collector(tmp_path, fifo_dir):
    src = tmp_path / "in.sam"
    header, body = write_lines(src, 50_000)
    out = tmp_path / "out.sam"
    (
        Workflow("hdr", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(
            input=FIFO("input", "rb"),
            outputs=FIFO("dist{n}", "wb", n=2),
            header_prefix="@",
            header_fifo=FIFO("header", "wb"),
            manage_fifos=False,
        )
        .workers(input=FIFO("dist{n}", "rt"), output=FIFO("out{n}", "wt"), func=pass_through, n=2)
        .collect(inputs=FIFO("out{n}", "rb", n=2), header_fifo=FIFO("header", "rb"), output=str(out), order="round-robin")
        .run(timeout=60)
    )
    assert read(out) == header + body
    assert_clean(fifo_dir, tmp_path)


def test_results_come_in_job_order(tmp_path, fifo_dir):
    src = tmp_path / "in.txt"
    header, body = write_lines(src, 1100, header=())
    w = (
        Workflow("order", tmp_dir=fifo_dir)
        .reader(input=str(src), output=FIFO("input", "wb"))
        .distribute(input=FIFO("input", "rb"), outputs=FIFO("d{n}", "wb", n=11), chunk_size=1)
        .workers(input=FIFO("d{n}", "rt"), func=count_lines, n=11)
        .run(timeout=60)
    )
    assert [name for name in w.result_dict if ".worker" in name] == [f"order.worker{i}" for i in range(11)]
    assert w.results("order.worker*") == [len(body[i::11]) for i in range(11)]
