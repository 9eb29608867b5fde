"""What every ``bamflow`` command shares, declared once: the app, the shared
options, :class:`Common` (display, errors, stats file, summary) and the
:func:`command` decorator. The commands are in bam_commands.py and
preset_commands.py.

Exit status: 0 success, 1 the run failed (one error line; the child's
traceback with --debug), 2 usage error.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from bamflow import WorkflowError, __version__
from bamflow.engine.publish import Publication, is_special

from .display import ProgressDisplay, summary_table

EXAMPLES = """
Examples:

  bamflow shard --by CB -n 16 -o shards/ possorted_genome_bam.bam

  samtools view -u in.bam | bamflow shard --by CB,UB -o shards/ -

  bamflow split --by CB --min-reads 100 -o cells/ in.bam

  bamflow filter --barcodes cells.txt in.bam -o subset.bam

  bamflow run my_module:fix_read --by CB -w 4 in.bam -o out.bam
"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="High-throughput BAM/SAM processing over named pipes, with every read accounted for.\n" + EXAMPLES,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bamflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """High-throughput BAM/SAM processing over named pipes."""


# -- the options every command shares, each declared once -------------------------------------------


def _level(value: str | None) -> int | str | None:
    """--level: 0-12 or 'fast' (checked and parsed with the other arguments)."""
    if value is None or value == "fast":
        return value
    try:
        level = int(value)
    except ValueError:
        raise typer.BadParameter(f"must be 0-12 or 'fast', not {value!r}", param_hint="--level") from None
    if not 0 <= level <= 12:
        raise typer.BadParameter(f"must be 0-12 or 'fast', not {value!r}", param_hint="--level")
    return level


def _progress(value: str) -> str:
    if value not in ("auto", "live", "log", "none"):
        raise typer.BadParameter("must be auto, live, log or none", param_hint="--progress")
    return value


def _stats(value: Path | None) -> Path | None:
    """--stats: a file the run can publish, checked before the run starts."""
    if value is None or is_special(os.fspath(value)):
        return value
    folder = value.parent
    if value.is_dir():
        problem = f"'{value}' is a folder"
    elif not folder.is_dir():
        problem = f"'{folder}' is not a folder" if folder.exists() else f"the folder '{folder}' does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"cannot write to the folder '{folder}'"
    else:
        return value
    raise typer.BadParameter(problem, param_hint="--stats")


def _shared(name: str, annotation: Any, *declarations: Any, **settings: Any) -> inspect.Parameter:
    option = typer.Option(*declarations, **settings)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


SHARED = (
    _shared("threads", int, 2, "-@", "--threads", min=1, help="Threads for BGZF decompression and compression."),
    _shared(
        "level",
        str | None,
        None,
        "--level",
        callback=_level,
        help="Compression level: 0-12 (libdeflate; 0 = none) or 'fast' (ISA-L). Default: 6.",
    ),
    _shared("stats", Path | None, None, "--stats", callback=_stats, help="Write the run's statistics to this JSON file."),
    _shared("quiet", bool, False, "-q", "--quiet", help="No live display: a log line every few seconds."),
    _shared("progress", str, "auto", "--progress", callback=_progress, help="Progress display: auto, live, log or none."),
    _shared("debug", bool, False, "--debug", help="Show the failing job's traceback on error."),
)
"""The options every command takes, after its own, in this order (see :func:`command`)."""


def _exists(param: typer.CallbackParam, value: str) -> str:
    if value != "-" and not os.path.exists(value):
        raise typer.BadParameter(f"'{value}' does not exist", param_hint=(param.name or "input").upper())
    return value


def _existing_file(param: typer.CallbackParam, value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"'{value}' does not exist", param_hint=param.opts[-1] if param.opts else None)
    return value


def input_argument(help: str = "BAM, uncompressed BAM or SAM file; - for stdin.") -> Any:
    """An input file (- for stdin), which must exist."""
    return typer.Argument(callback=_exists, help=help)


def output_option(help: str) -> Any:
    return typer.Option("-o", "--output", help=help)


def workers_option(help: str = "Worker processes.", default: int = 2) -> Any:
    return typer.Option(default, "-w", "--workers", min=1, help=help)


INPUT = input_argument()
SHARDED_WORKERS = "Worker processes (cells are sharded over them)."
METHOD = typer.Option(
    "directional", "--method", help="unique, percentile, cluster, adjacency or directional (umi_tools' definitions)."
)
CELL_TAG = typer.Option("CB", "--cell-tag", help="Cell barcode tag.")
UMI_TAG = typer.Option("UB", "--umi-tag", help="UMI tag.")
TAGGED_INPUT = input_argument("BAM with cell, UMI and gene tags; - for stdin.")

Tally = tuple[int, dict[str, int], dict[str, int]]
"""What the summary shows: reads in, reads written per output, reads dropped per reason."""


def _written_to(output: str) -> Callable[[dict[str, Any]], Tally]:
    """The usual tally: every read written goes to ``output``."""
    return lambda result: (result["reads_in"], {output: result["written"]}, result["dropped"])


def _per_output(result: dict[str, Any]) -> Tally:
    return result["reads_in"], result["written"], result["dropped"]


def _counted(result: dict[str, Any]) -> Tally:
    return result["reads_in"], {"counted": result.get("counted", 0)}, result.get("dropped", {})


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["bamflow", *sys.argv[1:]])


@dataclass
class Common:
    """The shared options of a command, checked, and what every command does around its run:
    the display, one error line and the exit status, the stats file, the summary."""

    name: str
    threads: int
    stats: Path | None
    quiet: bool
    progress: str
    debug: bool
    level: int | str | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True), repr=False)

    def mode(self) -> str:
        if self.progress != "auto":
            return self.progress
        if self.quiet or not self.console.is_terminal:
            return "log"
        return "live"

    def run(self, api: Callable[..., Any], *args: Any, tally: Callable[[dict[str, Any]], Tally], **kwargs: Any) -> dict[str, Any]:
        """``api(*args, **kwargs)`` with the shared settings it takes (threads, level, command_line,
        on_progress) under the display; ``args[0]`` is the input. Publishes the stats file and
        prints the summary (``tally(result)``) after a run that succeeded; failures → one error
        line and exit status 1."""
        params = inspect.signature(api).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepts = {name for name in ("threads", "level", "command_line", "on_progress") if takes_any or name in params}
        shared = {"threads": self.threads, "level": self.level, "command_line": _command_line()}
        kwargs.update({key: value for key, value in shared.items() if key in accepts})
        input = os.fspath(args[0])
        total = os.path.getsize(input) if input != "-" and os.path.isfile(input) else None
        started = time.monotonic()
        try:
            with ProgressDisplay(self.console, self.mode(), total, f"bamflow {self.name}") as display:
                if "on_progress" in accepts:
                    kwargs["on_progress"] = display
                done = api(*args, **kwargs)
            result = done.as_dict() if hasattr(done, "as_dict") else dict(done)
            result["seconds"] = time.monotonic() - started
            if self.stats is not None:
                _publish_stats(self.stats, result)
        except WorkflowError as e:
            self._fail(e.summary, str(e))
        except ValueError as e:  # raised before any job ran: the arguments are wrong
            self._fail(str(e), None, status=2)
        except OSError as e:
            self._fail(f"{type(e).__name__}: {e}", None)
        except KeyboardInterrupt:
            self.say(f"bamflow {self.name}: interrupted", style="bold red")
            raise typer.Exit(130) from None
        self.summary(*tally(result), result["seconds"])
        return result

    def _fail(self, summary: str, details: str | None, status: int = 1) -> NoReturn:
        self.say(f"bamflow {self.name}: error: {summary}", style="bold red")
        if self.debug and details:
            self.say(details)
        raise typer.Exit(status)

    def say(self, text: str, style: str | None = None) -> None:
        """A line on stderr, as it is (no highlighting, no wrapping)."""
        self.console.print(text, style=style, highlight=False, soft_wrap=True)

    def summary(self, reads_in: int, written: dict[str, int], dropped: dict[str, int], seconds: float) -> None:
        if self.quiet:
            self.say(
                f"bamflow {self.name}: {reads_in:,} reads in, {sum(written.values()):,} written, "
                f"{sum(dropped.values()):,} dropped {dropped or ''} in {seconds:.1f} s"
            )
        else:
            self.console.print(summary_table(f"bamflow {self.name}", reads_in, written, dropped, seconds))


def _publish_stats(path: Path, stats: dict[str, Any]) -> None:
    """The stats JSON, written under a temporary name and renamed into place when complete (a
    device such as /dev/stderr: written in place); called only after a run that succeeded."""
    with Publication() as publication:
        with open(publication.path(path), "w", encoding="utf-8") as f:
            f.write(json.dumps(stats, indent=2, default=str) + "\n")
        publication.commit()


def command(epilog: str, *, name: str | None = None, level: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command: its own parameters, then the shared options (``level=False``: no
    --level, for the commands whose function takes no compression level). The function gets its
    own arguments and, as ``common``, the shared ones in a :class:`Common`."""

    def register(func: Callable[..., None]) -> Callable[..., None]:
        shared = [p for p in SHARED if level or p.name != "level"]
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "common"]
        command_name = name or func.__name__

        @functools.wraps(func)
        def with_common(**arguments: Any) -> None:
            options = {p.name: arguments.pop(p.name) for p in shared}
            func(**arguments, common=Common(command_name, **options))

        with_common.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
        app.command(name=command_name, epilog=epilog)(with_common)
        return func

    return register
