"""``deltaplane run --transport http``: the engine's federation, over a real service on loopback.

A thin driver over the engine's two steps: each simulated device runs the client step
(:class:`~deltaplane.engine.ClientStep`: train, personalize, [attack], clip / local DP, compress) on the model
it fetched, and the service runs the server step (:class:`~deltaplane.engine.ServerStep`, configured from the
same :class:`~deltaplane.engine.RunConfig`: aggregator chain, DP and its accountant, FLTrust's root data,
downlink codec). Same task, clients, data, codecs and seeds as the in-process drivers, but every byte travels
through HTTP: a registry in a scratch folder holds the signed versions, a uvicorn server on
``127.0.0.1`` (random port) runs the rounds, and each simulated device is a :class:`DeviceClient` with its own
token that fetches the training version (a signed delta it verifies and applies), uploads its compressed
update (validated by the server against the base version) and reports a drift summary of its held-out data
and predictions. Uploads are sent one device at a time in client order, so FedAvg sums in the same order as
in process and the two transports produce the same weights — which the tests check.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import torch

from deltaplane.delta import Delta
from deltaplane.engine import (
    ClientStep,
    RoundMetrics,
    RunConfig,
    RunResult,
    build_clients,
    evaluate_clients,
    make_task,
    round_scores,
    sample_clients,
)
from deltaplane.engine.admission import examples_bound
from deltaplane.engine.divergence import DivergenceWatch
from deltaplane.engine.results import budget_stop, raw_upload_bytes
from deltaplane.engine.scoring import backdoor_success, dp_adjacency, personal_metrics, round_epsilon
from deltaplane.engine.secure import run_enrollment
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng
from deltaplane.errors import (
    ConfigError,
    InvalidUpdate,
    PrivacyBudgetExceeded,
    ServiceUnreachable,
    UnsupportedOption,
)
from deltaplane.monitor import DriftSpec, summarize
from deltaplane.registry import Registry
from deltaplane.serve.client import AdminClient, DeviceClient, ServiceError, _http_client
from deltaplane.threads import torch_threads

if TYPE_CHECKING:
    from deltaplane.aggregation.secagg.enrollment import RunEnrollment

__all__ = [
    "REQUEST_TIMEOUT_S",
    "HttpRunResult",
    "drift_reference",
    "holdout_summary",
    "prediction_reference",
    "run_http_simulation",
]

MODEL = "digits-cnn"

#: seconds a simulated device or the coordinator waits for one answer of the local service (connect, read,
#: write): long enough for a SecAgg close that unmasks a large model on a loaded machine
REQUEST_TIMEOUT_S = 120.0

log = logging.getLogger(__name__)


@dataclass
class HttpRunResult(RunResult):
    """A :class:`RunResult` plus what the HTTP transport measured and the drift monitor reported per round."""

    transport: dict[str, Any] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "transport": self.transport, "drift": self.drift}


def _predictions(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def _reference_inputs(task: Any, clients: list) -> torch.Tensor:
    """The drift reference's inputs: the task's training set (its clients' training data when it has none)."""
    return task.train.x if task.train is not None else torch.cat([c.train.x for c in clients])


def drift_reference(task: Any, clients: list) -> tuple[DriftSpec, Any]:
    """The drift monitor's reference: pixel (feature) histograms of the training set. Deterministic in the task,
    so a coordinator and every device compute the same one.

    It holds no predicted classes: predictions are compared with the same model version's predictions on these
    inputs (:func:`prediction_reference`, registered per version). The label prior it held before measured how
    inaccurate the model still was, not drift: on an unshifted digits fleet every round's window alerted."""
    x = _reference_inputs(task, clients)
    flat = x.reshape(len(x), -1).numpy()
    spec = DriftSpec.fit(flat, n_classes=int(task.num_classes), n_bins=8)
    return spec, summarize(spec, flat)


def prediction_reference(spec: DriftSpec, model: torch.nn.Module, task: Any, clients: list) -> list[int]:
    """``model``'s predicted-class counts on the drift reference's inputs: the reference its version's device
    reports are compared with (black-box shift detection, Lipton et al. 2018)."""
    return summarize(
        spec, predictions=_predictions(model, _reference_inputs(task, clients))
    ).prediction_counts


def holdout_summary(spec: DriftSpec, model: torch.nn.Module, client: Any) -> Any:
    """A device's drift summary of its held-out data and the model's predictions on it (histograms only)."""
    x = client.holdout.x.reshape(len(client.holdout), -1).numpy()
    return summarize(spec, x, _predictions(model, client.holdout.x))


def run_http_simulation(
    config: RunConfig,
    *,
    progress: Callable[[RoundMetrics], None] | None = None,
    home: str | Path | None = None,
    request_timeout_s: float | None = None,
) -> HttpRunResult:
    """Run ``config`` with simulated devices talking to a real local server (see the module docstring).

    ``request_timeout_s`` bounds each request to the service (default :data:`REQUEST_TIMEOUT_S`). A request
    that fails on the wire (no answer in time, a dropped connection) raises
    :class:`~deltaplane.errors.ServiceUnreachable` naming the request and the cause, never httpx's own
    exception (which the command line would end on with no message)."""
    check_supported(config)
    timeout_s = REQUEST_TIMEOUT_S if request_timeout_s is None else request_timeout_s
    scratch = None
    if home is None:
        scratch = tempfile.TemporaryDirectory(prefix="deltaplane-http-")
        home = scratch.name
    try:
        with torch_threads(config.threads):
            return _run(config, progress, Path(home), timeout_s)
    except httpx.TransportError as exc:
        raise _transport_failure(exc, timeout_s) from exc
    finally:
        if scratch is not None:
            scratch.cleanup()


def _transport_failure(exc: httpx.TransportError, timeout_s: float) -> ServiceUnreachable:
    """One line for a request of the run that failed on the wire: which request, what happened, and for a
    timeout the limit it missed."""
    try:
        what = f"{exc.request.method} {exc.request.url.path}"
    except RuntimeError:  # httpx raised before the request was built
        what = "a request"
    if isinstance(exc, httpx.TimeoutException):
        return ServiceUnreachable(
            f"--transport http: {what} got no answer from the run's local service within {timeout_s:g} s "
            f"({type(exc).__name__}): the service is too slow for that limit on this machine (heavily loaded?); "
            "run_http_simulation's request_timeout_s sets it"
        )
    return ServiceUnreachable(
        f"--transport http: {what} to the run's local service failed ({type(exc).__name__}: {exc})"
    )


#: Options the HTTP transport refuses, with the reason (every other option runs as in process).
def _refusals(config: RunConfig) -> list[str]:
    out = []
    if config.engine != "sequential":
        out.append(
            f"engine={config.engine!r}: over HTTP every device is its own client that trains and uploads on its "
            "own; stacked training is an in-process engine"
        )
    if config.client_eval_every != 1:
        out.append(
            f"client_eval_every={config.client_eval_every}: every device reports its held-out accuracy with its "
            "drift summary to the service each round (the drift monitor's holdout_accuracy), so the devices are "
            "scored every round; leave client_eval_every at 1"
        )
    return out


def check_supported(config: RunConfig) -> None:
    """Refuse, with the reason, options the HTTP transport cannot run (never ignore them)."""
    refused = _refusals(config)
    if refused:
        raise UnsupportedOption("--transport http cannot run " + "; ".join(refused))


def _run(
    config: RunConfig, progress: Callable[[RoundMetrics], None] | None, home: Path, timeout_s: float
) -> HttpRunResult:
    # the service and its server here, not at module level: `fleet device` and `fleet coordinate` import this
    # module for the drift reference and never start a service (FastAPI, uvicorn: ~0.4 s of imports)
    from deltaplane.serve.app import ServiceConfig, create_app
    from deltaplane.serve.server import BackgroundServer

    start = time.perf_counter()
    task = make_task(config)
    clients = build_clients(config, task)
    model = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = ClientStep(config, task, base_id=MODEL)
    step.local_keys(model)
    reg = Registry.create(home)
    v0 = reg.register_model(
        MODEL,
        initial,
        lineage={"round": 0, "run_config": config.to_dict()},
        governance={"data_sources": [f"task {task.name}"], "cohorts": ["simulated"]},
    )
    reg.set_tag(MODEL, "production", v0.number, reason="initial model")
    admin_token = secrets.token_urlsafe(24)
    service = ServiceConfig(
        home=str(home),
        admin_token=admin_token,
        device_secret=secrets.token_urlsafe(32),
        rate=1e6,  # simulated devices are trusted and fast; rate limits are exercised by the load benchmark
        burst=1_000_000,
        max_upload_bytes=max(8 << 20, 4 * Delta.zeros_like(initial).nbytes),
        federation=config,  # the server step: this run's aggregator chain, privacy and downlink
        # the run's own bound on an update is its max_update_norm (the server step's chain applies it, as in
        # process); the service's sanity guard (10x the base model's norm) would refuse what the engine
        # accepts: an attacker's scaled update, every local-DP device's noise
        max_update_norm_ratio=None,
        # the devices' true sizes are known: each may claim its own, however large (as in process), within
        # what a weighted SecAgg ring carries (the service refuses to open a ring below its bound)
        max_examples=_examples_bound(config, clients),
        simulated_devices=True,  # the engine's client step runs every device-side option (attack included)
    )
    spec, reference = drift_reference(task, clients)
    # authenticated SecAgg: the run's enrollment authority certifies each device's identity (out of band, as an
    # operator's `fleet enroll --authority-key`), under the device name its token carries
    enrollment = run_enrollment(config)
    raw_bytes = raw_upload_bytes(initial, step.left_out(model))
    # the whole test set, as each round's scoring, which hands the watch its loss (round_scores, below): the
    # watch runs the initial model's forward pass, and none of its own in a round
    watch = DivergenceWatch(task, initial, config=config, samples=None)
    history: list[RoundMetrics] = []
    client_rows: list[dict[str, Any]] = []
    drift: list[dict[str, Any]] = []
    requests = 0
    stopped: str | None = None
    with (
        BackgroundServer(create_app(service)) as server,
        _http_client(server.url, timeout_s, None) as http,
    ):
        admin = AdminClient(server.url, admin_token, client=http)
        admin.set_drift_reference(MODEL, spec.to_dict(), reference.to_dict(), window=len(clients))
        devices = [
            DeviceClient(
                server.url,
                admin.issue_token(f"client-{c.cid}", "simulated"),
                verifier=reg.verifier,
                client=http,
            )
            for c in clients
        ]
        # every device starts from the initial model (not in the rounds' bytes, as in process)
        for d in devices:
            d.fetch(MODEL, channel="training")
        initial_bytes = sum(d.bytes_received for d in devices)
        requests += 2 + 2 * len(devices)
        cum_up = cum_down = 0
        for rnd in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            chosen = sample_clients(
                config.clients,
                config.sample_fraction,
                numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd),
                central_dp=config.dp_noise > 0,
            )
            try:
                if config.secagg:  # the SecAgg stages over the service's endpoints; no plaintext leaves
                    opened, closed, uplink, rejected = _secagg_round(
                        config, step, model, clients, devices, chosen, admin, rnd, enrollment
                    )
                else:
                    opened, closed, uplink, rejected = _plain_round(
                        step, model, clients, devices, chosen, admin, rnd
                    )
            except ServiceError as exc:
                if exc.error != PrivacyBudgetExceeded.__name__:
                    raise
                # the service refused to close the round (409): the rounds it published so far are the run
                stopped = budget_stop(PrivacyBudgetExceeded(exc.detail), rnd, len(history))
                break
            before = sum(d.bytes_received for d in devices)
            for d in devices:
                d.fetch(MODEL, channel="training")
            down = sum(d.bytes_received for d in devices) - before
            requests += 2 + 2 * len(chosen) + len(devices)
            cum_up += uplink
            cum_down += down
            global_state, _ = _held(devices[0])
            personal: dict[str, Any] = {}
            if step.personalizer.name != "none":
                step.after_round(clients, model, global_state, rnd)
                personal, rows = personal_metrics(
                    step, model, global_state, task.test, clients, int(task.num_classes)
                )
                if rnd == config.rounds:
                    client_rows = rows
            model.load_state_dict(global_state)
            client_acc = evaluate_clients(model, clients)
            # the operator holds the reference data: it registers the new version's predictions on it, which
            # the devices' predictions with that version are compared with
            admin.set_prediction_reference(
                MODEL, closed["version"], prediction_reference(spec, model, task, clients)
            )
            alerts: list[str] = []
            for c, d in zip(clients, devices, strict=True):  # summaries only: histograms and class counts
                s = holdout_summary(spec, model, c)
                alerts += d.report(
                    MODEL,
                    version=closed["version"],
                    # its held-out size too, as fleet devices report it: the Fleet page's smallest held-out set
                    metrics={"holdout_accuracy": client_acc[c.cid], "holdout_samples": float(len(c.holdout))},
                    summary=s.to_dict(),
                    round_id=opened["round"],
                )["alerts"]
            requests += len(devices) + 3
            rows = admin._get(f"/admin/models/{MODEL}/drift")[-1]["rows"]
            # a signal with too few samples to test has psi None ("not enough samples"): report None, not 0
            feature_psi = [r["psi"] for r in rows if r["kind"] == "feature" and r["psi"] is not None]
            pred: dict[str, Any] = next((r for r in rows if r["kind"] == "prediction"), {})
            drift.append(
                {
                    "round": rnd,
                    "version": closed["version"],
                    "alerts": alerts,
                    "max_feature_psi": max(feature_psi) if feature_psi else None,
                    "prediction_psi": pred.get("psi"),
                    "prediction_p": pred.get("p"),
                }
            )
            metrics = RoundMetrics(
                round=rnd,
                clients=len(chosen),
                **watch.take(rnd, round_scores(model, task.test, client_acc, loss=task.loss)),
                uplink_bytes=uplink,
                downlink_bytes=down,
                cumulative_uplink_bytes=cum_up,
                cumulative_downlink_bytes=cum_down,
                seconds=time.perf_counter() - t0,
                epsilon=round_epsilon(config, step, closed["measurements"]),
                epsilon_vs_server=closed["measurements"].get("epsilon_vs_server"),
                dp_adjacency=dp_adjacency(config),
                rejected=rejected,
                backdoor_success=backdoor_success(model, task.test, getattr(step.attack, "target", None)),
                clipped_fraction=closed["measurements"].get("clipped_fraction"),
                **personal,
            )
            history.append(metrics)
            if progress is not None:
                progress(metrics)
        stats = admin.stats()["counters"]
        final_state = dict(_held(devices[0])[0])
    report = reg.verify()
    return HttpRunResult(
        config=config,
        rounds=history,
        num_params=sum(v.numel() for v in initial.values()),
        raw_update_bytes=raw_bytes,
        wall_time_s=time.perf_counter() - start,
        final_state=final_state,
        clients=client_rows,
        stopped=stopped,
        personal_states=(
            {c.cid: step.personal_state(c, final_state) for c in clients}
            if step.personalizer.name != "none"
            else {}
        ),
        transport={
            "kind": "http",
            "server": "uvicorn on 127.0.0.1",
            "requests": requests,
            "uploads_accepted": int(stats.get("uploads.accepted", 0)),
            "rejected": {k: v for k, v in stats.items() if k.startswith("rejected.")},
            "registry_versions": len(reg.versions(MODEL, kind="model")),
            "registry_ok": report.ok,
            # downlink the rounds' figures leave out, as every driver does: each device's first full model
            # and the wire session's text (compact uploads; fetched once for the run's devices, which share
            # one client step: each device of a real fleet fetches it once)
            "setup_downlink_bytes": {
                "initial_models": initial_bytes,
                "session": sum(d.session_bytes_received for d in devices),
            },
        },
        drift=drift,
    )


def _held(dev: DeviceClient) -> tuple[dict[str, torch.Tensor], int]:
    """The model ``dev`` holds and its version: every device fetches the initial model before the first round."""
    assert dev.state is not None and dev.version is not None, "a device fetches the model before any round"
    return dev.state, dev.version


def _plain_round(
    step: ClientStep,
    model: torch.nn.Module,
    clients: list,
    devices: list[DeviceClient],
    chosen: list[int],
    admin: AdminClient,
    rnd: int,
) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """One plain round: every chosen device uploads its compressed payload; the service closes the round."""
    opened = admin.open_round(MODEL)
    base = opened["base_version"]
    if step.sessions.compact and not step.sessions.fetched and chosen:
        # the devices take the server's word for the wire session: fetched once, then every upload is compact
        step.sessions.install(devices[chosen[0]].session(MODEL))
    uplink = rejected = 0
    for cid in chosen:
        client, dev = clients[cid], devices[cid]
        up = step.run(client, model, _held(dev)[0], rnd, base)
        if up.payload is None:  # the device could not produce an update (e.g. NaN from training)
            rejected += 1
            continue
        uplink += len(up.payload)
        try:
            dev.upload(MODEL, opened["round"], up.payload, num_examples=client.num_samples)
        except ServiceError as exc:  # refused by the server step (NaN/Inf, norm bound...): 4xx
            if exc.status >= 500:
                raise
            rejected += 1
    # Under central DP noise a round whose every update was refused still closes: the service releases its
    # noise and spends ε, as ServerStep.close does in process; stopping here would tell that the sampled
    # devices' updates were refused (a function of their data) without noise. (Poisson may choose nobody.)
    if chosen and rejected == len(chosen) and step.config.dp_noise <= 0:
        raise InvalidUpdate(
            f"round {rnd}: every update of the round was refused (if local training diverged, try a lower lr)"
        )
    return opened, admin.close_round(MODEL, opened["round"]), uplink, rejected


def _examples_bound(config: RunConfig, clients: list) -> float:
    """The service's ``max_examples`` for a simulated federation: :func:`examples_bound` (each device may claim
    its own size), lowered for a weighted SecAgg run to the largest count its ring carries (the service refuses
    to open a round on a ring below its bound). A device holding more than that fits no driver's ring: it refuses
    the invitation here, and in process its count is refused when it is encoded."""
    bound = examples_bound(c.num_samples for c in clients)
    # weighted (as secure_weight_scale weighs it): each device's count travels in the ring's weight slot
    if config.secagg and config.dp_noise <= 0:
        from deltaplane.aggregation.secagg import max_ring_weight

        bound = min(bound, float(max_ring_weight(config.secagg_bits)))
    return bound


def _secagg_round(
    config: RunConfig,
    step: ClientStep,
    model: torch.nn.Module,
    clients: list,
    devices: list[DeviceClient],
    chosen: list[int],
    admin: AdminClient,
    rnd: int,
    enrollment: RunEnrollment | None = None,
) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """One SecAgg round over HTTP: each device runs the client step (its update ends masked), then the four
    stages through :class:`~deltaplane.serve.secagg_client.SecAggDevice`; the service unmasks only the sum.
    With the run's ``enrollment`` (``config.secagg_authenticated``) the round is authenticated: each device
    holds credentials certified under its token's name, signs its advertisement, checks the roster, and the
    consistency check (``vouch``) runs before the unmasking, as in a fleet
    (:func:`~deltaplane.serve.fleet.secagg_round`).

    Each device rounds into the ring with the same seed as in process
    (:func:`~deltaplane.engine.secure.device_seed`) and the public weight scale is the mean example count of
    the round's sampled devices, as in process, so the unmasked sum — and the model — are the same.

    A device that refuses the invitation (a graph or threshold it deems unsafe; under distributed DP a ring
    range below its own config's C + 6σ_d, which a service that breaks the rules could send) sits the round
    out, as a fleet device does, and sends nothing. With fewer left than
    :func:`~deltaplane.engine.secure.secure_quorum` the SecAgg round is aborted and, under distributed DP, the
    round closes with no sum (ε still spent), as one that sampled too few devices; without DP that is an error.

    Unlike a fleet device (:func:`~deltaplane.serve.fleet.secagg_round`, which checks its invitation before it
    trains), the simulation trains first and checks after: it opens the SecAgg round only for the devices whose
    update came out (as in process), so the round's size, graph, threshold and key draws are the in-process
    engine's; opening it before training would change them whenever a device's update fails, and the run
    would no longer be the in-process one. Only simulated time is spent on a refused invitation.
    """
    from deltaplane.aggregation.secagg import SecAggError
    from deltaplane.engine.secure import (
        device_seed,
        lone_input_error,
        secure_neighbours,
        secure_quorum,
        secure_weight_scale,
    )
    from deltaplane.serve.secagg_client import SecAggDevice

    ups = {}
    for cid in chosen:
        state, version = _held(devices[cid])
        ups[cid] = step.run(clients[cid], model, state, rnd, version)
    secure = [cid for cid in chosen if ups[cid].secure is not None]
    if config.dp_noise > 0 and len(secure) < secure_quorum(config):
        # distributed DP: too few devices for SecAgg; the service closes the round with no sum, as in process
        opened, closed, _, _ = _plain_round(step, model, clients, devices, [], admin, rnd)
        return opened, closed, 0, len(chosen) - len(secure)
    if not secure:
        raise InvalidUpdate(
            f"round {rnd}: every update of the round was refused (if local training diverged, try a lower lr)"
        )
    if len(secure) < secure_quorum(config):  # one device: its "sum" would be its update, as in process
        raise InvalidUpdate(str(lone_input_error(rnd, len(secure))))
    # the round's sampled devices, a failed one included: a real fleet fixes the scale before training
    weights = [clients[cid].num_samples for cid in chosen]
    if config.secagg_authenticated and enrollment is None:
        raise ConfigError(
            "secagg_authenticated: this round has no enrollment of the run's devices; it would not be authenticated"
        )
    signed = (
        {"authenticated": True} if enrollment is not None else {}
    )  # the service's default: unauthenticated
    opened = admin.open_secagg(
        MODEL,
        [f"client-{cid}" for cid in secure],
        **signed,
        bits=config.secagg_bits,
        clip_range=config.secagg_range,
        weight_scale=secure_weight_scale(config, weights),
        # SecAgg+: the run's degree for this round's size, as in process (the service's default threshold,
        # ⌊2g/3⌋ + 1 of each neighbourhood, is the in-process one)
        neighbours=secure_neighbours(config, len(secure)),
        base_version=devices[secure[0]].version,
    )
    number = opened["round"]
    rng = np.random.default_rng(derive_seed(config.seed, Stream.SECAGG, rnd))
    fleet, refusal = [], None
    for cid in secure:  # on each device: its masked update, keys from its own randomness
        try:  # its unmasking floor and least ring range from its own config, never the invitation
            dev = SecAggDevice(
                devices[cid],
                MODEL,
                number,
                randbytes=rng.bytes,
                min_inputs=config.unmask_floor(),
                min_range=config.min_secagg_range(),
                credentials=enrollment.credentials(f"client-{cid}") if enrollment is not None else None,
            )
            dev.set_update(
                ups[cid].secure,  # type: ignore[arg-type]  # secure lists only the devices with a secure update
                clients[cid].num_samples,
                np.random.default_rng(device_seed(config.seed, rnd, cid)),
            )
        except SecAggError as exc:  # the device refuses the invitation: it sits the round out, sends nothing
            log.warning(
                "SecAgg round %s: device %s refused the invitation (%s); sitting it out", number, cid, exc
            )
            refusal = exc
            continue
        fleet.append(dev)
    if len(fleet) < secure_quorum(config):  # too few took the invitation: no sum may be unmasked
        admin.abort_secagg(
            MODEL,
            number,
            reason=f"{len(secure) - len(fleet)} of {len(secure)} devices refused the invitation; SecAgg needs "
            f"at least {secure_quorum(config)} ({refusal})",
        )
        if config.dp_noise <= 0:
            raise SecAggError(
                f"round {rnd}: {len(secure) - len(fleet)} of {len(secure)} devices refused the SecAgg invitation "
                f"and SecAgg needs at least {secure_quorum(config)} ({refusal})"
            )
        # distributed DP: the round closes with no sum, as one that sampled too few devices (ε still spent)
        opened, closed, _, _ = _plain_round(step, model, clients, devices, [], admin, rnd)
        return opened, closed, 0, len(chosen) - len(secure)
    stages = ("advertise", "share", "upload") + (("vouch",) if enrollment is not None else ())
    for stage in stages:  # authenticated: the consistency check (vouch) before the unmasking
        for dev in fleet:
            getattr(dev, stage)()
        admin.advance_secagg(MODEL, number)
    for dev in fleet:
        dev.unmask()
    closed = admin.close_secagg(MODEL, number)
    published = closed["published"]
    done = {"version": published["version"], "measurements": published["measurements"]}
    return (
        {"round": number, "base_version": opened["base_version"]},
        done,
        int(published["uplink_bytes"]),
        len(chosen) - len(secure),
    )
