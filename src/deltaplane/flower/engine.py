"""Run a :class:`~deltaplane.sim.RunConfig` on Flower's simulation engine (Ray) instead of in process.

``run_flower(config)`` is the ``--engine flower`` of ``deltaplane run``: the same federation, model and seeds
as :func:`deltaplane.sim.run_simulation`, executed as a Flower ServerApp plus ``config.clients`` virtual
SuperNodes whose ClientApps run in Ray actors. It returns the same :class:`~deltaplane.sim.RunResult`, so
reports and benchmarks compare the two engines field by field.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from deltaplane.delta import Delta
from deltaplane.engine import RoundMetrics, RunConfig, RunResult
from deltaplane.flower.digits import FlowerRunError, digits_client_app, digits_server_app
from deltaplane.flower.strategy import DeltaStrategy, RoundTraffic

__all__ = ["FlowerRunError", "run_flower"]


def run_flower(
    config: RunConfig,
    *,
    progress: Callable[[RoundMetrics], None] | None = None,
    num_cpus: int | None = None,
    traffic: list[RoundTraffic] | None = None,
) -> RunResult:
    """Run ``config`` on Flower's Ray-backed simulation engine; same result type as ``run_simulation``.

    Args:
        config: the run; one virtual SuperNode per client.
        progress: called with each round's metrics as soon as the round ends.
        num_cpus: CPUs Ray may use (default: all); each ClientApp takes one.
        traffic: if given, receives each round's :class:`RoundTraffic` (message-level byte counts).

    Raises:
        FlowerRunError: when fewer than ``config.rounds`` rounds completed.
    """
    # Flower's telemetry would try the network; this library never does at run time.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation as flower_run_simulation

    rounds: list[RoundMetrics] = []
    final: dict[str, Any] = {}

    def on_round(metrics: RoundMetrics, t: RoundTraffic) -> None:
        rounds.append(metrics)
        if traffic is not None:
            traffic.append(t)
        if progress is not None:
            progress(metrics)

    def on_done(strategy: DeltaStrategy, state: dict) -> None:
        final["state"] = state

    def on_clients(rows: list[dict[str, Any]]) -> None:
        final["clients"] = rows

    def on_stop(reason: str) -> None:
        final["stopped"] = reason

    start = time.perf_counter()
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # per-round INFO lines would drown the CLI's progress bar
    try:
        flower_run_simulation(
            server_app=digits_server_app(
                config, on_round=on_round, on_done=on_done, on_clients=on_clients, on_stop=on_stop
            ),
            client_app=digits_client_app(config),
            num_supernodes=config.clients,
            backend_config=backend_config,
        )
    finally:
        flwr_logger.setLevel(level)
    if "state" not in final or (len(rounds) != config.rounds and "stopped" not in final):
        raise FlowerRunError(
            f"Flower simulation completed {len(rounds)} of {config.rounds} rounds; "
            "its log above says why (a ClientApp error, or Ray running out of memory)"
        )
    state = final["state"]
    return RunResult(
        config=config,
        rounds=rounds,
        num_params=sum(v.numel() for v in state.values()),
        raw_update_bytes=Delta.zeros_like(state).nbytes,
        wall_time_s=time.perf_counter() - start,
        final_state=state,
        # with personalization: each device's accuracies as its node reported them (its model stays there)
        clients=final.get("clients", []),
        stopped=final.get("stopped"),
    )
