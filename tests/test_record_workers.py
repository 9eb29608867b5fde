"""map_reads / map_reduce with bamflow.Record (the default): records kept by
user code, pysam reads mixed in, and the failure paths (a function that
raises, returns a wrong type, or edits a record into an invalid one), each
a clear error naming the job, with no output and nothing left behind.
Expected values come from pysam reading the input."""

from collections import Counter

import pysam
import pytest
from bamfiles import read_records, write_bam
from conftest import assert_clean

import bamflow as bf
from bamflow import WorkflowError

# -- worker functions (module level: the spawn start method imports them) ----------------------

_held = []


def swap_neighbours(read):
    """Hold every other read and return it after the next one: reads kept across calls."""
    if not _held:
        _held.append(read)
        return None
    first = _held.pop()
    return [read, first]


def keep_everything(reads, out):
    """Keep every read in a list, then look at them all after the share ended."""
    kept = list(reads)
    for read in kept:
        read.set_tag("XK", len(read.query_name))
        out.write(read)
    return {read.query_name: (read.get_tag("XK"), read.reference_start, read.query_sequence) for read in kept}


def with_a_pysam_copy(read):
    """Return the Record and a pysam copy of it, renamed and retagged."""
    twin = read.to_pysam()
    twin.query_name = read.query_name + "_pysam"
    twin.set_tag("XP", 1)
    return [read, twin]


def explode_at_seven(read):
    if read.query_name == "r7":
        raise RuntimeError("boom at r7")
    return read


def returns_a_string(read):
    return "not a read"


def returns_a_list_with_an_int(read):
    return [read, 5]


def bad_reference(read):
    read.reference_id = 99
    return read


def cigar_that_does_not_fit(read):
    if not read.is_unmapped:
        read.cigarstring = "1M"
    return read


def writes_a_string(reads, out):
    for _ in reads:
        out.write("not a read")


def tag_and_return(read):
    read.set_tag("XL", len(read.query_name))
    return read


# -- behaviour -----------------------------------------------------------------------------------

def expected_tagged(reads):
    return [r.to_string() + f"\tXL:i:{len(r.query_name)}" for r in reads]


def test_records_kept_across_calls_and_refills(tmp_path):
    """A function that returns each read one call later: the held records
    outlive the input buffer they pointed into (20,000 reads: many refills)."""
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=20000)
    out = tmp_path / "out.bam"
    stats = bf.map_reads(src, swap_neighbours, out, workers=2, order="any", chunk_size=1000, timeout=120)
    # each worker's share is 10 chunks of 1,000 (even): every held read came back
    assert (stats.reads_in, stats.written) == (20000, 20000)
    assert Counter(read_records(out)[1]) == Counter(r.to_string() for r in reads)


def test_map_reduce_keeps_every_record(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=6000)
    out = tmp_path / "out.bam"
    stats = bf.map_reduce(src, keep_everything, output=out, workers=2, timeout=120)
    expected = {r.query_name: (len(r.query_name), r.reference_start, r.query_sequence) for r in reads}
    assert stats.result == expected
    assert Counter(read_records(out)[1]) == Counter(r.to_string() + f"\tXK:i:{len(r.query_name)}" for r in reads)


def test_records_and_pysam_reads_together(tmp_path):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=500)
    out = tmp_path / "out.bam"
    stats = bf.map_reads(src, with_a_pysam_copy, out, workers=2, chunk_size=17, timeout=60)
    lines = read_records(out)[1]
    expected = []
    for r in reads:
        expected.append(r.to_string())
        twin = pysam.AlignedSegment.fromstring(r.to_string(), r.header)
        twin.query_name = r.query_name + "_pysam"
        twin.set_tag("XP", 1)
        expected.append(twin.to_string())
    assert lines == expected
    assert (stats.reads_in, stats.added, stats.written) == (500, 500, 1000)


def test_record_mode_under_spawn(tmp_path, start_method):
    src = tmp_path / "in.bam"
    reads = write_bam(src, n=300)
    out = tmp_path / "out.bam"
    bf.map_reads(src, tag_and_return, out, workers=2, chunk_size=7, start_method=start_method, timeout=60)
    assert read_records(out)[1] == expected_tagged(reads)


def test_bad_record_kind(tmp_path):
    with pytest.raises(ValueError, match="record must be one of bamflow, pysam"):
        bf.map_reads(tmp_path / "x.bam", tag_and_return, tmp_path / "y.bam", record="htslib")
    with pytest.raises(ValueError, match="record must be one of"):
        bf.map_reduce(tmp_path / "x.bam", keep_everything, record="Record")


# -- failures ------------------------------------------------------------------------------------

def fails(tmp_path, func, *, reduce=False, **kwargs):
    """Run ``func`` over a small BAM; the run must fail with nothing published
    and nothing left running. Returns the error's first line."""
    src = tmp_path / "in.bam"
    write_bam(src, n=400)
    out = tmp_path / "out.bam"
    fifos = tmp_path / "fifos"
    fifos.mkdir()
    with pytest.raises(WorkflowError) as info:
        if reduce:
            bf.map_reduce(src, func, output=out, workers=2, timeout=60, **kwargs)
        else:
            bf.map_reads(src, func, out, workers=2, chunk_size=10, timeout=60, **kwargs)
    assert not out.exists()
    assert_clean(output_dir=str(tmp_path))
    return str(info.value).splitlines()[0]


@pytest.mark.timeout(120)
def test_a_function_that_raises(tmp_path):
    message = fails(tmp_path, explode_at_seven)
    assert "map_reads.worker" in message and "boom at r7" in message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("func", [returns_a_string, returns_a_list_with_an_int])
def test_a_function_that_returns_a_wrong_type(tmp_path, func):
    message = fails(tmp_path, func)
    assert "TypeError" in message or "expected a bamflow.Record" in message
    assert "map_reads.worker" in message


@pytest.mark.timeout(120)
def test_an_edit_refused_when_made(tmp_path):
    message = fails(tmp_path, bad_reference)
    assert "reference id 99 does not exist in header" in message


@pytest.mark.timeout(120)
def test_an_edit_that_makes_the_record_invalid_is_caught_before_writing(tmp_path):
    message = fails(tmp_path, cigar_that_does_not_fit)
    assert "edited into an invalid record" in message and "1M" in message


@pytest.mark.timeout(120)
def test_map_reduce_writing_a_wrong_type(tmp_path):
    message = fails(tmp_path, writes_a_string, reduce=True)
    assert "map_reduce.worker" in message and "expected a bamflow.Record or a pysam.AlignedSegment" in message
