"""BAM stages end to end: decode → distribute → workers → collect → encode,
on real BAM files, checked with pysam and samtools."""

import os
import shutil
import subprocess
import sys
from collections import Counter

import pysam
import pytest
from bamfiles import read_records, sort_key, without_bamflow_pg, write_bam
from conftest import assert_clean
from jobfuncs import (
    count_and_copy,
    drop_odd_numbered,
    emit_twice,
    names_by_cell,
    pass_through,
    tag_with_length,
)

import bamflow as bf
from bamflow import FIFO, WorkflowError

SAMTOOLS = shutil.which("samtools")


def samtools(*args):
    """Run samtools if installed (it is in CI); returns its result."""
    assert SAMTOOLS, "samtools must be installed for these checks"
    return subprocess.run([SAMTOOLS, *args], capture_output=True, text=True, timeout=60)


def reconstruct(src, out, fifo_dir, order, n=4, start_method=None, chunk_size=7):
    """The seed's BAM_reconstruct example, on binary BAM records."""
    return (
        bf.Workflow("BAM_reconstruct", start_method=start_method, tmp_dir=fifo_dir)
        .BAM_reader(input=str(src), output=FIFO("input_bam", "wb"))
        .distribute_bam(
            input=FIFO("input_bam", "rb"),
            outputs=FIFO("dist{n}", "wb", n=n),
            chunk_size=chunk_size,
            header_fifo=FIFO("header", "wb"),
            frame_chunks=order == "input",
        )
        .workers(input=FIFO("dist{n}", "rb"), output=FIFO("out{n}", "wb"), func=pass_through, n=n)
        .collect_bam(
            inputs=FIFO("out{n}", "rb", n=n),
            header_fifo=FIFO("header", "rb"),
            output=FIFO("out_bam", "wb"),
            order=order,
        )
        .funnel(input=FIFO("out_bam", "rb"), output=str(out), _manage_fifos=False, func=bf.parts.bam_writer)
        .run(timeout=120)
    )


@pytest.mark.parametrize(
    "order, sort",
    [("any", "unsorted"), ("input", "unsorted"), ("coordinate", "coordinate"), ("tag:CB", "CB")],
)
def test_reconstruct_reproduces_records_for_every_order(tmp_path, fifo_dir, order, sort):
    src = tmp_path / "in.bam"
    write_bam(src, n=3000, order=sort)
    out = tmp_path / "out.bam"
    w = reconstruct(src, out, fifo_dir, order)
    in_header, in_records = read_records(src)
    out_header, out_records = read_records(out)
    assert without_bamflow_pg(out_header) == in_header
    if order == "input":
        assert out_records == in_records
    else:
        assert Counter(out_records) == Counter(in_records)
    if sort != "unsorted":
        # sorted inputs merged back into the same order (ties may change places)
        with pysam.AlignmentFile(str(out)) as f:
            keys = [sort_key(sort)(r) for r in f]
        assert keys == sorted(keys)
    assert w.result_dict["BAM_reconstruct.dist0"]["records"] == len(in_records)
    assert w.result_dict["BAM_reconstruct.collect0"]["records"] == len(in_records)
    assert samtools("quickcheck", str(out)).returncode == 0
    if sort == "coordinate":
        assert samtools("index", str(out)).returncode == 0
    assert_clean(fifo_dir, tmp_path)


def test_reconstruct_under_spawn(tmp_path, fifo_dir):
    src = tmp_path / "in.bam"
    write_bam(src, n=500)
    out = tmp_path / "out.bam"
    reconstruct(src, out, fifo_dir, "input", start_method="spawn")
    assert read_records(out)[1] == read_records(src)[1]
    assert_clean(fifo_dir, tmp_path)


def test_exactly_one_new_pg_line_chained_to_the_last(tmp_path, fifo_dir):
    src = tmp_path / "in.bam"
    write_bam(src, n=50)
    out = tmp_path / "out.bam"
    reconstruct(src, out, fifo_dir, "any")
    pgs = read_records(out)[0]["PG"]
    assert [pg["ID"] for pg in pgs] == ["cellranger", "samtools", "bamflow"]
    assert pgs[-1]["PN"] == "bamflow" and pgs[-1]["PP"] == "samtools" and pgs[-1]["VN"] == bf.__version__
    # a second pass chains again, with a fresh ID
    again = tmp_path / "again.bam"
    reconstruct(out, again, fifo_dir, "any")
    pgs = read_records(again)[0]["PG"]
    assert [pg["ID"] for pg in pgs] == ["cellranger", "samtools", "bamflow", "bamflow.1"]
    assert pgs[-1]["PP"] == "bamflow"


RECORDS = pytest.mark.parametrize("record", ["bamflow", "pysam"])


@RECORDS
@pytest.mark.parametrize("order", ["input", "any"])
def test_map_reads_sets_a_tag(tmp_path, order, record):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=2500)
    out = tmp_path / "out.bam"
    stats = bf.map_reads(src, tag_with_length, out, workers=3, order=order, chunk_size=50, record=record)
    _, records = read_records(out)
    expected = [r.to_string() + f"\tXL:i:{len(r.query_name)}" for r in reads]
    if order == "input":
        assert records == expected
    else:
        assert Counter(records) == Counter(expected)
    assert (stats.reads_in, stats.written, stats.dropped) == (len(reads), len(reads), {})
    assert [p["reads_in"] for p in stats.per_worker] != [0, 0, 0]
    assert sum(p["reads_in"] for p in stats.per_worker) == len(reads)
    assert samtools("quickcheck", str(out)).returncode == 0


@RECORDS
def test_map_reads_keeps_input_order_when_dropping_and_expanding(tmp_path, record):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=2000)
    dropped_out = tmp_path / "dropped.bam"
    stats = bf.map_reads(src, drop_odd_numbered, dropped_out, workers=3, chunk_size=13, record=record)
    kept = [r for r in reads if int(r.query_name[-1]) % 2 == 0]
    assert read_records(dropped_out)[1] == [r.to_string() + "\tXK:i:1" for r in kept]
    assert stats.dropped == {"by_function": len(reads) - len(kept)}
    assert stats.written == len(kept)

    twice_out = tmp_path / "twice.bam"
    stats = bf.map_reads(src, emit_twice, twice_out, workers=2, chunk_size=11, record=record)
    names = [r.split("\t")[0] for r in read_records(twice_out)[1]]
    assert names == [n for r in reads for n in (r.query_name, r.query_name + "_copy")]
    assert (stats.reads_in, stats.added, stats.written) == (len(reads), len(reads), 2 * len(reads))


@RECORDS
def test_map_reduce_by_cb_is_an_exact_partition(tmp_path, record):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=3000, no_cb=0.0)
    stats = bf.map_reduce(src, names_by_cell, by="CB", workers=4, record=record)
    per_worker = stats.per_worker
    assert len(per_worker) == 4
    cells_seen = Counter(cb for result in per_worker for cb in result)
    assert set(cells_seen.values()) == {1}, "a cell's reads were split over workers"
    expected = {}
    for r in reads:
        expected.setdefault(r.get_tag("CB"), []).append(r.query_name)
    assert {cb: sorted(names) for cb, names in stats.result.items()} == {cb: sorted(n) for cb, n in expected.items()}


@RECORDS
def test_map_reduce_with_output_and_integer_cb(tmp_path, record):
    """CB stored as an integer tag still shards (by its value) and counts."""
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=1500, no_cb=0.0, int_cb=True)
    out = tmp_path / "out.bam"
    stats = bf.map_reduce(src, count_and_copy, output=out, by="CB", workers=3, record=record)
    assert stats.result == dict(Counter(r.get_tag("CB") for r in reads))
    assert Counter(read_records(out)[1]) == Counter(r.to_string() for r in reads)
    cells_seen = Counter(cb for result in stats.per_worker for cb in result)
    assert set(cells_seen.values()) == {1}


@RECORDS
def test_reads_without_the_key(tmp_path, record):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=1000, no_cb=0.1)
    no_cb = [r for r in reads if not r.has_tag("CB")]
    assert no_cb
    out = tmp_path / "out.bam"
    stats = bf.map_reads(src, tag_with_length, out, by="CB", order="any", missing="drop", record=record)
    assert stats.dropped == {"missing_tag": len(no_cb)}
    assert stats.written == len(reads) - len(no_cb)
    with pytest.raises(WorkflowError) as info:
        bf.map_reads(src, tag_with_length, tmp_path / "err.bam", by="CB", order="any")
    first_line = str(info.value).splitlines()[0]
    assert f"(read '{no_cb[0].query_name}') has no CB tag" in first_line
    assert not (tmp_path / "err.bam").exists()


@RECORDS
@pytest.mark.parametrize("mode", ["w", "wbu"])
def test_sam_and_uncompressed_bam_inputs(tmp_path, mode, record):
    src = tmp_path / ("in.sam" if mode == "w" else "in.ubam")
    reads = write_bam(src, n=700, mode=mode)
    out = tmp_path / "out.bam"
    bf.map_reads(src, tag_with_length, out, workers=2, record=record)
    assert read_records(out)[1] == [r.to_string() + f"\tXL:i:{len(r.query_name)}" for r in reads]


@pytest.mark.parametrize("fmt", ["sam", "ubam", "bam"])
def test_output_formats_and_stdout(tmp_path, fmt):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=300)
    script = (
        "import sys, bamflow as bf\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from jobfuncs import tag_with_length\n"
        "bf.map_reads('-', tag_with_length, '-', fmt=sys.argv[2])\n"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    with open(src, "rb") as stdin:
        done = subprocess.run([sys.executable, "-c", script, tests_dir, fmt], stdin=stdin, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    out = tmp_path / ("out.sam" if fmt == "sam" else "out.bam")
    out.write_bytes(done.stdout)
    if fmt == "sam":
        assert done.stdout.startswith(b"@HD")
    elif fmt == "ubam":
        assert samtools("view", "-c", str(out)).stdout.strip() == str(len(reads))
    assert read_records(out)[1] == [r.to_string() + f"\tXL:i:{len(r.query_name)}" for r in reads]


# -- bad input: one clear error, no output that looks complete ------------------------


def run_bad(tmp_path, src, **kwargs):
    out = tmp_path / "out.bam"
    with pytest.raises(WorkflowError) as info:
        bf.map_reads(src, tag_with_length, out, timeout=60, **kwargs)
    assert not out.exists()
    assert [n for n in os.listdir(tmp_path) if ".bamflow-" in n] == []
    return str(info.value).splitlines()[0]


def test_truncated_bam(tmp_path):
    src = tmp_path / "in.bam"
    write_bam(src, n=3000)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    message = run_bad(tmp_path, src)
    assert "BAM_reader0" in message and "truncated" in message


def test_corrupt_bgzf_block(tmp_path):
    src = tmp_path / "in.bam"
    write_bam(src, n=3000)
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    src.write_bytes(bytes(data))
    message = run_bad(tmp_path, src)
    assert "BAM_reader0" in message and str(src) in message


def test_not_a_bam_file(tmp_path):
    src = tmp_path / "in.bam"
    src.write_bytes(b"\x00\x01 this is not a BAM file\n" * 100)
    assert "not a BAM or SAM file" in run_bad(tmp_path, src)


def test_empty_file(tmp_path):
    src = tmp_path / "in.bam"
    src.write_bytes(b"")
    assert "empty file" in run_bad(tmp_path, src)


@RECORDS
def test_header_only_bam_gives_header_only_output(tmp_path, record):
    src = tmp_path / "in.bam"
    write_bam(src, n=0)
    out = tmp_path / "out.bam"
    stats = bf.map_reads(src, tag_with_length, out, workers=2, record=record)
    assert (stats.reads_in, stats.written) == (0, 0)
    header, records = read_records(out)
    assert records == [] and without_bamflow_pg(header) == read_records(src)[0]
    assert samtools("quickcheck", str(out)).returncode == 0


def test_unsorted_input_to_coordinate_collect(tmp_path):
    src = tmp_path / "in.bam"
    write_bam(src, n=2000, order="unsorted")
    message = run_bad(tmp_path, src, order="coordinate")
    assert "collect0" in message and "not coordinate-sorted" in message


def test_sam_on_stdin_and_sam_appended_to_stdout(tmp_path):
    """SAM read from a pipe loses nothing; SAM written to stdout appends, never truncates."""
    src = tmp_path / "in.sam"
    reads = write_bam(src, n=400, mode="w")
    out = tmp_path / "out.sam"
    out.write_text("PRECIOUS\n")
    script = (
        "import sys, bamflow as bf\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from jobfuncs import tag_with_length\n"
        "bf.map_reads('-', tag_with_length, '-', fmt='sam')\n"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    with open(src, "rb") as stdin, open(out, "ab") as stdout:
        done = subprocess.run(
            [sys.executable, "-c", script, tests_dir], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=120
        )
    assert done.returncode == 0, done.stderr.decode()
    text = out.read_text().splitlines()
    assert text[0] == "PRECIOUS"
    body = [line for line in text[1:] if not line.startswith("@")]
    assert body == [r.to_string() + f"\tXL:i:{len(r.query_name)}" for r in reads]


def test_pg_chains_to_the_end_of_the_chain_not_the_last_line():
    from bamflow.bam.header import BamHeader

    text = "@HD\tVN:1.6\n@PG\tID:a\tPN:a\n@PG\tID:c\tPN:c\tPP:b\n@PG\tID:b\tPN:b\tPP:a\n"
    new = BamHeader(text, []).with_program("bamflow x").text.splitlines()[-1].split("\t")
    assert "ID:bamflow" in new and "PP:c" in new


@RECORDS
def test_map_reduce_notices_a_function_that_stops_early(tmp_path, record):
    from jobfuncs import first_ten_reads

    src = tmp_path / "in.bam"
    write_bam(src, n=300)
    expected = "reads do not add up between stages: 300 reads dealt to the workers, 10 read by them"
    with pytest.raises(WorkflowError, match=expected):
        bf.map_reduce(src, first_ten_reads, workers=1, timeout=60, record=record)
