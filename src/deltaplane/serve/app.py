"""The device-facing HTTP service (FastAPI): fetch models/deltas, upload updates, report metrics; admin API.

Device endpoints (``Authorization: Bearer <device token>``, rate limited per device):

* ``GET  /v1/models/{model}/download?have=N&channel=production`` — the current version for the device's
  cohort as a signed full model or delta chain (``X-Deltaplane-*`` headers carry kind, versions, signature,
  and the round that made the version, signed: ``X-Deltaplane-Round``); ``&version=N`` pins an earlier version
  of the served one's lineage (a personalized device catching up on the rounds it missed), as a full model.
* ``GET  /v1/models/{model}/round`` — the open training round and its base version.
* ``POST /v1/models/{model}/rounds/{round}/update?num_examples=N`` — a compressed update (wire format); checked
  for size (413), round and duplicate (409), base version (409 stale), format (400), shape and NaN (422).
* ``POST /v1/models/{model}/report`` — metrics and drift summaries (histograms, not raw data).

The round endpoints (``/round``, ``/rounds/{round}/update``, ``/admin/models/{model}/rounds...``, rebuild) live
in :mod:`deltaplane.serve.rounds`, a thin driver over the engine's server step (any aggregator chain); the
drift routes (reference, alerts, windows) in :mod:`deltaplane.serve.drift_routes`; the trusted coordinator's
evaluation route in :mod:`deltaplane.serve.evaluation_routes`.

Admin endpoints (``Authorization: Bearer <admin token>``): issue and revoke device tokens, open/close/abort
rounds (a closed round becomes a new signed version, published as a delta, in one transaction), withdraw a
cohort and rebuild without it, promote through the gate, roll back, set the drift reference, read alerts and
counters. Authentication and body limits are enforced before any body is read (:mod:`deltaplane.serve.guard`);
rounds and uploads are durable (:mod:`deltaplane.serve.rounds_store`). See ``docs/security.md``. ``/docs`` and
``/openapi.json`` describe everything. Every bad request
is a 4xx with a message saying what to fix; errors are never allowed to become 5xx.
"""

import asyncio
import contextlib
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, overload

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltaplane.engine import RunConfig, ServerStep
from deltaplane.engine.scoring import dp_adjacency
from deltaplane.errors import (
    ConfigError,
    Conflict,
    DecodeError,
    DeltaplaneError,
    IntegrityError,
    InvalidUpdate,
    NotFound,
    PrivacyBudgetExceeded,
    PromotionRefused,
    ShapeMismatch,
    SignatureError,
    VersionMismatch,
)
from deltaplane.monitor import DriftMonitor, DriftReport, Summary
from deltaplane.registry import Registry, Tolerance, plan_downlink, promote, rollback, withdrawn_among
from deltaplane.registry.downlink import (
    Downlink,
    made_by_round,
    made_by_statement,
    rollback_offer_statement,
    serve_statement,
)
from deltaplane.registry.promotion import Evaluator
from deltaplane.registry.store import PRODUCTION
from deltaplane.serve.auth import DeviceIdentity, RateLimiter, TokenAuthority, device_secret
from deltaplane.serve.bodies import NAME, ModelName, StrictBody
from deltaplane.serve.body_errors import FASTAPI_UNPARSED_BODY, body_problem, describe
from deltaplane.serve.bounded import ByteLRU
from deltaplane.serve.device_side import check_real_devices, device_side_notice, device_side_options
from deltaplane.serve.docs import mount_offline_docs
from deltaplane.serve.drift_routes import SummaryModel, drift_router
from deltaplane.serve.evaluation_routes import evaluation_router
from deltaplane.serve.fleet_history import (
    MAX_CLOSED_ROUNDS,
    MAX_REPORTS,
    FleetHistory,
    bounded_reason,
    kept_counter,
)
from deltaplane.serve.fleet_watch import MAX_DEVICES_SEEN, MAX_DRIFT_HISTORY, AlertLog, FleetWatch
from deltaplane.serve.guard import ADMIN_TOKEN_REFUSED, DEVICE_SCOPE_KEY, RequestGuard, retry_after_s
from deltaplane.serve.revocation_routes import (
    check_revocations_at_start,
    install_revocation_routes,
    revocations_status,
)
from deltaplane.serve.rounds import MAX_EXAMPLES, NormRatio, RoundState, restore_rounds, round_router
from deltaplane.serve.rounds_store import RoundStore
from deltaplane.serve.secagg_routes import install_secagg_routes
from deltaplane.serve.service_store import ServiceStore
from deltaplane.ui import SessionLimits, is_ui_path, mount_ui, validation_page
from deltaplane.ui.session import SESSION_IDLE_SECONDS, SESSION_MAX_SECONDS

__all__ = ["ServiceConfig", "ServiceState", "create_app"]

log = logging.getLogger(__name__)
CHANNELS = ("production", "staging", "training")
#: the longest period of the fleet's periodic flush (``ServiceConfig.flush_every_s``, ``serve --flush-every``):
#: an hour of contacts and counts is the most a crash may lose
MAX_FLUSH_EVERY_S = 3600.0
MetricName = Annotated[str, StringConstraints(pattern=NAME, max_length=64)]


#: uploads at ``max_upload_bytes`` the default ``max_body_bytes_in_flight`` holds at once: 128 MiB at the default
#: 8 MiB cap, where 1000 connections could buffer 8 GB; honest uploads declare their (compressed) size, so
#: many more than 16 fit
BODY_BUDGET_UPLOADS = 16
#: one device's default share of the body budget is ``1 / DEVICE_BODY_SHARE`` of it (at least the largest body
#: cap): 4 tokens each holding 4 chunked uploads filled the whole budget; at an eighth it takes 8 tokens
DEVICE_BODY_SHARE = 8
#: over-rate refusals waiting their turn (each holding a connection) take at most ``1 / WAITING_REFUSALS_SHARE`` of
#: ``max_connections``: unbounded, one token's refusals held them all and every other device got 503
WAITING_REFUSALS_SHARE = 4


@dataclass(frozen=True)
class ServiceConfig:
    """Service hyperparameters (stored verbatim; state lives in :class:`ServiceState`).

    Args:
        home: registry folder (must hold a registry and a signing key).
        admin_token: bearer token for ``/admin`` endpoints.
        device_secret: HMAC key for device tokens; when empty, ``<home>/keys/device-secret`` (created 0600 on
            first start), so tokens survive restarts.
        token_ttl_s: default lifetime of a device token; ``max_token_ttl_s`` caps what an admin may ask for.
        max_upload_bytes: uploads (and SecAgg messages) above this are refused with 413 before they are
            decoded; a SecAgg round whose messages could exceed it is not opened.
        max_json_bytes: every other request body above this is refused with 413 while it streams.
        body_timeout_s: a request body must arrive in full within this many seconds of its head (408).
        auth_failure_rate, auth_failure_burst: failed authentications allowed per client address (per second,
            and in a burst; device and admin tokens apart) before that address gets 429 for every token that
            fails (a valid device token still passes; the admin token is not even checked).
        rate: per-device sustained requests per second; ``burst``: short bursts allowed above it. Refusals at
            the door (429/503 before a body is read, 408 for a slow body) spend it too, and a device past it
            is refused at that pace, so one token hammering the door gets ``rate`` refusals a second.
        downlink_codec: codec spec for round-to-round deltas the service publishes; ``downlink_error_feedback``
            keeps what it drops on the server for the next round; ``downlink_seed`` seeds its generator.
        server_lr: FedAvg's server step (plain server SGD) when ``federation`` is not set.
        federation: the server side of a federation (``deltaplane.engine.RunConfig``): its aggregator chain
            (server optimizer, clipping, DP-FedAvg with accountant and budget, robust rule, FLTrust with the
            task's root data), its downlink codec and seed. When set, ``server_lr`` and the ``downlink_*``
            fields must keep their defaults (they would be ignored otherwise).
        server_lr: scale of the averaged update applied when a round closes.
        downlink_cache_bytes: byte budget of planned downlinks kept in memory (least recently used evicted).
        max_update_norm_ratio: an upload (or a SecAgg round's unmasked mean) whose L2 norm exceeds this many
            times the base model's norm (at least 1.0) is refused with 422 (None: no bound); NaN/Inf updates are
            always refused. "auto" (the default): 10x, or, when the federation's devices add DP noise (local DP,
            or distributed DP under SecAgg), the norm an honest noised update reaches if that is larger (its
            clip plus the noise's norm σ·(√d + 6): ``deltaplane.serve.rounds.guard_bound``), since that noise
            alone exceeds 10x a small model's norm. An explicit ratio is applied as given, and a round whose
            honest noise it would refuse is refused at open, naming the ratio that would admit it.
        max_connections: connections (and requests in flight) the server holds at once, the new request's own
            included; a request beyond it gets 503 at once (uvicorn's ``limit_concurrency``), so a connection
            flood cannot exhaust file descriptors or memory. Over-rate refusals waiting their turn (the guard's
            pace) hold at most a quarter of them; further ones are answered at once.
        max_connections_per_address: connections one client address may hold at once (its next one is answered
            503 and closed before it counts against ``max_connections``), so one address cannot hold them all;
            loopback peers (a reverse proxy on the same host) are exempt. Raise it for a fleet behind one NAT
            address or a proxy on another host.
        max_device_requests: requests one device may have in flight at once; one more gets 429 at once, its
            body unread, so one device token cannot hold every connection with a body buffering (the per-device
            ``rate`` is spent once a body has arrived, or by a refusal before it is read).
        max_body_bytes_in_flight: bytes all device request bodies may hold at once, read or being
            handled (a request reserves its Content-Length, or its route's cap without one, before its body is
            read); one that does not fit gets 503 with ``Retry-After``, its body unread, so *n* device tokens
            cannot hold *n* × ``max_device_requests`` uploads. None (the default):
            :data:`BODY_BUDGET_UPLOADS` × ``max_upload_bytes`` (128 MiB at the default cap). At least
            ``max_upload_bytes`` and ``max_json_bytes``, or the largest body could never pass.
        max_device_body_bytes: bytes one device's bodies may reserve of ``max_body_bytes_in_flight`` at once
            (429 with ``Retry-After`` beyond it, body unread), so a few tokens cannot fill the budget. None (the
            default): 1/:data:`DEVICE_BODY_SHARE` of the budget (16 MiB, two full uploads, at the defaults), at
            least the largest body cap.
        min_body_rate: bytes/s a device's body must average from its head on once ``body_rate_grace_s`` have
            passed, and it must keep the pace that brings its reserved bytes within ``body_timeout_s``; one that
            falls behind gets 408 and gives its reservation back, and its device may reserve no other body for
            six graces (429), so a body trickled a byte a second holds its share for the grace, not for
            ``body_timeout_s``. 0 turns both paces (and the penalty) off.
        body_rate_grace_s: seconds a body may take before ``min_body_rate`` applies.
        write_timeout_s: seconds a response may sit with its write buffer full (a client reading nothing)
            before its connection is aborted (``--write-timeout``).
        max_examples: the largest ``num_examples`` an upload may claim (422 above it, never clipped). The
            claim is the update's weight in (clipped) FedAvg, so without a bound one device claiming 10¹²
            examples would make the round's model its own update; DP-FedAvg and the robust rules ignore it.
        tolerance: promotion gate limits (metric -> allowed drop).
        simulated_devices: the devices are the engine's simulated ones (``deltaplane run --transport http``),
            which may run simulation-only options such as ``attack``; a service with real devices refuses
            them, and states at start which of the federation's options its devices must apply themselves
            (:mod:`deltaplane.serve.device_side`).
        secagg_revocations: the enrollment authority's revocation list (``deltaplane keys revoke``; "" for none),
            read again at every SecAgg round open, so a newer list applies from the next round without a restart.
            An authenticated round then refuses (422) the key advertisement of a device it revokes and goes on
            without that device. Devices holding the list refuse such a device whatever the service does. A list
            past its next update refuses the open (422). ``POST /admin/secagg/revocations`` replaces this file
            (:mod:`deltaplane.serve.revocation_routes`), and devices fetch it from ``GET /v1/secagg/revocations``.
        secagg_authority: the enrollment authority's public key file (``enrollment.ed25519.pub``; "" for none):
            the service verifies its revocation list under it (at start: a held list of another authority refuses
            the start; at each round open, and every upload; uploads are refused without it). Without it the list
            is used unchecked, which ``serve`` warns of at start.
        flush_every_s: how often the running service saves the fleet's contacts and upload counts that no
            report, upload, close or abort carried (one transaction, only when something changed): what a crash
            can lose, and at most one sync per period. In (0, :data:`MAX_FLUSH_EVERY_S`].
    """

    home: str
    admin_token: str
    device_secret: str = ""
    max_upload_bytes: int = 8 << 20
    max_json_bytes: int = 2 << 20
    body_timeout_s: float = 120.0
    auth_failure_rate: float = 1.0
    auth_failure_burst: int = 20
    token_ttl_s: float = 30 * 86400
    max_token_ttl_s: float = 365 * 86400
    rate: float = 20.0
    burst: int = 40
    downlink_codec: str = "topk(0.05) | quant(bits=8)"
    downlink_error_feedback: bool = True
    downlink_seed: int = 0
    server_lr: float = 1.0
    federation: RunConfig | None = None
    max_update_norm_ratio: NormRatio = "auto"
    max_examples: float = 100_000
    max_connections: int = 1000
    max_connections_per_address: int = 100
    max_device_requests: int = 4
    max_body_bytes_in_flight: int | None = None
    max_device_body_bytes: int | None = None
    min_body_rate: float = 4096.0
    body_rate_grace_s: float = 10.0
    write_timeout_s: float = 60.0
    downlink_cache_bytes: int = 256 << 20
    tolerance: dict[str, float] = field(default_factory=lambda: {"accuracy": 0.01, "ood_accuracy": 0.02})
    #: folder whose run reports (``report.json``) the dashboard at ``/ui`` lists ("" for none)
    runs_dir: str = ""
    simulated_devices: bool = False
    secagg_revocations: str = ""
    secagg_authority: str = ""
    #: how long a dashboard sign-in lasts unused, and at most (``--session-idle-minutes``/``--session-max-hours``)
    session_idle_s: int = SESSION_IDLE_SECONDS
    session_max_s: int = SESSION_MAX_SECONDS
    flush_every_s: float = 5.0

    def __post_init__(self) -> None:
        if len(self.admin_token) < 16:
            raise ConfigError("admin_token must be at least 16 characters")
        SessionLimits(
            idle_s=self.session_idle_s, max_s=self.session_max_s
        )  # refuses a session under a minute
        if self.server_lr <= 0:
            raise ConfigError(f"server_lr must be positive. Found {self.server_lr}")
        if self.federation is not None:
            mine = {
                "server_lr": (self.server_lr, 1.0),
                "downlink_codec": (self.downlink_codec, "topk(0.05) | quant(bits=8)"),
                "downlink_error_feedback": (self.downlink_error_feedback, True),
                "downlink_seed": (self.downlink_seed, 0),
            }
            clash = [k for k, (v, default) in mine.items() if v != default]
            if clash:
                raise ConfigError(
                    f"set {', '.join(clash)} in the federation config, not on the service, when it has one"
                )
            if not self.simulated_devices:
                check_real_devices(self.federation)
        if self.max_upload_bytes < 1024:
            raise ConfigError(f"max_upload_bytes must be at least 1024. Found {self.max_upload_bytes}")
        if isinstance(self.max_update_norm_ratio, str):
            if self.max_update_norm_ratio != "auto":
                raise ConfigError(
                    f"max_update_norm_ratio must be a positive number, 'auto' or None. Found "
                    f"{self.max_update_norm_ratio!r}"
                )
        elif self.max_update_norm_ratio is not None and not self.max_update_norm_ratio > 0:
            raise ConfigError(f"max_update_norm_ratio must be positive. Found {self.max_update_norm_ratio}")
        if self.max_json_bytes < 1024:
            raise ConfigError(f"max_json_bytes must be at least 1024. Found {self.max_json_bytes}")
        if not 1 <= self.max_examples <= MAX_EXAMPLES:
            raise ConfigError(f"max_examples must be in [1, {MAX_EXAMPLES:g}]. Found {self.max_examples}")
        if self.max_connections < 2:  # uvicorn counts the request's own connection: 1 would refuse all
            raise ConfigError(f"max_connections must be at least 2. Found {self.max_connections}")
        if self.max_connections_per_address < 1:
            raise ConfigError(
                f"max_connections_per_address must be at least 1. Found {self.max_connections_per_address}"
            )
        if self.max_device_requests < 1:
            raise ConfigError(f"max_device_requests must be at least 1. Found {self.max_device_requests}")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"body_timeout_s must be positive. Found {self.body_timeout_s}")
        if not self.write_timeout_s > 0:  # NaN fails too
            raise ConfigError(f"write_timeout_s must be positive. Found {self.write_timeout_s}")
        need = max(self.max_upload_bytes, self.max_json_bytes)
        if self.max_body_bytes_in_flight is not None and self.max_body_bytes_in_flight < need:
            raise ConfigError(
                f"max_body_bytes_in_flight must be at least the largest body cap ({need} bytes, max_upload_bytes "
                f"or max_json_bytes), or that body could never pass. Found {self.max_body_bytes_in_flight}"
            )
        if self.max_device_body_bytes is not None and self.max_device_body_bytes < need:
            raise ConfigError(
                f"max_device_body_bytes must be at least the largest body cap ({need} bytes, max_upload_bytes or "
                f"max_json_bytes), or no device could send that body. Found {self.max_device_body_bytes}"
            )
        if not self.min_body_rate >= 0 or self.min_body_rate == float("inf"):  # NaN fails too
            raise ConfigError(
                f"min_body_rate must be a finite number of bytes/s, 0 for none. Found {self.min_body_rate}"
            )
        if not 0 < self.body_rate_grace_s < float("inf"):
            raise ConfigError(
                f"body_rate_grace_s must be positive and finite. Found {self.body_rate_grace_s}"
            )
        if not 0 < self.flush_every_s <= MAX_FLUSH_EVERY_S:  # NaN fails too
            raise ConfigError(
                f"flush_every_s must be in (0, {MAX_FLUSH_EVERY_S:g}] seconds: a crash loses the fleet's contacts "
                f"and counts of the last period. Found {self.flush_every_s}"
            )

    @property
    def body_budget(self) -> int:
        """``max_body_bytes_in_flight``, or its default: :data:`BODY_BUDGET_UPLOADS` uploads at the cap."""
        if self.max_body_bytes_in_flight is not None:
            return self.max_body_bytes_in_flight
        return BODY_BUDGET_UPLOADS * max(self.max_upload_bytes, self.max_json_bytes)

    @property
    def device_body_share(self) -> int:
        """``max_device_body_bytes``, or its default: 1/:data:`DEVICE_BODY_SHARE` of :attr:`body_budget`, at least
        the largest body cap (so every body a device may send can pass)."""
        if self.max_device_body_bytes is not None:
            return self.max_device_body_bytes
        return max(self.body_budget // DEVICE_BODY_SHARE, self.max_upload_bytes, self.max_json_bytes)


@dataclass
class ServiceState:
    """Everything the service mutates: open rounds and their server steps, drift monitors, alerts, counters."""

    registry: Registry
    evaluator: Evaluator | None = None
    rounds: dict[str, RoundState] = field(default_factory=dict)
    #: one engine server step per model, alive across rounds (optimizer moments, DP accountant, downlink EF)
    steps: dict[str, ServerStep] = field(default_factory=dict)
    monitors: dict[str, DriftMonitor] = field(default_factory=dict)
    #: models whose stored drift monitor could not be read at start -> why (shown on the Fleet page and by the
    #: admin API until a new reference is set: their reports feed no monitor meanwhile)
    unreadable_monitors: dict[str, str] = field(default_factory=dict)
    #: models whose open drift window lost reports at start (a device's summary or the window's counts could
    #: not be read) -> what was lost; shown beside :attr:`unreadable_monitors` until that window closes or a new
    #: reference is set
    window_losses: dict[str, str] = field(default_factory=dict)
    #: the drift alerts raised, the last MAX_ALERTS of each model (one model's cannot push another's out)
    alerts: AlertLog = field(default_factory=AlertLog)
    #: open SecAgg rounds by (model, number): their protocol state is in memory only (their numbers and outcomes
    #: are in the RoundStore, so numbers continue after a restart and a round open then is recorded lost)
    secagg_rounds: dict[tuple[str, int], Any] = field(default_factory=dict)
    #: the last closed rounds, plain and SecAgg, newest last (the dashboard's fleet page lists them)
    closed_rounds: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_CLOSED_ROUNDS))
    #: the last rounds that ended without publishing (aborted, lost), newest last, with why (bounded apart)
    unpublished_rounds: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_CLOSED_ROUNDS))
    #: the trusted coordinator's evaluations of published versions by (model, version), oldest first (at most
    #: MAX_CLOSED_ROUNDS): test-set accuracy and size, divergence (:meth:`record_evaluation`)
    evaluations: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    #: the devices' reports by model, oldest first (at most MAX_REPORTS each)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: where closed rounds, reports and upload counters are stored (create_app sets it; None: memory only)
    history: FleetHistory | None = None
    #: where devices seen, drift monitors and alerts are stored (create_app sets it; None: memory only)
    watch: FleetWatch | None = None
    counters: Counter = field(default_factory=Counter)
    downlinks: ByteLRU[Any] = field(default_factory=lambda: ByteLRU(256 << 20, lambda dl: len(dl.body) + 512))
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: guards :attr:`counters` alone, held for one increment or one copy and never across I/O, so the event loop
    #: counts a rejection without waiting on :attr:`lock`, which a worker holds through a database transaction
    counters_lock: threading.Lock = field(default_factory=threading.Lock)
    #: taken by each device report (and a new drift reference) for its whole write, before :attr:`lock`: the
    #: monitors' windows are written in the order they change
    report_lock: threading.Lock = field(default_factory=threading.Lock)
    #: device id -> (cohort, requests, last seen), most recent last; at most MAX_DEVICES_SEEN entries
    seen: OrderedDict[str, tuple[str, int, float]] = field(default_factory=OrderedDict)
    #: devices seen since their row was last saved -> that contact's time (saved with the next write)
    unsaved: dict[str, float] = field(default_factory=dict)
    #: the kept counters (:func:`~deltaplane.serve.fleet_history.kept_counter`) as last committed by a report,
    #: an upload or a flush: :meth:`flush_watch` writes nothing while they and the devices seen are unchanged
    saved_counts: dict[str, int] = field(default_factory=dict)
    #: how often the running service writes the counts and contacts no transaction carried (:meth:`flush_watch`):
    #: what a crash can lose, and at most one sync per period, none while nothing changed
    #: (:attr:`ServiceConfig.flush_every_s`, set by :func:`create_app`)
    flush_every_s: float = 5.0
    _bases: ByteLRU[dict[str, Any]] = field(
        default_factory=lambda: ByteLRU[dict[str, Any]](
            512 << 20, lambda s: sum(t.numel() * t.element_size() for t in s.values())
        )
    )

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``, from a worker thread or the event loop alike. ``Counter[k] += n`` reads,
        then writes (a first count runs ``Counter.__missing__``, Python code where the GIL may pass between), so
        the loop and a worker could both add to the same old value and lose one count; under
        :attr:`counters_lock` neither can."""
        with self.counters_lock:
            self.counters[name] += n

    def counts(self) -> dict[str, int]:
        """A copy of the counters taken under :attr:`counters_lock`: iterate it, never :attr:`counters` itself,
        which the event loop may grow meanwhile (a dict that changes size while iterated raises)."""
        with self.counters_lock:
            return dict(self.counters)

    def saw(self, ident: DeviceIdentity) -> None:
        """Remember that a device made an authenticated request (bounded: the oldest are forgotten)."""
        with self.lock:
            _, n, _ = self.seen.pop(ident.device_id, (ident.cohort, 0, 0.0))
            now = time.time()
            self.seen[ident.device_id] = (ident.cohort, n + 1, now)
            self.unsaved[ident.device_id] = now
            while len(self.seen) > MAX_DEVICES_SEEN:
                self.unsaved.pop(self.seen.popitem(last=False)[0], None)

    def _unsaved(self) -> tuple[list[tuple[str, str, int, float]], dict[str, int]]:
        """What no transaction carried yet: the devices seen since their row was saved (as
        :meth:`FleetWatch.save_devices` takes them) and the kept counters. Caller holds the lock, and passes
        both to :meth:`mark_saved` once they committed."""
        rows = [(d, *self.seen[d]) for d in self.unsaved if d in self.seen]
        return rows, self._kept_counts()

    def mark_saved(self, saved: tuple[list[tuple[str, str, int, float]], dict[str, int]]) -> None:
        """The rows and counts of :meth:`_unsaved` committed: the devices are no longer unsaved, unless seen
        again since. Caller holds the lock."""
        rows, counts = saved
        for device, _, _, at in rows:
            if self.unsaved.get(device) == at:
                del self.unsaved[device]
        self._counts_saved(counts)

    def _counts_saved(self, counts: Mapping[str, int]) -> None:
        """Kept counters ``counts`` committed: :attr:`saved_counts` becomes what the database holds, each
        counter the larger of the two (it keeps the larger of two snapshots committed out of order, and a
        counter only grows), so a stale snapshot committed last never makes the next flush write again."""
        self.saved_counts = {
            k: max(v, self.saved_counts.get(k, 0)) for k, v in (self.saved_counts | dict(counts)).items()
        }

    def _save_unsaved(self, rows: list[tuple[str, str, int, float]], counts: Mapping[str, int]) -> None:
        """Write devices seen and kept counters, joining the caller's transaction (no sync of their own there)."""
        if self.history is not None:
            self.history.save_counters(counts)
        if self.watch is not None:
            self.watch.save_devices(rows)

    def save_counts(
        self, extra: Mapping[str, int]
    ) -> tuple[list[tuple[str, str, int, float]], dict[str, int]]:
        """Inside the caller's transaction (an accepted upload's), with the lock held: the kept counters,
        ``extra`` (what the transaction adds: not counted in memory until it committed) included, and the devices
        seen since their last save; no sync of their own. Returns what it wrote: pass it to :meth:`mark_saved`
        once the transaction committed."""
        rows, counts = self._unsaved()
        for k, v in extra.items():
            counts[k] = counts.get(k, 0) + v
        self._save_unsaved(rows, counts)
        return rows, counts

    def flush_watch(self) -> bool:
        """Store the devices seen and the kept counters that no report, upload, close or abort carried (a
        download-only contact, a refused upload or SecAgg message, an accepted masked input), in a transaction
        of their own; nothing (no sync) when nothing changed since the last save. The running service calls it
        every :attr:`flush_every_s` and when it stops cleanly, so a crash loses at most that period's. True if
        it wrote."""
        if self.watch is None and self.history is None:
            return False
        with self.lock:
            rows, counts = self._unsaved()
        if not rows and counts == self.saved_counts:
            return False
        with self.registry.transaction():
            self._save_unsaved(rows, counts)
        with self.lock:
            self.mark_saved((rows, counts))
        return True

    def close_summary(
        self,
        model: str,
        number: int,
        kind: str,
        version: int | None,
        contributors: int,
        measurements: Mapping[str, float],
        *,
        authenticated: bool = False,
        revoked: tuple[str, ...] = (),
        dp_adjacency: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """A closed round as the fleet page lists it (what it published, from how many devices, its ε and the
        neighbours ``dp_adjacency`` it is stated under, whether it was an authenticated SecAgg round, the
        devices left out as revoked), stored in :attr:`history` with the kept counters; returns it and the
        counters it stored.

        Call it inside the transaction that closes the round (the row commits with the version or not at
        all), then :meth:`remember_closed` with both once that transaction committed."""
        epsilon = measurements.get("epsilon")
        summary = {
            "model": model,
            "round": number,
            "kind": kind,
            "version": version,
            "contributors": contributors,
            "epsilon": None if epsilon is None else float(epsilon),
            "dp_adjacency": None if epsilon is None else dp_adjacency,
            "authenticated": authenticated,
            "revoked": list(revoked),
            "closed_at": time.time(),
        }
        counts = self._kept_counts() if self.history is not None else {}  # memory only: nothing saved
        if self.history is not None:
            self.history.add_round(summary, counts)
        return summary, counts

    def _kept_counts(self) -> dict[str, int]:
        """The kept counters (:func:`~deltaplane.serve.fleet_history.kept_counter`) as they are now."""
        return {k: v for k, v in self.counts().items() if kept_counter(k)}

    def remember_closed(self, summary: dict[str, Any], saved: Mapping[str, int]) -> None:
        """Show a closed round (:meth:`close_summary`, committed) on the fleet page; the kept counters its
        transaction ``saved`` need no periodic flush of their own (:meth:`flush_watch` sees them saved)."""
        with self.lock:
            self.closed_rounds.append(summary)
            self._counts_saved(saved)

    def end_summary(
        self,
        model: str,
        number: int,
        kind: str,
        *,
        outcome: str,
        reason: str,
        invited: int | None,
        contributors: int | None,
        stage: str | None = None,
        authenticated: bool = False,
        revoked: tuple[str, ...] = (),
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """A round that ended without publishing (``outcome``: aborted or lost) as the fleet page lists it: how
        many devices were invited (None: a plain round invites every device) and took part, a SecAgg round's
        stage, and why (``reason``, bounded); stored in :attr:`history` with the kept counters; returns it and
        the counters it stored.

        Call it inside the transaction that records the round aborted or lost (the row commits with that or
        not at all), then :meth:`remember_ended` with both once that transaction committed."""
        summary = {
            "model": model,
            "round": number,
            "kind": kind,
            "outcome": outcome,
            "invited": invited,
            "contributors": contributors,
            "stage": stage,
            "reason": bounded_reason(reason),
            "authenticated": authenticated,
            "revoked": list(revoked),
            "closed_at": time.time(),
        }
        counts = self._kept_counts() if self.history is not None else {}  # memory only: nothing saved
        if self.history is not None:
            self.history.add_unpublished(summary, counts)
        return summary, counts

    def remember_ended(self, summary: dict[str, Any], saved: Mapping[str, int]) -> None:
        """Show a round that ended without publishing (:meth:`end_summary`, committed) on the fleet page; the
        kept counters its transaction ``saved`` need no periodic flush of their own."""
        with self.lock:
            self.unpublished_rounds.append(summary)
            self._counts_saved(saved)

    def record_evaluation(
        self, model: str, kind: str, number: int, version: int, measured: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keep the trusted coordinator's evaluation (``measured``: ``test_accuracy``, ``test_samples``,
        ``diverged``) of ``version``, which closed ``kind`` round ``number`` of ``model`` published (stored
        first, so a restart keeps it); the Fleet page and ``GET /admin/rounds/closed`` show it beside that
        round's held-out figures. Returns what it kept.

        Raises:
            ConfigError: the round is not among the last closed rounds, or published another version or none
                (a coordinator's evaluation is only of what its round published).
        """
        with self.lock:
            rnd = next(
                (
                    r
                    for r in reversed(self.closed_rounds)
                    if (r["model"], r["kind"], r["round"]) == (model, kind, number)
                ),
                None,
            )
        if rnd is None:
            raise ConfigError(
                f"{model!r} has no closed {kind} round {number} among its last closed rounds "
                "(GET /admin/rounds/closed lists them): evaluate a version after the round that published it closed"
            )
        if rnd["version"] != version:
            published = "nothing" if rnd["version"] is None else f"version {rnd['version']}"
            raise ConfigError(
                f"{kind} round {number} of {model!r} published {published}, not version {version}: "
                "an evaluation is of the version its round published"
            )
        kept = {"kind": kind, "round": number} | {
            k: measured[k] for k in ("test_accuracy", "test_samples", "diverged")
        }
        if self.history is not None:
            self.history.add_evaluation(model, version, kept)
        with self.lock:
            self.evaluations.pop((model, version), None)
            self.evaluations[(model, version)] = kept
            while len(self.evaluations) > MAX_CLOSED_ROUNDS:
                del self.evaluations[next(iter(self.evaluations))]
        return kept

    def unpublished_snapshot(self) -> list[dict[str, Any]]:
        """The rounds that ended without publishing, newest first."""
        with self.lock:
            return list(reversed(self.unpublished_rounds))

    def record_report(
        self, model: str, report: dict[str, Any], summary: Summary | None = None
    ) -> DriftReport | None:
        """Keep a device's report and feed its drift ``summary`` (if any) to the model's monitor; returns the
        drift window it closed, if it closed one.

        One transaction stores the report, the monitor's window (or the window it closed and its alerts), the
        devices seen since their last save and the kept counters, before the service acknowledges it: all of it survives a
        restart, and no part without the rest. A summary the monitor refuses (InvalidUpdate, 422) stores
        nothing. Reports are taken one at a time (:attr:`report_lock`), so the rows are written in the order
        the monitor took them; the monitor is put back as it was if the transaction fails. :attr:`lock` is
        held only for the memory's changes, never while the database syncs, and never taken inside the
        transaction (uploads and aborts take it first, then the database's write lock: the same order)."""
        device = report["device"]
        closed: DriftReport | None = None
        undo: (
            tuple[DriftMonitor, tuple[dict[str, Summary], int, int], dict[str, int], list[DriftReport]] | None
        ) = None
        with self.report_lock:
            with self.lock:
                mon = self.monitors.get(model) if summary is not None else None
                if mon is not None and summary is not None:
                    undo = (mon, mon.live_window(), mon.device_reports(), list(mon.history))
                    # the report's version made its predictions: they are tested against that version's
                    closed = mon.ingest(summary, device=device, version=report["version"])
                    del mon.history[:-MAX_DRIFT_HISTORY]
                unsaved = self._unsaved()
            alerts = [
                {"model": model, "alert": a, "at": time.time(), "version": report["version"]}
                for a in (closed.alerts if closed is not None else ())
            ]
            try:
                with self.registry.transaction() if self.history is not None else contextlib.nullcontext():
                    if self.history is not None:
                        self.history.add_report(model, report)
                    if self.watch is not None:
                        if mon is not None:
                            self.watch.save_window(model, mon, device, closed)
                        self.watch.add_alerts(alerts)
                    self._save_unsaved(*unsaved)
            except BaseException:
                if undo is not None:
                    with self.lock:
                        mon, (live, reports, anonymous), counts, history = undo
                        mon.resume_window(live, reports, anonymous, counts)
                        mon.history[:] = history
                raise
            with self.lock:
                self.mark_saved(unsaved)
                if (
                    closed is not None
                ):  # a window that lost reports at start has closed: the next one is whole
                    self.window_losses.pop(model, None)
                kept = self.reports.setdefault(model, [])
                kept.append(report)
                del kept[:-MAX_REPORTS]
                self.alerts.extend(alerts)
        return closed

    def set_prediction_reference(self, model: str, version: int, counts: list[int]) -> DriftMonitor | None:
        """Register ``version``'s predicted-class counts on the reference data with ``model``'s monitor (stored
        first, so a restart keeps it; the open window is kept); None when ``model`` has no monitor. A refused
        reference (ConfigError) or a failed write changes nothing."""
        with self.report_lock:
            with self.lock:
                mon = self.monitors.get(model)
                if mon is None:
                    return None
                before = dict(mon.prediction_references)
                mon.set_prediction_reference(version, counts)
            try:
                if self.watch is not None:
                    self.watch.save_settings(model, mon)
            except BaseException:
                with self.lock:
                    mon.prediction_references = before
                raise
        return mon

    def set_monitor(self, model: str, monitor: DriftMonitor) -> None:
        """Monitor ``model``'s drift with ``monitor`` from now on (stored first: a restart keeps it); between
        two reports, so no report's window rows land on the new monitor's."""
        with self.report_lock:
            if self.watch is not None:
                self.watch.set_monitor(model, monitor)
            with self.lock:
                self.monitors[model] = monitor
                self.unreadable_monitors.pop(model, None)
                self.window_losses.pop(model, None)

    def load_history(self, history: FleetHistory) -> None:
        """Take the stored fleet history (at start): closed rounds (published, and ended without publishing),
        reports and counters as they were, and
        :attr:`history` to store what comes next. A row that cannot be read is left out with a warning."""
        loaded = history.load()
        for line in loaded.refused:
            log.warning("%s", line)
        with self.lock:
            self.history = history
            self.closed_rounds.extend(loaded.rounds)
            self.unpublished_rounds.extend(loaded.unpublished)
            for model, reports in loaded.reports.items():
                self.reports[model] = reports[-MAX_REPORTS:]
            self.evaluations.update(loaded.evaluations)
            with self.counters_lock:
                self.counters.update(loaded.counters)
            self.saved_counts = self._kept_counts()
            if loaded.refused:
                self.count("errors.history_unreadable", len(loaded.refused))

    def load_watch(self, watch: FleetWatch) -> None:
        """Take the stored devices seen, drift monitors (windows and history) and alerts (at start), and
        :attr:`watch` to store what comes next. A row that cannot be read is left out with a warning, counted
        with the history's (``errors.history_unreadable``); a monitor whose settings cannot be read is named in
        :attr:`unreadable_monitors` (the operator sees it), one whose open window's counts cannot be read keeps
        its reference and starts an empty window, and a device's summary that cannot be read is left out of its
        window with the reports it merged (stored so; both named in :attr:`window_losses`)."""
        loaded = watch.load()
        for line in loaded.refused:
            log.warning("%s", line)
        for model in loaded.restarted_windows:
            watch.restart_window(model)
        for model, (devices, reports) in loaded.dropped_rows.items():
            watch.drop_window_rows(model, devices, reports)
        with self.lock:
            self.watch = watch
            for device, cohort, requests, at in loaded.devices:
                self.seen.pop(device, None)
                self.seen[device] = (cohort, requests, at)
            self.monitors.update(loaded.monitors)
            self.unreadable_monitors.update(loaded.unreadable_monitors)
            self.window_losses.update(loaded.window_losses)
            self.alerts.extend(loaded.alerts)
            if loaded.refused:
                self.count("errors.history_unreadable", len(loaded.refused))

    def _reported(self, metric: str) -> dict[tuple[str, int], dict[str, float]]:
        """What each device reported of ``metric``, by (model, version): one per device (its last, so a device
        that reports twice is not counted twice). Caller holds the lock."""
        out: dict[tuple[str, int], dict[str, float]] = {}
        for model, reports in self.reports.items():
            for r in reports:
                if metric in r["metrics"]:
                    out.setdefault((model, r["version"]), {})[r["device"]] = float(r["metrics"][metric])
        return out

    def closed_snapshot(self) -> list[dict[str, Any]]:
        """The closed rounds, newest first, each with what its devices reported on the version it published
        (the held-out accuracy each device measured on its own data, ``fleet device``'s report: the devices'
        claims, not an evaluation by the service), so the fleet page shows whether the federation learns, and,
        under local DP, where each device reports its own ε (the service spends none), the largest: the weakest
        guarantee any reporting device holds; and the trusted coordinator's measure of that version on the
        task's test set (:meth:`record_evaluation`: ``test_accuracy``, ``test_samples``, ``diverged``; None where
        no trusted coordinator measured it). One pass over the reports, not one per round: the dashboard polls
        this."""
        with self.lock:
            reported = self._reported("holdout_accuracy")
            local = self._reported("epsilon")
            # a personalized fleet's devices also report the global and their personal model's accuracy on
            # their own label mix (fleet.report_pending): the page shows both means, the gain, and the worst
            # device's change (personal − global of one device), as the simulator's round metrics do
            glob, mine = self._reported("global_accuracy"), self._reported("personal_accuracy")
            # each device's held-out size (fleet device reports it since 2026-12-07): on a small fleet some hold
            # out a handful of samples, and the page says so beside the accuracy those samples give
            sizes = self._reported("holdout_samples")
            out = []
            for closed in reversed(self.closed_rounds):
                key = (closed["model"], closed["version"])
                accs = list(reported.get(key, {}).values())
                eps = list(local.get(key, {}).values())
                held = list(sizes.get(key, {}).values())
                pairs = [(g, mine[key][d]) for d, g in glob.get(key, {}).items() if d in mine.get(key, {})]
                # FedPer/FedBN devices report no global figure (has_global_model): their personal mean stands
                # alone, without a global mean or a gain
                own = list(mine.get(key, {}).values())
                out.append(
                    closed
                    | {
                        "reports": len(accs),
                        "holdout_accuracy_mean": sum(accs) / len(accs) if accs else None,
                        "holdout_accuracy_min": min(accs) if accs else None,
                        "holdout_samples_min": int(min(held)) if held else None,
                        "local_epsilon_max": max(eps) if eps else None,
                        "global_accuracy_mean": sum(g for g, _ in pairs) / len(pairs) if pairs else None,
                        "personal_accuracy_mean": sum(own) / len(own) if own else None,
                        "personal_gain_min": min(m - g for g, m in pairs) if pairs else None,
                    }
                    | self._evaluation(key, closed)
                )
            return out

    def _evaluation(self, key: tuple[str, int], closed: Mapping[str, Any]) -> dict[str, Any]:
        """The trusted coordinator's evaluation of the version ``closed`` published (by that round), as the
        closed-rounds row shows it: None each where there is none. Caller holds the lock."""
        got = self.evaluations.get(key)
        if got is None or (got["kind"], got["round"]) != (closed["kind"], closed["round"]):
            return {"test_accuracy": None, "test_samples": None, "diverged": None}
        return {k: got[k] for k in ("test_accuracy", "test_samples", "diverged")}

    def fleet_snapshot(self) -> dict[str, Any]:
        """What the dashboard's fleet page shows: open rounds, devices, uploads by outcome, drift, alerts."""
        closed = self.closed_snapshot()
        with self.lock:
            # plain rounds' uploads, then SecAgg rounds' masked inputs (a SecAgg federation sends no plain one)
            uploads = {
                "accepted": self.counters.get("uploads.accepted", 0),
                "accepted_secagg_masked": self.counters.get("secagg.masked", 0),
            }
            # SecAgg messages the protocol refused (out of order: 409; cannot go on: 422), once there are any
            for name in ("secagg.refused", "secagg.refused_order"):
                if self.counters.get(name):
                    uploads[name.replace(".", "_")] = self.counters[name]
            uploads.update(
                {
                    k.removeprefix("rejected."): v
                    for k, v in self.counts().items()
                    if k.startswith("rejected.")
                }
            )
            return {
                "open_rounds": [
                    {
                        "model": m,
                        "round": r.number,
                        "base_version": r.base_version,
                        "kind": "plain",
                        "uploads": len(r.devices),
                        "opened_at": r.opened_at,
                    }
                    for m, r in sorted(self.rounds.items())
                ]
                + [
                    {
                        "model": m,
                        "round": n,
                        "kind": "secagg",
                        "stage": r.endpoint.stage,
                        "authenticated": r.endpoint.server.authenticated,
                        "revoked": list(r.revoked),
                        "base_version": r.base_version,
                        "uploads": len(r.endpoint.server.uploaded),
                        "opened_at": r.opened_at,
                    }
                    for (m, n), r in sorted(self.secagg_rounds.items())
                    if r.published is None and r.endpoint.stage != "done"
                ],
                "closed_rounds": closed,
                "unpublished_rounds": list(reversed(self.unpublished_rounds)),
                "devices": [
                    {"device": d, "cohort": c, "requests": n, "last_seen": t}
                    for d, (c, n, t) in reversed(self.seen.items())
                ],
                "uploads": uploads,
                "drift": {m: [r.to_dict() for r in mon.history] for m, mon in sorted(self.monitors.items())},
                "drift_unreadable": dict(sorted(self.unreadable_monitors.items())),
                "drift_window_losses": dict(sorted(self.window_losses.items())),
                "alerts": list(self.alerts),
            }

    def base_state(self, model: str, version: int) -> dict[str, Any]:
        """The (verified) weights of a base version, cached: versions are immutable."""
        key = (model, version)
        hit = self._bases.get(key)
        if hit is None:
            hit = self.registry.load_state(self.registry.get(model, version))
            self._bases.put(key, hit)
        return hit


# -- request / response schemas ------------------------------------------------------------------------
class DeviceTokenRequest(StrictBody):
    device_id: str = Field(pattern=NAME, max_length=128)
    cohort: str = Field(default="default", pattern=NAME, max_length=128)
    ttl_s: int | None = Field(
        default=None, ge=60, le=10 * 365 * 86400, description="lifetime; defaults to the service's"
    )
    models: list[Annotated[str, Field(pattern=NAME, max_length=128)]] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="the models the token may act on (any other: 403); omitted: every model of this service",
    )


class DeviceToken(BaseModel):
    device_id: str
    cohort: str
    token: str
    token_id: str
    expires_at: float
    #: the models the token may act on; null: every model of this service
    models: list[str] | None = None


class RevokeTokenRequest(StrictBody):
    token_id: str = Field(pattern="^[A-Za-z0-9_-]{8,64}$")


class Revoked(BaseModel):
    revoked: str
    at: float


class PromoteRequest(StrictBody):
    version: int = Field(ge=1, le=2**31 - 1)
    to: str = Field(default="production", pattern=NAME, max_length=128)


class PromoteResponse(BaseModel):
    promoted: bool
    candidate: str
    previous: str | None = Field(description="what the tag held (null: nothing)")
    compared_with: str | None = Field(
        default=None,
        description="the version the gate compared against and the tag holding it, e.g. 'cnn@1 (production)'",
    )
    candidate_metrics: dict[str, float | None] = Field(description="null where the metric was NaN/Inf")
    baseline_metrics: dict[str, float | None] | None
    regressions: list[str]


class RollbackResponse(BaseModel):
    model: str
    tag: str
    version: int
    sha256: str


class ReportRequest(StrictBody):
    version: int = Field(ge=1, le=2**31 - 1)
    round: int | None = Field(default=None, ge=1, le=2**31 - 1)
    metrics: dict[MetricName, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=64
    )
    summary: SummaryModel | None = None


class ReportAccepted(BaseModel):
    accepted: bool
    drift_evaluated: bool
    alerts: list[str]


class Message(BaseModel):
    detail: str
    #: the typed error's class name (e.g. ``PrivacyBudgetExceeded``), so a client can act on the kind
    error: str | None = None


_ERRORS: dict[int, dict[str, Any]] = {
    code: {"model": Message, "description": text}
    for code, text in {
        400: "malformed request or payload",
        401: "missing, invalid, expired or revoked token",
        403: "the device's cohort withdrew consent, or its token is scoped to other models",
        404: "unknown model, version or tag",
        409: "conflict: round not open, duplicate upload, stale base version, promotion refused",
        413: "upload larger than the configured limit",
        422: "well-formed but unusable (shape mismatch, NaN/Inf, invalid parameters)",
        429: "per-device rate limit, or too many failed authentications (see Retry-After)",
        451: "the version contains a cohort that withdrew consent",
    }.items()
}

# which 4xx each typed deltaplane error becomes (first match wins: order subclasses before bases)
_STATUS: list[tuple[type[Exception], int]] = [
    (NotFound, 404),
    (VersionMismatch, 409),
    (PrivacyBudgetExceeded, 409),
    (PromotionRefused, 409),
    (ShapeMismatch, 422),
    (InvalidUpdate, 422),
    (SignatureError, 422),
    (DecodeError, 400),
    (ConfigError, 422),
    (IntegrityError, 409),
    (Conflict, 409),
    (DeltaplaneError, 400),
]


@overload
def _finite_or_none(metrics: dict[str, float]) -> dict[str, float | None]: ...
@overload
def _finite_or_none(metrics: dict[str, float] | None) -> dict[str, float | None] | None: ...
def _finite_or_none(metrics: dict[str, float] | None) -> dict[str, float | None] | None:
    """JSON has no NaN: non-finite metrics travel as null (the regressions list says why they blocked)."""
    if metrics is None:
        return None
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def _open_secagg_by_model(rounds: dict[tuple[str, int], Any]) -> dict[str, list[dict[str, Any]]]:
    """``GET /admin/stats``'s open SecAgg rounds: per model, each round's number, stage and coordinator."""
    out: dict[str, list[dict[str, Any]]] = {}
    for (model, number), r in sorted(rounds.items()):
        if r.published is None and r.endpoint.stage != "done":
            out.setdefault(model, []).append(
                {"round": number, "stage": r.endpoint.stage, "coordinator": r.coordinator}
            )
    return out


def status_for(exc: Exception) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 400


def create_app(
    config: ServiceConfig, *, state: ServiceState | None = None, evaluator: Evaluator | None = None
) -> FastAPI:
    """Build the FastAPI application over the registry at ``config.home``."""
    if config.federation is not None and not config.simulated_devices:
        # a warning when the federation sets options this service cannot apply (the devices must)
        level = logging.WARNING if device_side_options(config.federation) else logging.INFO
        log.log(level, device_side_notice(config.federation))
    state = state or ServiceState(Registry(Path(config.home)), evaluator=evaluator)  # NotFound: no registry
    # before anything touches the rounds: restore_rounds below marks SecAgg rounds open in the database lost
    from deltaplane.serve.registry_lock import hold_service_lock

    service_lock = hold_service_lock(state.registry.home)
    state.downlinks = ByteLRU(config.downlink_cache_bytes, lambda dl: len(dl.body) + 512)
    state.flush_every_s = config.flush_every_s
    reg = state.registry
    signer = reg.signer
    service_store = ServiceStore(reg)
    # an unreadable or malformed enrollment authority key, a held list it did not sign, or one older than the
    # highest it has held (kept in the service store), fails at start
    check_revocations_at_start(config, service_store)
    rounds_store = RoundStore(reg)
    # a restart keeps open rounds and their accepted uploads (replayed into each model's server step)
    restore_rounds(config, state, rounds_store)
    # and the fleet's history: closed rounds, the devices' reports, uploads by outcome
    state.load_history(FleetHistory(reg))
    # and what it watches: devices seen, drift monitors with their windows, alerts
    state.load_watch(FleetWatch(reg))
    revoked_ids, revoked_devices = service_store.revocations()
    authority = TokenAuthority(
        config.device_secret.encode() if config.device_secret else device_secret(reg.home),
        audience=service_store.audience(),
        ttl_s=config.token_ttl_s,
        revoked_ids=revoked_ids,
        revoked_devices=revoked_devices,
    )
    limiter = RateLimiter(rate=config.rate, burst=config.burst)
    tolerance = Tolerance(dict(config.tolerance))
    bearer = HTTPBearer(
        auto_error=False, description="device token (device endpoints) or admin token (/admin)"
    )

    def flush_counted() -> None:
        """One periodic flush, in a worker thread: a failure is logged and counted in ``errors.database``
        (:meth:`ServiceState.count`, as every count is) and tried again next period, so the service goes on."""
        try:
            state.flush_watch()
        except Exception as exc:  # anything must not end the task silently: later periods still save
            state.count("errors.database")
            if isinstance(exc, sqlite3.Error):  # a busy or full disk
                log.warning("the fleet's contacts and counts could not be saved (%s); retrying", exc)
            else:
                log.exception("the fleet's contacts and counts could not be saved; retrying next period")

    async def flush_periodically(stopping: asyncio.Event) -> None:
        """Every :attr:`ServiceState.flush_every_s` until ``stopping`` is set: the contacts and counts no
        transaction carried. Stopped by the event, never cancelled: a cancelled task returns while its flush's
        thread still runs, and the stop's last flush would then run beside it."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=state.flush_every_s)
                return
            await run_in_threadpool(flush_counted)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """While the service runs, save the contacts and counts no report, upload, close or abort carried
        every :attr:`ServiceState.flush_every_s` (a crash loses at most that); on a clean stop (an upgrade,
        SIGTERM), the last of them once a periodic flush under way has ended, so a restart shows every device
        as last seen and every count."""
        stopping = asyncio.Event()
        flusher = asyncio.create_task(flush_periodically(stopping))
        try:
            yield
        finally:
            stopping.set()
            await flusher  # a flush under way finishes first: the last one never runs beside it
            await run_in_threadpool(state.flush_watch)

    app = FastAPI(
        lifespan=lifespan,
        title="deltaplane",
        version="1",
        description="Ship model versions and deltas to devices; collect compressed updates; monitor drift.",
        responses={k: v for k, v in _ERRORS.items() if k in (401, 429)},
        docs_url=None,
        redoc_url=None,
    )
    mount_offline_docs(app)
    app.state.deltaplane = state
    app.state.service_lock = service_lock  # the registry's service lock is held while the app lives
    app.state.service_config = config  # serve() and BackgroundServer read the connection limit from it
    app.state.authority = authority
    app.add_middleware(
        RequestGuard,
        check_device=authority.verify,
        admin_token=config.admin_token,
        max_upload_bytes=config.max_upload_bytes,
        max_json_bytes=config.max_json_bytes,
        failures=RateLimiter(rate=config.auth_failure_rate, burst=config.auth_failure_burst),
        on_reject=state.count,
        body_timeout=config.body_timeout_s,
        max_device_requests=config.max_device_requests,
        max_body_bytes_in_flight=config.body_budget,
        max_device_body_bytes=config.device_body_share,
        min_body_rate=config.min_body_rate,
        body_rate_grace=config.body_rate_grace_s,
        rate_limit=limiter,
        max_waiting_refusals=max(1, config.max_connections // WAITING_REFUSALS_SHARE),
    )

    @app.exception_handler(DeltaplaneError)
    async def _typed(_: Request, exc: DeltaplaneError) -> JSONResponse:
        state.count(f"rejected.{type(exc).__name__}")
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status_for(exc))

    @app.exception_handler(sqlite3.DatabaseError)
    async def _database(_: Request, exc: sqlite3.DatabaseError) -> JSONResponse:
        state.count("errors.database")
        return JSONResponse(
            {
                "detail": "the registry database is unavailable; the operator should run `deltaplane registry verify`"
            },
            status_code=503,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        state.count("rejected.validation")
        if is_ui_path(request.url.path):  # a dashboard page: an HTML error page, counted as any other 422
            return validation_page(exc)
        if (problem := body_problem(request, exc.errors())) is not None:  # not JSON, or not the route's shape
            return JSONResponse({"detail": problem}, status_code=422)
        errors = [describe(e) for e in exc.errors()[:5]]
        return JSONResponse({"detail": "invalid request: " + "; ".join(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == FASTAPI_UNPARSED_BODY:  # FastAPI's JSON reader raised
            state.count("rejected.validation")
            return JSONResponse({"detail": body_problem(request)}, status_code=400)
        return await http_exception_handler(request, exc)

    # -- auth dependencies -------------------------------------------------------------------------
    def device(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> DeviceIdentity:
        ident = request.scope.get("state", {}).get(DEVICE_SCOPE_KEY)  # checked by the RequestGuard
        if ident is None:
            ident = authority.verify(creds.credentials) if creds else ""
        if not isinstance(ident, DeviceIdentity):
            state.count("rejected.unauthenticated")
            raise HTTPException(
                401,
                ident or "missing or invalid device token; ask an admin for one (POST /admin/devices)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        model = request.path_params.get("model")
        if model is not None and not ident.may_use(model):
            state.count("rejected.model_scope")
            raise HTTPException(
                403,
                f"this device token is scoped to model(s) {list(ident.models or ())} and may not act on "
                f"{model!r}; use the token issued for {model!r}, or ask this service's admin for one "
                f'(POST /admin/devices with "models": [{model!r}])',
            )
        wait = limiter.acquire(ident.device_id)
        if wait > 0:
            state.count("rejected.rate_limited")
            raise HTTPException(
                429,
                f"rate limit of {config.rate}/s exceeded for device {ident.device_id}; retry in {wait:.2f}s",
                headers={"Retry-After": str(retry_after_s(wait))},
            )
        state.saw(ident)
        return ident

    def admin(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if creds is None or not secrets.compare_digest(
            creds.credentials.encode(), config.admin_token.encode()
        ):
            state.count("rejected.unauthenticated_admin")
            raise HTTPException(401, ADMIN_TOKEN_REFUSED, headers={"WWW-Authenticate": "Bearer"})

    Device = Annotated[DeviceIdentity, Depends(device)]
    Admin = Depends(admin)

    def fleet_page_data() -> dict[str, Any]:
        """The fleet snapshot, and the revocation list as the next authenticated round open would read it."""
        snap = state.fleet_snapshot()
        rounds = snap["open_rounds"] + snap["closed_rounds"]
        return snap | {
            "revocations": revocations_status(config, rounds, now=time.time(), store=service_store),
            # the neighbours its ε holds for: the federation's DP (a service without one runs no DP)
            "dp_adjacency": dp_adjacency(config.federation) if config.federation is not None else None,
        }

    mount_ui(
        app,
        admin_token=config.admin_token,
        runs_dir=config.runs_dir or None,
        registry_home=config.home,
        fleet=fleet_page_data,
        session_limits=SessionLimits(idle_s=config.session_idle_s, max_s=config.session_max_s),
    )
    # secure aggregation rounds: their own router (serve/secagg_routes.py), behind the same auth
    app.state.secagg_rounds = install_secagg_routes(
        app, state, config, device=device, admin=admin, rounds_store=rounds_store, service_store=service_store
    )
    install_revocation_routes(app, state, config, device=device, admin=admin, store=service_store)

    def served_tag(model: str, channel: str, cohort: str) -> tuple[str, int]:
        """The tag a device of ``cohort`` on ``channel`` is served from, and the version it holds.

        Cohort first, then the channel; ``training`` then falls back to what that cohort runs in production
        (``training.<cohort>``, ``training``, ``production.<cohort>``, ``production``), so a training device of
        cohort ``eu`` trains from the version ``eu`` is served, not from the global production.
        """
        # verified against the signed state log: a tag moved in the database is a 409, never served
        tags = reg.tags(model, verify=True)
        order = [f"{channel}.{cohort}", channel]
        if channel == "training":
            order += [f"{PRODUCTION}.{cohort}", PRODUCTION]
        for tag in order:
            if tag in tags:
                return tag, tags[tag]
        if not reg.versions(model):
            raise NotFound(f"unknown model {model!r}")
        raise NotFound(f"{model} has no {channel!r} version (tags: {sorted(tags)})")

    def resolve_tag(model: str, channel: str, cohort: str) -> int:
        return served_tag(model, channel, cohort)[1]

    contributors: dict[
        tuple[str, int], frozenset[str]
    ] = {}  # versions are immutable, so this never goes stale

    def check_consent(model: str, version: int) -> None:
        """451 for a version that contains a cohort which withdrew consent (it may not be served)."""
        withdrawn = reg.withdrawn_cohorts(verify=True)  # a deleted withdrawal is a 409, not a pass
        if not withdrawn:
            return
        key = (model, version)
        if key not in contributors:
            if len(contributors) > 100_000:
                contributors.clear()
            contributors[key] = frozenset(reg.contributors(reg.get(model, version)))
        bad = withdrawn_among(contributors[key], withdrawn)
        if bad:
            raise HTTPException(
                451,
                f"{model}@{version} contains withdrawn cohort(s) {bad} and may not be served; "
                f"the operator must rebuild it without them (POST /admin/models/{model}/rebuild)",
            )

    # -- device endpoints --------------------------------------------------------------------------
    @app.get("/healthz", tags=["meta"], response_class=Response, responses={200: {"description": "ok"}})
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get(
        "/v1/models/{model}/download",
        tags=["device"],
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "signed full model or delta chain",
            },
            204: {"description": "the device already holds the current version"},
            **{k: _ERRORS[k] for k in (404, 422, 451)},
        },
        response_class=Response,
    )
    def download(
        model: ModelName,
        ident: Device,
        have: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="version the device holds")] = None,
        channel: Annotated[str, Query(pattern="^(production|staging|training)$")] = "production",
        nonce: Annotated[
            str,
            Query(
                pattern="^([A-Za-z0-9_-]{16,64})?$",
                description="random per request; the signed answer echoes it (freshness)",
            ),
        ] = "",
        version: Annotated[
            int | None,
            Query(
                ge=1,
                le=2**31 - 1,
                description="an earlier version of the served one's lineage, as a full model (catching up)",
            ),
        ] = None,
    ) -> Response:
        served, want = served_tag(model, channel, ident.cohort)
        if version is not None:
            return pinned_download(model, channel, nonce, want, version)
        check_consent(model, want)
        rollback_header = {}
        if have is not None and have > want:
            # The device is ahead (a rollback): only a full model is safe, and the device accepts an older
            # version only with a signed rollback record covering the one it holds, made by a rollback of
            # the tag it is served from (staging's rollback does not move production's devices back).
            record = reg.rollback_record(model, want, have, tag=served)  # only while it is current
            if record is not None:
                text = f"{record['tag']}:{record['supersedes']}:{record['signature']}"
                rollback_header = {
                    "X-Deltaplane-Rollback": text,
                    # this record, offered now, for this request: a stale one replayed later lacks it
                    "X-Deltaplane-Rollback-Offer": signer.sign(
                        rollback_offer_statement(
                            model, channel, want, reg.get(model, want).sha256, nonce, text
                        )
                    ).to_text(),
                }
            have = None
        key = (model, want, have)
        dl = state.downlinks.get(key)
        if dl is None:
            dl = plan_downlink(reg, signer, model, want, have)
            state.downlinks.put(key, dl)  # artifacts are immutable, so a planned downlink never goes stale
        state.count(f"download.{dl.kind}")
        state.count("download.bytes", len(dl.body))
        state.count("download.full_bytes", dl.full_bytes if dl.kind != "none" else 0)
        headers = {
            **downlink_headers(model, dl),
            "X-Deltaplane-Serve-Signature": signer.sign(
                serve_statement(model, channel, dl.version, dl.target_sha256, nonce, dl.kind)
            ).to_text(),
            **made_by_headers(model, channel, nonce, dl, pinned=False),
            **rollback_header,
        }
        if dl.kind == "none":
            return Response(status_code=204, headers=headers)
        return Response(dl.body, media_type="application/octet-stream", headers=headers)

    def downlink_headers(model: str, dl: Downlink) -> dict[str, str]:
        """The headers that describe a downlink's body: kind, model, versions, artifact signature, sizes."""
        return {
            "X-Deltaplane-Kind": dl.kind,
            "X-Deltaplane-Model": model,
            "X-Deltaplane-Version": str(dl.version),
            "X-Deltaplane-Base": "" if dl.base is None else str(dl.base),
            "X-Deltaplane-Signature": dl.signature,
            "X-Deltaplane-Target-Sha256": dl.target_sha256,
            "X-Deltaplane-Full-Bytes": str(dl.full_bytes),
        }

    def made_by_headers(
        model: str, channel: str, nonce: str, dl: Downlink, *, pinned: bool
    ) -> dict[str, str]:
        """Which round made the answered version (``X-Deltaplane-Round``: its number, empty for a version no
        round made), signed over the request's nonce (:func:`~deltaplane.registry.downlink.made_by_statement`)."""
        rnd = made_by_round(reg.get(model, dl.version))
        stmt = made_by_statement(model, channel, dl.version, dl.target_sha256, nonce, rnd, pinned=pinned)
        return {
            "X-Deltaplane-Round": "" if rnd is None else str(rnd),
            "X-Deltaplane-Round-Signature": signer.sign(stmt).to_text(),
        }

    def pinned_download(model: str, channel: str, nonce: str, want: int, version: int) -> Response:
        """``version`` as a full model, if it is on the lineage of ``want`` (the version the device's tag serves),
        with the round that made it: what a personalized device that missed rounds adapts to, in order. No serve
        statement (it is not what the device should run now), so it can never pass for a current answer."""
        cur: int | None = want
        while cur is not None and cur > version:
            cur = reg.get(model, cur).parent
        if cur != version:
            raise NotFound(
                f"{model}@{version} is not on the lineage of the version this device is served ({want}); "
                "ask for a version between its base and that one"
            )
        check_consent(model, version)
        key = (model, version, None)
        dl = state.downlinks.get(key)
        if dl is None:
            dl = plan_downlink(reg, signer, model, version, None)
            state.downlinks.put(key, dl)
        state.count("download.pinned")
        headers = {
            **downlink_headers(model, dl),
            **made_by_headers(model, channel, nonce, dl, pinned=True),
        }
        return Response(dl.body, media_type="application/octet-stream", headers=headers)

    @app.post(
        "/v1/models/{model}/report",
        tags=["device"],
        status_code=202,
        response_model=ReportAccepted,
        responses={k: _ERRORS[k] for k in (403, 404, 422, 451)},
    )
    def report(model: ModelName, body: ReportRequest, ident: Device) -> ReportAccepted:
        """Store a device's metrics and drift summary about ``model@version``.

        Consent as on the other device routes: a device whose own cohort withdrew consent may send nothing
        (403, as uploads), and a version that contains a withdrawn cohort may no longer be served, so reports
        about it are refused too (451, as downloads): neither is stored nor enters the drift window.
        """
        reg.get(model, body.version)  # 404 for unknown model/version
        if withdrawn_among([ident.cohort], reg.withdrawn_cohorts(verify=True)):
            raise HTTPException(
                403, f"cohort {ident.cohort!r} withdrew consent; its reports are not accepted"
            )
        check_consent(model, body.version)
        closed = state.record_report(
            model,
            {
                "device": ident.device_id,
                "cohort": ident.cohort,
                "version": body.version,
                "round": body.round,
                "metrics": body.metrics,
                "at": time.time(),
            },
            None if body.summary is None else Summary(**body.summary.model_dump()),
        )
        return ReportAccepted(
            accepted=True, drift_evaluated=closed is not None, alerts=[] if closed is None else closed.alerts
        )

    # -- admin endpoints ---------------------------------------------------------------------------
    @app.post("/admin/devices", tags=["admin"], dependencies=[Admin], response_model=DeviceToken)
    def issue_token(body: DeviceTokenRequest) -> DeviceToken:
        if body.ttl_s is not None and body.ttl_s > config.max_token_ttl_s:
            raise ConfigError(f"ttl_s must be at most {config.max_token_ttl_s:.0f}. Found {body.ttl_s}")
        models = None if body.models is None else tuple(body.models)
        t = authority.issue_token(body.device_id, body.cohort, ttl_s=body.ttl_s, models=models)
        return DeviceToken(
            device_id=t.device_id,
            cohort=t.cohort,
            token=t.token,
            token_id=t.token_id,
            expires_at=t.expires_at,
            models=None if t.models is None else list(t.models),
        )

    app.include_router(
        round_router(
            config,
            state,
            device=Device,
            admin=Admin,
            resolve_tag=resolve_tag,
            errors=_ERRORS,
            rounds_store=rounds_store,
        )
    )

    @app.post("/admin/tokens/revoke", tags=["admin"], dependencies=[Admin], response_model=Revoked)
    def revoke_token(body: RevokeTokenRequest) -> Revoked:
        """Revoke one device token by its id (persisted: the revocation survives restarts)."""
        service_store.revoke_token(body.token_id, "", time.time() + config.max_token_ttl_s)
        authority.revoke(body.token_id)
        return Revoked(revoked=body.token_id, at=time.time())

    @app.post(
        "/admin/devices/{device_id}/revoke", tags=["admin"], dependencies=[Admin], response_model=Revoked
    )
    def revoke_device(device_id: Annotated[str, PathParam(pattern=NAME, max_length=128)]) -> Revoked:
        """Revoke every token issued so far to ``device_id`` (a new token may be issued afterwards)."""
        at = authority.revoke_device(device_id)
        service_store.revoke_device(device_id, at)
        return Revoked(revoked=device_id, at=at)

    @app.post("/admin/cohorts/{cohort}/withdraw", tags=["admin"], dependencies=[Admin])
    def withdraw(
        cohort: Annotated[str, PathParam(pattern=NAME, max_length=128)],
        reason: Annotated[str, Query(max_length=1000)] = "",
    ) -> dict[str, Any]:
        """Record a consent withdrawal: every version containing the cohort stops being served and promoted."""
        affected = reg.withdraw_cohort(cohort, reason=reason)
        return {
            "cohort": cohort,
            "affected": [a.ref for a in affected if a.kind == "model"],
            "affected_deltas": [a.ref for a in affected if a.kind == "delta"],
        }

    @app.post(
        "/admin/models/{model}/promote",
        tags=["admin"],
        dependencies=[Admin],
        response_model=PromoteResponse,
        responses={k: _ERRORS[k] for k in (404, 409)},
    )
    def promote_version(model: ModelName, body: PromoteRequest, response: Response) -> PromoteResponse:
        if state.evaluator is None:
            raise HTTPException(409, "this service has no evaluator configured, so it cannot gate promotions")
        res = promote(
            reg,
            f"{model}@{body.version}",
            to=body.to,
            evaluator=state.evaluator,
            tolerance=tolerance,
            raise_on_refusal=False,
        )
        out = PromoteResponse(
            promoted=res.promoted,
            candidate=res.candidate,
            previous=res.previous,
            compared_with=res.compared_with,
            candidate_metrics=_finite_or_none(res.candidate_metrics),
            baseline_metrics=_finite_or_none(res.baseline_metrics),
            regressions=res.regressions,
        )
        if not res.promoted:
            response.status_code = 409  # refused by its gates: the same body, with what it missed
        return out

    @app.post(
        "/admin/models/{model}/rollback",
        tags=["admin"],
        dependencies=[Admin],
        response_model=RollbackResponse,
        responses={404: _ERRORS[404]},
    )
    def rollback_version(
        model: ModelName, tag: Annotated[str, Query(pattern=NAME, max_length=128)] = "production"
    ) -> RollbackResponse:
        art = rollback(reg, model, tag=tag)
        return RollbackResponse(model=model, tag=tag, version=art.number, sha256=art.sha256)

    @app.get(
        "/admin/models/{model}/versions", tags=["admin"], dependencies=[Admin], responses={404: _ERRORS[404]}
    )
    def list_versions(model: ModelName) -> dict[str, Any]:
        arts = reg.versions(model)
        if not arts:
            raise NotFound(f"unknown model {model!r}")
        return {"model": model, "tags": reg.tags(model), "versions": [a.to_dict() for a in arts]}

    # drift references, alerts and windows; the trusted coordinator's evaluations: their own routers
    app.include_router(drift_router(state, admin=Admin, errors=_ERRORS))
    app.include_router(evaluation_router(state, admin=Admin, errors=_ERRORS))

    @app.get("/admin/stats", tags=["admin"], dependencies=[Admin])
    def stats() -> dict[str, Any]:
        return {
            "counters": state.counts(),
            # the stored drift monitors that could not be read at start (their reference must be set again)
            "drift_unreadable": dict(state.unreadable_monitors),
            # open drift windows that lost reports at start (unreadable rows left out), until they close
            "drift_window_losses": dict(state.window_losses),
            "rounds": {
                m: {"round": r.number, "base_version": r.base_version, "uploads": len(r.devices)}
                for m, r in state.rounds.items()
            },
            # the open SecAgg rounds by model, with the coordinator that opened each: a starting coordinator
            # aborts those whose coordinator is gone (docs/fleet.md)
            "secagg_rounds": _open_secagg_by_model(state.secagg_rounds),
        }

    return app
