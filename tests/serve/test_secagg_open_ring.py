"""A SecAgg round's open refuses a weighted ring that cannot carry the example counts the service admits.

A weighted ring carries each device's example count in one ``bits``-bit slot, and every device refuses an
invitation whose slot cannot hold its count (before it trains). The service admits counts up to its
``max_examples``; it opened such rings anyway, so a device the service admits sat every round out. The bound
is computed here by hand: a ``b``-bit slot holds 0 … 2^b − 1 and a weight is at least 1, so the largest
count it carries is 2^b − 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from deltaplane.aggregation.secagg import SecAggError
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig
from deltaplane.serve.client import ServiceError
from deltaplane.serve.secagg_client import SecAggDevice

NAMES = ["a", "b", "c"]


def _open(svc: Any, **params: Any) -> dict[str, Any]:
    for d in NAMES:
        svc.device(d)
    return svc.admin.open_secagg("cnn", NAMES, **params)


def _no_secagg_round(svc: Any) -> None:
    """Nothing was recorded: no SecAgg round in the store (its table is empty), none the service answers for."""
    assert svc.reg.query("SELECT COUNT(*) FROM secagg_rounds", ())[0][0] == 0
    with pytest.raises(ServiceError) as err:
        svc.admin.secagg_status("cnn", 1)
    assert err.value.status == 404


@pytest.mark.parametrize("bits", [8, 16])
def test_a_weighted_ring_too_small_for_max_examples_is_refused_at_open(service_factory, bits) -> None:
    carried = (
        2**bits - 1
    )  # the largest count a bits-bit weight slot holds (by hand, not the library's helper)
    svc = service_factory(max_examples=carried + 1)
    with pytest.raises(ServiceError) as err:
        _open(svc, bits=bits, weight_scale=20.0)
    detail = err.value.detail
    assert 400 <= err.value.status < 500, detail
    assert err.value.status == 422, detail
    # says what is wrong and each way to fix it
    assert f"{bits}-bit codes carries example counts up to {carried}" in detail, detail
    assert f"admits up to {carried + 1} per device" in detail, detail
    assert f"bits: {bits + 1} or more" in detail, detail
    assert "weight_scale: 0" in detail, detail
    assert f"--max-examples {carried} or less" in detail, detail
    _no_secagg_round(svc)
    # the refused open numbered nothing: the next open (a ring that carries the bound) is round 1
    assert _open(svc, bits=bits + 1, weight_scale=20.0)["round"] == 1


@pytest.mark.parametrize("bits", [8, 16])
def test_the_largest_max_examples_a_weighted_ring_carries_opens(service_factory, bits) -> None:
    carried = 2**bits - 1
    svc = service_factory(max_examples=carried)
    opened = _open(svc, bits=bits, weight_scale=20.0)
    assert opened["round"] == 1 and opened["config"]["bits"] == bits


def test_a_fractional_max_examples_is_checked_as_the_largest_whole_count_it_admits(service_factory) -> None:
    # 255.5 admits counts up to 255, which an 8-bit slot carries; 256.0 admits 256, which it does not
    assert _open(service_factory(max_examples=255.5), bits=8, weight_scale=20.0)["round"] == 1
    with pytest.raises(ServiceError) as err:
        _open(service_factory(max_examples=256.0), bits=8, weight_scale=20.0)
    assert err.value.status == 422 and "admits up to 256 per device" in err.value.detail


def test_server_and_device_agree_on_the_bound(service_factory) -> None:
    """At the boundary the round opens and a device holding max_examples accepts it; one more it refuses
    (the device's own check, before it trains): the service refuses exactly the rings some admitted device
    would refuse."""
    bits, carried = 8, 2**8 - 1
    svc = service_factory(max_examples=carried)
    rnd = _open(svc, bits=bits, weight_scale=20.0)["round"]
    dev = SecAggDevice(svc.device("a"), "cnn", rnd)
    like = Delta({k: torch.zeros_like(v) for k, v in svc.reg.load_state("cnn@1").items()})
    dev.check_update(like, carried)
    with pytest.raises(SecAggError, match=r"\[1, 2\^8\)"):
        dev.check_update(like, carried + 1)


def test_an_unweighted_ring_carries_any_max_examples(service_factory) -> None:
    svc = service_factory(max_examples=1e12)
    opened = _open(svc, bits=2, weight_scale=0)  # the smallest ring: every weight slot is 1
    assert opened["round"] == 1 and opened["config"]["bits"] == 2


def test_the_federation_ring_is_checked_when_the_open_names_no_bits(service_factory) -> None:
    """A fleet coordinator opens without bits: the federation's secagg.bits is the ring, and the message says
    where to raise it."""
    fed = RunConfig(clients=3, secagg=True, clip="1.0", secagg_bits=16, downlink_codec="identity")
    svc = service_factory(federation=fed)  # max_examples: the default, 100,000 > 65,535
    with pytest.raises(ServiceError) as err:
        _open(svc, weight_scale=20.0)
    assert err.value.status == 422 and "secagg.bits" in err.value.detail, err.value.detail
    _no_secagg_round(svc)
    svc = service_factory(federation=fed.replace(secagg_bits=17))
    assert _open(svc, weight_scale=20.0)["round"] == 1


def test_the_fleet_coordinator_reports_the_refused_open(service_factory) -> None:
    """`deltaplane fleet coordinate` against such a service: the first round fails with the service's message
    (the CLI prints it on the round's line and exits 1), never a traceback, and no round is left open; the
    coordinator stops there, since every later open is the same request (it used to repeat it every round)."""
    from deltaplane.serve.fleet import coordinate

    fed = RunConfig(clients=3, secagg=True, clip="1.0", secagg_bits=16, downlink_codec="identity")
    svc = service_factory(federation=fed)
    for d in NAMES:
        svc.device(d)
    done = coordinate(
        svc.admin, fed, model="cnn", rounds=2, deadline=1, devices=NAMES, weight_scale=20.0, drift=False
    )
    (s,) = done
    assert s.number == 0 and "carries example counts up to 65535" in s.failed, s.failed
    assert "failed: a weighted SecAgg round of 16-bit codes" in s.line(2) and "stopped" in s.failed
    _no_secagg_round(svc)


def test_a_weighted_http_simulation_fits_its_bound_to_the_ring() -> None:
    """`deltaplane run --transport http --secagg`: the simulated service admits each device's own size, at
    least the default 100,000, which a 16-bit weighted ring cannot carry; its bound is lowered to what the ring
    carries, so its rounds open (its devices hold far fewer examples)."""
    from deltaplane.serve.federation import _examples_bound

    class _C:
        def __init__(self, n: int) -> None:
            self.num_samples = n

    clients = [_C(n) for n in (30, 70)]
    weighted = RunConfig(clients=2, secagg=True, clip="1.0", secagg_bits=16)
    assert _examples_bound(weighted, clients) == 2**16 - 1
    assert _examples_bound(weighted.replace(secagg_bits=20), clients) == 100_000  # carried: unchanged
    assert _examples_bound(weighted.replace(secagg=False), clients) == 100_000


def test_transport_http_secagg_with_a_16_bit_weighted_ring_runs() -> None:
    """End to end: a weighted SecAgg run over HTTP on a 16-bit ring opens its rounds and matches in process."""
    from deltaplane.serve.federation import run_http_simulation
    from deltaplane.sim import run_simulation

    cfg = RunConfig(clients=3, rounds=1, local_epochs=1, secagg=True, secagg_bits=16, clip="2.0")
    http = run_http_simulation(cfg)
    local = run_simulation(cfg)
    assert [r.test_accuracy for r in http.rounds] == [r.test_accuracy for r in local.rounds]
    for k, v in local.final_state.items():
        assert torch.equal(http.final_state[k], v), k
    assert np.isfinite([r.test_accuracy for r in http.rounds]).all()


def test_a_default_service_opens_a_weighted_round_that_names_no_bits(service_factory) -> None:
    """With no --federation an open that names no bits used 16-bit rings, which cannot carry the default
    --max-examples (100,000 > 2^16 − 1): every such weighted open was refused. It now takes a run config's
    default ring (20 bits: counts up to 1,048,575), as a federation that sets no secagg.bits does."""
    svc = service_factory()
    assert 2**16 - 1 < 100_000 <= 2**20 - 1
    opened = _open(svc, weight_scale=20.0)
    assert opened["config"]["bits"] == RunConfig().secagg_bits == 20
