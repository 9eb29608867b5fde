"""bamflow: high-throughput BAM/SAM processing over named pipes.

The engine runs each stage of a workflow as an OS process and connects the
stages with FIFOs; see :mod:`bamflow.workflow` for the data flow.
"""

from .bam.api import RunStats, map_reads, map_reduce
from .bam.shard import shard
from .bam.split import filter_reads, split_reads
from .errors import WorkflowError
from .fifo import FIFO
from .files import InputFile, OutputFile
from .job import Job
from .workflow import Workflow, merge_counts

__version__ = "0.1.0"

__all__ = [
    "FIFO",
    "InputFile",
    "Job",
    "OutputFile",
    "Workflow",
    "WorkflowError",
    "RunStats",
    "filter_reads",
    "map_reads",
    "map_reduce",
    "merge_counts",
    "shard",
    "split_reads",
    "__version__",
]
