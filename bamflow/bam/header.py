"""The header of a raw (uncompressed, un-BGZF'd) BAM stream, and our @PG line.

A raw BAM stream is ``BAM\\1``, the header text, the reference list, then
records; it is what bamflow's BAM stages pass to each other over FIFOs.
"""

from __future__ import annotations

import shlex
import struct
import sys
from dataclasses import dataclass
from typing import Any

from ..engine.errors import WorkflowError
from ..kernels._records import parse_header

BAM_MAGIC = b"BAM\x01"


class BamFormatError(WorkflowError, ValueError):
    """Input that is not (valid) BAM; the message is one line naming what is
    wrong. A WorkflowError (the run failed on bad data: exit status 1), and a
    ValueError for callers that catch those."""


@dataclass
class BamHeader:
    """SAM header text and the binary reference list (name, length)."""

    text: str
    references: list[tuple[str, int]]

    def to_bytes(self) -> bytes:
        """The header as it starts a raw BAM stream."""
        text = self.text.encode("utf-8", "surrogateescape")
        parts = [BAM_MAGIC, struct.pack("<i", len(text)), text, struct.pack("<i", len(self.references))]
        for name, length in self.references:
            encoded = name.encode() + b"\x00"
            parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<i", length)]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, source: str = "BAM stream") -> tuple[BamHeader, int]:
        """Parse a raw BAM header at the start of ``data`` (the kernels' one
        header parser); returns it and its length.

        Raises BamFormatError (not BAM) or EOFError (``data`` ends inside the header).
        """
        try:
            length, text, refs = parse_header(memoryview(data).cast("B") if not isinstance(data, bytes) else data,
                                              f"{source}: ")
        except EOFError:
            raise
        except ValueError as e:
            raise BamFormatError(str(e)) from None
        references = [(name.decode("utf-8", "surrogateescape"), ref_length) for name, ref_length in refs]
        return cls(text.rstrip(b"\x00").decode("utf-8", "surrogateescape"), references), length

    @classmethod
    def from_pysam(cls, header: Any) -> BamHeader:
        """The header of a pysam ``AlignmentHeader`` (or an AlignmentFile's)."""
        return cls(str(header), list(zip(header.references, header.lengths, strict=True)))

    def with_sort_order(self, order: str) -> BamHeader:
        """This header with @HD SO:``order`` (an @HD line is added if there is none)."""
        lines = [line for line in self.text.split("\n") if line]
        for i, line in enumerate(lines):
            if line.startswith("@HD\t"):
                fields = [f for f in line.split("\t")[1:] if not f.startswith("SO:")]
                lines[i] = "\t".join(["@HD", *fields, f"SO:{order}"])
                break
        else:
            lines.insert(0, f"@HD\tVN:1.6\tSO:{order}")
        return BamHeader("\n".join(lines) + "\n", list(self.references))

    @property
    def sort_order(self) -> str | None:
        """@HD SO (``coordinate``, ``queryname``, ``unsorted``, ``unknown``), or None."""
        for line in self.text.split("\n"):
            if line.startswith("@HD\t"):
                for field in line.split("\t")[1:]:
                    if field.startswith("SO:"):
                        return field[3:]
                return None
        return None

    def with_program(self, command_line: str, program: str = "bamflow", version: str | None = None) -> BamHeader:
        """This header plus one @PG line: a unique ID, PN, VN, CL, and PP naming
        the end of the @PG chain (the @PG no other names as its PP; of several
        such ends, the last in the header)."""
        if version is None:
            from bamflow import __version__ as version
        lines = [line for line in self.text.split("\n") if line]
        ids: list[str] = []
        named_as_previous = set()
        for line in lines:
            if line.startswith("@PG\t"):
                for field in line.split("\t")[1:]:
                    if field.startswith("ID:"):
                        ids.append(field[3:])
                    elif field.startswith("PP:"):
                        named_as_previous.add(field[3:])
        chain_ends = [i for i in ids if i not in named_as_previous]
        last_id = chain_ends[-1] if chain_ends else (ids[-1] if ids else None)
        new_id = program
        suffix = 0
        while new_id in ids:
            suffix += 1
            new_id = f"{program}.{suffix}"
        fields = [f"ID:{new_id}", f"PN:{program}"]
        if last_id is not None:
            fields.append(f"PP:{last_id}")
        # tabs and newlines would break the header line
        clean_cl = command_line.replace("\t", " ").replace("\n", " ")
        fields += [f"VN:{version}", f"CL:{clean_cl}"]
        lines.append("@PG\t" + "\t".join(fields))
        return BamHeader("\n".join(lines) + "\n", list(self.references))


def command_line() -> str:
    """How this process was started, for @PG CL (shell-quoted)."""
    return " ".join(shlex.quote(arg) for arg in [sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:]])


def read_file_header(path: str) -> BamHeader | None:
    """The header of a BAM, uncompressed BAM or SAM file, read without pysam
    (so a bad file gives one clear BamFormatError); None for stdin, which
    cannot be read twice."""
    from .bgzf import BgzfError, BgzfReader, detect_format

    if path in ("-", "/dev/stdin"):
        return None
    try:
        return _read_file_header(path, BgzfReader, detect_format)
    except BgzfError as e:
        raise BamFormatError(str(e)) from None


def _read_file_header(path: str, BgzfReader: Any, detect_format: Any) -> BamHeader | None:
    with open(path, "rb") as f:
        fmt = detect_format(f.read(512))
        f.seek(0)
        if fmt == "sam":
            lines = []
            for line in f:
                if not line.startswith(b"@"):
                    break
                lines.append(line.decode("utf-8", "surrogateescape"))
            text = "".join(lines)
            refs = []
            for line in lines:
                if line.startswith("@SQ\t"):
                    fields = dict(field.split(":", 1) for field in line.rstrip("\n").split("\t")[1:] if ":" in field)
                    refs.append((fields.get("SN", ""), int(fields.get("LN", "0") or 0)))
            return BamHeader(text, refs)
        if fmt not in ("bgzf", "bam-raw"):
            raise BamFormatError(f"{path}: not a BAM or SAM file")
        stream = BgzfReader(f, threads=0) if fmt == "bgzf" else f
        data = b""
        while True:
            block = stream.read1(1 << 16) if fmt == "bgzf" else stream.read(1 << 16)
            data += block
            try:
                return BamHeader.from_bytes(data, path)[0]
            except EOFError:
                if not block:
                    raise BamFormatError(f"{path}: ends inside the BAM header") from None
