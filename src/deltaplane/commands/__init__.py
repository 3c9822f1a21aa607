"""CLI command implementations, one module per area; each exposes ``register(app: typer.Typer)``.

The package itself holds what every area shares (it is not a command module): the two consoles that
``--quiet`` silences, the exit codes, and :func:`clean_errors`.

Exit codes (documented in docs/cli.md) mean one thing each:

=====  ===========================================================================================
0      success
1      failure: the command could not do its work (corrupt or missing input, integrity, decoding)
2      usage error: an option, argument or config value is invalid (the message says which)
3      refused by a gate: promotion, quality or privacy budget said no (the work itself ran)
=====  ===========================================================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from deltaplane.errors import CodecError, ConfigError, DeltaplaneError, GateRefused, TaskError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "clean_errors",
    "console",
    "err_console",
    "exit_code_for",
    "set_verbosity",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3

#: Results (tables, figures) go to stdout; progress, notes and errors to stderr. ``--quiet`` silences notes.
console = Console()
err_console = Console(stderr=True)
#: -1 quiet, 0 normal, 1 verbose (set once by the top-level callback)
verbosity = 0


def set_verbosity(level: int) -> None:
    """``--quiet`` (-1) hides progress and notes on stderr; errors are always printed."""
    global verbosity
    verbosity = level
    err_console.quiet = level < 0


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an error a command ends with."""
    if isinstance(exc, GateRefused):
        return EXIT_REFUSED
    # CodecError covers SpecError (a malformed codec spec); TaskError a --task path or options that do not fit
    if isinstance(exc, ConfigError | CodecError | TaskError):
        return EXIT_USAGE
    return EXIT_FAILURE


@contextmanager
def clean_errors(*also: type[Exception]) -> Iterator[None]:
    """Turn a DeltaplaneError (or one of the ``also`` types, e.g. ``OSError`` for a missing input file) into a
    red one-line message on stderr and its documented exit code (see the module docstring), never a traceback."""
    try:
        yield
    except (DeltaplaneError, *also) as exc:
        # soft_wrap: the message stays one line for the terminal to wrap, and for grep to find
        Console(stderr=True).print(
            f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True
        )
        raise typer.Exit(code=exit_code_for(exc)) from None
