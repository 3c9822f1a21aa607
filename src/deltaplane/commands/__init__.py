"""CLI command implementations, one module per area; each exposes ``register(app: typer.Typer)``.

The package itself holds what every area shares (it is not a command module): :func:`clean_errors`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from deltaplane.errors import DeltaplaneError

__all__ = ["clean_errors"]


@contextmanager
def clean_errors(*also: type[Exception]) -> Iterator[None]:
    """Turn a DeltaplaneError (or one of the ``also`` types, e.g. ``OSError`` for a missing input file) into a
    red one-line message on stderr and exit code 2, never a traceback."""
    try:
        yield
    except (DeltaplaneError, *also) as exc:
        # soft_wrap: the message stays one line for the terminal to wrap, and for grep to find
        Console(stderr=True).print(
            f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True
        )
        raise typer.Exit(code=2) from None
