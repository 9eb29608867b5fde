"""The workflow engine: stages as OS processes, joined by named pipes.

It knows nothing of BAM: jobs, FIFOs, files, the supervisor, progress
counters, publishing outputs, and the line stages. The BAM layer
(:mod:`bamflow.bam`) builds on it; see docs/architecture.md.
"""

from .errors import WorkflowError
from .fifo import FIFO
from .files import InputFile, OutputFile
from .job import Job
from .lines import LineCollectOptions, LineDistributeOptions
from .publish import Publication
from .workflow import Workflow, merge_counts

__all__ = [
    "FIFO",
    "InputFile",
    "Job",
    "LineCollectOptions",
    "LineDistributeOptions",
    "OutputFile",
    "Publication",
    "Workflow",
    "WorkflowError",
    "merge_counts",
]
