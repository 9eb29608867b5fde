"""Ready-made job functions under mrfifo's names, for the builder methods
(``func=bamflow.parts.bam_writer``): the engine's line stages and the BAM
stages. They live in their layers (bamflow.engine.lines, bamflow.bam.stages);
this module only names them for users."""

from .bam.stages import collect_records, decode_bam, distribute_records, encode_bam
from .engine.lines import collect_lines, distribute_lines, read_files, read_gz_or_plain, write_file

bam_reader = decode_bam
bam_writer = encode_bam

__all__ = [
    "bam_reader",
    "bam_writer",
    "collect_lines",
    "collect_records",
    "decode_bam",
    "distribute_lines",
    "distribute_records",
    "encode_bam",
    "read_files",
    "read_gz_or_plain",
    "write_file",
]
