"""One way to publish outputs: all files of a run appear together, or none.

A :class:`Publication` collects the output files of one run. Each file is
written under a temporary name unique to the run, in the folder of its final
name (so the last step is a rename within one file system); :meth:`commit`
checks that every file was written, flushes each to disk (``fsync``), renames
them all to their final names and flushes the folders, with SIGINT and
SIGTERM held back so that an interrupt cannot leave half of them published.
A run that fails calls :meth:`abort` (leaving a ``with`` block by an
exception does), which removes every temporary file: a failed run publishes
nothing.

Standard output and device files (``-``, ``/dev/…``) are written in place.

Text tables go through :meth:`Publication.write_tsv`, the one TSV writer: a
field holding a tab, newline, carriage return, NUL or backslash is escaped
(``\\t \\n \\r \\0 \\\\``), so a value can never break a table's alignment.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import secrets
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from .errors import WorkflowError

STDOUT_NAMES = ("-", "/dev/stdout")
_CONTROLS = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"}
_ESCAPE_CONTROLS = str.maketrans(_CONTROLS)
_ESCAPE_ALL = str.maketrans({"\\": "\\\\", **_CONTROLS})


def is_special(path: str) -> bool:
    """stdout and device files are written in place, not renamed."""
    return path in STDOUT_NAMES or path.startswith("/dev/")


def escape_field(value: Any) -> str:
    """A table field: str(value) with backslash escapes for ``\\ \\t \\n \\r`` and NUL.

    bytes are decoded as UTF-8, undecodable bytes written as ``\\xNN``.
    """
    if isinstance(value, (bytes, bytearray)):
        # backslashes first, at the byte level: those backslashreplace adds stay single
        text = bytes(value).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
        return text.translate(_ESCAPE_CONTROLS)
    return str(value).translate(_ESCAPE_ALL)


class Publication:
    """The output files of one run (see the module doc).

    >>> with Publication() as pub:
    ...     pub.write_text("out/summary.txt", "done\\n")
    ...     pub.commit()
    """

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._temps: dict[str, str] = {}  # final absolute path → temporary path
        self._finals: dict[str, str] = {}  # final absolute path → the path as given
        self._made: list[str] = []  # folders this publication created, outermost first
        self.committed = False
        self.aborted = False

    # -- reserving ---------------------------------------------------------------

    def path(self, final: str | os.PathLike[str]) -> str:
        """The temporary path to write ``final`` at (the same path for stdout
        and devices). Reserving a file again returns the same path."""
        final = os.fspath(final)
        if is_special(final):
            return final
        self._check_open()
        key = os.path.abspath(final)
        temp = self._temps.get(key)
        if temp is None:
            folder, base = os.path.split(key)
            temp = os.path.join(folder, f".{base}.bamflow-{self.token}.tmp")
            self._temps[key] = temp
            self._finals[key] = final
        return temp

    def make_folder(self, folder: str | os.PathLike[str]) -> str:
        """Create ``folder`` (and missing parents) for outputs; a publication
        that is aborted removes the folders it created (if empty)."""
        self._check_open()
        path = os.path.abspath(os.fspath(folder))
        missing = []
        while not os.path.isdir(path):
            if os.path.exists(path):
                raise WorkflowError(f"cannot make the output folder {os.fspath(folder)}: {path} is not a folder")
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for path in reversed(missing):
            os.mkdir(path)
            self._made.append(path)
        return os.fspath(folder)

    def reserved(self) -> list[str]:
        """The final paths reserved so far, as given."""
        return list(self._finals.values())

    # -- writing -------------------------------------------------------------------

    @contextmanager
    def open(self, final: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
        """Open ``final``'s temporary file (``"w"``, ``"wb"``, ``"wt"``); a name
        ending in ``.gz`` is gzip-compressed (mtime 0: reproducible)."""
        final = os.fspath(final)
        if is_special(final):
            raise ValueError(f"open() writes files; write {final!r} with write_bytes()")
        temp = self.path(final)
        binary = "b" in mode
        if final.endswith(".gz"):
            raw = open(temp, "wb")
            zipped = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
            stream: IO[Any] = zipped if binary else io.TextIOWrapper(zipped, encoding="utf-8", newline="\n", **kwargs)
            try:
                yield stream
            finally:
                stream.close()
                raw.close()
            return
        if binary:
            with open(temp, "wb") as f:
                yield f
        else:
            with open(temp, "w", encoding="utf-8", newline="\n", **kwargs) as f:
                yield f

    def write_bytes(self, final: str | os.PathLike[str], data: bytes) -> str:
        """Write ``data`` to ``final`` (stdout: written now); returns the final path."""
        final = os.fspath(final)
        if final in STDOUT_NAMES:
            import sys

            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return final
        if is_special(final):  # a device (/dev/stderr): written in place
            with open(final, "wb") as f:
                f.write(data)
            return final
        with self.open(final, "wb") as f:
            f.write(data)
        return final

    def write_text(self, final: str | os.PathLike[str], text: str) -> str:
        return self.write_bytes(final, text.encode("utf-8"))

    def write_tsv(
        self, final: str | os.PathLike[str], header: Sequence[str] | None, rows: Iterable[Sequence[Any]]
    ) -> str:
        """A tab-separated table, every field escaped (:func:`escape_field`);
        ``.gz``: gzip-compressed; ``-``: standard output."""
        final = os.fspath(final)
        lines: Iterable[str] = ("\t".join(escape_field(v) for v in row) + "\n" for row in rows)
        if header is not None:
            lines = itertools.chain(["\t".join(escape_field(h) for h in header) + "\n"], lines)
        if is_special(final):
            self.write_bytes(final, "".join(lines).encode())
            return final
        with self.open(final, "w") as f:
            f.writelines(lines)
        return final

    # -- ending ---------------------------------------------------------------------

    def commit(self) -> list[str]:
        """Publish every reserved file; returns their final paths.

        Raises WorkflowError (and publishes nothing) if a reserved file was
        never written.
        """
        self._check_open()
        missing = [final for key, final in self._finals.items() if not os.path.exists(self._temps[key])]
        if missing:
            raise WorkflowError(f"no job wrote the output '{missing[0]}'")
        with signals_deferred():
            folders = set()
            for key, temp in self._temps.items():
                _fsync(temp)
                folders.add(os.path.dirname(key))
            for key, temp in self._temps.items():
                os.replace(temp, key)
            self.committed = True
            for folder in folders:
                _fsync_folder(folder)
        return list(self._finals.values())

    def abort(self) -> None:
        """Remove every temporary file; nothing is published."""
        if self.committed:
            return
        self.aborted = True
        for temp in self._temps.values():
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        for folder in reversed(self._made):
            try:
                os.rmdir(folder)
            except OSError:
                pass  # not empty: something else is in it

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.committed:
            self.abort()

    def _check_open(self) -> None:
        if self.committed or self.aborted:
            raise ValueError("this publication has ended")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system supports it; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (main thread only) until the block is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
