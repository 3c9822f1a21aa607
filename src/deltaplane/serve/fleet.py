"""A fleet of real device processes, and the operator's loop that runs their rounds over the service.

Partner of ``deltaplane serve --federation run.yaml``: the service runs the federation's *server* step; this
module runs the rest of the same :class:`~deltaplane.engine.RunConfig` on each side.

* :func:`run_device` is one device: it polls ``GET /v1/models/{m}/rounds/open`` with backoff; on a plain round
  it fetches the verified training model, runs the engine's :class:`~deltaplane.engine.ClientStep` on its own
  partition of the task (``device`` is the partition id, as Flower's ``partition-id``) and uploads the
  compressed update; on a SecAgg round it fetches and checks the invitation first (a round it refuses costs
  it no training), runs the client step, then each SecAgg stage as the operator opens it
  (:class:`~deltaplane.serve.secagg_client.SecAggDevice`, with OS randomness: a real device never derives
  its secrets from the run's seed). Once the round's version is published it reports its held-out accuracy
  and drift summary. A device with a personalizer (α-mix, Ditto, FedPer, FedBN) adapts its personal state to
  every version a round publishes, whether it took part in that round, sat it out, or never saw it open (it
  catches up, in order, on the versions it missed, reporting on each: :func:`_catch_up`), as every device of
  the simulator does after each round's downlink, and reports its personal model's accuracy beside the
  global one's (:func:`report_pending`). It stops after ``rounds`` rounds, or when ``stop`` is set.
* :func:`~deltaplane.serve.coordinator.coordinate` is the operator (re-exported here), in a module of its own
  that imports no torch; :class:`LocalTask` is what it builds of the task where it needs the task itself.

A plain round gives the same model as ``deltaplane run --transport http`` (:mod:`deltaplane.serve.federation`)
with the same YAML and seed when the devices' uploads reach the service in device order (FedAvg sums in arrival
order); SecAgg rounds differ by their stochastic rounding, which a real device draws from the OS.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    SecAggAuthError,
    SecAggError,
    SecAggFloorError,
    Stage,
)
from deltaplane.aggregation.secagg.enrollment import device_id
from deltaplane.aggregation.secagg.revocation import take_revocations
from deltaplane.engine import ClientStep, Dataset, RunConfig, build_clients, evaluate_clients, make_task
from deltaplane.engine.divergence import DivergenceWatch
from deltaplane.engine.metrics import accuracy
from deltaplane.engine.scoring import dp_adjacency, personal_row, round_epsilon
from deltaplane.engine.secure import check_float_uploads, masked_zeros
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.errors import (
    ConfigError,
    DecodeError,
    DeltaplaneError,
    NotFound,
    RoundAbandoned,
    RoundAborted,
    RoundLost,
    ServiceUnreachable,
    TaskError,
)
from deltaplane.monitor import DriftSpec
from deltaplane.serve.client import (
    REVOCATIONS_DEVICE_PATH,
    DeviceClient,
    ServiceError,
    TokenRefused,
)
from deltaplane.serve.coordinator import Patient, RoundSummary, coordinate
from deltaplane.serve.device_releases import read_releases, write_releases
from deltaplane.serve.federation import drift_reference, holdout_summary, prediction_reference
from deltaplane.serve.fleet_reference import FleetReference
from deltaplane.serve.reach import unreachable
from deltaplane.serve.secagg_client import BINDING, SecAggDevice
from deltaplane.wording import count

__all__ = [
    "Device",
    "LocalTask",
    "Patient",
    "RoundSummary",
    "coordinate",
    "device_id",
    "keep_releases",
    "load_device",
    "own_certificate_holds",
    "refresh_revocations",
    "run_device",
    "unreachable",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the SecAgg stages a device acts in, in order: the stage that must be open, and the device's method
SECAGG_STEPS = (
    (Stage.ADVERTISE, "advertise"),
    (Stage.SHARE, "share"),
    (Stage.MASKED, "upload"),
    (Stage.CONSISTENCY, "vouch"),  # authenticated rounds only: the consistency check
    (Stage.UNMASK, "unmask"),
)
#: statuses that mean "this device is out of this round" (too late, not invited, not a survivor, round gone)
_OUT_OF_ROUND = (403, 404, 409, 422)
#: statuses a catch-up report may be refused with for good (its cohort withdrew consent, the version is gone or
#: holds a withdrawn cohort, a malformed report): that report is dropped, said; the device goes on
_CATCH_UP_DROPPED = (*_OUT_OF_ROUND, 451)
#: the metric that marks a catch-up report: ``ReportRequest`` refuses fields it does not declare, so a new field
#: would be refused (422) by every service before it; a metric is taken by all of them
CATCH_UP_METRIC = "catch_up"


# -- the device ------------------------------------------------------------------------------------------------
@dataclass
class Device:
    """One device: its connection, its partition of the task and the engine's client step."""

    conn: DeviceClient
    model: str
    config: RunConfig
    client: Any  # deltaplane.engine.federation.Client: this device's data, compressor, personal state
    step: ClientStep
    net: torch.nn.Module
    spec: DriftSpec
    #: (round, base version) of the last round taken part in (or, with a personalizer, seen open) whose new
    #: version is not reported yet
    pending: tuple[int, int] | None = None
    log: Callable[[str], None] = print
    rounds: list[dict[str, Any]] = field(default_factory=list)
    #: the device's enrollment (``fleet enroll --authority-key``): it signs its SecAgg key advertisements and
    #: refuses rosters it cannot authenticate, and rounds that are not authenticated; None: neither
    credentials: DeviceCredentials | None = None
    #: where the device keeps the newest revocation list it took (:func:`refresh_revocations`; None: in memory
    #: only, so a restarted device could be handed an older list that is still current)
    revocations_file: Path | None = None
    #: where the device keeps how many locally privatized updates it has released (:func:`keep_releases`;
    #: None: in memory only, so a restarted device would count, and report its local ε, from zero again)
    releases_file: Path | None = None
    #: the release count last stored in :attr:`releases_file`
    releases_stored: int = 0
    #: the task's test set and class count: a personalized device scores its personal and the global model
    #: on its own label mix there, as the simulator does (:func:`~deltaplane.engine.scoring.personal_row`)
    test: Any = None
    num_classes: int = 0
    #: the newest version this device adapted its personal state to, or started from when no round made it
    #: (None: none yet); with a service that says which round made each version, every version a round made
    #: up to it is adapted to, in order (:func:`_catch_up`)
    adapted: int | None = None
    #: whether the device said that its service cannot tell it which round made a version (said once)
    said_no_rounds: bool = False
    #: catch-up reports scored but not sent yet (a 429 stopped them: sent, in order, before anything else is
    #: reported), each ``{"round", "version", "metrics"}`` (:func:`_send_catch_up_reports`)
    unsent: list[dict[str, Any]] = field(default_factory=list)
    #: the rounds this device's update went into (a personalized device also reports on rounds it sat out)
    joined: set[int] = field(default_factory=set)
    #: SecAgg rounds it saw open that no coordinator ran (aborted as abandoned: its coordinator was stopped or
    #: killed): not counted towards ``--rounds`` (:func:`counted_rounds`)
    abandoned: set[int] = field(default_factory=set)
    #: SecAgg rounds seen whose end it knows (published, aborted, lost, abandoned): not asked about again
    settled: set[int] = field(default_factory=set)


def keep_releases(dev: Device, path: Path) -> None:
    """Count the device's local-DP releases in ``path`` (:mod:`~deltaplane.serve.device_releases`): continue
    from the count stored there, and store the new one before each privatized update leaves the device
    (:func:`_record_releases`), so its reported ε survives a restart. Without local DP, nothing is kept.

    Raises:
        ReleaseCountDamaged: the file is there but cannot be read as this device's count (never reset)."""
    if dev.config.local_dp_noise <= 0:
        return
    stored = read_releases(path, device=dev.client.cid)
    counted = dev.step.participations
    counted[dev.client.cid] = max(stored, counted.get(dev.client.cid, 0))
    dev.releases_file, dev.releases_stored = path, stored


def _record_releases(dev: Device) -> None:
    """Store the device's release count if the client step has just privatized an update: called after the
    step ran and before anything of its update is sent, so a crash in between only over-counts."""
    if dev.releases_file is None:
        return
    n = dev.step.participations.get(dev.client.cid, 0)
    if n != dev.releases_stored:
        write_releases(dev.releases_file, device=dev.client.cid, releases=n)
        dev.releases_stored = n


def load_device(conn: DeviceClient, config: RunConfig, partition: int, *, model: str) -> Device:
    """Device ``partition`` of ``config``'s task: its data, the client step of a real device (no attack, local
    DP noise from the OS), and the drift reference its summaries are binned on."""
    if not 0 <= partition < config.clients:
        raise ConfigError(
            f"--device {partition} is not a partition of this federation (clients: {config.clients}); use "
            f"0 to {config.clients - 1}"
        )
    task = make_task(config)
    clients = build_clients(config, task)
    net = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    # the service would refuse every update of such a model under SecAgg or DP, round after round: say so now
    check_float_uploads(config, net)
    step = ClientStep(config, task, base_id=model, simulation=False)
    step.local_keys(net)
    spec, _ = drift_reference(task, clients)
    return Device(
        conn,
        model,
        config,
        clients[partition],
        step,
        net,
        spec,
        test=task.test,
        num_classes=int(task.num_classes),
    )


def _fetch_base(dev: Device, base: int) -> dict[str, torch.Tensor] | None:
    """The verified training model if it is the round's base; None (the device sits the round out) if not."""
    report_pending(dev)
    version, state = dev.conn.fetch(dev.model, channel="training")
    if dev.adapted is None and dev.conn.made_by_known and dev.conn.made_by is None:
        dev.adapted = version  # a version no round made (the registered base): nothing before it to adapt to
    if version != base:
        dev.log(f"round base is version {base} but the training tag serves {version}; sitting this round out")
        return None
    return state


@contextlib.contextmanager
def _uplink_kept_unless_sent(dev: Device) -> Iterator[list[bool]]:
    """Put the device's uplink state (its compressor's error-feedback residual and generator, DGC's velocity and
    update-norm history)
    back as it was before the round unless the block marks the update sent (``sent[0] = True``).

    The client step moves that state as if its update were delivered; a device that drops out before its
    update leaves (a refusal, a closed stage, a lost connection) would otherwise carry a residual missing what
    it never sent into the next round. An update whose sending was attempted counts as sent (it may have
    arrived): resending it through the residual would count it twice."""
    client = dev.client
    saved = copy.deepcopy((client.compressor.state_dict(), client.velocity, client.norms))
    sent = [False]
    try:
        yield sent
    finally:
        if not sent[0]:
            client.compressor.load_state_dict(saved[0])
            client.velocity = saved[1]
            client.norms = saved[2]


def plain_round(dev: Device, info: dict[str, Any]) -> bool:
    """Train on the round's base, upload the compressed update bound to the round's nonce; True if accepted."""
    number, base = int(info["round"]), int(info["base_version"])
    state = _fetch_base(dev, base)
    if state is None:
        return False
    sessions = dev.step.sessions
    if sessions.compact and not sessions.fetched:  # the server's word for the wire session, as in process
        sessions.install(dev.conn.session(dev.model))
    with _uplink_kept_unless_sent(dev) as sent:
        up = dev.step.run(dev.client, dev.net, state, number, base)
        _record_releases(dev)  # before the privatized update can leave
        if up.payload is None:
            dev.log(f"round {number}: no update ({up.error}); sitting it out")
            return False
        sent[0] = True  # from here it may arrive (a lost answer) ...
        try:
            dev.conn.upload(
                dev.model, number, up.payload, num_examples=dev.client.num_samples, nonce=info["nonce"]
            )
        except ServiceError:
            sent[0] = False  # ... unless the service answered that it refused it
            raise
    dev.pending = (number, base)
    dev.joined.add(number)
    return True


def wait_for_stage(dev: Device, number: int, stage: str, *, deadline: float, poll: float) -> str | None:
    """Poll until SecAgg round ``number`` is at ``stage``: None then; otherwise why the device cannot speak in
    it: the round moved past the stage or ended, time ran out, or a newer SecAgg round opened.

    A newer round means this one was left open (the coordinator runs one round at a time and finishes or
    aborts each before the next): waiting in it would keep the device out of the coordinator's round, so
    the device leaves it, as a dropout, and takes the newer one (:func:`_next_round`)."""
    order = [s for s, _ in SECAGG_STEPS]
    delay = poll
    while time.monotonic() < deadline:
        secagg = [r for r in dev.conn.open_rounds(dev.model) if r["kind"] == "secagg"]
        newer = max((int(r["round"]) for r in secagg if int(r["round"]) > number), default=None)
        if newer is not None:
            return f"round {newer} opened after it (this one was left open); left it before '{stage}'"
        now = next((r for r in secagg if r["round"] == number), None)
        if now is None:  # not open any more: e.g. aborted at key advertisement, too few for the threshold
            return f"the round ended (aborted, or finished without this device) before it spoke in '{stage}'"
        if order.index(now["stage"]) > order.index(stage):
            return f"'{stage}' closed before this device spoke"
        if now["stage"] == stage:
            return None
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
    return f"'{stage}' did not open within the stage wait (--stage-wait)"


def secagg_round(dev: Device, info: dict[str, Any], *, wait: float, poll: float = 0.1) -> bool:
    """Check the invitation, train, then run the SecAgg stages as the operator opens them; only masked bytes
    leave the device. An invitation the device refuses costs it no training pass (:func:`_accept_invitation`).

    Returns True once the device answered the unmasking request; False if it sat the round out or dropped
    out (a stage closed before it spoke: the others' round goes on without it), or refused a stage itself
    (:class:`~deltaplane.aggregation.secagg.SecAggError`: e.g. under distributed DP an unmasking request with
    fewer survivors than the m_min its noise was calibrated to, :class:`~deltaplane.aggregation.secagg.
    SecAggFloorError`), or refused the invitation itself (an unsafe graph or threshold, a ring range or
    weighting its own distributed DP forbids, a vector not the size of its update, a malformed invitation:
    nothing sent, nothing trained). A device that refuses sends nothing more; after a floor refusal it keeps
    its error feedback as before the round, as after a refused upload: every device of the run refuses the
    same request, so its masked update is never unmasked."""
    number, base = int(info["round"]), int(info["base_version"])
    state = _fetch_base(dev, base)
    if state is None:
        return False
    if (
        dev.credentials is not None
    ):  # an enrolled device takes only authenticated rounds: a current list first
        refresh_revocations(dev)
        if not own_certificate_holds(dev):
            return False
    sa = _accept_invitation(dev, number, state)
    if sa is None:
        return False
    with _uplink_kept_unless_sent(dev) as sent:
        up = dev.step.run(dev.client, dev.net, state, number, base)
        _record_releases(dev)  # before the privatized update can leave
        if up.secure is None:
            dev.log(f"SecAgg round {number}: no update ({up.error}); sitting it out")
            return False
        try:  # the actual update, checked again (its size) and quantized: stochastic rounding from the OS
            sa.set_update(up.secure, dev.client.num_samples)
        except SecAggError as exc:
            dev.log(f"SecAgg round {number}: this device refused the invitation ({exc}); sitting it out")
            return False
        broke: httpx.TransportError | None = None
        try:
            spoke = _secagg_stages(dev, sa, number, sent, wait=wait, poll=poll)
        except httpx.TransportError as exc:  # the connection broke mid-round: a restart, or an outage
            spoke, broke = False, exc
        ended = (
            _round_unpublished(dev, number, deadline=time.monotonic() + wait)
            if not spoke and sent[0]
            else None
        )
        if ended is not None:
            sent[0] = False  # a lost or aborted round never publishes: the masked update reached no model
            dev.pending = None  # nor a version to adapt to
            dev.log(f"SecAgg round {number}: {ended}; sitting it out")
            return False
        if broke is not None:
            raise broke  # run_device waits for the service (its patience)
        if not spoke:
            return False
    dev.pending = (number, base)
    dev.joined.add(number)
    return True


def refresh_revocations(dev: Device) -> bool:
    """Take the service's revocation list (``GET /v1/secagg/revocations``) if it is newer than the device's own;
    True if it took one. The device trusts nothing about it but the signature: it verifies the list under its own
    enrollment authority key and never takes a lower sequence than it holds
    (:func:`~deltaplane.aggregation.secagg.revocation.take_revocations`), keeping a newer one in
    :attr:`Device.revocations_file` before using it. A list it refuses (forged, a rollback), no list (404) or a
    service error is logged and the held list stays; whether that list is still current is checked when the
    device reads the invitation (:class:`~deltaplane.aggregation.secagg.errors.RevocationsStale`). A broken
    connection raises, as any request of the round does (:func:`run_device` waits for the service)."""
    assert dev.credentials is not None
    try:
        data = dev.conn.request("GET", REVOCATIONS_DEVICE_PATH).content
    except ServiceError as exc:
        if exc.status == 401:  # the device's token, not the list: no round can go on (run_device stops)
            raise
        if exc.status != 404:
            dev.log(f"the service's revocation list could not be fetched ({exc}); keeping this device's")
        return False
    try:
        taken = take_revocations(dev.credentials, data, keep=dev.revocations_file)
    except SecAggAuthError as exc:
        dev.log(f"refused the service's revocation list ({exc}); keeping this device's")
        return False
    except OSError as exc:  # not kept: not taken either, so memory and file never disagree
        dev.log(
            f"the service's newer revocation list could not be kept in {dev.revocations_file} ({exc}); "
            "keeping this device's"
        )
        return False
    if taken is dev.credentials:
        return False
    dev.credentials = taken
    rl = taken.revocations
    assert rl is not None
    dev.log(
        f"took revocation list number {rl.sequence} ({len(rl.revoked)} revoked, current until {rl.next_update})"
    )
    return True


def own_certificate_holds(dev: Device) -> bool:
    """Whether the device's own certificate passes what every neighbour checks it by
    (:meth:`~deltaplane.aggregation.secagg.DeviceCredentials.check_own`: its authority, its expiry, the list it
    holds now). If not (it expired while the device ran, or a list just taken from the service revokes it), the
    device logs why and sits the round out rather than advertise: each neighbour would refuse a roster seating
    it, and the round would fail for all of them."""
    assert dev.credentials is not None
    try:
        dev.credentials.check_own()
    except SecAggAuthError as exc:
        dev.log(
            f"sits this round out: its own certificate would be refused ({exc}); enrol a replacement "
            "(`deltaplane fleet enroll` or `keys certify`), under a new device id if it was revoked"
        )
        return False
    return True


def _accept_invitation(dev: Device, number: int, state: dict[str, torch.Tensor]) -> SecAggDevice | None:
    """Fetch SecAgg round ``number``'s invitation and check it *before* the device trains: a graph and threshold
    that keep it safe, a ring range and weighting its own distributed DP allows, and a vector the size of what
    it masks (its model on the round's base ``state``, less the layers it keeps home) with a weighted ring
    that can carry its example count. None, logged, for an invitation the device refuses: it sits the round
    out without spending a training pass, and nothing was sent."""
    try:
        # secret keys from the OS, never the seed; the unmasking floor and least range from its own config
        sa = SecAggDevice(
            dev.conn,
            dev.model,
            number,
            wait=2.0,
            min_inputs=dev.config.unmask_floor(),
            min_range=dev.config.min_secagg_range(),
            credentials=dev.credentials,
        )
        sa.check_update(masked_zeros(state, dev.step.left_out(dev.net)), dev.client.num_samples)
    except (SecAggError, DecodeError) as exc:
        dev.log(f"SecAgg round {number}: this device refused the invitation ({exc}); sitting it out")
        return None
    return sa


def _secagg_stages(
    dev: Device, sa: SecAggDevice, number: int, sent: list[bool], *, wait: float, poll: float
) -> bool:
    """Speak in each SecAgg stage as it opens; False once the device is out of the round (a stage closed before
    it spoke, or the service refused it). ``sent[0]`` is set once the masked update may be in the sum."""
    for stage, method in SECAGG_STEPS:
        if stage == Stage.CONSISTENCY and not sa.authenticated:
            continue  # a round without identities has no consistency check
        out = wait_for_stage(dev, number, stage, deadline=time.monotonic() + wait, poll=poll)
        if out is not None:
            dev.log(f"SecAgg round {number}: {out}; dropped out")
            return False
        sent[0] = sent[0] or stage == Stage.MASKED  # the masked update may be in the sum from here
        try:
            getattr(sa, method)()
        except ServiceError as exc:
            if stage == Stage.MASKED:
                sent[0] = False  # the service refused the masked update: it is not in the sum
            if exc.status not in _OUT_OF_ROUND:
                raise
            dev.log(f"SecAgg round {number}: refused at '{stage}' ({exc.detail}); dropped out")
            return False
        except SecAggError as exc:  # this device refuses the server's message: it sits the round out
            if stage == Stage.MASKED or isinstance(exc, SecAggFloorError):
                sent[0] = False  # not sent, or never unmasked (every device of the run refuses it)
            dev.log(f"SecAgg round {number}: this device refused '{stage}' ({exc}); sitting it out")
            return False
    return True


def _round_unpublished(dev: Device, number: int, *, deadline: float) -> str | None:
    """How SecAgg round ``number`` ended if it can never publish: lost (the service restarted while it was
    open) or aborted (the operator gave it up: too few devices left to unmask it); None for a round still open
    or published, or a service still away at ``deadline`` (monotonic): not known unpublished. Asks the
    service for the invitation, stating the service binding as the round's own requests do (without it an
    open authenticated round answers 409, an error the service logs for a round that is fine), waiting out a
    broken connection."""
    delay = 0.1
    while True:
        try:
            dev.conn.request("GET", f"/v1/models/{dev.model}/secagg/{number}", headers=BINDING)
            return None
        except ServiceError as exc:
            if exc.status == 401:  # the device's token was refused: waiting on would never see the round end
                raise
            if exc.error == RoundLost.__name__:
                return "lost (the service restarted while it was open)"
            return "aborted (it will never publish)" if exc.error == RoundAborted.__name__ else None
        except httpx.TransportError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def counted_rounds(dev: Device, seen: set[tuple[str, int]]) -> int:
    """How many of the rounds the device saw open count towards its ``--rounds``: all but the SecAgg rounds no
    coordinator ran (aborted as abandoned, :class:`~deltaplane.errors.RoundAbandoned`: a coordinator that was
    stopped or killed left it open, and the next one aborted it), which are none of a coordinator's
    ``--rounds``. A round a coordinator gave up (too few devices) counts, as it does for that coordinator. Asks
    the service about each SecAgg round seen that the device's update did not go into and whose end it does
    not know yet (a round still open counts, until it is known abandoned)."""
    for kind, number in seen:
        if kind != "secagg" or number in dev.joined or number in dev.settled:
            continue
        try:
            dev.conn.request("GET", f"/v1/models/{dev.model}/secagg/{number}", headers=BINDING)
        except ServiceError as exc:
            if exc.status == 401:  # the device's token: run_device stops, saying what to do
                raise
            dev.settled.add(number)  # over (409), or not this device's (403, 404): counted unless abandoned
            if exc.error == RoundAbandoned.__name__:
                dev.abandoned.add(number)
                dev.log(
                    f"SecAgg round {number} was abandoned by its coordinator; not counted towards --rounds"
                )
    return len(seen) - len(dev.abandoned)


def report_pending(dev: Device) -> bool:
    """Once the round the device took part in (or, with a personalizer, saw open) has published, report on the
    new version: held-out accuracy and the drift summary (histograms and class counts only), and with a
    personalizer, its personal model's accuracy beside the global one's (:func:`_personalize`). True if it
    reported.

    The held-out accuracy and the drift summary are the *version's* model's, never the personal one's: the
    predicted-class row compares them with that version's predictions on the reference data (black-box shift
    detection needs one model on both sides), which the coordinator computes and no personal model has; a
    personal model's predictions differ from the global one's by design (its label mix), and would read as
    drift."""
    _send_catch_up_reports(dev)
    if dev.pending is None:
        return False
    number, base = dev.pending
    version, state = dev.conn.fetch(dev.model, channel="training")
    if version == base:
        return False  # not published yet
    personal = _personalize(dev, state, number, version) if dev.step.personalizer.name != "none" else {}
    metrics = _version_metrics(dev, state, personal)
    dev.conn.report(
        dev.model,
        version=version,
        metrics=metrics,
        summary=holdout_summary(dev.spec, dev.net, dev.client).to_dict(),
        round_id=number,
    )
    dev.rounds.append({"round": number, "version": version, "took_part": number in dev.joined, **metrics})
    dev.log(f"round {number}: version {version} published; {_reported_line(dev, metrics)}")
    dev.pending = None
    return True


def _version_metrics(
    dev: Device, state: dict[str, torch.Tensor], personal: dict[str, float]
) -> dict[str, float]:
    """What a device reports on a version (``state``): its model's held-out accuracy and the held-out size, the
    personal figures (``personal``, scored before) and, under local DP, the device's own ε so far. Leaves the
    version's model loaded in ``dev.net`` (its drift summary is that model's)."""
    dev.net.load_state_dict(state)  # after the personal scoring, which leaves a personal model loaded
    score = float(evaluate_clients(dev.net, [dev.client])[0])
    # the held-out split is holdout_fraction of this device's partition, often a few samples on a small fleet:
    # its size says how far one sample moves the figure (5 samples: 0.2), here and on the Fleet page
    metrics = {"holdout_accuracy": score, "holdout_samples": float(len(dev.client.holdout)), **personal}
    epsilon = round_epsilon(dev.config, dev.step, {})  # local DP: this device's own ε so far (else None)
    if epsilon is not None:
        metrics["epsilon"] = epsilon
    return metrics


def _reported_line(dev: Device, metrics: dict[str, float]) -> str:
    """The device's words for a report it sent: held-out accuracy and size, personal figures, local ε."""
    held = int(metrics["holdout_samples"])
    epsilon = metrics.get("epsilon")
    eps = f", local ε {epsilon:.3f} ({dp_adjacency(dev.config)})" if epsilon is not None else ""
    vs = f" vs global {metrics['global_accuracy']:.3f}" if "global_accuracy" in metrics else ""
    mine = (
        f"; personal {metrics['personal_accuracy']:.3f}{vs} on its label mix"
        + (f" (α {metrics['alpha']:g})" if "alpha" in metrics else "")
        if "personal_accuracy" in metrics
        else ""
    )
    return (
        f"held-out accuracy {metrics['holdout_accuracy']:.3f} on {held} "
        f"sample{'s' if held != 1 else ''}{mine}{eps} reported"
    )


def _send_catch_up_reports(dev: Device) -> None:
    """Send the catch-up reports :func:`_catch_up` scored (:attr:`Device.unsent`), in order: each version's
    metrics as the device would have reported them had it seen its round open, marked ``catch_up: 1``, with
    no drift summary (a drift window keeps one summary per device: its current one). One the service refuses
    for good (:data:`_CATCH_UP_DROPPED`: e.g. 451, the version holds a cohort that withdrew consent) is said
    and dropped; any other refusal raises with the rest kept: a 429 (the device's rate limit) or a 503 with
    ``Retry-After`` makes :func:`run_device` back off, and they are sent, before anything else, next time."""
    while dev.unsent:
        r = dev.unsent[0]
        try:
            dev.conn.report(dev.model, version=r["version"], metrics=r["metrics"], round_id=r["round"])
        except ServiceError as exc:
            if exc.status not in _CATCH_UP_DROPPED:
                raise
            dev.log(
                f"round {r['round']}: the service refused this device's catch-up report on version "
                f"{r['version']} ({exc.detail}); not sent"
            )
        else:
            dev.rounds.append(
                {"round": r["round"], "version": r["version"], "took_part": False, **r["metrics"]}
            )
            dev.log(
                f"round {r['round']}: caught up on version {r['version']}; {_reported_line(dev, r['metrics'])}"
            )
        dev.unsent.pop(0)


def _personalize(dev: Device, state: dict[str, torch.Tensor], number: int, version: int) -> dict[str, float]:
    """Adapt the device's personal state to ``version`` once, as the engine's
    :meth:`~deltaplane.engine.ClientStep.after_round` does for every device after each round (its stream
    ``(seed, PERSONALIZATION, round, device)``, the round the service signs as the version's maker; ``number``,
    the round the device saw open, with a service that does not say), after catching up on any earlier version
    it missed (:func:`_catch_up`), and score it: the simulator's per-device row
    (:func:`~deltaplane.engine.scoring.personal_row`: the global and the personal model's accuracy on the task's
    test set weighted by this device's training label mix, and α-mix's α). Not on the held-out split: α is
    chosen there, so its figure would flatter the personal model."""
    if dev.adapted != version:
        if dev.conn.made_by_known:
            _catch_up(dev, version)
            number = (
                dev.conn.made_by or number
            )  # the current version may be a later round's than the one seen
        elif not dev.said_no_rounds:
            dev.said_no_rounds = True
            dev.log(
                "the service does not say which round made a version (it predates X-Deltaplane-Round): this "
                "device adapts to the versions of the rounds it sees open only, and cannot catch up on others"
            )
        dev.step.after_round([dev.client], dev.net, state, number)
        dev.adapted = version
    return _personal_figures(dev, state)


def _personal_figures(dev: Device, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The simulator's per-device row for the device's personal state adapted to ``state``
    (:func:`~deltaplane.engine.scoring.personal_row`), as reported: FedPer and FedBN have no global figure,
    α-mix adds its α. Leaves a personal model loaded in ``dev.net``."""
    row = personal_row(dev.step, dev.net, state, dev.test, dev.client, dev.num_classes)
    out = {"personal_accuracy": float(row["personal_accuracy"])}
    if row["global_accuracy"] is not None:  # FedPer and FedBN have none (has_global_model)
        out["global_accuracy"] = float(row["global_accuracy"])
    if dev.step.personalizer.name == "alpha_mix":
        out["alpha"] = float(row["alpha"])
    return out


def _catch_up(dev: Device, version: int) -> None:
    """Adapt to every version a round made before ``version`` that the device has not adapted to yet, in order,
    each with its round's stream, as the simulator's device did after each of those rounds: the device joined
    late, was offline while they were open, or polled past them. Each is fetched by number
    (:meth:`~deltaplane.serve.client.DeviceClient.fetch_published`, the round that made it signed); versions off
    the lineage the device is served, and those no round made, are passed over. After adapting to each, the
    device scores it as it would have had it seen the round open (held-out accuracy, personal figures) and
    reports that, marked as a catch-up (:func:`_send_catch_up_reports`), so each missed round's row on the
    Fleet page counts this device too."""
    first = 1 if dev.adapted is None else dev.adapted + 1
    caught: list[int] = []
    for v in range(first, version):
        try:
            state, rnd = dev.conn.fetch_published(dev.model, v, channel="training")
        except NotFound:
            continue  # another tag's version, or one a rollback left behind
        if rnd is not None:
            dev.step.after_round([dev.client], dev.net, state, rnd)
            caught.append(rnd)
            # scored now: the personal state moves on with the next version
            metrics = _version_metrics(dev, state, _personal_figures(dev, state))
            dev.unsent.append({"round": rnd, "version": v, "metrics": {**metrics, CATCH_UP_METRIC: 1.0}})
        dev.adapted = v
    if caught:
        dev.log(
            f"adapted to the versions of {count(len(caught), 'round')} it missed: {', '.join(map(str, caught))}"
        )
    _send_catch_up_reports(dev)


def _watch(dev: Device, number: int, base: int) -> None:
    """A personalized device adapts to the version of every round it sees open, taking part or not (the
    simulator's devices all adapt after each round): it reports what an earlier round published first, then
    waits for this one. A device without personalization reports on the rounds it took part in only."""
    if dev.step.personalizer.name == "none":
        return
    report_pending(dev)
    dev.pending = (number, base)


def _next_round(dev: Device, seen: set[tuple[str, int]]) -> dict[str, Any] | None:
    """The newest open round this device has not looked at yet. A SecAgg round past its first stage is seen
    and skipped (the device was not in its key advertisement), and so is a SecAgg round older than another
    open one: rounds are numbered as they open, the coordinator runs one at a time, and a device waiting on a
    round left open by hand would miss the coordinator's, whose stages go on without it."""
    fresh = [r for r in dev.conn.open_rounds(dev.model) if (r["kind"], int(r["round"])) not in seen]
    newest_secagg = max((int(r["round"]) for r in fresh if r["kind"] == "secagg"), default=None)
    for r in fresh:  # all of them now: later polls must not fall back to an older round
        if r["kind"] == "secagg" and int(r["round"]) != newest_secagg:
            seen.add(("secagg", int(r["round"])))
            dev.log(f"SecAgg round {r['round']} is older than round {newest_secagg}, also open; skipping it")
    for r in sorted(fresh, key=lambda r: -int(r["round"])):
        if (r["kind"], int(r["round"])) in seen:
            continue
        seen.add((r["kind"], int(r["round"])))
        if r["kind"] == "secagg" and r["stage"] != Stage.ADVERTISE:
            dev.log(f"SecAgg round {r['round']} is past key advertisement; waiting for the next round")
            _watch(
                dev, int(r["round"]), int(r["base_version"])
            )  # its version is still this device's to adapt to
            continue
        return r
    return None


def take_part(dev: Device, info: dict[str, Any], *, stage_wait: float) -> bool:
    """Take part in one open round (plain or SecAgg); True if the device's update went in.

    A round that ends or refuses the device while it trains or speaks (the coordinator's deadline passed, the
    round was aborted, the device is not a survivor) leaves the device out of that round only: it waits for the
    next one instead of stopping. A personalized device adapts to the round's version whether its update went
    in or not (:func:`_watch`). An upload dropped for arriving too slowly (408, ``--min-body-rate``) leaves it
    out of that round too, said in the log."""
    _watch(dev, int(info["round"]), int(info["base_version"]))
    try:
        if info["kind"] == "plain":
            return plain_round(dev, info)
        return secagg_round(dev, info, wait=stage_wait)
    except ServiceError as exc:
        if exc.status == 408 and exc.retry_after is not None:
            # its body arrived slower than the service's minimum rate and was dropped unhandled (the client sent
            # it again if the penalty was short): the link, not the round, failed; said, and the next round tried
            dev.log(
                f"round {info['round']}: the service dropped this device's upload as too slow ({exc.detail}); "
                f"it takes no other body from it for {exc.retry_after:g} s; sitting this round out"
            )
            return False
        if exc.status not in _OUT_OF_ROUND:
            raise
        dev.log(f"round {info['round']}: refused ({exc.detail}); sitting it out")
        return False


def run_device(
    dev: Device,
    *,
    rounds: int | None = None,
    stop: threading.Event | None = None,
    poll: float = 0.2,
    max_poll: float = 2.0,
    stage_wait: float = 300.0,
    patience: float = 60.0,
) -> list[dict[str, Any]]:
    """Take part in the model's rounds until ``rounds`` rounds have opened (whether this device made it into
    each or not; a SecAgg round no coordinator ran is not counted: :func:`counted_rounds`) and the last one it
    took part in (with a personalizer: saw open) is reported, or until ``stop`` is set; returns one row per
    reported round (``took_part``: whether its update went into that round; ``catch_up`` 1.0 on the rows of the
    versions it caught up on, :func:`_catch_up`).

    Polls with exponential backoff (``poll`` up to ``max_poll`` seconds); waits up to ``stage_wait`` seconds
    for each SecAgg stage and for the last round to publish; gives up (:class:`ServiceUnreachable`) after
    ``patience`` seconds without a connection, and at once when the service fails TLS verification. A device
    whose token the service refuses (401: revoked, expired) stops at once with
    :class:`~deltaplane.serve.client.TokenRefused`, saying what to do: no retry could pass."""
    stop = stop or threading.Event()
    torch.set_num_threads(dev.config.threads)
    seen: set[tuple[str, int]] = set()
    delay, lost_since, finished_at = poll, None, None
    while not stop.is_set():
        try:
            # asks the service only once the rounds seen reach --rounds (counted_rounds)
            if (
                rounds is not None
                and len(seen) - len(dev.abandoned) >= rounds
                and counted_rounds(dev, seen) >= rounds
            ):
                report_pending(dev)
                _say_if_back(dev, lost_since)
                lost_since = None
                finished_at = finished_at or time.monotonic()
                if dev.pending is None or time.monotonic() - finished_at > stage_wait:
                    break
            else:
                todo = _next_round(dev, seen)
                _say_if_back(dev, lost_since)
                lost_since = None
                if todo is not None:
                    take_part(dev, todo, stage_wait=stage_wait)
                    delay = poll
                    continue
                report_pending(dev)
        except httpx.TransportError as exc:
            err = unreachable(exc, dev.conn.base_url)
            if err.final:
                raise err from None  # never retried, never downgraded to plain HTTP
            if lost_since is None:  # said once per outage, as the coordinator does: not 5 silent minutes
                lost_since = time.monotonic()
                dev.log(
                    f"the service is not answering ({type(exc).__name__}); waiting up to {patience:g} s for it "
                    "to come back"
                )
            if time.monotonic() - lost_since > patience:
                raise err from None
        except ServiceError as exc:
            if exc.status == 401 and not isinstance(exc, TokenRefused):
                raise TokenRefused.of(exc) from None
            # rate-limited, or refused before handling with a Retry-After (the service's body budget, 503):
            # back off; anything else is the operator's to see
            if exc.status != 429 and exc.retry_after is None:
                raise
        stop.wait(delay)
        delay = min(2 * delay, max_poll)
    return dev.rounds


def _say_if_back(dev: Device, lost_since: float | None) -> None:
    """After a request that went through: if the service had stopped answering (at ``lost_since``; ``None``: it
    had not), say how long it was away."""
    if lost_since is not None:
        dev.log(f"the service answers again after {time.monotonic() - lost_since:.1f} s")


# -- the coordinator's task side (only where it needs the task: deltaplane.serve.coordinator says when) --
def weight_scale_of(config: RunConfig, clients: list[Any] | None = None) -> float:
    """The public weight scale of SecAgg rounds: the devices' mean example count (as every driver uses), from
    the same partition of the task the devices compute (``clients``, built from ``config`` if not given); 0 (an
    unweighted mean) under distributed DP."""
    from deltaplane.engine.secure import secure_weight_scale

    if clients is None:
        clients = build_clients(config, make_task(config))
    return secure_weight_scale(config, [c.num_samples for c in clients])


def register_predictions(
    p: Patient,
    models: DeviceClient,
    model: str,
    version: int | None,
    net: torch.nn.Module,
    reference: Callable[[torch.nn.Module], list[int]],
    watch: DivergenceWatch | None = None,
    test: Dataset | None = None,
) -> tuple[int, float | None, bool] | None:
    """Register the prediction reference of the version the training tag serves (expected: ``version``; None:
    whichever it is, as at the coordinator's start): its predicted-class counts on the drift reference's data
    (``reference``, the HTTP simulation's :func:`~deltaplane.serve.federation.prediction_reference`), computed
    on the weights ``models`` fetched and verified as a device does (the registry's signature, the service's
    signed answer). The version registered, or None: a version that cannot be fetched and verified, or that the
    tag no longer serves, is said (``p.say``) and left unregistered, so its predicted-class row stays untested
    ("no prediction reference") and the rounds go on; never counts of unverified weights. With ``watch``
    the fetched weights are also checked for divergence (:class:`~deltaplane.engine.divergence.DivergenceWatch`:
    the version served at start is its initial model). With ``test`` (the task's test set) the version's
    accuracy on it comes back beside the version: the devices' held-out figures are a few samples each on a
    small fleet, this one the figure ``deltaplane run`` prints for the same task. The third value says whether
    this version diverged (:meth:`~deltaplane.engine.divergence.DivergenceWatch.diverged`: every diverging
    version, though the warning is said once a run; the coordinator stores all three on the service for the
    Fleet page)."""
    doing = "fetch the published version" if version is None else f"fetch version {version}"
    try:
        got, state = p.call(lambda: models.fetch(model, channel="training"), doing)
        if version is not None and got != version:
            raise ConfigError(f"the training tag serves version {got}, not {version} (moved meanwhile?)")
        diverged = watch is not None and watch.diverged(got, state, where=f"version {got}")
        net.load_state_dict(state)
        scored = accuracy(net, test) if test is not None else None
        counts = reference(net)
        p.call(
            lambda: p.admin.set_prediction_reference(model, got, counts),
            f"register version {got}'s prediction reference",
        )
    except ServiceUnreachable:
        raise
    except DeltaplaneError as exc:
        p.say(
            f"could not {doing} to register its prediction reference ({type(exc).__name__}: {exc}); its "
            "predicted-class drift row stays untested (no prediction reference)"
        )
        return None
    return got, scored, diverged


@dataclass
class LocalTask:
    """The coordinator's own build of the task (torch and the task's data), for what needs it there: each
    published version's predictions on the reference data (``coordinate --trusted``), or the drift reference
    and SecAgg's weight scale when the registry holds none for the federation's data
    (:mod:`~deltaplane.serve.fleet_reference`). Built once: both read the same devices."""

    config: RunConfig
    task: Any
    clients: list[Any]
    #: the drift reference's spec, as the devices bin on it (:func:`drift_reference`)
    spec: DriftSpec
    #: what :mod:`~deltaplane.serve.fleet_reference` would hold for this task: the same values
    reference: FleetReference

    @classmethod
    def build(cls, config: RunConfig, needs: str) -> LocalTask:
        """The task of ``config``, partitioned as the devices partition it.

        Raises:
            TaskError, ConfigError: the task cannot be built on this machine (its module does not import here,
                its data cannot be partitioned so...): the same error, its message saying first that the
                coordinator needs the task for ``needs``, then the task's own words.
        """
        try:
            task = make_task(config)
            clients = build_clients(config, task)
        except (TaskError, ConfigError) as exc:
            raise type(exc)(
                f"fleet coordinate needs the task on this machine ({needs}) and cannot build it: {exc}"
            ) from None
        spec, summary = drift_reference(task, clients)
        counts = tuple(int(c.num_samples) for c in clients)
        return cls(config, task, clients, spec, FleetReference(spec.to_dict(), summary.to_dict(), counts))

    def predictions(
        self, p: Patient, models: DeviceClient, model: str
    ) -> Callable[[int | None], tuple[int, float | None, bool] | None]:
        """:func:`register_predictions` for ``model`` on this task's reference data, with the divergence watch
        (its initial model: the version served when first called) and each version's accuracy on the task's
        test set."""
        net = self.task.build_model(derive_seed(self.config.seed, Stream.MODEL_INIT))
        return functools.partial(
            register_predictions, p, models, model, net=net,
            reference=lambda m: prediction_reference(self.spec, m, self.task, self.clients),
            watch=DivergenceWatch(self.task, None, config=self.config), test=self.task.test,
        )  # fmt: skip
