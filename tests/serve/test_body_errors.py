"""A body that is not the JSON its route takes gets a 4xx saying which route, what shape, and what broke."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute

from deltaplane.serve.bodies import content_length

from .conftest import ADMIN

BAD_BODIES = {
    "not JSON": (b"{not json", 422, "is not valid JSON (Expecting property name"),
    "not UTF-8": (b'"\xff"', 400, "could not be read as JSON"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, 400, "could not be read as JSON"),
    "an array": (b"[1, 2]", 422, "got JSON of another shape"),
    "null": (b"null", 422, "got no body (or JSON null)"),
}


def _json_routes(routes):
    """(method, path) of every route taking a JSON body, in included routers too, path parameters filled."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router
            yield from _json_routes(route.original_router.routes)
        elif (
            isinstance(route, APIRoute) and route.body_field is not None and not route.path.startswith("/ui")
        ):
            for method in route.methods - {"HEAD"}:
                yield (
                    method,
                    re.sub(r"\{[^}]+\}", lambda m: "cnn" if "model" in m.group() else "1", route.path),
                )


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_every_json_route_says_what_to_fix_in_a_malformed_body(service, kind):
    """FastAPI answered `body.1: JSON decode error` (422), or `There was an error parsing the body` (400) for
    bytes its JSON reader raised on: neither names the route nor the JSON it takes."""
    body, status, says = BAD_BODIES[kind]
    device = {"Authorization": f"Bearer {service.admin.issue_token('d1')}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    routes = list(_json_routes(service.app.routes))
    assert len(routes) == 9, (
        routes
    )  # every JSON route of the service, device and admin (SecAgg open and the coordinator's evaluation included)
    for method, path in routes:
        headers = {**(device if path.startswith("/v1") else admin), "Content-Type": "application/json"}
        resp = service.http.request(method, path, content=body, headers=headers)
        detail = resp.json()["detail"]
        assert resp.status_code == status, (method, path, resp.status_code, detail)
        assert detail.startswith(f"{method} {path}: ") and says in detail, (method, path, detail)
        assert "the body must be " in detail and "Content-Type: application/json" in detail, detail


def test_the_shape_named_is_the_routes_own(service):
    resp = service.http.post("/admin/devices", content=b"{", headers={"Authorization": f"Bearer {ADMIN}"})
    detail = resp.json()["detail"]
    assert (
        resp.status_code == 422 and 'a JSON object with "device_id" (required), "cohort", "ttl_s"' in detail
    )
    # a field's own error keeps its precise message
    resp = service.http.post(
        "/admin/devices", json={"device_id": 5}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert resp.status_code == 422 and resp.json()["detail"].startswith("invalid request: body.device_id")


@pytest.mark.parametrize(
    ("value", "n"),
    [("12", 12), (b"0", 0), (" 7 ", 7), ("²", None), ("٣", None), ("+5", None), ("-1", None), ("1e3", None),
     ("", None), ("0x10", None), ("9" * 5000, 10**18), (b"\xb2", None)],
)  # fmt: skip
def test_content_length_is_strict_ascii_digits(value, n):
    """str.isdigit() took "²" and "٣" (which int() reads as 3) for a byte count; 5,000 digits raised in int()."""
    assert content_length(value) == n


def test_a_secagg_message_with_a_non_ascii_content_length_is_refused(service):
    """read_capped, the SecAgg stages' reader, took "²" as a length (str.isdigit); int("²") then raised."""
    import asyncio

    from fastapi import HTTPException, Request

    from deltaplane.serve.bodies import read_capped

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", "²".encode())]}

    async def receive():
        return {"type": "http.request", "body": b"x", "more_body": False}

    with pytest.raises(HTTPException) as err:
        asyncio.run(read_capped(Request(scope, receive), 1024))
    assert err.value.status_code == 400 and "ASCII digits" in err.value.detail
