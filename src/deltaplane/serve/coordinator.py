"""The operator's loop that opens and closes a fleet's rounds over the service (``deltaplane fleet coordinate``).

Partner of the devices (:mod:`deltaplane.serve.fleet`) and of ``deltaplane serve --federation``: per round
:func:`coordinate` opens a plain or SecAgg round for the enrolled devices, waits until every invited device has
uploaded (or posted the stage) or a deadline passes, advances SecAgg stages, and closes; devices that missed a
deadline are dropouts.

A coordinator is a light process an operator can run anywhere: this module imports no torch. What it needs
from the task (the drift reference, SecAgg's weight scale) ``fleet init`` computed when it registered the
initial model (:mod:`deltaplane.serve.fleet_reference`); it builds the task itself (torch, the data:
:mod:`deltaplane.serve.fleet`) only where it must: with a verified model connection (``--trusted``: each
published version's predictions on the reference data, its divergence check), or when the registry holds no
reference for its federation's data (it says why).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from deltaplane.aggregation.secagg import Stage
from deltaplane.aggregation.secagg.enrollment import device_id
from deltaplane.engine.config import RunConfig
from deltaplane.engine.round_params import dp_adjacency, secure_neighbours
from deltaplane.errors import ConfigError, CoordinatorRunning, PrivacyBudgetExceeded, ServiceUnreachable
from deltaplane.processes import place_and_boot, process_state, start_ticks
from deltaplane.serve.client import AdminClient, DeviceClient, ServiceError
from deltaplane.serve.fleet_reference import FleetReference, registered_reference
from deltaplane.serve.reach import unreachable
from deltaplane.wording import count

if TYPE_CHECKING:
    from deltaplane.serve.fleet import LocalTask

__all__ = ["Patient", "RoundSummary", "coordinate"]

log = logging.getLogger(__name__)
T = TypeVar("T")


# -- the coordinator -------------------------------------------------------------------------------------------
@dataclass
class RoundSummary:
    """What one coordinated round did."""

    index: int
    kind: str
    number: int
    invited: int
    contributors: int
    version: int | None
    epsilon: float | None
    seconds: float
    measurements: dict[str, float] = field(default_factory=dict)
    failed: str | None = None
    #: a SecAgg round of signed key advertisements (``--authenticated``, YAML ``secagg.authenticated``)
    authenticated: bool = False
    #: devices the service left out of the round: its revocation list revokes them (not counted as invited)
    revoked: tuple[str, ...] = ()
    #: invited devices whose masked input the SecAgg sum does not hold, or with no upload in a plain round (a
    #: plain round's are named only when every uploader was one of the invited devices, else counted only)
    dropped: tuple[str, ...] = ()
    #: the neighbouring relation ``epsilon`` is stated under (the federation's: "add/remove", "zero-out" under
    #: distributed DP); None without central DP
    dp_adjacency: str | None = None
    #: the published version's accuracy on the task's test set and that set's size, measured by the coordinator
    #: on the weights it fetched verified (``--trusted``); None without them or when the fetch failed
    test_accuracy: float | None = None
    test_samples: int = 0

    @property
    def dropouts(self) -> int:
        return self.invited - self.contributors

    def line(self, rounds: int) -> str:
        """The progress line ``deltaplane fleet coordinate`` prints. An authenticated SecAgg round says
        ``secagg, authenticated`` (as the dashboard's fleet page does), so the operator sees from the
        coordinator's output alone that ``--authenticated`` or the federation's ``secagg.authenticated`` took
        effect, failed rounds included."""
        kind = f"{self.kind}, authenticated" if self.authenticated else self.kind
        head = f"round {self.index}/{rounds} ({kind} #{self.number})"
        left = "".join(f"; {d} revoked: left out" for d in self.revoked)
        if self.failed:
            return f"{head}: failed: {self.failed}{left}"
        eps = f", ε {self.epsilon:.3f}" if self.epsilon is not None else ""
        if eps and self.dp_adjacency:
            eps += f" ({self.dp_adjacency})"
        if self.measurements.get("secure_sum_published") == 0:  # distributed DP: too few for the noise
            eps += " (too few devices for the distributed noise: the sum was not published, ε still spent)"
        who = f": {', '.join(self.dropped)}" if self.dropped else ""
        test = (
            f", test accuracy {self.test_accuracy:.3f} on {self.test_samples} samples"
            if self.test_accuracy is not None
            else ""
        )
        return (
            f"{head}: {self.contributors}/{self.invited} devices ({self.dropouts} dropped out{who}), "
            f"version {self.version}{eps}{test}, {self.seconds:.1f} s{left}"
        )


class Patient:
    """The coordinator's admin connection, riding out a service outage (a restart, a network cut).

    A call that fails to connect is retried with backoff (``poll`` doubling up to 5 s) until the service
    answers again or ``patience`` seconds have passed since it stopped answering; ``say`` tells the operator,
    once per outage, what the coordinator waits for and when the service is back. Only reads and calls safe to
    repeat go through :meth:`call`; a call that changes the round goes through :meth:`once`, which never
    repeats it: the caller reads the round back to learn whether it went through (never publish twice)."""

    def __init__(
        self, admin: AdminClient, *, patience: float, say: Callable[[str], None], poll: float = 0.2
    ) -> None:
        self.admin, self.patience, self.say, self.poll = admin, patience, say, poll
        #: seconds spent waiting for the service so far: a stage's deadline does not count them
        self.down = 0.0

    def call(self, fn: Callable[[], T], doing: str) -> T:
        """``fn()``, retried through an outage; :class:`ServiceUnreachable` once ``patience`` runs out."""
        since, delay = None, self.poll
        while True:
            try:
                out = fn()
            except httpx.TransportError as exc:
                err = unreachable(exc, self.admin.base_url)
                if err.final:
                    raise err from None  # never retried
                now = time.monotonic()
                if since is None:
                    since = now
                    self.say(
                        f"the service is not answering ({type(exc).__name__}); waiting up to "
                        f"{self.patience:g} s for it to come back, to {doing}"
                    )
                elif now - since > self.patience:
                    raise ServiceUnreachable(
                        f"{err}; gave up after {self.patience:g} s waiting to {doing}"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            if since is not None:
                lost = time.monotonic() - since
                self.down += lost
                self.say(f"the service answers again after {lost:.1f} s")
            return out

    def once(self, fn: Callable[[], dict[str, Any]], doing: str) -> dict[str, Any] | None:
        """The service's answer to ``fn()``; or None when the connection failed, once the service answers again
        (whether ``fn`` took effect is unknown: the caller reads the round back)."""
        try:
            return fn()
        except httpx.TransportError as exc:
            err = unreachable(exc, self.admin.base_url)
            if err.final:
                raise err from None
            self.call(self.admin.stats, f"learn whether its answer to '{doing}' was lost")
            return None

    def wait(self, done: Callable[[], bool], deadline: float, poll: float) -> None:
        """Poll ``done`` until it holds or ``deadline`` seconds of the service being up have passed."""
        end, down = time.monotonic() + deadline, self.down
        while not done() and time.monotonic() < end + (self.down - down):
            time.sleep(poll)


class _RoundFailed(Exception):
    """A round the service opened but could not complete; it was given up on the service (aborted)."""

    def __init__(self, number: int, error: ServiceError) -> None:
        super().__init__(error.detail)
        self.number, self.error = number, error


def _given_up(p: Patient, abort: Callable[..., Any], number: int, error: ServiceError) -> _RoundFailed:
    """Abort the round ``number`` on the service (a failed round left open would hold its state, and its
    devices would wait on it), through an outage too, recording the ``error`` as why (the Fleet page shows
    it); an abort refused (the round is already over) is not the error to report."""
    with contextlib.suppress(ServiceError, httpx.HTTPError):
        p.call(lambda: abort(error.detail), f"abort round {number}")
    return _RoundFailed(number, error)


def _unreachable_leaving(exc: ServiceUnreachable, left: str) -> ServiceUnreachable:
    """The final give-up, naming the round the coordinator could not close or abort, and what to do."""
    return ServiceUnreachable(f"{exc}. {left}")


def _follow(
    p: Patient,
    number: int,
    run: Callable[[], tuple],
    abort: Callable[..., Any],
    left: str,
    *,
    abort_when_stopped: bool = False,
) -> tuple:
    """Follow opened round ``number`` to its end with ``run``: a service error aborts the round (best effort)
    and is reported as the round's failure; an unreachable service, while following or aborting, is the final
    give-up, saying what is ``left`` on the service and what to do about it. With ``abort_when_stopped`` (SecAgg
    rounds, which no later coordinator can take over) a coordinator stopped meanwhile (Ctrl-C, SIGTERM:
    ``KeyboardInterrupt``) aborts the round once, best effort, before it stops."""
    try:
        try:
            return run()
        except ServiceError as exc:
            raise _given_up(p, abort, number, exc) from None
        except KeyboardInterrupt:
            if abort_when_stopped:
                _abort_when_stopped(p, abort, number)
            raise
    except ServiceUnreachable as exc:
        raise _unreachable_leaving(exc, left) from None


#: why a stopped coordinator aborts its SecAgg round (the Fleet page and ``GET /admin/rounds/closed`` show it)
_STOPPED = (
    "the coordinator was stopped (Ctrl-C or SIGTERM) while the round was open; a SecAgg round cannot be taken "
    "over by another coordinator, so it was aborted rather than left open"
)


def _abort_when_stopped(p: Patient, abort: Callable[..., Any], number: int) -> None:
    """One try at aborting SecAgg round ``number`` as the coordinator stops, as abandoned: left open, the round
    kept the devices waiting in it, and each counted it towards its ``--rounds``, so the next coordinator's last
    round found them gone (walking docs/fleet.md: *only 0 clients advertised keys*); abandoned, the devices do
    not count it (:class:`~deltaplane.errors.RoundAbandoned`)."""
    try:
        abort(_STOPPED, abandoned=True)
    except (ServiceError, ServiceUnreachable, httpx.TransportError) as exc:
        p.say(
            f"stopped; could not abort SecAgg round {number} ({type(exc).__name__}: {exc}): abort it by hand"
        )
    else:
        p.say(f"stopped; SecAgg round {number} aborted on the service")


def _plain(p: Patient, model: str, names: list[str], deadline: float, poll: float) -> tuple:
    number = _open_plain(p, model)
    return _follow(
        p,
        number,
        lambda: _plain_round(p, model, names, deadline, poll, number),
        lambda why, abandoned=False: p.admin.abort_round(model, number, reason=why),
        f"Plain round {number} of {model!r} stays open on the service (rounds are durable): close or abort "
        f"it when the service is back (POST /admin/models/{model}/rounds/{number}/abort)",
    )


def _open_plain(p: Patient, model: str) -> int:
    """Open the model's plain round; after a lost answer, adopt the round the service opened (it is durable,
    so it is open after a restart too) rather than open another. A plain round already open (left by a
    coordinator that was stopped or killed: the service refuses a second, 409) is taken over, said: its uploads
    are the devices' updates, and the devices counted it, as this coordinator now does."""
    while True:
        try:
            opened = p.once(lambda: p.admin.open_round(model), "open a plain round")
        except ServiceError as exc:
            current = p.call(p.admin.stats, "read the open rounds")["rounds"].get(model)
            if exc.status != 409 or current is None:
                raise
            p.say(
                f"plain round {current['round']} of {model!r} was open already (left by a coordinator that was "
                f"stopped or killed; plain rounds are durable, {count(int(current['uploads']), 'upload')} in "
                "it): taking it over"
            )
            return int(current["round"])
        if opened is not None:
            return int(opened["round"])
        current = p.call(p.admin.stats, "read the open rounds")["rounds"].get(model)
        if current is not None:
            return int(current["round"])


def _plain_round(
    p: Patient, model: str, names: list[str], deadline: float, poll: float, number: int
) -> tuple:
    def uploads() -> int:
        stats = p.call(p.admin.stats, f"count the uploads of plain round {number}")
        return int(stats["rounds"].get(model, {}).get("uploads", 0))

    p.wait(lambda: uploads() >= len(names), deadline, poll)
    if uploads() == 0:
        # nobody took part: abort rather than close, since under central DP a close releases the noise alone,
        # a model of pure noise that spends ε; every device was invited (no sampling), so skipping the release
        # hides nothing the accountant relies on
        why = f"no device uploaded within the deadline ({deadline:g} s; {count(len(names), 'device')} run)"
        with contextlib.suppress(ServiceError):  # refused: the round is over already (aborted meanwhile)
            p.call(lambda: p.admin.abort_round(model, number, reason=why), f"abort plain round {number}")
        return number, 0, None, {}, ()
    while True:
        closed = p.once(lambda: p.admin.close_round(model, number), f"close plain round {number}")
        # the round as stored: whether a close whose answer was lost went through (never close twice), and
        # which devices uploaded
        rec = p.call(lambda: p.admin.round_status(model, number), f"read plain round {number} back")
        if (
            closed is not None or rec["state"] == "closed"
        ):  # published; after a lost answer, as stored (its measurements kept)
            done = closed if closed is not None else rec
            measured = done.get("measurements", {})
            return number, int(done["uploads"]), done["version"], measured, _missing(names, rec)
        if rec["state"] != "open":
            raise ServiceError(409, f"plain round {number} of {model!r} was {rec['state']} meanwhile")


def _missing(names: list[str], rec: dict[str, Any]) -> tuple[str, ...]:
    """The devices of ``names`` with no upload in plain round ``rec`` (as the service stores it: ``devices``,
    the uploaders' token ids). Named only when every uploader is one of ``names``: a service that does not
    list them (an older one), or an uploader the coordinator did not expect (tokens under other ids), leaves
    the dropouts counted, not named."""
    uploaded = rec.get("devices")
    if (
        not isinstance(uploaded, list)
        or not set(uploaded) <= set(names)
        or len(uploaded) != rec.get("uploads")
    ):
        return ()
    return tuple(d for d in names if d not in uploaded)


def _secagg(
    p: Patient,
    model: str,
    names: list[str],
    deadline: float,
    poll: float,
    weight_scale: float,
    neighbours: int | None,
    authenticated: bool,
) -> tuple:
    """Open and run one SecAgg round: its number, survivors, version, measurements, the invited devices that
    dropped out, and the devices left out as revoked (each said once: ``<device> revoked: left out``)."""
    number, revoked = _open_secagg(p, model, names, weight_scale, neighbours, authenticated)
    for d in revoked:
        p.say(f"{d} revoked: left out of SecAgg round {number}")
    invited = [d for d in names if d not in revoked]
    done = _follow(
        p,
        number,
        lambda: _secagg_round(p, model, invited, deadline, poll, number, authenticated),
        lambda why, abandoned=False: p.admin.abort_secagg(model, number, reason=why, abandoned=abandoned),
        f"SecAgg round {number} of {model!r} cannot be finished: a restarted service records it lost; "
        f"if the service comes back without a restart, abort it (POST /admin/models/{model}/secagg/"
        f"{number}/abort)",
        abort_when_stopped=True,
    )
    number, survivors, version, measured, ids = done
    # client ids are positions in the open's device list, revoked ones left out (OpenSecAggRequest.devices)
    dropped = tuple(d for i, d in enumerate(invited) if i not in set(ids))
    return number, survivors, version, measured, dropped, tuple(revoked)


#: why the coordinator aborts a stray SecAgg round (the Fleet page shows it)
_STRAY = (
    "a stray: opened by a coordinator whose answer was lost, so nobody runs it; the coordinator opened the "
    "next round instead"
)


def _open_secagg(
    p: Patient, model: str, names: list[str], weight_scale: float, neighbours: int | None, authenticated: bool
) -> tuple[int, list[str]]:
    """Open a SecAgg round (SecAgg+ of degree ``neighbours``; None: the complete graph; ``authenticated``: signed
    key advertisements, :mod:`~deltaplane.aggregation.secagg.identity`): its number, and the devices of ``names``
    the service left out because its revocation list revokes them (never invited: no stage waits for them). An
    open whose answer
    was lost may have opened a round nobody will run (its number is unknown): the next open is numbered after
    it, and a round just below that still at key advertisement for the same devices is such a stray, so it is
    aborted rather than left open."""
    failed = 0
    signed = {"authenticated": True} if authenticated else {}  # the service's default is unauthenticated
    while True:
        opened = p.once(
            lambda: p.admin.open_secagg(
                model,
                names,
                weight_scale=weight_scale,
                neighbours=neighbours,
                coordinator=this_coordinator(),
                **signed,
            ),
            "open a round",
        )
        if opened is not None:
            break
        failed += 1
    number = int(opened["round"])
    for stray in range(max(1, number - failed), number):
        with contextlib.suppress(ServiceError):
            status = p.call(
                functools.partial(p.admin.secagg_status, model, stray), f"read SecAgg round {stray}"
            )
            invited = status.get("invited", 0) + len(status.get("revoked", []))
            ours = invited == len(names) and status.get("stage") == Stage.ADVERTISE
            if status.get("finished") is None and ours:
                p.call(
                    functools.partial(p.admin.abort_secagg, model, stray, reason=_STRAY, abandoned=True),
                    f"abort SecAgg round {stray}",
                )
    return number, list(opened.get("revoked", []))


def this_coordinator() -> dict[str, Any]:
    """What a SecAgg open says of the coordinator that sends it (the service keeps it with the round): its host
    name (for people), and what names the process for a coordinator starting later: the place (host name,
    machine id and pid namespace hashed: two machines or containers sharing a host name differ), the boot, the
    pid and its start time (a pid is reused; a pid with its start time is not, within one boot)."""
    place, boot = place_and_boot()
    return {
        "host": socket.gethostname(),
        "place": place,
        "boot": boot,
        "pid": os.getpid(),
        "start": start_ticks(os.getpid()) or 0,
    }


def coordinator_state(who: Mapping[str, Any], me: Mapping[str, Any]) -> tuple[str, str]:
    """Whether the coordinator ``who`` (a round's stamp) is ``gone``, ``running`` or ``unknown`` as seen by
    ``me`` (:func:`this_coordinator`), with why. Only a process of this place and boot can be judged gone; any
    other (another machine or container, another boot, or a stamp that does not say) is unknown."""
    if not who.get("place") or (who.get("place"), who.get("boot")) != (me["place"], me["boot"]):
        return "unknown", "on another host, container or boot, whose processes this one cannot see"
    if int(who["pid"]) == me["pid"]:
        return "running", "this very process"
    state, why = process_state(int(who["pid"]), int(who.get("start") or 0) or None)
    return state, why


#: why a starting coordinator aborts a SecAgg round whose coordinator is gone (the Fleet page shows it)
_GONE = (
    "its coordinator ({who}) is gone: killed (SIGKILL) or crashed without aborting it; a SecAgg round cannot be "
    "taken over, so the coordinator started next aborted it (devices do not count it)"
)


def _abort_abandoned(p: Patient, model: str) -> None:
    """Before the first round: abort each SecAgg round of ``model`` left open by a coordinator that is gone, as
    abandoned (devices do not count it towards their ``--rounds``), saying so. A round whose coordinator may
    still run it (alive on this host, or on another host, which cannot be checked from here) is not touched:
    aborting it could destroy a legitimate run, so :class:`CoordinatorRunning` says how to abort it by hand.
    Rounds opened without a coordinator (by hand, or by a coordinator before the stamp) are left as the
    operator left them: devices take the newer round (docs/fleet.md)."""
    stats = p.call(p.admin.stats, "read the open rounds")
    me = this_coordinator()
    for r in stats.get("secagg_rounds", {}).get(model, []):
        who, number = r.get("coordinator"), int(r["round"])
        if not who:
            continue
        named = f"pid {who['pid']} on host {who['host']}"
        state, why = coordinator_state(who, me)
        if state == "gone":
            why = _GONE.format(who=named)
            with contextlib.suppress(ServiceError):  # it finished meanwhile
                p.call(
                    functools.partial(p.admin.abort_secagg, model, number, reason=why, abandoned=True),
                    f"abort SecAgg round {number}",
                )
            p.say(f"SecAgg round {number} was left open by a coordinator that is gone ({named}); aborted it")
            continue
        where = "still running" if state == "running" else why
        raise CoordinatorRunning(
            f"SecAgg round {number} of {model!r} is open under the coordinator {named} ({where}); a second "
            "coordinator would take its devices. Stop that coordinator (it aborts its round as it stops), or, "
            "if it is gone, abort the round and start again: curl --fail --cacert <ca.pem> -X POST -H "
            f'"Authorization: Bearer $DELTAPLANE_ADMIN_TOKEN" \'<url>/admin/models/{model}/secagg/{number}/'
            "abort?abandoned=true&reason=its+coordinator+is+gone'"
        )


def _secagg_status(p: Patient, model: str, number: int) -> dict[str, Any]:
    """The round's status; a round that ended without publishing (lost in a restart, aborted) is a 409 for
    the coordinator's round to fail on."""
    status = p.call(lambda: p.admin.secagg_status(model, number), f"follow SecAgg round {number}")
    finished = status.get("finished")
    if finished == "lost":
        raise ServiceError(
            409,
            f"the service restarted while SecAgg round {number} was open; a SecAgg round does not survive a "
            "restart (its keys and masked inputs were in the service's memory only): lost, nothing published",
            "RoundLost",
        )
    if finished == "aborted":
        raise ServiceError(409, f"SecAgg round {number} of {model!r} was aborted meanwhile")
    return status


def _too_few_advertised(exc: ServiceError, authenticated: bool) -> ServiceError:
    """The service's "only K clients advertised keys" with what the devices' logs will say: a device sits out
    an invitation it refuses without sending anything, so the coordinator sees only a short count, and the
    commonest cause is an identity mismatch between the devices and the round (docs/fleet.md)."""
    if "advertised keys" not in exc.detail:
        return exc
    why = (
        "devices without a SecAgg identity (fleet device --identity-key --certificate --enrollment-authority) "
        "sit out authenticated rounds"
        if authenticated
        else "devices enrolled with a SecAgg identity sit out rounds opened without --authenticated"
    )
    return ServiceError(
        exc.status,
        f"{exc.detail} (a device that refuses the invitation sends nothing and logs why; e.g. {why})",
        exc.error,
    )


def _secagg_counted(p: Patient, model: str, number: int, counted: str, expected: int) -> bool:
    """Whether SecAgg round ``number`` has counted ``expected`` devices in its ``counted`` stage."""
    return _secagg_status(p, model, number)[counted] >= expected


def _secagg_round(
    p: Patient, model: str, names: list[str], deadline: float, poll: float, number: int, authenticated: bool
) -> tuple:
    expected = len(names)
    for counted in ("advertised", "shared", "uploaded"):
        p.wait(functools.partial(_secagg_counted, p, model, number, counted, expected), deadline, poll)
        try:
            advanced = p.once(lambda: p.admin.advance_secagg(model, number), f"advance SecAgg round {number}")
        except ServiceError as exc:
            raise (_too_few_advertised(exc, authenticated) if counted == "advertised" else exc) from None
        if advanced is None:
            _secagg_status(p, model, number)  # lost in a restart: says so
            raise ServiceError(
                409,
                f"the connection to the service broke while advancing SecAgg round {number} (whether the stage "
                "closed is unknown: a repeated advance could close the next one)",
            )
        expected = int(advanced[counted])
    status = _secagg_status(p, model, number)
    ids = list(status["survivors"])  # client ids: positions in the open's device list
    survivors = len(ids)
    answering = survivors
    if status["stage"] == Stage.CONSISTENCY:  # an authenticated round: survivors sign what they were sent
        p.wait(lambda: _secagg_status(p, model, number)["signed"] >= survivors, deadline, poll)
        advanced = p.once(lambda: p.admin.advance_secagg(model, number), f"advance SecAgg round {number}")
        if advanced is None:
            _secagg_status(p, model, number)
            raise ServiceError(
                409,
                f"the connection to the service broke while closing SecAgg round {number}'s consistency check "
                "(whether it closed is unknown: a repeated advance could close the next stage)",
            )
        answering = int(advanced["signed"])
    p.wait(lambda: _secagg_status(p, model, number)["responded"] >= answering, deadline, poll)
    while True:
        closed = p.once(lambda: p.admin.close_secagg(model, number), f"close SecAgg round {number}")
        if closed is not None:
            published = closed["published"]
            return number, survivors, published["version"], published["measurements"], ids
        status = _secagg_status(p, model, number)  # the answer was lost: did the close go through?
        if status.get("finished") == "published":
            published = status["published"]
            return number, survivors, published["version"], published.get("measurements", {}), ids


def coordinate(
    admin: AdminClient,
    config: RunConfig,
    *,
    model: str,
    rounds: int,
    deadline: float,
    devices: list[str] | None = None,
    weight_scale: float | None = None,
    drift: bool = True,
    poll: float = 0.2,
    progress: Callable[[RoundSummary], None] | None = None,
    patience: float = 300.0,
    say: Callable[[str], None] | None = None,
    authenticated: bool = False,
    drift_min_samples: int = 30,
    models: DeviceClient | None = None,
) -> list[RoundSummary]:
    """Run ``rounds`` rounds of ``model`` with the enrolled devices (default: ``device-0`` … one per partition).

    Each round is SecAgg when ``config.secagg`` (the service refuses plain rounds then), else plain. A stage (a
    plain round's uploads; each SecAgg stage) waits until every device still in the round has spoken or
    ``deadline`` seconds pass; latecomers are dropouts. A round the service cannot complete (too few devices
    for SecAgg's threshold) is reported as failed and the next one starts; a round the service refuses to open
    as configured (422: a ring too small for ``--max-examples``, fewer devices than distributed DP's floor...)
    is reported and ends the run, since every later open would be the same request; a round that would exceed
    the privacy budget ends the run. ``drift`` sets the drift reference the devices' summaries are compared to;
    ``drift_min_samples`` is its monitor's ``min_samples`` (:class:`~deltaplane.monitor.drift.DriftMonitor`): a
    feature with fewer live samples in a window (one report per device) is shown as "not enough samples", not
    tested, so a small fleet (3 devices holding a few dozen samples each) needs it lower than the default 30.
    ``models`` is a device connection trusting the registry's signing key (the coordinator's own token): with
    ``drift``, the coordinator fetches each version it publishes through it, verified, and registers that
    version's predictions on the reference data (:func:`~deltaplane.serve.fleet.register_predictions`) before its next
    request, so the
    devices' predicted-class reports on it are tested as in ``deltaplane run --transport http``; and at start the
    version the training tag serves (the drift reference's PUT drops the references held). Without ``models``
    the predicted-class row stays untested ("no prediction reference"), said once.

    The drift reference and SecAgg's weight scale (unless ``weight_scale`` is given) are those ``fleet init``
    stored with ``model``'s initial version (:mod:`~deltaplane.serve.fleet_reference`), the same values the
    task gives: without ``models`` the coordinator builds no task and imports no torch. It builds the task
    itself (:class:`~deltaplane.serve.fleet.LocalTask`) with ``models`` (the predictions need the model run
    on the reference data), or when no stored reference was computed for ``config``'s data (said once, with
    why); a task it cannot build there is a :class:`ConfigError` that says what it was needed for.

    A service that stops answering (a restart, an outage) is waited for up to ``patience`` seconds at a time
    (:class:`Patient`; ``say`` hears what it waits for, default: a log warning), and the time it was down does
    not count against a stage's deadline. Then the round goes on from what the service says: a plain round is
    durable, so it is finished (or found already closed when only the answer to the close was lost: never
    published twice); a SecAgg round that the restart lost fails with that reason and the next one starts.
    Past ``patience``, :class:`ServiceUnreachable` names the round left and how to abort it.

    ``authenticated`` opens SecAgg rounds whose key advertisements the devices sign and check (devices enrolled
    with ``fleet enroll --authority-key``); it needs a SecAgg federation (ConfigError otherwise: a plain round
    has no keys to authenticate). A federation with ``secagg_authenticated`` (YAML ``secagg.authenticated``)
    opens them so too, as ``deltaplane run`` runs them.
    """
    authenticated = authenticated or config.secagg_authenticated
    # checked here, before any round: the service would refuse it only at the drift reference's PUT (422)
    if isinstance(drift_min_samples, bool) or not isinstance(drift_min_samples, int) or drift_min_samples < 1:
        raise ConfigError(f"drift_min_samples must be an integer of at least 1. Found {drift_min_samples!r}")
    if authenticated and not config.secagg:
        raise ConfigError(
            "authenticated rounds sign SecAgg's key advertisements; this federation runs plain rounds (set "
            "secagg.enabled: true in its YAML)"
        )
    if config.sample_fraction < 1:
        raise ConfigError(
            f"sample_fraction={config.sample_fraction:g}: the coordinator invites every enrolled device to every "
            "round (it does not sample devices); use sample_fraction: 1"
        )
    names = devices or [device_id(i) for i in range(config.clients)]

    p = Patient(admin, patience=patience, say=say or log.warning, poll=poll)
    # what the rounds need from the task: fleet init's reference from the registry, or the task built here
    local: LocalTask | None = None
    ref: FleetReference | None = None
    if config.secagg:  # before anything else: a running coordinator of this model stops this one here
        _abort_abandoned(p, model)
    if drift and models is not None:
        local = _local_task(config, "--trusted runs each published version on the reference data")
    elif drift or (config.secagg and weight_scale is None):
        got = _registered(p, model, config)
        if isinstance(got, str):
            p.say(
                f"the registry holds no fleet reference for this federation's data ({got}); building the task "
                "here for the drift reference and SecAgg's weight scale"
            )
            local = _local_task(config, f"the registry holds no fleet reference for its data: {got}")
        else:
            ref = got
    if local is not None:
        ref = local.reference
    if config.secagg and weight_scale is None:
        assert ref is not None  # asked for above, or built
        weight_scale = ref.weight_scale(config)
    # SecAgg+: the config's degree for a round of every invited device, as `deltaplane run` opens it
    neighbours = secure_neighbours(config, len(names))
    if drift:
        assert ref is not None  # asked for above, or built
        sent = ref
        p.call(
            lambda: admin.set_drift_reference(
                model, sent.spec, sent.reference, window=len(names), min_samples=drift_min_samples
            ),
            "set the drift reference",
        )
    predictions: Callable[[int | None], tuple[int, float | None, bool] | None] = lambda version: None  # noqa: E731
    if drift and models is not None and local is not None:
        predictions = local.predictions(p, models, model)
        predictions(None)  # a restarted coordinator: the version the devices may still report on
    elif drift:
        p.say(
            "no verified model connection (fleet coordinate --trusted): the published versions' prediction "
            "references are not registered, so the predicted-class drift row stays untested"
        )
    done: list[RoundSummary] = []
    for index in range(1, rounds + 1):
        t0 = time.perf_counter()
        kind = "secagg" if config.secagg else "plain"
        try:
            if config.secagg:
                number, n, version, measured, dropped, revoked = _secagg(
                    p, model, names, deadline, poll, weight_scale or 0.0, neighbours, authenticated
                )
            else:
                number, n, version, measured, dropped = _plain(p, model, names, deadline, poll)
                revoked = ()
        except (_RoundFailed, ServiceError) as failure:  # not opened (number 0), or opened and given up
            exc, number = (
                (failure.error, failure.number) if isinstance(failure, _RoundFailed) else (failure, 0)
            )
            if exc.error == PrivacyBudgetExceeded.__name__:
                raise PrivacyBudgetExceeded(f"round {index}: {exc.detail}") from None
            if exc.status >= 500 or exc.status in (401, 403):
                raise exc from None
            summary = RoundSummary(
                index, kind, number, len(names), 0, None, None, time.perf_counter() - t0,
                authenticated=authenticated,
            )  # fmt: skip
            summary.failed = exc.detail
            if number == 0 and exc.status == 422:  # the open itself: the same devices and config every round
                summary.failed += (
                    " (the service refuses this open; every later round would be refused alike: stopped)"
                )
                done.append(summary)
                if progress is not None:
                    progress(summary)
                break
        else:
            summary = RoundSummary(
                index, kind, number, len(names) - len(revoked), n, version, measured.get("epsilon"),
                time.perf_counter() - t0, dict(measured), authenticated=authenticated, revoked=revoked,
                dropped=dropped, dp_adjacency=dp_adjacency(config),
            )  # fmt: skip
            if version is None:  # closed without an update (no device uploaded): nothing was published
                summary.failed = "no device took part; nothing was published"
            elif (fetched := predictions(int(version))) is not None and fetched[1] is not None:
                assert local is not None  # predictions registered: the task is built here
                summary.test_accuracy, summary.test_samples = fetched[1], len(local.task.test)
                _store_evaluation(p, model, summary, diverged=fetched[2])
        done.append(summary)
        if progress is not None:
            progress(summary)
    return done


def _store_evaluation(p: Patient, model: str, summary: RoundSummary, *, diverged: bool) -> None:
    """Store the published version's test accuracy and divergence (measured here on its verified weights) on
    the service, where the Fleet page shows them beside the devices' held-out figures; a refusal is said and
    the rounds go on (the figure is on the coordinator's line either way)."""
    assert summary.version is not None and summary.test_accuracy is not None
    version, accuracy = summary.version, summary.test_accuracy
    try:
        p.call(
            lambda: p.admin.set_evaluation(
                model, summary.kind, summary.number, version,
                test_accuracy=accuracy, test_samples=summary.test_samples, diverged=diverged,
            ),
            f"store version {version}'s test accuracy",
        )  # fmt: skip
    except ServiceError as exc:
        p.say(f"could not store version {version}'s test accuracy on the service: {exc.detail}")


def _registered(p: Patient, model: str, config: RunConfig) -> FleetReference | str:
    """The fleet reference ``fleet init`` registered with ``model`` for ``config``'s data, read over the admin
    API; or why there is none (an unknown model included: its rounds then fail as before, naming it)."""
    try:
        versions = p.call(lambda: p.admin.versions(model), f"read {model!r}'s versions")
    except ServiceError as exc:
        if exc.status != 404:
            raise
        return exc.detail
    return registered_reference(versions, model, config)


def _local_task(config: RunConfig, needs: str) -> LocalTask:
    """The task built here (torch and its data: :class:`~deltaplane.serve.fleet.LocalTask`), which the
    coordinator needs for ``needs``."""
    from deltaplane.serve.fleet import LocalTask

    return LocalTask.build(config, needs)
