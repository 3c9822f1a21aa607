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
  catches up, in order, on the versions it missed: :func:`_catch_up`), as every device of the simulator does
  after each round's downlink, and reports its personal model's accuracy beside the global one's
  (:func:`report_pending`). It stops after ``rounds`` rounds, or when ``stop`` is set.
* :func:`coordinate` is the operator: per round it opens a plain or SecAgg round for the enrolled devices,
  waits until every invited device has uploaded (or posted the stage) or a deadline passes, advances SecAgg
  stages, and closes; devices that missed a deadline are dropouts.

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
from deltaplane.engine.secure import check_float_uploads, masked_zeros, secure_neighbours
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.errors import (
    ConfigError,
    DecodeError,
    DeltaplaneError,
    NotFound,
    PrivacyBudgetExceeded,
    RoundAborted,
    RoundLost,
    ServiceUnreachable,
)
from deltaplane.monitor import DriftSpec
from deltaplane.serve.client import (
    REVOCATIONS_DEVICE_PATH,
    AdminClient,
    DeviceClient,
    ServiceError,
    TokenRefused,
)
from deltaplane.serve.device_releases import read_releases, write_releases
from deltaplane.serve.federation import drift_reference, holdout_summary, prediction_reference
from deltaplane.serve.reach import unreachable
from deltaplane.serve.secagg_client import BINDING, SecAggDevice
from deltaplane.wording import count

__all__ = [
    "Device",
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
    #: the rounds this device's update went into (a personalized device also reports on rounds it sat out)
    joined: set[int] = field(default_factory=set)


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
    if dev.pending is None:
        return False
    number, base = dev.pending
    version, state = dev.conn.fetch(dev.model, channel="training")
    if version == base:
        return False  # not published yet
    personal = _personalize(dev, state, number, version) if dev.step.personalizer.name != "none" else {}
    dev.net.load_state_dict(state)  # after the personal scoring, which leaves a personal model loaded
    score = float(evaluate_clients(dev.net, [dev.client])[0])
    # the held-out split is holdout_fraction of this device's partition, often a few samples on a small fleet:
    # its size says how far one sample moves the figure (5 samples: 0.2), here and on the Fleet page
    held = len(dev.client.holdout)
    metrics = {"holdout_accuracy": score, "holdout_samples": float(held), **personal}
    epsilon = round_epsilon(dev.config, dev.step, {})  # local DP: this device's own ε so far (else None)
    if epsilon is not None:
        metrics["epsilon"] = epsilon
    dev.conn.report(
        dev.model,
        version=version,
        metrics=metrics,
        summary=holdout_summary(dev.spec, dev.net, dev.client).to_dict(),
        round_id=number,
    )
    dev.rounds.append({"round": number, "version": version, "took_part": number in dev.joined, **metrics})
    eps = f", local ε {epsilon:.3f} ({dp_adjacency(dev.config)})" if epsilon is not None else ""
    vs = f" vs global {personal['global_accuracy']:.3f}" if "global_accuracy" in personal else ""
    mine = (
        f"; personal {personal['personal_accuracy']:.3f}{vs} on its label mix"
        + (f" (α {personal['alpha']:g})" if "alpha" in personal else "")
        if personal
        else ""
    )
    dev.log(
        f"round {number}: version {version} published; held-out accuracy {score:.3f} on {held} "
        f"sample{'s' if held != 1 else ''}{mine}{eps} reported"
    )
    dev.pending = None
    return True


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
    the lineage the device is served, and those no round made, are passed over."""
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
        dev.adapted = v
    if caught:
        dev.log(
            f"adapted to the versions of {count(len(caught), 'round')} it missed: {', '.join(map(str, caught))}"
        )


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
    in or not (:func:`_watch`)."""
    _watch(dev, int(info["round"]), int(info["base_version"]))
    try:
        if info["kind"] == "plain":
            return plain_round(dev, info)
        return secagg_round(dev, info, wait=stage_wait)
    except ServiceError as exc:
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
    each or not) and the last one it took part in (with a personalizer: saw open) is reported, or until ``stop``
    is set; returns one row per reported round (``took_part``: whether its update went into that round).

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
            if rounds is not None and len(seen) >= rounds:
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


def _given_up(p: Patient, abort: Callable[[str], Any], number: int, error: ServiceError) -> _RoundFailed:
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
    abort: Callable[[str], Any],
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


def _abort_when_stopped(p: Patient, abort: Callable[[str], Any], number: int) -> None:
    """One try at aborting SecAgg round ``number`` as the coordinator stops: left open, the round kept the
    devices waiting in it, and each counted it towards its ``--rounds``, so the next coordinator's last round
    found them gone (walking docs/fleet.md: *only 0 clients advertised keys*)."""
    try:
        abort(_STOPPED)
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
        lambda why: p.admin.abort_round(model, number, reason=why),
        f"Plain round {number} of {model!r} stays open on the service (rounds are durable): close or abort "
        f"it when the service is back (POST /admin/models/{model}/rounds/{number}/abort)",
    )


def _open_plain(p: Patient, model: str) -> int:
    """Open the model's plain round; after a lost answer, adopt the round the service opened (it is durable,
    so it is open after a restart too) rather than open another."""
    while True:
        opened = p.once(lambda: p.admin.open_round(model), "open a plain round")
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
        lambda why: p.admin.abort_secagg(model, number, reason=why),
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
                model, names, weight_scale=weight_scale, neighbours=neighbours, **signed
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
                    functools.partial(p.admin.abort_secagg, model, stray, reason=_STRAY),
                    f"abort SecAgg round {stray}",
                )
    return number, list(opened.get("revoked", []))


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
) -> tuple[int, float | None] | None:
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
    small fleet, this one the figure ``deltaplane run`` prints for the same task."""
    doing = "fetch the published version" if version is None else f"fetch version {version}"
    try:
        got, state = p.call(lambda: models.fetch(model, channel="training"), doing)
        if version is not None and got != version:
            raise ConfigError(f"the training tag serves version {got}, not {version} (moved meanwhile?)")
        if watch is not None:
            watch.check(got, state, where=f"version {got}")
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
    return got, scored


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
    version's predictions on the reference data (:func:`register_predictions`) before its next request, so the
    devices' predicted-class reports on it are tested as in ``deltaplane run --transport http``; and at start the
    version the training tag serves (the drift reference's PUT drops the references held). Without ``models``
    the predicted-class row stays untested ("no prediction reference"), said once.

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

    @functools.cache
    def task_and_clients() -> tuple[Any, list[Any]]:
        # built once: the weight scale and the drift reference read the same devices (the task's data loaded
        # twice cost a SecAgg coordinator a second data load and partition before its first request)
        task = make_task(config)
        return task, build_clients(config, task)

    if config.secagg and weight_scale is None:
        weight_scale = weight_scale_of(config, task_and_clients()[1])
    # SecAgg+: the config's degree for a round of every invited device, as `deltaplane run` opens it
    neighbours = secure_neighbours(config, len(names))
    p = Patient(admin, patience=patience, say=say or log.warning, poll=poll)
    if drift:
        spec, reference = drift_reference(*task_and_clients())
        p.call(
            lambda: admin.set_drift_reference(
                model, spec.to_dict(), reference.to_dict(), window=len(names), min_samples=drift_min_samples
            ),
            "set the drift reference",
        )
    predictions: Callable[[int | None], tuple[int, float | None] | None] = lambda version: None  # noqa: E731
    if drift and models is not None:
        task, clients = task_and_clients()
        net = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
        predictions = functools.partial(
            register_predictions, p, models, model, net=net,
            reference=lambda m: prediction_reference(spec, m, task, clients),
            watch=DivergenceWatch(task, None, config=config), test=task.test,
        )  # fmt: skip
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
                summary.test_accuracy, summary.test_samples = fetched[1], len(task_and_clients()[0].test)
        done.append(summary)
        if progress is not None:
            progress(summary)
    return done
