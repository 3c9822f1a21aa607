"""A service started with a federation config (`deltaplane serve --federation`) means what that config says,
or refuses with the reason: its norm guard versus local DP, SecAgg-only federations, SecAgg weighting."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import deltaplane.serve as serve_pkg
from deltaplane.cli import app
from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig
from deltaplane.engine.client import local_privacy
from deltaplane.errors import InvalidUpdate
from deltaplane.serve.client import ServiceError
from deltaplane.serve.rounds import check_update_norm

LOCAL_DP = RunConfig(clients=3, local_dp_noise=2.0, clip="1.0", downlink_codec="identity", codec="identity")


def _noised_update(state: dict[str, torch.Tensor]) -> Delta:
    """What an honest local-DP device sends: a small update, clipped to 1 and noised (std z*clip) on the device."""
    small = Delta({k: torch.full_like(v, 1e-3) for k, v in state.items()})
    return local_privacy(small, clip=1.0, noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))


def test_a_local_dp_federation_is_not_opened_under_a_guard_that_refuses_its_noise(
    service_factory, make_state
):
    noised = _noised_update(make_state(0))
    # a guard of 10x the base model's norm, set by the operator, refuses such an update: every update would be
    with pytest.raises(InvalidUpdate, match="exceeds 10x"):
        check_update_norm(noised, make_state(0), 10.0)
    svc = service_factory(federation=LOCAL_DP, max_update_norm_ratio=10.0)
    with pytest.raises(ServiceError, match="max-update-norm-ratio") as info:
        svc.admin.open_round("cnn")
    assert info.value.status == 422 and "local DP noise" in info.value.detail
    assert svc.state.rounds == {}  # nothing was opened


def test_the_default_guard_admits_an_honest_local_dp_update_and_still_bounds_updates(
    service_factory, make_state
):
    """The default guard ("auto") widens to the norm an honest local-DP update reaches (clip 1, z 2 on the cnn's
    6090 values: 1 + 2·(√6090 + 6) = 169.1; 10x the base norm is 77.6): the round opens and the noised update
    (norm ≈ 156) is accepted. Before, the open was refused (422, --max-update-norm-ratio 22) unless the operator
    widened the guard. An update twice that bound is still refused, with the bound named."""
    svc = service_factory(federation=LOCAL_DP)
    opened = svc.admin.open_round("cnn")
    noised = _noised_update(make_state(0))
    assert 150 < float(noised.norm()) < 169.1
    payload = Compressor("identity").compress(noised, base_id="cnn", base_version=opened["base_version"])
    assert svc.device("d0").upload("cnn", opened["round"], payload, num_examples=10)["accepted"]
    scaled = Compressor("identity").compress(noised * 2.0, base_id="cnn", base_version=opened["base_version"])
    with pytest.raises(ServiceError) as info:
        svc.device("d1").upload("cnn", opened["round"], scaled, num_examples=10)
    assert info.value.status == 422
    assert (
        "exceeds 169.1, the norm an honest update reaches with this federation's DP noise"
        in info.value.detail
    )


def test_a_local_dp_federation_runs_without_the_guard(service_factory, make_state):
    svc = service_factory(federation=LOCAL_DP, max_update_norm_ratio=None)
    opened = svc.admin.open_round("cnn")
    payload = Compressor("identity").compress(
        _noised_update(make_state(0)), base_id="cnn", base_version=opened["base_version"]
    )
    assert svc.device("d0").upload("cnn", opened["round"], payload, num_examples=10)["accepted"]


def test_serve_can_turn_the_norm_guard_off(tmp_path, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(serve_pkg, "create_app", lambda config, **kw: seen.setdefault("config", config))
    monkeypatch.setattr(serve_pkg, "serve", lambda app_, **kw: None)
    base = ["serve", "--home", str(tmp_path), "--admin-token", "x" * 20]
    for flag, want in [
        ([], "auto"),
        (["--max-update-norm-ratio", "0"], None),
        (["--max-update-norm-ratio", "30"], 30.0),
    ]:
        seen.clear()
        r = CliRunner().invoke(app, base + flag)
        assert r.exit_code == 0, r.output
        assert seen["config"].max_update_norm_ratio == want


SECAGG = RunConfig(clients=3, secagg=True, clip="2.0", downlink_codec="identity", wire="self-describing")


def test_a_secagg_federation_takes_no_plain_round_and_no_plaintext_update(service_factory, make_state):
    """Its devices clip before masking and its chain sees only the unmasked sum: a plaintext update used to be
    accepted and published unclipped (norm 4.7 with clip 2.0)."""
    svc = service_factory(federation=SECAGG)
    with pytest.raises(ServiceError, match="SecAgg") as info:
        svc.admin.open_round("cnn")
    assert info.value.status == 409 and "POST /admin/models/cnn/secagg" in info.value.detail
    big = Delta({k: torch.full_like(v, 0.06) for k, v in make_state(0).items()})
    payload = Compressor("identity").compress(big, base_id="cnn", base_version=1)
    with pytest.raises(ServiceError, match="plaintext") as info:
        svc.device("d0").upload("cnn", 1, payload, num_examples=10, nonce="n")
    assert info.value.status == 409
    assert [v.number for v in svc.reg.versions("cnn")] == [1]  # nothing published
    assert svc.admin.open_secagg("cnn", ["d0", "d1"], weight_scale=10.0)["round"] == 1  # SecAgg rounds open


def test_a_fedper_device_compresses_with_the_served_session_and_uploads(tmp_path):
    """The served session used to frame the full model while uploads were checked against the shared layers:
    a device following the protocol (fetch the session, compress its shared update in it) got ShapeMismatch."""
    from fastapi.testclient import TestClient

    from deltaplane.engine import make_task
    from deltaplane.registry import Registry
    from deltaplane.serve import AdminClient, DeviceClient, ServiceConfig, create_app

    run = RunConfig(clients=3, personalization="fedper", codec="topk(0.05) | quant(bits=8)")
    reg = Registry.create(tmp_path / "h")
    state = make_task(run).build_model(0).state_dict()
    reg._move_tag(
        "digits-cnn", "production", reg.register_model("digits-cnn", state).number, action="promote"
    )
    service = create_app(ServiceConfig(home=str(tmp_path / "h"), admin_token="a" * 20, federation=run))
    http = TestClient(service)
    admin = AdminClient("http://testserver", "a" * 20, client=http)
    device = DeviceClient("http://testserver", admin.issue_token("d0"), verifier=reg.verifier, client=http)
    opened = admin.open_round("digits-cnn")
    session = device.session("digits-cnn")
    local = {"fc2.weight", "fc2.bias"}  # FedPer keeps the classifier head on the device
    assert set(state) - set(session.layout) == local
    shared = Delta({k: torch.full_like(v, 1e-3) for k, v in state.items() if k not in local})
    payload = Compressor(run.codec, seed=0).compress(
        shared, base_version=opened["base_version"], base_id="digits-cnn", session=session
    )
    assert device.upload("digits-cnn", opened["round"], payload, num_examples=5)["accepted"]


def test_a_service_secagg_round_is_example_weighted_or_refused_without_a_scale(service_factory, make_state):
    """Its default used to be an unweighted mean (weight_scale=0), while plain rounds and every in-process
    SecAgg round weight by example count: two devices with 1 and 9 examples moved the model by 0.020, not 0.028."""
    import numpy as np

    from deltaplane.serve.secagg_client import SecAggDevice

    svc = service_factory(federation=SECAGG.replace(clients=2, clip="10.0"))
    devices = [svc.device(f"d{i}") for i in range(2)]
    with pytest.raises(ServiceError, match="weight_scale") as info:
        svc.admin.open_secagg("cnn", ["d0", "d1"])
    assert info.value.status == 422 and "example count" in info.value.detail
    base = make_state(0)
    counts = [(0.01, 1), (0.03, 9)]
    opened = svc.admin.open_secagg("cnn", ["d0", "d1"], weight_scale=float(np.mean([n for _, n in counts])))
    fleet = []
    for d, (value, n) in zip(devices, counts, strict=True):
        s = SecAggDevice(d, "cnn", opened["round"])
        s.set_update(
            Delta({k: torch.full_like(v, value) for k, v in base.items()}), n, np.random.default_rng(0)
        )
        fleet.append(s)
    for stage in ("advertise", "share", "upload"):
        for s in fleet:
            getattr(s, stage)()
        svc.admin.advance_secagg("cnn", opened["round"])
    for s in fleet:
        s.unmask()
    closed = svc.admin.close_secagg("cnn", opened["round"])
    new = svc.reg.load_state(f"cnn@{closed['published']['version']}")
    moved = float((new["fc.bias"] - base["fc.bias"]).mean())
    assert moved == pytest.approx((0.01 * 1 + 0.03 * 9) / 10, abs=2e-4)  # quantization: 2/2^16 per value


def test_a_service_refuses_simulation_only_options_and_names_the_device_side_ones(
    service_factory, caplog
) -> None:
    """`deltaplane serve --federation` builds only the server step: an attack (or any device-side option) in
    the YAML used to reach no device, and nothing refused or reported it."""
    from deltaplane.errors import UnsupportedOption
    from deltaplane.serve.federation import run_http_simulation

    with pytest.raises(UnsupportedOption, match="not ours to poison"):
        service_factory(federation=RunConfig(attack="backdoor:0.34"))
    with pytest.raises(UnsupportedOption, match="train_shifts"):
        service_factory(federation=RunConfig(train_shifts=1))
    # any device may upload to an open round: ε with sampling amplification (q = m/N) would be too small
    with pytest.raises(UnsupportedOption, match="does not sample devices"):
        service_factory(federation=RunConfig(clients=10, sample_fraction=0.2, dp_noise=1.0, clip="1.0"))
    device_side = RunConfig(
        local_dp_noise=1.0,
        clip="1.0",
        prox_mu=0.5,
        momentum_correction=0.9,
        local_epochs=5,
        downlink_codec="identity",
    )
    with caplog.at_level("WARNING", logger="deltaplane.serve.app"):
        service_factory(federation=device_side, max_update_norm_ratio=None)
    notice = " ".join(r.getMessage() for r in caplog.records)
    for option in (
        "local_dp_noise=1.0",
        "prox_mu=0.5",
        "momentum_correction=0.9",
        "local_epochs=5",
        "clip=1.0",  # the number, as the devices take it (it said clip='1.0')
    ):
        assert option in notice
    assert "configure your devices" in notice
    # under SecAgg the devices add DP-FedAvg's noise themselves (distributed DP, docs/fleet.md): the notice
    # named only their clip, as if the service, which accounts ε but never sees an update, applied the noise
    from deltaplane.serve.device_side import device_side_notice

    distributed = RunConfig(clients=3, secagg=True, clip="2.0", dp_noise=0.8, downlink_codec="identity")
    assert "clip=2.0, dp_noise=0.8 act on the devices" in device_side_notice(distributed)
    assert "dp_noise" not in device_side_notice(distributed.replace(secagg=False))
    # and the ε the service reports under SecAgg is the devices' noise counted (walking docs/byo.md ->
    # fleet.md, "neither applies nor checks them" was followed by an ε from the service, unexplained)
    assert "the ε this service reports counts the noise dp_noise has the devices add" in device_side_notice(
        distributed
    )
    assert "ε" not in device_side_notice(distributed.replace(dp_noise=0.0))
    # the HTTP simulation's devices are the engine's: they run the attack, as in process
    assert run_http_simulation(RunConfig(clients=3, rounds=1, local_epochs=1, attack="sign_flip:0.34")).rounds


def test_honest_local_dp_updates_at_the_largest_noise_the_service_admits_pass_its_guard(tmp_path, make_state):
    """The local-DP admission is not too tight: find the largest local_dp_noise the service opens a round for
    (by asking it), then noise 300 honest updates there as devices do (norm clip, the largest an honest update
    has, plus N(0, (z·clip)²) per value) and put each through the upload guard: none is refused. The check
    compared the guard with the noise's mean norm clip·(1 + z·√d): near its edge (z ≈ 0.98 on the cnn) a few
    percent of honest updates were refused (6 of these 300); it now leaves 6 stds of the noise's norm (z ≈ 0.91)."""
    from .conftest import Service

    def admits(z: float) -> bool:
        run = RunConfig(clients=3, local_dp_noise=z, clip="1.0", downlink_codec="identity", codec="identity")
        svc = Service(tmp_path / f"z{z:.6f}", federation=run, max_update_norm_ratio=10.0)
        try:
            svc.admin.open_round("cnn")
        except ServiceError as exc:
            assert exc.status == 422 and "--max-update-norm-ratio" in exc.detail
            return False
        return True

    lo, hi = 0.1, 2.0
    for _ in range(8):  # to within 0.008 of the edge
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if admits(mid) else (lo, mid)
    base = make_state(0)
    g = torch.Generator().manual_seed(0)
    refused = 0
    for _ in range(300):
        signal = Delta({k: torch.randn(v.shape, generator=g) for k, v in base.items()})
        honest = local_privacy(
            signal * (1.0 / float(signal.norm())), clip=1.0, noise_multiplier=lo, generator=g
        )
        try:
            check_update_norm(honest, base, 10.0)
        except InvalidUpdate:
            refused += 1
    assert refused == 0, f"{refused} of 300 honest local-DP updates at z {lo:.3f} refused by the guard"
