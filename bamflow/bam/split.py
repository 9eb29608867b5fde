"""Keep the reads of listed cells (``filter_reads``), or write one BAM per cell
(``split_reads``): the Python API behind ``bamflow filter`` and ``bamflow split``.

filter_reads::

    decode ─▶ filter (C hash set of values) ─▶ encode ─▶ output.bam

Like 10x ``subset-bam`` or ``samtools view -D CB:file``: a read is kept when
the canonical bytes of its tag value (``"ACGT-1"``; integers as decimal text;
``"CB,UB"``: the values joined by NUL) are in the list (not in it, with
``invert``). Reads without the tag are dropped either way, as samtools does.

split_reads::

    decode ─▶ distribute by tag value ─▶ split worker × N ─▶ BAM per value/group

Each worker keeps one buffer of records per output in C, compresses a buffer
as BGZF blocks when it reaches 64 KB (or when the worker's share of
``memory_budget`` is used up: largest buffers first) and *appends* them to the
output's part file, opened and closed for each append: at most a few file
descriptors are open whatever the number of outputs. All parts live in a
scratch folder inside ``out_dir`` until every job succeeded; then each file
gets the BGZF EOF block (parts of one group written by several workers are
concatenated first) and joins the run's publication with ``manifest.tsv``
(``value<TAB>file<TAB>reads``): they appear together. A failed run removes
the scratch folder, so no file that looks complete is left.

File names: ``prefix + value + ".bam"`` when the value is a plain name
(``[A-Za-z0-9_.-]``, not starting with ``.``, at most 100 characters, not
empty); otherwise the value with every other byte replaced by ``_`` (leading
dots too, cut to 100) plus ``+`` and 16 hex digits of the SHA-256 of the raw
value. Plain names never contain ``+``, so names never collide (short of a
64-bit hash collision) and never leave ``out_dir``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

from ..engine import progress
from ..engine.errors import WorkflowError
from ..engine.fifo import FIFO
from ..engine.files import fd_of, write_all
from ..engine.publish import Publication
from ..kernels._records import ValueTable, value_key
from .bgzf import BLOCK_SIZE, EOF_BLOCK, compress_block
from .header import BamHeader
from .header import command_line as _process_command_line
from .options import DEFAULT_LEVEL, DecodeOptions, DistributeOptions, EncodeOptions, check_level, parse_tags
from .stages import source_name
from .workflow import BamWorkflow, refuse_overwrite, require_tags

log = logging.getLogger("bamflow")

MANIFEST = "manifest.tsv"
FLUSH_SIZE = BLOCK_SIZE  # one BGZF block per flush
MAX_NAME = 100
_UNSAFE = re.compile(rb"[^A-Za-z0-9_.-]")


# -- values, keys and names ------------------------------------------------------------


def _is_path(values: Any) -> bool:
    return isinstance(values, (str, bytes, os.PathLike))


def _read_text_file(path: Any) -> bytes:
    """The bytes of a (possibly gzip-compressed) text file, e.g. a 10x barcodes.tsv.gz."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise WorkflowError(f"{os.fspath(path)}: truncated or corrupt gzip file ({e})") from None
    return data


def values_blob(values: Any, n_tags: int) -> tuple[bytes, bool]:
    """(blob, from_file): values as one ``\\n``-separated blob for ValueTable.add_values.

    From a file: one value per line (``\\r\\n`` is fine, empty lines are
    skipped); with several tags, the values of one key are TAB-separated.
    From an iterable: every value, including empty ones (the blob then ends
    with ``\\n`` so that each value is exactly one line)."""
    if _is_path(values):
        data = _read_text_file(values)
        if n_tags > 1:
            data = data.replace(b"\t", b"\0")
        return data, True
    keys = [value_key(v) for v in values]
    for k in keys:
        if b"\n" in k:
            raise ValueError(f"a value cannot contain a newline: {k!r}")
    return b"".join(k + b"\n" for k in keys), False


def _load(blob: bytes, from_file: bool, out: int = -1) -> ValueTable:
    vs = ValueTable()
    if from_file:
        vs.add_values(blob, b"\n", out)
    else:
        vs.add_values(blob, b"\n", out, strip_cr=False, skip_empty=False)
    return vs


def safe_name(raw: bytes, prefix: str = "") -> str:
    """The output file name of a value (see the module doc)."""
    name = _UNSAFE.sub(b"_", raw)
    changed = name != raw
    stripped = name.lstrip(b".")
    if stripped != name:
        name = b"_" * (len(name) - len(stripped)) + stripped
        changed = True
    if not name:
        name, changed = b"_", True
    if len(name) > MAX_NAME:
        name, changed = name[:MAX_NAME], True
    text = prefix + name.decode("ascii")
    if changed:
        text += "+" + hashlib.sha256(raw).hexdigest()[:16]
    return text + ".bam"


def _bgzf_blocks(data: bytes, level: Any) -> bytes:
    return b"".join(compress_block(data[i : i + BLOCK_SIZE], level) for i in range(0, len(data), BLOCK_SIZE))


def _append(path: str, *pieces: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        for piece in pieces:
            write_all(fd, memoryview(piece))
    finally:
        os.close(fd)


# -- job functions -----------------------------------------------------------------------


def filter_job(
    input: Any, output: Any, *, blob: bytes, from_file: bool, tags: tuple[str, ...], invert: bool, source: str = ""
) -> dict[str, Any]:
    """Filter a raw BAM stream by tag value (see :func:`filter_reads`)."""
    from ..kernels.select import Filter

    vs = _load(blob, from_file)
    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        out_fd = fd_of(output, True, stack)
        stats = Filter(in_fd, out_fd, vs, tags, invert, source=f"{source}: " if source else "",
                       progress=progress.current().slot).run()
    stats["values"] = len(vs)
    return stats


def split_job(
    input: str,
    output: None,
    *,
    tmp_dir: str,
    tags: tuple[str, ...],
    selection: tuple[bytes, bool] | None,
    groups: list[tuple[str, bytes]] | None,
    prefix: str,
    flush_size: int,
    memory_budget: int,
    min_reads: int,
    level: Any,
    command_line: str,
) -> dict[str, Any]:
    """One split worker: group its share of the reads by value and append them
    to part files in ``tmp_dir`` (see :func:`split_reads`)."""
    from ..kernels.select import Splitter

    selected = None
    labels: list[bytes] | None = None
    if groups is not None:
        selected = ValueTable()
        for number, (_, blob) in enumerate(groups):
            selected.add_values(blob, b"\n", number, strip_cr=False, skip_empty=False)
        labels = [name.encode("utf-8", "surrogateescape") for name, _ in groups]
    elif selection is not None:
        selected = _load(*selection)
    header_block: list[bytes] = []
    paths: dict[int, str] = {}
    part = secrets.token_hex(4)

    def on_header(raw: bytes) -> None:
        header, _ = BamHeader.from_bytes(raw, "split input")
        header_block.append(_bgzf_blocks(header.with_program(command_line).to_bytes(), level))

    def label_of(out: int, key: bytes | None) -> bytes:
        if key is not None:
            return key
        if labels is not None:
            return labels[out]
        assert selected is not None  # outputs are either groups or selected values
        return selected.value_at(out)

    def on_flush(out: int, key: bytes | None, data: bytes) -> None:
        path = paths.get(out)
        pieces = [_bgzf_blocks(data, level)]
        if path is None:
            path = paths[out] = os.path.join(tmp_dir, f"{safe_name(label_of(out, key), prefix)}.{part}")
            pieces.insert(0, header_block[0])
        _append(path, *pieces)

    with ExitStack() as stack:
        in_fd = fd_of(input, False, stack)
        stats = Splitter(
            in_fd,
            tags,
            on_flush,
            on_header,
            selected,
            flush_size=flush_size,
            memory_budget=memory_budget,
            min_reads=min_reads,
            drop_below=groups is None,  # a group's reads may be spread over workers
            progress=progress.current().slot,
        ).run()
    outputs = []
    for out, key, reads, flushed in stats.pop("outputs"):
        label = label_of(out, key)
        outputs.append((label, safe_name(label, prefix), reads, os.path.basename(paths[out]) if flushed else None))
    stats["outputs"] = outputs
    stats["header_bytes"] = len(header_block[0]) if header_block else 0
    stats["reads_in"] = stats["records"]
    stats["written"] = None
    return stats


# -- the API -------------------------------------------------------------------------------


def filter_reads(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    tag: str = "CB",
    values: Iterable[str | bytes | int] | str | os.PathLike[str],
    invert: bool = False,
    threads: int = 2,
    level: int | str | None = None,
    command_line: str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, int]:
    """Write the reads of ``input`` whose ``tag`` value is in ``values`` (not in
    it, with ``invert``) to ``output`` (BAM, one @PG line added).

    ``values``: an iterable of values (str, bytes, int; tuples for several
    tags) or a path to a file with one value per line (gzip is fine; several
    tags: TAB-separated). ``tag``: ``"CB"`` or ``"CB,UB"``. Reads without the
    tag are dropped, with or without ``invert``.

    Returns {"records_in", "kept", "dropped_not_listed", "dropped_missing_tag",
    "values"}; raises WorkflowError if a job failed or the reads do not add up.
    """
    tags = parse_tags(tag)
    refuse_overwrite([input], output)
    blob, from_file = values_blob(values, len(tags))
    encode = EncodeOptions(
        **({} if level is None else {"level": level}), threads=threads,
        command_line=command_line or _process_command_line(),
    )
    w = BamWorkflow("filter_reads", start_method=start_method)
    w.BAM_reader(input=os.fspath(input), output=FIFO("decoded", "wb"), options=DecodeOptions(threads))
    w.add_job(
        func=filter_job,
        job_name="{workflow}.filter{n}",
        input=FIFO("decoded", "rb"),
        output=FIFO("kept", "wb"),
        blob=blob,
        from_file=from_file,
        tags=tags,
        invert=invert,
        source=source_name(os.fspath(input)),
    )
    selector = w.last[0]
    w.BAM_writer(input=FIFO("kept", "rb"), output=os.fspath(output), options=encode)
    writer = w.last[0]
    stats: dict[str, Any] = {}

    def check(w: BamWorkflow) -> None:
        """The books, before the output appears."""
        stats.update(w.result(selector))
        require_tags(tags, stats["records_in"], stats.pop("tags_seen"))
        if stats["records_in"] != stats["kept"] + stats["dropped_not_listed"] + stats["dropped_missing_tag"]:
            raise WorkflowError(f"filter_reads: reads do not add up: {stats}")
        if w.result(writer)["records"] != stats["kept"]:
            raise WorkflowError(f"filter_reads: {stats['kept']} reads kept, {w.result(writer)['records']} written")

    w.run(timeout=timeout, on_progress=on_progress, check=check)
    log.info("filter_reads %s → %s: %s", input, output, stats)
    return stats


def _read_groups(path: Any, n_tags: int) -> list[tuple[str, bytes]]:
    """A TSV of ``value<TAB>group`` lines (several tags: their values in the
    first columns) → [(group, blob of its values)], groups in order of appearance."""
    members: dict[str, list[bytes]] = {}
    seen: dict[bytes, str] = {}
    for number, line in enumerate(_read_text_file(path).split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        fields = line.split(b"\t")
        if len(fields) != n_tags + 1:
            raise ValueError(f"{os.fspath(path)}, line {number}: expected {n_tags + 1} TAB-separated columns "
                             f"(value{'s' if n_tags > 1 else ''}, group), found {len(fields)}")
        key = b"\0".join(fields[:n_tags])
        group = fields[-1].decode("utf-8", "surrogateescape")
        if not group:
            raise ValueError(f"{os.fspath(path)}, line {number}: empty group name")
        if key in seen:
            if seen[key] != group:
                raise ValueError(f"{os.fspath(path)}, line {number}: value {key!r} is in groups "
                                 f"{seen[key]!r} and {group!r}")
            continue
        seen[key] = group
        members.setdefault(group, []).append(key)
    return [(group, b"".join(k + b"\n" for k in keys)) for group, keys in members.items()]


def split_reads(
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    by: str = "CB",
    values: Iterable[str | bytes | int] | str | os.PathLike[str] | None = None,
    groups: str | os.PathLike[str] | None = None,
    min_reads: int | None = None,
    workers: int = 2,
    threads: int = 1,
    level: int | str | None = None,
    memory_budget: int = 256 << 20,
    prefix: str = "",
    force: bool = False,
    command_line: str | None = None,
    start_method: str | None = None,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Write one BAM per value of tag(s) ``by`` (``"CB"``, ``"CB,UB"``) into
    ``out_dir``, in one pass over ``input``, plus ``out_dir/manifest.tsv``.

    ``values``: only these values (iterable or a file, as for
    :func:`filter_reads`), one file each. ``groups``: a TSV ``value<TAB>group``
    (sinto filterbarcodes style): one file per group. ``min_reads``: only
    outputs with at least that many reads get a file. ``workers`` split
    processes share ``memory_budget`` bytes of record buffers; ``threads``:
    BGZF decompression threads of the reader; ``level``: compression level.

    A folder holding an earlier run's outputs is refused unless ``force``
    (which replaces them whole; see bamflow.engine.publish).

    Returns {"records_in", "written", "files", "dropped": {"missing_tag",
    "not_selected", "below_min_reads"}, "manifest"}; raises WorkflowError if a
    job failed or the reads do not add up (and then leaves no output behind).
    """
    tags = parse_tags(by)
    if values is not None and groups is not None:
        raise ValueError("give values or groups, not both")
    if "/" in prefix or "\0" in prefix or prefix.startswith("."):
        raise ValueError(f"prefix must not contain '/' or NUL nor start with '.': {prefix!r}")
    level = check_level(DEFAULT_LEVEL if level is None else level)
    min_reads = int(min_reads or 0)
    selection = values_blob(values, len(tags)) if values is not None else None
    group_list = _read_groups(groups, len(tags)) if groups is not None else None
    out_dir = os.fspath(out_dir)
    stats: dict[str, Any] = {}
    with Publication() as pub:
        pub.claim_folder(out_dir, force=force, inputs=[os.fspath(input)])
        tmp_dir = pub.scratch_folder(out_dir, "split-parts")
        try:
            w = BamWorkflow("split_reads", start_method=start_method)
            jobs = w.scatter(
                os.fspath(input),
                split_job,
                workers=workers,
                distribute=DistributeOptions(by=tags, missing="drop"),
                decode=DecodeOptions(max(1, threads)),
                worker_kwargs=dict(
                    tmp_dir=tmp_dir,
                    tags=tags,
                    selection=selection,
                    groups=group_list,
                    prefix=prefix,
                    flush_size=FLUSH_SIZE,
                    memory_budget=max(1 << 16, memory_budget // workers),
                    min_reads=min_reads,
                    level=level,
                    command_line=command_line or _process_command_line(),
                ),
            )
            w.run(timeout=timeout, on_progress=on_progress, check=jobs.check_flow, publication=pub)
            dist = w.result(jobs.distributor)
            per_worker = w.result(jobs.workers)
            stats = _finish(pub, tmp_dir, out_dir, per_worker, min_reads)
            stats["records_in"] = dist["records"]
            stats["dropped"]["missing_tag"] = dist["dropped_missing_tag"] + sum(p["missing_tag"] for p in per_worker)
            stats["dropped"]["not_selected"] = sum(p["not_selected"] for p in per_worker)
            if stats["records_in"] != stats["written"] + sum(stats["dropped"].values()):
                raise WorkflowError(f"split_reads: reads do not add up: {stats}")
            pub.commit()
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("split_reads %s → %s: %s", input, out_dir, stats)
    return stats


def _finish(pub: Publication, tmp_dir: str, out_dir: str, per_worker: list[dict[str, Any]], min_reads: int) -> dict[str, Any]:
    """Complete the part files (a file's parts concatenated, the EOF block) as
    the publication's files in out_dir, and the manifest; returns the counts."""
    files: dict[str, dict[str, Any]] = {}
    for result in per_worker:
        header_bytes = result["header_bytes"]
        for label, name, reads, part in result["outputs"]:
            entry = files.setdefault(name, {"label": label, "reads": 0, "parts": []})
            if entry["label"] != label:  # (a 64-bit hash collision)
                raise WorkflowError(f"split_reads: values {entry['label']!r} and {label!r} map to one file name {name!r}")
            entry["reads"] += reads
            if part is not None:
                entry["parts"].append((os.path.join(tmp_dir, part), header_bytes))
    written = below = 0
    manifest = []
    for name in sorted(files):
        entry = files[name]
        parts = entry["parts"]
        if entry["reads"] < min_reads:
            below += entry["reads"]
            continue
        if not parts:
            raise WorkflowError(f"split_reads: no worker wrote {name!r} ({entry['reads']} reads)")
        first = parts[0][0]
        fd = os.open(first, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            for path, header_bytes in parts[1:]:  # the same header: skip it in later parts
                with open(path, "rb") as f:
                    f.seek(header_bytes)
                    while True:
                        block = f.read(1 << 20)
                        if not block:
                            break
                        write_all(fd, memoryview(block))
                os.unlink(path)
            write_all(fd, memoryview(EOF_BLOCK))
        finally:
            os.close(fd)
        os.replace(first, pub.path(os.path.join(out_dir, name)))
        written += entry["reads"]
        manifest.append((entry["label"], name, entry["reads"]))
    pub.write_tsv(os.path.join(out_dir, MANIFEST), ("value", "file", "reads"), manifest)
    return {
        "written": written,
        "files": len(manifest),
        "dropped": {"missing_tag": 0, "not_selected": 0, "below_min_reads": below},
        "manifest": os.path.join(out_dir, MANIFEST),
    }
