"""bamflow: high-throughput BAM/SAM processing over named pipes.

Layers (docs/architecture.md): :mod:`bamflow.engine` runs each stage of a
workflow as an OS process and connects the stages with FIFOs, knowing
nothing of BAM; :mod:`bamflow.bam` adds the BAM stages and the per-read API;
:mod:`bamflow.presets` the single-cell workflows; :mod:`bamflow.kernels`
holds the Cython hot loops. This module is the public face: ``Workflow`` is
the builder with the BAM stages (:class:`bamflow.bam.workflow.BamWorkflow`).
"""

from . import parts
from .bam.api import RunStats, map_reads, map_reduce
from .bam.batches import map_batches
from .bam.shard import shard
from .bam.split import filter_reads, split_reads
from .bam.workflow import BamWorkflow
from .engine import FIFO, InputFile, Job, OutputFile, Publication, WorkflowError, merge_counts
from .kernels.record import Record

Workflow = BamWorkflow

__version__ = "0.1.0"

__all__ = [
    "FIFO",
    "BamWorkflow",
    "InputFile",
    "Job",
    "OutputFile",
    "Publication",
    "Record",
    "Workflow",
    "WorkflowError",
    "RunStats",
    "filter_reads",
    "map_batches",
    "map_reads",
    "map_reduce",
    "merge_counts",
    "parts",
    "shard",
    "split_reads",
    "__version__",
]
