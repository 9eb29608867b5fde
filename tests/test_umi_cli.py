"""The UMI commands (bamflow dedup, count, group, count-tab) with umi_tools'
option names against umi_tools, their usage errors, and the failures that
must leave nothing behind: a mistyped tag, a truncated input, reads that do
not add up."""

from __future__ import annotations

import gzip
import importlib
import os

import pytest
import test_umi_support
from bamflow.cli.main import app
from test_umi_support import CELLS, sam_lines
from typer.testing import CliRunner

import bamflow as bf
from bamflow.presets.count import count
from bamflow.presets.dedup import UmiOptions, dedup
from bamflow.presets.group import group

# the fixtures, as this module's own (so that the order of collection does not matter)
umi_tools, single_end, paired_end = test_umi_support.umi_tools, test_umi_support.single_end, test_umi_support.paired_end

runner = CliRunner()
TAG_UMIS = ["--extract-umi-method=tag", "--umi-tag=UB", "--cell-tag=CB"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_dedup_command_is_a_drop_in(paired_end, umi_tools, tmp_path):
    """umi_tools' options on bamflow's command line give umi_tools' output."""
    options = [*TAG_UMIS, "--per-cell", "--paired", "--random-seed=3", "--method=cluster"]
    umi_tools("dedup", "-I", paired_end["bam"], "-S", tmp_path / "ut.bam", *options)
    result = invoke("dedup", paired_end["bam"], "-o", tmp_path / "bf.bam", *options, "--cell-tag-split=-", "-q",
                    "--stats", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert sam_lines(tmp_path / "bf.bam") == sam_lines(tmp_path / "ut.bam")
    assert "kept" in result.stderr and "mates" in result.stderr


def test_old_spellings_still_work(single_end, tmp_path):
    """--umi tag:UB (and read_name with the cell from CB) as before."""
    result = invoke("dedup", single_end["bam"], "-o", tmp_path / "a.bam", "--umi", "tag:UB", "-q", "-w", "1")
    assert result.exit_code == 0, result.output
    result = invoke("dedup", single_end["bam"], "-o", tmp_path / "b.bam", "--umi-tag", "UB", "-q", "-w", "1")
    assert result.exit_code == 0, result.output
    assert sam_lines(tmp_path / "a.bam") == sam_lines(tmp_path / "b.bam")
    assert UmiOptions.take({"umi": "read_name"})[0].cell_from_tag
    assert UmiOptions.take({"skip_genes": "^x"})[0].skip_tags_regex == "^x"


def test_count_command_cells_and_wide(single_end, umi_tools, tmp_path):
    umi_tools("count", "-I", single_end["bam"], "-S", tmp_path / "ut.tsv", *TAG_UMIS, "--per-cell", "--per-gene",
              "--gene-tag=GX", "--wide-format-cell-counts")
    out = tmp_path / "counts"
    result = invoke("count", single_end["bam"], "-o", out, "--gene-tag", "GX", "--cell-tag-split=-",
                    "--wide-format-cell-counts", "--formats", "tsv", "-q")
    assert result.exit_code == 0, result.output
    assert (out / "counts.tsv").read_text() == (tmp_path / "ut.tsv").read_text()
    per_cell = tmp_path / "per_cell.tsv"  # qc's table: the header and the called cells
    per_cell.write_text("barcode\treads\tis_cell\n" + "".join(f"{c}\t9\t{int(i < 2)}\n" for i, c in enumerate(CELLS)))
    result = invoke("count", single_end["bam"], "-o", tmp_path / "sel", "--cells", per_cell, "--formats", "mtx", "-q")
    assert result.exit_code == 0, result.output
    with gzip.open(tmp_path / "sel" / "barcodes.tsv.gz", "rt") as f:
        assert f.read().split() == CELLS[:2]


def test_group_and_count_tab_commands(single_end, umi_tools, tmp_path):
    umi_tools("group", "-I", single_end["bam"], "-S", tmp_path / "ug.bam", "--output-bam", *TAG_UMIS, "--per-cell",
              f"--group-out={tmp_path / 'ug.tsv'}", "--umi-group-tag=XU")
    result = invoke("group", single_end["bam"], "-o", tmp_path / "bg.bam", "--output-bam", "--group-out",
                    tmp_path / "bg.tsv", "--umi-group-tag", "XU", "--cell-tag-split=-", "-q")
    assert result.exit_code == 0, result.output
    assert sam_lines(tmp_path / "bg.bam") == sam_lines(tmp_path / "ug.bam")
    assert (tmp_path / "bg.tsv").read_text() == (tmp_path / "ug.tsv").read_text()
    src = tmp_path / "assigned.tsv"
    src.write_text("r1_AAC_ACGT\tG1\nr2_AAC_ACGA\tG1\nr3_AAC_TTTT\tG1\nr4_CCA_ACGT\tG2\n")
    umi_tools("count_tab", "-I", src, "-S", tmp_path / "ut_tab.tsv", "--per-cell")
    result = invoke("count-tab", src, "-o", tmp_path / "bf_tab.tsv", "--per-cell", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bf_tab.tsv").read_text() == (tmp_path / "ut_tab.tsv").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["dedup", "--unmapped-reads", "bogus"],
        ["dedup", "--method", "bogus"],
        ["dedup", "--extract-umi-method", "nope"],
        ["dedup", "--subset", "2"],
        ["dedup", "--per-gene"],  # neither --gene-tag nor --per-contig
        ["dedup", "--chrom", "chrZ"],
        ["dedup", "--mark", "--paired"],
        ["dedup", "--ignore-umi", "--output-stats", "x"],
        ["count", "--not-per-cell", "--formats", "mtx"],
        ["group", "--unmapped-reads", "sometimes"],
    ],
)
def test_usage_errors_exit_2(single_end, tmp_path, args):
    command, *rest = args
    out = ["-o", str(tmp_path / ("x" if command == "count" else "x.bam"))]
    result = invoke(command, single_end["bam"], *out, *rest, "-q")
    assert result.exit_code == 2, result.output
    assert not [n for n in os.listdir(tmp_path) if n.startswith("x")]


def test_a_tag_on_no_read_fails_and_publishes_nothing(single_end, tmp_path):
    with pytest.raises(bf.WorkflowError, match="tag XU is on none of"):
        dedup(single_end["bam"], tmp_path / "x.bam", umi_tag="XU", timeout=60)
    with pytest.raises(bf.WorkflowError, match="tag XG is on none of"):
        count(single_end["bam"], tmp_path / "c", gene_tag="XG", timeout=60)
    assert not os.path.exists(tmp_path / "x.bam") and not os.path.exists(tmp_path / "c")
    result = invoke("dedup", single_end["bam"], "-o", tmp_path / "y.bam", "--umi-tag", "XU", "-q")
    assert result.exit_code == 1 and "tag XU is on none of" in result.stderr
    assert not os.path.exists(tmp_path / "y.bam")


def test_truncated_input_fails(single_end, tmp_path):
    data = open(single_end["bam"], "rb").read()
    bad = tmp_path / "cut.bam"
    bad.write_bytes(data[: len(data) // 2])
    for run in (lambda: dedup(bad, tmp_path / "x.bam", timeout=60), lambda: count(bad, tmp_path / "c", timeout=60),
                lambda: group(bad, tmp_path / "g.bam", timeout=60)):
        with pytest.raises(bf.WorkflowError):
            run()
    assert sorted(os.listdir(tmp_path)) == ["cut.bam"]


def test_reads_that_do_not_add_up_publish_nothing(single_end, tmp_path, monkeypatch):
    """The books: a worker that loses a read (here: forgets a drop) fails the run
    before anything is published."""
    dedup_module = importlib.import_module("bamflow.presets.dedup")  # (bamflow.presets.dedup is also the function)
    real = dedup_module.umi_worker

    def losing(*args, **kwargs):
        result = real(*args, **kwargs)
        if result["dropped"]:
            reason = next(iter(result["dropped"]))
            result["dropped"][reason] -= 1
        return result

    monkeypatch.setattr(dedup_module, "umi_worker", losing)
    with pytest.raises(bf.WorkflowError, match="reads do not add up"):
        dedup(single_end["bam"], tmp_path / "x.bam", start_method="fork", timeout=60)
    with pytest.raises(bf.WorkflowError, match="reads do not add up"):
        count(single_end["bam"], tmp_path / "c", start_method="fork", timeout=60)
    assert os.listdir(tmp_path) == []


def test_output_folder_and_group_arguments(single_end, tmp_path):
    with pytest.raises(ValueError, match="give output"):
        group(single_end["bam"])
    with pytest.raises(ValueError, match="always per gene"):
        count(single_end["bam"], tmp_path / "c", per_gene=False)
    with pytest.raises(TypeError, match="unexpected keyword"):
        dedup(single_end["bam"], tmp_path / "x.bam", bogus=1)
    with pytest.raises(ValueError, match="no cell barcodes"):
        empty = tmp_path / "empty.txt"
        empty.write_text("barcode\n")
        count(single_end["bam"], tmp_path / "c", cells=empty)
