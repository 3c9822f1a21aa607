"""``deltaplane privacy …``: privacy accounting from the command line (ε for a schedule, noise for a target ε)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

import typer

from deltaplane.commands import clean_errors, console

__all__ = ["register"]


class Method(StrEnum):
    """The dp-accounting accountant: Rényi DP (tight enough, fast) or privacy loss distributions (tighter)."""

    rdp = "rdp"
    pld = "pld"


def _within(lo: float, hi: float, *, closed_hi: bool = False) -> Callable[[float], float]:
    """A parser callback accepting lo < value < hi (or <= hi), with the interval in the message."""

    def check(value: float) -> float:
        if value is not None and not (lo < value < hi or (closed_hi and value == hi)):
            right = "]" if closed_hi else ")"
            raise typer.BadParameter(f"must be in ({lo:g}, {hi:g}{right}; got {value:g}")
        return value

    return check


# Ranges are checked by the parser, so a wrong value is a usage error in the user's words (exit 2), never a
# number computed from a meaningless input (q = 1.5 used to print ε = 96.1).
Rate = Annotated[
    float,
    typer.Option(
        "--sampling-rate",
        "-q",
        callback=_within(0.0, 1.0, closed_hi=True),
        help="Share of the clients sampled each round (clients per round / total clients), in (0, 1].",
    ),
]
Rounds = Annotated[int, typer.Option("--rounds", "-T", min=1, help="Number of rounds (at least 1).")]
Delta = Annotated[
    float,
    typer.Option("--delta", callback=_within(0.0, 1.0), help="Target δ, in (0, 1)."),
]
Accountant = Annotated[Method, typer.Option("--method", help="Accountant.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
Distributed = Annotated[
    bool,
    typer.Option(
        "--distributed/--central",
        help="Distributed DP (a run with DP noise and --secagg: the devices add the noise): the figure such a "
        "run reports, for zero-out neighbours, its sampling at rate q counted as revealed (δ amplified, not ε).",
    ),
]


def _schedule(distributed: bool) -> tuple[str, str | None]:
    """The neighbours a run's ε is stated for, and (distributed DP only) the note that says how it is counted.

    Distributed DP's accountant counts its Poisson sampling as *revealed* (``revealed_sampling``,
    :class:`~deltaplane.aggregation.dp.DistributedDP` says why): each sampled device adds its own noise share,
    so the sum's noise reveals how many took part and hidden-sampling amplification does not hold. Its ε
    depends on z and q alone, not on m_min or the devices' share σ_d (a published sum carries noise of std
    ≥ z·C; a smaller sum is not published), so z here is the run's ``dp_noise`` as for central DP.
    """
    from deltaplane.aggregation.dp import ADD_REMOVE, ZERO_OUT

    if not distributed:
        return ADD_REMOVE, None
    note = (
        "distributed DP: sampling counted as revealed (each sampled device adds its own noise share, so the "
        "sum's noise reveals how many took part: δ is amplified, ε is not); zero-out neighbours; z is the "
        "run's noise multiplier on the sum, whatever m_min"
    )
    return ZERO_OUT, note


def _quiet_absl() -> None:
    # dp-accounting logs "failed to converge ... Excluding this order" through absl for orders it skips; the
    # figure it returns already accounts for that, so the lines are noise in a terminal (and break --json)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _json_schedule(
    sampling_rate: float, distributed: bool, neighbours: str, method: Method
) -> dict[str, object]:
    """The schedule's keys in ``--json``: the rate given, the rate accounted (the same, kept for the records
    that read it), whether the sampling is counted as revealed (distributed DP) and the neighbours ε is stated
    for."""
    return {
        "sampling_rate": sampling_rate,
        "accounted_sampling_rate": sampling_rate,
        "revealed_sampling": distributed,
        "neighbours": neighbours,
        "method": method.value,
    }


def register(app: typer.Typer) -> None:
    """Add the ``privacy`` command group to ``app``."""
    privacy = typer.Typer(help="Differential-privacy accounting for DP-FedAvg (dp-accounting RDP / PLD).")

    @privacy.command("epsilon")
    def epsilon(
        noise: Annotated[
            float,
            typer.Option(
                "--noise",
                "-z",
                callback=_within(0.0, math.inf),
                help="Noise multiplier z (noise std / clip norm).",
            ),
        ],
        sampling_rate: Rate,
        rounds: Rounds,
        delta: Delta = 1e-5,
        method: Accountant = Method.rdp,
        distributed: Distributed = False,
        as_json: AsJson = False,
    ) -> None:
        """ε after ROUNDS rounds of DP-FedAvg with noise multiplier z and client sampling rate q.

        The figure a run reports: clients Poisson-sampled at rate q (what `deltaplane run` does with DP on, at
        q = clients per round / clients), one client added or removed, a fixed or an adaptive clip alike.
        With --distributed, what a distributed-DP run (--secagg) reports: sampling counted as revealed,
        zero-out neighbours."""
        from deltaplane.aggregation.accounting import epsilon_for

        _quiet_absl()
        neighbours, note = _schedule(distributed)
        with clean_errors():
            eps = epsilon_for(
                noise_multiplier=noise,
                sampling_rate=sampling_rate,
                steps=rounds,
                delta=delta,
                method=method.value,
                revealed_sampling=distributed,
            )
        if as_json:
            doc = {"epsilon": eps, "delta": delta, "rounds": rounds, "noise_multiplier": noise}
            typer.echo(json.dumps(doc | _json_schedule(sampling_rate, distributed, neighbours, method)))
            return
        schedule = (
            f"q = {sampling_rate}, {method.value}; {note}"
            if note
            else f"q = {sampling_rate}, {method.value}; Poisson sampling at rate q, add/remove one client; fixed "
            "or adaptive clip alike"
        )
        console.print(
            f"ε = [bold]{eps:.4f}[/bold] at δ = {delta:g} after {rounds} rounds (z = {noise}, {schedule})"
        )

    @privacy.command("noise")
    def noise(
        epsilon: Annotated[
            float, typer.Option("--epsilon", "-e", callback=_within(0.0, math.inf), help="Target ε.")
        ],
        sampling_rate: Rate,
        rounds: Rounds,
        delta: Delta = 1e-5,
        method: Accountant = Method.rdp,
        distributed: Distributed = False,
        as_json: AsJson = False,
    ) -> None:
        """The smallest noise multiplier z that keeps ε ≤ EPSILON after ROUNDS rounds.

        With --distributed, for a distributed-DP run (--secagg): sampling counted as revealed, zero-out
        neighbours."""
        from deltaplane.aggregation.accounting import noise_for_epsilon

        _quiet_absl()
        neighbours, note = _schedule(distributed)
        with clean_errors():
            z = noise_for_epsilon(
                epsilon=epsilon,
                sampling_rate=sampling_rate,
                steps=rounds,
                delta=delta,
                method=method.value,
                revealed_sampling=distributed,
            )
        if as_json:
            doc = {"noise_multiplier": z, "epsilon": epsilon, "delta": delta, "rounds": rounds}
            typer.echo(json.dumps(doc | _json_schedule(sampling_rate, distributed, neighbours, method)))
            return
        schedule = f"q = {sampling_rate}, {method.value}" + (f"; {note}" if note else "")
        console.print(
            f"z = [bold]{z:.4f}[/bold] keeps ε ≤ {epsilon:g} at δ = {delta:g} over {rounds} rounds ({schedule})"
        )

    app.add_typer(privacy, name="privacy")
