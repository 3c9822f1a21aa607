"""Secure aggregation over the service: one endpoint per protocol stage, device-token auth, capped bodies.

The server side of :mod:`deltaplane.aggregation.secagg` behind HTTP. An operator opens a SecAgg round for a list
of invited devices; each device fetches its invitation (its client id and the round's public parameters), then
walks the four stages — every body is a SecAgg message in its strict byte encoding
(:mod:`deltaplane.aggregation.secagg.messages`), capped at the largest valid size for the round before it is
read. The operator (or a scheduler with deadlines) closes each stage with ``advance``; a device that has not
spoken by then has dropped out of that stage, and anything it sends later is refused with 409. Closing the
round unmasks the sum, turns it into the (example-weighted) mean update and publishes a new signed version,
exactly like a plain round: the version, its delta, the ``training`` tag and the server step's stored state
commit in one registry transaction, and a close that fails leaves none of them and can be retried. No endpoint ever receives or stores a device's plaintext update.

Device endpoints (``Authorization: Bearer <device token>``; only invited devices):

* ``GET  /v1/models/{model}/rounds/open`` — discovery: every open round this device may take part in (none for a
  withdrawn cohort), plain
  (number, base version, nonce) or SecAgg (number, base version, current stage; only rounds it is invited to),
  so a device agent that polls one endpoint learns what to do next (:mod:`deltaplane.serve.fleet`).
* ``GET  /v1/models/{model}/secagg/{round}`` — the invitation: ``client_id``, ``config``, ``encoding``, stage,
  ``secagg_version`` (the message version; a device of another version refuses the round here, before training),
  ``service_binding`` (an authenticated round's signatures name this service as each device saw it:
  :mod:`deltaplane.serve.service_identity`; a device that does not send ``X-Deltaplane-SecAgg-Binding: 1`` is
  refused such a round, 409, here and at ``keys``).
* ``POST /v1/models/{model}/secagg/{round}/keys`` — ``AdvertiseKeys`` (``SignedAdvertiseKeys`` in an
  authenticated round: its certificate must name the token's device).
* ``GET  /v1/models/{model}/secagg/{round}/roster`` — ``KeyRoster`` (``SignedKeyRoster`` in an authenticated
  round; 409 until key advertisement closed).
* ``POST /v1/models/{model}/secagg/{round}/shares`` — ``ShareKeys``.
* ``GET  /v1/models/{model}/secagg/{round}/inbox`` — ``ShareInbox`` for this device (409 until shares closed).
* ``POST /v1/models/{model}/secagg/{round}/masked`` — ``MaskedInput`` (409 after the unmasking request).
* ``GET  /v1/models/{model}/secagg/{round}/unmask`` — ``UnmaskRequest`` (409 until masked inputs closed).
* ``POST /v1/models/{model}/secagg/{round}/consistency`` — ``SurvivorSignature`` (authenticated rounds: the
  consistency check, stage ``consistency check`` between masked inputs and unmasking).
* ``GET  /v1/models/{model}/secagg/{round}/consistency`` — ``SurvivorSignatures`` (409 until the check closed).
* ``POST /v1/models/{model}/secagg/{round}/unmask`` — ``UnmaskResponse``.

Admin endpoints: ``POST /admin/models/{model}/secagg`` (open), ``GET /admin/models/{model}/secagg/{round}``
(status), ``POST /admin/models/{model}/secagg/{round}/advance`` (close the current stage),
``POST /admin/models/{model}/secagg/{round}/close`` (unmask, publish),
``POST /admin/models/{model}/secagg/{round}/abort`` (give the round up unpublished).

An *authenticated* round (``"authenticated": true`` when opened) takes only key advertisements signed by an
enrolled device's identity key and forwards them with their certificates in the roster, where every device
checks them (:mod:`deltaplane.aggregation.secagg.identity`): a device with credentials refuses an unsigned round
or roster, so this flag cannot turn the check off. The service itself holds no enrollment key and verifies no
device's signature: it only refuses an advertisement whose certificate names another device than the token's, or (given
``ServiceConfig.secagg_revocations``; verified under ``ServiceConfig.secagg_authority`` when given, refused past its
next update, and replaced by uploads: :mod:`deltaplane.serve.revocation_routes`) a device the enrollment
authority's revocation list revokes (422). The round's open already leaves out the invited devices that list names
(any cohort: the open knows only device ids), answering them as ``"revoked"``, so no stage waits for them; too few
left for the threshold or m_min refuses the open (422, naming them). Such a
round also has the consistency check: each survivor signs the unmasking request it fetched, ``advance`` closes
the check, and each device unmasks only once ``threshold`` of its neighbourhood signed the same request.

A round's protocol state (keys, shares, every masked input: model-sized per device) lives in memory only and
is dropped as soon as the round is published or aborted; its full final status (survivors, dropouts) is kept
for the last :data:`FINISHED_KEPT` finished rounds. Its number and outcome are durable
(:meth:`~deltaplane.serve.rounds_store.RoundStore.open_secagg`): numbers continue after a restart and are never
reused (each binds the round's keys and AAD, and names the round in lineage and logs), and a round open when
the service stopped is ``lost`` on the next start: it can never complete, and every request for it gets 409
(:class:`~deltaplane.errors.RoundLost`, ``"error": "RoundLost"``) while the admin status answers
``"finished": "lost"``. Any request for a finished round gets 409 saying how it ended; 404 is for rounds that
never existed.
"""

import hashlib
import logging
import math
import os
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from deltaplane.aggregation.dp import DistributedDP
from deltaplane.aggregation.secagg import (
    AdvertiseKeys,
    DeviceCertificate,
    MaskedInput,
    Message,
    RingEncoding,
    SecAggAuthError,
    SecAggConfig,
    SecAggError,
    SecAggOrderError,
    ServerEndpoint,
    ShareKeys,
    SignedAdvertiseKeys,
    Stage,
    SurvivorSignature,
    UnmaskResponse,
    check_device_policy,
    decode_message,
    default_threshold,
    group_size,
    max_ring_weight,
    round_neighbours,
)
from deltaplane.aggregation.secagg.errors import RevocationRollback, RevocationsStale
from deltaplane.aggregation.secagg.messages import VERSION as MESSAGE_VERSION
from deltaplane.aggregation.secagg.revocation import RevocationList
from deltaplane.delta import Delta
from deltaplane.engine.config import RunConfig
from deltaplane.engine.secure import masked_zeros
from deltaplane.errors import (
    ConfigError,
    Conflict,
    DecodeError,
    NotFound,
    RoundAbandoned,
    RoundAborted,
    RoundLost,
)
from deltaplane.registry import Governance, withdrawn_among
from deltaplane.serve.bodies import NAME, ModelName, read_capped
from deltaplane.serve.fleet_history import MAX_ABORT_REASON
from deltaplane.serve.revocation_routes import REVOCATIONS_ADMIN_PATH, read_service_revocations
from deltaplane.serve.rounds import (
    abort_reason,
    check_guard_admits_distributed_dp,
    check_update_norm,
    distributed_dp_honest_bound,
    publisher_of,
    refuse_withdrawn_round,
    remembering_refusal,
    resume_step,
    step_bytes,
    undo_on_failure,
)
from deltaplane.serve.rounds_store import RoundStore
from deltaplane.serve.service_identity import BINDING_HEADER, SERVICE_BINDING
from deltaplane.serve.service_store import ServiceStore

__all__ = ["FINISHED_KEPT", "FinishedRound", "SecAggRound", "install_secagg_routes"]

log = logging.getLogger(__name__)

#: why a SecAgg round open when the service stopped ended unpublished (its history row's reason)
LOST_REASON = (
    "lost: the service stopped while the round was open, and its keys, shares and masked inputs were in the "
    "service's memory only"
)
#: how many finished (published or aborted) rounds keep their final status, so late requests get 409 not 404
FINISHED_KEPT = 256

RoundId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="SecAgg round number")]


@dataclass
class SecAggRound:
    """One open secure aggregation round: who was invited, the public parameters and the server endpoint."""

    model: str
    number: int
    base_version: int
    clients: dict[str, int]  # device id -> client id
    encoding: RingEncoding
    endpoint: ServerEndpoint
    like: Delta = field(repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    published: dict[str, Any] | None = None
    cohorts: dict[str, str] = field(default_factory=dict)  # device id -> cohort its token names
    opened_at: float = field(default_factory=time.time)
    #: devices the open was asked to invite but the held revocation list revokes: left out of the round
    revoked: tuple[str, ...] = ()
    #: why its last advance or close was refused (too few devices, a sum out of range): what an abort without
    #: a reason records
    refused: str | None = None
    #: the coordinator that opened it (a :class:`CoordinatorStamp` as a dict; None: opened by hand)
    coordinator: dict[str, Any] | None = None

    @property
    def config(self) -> SecAggConfig:
        return self.endpoint.config

    def status(self) -> dict[str, Any]:
        srv = self.endpoint.server
        return {
            "model": self.model,
            "round": self.number,
            "base_version": self.base_version,
            "stage": srv.stage,
            "invited": len(self.clients),
            "revoked": list(self.revoked),
            "advertised": len(srv.keys),
            "shared": len(srv.share_senders),
            "uploaded": len(srv.uploaded),
            "signed": len(srv.signatures),
            "responded": len(srv.responses),
            "survivors": list(srv.survivors),
            "dropped": list(srv.dropped),
            "published": self.published,
            "authenticated": srv.authenticated,
            "coordinator": self.coordinator,
            "finished": None,  # "published" or "aborted" once it is (FinishedRound)
        }


@dataclass(frozen=True)
class FinishedRound:
    """What is kept of a published or aborted round: its final status, client ids packed (4 bytes each), so
    that the :data:`FINISHED_KEPT` kept rounds stay small whatever their size."""

    outcome: str  # "published" or "aborted"
    summary: dict[str, Any]
    survivors: array
    dropped: array

    @classmethod
    def of(cls, r: SecAggRound, outcome: str) -> "FinishedRound":
        status = r.status()
        survivors, dropped = status.pop("survivors"), status.pop("dropped")
        return cls(outcome, status | {"finished": outcome}, array("I", survivors), array("I", dropped))

    def status(self) -> dict[str, Any]:
        return self.summary | {"survivors": self.survivors.tolist(), "dropped": self.dropped.tolist()}

    def refuse(self) -> NoReturn:
        """Refuse a device's request to this finished round: 409, typed :class:`RoundAborted` for an aborted one
        (a device that sent its masked update there then knows it reached no model)."""
        head = f"SecAgg round {self.summary['round']} of {self.summary['model']!r} is"
        if self.summary.get("abandoned"):
            raise RoundAbandoned(
                f"{head} aborted: no coordinator ran it (abandoned); it takes no more messages, will never "
                "publish and is none of the coordinator's rounds: do not count it"
            )
        if self.outcome != "published":
            raise RoundAborted(f"{head} aborted; it takes no more messages and will never publish")
        version = self.summary["published"]["version"]
        raise HTTPException(409, f"{head} closed (published as version {version}); it takes no more messages")


#: the most bits per value a SecAgg round may be opened with
MAX_OPEN_BITS = 24


class CoordinatorStamp(BaseModel):
    """Which coordinator opened a round (``fleet coordinate`` sends its own): a coordinator starting later checks
    whether that process is gone before it aborts the round it left open (docs/fleet.md)."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1, max_length=253, description="the host name of the coordinator's machine")
    pid: int = Field(ge=1, le=2**31 - 1, description="the coordinator's process id there")
    place: str = Field(
        default="",
        pattern=r"^([0-9a-f]{8})?$",
        description="a hash of its host name, machine id and pid namespace (deltaplane.processes.place_and_boot): "
        "two machines or containers sharing a host name differ; empty: not told, so no one may judge it gone",
    )
    boot: str = Field(default="", pattern=r"^([0-9a-f]{8})?$", description="a hash of that host's boot id")
    start: int = Field(
        default=0,
        ge=0,
        le=2**63 - 1,
        description="the process's start time (clock ticks since boot; 0: unknown)",
    )


class OpenSecAggRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: list[Annotated[str, Field(pattern=NAME, max_length=128)]] = Field(
        min_length=2,
        max_length=100_000,
        description=(
            "the devices to invite; each invited device's client id (what the round's status lists as survivors "
            "and dropped) is its position in this list once the devices the revocation list revokes are left out"
        ),
    )
    bits: int | None = Field(
        default=None,
        ge=2,
        le=MAX_OPEN_BITS,
        description="bits per value (default: the federation's secagg.bits, or a run config's default, 20)",
    )
    clip_range: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="per-value clip range of the update (default: federation's or 1)",
    )
    weight_scale: float | None = Field(
        default=None,
        ge=0,
        le=1e9,
        description=(
            "typical example count of the invited devices (e.g. their mean): each device scales its values by "
            "its count / weight_scale, and the round publishes the example-weighted mean, like plain rounds; "
            "0: an unweighted mean. Required: the service never sees the counts (they travel masked)"
        ),
    )
    threshold: int | None = Field(
        default=None,
        ge=2,
        description="default: ⌊2g/3⌋ + 1 for neighbourhoods of g, the least devices accept (check_device_policy)",
    )
    neighbours: int | None = Field(
        default=None,
        ge=2,
        description=(
            "SecAgg+ degree (even); default: the --federation's secagg_neighbours for a round of this many devices "
            "(round_neighbours), else the complete graph; null: the complete graph"
        ),
    )
    base_version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    authenticated: bool = Field(
        default=False,
        description=(
            "devices sign their key advertisements with their enrolled identity keys and check every neighbour's "
            "certificate and signature in the roster (fleet enroll --authority-key); default: the --federation's "
            "secagg_authenticated, else false"
        ),
    )
    coordinator: CoordinatorStamp | None = Field(
        default=None,
        description="the coordinator that opens it (fleet coordinate's host and pid; the round's status shows "
        "it): a coordinator starting later aborts the round if that process is gone",
    )


class Invitation(BaseModel):
    model: str
    round: int
    base_version: int
    client_id: int
    config: dict[str, int | None]
    encoding: dict[str, float]
    stage: str
    authenticated: bool = Field(description="key advertisements are signed and checked by every device")
    secagg_version: int = Field(
        description=(
            "the SecAgg message version this service speaks (5 since authenticated rounds): a device of another "
            "version refuses the round here, before it trains, as a mismatched message would be refused anyway"
        )
    )
    service_binding: int = Field(
        description=(
            "1: in an authenticated round every device binds its signatures to this service's identity as it "
            "saw it (the SHA-256 of the TLS key the service presented, else the service's address), so a "
            "signed advertisement does not verify in another service's round; a device must send "
            "X-Deltaplane-SecAgg-Binding: 1 to be invited to one (an older device is refused, 409)"
        )
    )


class OpenRound(BaseModel):
    kind: str = Field(description="'plain' (upload a compressed update) or 'secagg' (run the SecAgg stages)")
    round: int
    base_version: int
    nonce: str | None = Field(default=None, description="plain rounds: send it as X-Deltaplane-Round-Nonce")
    stage: str | None = Field(
        default=None, description="SecAgg rounds: the stage open now ('advertise keys' until keys close)"
    )


class OpenRounds(BaseModel):
    model: str
    rounds: list[OpenRound]


class Accepted(BaseModel):
    accepted: bool
    kind: str
    stage: str


_MESSAGE = {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _check_message_caps(cfg: SecAggConfig, max_upload_bytes: int) -> None:
    """Refuse to open a round whose devices' messages the request guard would refuse (413 at every device).

    The guard caps SecAgg messages at ``max_upload_bytes`` before the endpoint reads them: a masked input
    is one ring value per parameter, a share message one ciphertext per neighbour.
    """
    for cls in (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse):
        need = cls.max_bytes(cfg)
        if need > max_upload_bytes:
            raise ConfigError(
                f"a {cls.__name__} of this round can take {need} bytes, above the service's "
                f"max_upload_bytes of {max_upload_bytes}, so every device's would be refused; restart the "
                f"service with --max-upload-bytes {need} or more, or invite fewer devices / use fewer bits"
            )


def check_ring_carries(encoding: RingEncoding, max_examples: float) -> None:
    """Refuse to open a weighted round whose ring cannot carry every example count the service admits.

    A device refuses an invitation whose weighted ring cannot carry its example count, before it trains
    (:meth:`~deltaplane.aggregation.secagg.DeviceEndpoint.check_update`, through
    :meth:`RingEncoding.check_weight`); this applies the same check to the largest count the service admits
    (``max_examples``, ``deltaplane serve --max-examples``), so a round is never opened that a device the
    service admits would sit out. An unweighted ring (``weight_scale`` 0) carries any count.

    Raises:
        ConfigError: the ring's weight slot (``bits`` bits) is too small for ``max_examples``.
    """
    most = math.floor(max_examples)
    try:
        encoding.check_weight(most)
    except SecAggError:
        top, need = max_ring_weight(encoding.bits), most.bit_length()
        more = (
            f"open it with bits: {need} or more (secagg.bits in the service's --federation YAML, when the open "
            "names no bits), or "
            if need <= MAX_OPEN_BITS
            else ""
        )
        raise ConfigError(
            f"a weighted SecAgg round of {encoding.bits}-bit codes carries example counts up to {top} "
            f"(2^{encoding.bits} - 1), but this service admits up to {most} per device (max_examples): a device "
            f"holding more than {top} would refuse the invitation. Fix: {more}open it with weight_scale: 0 (an "
            f"unweighted mean), or restart the service with --max-examples {top} or less"
        ) from None


def _revocations(config: Any, store: ServiceStore) -> RevocationList | None:
    """The service's revocation list (``config.secagg_revocations``; "" for none), read at each authenticated
    round open so a newer one (a file edit, or an upload: :mod:`~deltaplane.serve.revocation_routes`) applies at
    once. Verified under ``config.secagg_authority`` when the service was given the authority's public key, and
    then never older than the highest list it has held (``store``;
    :func:`~deltaplane.serve.revocation_routes.read_service_revocations`). A missing, malformed or
    unauthenticated list, or one past its next update (every enrolled device would refuse the round), is a
    :class:`ConfigError` (422: no round opens); an older one a ``RevocationRollback`` (409)."""
    if not config.secagg_revocations:
        return None
    if not os.path.lexists(config.secagg_revocations):  # the first list is uploaded, not there at start
        raise ConfigError(
            f"this service holds no revocation list yet ({os.fspath(config.secagg_revocations)} does not exist), "
            "and an authenticated round needs a current one. Issue one (`deltaplane keys revoke --authority-key "
            "enrollment.ed25519.pem --out revoked.bin`; without --device it revokes no device) and upload it "
            f"(POST {REVOCATIONS_ADMIN_PATH}, body: that file) or write it to the service's --secagg-revocations "
            "file"
        )
    try:
        return read_service_revocations(
            config,
            store,
            now=time.time(),
            fix=f"a current one is uploaded (POST {REVOCATIONS_ADMIN_PATH}, body: the file `deltaplane keys "
            "revoke` writes) or written to the service's --secagg-revocations file",
        )
    except RevocationsStale as exc:
        raise ConfigError(str(exc)) from None
    except RevocationRollback as exc:  # as an upload of that list would be: 409
        raise HTTPException(409, str(exc)) from None


def _revoked_invitees(revocations: RevocationList | None, devices: list[str]) -> frozenset[str]:
    """The devices of ``devices`` that ``revocations`` revokes, as far as the service knows at a round's open.

    The list revokes a ``(device id, cohort)`` pair, and a key advertisement is refused when its certificate
    names a revoked pair (:meth:`RevocationList.names`), the certificate's device id being the token's (checked
    at advertisement). Before advertisement the service knows only the invited device id, not the cohort of
    its certificate, so a device id the list names in any cohort is left out: a revoked device re-enrolls
    under a new device id (docs/fleet.md), never the revoked one."""
    if revocations is None:
        return frozenset()
    named = {d for d, _ in revocations.revoked}
    return frozenset(d for d in devices if d in named)


def _revoked_note(revocations: RevocationList | None, revoked: frozenset[str]) -> str:
    """What an open refused for too few devices adds when revoked devices were left out of it."""
    if not revoked or revocations is None:
        return ""
    return (
        f" (left out: {', '.join(sorted(revoked))}, revoked by revocation list number {revocations.sequence}; "
        "invite other devices in their place, or enroll replacements under new device ids "
        "(`deltaplane fleet enroll`) and invite those)"
    )


def install_secagg_routes(
    app: FastAPI,
    state: Any,
    config: Any,
    *,
    device: Callable[..., Any],
    admin: Callable[..., Any],
    rounds_store: RoundStore | None = None,
    service_store: ServiceStore | None = None,
) -> dict[tuple[str, int], SecAggRound]:
    """Add the SecAgg endpoints to the service ``app``; returns the live table of rounds (for status/tests).

    ``device`` and ``admin`` are the service's auth dependencies; ``state`` its :class:`ServiceState`
    (registry, lock, round counter, the engine's server step per model, counters) and ``config`` its
    :class:`ServiceConfig`. Closing a SecAgg round hands the unmasked mean to the model's engine server step
    (:meth:`~deltaplane.engine.ServerStep.receive_secure_sum`), so its chain, downlink and publisher apply;
    with ``rounds_store`` the step resumes from, and stores after each round, its durable state.
    ``service_store`` (made over the registry when not given) keeps the highest revocation list held.
    """
    store = rounds_store if rounds_store is not None else RoundStore(state.registry)
    service_store = service_store if service_store is not None else ServiceStore(state.registry)
    # open rounds only (the service state's: devices discover theirs through /v1/models/{m}/rounds/open)
    rounds: dict[tuple[str, int], SecAggRound] = state.secagg_rounds
    finished: OrderedDict[tuple[str, int], FinishedRound] = OrderedDict()  # the last FINISHED_KEPT closed
    reg = state.registry
    router = APIRouter()
    Device = Annotated[Any, Depends(device)]
    # rounds open when the service last stopped died with it: recorded lost, so nobody waits on them
    with reg.transaction():  # a round recorded lost is recorded on the Fleet page too, or neither
        lost = [
            state.end_summary(
                model,
                number,
                "secagg",
                outcome="lost",
                reason=LOST_REASON,
                invited=invited,
                contributors=None,
            )
            for model, number, invited in store.lose_open_secagg(LOST_REASON)
        ]
    for ended, saved in lost:
        state.remember_ended(ended, saved)
        log.warning(
            "SecAgg round %d of %r was open when the service stopped; its protocol state was in memory only, "
            "so it is lost (devices asking for it get 409; open a new round)",
            ended["round"],
            ended["model"],
        )

    def recorded(model: str, number: int) -> NoReturn:
        """Refuse a round this process does not hold, as the store recorded it: 409 saying how it ended
        (RoundLost for a round the service stopped under), 404 if it never existed."""
        rec = store.secagg_record(model, number)
        if rec is None:
            raise NotFound(f"no SecAgg round {number} for {model!r}")
        outcome = rec["finished"]
        if outcome == "lost":
            raise RoundLost(
                f"SecAgg round {number} of {model!r} was lost: the service stopped while it was open, and a "
                "SecAgg round's keys, shares and masked inputs live in its memory only; it takes no more "
                "messages and will never publish. Wait for the next round"
            )
        if outcome is None:  # recorded open, yet not in this process: another service over this registry
            raise Conflict(
                f"SecAgg round {number} of {model!r} is open in another service process over this registry, "
                "not this one; run one service per registry"
            )
        if outcome == "aborted":
            raise RoundAborted(
                f"SecAgg round {number} of {model!r} is aborted; it takes no more messages and will never publish"
            )
        version = rec["published"]["version"]
        raise HTTPException(
            409,
            f"SecAgg round {number} of {model!r} is closed (published as version {version}); it takes no more messages",
        )

    def get_round(model: str, number: int) -> SecAggRound:
        """The open round; 409 for a finished one (lost ones too), 404 for one that never existed."""
        r = rounds.get((model, number))
        if r is None:
            done = finished.get((model, number))
            if done is not None:
                done.refuse()
            recorded(model, number)
        return r

    def finish(
        r: SecAggRound, outcome: str, reason: str | None = None, *, abandoned: bool = False
    ) -> dict[str, Any]:
        """Under ``state.lock``: drop the round's protocol state (every masked input, model-sized, goes with it),
        keeping its final status (with ``reason``, an aborted round's, and whether no coordinator ran it:
        ``abandoned``); returns that status."""
        done = FinishedRound.of(r, outcome)
        # the reason as the store records it
        done = replace(done, summary=done.summary | {"reason": reason, "abandoned": abandoned})
        rounds.pop((r.model, r.number), None)
        finished[(r.model, r.number)] = done
        while len(finished) > FINISHED_KEPT:
            finished.popitem(last=False)
        return done.status()

    def client_of(r: SecAggRound, ident: Any) -> int:
        """The invited device's client id in the round; a device of a cohort that withdrew consent takes no
        part (to the protocol it is a dropout), as plain rounds refuse its uploads."""
        u = r.clients.get(ident.device_id)
        if u is None:
            raise HTTPException(403, f"device {ident.device_id} is not invited to SecAgg round {r.number}")
        if withdrawn_among([ident.cohort], reg.withdrawn_cohorts(verify=True)):
            raise HTTPException(
                403, f"cohort {ident.cohort!r} withdrew consent; it takes no part in SecAgg round {r.number}"
            )
        r.cohorts[ident.device_id] = ident.cohort
        return u

    def require_binding(r: SecAggRound, request: Request) -> None:
        """Refuse (409) an authenticated round to a device that does not say it binds its signatures to this
        service's identity (:mod:`deltaplane.serve.service_identity`): a device of an older release signs over
        ``model/round`` alone, which verifies in another service's round of the same model and number, so it
        must be upgraded, never let run the round under that weaker binding."""
        stated = request.headers.get(BINDING_HEADER)
        if not r.endpoint.server.authenticated or stated == str(SERVICE_BINDING):
            return
        if stated is None:
            said = "does not state one (it is older: its signatures would name the model and round alone)"
            fix = "upgrade the device"
        elif stated.isdecimal() and len(stated) < 8 and int(stated) > SERVICE_BINDING:
            said, fix = (
                f"uses service binding {stated}",
                f"upgrade the service to a release that uses {stated}",
            )
        else:
            said, fix = f"states {stated[:16]!r}", "upgrade the device"
        raise HTTPException(
            409,
            f"authenticated SecAgg round {r.number} binds every signature to this service's identity (service "
            f"binding {SERVICE_BINDING}, header {BINDING_HEADER}) and this device {said}; {fix}",
        )

    def round_governance(r: SecAggRound, survivors: list[int]) -> tuple[Governance, dict[str, Any]]:
        """The governance and lineage of the version a round publishes: the base's cohorts and those of the
        devices whose input is in the sum, as a plain round records them, so a later withdrawal of any of
        them reaches the version. A cohort that withdrew after its device uploaded cannot be taken out of
        the sum: the round is refused (409), never published."""
        device_of = {u: d for d, u in r.clients.items()}
        summed = {r.cohorts[device_of[u]] for u in survivors if device_of[u] in r.cohorts}
        refuse_withdrawn_round(
            reg,
            r.model,
            r.base_version,
            summed,
            what=f"SecAgg round {r.number}'s sum",
            abort=f"/admin/models/{r.model}/secagg/{r.number}/abort",
        )
        gov = reg.get(r.model, r.base_version).governance
        cohorts = tuple(sorted(set(gov.cohorts) | summed))
        governance = Governance(
            gov.data_sources, cohorts, tuple(sorted(set(gov.excluded_cohorts) - set(cohorts))), gov.notes
        )
        return governance, {"secagg_round": r.number, "round_cohorts": sorted(summed)}

    def protocol(fn: Callable[[], Any], r: SecAggRound) -> Any:
        """Run a protocol step under the round's lock; its refusals become 409 (order) and 422 (cannot go on)."""
        with r.lock:
            try:
                return fn()
            except SecAggOrderError as exc:
                state.count("secagg.refused_order")
                raise HTTPException(409, str(exc)) from None
            except SecAggError as exc:
                state.count("secagg.refused")
                raise HTTPException(422, str(exc)) from None

    def post_stage(path: str, cls: type[Message], summary: str) -> None:
        @router.post(
            f"/v1/models/{{model}}/secagg/{{number}}/{path}",
            tags=["secagg"],
            status_code=202,
            response_model=Accepted,
            summary=summary,
            openapi_extra={"requestBody": {"required": True, **_MESSAGE}},
        )
        async def receive(model: ModelName, number: RoundId, request: Request, ident: Device) -> Accepted:
            r = get_round(model, number)
            # in a worker thread: the consent check reads (and verifies) the signed state log in the database
            u = await run_in_threadpool(client_of, r, ident)
            if cls is AdvertiseKeys:
                require_binding(r, request)
            signed = cls is AdvertiseKeys and r.endpoint.server.authenticated
            body = await read_capped(request, (SignedAdvertiseKeys if signed else cls).max_bytes(r.config))

            def apply() -> None:
                msg = decode_message(body, r.config)  # strict: DecodeError -> 400, another round -> 409
                if not isinstance(msg, cls):
                    raise DecodeError(f"this endpoint takes a {cls.__name__}, got a {type(msg).__name__}")
                if isinstance(msg, SignedAdvertiseKeys):  # the devices verify it; this only catches a mix-up
                    named = DeviceCertificate.from_bytes(msg.certificate).device_id
                    if named != ident.device_id:
                        raise SecAggAuthError(
                            f"device {ident.device_id} sent a key advertisement certified for device {named!r}"
                        )
                r.endpoint.receive(body, sender=u)

            # in a worker thread: decoding and folding a masked input is model-sized work, and the round's lock
            # may be held for seconds by an unmasking close; on the event loop either would stall every request
            await run_in_threadpool(protocol, apply, r)
            state.count(f"secagg.{path}")
            state.count("secagg.bytes", len(body))
            return Accepted(accepted=True, kind=cls.__name__, stage=r.endpoint.stage)

        receive.__name__ = f"secagg_{path}"

    post_stage("keys", AdvertiseKeys, "Stage 0: advertise public keys")
    post_stage("shares", ShareKeys, "Stage 1: encrypted shares for the neighbours")
    post_stage("masked", MaskedInput, "Stage 2: the masked update")
    post_stage(
        "consistency", SurvivorSignature, "Consistency check: the signed survivor set (authenticated rounds)"
    )
    post_stage("unmask", UnmaskResponse, "Stage 3: shares for unmasking")

    def octets(data: bytes) -> Response:
        return Response(data, media_type="application/octet-stream")

    @router.get(
        "/v1/models/{model}/rounds/open",
        tags=["device"],
        response_model=OpenRounds,
        summary="Every open round this device may take part in: plain, or SecAgg it is invited to",
    )
    def open_rounds(model: ModelName, ident: Device) -> OpenRounds:
        """What a polling device does next: an empty list when nothing is open (not an error: poll again). A
        device of a cohort that withdrew consent sees none: every round would refuse its update."""
        found: list[OpenRound] = []
        if withdrawn_among([ident.cohort], reg.withdrawn_cohorts(verify=True)):
            return OpenRounds(model=model, rounds=found)
        plain = state.rounds.get(model)
        if plain is not None and not plain.closing:
            nonce = plain.record.nonce if plain.record else ""
            found.append(
                OpenRound(kind="plain", round=plain.number, base_version=plain.base_version, nonce=nonce)
            )
        for (m, number), r in sorted(rounds.items()):
            if m != model or ident.device_id not in r.clients:
                continue
            if r.published is None and r.endpoint.stage != Stage.DONE:
                found.append(
                    OpenRound(
                        kind="secagg", round=number, base_version=r.base_version, stage=r.endpoint.stage
                    )
                )
        return OpenRounds(model=model, rounds=found)

    @router.get("/v1/models/{model}/secagg/{number}", tags=["secagg"], response_model=Invitation)
    def invitation(model: ModelName, number: RoundId, request: Request, ident: Device) -> Invitation:
        r = get_round(model, number)
        client_id = client_of(r, ident)
        require_binding(r, request)  # before the device trains
        return Invitation(
            model=model,
            round=number,
            base_version=r.base_version,
            client_id=client_id,
            config=r.config.to_dict(),
            encoding={
                "bits": r.encoding.bits,
                "clip_range": r.encoding.clip_range,
                "weight_scale": r.encoding.weight_scale,
            },
            stage=r.endpoint.stage,
            authenticated=r.endpoint.server.authenticated,
            secagg_version=MESSAGE_VERSION,
            service_binding=SERVICE_BINDING,
        )

    @router.get("/v1/models/{model}/secagg/{number}/roster", tags=["secagg"], response_class=Response)
    def roster(model: ModelName, number: RoundId, ident: Device) -> Response:
        r = get_round(model, number)
        client_of(r, ident)
        if r.endpoint.stage == Stage.ADVERTISE:
            raise HTTPException(409, "key advertisement is still open; retry after it closes")
        return octets(protocol(r.endpoint.server.roster, r).to_bytes())

    @router.get("/v1/models/{model}/secagg/{number}/inbox", tags=["secagg"], response_class=Response)
    def inbox(model: ModelName, number: RoundId, ident: Device) -> Response:
        r = get_round(model, number)
        u = client_of(r, ident)
        return octets(protocol(lambda: r.endpoint.inbox(u), r))

    @router.get("/v1/models/{model}/secagg/{number}/unmask", tags=["secagg"], response_class=Response)
    def unmask_request(model: ModelName, number: RoundId, ident: Device) -> Response:
        r = get_round(model, number)
        client_of(r, ident)
        if r.endpoint.stage in (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED):
            raise HTTPException(409, "masked inputs are still being collected; retry after they close")
        return octets(protocol(r.endpoint.unmask_request, r))

    @router.get("/v1/models/{model}/secagg/{number}/consistency", tags=["secagg"], response_class=Response)
    def survivor_signatures(model: ModelName, number: RoundId, ident: Device) -> Response:
        """The consistency check's signatures (authenticated rounds), once the operator closed the check."""
        r = get_round(model, number)
        client_of(r, ident)
        if not r.endpoint.server.authenticated:
            raise HTTPException(409, "this round is not authenticated: it has no consistency check")
        if r.endpoint.stage not in (Stage.UNMASK, Stage.DONE):
            raise HTTPException(409, "the consistency check is not closed yet; retry after it closes")
        return octets(protocol(r.endpoint.survivor_signatures, r))

    # -- admin ---------------------------------------------------------------------------------------------
    AdminDep = [Depends(admin)]

    @router.post("/admin/models/{model}/secagg", tags=["admin", "secagg"], dependencies=AdminDep)
    def open_round(model: ModelName, body: OpenSecAggRequest) -> dict[str, Any]:
        if len(set(body.devices)) != len(body.devices):
            raise ConfigError("the invited device list repeats a device")
        run = config.federation
        if run is not None and not run.secagg:
            raise ConfigError(
                "this service's federation chain looks at individual updates, which SecAgg hides; "
                "set secagg: true in the --federation YAML to run SecAgg rounds"
            )
        # without a federation, a run config's default: 20-bit rings carry any count --max-examples admits by default
        bits = body.bits if body.bits is not None else (run if run is not None else RunConfig()).secagg_bits
        clip_range = (
            body.clip_range if body.clip_range is not None else (run.secagg_range if run is not None else 1.0)
        )
        if body.base_version is not None:
            base = body.base_version
        else:
            tags = reg.tags(model, verify=True)  # checked against the signed state log
            if "training" not in tags and "production" not in tags:
                raise NotFound(f"{model!r} has no training or production version to train from")
            base = tags.get("training", tags.get("production"))
        art = reg.get(model, base)
        if art.kind != "model":
            raise ConfigError(f"{art.ref} is a delta; a round needs a model version as its base")
        problems = reg.governance_problems(art, verify=True)
        if problems:  # as a plain round: never train on a version built from a withdrawn cohort's data
            raise HTTPException(409, f"{problems[0]}; rebuild instead: POST /admin/models/{model}/rebuild")
        with state.lock:
            step = resume_step(config, state, store, model, base)
        # a personalized federation's devices mask only the layers they share (FedPer's head stays home)
        like = masked_zeros(state.base_state(model, base), step.local_keys)
        if body.weight_scale is None:
            raise ConfigError(
                "a SecAgg round weights each update by its device's example count, as plain rounds and every "
                "other driver do, but the counts travel masked: give weight_scale, the typical example count of "
                "the invited devices (e.g. their mean; a device scales its values by count / weight_scale "
                "before clipping them to ±clip_range), or weight_scale: 0 for an unweighted mean"
            )
        if body.weight_scale and isinstance(step.aggregator.find(DistributedDP), DistributedDP):
            raise ConfigError(
                f"this federation runs distributed DP (dp_noise with secagg): every device weighs 1, as in "
                f"DP-FedAvg, so that one device moves the sum by at most clip; open the round with "
                f"weight_scale: 0 (an unweighted mean), not {body.weight_scale:g}"
            )
        # authenticated: the operator's, or the federation's, as `deltaplane run` runs it
        if "authenticated" in body.model_fields_set or run is None:
            authenticated = body.authenticated
        else:
            authenticated = run.secagg_authenticated
        revocations = _revocations(config, service_store) if authenticated else None
        # a revoked device would sit out (it checks its own certificate) and its advertisement is refused: left
        # out here, so that no stage waits for it, and the round's size (threshold, m_min) counts only the rest
        revoked = _revoked_invitees(revocations, body.devices)
        devices = [d for d in body.devices if d not in revoked]
        n = len(devices)
        ddp = step.aggregator.find(DistributedDP)
        m_min = ddp.min_contributors if isinstance(ddp, DistributedDP) else 0
        if n < m_min:
            raise ConfigError(
                f"this federation runs distributed DP calibrated to {m_min} devices (secagg_min_contributors): "
                f"a round of {n} would give the server a sum with too little noise; invite at least {m_min}"
                + _revoked_note(revocations, revoked)
            )
        if isinstance(
            ddp, DistributedDP
        ):  # its range clip acts on each device's noised values: must not bind
            ddp.check_ring_range(clip_range)
        # SecAgg+'s degree: the operator's, or the federation's for a round of n, as `deltaplane run` uses it
        if "neighbours" in body.model_fields_set or run is None:
            degree = body.neighbours
        else:
            degree = round_neighbours(run.secagg_neighbours, n)
        group = group_size(degree, n)
        try:
            encoding = RingEncoding(bits=bits, clip_range=clip_range, weight_scale=body.weight_scale)
            vector = encoding.vector_size(like)
        except SecAggError as exc:
            raise ConfigError(str(exc)) from None
        # devices check their example count fits the ring before they train: refuse a ring some would refuse
        check_ring_carries(encoding, config.max_examples)

        def make(number: int) -> SecAggConfig:
            try:
                return checked(number)
            except ConfigError as exc:  # too few left once the revoked are out: say which, and what to do
                if not revoked:
                    raise
                raise ConfigError(str(exc) + _revoked_note(revocations, revoked)) from None

        def checked(number: int) -> SecAggConfig:
            cfg = SecAggConfig(
                num_clients=n,
                threshold=body.threshold if body.threshold is not None else default_threshold(group),
                bits=bits,
                vector_size=vector,
                neighbours=degree,
                round_id=number,
                graph_seed=int.from_bytes(hashlib.sha256(f"{model}/{number}".encode()).digest()[:4], "big"),
            )  # raises ConfigError (422) for an impossible threshold, graph or ring
            try:  # devices would refuse the round at their invitation: say so now
                check_device_policy(cfg)
            except SecAggError as exc:
                raise ConfigError(str(exc)) from None
            _check_message_caps(cfg, config.max_upload_bytes)
            if isinstance(ddp, DistributedDP):  # the guard at close must admit the honest noisy mean
                check_guard_admits_distributed_dp(
                    ddp,
                    state.base_state(model, base),
                    like.numel(),
                    config.max_update_norm_ratio,
                    fewest=max(m_min, cfg.threshold),  # the server unmasks no fewer masked inputs
                    ring_step=2 * clip_range / ((1 << bits) - 1),
                    group=group,
                )
            return cfg

        with state.lock:
            # numbered from the database, in the transaction that records it open: never reused after a restart
            number, cfg = store.open_secagg(model, base, n, make)
            rounds[(model, number)] = SecAggRound(
                model,
                number,
                base,
                {d: i for i, d in enumerate(devices)},
                encoding,
                # fewer masked inputs than m_min: never unmasked
                ServerEndpoint(cfg, min_inputs=m_min, authenticated=authenticated, revocations=revocations),
                like,
                revoked=tuple(d for d in body.devices if d in revoked),
                coordinator=body.coordinator.model_dump() if body.coordinator is not None else None,
            )
        return rounds[(model, number)].status() | {"config": cfg.to_dict()}

    @router.get("/admin/models/{model}/secagg/{number}", tags=["admin", "secagg"], dependencies=AdminDep)
    def status(model: ModelName, number: RoundId) -> dict[str, Any]:
        """The round's stage and counts; for a finished round its final status (``finished``: published,
        aborted or lost), from the store once this process no longer holds it (after a restart)."""
        done = finished.get((model, number))
        if done is not None:
            return done.status()
        r = rounds.get((model, number))
        if r is not None:
            return r.status()
        rec = store.secagg_record(model, number)
        if rec is None or rec["finished"] is None:
            recorded(model, number)  # 404, or open in another process (409)
        return rec

    @router.post(
        "/admin/models/{model}/secagg/{number}/advance", tags=["admin", "secagg"], dependencies=AdminDep
    )
    def advance(model: ModelName, number: RoundId) -> dict[str, Any]:
        r = get_round(model, number)
        if r.endpoint.stage == Stage.UNMASK:
            raise HTTPException(409, "the round is at unmasking; close it to unmask and publish")
        with remembering_refusal(r):  # e.g. too few advertised keys for the threshold
            protocol(r.endpoint.advance, r)
        return r.status()

    @router.post(
        "/admin/models/{model}/secagg/{number}/abort", tags=["admin", "secagg"], dependencies=AdminDep
    )
    def abort(
        model: ModelName,
        number: RoundId,
        reason: Annotated[str, Query(max_length=MAX_ABORT_REASON)] = "",
        abandoned: Annotated[
            bool,
            Query(
                description="no coordinator runs the round (its coordinator was stopped or killed): devices "
                "asking for it get RoundAbandoned and do not count it towards their --rounds"
            ),
        ] = False,
    ) -> dict[str, Any]:
        """Give the round up unpublished (a close refused for good, devices gone): its state is dropped. The
        round, its stage, how many devices were invited and took part (advertised keys) and why (``reason``;
        without one, its last refused advance or close) are recorded with the abort, in one transaction.
        ``abandoned``: none of a coordinator's rounds (:class:`~deltaplane.errors.RoundAbandoned`)."""
        r = get_round(model, number)
        srv = r.endpoint.server
        with state.lock:  # not while a close publishes it
            if rounds.get((model, number)) is not r:
                raise HTTPException(409, f"SecAgg round {number} of {model!r} finished meanwhile")
            why = abort_reason(reason, r.refused)
            with reg.transaction():
                store.finish_secagg(model, number, "aborted", reason=why)
                ended, saved = state.end_summary(
                    model,
                    number,
                    "secagg",
                    outcome="aborted",
                    reason=why,
                    invited=len(r.clients),
                    contributors=len(srv.keys),
                    stage=srv.stage,
                    authenticated=srv.authenticated,
                    revoked=r.revoked,
                )
            state.count("secagg.rounds_aborted")
            done = finish(r, "aborted", ended["reason"], abandoned=abandoned)
        state.remember_ended(ended, saved)
        return done

    def publish(r: SecAggRound, model: str, number: int) -> dict[str, Any]:
        """Unmask round ``r``'s sum and publish its version (the close's work; its refusals are 409/422)."""
        if r.endpoint.stage not in (Stage.UNMASK, Stage.DONE):  # DONE: a close that failed after unmasking
            raise HTTPException(
                409, f"SecAgg round {number} is at stage '{r.endpoint.stage}'; advance to unmasking"
            )
        total = protocol(r.endpoint.result, r)  # computed once, kept: a failed close can be retried
        survivors = list(r.endpoint.server.survivors)
        try:
            mean, weight = r.encoding.decode_sum(total, count=len(survivors), like=r.like)
        except SecAggError as exc:  # an out-of-range sum: every retry would refuse it the same way
            state.count("secagg.refused")
            raise HTTPException(
                409,
                f"{exc}. Leave this round unpublished (abort it: POST /admin/models/{model}/secagg/{number}/abort) "
                "and open a new SecAgg round without the faulty device",
            ) from None
        # the same guard as a plain upload: in-range inputs can still poison the mean (InvalidUpdate, 422); the
        # default one admits what the honest noisy mean of these survivors reaches under distributed DP
        with state.lock:
            ddp = resume_step(config, state, store, model, r.base_version).aggregator.find(DistributedDP)
        honest = (
            distributed_dp_honest_bound(
                ddp,
                r.like.numel(),
                contributors=len(survivors),
                ring_step=2 * r.encoding.clip_range / ((1 << r.encoding.bits) - 1),
            )
            if isinstance(ddp, DistributedDP)
            else 0.0
        )
        check_update_norm(
            mean, state.base_state(model, r.base_version), config.max_update_norm_ratio, honest=honest
        )
        uplink = sum(r.endpoint.server.bytes_received.values())
        with state.lock:
            if rounds.get((model, number)) is not r:  # a concurrent close published it, or an abort
                raise HTTPException(409, f"SecAgg round {number} of {model!r} finished meanwhile")
            if model in state.rounds:
                raise HTTPException(
                    409, f"plain round {state.rounds[model].number} of {model!r} is open; close it first"
                )
            step = resume_step(config, state, store, model, r.base_version)
            publisher = publisher_of(step)
            # The new version, its delta, the training tag and the step's stored state commit together or
            # not at all, and the step is put back if anything fails: the round stays closable.
            with undo_on_failure(step), reg.transaction():
                # read in the transaction: a withdrawal cannot land between its check and the publication
                governance, lineage = round_governance(r, survivors)
                publisher.governance, publisher.lineage = governance, lineage
                # the engine's server step gets the unmasked mean and nothing else: its chain, downlink, publisher
                step.open(number, version=r.base_version, state=state.base_state(model, r.base_version))
                step.receive_secure_sum(mean, contributors=len(survivors), uplink_bytes=uplink)
                outcome = step.close()  # PrivacyBudgetExceeded (409) leaves the model where it was
                version = reg.get(model, publisher.published[-1])
                reg.set_tag(
                    model, "training", version.number, action="round", reason=f"SecAgg round {number}"
                )
                store.save_step(model, number, version.number, step_bytes(step))
                store.finish_secagg(
                    model,
                    number,
                    "published",
                    version.number,
                    outcome.measurements,
                    adjacency=step.dp_adjacency,
                )
                summary, saved = state.close_summary(
                    model,
                    number,
                    "secagg",
                    version.number,
                    len(survivors),
                    outcome.measurements,
                    authenticated=r.endpoint.server.authenticated,
                    revoked=r.revoked,
                    dp_adjacency=step.dp_adjacency,
                )
            r.published = {  # under the lock: a concurrent close sees the round closed
                "version": version.number,
                "delta_bytes": len(outcome.downlink_payload),
                "full_bytes": version.size,
                "sum_sha256": hashlib.sha256(total.astype("<u8").tobytes()).hexdigest(),
                "total_weight": weight,
                "uplink_bytes": uplink,
                "measurements": {k: float(v) for k, v in outcome.measurements.items()},
                "dp_adjacency": step.dp_adjacency,  # what measurements.epsilon is stated under
            }
            closed = finish(r, "published")
        state.count("secagg.rounds_closed")
        state.remember_closed(summary, saved)
        return closed

    @router.post(
        "/admin/models/{model}/secagg/{number}/close", tags=["admin", "secagg"], dependencies=AdminDep
    )
    def close(model: ModelName, number: RoundId) -> dict[str, Any]:
        r = get_round(model, number)
        with remembering_refusal(r):  # a sum out of range, a withdrawn cohort, a spent ε budget
            return publish(r, model, number)

    app.include_router(router)
    return rounds
