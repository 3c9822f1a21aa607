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

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from deltaplane.aggregation import DPFedAvg, FLTrust, Rejection, Validate
from deltaplane.aggregation.attribution import BackdoorAttribution, TriggerProbe
from deltaplane.aggregation.checkpoint import chain_state, layout_difference, load_chain_state
from deltaplane.aggregation.dp import ADD_REMOVE, DistributedDP
from deltaplane.codecs import Compressor, Layout, WireSession, decompress, decompress_many, is_compact
from deltaplane.data.dataset import Dataset
from deltaplane.delta import Delta, StateDict
from deltaplane.engine.config import RunConfig
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng, torch_generator
from deltaplane.engine.task import Task
from deltaplane.engine.tied import retie, tied_aliases, untie
from deltaplane.engine.training import local_train
from deltaplane.engine.wire import Sessions
from deltaplane.errors import ConfigError, DecodeError, DeltaplaneError, InvalidUpdate

__all__ = ["MemoryPublisher", "Publisher", "RoundOutcome", "ServerStep"]


_FLTRUST_NEEDS_ROOT = (
    "FLTrust needs the server's own root dataset to train a reference update; give the server a task"
)
_ATTRIBUTION_NEEDS_PROBE = (
    "trigger_attribution needs the server's model and root dataset to invert triggers; give the server a task"
)


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
        """The downlink payload of ``update`` and the update the devices apply: what the payload decodes to.

        A memoryless compressor (:attr:`Compressor.memoryless`: an exact codec, nothing carried between rounds,
        such as the default ``identity``) sends ``update`` itself, so its payload decodes to ``update`` bit for
        bit and is not decoded again here (the caller's serial tail paid ~0.36 ms a round for it, one torch
        thread, a loaded 2-core VM); any other decodes its own payload strictly, as a device does."""
        exact = self.compressor.memoryless
        payload = self.compressor.compress(update, base_id=self.base_id, base_version=base_version)
        if exact:
            return payload, update
        return payload, decompress(payload, expect_base=(self.base_id, base_version), expect_layout=update)


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
    """The server side of every round (see the module docstring); learned state (the aggregator chain's
    optimizer moments, DP accountant, the downlink residual, the current version) lives here across rounds.

    Args:
        aggregator: the chain (:func:`~deltaplane.aggregation.build_aggregator`), Validate outermost.
        publisher: where each round's update goes (compress for the downlink, make it the new version).
        initial_state: the global model of version 0 (a transport that keeps versions elsewhere passes the
            base of each round to :meth:`open` instead).
        base_id: the model lineage payload headers must name.
        reference: FLTrust's server update for a round, ``reference(rnd, state)`` (required when the chain
            holds :class:`~deltaplane.aggregation.FLTrust`).
        probe: the server's model and root data around a round's global model, ``probe(state)`` (required
            when the chain holds :class:`~deltaplane.aggregation.attribution.BackdoorAttribution`).

    Use :meth:`for_run` to build one from a :class:`RunConfig` and a :class:`Task`.
    """

    def __init__(
        self,
        aggregator: Validate,
        publisher: Publisher,
        initial_state: StateDict,
        *,
        base_id: str,
        reference: Callable[[int, StateDict], Delta] | None = None,
        probe: Callable[[StateDict], TriggerProbe] | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.aggregator = aggregator
        #: the uplink's wire sessions: compact payloads decode against the session of the expected layout
        self.sessions = sessions or Sessions("identity", base_id, compact=False)
        self.publisher = publisher
        self.base_id = base_id
        self.state = {k: v.detach().clone() for k, v in initial_state.items()}
        self.version = 0
        fltrust = aggregator.find(FLTrust)
        self._fltrust: FLTrust | None = fltrust if isinstance(fltrust, FLTrust) else None
        if self._fltrust is not None and reference is None:
            raise ConfigError(_FLTRUST_NEEDS_ROOT)
        self._reference = reference
        if isinstance(aggregator.find(BackdoorAttribution), BackdoorAttribution) and probe is None:
            raise ConfigError(_ATTRIBUTION_NEEDS_PROBE)
        self._probe = probe
        self._round = 0
        self._uplink = 0
        self._accepted = 0
        self._rejections: list[Rejection] = []
        self._secure = False
        #: tensors uploads leave out: FedPer/FedBN local layers, and tied parameters' aliases (:attr:`tied`)
        self.local_keys: frozenset[str] = frozenset()
        #: ``{alias: kept}`` of the model's tied parameters (:func:`~deltaplane.engine.tied.tied_aliases`): each
        #: round's update gives an alias its kept name's change before it is published
        self.tied: dict[str, str] = {}
        self._layout: tuple[dict[str, Tensor], frozenset[str], Layout] | None = None

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        task: Task,
        initial_state: StateDict,
        *,
        base_id: str,
        publisher: Publisher | None = None,
        simulation: bool = True,
    ) -> ServerStep:
        """The server step of ``config``: its aggregator chain, its downlink codec (in memory unless another
        ``publisher`` is given), the tensors personalization keeps on the devices (:attr:`local_keys`) and,
        for FLTrust, a reference trained on :func:`root_dataset`. ``simulation`` False (a server of real
        devices) draws DP noise from the OS CSPRNG unless ``config.dp_noise_source`` is ``"seeded"``."""
        reference = probe = None
        agg = config.build_aggregator(
            seed=derive_seed(config.seed, Stream.AGGREGATION) % 2**31,
            secure_noise=not config.seeded_dp_noise(simulation=simulation),
        )
        if isinstance(agg.find(BackdoorAttribution), BackdoorAttribution):
            root = root_dataset(config, task)
            scratch = task.build_model(0)  # weights never read: the probe calls it with the round's state
            TriggerProbe(scratch, root.x, root.y, {})  # refuse a task it cannot invert before any round

            def probe(state: StateDict) -> TriggerProbe:
                return TriggerProbe(scratch, root.x, root.y, state)

        if isinstance(agg.find(FLTrust), FLTrust):
            root = root_dataset(config, task)
            model = task.build_model(0)  # scratch module: training overwrites its weights

            def reference(rnd: int, state: StateDict) -> Delta:
                return local_train(
                    model,
                    state,
                    root,
                    torch_generator(config.seed, Stream.ROOT_DATA, rnd),
                    epochs=config.local_epochs,
                    batch_size=config.batch_size,
                    lr=config.client_lr(rnd),
                    momentum=config.momentum,
                    prox_mu=config.prox_mu,
                    loss=task.loss,
                )

        if publisher is None:
            publisher = MemoryPublisher(
                Compressor(
                    config.downlink_codec,
                    error_feedback=config.downlink_error_feedback,
                    seed=derive_seed(config.seed, Stream.DOWNLINK_CODEC),
                ),
                base_id,
            )
        sessions = Sessions.for_config(config, base_id)
        step = cls(
            agg,
            publisher,
            initial_state,
            base_id=base_id,
            reference=reference,
            probe=probe,
            sessions=sessions,
        )
        scratch_model = task.build_model(0)  # the names depend on the architecture only, not on the weights
        # a tied parameter's aliases are not uploaded either: its kept name carries its one change (engine.tied)
        step.tied = tied_aliases(scratch_model)
        step.local_keys = frozenset(step.tied)
        if config.personalization != "none":  # FedPer's head, FedBN's norms: never uploaded nor aggregated
            step.local_keys |= config.make_personalizer().local_keys(scratch_model)
        return step

    def open(self, rnd: int, *, version: int | None = None, state: StateDict | None = None) -> None:
        """Start round ``rnd`` on the current version (or on ``version``/``state``, when the transport keeps
        the versions); FLTrust's server trains its reference update here."""
        if version is not None:
            self.version = version
        if state is not None:
            self.state = dict(state)
        self._round = rnd
        self._uplink = self._accepted = 0
        self._rejections = []
        self._secure = False
        self.aggregator.reset()
        # the constructor refused FLTrust without a reference and attribution without a probe; a restored or
        # loaded chain is the same configuration's, so these refusals only narrow the types
        if self._fltrust is not None:
            if self._reference is None:
                raise ConfigError(_FLTRUST_NEEDS_ROOT)
            # the reference as the devices' updates hold a tied parameter: once, under its kept name
            self._fltrust.set_reference(untie(self._reference(rnd, self.state), self.tied))
        attribution = self.aggregator.find(BackdoorAttribution)
        if isinstance(attribution, BackdoorAttribution):
            if self._probe is None:
                raise ConfigError(_ATTRIBUTION_NEEDS_PROBE)
            attribution.set_probe(self._probe(self.state))

    def checkpoint(self) -> tuple[Any, ...]:
        """The step's mutable state (aggregate, counts, version, weights), for a transport that must undo an
        acceptance or a close when its own durable write fails (:meth:`restore`)."""
        return (
            copy.deepcopy(self.aggregator),
            self._accepted,
            list(self._rejections),
            self.version,
            self.state,
        )

    def restore(self, checkpoint: tuple[Any, ...]) -> None:
        """Put back a :meth:`checkpoint` (the publisher's own state, e.g. a downlink residual, is not included)."""
        aggregator, self._accepted, rejections, self.version, self.state = checkpoint
        self.aggregator, self._rejections = aggregator, list(rejections)
        fltrust = aggregator.find(FLTrust)
        self._fltrust = fltrust if isinstance(fltrust, FLTrust) else None

    def state_dict(self) -> dict[str, Any]:
        """The step's learned state between rounds as plain data, for a durable snapshot that a restarted
        server loads (:meth:`load_state_dict`) to continue bit for bit: the aggregator chain's (server
        optimizer moments, DP accountant, adaptive clip, random generators: see
        :func:`~deltaplane.aggregation.checkpoint.chain_state`), the downlink compressor's residual and random
        state, and the version. ``torch.save`` it; ``torch.load(weights_only=True)`` reads it back."""
        compressor = getattr(self.publisher, "compressor", None)
        return {
            "aggregator": chain_state(self.aggregator),
            "downlink": compressor.state_dict() if isinstance(compressor, Compressor) else None,
            "version": self.version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a step built from the same configuration.

        Raises:
            ConfigError: the snapshot does not fit this step's chain or downlink.
        """
        # Everything is checked before anything is restored, so a refusal leaves the step as it was.
        compressor = getattr(self.publisher, "compressor", None)
        downlink = state["downlink"]
        if (downlink is None) != (not isinstance(compressor, Compressor)):
            raise ConfigError("the snapshot's downlink does not fit this server step's publisher")
        if isinstance(compressor, Compressor):
            self._check_downlink(compressor, downlink)
        version = int(state["version"])
        # against the model's layout: another model's optimizer moments are refused here, not at the next close
        load_chain_state(self.aggregator, state["aggregator"], layout=self.layout)
        fltrust = self.aggregator.find(FLTrust)
        self._fltrust = fltrust if isinstance(fltrust, FLTrust) else None
        if isinstance(compressor, Compressor):
            compressor.load_state_dict(downlink)
        self.version = version

    def _check_downlink(self, compressor: Compressor, downlink: Any) -> None:
        """Refuse a downlink compressor state that would fail only at the next round's close (after a round of
        client training): another codec, a malformed state, or an error-feedback residual of another model
        (other tensor names, shapes or dtypes than the updates this step publishes).

        Raises:
            ConfigError: naming the codec or the first tensor that differs.
        """
        try:
            copy.deepcopy(compressor).load_state_dict(downlink)  # a trial: the live compressor is untouched
            residual = downlink.get("residual") or {}
            shapes = {k: tuple(t.shape) for k, t in residual.items()}
        except DeltaplaneError as exc:
            raise ConfigError(f"the snapshot's downlink does not fit this server step: {exc}") from None
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"the server checkpoint's downlink is malformed ({type(exc).__name__}: {exc})"
            ) from None
        model = {k: tuple(t.shape) for k, t in self.layout.items()}
        problem = layout_difference(shapes, model, held="residual") if shapes else ""
        if (
            not problem
        ):  # the same names and shapes: the dtypes too (one of another dtype fails the next close)
            problem = next(
                (
                    f"[{k!r}] is {t.dtype}, this model's tensor {k!r} {self.layout[k].dtype}"
                    for k, t in residual.items()
                    if t.dtype != self.layout[k].dtype
                ),
                "",
            )
        if problem:
            raise ConfigError(
                f"downlink residual{problem}: the snapshot's downlink error feedback belongs to another model; "
                "restore a snapshot taken from a run of this model"
            )

    @property
    def last_rejection(self) -> Rejection | None:
        """The most recent refusal of the open round (None if nothing was refused)."""
        return self._rejections[-1] if self._rejections else None

    def refuse(self, client_id: str, error: DeltaplaneError) -> None:
        """Record an update refused before it reached the chain (it could not be produced or decoded)."""
        self._rejections.append(Rejection(client_id, error))

    @property
    def layout(self) -> Layout:
        """What every update must look like: the model's tensors less the devices' local ones."""
        return self._expected_layout()

    @property
    def session(self) -> WireSession | None:
        """The wire session of this server's uplink (``None``: updates are self-describing)."""
        return self.sessions.get(self.layout)

    def receive_payload(self, client_id: str, payload: bytes, weight: float) -> bool:
        """Decode a wire payload strictly against this round's base, validate and aggregate it.

        A compact payload decodes in this server's wire session (:attr:`session`), a self-describing one on
        its own; both strictly against the layout and the round's base version.
        """
        self._uplink += len(payload)
        try:
            # strict against the model: another layout is refused before anything is decoded or allocated
            layout = self.layout
            session = None
            if is_compact(payload):
                session = self.sessions.get(layout)
                if session is None:
                    raise DecodeError("this server takes self-describing payloads (its wire is not compact)")
            delta = decompress(
                payload, expect_base=(self.base_id, self.version), expect_layout=layout, session=session
            )
        except DeltaplaneError as exc:  # one bad client is refused, the round goes on
            return self._take(client_id, exc, weight)
        return self._take(client_id, delta, weight)

    def _take(self, client_id: str, decoded: Delta | DeltaplaneError, weight: float) -> bool:
        """A decoded upload into the chain, or its decoding error refused (the round goes on)."""
        if isinstance(decoded, DeltaplaneError):
            self.refuse(client_id, decoded)
            return False
        return self.receive_delta(client_id, decoded, weight)

    def receive_payloads(self, uploads: Sequence[tuple[str, bytes, float]]) -> list[bool]:
        """:meth:`receive_payload` for each ``(client id, payload, weight)``, in order, with the same result
        and the same refusals; compact payloads are decoded together (:func:`decompress_many`), in groups
        of at most :attr:`DECODE_BATCH_BYTES` decoded bytes."""
        session = self.sessions.get(self.layout)
        if session is None or len(uploads) < 2:
            return [self.receive_payload(cid, payload, weight) for cid, payload, weight in uploads]
        per_group = max(1, self.DECODE_BATCH_BYTES // max(1, session.layout.decoded_bytes))
        accepted: list[bool] = []
        for at in range(0, len(uploads), per_group):
            group = uploads[at : at + per_group]
            compact = [is_compact(payload) for _, payload, _ in group]
            decoded = iter(
                decompress_many(
                    [payload for (_, payload, _), c in zip(group, compact, strict=True) if c],
                    session=session,
                    expect_base=(self.base_id, self.version),
                )
            )
            for (cid, payload, weight), c in zip(group, compact, strict=True):
                if not c:  # self-describing (or garbage): the one-by-one path says why
                    accepted.append(self.receive_payload(cid, payload, weight))
                    continue
                self._uplink += len(payload)
                accepted.append(self._take(cid, next(decoded), weight))
        return accepted

    #: decoded bytes :meth:`receive_payloads` holds at once (the decoded updates of one group)
    DECODE_BATCH_BYTES = 64 * 2**20

    def _expected_layout(self) -> Layout:
        """The layout uploads must have: the current state's shared tensors (kept until either changes)."""
        key = (self.state, self.local_keys)
        if self._layout is None or self._layout[0] is not key[0] or self._layout[1] != key[1]:
            self._layout = (self.state, self.local_keys, Layout.of(self.state).without(self.local_keys))
        return self._layout[2]

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
        round's updates the server gets under SecAgg. It enters the chain as one update of weight 1; under
        distributed DP (:class:`~deltaplane.aggregation.dp.DistributedDP`) the mean must be unweighted and the
        chain learns ``contributors`` (a sum of fewer than its minimum is not published)."""
        if self._accepted:
            raise InvalidUpdate("this round already aggregated individual updates; SecAgg cannot join it")
        ddp = self.aggregator.find(DistributedDP)
        if isinstance(ddp, DistributedDP):
            ddp.expect_sum(contributors)
        self._secure = True
        self._uplink += uplink_bytes
        self._accepted = contributors
        self.aggregator.add(mean, 1.0)

    @property
    def dp_adjacency(self) -> str | None:
        """The neighbouring relation the chain's ε is stated under ("add/remove" for central DP, "zero-out" for
        distributed DP; see :data:`~deltaplane.aggregation.dp.ZERO_OUT`), None when the chain adds no DP noise."""
        dp = self.aggregator.find(DPFedAvg)
        return dp.adjacency if isinstance(dp, DPFedAvg) and dp.noise_multiplier > 0 else None

    def close(self) -> RoundOutcome:
        """Aggregate, compress the downlink, publish the new version; the outcome carries the new state.

        Raises:
            InvalidUpdate: every update of the round was refused (without central DP noise; under it the round
                releases its noise like an empty round).
            PrivacyBudgetExceeded: this round would spend more ε than the budget allows.
        """
        dp = self.aggregator.find(DPFedAvg)
        noised = isinstance(dp, DPFedAvg) and dp.noise_multiplier > 0
        if self._accepted == 0 and isinstance(dp, DPFedAvg) and (noised or not self._rejections):
            # Poisson sampling (central DP) may pick nobody: the round still releases its noise, as the
            # accountant assumes; the shared tensors' layout tells DP-FedAvg what to noise. Under noise a round
            # whose every update was refused releases (and spends) too: aborting it instead would tell apart
            # "the refused client's data" from its neighbouring dataset without the client, with no noise at all
            zeros = Delta.zeros_like(self.state)
            dp.set_layout(Delta({k: v for k, v in zeros.items() if k not in self.local_keys}))
        elif self._accepted == 0:
            first = self._rejections[0] if self._rejections else None
            where = f"client {first.client_id}: {first.error}" if first else "no client uploaded"
            raise InvalidUpdate(
                f"round {self._round}, {where} (every update of the round was refused; if local training "
                "diverged, try a lower lr)"
            ) from (first.error if first else None)
        update = self.aggregator.result()  # raises PrivacyBudgetExceeded before a round that would exceed it
        update = retie(update, self.tied)  # after DP: a copy of the noised tensor, not a second draw
        measurements = dict(self.aggregator.measurements)
        base = self.version
        payload, decoded = self.publisher.publish(
            update,
            base_version=base,
            lineage=released_lineage(
                {"round": self._round, "uploads": self._accepted, **_dp(measurements, self.dp_adjacency)},
                self.dp_adjacency,
            ),
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


#: lineage fields that count a round's participation exactly: how many clients' updates it summed, how many
#: examples they claimed. Under add/remove neighbours one client's presence moves them (by one, by its example
#: count) with no noise at all, which is why DP-FedAvg divides by the fixed expected count rather than release
#: the actual one (McMahan et al. 2018); a version whose ε is stated for add/remove therefore records neither
#: (:func:`released_lineage`). Under zero-out neighbours the device takes part either way, so ``uploads`` has
#: the same law under both and stays.
EXACT_COUNTS = ("uploads", "examples")


def released_lineage(lineage: Mapping[str, Any], adjacency: str | None) -> dict[str, Any]:
    """The lineage a published version records: ``lineage`` without :data:`EXACT_COUNTS` when its ε is stated
    for add/remove neighbours (central DP), as it is otherwise. The lineage travels with the version (registry
    entry, a pulled model's manifest) to whoever its ε protects against, so it must hold nothing ε does not
    cover; the operator still reads the counts in the round's status (admin only)."""
    if adjacency != ADD_REMOVE:
        return dict(lineage)
    return {k: v for k, v in lineage.items() if k not in EXACT_COUNTS}


def _dp(measurements: dict[str, Any], adjacency: str | None) -> dict[str, Any]:
    """The privacy a published version has cost so far, for its lineage: ``{"dp": {"epsilon", "delta",
    "adjacency"}}`` when the round's chain ran DP with an accountant (a registry entry, and the model pulled from
    it, then say what they spent and against which neighbours, not only the round's status), else nothing (no
    DP, or noise 0: ε infinite)."""
    eps, delta = measurements.get("epsilon"), measurements.get("delta")
    if not isinstance(eps, float | int) or not isinstance(delta, float | int) or not np.isfinite(eps):
        return {}
    return {"dp": {"epsilon": float(eps), "delta": float(delta), "adjacency": adjacency}}
