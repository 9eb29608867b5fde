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
import select
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

from .display import ClusterDisplay, ProgressDisplay, print_final, quiet_line, stage_dicts, summary_table, summary_title

EXAMPLES = """
Examples (a folder named after the input when there is no -o: in.shards/, in.cells/, in.qc/):

\b
  bamflow shard --by CB in.bam
  bamflow shard --by CB -n 16 -o shards/ possorted_genome_bam.bam
  samtools view -u in.bam | bamflow shard --by CB,UB -o shards/ -
  bamflow split --by CB --min-reads 100 in.bam
  bamflow filter --barcodes cells.txt in.bam > subset.bam
  bamflow qc in.bam
  bamflow run my_module:fix_read --by CB -w 4 in.bam -o out.bam

Shell completion: bamflow --install-completion (bash, zsh, fish, PowerShell).
"""

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="High-throughput BAM/SAM processing over named pipes, with every read accounted for.\n" + EXAMPLES,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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


PROGRESS_MODES = ("auto", "live", "log", "json", "none")


def _progress(value: str) -> str:
    if value not in PROGRESS_MODES:
        raise typer.BadParameter("must be auto, live, log, json or none", param_hint="--progress")
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
    _shared(
        "progress",
        str,
        "auto",
        "--progress",
        callback=_progress,
        help="Progress: auto (live on a terminal, else log lines), live, log, json (an object a line on stderr) or none.",
    ),
    _shared("debug", bool, False, "--debug", help="Show the failing job's traceback on error."),
    _shared(
        "timeout", float | None, None, "--timeout", min=0.0, metavar="SECONDS",
        help="Stop the run (with an error, leaving no output) if it takes longer than SECONDS.",
    ),
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
    """-o/--output, optional: see :func:`folder_output` and :func:`stream_output` for the defaults."""
    return typer.Option("-o", "--output", help=help)


CLUSTER_OPTIONS = (
    _shared(
        "cluster", str | None, None, "--cluster", metavar="SPEC",
        help="Run on a Dask cluster: local:N, tcp://HOST:PORT, or slurm|pbs|sge|lsf:jobs=N,cores=C,memory=M[,queue=Q,…] "
        "(docs/distributed.md).",
    ),
    _shared("partitions", int | None, None, "--partitions", min=1,
            help="With --cluster: map tasks (default: the cluster's slots)."),
    _shared("buckets", int | None, None, "--buckets", min=1, help="With --cluster: reduce tasks, cells hashed over them."),
    _shared("scratch", Path | None, None, "--scratch",
            help="With --cluster: a folder every worker shares (default: beside the output)."),
)
"""The options of the commands that also run on a cluster (``command(cluster=True)``),
before the shared ones; the command gets them, checked, as ``common.cluster``."""


def cluster_options(cluster: str | None, partitions: int | None, buckets: int | None, scratch: Path | None) -> dict[str, Any]:
    """The arguments of a run on a cluster ({} without --cluster; the others need it)."""
    if cluster is None:
        if partitions is not None or buckets is not None or scratch is not None:
            raise typer.BadParameter("--partitions, --buckets and --scratch go with --cluster", param_hint="--cluster")
        return {}
    found = {"cluster": cluster, "partitions": partitions, "buckets": buckets, "scratch": scratch}
    return {k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in found.items() if v is not None}


FORCE = typer.Option(
    False, "--force", help="Replace the outputs of an earlier run in the output folder (never other files)."
)


def workers_option(help: str = "Worker processes.", default: int = 2) -> Any:
    return typer.Option(default, "-w", "--workers", min=1, help=help)


# -- where outputs go when -o is not given ------------------------------------------------------

INPUT_SUFFIXES = (".gz", ".bam", ".ubam", ".sam", ".cram")


def default_folder(input: str, suffix: str) -> Path:
    """The folder a command writes when -o is not given: named after the input,
    in the current folder, as samtools split's prefix (``in.bam`` → ``in.shards``)."""
    name = os.path.basename(input.rstrip("/"))
    stem = name
    while stem.lower().endswith(INPUT_SUFFIXES):
        stem = stem[: stem.rfind(".")]
    return Path(f"{stem or name}.{suffix}")


def folder_output(output: Path | None, input: str, suffix: str) -> Path:
    """The output folder: -o, else one named after the input (stdin has no name: -o is needed)."""
    if output is not None:
        return output
    if input == "-":
        raise typer.BadParameter("reading stdin: name the output folder with -o", param_hint="'-o' / '--output'")
    return default_folder(input, suffix)


def stream_output(output: str | None) -> str:
    """The output file: -o, else standard output unless that is a terminal (as samtools does)."""
    if output is not None:
        return output
    if sys.stdout.isatty():
        raise typer.BadParameter(
            "standard output is a terminal: give an output file with -o, or redirect (> out.bam)",
            param_hint="'-o' / '--output'",
        )
    return "-"


# -- one name per concept, across the commands ------------------------------------------------

INPUT = input_argument()
SHARDED_WORKERS = "Worker processes (cells are sharded over them)."
METHOD = typer.Option(
    "directional", "--method", help="unique, percentile, cluster, adjacency or directional (umi_tools' definitions)."
)
CELL_TAG = typer.Option("CB", "--cell-tag", help="Cell barcode tag.")
GENE_TAG = typer.Option("GX", "--gene-tag", help="Gene (id) tag.")
GENE_NAME_TAG = typer.Option(
    "GN", "--gene-name-tag", "--name-tag", help="Gene name tag (mitochondrial genes: names starting with MT- or mt-)."
)


def _umi_tag(value: str) -> str:
    """--umi-tag for commands that read the UMI from a tag: UB (tag:UB, the old --umi spelling, too)."""
    tag = value[4:] if value.startswith("tag:") else value
    if value in UMI_FROM_READ_NAME:
        raise typer.BadParameter(f"this command reads the UMI from a tag, not {value!r}", param_hint="--umi-tag")
    return tag


UMI_FROM_READ_NAME = ("read_name", "read_name_cell")
UMI_TAG = typer.Option("UB", "--umi-tag", "--umi", callback=_umi_tag, help="UMI tag.")


def _umi_source(value: str) -> str:
    """--umi-tag for dedup: a tag (UB, or tag:UB), or read_name / read_name_cell; as
    bamflow.presets.dedup's ``umi`` argument ("tag:UB", "read_name", "read_name_cell")."""
    return value if value in UMI_FROM_READ_NAME else f"tag:{_umi_tag(value)}"


UMI_SOURCE = typer.Option(
    "UB",
    "--umi-tag",
    "--umi",
    callback=_umi_source,
    help="UMI tag (UB), or read_name (…_UMI) / read_name_cell (…_CELL_UMI) for the UMI in the read name.",
)
"""--umi-tag for dedup (the UMI can also come from read names); the value is dedup's ``umi`` argument."""

TAGGED_INPUT = input_argument("BAM with cell, UMI and gene tags; - for stdin.")

DROP_REASONS = {
    "missing tag": "missing_tag",
    "dropped_missing_tag": "missing_tag",
    "not listed": "not_listed",
    "not_selected": "not_listed",
    "dropped_not_listed": "not_listed",
    "secondary": "not_primary",
    "dropped_by_function": "by_function",
}
"""The one spelling of each reason a read is dropped for (snake_case), whatever a function calls it."""


def drop_reasons(dropped: dict[str, int]) -> dict[str, int]:
    """Dropped reads by reason, each reason spelled one way; reasons with no read left out."""
    out: dict[str, int] = {}
    for reason, n in dropped.items():
        key = DROP_REASONS.get(reason, reason.replace(" ", "_").replace("-", "_"))
        if n:
            out[key] = out.get(key, 0) + n
    return out


Tally = tuple[int, dict[str, int], dict[str, int]]
"""What the summary shows: reads in, reads written per output, reads dropped per reason."""


def _written_to(output: str) -> Callable[[dict[str, Any]], Tally]:
    """The usual tally: every read written goes to ``output``."""
    return lambda result: (result["reads_in"], {output: result["written"]}, result["dropped"])


def _per_output(result: dict[str, Any]) -> Tally:
    return result["reads_in"], result["written"], result["dropped"]


def _counted(result: dict[str, Any]) -> Tally:
    return result["reads_in"], {"counted": result.get("counted", 0)}, result.get("dropped", {})


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it."""
    poller = select.poll()
    poller.register(1, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


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
    timeout: float | None = None
    cluster: dict[str, Any] = field(default_factory=dict)
    console: Console = field(default_factory=lambda: Console(stderr=True), repr=False)
    _display: ProgressDisplay | ClusterDisplay | None = field(default=None, init=False, repr=False)

    def mode(self) -> str:
        if self.progress != "auto":
            return self.progress
        if self.quiet or not self.console.is_terminal:
            return "log"
        return "live"

    def run(
        self,
        api: Callable[..., Any],
        *args: Any,
        tally: Callable[[dict[str, Any]], Tally],
        key_numbers: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        output: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``api(*args, **kwargs)`` with the shared settings it takes (threads, level, command_line,
        on_progress) under the display; ``args[0]`` is the input. Publishes the stats file and
        prints the summary after a run that succeeded: where the reads went (``tally(result)``),
        the command's own ``key_numbers(result)``, each stage's work and the bottleneck, and
        ``output`` (where the outputs went, when the user did not say). Failures → one error
        line and exit status 1."""
        params = inspect.signature(api).parameters
        settings = ("threads", "level", "command_line", "on_progress", "timeout")
        accepts = {name for name in settings if name in params}
        if not accepts and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            accepts = set(settings)  # a wrapper that passes everything on
        shared = {"threads": self.threads, "level": self.level, "command_line": _command_line(), "timeout": self.timeout}
        kwargs.update({key: value for key, value in shared.items() if key in accepts})
        kwargs.update(self.cluster)
        input = os.fspath(args[0])
        total = os.path.getsize(input) if input != "-" and os.path.isfile(input) else None
        started = time.monotonic()
        display: Any
        if kwargs.get("cluster") is not None:  # the same command as Dask tasks (bamflow.distributed)
            from bamflow import distributed

            api = getattr(distributed, api.__name__)
            display = ClusterDisplay(self.console, self.mode(), f"bamflow {self.name}")
        else:
            display = ProgressDisplay(self.console, self.mode(), total, f"bamflow {self.name}")
        self._display = display
        try:
            with display:
                if "on_progress" in accepts and self.mode() != "none":  # none: not even watched
                    kwargs["on_progress"] = display
                done = api(*args, **kwargs)
            result = done.as_dict() if hasattr(done, "as_dict") else dict(done)
            result["seconds"] = time.monotonic() - started
            if self.stats is not None:
                _publish_stats(self.stats, result)
        except WorkflowError as e:
            if "BrokenPipeError" in e.summary and _stdout_reader_gone():
                raise typer.Exit(141) from None  # `| head` closed the pipe: end quietly, as samtools does
            self._fail(e.summary, str(e))
        except ValueError as e:  # raised before any job ran: the arguments are wrong
            self._fail(str(e), None, status=2)
        except OSError as e:
            self._fail(f"{type(e).__name__}: {e}", None)
        except KeyboardInterrupt:
            self._fail("interrupted", None, status=130)
        reads_in, written, dropped = tally(result)
        numbers = key_numbers(result) if key_numbers is not None else {}
        if output is not None:
            numbers["output"] = os.fspath(output)
        self.summary(reads_in, written, drop_reasons(dropped), result["seconds"], numbers)
        return result

    def _fail(self, summary: str, details: str | None, status: int = 1) -> NoReturn:
        if self.mode() == "json":
            error = {"event": "error", "command": f"bamflow {self.name}", "message": summary, "exit_status": status}
            if self.debug and details:
                error["details"] = details
            self._emit(error)
        else:
            self.say(f"bamflow {self.name}: error: {summary}", style="bold red")
            if self.debug and details:
                self.say(details)
        raise typer.Exit(status)

    def _emit(self, obj: dict[str, Any]) -> None:
        self.console.file.write(json.dumps(obj, default=str) + "\n")
        self.console.file.flush()

    def say(self, text: str, style: str | None = None) -> None:
        """A line on stderr, as it is (no highlighting, no wrapping); an object with --progress json."""
        if self.mode() == "json":
            self._emit({"event": "message", "command": f"bamflow {self.name}", "text": text})
            return
        self.console.print(text, style=style, highlight=False, soft_wrap=True, markup=False)

    def summary(
        self,
        reads_in: int,
        written: dict[str, int],
        dropped: dict[str, int],
        seconds: float,
        key_numbers: dict[str, Any] | None = None,
    ) -> None:
        title = f"bamflow {self.name}"
        board = self._display.board if self._display is not None else None
        bottleneck = board.bottleneck_text(final=True) if board is not None and board.jobs else ""
        mode = self.mode()
        if mode == "json":
            self._emit({
                "event": "summary",
                "command": title,
                "seconds": round(seconds, 3),
                "reads_in": reads_in,
                "written": written,
                "dropped": dropped,
                "key_numbers": key_numbers or {},
                "bottleneck": _final_bottleneck(board),
                "stages": stage_dicts(board, whole_run=True) if board is not None else [],
                "sampler_cpu_seconds": round(board.sampler_total, 4) if board is not None else 0.0,
            })
        elif self.quiet or mode == "none":
            self.say(quiet_line(title, reads_in, written, dropped, seconds, key_numbers, bottleneck))
        else:
            table = summary_table(title, reads_in, written, dropped, seconds, key_numbers)
            print_final(self.console, board, summary_title(title, reads_in, seconds), table)


def _final_bottleneck(board: Any) -> dict[str, Any] | None:
    """The stage that was the bottleneck longest, and for what share of the run."""
    if board is None or not board.bottleneck_seconds:
        return None
    stage = max(board.bottleneck_seconds, key=lambda s: board.bottleneck_seconds[s])
    return {"stage": stage, "share_of_run": round(board.bottleneck_seconds[stage] / max(board.elapsed, 1e-9), 3)}


def _publish_stats(path: Path, stats: dict[str, Any]) -> None:
    """The stats JSON, written under a temporary name and renamed into place when complete (a
    device such as /dev/stderr: written in place); called only after a run that succeeded."""
    with Publication() as publication:
        with open(publication.path(path), "w", encoding="utf-8") as f:
            f.write(json.dumps(stats, indent=2, default=str) + "\n")
        publication.commit()


def command(
    epilog: str, *, name: str | None = None, level: bool = True, cluster: bool = False
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command: its own parameters, then (``cluster=True``) the
    :data:`CLUSTER_OPTIONS`, then the shared options (``level=False``: no
    --level, for the commands whose function takes no compression level). The
    function gets its own arguments and, as ``common``, the shared ones in a
    :class:`Common` (the cluster's in ``common.cluster``, which ``common.run``
    passes on)."""

    def register(func: Callable[..., None]) -> Callable[..., None]:
        shared = [p for p in SHARED if level or p.name != "level"]
        on_cluster = list(CLUSTER_OPTIONS) if cluster else []
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "common"]
        command_name = name or func.__name__

        @functools.wraps(func)
        def with_common(**arguments: Any) -> None:
            options = {p.name: arguments.pop(p.name) for p in shared}
            if cluster:
                options["cluster"] = cluster_options(*(arguments.pop(p.name) for p in on_cluster))
            func(**arguments, common=Common(command_name, **options))

        with_common.__signature__ = inspect.Signature(own + on_cluster + shared)  # type: ignore[attr-defined]
        app.command(name=command_name, epilog=epilog)(with_common)
        return func

    return register
