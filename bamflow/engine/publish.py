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

Output folders (:meth:`Publication.claim_folder`): a run that writes a
folder locks it (``.bamflow.lock``, an flock held until the run ends), so two
runs into one folder cannot both succeed with mixed files, and lists what it
published in ``.bamflow-outputs``. A folder that already holds files is
refused, unless ``force``: then the files the earlier run published (and
their index files, ``.bai``/``.csi``) that this run does not replace are
removed when this run commits, so the folder never holds stale outputs beside
new ones. Files bamflow did not write are never removed; a folder holding
any is refused, with or without ``force``.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import itertools
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from .errors import WorkflowError
from .signals import signals_deferred

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
        self._on_commit: list[Callable[[], None]] = []
        self._claims: dict[str, _Claim] = {}  # folder → what this run does to it
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

    def claim_folder(
        self, folder: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str] = ()
    ) -> str:
        """Take ``folder`` for this run's outputs (see the module doc of
        folders): create it if missing and lock it, so that a second run into
        it fails at once. A folder holding an earlier run's outputs is
        refused, unless ``force``: then, when this run commits, the earlier
        outputs it does not replace (and their index files) are removed, so
        the folder holds this run's outputs only. Files bamflow did not write
        are never removed: a folder holding any is refused. ``inputs`` (the
        run's input paths) must not be among the files it would replace."""
        folder = self.make_folder(folder)
        key = os.path.abspath(folder)
        lock = _lock_folder(key)
        try:
            earlier = _earlier_outputs(key)
            names = [n for n in os.listdir(key) if n not in (LOCK_NAME, OUTPUTS_NAME)]
            stale = [n for n in names if _stale_temp(n)]
            present = [n for n in names if n not in stale]
            foreign = [n for n in present if n not in earlier and not _derived(n, earlier)]
            if foreign:
                shown = ", ".join(sorted(foreign)[:5]) + (" …" if len(foreign) > 5 else "")
                raise WorkflowError(f"the output folder {folder} holds files bamflow did not write ({shown}); "
                                    "choose an empty or new folder")
            if present and not force:
                shown = ", ".join(sorted(present)[:5]) + (" …" if len(present) > 5 else "")
                raise WorkflowError(f"the output folder {folder} holds the outputs of an earlier run ({shown}); "
                                    "use --force (force=True) to replace them")
            for path in inputs:
                if path not in ("-", "/dev/stdin") and os.path.dirname(os.path.abspath(path)) == key:
                    raise WorkflowError(f"the input {path} is in the output folder {folder}; it could be replaced")
        except BaseException:
            os.close(lock)
            raise
        self._claims[key] = _Claim(lock, present + stale)
        return folder

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the publication commits, after the renames: what
        cannot be renamed into place (the end of a stream on standard output)."""
        self._check_open()
        self._on_commit.append(action)

    def scratch_folder(self, folder: str | os.PathLike[str], label: str) -> str:
        """A private folder inside ``folder`` for a run's intermediate files,
        named like the run's temporary files (so a killed run's is recognised
        and removed by the next run into the folder); the caller removes it."""
        path = os.path.join(os.fspath(folder), f".{label}.bamflow-{self.token}.tmp")
        os.mkdir(path, 0o700)
        return path

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
            zipped = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0)  # no temp name in the header
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
            for folder, claim in self._claims.items():
                self._settle(folder, claim)
                folders.add(folder)
            for folder in folders:
                _fsync_folder(folder)
            for action in self._on_commit:
                action()
        return list(self._finals.values())

    def _settle(self, folder: str, claim: _Claim) -> None:
        """After the renames: remove the earlier run's outputs this run did not
        replace, list this run's outputs in the folder, release the lock."""
        ours = sorted(os.path.basename(k) for k in self._temps if os.path.dirname(k) == folder)
        for name in claim.earlier:
            if name not in ours:
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)  # a killed run's scratch folder
                else:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
        listing = os.path.join(folder, OUTPUTS_NAME)
        with open(listing + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"outputs": ours}, f)
        os.replace(listing + ".tmp", listing)
        os.close(claim.lock)

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
        for claim in self._claims.values():
            os.close(claim.lock)
        self._claims.clear()
        for folder in reversed(self._made):
            for name in (LOCK_NAME,):
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
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


LOCK_NAME = ".bamflow.lock"
OUTPUTS_NAME = ".bamflow-outputs"
INDEX_SUFFIXES = (".bai", ".csi", ".crai", ".tbi")
_TEMP = re.compile(r"^\..+\.bamflow-(\d+)-[0-9a-f]+\.tmp$")


@dataclass
class _Claim:
    lock: int  # the descriptor holding the folder's lock
    earlier: list[str]  # files of an earlier run to remove at commit


def _lock_folder(folder: str) -> int:
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkflowError(f"another bamflow run is writing into the output folder {folder}") from None
    return fd


def _earlier_outputs(folder: str) -> set[str]:
    """The files an earlier run published in ``folder`` (its listing), if any."""
    try:
        with open(os.path.join(folder, OUTPUTS_NAME), encoding="utf-8") as f:
            return set(json.load(f).get("outputs", []))
    except (OSError, ValueError, AttributeError):
        return set()


def _derived(name: str, outputs: set[str]) -> bool:
    """An index file of an output (x.bam.bai, x.bai)."""
    for suffix in INDEX_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            if stem in outputs or any(o.rsplit(".", 1)[0] == stem for o in outputs):
                return True
    return False


def _stale_temp(name: str) -> bool:
    """A temporary file of a run whose process is gone (killed before it could clean up)."""
    match = _TEMP.match(name)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
