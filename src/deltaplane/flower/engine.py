"""Run a :class:`~deltaplane.sim.RunConfig` on Flower's simulation engine (Ray) instead of in process.

``run_flower(config)`` is the ``--engine flower`` of ``deltaplane run``: the same federation, model and seeds
as :func:`deltaplane.sim.run_simulation`, executed as a Flower ServerApp plus ``config.clients`` virtual
SuperNodes whose ClientApps run in Ray actors. It returns the same :class:`~deltaplane.sim.RunResult`, so
reports and benchmarks compare the two engines field by field.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from deltaplane.engine import RoundMetrics, RunConfig, RunResult
from deltaplane.engine.results import raw_upload_bytes
from deltaplane.flower.digits import FlowerRunError, digits_client_app, digits_server_app
from deltaplane.flower.strategy import DeltaStrategy, RoundTraffic

__all__ = ["FlowerRunError", "enroll_nodes", "run_flower"]


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
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltaplane-enrollment-") as enrolled:
        # authenticated SecAgg: the run's enrollment authority certifies each node's identity, and each node
        # is given its files in its node_config, as an operator enrolls SuperNodes (`deltaplane keys certify`)
        node_configs = enroll_nodes(config, enrolled)
        rounds, final = _simulate(config, progress, num_cpus, traffic, node_configs)
    state = final["state"]
    return RunResult(
        config=config,
        rounds=rounds,
        num_params=sum(v.numel() for v in state.values()),
        raw_update_bytes=final["raw_update_bytes"],
        wall_time_s=time.perf_counter() - start,
        final_state=state,
        # with personalization: each device's accuracies as its node reported them (its model stays there)
        clients=final.get("clients", []),
        stopped=final.get("stopped"),
    )


def enroll_nodes(config: RunConfig, out: str) -> dict[int, dict[str, str]] | None:
    """Under ``config.secagg_authenticated``, each node's enrollment files written into ``out`` by a fresh
    authority of the run, as partition-id → its ``node_config`` entries (for :func:`task_client_app`'s
    ``node_configs``); None otherwise. :func:`run_flower` enrolls its nodes so; a Grid of your own may too."""
    if not config.secagg_authenticated:
        return None
    from deltaplane.aggregation.secagg.enrollment import RunEnrollment, device_id

    enrollment = RunEnrollment()
    return {i: enrollment.write_node_config(out, device_id(i)) for i in range(config.clients)}


def _simulate(
    config: RunConfig,
    progress: Callable[[RoundMetrics], None] | None,
    num_cpus: int | None,
    traffic: list[RoundTraffic] | None,
    node_configs: dict[int, dict[str, str]] | None,
) -> tuple[list[RoundMetrics], dict[str, Any]]:
    """Run the ServerApp and the nodes' ClientApps on Flower's simulation engine; the rounds' metrics and the
    final state (and, with personalization, the devices' rows; a budget stop's reason)."""
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
        # what a node uploads: the model less the layers its personalizer keeps (the server step leaves them out)
        step = strategy.server_step
        final["raw_update_bytes"] = raw_upload_bytes(state, step.local_keys if step is not None else ())

    def on_clients(rows: list[dict[str, Any]]) -> None:
        final["clients"] = rows

    def on_stop(reason: str) -> None:
        final["stopped"] = reason

    backend_config: dict[str, dict[str, Any]] = {
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
            client_app=digits_client_app(config, node_configs=node_configs),
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
    return rounds, final
