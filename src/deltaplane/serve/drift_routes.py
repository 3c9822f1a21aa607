"""The service's drift endpoints: an admin sets a model's drift reference, reads its alerts and window history.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)

Admin endpoints, out of :func:`~deltaplane.serve.app.create_app`:

* ``PUT /admin/models/{model}/drift-reference`` — the reference summary and the monitor's thresholds; a spec
  whose reports could never pass :class:`SummaryModel`'s bounds is refused (422);
* ``PUT /admin/models/{model}/drift-reference/predictions/{version}`` — one version's predicted classes on
  the reference data;
* ``GET /admin/alerts`` — the drift alerts kept (per model, oldest first);
* ``GET /admin/models/{model}/drift`` — a model's closed drift windows.

The devices' summaries arrive with their reports (``POST /v1/models/{model}/report``, in the app), checked
against :class:`SummaryModel`, which lives here beside the bounds a reference is held to.
"""

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import Field

from deltaplane.errors import ConfigError, NotFound
from deltaplane.monitor import DriftMonitor, DriftSpec, Summary
from deltaplane.serve.bodies import NAME, ModelName, StrictBody

if TYPE_CHECKING:
    from deltaplane.serve.app import ServiceState

__all__ = ["DriftReferenceRequest", "PredictionReferenceRequest", "SummaryModel", "drift_router"]

#: the most features, predicted classes, projections and embedding dimensions a drift report may carry; a
#: reference needing more is refused at its PUT (no device report could ever match it)
REPORT_FEATURES, REPORT_CLASSES, REPORT_PROJECTIONS, REPORT_EMBEDDING_DIM = 4096, 65536, 1024, 65536


class SummaryModel(StrictBody):
    n: int = Field(default=0, ge=0, le=10**9)
    feature_counts: list[list[Annotated[int, Field(ge=0, le=10**9)]]] = Field(
        default_factory=list, max_length=REPORT_FEATURES
    )
    prediction_counts: list[Annotated[int, Field(ge=0, le=10**9)]] = Field(
        default_factory=list, max_length=REPORT_CLASSES
    )
    projection_counts: list[list[Annotated[int, Field(ge=0, le=10**9)]]] = Field(
        default_factory=list, max_length=REPORT_PROJECTIONS
    )
    # |sum| <= 1e15 = 1e9 embeddings x |mean| 1e6 (monitor.drift.MAX_EMBEDDING_MEAN): larger is no embedding
    # sum, and values near 1e308 overflow to NaN when a window merges them
    embedding_sum: list[Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]] = Field(
        default_factory=list, max_length=REPORT_EMBEDDING_DIM
    )
    embedding_n: int = Field(default=0, ge=0, le=10**9)
    #: inputs missing (NaN) per feature, counted apart from feature_counts (see monitor.drift.Summary)
    missing_counts: list[Annotated[int, Field(ge=0, le=10**9)]] = Field(default_factory=list, max_length=4096)


class PredictionReferenceRequest(StrictBody):
    #: the version's predicted-class counts on the drift reference's data, one per class of its spec
    prediction_counts: list[Annotated[int, Field(ge=0, le=10**9)]] = Field(
        min_length=1, max_length=REPORT_CLASSES
    )


def _reportable(spec: DriftSpec) -> None:
    """Refuse (422) a drift spec whose reports could never pass :class:`SummaryModel`'s bounds: the monitor
    would be set, answer 200, and test nothing (an ``n_classes`` of 10**30 left every prediction unreported)."""
    dim = len(spec.projections[0]) if spec.projections else 0
    for what, have, most in (
        ("features (feature_edges)", len(spec.feature_edges), REPORT_FEATURES),
        ("classes (n_classes)", spec.n_classes, REPORT_CLASSES),
        ("projections", len(spec.projections), REPORT_PROJECTIONS),
        ("embedding dimensions", dim, REPORT_EMBEDDING_DIM),
    ):
        if have > most:
            raise ConfigError(
                f"drift spec has {have} {what}, more than a device report may carry ({most}): no report could "
                "match it; monitor fewer (e.g. group classes or features)"
            )


class DriftReferenceRequest(StrictBody):
    spec: dict[str, Any]
    reference: SummaryModel
    psi_threshold: float = Field(default=0.2, gt=0)
    alpha: float = Field(default=0.01, gt=0, lt=1)
    window: int = Field(default=20, ge=1, le=100_000)
    #: distinct devices a window needs before it is evaluated; default min(3, window), so that one device can
    #: neither fill a window alone nor (with equal per-device weights) outvote the others
    min_devices: int | None = Field(default=None, ge=1, le=100_000)
    #: live samples (effective, after per-device weighting) a signal needs before it is tested
    min_samples: int = Field(default=30, ge=1, le=10**9)
    #: standardised centroid shift (fraction of the reference embeddings' RMS spread) that may flag drift
    embedding_shift_threshold: float = Field(default=0.1, gt=0, le=1e6)


def drift_router(state: "ServiceState", *, admin: Any, errors: dict[int, dict[str, Any]]) -> APIRouter:
    """The drift endpoints (see the module docstring) over ``state``; ``admin`` is the app's admin dependency."""
    router = APIRouter()
    reg = state.registry

    @router.put(
        "/admin/models/{model}/drift-reference",
        tags=["admin"],
        dependencies=[admin],
        responses={k: errors[k] for k in (404, 422)},
    )
    def set_reference(model: ModelName, body: DriftReferenceRequest) -> dict[str, Any]:
        spec = DriftSpec.from_dict(body.spec)  # ConfigError (422) naming what is malformed
        _reportable(spec)
        mon = DriftMonitor(
            spec,
            Summary(**body.reference.model_dump()),
            psi_threshold=body.psi_threshold,
            alpha=body.alpha,
            window=body.window,
            min_samples=body.min_samples,
            embedding_shift_threshold=body.embedding_shift_threshold,
            min_devices=body.min_devices if body.min_devices is not None else min(3, body.window),
        )
        state.set_monitor(model, mon)
        return {
            "model": model,
            "features": len(spec.feature_edges),
            "window": body.window,
            "min_devices": mon.min_devices,
        }

    @router.put(
        "/admin/models/{model}/drift-reference/predictions/{version}",
        tags=["admin"],
        dependencies=[admin],
        responses={k: errors[k] for k in (404, 422)},
    )
    def set_prediction_reference(
        model: ModelName,
        version: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        body: PredictionReferenceRequest,
    ) -> dict[str, Any]:
        """Version ``version``'s predicted classes on the reference data: the devices' reports on that version
        are compared with them (a report on a version without one is not tested on predictions)."""
        reg.get(model, version)  # 404 for an unknown model or version
        mon = state.set_prediction_reference(model, version, body.prediction_counts)
        if mon is None:
            raise NotFound(
                f"no drift reference set for {model!r}: PUT /admin/models/{model}/drift-reference first"
            )
        return {"model": model, "version": version, "versions": sorted(mon.prediction_references)}

    @router.get("/admin/alerts", tags=["admin"], dependencies=[admin])
    def alerts(
        model: Annotated[str | None, Query(pattern=NAME, max_length=128)] = None,
    ) -> list[dict[str, Any]]:
        return list(state.alerts) if model is None else state.alerts.of(model)

    @router.get(
        "/admin/models/{model}/drift", tags=["admin"], dependencies=[admin], responses={404: errors[404]}
    )
    def drift_history(model: ModelName) -> list[dict[str, Any]]:
        mon = state.monitors.get(model)
        if mon is None and model in state.unreadable_monitors:
            raise HTTPException(
                409,
                f"{model!r}'s stored drift monitor could not be read at start ({state.unreadable_monitors[model]}); "
                f"its reports feed no monitor until its reference is set again "
                f"(PUT /admin/models/{model}/drift-reference)",
            )
        if mon is None:
            raise NotFound(f"no drift reference set for {model!r}")
        return [r.to_dict() for r in mon.history]

    return router
