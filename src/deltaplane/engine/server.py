"""The server step: what the server does with a round's uploads, written once for every driver.

```
decode + validate ─► aggregator chain (robust ─► clip ─► DP ─► FedOpt / server SGD) ─► downlink compress ─► publish
```

The chain is :func:`deltaplane.aggregation.build_aggregator`'s (via :meth:`RunConfig.build_aggregator`), so
robust rules, clipping, DP-FedAvg with its accountant and budget, and the server optimizer (``server_lr`` as
plain server SGD for FedAvg) are the same objects on every driver. The server step takes either wire payloads
(:meth:`ServerStep.receive_payload`: strict decode against the round's base version, then validation), already
decoded deltas (:meth:`ServerStep.receive_delta`: a transport that decoded them itself), or, with secure
aggregation, the unmasked *sum* (:meth:`ServerStep.receive_secure_sum`) — never individual plaintext updates
in that case. :meth:`ServerStep.close` compresses the update for the downlink and hands it to a
:class:`Publisher` (in memory by default; the HTTP service's registers a signed version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.aggregation import FLTrust, Rejection, Validate
from deltaplane.codecs import Compressor, decompress
from deltaplane.data.dataset import Dataset
from deltaplane.delta import Delta, StateDict
from deltaplane.engine.config import RunConfig
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng, torch_generator
from deltaplane.engine.task import Task
from deltaplane.engine.training import local_train
from deltaplane.errors import DeltaplaneError, InvalidUpdate

__all__ = ["MemoryPublisher", "Publisher", "RoundOutcome", "ServerStep"]


class Publisher(Protocol):
    """Turns a round's update into the downlink: compress it, make it the new version, return what was sent.

    Returns ``(payload, decoded)``: the downlink wire payload and the delta every device applies (the decoded
    payload, so the server and the devices hold the same weights even with a lossy downlink codec).
    """

    def publish(self, update: Delta, *, base_version: int, lineage: dict) -> tuple[bytes, Delta]: ...


@dataclass
class MemoryPublisher:
    """The in-process downlink: a server-side :class:`Compressor` (its residual is the downlink error
    feedback); versions live only in the driver's memory."""

    compressor: Compressor
    base_id: str

    def publish(self, update: Delta, *, base_version: int, lineage: dict) -> tuple[bytes, Delta]:
        payload = self.compressor.compress(update, base_id=self.base_id, base_version=base_version)
        return payload, decompress(payload, expect_base=(self.base_id, base_version))


@dataclass
class RoundOutcome:
    """What a closed round produced."""

    round: int
    #: the version the round's clients trained from; the new global model is ``base_version + 1``
    base_version: int
    state: dict[str, Tensor]
    downlink_payload: bytes
    accepted: int
    rejections: list[Rejection]
    uplink_bytes: int
    measurements: dict[str, float] = field(default_factory=dict)


def root_dataset(config: RunConfig, task: Task) -> Dataset:
    """The server's own small clean dataset for FLTrust (Cao et al. 2021): ``root_samples`` drawn from the
    task's training pool (all devices' data for a naturally split task) by the ``ROOT_DATA`` stream."""
    pool = task.train
    if pool is None:
        clients = list(task.clients or [])
        pool = Dataset(torch.cat([d.x for d in clients]), torch.cat([d.y for d in clients]))
    idx = numpy_rng(config.seed, Stream.ROOT_DATA).choice(
        len(pool), size=min(config.root_samples, len(pool)), replace=False
    )
    return pool.subset(np.sort(idx))


class ServerStep:
    """The server side of every round of a run (see the module docstring).

    Args:
        config: the run (aggregation, privacy, downlink options).
        task: the model and data (FLTrust's root dataset and the loss it trains with).
        initial_state: the global model of version 0.
        base_id: the model lineage payload headers must name.
        publisher: where the update goes (default: :class:`MemoryPublisher` with the run's downlink codec).
    """

    def __init__(
        self,
        config: RunConfig,
        task: Task,
        initial_state: StateDict,
        *,
        base_id: str,
        publisher: Publisher | None = None,
    ) -> None:
        self.config = config
        self.task = task
        self.base_id = base_id
        self.state = {k: v.detach().clone() for k, v in initial_state.items()}
        self.version = 0
        self.aggregator: Validate = config.build_aggregator(
            seed=derive_seed(config.seed, Stream.AGGREGATION) % 2**31
        )
        self.publisher = publisher or MemoryPublisher(
            Compressor(
                config.downlink_codec,
                error_feedback=config.downlink_error_feedback,
                seed=derive_seed(config.seed, Stream.DOWNLINK_CODEC),
            ),
            base_id,
        )
        fltrust = self.aggregator.find(FLTrust)
        self._fltrust: FLTrust | None = fltrust if isinstance(fltrust, FLTrust) else None
        self._root = root_dataset(config, task) if self._fltrust is not None else None
        self._round = 0
        self._uplink = 0
        self._accepted = 0
        self._rejections: list[Rejection] = []
        self._secure = False

    @property
    def needs_individual_updates(self) -> bool:
        """Whether the chain looks at single updates (robust rules, per-update clipping, validation bounds):
        then SecAgg, which reveals only the sum, cannot feed it."""
        return not self.config.secagg

    def open(self, rnd: int, model: nn.Module) -> None:
        """Start round ``rnd`` on the current version; FLTrust's server trains its reference update here."""
        self._round = rnd
        self._uplink = self._accepted = 0
        self._rejections = []
        self._secure = False
        self.aggregator.reset()
        if self._fltrust is not None:
            reference = local_train(
                model,
                self.state,
                self._root,  # type: ignore[arg-type]
                torch_generator(self.config.seed, Stream.ROOT_DATA, rnd),
                epochs=self.config.local_epochs,
                batch_size=self.config.batch_size,
                lr=self.config.client_lr(rnd),
                momentum=self.config.momentum,
                prox_mu=self.config.prox_mu,
                loss=self.task.loss,
            )
            self._fltrust.set_reference(reference)

    def refuse(self, client_id: str, error: DeltaplaneError) -> None:
        """Record an update refused before it reached the chain (it could not be produced or decoded)."""
        self._rejections.append(Rejection(client_id, error))

    def receive_payload(self, client_id: str, payload: bytes, weight: float) -> bool:
        """Decode a wire payload strictly against this round's base, validate and aggregate it."""
        self._uplink += len(payload)
        try:
            delta = decompress(payload, expect_base=(self.base_id, self.version))
        except DeltaplaneError as exc:  # one bad client is refused, the round goes on
            self.refuse(client_id, exc)
            return False
        return self.receive_delta(client_id, delta, weight)

    def receive_delta(self, client_id: str, delta: Delta, weight: float) -> bool:
        """Validate and aggregate an update the transport has already decoded (True if accepted)."""
        if self._secure:
            raise InvalidUpdate("this round aggregates through SecAgg; individual updates are not accepted")
        ok = self.aggregator.add(delta, weight, base_version=self.version, client_id=client_id)
        if ok:
            self._accepted += 1
        else:
            self._rejections.append(self.aggregator.rejections[-1])
        return ok

    def receive_secure_sum(self, mean: Delta, *, contributors: int, uplink_bytes: int) -> None:
        """The securely aggregated (unmasked) weighted mean of ``contributors`` updates: the only view of the
        round's updates the server gets under SecAgg. It enters the chain as one update of weight 1."""
        if self._accepted:
            raise InvalidUpdate("this round already aggregated individual updates; SecAgg cannot join it")
        self._secure = True
        self._uplink += uplink_bytes
        self._accepted = contributors
        self.aggregator.add(mean, 1.0)

    def close(self) -> RoundOutcome:
        """Aggregate, compress the downlink, publish the new version; the outcome carries the new state.

        Raises:
            InvalidUpdate: every update of the round was refused.
            PrivacyBudgetExceeded: this round would spend more ε than the budget allows.
        """
        if self._accepted == 0:
            first = self._rejections[0] if self._rejections else None
            where = f"client {first.client_id}: {first.error}" if first else "no client uploaded"
            raise InvalidUpdate(
                f"round {self._round}, {where} (every update of the round was refused; if local training "
                "diverged, try a lower lr)"
            ) from (first.error if first else None)
        update = self.aggregator.result()  # raises PrivacyBudgetExceeded before a round that would exceed it
        measurements = dict(self.aggregator.measurements)
        base = self.version
        payload, decoded = self.publisher.publish(
            update, base_version=base, lineage={"round": self._round, "uploads": self._accepted}
        )
        # a partial update (personalization's local layers excluded) changes only the shared tensors
        self.state = {**self.state, **decoded.apply({k: self.state[k] for k in decoded})}
        self.version += 1
        return RoundOutcome(
            round=self._round,
            base_version=base,
            state=self.state,
            downlink_payload=payload,
            accepted=self._accepted,
            rejections=list(self._rejections),
            uplink_bytes=self._uplink,
            measurements=measurements,
        )
