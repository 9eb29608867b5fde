"""The header of a raw (uncompressed, un-BGZF'd) BAM stream, and our @PG line.

A raw BAM stream is ``BAM\\1``, the header text, the reference list, then
records; it is what bamflow's BAM stages pass to each other over FIFOs.
"""

from __future__ import annotations

import shlex
import struct
import sys
from dataclasses import dataclass

BAM_MAGIC = b"BAM\x01"


class BamFormatError(ValueError):
    """Input that is not (valid) BAM; the message is one line naming what is wrong."""


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
    def from_bytes(cls, data: bytes | memoryview, source: str = "BAM stream") -> tuple[BamHeader, int]:
        """Parse a raw BAM header at the start of ``data``; returns it and its length.

        Raises BamFormatError (not BAM) or EOFError (``data`` ends inside the header).
        """
        view = memoryview(data)
        if len(view) < 4:
            raise EOFError
        if bytes(view[:4]) != BAM_MAGIC:
            raise BamFormatError(f"{source}: not a BAM stream (starts with {bytes(view[:4])!r})")
        offset = 4
        (l_text,) = _unpack("<i", view, offset)
        if l_text < 0:
            raise BamFormatError(f"{source}: corrupt BAM header (negative text length)")
        offset += 4
        text = bytes(_take(view, offset, l_text)).rstrip(b"\x00").decode("utf-8", "surrogateescape")
        offset += l_text
        (n_ref,) = _unpack("<i", view, offset)
        if n_ref < 0:
            raise BamFormatError(f"{source}: corrupt BAM header (negative reference count)")
        offset += 4
        references = []
        for _ in range(n_ref):
            (l_name,) = _unpack("<i", view, offset)
            if l_name <= 0:
                raise BamFormatError(f"{source}: corrupt BAM header (reference name length {l_name})")
            name = bytes(_take(view, offset + 4, l_name)).rstrip(b"\x00").decode()
            (length,) = _unpack("<i", view, offset + 4 + l_name)
            references.append((name, length))
            offset += 8 + l_name
        return cls(text, references), offset

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


def _unpack(fmt: str, view: memoryview, offset: int) -> tuple:
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, _take(view, offset, size))


def _take(view: memoryview, offset: int, size: int) -> memoryview:
    if offset + size > len(view):
        raise EOFError
    return view[offset : offset + size]


def command_line() -> str:
    """How this process was started, for @PG CL (shell-quoted)."""
    return " ".join(shlex.quote(arg) for arg in [sys.argv[0].rsplit("/", 1)[-1], *sys.argv[1:]])
