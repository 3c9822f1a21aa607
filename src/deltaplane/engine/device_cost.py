"""What each round of a run cost a participating device: local training compute plus the radio for its bytes.

The drivers already measure the bytes every round put on the wire (``RoundMetrics.uplink_bytes`` and
``downlink_bytes``, summed over the round's devices). This module turns them, with the task's model, into the
energy one *mean participating device* spent per round, using the published profiles of
:mod:`deltaplane.deploy.cost` (:func:`~deltaplane.deploy.cost.federated_round_cost`: training MACs ≈ 3 × forward
MACs per sample × local samples × local epochs at the phone's fp32 MAC energy, plus bytes up/down × energy per
byte over Wi-Fi and LTE). It runs once, after any driver, on the driver-independent :class:`RunResult`, so every
runtime reports the same figures the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltaplane.deploy.cost import LINKS, PROFILES, count_macs, federated_round_cost
from deltaplane.engine.results import RunResult
from deltaplane.engine.task import Task

__all__ = ["round_device_cost"]


def round_device_cost(
    result: RunResult,
    task: Task,
    *,
    train_samples: float,
    profile: str = "phone",
    links: Sequence[str] = ("wifi", "lte"),
) -> dict[str, Any]:
    """Per-round device cost of ``result`` (``RunResult.device_cost``): one row per round and their mean.

    Args:
        result: the finished run (its config gives the local epochs, its rounds the bytes and device counts).
        task: the run's task; its model's forward MACs are counted on one test sample.
        train_samples: local training samples of a mean participating device (what the driver trained on).
        profile, links: names in :data:`~deltaplane.deploy.cost.PROFILES` and :data:`~deltaplane.deploy.cost.LINKS`.
    """
    model = task.build_model(result.config.seed)
    forward = count_macs(model, task.test.x[:1])["macs"]
    epochs = result.config.local_epochs
    rows = []
    for r in result.rounds:
        n = max(int(r.clients), 1)
        c = federated_round_cost(
            model,
            None,
            samples=train_samples,
            epochs=epochs,
            bytes_up=round(r.uplink_bytes / n),
            bytes_down=round(r.downlink_bytes / n),
            profile=profile,
            links=links,
            forward_macs=forward,
        )
        rows.append(
            {
                "round": r.round,
                "devices": r.clients,
                "train_macs": c["train_macs"],
                "bytes_up": c["bytes_up"],
                "bytes_down": c["bytes_down"],
                "compute_uj": c["compute_uj"],
                "radio_uj": c["radio_uj"],
                "total_uj": c["total_uj"],
            }
        )

    def mean(key: str) -> float:
        return sum(float(row[key]) for row in rows) / len(rows)

    prof = PROFILES[profile]
    return {
        "profile": profile,
        "forward_macs_per_sample": forward,
        "train_samples_per_device": train_samples,
        "local_epochs": epochs,
        "per_round": rows,
        "mean": {
            "train_macs": mean("train_macs"),
            "bytes_up": mean("bytes_up"),
            "bytes_down": mean("bytes_down"),
            "compute_uj": mean("compute_uj"),
            "radio_uj": {k: sum(row["radio_uj"][k] for row in rows) / len(rows) for k in links},
            "total_uj": {k: sum(row["total_uj"][k] for row in rows) / len(rows) for k in links},
        },
        "sources": {
            "profile": prof.source,
            "links": {
                k: LINKS[k].source + f" at {LINKS[k].up_mbps:g}/{LINKS[k].down_mbps:g} Mbit/s" for k in links
            },
        },
        "note": "estimate per mean participating device per round: training ≈ 3 × forward MACs × samples × "
        "epochs at fp32 MAC energy; radio = bytes × energy per byte (tail energy excluded); "
        "see deltaplane.deploy.cost for the sources",
    }
