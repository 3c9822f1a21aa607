"""What a run reports: per-round metrics and the run's result, the same types for every driver."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from deltaplane.delta import StateDict
from deltaplane.engine.config import RunConfig
from deltaplane.errors import PrivacyBudgetExceeded

__all__ = ["RoundMetrics", "RunResult", "budget_stop", "raw_upload_bytes"]


def raw_upload_bytes(state: StateDict, local_keys: Iterable[str] = ()) -> int:
    """Bytes of one update as raw tensors in the model's dtypes: the tensors a device uploads, which are the
    model's less the layers personalization keeps on the device (``local_keys``: FedPer's head, FedBN's norms).

    What a run's :attr:`RunResult.raw_update_bytes` holds on every driver, and so what the report's "vs raw
    fp32" ratio divides: with the kept layers counted too, an uncompressed FedPer run read 1.04× smaller than
    the raw fp32 tensors it sent."""
    kept = frozenset(local_keys)
    return sum(v.numel() * v.element_size() for k, v in state.items() if k not in kept)


@dataclass(frozen=True)
class RoundMetrics:
    """What one round cost and achieved. Accuracies are of the global model after the round's update."""

    round: int
    clients: int
    test_accuracy: float
    client_accuracy_mean: float
    client_accuracy_min: float
    uplink_bytes: int
    downlink_bytes: int
    cumulative_uplink_bytes: int
    cumulative_downlink_bytes: int
    seconds: float
    #: spread of the per-client accuracies (10% quantile, median, 90% quantile, best); None where not scored
    client_accuracy_p10: float | None = None
    client_accuracy_median: float | None = None
    client_accuracy_p90: float | None = None
    client_accuracy_max: float | None = None
    #: ε spent so far at ``config.dp_delta`` (None without DP)
    epsilon: float | None = None
    #: distributed DP only: ε so far against the server itself, which knows who took part (the same figure as
    #: ``epsilon``: its sampling is counted as revealed, see DistributedDP); None otherwise
    epsilon_vs_server: float | None = None
    #: the neighbouring relation ``epsilon`` is stated under: "add/remove" (central DP), "zero-out" (distributed
    #: DP under SecAgg: a device's data replaced by none, its noise share kept), "replace-one" (local DP); None
    #: without DP. An ε means nothing without it: see docs/aggregation.md, "Which neighbours ε is stated for"
    dp_adjacency: str | None = None
    #: client updates refused this round (NaN/Inf, wrong layout or version, norm above the bound)
    rejected: int = 0
    #: share of triggered test images of other classes classified as the backdoor target (backdoor attacks)
    backdoor_success: float | None = None
    #: share of client updates clipped this round (with clipping)
    clipped_fraction: float | None = None
    #: With personalization: accuracy on each client's own label mix (per-class accuracy on the global test
    #: set weighted by the client's class shares) of the global model and of the client's personal model.
    client_mix_accuracy_mean: float | None = None
    personal_accuracy_mean: float | None = None
    personal_accuracy_min: float | None = None
    #: the largest drop of a client's accuracy from the global to its personal model (negative: a loss)
    personal_gain_min: float | None = None

    #: What every driver must reproduce of a round, bit for bit (the parity matrix compares these): the devices
    #: sampled (also in a round that trains none of them, a lone device under SecAgg), accuracy, ε and the
    #: adjacency it is stated under, refusals,
    #: clipping and, with personalization, the devices' personal figures. Not bytes (the HTTP downlink adds its
    #: signed chain's framing) and not seconds.
    DRIVER_INVARIANTS = (
        "clients",
        "test_accuracy",
        "epsilon",
        "epsilon_vs_server",
        "dp_adjacency",
        "rejected",
        "clipped_fraction",
        "client_mix_accuracy_mean",
        "personal_accuracy_mean",
        "personal_accuracy_min",
        "personal_gain_min",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def driver_invariants(self) -> tuple[Any, ...]:
        """The round's :attr:`DRIVER_INVARIANTS`, in that order: equal on every driver for the same config."""
        return tuple(getattr(self, name) for name in self.DRIVER_INVARIANTS)


@dataclass
class RunResult:
    """The outcome of :func:`run_simulation`: its config, per-round metrics and the final global model."""

    config: RunConfig
    rounds: list[RoundMetrics]
    num_params: int
    #: bytes of one update as raw float32 tensors, the layers a device keeps to itself left out
    #: (:func:`raw_upload_bytes`): the size compression ratios are measured against
    raw_update_bytes: int
    wall_time_s: float
    final_state: dict[str, Tensor] = field(repr=False, default_factory=dict)
    #: With personalization: per client, accuracy (on its label mix) of the global and of its personal model.
    clients: list[dict[str, Any]] = field(default_factory=list)
    #: Why the run ended before ``config.rounds`` (e.g. the privacy budget), or None when it ran to the end.
    stopped: str | None = None
    #: With personalization: each device's personalized model after the last round, by device id.
    personal_states: dict[int, StateDict] = field(repr=False, default_factory=dict)
    #: What a round cost a mean participating device (training compute + radio bytes, energy estimates per
    #: link), filled after any driver by ``deltaplane.apps.runner.attach_device_cost``; None until then.
    device_cost: dict[str, Any] | None = None

    @property
    def final(self) -> RoundMetrics:
        return self.rounds[-1]

    @property
    def total_uplink_bytes(self) -> int:
        return self.final.cumulative_uplink_bytes

    @property
    def total_downlink_bytes(self) -> int:
        return self.final.cumulative_downlink_bytes

    @property
    def privacy_note(self) -> str | None:
        """What the run's ε does not cover because the run was a simulation: with seeded DP noise
        (``dp_noise_source`` seeded, or auto in a simulation) anyone who knows the seed can subtract the noise."""
        c = self.config
        if (c.dp_noise > 0 or c.local_dp_noise > 0) and c.seeded_dp_noise(simulation=True):
            return (
                "simulation: DP noise is derived from the run seed; not private against anyone who knows the "
                "seed (set dp_noise_source: secure for noise from the OS CSPRNG)"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the final model weights are left out)."""
        return {
            "privacy_note": self.privacy_note,
            "config": self.config.to_dict(),
            "num_params": self.num_params,
            "raw_update_bytes": self.raw_update_bytes,
            "wall_time_s": self.wall_time_s,
            "final": self.final.to_dict(),
            "rounds": [r.to_dict() for r in self.rounds],
            "clients": self.clients,
            "stopped": self.stopped,
            "device_cost": self.device_cost,
        }


def budget_stop(exc: PrivacyBudgetExceeded, rnd: int, rounds_done: int) -> str:
    """Why a run stops at its privacy budget (its :attr:`RunResult.stopped`), the same on every driver.

    The rounds done so far are kept: the model released after the last of them stays within the budget.
    When not even one round fits, there is nothing to report and ``exc`` is raised.
    """
    if rounds_done == 0:
        raise exc
    return f"stopped: privacy budget exhausted at round {rnd} ({exc})"
