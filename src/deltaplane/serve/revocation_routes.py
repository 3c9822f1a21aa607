"""The enrollment authority's revocation list on the service: uploaded by the operator, fetched by devices.

* ``POST /admin/secagg/revocations`` (admin token; body: the file ``deltaplane keys revoke`` writes, at most
  :data:`~deltaplane.aggregation.secagg.revocation.REVOCATIONS_MAX_BYTES`) replaces the service's list
  (``serve --secagg-revocations FILE``) atomically, without a restart, once it decodes (else 400), the
  enrollment authority signed it (``serve --secagg-enrollment-authority``; else 422), it is current (else 422)
  and its sequence does not go back (else 409), neither from the list held nor from the highest the service has
  ever held. The next authenticated round open reads it.
  Its answer: the list's ``sequence``, ``issued``, ``next_update``, how many devices (``revoked``) and identity
  keys (``revoked_keys``) it revokes, and whether it ``replaced`` the held list.
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

The dashboard's fleet page shows the list as the next authenticated round open reads it
(:func:`revocations_status`): held or not, its authority, number, issue time, next update and revoked devices,
and what the operator must do about it (stale, expiring, missing, unchecked, or authenticated rounds running
without any list).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from deltaplane.aggregation.secagg.errors import RevocationRollback, SecAggAuthError
from deltaplane.aggregation.secagg.identity import TrustedAuthorities
from deltaplane.aggregation.secagg.revocation import (
    CLOCK_SKEW_S,
    REVOCATIONS_MAX_BYTES,
    SERVER_HOLDER,
    RevocationList,
    read_server_revocations,
    replace_server_revocations,
)
from deltaplane.errors import ConfigError, DecodeError, DeltaplaneError
from deltaplane.serve.bodies import read_capped
from deltaplane.serve.client import REVOCATIONS_ADMIN_PATH, REVOCATIONS_DEVICE_PATH
from deltaplane.textfile import read_bounded_bytes

if TYPE_CHECKING:
    from deltaplane.serve.service_store import ServiceStore

__all__ = [
    "EXPIRING_SOON_S",
    "REVOCATIONS_ADMIN_PATH",
    "REVOCATIONS_DEVICE_PATH",
    "check_revocations_at_start",
    "install_revocation_routes",
    "read_service_revocations",
    "revocations_status",
    "server_trust",
    "unchecked_revocations_warning",
]

#: the fleet page says a held list expires soon this long before its next update: a day leaves the operator time
#: to re-issue it (``keys revoke`` without ``--device``) and upload it before authenticated rounds are refused
EXPIRING_SOON_S = 86_400


def server_trust(config: Any) -> TrustedAuthorities | None:
    """The enrollment authority keys the service verifies revocation lists under
    (``config.secagg_authority``: ``enrollment.ed25519.pub``; None when not given), read at each use so a
    replaced key file applies without a restart."""
    path = config.secagg_authority
    return TrustedAuthorities.from_file(path) if path else None


def read_service_revocations(
    config: Any, store: ServiceStore, *, now: float | None = None, fix: str = "", record: bool = True
) -> RevocationList:
    """The service's revocation list file (``config.secagg_revocations``), as every reading of it takes it:
    :func:`~deltaplane.aggregation.secagg.revocation.read_server_revocations` (verified under
    ``config.secagg_authority`` when given; given ``now``, current), then, verified, checked against and
    recorded as the highest list of its authority the service has held (``store``): an older one is a
    :class:`~deltaplane.aggregation.secagg.errors.RevocationRollback`. An unverified list (no authority key)
    neither raises nor moves the mark: anyone could have numbered it.

    An upload replaces the file and raises the mark under its own lock, possibly between this read and this
    check: a list older than the mark is read once more before it is refused, so only a file that is still
    older (rolled back) is. ``record=False`` checks against the mark without moving it (the dashboard's view:
    looking at the list never records it)."""
    trusted = server_trust(config)
    rl = read_server_revocations(config.secagg_revocations, trusted, now=now, fix=fix)
    if trusted is not None and not record:
        rl.supersedes(store.revocation_marks().get(rl.authority), holder="this service")
    elif trusted is not None:
        try:
            store.hold_revocations(rl, source=config.secagg_revocations)
        except RevocationRollback:
            rl = read_server_revocations(config.secagg_revocations, trusted, now=now, fix=fix)
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
    if trusted is None or not path or not os.path.lexists(path):
        return
    try:
        held = read_server_revocations(path, legacy=True)  # unchecked: only its authority is looked at
    except ConfigError:
        held = None  # malformed: read_service_revocations says so
    if held is not None and not trusted.trusts(held.authority):
        why = f"authority {held.authority.hex()}'s list"
        try:  # its words: the authority it names and the ones this service trusts
            trusted.check_revocations(
                held.authority, held.signed_part(), held.signature, holder=SERVER_HOLDER
            )
        except SecAggAuthError as exc:
            why = str(exc)
        raise ConfigError(
            f"--secagg-revocations {path}: {why}. If the enrollment authority was "
            f"changed, the old authority's list no longer applies: move {path} away and start the service again, "
            "then upload the new authority's list (`deltaplane keys revoke --authority-key "
            "NEW/enrollment.ed25519.pem --carry OLD-LIST --out NEW-LIST --upload URL`); or write that list to "
            f"{path} before starting (docs/security.md, changing the enrollment authority). Otherwise give the "
            "service the public key of the authority that signed this list"
        )
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


#: the dashboard's last reading of each (list file, authority key file): the stamp it was read under and the list
#: read, or the error it gave (see :func:`_viewed_revocations`); a few entries, one per service in the process
_VIEWED: dict[tuple[str, str], tuple[tuple[Any, ...], RevocationList | str]] = {}
_VIEWED_MAX = 8
_VIEWED_LOCK = threading.Lock()


def _file_stamp(path: str) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten: an atomic replace gives a new inode, an in-place write a new mtime
    or size (``os.stat`` follows a link, as the loaders do)."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _viewed_revocations(config: Any, store: ServiceStore) -> RevocationList | str:
    """The list as :func:`read_service_revocations` reads it for a view (``record=False``), or its error's text,
    read again only when something it depends on changed: the list file, the authority key file or the service's
    highest held marks (an upload or a round open moves them). The fleet page reads this on every view (and on
    its refreshes); a list of tens of thousands of devices is up to ~530 KB to read and an Ed25519 verification
    each time, for a file that changes once a week. The stamp is taken before the read, so a file replaced
    while it is read is read again at the next view rather than kept under the old stamp."""
    path = os.fspath(config.secagg_revocations)
    key = os.fspath(config.secagg_authority) if config.secagg_authority else ""
    try:
        marks = tuple(sorted((m.authority, m.sequence, m.sha256) for m in store.revocation_marks().values()))
        stamp = (_file_stamp(path), _file_stamp(key) if key else None, marks)
    except OSError:  # gone between the caller's check and here, or unreadable: the loader says what is wrong
        stamp = None
    with _VIEWED_LOCK:
        held = _VIEWED.get((path, key))
    if stamp is not None and held is not None and held[0] == stamp:
        return held[1]
    try:  # as the round open would refuse it: malformed, forged, version 1, rolled back
        result: RevocationList | str = read_service_revocations(config, store, record=False)
    except DeltaplaneError as exc:
        result = str(exc)
    if stamp is not None:
        with _VIEWED_LOCK:
            _VIEWED.pop((path, key), None)
            _VIEWED[(path, key)] = (stamp, result)
            while len(_VIEWED) > _VIEWED_MAX:
                del _VIEWED[next(iter(_VIEWED))]  # the one viewed longest ago
    return result


def revocations_status(
    config: Any, rounds: Iterable[Mapping[str, Any]], *, now: float, store: ServiceStore
) -> dict[str, Any]:
    """What the dashboard's fleet page shows of the service's revocation list at ``now`` (unix s).

    The list is read as an authenticated round open reads it (:func:`read_service_revocations`, checked
    against ``store``'s highest list of its authority without moving it: a page view never records a list), so
    the page shows what the next open will act on, never a copy of it; it is read again only once the file, the
    authority key or the held marks changed (:func:`_viewed_revocations`). ``rounds`` are the fleet snapshot's open
    and closed rounds: one of them authenticated, or a federation of authenticated rounds
    (``config.federation``), means the service needs a list.

    ``state`` is what the operator acts on: ``current``; ``expiring`` (next update within
    :data:`EXPIRING_SOON_S`); ``stale`` (past its next update: round opens refuse it from ``refused_from``, the
    next update plus the clock skew allowed); ``missing`` (``--secagg-revocations`` names a file not written
    yet: authenticated opens are refused); ``invalid`` (the file does not read, or does not verify under the
    authority key, or is older than the highest list the service has held: ``error`` says why; opens are
    refused); ``none`` (authenticated rounds without any list: no
    revoked device is left out); ``unused`` (no list, no authenticated round). ``checked`` is False when the
    service has no authority key, so a held list is used unchecked. ``list`` holds the list's fields, its
    revoked ``(device id, cohort)`` pairs sorted and its revoked keys (``keys``: the SHA-256 of each identity key,
    hex, sorted), or None."""
    federation = config.federation
    authenticated = bool(federation is not None and federation.secagg_authenticated) or any(
        r.get("authenticated") for r in rounds
    )
    path = config.secagg_revocations
    status: dict[str, Any] = {
        "file": os.fspath(path) if path else "",
        "checked": bool(config.secagg_authority),
        "authenticated_rounds": authenticated,
        "now": now,
        "list": None,
        "error": "",
    }
    if not path:
        return status | {"state": "none" if authenticated else "unused"}
    if not os.path.lexists(path):
        return status | {"state": "missing"}
    rl = _viewed_revocations(config, store)
    if isinstance(rl, str):
        return status | {"state": "invalid", "error": rl}
    if now > rl.next_update:
        state = "stale"
    elif rl.next_update - now <= EXPIRING_SOON_S:
        state = "expiring"
    else:
        state = "current"
    return status | {
        "state": state,
        "list": {
            "authority": rl.authority.hex(),
            "sequence": rl.sequence,
            "issued": rl.issued,
            "next_update": rl.next_update,
            "refused_from": rl.next_update + CLOCK_SKEW_S,
            "revoked": sorted(rl.revoked),
            "keys": sorted(k.hex() for k in rl.keys),
        },
    }


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
        state.count("secagg.revocations_served")
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
            state.count("secagg.revocations_refused")
            raise HTTPException(400, f"not a revocation list: {exc}") from None
        except RevocationRollback as exc:
            state.count("secagg.revocations_refused")
            raise HTTPException(409, str(exc)) from None
        except SecAggAuthError as exc:  # forged, of an untrusted authority, or past its next update
            state.count("secagg.revocations_refused")
            raise HTTPException(422, str(exc)) from None
        state.count("secagg.revocations_uploaded", int(replaced))
        return {
            "sequence": rl.sequence,
            "issued": rl.issued,
            "next_update": rl.next_update,
            "revoked": len(rl.revoked),
            "revoked_keys": len(
                rl.keys
            ),  # added beside "revoked" (devices): a version-3 list revokes keys too
            "replaced": replaced,
        }

    app.include_router(router)
