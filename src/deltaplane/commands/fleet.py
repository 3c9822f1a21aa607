"""``deltaplane fleet``: run a federation of real device processes against ``deltaplane serve`` (docs/fleet.md).

``init`` registers the task's initial model in the service's registry, ``enroll`` issues one device token per
device into a folder (one file each, mode 0600; with ``--authority-key`` also a certified SecAgg identity key),
``device`` runs one device process, ``coordinate`` runs the
operator's rounds. Both sides read the same federation YAML: the service its server step, the devices their
local training, codec, clip and local DP (:mod:`deltaplane.serve.fleet`). Imports are light at module level:
torch loads only when a command runs.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from deltaplane.choices import DEFAULT_ROUNDS
from deltaplane.commands import (
    DEFAULT_THREADS,
    MAX_ENROLL_DEVICES,
    AddDevices,
    HeldRevocations,
    Threads,
    ValidDays,
    console,
    cpu_threads,
    err_console,
    error_console,
    finite_number,
    fleet_size,
    working_dir_on_path,
)
from deltaplane.commands import clean_errors as _errors
from deltaplane.errors import ConfigError, ServiceUnreachable
from deltaplane.textfile import KEY_LIMIT, read_bounded_text, require_regular_file
from deltaplane.wording import count

if TYPE_CHECKING:
    import ssl

    from deltaplane.engine import RunConfig

__all__ = ["register"]

Url = Annotated[str, typer.Option("--url", help="The service, e.g. https://127.0.0.1:8443.")]
Ca = Annotated[
    Path | None,
    typer.Option(
        "--ca", help="The CA that signed the service's certificate (HOME/tls/ca.pem).", show_default="none"
    ),
]
ClientCert = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        help="A client certificate, for a service run with --tls-client-ca (mutual TLS): `deltaplane keys tls "
        "--device NAME` issues one (HOME/tls/device-NAME.pem).",
        show_default="none",
    ),
]
ClientKey = Annotated[
    Path | None, typer.Option("--tls-key", help="The private key of --tls-cert.", show_default="none")
]
ServiceSpki = Annotated[
    str | None,
    typer.Option(
        "--service-spki",
        help="Pin the service's TLS key: sha256:<hex>, as `deltaplane keys tls` prints it. A server presenting "
        "another key, even with a certificate --ca vouches for, is refused before anything (a token included) "
        "is sent.",
        show_default="none: any key --ca vouches for",
    ),
]
Federation = Annotated[
    Path, typer.Option("--federation", help="The federation YAML `deltaplane serve --federation` runs.")
]
Model = Annotated[str, typer.Option("--model", help="The model name in the service's registry.")]
ADMIN_ENV = "DELTAPLANE_ADMIN_TOKEN"
Patience = Annotated[
    float,
    typer.Option(
        min=1,
        callback=finite_number,
        help="Seconds to wait for the service when it stops answering (a restart, an outage) before giving up.",
    ),
]


def _tls(
    url: str, ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """The TLS context for ``url``: ``--ca`` for https (never the system store, never a silent fallback to
    plain HTTP), with ``--tls-cert``/``--tls-key`` for a service that requires mutual TLS; plain HTTP only on
    loopback, as ``deltaplane serve`` allows it."""
    from deltaplane.serve.service_identity import is_loopback_host
    from deltaplane.serve.tls import client_context

    parts = urlsplit(url)
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: a client certificate and its private key")
    if parts.scheme == "https":
        if ca is None:
            raise ConfigError(
                f"{url} is HTTPS: pass --ca with the CA that signed its certificate (HOME/tls/ca.pem)"
            )
        return client_context(ca, cert=cert, key=key)
    if cert is not None:
        raise ConfigError(f"--tls-cert was given for {url}, which is plain HTTP: use its https:// address")
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"--url must be an https:// (or loopback http://) address. Found {url!r}")
    if ca is not None:
        raise ConfigError(f"--ca was given for {url}, which is plain HTTP: use its https:// address")
    if not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"refusing plain HTTP to {parts.hostname}: the token would travel in clear; use https://"
        )
    return None


def _admin_token() -> str:
    """The admin token in ``$DELTAPLANE_ADMIN_TOKEN``; a usage error, before any work, if it is unset or holds a
    character an HTTP header cannot carry (a line ending kept from the file it was read from, a non-ASCII
    letter): sent anyway, the HTTP library's refusal quotes the whole header, token included, on stderr."""
    token = os.environ.get(ADMIN_ENV, "")
    if not token:
        raise ConfigError(f"set ${ADMIN_ENV} to the admin token `deltaplane serve` runs with")
    bad = next((i for i, ch in enumerate(token) if not " " <= ch <= "~"), None)
    if bad is not None or token != token.strip():
        where = f"character {bad + 1} of {len(token)}" if bad is not None else "a leading or trailing space"
        raise ConfigError(
            f"${ADMIN_ENV} holds {where}, which an HTTP header cannot carry (a line ending or carriage return "
            "kept from the file it was read from?); set it to the token alone, printable ASCII (not shown here)"
        )
    return token


#: `fleet coordinate --rounds`'s default, as its help shows it
_FILE_ROUNDS = f"the federation's clients.rounds; {DEFAULT_ROUNDS} when it names none"


def _federation(path: Path) -> RunConfig:
    from deltaplane.engine import RunConfig

    if not os.path.lexists(path):
        raise ConfigError(f"federation file {path} does not exist")
    require_regular_file(path, what="federation file")  # a FIFO is not "missing": name what it is
    working_dir_on_path()  # the YAML's task may be a mytask.py next to it
    return RunConfig.from_yaml(path)


def _with_degree(run: RunConfig, path: Path, degree: int) -> RunConfig:
    """``run`` with SecAgg+ degree ``degree`` (``--secagg-neighbours``), checked as the YAML key is: even, below
    the round's size and one the devices accept. Only a federation that runs SecAgg has a degree: the service
    and the devices read whether rounds are SecAgg from the same file, so a flag cannot turn it on. Degree 0
    is the complete graph: the rounds are opened without SecAgg+ whatever the file's degree."""
    if degree == 0:
        return run.replace(secagg_neighbours=None)
    if not run.secagg:
        raise ConfigError(
            f"--secagg-neighbours {degree} is SecAgg+'s degree (how many devices each one masks with); it needs "
            f"secure aggregation, and {path} runs plain rounds: set secagg.enabled: true there (the service and "
            "the devices read it too)"
        )
    return run.replace(secagg_neighbours=degree)


def _connected(url: str, fn: Any) -> Any:
    """Run ``fn``; a connection that failed becomes one typed line (TLS failures name the CA to check)."""
    import httpx

    from deltaplane.serve.reach import unreachable

    try:
        return fn()
    except httpx.TransportError as exc:
        raise unreachable(exc, url) from None


def _issue_tokens(
    url: str,
    admin: Any,
    names: list[str],
    cohort: str,
    out: Path,
    identities: list[Any],
    *,
    created: bool,
    models: list[str] | None = None,
) -> list[str]:
    """A token from the service for each device of ``names``, in order (``fleet enroll``), then their files;
    ``models`` scopes each token to those models (None: every model of the service).

    The ids are reserved in OUT (``reserve_ids``) and the folder's lock is not held while the service answers:
    a slow service keeps no other run on OUT waiting. The tokens are then recorded under the lock: their ids
    added to OUT's ledger (``enrollment.ledger``: no run issues them again), the reservation released, each
    token file written new (never over one) and, once every token is issued, the ``identities``.

    A failure part-way (the service refuses or fails, the connection breaks, ctrl-C) after it issued some:
    those tokens are valid on the service whether written or not, so their ids are spent and their token files
    written (``--add`` grows the folder from them; revoke any not wanted), then the failure goes on, after a
    line naming them. A token the service made whose answer never arrived was never delivered to anyone, so
    its id is not spent. A failure at the first id writes nothing, and removes OUT if this run ``created`` it
    and it is left empty."""
    tokens: list[str] = []
    try:
        for d in names:
            tokens.append(_connected(url, lambda d=d: admin.issue_token(d, cohort, models=models)))
    except BaseException:
        _record_tokens(out, names, tokens, [], created=created)
        if tokens:
            issued = names[: len(tokens)]
            span = issued[0] if len(issued) == 1 else f"{issued[0]} … {issued[-1]}"
            err_console.print(
                f"fleet enroll stopped part-way: {len(issued)} of {len(names)} tokens were issued ({span}), "
                f"written to {out}/ and their ids spent ({out / 'enrollment.ledger'}); `fleet enroll --out {out} "
                f"--add K` enrols the rest, or revoke them (POST /admin/devices/<id>/revoke)",
                soft_wrap=True,
                markup=False,
            )
        raise
    _record_tokens(out, names, tokens, identities, created=created)
    return tokens


def _fleet_tokens(out: Path) -> list[Any]:
    """What the fleet's tokens in ``out`` say (:func:`deltaplane.serve.auth.unverified_claims`), read for
    ``fleet enroll --add``. A file that holds no token of the current format says nothing and is passed over:
    an earlier release's token (the service refuses it anyway, asking to re-enroll) must not block ``--add``."""
    from deltaplane.aggregation.secagg.enrollment import device_id, held_partitions
    from deltaplane.serve.auth import unverified_claims

    found = []
    for i in held_partitions(out, ".token"):
        path = out / f"{device_id(i)}.token"
        claims = unverified_claims(read_bounded_text(path, limit=KEY_LIMIT, what="device token"))
        if claims is not None:
            found.append(claims)
    return found


def _fleet_scope(out: Path, held_tokens: list[Any], scope: list[str] | None) -> list[str] | None:
    """The model scope ``fleet enroll --add`` issues new tokens with: that of the fleet's tokens in ``out``
    (``held_tokens``), which ``--model`` (``scope``), if given, must match. Without it a device added to a fleet
    enrolled with ``--model cnn`` got a token for every model of the service. Tokens of several scopes (``out``
    holding two fleets) need ``--model``, one of them."""
    held: set[tuple[str, ...] | None] = {t.models for t in held_tokens}

    def named(s: tuple[str, ...] | None) -> str:
        return "every model (no --model)" if s is None else str(list(s))

    if scope is None:
        if len(held) > 1:
            raise ConfigError(
                f"the tokens in {out} are scoped to {' and '.join(sorted(map(named, held)))}: give --model for "
                "the devices to add, the scope of one of them"
            )
        only = next(iter(held), None)
        return None if only is None else list(only)
    given = tuple(sorted(set(scope)))
    if given not in held:
        raise ConfigError(
            f"--model {' --model '.join(given)}, but the fleet's tokens in {out} reach "
            f"{' and '.join(sorted(map(named, held)))}: a device added to it would reach other models than its "
            "fleet; give the fleet's scope, or enrol these devices in another --out"
        )
    return scope


def _token_cohort(out: Path, held_tokens: list[Any], cohort: str | None) -> str | None:
    """``--cohort``, or else the one cohort the fleet's tokens in ``out`` name (a fleet enrolled without
    ``--authority-key`` has no certificates to read it from, and its added devices fell into cohort "fleet",
    outside the fleet's consent withdrawal); tokens of several cohorts need ``--cohort``."""
    if cohort is not None:
        return cohort
    held = sorted({t.cohort for t in held_tokens})
    if len(held) > 1:
        raise ConfigError(f"the tokens in {out} name cohorts {held}: give --cohort, one of them")
    return held[0] if held else None


def _record_tokens(
    out: Path, names: list[str], tokens: list[str], identities: list[Any], *, created: bool
) -> None:
    """Record the ``tokens`` issued for the first of ``names`` in OUT under its lock (:func:`_issue_tokens`)."""
    from deltaplane.aggregation.secagg.enrollment import enrollment_lock, record_issued, write_identity
    from deltaplane.registry.signing import write_secret_file

    issued = names[: len(tokens)]
    with enrollment_lock(out):
        # the ledger, then the reservation given back, then the files: the tokens are issued, so no run hands
        # these ids out again
        record_issued(out, issued, releasing=names)
        # each file new (never over one); a failure part-way keeps what was written (every token is valid on
        # the service: removing it would only lose it), docs/cli.md
        for d, token in zip(issued, tokens, strict=True):
            write_secret_file(out / f"{d}.token", token.encode(), replace=False)
        for identity in identities:
            write_identity(out, identity, replace=False)
    if created and not issued:
        with suppress(OSError):  # not empty: another run's files, not this one's to remove
            out.rmdir()


def _recover(url: str, out: Path, admin: Any, abandoned: list[str]) -> None:
    """``fleet enroll --recover``: take back the ids runs killed while the service answered left reserved in OUT.

    Under OUT's lock, all or nothing: the reservations whose run is provably dead, and those ``--abandoned``
    names, are chosen (``recover_reservations``); their ids' room in the ledger is checked; every token the
    service may have issued for them is revoked (``POST /admin/devices/ID/revoke``: the run may have been killed
    after the service answered, and such a token reached no file); then the ids are recorded as spent in the
    ledger and the reservations removed. A revocation that fails leaves OUT as it was (the ids stay reserved;
    revoking twice changes nothing, so the same command can run again). Another run's reservation is left:
    one still going finishes on its own, one that cannot be told (another host, an earlier release's line)
    is named with the ``--abandoned`` that takes it back."""
    from deltaplane.aggregation.secagg.enrollment import (
        LEDGER_NAME,
        check_ledger_room,
        device_id,
        enrollment_lock,
        record_issued,
        recover_reservations,
    )

    if not out.is_dir():
        raise ConfigError(f"--out {out} is not a folder: give the folder `fleet enroll` wrote the tokens in")
    with enrollment_lock(out):
        chosen, left = recover_reservations(out, abandoned)
        unknown = [r.span for r, state, _ in left if state == "unknown"]
        if unknown and not chosen:
            raise ConfigError(
                f"{out} holds no reservation of a run known to be dead, and {', '.join(unknown)} cannot be told "
                f"({left[0][2]}): once sure its run is dead, rerun with --abandoned {unknown[0]}"
            )
        ids = [device_id(i) for r, _ in chosen for i in range(r.first, r.last + 1)]
        check_ledger_room(out, [(r.first, r.last) for r, _ in chosen], releasing=ids)
        revoke_device_tokens(admin, url, ids, standing=f"{out} is unchanged (the ids stay reserved), and ")
        record_issued(out, ids, releasing=ids)
    for r, why in chosen:
        console.print(
            escape(
                f"{r.span}: service tokens revoked on {url}, ids recorded as spent in {out / LEDGER_NAME} ({why})"
            ),
            soft_wrap=True,
        )
    for r, state, why in left:
        how = (
            "left: it finishes on its own"
            if state == "live"
            else f"left: once sure its run is dead, `--recover --abandoned {r.span}` takes it back"
        )
        err_console.print(f"{r.span}: {why}; {how}", soft_wrap=True, markup=False)
    if not chosen and not left:
        console.print(escape(f"no reservation in {out}: nothing to recover"), soft_wrap=True)


class _ModelsConnection:
    """The coordinator's verified model connection (``fleet coordinate --trusted``): a device token of its own,
    issued through the admin API for the run (device id ``coordinator``) and revoked when it ends, and the
    registry's public key, so a version it registers predictions of is one it verified as a device does."""

    def __init__(self, url: str, trusted: Path | None, tls: Any, service_spki: str | None) -> None:
        self.url, self.trusted, self.tls, self.service_spki = url, trusted, tls, service_spki
        # read before any round: a missing or malformed key file is a usage error, not a mid-run warning
        self.verifier = None
        if trusted is not None:
            from deltaplane.registry.signing import load_trusted_keys

            self.verifier = load_trusted_keys(trusted)

    def run(self, admin: Any, fn: Any) -> Any:
        """``fn(conn)``: ``conn`` the connection (None without ``--trusted``), its token revoked afterwards."""
        if self.verifier is None:
            return fn(None)
        import httpx

        from deltaplane.serve.client import DeviceClient, ServiceError

        issued = admin.issue_token_info("coordinator")
        conn = DeviceClient(
            self.url, issued["token"], verifier=self.verifier, tls=self.tls, service_spki=self.service_spki
        )
        try:
            return fn(conn)
        finally:
            conn.close()
            # best effort: a service gone by now cannot be told; the token then lapses with its lifetime
            with suppress(ServiceError, httpx.HTTPError):
                admin.revoke_token(issued["token_id"])


def admin_client(
    url: str,
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    service_spki: str | None = None,
) -> Any:
    """The :class:`~deltaplane.serve.client.AdminClient` of the service at ``url`` as every admin command makes
    it: the admin token from ``$DELTAPLANE_ADMIN_TOKEN``, TLS from ``--ca`` (and ``--tls-cert``/``--tls-key``),
    pinned to the service's key with ``--service-spki`` (a server with another key is refused during the
    handshake, before the admin token is sent). Nothing is sent yet: a usage error here (no token, https
    without ``--ca``, a malformed pin or one for plain HTTP) comes before any work."""
    from deltaplane.serve.client import AdminClient

    return AdminClient(url, _admin_token(), tls=_tls(url, ca, cert, key), service_spki=service_spki)


def upload_revocations(
    admin: Any, url: str, data: bytes, out: Path, tokens_of: list[str] | None = None
) -> dict[str, Any]:
    """``POST /admin/secagg/revocations`` the list ``out`` holds (``data``, already written) through ``admin``
    (:func:`admin_client`); the service's answer. A refusal is a one-line error that says the file stays
    written and what to do: the admin token refused is a usage error (exit 2); an older list (409), a forged,
    another authority's or a stale one (422) is :class:`~deltaplane.errors.GateRefused` (exit 3: the service
    said no, the work ran); an unreachable service is :class:`~deltaplane.errors.ServiceUnreachable`, a server
    presenting another key than ``--service-spki`` :class:`~deltaplane.errors.ServiceKeyMismatch`, any other
    answer a ``ServiceError`` (exit 1). ``tokens_of``: the ids whose service tokens the run was to revoke after
    the upload; a refusal says they are NOT revoked and to run the same command again, ``--device`` included,
    since re-issuing the kept list without ``--device`` uploads it but revokes no token (the revoked device
    would keep fetching models and uploading to plain rounds)."""
    from deltaplane.errors import GateRefused, ServiceKeyMismatch
    from deltaplane.serve.client import ServiceError

    kept = f"{out} is written and kept"
    again = "upload it again"
    if tokens_of:
        kept += f"; the service tokens of {', '.join(tokens_of)} are NOT revoked"
        again = (
            "run this same command again, its --device included, to upload it and revoke them (without "
            "--device the list is uploaded but no token revoked)"
        )
    try:
        return _connected(url, lambda: admin.upload_revocations(data))
    except ServiceError as exc:
        if exc.status in (401, 403):
            raise ConfigError(
                f"{url} refused the admin token (HTTP {exc.status}); {kept}: set ${ADMIN_ENV} to the token the "
                f"service runs with and {again}"
            ) from None
        if exc.status in (409, 422):
            why = "holds a newer list or keeps none" if exc.status == 409 else "refused the list"
            raise GateRefused(f"{url} {why} (HTTP {exc.status}: {exc.detail}); {kept}") from None
        raise ServiceError(exc.status, f"{exc.detail}; {kept}: {again}", exc.error) from None
    except ServiceUnreachable as exc:  # the file is written all the same
        raise ServiceUnreachable(
            f"{exc}; {kept}: {again} once the service answers", final=exc.final
        ) from None
    except ServiceKeyMismatch as exc:
        raise ServiceKeyMismatch(f"{exc}; {kept}") from None


def revoke_device_tokens(
    admin: Any, url: str, ids: list[str], *, standing: str = "the list is uploaded, but "
) -> None:
    """``POST /admin/devices/{id}/revoke`` for each device id of ``ids`` through ``admin`` (:func:`admin_client`),
    in order: every service token issued to it so far is refused from then on (``keys revoke --upload``, after
    the list is uploaded: a revoked SecAgg identity would otherwise keep fetching models and uploading to plain
    rounds with its token). The first failure stops it: a ``ServiceError`` (the service's answer) or
    :class:`~deltaplane.errors.ServiceUnreachable` (exit 1) that says what stands (``standing``: by default
    the list is uploaded), which ids' tokens were revoked and which were not, and how to revoke them."""
    from deltaplane.serve.client import ServiceError

    for n, name in enumerate(ids):
        try:
            _connected(url, lambda name=name: admin.revoke_device(name))
        except (ServiceError, ServiceUnreachable) as exc:
            done = f" (those of {', '.join(ids[:n])} are)" if n else ""
            left = ", ".join(ids[n:])
            why = (
                f"{standing}the service tokens of {left} are NOT revoked{done}: they can still "
                "fetch models and upload to plain rounds; run the same command again, or POST "
                f"/admin/devices/{ids[n]}/revoke"
            )
            if isinstance(exc, ServiceError):
                raise ServiceError(exc.status, f"{exc.detail}; {why}", exc.error) from None
            raise ServiceUnreachable(f"{exc}; {why}", final=exc.final) from None


def _credentials(
    key: Path | None, certificate: Path | None, authority: Path | None, revocations: Path | None = None
) -> Any:
    """The device's SecAgg credentials from ``--identity-key``, ``--certificate`` and ``--enrollment-authority``
    (all three or none: a device with half an enrollment must not silently run unauthenticated), holding the
    authority's revocation list in ``--revocations`` if that file exists yet (only with them: alone it would
    authenticate nothing). The device keeps each newer list it takes in that file
    (:func:`~deltaplane.serve.fleet.refresh_revocations`)."""
    given = [x is not None for x in (key, certificate, authority)]
    if not any(given):
        if revocations is not None:
            raise ConfigError(
                "--revocations goes with --identity-key, --certificate and --enrollment-authority: a device "
                "checks revocations only in authenticated rounds"
            )
        return None
    if not all(given):
        raise ConfigError(
            "--identity-key, --certificate and --enrollment-authority go together: the device's SecAgg identity "
            "(fleet enroll --authority-key writes the first two) and the authority's public key it trusts"
        )
    from deltaplane.aggregation.secagg.identity import DeviceCredentials, SecAggAuthError

    assert key is not None and certificate is not None and authority is not None
    held = revocations if revocations is not None and revocations.exists() else None
    try:
        credentials = DeviceCredentials.from_files(key, certificate, authority, held)
    except SecAggAuthError as exc:
        if held is None or _trusts_kept_list(authority, held):
            raise
        raise SecAggAuthError(  # the kept list of an authority replaced since (docs/security.md: changing it)
            f"{exc}. If the enrollment authority was changed, remove {revocations} (the old authority's list, "
            "kept by this device): the device fetches the new authority's list from the service before its next "
            "round"
        ) from None
    # Its own certificate must verify under the authority it trusts, as every neighbour checks it: a wrong
    # .pub (the registry's signing key, another fleet's authority) or an expired certificate used to surface
    # only in the rounds, as a roster that does not verify, with the device sitting out every round.
    try:
        credentials.trusted.check(credentials.identity.certificate, now=credentials.clock())
    except SecAggAuthError as exc:
        raise ConfigError(
            f"--certificate {certificate} does not verify under --enrollment-authority {authority}: {exc}. Give "
            "the enrollment.ed25519.pub of the authority that enrolled this device (`deltaplane keys enrollment` "
            "printed its id), or enroll the device again (fleet enroll --authority-key)"
        ) from None
    try:  # revoked by its own list: every neighbour holding the list would refuse the rosters seating it
        credentials.check_own()
    except SecAggAuthError as exc:
        raise ConfigError(
            f"--revocations {revocations} revokes this device's certificate ({exc}): its neighbours refuse every "
            "round seating it; enroll a replacement under a new device id (fleet enroll --add 1)"
        ) from None
    return credentials


def _trusts_kept_list(authority: Path, kept: Path) -> bool:
    """Whether the device trusting the key file ``authority`` trusts the authority of its kept revocation list
    ``kept`` (True also when either cannot be read: the caller's own error says what is wrong then)."""
    from deltaplane.aggregation.secagg.identity import TrustedAuthorities
    from deltaplane.aggregation.secagg.revocation import trusts_kept_list

    try:
        return trusts_kept_list(TrustedAuthorities.from_file(authority), kept)
    except ConfigError:
        return True


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM / SIGINT: the device finishes the request in flight and stops."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def register(app: typer.Typer) -> None:
    """Add ``deltaplane fleet init|enroll|device|coordinate``."""
    fleet = typer.Typer(
        help="A federation of real device processes over `deltaplane serve` (docs/fleet.md).",
        no_args_is_help=True,
    )
    app.add_typer(fleet, name="fleet")

    @fleet.command("init")
    def init_cmd(
        federation: Federation,
        model: Model,
        home: Annotated[
            Path | None,
            typer.Option(
                "--home", envvar="DELTAPLANE_HOME", help="Registry folder.", show_default="~/.deltaplane"
            ),
        ] = None,
    ) -> None:
        """Register the task's initial model (seeded by the federation's seed) and tag it production, with the
        drift reference and the devices' example counts `fleet coordinate` reads instead of building the task."""
        from deltaplane.engine import build_clients, make_task
        from deltaplane.engine.seeding import Stream, derive_seed
        from deltaplane.registry import Registry, default_home
        from deltaplane.serve.fleet_reference import REFERENCE_KEY, compute_reference

        with _errors(OSError):
            run = _federation(federation)
            reg = Registry.create(home or default_home())
            if reg.versions(model):
                raise ConfigError(
                    f"{model!r} is already in the registry at {reg.home}; choose another --model"
                )
            task = make_task(run)
            # the devices and the coordinator build the same devices from this file, and refuse it when they
            # cannot (a task with its own devices and another clients.count, data too small to partition):
            # refuse it here, before a model is registered that no device could train
            clients = build_clients(run, task)
            net = task.build_model(derive_seed(run.seed, Stream.MODEL_INIT))
            # what the coordinator needs of the task, computed here where the task is built anyway, so that
            # `fleet coordinate` need not build it (no torch there): signed with the version
            reference = compute_reference(task, clients).to_lineage(run)
            v = reg.register_model(
                model,
                net.state_dict(),
                lineage={"round": 0, "run_config": run.to_dict(), REFERENCE_KEY: reference},
                governance={"data_sources": [f"task {task.name}"], "cohorts": []},
            )
            reg.set_tag(model, "production", v.number, reason="initial model of the fleet")
        console.print(
            escape(f"{model}@{v.number} registered in {reg.home} (production); serve it with --federation"),
            soft_wrap=True,
        )

    @fleet.command("enroll")
    def enroll_cmd(
        url: Url,
        out: Annotated[Path, typer.Option("--out", help="Folder for the token files (one per device).")],
        ca: Ca = None,
        tls_cert: ClientCert = None,
        tls_key: ClientKey = None,
        devices: Annotated[
            int | None,
            typer.Option(
                "--devices",
                min=1,
                callback=fleet_size,
                help="How many devices.",
                show_default="the federation's",
            ),
        ] = None,
        federation: Annotated[
            Path | None,
            typer.Option("--federation", help="Read the device count from this YAML.", show_default="none"),
        ] = None,
        cohort: Annotated[
            str | None,
            typer.Option(
                help="Cohort the tokens name (consent withdrawal).", show_default="fleet, or the fleet's"
            ),
        ] = None,
        authority_key: Annotated[
            Path | None,
            typer.Option(
                "--authority-key",
                exists=True,
                dir_okay=False,
                help="The enrollment authority (keys enrollment: enrollment.ed25519.pem): also write each device a "
                "SecAgg identity key (OUT/device-I.identity.pem, 0600) and its certificate (OUT/device-I.cert) "
                "for authenticated rounds (coordinate --authenticated).",
                show_default="none",
            ),
        ] = None,
        scope: Annotated[
            list[str] | None,
            typer.Option(
                "--model",
                help="Scope the tokens to this model (repeatable): the service refuses them, 403, on any other. "
                "Without it they reach every model of the service, as tokens always have. With --add the new "
                "tokens take the scope of the fleet's in --out, which --model, if given, must match.",
                show_default="every model",
            ),
        ] = None,
        valid_days: ValidDays = 365.0,
        add: AddDevices = None,
        revocations: HeldRevocations = None,
        service_spki: ServiceSpki = None,
        recover: Annotated[
            bool,
            typer.Option(
                "--recover",
                help="Issue nothing: take back the ids that runs killed while the service answered left reserved "
                "in OUT (enrollment.reserved). For each run provably dead (this host; its process gone), revoke "
                "every service token of its ids, then record them as spent, all or nothing, under OUT's lock.",
            ),
        ] = False,
        abandoned: Annotated[
            list[str] | None,
            typer.Option(
                "--abandoned",
                metavar="RANGE",
                help="With --recover: also take back this reservation (device-5..device-9, as --recover prints "
                "it; repeatable), one whose run cannot be told dead (another host, an earlier release's line) or "
                "is still running: your word that it is dead.",
                show_default="none",
            ),
        ] = None,
    ) -> None:
        """Issue device tokens device-0 … device-(N-1) into OUT/device-I.token (mode 0600); admin token from
        $DELTAPLANE_ADMIN_TOKEN. With --authority-key, each device also gets a certified SecAgg identity. With
        --add K, the fleet in OUT grows by K devices under new ids (never a revoked or existing one), their tokens
        scoped to the models of the fleet's (--model must match them). With
        --recover, revoke the tokens of ids a killed run left reserved in OUT and record them as spent."""
        from deltaplane.aggregation.secagg.enrollment import (
            certify,
            check_not_issued,
            check_not_reserved,
            check_not_revoked,
            device_id,
            enrollment_lock,
            fleet_cohort,
            held_partitions,
            identity_files,
            load_authority,
            next_device_ids,
            read_held_revocations,
            reserve_ids,
        )

        with _errors(OSError):
            if abandoned and not recover:
                raise ConfigError(
                    "--abandoned RANGE names a reservation for --recover to take back: give both"
                )
            if recover:
                given = [devices, federation, add, authority_key, revocations, cohort, scope]
                if any(x is not None for x in given):
                    raise ConfigError(
                        "--recover issues nothing: give it with --url and --out (and --abandoned RANGE), without "
                        "--devices, --federation, --add, --authority-key, --revocations, --cohort or --model"
                    )
                _recover(url, out, admin_client(url, ca, tls_cert, tls_key, service_spki), abandoned or [])
                return
            authority = None if authority_key is None else load_authority(authority_key)
            held = None if revocations is None else read_held_revocations(revocations, authority)
            if add is not None:
                if devices is not None or federation is not None:
                    raise ConfigError(
                        "--add K grows the fleet in --out: give it without --devices or --federation"
                    )
                if not held_partitions(out, ".token"):
                    raise ConfigError(
                        f"{out} holds no device-I.token: --add grows a fleet `fleet enroll` wrote there; give "
                        "that folder, or enrol the fleet first with --devices"
                    )
            else:
                if devices is None:
                    if federation is None:
                        raise ConfigError("give --devices N or --federation fleet.yaml (its clients)")
                    devices = _federation(federation).clients
                    if devices > MAX_ENROLL_DEVICES:  # as --devices N is refused (see MAX_ENROLL_DEVICES)
                        raise ConfigError(
                            f"{federation} has clients.count {devices:,}: fleet enroll enrols at most "
                            f"{MAX_ENROLL_DEVICES:,} devices, the most a SecAgg round's roster holds"
                        )
                names = [device_id(i) for i in range(devices)]
            # the choice of ids and every check of OUT under the lock on OUT, the ids then reserved there: two
            # concurrent --add runs take turns, never the same ids; the service is asked for the tokens without
            # the lock (a slow one holds no other run on OUT), which are recorded under it again
            created = not out.exists()
            with enrollment_lock(out):
                if add is not None:
                    names = next_device_ids(out, add, revoked=[d for d, _ in held.revoked] if held else ())
                    # the fleet's cohort from its certificates (no key needed), with or without --authority-key:
                    # a token in another cohort would escape the fleet's consent withdrawal
                    held_tokens = _fleet_tokens(out)
                    cohort = fleet_cohort(out, _token_cohort(out, held_tokens, cohort))
                    # the fleet's model scope from its tokens: a device added without it reached every model
                    scope = _fleet_scope(out, held_tokens, scope)
                cohort = "fleet" if cohort is None else cohort
                if held is not None and revocations is not None:  # held is read from revocations
                    check_not_revoked(names, held, revocations)
                files = [out / f"{d}.token" for d in names]
                extra = [p for d in names for p in identity_files(out, d)]
                taken = next((f for f in files + (extra if authority else []) if f.exists()), None)
                if taken is not None:  # its token stays valid on the service: overwriting would only lose it
                    raise ConfigError(
                        f"{taken} already exists; choose another --out, or remove the old files (and revoke "
                        f"their tokens: POST /admin/devices/{taken.stem}/revoke); --add K enrols new devices "
                        "beside them"
                    )
                # an id issued there before (its files since removed) never gets a second token or key, nor
                # one another run is issuing now
                check_not_reserved(out, names)
                check_not_issued(out, names)
                identities = (
                    certify(authority, names, cohort=cohort, valid_days=valid_days)
                    if authority is not None
                    else []
                )
                admin = admin_client(url, ca, tls_cert, tls_key, service_spki)
                reserve_ids(out, names)
            # every token first: a refusal of the first (a wrong admin token, the service gone) leaves no folder
            # or file; one part-way keeps the tokens issued before it and spends their ids
            _issue_tokens(url, admin, names, cohort, out, identities, created=created, models=scope)
        span = f"{names[0]}.token" if len(names) == 1 else f"{names[0]}.token … {names[-1]}.token"
        console.print(
            escape(
                f"{len(names)} device tokens written to {out}/ ({span})"
                + (f", with SecAgg identities (.identity.pem, .cert) in cohort {cohort}" if authority else "")
                + (f"; `fleet coordinate --enrolled {out}` invites them" if add else "")
            ),
            soft_wrap=True,
        )

    @fleet.command("device")
    def device_cmd(
        url: Url,
        token_file: Annotated[
            Path,
            typer.Option(
                "--token-file", help="This device's token (fleet enroll).", exists=True, dir_okay=False
            ),
        ],
        federation: Federation,
        device: Annotated[int, typer.Option("--device", min=0, help="This device's partition of the task.")],
        model: Model,
        ca: Ca = None,
        tls_cert: ClientCert = None,
        tls_key: ClientKey = None,
        trusted: Annotated[
            Path | None,
            typer.Option(
                "--trusted",
                envvar="DELTAPLANE_TRUSTED_KEYS",
                help="The registry's public signing key(s) the device trusts (HOME/keys/signing.ed25519.pub).",
                show_default="required",
            ),
        ] = None,
        rounds: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="Stop once this many rounds have opened, taken part in or sat out.",
                show_default="until stopped",
            ),
        ] = None,
        stage_wait: Annotated[
            float,
            typer.Option(
                min=1,
                callback=finite_number,
                help="Seconds to wait for a SecAgg stage or a round to publish.",
            ),
        ] = 300.0,
        patience: Patience = 300.0,
        threads: Threads = DEFAULT_THREADS,
        identity_key: Annotated[
            Path | None,
            typer.Option(
                "--identity-key",
                exists=True,
                dir_okay=False,
                help="This device's SecAgg identity key (fleet enroll --authority-key: device-I.identity.pem).",
                show_default="none",
            ),
        ] = None,
        certificate: Annotated[
            Path | None,
            typer.Option(
                "--certificate",
                exists=True,
                dir_okay=False,
                help="Its certificate (device-I.cert).",
                show_default="none",
            ),
        ] = None,
        enrollment_authority: Annotated[
            Path | None,
            typer.Option(
                "--enrollment-authority",
                exists=True,
                dir_okay=False,
                help="The enrollment authority's public key the device trusts (enrollment.ed25519.pub): with the two "
                "above, the device signs its SecAgg keys, checks every neighbour's, and refuses unauthenticated rounds.",
                show_default="none",
            ),
        ] = None,
        service_spki: ServiceSpki = None,
        revocations: Annotated[
            Path | None,
            typer.Option(
                "--revocations",
                dir_okay=False,
                help="This device's copy of the enrollment authority's revocation list (keys revoke): read at "
                "start if it exists; before each round the device fetches the service's list and, if it verifies "
                "under --enrollment-authority and is newer, keeps it here (atomic write), so a restarted device "
                "never takes an older one. It refuses rounds that seat a revoked device, and authenticated "
                "rounds while its list is past its next update.",
                show_default="device-I.revocations beside --certificate",
            ),
        ] = None,
        releases: Annotated[
            Path | None,
            typer.Option(
                "--releases",
                dir_okay=False,
                help="Under local DP (local_dp_noise), where the device counts the privatized updates it has "
                "sent: read at start, rewritten (atomic) before each one leaves, so its reported local ε goes on "
                "from there after a restart. A damaged file is refused, never reset.",
                show_default="the token file's name with .releases",
            ),
        ] = None,
    ) -> None:
        """Run one device: poll for rounds, train on partition DEVICE, upload (or run SecAgg), report."""
        from deltaplane.registry.signing import load_trusted_keys
        from deltaplane.serve.client import DeviceClient, ServiceError, TokenRefused
        from deltaplane.serve.fleet import keep_releases, load_device, run_device

        with _errors(OSError), cpu_threads(threads):
            if revocations is None and certificate is not None:
                revocations = certificate.with_suffix(".revocations")  # the enrollment's folder: device-I.*
            credentials = _credentials(identity_key, certificate, enrollment_authority, revocations)
            if trusted is None:
                raise ConfigError(
                    "pass --trusted with the registry's public key (HOME/keys/signing.ed25519.pub): the device "
                    "applies only models signed by it"
                )
            run = _federation(federation).replace(threads=threads)
            token = read_bounded_text(token_file, limit=KEY_LIMIT, what="device token file").strip()
            conn = DeviceClient(
                url,
                token,
                verifier=load_trusted_keys(trusted),
                tls=_tls(url, ca, tls_cert, tls_key),
                service_spki=service_spki,
            )
            try:
                dev = load_device(conn, run, device, model=model)
                dev.credentials = credentials
                dev.revocations_file = revocations if credentials is not None else None
                keep_releases(dev, releases or token_file.with_suffix(".releases"))
                dev.log = lambda line: err_console.print(
                    f"device {device}: {line}", soft_wrap=True, markup=False
                )
                done = run_device(
                    dev, rounds=rounds, stop=_stop_on_signals(), stage_wait=stage_wait, patience=patience
                )
            except ServiceError as exc:  # the token refused, at the first request or later: name its file
                if exc.status != 401:
                    raise
                raise TokenRefused.of(exc, token=f"device {device}'s token ({token_file})") from None
        joined = sum(1 for r in done if r["took_part"])
        adapted = (
            f"; adapted to {count(len(done), 'published version')}" if run.personalization != "none" else ""
        )
        console.print(f"device {device}: took part in {count(joined, 'published round')}{adapted}")

    @fleet.command("coordinate")
    def coordinate_cmd(
        url: Url,
        federation: Federation,
        model: Model,
        deadline: Annotated[
            float,
            typer.Option(
                min=0.1,
                callback=finite_number,
                help="Seconds each round (each SecAgg stage) waits for its devices.",
            ),
        ],
        ca: Ca = None,
        tls_cert: ClientCert = None,
        tls_key: ClientKey = None,
        weight_scale: Annotated[
            float | None,
            typer.Option(
                callback=finite_number,
                help="SecAgg's public weight scale.",
                show_default="the devices' mean example count",
            ),
        ] = None,
        secagg_neighbours: Annotated[
            int | None,
            typer.Option(
                "--secagg-neighbours",
                metavar="K",
                help="SecAgg+ degree of the rounds opened (even): each device masks with only K others; "
                "overrides the federation's secagg.neighbours, which must run SecAgg (secagg.enabled); 0: the "
                "complete graph.",
                show_default="the federation's secagg.neighbours",
            ),
        ] = None,
        patience: Patience = 300.0,
        authenticated: Annotated[
            bool,
            typer.Option(
                "--authenticated",
                help="Open SecAgg rounds whose key advertisements the devices sign and check (devices run with "
                "--identity-key, --certificate, --enrollment-authority).",
            ),
        ] = False,
        enrolled: Annotated[
            Path | None,
            typer.Option(
                "--enrolled",
                file_okay=False,
                help="Invite the devices with a token in this folder (fleet enroll --out: device-I.token), those "
                "enrolled with --add included; a revoked one is left out by the service.",
                show_default="device-0 … one per partition",
            ),
        ] = None,
        drift_min_samples: Annotated[
            int,
            typer.Option(
                "--drift-min-samples",
                min=1,
                metavar="N",
                help="Live samples a feature's drift window needs before it is tested (the drift monitor's "
                "min_samples; a window is one report per device): fewer show as 'not enough samples' on the "
                "dashboard. Lower it for a small fleet, e.g. 3 devices of a few dozen samples each.",
            ),
        ] = 30,
        rounds: Annotated[
            int | None, typer.Option(min=1, help="Rounds to run.", show_default=_FILE_ROUNDS)
        ] = None,
        service_spki: ServiceSpki = None,
        trusted: Annotated[
            Path | None,
            typer.Option(
                "--trusted",
                envvar="DELTAPLANE_TRUSTED_KEYS",
                help="The registry's public signing key(s) (HOME/keys/signing.ed25519.pub): the coordinator "
                "fetches each version it publishes, verified as a device does, and registers its predictions "
                "on the reference data, so the devices' predicted-class drift is tested; that needs the task here "
                "(its module and data; torch), which the coordinator otherwise does not build.",
                show_default="not registered: that drift row stays untested",
            ),
        ] = None,
    ) -> None:
        """Run ROUNDS rounds: open each for the enrolled devices, wait for them up to DEADLINE, close it;
        admin token from $DELTAPLANE_ADMIN_TOKEN."""
        from deltaplane.aggregation.secagg.enrollment import device_id, held_partitions

        with _errors(OSError):
            run = _federation(federation)
            if secagg_neighbours is not None:
                run = _with_degree(run, federation, secagg_neighbours)
            # the file's rounds unless given: a `rounds: 5` in the federation was required again as --rounds,
            # and the guide's `--rounds 2` silently overrode an edited file
            n_rounds = run.rounds if rounds is None else rounds
            names = None
            if enrolled is not None:
                names = [device_id(i) for i in held_partitions(enrolled, ".token")]
                if not names:
                    raise ConfigError(
                        f"--enrolled {enrolled} holds no device-I.token (fleet enroll --out writes them)"
                    )
            # no torch: the drift reference and SecAgg's weight scale come from the registry (fleet init
            # stored them); only --trusted, or a registry without them, builds the task (serve.fleet.LocalTask)
            from deltaplane.serve.coordinator import coordinate

            admin = admin_client(url, ca, tls_cert, tls_key, service_spki)
            models = _ModelsConnection(url, trusted, _tls(url, ca, tls_cert, tls_key), service_spki)
            # SIGTERM stops the coordinator as Ctrl-C does (KeyboardInterrupt), so the SecAgg round it has open
            # is aborted on the service rather than left for the devices to wait in and count
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            done = _connected(
                url,
                lambda: models.run(
                    admin,
                    lambda conn: coordinate(
                        admin,
                        run,
                        model=model,
                        rounds=n_rounds,
                        deadline=deadline,
                        weight_scale=weight_scale,
                        # one line per round however narrow the terminal (or a pipe's 80 columns), and the
                        # service's words (a failed round's reason) as text, never as rich markup
                        progress=lambda s: console.print(s.line(n_rounds), soft_wrap=True, markup=False),
                        patience=patience,
                        say=lambda line: err_console.print(line, soft_wrap=True, markup=False),
                        authenticated=authenticated,
                        devices=names,
                        drift_min_samples=drift_min_samples,
                        models=conn,
                    ),
                ),
            )
        failed = sum(1 for s in done if s.failed)
        if failed:  # a script must be able to tell: exit 1 when a round was not published
            error_console.print(
                f"{failed} of {len(done)} rounds failed (not published)"
            )  # exit 1: never silenced
            raise typer.Exit(code=1)
