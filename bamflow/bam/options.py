"""The options of the BAM stages, each declared once (see
:mod:`bamflow.engine.options`), and the one check of tag names.

A tag name has two characters, a letter then a letter or digit (SAM
specification section 1.5: ``[A-Za-z][A-Za-z0-9]``). :func:`parse_tags` is
where every command and function checks them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..engine.options import StageOptions

TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]\Z")
MISSING_POLICIES = ("error", "drop", "unassigned")
ORDERS = ("any", "input", "coordinate", "tag:XX")
FORMATS = ("bam", "ubam", "sam")
#: libdeflate level whose output is within 1.5% of ``samtools view -b``'s size (docs/bgzf.md)
DEFAULT_LEVEL = 6
#: ISA-L level 1: several times faster than DEFAULT_LEVEL, larger output
FAST_LEVEL = "fast"

Key = tuple[str, ...] | str | None  # tags, "name" (the read name), or None (round-robin)


def parse_tags(tags: str | Iterable[str | bytes]) -> tuple[str, ...]:
    """``"CB"``, ``"CB,UB"`` or ``["CB", "UB"]`` → ``("CB", "UB")``; raises
    ValueError naming a malformed tag name."""
    names = tags.split(",") if isinstance(tags, str) else [t.decode("ascii", "replace") if isinstance(t, bytes) else t
                                                           for t in tags]
    if not names or names == [""]:
        raise ValueError("give at least one tag, e.g. CB")
    for name in names:
        if not isinstance(name, str) or not TAG_NAME.match(name):
            raise ValueError(f"a BAM tag name is a letter and a letter or digit (like CB), not {name!r}")
    return tuple(names)


def parse_tag(tag: str | bytes) -> str:
    """One tag name (see :func:`parse_tags`)."""
    tags = parse_tags([tag] if isinstance(tag, bytes) else tag)
    if len(tags) != 1:
        raise ValueError(f"give one tag, not {', '.join(tags)}")
    return tags[0]


def parse_key(by: str | Iterable[str] | None) -> Key:
    """What to shard by: None (round-robin), ``"name"`` (the read name) or tags."""
    if by is None or by == "name":
        return by
    return parse_tags(by)


def check_level(level: int | str) -> int | str:
    """A compression level: 0-12 (libdeflate; 0 stores) or ``"fast"`` (ISA-L level 1)."""
    if level == FAST_LEVEL:
        return level
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 12:
        raise ValueError(f"level must be 0-12 or {FAST_LEVEL!r}, not {level!r}")
    return level


@dataclass(frozen=True)
class DecodeOptions(StageOptions):
    """How BAM_reader decodes its input: BGZF is inflated in ``threads`` threads."""

    threads: int = 2

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, not {self.threads}")


@dataclass(frozen=True)
class DistributeOptions(StageOptions):
    """How distribute_bam deals records (see :class:`bamflow.kernels.bam.Distributor`).

    ``by``: None (round-robin in chunks of ``chunk_size`` records), ``"name"``
    (mates meet) or tags (``"CB"``, ``"CB,UB"``, ``("CB", "UB")``: a stable
    hash of their canonical values). ``missing`` (records whose key tag is
    absent or empty): ``"error"``, ``"drop"`` or ``"unassigned"``.
    ``header_broadcast``: every output gets the header (so that each is a
    BAM stream). ``frame_chunks`` (round-robin): a chunk-end frame after every
    chunk, for ``collect_bam(order="input")`` behind workers that pass frames
    on. ``count_values`` (tags): reads per key value, for manifests.
    """

    by: Key = None
    chunk_size: int = 1000
    missing: str = "error"
    header_broadcast: bool = True
    frame_chunks: bool = False
    count_values: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "by", parse_key(self.by))
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {self.chunk_size}")
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {', '.join(MISSING_POLICIES)}, not {self.missing!r}")
        if self.frame_chunks and self.by is not None:
            raise ValueError("frame_chunks needs round-robin distribution (by=None)")
        if self.count_values and not self.by_tags:
            raise ValueError("count_values needs distribution by tags")

    @property
    def by_tags(self) -> bool:
        return isinstance(self.by, tuple)


@dataclass(frozen=True)
class CollectOptions(StageOptions):
    """How collect_bam merges record streams (see :class:`bamflow.kernels.bam.Collector`):
    ``order`` is ``"any"``, ``"input"`` (chunks in turn, after chunk-end
    frames), ``"coordinate"`` or ``"tag:XX"`` (merges of sorted inputs)."""

    order: str = "any"

    def __post_init__(self) -> None:
        if self.order.startswith("tag:"):
            parse_tag(self.order[4:])
        elif self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")

    @property
    def keeps_sort_order(self) -> bool:
        """Whether the output keeps a sort order its inputs had."""
        return self.order != "any"


@dataclass(frozen=True)
class EncodeOptions(StageOptions):
    """How BAM_writer writes: BAM (BGZF at ``level`` in ``threads`` threads),
    ``fmt="ubam"`` (uncompressed BAM) or ``"sam"``; one @PG line with
    ``command_line`` (None: how this process was started); ``sort_order``
    (None: the input's) replaces @HD SO when the records are no longer in the
    input's order; ``end_marker=False`` leaves the BGZF EOF marker to the
    workflow, which writes it only when the whole run succeeded;
    ``program=False`` keeps the header exactly as it is (no @PG line: for
    writing again what a bamflow run already wrote, such as the parts of a
    distributed run); ``header=False`` writes the records only (a part
    joined after another that carries the header, as a region run's
    later parts are, :func:`~bamflow.bam.concat.join_parts`)."""

    level: int | str = DEFAULT_LEVEL
    threads: int = 2
    fmt: str = "bam"
    command_line: str | None = None
    sort_order: str | None = None
    end_marker: bool = True
    program: bool = True
    header: bool = True

    def __post_init__(self) -> None:
        check_level(self.level)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, not {self.threads}")
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {self.fmt!r}")
        if self.sort_order not in (None, "unsorted", "coordinate", "queryname", "unknown"):
            raise ValueError(f"sort_order must be unsorted, coordinate, queryname or unknown, not {self.sort_order!r}")
