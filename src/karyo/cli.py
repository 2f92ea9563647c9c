"""The ``karyo`` command line: a thin shell over the Python API (parse, call, write, report)."""

from __future__ import annotations

import typer

from karyo import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def version() -> None:
    """Print karyo's version."""
    typer.echo(__version__)
