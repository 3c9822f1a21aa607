"""``deltaplane privacy …``: privacy accounting from the command line (ε for a schedule, noise for a target ε)."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the ``privacy`` command group to ``app``."""
    privacy = typer.Typer(help="Differential-privacy accounting for DP-FedAvg (dp-accounting RDP / PLD).")

    @privacy.command("epsilon")
    def epsilon(
        noise: float = typer.Option(..., "--noise", "-z", help="noise multiplier z (noise std / clip norm)"),
        sampling_rate: float = typer.Option(
            ..., "--sampling-rate", "-q", help="clients per round / total clients"
        ),
        rounds: int = typer.Option(..., "--rounds", "-T", help="number of rounds"),
        delta: float = typer.Option(1e-5, "--delta", help="target δ"),
        method: str = typer.Option("rdp", "--method", help="rdp or pld"),
    ) -> None:
        """ε after ROUNDS rounds of DP-FedAvg with noise multiplier z and client sampling rate q.

        The figure a run reports: clients Poisson-sampled at rate q (what `deltaplane run` does with DP on, at
        q = clients per round / clients), one client added or removed, a fixed or an adaptive clip alike."""
        from rich.console import Console

        from deltaplane.aggregation.accounting import epsilon_for
        from deltaplane.errors import DeltaplaneError

        try:
            eps = epsilon_for(
                noise_multiplier=noise, sampling_rate=sampling_rate, steps=rounds, delta=delta, method=method
            )
        except DeltaplaneError as exc:
            raise typer.BadParameter(str(exc)) from None
        Console().print(
            f"ε = [bold]{eps:.4f}[/bold] at δ = {delta:g} after {rounds} rounds (z = {noise}, q = {sampling_rate}, {method}; "
            "Poisson sampling at rate q, add/remove one client; fixed or adaptive clip alike)"
        )

    @privacy.command("noise")
    def noise(
        epsilon: float = typer.Option(..., "--epsilon", "-e", help="target ε"),
        sampling_rate: float = typer.Option(
            ..., "--sampling-rate", "-q", help="clients per round / total clients"
        ),
        rounds: int = typer.Option(..., "--rounds", "-T", help="number of rounds"),
        delta: float = typer.Option(1e-5, "--delta", help="target δ"),
        method: str = typer.Option("rdp", "--method", help="rdp or pld"),
    ) -> None:
        """The smallest noise multiplier z that keeps ε ≤ EPSILON after ROUNDS rounds."""
        from rich.console import Console

        from deltaplane.aggregation.accounting import noise_for_epsilon
        from deltaplane.errors import DeltaplaneError

        try:
            z = noise_for_epsilon(
                epsilon=epsilon, sampling_rate=sampling_rate, steps=rounds, delta=delta, method=method
            )
        except DeltaplaneError as exc:
            raise typer.BadParameter(str(exc)) from None
        Console().print(
            f"z = [bold]{z:.4f}[/bold] keeps ε ≤ {epsilon:g} at δ = {delta:g} over {rounds} rounds (q = {sampling_rate}, {method})"
        )

    app.add_typer(privacy, name="privacy")
