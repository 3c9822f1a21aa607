"""The trusted coordinator's evaluation of a round's published version (``fleet coordinate --trusted``).

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)

* ``PUT /admin/models/{model}/rounds/{kind}/{round}/evaluation`` (admin) — its accuracy on the task's test
  set, that set's size and whether it diverged, kept by the service
  (:meth:`~deltaplane.serve.app.ServiceState.record_evaluation`) and shown on the Fleet page beside the
  devices' held-out figures.
"""

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import Field

from deltaplane.errors import ConfigError
from deltaplane.serve.bodies import ModelName, StrictBody

if TYPE_CHECKING:
    from deltaplane.serve.app import ServiceState

__all__ = ["EvaluationRequest", "evaluation_router"]


class EvaluationRequest(StrictBody):
    """A trusted coordinator's measure of a published version (``fleet coordinate --trusted``)."""

    version: int = Field(ge=1, le=2**31 - 1, description="the version the round published")
    test_accuracy: float = Field(
        ge=0, le=1, allow_inf_nan=False, description="its accuracy on the task's test set, in [0, 1]"
    )
    test_samples: int = Field(ge=1, le=2**31 - 1, description="the test set's size")
    diverged: bool = Field(
        default=False,
        description="whether this version diverged (its test loss NaN or above 3x the initial model's): every "
        "diverging version carries it, though the coordinator warns once a run",
    )


def evaluation_router(state: "ServiceState", *, admin: Any, errors: dict[int, dict[str, Any]]) -> APIRouter:
    """The evaluation endpoint over ``state``; ``admin`` is the app's admin dependency."""
    router = APIRouter()
    reg = state.registry

    @router.put(
        "/admin/models/{model}/rounds/{kind}/{number}/evaluation",
        tags=["admin"],
        dependencies=[admin],
        responses={422: errors[422]},
    )
    def set_evaluation(
        model: ModelName,
        kind: Literal["plain", "secagg"],
        number: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        body: EvaluationRequest,
    ) -> dict[str, Any]:
        """The trusted coordinator's evaluation of the version round ``number`` published: its accuracy on the
        task's test set, that set's size and whether it diverged, shown on the Fleet page beside the devices'
        held-out figures (422: an unknown version, or not the one that round published)."""
        if body.version not in {a.number for a in reg.versions(model)}:
            raise ConfigError(f"{model!r} has no version {body.version} to evaluate")
        kept = state.record_evaluation(model, kind, number, body.version, body.model_dump())
        return {"model": model, "version": body.version} | kept

    return router
