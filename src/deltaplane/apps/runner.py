"""Run a :class:`~deltaplane.engine.RunConfig` on the driver its ``engine`` and ``transport`` name.

One entry point for every driver, above them in the layering (drivers never import each other):
``sequential``, ``batched`` and ``population`` run in process (``deltaplane.sim``), ``flower`` on Flower's
simulation engine (``deltaplane.flower``); ``transport: http`` runs devices against a real local service
(``deltaplane.serve``). Each driver refuses, with the reason, what it cannot run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from deltaplane.engine import RoundMetrics, RunConfig, RunResult, Task
from deltaplane.errors import DeltaplaneError, UnsupportedOption

__all__ = ["attach_device_cost", "preflight", "run_federation"]


def preflight(config: RunConfig) -> None:
    """Load the task and ask the chosen driver whether it can run ``config``, before anything starts.

    Raises:
        TaskError: the task does not load or its model and data disagree.
        ConfigError: the task's data cannot be split into ``config.clients`` devices, or the attack's fraction
            of them gives no attacker.
        UnsupportedOption: the driver cannot run an option (the message says why).
    """
    from deltaplane.engine import build_clients, make_task

    config.attacker_count()  # a fraction that gives no attacker, counted as this config's driver counts it
    task = make_task(config)
    if config.attack:  # an attack that cannot poison this task's data (a pixel trigger on tabular inputs)
        from deltaplane.engine.attacks import parse_attack

        parse_attack(config.attack)[0].fit(task)
    if config.engine != "population":  # which synthesizes its devices lazily (checks its bound itself)
        clients = build_clients(config, task)  # the very devices every other driver builds: refused now
        from deltaplane.engine.secure import check_ring_carries

        check_ring_carries(config, [c.num_samples for c in clients])  # not in round 1 (or never, over HTTP)
    from deltaplane.engine.secure import check_float_uploads

    check_float_uploads(config, task.build_model(0))  # every driver refused each such update, run on
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

        return attach_device_cost(run_http_simulation(config, progress=progress))
    if config.engine == "flower":
        try:
            from deltaplane.flower import run_flower
        except ImportError as exc:
            raise DeltaplaneError(
                f"--engine flower needs Flower: pip install 'deltaplane[flower]' ({exc})"
            ) from None
        return attach_device_cost(run_flower(config, progress=progress))
    from deltaplane.sim import run_simulation

    return attach_device_cost(run_simulation(config, progress=progress))


def _train_samples(config: RunConfig, task: Task) -> float:
    """Local training samples of a mean device, from the same partition the driver trained on."""
    if config.engine == "population" and task.train is not None:
        from deltaplane.sim.population import ClientPopulation

        pop = ClientPopulation(config, task.train, size=config.clients, num_classes=task.num_classes)
        ids = range(min(config.clients, 256))  # virtual shards: the mean of a fixed prefix of the fleet
        return sum(len(pop.client(cid).train) for cid in ids) / len(ids)
    from deltaplane.engine import build_clients

    clients = build_clients(config, task)
    return sum(c.num_samples for c in clients) / len(clients)


def attach_device_cost(result: RunResult) -> RunResult:
    """Fill ``result.device_cost``: what a round cost a mean participating device (compute + radio), the same
    for every driver (:func:`~deltaplane.engine.device_cost.round_device_cost`). Returns ``result``."""
    from deltaplane.engine import make_task
    from deltaplane.engine.device_cost import round_device_cost

    if not result.rounds:
        return result
    task = make_task(result.config)
    try:
        result.device_cost = round_device_cost(
            result, task, train_samples=_train_samples(result.config, task)
        )
    except Exception as exc:  # an estimate must never cost the user a finished run: say why it is missing
        warnings.warn(
            f"per-round device cost not estimated for task {task.name!r}: {exc}", RuntimeWarning, stacklevel=2
        )
    return result
