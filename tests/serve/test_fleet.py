"""A fleet of real devices over TLS: discovery, the device agent, the coordinator, the CLI (docs/fleet.md).

The service runs in this process (uvicorn over TLS with a private CA); devices are threads running
:func:`deltaplane.serve.fleet.run_device`, or separate processes running ``deltaplane fleet device``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from deltaplane.engine import ClientStep, RunConfig, build_clients, make_task
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig, coordinator, create_app, fleet
from deltaplane.serve.client import AdminClient, DeviceClient
from deltaplane.serve.server import BackgroundServer
from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

from .conftest import record_bodies

MODEL = "mytask"
ADMIN = "admin-token-for-fleet-tests"


class Fleet:
    """A registry with the task's initial model, a TLS service on loopback running ``config``'s server step."""

    def __init__(self, root: Path, config: RunConfig) -> None:
        self.root, self.config = root, config
        self.reg = Registry.create(root / "home")
        net = make_task(config).build_model(derive_seed(config.seed, Stream.MODEL_INIT))
        v = self.reg.register_model(MODEL, net.state_dict(), lineage={"round": 0})
        self.reg.set_tag(MODEL, "production", v.number)
        self.initial = {k: t.clone() for k, t in net.state_dict().items()}
        self.tls = make_tls_bundle(root / "tls", hosts=["127.0.0.1"])
        self.service = ServiceConfig(
            home=str(root / "home"), admin_token=ADMIN, device_secret="s" * 32, federation=config,
            rate=1e6, burst=1_000_000,
        )  # fmt: skip
        self._recorded: list[list[tuple[str, bytes]]] = []  # the request bodies each service received
        self._serve()

    def _serve(self, port: int = 0) -> None:
        """A new app over the home (as a new service process: nothing shared in memory) and its server."""
        self.app = create_app(self.service)
        recorder, bodies = record_bodies(self.app)
        self._recorded.append(bodies)
        self.server = BackgroundServer(
            recorder, port=port, ssl_options=server_ssl_options(self.tls.server_cert, self.tls.server_key)
        )

    @property
    def bodies(self) -> list[tuple[str, bytes]]:
        """Every request body the service received, as (path, body), across restarts."""
        return [b for bodies in self._recorded for b in bodies]

    def stop(self) -> None:
        """The service stops (its in-memory state, SecAgg rounds included, dies with it)."""
        self.server.stop()

    def start_again(self) -> None:
        """A restarted service: a new app over the same home, listening on the same address."""
        self._serve(port=int(self.url.rsplit(":", 1)[1]))
        self.server.start()
        assert self.server.url == self.url

    def __enter__(self) -> Fleet:
        self.server.__enter__()
        self.url = self.server.url
        self.ctx = client_context(self.tls.ca_cert)
        self.admin = AdminClient(self.url, ADMIN, tls=self.ctx)
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def device(self, i: int) -> fleet.Device:
        token = self.admin.issue_token(fleet.device_id(i), "fleet")
        conn = DeviceClient(self.url, token, verifier=self.reg.verifier, tls=self.ctx)
        dev = fleet.load_device(conn, self.config, i, model=MODEL)
        dev.log = lambda line: None
        return dev

    @property
    def state(self):
        return self.app.state.deltaplane


def _lose_power_before_upload(monkeypatch, *victims: fleet.Device) -> None:
    """The ``victims`` die (SystemExit) as they are about to send their masked input; the others upload."""
    from deltaplane.serve.secagg_client import SecAggDevice

    real_upload = SecAggDevice.upload

    def upload(self):
        if any(self.client is v.conn for v in victims):
            raise SystemExit("lost power")
        return real_upload(self)

    monkeypatch.setattr(SecAggDevice, "upload", upload)


def _spy_on_training(dev: fleet.Device) -> list[int]:
    """Record the rounds ``dev`` trains in (its client step's local training), training as before."""
    trained: list[int] = []
    real_train = dev.step.train

    def train(client, model, global_state, rnd):
        trained.append(rnd)
        return real_train(client, model, global_state, rnd)

    dev.step.train = train
    return trained


def _threads(devices, **kw) -> list[threading.Thread]:
    errors: list[BaseException] = []

    def run(dev):
        try:
            fleet.run_device(dev, poll=0.05, max_poll=0.3, **kw)
        except BaseException as exc:  # a device that dies: its thread ends, the others go on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    return threads


def _late_for_a_plain_round(f: Fleet, devices: list) -> fleet.Device:
    """Open a plain round, let all devices but the last take part, and close it while the last one trains: its
    upload is refused (409); returns that device, whose take_part said it sat the round out."""
    opened = f.admin.open_round(MODEL)
    info = devices[0].conn.open_rounds(MODEL)[0]
    for dev in devices[:-1]:
        assert fleet.take_part(dev, info, stage_wait=5)
    late, real_run = devices[-1], devices[-1].step.run

    def deadline_passes_while_training(*args, **kw):
        out = real_run(*args, **kw)
        f.admin.close_round(MODEL, opened["round"])
        return out

    late.step.run = deadline_passes_while_training
    assert fleet.take_part(late, info, stage_wait=5) is False
    late.step.run = real_run
    return late


def _config(byo_task: str, **kw) -> RunConfig:
    base = {"task": byo_task, "clients": 3, "rounds": 2, "downlink_codec": "identity", "seed": 3}
    return RunConfig(**(base | kw))


def test_central_dp_plain_rounds_over_tls_match_the_http_simulation(byo_task, tmp_path, one_thread) -> None:
    """Plain rounds with central DP: ε in the measurements, the fleet page lists them, and — with the devices'
    uploads arriving in device order, as the simulation sends them — the same weights as
    ``deltaplane run --transport http`` for the same seed... up to the DP noise, which a real service draws
    from the OS: so the parity is checked without noise, and the DP run for its ε."""
    from deltaplane.serve.federation import run_http_simulation

    plain = _config(byo_task, clip="1.0")
    with Fleet(tmp_path / "a", plain) as f:
        devices = [f.device(i) for i in range(3)]
        opened = f.admin.open_round(MODEL)
        infos = [r for r in devices[0].conn.open_rounds(MODEL)]
        assert infos == [
            {"kind": "plain", "round": 1, "base_version": 1, "nonce": opened["nonce"], "stage": None}
        ]
        for dev in devices:  # one after another: FedAvg sums in device order, as the simulation's
            assert fleet.take_part(dev, infos[0], stage_wait=5)
        closed = f.admin.close_round(MODEL, opened["round"])
        got = f.reg.load_state(f.reg.get(MODEL, closed["version"]))
    sim = run_http_simulation(plain.replace(rounds=1))
    assert all(torch.equal(got[k], sim.final_state[k]) for k in got)

    dp = _config(byo_task, clip="1.0", dp_noise=0.8, dp_delta=1e-3)
    with Fleet(tmp_path / "b", dp) as f:
        threads = _threads([f.device(i) for i in range(3)], rounds=2)
        lines: list[str] = []
        out = fleet.coordinate(f.admin, dp, model=MODEL, rounds=2, deadline=60, poll=0.05,
                               progress=lambda s: lines.append(s.line(2)))  # fmt: skip
        for t in threads:
            t.join(60)
        assert [s.contributors for s in out] == [3, 3] and all(s.version for s in out)
        assert 0 < out[0].epsilon < out[1].epsilon and "ε" in lines[1]
        assert f"ε {out[1].epsilon:.3f} (add/remove)" in lines[1]  # central DP: its neighbours, beside it
        page = httpx.get(f.url + "/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}, verify=f.ctx).text
        assert 'id="closed-rounds"' in page and page.count('data-field="contributors">3<') == 2
        assert '<b data-field="dp_adjacency">add/remove</b>' in page
        reports = f.state.reports[MODEL]
        assert {r["device"] for r in reports} == {"device-0", "device-1", "device-2"}
        assert f.state.monitors[MODEL].history  # the drift summaries reached the monitor


def test_a_plain_round_nobody_took_part_in_is_aborted_not_a_model_of_dp_noise(byo_task, tmp_path) -> None:
    """Walking docs/fleet.md with central DP (no SecAgg), a coordinator run while no device was up said
    `round 1/1 (plain #3): 0/3 devices (3 dropped out), version 6, ε 9.328` and exited 0: the close released
    the DP noise alone as the new training model and spent ε. The guide says a round no device took part in is
    reported failed; it is now aborted on the service: nothing published, no ε spent, the tag unmoved."""
    dp = _config(byo_task, clip="1.0", dp_noise=0.8, dp_delta=1e-3)
    with Fleet(tmp_path, dp) as f:
        lines: list[str] = []
        out = fleet.coordinate(f.admin, dp, model=MODEL, rounds=1, deadline=0.3, poll=0.05, drift=False,
                               progress=lambda s: lines.append(s.line(1)))  # fmt: skip
        assert [(s.version, s.epsilon, s.contributors) for s in out] == [(None, None, 0)]
        assert lines == ["round 1/1 (plain #1): failed: no device took part; nothing was published"]
        assert [a.number for a in f.reg.versions(MODEL)] == [1] and "training" not in f.reg.tags(MODEL)
        assert f.admin.stats()["rounds"].get(MODEL) is None  # not left open either


def test_a_plain_rounds_line_names_the_devices_that_did_not_upload(byo_task, tmp_path) -> None:
    """A SecAgg round's line named its dropouts (`3/4 devices (1 dropped out: device-1)`); a plain round's only
    counted them (`2/3 devices (1 dropped out)`), so the operator could not tell which device process to look
    at. The service's plain round status lists the devices whose uploads it accepted (`devices`, their
    tokens' ids), and the line names the invited ones missing; one uploader the coordinator did not invite
    leaves the dropouts counted only (nothing named it cannot know)."""
    cfg = _config(byo_task, rounds=1)
    with Fleet(tmp_path, cfg) as f:
        threads = _threads([f.device(i) for i in (0, 2)], rounds=1, stage_wait=10)
        # deadline 8 s: device-1 never comes, so the round always waits it out; 3 s was too short for two
        # devices to start and train at a load of ~15 (failed on the unchanged code too)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=8, poll=0.05, drift=False)
        for t in threads:
            t.join(30)
        assert out[0].failed is None and out[0].contributors == 2 and out[0].dropped == ("device-1",)
        assert "2/3 devices (1 dropped out: device-1), version" in out[0].line(1)  # before: (1 dropped out)
        assert sorted(f.admin.round_status(MODEL, out[0].number)["devices"]) == ["device-0", "device-2"]
        rec = {"uploads": 2, "devices": ["device-0", "stranger"]}
        assert coordinator._missing(["device-0", "device-1"], rec) == ()
        assert (
            coordinator._missing(["device-0", "device-1"], {"uploads": 1}) == ()
        )  # an older service: counted


def test_secagg_fleet_with_a_device_dying_mid_round_still_publishes(
    byo_task, tmp_path, monkeypatch, plaintext_watch
) -> None:
    """A device that dies after sharing its keys is a dropout: the others' masks are recovered and the round
    publishes; no device's plaintext update reaches the service (every body, and the SecAgg rounds it holds).
    Four devices: SecAgg's default threshold (more than 2/3 of them) tolerates one dropout from four, none
    from three."""

    cfg = _config(byo_task, clients=4, secagg=True, clip="2.0", wire="self-describing")
    from deltaplane.serve import secagg_routes

    # a closed round's protocol state is dropped (only its status is kept): hold each round as it closes
    held: list = []
    real_of = secagg_routes.FinishedRound.of.__func__

    def holding(cls, r, outcome):
        held.append(r)
        return real_of(cls, r, outcome)

    monkeypatch.setattr(secagg_routes.FinishedRound, "of", classmethod(holding))
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(4)]
        victim = devices[2]
        _lose_power_before_upload(monkeypatch, victim)
        # what each device will compute in round 1 (the float update, before SecAgg's rounding): never sent
        watch_updates = []
        for dev in devices:
            step = ClientStep(cfg, make_task(cfg), base_id=MODEL, simulation=False)
            client = build_clients(cfg, make_task(cfg))[dev.client.cid]
            up = step.run(client, make_task(cfg).build_model(0), f.initial, 1, 1)
            watch_updates.append(up.secure)
        threads = _threads(devices, rounds=1, stage_wait=20)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=3, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed is None and out[0].contributors == 3 and out[0].dropouts == 1
        assert out[0].dropped == ("device-2",) and "(1 dropped out: device-2)" in out[0].line(
            1
        )  # was unnamed
        assert out[0].version is not None
        rounds = held
        bodies = f.bodies
    watch = plaintext_watch
    for i, u in enumerate(watch_updates):
        watch.add_floats(u.flatten(), label=f"device {i}")
    assert len(watch.patterns) > 10
    assert sum(1 for p, _ in bodies if "/secagg/" in p) >= 10
    for path, body in bodies:
        watch.check_bytes(body, path)
    assert watch.check_object(rounds, "secagg rounds") > 5


def test_a_secagg_round_that_cannot_complete_is_aborted_and_named(byo_task, tmp_path, monkeypatch) -> None:
    """Two of four devices die before their masked upload: too few survive SecAgg's threshold (3 of 4), so the
    round cannot be unmasked. The coordinator used to report it as round 0 and leave it open on the service
    (its state held, its devices waiting); it now aborts it there and names its number."""

    cfg = _config(byo_task, clients=4, secagg=True, clip="2.0", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(4)]
        dead = devices[1:3]
        _lose_power_before_upload(monkeypatch, *dead)
        threads = _threads(devices, rounds=1, stage_wait=10)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=3, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed and out[0].version is None and out[0].number >= 1
        status = f.admin.secagg_status(MODEL, out[0].number)
        assert status["finished"] == "aborted"
        assert not f.app.state.secagg_rounds  # nothing left open on the service


def test_devices_waiting_in_a_round_left_open_take_the_coordinators_round(byo_task, tmp_path) -> None:
    """A SecAgg round opened by hand and left open: the devices join it (it is the newest when they start),
    advertise their keys and wait for a share stage nobody opens. They used to wait there for the whole
    ``--stage-wait`` (here 60 s), so the coordinator's round, opened meanwhile, found none of them and failed;
    a newer round now takes them out of the stray one, and the coordinator's round publishes."""
    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        names = [fleet.device_id(i) for i in range(3)]
        stray = f.admin.open_secagg(MODEL, names, weight_scale=10.0)["round"]
        threads = _threads([f.device(i) for i in range(3)], rounds=2, stage_wait=60)
        deadline = time.monotonic() + 30
        while f.admin.secagg_status(MODEL, stray)["advertised"] < 3:  # all three wait in the stray round
            assert time.monotonic() < deadline, "the devices never joined the round left open"
            time.sleep(0.05)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=20, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].number > stray
        assert out[0].failed is None and out[0].contributors == 3 and out[0].version is not None
        assert f.admin.secagg_status(MODEL, stray)["finished"] is None  # left as the operator left it


def test_a_secagg_fleet_with_distributed_dp_publishes_and_accounts(byo_task, tmp_path) -> None:
    """Distributed DP on the real service: each device noises its clipped update before masking; the service
    publishes the unmasked mean and reports ε, growing round by round, on the coordinator's lines."""
    cfg = _config(byo_task, clients=4, secagg=True, clip="1.0", dp_noise=0.8, dp_delta=1e-3,
                  wire="self-describing")  # fmt: skip
    with Fleet(tmp_path, cfg) as f:
        threads = _threads([f.device(i) for i in range(4)], rounds=2, stage_wait=20)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=2, deadline=20, poll=0.05)
        for t in threads:
            t.join(60)
        # its ε holds for zero-out neighbours (a device's noise share stays), and every record says so
        assert f.reg.get(MODEL, out[1].version).lineage["dp"]["adjacency"] == "zero-out"
        assert f.admin.secagg_status(MODEL, out[1].number)["published"]["dp_adjacency"] == "zero-out"
    assert [s.failed for s in out] == [None, None], [s.failed for s in out]
    assert [s.contributors for s in out] == [4, 4] and all(s.version for s in out)
    assert 0 < out[0].epsilon < out[1].epsilon
    assert f"ε {out[1].epsilon:.3f} (zero-out)" in out[1].line(2)
    assert out[0].measurements["secure_sum_published"] == 1.0


@pytest.mark.parametrize("secagg", [True, False], ids=["secagg-distributed-dp", "plain-central-dp"])
def test_a_tied_weight_is_one_tensor_on_the_served_fleet(tied_task, tmp_path, secagg) -> None:
    """A model of one's own with a tied parameter, over TLS with DP (distributed under SecAgg, central over plain
    rounds): the devices mask or upload it once, and every published version keeps its two names equal (the
    bring-your-own walk: before, the published versions' names drifted apart by 2.6 and 3.4 on a tied wine MLP)."""
    cfg = _config(tied_task, clients=3, rounds=1, clip="1.0", dp_noise=0.8, dp_delta=1e-3, secagg=secagg)
    with Fleet(tmp_path, cfg) as f:
        threads = _threads([f.device(i) for i in range(3)], rounds=1, stage_wait=20)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=20, poll=0.05)
        for t in threads:
            t.join(60)
        assert [s.failed for s in out] == [None], [s.failed for s in out]
        state = f.reg.load_state(f.reg.get(MODEL, out[0].version))
    assert not torch.equal(state["again.weight"], f.initial["again.weight"])
    assert torch.equal(state["hidden.weight"], state["again.weight"])


def _trusted_rounds(f: Fleet, cfg: RunConfig) -> tuple[list, list]:
    """``cfg.rounds`` rounds of ``cfg.clients`` device threads under a trusted coordinator (``--trusted``: it
    fetches, scores and judges each version): its summaries and the warnings it gave."""
    import warnings

    threads = _threads([f.device(i) for i in range(cfg.clients)], rounds=cfg.rounds)
    conn = DeviceClient(f.url, f.admin.issue_token("coordinator"), verifier=f.reg.verifier, tls=f.ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=cfg.rounds, deadline=60, poll=0.05,
                               drift_min_samples=1, models=conn)  # fmt: skip
    for t in threads:
        t.join(60)
    return out, caught


def test_the_coordinator_calls_a_diverged_version_so(diverging_task, tmp_path) -> None:
    """The served fleet's divergence warning: the coordinator, which fetches each published version verified
    (``--trusted``), compares its test loss with the version served at its start's (the in-process drivers':
    tests/engine/test_divergence.py)."""
    cfg = _config(diverging_task, clients=2, rounds=1, lr=0.05)
    with Fleet(tmp_path, cfg) as f:
        out, caught = _trusted_rounds(f, cfg)
        (closed,) = f.admin.closed_rounds()
        page = httpx.get(f"{f.url}/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}, verify=f.ctx).text
    assert [s.failed for s in out] == [None]
    # the warning is on the Fleet page too, beside the version's test accuracy (not the coordinator's stderr only)
    assert closed["diverged"] is True and closed["test_accuracy"] == out[0].test_accuracy
    assert "class='bad' data-field='diverged'>yes</td>" in page
    said = [str(w.message) for w in caught if w.category.__name__ == "DivergenceWarning"]
    assert len(said) == 1 and said[0].startswith(
        f"version {out[0].version}: the global model's test loss rose"
    )


def test_every_diverging_version_is_marked_diverged_not_only_the_first(diverging_task, tmp_path) -> None:
    """The watch warns once a run, and the coordinator stored its warning as the version's verdict, so only the
    first diverging version was marked on the Fleet page; a later version as diverged (or worse) read as
    healthy. Each version now carries its own verdict, recomputed here from its stored weights: its test loss
    against the initial model's (the divergence watch's rule, in plain torch)."""
    from deltaplane.engine.divergence import RISE

    # central DP noise of std 0.5 a value each round, large against this small model: both versions' test
    # loss is 28 and 153 times the initial model's in the simulator (a third round's local training blows up
    # on such weights); the fleet's noise is the service's own draw
    cfg = _config(diverging_task, clients=2, rounds=2, lr=0.01, clip="1.0", dp_noise=1.0, dp_delta=1e-3)
    with Fleet(tmp_path, cfg) as f:
        out, caught = _trusted_rounds(f, cfg)
        closed = {c["version"]: c["diverged"] for c in f.admin.closed_rounds()}
        states = {s.version: f.reg.load_state(f.reg.get(MODEL, s.version)) for s in out}
        page = httpx.get(f"{f.url}/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}, verify=f.ctx).text
    assert [s.failed for s in out] == [None] * 2
    task = make_task(cfg)
    net = task.build_model(0)

    def loss(state) -> float:
        net.load_state_dict(state)
        with torch.no_grad():
            return float(task.loss(net(task.test.x), task.test.y))

    initial = loss(f.initial)
    expected = {v: not (loss(st) <= RISE * initial) for v, st in states.items()}
    assert sum(expected.values()) == 2, expected  # both versions diverged
    assert closed == expected  # before: True for the first diverging version only
    assert page.count("class='bad' data-field='diverged'>yes</td>") == sum(expected.values())
    assert len([w for w in caught if w.category.__name__ == "DivergenceWarning"]) == 1  # said once a run


def test_the_coordinator_scores_each_version_on_the_test_set_and_devices_say_their_held_out_size(
    byo_task, tmp_path
) -> None:
    """Walking docs/fleet.md with a 442-sample task, the devices' held-out accuracies (0.156, 0.400, 0.514 on a
    3-class task) were all a newcomer saw of whether the model learned, and nothing said that device 0 held out
    5 samples (one sample: 0.2). Each device's line now names its held-out size (and the Fleet page the smallest
    held-out set behind a round's figures), and the coordinator, which
    fetches each published version verified (``--trusted``), prints its accuracy on the task's test set: the
    figure ``deltaplane run`` prints for the same task."""
    from deltaplane.engine.metrics import accuracy

    cfg = _config(byo_task, rounds=1)
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        lines: list[str] = []
        for dev in devices:
            dev.log = lines.append
        threads = _threads(devices, rounds=1)
        conn = DeviceClient(f.url, f.admin.issue_token("coordinator"), verifier=f.reg.verifier, tls=f.ctx)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=60, poll=0.05,
                               drift_min_samples=1, models=conn)  # fmt: skip
        for t in threads:
            t.join(60)
        state = f.reg.load_state(f.reg.get(MODEL, out[0].version))
        (closed,) = f.state.fleet_snapshot()["closed_rounds"]
        page = httpx.get(f"{f.url}/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}, verify=f.ctx).text
    smallest = min(len(dev.client.holdout) for dev in devices)
    assert closed["reports"] == 3 and closed["holdout_samples_min"] == smallest
    assert "<th>smallest held-out set</th>" in page
    assert f'data-field="holdout_samples_min">{smallest}</td>' in page
    assert [s.failed for s in out] == [None]
    task = make_task(cfg)
    net = task.build_model(0)
    net.load_state_dict(state)
    assert out[0].test_samples == len(task.test) == 113
    assert out[0].test_accuracy == accuracy(net, task.test)
    assert f", test accuracy {out[0].test_accuracy:.3f} on 113 samples, " in out[0].line(1)
    # stored on the service: the Fleet page shows the figure the coordinator printed, beside the devices'
    assert (closed["test_accuracy"], closed["test_samples"], closed["diverged"]) == (
        out[0].test_accuracy, 113, False,
    )  # fmt: skip
    assert f'data-field="test_accuracy">{out[0].test_accuracy:.3f}</td>' in page
    assert 'data-field="test_samples">113</td>' in page and "data-field='diverged'>no</td>" in page
    for dev in devices:
        held = len(dev.client.holdout)
        assert any("held-out accuracy" in line and f" on {held} samples reported" in line for line in lines)
    assert len([line for line in lines if "held-out accuracy" in line]) == 3


def test_a_coordinator_stopped_while_a_secagg_round_is_open_aborts_it(
    byo_task, tmp_path, monkeypatch
) -> None:
    """Walking docs/fleet.md, a coordinator stopped (SIGTERM) during its first SecAgg round left that round open
    on the service; the next coordinator's devices skipped it as older than the new round but counted it
    towards their --rounds 2, stopped after one published round, and the second round failed with *only 0
    clients advertised keys*. A stopped coordinator now aborts its open SecAgg round (which no other coordinator
    can take over) with the reason, and still stops."""
    said: list[str] = []
    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing")

    def stopped(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator, "_secagg_round", stopped)
    with Fleet(tmp_path, cfg) as f:
        with pytest.raises(KeyboardInterrupt):
            fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=5, poll=0.05, say=said.append)
        (ended,) = f.admin.unpublished_rounds(MODEL)
        status = f.admin.secagg_status(MODEL, ended["round"])
    assert status["finished"] == "aborted" and status["abandoned"] is True  # the devices do not count it
    assert ended["reason"].startswith("the coordinator was stopped (Ctrl-C or SIGTERM)")
    assert f"stopped; SecAgg round {ended['round']} aborted on the service" in said


def test_a_device_late_for_a_round_sits_it_out_and_takes_the_next(byo_task, tmp_path) -> None:
    """The round ends while a device trains (the coordinator's deadline passed; a SecAgg round was aborted):
    the service refuses it (409), and the device used to stop on that refusal (the CLI exited with
    `HTTP 409`); it now sits that round out and takes part in the next one."""
    cfg = _config(byo_task)
    with Fleet(tmp_path / "plain", cfg) as f:
        devices = [f.device(i) for i in range(3)]
        late = _late_for_a_plain_round(f, devices)
        f.admin.open_round(MODEL)
        assert fleet.take_part(late, late.conn.open_rounds(MODEL)[0], stage_wait=5)

    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing", codec="topk(0.1)")
    with Fleet(tmp_path / "secagg", cfg) as f:
        dev = f.device(0)
        opened = f.admin.open_secagg(MODEL, [fleet.device_id(i) for i in range(3)], weight_scale=10.0)
        info = dev.conn.open_rounds(MODEL)[0]
        f.admin.abort_secagg(MODEL, opened["round"])  # between the device's discovery and its invitation
        assert fleet.take_part(dev, info, stage_wait=5) is False
        # nothing left the device: its error feedback holds no residual of an update it never sent
        assert dev.client.compressor.state_dict()["residual"] is None


def test_a_refused_update_leaves_the_device_error_feedback_as_before_the_round(byo_task, tmp_path) -> None:
    """A device whose update is refused (the round closed while it trained) sends, in the next round, exactly
    what a device that never heard of the refused round sends: its compressor's error-feedback residual used to
    keep the refused round's update as if delivered, so every later update carried a stale part."""
    cfg = _config(byo_task, codec="topk(0.1)", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        late = _late_for_a_plain_round(f, devices)
        f.admin.open_round(MODEL)
        info = late.conn.open_rounds(MODEL)[0]
        assert fleet.take_part(late, info, stage_wait=5)
        sent = [body for path, body in f.bodies if path.endswith(f"/rounds/{info['round']}/update")]
        fresh = f.device(2)  # the same partition, first heard of the model at round 2
        version, state = fresh.conn.fetch(MODEL, channel="training")
        expected = fresh.step.run(fresh.client, fresh.net, state, info["round"], version)
    assert sent == [expected.payload]


def test_a_refused_update_leaves_the_device_dgc_state_as_before_the_round(byo_task, tmp_path) -> None:
    """DGC's velocity and the relative clip's norm history are put back with the residual when the update is
    refused: the late device's next round is its first for both, as for a device that never heard of the
    refused round (its history counts one participation, not two)."""
    cfg = _config(
        byo_task, codec="topk(0.1)", momentum_correction=0.5, local_clip_relative=1.5, wire="self-describing"
    )
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        assert devices[0].step.dgc.relative_clip == 1.5
        late = _late_for_a_plain_round(f, devices)
        assert late.client.norms is None and late.client.velocity is None
        assert (
            devices[0].client.norms is not None and devices[0].client.norms.count == 1
        )  # an accepted update
        f.admin.open_round(MODEL)
        assert fleet.take_part(late, late.conn.open_rounds(MODEL)[0], stage_wait=5)
        assert late.client.norms is not None and late.client.norms.count == 1
        assert late.client.velocity is not None


def test_distributed_dp_never_unmasks_a_sum_of_fewer_than_m_min_devices(
    byo_task, tmp_path, monkeypatch
) -> None:
    """Distributed DP calibrates each device's noise to m_min devices. With m_min = 4 and SecAgg's threshold 3
    of 4, one device dying before its masked input left 3 survivors, enough for SecAgg: the service unmasked
    that under-noised sum (then withheld it from the model), but the server saw it. Now fewer masked inputs
    than m_min are never unmasked (the round fails and is aborted), and a round inviting fewer than m_min
    devices is refused."""
    from deltaplane.serve.client import ServiceError

    cfg = _config(byo_task, clients=4, secagg=True, clip="1.0", dp_noise=0.8, dp_delta=1e-3,
                  secagg_min_contributors=4, wire="self-describing")  # fmt: skip
    with Fleet(tmp_path, cfg) as f:
        with pytest.raises(ServiceError) as refused:
            f.admin.open_secagg(MODEL, [fleet.device_id(i) for i in range(3)], weight_scale=0)
        assert refused.value.status == 422 and "invite at least 4" in refused.value.detail
        devices = [f.device(i) for i in range(4)]
        victim = devices[2]
        _lose_power_before_upload(monkeypatch, victim)
        threads = _threads(devices, rounds=1, stage_wait=10)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=3, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed and "distributed DP needs 4" in out[0].failed, out[0]
        assert f.admin.secagg_status(MODEL, out[0].number)["finished"] == "aborted"
        assert len(f.reg.versions(MODEL, kind="model")) == 1  # nothing published


@pytest.mark.parametrize("one_dies", [True, False], ids=["below-m_min", "exactly-m_min"])
def test_devices_refuse_to_unmask_fewer_than_m_min_when_the_server_has_no_floor(
    byo_task, tmp_path, monkeypatch, one_dies
) -> None:
    """Each device's distributed-DP noise is calibrated to m_min = 4. A service whose SecAgg server lacks the
    floor (misconfigured, or breaking the protocol: ServerEndpoint built without min_inputs) asks the 3 devices
    left after one dies for unmasking shares, enough for SecAgg's threshold of 3. The devices used to answer,
    so the server unmasked an under-noised sum; now each refuses on the device (its own config's m_min), sends
    no unmask body, sits the round out without crashing, and keeps its error feedback as before the round.
    With all 4 alive (exactly m_min) they answer and the round publishes."""
    from deltaplane.aggregation.secagg import ServerEndpoint
    from deltaplane.serve import secagg_routes

    cfg = _config(byo_task, clients=4, secagg=True, clip="1.0", dp_noise=0.8, dp_delta=1e-3, codec="topk(0.1)",
                  secagg_min_contributors=4, wire="self-describing")  # fmt: skip
    monkeypatch.setattr(
        secagg_routes, "ServerEndpoint", lambda config, min_inputs=0, **kw: ServerEndpoint(config, **kw)
    )
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(4)]
        lines: list[str] = []
        for dev in devices:
            dev.log = lines.append
        victim = devices[2]
        if one_dies:
            _lose_power_before_upload(monkeypatch, victim)
        # the dead device never uploads, so the coordinator waits out the whole deadline: it must leave the 3
        # live devices time to train and upload on a loaded machine (3 s did not, once, at load 4-7 on 2 cores),
        # and the devices must wait longer than it for the unmasking stage
        threads = _threads(devices, rounds=1, stage_wait=30)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=8, poll=0.05)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        unmasks = [body for path, body in f.bodies if path.endswith(f"/secagg/{out[0].number}/unmask")]
        if not one_dies:
            assert out[0].failed is None and out[0].contributors == 4 and out[0].version is not None
            assert len(unmasks) == 4
            return
        status = f.admin.secagg_status(MODEL, out[0].number)
        assert status["survivors"] == [0, 1, 3]  # the floorless server did ask for unmasking
        assert unmasks == []  # no share left any device
        refusals = [line for line in lines if "refused 'unmasking'" in line]
        assert len(refusals) == 3 and all(
            "sum of 3 masked inputs" in r and "at least 4" in r for r in refusals
        )
        assert out[0].failed and out[0].version is None and status["finished"] == "aborted"
        assert len(f.reg.versions(MODEL, kind="model")) == 1  # nothing published
        for i in (0, 1, 3):  # the refused round left no residual of an update in no published model
            assert devices[i].client.compressor.state_dict()["residual"] is None
            assert devices[i].pending is None


def test_discovery_lists_only_the_secagg_rounds_a_device_is_invited_to(byo_task, tmp_path) -> None:
    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        opened = f.admin.open_secagg(MODEL, ["device-0", "device-1"], weight_scale=10.0)
        assert devices[0].conn.open_rounds(MODEL) == [
            {"kind": "secagg", "round": opened["round"], "base_version": 1, "nonce": None,
             "stage": "advertise keys"}
        ]  # fmt: skip
        assert devices[2].conn.open_rounds(MODEL) == []  # not invited: nothing to do
        from deltaplane.serve.secagg_client import SecAggDevice

        for dev in devices[:2]:
            SecAggDevice(dev.conn, MODEL, opened["round"]).advertise()
        f.admin.advance_secagg(MODEL, opened["round"])
        assert devices[1].conn.open_rounds(MODEL)[0]["stage"] == "share keys"


def test_a_secagg_round_left_open_does_not_keep_devices_from_the_coordinators(byo_task, tmp_path) -> None:
    """A SecAgg round opened by hand and left open beside the coordinator's: devices took the older first and
    waited there for stages that never came, while the coordinator's round went on without them and failed.
    They now take the newest open round and skip older ones for good. (A device already waiting in a stale
    round when the coordinator starts still waits out its --stage-wait: docs/fleet.md.)"""
    import time

    cfg = _config(byo_task, clients=3, secagg=True, clip="2.0", wire="self-describing", rounds=1)
    with Fleet(tmp_path, cfg) as f:
        stale = f.admin.open_secagg(MODEL, [fleet.device_id(i) for i in range(3)], weight_scale=0)["round"]
        out: list = []

        def coordinate() -> None:
            out.extend(fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=10, poll=0.05))

        coordinator = threading.Thread(target=coordinate)
        coordinator.start()
        while len(f.app.state.secagg_rounds) < 2 and coordinator.is_alive():  # both rounds open
            time.sleep(0.02)
        threads = _threads([f.device(i) for i in range(3)], rounds=1, stage_wait=10)
        coordinator.join(60)
        for t in threads:
            t.join(30)
        assert out[0].failed is None and out[0].number > stale and out[0].contributors == 3, out[0]


def _waiting_for(cond, timeout: float = 30.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_the_coordinator_rides_out_a_service_restart_and_finishes_the_durable_round(
    byo_task, tmp_path
) -> None:
    """The service restarts while the coordinator waits for round 1's uploads. The coordinator used to exit on
    the first refused connection (`fleet coordinate` printed one line) and leave the round open; it now waits
    for the service, says so, finds the round it opened (durable, restored by the restart) and finishes it,
    then runs round 2: each round published once."""
    cfg = _config(byo_task)
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        said: list[str] = []
        out: list = []

        def coordinate() -> None:
            out.extend(fleet.coordinate(f.admin, cfg, model=MODEL, rounds=2, deadline=30, poll=0.05,
                                        patience=30, say=said.append))  # fmt: skip

        coordinator = threading.Thread(target=coordinate)
        coordinator.start()
        _waiting_for(lambda: MODEL in f.state.rounds)  # round 1 is open, no device yet
        f.stop()
        _waiting_for(lambda: any("not answering" in line for line in said) or not coordinator.is_alive())
        f.start_again()
        threads = _threads(devices, rounds=2)  # the devices come up with the restarted service
        coordinator.join(60)
        for t in threads:
            t.join(30)
        assert [(s.number, s.failed, s.contributors) for s in out] == [(1, None, 3), (2, None, 3)], out
        assert 1 < out[0].version < out[1].version
        assert len(f.reg.versions(MODEL, kind="model")) == 3  # never published twice
        assert any("waiting up to 30 s" in line for line in said), said
        assert any("answers again" in line for line in said), said
        assert [r["round"] for r in devices[0].rounds] == [1, 2]


def test_a_lost_answer_is_read_back_and_a_coordinator_that_gives_up_names_the_open_round(
    byo_task, tmp_path
) -> None:
    """The answer to a close is lost (the connection breaks after the service published): the coordinator reads
    the round back and reports it published, rather than stop or close it again. When the service stays away
    past --patience, it gives up in one typed line naming the round left open and how to abort it."""
    from deltaplane.errors import ServiceUnreachable

    cfg = _config(byo_task)
    with Fleet(tmp_path, cfg) as f:
        real_close, real_open = f.admin.close_round, f.admin.open_round

        def close_answer_lost(model, number):
            real_close(model, number)
            raise httpx.ReadError("connection reset by peer")

        def open_then_the_service_goes(model, base_version=None):
            opened = real_open(model, base_version)
            if opened["round"] == 2:
                for t in threads:  # the devices have reported round 1 (they would wait for the service)
                    t.join(30)
                f.stop()
            return opened

        f.admin.close_round, f.admin.open_round = close_answer_lost, open_then_the_service_goes
        threads = _threads([f.device(i) for i in range(3)], rounds=1)
        lines: list = []
        with pytest.raises(ServiceUnreachable) as gave_up:
            fleet.coordinate(f.admin, cfg, model=MODEL, rounds=2, deadline=30, poll=0.05, patience=1,
                             progress=lines.append, say=lambda line: None)  # fmt: skip
        for t in threads:
            t.join(30)
        assert [(s.number, s.failed, s.version, s.contributors) for s in lines] == [(1, None, 2, 3)]
        assert "gave up after 1 s" in str(gave_up.value)
        assert f"Plain round 2 of '{MODEL}' stays open" in str(gave_up.value)
        assert f"/admin/models/{MODEL}/rounds/2/abort" in str(gave_up.value)
        f.start_again()
        assert f.admin.round_status(MODEL, 2)["state"] == "open"  # durable: there for the operator to abort
        assert len(f.reg.versions(MODEL, kind="model")) == 2  # round 1 published once


@pytest.mark.parametrize("kind", ["plain", "secagg"])
def test_a_coordinator_whose_close_answer_is_lost_still_reports_the_services_epsilon(
    byo_task, tmp_path, kind
) -> None:
    """Under DP the answer to a close is lost after the service published (and spent ε). The coordinator reads
    the round back and reported it published, but with no ε: the measurements were only in the lost answer.
    The service now keeps each close's measurements with the round (GET .../rounds/{r}, a SecAgg round's
    status, read here from a restarted service's store), and the coordinator's line carries the ε the service
    computed."""
    extra = {"secagg": True, "secagg_min_contributors": 3} if kind == "secagg" else {}
    cfg = _config(byo_task, clip="1.0", dp_noise=0.8, dp_delta=1e-3, rounds=1, **extra)
    with Fleet(tmp_path, cfg) as f:
        answered: list[dict] = []
        real_close = f.admin.close_secagg if kind == "secagg" else f.admin.close_round

        def close_answer_lost(model, number):
            answered.append(real_close(model, number))
            if kind == "secagg":  # read the status from the store, as a restarted service or another worker
                f.stop()
                f.start_again()
            raise httpx.ReadError("connection reset by peer")

        if kind == "secagg":
            f.admin.close_secagg = close_answer_lost
        else:
            f.admin.close_round = close_answer_lost
        threads = _threads([f.device(i) for i in range(3)], rounds=1, stage_wait=10)
        lines: list = []
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=30, poll=0.05,
                               progress=lines.append, say=lambda line: None)  # fmt: skip
        for t in threads:
            t.join(30)
        measured = answered[0]["published" if kind == "secagg" else "measurements"]
        measured = measured["measurements"] if kind == "secagg" else measured
        assert len(answered) == 1 and measured["epsilon"] > 0  # closed once; the service spent ε
        assert out[0].failed is None and out[0].version is not None
        assert out[0].epsilon == measured["epsilon"] and out[0].measurements == measured
        assert f"ε {measured['epsilon']:.3f}" in out[0].line(1)
        if kind == "plain":
            assert f.admin.round_status(MODEL, out[0].number)["measurements"] == measured
        else:
            assert f.admin.secagg_status(MODEL, out[0].number)["published"]["measurements"] == measured


def test_a_restart_mid_secagg_round_loses_it_and_the_fleet_goes_on_with_the_next(byo_task, tmp_path) -> None:
    """The service restarts after every device sent its masked input, before unmasking. A SecAgg round does not
    survive that (its state was in memory only), and it used to end the coordinator; and the restarted service
    numbered the next round 1 again, which every device had seen and skipped. Now the round is recorded lost:
    the coordinator reports it failed and opens round 2; the devices ride out the restart, learn the round was
    lost (409 RoundLost), restore their error feedback (their update reached no model) and join round 2."""
    cfg = _config(byo_task, clients=3, secagg=True, clip="2.0", wire="self-describing", codec="topk(0.2)")
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        at_run: dict[int, list] = {i: [] for i in range(3)}  # each device's codec state as each round trains
        for i, dev in enumerate(devices):

            def run(*args, _dev=dev, _real=dev.step.run, _i=i, **kw):
                import copy

                at_run[_i].append(copy.deepcopy(_dev.client.compressor.state_dict()))
                return _real(*args, **kw)

            dev.step.run = run
        real_advance, advances = f.admin.advance_secagg, []

        def advance(model, number):
            advances.append(number)
            if len(advances) == 3:  # every masked input is in: the service restarts before unmasking
                f.stop()
                threading.Timer(0.5, f.start_again).start()
            return real_advance(model, number)

        f.admin.advance_secagg = advance
        threads = _threads(devices, rounds=2, stage_wait=20)
        said: list[str] = []
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=2, deadline=20, poll=0.05, patience=30,
                               say=said.append)  # fmt: skip
        for t in threads:
            t.join(60)
        assert out[0].number == 1 and out[0].version is None and "restarted" in out[0].failed, out[0]
        assert (out[1].number, out[1].failed, out[1].contributors) == (2, None, 3), out[1]
        assert f.admin.secagg_status(MODEL, 1)["finished"] == "lost"
        assert len(f.reg.versions(MODEL, kind="model")) == 2
        for i, dev in enumerate(devices):
            assert [r["round"] for r in dev.rounds] == [2], (i, dev.rounds)
            first, second = at_run[i]
            assert _same(first, second), f"device {i} kept the lost round's error feedback"


def _same(a, b) -> bool:
    """Whether two state dicts (nested dicts, tensors, numbers) are equal."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_discovery_shows_a_withdrawn_cohort_no_round(byo_task, tmp_path) -> None:
    """A device of a cohort that withdrew consent was still shown the open plain round (only SecAgg rounds were
    hidden from it): it trained on its data for an update every round refuses. It now sees nothing."""
    with Fleet(tmp_path, _config(byo_task)) as f:
        dev = f.device(0)
        f.admin.open_round(MODEL)
        assert [r["kind"] for r in dev.conn.open_rounds(MODEL)] == ["plain"]
        f.admin.withdraw("fleet", "consent withdrawn")
        assert dev.conn.open_rounds(MODEL) == []


@pytest.mark.parametrize(
    "answer",
    [
        {"model": "another", "rounds": [{"kind": "plain", "round": 1, "base_version": 1, "nonce": "n"}]},
        {"model": MODEL, "rounds": [{"kind": "secagg", "round": 1, "base_version": 1, "stage": "whatever"}]},
        {"model": MODEL, "rounds": [{"kind": "plain", "round": "1; drop", "base_version": 1, "nonce": "n"}]},
        {"model": MODEL, "rounds": [{"kind": "plain", "round": 0, "base_version": -5, "nonce": "n"}]},
        {"model": MODEL, "rounds": "everything"},
    ],
)
def test_a_device_refuses_a_malformed_discovery_answer_in_one_typed_line(byo_task, answer) -> None:
    """A buggy or hostile service's discovery answer (another model's rounds, an unknown SecAgg stage, a round
    number that is not one) is a DecodeError the CLI prints in one line; it used to be acted on, or to crash the
    device with a raw ValueError/TypeError traceback."""
    from deltaplane.errors import DecodeError

    def service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer)

    http = httpx.Client(base_url="https://service.test", transport=httpx.MockTransport(service))
    conn = DeviceClient("https://service.test", "token", verifier=None, client=http)  # type: ignore[arg-type]
    dev = fleet.load_device(conn, _config(byo_task), 0, model=MODEL)
    dev.log = lambda line: None
    with pytest.raises(DecodeError, match="malformed"):
        fleet.run_device(dev, rounds=1, poll=0.01)


def test_a_device_says_when_the_service_stops_and_starts_answering() -> None:
    """A device rode out an outage in silence for up to --patience (300 s): only the coordinator said it was
    waiting. It now says so once per outage, and how long it lasted, as the coordinator does."""
    calls = {"n": 0}
    stop = threading.Event()

    def service(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] in (1, 2):  # down for the first two polls
            raise httpx.ConnectError("connection refused", request=request)
        if calls["n"] >= 4:
            stop.set()
        return httpx.Response(200, json={"model": MODEL, "rounds": []})

    http = httpx.Client(base_url="https://service.test", transport=httpx.MockTransport(service))
    conn = DeviceClient("https://service.test", "token", verifier=None, client=http)  # type: ignore[arg-type]
    said: list[str] = []
    dev = fleet.Device(conn, MODEL, RunConfig(), None, None, None, None, log=said.append)  # type: ignore[arg-type]
    fleet.run_device(dev, poll=0.01, max_poll=0.02, patience=30, stop=stop)
    assert len(said) == 2, said
    assert said[0] == "the service is not answering (ConnectError); waiting up to 30 s for it to come back"
    assert said[1].startswith("the service answers again after ") and said[1].endswith(" s")


def _cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deltaplane.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAPLANE_")}
    return env | {
        "PYTHONPATH": os.pathsep.join([src, str(tmp_path)]),
        "OMP_NUM_THREADS": "1",
        "DELTAPLANE_ADMIN_TOKEN": ADMIN,
        "COLUMNS": "200",
    }


def test_enroll_writes_private_token_files_and_a_device_refuses_the_wrong_ca(byo_task, tmp_path) -> None:
    cfg = _config(byo_task)
    (tmp_path / "fleet.yaml").write_text(f"task: {{path: '{byo_task}'}}\nclients: {{count: 3}}\nseed: 3\n")
    with Fleet(tmp_path / "svc", cfg) as f:
        env = _env(tmp_path)
        done = _cli("fleet", "enroll", "--url", f.url, "--ca", str(f.tls.ca_cert), "--federation", "fleet.yaml",
                    "--out", "tokens", cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        files = sorted((tmp_path / "tokens").glob("device-*"))
        assert [p.name for p in files] == ["device-0.token", "device-1.token", "device-2.token"]
        assert (tmp_path / "tokens" / "enrollment.issued").read_text() == "device-2\n"  # --add starts past it
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        other = make_tls_bundle(tmp_path / "other", hosts=["127.0.0.1"])
        before = len(f.bodies)
        done = _cli("fleet", "device", "--url", f.url, "--ca", str(other.ca_cert), "--token-file",
                    str(files[0]), "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"),
                    "--federation", "fleet.yaml", "--model", MODEL, "--device", "0", "--rounds", "1",
                    cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 1
        assert "did not prove its identity" in done.stderr and "Traceback" not in done.stderr
        assert len(f.bodies) == before  # not one request reached the service
        plain = f.url.replace("https://", "http://")
        done = _cli("fleet", "device", "--url", plain, "--ca", str(f.tls.ca_cert), "--token-file",
                    str(files[0]), "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"),
                    "--federation", "fleet.yaml", "--model", MODEL, "--device", "0",
                    cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 2 and "use its https:// address" in done.stderr
        # without --ca, the http:// URL of the HTTPS service was an outage the device waited out for 300 s
        done = _cli("fleet", "device", "--url", plain, "--token-file", str(files[0]), "--trusted",
                    str(f.reg.home / "keys" / "signing.ed25519.pub"), "--federation", "fleet.yaml", "--model",
                    MODEL, "--device", "0", "--patience", "100", cwd=tmp_path, env=env, timeout=90)  # fmt: skip
        said = " ".join(done.stderr.split())
        assert done.returncode == 1 and "speaks HTTPS" in said and f"use --url {f.url} with --ca" in said, (
            said
        )
        # enrolling again into the same folder would overwrite tokens that stay valid on the service
        tokens = [p.read_bytes() for p in files]
        done = _cli("fleet", "enroll", "--url", f.url, "--ca", str(f.tls.ca_cert), "--devices", "3",
                    "--out", "tokens", cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 2 and "device-0.token already exists" in done.stderr, done.stderr
        assert [p.read_bytes() for p in files] == tokens
        # a wrong admin token: refused, and no folder or file left behind (an empty folder was)
        done = _cli("fleet", "enroll", "--url", f.url, "--ca", str(f.tls.ca_cert), "--devices", "2",
                    "--out", "tokens2", cwd=tmp_path, env=env | {"DELTAPLANE_ADMIN_TOKEN": "w" * 20})  # fmt: skip
        assert done.returncode != 0 and not (tmp_path / "tokens2").exists(), done.stderr
        # a missing token file is a usage error (exit 2), not an OSError (exit 1)
        done = _cli("fleet", "device", "--url", f.url, "--ca", str(f.tls.ca_cert), "--token-file", "nope.token",
                    "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"), "--federation", "fleet.yaml",
                    "--model", MODEL, "--device", "0", cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 2 and "nope.token" in done.stderr, done.stderr
        # a coordinator whose every round fails (no device running) exits 1, saying so
        done = _cli("fleet", "coordinate", "--url", f.url, "--ca", str(f.tls.ca_cert), "--federation",
                    "fleet.yaml", "--model", MODEL, "--rounds", "1", "--deadline", "0.5",
                    cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 1 and "1 of 1 rounds failed" in done.stderr, (done.stdout, done.stderr)


def test_a_device_process_stops_cleanly_on_sigterm(byo_task, tmp_path) -> None:
    """``fleet device`` keeps its own SIGTERM handling under the CLI, which turns SIGTERM into an exit around every
    other command (``deltaplane.signals.exit_on_terminate``): the device finishes the request in flight, says how
    many rounds it took part in and exits 0, rather than the CLI's exit 143 from wherever it was."""
    import signal

    (tmp_path / "fleet.yaml").write_text(f"task: {{path: '{byo_task}'}}\nclients: {{count: 3}}\nseed: 3\n")
    with Fleet(tmp_path / "svc", _config(byo_task)) as f:
        env = _env(tmp_path)
        done = _cli("fleet", "enroll", "--url", f.url, "--ca", str(f.tls.ca_cert), "--federation", "fleet.yaml",
                    "--out", "tokens", cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        proc = subprocess.Popen(
            [sys.executable, "-m", "deltaplane.cli", "fleet", "device", "--url", f.url, "--ca", str(f.tls.ca_cert),
             "--token-file", "tokens/device-0.token", "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"),
             "--federation", "fleet.yaml", "--model", MODEL, "--device", "0"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            # it fetched the model and polls for rounds (none is open)
            while f.state.seen.get(fleet.device_id(0), (None, 0, None))[1] < 3:
                assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "device 0: took part in 0 published rounds" in out, (out, err)


@pytest.mark.slow
def test_the_guide_three_device_processes_and_the_coordinator_over_tls(byo_task, tmp_path) -> None:
    """docs/fleet.md end to end with separate processes: its fleet.yaml (SecAgg with distributed DP), 2 rounds,
    3 devices."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "fleet.md").read_text()
    yaml = next(b for b in re.findall(r"```yaml\n(.*?)```", guide, re.S) if b.startswith("task:"))
    assert "mytask:make_task" in yaml and byo_task == "mytask:make_task"  # the guide's task file, in tmp_path
    (tmp_path / "fleet.yaml").write_text(yaml)
    cfg = RunConfig.from_yaml(tmp_path / "fleet.yaml")
    with Fleet(tmp_path / "svc", cfg) as f:
        env = _env(tmp_path)
        assert _cli("fleet", "enroll", "--url", f.url, "--ca", str(f.tls.ca_cert), "--devices", "3", "--out",
                    "tokens", cwd=tmp_path, env=env).returncode == 0  # fmt: skip
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "deltaplane.cli",
                    "fleet",
                    "device",
                    "--url",
                    f.url,
                    "--ca",
                    str(f.tls.ca_cert),
                    "--token-file",
                    f"tokens/device-{i}.token",
                    "--trusted",
                    str(f.reg.home / "keys" / "signing.ed25519.pub"),
                    "--federation",
                    "fleet.yaml",
                    "--model",
                    MODEL,
                    "--device",
                    str(i),
                    "--rounds",
                    "2",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(3)
        ]
        done = _cli("fleet", "coordinate", "--url", f.url, "--ca", str(f.tls.ca_cert), "--federation",
                    "fleet.yaml", "--model", MODEL, "--rounds", "2", "--deadline", "60", "--trusted",
                    str(f.reg.home / "keys" / "signing.ed25519.pub"), cwd=tmp_path, env=env, timeout=300)  # fmt: skip
        outs = [p.communicate(timeout=120) for p in procs]
        assert done.returncode == 0, done.stderr
        assert "round 2/2 (secagg #2): 3/3 devices" in done.stdout
        eps = [float(e) for e in re.findall(r", ε ([0-9.]+)", done.stdout)]
        assert len(eps) == 2 and 0 < eps[0] < eps[1], done.stdout  # the service's accountant, every round
        for out, err in outs:
            assert "took part in 2 published rounds" in out, err
        assert len(f.reg.versions(MODEL, kind="model")) == 3
        assert [r["kind"] for r in f.state.closed_rounds] == ["secagg", "secagg"]
        assert f.state.counters["uploads.accepted"] == 0  # no plaintext upload was ever accepted
        versions = [int(v) for v in re.findall(r"version (\d+)", done.stdout)]
        assert sorted(f.state.monitors[MODEL].prediction_references) == [1, *versions], done.stderr


def test_a_secagg_coordinator_loads_the_task_once_before_its_first_request(byo_task, monkeypatch) -> None:
    """The SecAgg weight scale and the drift reference read the same devices: a coordinator that builds the task
    (here: the registry holds no reference, as for a model registered before `fleet init` stored one) used to
    make the task and partition its data twice (once for each) before its first request to the service; now
    once, and the reference it sends is the one built from a task of its own."""
    loaded: list[str] = []
    real_make_task = fleet.make_task
    monkeypatch.setattr(
        fleet, "make_task", lambda config: loaded.append(config.task) or real_make_task(config)
    )
    sent: list[dict] = []

    class Refusing:  # the service refuses the coordinator's first request: it ends there
        base_url = "http://127.0.0.1:1"

        def stats(self):  # no round open: none left by a coordinator that is gone
            return {"rounds": {}, "secagg_rounds": {}}

        def versions(self, model):  # a model registered without a fleet reference
            return {"model": model, "versions": [{"number": 1, "lineage": {"round": 0}}]}

        def set_drift_reference(self, model, spec, reference, *, window, min_samples):
            sent.append(reference)
            raise fleet.ServiceError(401, "invalid admin token")

    cfg = _config(byo_task, secagg=True, clip="2.0")
    with pytest.raises(fleet.ServiceError, match="invalid admin token"):
        fleet.coordinate(Refusing(), cfg, model=MODEL, rounds=1, deadline=1.0, say=lambda line: None)  # type: ignore[arg-type]
    task = real_make_task(cfg)
    _, expected = fleet.drift_reference(task, build_clients(cfg, task))
    assert loaded == [byo_task] and sent == [expected.to_dict()]


def test_the_coordinators_line_says_when_a_distributed_dp_sum_was_not_published() -> None:
    published = coordinator.RoundSummary(1, "secagg", 1, 3, 3, 2, 1.5, 2.0, {"secure_sum_published": 1.0})
    short = coordinator.RoundSummary(2, "secagg", 2, 3, 2, 4, 2.5, 2.0, {"secure_sum_published": 0.0})
    assert "not published" not in published.line(2)
    assert "the sum was not published, ε still spent" in short.line(2) and "ε 2.500" in short.line(2)


@pytest.mark.parametrize("breaks", ["narrow-ring", "unsafe-threshold"])
def test_a_device_refusing_an_invitation_sits_the_round_out_and_joins_the_next(
    byo_task, tmp_path, monkeypatch, breaks
) -> None:
    """A service that breaks the rules opens a SecAgg round the honest service refuses: a ring narrower than
    the devices' distributed-DP minimum (C + 6σ_d from each device's own config; the ring would clip the noised
    values), or a threshold of 2 of 3 (check_device_policy). The device used to stop (the SecAggError of the
    invitation escaped `fleet device`; a narrow ring was not checked on the device at all); now it refuses
    before sending anything, keeps its error feedback, and takes part in the next, valid round. It also used to
    train first and read the invitation after: a refused round cost a full training pass; now it never trains."""
    from deltaplane.aggregation.dp import DistributedDP
    from deltaplane.serve import secagg_routes

    cfg = _config(byo_task, clients=3, secagg=True, clip="1.0", dp_noise=0.8, dp_delta=1e-3, codec="topk(0.1)",
                  secagg_min_contributors=3, wire="self-describing")  # fmt: skip
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        lines: list[str] = []
        devices[0].log = lines.append
        names = [fleet.device_id(i) for i in range(3)]
        with monkeypatch.context() as m:  # the service's own checks switched off: it breaks the rules
            if breaks == "narrow-ring":
                m.setattr(DistributedDP, "check_ring_range", lambda self, clip_range: None)
                opened = f.admin.open_secagg(
                    MODEL, names, clip_range=cfg.min_secagg_range() / 2, weight_scale=0
                )
            else:
                m.setattr(secagg_routes, "check_device_policy", lambda config: None)
                opened = f.admin.open_secagg(MODEL, names, threshold=2, weight_scale=0)
        info = next(r for r in devices[0].conn.open_rounds(MODEL) if r["round"] == opened["round"])
        before = len(f.bodies)
        trained = _spy_on_training(devices[0])
        assert fleet.take_part(devices[0], info, stage_wait=2) is False
        assert trained == []  # refused before training: the round cost the device no training pass
        assert len(f.bodies) == before  # nothing sent
        assert any("refused the invitation" in line for line in lines), lines
        assert devices[0].client.compressor.state_dict()["residual"] is None  # error feedback as before
        f.admin.abort_secagg(MODEL, opened["round"])
        threads = _threads(devices, rounds=1, stage_wait=10)
        # every device takes part: the deadline only ends a stage nobody finished, so a long one costs
        # nothing on a quiet machine and keeps a loaded one (load ~6) from dropping a slow honest device
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=20, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed is None and out[0].contributors == 3 and out[0].version is not None
        assert trained == [out[0].number]  # the valid round it trained for


def test_an_aborted_secagg_round_leaves_the_devices_error_feedback_as_before_it(
    byo_task, tmp_path, monkeypatch
) -> None:
    """Three devices, SecAgg's threshold 3: one dies before its masked input, so the two masked inputs that
    arrived can never be unmasked and the coordinator aborts the round. The two devices that sent theirs used
    to count their updates as delivered (their error-feedback residual dropped what they sent) although the
    round reached no model; only a round lost in a restart restored it. The service now answers an aborted
    round with a typed RoundAborted, and the devices keep their error feedback as before the round."""

    cfg = _config(byo_task, clients=3, secagg=True, clip="1.0", codec="topk(0.1)", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        lines: list[str] = []
        for dev in devices[:2]:
            dev.log = lines.append
        victim = devices[2]
        _lose_power_before_upload(monkeypatch, victim)
        threads = _threads(devices, rounds=1, stage_wait=10)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=3, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed and out[0].version is None
        assert f.admin.secagg_status(MODEL, out[0].number)["finished"] == "aborted"
        masked = [p for p, _ in f.bodies if p.endswith(f"/secagg/{out[0].number}/masked")]
        assert len(masked) == 2  # devices 0 and 1 did send their masked updates
        assert sum("aborted (it will never publish)" in line for line in lines) == 2, lines
        for dev in devices[:2]:
            assert dev.client.compressor.state_dict()["residual"] is None  # as before the round
            assert dev.pending is None


def test_a_device_sits_out_an_invitation_whose_vector_size_is_not_its_models(
    byo_task, tmp_path, monkeypatch
) -> None:
    """A service that breaks the rules (or runs another model) invites devices to a round whose SecAgg vector is
    one value longer than the device's update. The device refused it in set_update (a SecAggError: the update
    does not fit the round), but outside the invitation's handler, so `deltaplane fleet device` stopped; now
    it sits the round out like any refused invitation (one line, nothing sent, error feedback as before) and
    takes the next, valid round. The size is checked before training now (zeros shaped like what the device
    masks): the refused round used to cost a full training pass."""
    from deltaplane.aggregation.secagg import RingEncoding
    from deltaplane.serve import secagg_routes

    class OneTooMany(RingEncoding):
        @staticmethod
        def vector_size(like) -> int:
            return RingEncoding.vector_size(like) + 1

    cfg = _config(byo_task, clients=3, secagg=True, clip="2.0", codec="topk(0.1)", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        lines: list[str] = []
        devices[0].log = lines.append
        with monkeypatch.context() as m:
            m.setattr(secagg_routes, "RingEncoding", OneTooMany)
            opened = f.admin.open_secagg(MODEL, [fleet.device_id(i) for i in range(3)], weight_scale=0)
        info = next(r for r in devices[0].conn.open_rounds(MODEL) if r["round"] == opened["round"])
        before = len(f.bodies)
        trained = _spy_on_training(devices[0])
        assert fleet.take_part(devices[0], info, stage_wait=2) is False
        assert trained == []  # refused before training: the round cost the device no training pass
        assert [p for p, body in f.bodies[before:] if body] == []  # nothing sent
        assert len(lines) == 1 and "refused the invitation" in lines[0] and "the round expects" in lines[0]
        assert devices[0].client.compressor.state_dict()["residual"] is None  # error feedback as before
        f.admin.abort_secagg(MODEL, opened["round"])
        threads = _threads(devices, rounds=1, stage_wait=10)
        # every device takes part: the deadline only ends a stage nobody finished, so a long one costs
        # nothing on a quiet machine and keeps a loaded one (load ~6) from dropping a slow honest device
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=20, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed is None and out[0].contributors == 3 and out[0].version is not None
        assert trained == [out[0].number]  # the valid round it trained for


def test_a_device_whose_round_ended_says_so_not_that_a_stage_closed() -> None:
    """Walking docs/fleet.md with one of 3 devices missing, the coordinator aborted the round at key
    advertisement (threshold 3) and each device said "'share keys' closed before this device spoke", a stage
    that never opened. A round gone from discovery is now called ended; a stage passed is still called closed."""
    from types import SimpleNamespace

    def dev(rounds: list[dict]) -> SimpleNamespace:
        return SimpleNamespace(model=MODEL, conn=SimpleNamespace(open_rounds=lambda model: rounds))

    gone = fleet.wait_for_stage(dev([]), 3, "share keys", deadline=time.monotonic() + 5, poll=0.01)
    assert (
        gone == "the round ended (aborted, or finished without this device) before it spoke in 'share keys'"
    )
    passed = dev([{"kind": "secagg", "round": 3, "stage": "masked input"}])
    out = fleet.wait_for_stage(passed, 3, "share keys", deadline=time.monotonic() + 5, poll=0.01)
    assert out == "'share keys' closed before this device spoke"


def test_a_fleet_device_whose_token_is_revoked_stops_saying_what_to_do(byo_task, tmp_path) -> None:
    """`keys revoke --upload` revokes a running device's service tokens: its next request gets 401. The device
    exited 1 with the service's bare "HTTP 401: missing, invalid, expired or revoked device token; ask an admin
    for one (POST /admin/devices)", an admin endpoint its operator cannot call, naming no token file. Now it
    stops at once (no retry can pass) with one line naming its token file, why, and what to do: a replacement
    enrolled under a new id. Checked against a real service on loopback, at start and while it polls."""
    from typer.testing import CliRunner

    from deltaplane.cli import app

    cfg = _config(byo_task)
    (tmp_path / "fleet.yaml").write_text(f"task: {{path: '{byo_task}'}}\nclients: {{count: 3}}\nseed: 3\n")
    with Fleet(tmp_path / "svc", cfg) as f:
        token = tmp_path / "device-0.token"
        token.write_text(f.admin.issue_token(fleet.device_id(0), "fleet"))
        args = ["fleet", "device", "--url", f.url, "--ca", str(f.tls.ca_cert), "--token-file", str(token),
                "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"), "--federation",
                str(tmp_path / "fleet.yaml"), "--model", MODEL, "--device", "0", "--patience", "5"]  # fmt: skip

        def revoke_once_polling() -> None:
            deadline = time.monotonic() + 120
            while fleet.device_id(0) not in f.state.seen and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # a few polls of discovery
            f.admin.revoke_device(fleet.device_id(0))

        revoker = threading.Thread(target=revoke_once_polling, daemon=True)
        revoker.start()
        said = {}
        for when in ("while it polls", "at start"):
            started = time.monotonic()
            r = CliRunner().invoke(app, args)
            said[when] = (r.exit_code, " ".join(r.output.split()), time.monotonic() - started)
            revoker.join(30)
    for when, (code, out, took) in said.items():
        assert code == 1 and "Traceback" not in out, (when, out)
        assert f"the service refused device 0's token ({token})" in out, (when, out)
        assert "revoked (`deltaplane keys revoke --upload`" in out and "fleet enroll --add 1" in out, (
            when,
            out,
        )
        assert took < 60, (when, took)  # stopped, not retried


def test_a_device_waiting_on_a_round_stops_when_its_token_is_refused() -> None:
    """Two of the device's waits read a refusal as an answer: the SecAgg round's end (any error but lost or
    aborted read as "still open", polled until the stage wait ran out) and the revocation list (logged, and the
    round went on). A 401 there is the device's token refused: it now ends the wait, and run_device stops with
    TokenRefused."""
    from types import SimpleNamespace

    from deltaplane.serve.client import ServiceError, TokenRefused

    def refused(*a, **kw):
        raise ServiceError(401, "missing, invalid, expired or revoked device token")

    said: list[str] = []
    dev = SimpleNamespace(
        model=MODEL, conn=SimpleNamespace(request=refused, open_rounds=refused), log=said.append,
        credentials=object(), config=SimpleNamespace(threads=1), rounds=[], pending=None,
    )  # fmt: skip
    with pytest.raises(ServiceError) as exc:
        fleet._round_unpublished(dev, 3, deadline=time.monotonic() + 30)
    assert exc.value.status == 401
    with pytest.raises(ServiceError):
        fleet.refresh_revocations(dev)
    assert said == []
    with pytest.raises(TokenRefused) as exc:
        fleet.run_device(dev, patience=1)
    assert "the service refused this device's token (missing, invalid, expired" in str(exc.value)


def _prediction_rows(f: Fleet) -> list[dict]:
    """The predicted-class rows of every drift window the service closed, oldest first."""
    reports = f.admin._get(f"/admin/models/{MODEL}/drift")
    return [r for rep in reports for r in rep["rows"] if r["kind"] == "prediction"]


def _report_after_its_reference(f: Fleet, dev: fleet.Device, wait: float = 10.0) -> None:
    """``dev`` reports on a version only once the service holds its prediction reference (or ``wait`` seconds
    passed): the order a device polling every 0.2-2 s sees in practice, after the coordinator that published
    the version registered it, made certain here, where devices poll every 0.05 s on a loaded machine."""
    real_report = dev.conn.report

    def report(model, *, version, **kw):
        end = time.monotonic() + wait
        while version not in f.state.monitors[MODEL].prediction_references and time.monotonic() < end:
            time.sleep(0.02)
        return real_report(model, version=version, **kw)

    dev.conn.report = report


def test_the_coordinator_registers_each_published_versions_prediction_reference(byo_task, tmp_path) -> None:
    """With a verified model connection the coordinator registers each version it publishes (and, at start, the
    one the training tag serves) with the HTTP simulation's counts: the devices' predicted-class rows are
    tested (a PSI), not "no prediction reference for version N"."""
    from deltaplane.serve.federation import drift_reference, prediction_reference

    cfg = _config(byo_task)
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        for dev in devices:
            _report_after_its_reference(f, dev)
        threads = _threads(devices, rounds=2)
        conn = DeviceClient(f.url, f.admin.issue_token("coordinator"), verifier=f.reg.verifier, tls=f.ctx)
        said: list[str] = []
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=2, deadline=60, poll=0.05, say=said.append,
                               drift_min_samples=1, models=conn)  # fmt: skip
        for t in threads:
            t.join(60)
        versions = [s.version for s in out]
        assert [s.failed for s in out] == [None, None] and said == []
        task = make_task(cfg)
        clients = build_clients(cfg, task)
        spec, _ = drift_reference(task, clients)
        net = task.build_model(derive_seed(cfg.seed, Stream.MODEL_INIT))
        refs = f.state.monitors[MODEL].prediction_references
        assert sorted(refs) == [1, *versions]  # the initial version too: a restarted coordinator's
        for v in [1, *versions]:
            net.load_state_dict(f.reg.load_state(f.reg.get(MODEL, v)))
            assert refs[v] == prediction_reference(spec, net, task, clients)
        rows = _prediction_rows(f)
        assert [r["version"] for r in rows] == versions, rows
        assert all(r["psi"] is not None and "note" not in r for r in rows), rows


def test_a_version_the_coordinator_cannot_verify_is_said_and_its_prediction_row_stays_untested(
    byo_task, tmp_path
) -> None:
    """A connection that trusts another key: every fetch fails verification; the coordinator says so, registers
    nothing of unverified weights, and the rounds publish as before."""
    from deltaplane.registry.signing import Signer

    cfg = _config(byo_task, rounds=1)
    with Fleet(tmp_path, cfg) as f:
        threads = _threads([f.device(i) for i in range(3)], rounds=1)
        other = Signer.generate().verifier()
        conn = DeviceClient(f.url, f.admin.issue_token("coordinator"), verifier=other, tls=f.ctx)
        said: list[str] = []
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=60, poll=0.05, say=said.append,
                               drift_min_samples=1, models=conn)  # fmt: skip
        for t in threads:
            t.join(60)
        assert out[0].failed is None and out[0].version == 2
        assert len(said) == 2 and "fetch version 2" in said[1] and "stays untested" in said[1], said
        assert f.state.monitors[MODEL].prediction_references == {}
        rows = _prediction_rows(f)
        assert [r["psi"] for r in rows] == [None] and "no prediction reference for version 2" in rows[0][
            "note"
        ]


def test_fleet_coordinate_trusted_registers_the_secagg_versions_prediction_references(
    byo_task, tmp_path
) -> None:
    """``fleet coordinate --trusted``, a SecAgg federation: the coordinator verifies each version it publishes
    under the registry's key and registers its prediction reference, so the devices' predicted-class rows are
    tested."""
    (tmp_path / "fleet.yaml").write_text(
        f"task: {{path: '{byo_task}'}}\nclients: {{count: 3}}\nseed: 3\nsecagg: {{enabled: true}}\n"
    )
    cfg = RunConfig.from_yaml(tmp_path / "fleet.yaml")
    with Fleet(tmp_path / "svc", cfg) as f:
        devices = [f.device(i) for i in range(3)]
        for dev in devices:
            _report_after_its_reference(f, dev, wait=30)
        threads = _threads(devices, rounds=2, stage_wait=60)
        done = _cli("fleet", "coordinate", "--url", f.url, "--ca", str(f.tls.ca_cert), "--federation",
                    "fleet.yaml", "--model", MODEL, "--rounds", "2", "--deadline", "60", "--drift-min-samples",
                    "1", "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"),
                    cwd=tmp_path, env=_env(tmp_path), timeout=300)  # fmt: skip
        for t in threads:
            t.join(60)
        assert done.returncode == 0, done.stderr
        assert "round 2/2 (secagg #2): 3/3 devices" in done.stdout and "untested" not in done.stderr
        versions = [int(v) for v in re.findall(r"version (\d+)", done.stdout)]
        assert sorted(f.state.monitors[MODEL].prediction_references) == [1, *versions]
        rows = _prediction_rows(f)
        assert [r["version"] for r in rows] == versions and all(r["psi"] is not None for r in rows), rows


def test_a_device_backs_off_when_the_service_refuses_it_for_its_body_budget() -> None:
    """The service's budget of bodies in flight refuses a request with 503 and Retry-After (a device's own
    limit is a 429). DeviceClient retries it a few times; once those are spent the device loop stopped on it as
    on any 503 ("the operator's to see"), so an attack filling the budget stopped every honest fleet device.
    It now backs off as on a 429, and still stops on a 503 that asks no Retry-After."""
    calls = {"n": 0}
    stop = threading.Event()

    def service(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 3:
            return httpx.Response(503, json={"detail": "budget"}, headers={"Retry-After": "2"})
        stop.set()
        return httpx.Response(200, json={"model": MODEL, "rounds": []})

    http = httpx.Client(base_url="https://service.test", transport=httpx.MockTransport(service))
    waits: list[float] = []
    conn = DeviceClient(
        "https://service.test", "token", verifier=None, client=http, retries=1, sleep=waits.append
    )  # type: ignore[arg-type]
    dev = fleet.Device(conn, MODEL, RunConfig(), None, None, None, None, log=lambda line: None)  # type: ignore[arg-type]
    fleet.run_device(dev, poll=0.01, max_poll=0.02, patience=30, stop=stop)
    assert calls["n"] == 4 and waits == [2.0, 2.0]  # the client's retries, then the loop's back-off
    calls["n"] = 0

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "the registry database is unavailable"})

    conn._http = httpx.Client(base_url="https://service.test", transport=httpx.MockTransport(down))
    with pytest.raises(fleet.ServiceError, match="registry database") as err:
        fleet.run_device(dev, poll=0.01, max_poll=0.02, patience=30, stop=threading.Event())
    assert err.value.status == 503 and err.value.retry_after is None
