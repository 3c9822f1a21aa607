"""CLI command implementations, one module per area; each exposes ``register(app: typer.Typer)``.

The package itself holds what every area shares (it is not a command module): the two consoles that
``--quiet`` silences, the exit codes, :func:`clean_errors`, and ``--threads`` (:data:`Threads`,
:func:`cpu_threads`).

Exit codes (documented in docs/cli.md) mean one thing each:

=====  ===========================================================================================
0      success
1      failure: the command could not do its work (corrupt or missing input, integrity, decoding)
2      usage error: an option, argument or config value is invalid (the message says which)
3      refused by a gate: promotion, quality or privacy budget said no (the work itself ran)
=====  ===========================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.console import Console, ConsoleOptions
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from deltaplane.errors import CodecError, ConfigError, DeltaplaneError, GateRefused, TaskError
from deltaplane.threads import torch_threads

__all__ = [
    "DEFAULT_THREADS",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "MAX_ENROLL_DEVICES",
    "AddDevices",
    "HeldRevocations",
    "Threads",
    "ValidDays",
    "available_cpus",
    "check_threads",
    "clean_errors",
    "console",
    "cpu_threads",
    "err_console",
    "error_console",
    "exit_code_for",
    "finite_number",
    "fit_table",
    "fleet_size",
    "set_verbosity",
    "warn_withdrawn_inputs",
    "working_dir_on_path",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3

#: The CLI's only consoles (tests/test_cli_quiet.py keeps every command on them). Results (tables, figures,
#: JSON) go to ``console``, on stdout; progress, notes and warnings to ``err_console``, on stderr, which
#: ``--quiet`` silences; errors, refusals and what a user cannot do without (a generated admin token) to
#: ``error_console``, on stderr too, which nothing silences.
console = Console()
err_console = Console(stderr=True)
error_console = Console(stderr=True)
#: -1 quiet, 0 normal, 1 verbose (set once by the top-level callback)
verbosity = 0


#: the narrowest a wrapping column is squeezed to (or its ``min_width``); a table whose fixed columns leave less
#: does not fit
_FOLD_FLOOR = 8
#: a wrapping column first keeps its longest word whole, up to this many characters
_WORD_FLOOR = 16


def fit_table(table: Table, width: int) -> bool:
    """Give ``table``'s wrapping columns widths that fit ``width`` columns; False when even that cannot.

    Rich shrinks the wrapping columns only until the two widest are as wide as each other, then shrinks every
    column evenly and crops: numbers (``no_wrap``) came out as ``0.96…`` and the last column lost its unit or
    vanished at 80 columns though the table fitted. Here the widest wrapping column gives way one character at
    a time, first down to its longest word (so a run name wraps between words), then down to a floor where its
    cells fold; the numbers keep their width. A column left wider than its wrapped cells need (a date and time
    that wrap to ``2026-12-06`` / ``09:15:03``) hands the rest to the others. On False the caller should lay the
    table out another way (split it) rather than print it cropped.
    """
    probe = Console(width=width)
    options = probe.options.update_width(width)
    pads = [_padding_width(table, i) for i in range(len(table.columns))]
    ranges = [_measure_column(table, probe, options, i, pads[i]) for i in range(len(table.columns))]
    wrapping = [i for i, c in enumerate(table.columns) if c.width is None and not c.no_wrap]
    # the box's edges and the rules between columns
    rules = (2 if table.show_edge else 0) + len(table.columns) - 1 if table.box else 0
    room = width - rules - sum(r.maximum for i, r in enumerate(ranges) if i not in wrapping)
    for word_floor in (_WORD_FLOOR, 0):
        widths = {i: ranges[i].maximum for i in wrapping}
        floors = {
            i: min(
                widths[i],
                pads[i]
                + max(
                    _FOLD_FLOOR, min(ranges[i].minimum - pads[i], word_floor), table.columns[i].min_width or 0
                ),
            )
            for i in wrapping
        }
        while sum(widths.values()) > room and any(widths[i] > floors[i] for i in wrapping):
            widest = max((i for i in wrapping if widths[i] > floors[i]), key=lambda i: widths[i])
            widths[widest] -= 1
        if sum(widths.values()) <= room:
            _hand_back(table, probe, widths, [r.maximum for r in ranges], pads)
            for i, w in widths.items():
                if w < ranges[i].maximum:
                    table.columns[i].width = w - pads[i]
            return True
    return False


def _padding_width(table: Table, index: int) -> int:
    """The cell padding column ``index`` adds to its content's width, as rich lays the table out (left and right
    padding; none at the table's outer edges without ``pad_edge``; ``collapse_padding``: a cell's left padding
    merges into its left neighbour's right one, so only the right one counts)."""
    _, right, _, left = table.padding
    if table.collapse_padding:
        left = 0
    if not table.pad_edge:
        left = 0 if index == 0 else left
        right = 0 if index == len(table.columns) - 1 else right
    return left + right


def _measure_column(
    table: Table, console: Console, options: ConsoleOptions, index: int, pad: int
) -> Measurement:
    """Column ``index``'s narrowest and widest width, padding included: its header, cells and footer measured by
    rich's public :meth:`Measurement.get`, clamped by the column's ``width``, ``min_width`` and ``max_width``
    as rich clamps them (what ``Table`` measures privately, from its public parts, so a rich upgrade that
    renames a private helper cannot break every table of the CLI)."""
    column = table.columns[index]
    if column.width is not None:
        return Measurement(column.width + pad, column.width + pad).with_maximum(options.max_width)
    cells = [
        *([column.header] if table.show_header else []),
        *column.cells,
        *([column.footer] if table.show_footer else []),
    ]
    sizes = [Measurement.get(console, options, cell) for cell in cells]
    measured = Measurement(
        max((m.minimum for m in sizes), default=0) + pad if sizes else 1,
        max((m.maximum for m in sizes), default=0) + pad if sizes else options.max_width,
    ).with_maximum(options.max_width)
    return measured.clamp(
        None if column.min_width is None else column.min_width + pad,
        None if column.max_width is None else column.max_width + pad,
    )


def _hand_back(
    table: Table, probe: Console, widths: dict[int, int], natural: list[int], pads: list[int]
) -> None:
    """Narrow each shrunk column (narrowest first) to what its wrapped cells use, giving the rest to the columns
    after it that are still short of their natural width, the shortest of it first."""
    from rich.cells import cell_len  # public: rich's measure of a string's terminal cells

    order = sorted(widths, key=lambda i: widths[i])
    for n, i in enumerate(order):
        inner = widths[i] - pads[i]
        column = table.columns[i]
        cells = [column.header, *column.cells]
        if widths[i] >= natural[i] or not all(isinstance(c, str) for c in cells):
            continue
        lines = [
            line
            for cell in cells
            # every cell is a str (checked above)
            for line in probe.render_str(cast("str", cell)).wrap(
                probe, inner, overflow=column.overflow or "fold"
            )
        ]
        free = inner - max(cell_len(line.plain.rstrip()) for line in lines)
        widths[i] -= free
        while free > 0:
            short = [j for j in order[n + 1 :] if widths[j] < natural[j]]
            if not short:
                widths[i] += free  # nobody needs it: the column keeps it
                break
            widths[max(short, key=lambda j: natural[j] - widths[j])] += 1
            free -= 1


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


def finite_number(value: float | None) -> float | None:
    """A typer callback refusing NaN and infinities (click's float ranges let NaN through: ``min=1`` passes
    ``nan``), so that a number of seconds, minutes or a scale is a usage error naming its option, not a
    traceback, a wait that never ends or a NaN carried into the work."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number. Found {value}")
    return value


#: The most devices one ``--devices N`` or ``--add K`` of ``fleet enroll`` and ``keys certify`` takes. A SecAgg
#: round's roster holds at most this many (the service refuses to open a larger one: ``OpenSecAggRequest.devices``
#: in serve/secagg_routes.py; a test keeps the two equal), so a fleet enrolled past it could never take part in
#: one round; an N past it is a slip (``--devices 1000000`` for 100), refused before a token, key or
#: certificate is written rather than after the service has issued a million tokens or the disk filled.
MAX_ENROLL_DEVICES = 100_000


def fleet_size(value: int | None) -> int | None:
    """A typer callback refusing more than :data:`MAX_ENROLL_DEVICES` devices, naming the bound and why."""
    if value is not None and value > MAX_ENROLL_DEVICES:
        raise typer.BadParameter(
            f"at most {MAX_ENROLL_DEVICES:,} devices: a SecAgg round's roster holds no more, so a larger fleet "
            f"could never take part in one round. Found {value:,}"
        )
    return value


#: ``--add K`` of ``fleet enroll`` and ``keys certify``: grow the fleet in ``--out`` (a revoked device's replacement)
AddDevices = Annotated[
    int | None,
    typer.Option(
        "--add",
        min=1,
        callback=fleet_size,
        metavar="K",
        help="Enrol K new devices into the fleet in OUT (a revoked device's replacement): the next free ids, past "
        "every device-I with a file in OUT, every id ever issued, revoked or reserved there (OUT/enrollment.ledger) and every "
        "one --revocations names, in the cohort of OUT's certificates.",
        show_default="none",
    ),
]
#: ``--revocations`` of ``fleet enroll`` and ``keys certify``: the operator's list, whose ids are never enrolled again
HeldRevocations = Annotated[
    Path | None,
    typer.Option(
        "--revocations",
        dir_okay=False,
        help="The enrollment authority's revocation list (keys revoke --out): the ids it names are never enrolled "
        "or certified again.",
        show_default="none",
    ),
]
#: ``--valid-days`` of the device certificates ``fleet enroll --authority-key`` and ``keys certify`` issue
ValidDays = Annotated[
    float,
    typer.Option(
        "--valid-days", min=1, callback=finite_number, help="How long the device certificates are valid."
    ),
]


def warn_withdrawn_inputs(paths: Iterable[str | os.PathLike[str]], use: str) -> None:
    """Warn on stderr, whatever ``-q`` says (as ``registry pull`` does), for each input that is a pulled
    version containing a cohort which withdrew consent (its ``manifest.json`` names the cohorts): ``deploy``,
    ``merge`` and ``extract-lora`` read folders, not the registry, and must not use such a model silently.
    ``use`` says what the command makes of it ("merged", "deployed")."""
    from deltaplane.registry.pulled import withdrawn_in_pulled

    for path in dict.fromkeys(Path(p) for p in paths):
        cohorts = withdrawn_in_pulled(path)
        if cohorts:
            error_console.print(
                f"[yellow]warning:[/yellow] {escape(str(path))} is a pulled version trained on "
                f"{escape(', '.join(repr(c) for c in cohorts))}, which withdrew consent (its manifest.json says "
                f"so); it is {use} anyway, and a version registered from the result may not be promoted, served "
                "or used as a round base",
                soft_wrap=True,
            )


@contextmanager
def clean_errors(*also: type[Exception]) -> Iterator[None]:
    """Turn a DeltaplaneError (or one of the ``also`` types, e.g. ``OSError`` for a missing input file) into a
    red one-line message on stderr and its documented exit code (see the module docstring), never a traceback."""
    caught: tuple[type[Exception], ...] = (DeltaplaneError, *also)
    try:
        yield
    except caught as exc:
        # soft_wrap: the message stays one line for the terminal to wrap, and for grep to find
        error_console.print(f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(code=exit_code_for(exc)) from None


# -- --threads ---------------------------------------------------------------------------------------------
# ``--threads``: how many CPU threads a long-running command's tensor work may use, chosen in one place.
#
# The default is **one thread**, on purpose. The work these commands do is either memory-bound element-wise
# arithmetic (merging, codecs, aggregation: a second thread mostly waits for the same memory bus) or thousands of
# small kernels (the simulator's rounds), and torch's intra-op pool makes every kernel wait for its slowest
# thread. On an idle machine a second thread wins a little; on a shared one (a laptop with a browser, a CI
# runner, a server next to other jobs) a descheduled pool thread stalls every kernel, and we measured a
# MiniLM TIES merge going from 1.5 s to 45–74 s and a simulator round from 50 ms to 950 ms with two threads on
# a busy 2-core machine (``benchmarks/busy_machine.py`` keeps these figures). More threads are for a machine
# you have to yourself: ``--threads N`` with N at most the CPUs this process may run on (more would only
# oversubscribe them, so it is refused).
#
# The simulator's batched engine spends ``--threads`` on shares of the clients trained side by side, in forked
# worker processes of one torch thread each, which keeps that property (no thread ever waits for another
# inside a kernel).

#: Threads a command uses unless ``--threads`` says otherwise (see the module docstring for why one).
DEFAULT_THREADS = 1

Threads = Annotated[
    int,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for tensor work (at most the CPUs available). 1 keeps speed on a shared machine; "
        "more helps only on an idle one.",
    ),
]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(n: int) -> int:
    """``n`` if it fits the machine; :class:`~deltaplane.errors.ConfigError` if it would oversubscribe it."""
    cpus = available_cpus()
    if n < 1:
        raise ConfigError(f"--threads must be at least 1. Found {n}")
    if n > cpus:
        raise ConfigError(
            f"--threads {n} exceeds the {cpus} CPUs this process may use; more threads than CPUs only wait "
            f"for each other. Use --threads {cpus} or fewer"
        )
    return n


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool at ``n`` threads (checked by :func:`check_threads`), then
    restore the previous count, so an in-process caller (tests, notebooks) keeps its own setting."""
    check_threads(n)
    with torch_threads(n):
        yield


def working_dir_on_path() -> None:
    """Let ``task: mytask:make_task`` find ``mytask.py`` in the working directory, as ``deltaplane run`` does."""
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
