"""``bamflow`` command: a thin typer layer over the Python API."""

from __future__ import annotations

import typer

from bamflow import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="High-throughput BAM/SAM processing over named pipes.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bamflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """High-throughput BAM/SAM processing over named pipes."""


def main() -> None:
    app()
