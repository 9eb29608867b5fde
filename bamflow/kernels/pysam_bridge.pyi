from typing import Any

from bamflow.kernels.record import RecordWriter as RawWriter

__all__ = ["PUT_SEGMENT", "RawWriter", "segment_from_parts"]

PUT_SEGMENT: Any

def segment_from_parts(core: bytes, name: bytes, cigar: bytes, seq_qual: bytes, aux: bytes, n_cigar: int,
                       header: Any) -> Any: ...
