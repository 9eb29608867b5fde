"""The committed fixtures are what the code in the repository makes."""

import os
import runpy
import subprocess
import sys

from bamfiles import read_records

TEST_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test_data")


def test_example_bam_is_the_simulators_output(tmp_path):
    made = tmp_path / "example.bam"
    subprocess.run(
        [sys.executable, "-m", "bamflow.simulate", str(made), "--reads", "10000", "--seed", "1"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert read_records(made) == read_records(os.path.join(TEST_DATA, "example.bam"))


def test_tiny_sam_is_the_generators_output(tmp_path):
    made = tmp_path / "tiny.sam"
    runpy.run_path(os.path.join(TEST_DATA, "make_tiny_sam.py"))["main"](path=str(made))
    with open(os.path.join(TEST_DATA, "tiny.sam"), "rb") as f:
        assert made.read_bytes() == f.read()
