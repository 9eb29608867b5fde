"""The ``bamflow`` command: a thin typer layer over the Python API.

Exit status: 0 success, 1 the run failed (one error line; the child's
traceback with --debug), 2 usage error. Shared options and plumbing:
common.py; the commands: bam_commands.py, preset_commands.py, umi_commands.py.
"""

from __future__ import annotations

from . import bam_commands, preset_commands, umi_commands  # noqa: F401  (registers the commands)
from .common import app


def main() -> None:
    app()
