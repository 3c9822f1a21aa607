"""SecAgg in the in-process simulator runs as messages: the server side never holds a device's plaintext."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaplane.aggregation.secagg import SecAggServer
from deltaplane.aggregation.secagg import protocol as secagg_protocol
from deltaplane.aggregation.secagg.encoding import RingEncoding
from deltaplane.sim import RunConfig, run_simulation

TINY = RunConfig(clients=5, rounds=1, local_epochs=1, lr=0.1, secagg=True, secagg_bits=16, secagg_range=1.0)


def _instrument(monkeypatch, watch):
    """Register every device's codes and float update (device side); record everything the server sees."""
    received: list[tuple[str, bytes]] = []
    servers: list[SecAggServer] = []
    sums: list[tuple[np.ndarray, np.ndarray]] = []
    device_codes: list[np.ndarray] = []
    aggregated: list = []

    encode = RingEncoding.encode

    def spy_encode(self, delta, weight, rng):
        codes = encode(self, delta, weight, rng)
        device_codes.append(codes)
        for k in range(self.bits, self.bits + 5):
            watch.add_codes(codes, bits=self.bits, ring_bits=k, label=f"device {len(device_codes) - 1}")
        watch.add_floats(delta.flatten(), label=f"device {len(device_codes) - 1} update")
        return codes

    monkeypatch.setattr(RingEncoding, "encode", spy_encode)

    for name in ("receive_keys", "receive_shares", "receive_masked_input", "receive_unmask"):
        orig = getattr(SecAggServer, name)

        def spy(self, msg, _orig=orig, _name=name):
            received.append((_name, msg.to_bytes()))
            return _orig(self, msg)

        monkeypatch.setattr(SecAggServer, name, spy)
    init = SecAggServer.__init__

    def spy_init(self, config, **kwargs):
        init(self, config, **kwargs)
        servers.append(self)

    monkeypatch.setattr(SecAggServer, "__init__", spy_init)
    result = SecAggServer.result

    def spy_result(self):
        total = result(self)
        sums.append((total, np.array(self.survivors)))
        return total

    monkeypatch.setattr(SecAggServer, "result", spy_result)

    build = RunConfig.build_aggregator

    def spy_build(self, *, seed=0, **options):
        agg = build(self, seed=seed, **options)
        add = agg.add

        def spy_add(delta, *a, **kw):
            aggregated.append(delta)
            return add(delta, *a, **kw)

        agg.add = spy_add
        return agg

    monkeypatch.setattr(RunConfig, "build_aggregator", spy_build)
    return received, servers, sums, device_codes, aggregated


def test_simulator_server_side_never_holds_a_plaintext_update(monkeypatch, plaintext_watch) -> None:
    received, servers, sums, device_codes, aggregated = _instrument(monkeypatch, plaintext_watch)
    res = run_simulation(TINY)
    assert len(device_codes) == 5 and len(servers) == 1 and len(received) == 4 * 5
    for name, data in received:  # every byte the server object was handed
        plaintext_watch.check_bytes(data, name)
    assert plaintext_watch.check_object(servers[0], "SecAggServer") > 10
    assert len(aggregated) == 1  # the aggregator chain gets the unmasked mean, nothing else
    for i, d in enumerate(aggregated):
        plaintext_watch.check_object(d, f"aggregator input {i}")
    # the sum the server unmasked is exactly the devices' codes summed, in the integer domain
    total, survivors = sums[0]
    assert np.array_equal(total, sum(c.astype(np.uint64) for c in device_codes))
    assert list(survivors) == [0, 1, 2, 3, 4]
    assert res.final.uplink_bytes > 5 * res.num_params * (16 + 3) // 8


def test_the_watch_catches_a_device_that_forgets_to_mask(monkeypatch, plaintext_watch) -> None:
    """The control: with masking switched off, the same instrument finds the plaintext in the upload."""
    received, *_ = _instrument(monkeypatch, plaintext_watch)
    monkeypatch.setattr(secagg_protocol, "add_masks", lambda acc, masks: None)  # every mask is zero
    run_simulation(TINY)
    with pytest.raises(AssertionError, match="plaintext reached the server"):
        for name, data in received:
            plaintext_watch.check_bytes(data, name)


def test_secagg_mean_is_the_example_weighted_fedavg_within_a_quantization_step() -> None:
    from deltaplane.aggregation.secagg import secure_mean
    from deltaplane.delta import Delta

    g = torch.Generator().manual_seed(0)
    deltas = [Delta({"w": 0.05 * torch.randn(40, generator=g)}) for _ in range(4)]
    weights = [10, 30, 5, 55]
    mean, rep = secure_mean(deltas, weights=weights, bits=16, clip_range=1.0, seed=1)
    ref = sum(w * d["w"].double() for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    # each device's scaled value w/mean(w)·x is rounded to a 2/65535 step, then weighted by mean(w)/Σw
    step = 2.0 / (2**16 - 1) * np.mean(weights) / sum(weights) * len(weights)
    assert (mean["w"].double() - ref).abs().max() < step
    assert rep.survivors == [0, 1, 2, 3]


def test_a_run_sampling_one_client_a_round_is_refused_up_front() -> None:
    # it passed RunConfig and failed in round 1 with SecAggConfig's "num_clients must be at least 2"
    from deltaplane.errors import ConfigError

    with pytest.raises(ConfigError, match="secagg needs at least 2 clients per round.*samples 1 of 4"):
        RunConfig(clients=4, sample_fraction=0.25, secagg=True, clip="2.0", rounds=1)
    RunConfig(clients=4, sample_fraction=0.5, secagg=True, clip="2.0", rounds=1)  # two a round: fine


def _one_device_fails(monkeypatch) -> list:
    """Device 1's client step fails every round; returns the list the secure rounds run are appended to."""
    from deltaplane.engine import secure
    from deltaplane.engine.client import ClientStep, Upload
    from deltaplane.errors import InvalidUpdate

    run = ClientStep.run

    def failing(self, client, model, state, rnd, version):
        up = run(self, client, model, state, rnd, version)
        if up.cid == 1:
            return Upload(
                cid=up.cid, num_samples=up.num_samples, error=InvalidUpdate("the device's battery died")
            )
        return up

    monkeypatch.setattr(ClientStep, "run", failing)
    rounds: list = []
    orig = secure.secure_round
    monkeypatch.setattr(secure, "secure_round", lambda *a, **k: rounds.append(a) or orig(*a, **k))
    return rounds


def test_a_round_left_with_one_secure_input_unmasks_nothing_in_process(monkeypatch) -> None:
    # one of two devices fails: the other's masked input would be "summed" alone, i.e. shown to the server.
    # It crashed with SecAggConfig's ConfigError; the lone input is now refused and the round fails as one whose
    # every update was refused, naming why, with no SecAgg round run
    from deltaplane.errors import InvalidUpdate

    rounds = _one_device_fails(monkeypatch)
    cfg = RunConfig(clients=2, rounds=1, local_epochs=1, secagg=True, secagg_bits=16, secagg_range=1.0)
    with pytest.raises(InvalidUpdate, match="every update of the round was refused") as err:
        run_simulation(cfg)
    assert rounds == []
    chain = [str(err.value)]
    e = err.value.__cause__
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert "battery" in " ".join(chain)


def test_a_round_left_with_one_secure_input_is_refused_over_http(monkeypatch) -> None:
    from deltaplane.apps.runner import run_federation
    from deltaplane.errors import InvalidUpdate

    rounds = _one_device_fails(monkeypatch)
    cfg = RunConfig(clients=2, rounds=1, local_epochs=1, secagg=True, secagg_bits=16, secagg_range=1.0)
    with pytest.raises(InvalidUpdate, match="SecAgg needs at least 2: the sum of a lone masked input"):
        run_federation(cfg.replace(transport="http"))
    assert rounds == []
