"""Devices refuse to unmask a sum of fewer masked inputs than their own floor (distributed DP's m_min).

Each device's distributed-DP noise is calibrated to a sum of at least m_min devices, so the device itself must
not help unmask a smaller sum, whatever the server asks: the server here is built *without* a floor (a
misconfigured or protocol-breaking server), and requests are also built by hand, so the refusal is the
devices' own and not the honest server's check (``SecAggServer(min_inputs=...)``).
"""

import numpy as np
import pytest

from deltaplane.aggregation.secagg import (
    DeviceEndpoint,
    RingEncoding,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggFloorError,
    SecAggServer,
    UnmaskRequest,
)

N, D, BITS, THRESHOLD, ROUND = 6, 24, 8, 4, 3


def _masked_round(floor: int, uploaders: int, seed: int = 0):
    """Six devices with unmasking floor ``floor`` and a server with none; the first ``uploaders`` devices send
    their masked input. Returns codes, devices, server and the server's unmasking request."""
    cfg = SecAggConfig(num_clients=N, threshold=THRESHOLD, bits=BITS, vector_size=D, round_id=ROUND)
    rng = np.random.default_rng(seed)
    codes = {u: rng.integers(0, 1 << BITS, D).astype(np.uint32) for u in range(N)}
    rb = np.random.default_rng(seed + 1).bytes
    devices = {u: SecAggClient(u, cfg, randbytes=rb, min_inputs=floor) for u in range(N)}
    server = SecAggServer(cfg)  # no min_inputs: only SecAgg's threshold stands between it and the sum
    for c in devices.values():
        server.receive_keys(c.advertise_keys())
    roster = server.roster()
    for c in devices.values():
        server.receive_shares(c.share_keys(roster))
    server.close_shares()
    masked = {u: c.masked_input(server.inbox(u), codes[u]) for u, c in devices.items()}
    for u in range(uploaders):
        server.receive_masked_input(masked[u])
    return codes, devices, server, server.unmask_request()


def test_devices_refuse_a_server_without_a_floor_asking_to_unmask_fewer_than_m_min() -> None:
    """m_min 5, four uploads: enough for SecAgg's threshold (4), so the floorless server asks for unmasking;
    every survivor refuses with a SecAggFloorError naming both numbers, returns no shares, and stays able to
    refuse again (nothing was marked revealed), so the server cannot rebuild the sum."""
    _codes, devices, server, request = _masked_round(floor=5, uploaders=4)
    assert request.survivors == (0, 1, 2, 3)
    for u in request.survivors:
        with pytest.raises(SecAggFloorError, match=r"sum of 4 masked inputs.*at least 5") as refused:
            devices[u].unmask(request)
        assert (refused.value.survivors, refused.value.floor) == (4, 5)
        assert isinstance(refused.value, SecAggError)
        with pytest.raises(SecAggFloorError):  # the same request again: still refused
            devices[u].unmask(request)
    with pytest.raises(SecAggError, match="shares"):
        server.result()  # no device answered: the sum stays masked


def test_devices_answer_a_request_of_exactly_m_min_survivors_and_the_sum_is_exact() -> None:
    codes, devices, server, request = _masked_round(floor=5, uploaders=5)
    assert len(request.survivors) == 5
    for u in request.survivors:
        server.receive_unmask(devices[u].unmask(request))
    total = server.result()
    expected = sum(codes[u].astype(np.int64) for u in request.survivors) % (1 << server.config.ring_bits)
    assert np.array_equal(total.astype(np.int64), expected)


def test_a_hand_built_request_below_the_floor_is_refused_whatever_the_server_holds() -> None:
    """Independent of any server: all six uploaded, and a request naming four survivors and two dropped
    (what a server lying about arrivals would send) is refused by a device with floor 5, before any share is
    produced; the same device answers the honest request of six."""
    _codes, devices, _server, honest = _masked_round(floor=5, uploaders=N)
    short = UnmaskRequest(ROUND, (0, 1, 2, 3), (4, 5))
    with pytest.raises(SecAggFloorError, match="at least 5"):
        devices[0].unmask(short)
    assert devices[0]._revealed == {}  # no secret marked revealed: nothing left the device
    assert set(devices[0].unmask(honest).shares) >= {0}


def test_the_floor_is_kept_across_export_and_restore_and_by_the_device_endpoint() -> None:
    """Devices that run each stage in a fresh process (Flower nodes) keep the floor in their own state; the
    byte-level DeviceEndpoint (HTTP, Flower) refuses as SecAggClient does, and a floor of 0 keeps the old
    behaviour (SecAgg's threshold alone)."""
    _codes, devices, _server, _request = _masked_round(floor=5, uploaders=N)
    cfg = devices[0].config
    short = UnmaskRequest(ROUND, (0, 1, 2, 3), (4, 5))
    restored = SecAggClient.restore(cfg, devices[0].export_state())
    assert restored.min_inputs == 5
    with pytest.raises(SecAggFloorError):
        restored.unmask(short)
    ep = DeviceEndpoint.restore(cfg, RingEncoding(bits=BITS), devices[1].export_state())
    with pytest.raises(SecAggFloorError, match="sum of 4"):
        ep.unmask(short.to_bytes())
    no_floor = SecAggClient.restore(
        cfg, devices[2].export_state().replace(b'"min_inputs":5', b'"min_inputs":0')
    )
    assert set(no_floor.unmask(short).shares) >= {2}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "5"])
def test_a_malformed_floor_is_a_config_error(bad) -> None:
    from deltaplane.errors import ConfigError

    cfg = SecAggConfig(num_clients=N, threshold=THRESHOLD, bits=BITS, vector_size=D)
    with pytest.raises(ConfigError, match="min_inputs"):
        SecAggClient(0, cfg, min_inputs=bad)


def test_a_device_refuses_a_ring_narrower_than_its_own_minimum_before_sending_anything() -> None:
    """Under distributed DP a device's least ring range is C + 6σ_d from its own config: a server that opens a
    round with a narrower ``clip_range`` would have the ring clip the noised values (so the sum no longer
    carries the accounted noise). The device refuses when it reads the invitation; at its minimum it joins."""
    from deltaplane.aggregation.secagg import SecAggRangeError

    cfg = SecAggConfig(num_clients=N, threshold=THRESHOLD, bits=BITS, vector_size=D, round_id=ROUND)
    with pytest.raises(SecAggRangeError, match="below the 2.5") as err:
        DeviceEndpoint(0, cfg, RingEncoding(bits=BITS, clip_range=1.5), min_range=2.5)
    assert err.value.min_range == 2.5
    joined = DeviceEndpoint(0, cfg, RingEncoding(bits=BITS, clip_range=2.5), min_range=2.5)
    assert joined.advertise()  # the device takes part


def test_a_device_under_distributed_dp_refuses_a_weighted_ring() -> None:
    """A weighted ring scales each value by count / weight_scale before the clip: at the device's least range a
    rule-breaking server's weight_scale 1 would have the ring clip most noised values and let one device move
    the sum by more than C. A device with a distributed-DP minimum refuses it; weight_scale 0 joins."""
    from deltaplane.aggregation.secagg import SecAggRangeError

    cfg = SecAggConfig(num_clients=N, threshold=THRESHOLD, bits=BITS, vector_size=D, round_id=ROUND)
    weighted = RingEncoding(bits=BITS, clip_range=2.5, weight_scale=1.0)
    with pytest.raises(SecAggRangeError, match="weight_scale=1"):
        DeviceEndpoint(0, cfg, weighted, min_range=2.5)
    assert DeviceEndpoint(0, cfg, weighted)  # no distributed DP on this device: weighted rings are fine
    assert DeviceEndpoint(0, cfg, RingEncoding(bits=BITS, clip_range=2.5, weight_scale=0.0), min_range=2.5)
