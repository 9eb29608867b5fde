"""Column batches: ``map_batches(input, func, output)`` hands ``func`` the
reads of a BAM as numpy columns, a batch at a time, and writes the reads it
keeps with the tags it sets. No Python object is made per read: the worker
kernel (:class:`bamflow.kernels.record.BatchKernel`) fills the columns while
it reads and checks the records, copies each batch's records into one
buffer, and writes the kept ones (runs of them in one copy).

    decode ─▶ distribute ─▶ batch worker × N ─▶ collect ─▶ encode ─▶ output.bam

``func(batch)`` returns:

- ``None``: keep every read, unchanged;
- a boolean array of ``batch.n``: the reads to keep;
- a dict ``{tag: column}``: tags to set on every read (a masked array sets
  the tag only where it is not masked); the type comes from the column's
  dtype (int8 ``c``, uint8 and bool ``C``, int16 ``s``, uint16 ``S``, int32
  ``i``, uint32 ``I``, int64 and uint64 the smallest of ``i``/``I`` that
  holds the column, floats ``f``, bytes and str ``Z``);
- or ``(keep, {tag: column})``.

A tag set replaces the read's tag of that name (the new value goes last, as
pysam's ``set_tag`` does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..engine import progress
from ..kernels.record import Arena
from .api import RunStats, _encode_options, _worker_fds, run_mapped
from .header import BamHeader
from .options import CollectOptions, DecodeOptions, DistributeOptions, parse_tag, parse_tags
from .workflow import BamWorkflow

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Batch", "map_batches", "batch_worker", "run_batches"]

# numpy dtype (kind and size) → BAM integer type
_INT_TYPES = {"i1": "c", "u1": "C", "b1": "C", "i2": "s", "u2": "S", "i4": "i", "u4": "I"}


class Batch:
    """A batch of ``n`` reads as columns (numpy arrays of length ``n``).

    Fixed fields: ``flag`` (uint16), ``reference_id``, ``reference_start``
    (0-based position), ``template_length``, ``next_reference_id``,
    ``next_reference_start``, ``query_length`` (int32), ``mapping_quality``
    (uint8). ``references``: the header's reference names (index them with
    ``reference_id``; -1 is unmapped).

    The records themselves: ``data`` (uint8, read-only) holds the batch's
    records one after another, record ``i`` at ``data[offsets[i]:offsets[i + 1]]``
    (block_size first, as in BAM). ``names`` and ``sequences`` give
    (bytes buffer, offsets) pairs: read ``i``'s name is
    ``buffer[offsets[i]:offsets[i + 1]]``.

    Tags (those given to ``map_batches(tags=...)``): :meth:`tag` decodes one
    into an array, :meth:`has_tag` says where it is present, :meth:`isin`
    tests membership in a set of values in C.

    Arrays taken from a batch are the caller's. The batch's records stay in
    the worker's input buffer (nothing is copied) while ``func`` runs; a
    batch kept afterwards (or asked for ``data``) gets a copy of them first.
    """

    def __init__(self, n: int, columns: dict[str, np.ndarray], tag_pos: np.ndarray, tags: Sequence[str], kernel: Any,
                 references: Sequence[str]) -> None:

        self.n = n
        self.flag = columns["flag"][:n]
        self.reference_id = columns["reference_id"][:n]
        self.reference_start = columns["reference_start"][:n]
        self.mapping_quality = columns["mapping_quality"][:n]
        self.template_length = columns["template_length"][:n]
        self.next_reference_id = columns["next_reference_id"][:n]
        self.next_reference_start = columns["next_reference_start"][:n]
        self.query_length = columns["query_length"][:n]
        self.offsets = columns["offsets"][: n + 1]
        self.references = references
        self._tag_pos = {name: tag_pos[k, :n] for k, name in enumerate(tags)}
        self._source = kernel  # where the records are: the kernel's buffer (this generation), or a copy
        self._generation = kernel.generation
        self._text: dict[str, tuple[bytes, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def _detach(self) -> None:
        """Copy the records out of the kernel's buffer (before it moves on)."""
        if not isinstance(self._source, Arena):
            self._source = self._source.copy_batch()

    @property
    def data(self) -> np.ndarray:
        """The batch's records, one after another (uint8, read-only; a copy)."""
        import numpy as np

        self._detach()
        return np.frombuffer(self._source, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"<Batch of {self.n} reads; tags {sorted(self._tag_pos)}>"

    def _pos(self, tag: str) -> np.ndarray:
        try:
            return self._tag_pos[tag]
        except KeyError:
            raise KeyError(f"tag {tag} was not requested: give map_batches(tags=[..., {tag!r}])") from None

    def has_tag(self, tag: str) -> np.ndarray:
        """Where ``tag`` is present (bool array)."""
        return self._pos(tag) >= 0

    def tag(self, tag: str, kind: str | None = None, missing: Any = None) -> np.ndarray:
        """The values of ``tag`` as an array.

        ``kind``: ``"int"`` (int64; integer types), ``"float"`` (float64; f and
        integers), ``"str"`` (bytes, numpy ``S``: strings as they are,
        integers in decimal — bamflow's canonical value), or None: the kind of
        the values present (ints if all are integers, floats if all are
        numbers, else strings). Absent values are ``missing`` (default: 0,
        NaN or b""). A value of the wrong kind (a string for "int"; an array
        for any kind) raises ValueError.
        """
        import numpy as np

        from ..kernels.record import tag_keys, tag_values

        pos = self._pos(tag)
        n = self.n
        ints = np.empty(n, np.int64)
        floats = np.empty(n, np.float64)
        kinds = np.empty(n, np.uint8)
        width = tag_values(self._source, self._generation, pos, ints, floats, kinds)
        present = kinds != 0
        if (kinds == 4).any():
            raise ValueError(f"tag {tag} holds a B array in some reads: not a column")
        has_str, has_float = bool((kinds == 3).any()), bool((kinds == 2).any())
        if kind is None:
            kind = "str" if has_str else "float" if has_float else "int"
        if kind == "int":
            if has_str or has_float:
                raise ValueError(f"tag {tag} holds {'strings' if has_str else 'floats'} in some reads, not integers")
            if missing is not None:
                ints[~present] = missing
            return ints
        if kind == "float":
            if has_str:
                raise ValueError(f"tag {tag} holds strings in some reads, not numbers")
            floats[kinds == 1] = ints[kinds == 1]
            floats[~present] = np.nan if missing is None else missing
            return floats
        if kind == "str":
            if has_float:
                raise ValueError(f"tag {tag} holds floats in some reads: not text")
            out = np.zeros((n, max(width, 1)), np.uint8)
            tag_keys(self._source, self._generation, pos, text=out)
            values = out.view(f"S{max(width, 1)}").reshape(n)
            if missing is not None:
                values = values.astype(object if not isinstance(missing, bytes) else values.dtype)
                values[~present] = missing
            return values
        raise ValueError(f"kind must be 'int', 'float', 'str' or None, not {kind!r}")

    def isin(self, tag: str, values: Any) -> np.ndarray:
        """Where ``tag``'s value is one of ``values`` (bool array), tested in C
        with bamflow's canonical values (``CB:i:777`` matches ``"777"``).
        ``values``: a :class:`bamflow.kernels._records.ValueTable` (fastest:
        build it once, outside ``func``) or an iterable of str/bytes/int."""
        import numpy as np

        from ..kernels._records import ValueTable
        from ..kernels.record import tag_keys

        table = values if isinstance(values, ValueTable) else ValueTable(values)
        out = np.empty(self.n, np.uint8)
        tag_keys(self._source, self._generation, self._pos(tag), table=table, hits=out)
        return out.view(np.bool_)

    def _column(self, which: str) -> tuple[bytes, np.ndarray]:
        """(buffer, offsets of n + 1) of the names or sequences, decoded once."""
        import numpy as np

        from ..kernels import record

        if which not in self._text:
            decode = record.name_column if which == "names" else record.sequence_column
            buffer, offsets = decode(self._source, self._generation, self.offsets, self.n)
            self._text[which] = (buffer, np.frombuffer(offsets, np.int64))
        return self._text[which]

    @property
    def names(self) -> tuple[bytes, np.ndarray]:
        """(the read names one after another, offsets of n + 1)."""
        return self._column("names")

    @property
    def sequences(self) -> tuple[bytes, np.ndarray]:
        """(the sequences, decoded to letters, one after another, offsets of n + 1)."""
        return self._column("sequences")

    def name(self, i: int) -> str:
        """Read ``i``'s name."""
        buffer, offsets = self.names
        return buffer[offsets[i] : offsets[i + 1]].decode()


def _column(name: str, values: Any, n: int) -> tuple[str, str, np.ndarray, np.ndarray]:
    """(tag, BAM type, present (uint8), values for the kernel) of a new tag column."""
    import numpy as np

    tag = parse_tag(name)
    present = np.ones(n, np.uint8)
    if isinstance(values, np.ma.MaskedArray):
        present = (~np.ma.getmaskarray(values)).astype(np.uint8)
        values = values.filled(0 if values.dtype.kind in "biuf" else b"")
    array = np.asarray(values)
    if array.shape != (n,):
        raise ValueError(f"tag {tag}: a column of shape {array.shape} for a batch of {n} reads")
    kind = array.dtype.kind
    if kind == "O":
        items = list(array)
        present &= np.array([v is not None for v in items], np.uint8)
        array = np.array([b"" if v is None else v.encode() if isinstance(v, str) else bytes(v) for v in items],
                         dtype=bytes) if n else np.zeros(0, "S1")
        kind = "S"
    if kind == "U":
        array = np.char.encode(array, "utf-8")
        kind = "S"
    if kind == "S":
        width = array.dtype.itemsize
        strings = np.ascontiguousarray(array).view(np.uint8).reshape(n, width) if width else np.zeros((n, 0), np.uint8)
        return tag, "Z", present, strings
    if kind == "f":
        return tag, "f", present, np.ascontiguousarray(array, np.float32)
    if kind in "biu":
        bam_type = _INT_TYPES.get(f"{kind}{array.dtype.itemsize}")
        if bam_type is None:  # 64-bit: the smallest 32-bit type holding the values set
            chosen = array[present.view(np.bool_)]
            low, high = (int(chosen.min()), int(chosen.max())) if chosen.size else (0, 0)
            if low >= -(2**31) and high < 2**31:
                bam_type = "i"
            elif low >= 0 and high < 2**32:
                bam_type = "I"
            else:
                raise ValueError(f"tag {tag}: values {low}..{high} do not fit a BAM integer")
        return tag, bam_type, present, np.ascontiguousarray(array, np.int64)
    raise TypeError(f"tag {tag}: a column of dtype {array.dtype} cannot be a BAM tag (ints, floats, str or bytes)")


def _outcome(result: Any, n: int) -> tuple[np.ndarray | None, list[tuple[str, str, np.ndarray, np.ndarray]]]:
    """(keep mask as uint8 or None, new tag columns) of what ``func`` returned."""
    import numpy as np

    keep: Any = None
    tags: dict[str, Any] = {}
    if result is None:
        pass
    elif isinstance(result, dict):
        tags = result
    elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        keep, tags = result
    else:
        keep = result
    mask = None
    if keep is not None:
        keep_array = np.asarray(keep)
        if keep_array.dtype != np.bool_ or keep_array.shape != (n,):
            raise TypeError(f"the function returned {type(keep).__name__} of dtype {keep_array.dtype} and shape "
                            f"{keep_array.shape}: a keep mask is a bool array of the batch's length ({n})")
        mask = np.ascontiguousarray(keep_array).view(np.uint8)
    if not isinstance(tags, dict):
        raise TypeError(f"new tags come as a dict of columns, not {type(tags).__name__}")
    if len(tags) > 16:
        raise ValueError("at most 16 new tags per batch")
    return mask, [_column(name, values, n) for name, values in tags.items()]


def run_batches(in_fd: int, out_fd: int, func: Callable[[Batch], Any], tags: Sequence[str] = (),
                batch_size: int = 10000, progress_slot: Any = None) -> dict[str, int]:
    """Run ``func`` over the batches of the raw stream on ``in_fd`` (records,
    and chunk-end frames, which end a batch early and pass on), writing to
    ``out_fd``. Returns {reads_in, written, dropped_by_function, added, batches}."""
    import numpy as np

    from ..kernels.record import BatchKernel

    tags = parse_tags(tags) if tags else ()
    kernel = BatchKernel(in_fd, out_fd, tags, batch_size, progress=progress_slot)
    references = tuple(name for name, _ in BamHeader.from_bytes(kernel.start(), "worker input")[0].references)
    batches = 0
    while True:
        columns = {
            "flag": np.empty(batch_size, np.uint16),
            "reference_id": np.empty(batch_size, np.int32),
            "reference_start": np.empty(batch_size, np.int32),
            "mapping_quality": np.empty(batch_size, np.uint8),
            "template_length": np.empty(batch_size, np.int32),
            "next_reference_id": np.empty(batch_size, np.int32),
            "next_reference_start": np.empty(batch_size, np.int32),
            "query_length": np.empty(batch_size, np.int32),
            "offsets": np.empty(batch_size + 1, np.int64),
        }
        tag_pos = np.empty((max(len(tags), 1), batch_size), np.int64)
        n = kernel.next_batch(*columns.values(), tag_pos)
        if n == 0:  # the end of the stream
            break
        batch = Batch(n, columns, tag_pos, tags, kernel, references)
        result = func(batch)
        keep, new_tags = _outcome(result, n)
        del result
        kernel.write_batch(keep, new_tags)
        if sys.getrefcount(batch) > 2:  # func kept the batch: copy its records before the buffer moves on
            batch._detach()
        del batch
        batches += 1
    result = kernel.finish()
    return {"reads_in": result["reads_in"], "written": result["written"],
            "dropped_by_function": result["reads_in"] - result["written"], "added": 0, "batches": batches}


def batch_worker(input: str, output: str, user_func: Callable[[Batch], Any], tags: Sequence[str],
                 batch_size: int) -> dict[str, int]:
    """A worker of :func:`map_batches` (opens its FIFOs itself)."""
    with _worker_fds(input, output) as (in_fd, out_fd):
        return run_batches(in_fd, out_fd, user_func, tags, batch_size, progress.current().slot)


def map_batches(
    input: str | os.PathLike[str],
    func: Callable[[Batch], Any],
    output: str | os.PathLike[str],
    *,
    tags: str | Iterable[str] = (),
    batch_size: int = 10000,
    by: str | Sequence[str] | None = None,
    workers: int = 2,
    order: str = "input",
    threads: int = 2,
    level: int | str | None = None,
    missing: str = "error",
    fmt: str = "bam",
    command_line: str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> RunStats:
    """Run ``func(batch)`` over the reads of ``input`` in batches of up to
    ``batch_size`` reads (:class:`Batch`: numpy columns) in ``workers``
    processes; write the reads it keeps, with the tags it sets, to ``output``.

    ``tags``: the tags ``func`` reads (``"CB,UB"`` or a list; at most 16).
    ``order="input"`` keeps the input order (each batch is a chunk dealt
    round-robin); ``by`` sends reads with the same tag value(s) or name to
    the same worker (then order is ``"any"``, ``"coordinate"`` or
    ``"tag:XX"``). Other arguments as :func:`bamflow.map_reads`. Returns
    :class:`RunStats` (dropped ``by_function``: the reads not kept).
    """
    tag_names = parse_tags(tags) if tags else ()
    if len(tag_names) > 16:
        raise ValueError("at most 16 tags")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', not {missing!r}")
    if order == "input" and by is not None:
        raise ValueError("order='input' needs reads dealt round-robin (by=None); sharding by a key reorders them")
    w = BamWorkflow("map_batches", start_method=start_method)
    jobs = w.scatter(
        os.fspath(input),
        batch_worker,
        workers=workers,
        distribute=DistributeOptions(by=by, chunk_size=batch_size, missing=missing, frame_chunks=order == "input"),
        worker_kwargs={"user_func": func, "tags": tag_names, "batch_size": batch_size},
        decode=DecodeOptions(threads),
        output=os.fspath(output),
        collect=CollectOptions(order),
        encode=_encode_options(level, threads, fmt, command_line),
    )
    return run_mapped(w, jobs, input, output, timeout, on_progress)
