"""Secure aggregation over the service's HTTP endpoints: stages, refusals, dropouts, exact sums, no plaintext."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaplane.aggregation.secagg import AdvertiseKeys, RingEncoding
from deltaplane.delta import Delta
from deltaplane.serve import ServiceError
from deltaplane.serve.secagg_client import SecAggDevice

from .conftest import ADMIN, Service, record_bodies


def _deltas(like: dict, n: int, seed: int) -> list[Delta]:
    g = torch.Generator().manual_seed(seed)
    return [Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in like.items()}) for _ in range(n)]


def test_secagg_round_over_http_with_dropouts_at_every_stage(service_factory, plaintext_watch) -> None:
    from fastapi.testclient import TestClient

    # weights below 40: a 16-bit weighted ring carries them (the default max_examples, 100,000, it cannot)
    svc = service_factory(downlink_codec="identity", max_examples=40)
    recorder, bodies = record_bodies(svc.app)
    svc.http = TestClient(recorder)
    svc.admin._http = svc.http
    n = 16  # threshold 11 (> 2/3 of 16): the 4 dropouts before unmasking and 1 after leave 11 answering
    names = [f"dev-{i}" for i in range(n)]
    clients = [svc.device(d) for d in names]
    for c in clients:
        c._http = svc.http
    opened = svc.admin._post(
        "/admin/models/cnn/secagg", {"devices": names, "bits": 16, "clip_range": 0.5, "weight_scale": 20.0}
    )
    rnd = opened["round"]
    assert opened["stage"] == "advertise keys" and opened["config"]["num_clients"] == n
    base = svc.reg.load_state(svc.reg.get("cnn", opened["base_version"]))
    deltas = _deltas(base, n, seed=1)
    weights = [int(w) for w in np.random.default_rng(0).integers(5, 40, n)]
    devices = [
        SecAggDevice(c, "cnn", rnd, randbytes=np.random.default_rng(100 + i).bytes)
        for i, c in enumerate(clients)
    ]
    enc = RingEncoding(bits=16, clip_range=0.5, weight_scale=20.0)
    codes = {}
    for i, dev in enumerate(devices):
        codes[i] = enc.encode(deltas[i], weights[i], np.random.default_rng(i))  # what the device computes
        dev.set_update(deltas[i], weights[i], np.random.default_rng(i))
        plaintext_watch.add_codes(codes[i], bits=16, ring_bits=dev.config.ring_bits, label=f"device {i}")
        plaintext_watch.add_floats(deltas[i].flatten(), label=f"device {i} update")

    # out of order: a masked input before keys are even shared
    with pytest.raises(ServiceError) as exc:
        devices[0].client.request("POST", f"/v1/models/cnn/secagg/{rnd}/masked", content=b"DPSA" + b"\0" * 20)
    assert exc.value.status == 400  # not a valid MaskedInput for this round: strict decoding first
    # stage 0: device 0 never answers
    for dev in devices[1:]:
        dev.advertise()
    with pytest.raises(ServiceError) as exc:
        devices[1].advertise()
    assert exc.value.status == 409 and "already advertised" in exc.value.detail
    with pytest.raises(ServiceError) as exc:
        devices[1].share()  # the roster is not closed yet
    assert exc.value.status == 409
    svc.admin.advance_secagg("cnn", rnd)
    with pytest.raises(ServiceError) as exc:
        devices[0].advertise()  # too late
    assert exc.value.status == 409 and "too late" in exc.value.detail
    # stage 1: device 1 vanishes after advertising
    for dev in devices[2:]:
        dev.share()
    svc.admin.advance_secagg("cnn", rnd)
    # stage 2: device 2 vanishes after sharing, device 3 uploads late, devices 4+ upload
    for dev in devices[4:]:
        dev.upload()
    late = devices[3].endpoint.masked_input(devices[3].get("inbox"))
    status = svc.admin.advance_secagg("cnn", rnd)
    assert status["survivors"] == list(range(4, n)) and status["dropped"] == [2, 3]
    with pytest.raises(ServiceError) as exc:
        devices[3].post("masked", late)
    assert exc.value.status == 409 and "too late" in exc.value.detail
    # stage 3: the last device uploaded but vanishes before unmasking (it stays in the sum)
    for dev in devices[4 : n - 1]:
        dev.unmask()
    # nothing the service holds carries a device's plaintext (closing then drops the round's state)
    assert plaintext_watch.check_object(svc.app.state.secagg_rounds, "secagg rounds") > 20
    closed = svc.admin.close_secagg("cnn", rnd)
    survivors = list(range(4, n))
    assert closed["survivors"] == survivors
    # exact in the integer domain: the unmasked sum is the survivors' codes summed
    total = sum(codes[u].astype(np.uint64) for u in survivors)
    import hashlib

    assert closed["published"]["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
    assert closed["published"]["total_weight"] == sum(weights[u] for u in survivors)
    # the published model is the base plus the mean decoded from that exact sum
    like = Delta.zeros_like(base)
    mean, _ = enc.decode_sum(total, count=len(survivors), like=like)
    published = svc.reg.load_state(svc.reg.get("cnn", closed["published"]["version"]))
    expected = mean.apply(base)
    assert all(torch.equal(published[k], expected[k]) for k in base)
    # ...which is the survivors' example-weighted FedAvg up to quantization
    ref = sum(weights[u] * deltas[u].flatten().double() for u in survivors) / sum(
        weights[u] for u in survivors
    )
    assert (mean.flatten().double() - ref).abs().max() < 1e-3

    # no byte the service received, and nothing it holds, carries a device's plaintext
    assert sum(1 for p, _ in bodies if "/secagg/" in p) >= 30
    for path, body in bodies:
        plaintext_watch.check_bytes(body, path)
    plaintext_watch.check_object(svc.app.state.deltaplane, "service state")


def test_secagg_endpoints_refuse_strangers_oversized_and_bad_rounds(service) -> None:
    names = ["a", "b", "c"]
    for d in names:
        service.device(d)
    opened = service.admin._post("/admin/models/cnn/secagg", {"devices": names, "weight_scale": 0})
    rnd = opened["round"]
    stranger = service.device("mallory")
    with pytest.raises(ServiceError) as exc:
        stranger.request("GET", f"/v1/models/cnn/secagg/{rnd}")
    assert exc.value.status == 403
    a = SecAggDevice(service.device("a"), "cnn", rnd)
    with pytest.raises(ServiceError) as exc:
        a.client.request("POST", f"/v1/models/cnn/secagg/{rnd}/keys", content=b"x" * 10_000)
    assert exc.value.status == 413
    # a message signed as another client, and a message for another round
    b_keys = SecAggDevice(service.device("b"), "cnn", rnd).endpoint.advertise()
    with pytest.raises(ServiceError) as exc:
        a.client.request("POST", f"/v1/models/cnn/secagg/{rnd}/keys", content=b_keys)
    assert exc.value.status == 409 and "signed as client 1" in exc.value.detail
    other = AdvertiseKeys(rnd + 1, 0, b"\1" * 32, b"\2" * 32).to_bytes()
    with pytest.raises(ServiceError) as exc:
        a.client.request("POST", f"/v1/models/cnn/secagg/{rnd}/keys", content=other)
    assert exc.value.status == 409 and f"round {rnd + 1}" in exc.value.detail
    with pytest.raises(ServiceError) as exc:
        a.client.request("POST", f"/v1/models/cnn/secagg/{rnd}/shares", content=a.endpoint.advertise())
    assert exc.value.status == 400 and "takes a ShareKeys" in exc.value.detail
    with pytest.raises(ServiceError) as exc:
        a.client.request("GET", f"/v1/models/cnn/secagg/{rnd + 5}")
    assert exc.value.status == 404
    with pytest.raises(ServiceError) as exc:
        service.admin.close_secagg("cnn", rnd)
    assert exc.value.status == 409
    with pytest.raises(ServiceError) as exc:
        service.admin._post("/admin/models/cnn/secagg", {"devices": ["a", "a"]})
    assert exc.value.status == 422
    with pytest.raises(ServiceError) as exc:  # too few advertised to close the stage
        service.admin.advance_secagg("cnn", rnd)
    assert exc.value.status == 422 and "threshold" in exc.value.detail


def test_transport_http_secagg_reproduces_the_in_process_run_exactly() -> None:
    """`deltaplane run --transport http --secagg`: SecAgg over the service's endpoints, bit-identical."""
    from deltaplane.serve.federation import run_http_simulation
    from deltaplane.sim import RunConfig, run_simulation

    cfg = RunConfig(
        clients=4, rounds=2, local_epochs=1, secagg=True, clip="2.0", codec="topk(0.1) | quant(bits=8)"
    )
    http = run_http_simulation(cfg)
    local = run_simulation(cfg)
    assert [r.test_accuracy for r in http.rounds] == [r.test_accuracy for r in local.rounds]
    assert [r.uplink_bytes for r in http.rounds] == [r.uplink_bytes for r in local.rounds]
    for k, v in local.final_state.items():
        assert torch.equal(http.final_state[k], v), k
    assert http.transport["uploads_accepted"] == 0  # no plain upload endpoint was used: only SecAgg messages


def _secagg_round_to_unmasking(
    svc, names: list[str], seed: int, updates: list[Delta] | None = None, *, min_inputs: int | None = None
) -> int:
    """Open a SecAgg round for ``names`` and walk every stage up to unmasking (every device answers), each
    masking its one of ``updates`` (default: seeded ones); ``min_inputs``: the devices' own m_min."""
    clients = {d: svc.device(d) for d in names}
    rnd = svc.admin.open_secagg("cnn", names, weight_scale=0)["round"]  # unweighted: every weight is 1
    floor = {} if min_inputs is None else {"min_inputs": min_inputs}
    devs = [SecAggDevice(clients[d], "cnn", rnd, **floor) for d in names]
    deltas = _deltas(svc.reg.load_state("cnn@1"), len(names), seed) if updates is None else updates
    for i, (dev, delta) in enumerate(zip(devs, deltas, strict=True)):
        dev.set_update(delta, 1, np.random.default_rng([seed, i]))
    for stage in ("advertise", "share", "upload", "unmask"):
        for dev in devs:
            getattr(dev, stage)()
        if stage != "unmask":
            svc.admin.advance_secagg("cnn", rnd)
    return rnd


def test_secagg_messages_above_the_json_cap_pass_the_guard(service_factory) -> None:
    """A masked input holds a ring value per parameter: above max_json_bytes for a large model. The request
    guard capped SecAgg messages at max_json_bytes (2 MiB by default, ~1M parameters), so every device of
    such a round got 413 although the endpoint's own cap allowed it; they are capped like uploads now."""
    from deltaplane.aggregation.secagg import MaskedInput

    svc = service_factory(max_json_bytes=1024, downlink_codec="identity")  # the cnn's masked input: ~15 kB
    rnd = _secagg_round_to_unmasking(svc, ["a", "b", "c"], seed=5)
    cfg = svc.app.state.secagg_rounds[("cnn", rnd)].config
    assert MaskedInput.max_bytes(cfg) > 1024
    assert svc.admin.close_secagg("cnn", rnd)["published"]["version"] == 2


def test_a_secagg_round_whose_messages_exceed_the_upload_cap_is_not_opened(service_factory) -> None:
    svc = service_factory(max_upload_bytes=1024)  # below the cnn's masked input
    for d in ("a", "b", "c"):
        svc.device(d)
    with pytest.raises(ServiceError) as exc:
        svc.admin.open_secagg("cnn", ["a", "b", "c"], weight_scale=0)
    assert exc.value.status == 422 and "--max-upload-bytes" in exc.value.detail


def test_a_secagg_close_that_fails_late_leaves_nothing_and_can_be_retried(tmp_path, monkeypatch) -> None:
    """Closing a SecAgg round registered the version, moved the tag and stored the step's state in separate
    transactions: a failure in the last one left a published version and a moved tag, and the round could not
    be closed again (its protocol had ended)."""
    from deltaplane.serve.rounds_store import RoundStore

    from .conftest import Service

    names = ["a", "b", "c"]
    control, svc = Service(tmp_path / "control"), Service(tmp_path / "failing")
    control_closed = control.admin.close_secagg("cnn", _secagg_round_to_unmasking(control, names, 3))
    rnd = _secagg_round_to_unmasking(svc, names, 3)
    real = RoundStore.save_step

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")  # the last step: the server step's stored state

    monkeypatch.setattr(RoundStore, "save_step", disk_full)
    with pytest.raises(OSError):
        svc.admin.close_secagg("cnn", rnd)
    assert [v.number for v in svc.reg.versions("cnn")] == [1]  # no version, no delta
    assert svc.reg.tags("cnn") == {"production": 1}  # tag unchanged
    assert svc.admin._get(f"/admin/models/cnn/secagg/{rnd}")["published"] is None  # still open
    monkeypatch.setattr(RoundStore, "save_step", real)
    closed = svc.admin.close_secagg("cnn", rnd)  # closable after, and as if nothing had failed
    assert closed["published"]["version"] == control_closed["published"]["version"] == 2
    assert svc.reg.tags("cnn")["training"] == 2
    assert svc.reg.get("cnn", 2).sha256 == control.reg.get("cnn", 2).sha256
    assert closed["published"]["sum_sha256"] == control_closed["published"]["sum_sha256"]


def _tamper_weight_slot(dev: SecAggDevice, shift: int) -> None:
    """Make ``dev`` malicious: it adds ``shift`` (mod the ring) to its masked weight slot. Masks cannot stop a
    device from editing its own input, so the unmasked weight sum moves by ``shift``."""
    from deltaplane.aggregation.secagg import MaskedInput
    from deltaplane.aggregation.secagg.ring import pack, unpack

    cfg, real = dev.config, dev.endpoint.masked_input
    k = cfg.ring_bits

    def tampered(inbox):
        m = MaskedInput.from_bytes(real(inbox), cfg)
        y = unpack(m.packed, k, cfg.vector_size).astype(np.int64)
        y[-1] = (y[-1] + shift) % (1 << k)
        return MaskedInput(cfg.round_id, m.client_id, pack(y.astype(np.uint32), k)).to_bytes()

    dev.endpoint.masked_input = tampered


@pytest.mark.parametrize("weight_sum", [0, 1])
def test_a_malicious_device_wrapping_the_weight_sum_gets_the_close_refused(
    service_factory, weight_sum
) -> None:
    """One device wrapped its weight slot: a weight sum of 0 made close answer 500 on every retry (a bare
    ZeroDivisionError), a sum of 1 published a mean ~4x too large. Now the out-of-range sum is refused (409)."""
    service = service_factory(max_examples=1)  # every device weighs 1: the default 16-bit ring carries it
    names = ["a", "b", "c", "d"]
    clients = {d: service.device(d) for d in names}
    rnd = service.admin.open_secagg("cnn", names, weight_scale=1.0)["round"]
    devs = [SecAggDevice(clients[d], "cnn", rnd) for d in names]
    for i, (dev, delta) in enumerate(zip(devs, _deltas(service.reg.load_state("cnn@1"), 4, 5), strict=True)):
        dev.set_update(delta, 1, np.random.default_rng(i))
    _tamper_weight_slot(devs[3], weight_sum - 4)  # four honest weights of 1 -> the sum becomes weight_sum
    for stage in ("advertise", "share", "upload", "unmask"):
        for dev in devs:
            getattr(dev, stage)()
        if stage != "unmask":
            service.admin.advance_secagg("cnn", rnd)
    for _ in range(2):  # a retry is refused the same way, never a 500
        with pytest.raises(ServiceError) as err:
            service.admin.close_secagg("cnn", rnd)
        assert err.value.status == 409 and f"weight sum is {weight_sum}" in err.value.detail
    assert [v.number for v in service.reg.versions("cnn")] == [1]  # nothing published


def test_a_secagg_mean_above_the_update_norm_guard_is_not_published(service) -> None:
    """The service refuses plain uploads far larger than the model (max_update_norm_ratio); a SecAgg round's
    mean skipped that guard, so in-range but huge inputs were published. Now close refuses it (422)."""
    names = ["a", "b", "c"]
    clients = {d: service.device(d) for d in names}
    rnd = service.admin.open_secagg("cnn", names, weight_scale=0, clip_range=100.0)["round"]
    devs = [SecAggDevice(clients[d], "cnn", rnd) for d in names]
    base = service.reg.load_state("cnn@1")
    for i, dev in enumerate(devs):
        dev.set_update(
            Delta({k: torch.full_like(v, 90.0) for k, v in base.items()}), 1, np.random.default_rng(i)
        )
    for stage in ("advertise", "share", "upload", "unmask"):
        for dev in devs:
            getattr(dev, stage)()
        if stage != "unmask":
            service.admin.advance_secagg("cnn", rnd)
    with pytest.raises(ServiceError) as err:
        service.admin.close_secagg("cnn", rnd)
    assert err.value.status == 422 and "norm" in err.value.detail
    assert [v.number for v in service.reg.versions("cnn")] == [1]


class _Invitation:
    """A device connection whose server sends a chosen SecAgg invitation (a server that picks the parameters)."""

    def __init__(self, config: dict) -> None:
        self.doc = {
            "base_version": 1,
            "client_id": 0,
            "config": config,
            "encoding": {"bits": 8, "clip_range": 1.0, "weight_scale": 0.0},
            "secagg_version": 5,
        }

    def request(self, method: str, path: str, **kwargs):
        return self

    def json(self) -> dict:
        return self.doc


@pytest.mark.parametrize(
    ("neighbours", "threshold", "named"),
    [(2, 2, "neighbours=2"), (12, 8, "threshold=8"), (None, 26, "threshold=26")],
)
def test_a_device_refuses_an_invitation_that_lets_the_server_unmask_it(neighbours, threshold, named) -> None:
    """Devices accepted any valid degree and threshold the server sent: with 50 devices, degree 2 and threshold
    2 the server seats two colluders as a device's only neighbours and recovers its input. Now the device
    refuses (SecAggError naming the parameter) a group below 2⌈log₂ n⌉ + 1 or a threshold ≤ 2/3 of it."""
    from deltaplane.aggregation.secagg import SecAggConfig, SecAggError

    cfg = SecAggConfig(num_clients=50, threshold=threshold, bits=8, vector_size=4, neighbours=neighbours)
    with pytest.raises(SecAggError, match=named):
        SecAggDevice(_Invitation(cfg.to_dict()), "cnn", 1)
    safe = SecAggConfig(num_clients=50, threshold=9, bits=8, vector_size=4, neighbours=12)  # group 13
    assert SecAggDevice(_Invitation(safe.to_dict()), "cnn", 1).config == safe


@pytest.mark.parametrize(
    "spoil",
    [
        lambda doc: doc.pop("config"),
        lambda doc: doc["encoding"].update(bits="eight"),
        lambda doc: doc.update(encoding=None),
        lambda doc: doc.update(client_id=[0]),
    ],
    ids=["no config", "bits not a number", "encoding null", "client id a list"],
)
def test_a_malformed_invitation_is_a_decode_error(spoil) -> None:
    """A server (or proxy) sending JSON that is no invitation made SecAggDevice raise a bare KeyError,
    ValueError or TypeError; it is a DecodeError naming the invitation now."""
    from deltaplane.aggregation.secagg import SecAggConfig
    from deltaplane.errors import DecodeError

    invitation = _Invitation(SecAggConfig(num_clients=3, threshold=3, bits=8, vector_size=4).to_dict())
    spoil(invitation.doc)
    with pytest.raises(DecodeError, match="invitation .* is malformed"):
        SecAggDevice(invitation, "cnn", 1)


def test_the_service_opens_only_rounds_its_devices_accept(service) -> None:
    """Open defaults to a threshold devices accept, and refuses (422) a degree or threshold they would not."""
    names = [f"d{i}" for i in range(16)]
    for d in names:
        service.device(d)
    opened = service.admin.open_secagg("cnn", names, weight_scale=0)
    assert opened["config"]["threshold"] == 11  # > 2/3 of 16
    for bad, named in (({"neighbours": 2}, "neighbours=2"), ({"threshold": 9}, "threshold=9")):
        with pytest.raises(ServiceError) as err:
            service.admin.open_secagg("cnn", names, weight_scale=0, **bad)
        assert err.value.status == 422 and named in err.value.detail


def test_secagg_rounds_keep_consent_like_plain_rounds(service) -> None:
    """A SecAgg round published a version without the cohorts of its devices (a later withdrawal did not reach
    it), took devices of a withdrawn cohort and trained on a base built from one; each now as plain rounds."""
    svc, cohort = service, {"a": "eu", "b": "eu", "c": "us", "d": "us", "e": "us"}
    clients = {d: svc.device(d, cohort[d]) for d in cohort}

    def walk(names: list[str], *, withdraw_after_upload: str | None = None) -> int:
        rnd = svc.admin.open_secagg("cnn", names, weight_scale=0)["round"]
        devs = [SecAggDevice(clients[d], "cnn", rnd) for d in names]
        for i, (dev, delta) in enumerate(
            zip(devs, _deltas(svc.reg.load_state("cnn@1"), len(names), 5), strict=True)
        ):
            dev.set_update(delta, 1, np.random.default_rng([5, i]))
        for stage in ("advertise", "share", "upload", "unmask"):
            for name, dev in zip(names, devs, strict=True):
                try:
                    getattr(dev, stage)()
                except ServiceError as exc:  # from the withdrawal on, its devices take no part
                    assert exc.status == 403 and cohort[name] == withdraw_after_upload
            if stage == "upload" and withdraw_after_upload:
                svc.reg.withdraw_cohort(withdraw_after_upload, reason="test")
            if stage != "unmask":
                svc.admin.advance_secagg("cnn", rnd)
        return rnd

    closed = svc.admin.close_secagg("cnn", walk(["a", "c", "d"]))
    v2 = svc.reg.get("cnn", closed["published"]["version"])
    assert set(v2.governance.cohorts) >= {"eu", "us"}
    assert v2.lineage["round_cohorts"] == ["eu", "us"]

    # a cohort withdrawing while its device's input is in the sum: the round is never published
    before = [v.number for v in svc.reg.versions("cnn")]
    with pytest.raises(ServiceError, match="withdrew consent after") as info:
        svc.admin.close_secagg("cnn", walk(["b", "c", "d", "e"], withdraw_after_upload="eu"))
    assert info.value.status == 409 and [v.number for v in svc.reg.versions("cnn")] == before

    # version 2 holds eu's data: no round trains on it; a device of eu takes no part in a round on version 1
    with pytest.raises(ServiceError, match="withdrawn cohort 'eu'") as info:
        svc.admin.open_secagg("cnn", ["c", "d"], weight_scale=0, base_version=2)
    assert info.value.status == 409
    rnd = svc.admin.open_secagg("cnn", ["a", "c", "d"], weight_scale=0, base_version=1)["round"]
    with pytest.raises(ServiceError, match="withdrew consent") as info:
        SecAggDevice(clients["a"], "cnn", rnd).advertise()
    assert info.value.status == 403


def test_a_secagg_round_whose_base_cohort_withdraws_before_the_close_is_not_published(service) -> None:
    """The close checked the cohorts of the devices in the sum, not the base's: a round opened on a version
    built from a cohort that then withdrew published a version of its data (and moved the training tag)."""
    svc = service
    v2 = svc.reg.register_model("cnn", svc.reg.load_state("cnn@1"), parent=1, governance={"cohorts": ["eu"]})
    svc.reg.set_tag("cnn", "training", v2.number)
    rnd = _secagg_round_to_unmasking(svc, ["a", "b", "c"], seed=7)
    assert svc.admin._get(f"/admin/models/cnn/secagg/{rnd}")["base_version"] == v2.number
    svc.reg.withdraw_cohort("eu")
    with pytest.raises(ServiceError, match="withdrawn cohort 'eu'") as info:
        svc.admin.close_secagg("cnn", rnd)
    assert info.value.status == 409 and "abort" in info.value.detail
    assert len(svc.reg.versions("cnn")) == 2 and svc.reg.tags("cnn")["training"] == v2.number


def test_a_secagg_message_waiting_for_its_round_does_not_stall_the_service(service) -> None:
    """A SecAgg POST ran its protocol step on the event loop under the round's lock: while an admin close
    held that lock (unmasking takes seconds on a large model) one device's message blocked every request of
    the service, /healthz included. The step runs in a worker thread now."""
    import threading
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    names = ["a", "b", "c"]
    clients = {d: service.device(d) for d in names}
    rnd = service.admin.open_secagg("cnn", names, weight_scale=0)["round"]
    r = service.app.state.secagg_rounds[("cnn", rnd)]
    with BackgroundServer(service.app) as srv:
        for c in clients.values():
            c._http = httpx.Client(base_url=srv.url, timeout=30)
        a = SecAggDevice(clients["a"], "cnn", rnd)
        body = a.endpoint.advertise()
        with r.lock:  # as a long unmasking close holds it
            sender = threading.Thread(target=a.post, args=("keys", body))
            sender.start()
            time.sleep(0.3)  # the message is waiting for the lock
            assert httpx.get(f"{srv.url}/healthz", timeout=3).status_code == 200
        sender.join(10)
    assert service.admin._get(f"/admin/models/cnn/secagg/{rnd}")["advertised"] == 1


def _walk(svc, names: list[str], *, stages=("advertise", "share", "upload", "unmask")) -> tuple[int, list]:
    """Open a SecAgg round for ``names`` and run it through ``stages``, advancing after each but the last."""
    clients = [svc.device(d) for d in names]
    rnd = svc.admin.open_secagg("cnn", names, weight_scale=0)["round"]
    devs = [SecAggDevice(c, "cnn", rnd) for c in clients]
    for i, (dev, delta) in enumerate(
        zip(devs, _deltas(svc.reg.load_state("cnn@1"), len(names), 3), strict=True)
    ):
        dev.set_update(delta, 1, np.random.default_rng([3, i]))
    for stage in stages:
        for dev in devs:
            getattr(dev, stage)()
        if stage != "unmask":
            svc.admin.advance_secagg("cnn", rnd)
    return rnd, devs


def test_a_finished_secagg_round_releases_its_state(service, monkeypatch) -> None:
    """Every SecAgg round's protocol state (keys, shares, each device's model-sized masked input) stayed in
    memory for as long as the process ran, published or not. Publishing or aborting a round now drops it;
    what later requests need is kept (a late device message gets 409, the admin status still answers), for
    the last FINISHED_KEPT rounds only."""
    import gc
    import weakref

    from deltaplane.serve import secagg_routes

    monkeypatch.setattr(secagg_routes, "FINISHED_KEPT", 2, raising=False)
    names = ["a", "b", "c"]
    rnd, devs = _walk(service, names)
    first = devs[0]
    held = weakref.ref(service.app.state.secagg_rounds[("cnn", rnd)].endpoint)
    closed = service.admin.close_secagg("cnn", rnd)
    gc.collect()
    assert held() is None, "the published round's protocol state is still held"
    assert closed["finished"] == "published" and closed["survivors"] == [0, 1, 2]
    with pytest.raises(ServiceError) as exc:
        devs[0].get("unmask")  # a device that missed the close
    assert exc.value.status == 409 and "published as version" in exc.value.detail
    with pytest.raises(ServiceError) as exc:
        service.admin.close_secagg("cnn", rnd)
    assert exc.value.status == 409
    assert service.admin._get(f"/admin/models/cnn/secagg/{rnd}") == closed

    # a round given up (here: stuck at share keys) is dropped by abort, and refuses everything after
    stuck, devs = _walk(service, names, stages=("advertise",))
    held = weakref.ref(service.app.state.secagg_rounds[("cnn", stuck)].endpoint)
    assert service.admin.abort_secagg("cnn", stuck)["finished"] == "aborted"
    gc.collect()
    assert held() is None, "the aborted round's protocol state is still held"
    for call in (lambda: devs[1].share(), lambda: service.admin.close_secagg("cnn", stuck)):
        with pytest.raises(ServiceError) as exc:
            call()
        assert exc.value.status == 409 and "aborted" in exc.value.detail

    # only the last FINISHED_KEPT finished rounds keep their full status; older ones answer from the store
    # (their outcome, version and close measurements), and still refuse messages with 409
    third, _ = _walk(service, names, stages=())
    service.admin.abort_secagg("cnn", third)
    old = service.admin._get(f"/admin/models/cnn/secagg/{rnd}")
    assert old["finished"] == "published" and old["published"] == {
        "version": closed["published"]["version"],
        "measurements": closed["published"]["measurements"],
        "dp_adjacency": closed["published"]["dp_adjacency"],  # None: no DP, no ε to qualify
    }
    with pytest.raises(ServiceError) as exc:
        first.get("unmask")
    assert exc.value.status == 409 and "published as version" in exc.value.detail
    assert service.admin._get(f"/admin/models/cnn/secagg/{stuck}")["finished"] == "aborted"


def test_a_secagg_post_does_not_read_consent_on_the_event_loop(service, monkeypatch) -> None:
    """A SecAgg stage POST checked withdrawn cohorts (a signed-log read in the database, which can wait on the
    registry's write lock) on the event loop before handing its work to a worker thread: while that read
    waited, every request of the service did, /healthz included. It runs in a worker thread now."""
    import threading

    import httpx

    from deltaplane.serve import BackgroundServer

    names = ["a", "b", "c"]
    clients = {d: service.device(d) for d in names}
    rnd = service.admin.open_secagg("cnn", names, weight_scale=0)["round"]
    reg = service.app.state.deltaplane.registry
    with BackgroundServer(service.app) as srv:
        for c in clients.values():
            c._http = httpx.Client(base_url=srv.url, timeout=30)
        a = SecAggDevice(clients["a"], "cnn", rnd)
        body = a.endpoint.advertise()
        reading, release = threading.Event(), threading.Event()
        real = reg.withdrawn_cohorts

        def slow_read(*args, **kwargs):  # as a read waiting on a busy database
            reading.set()
            release.wait(10)
            return real(*args, **kwargs)

        monkeypatch.setattr(reg, "withdrawn_cohorts", slow_read)
        sender = threading.Thread(target=a.post, args=("keys", body))
        sender.start()
        try:
            assert reading.wait(10)
            assert httpx.get(f"{srv.url}/healthz", timeout=3).status_code == 200
        finally:
            release.set()
            sender.join(15)


def test_a_device_advertising_a_low_order_key_gets_400_and_the_round_goes_on(service) -> None:
    """A low-order X25519 key (here all zeros) was accepted (202); every honest neighbour's masking then failed
    with a bare ValueError, so one device knocked its whole neighbourhood out of the round. Now the
    advertisement is refused (400), nothing is stored, and the device may still send real keys."""
    names = ["a", "b", "c"]
    for d in names:
        service.device(d)
    rnd = service.admin._post("/admin/models/cnn/secagg", {"devices": names, "weight_scale": 0})["round"]
    a = SecAggDevice(service.device("a"), "cnn", rnd)
    real = AdvertiseKeys.from_bytes(a.endpoint.advertise(), a.config)
    for c, s in [(bytes(32), real.s_public), (real.c_public, bytes(32))]:
        with pytest.raises(ServiceError) as exc:
            a.post("keys", AdvertiseKeys(rnd, a.client_id, c, s).to_bytes())
        assert exc.value.status == 400 and "low-order" in exc.value.detail
    assert service.admin._get(f"/admin/models/cnn/secagg/{rnd}")["advertised"] == 0
    a.advertise()
    assert service.admin._get(f"/admin/models/cnn/secagg/{rnd}")["advertised"] == 1


def test_secagg_round_numbers_continue_after_a_restart_and_an_open_round_is_lost(service) -> None:
    """SecAgg round numbers were counted in memory: after a restart the same model's rounds were numbered 1,
    2, ... again, so two different rounds shared the round id that binds every key and AAD (and names the
    round in lineage and logs). They now continue from the store; a round open when the service stopped is
    recorded lost, and its devices get a clear 409 (RoundLost), never a 500 or a round resurrected."""
    from fastapi.testclient import TestClient

    from deltaplane.serve import AdminClient, create_app

    names = ["a", "b", "c"]
    published, _ = _walk(service, names)
    closed = service.admin.close_secagg("cnn", published)["published"]
    version = closed["version"]
    assert service.reg.get("cnn", version).lineage["secagg_round"] == published
    stuck, devs = _walk(service, names, stages=("advertise", "share"))  # open, at masked inputs
    # a restart: a new app over the same home, nothing shared in memory
    service.reg.close()
    service.app = create_app(service.config)
    service.http = TestClient(service.app)
    service.admin = AdminClient("http://testserver", "admin-token-0123456789", client=service.http)
    for dev in devs:
        dev.client._http = service.http  # the same devices, their tokens still valid
    status = service.admin._get(f"/admin/models/cnn/secagg/{stuck}")
    assert status["finished"] == "lost" and status["published"] is None
    for call in (
        devs[0].upload,
        lambda: devs[1].get("inbox"),
        lambda: service.admin.advance_secagg("cnn", stuck),
    ):
        with pytest.raises(ServiceError) as exc:
            call()
        assert exc.value.status == 409 and exc.value.error == "RoundLost", exc.value
        assert "lost" in exc.value.detail and "next round" in exc.value.detail
    with pytest.raises(ServiceError) as exc:
        service.admin.abort_secagg("cnn", stuck)
    assert exc.value.status == 409
    assert devs[0].client.open_rounds("cnn") == []  # not offered to anyone
    assert service.admin._get(f"/admin/models/cnn/secagg/{published}")["published"] == {
        "version": version,
        "measurements": closed["measurements"],  # kept in the store: after the restart too
        "dp_adjacency": None,  # no DP: no ε to qualify
    }
    again, _ = _walk(service, names, stages=("advertise",))
    assert again == stuck + 1  # never a number an earlier round had
    cfg = service.app.state.secagg_rounds[("cnn", again)].config
    assert cfg.round_id == again
    with pytest.raises(ServiceError) as exc:
        service.admin._get(f"/admin/models/cnn/secagg/{again + 1}")
    assert exc.value.status == 404  # one that never existed


def test_secagg_numbers_of_a_store_from_before_continue_past_its_published_rounds(service) -> None:
    """A store from before SecAgg numbers were recorded has none; its published versions' lineage says how far
    its rounds got, so the first round after the upgrade does not reuse a published round's number."""
    from fastapi.testclient import TestClient

    from deltaplane.serve import AdminClient, create_app

    names = ["a", "b", "c"]
    for _ in range(2):
        rnd, _devs = _walk(service, names)
        service.admin.close_secagg("cnn", rnd)
    with service.reg.transaction() as con:
        con.execute("DROP TABLE IF EXISTS secagg_rounds")  # as the store was before
    service.reg.close()
    service.app = create_app(service.config)
    service.http = TestClient(service.app)
    service.admin = AdminClient("http://testserver", "admin-token-0123456789", client=service.http)
    assert service.admin.open_secagg("cnn", names, weight_scale=0)["round"] == rnd + 1


def test_a_distributed_dp_federation_refuses_a_ring_range_that_would_clip_the_noised_values(
    service_factory,
) -> None:
    """Distributed DP (z 2, clip 1, m_min 2: σ_d ≈ 1.41): the ring's range clip acts on each device's noised
    values before the sum, so the service refuses (422) a round opened with a range below clip + 6σ_d = 9.49,
    naming it, and opens one with the federation's own range, which RunConfig sized so."""
    from deltaplane.engine import RunConfig

    run = RunConfig(clients=4, secagg=True, clip="1.0", dp_noise=2.0, dp_delta=1e-3, secagg_min_contributors=2,
                    downlink_codec="identity")  # fmt: skip
    svc = service_factory(federation=run)
    names = ["a", "b", "c"]
    for d in names:
        svc.device(d)
    with pytest.raises(ServiceError) as refused:
        svc.admin.open_secagg("cnn", names, weight_scale=0, clip_range=8.0)
    assert refused.value.status == 422 and "at least clip + 6·σ_d = 9.49" in refused.value.detail
    opened = svc.admin.open_secagg("cnn", names, weight_scale=0)
    invitation = svc.device("a").request("GET", f"/v1/models/cnn/secagg/{opened['round']}").json()
    assert invitation["encoding"]["clip_range"] == run.secagg_range == 9.49


def test_simulated_devices_refuse_a_ring_narrower_than_their_own_minimum_and_the_run_goes_on(
    monkeypatch, caplog
) -> None:
    """`deltaplane run --transport http` under distributed DP (z 2, clip 1, m_min 2: each device's own least
    ring range is clip + 6σ_d = 9.49) against a service that breaks the rules: its ring-range check is off
    and it opens round 1 with the old default range 8, which clips the noised values. Each simulated device
    refused the invitation with a SecAggRangeError that escaped the simulation and ended the run (the round left
    open on the service); before the device-side check it took the ring. Now each device sits the round out
    (one log line naming both numbers, nothing sent), the service's round is aborted and the round closes with
    no sum, as a round that sampled too few devices (ε still spent); round 2, honest, publishes."""
    import logging

    from deltaplane.aggregation.dp import DistributedDP
    from deltaplane.engine import RunConfig
    from deltaplane.serve.client import AdminClient
    from deltaplane.serve.federation import run_http_simulation

    cfg = RunConfig(clients=4, rounds=2, local_epochs=1, secagg=True, clip="1.0", dp_noise=2.0, dp_delta=1e-3,
                    secagg_min_contributors=2, dp_noise_source="seeded", seed=2)  # fmt: skip
    assert cfg.secagg_range == 9.49  # what the honest run opens its rounds with
    # a service that breaks the rules: its own check of the ring range is off
    monkeypatch.setattr(DistributedDP, "check_ring_range", lambda self, clip_range: None)
    real_open, opened = AdminClient.open_secagg, []

    def narrow_first(self, model, devices, **params):
        out = real_open(self, model, devices, **(params | ({"clip_range": 8.0} if not opened else {})))
        opened.append(int(out["round"]))
        return out

    monkeypatch.setattr(AdminClient, "open_secagg", narrow_first)
    real_post, posted = SecAggDevice.post, []

    def watched_post(self, what, body):  # every SecAgg message a simulated device sends
        posted.append(self.round_id)
        return real_post(self, what, body)

    monkeypatch.setattr(SecAggDevice, "post", watched_post)
    with caplog.at_level(logging.WARNING, logger="deltaplane.serve.federation"):
        result = run_http_simulation(cfg)
    bad, good = opened
    assert bad not in posted and posted.count(good) == 4 * 4  # four devices, four stages
    refusals = [r.getMessage() for r in caplog.records if f"SecAgg round {bad}: device" in r.getMessage()]
    assert len(refusals) == 4 and all("ring range is 8, below the 9.49" in r for r in refusals), refusals
    assert [r.round for r in result.rounds] == [1, 2]
    assert 0 < result.rounds[0].epsilon < result.rounds[1].epsilon  # the refused round spent its ε too
    # the initial model, round 1's version (closed with no sum, as a short round's) and round 2's
    assert result.transport["registry_versions"] == 3 and result.transport["registry_ok"]


def _ddp(z: float, *, clients: int = 3, m_min: int = 3):
    """A distributed-DP federation (clip 1) whose noise is calibrated to ``m_min`` devices."""
    from deltaplane.engine import RunConfig

    return RunConfig(clients=clients, secagg=True, clip="1.0", dp_noise=z, dp_delta=1e-3,
                     secagg_min_contributors=m_min, downlink_codec="identity")  # fmt: skip


def _honest_ddp_updates(run, like: dict, n: int, seed: int) -> list[Delta]:
    """What ``n`` honest devices of ``run`` mask: updates of norm clip, all in one direction (the largest mean a
    clipped round can have), clipped and noised on the device (seeded here, for a reproducible test)."""
    from deltaplane.aggregation.dp import distributed_noise

    g = torch.Generator().manual_seed(seed)
    signal = Delta({k: torch.randn(v.shape, generator=g) for k, v in like.items()})
    signal = signal * (float(run.clip) / float(signal.norm()))
    return [
        distributed_noise(signal, clip=float(run.clip), std=run.device_noise_std(), generator=g)
        for _ in range(n)
    ]


def test_a_distributed_dp_round_whose_honest_noisy_mean_the_guard_refuses_is_not_opened(tmp_path) -> None:
    """Distributed DP on the cnn (6090 parameters, norm 7.76: an operator's guard of 10x is 77.6) with z 3 and
    m_min 3: the mean of 3 devices carries noise of std z·C/3 = 1 per value, norm ≈ 78 + the clipped signal.
    The service opened the round, ran every stage and refused the mean at close (422), every round. Now the
    open is refused (422), naming the ratio to restart with and the threshold to open with, and nothing is
    recorded; both work. (The default guard widens to the honest bound by itself: test_the_docs_fleet_file_...)"""
    from .conftest import Service

    names = ["a", "b", "c", "d"]
    svc = Service(tmp_path / "refused", federation=_ddp(3.0, clients=4), max_update_norm_ratio=10.0)
    for d in names:
        svc.device(d)
    with pytest.raises(ServiceError) as refused:
        svc.admin.open_secagg("cnn", names, weight_scale=0)
    detail = refused.value.detail
    assert refused.value.status == 422 and "distributed DP" in detail and "guard of 77.61" in detail
    assert "--max-update-norm-ratio 11" in detail and "threshold of at least 4" in detail
    assert svc.state.secagg_rounds == {}
    assert svc.admin.open_secagg("cnn", names, weight_scale=0, threshold=4)["round"] == 1  # number not taken
    wider = Service(tmp_path / "wider", federation=_ddp(3.0, clients=4), max_update_norm_ratio=11)
    for d in names:
        wider.device(d)
    assert wider.admin.open_secagg("cnn", names, weight_scale=0)["stage"] == "advertise keys"


def test_a_distributed_dp_round_just_inside_the_guard_opens_and_publishes(tmp_path) -> None:
    """z 2.7 (an operator's guard of 10x admits up to about 2.73 on the cnn with 3 devices): honest devices,
    each adding its own noise, walk every stage and the close publishes the noisy mean, which passes the guard."""
    from deltaplane.aggregation.dp import DistributedDP

    from .conftest import Service

    run = _ddp(2.7)
    svc = Service(tmp_path / "h", federation=run, max_update_norm_ratio=10.0)  # admitted without widening
    closed = _walk_secagg(svc, run, _honest_ddp_updates(run, svc.reg.load_state("cnn@1"), 3, 7), seed=7)
    assert closed["published"]["version"] == 2
    assert closed["published"]["measurements"]["secure_sum_published"] == 1.0
    assert isinstance(svc.state.steps["cnn"].aggregator.find(DistributedDP), DistributedDP)


def test_honest_distributed_dp_means_at_the_largest_z_the_service_admits_pass_its_guard(tmp_path) -> None:
    """The admission check is not too tight: find the largest z the service opens a 3-device round for under
    an operator's guard of 10x (by asking it), then draw 300 honest rounds there as devices and SecAgg make them (each device's own noise,
    stochastic rounding into the ring, the exact sum of the codes, the close's decoding) and put each mean
    through the close's guard: none is refused. (Before, the service admitted any z: at the top of the
    search, z 4, every mean was refused.)"""
    from deltaplane.errors import InvalidUpdate
    from deltaplane.serve.rounds import check_update_norm

    from .conftest import Service, cnn_state

    names = ["a", "b", "c"]

    def admits(z: float) -> bool:
        svc = Service(tmp_path / f"z{z:.6f}", federation=_ddp(z), max_update_norm_ratio=10.0)
        for d in names:
            svc.device(d)
        try:
            svc.admin.open_secagg("cnn", names, weight_scale=0)
        except ServiceError as exc:
            assert exc.status == 422 and "--max-update-norm-ratio" in exc.detail
            return False
        return True

    lo, hi = 1.0, 4.0
    if admits(hi):
        lo = hi
    else:
        for _ in range(7):  # to within 3/128 of the edge
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if admits(mid) else (lo, mid)
    run = _ddp(lo)
    base = cnn_state(0)  # the service's base model
    enc = RingEncoding(bits=run.secagg_bits, clip_range=run.secagg_range, weight_scale=0.0)
    refused = 0
    for seed in range(300):
        updates = _honest_ddp_updates(run, base, 3, seed)
        rng = np.random.default_rng(seed)
        total = sum(enc.encode(u, 1, rng).astype(np.uint64) for u in updates)
        mean, _ = enc.decode_sum(total, count=3, like=Delta.zeros_like(base))
        try:
            check_update_norm(mean, base, 10.0)  # the service's default guard, as its close applies it
        except InvalidUpdate:
            refused += 1
    assert refused == 0, f"{refused} of 300 honest means at z {lo:.3f} refused by the guard"


def _docs_fleet_file_on_digits(tmp_path):
    """docs/fleet.md's federation file (SecAgg, clip 2, dp_noise 0.8, 3 devices) on the built-in ``digits`` task
    instead of the guide's ``mytask``, and the initial model ``fleet init`` registers for it."""
    import re
    from pathlib import Path

    from deltaplane.engine import RunConfig, make_task
    from deltaplane.engine.seeding import Stream, derive_seed

    guide = (Path(__file__).resolve().parents[2] / "docs" / "fleet.md").read_text()
    yaml = next(b for b in re.findall(r"```yaml\n(.*?)```", guide, re.S) if b.startswith("task:"))
    assert 'task: {path: "mytask:make_task"}' in yaml and "dp_noise: 0.8" in yaml
    (tmp_path / "fleet.yaml").write_text(yaml.replace('"mytask:make_task"', "digits"))
    run = RunConfig.from_yaml(tmp_path / "fleet.yaml")
    return run, make_task(run).build_model(derive_seed(run.seed, Stream.MODEL_INIT)).state_dict()


def _walk_secagg(svc, run, updates: list[Delta], *, seed: int = 11) -> dict:
    """Open a SecAgg round of ``svc`` (federation ``run``) for one device per update, walk every stage (each
    device's ring rounding seeded by ``seed`` and its index), close it."""
    names = [f"d{i}" for i in range(len(updates))]
    rnd = _secagg_round_to_unmasking(svc, names, seed, updates, min_inputs=run.unmask_floor())
    return svc.admin.close_secagg("cnn", rnd)


def test_the_docs_fleet_file_on_digits_opens_and_publishes_under_the_default_guard(tmp_path) -> None:
    """docs/fleet.md §1's file on the built-in digits task (18,346 parameters, base norm 5.76: 10x is 57.6).
    The mean of its 3 devices carries noise of std z·C/3 = 0.533 per value, norm ≈ 0.533·√18346 = 72.2, so
    every honest round needs a guard of 77.4 (clip + 0.533·(√d + 6)): the service refused every open (422,
    "restart with --max-update-norm-ratio 14"), on the project's own task. The default guard now widens to
    that bound: the round opens, honest devices publish a mean whose norm is above 10x the base norm."""
    from deltaplane.serve.rounds import _base_norm

    run, initial = _docs_fleet_file_on_digits(tmp_path)
    svc = Service(tmp_path / "h", initial=initial, federation=run)
    closed = _walk_secagg(svc, run, _honest_ddp_updates(run, initial, 3, 5))
    assert closed["published"]["version"] == 2
    published = svc.reg.load_state("cnn@2")
    moved = Delta({k: published[k].double() - v.double() for k, v in initial.items()})
    assert 10 * _base_norm(initial) < float(moved.norm()) < 77.44  # the old guard refused it; the new admits


def test_the_default_guard_still_refuses_an_oversized_secagg_mean_under_distributed_dp(tmp_path) -> None:
    """The widened guard still bounds the mean: on the same federation, one device of three masks an in-range
    update at the ring's edge (each value +range): the mean's norm (365.6) is far above what
    honest noise reaches (77.44), and the close refuses it (422), naming that bound; nothing is published."""
    run, initial = _docs_fleet_file_on_digits(tmp_path)
    svc = Service(tmp_path / "h", initial=initial, federation=run)
    honest = _honest_ddp_updates(run, initial, 2, 5)
    rogue = Delta({k: torch.full_like(v, run.secagg_range) for k, v in initial.items()})
    with pytest.raises(ServiceError) as err:
        _walk_secagg(svc, run, [*honest, rogue])
    assert err.value.status == 422
    assert (
        "update norm 365.6 exceeds 77.44, the norm an honest update reaches with this federation's DP noise"
        in err.value.detail
    )
    assert [v.number for v in svc.reg.versions("cnn")] == [1]


def test_a_models_versions_say_which_kind_of_round_published_them(service) -> None:
    """Plain and SecAgg rounds are numbered each on their own, and a version's lineage ``round`` is its round's
    number: a plain round 1 and a SecAgg round 1 of one model both published ``round: 1``, and nothing told the
    two versions apart. A plain round's version now names it as ``plain_round`` (a SecAgg one as
    ``secagg_round``)."""
    from deltaplane.codecs import Compressor

    base = service.reg.load_state("cnn@1")
    service.admin.open_round("cnn")
    payload = Compressor("identity").compress(_deltas(base, 1, 5)[0], base_id="cnn", base_version=1)
    service.device("p").upload("cnn", 1, payload, num_examples=4)
    plain = service.admin.close_round("cnn", 1)["version"]
    rnd, _ = _walk(service, ["a", "b", "c"])
    secure = service.admin.close_secagg("cnn", rnd)["published"]["version"]
    plain_lineage, secure_lineage = (
        service.reg.get("cnn", plain).lineage,
        service.reg.get("cnn", secure).lineage,
    )
    assert plain_lineage["round"] == secure_lineage["round"] == 1  # the same number, two numberings
    assert plain_lineage["plain_round"] == 1 and "secagg_round" not in plain_lineage
    assert secure_lineage["secagg_round"] == 1 and "plain_round" not in secure_lineage


def test_the_dashboard_counts_a_secagg_rounds_masked_inputs(service) -> None:
    """The fleet page's Uploads table counted plain uploads only: after a SecAgg federation (docs/fleet.md)
    it read "accepted 0" while every device had sent its masked input. It now has a row for those, next to
    the plain uploads, from the service's own counter of accepted masked inputs."""
    from deltaplane.codecs import Compressor

    base = service.reg.load_state("cnn@1")
    service.admin.open_round("cnn")
    payload = Compressor("identity").compress(_deltas(base, 1, 5)[0], base_id="cnn", base_version=1)
    service.device("p").upload("cnn", 1, payload, num_examples=4)
    service.admin.close_round("cnn", 1)
    rnd, _ = _walk(service, ["a", "b", "c"])
    service.admin.close_secagg("cnn", rnd)
    uploads = service.state.fleet_snapshot()["uploads"]
    assert uploads["accepted"] == 1 and uploads["accepted_secagg_masked"] == 3, uploads
    page = service.http.get("/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert 'data-field="uploads.accepted_secagg_masked">3</td>' in page


def _one_plain_round(service) -> int:
    """Plain round 1 of ``cnn``, one device's upload, closed: the version it published."""
    from deltaplane.codecs import Compressor

    base = service.reg.load_state("cnn@1")
    service.admin.open_round("cnn")
    payload = Compressor("identity").compress(_deltas(base, 1, 5)[0], base_id="cnn", base_version=1)
    service.device("p").upload("cnn", 1, payload, num_examples=4)
    return service.admin.close_round("cnn", 1)["version"]


def test_the_fleet_page_shows_what_the_devices_reported_on_each_rounds_version(service) -> None:
    """Every `fleet device` reports its held-out accuracy on the version a round published, and the service
    kept those reports (`state.reports`) but showed them nowhere: a newcomer watching the dashboard (docs/byo.md,
    docs/fleet.md) saw rounds close with an ε but not whether the model learned. The closed rounds now carry
    the reported accuracy (mean and worst, one report per device: its last) of the version each published."""
    version = _one_plain_round(service)
    for device, acc in (("a", 0.9), ("b", 0.5), ("a", 0.7)):  # device a reports twice: its last counts
        service.device(device).report("cnn", version=version, metrics={"holdout_accuracy": acc}, round_id=1)
    service.device("c").report("cnn", version=1, metrics={"holdout_accuracy": 0.1})  # another version
    (closed,) = service.state.fleet_snapshot()["closed_rounds"]
    assert closed["reports"] == 2 and closed["holdout_accuracy_min"] == 0.5
    assert closed["holdout_accuracy_mean"] == pytest.approx(0.6)
    page = service.http.get("/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert 'data-field="holdout_accuracy_mean">0.600</td>' in page
    assert 'data-field="holdout_accuracy_min">0.500</td>' in page and 'data-field="reports">2</td>' in page


def test_the_fleet_page_shows_the_local_epsilon_the_devices_reported(service) -> None:
    """Walking docs/fleet.md with `local_dp_noise` (each device adds its own noise and reports its own ε, in
    its log and its report), the Fleet page's ε column read "—" for every round (the service spends no ε) and
    the devices' ε were shown nowhere. Closed rounds now carry the largest ε the devices reported on the version
    (the weakest guarantee; one report per device: its last), in a column of its own."""
    version = _one_plain_round(service)
    for device, eps in (("a", 90.0), ("b", 45.25), ("a", 45.5)):  # device a reports twice: its last counts
        service.device(device).report(
            "cnn", version=version, metrics={"holdout_accuracy": 0.5, "epsilon": eps}
        )
    service.device("c").report("cnn", version=1, metrics={"holdout_accuracy": 0.1, "epsilon": 99.0})
    (closed,) = service.state.fleet_snapshot()["closed_rounds"]
    assert closed["epsilon"] is None and closed["local_epsilon_max"] == 45.5
    page = service.http.get("/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert "<th>local ε (max reported)</th>" in page and 'data-field="local_epsilon_max">45.500</td>' in page


def test_client_ids_are_positions_in_the_opens_device_list(service) -> None:
    """`fleet coordinate` names a round's dropped devices from the survivors' client ids, which the open's
    `devices` field documents as positions in its list: hold the service to it (not sorted, not hashed)."""
    names = ["z", "a", "m"]
    for d in names:
        service.device(d)
    rnd = service.admin.open_secagg("cnn", names, weight_scale=0)["round"]
    ids = {d: SecAggDevice(service.device(d), "cnn", rnd).client_id for d in names}
    assert ids == {"z": 0, "a": 1, "m": 2}
