"""The enrollment authority's revocation list on the service: uploaded by the operator, fetched by devices.

* ``POST /admin/secagg/revocations`` (admin token; body: the file ``deltaplane keys revoke`` writes, at most
  :data:`~deltaplane.aggregation.secagg.revocation.REVOCATIONS_MAX_BYTES`) replaces the service's list
  (``serve --secagg-revocations FILE``) atomically, without a restart, once it decodes (else 400), the
  enrollment authority signed it (``serve --secagg-enrollment-authority``; else 422), it is current (else 422)
  and its sequence does not go back (else 409), neither from the list held nor from the highest the service has
  ever held. The next authenticated round open reads it.
* ``GET /v1/secagg/revocations`` (device token) answers the list as held (404: none), so a fleet device takes a
  newer one before each authenticated round (:func:`deltaplane.serve.fleet.refresh_revocations`).

What this does and does not make the service able to do: a device verifies every list under its own trusted
authority key and never takes a lower sequence than it holds (persisted across restarts), so the service can
neither forge a list nor roll a device back. It *can* withhold a newer list; the list's next update bounds
that: past it (plus :data:`~deltaplane.aggregation.secagg.revocation.CLOCK_SKEW_S`) the device refuses
authenticated rounds until it gets a current list.

The service keeps its own high-water mark too (given the authority key): the highest list it has held per
authority, number and digest, in its database (:meth:`~deltaplane.serve.service_store.ServiceStore.hold_revocations`).
Its list file replaced by hand with an older list, validly signed (a restore from backup, someone with the file
but not the authority key), is refused at start, at each round open and at each fetch
(:class:`~deltaplane.aggregation.secagg.errors.RevocationRollback`, naming both numbers), across restarts:
otherwise the service would seat the devices the newer list revokes.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from deltaplane.aggregation.secagg.errors import RevocationRollback, SecAggAuthError
from deltaplane.aggregation.secagg.identity import TrustedAuthorities
from deltaplane.aggregation.secagg.revocation import (
    REVOCATIONS_MAX_BYTES,
    RevocationList,
    read_server_revocations,
    replace_server_revocations,
)
from deltaplane.errors import DecodeError
from deltaplane.serve.bodies import read_capped
from deltaplane.textfile import read_bounded_bytes

if TYPE_CHECKING:
    from deltaplane.serve.service_store import ServiceStore

__all__ = [
    "REVOCATIONS_ADMIN_PATH",
    "REVOCATIONS_DEVICE_PATH",
    "check_revocations_at_start",
    "install_revocation_routes",
    "read_service_revocations",
    "server_trust",
    "unchecked_revocations_warning",
]

#: where the operator uploads a new list, and where devices fetch the current one
REVOCATIONS_ADMIN_PATH = "/admin/secagg/revocations"
REVOCATIONS_DEVICE_PATH = "/v1/secagg/revocations"


def server_trust(config: Any) -> TrustedAuthorities | None:
    """The enrollment authority keys the service verifies revocation lists under
    (``config.secagg_authority``: ``enrollment.ed25519.pub``; None when not given), read at each use so a
    replaced key file applies without a restart."""
    path = config.secagg_authority
    return TrustedAuthorities.from_file(path) if path else None


def read_service_revocations(
    config: Any, store: ServiceStore, *, now: float | None = None, fix: str = ""
) -> RevocationList:
    """The service's revocation list file (``config.secagg_revocations``), as every reading of it takes it:
    :func:`~deltaplane.aggregation.secagg.revocation.read_server_revocations` (verified under
    ``config.secagg_authority`` when given; given ``now``, current), then, verified, checked against and
    recorded as the highest list of its authority the service has held (``store``): an older one is a
    :class:`~deltaplane.aggregation.secagg.errors.RevocationRollback`. An unverified list (no authority key)
    neither raises nor moves the mark: anyone could have numbered it."""
    trusted = server_trust(config)
    rl = read_server_revocations(config.secagg_revocations, trusted, now=now, fix=fix)
    if trusted is not None:
        store.hold_revocations(rl, source=config.secagg_revocations)
    return rl


def check_revocations_at_start(config: Any, store: ServiceStore) -> None:
    """Refuse to start a service whose revocation list (``config.secagg_revocations``) is not its enrollment
    authority's (``config.secagg_authority``): another authority's list, a forged or a malformed one is a
    :class:`~deltaplane.errors.ConfigError` naming the file and the authority it trusts, and a list older than
    the highest of that authority the service has held (``store``) a
    :class:`~deltaplane.aggregation.secagg.errors.RevocationRollback` naming both numbers, at start rather than
    at the first round open. A missing file is fine (an upload creates it), and so is a stale one (an upload
    replaces it; round opens refuse it until then). Without the authority key nothing is checked here:
    :func:`unchecked_revocations_warning` says so."""
    trusted = server_trust(config)  # an unreadable or malformed key fails here, with or without a list yet
    path = config.secagg_revocations
    if trusted is not None and path and os.path.lexists(path):
        read_service_revocations(config, store)


def unchecked_revocations_warning(config: Any) -> str | None:
    """The warning a service given a revocation list but no enrollment authority key states at start (None
    otherwise): it then uses the list unchecked (any file there is taken as the authority's) and refuses
    uploads."""
    if not config.secagg_revocations or config.secagg_authority:
        return None
    return (
        f"warning: --secagg-revocations {config.secagg_revocations} is used unchecked: without "
        "--secagg-enrollment-authority enrollment.ed25519.pub the service does not verify the list's signature "
        "or authority, nor keep it from going back to an older list (devices still verify their own copy), and "
        "refuses uploads of a newer list"
    )


def install_revocation_routes(
    app: FastAPI, state: Any, config: Any, *, device: Any, admin: Any, store: ServiceStore
) -> None:
    """Add the upload (admin) and fetch (device) endpoints of the service's revocation list to ``app``; ``store``
    keeps the highest list the service has held."""
    router = APIRouter()
    lock = threading.Lock()  # check-then-replace of the file is one step: two uploads never interleave

    @router.get(
        REVOCATIONS_DEVICE_PATH,
        tags=["device", "secagg"],
        dependencies=[Depends(device)],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "no list"}},
    )
    def fetch() -> Response:
        """The service's revocation list as held (its signature is for the device to check), 404 for none; 409
        for a file older than the highest list the service has held (the device keeps its own)."""
        path = config.secagg_revocations
        if not path or not os.path.exists(path):
            raise HTTPException(404, "this service holds no revocation list")
        if config.secagg_authority:
            try:
                data = read_service_revocations(config, store).to_bytes()
            except RevocationRollback as exc:
                raise HTTPException(409, str(exc)) from None
        else:
            data = read_bounded_bytes(path, limit=REVOCATIONS_MAX_BYTES, what="revocation list")
        state.counters["secagg.revocations_served"] += 1
        return Response(data, media_type="application/octet-stream")

    @router.post(REVOCATIONS_ADMIN_PATH, tags=["admin", "secagg"], dependencies=[Depends(admin)])
    async def upload(request: Request) -> dict[str, Any]:
        """Replace the service's revocation list with the body's, atomically, if it is the authority's, current
        and not older than the held one; the next authenticated round open uses it."""
        if not config.secagg_revocations:
            raise HTTPException(
                409,
                "this service keeps no revocation list: restart it with --secagg-revocations FILE (the file "
                "uploads replace; it may not exist yet) and --secagg-enrollment-authority enrollment.ed25519.pub",
            )
        trusted = server_trust(config)
        if trusted is None:
            raise HTTPException(
                409,
                "this service cannot verify a revocation list: restart it with --secagg-enrollment-authority "
                "enrollment.ed25519.pub (the authority's public key, `deltaplane keys enrollment` wrote it)",
            )
        data = await read_capped(
            request,
            REVOCATIONS_MAX_BYTES,
            cap="a revocation list's",
            empty="send the file `deltaplane keys revoke` wrote",
        )

        def replace() -> tuple[Any, bool]:
            with lock:
                path = config.secagg_revocations
                rl, replaced = replace_server_revocations(
                    path, data, trusted, now=time.time(), marks=store.revocation_marks()
                )
                store.hold_revocations(rl, source=path)
                return rl, replaced

        try:
            rl, replaced = await run_in_threadpool(replace)
        except DecodeError as exc:
            state.counters["secagg.revocations_refused"] += 1
            raise HTTPException(400, f"not a revocation list: {exc}") from None
        except RevocationRollback as exc:
            state.counters["secagg.revocations_refused"] += 1
            raise HTTPException(409, str(exc)) from None
        except SecAggAuthError as exc:  # forged, of an untrusted authority, or past its next update
            state.counters["secagg.revocations_refused"] += 1
            raise HTTPException(422, str(exc)) from None
        state.counters["secagg.revocations_uploaded"] += int(replaced)
        return {
            "sequence": rl.sequence,
            "issued": rl.issued,
            "next_update": rl.next_update,
            "revoked": len(rl.revoked),
            "replaced": replaced,
        }

    app.include_router(router)
