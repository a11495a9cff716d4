"""CLI of the predict stage (thin: parses arguments, calls library functions)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _callback() -> None:
    """predict stage."""
