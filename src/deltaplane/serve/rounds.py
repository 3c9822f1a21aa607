"""The service's training rounds: a thin HTTP driver over the engine's server step.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)

Device and admin endpoints for rounds live here, out of :func:`~deltaplane.serve.app.create_app`:

* ``GET  /v1/models/{model}/round`` — the open round and its base version;
* ``POST /v1/models/{model}/rounds/{round}/update?num_examples=N`` — a compressed update (wire format),
  checked for size (413), round and duplicate (409), base version (409 stale), format (400), shape (422),
  then handed to the server step, whose chain validates it (NaN/Inf, norm bound: 422);
* ``POST /admin/models/{model}/rounds`` and ``.../rounds/{round}/close`` — open a round; close it: the
  server step aggregates (the configured chain: robust rule, clipping, DP-FedAvg with its accountant and
  budget, FedAdam & co. or server SGD), compresses the downlink and publishes a signed version; the response
  carries the round's measurements (ε spent, clipped fraction, clip norm, noise...).

One :class:`~deltaplane.engine.ServerStep` per model lives across rounds (server optimizer moments, the DP
accountant and the downlink residual are state of the federation, not of one round).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from deltaplane.aggregation import build_aggregator
from deltaplane.codecs import Compressor, decode_delta, decompress, unpack
from deltaplane.codecs.wire import check_base
from deltaplane.delta import Delta
from deltaplane.engine import ServerStep, make_task
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.errors import ConfigError, DecodeError, InvalidUpdate, NotFound, ShapeMismatch
from deltaplane.registry import Registry, publish_update

if TYPE_CHECKING:
    from deltaplane.serve.app import ServiceConfig, ServiceState

__all__ = ["RegistryPublisher", "RoundState", "round_router", "server_step_for"]


@dataclass
class RoundState:
    """One open training round: its base version and who has uploaded to it."""

    model: str
    number: int
    base_version: int
    devices: set[str] = field(default_factory=set)
    examples: float = 0.0
    opened_at: float = field(default_factory=time.time)


@dataclass
class RegistryPublisher:
    """The service's downlink: register ``base + decode(compress(update))`` as a signed model version and the
    payload as its delta (:func:`~deltaplane.registry.publish_update`)."""

    registry: Registry
    model: str
    compressor: Compressor
    published: list[int] = field(default_factory=list)

    def publish(self, update: Delta, *, base_version: int, lineage: dict) -> tuple[bytes, Delta]:
        version, delta = publish_update(
            self.registry, self.model, base_version, update, compressor=self.compressor, lineage=lineage
        )
        self.published.append(version.number)
        payload = self.registry.read(delta)
        return payload, decompress(payload, expect_base=(self.model, base_version))


def server_step_for(config: "ServiceConfig", registry: Registry, model: str, base_version: int) -> ServerStep:
    """The server step of ``model``: ``config.federation``'s chain and downlink when set, else plain FedAvg with
    ``config.server_lr`` and ``config.downlink_codec``."""
    run = config.federation
    initial = registry.load_state(registry.get(model, base_version))
    if run is None:
        compressor = Compressor(
            config.downlink_codec, error_feedback=config.downlink_error_feedback, seed=config.downlink_seed
        )
        return ServerStep(
            build_aggregator(server_lr=config.server_lr),
            RegistryPublisher(registry, model, compressor),
            initial,
            base_id=model,
        )
    compressor = Compressor(
        run.downlink_codec,
        error_feedback=run.downlink_error_feedback,
        seed=derive_seed(run.seed, Stream.DOWNLINK_CODEC),
    )
    return ServerStep.for_run(
        run, make_task(run), initial, base_id=model, publisher=RegistryPublisher(registry, model, compressor)
    )


# -- schemas ------------------------------------------------------------------------------------------------
class OpenRoundRequest(BaseModel):
    model_config = {"extra": "forbid"}
    base_version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="defaults to the training (else production) tag"
    )


class RoundInfo(BaseModel):
    model: str
    round: int
    base_version: int
    uploads: int
    open: bool


class UploadAccepted(BaseModel):
    accepted: bool
    round: int
    uploads: int


class CloseRoundResponse(BaseModel):
    model: str
    round: int
    uploads: int
    version: int
    delta_bytes: int
    full_bytes: int
    #: updates the server step refused while the round was open (NaN/Inf, norm bound...)
    rejected: int = 0
    #: the aggregator chain's measurements: epsilon, clipped_fraction, clip, noise_std, server_step...
    measurements: dict[str, float] = Field(default_factory=dict)


def round_router(
    config: "ServiceConfig",
    state: "ServiceState",
    *,
    device: Any,
    admin: Any,
    resolve_tag: Callable[[str, str, str], int],
    errors: dict[int, dict[str, Any]],
    name_pattern: str,
) -> APIRouter:
    """The round endpoints (see the module docstring) over ``state``; ``device``/``admin`` are the app's
    auth dependencies."""
    router = APIRouter()
    reg = state.registry
    ModelName = Annotated[str, PathParam(pattern=name_pattern, max_length=128, description="model name")]

    @router.get(
        "/v1/models/{model}/round", tags=["device"], response_model=RoundInfo, responses={404: errors[404]}
    )
    def round_info(model: ModelName, ident: device) -> RoundInfo:
        r = state.rounds.get(model)
        if r is None:
            raise NotFound(f"no open round for {model!r}")
        return RoundInfo(
            model=model, round=r.number, base_version=r.base_version, uploads=len(r.devices), open=True
        )

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }

    @router.post(
        "/v1/models/{model}/rounds/{round_id}/update",
        tags=["device"],
        status_code=202,
        response_model=UploadAccepted,
        openapi_extra=upload_body,
        responses={k: errors[k] for k in (400, 404, 409, 413, 422)},
    )
    async def upload(
        model: ModelName,
        round_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        request: Request,
        ident: device,
        num_examples: Annotated[float, Query(gt=0, le=1e12)] = 1.0,
    ) -> UploadAccepted:
        limit = config.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > 4 * limit):
            state.counters["rejected.too_large"] += 1
            raise HTTPException(413, f"upload of {declared} bytes exceeds the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():  # enforce the limit while reading: Content-Length can lie
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 4 * limit:
                break
        if size > limit:
            # A moderately oversized body was drained (up to 4x the limit) before answering, so the client
            # reads a clean 413 instead of a connection reset while it is still sending.
            state.counters["rejected.too_large"] += 1
            raise HTTPException(
                413, f"upload of {declared or 'more than ' + str(limit)} bytes exceeds the {limit}-byte limit"
            )
        payload = b"".join(chunks)
        r = state.rounds.get(model)
        if r is None:
            raise HTTPException(409, f"no open round for {model!r}; wait for the next round")
        if r.number != round_id:
            raise HTTPException(
                409, f"round {round_id} is not open; the open round of {model!r} is {r.number}"
            )
        if not payload:
            raise DecodeError("empty upload; send a wire-format payload made by deltaplane.Compressor")

        def validate() -> Delta:
            # Parse the frame and check names/shapes/dtypes against the base *before* decoding: a small
            # payload that claims a huge shape must not make the server allocate it.
            header, trees = unpack(payload)
            check_base(header, (model, r.base_version))
            base = state.base_state(model, r.base_version)
            if trees.keys() != base.keys():
                missing, extra = sorted(set(base) - set(trees)), sorted(set(trees) - set(base))
                raise ShapeMismatch(
                    f"update tensors differ from the base: missing {missing[:5]}, unknown {extra[:5]}"
                )
            for k, (dt, e) in trees.items():
                if tuple(e.shape) != tuple(base[k].shape) or dt != base[k].dtype:
                    raise ShapeMismatch(
                        f"tensor '{k}': update declares shape {list(e.shape)} {dt}, "
                        f"the base has {list(base[k].shape)} {base[k].dtype}"
                    )
            return decode_delta(trees)

        delta = await run_in_threadpool(validate)
        with state.lock:
            if state.rounds.get(model) is not r:
                raise HTTPException(409, f"round {round_id} closed while the upload was being checked")
            if ident.device_id in r.devices:
                raise HTTPException(409, f"device {ident.device_id} already uploaded to round {round_id}")
            step = state.steps[model]
            if not step.receive_delta(ident.device_id, delta, num_examples):
                raise InvalidUpdate(f"update refused: {step.last_rejection.error}")  # type: ignore[union-attr]
            r.devices.add(ident.device_id)
            r.examples += num_examples
            state.counters["uploads.accepted"] += 1
            state.counters["uploads.bytes"] += len(payload)
            n = len(r.devices)
        return UploadAccepted(accepted=True, round=round_id, uploads=n)

    @router.post(
        "/admin/models/{model}/rounds",
        tags=["admin"],
        dependencies=[admin],
        response_model=RoundInfo,
        responses={k: errors[k] for k in (404, 409)},
    )
    def open_round(model: ModelName, body: OpenRoundRequest) -> RoundInfo:
        base = body.base_version if body.base_version is not None else resolve_tag(model, "training", "")
        art = reg.get(model, base)
        if art.kind != "model":
            raise ConfigError(f"{art.ref} is a delta; a round needs a model version as its base")
        with state.lock:
            if model in state.rounds:
                raise HTTPException(
                    409, f"round {state.rounds[model].number} of {model!r} is still open; close it first"
                )
            step = state.steps.get(model)
            if step is None:
                step = state.steps[model] = server_step_for(config, reg, model, base)
            number = state.round_counter.get(model, 0) + 1
            state.round_counter[model] = number
            step.open(number, version=base, state=state.base_state(model, base))
            state.rounds[model] = RoundState(model, number, base)
        return RoundInfo(model=model, round=number, base_version=base, uploads=0, open=True)

    @router.post(
        "/admin/models/{model}/rounds/{round_id}/close",
        tags=["admin"],
        dependencies=[admin],
        response_model=CloseRoundResponse,
        responses={k: errors[k] for k in (404, 409)},
    )
    def close_round(
        model: ModelName, round_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)]
    ) -> CloseRoundResponse:
        with state.lock:
            r = state.rounds.get(model)
            if r is None or r.number != round_id:
                raise HTTPException(409, f"round {round_id} of {model!r} is not open")
            if not r.devices:
                raise HTTPException(
                    409, f"round {round_id} has no accepted uploads yet; nothing to aggregate"
                )
            del state.rounds[model]
            step = state.steps[model]
            outcome = step.close()  # PrivacyBudgetExceeded (409) leaves the model where it was
        publisher: RegistryPublisher = step.publisher  # type: ignore[assignment]
        version = reg.get(model, publisher.published[-1])
        reg.set_tag(model, "training", version.number, action="round", reason=f"round {r.number}")
        return CloseRoundResponse(
            model=model,
            round=r.number,
            uploads=len(r.devices),
            version=version.number,
            delta_bytes=len(outcome.downlink_payload),
            full_bytes=version.size,
            rejected=len(outcome.rejections),
            measurements={k: float(v) for k, v in outcome.measurements.items()},
        )

    return router
