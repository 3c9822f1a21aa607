"""Acceptance (#13, 2): 50 devices run SecAgg against a real service process on loopback, 30% dropping out at
different stages; the published model is the survivors' FedAvg exactly in the integer domain, and no byte the
server process received and nothing alive in it carries a device's plaintext update."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from deltaplane.aggregation.secagg import Dropouts, RingEncoding, pack, ring_bits
from deltaplane.delta import Delta
from deltaplane.registry import Registry
from deltaplane.serve.secagg_fleet import device_rng, run_secagg_fleet

ADMIN = "admin-token-0123456789"
PROBE = Path(__file__).with_name("secagg_probe_server.py")


def _start(home: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen(
        [sys.executable, str(PROBE), str(home), ADMIN, "d" * 32, str(port_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the probe server did not start")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port_file.read_text()}"
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def test_fifty_devices_secagg_over_a_real_server_process(tmp_path, make_state) -> None:
    home = tmp_path / "home"
    reg = Registry.create(home)
    base = make_state(0)
    v1 = reg.register_model("cnn", base, lineage={"round": 0})
    reg.set_tag("cnn", "production", v1.number)
    n, bits, clip, scale, seed = 50, 16, 0.5, 30.0, 7
    g = torch.Generator().manual_seed(3)
    updates = [
        Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}) for _ in range(n)
    ]
    weights = [int(w) for w in np.random.default_rng(1).integers(5, 60, n)]
    drops = Dropouts(
        before_advertise={0, 1, 2},
        before_shares={3, 4, 5},
        before_upload={6, 7, 8},
        late_upload={9, 10, 11},
        after_upload={12, 13, 14},
    )  # 15 of 50 drop out; the last 3 after uploading, so they stay in the sum
    proc, url = _start(home, tmp_path)
    try:
        rep = run_secagg_fleet(
            url, ADMIN, "cnn", updates, weights, verifier=reg.verifier, dropouts=drops,
            bits=bits, clip_range=clip, weight_scale=scale, seed=seed, workers=4,
        )  # fmt: skip
        survivors = list(range(9, n))
        survivors = [u for u in survivors if u not in (9, 10, 11)]
        assert (
            rep.survivors == survivors
            and rep.dropped == [6, 7, 8, 9, 10, 11]
            and rep.refused_late == [9, 10, 11]
        )

        # exact in the integer domain: the server's unmasked sum is the survivors' codes, summed
        enc = RingEncoding(bits=bits, clip_range=clip, weight_scale=scale)
        codes = {i: enc.encode(updates[i], weights[i], device_rng(seed, i)) for i in range(n)}
        total = sum(codes[u].astype(np.uint64) for u in survivors)
        assert rep.published["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
        mean, weight = enc.decode_sum(total, count=len(survivors), like=Delta.zeros_like(base))
        assert weight == sum(weights[u] for u in survivors)
        published = Registry(home).load_state(Registry(home).get("cnn", rep.published["version"]))
        expected = mean.apply(base)
        assert all(torch.equal(published[k], expected[k]) for k in base)
        fedavg = sum(weights[u] * updates[u].flatten().double() for u in survivors) / weight
        assert (mean.flatten().double() - fedavg).abs().max() < 1e-3  # the plaintext FedAvg, up to rounding

        # the instrument: every device's plaintext (codes packed three ways, float update) must be absent from
        # the server process; the base model's weights (which the server does hold) must be found
        k = ring_bits(bits, n)
        patterns: list[bytes] = []
        for i in range(n):
            mid = (codes[i].size // 2) // 8 * 8
            win = codes[i][mid : mid + 64]
            patterns += [pack(win, bits), pack(win, k), pack(win, 32)]
            patterns.append(updates[i].flatten()[mid : mid + 16].numpy().tobytes())
        control = base["conv2.weight"].reshape(-1)[100:116].numpy().tobytes()
        scan = httpx.post(
            url + "/__probe/scan", json={"patterns": [p.hex() for p in [*patterns, control]]}, timeout=600
        )
        result = scan.json()
        assert result["found"] == [len(patterns)], (
            f"plaintext patterns found in the server: {result['found']}"
        )
        assert result["bodies"] >= 4 * 35 and result["buffers"] > 200
        assert max(rep.bytes_sent.values()) < 3 * len(pack(codes[20], k))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_simulated_fleet_takes_the_services_ring_by_default(tmp_path, make_state) -> None:
    """run_secagg_fleet opened 16-bit rings unless told otherwise: a service with its default --max-examples
    (100,000) refuses those (422, a weighted ring carries at most 2^bits - 1 examples), so every caller had to
    lower the service's bound. Without ``bits`` the open names none and the service picks its own ring."""
    from deltaplane.serve import ServiceConfig, create_app
    from deltaplane.serve.server import BackgroundServer

    home = tmp_path / "home"
    reg = Registry.create(home)
    base = make_state(0)
    reg.set_tag("cnn", "production", reg.register_model("cnn", base, lineage={"round": 0}).number)
    config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="d" * 32, rate=1e6, burst=10**6)
    assert config.max_examples == 100_000  # the default this test is about
    g = torch.Generator().manual_seed(0)
    updates = [
        Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}) for _ in range(3)
    ]
    with BackgroundServer(create_app(config)) as server:
        rep = run_secagg_fleet(server.url, ADMIN, "cnn", updates, [5, 7, 9], verifier=reg.verifier, workers=3)
    assert rep.survivors == [0, 1, 2] and rep.published["version"] == 2
    assert rep.config["bits"] == 20, rep.config  # a run config's default: it carries 100,000 examples


def test_an_authenticated_fleet_round_is_exact_with_dropouts_at_every_stage(tmp_path, make_state) -> None:
    """run_secagg_fleet(authenticated=True) enrolls its devices and runs the signed round with the consistency
    check: a device gone at each stage (one only after uploading: still in the sum), the late upload refused,
    the unmasked sum the survivors' codes exactly."""
    from deltaplane.serve import ServiceConfig, create_app
    from deltaplane.serve.server import BackgroundServer

    home = tmp_path / "home"
    reg = Registry.create(home)
    base = make_state(0)
    reg.set_tag("cnn", "production", reg.register_model("cnn", base, lineage={"round": 0}).number)
    config = ServiceConfig(
        home=str(home), admin_token=ADMIN, device_secret="d" * 32, rate=1e6, burst=10**6, max_examples=1000
    )
    n, bits, clip, scale, seed = 16, 16, 0.5, 30.0, 5  # threshold 11: the 11 answering devices just suffice
    g = torch.Generator().manual_seed(4)
    updates = [
        Delta({k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}) for _ in range(n)
    ]
    weights = [int(w) for w in np.random.default_rng(2).integers(5, 60, n)]
    drops = Dropouts(
        before_advertise={0}, before_shares={1}, before_upload={2}, late_upload={3}, after_upload={4}
    )
    with BackgroundServer(create_app(config)) as server:
        rep = run_secagg_fleet(
            server.url, ADMIN, "cnn", updates, weights, verifier=reg.verifier, dropouts=drops,
            bits=bits, clip_range=clip, weight_scale=scale, seed=seed, workers=4, authenticated=True,
        )  # fmt: skip
    survivors = list(range(4, n))
    assert rep.survivors == survivors and rep.dropped == [2, 3] and rep.refused_late == [3]
    assert rep.status["authenticated"] is True and rep.status["signed"] == n - 5
    assert list(rep.stage_seconds) == [
        "advertise keys", "share keys", "masked input", "consistency check", "unmasking", "unmask and publish"
    ]  # fmt: skip
    enc = RingEncoding(bits=bits, clip_range=clip, weight_scale=scale)
    total = sum(enc.encode(updates[u], weights[u], device_rng(seed, u)).astype(np.uint64) for u in survivors)
    assert rep.published["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
