"""Run a :class:`~deltaplane.engine.RunConfig` on the driver its ``engine`` and ``transport`` name.

One entry point for every driver, above them in the layering (drivers never import each other):
``sequential``, ``batched`` and ``population`` run in process (``deltaplane.sim``), ``flower`` on Flower's
simulation engine (``deltaplane.flower``); ``transport: http`` runs devices against a real local service
(``deltaplane.serve``). Each driver refuses, with the reason, what it cannot run.
"""

from __future__ import annotations

from collections.abc import Callable

from deltaplane.engine import RoundMetrics, RunConfig, RunResult
from deltaplane.errors import DeltaplaneError, UnsupportedOption

__all__ = ["preflight", "run_federation"]


def preflight(config: RunConfig) -> None:
    """Load the task and ask the chosen driver whether it can run ``config``, before anything starts.

    Raises:
        TaskError: the task does not load or its model and data disagree.
        UnsupportedOption: the driver cannot run an option (the message says why).
    """
    from deltaplane.engine import make_task

    make_task(config)
    if config.transport == "http":
        if config.engine == "flower":
            raise UnsupportedOption(
                "--transport http runs its own devices against the service; Flower carries messages itself: "
                "choose one of --engine flower and --transport http"
            )
        from deltaplane.serve.federation import check_supported

        check_supported(config)
    elif config.engine == "flower":
        try:  # every option runs on Flower (docs/byo.md); only the extra may be missing
            import deltaplane.flower.engine  # noqa: F401
        except ImportError as exc:
            raise DeltaplaneError(
                f"--engine flower needs Flower: pip install 'deltaplane[flower]' ({exc})"
            ) from None
    elif config.engine == "population":
        from deltaplane.sim.population import check_supported as population_check

        population_check(config)


def run_federation(config: RunConfig, *, progress: Callable[[RoundMetrics], None] | None = None) -> RunResult:
    """Run ``config`` on its driver and return the per-round metrics and final model (same type for all).

    Raises:
        UnsupportedOption: an engine/transport pair or an option the chosen driver cannot run.
    """
    preflight(config)
    if config.transport == "http":
        from deltaplane.serve.federation import run_http_simulation

        return run_http_simulation(config, progress=progress)
    if config.engine == "flower":
        try:
            from deltaplane.flower import run_flower
        except ImportError as exc:
            raise DeltaplaneError(
                f"--engine flower needs Flower: pip install 'deltaplane[flower]' ({exc})"
            ) from None
        return run_flower(config, progress=progress)
    from deltaplane.sim import run_simulation

    return run_simulation(config, progress=progress)
