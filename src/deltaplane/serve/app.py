"""The device-facing HTTP service (FastAPI): fetch models/deltas, upload updates, report metrics; admin API.

Device endpoints (``Authorization: Bearer <device token>``, rate limited per device):

* ``GET  /v1/models/{model}/download?have=N&channel=production`` — the current version for the device's
  cohort as a signed full model or delta chain (``X-Deltaplane-*`` headers carry kind, versions, signature).
* ``GET  /v1/models/{model}/round`` — the open training round and its base version.
* ``POST /v1/models/{model}/rounds/{round}/update?num_examples=N`` — a compressed update (wire format); checked
  for size (413), round and duplicate (409), base version (409 stale), format (400), shape and NaN (422).
* ``POST /v1/models/{model}/report`` — metrics and drift summaries (histograms, not raw data).

The round endpoints (``/round``, ``/rounds/{round}/update``, ``/admin/models/{model}/rounds...``) live in
:mod:`deltaplane.serve.rounds`, a thin driver over the engine's server step (any aggregator chain).

Admin endpoints (``Authorization: Bearer <admin token>``): issue device tokens, open/close rounds (a closed
round becomes a new signed version, published as a delta), promote through the gate, roll back, set the drift
reference, read alerts and counters. ``/docs`` and ``/openapi.json`` describe everything. Every bad request
is a 4xx with a message saying what to fix; errors are never allowed to become 5xx.
"""

import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from deltaplane.engine import RunConfig, ServerStep
from deltaplane.errors import (
    ConfigError,
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
from deltaplane.monitor import DriftMonitor, DriftSpec, Summary
from deltaplane.registry import Registry, Tolerance, plan_downlink, promote, rollback
from deltaplane.registry.promotion import Evaluator
from deltaplane.serve.auth import DeviceIdentity, RateLimiter, TokenAuthority
from deltaplane.serve.rounds import RoundState, round_router
from deltaplane.serve.secagg_routes import install_secagg_routes

__all__ = ["ServiceConfig", "ServiceState", "create_app"]

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ModelName = Annotated[str, PathParam(pattern=NAME, max_length=128, description="model name")]
CHANNELS = ("production", "staging", "training")


@dataclass(frozen=True)
class ServiceConfig:
    """Service hyperparameters (stored verbatim; state lives in :class:`ServiceState`).

    Args:
        home: registry folder (must hold a registry and a signing key).
        admin_token: bearer token for ``/admin`` endpoints.
        device_secret: HMAC key for device tokens (random per process when empty: tokens then die with it).
        max_upload_bytes: uploads above this are refused with 413 before they are decoded.
        rate: per-device sustained requests per second; ``burst``: short bursts allowed above it.
        downlink_codec: codec spec for round-to-round deltas the service publishes; ``downlink_error_feedback``
            keeps what it drops on the server for the next round; ``downlink_seed`` seeds its generator.
        server_lr: FedAvg's server step (plain server SGD) when ``federation`` is not set.
        federation: the server side of a federation (``deltaplane.engine.RunConfig``): its aggregator chain
            (server optimizer, clipping, DP-FedAvg with accountant and budget, robust rule, FLTrust with the
            task's root data), its downlink codec and seed. When set, ``server_lr`` and the ``downlink_*``
            fields must keep their defaults (they would be ignored otherwise).
        tolerance: promotion gate limits (metric -> allowed drop).
    """

    home: str
    admin_token: str
    device_secret: str = ""
    max_upload_bytes: int = 8 << 20
    rate: float = 20.0
    burst: int = 40
    downlink_codec: str = "topk(0.05) | quant(bits=8)"
    downlink_error_feedback: bool = True
    downlink_seed: int = 0
    server_lr: float = 1.0
    federation: RunConfig | None = None
    tolerance: dict[str, float] = field(default_factory=lambda: {"accuracy": 0.01, "ood_accuracy": 0.02})

    def __post_init__(self) -> None:
        if len(self.admin_token) < 16:
            raise ConfigError("admin_token must be at least 16 characters")
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
        if self.max_upload_bytes < 1024:
            raise ConfigError(f"max_upload_bytes must be at least 1024. Found {self.max_upload_bytes}")


@dataclass
class ServiceState:
    """Everything the service mutates: open rounds and their server steps, drift monitors, alerts, counters."""

    registry: Registry
    evaluator: Evaluator | None = None
    rounds: dict[str, RoundState] = field(default_factory=dict)
    round_counter: dict[str, int] = field(default_factory=dict)
    #: one engine server step per model, alive across rounds (optimizer moments, DP accountant, downlink EF)
    steps: dict[str, ServerStep] = field(default_factory=dict)
    monitors: dict[str, DriftMonitor] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    downlinks: dict[tuple[str, int, int | None], Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _bases: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def base_state(self, model: str, version: int) -> dict[str, Any]:
        """The (verified) weights of a base version, cached: versions are immutable."""
        key = (model, version)
        if key not in self._bases:
            self._bases[key] = self.registry.load_state(self.registry.get(model, version))
        return self._bases[key]


# -- request / response schemas ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceTokenRequest(_Strict):
    device_id: str = Field(pattern=NAME, max_length=128)
    cohort: str = Field(default="default", pattern=NAME, max_length=128)


class DeviceToken(BaseModel):
    device_id: str
    cohort: str
    token: str


class PromoteRequest(_Strict):
    version: int = Field(ge=1, le=2**31 - 1)
    to: str = Field(default="production", pattern=NAME, max_length=128)


class PromoteResponse(BaseModel):
    promoted: bool
    candidate: str
    previous: str | None
    candidate_metrics: dict[str, float]
    baseline_metrics: dict[str, float] | None
    regressions: list[str]


class RollbackResponse(BaseModel):
    model: str
    tag: str
    version: int
    sha256: str


class SummaryModel(_Strict):
    n: int = Field(default=0, ge=0, le=10**9)
    feature_counts: list[list[Annotated[int, Field(ge=0, le=10**9)]]] = Field(
        default_factory=list, max_length=4096
    )
    prediction_counts: list[Annotated[int, Field(ge=0, le=10**9)]] = Field(
        default_factory=list, max_length=65536
    )
    projection_counts: list[list[Annotated[int, Field(ge=0, le=10**9)]]] = Field(
        default_factory=list, max_length=1024
    )
    embedding_sum: list[float] = Field(default_factory=list, max_length=65536)
    embedding_n: int = Field(default=0, ge=0, le=10**9)


class ReportRequest(_Strict):
    version: int = Field(ge=1, le=2**31 - 1)
    round: int | None = Field(default=None, ge=1, le=2**31 - 1)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)
    summary: SummaryModel | None = None


class ReportAccepted(BaseModel):
    accepted: bool
    drift_evaluated: bool
    alerts: list[str]


class DriftReferenceRequest(_Strict):
    spec: dict[str, Any]
    reference: SummaryModel
    psi_threshold: float = Field(default=0.2, gt=0)
    alpha: float = Field(default=0.01, gt=0, lt=1)
    window: int = Field(default=20, ge=1, le=100_000)


class Message(BaseModel):
    detail: str


_ERRORS: dict[int, dict[str, Any]] = {
    code: {"model": Message, "description": text}
    for code, text in {
        400: "malformed request or payload",
        401: "missing or invalid token",
        404: "unknown model, version or tag",
        409: "conflict: round not open, duplicate upload, stale base version, promotion refused",
        413: "upload larger than the configured limit",
        422: "well-formed but unusable (shape mismatch, NaN/Inf, invalid parameters)",
        429: "per-device rate limit exceeded (see Retry-After)",
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
    (DeltaplaneError, 400),
]


def status_for(exc: Exception) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 400


def create_app(
    config: ServiceConfig, *, state: ServiceState | None = None, evaluator: Evaluator | None = None
) -> FastAPI:
    """Build the FastAPI application over the registry at ``config.home``."""
    state = state or ServiceState(Registry(Path(config.home)), evaluator=evaluator)
    reg = state.registry
    signer = reg.signer
    authority = TokenAuthority(
        config.device_secret.encode() if config.device_secret else secrets.token_bytes(32)
    )
    limiter = RateLimiter(rate=config.rate, burst=config.burst)
    tolerance = Tolerance(dict(config.tolerance))
    bearer = HTTPBearer(
        auto_error=False, description="device token (device endpoints) or admin token (/admin)"
    )

    app = FastAPI(
        title="deltaplane",
        version="1",
        description="Ship model versions and deltas to devices; collect compressed updates; monitor drift.",
        responses={k: v for k, v in _ERRORS.items() if k in (401, 429)},
    )
    app.state.deltaplane = state
    app.state.authority = authority

    @app.exception_handler(DeltaplaneError)
    async def _typed(_: Request, exc: DeltaplaneError) -> JSONResponse:
        state.counters[f"rejected.{type(exc).__name__}"] += 1
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        state.counters["rejected.validation"] += 1
        errors = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]
        ]
        return JSONResponse({"detail": "invalid request: " + "; ".join(errors)}, status_code=422)

    # -- auth dependencies -------------------------------------------------------------------------
    def device(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> DeviceIdentity:
        ident = authority.check(creds.credentials) if creds else None
        if ident is None:
            state.counters["rejected.unauthenticated"] += 1
            raise HTTPException(
                401,
                "missing or invalid device token; ask an admin for one (POST /admin/devices)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        wait = limiter.acquire(ident.device_id)
        if wait > 0:
            state.counters["rejected.rate_limited"] += 1
            raise HTTPException(
                429,
                f"rate limit of {config.rate}/s exceeded for device {ident.device_id}; retry in {wait:.2f}s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        return ident

    def admin(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if creds is None or not secrets.compare_digest(
            creds.credentials.encode(), config.admin_token.encode()
        ):
            state.counters["rejected.unauthenticated_admin"] += 1
            raise HTTPException(401, "missing or invalid admin token", headers={"WWW-Authenticate": "Bearer"})

    Device = Annotated[DeviceIdentity, Depends(device)]
    Admin = Depends(admin)
    # secure aggregation rounds: their own router (serve/secagg_routes.py), behind the same auth
    app.state.secagg_rounds = install_secagg_routes(app, state, config, device=device, admin=admin)

    def resolve_tag(model: str, channel: str, cohort: str) -> int:
        tags = reg.tags(model)
        for tag in (f"{channel}.{cohort}", channel):
            if tag in tags:
                return tags[tag]
        if channel == "training" and "production" in tags:
            return tags["production"]
        if not reg.versions(model):
            raise NotFound(f"unknown model {model!r}")
        raise NotFound(f"{model} has no {channel!r} version (tags: {sorted(tags)})")

    # -- device endpoints --------------------------------------------------------------------------
    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/v1/models/{model}/download",
        tags=["device"],
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "signed full model or delta chain",
            },
            204: {"description": "the device already holds the current version"},
            **{k: _ERRORS[k] for k in (404, 422)},
        },
        response_class=Response,
    )
    def download(
        model: ModelName,
        ident: Device,
        have: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="version the device holds")] = None,
        channel: Annotated[str, Query(pattern="^(production|staging|training)$")] = "production",
    ) -> Response:
        want = resolve_tag(model, channel, ident.cohort)
        if have is not None and have > want:
            have = None  # the device is ahead (e.g. after a rollback): only a full model is safe
        key = (model, want, have)
        dl = state.downlinks.get(key)
        if dl is None:
            dl = plan_downlink(reg, signer, model, want, have)
            with state.lock:
                if len(state.downlinks) > 4096:
                    state.downlinks.clear()
                state.downlinks[key] = dl  # artifacts are immutable, so a planned downlink never goes stale
        state.counters[f"download.{dl.kind}"] += 1
        state.counters["download.bytes"] += len(dl.body)
        state.counters["download.full_bytes"] += dl.full_bytes if dl.kind != "none" else 0
        headers = {
            "X-Deltaplane-Kind": dl.kind,
            "X-Deltaplane-Model": model,
            "X-Deltaplane-Version": str(dl.version),
            "X-Deltaplane-Base": "" if dl.base is None else str(dl.base),
            "X-Deltaplane-Signature": dl.signature,
            "X-Deltaplane-Target-Sha256": dl.target_sha256,
            "X-Deltaplane-Full-Bytes": str(dl.full_bytes),
        }
        if dl.kind == "none":
            return Response(status_code=204, headers=headers)
        return Response(dl.body, media_type="application/octet-stream", headers=headers)

    @app.post(
        "/v1/models/{model}/report",
        tags=["device"],
        status_code=202,
        response_model=ReportAccepted,
        responses={k: _ERRORS[k] for k in (404, 422)},
    )
    def report(model: ModelName, body: ReportRequest, ident: Device) -> ReportAccepted:
        reg.get(model, body.version)  # 404 for unknown model/version
        alerts: list[str] = []
        evaluated = False
        with state.lock:
            log = state.reports.setdefault(model, [])
            log.append(
                {
                    "device": ident.device_id,
                    "cohort": ident.cohort,
                    "version": body.version,
                    "round": body.round,
                    "metrics": body.metrics,
                    "at": time.time(),
                }
            )
            del log[:-1000]
            mon = state.monitors.get(model)
            if body.summary is not None and mon is not None:
                result = mon.ingest(Summary(**body.summary.model_dump()))
                if result is not None:
                    evaluated = True
                    alerts = result.alerts
                    for a in alerts:
                        state.alerts.append(
                            {"model": model, "alert": a, "at": time.time(), "version": body.version}
                        )
        return ReportAccepted(accepted=True, drift_evaluated=evaluated, alerts=alerts)

    # -- admin endpoints ---------------------------------------------------------------------------
    @app.post("/admin/devices", tags=["admin"], dependencies=[Admin], response_model=DeviceToken)
    def issue_token(body: DeviceTokenRequest) -> DeviceToken:
        return DeviceToken(
            device_id=body.device_id, cohort=body.cohort, token=authority.issue(body.device_id, body.cohort)
        )

    app.include_router(
        round_router(
            config,
            state,
            device=Device,
            admin=Admin,
            resolve_tag=resolve_tag,
            errors=_ERRORS,
            name_pattern=NAME,
        )
    )

    @app.post(
        "/admin/models/{model}/promote",
        tags=["admin"],
        dependencies=[Admin],
        response_model=PromoteResponse,
        responses={k: _ERRORS[k] for k in (404, 409)},
    )
    def promote_version(model: ModelName, body: PromoteRequest) -> PromoteResponse:
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
            candidate_metrics=res.candidate_metrics,
            baseline_metrics=res.baseline_metrics,
            regressions=res.regressions,
        )
        if not res.promoted:
            return JSONResponse(out.model_dump(), status_code=409)  # type: ignore[return-value]
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

    @app.put(
        "/admin/models/{model}/drift-reference",
        tags=["admin"],
        dependencies=[Admin],
        responses={k: _ERRORS[k] for k in (404, 422)},
    )
    def set_reference(model: ModelName, body: DriftReferenceRequest) -> dict[str, Any]:
        try:
            spec = DriftSpec.from_dict(body.spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"drift spec is malformed: {exc}") from None
        mon = DriftMonitor(
            spec,
            Summary(**body.reference.model_dump()),
            psi_threshold=body.psi_threshold,
            alpha=body.alpha,
            window=body.window,
        )
        with state.lock:
            state.monitors[model] = mon
        return {"model": model, "features": len(spec.feature_edges), "window": body.window}

    @app.get("/admin/alerts", tags=["admin"], dependencies=[Admin])
    def alerts(
        model: Annotated[str | None, Query(pattern=NAME, max_length=128)] = None,
    ) -> list[dict[str, Any]]:
        return [a for a in state.alerts if model is None or a["model"] == model]

    @app.get("/admin/stats", tags=["admin"], dependencies=[Admin])
    def stats() -> dict[str, Any]:
        return {
            "counters": dict(state.counters),
            "rounds": {
                m: {"round": r.number, "base_version": r.base_version, "uploads": len(r.devices)}
                for m, r in state.rounds.items()
            },
        }

    @app.get(
        "/admin/models/{model}/drift", tags=["admin"], dependencies=[Admin], responses={404: _ERRORS[404]}
    )
    def drift_history(model: ModelName) -> list[dict[str, Any]]:
        mon = state.monitors.get(model)
        if mon is None:
            raise NotFound(f"no drift reference set for {model!r}")
        return [r.to_dict() for r in mon.history]

    return app
