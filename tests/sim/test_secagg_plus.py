"""SecAgg+ in the simulations: ``RunConfig.secagg_neighbours`` is validated up front, each round's degree follows
the devices' own policy, and the unmasked sum is the plain sum of the survivors' codes, as with the complete
graph. The other drivers: tests/flower/test_secagg_plus_drivers.py, tests/serve/test_secagg_plus_service.py."""

from __future__ import annotations

import numpy as np
import pytest

from deltaplane.aggregation.secagg import (
    SecAggConfig,
    SecAggError,
    SecAggServer,
    check_device_policy,
    default_threshold,
    min_group_size,
    neighbours,
    round_neighbours,
    run_secagg,
)
from deltaplane.aggregation.secagg.encoding import RingEncoding
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError
from deltaplane.sim import run_simulation

SPARSE = dict(clients=8, rounds=1, local_epochs=1, lr=0.1, secagg=True, clip="2.0", secagg_neighbours=6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"secagg": False}, r"secagg_neighbours is SecAgg\+'s degree .* it needs secagg"),
        ({"secagg_neighbours": 5}, "secagg_neighbours=5 must be even"),
        ({"secagg_neighbours": 8}, "a round of the 8 clients this run expects gives each device at most 7"),
        # 20 devices: neighbourhoods need 2⌈log₂ 20⌉ + 1 = 11, so degree 10 is the least
        (
            {"clients": 20, "secagg_neighbours": 8},
            "neighbourhoods of 9 of the 20 .* devices refuse fewer than 11 .* at least 10",
        ),
        # Poisson-sampled distributed DP: the expected round (10 of 20) decides, 2⌈log₂ 10⌉ + 1 = 9
        (
            {
                "clients": 20,
                "sample_fraction": 0.5,
                "dp_noise": 0.5,
                "dp_delta": 1e-3,
                "secagg_neighbours": 6,
            },
            "neighbourhoods of 7 of the 10 .* at least 8",
        ),
        ({"clients": 6, "secagg_neighbours": 4}, "a round of 6 admits only the complete graph"),
        ({"secagg_neighbours": 0}, "greater than or equal to 2"),
    ],
)
def test_a_degree_the_devices_would_refuse_is_refused_up_front_with_the_fix(change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(**(SPARSE | change))


def test_the_yaml_section_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="secagg.neighbours.*must be even"):
        RunConfig.from_mapping({"clients": 8, "clip": 2.0, "secagg": {"enabled": True, "neighbours": 3}})
    ok = RunConfig.from_mapping({"clients": 8, "clip": 2.0, "secagg": {"enabled": True, "neighbours": 6}})
    assert ok.secagg_neighbours == 6 and "SecAgg+ degree 6" in ok.describe_aggregation()
    assert ok.to_sections()["secagg"]["neighbours"] == 6


def test_every_round_degree_is_one_the_devices_accept() -> None:
    """A round drawn larger than expected (Poisson sampling) gets the least degree its devices accept; one in
    which a neighbourhood would hold every device runs the complete graph. Checked against the devices' own
    policy for every round size a run of up to 300 devices can draw."""
    for degree in (6, 8, 10, 16):
        for n in range(2, 300):
            chosen = round_neighbours(degree, n)
            cfg = SecAggConfig(
                num_clients=n,
                threshold=default_threshold((chosen if chosen is not None else n - 1) + 1),
                bits=16,
                vector_size=1,
                neighbours=chosen,
            )
            check_device_policy(cfg)  # what every real device checks at its invitation
            if chosen is not None:
                assert chosen >= degree and chosen % 2 == 0
                # never raised beyond the devices' least: the user's degree unless it is below it
                assert chosen == degree or chosen - 2 < min_group_size(n) - 1
    assert (
        round_neighbours(10, 20) == 10 and round_neighbours(10, 40) == 12 and round_neighbours(10, 11) is None
    )
    assert round_neighbours(None, 100) is None


def test_an_in_process_round_unmasks_the_survivors_plain_sum_on_the_sparse_graph(monkeypatch) -> None:
    """The unmasked sum is the plain sum of the codes the devices fed in (recorded on the device side), with
    SecAgg+ as with the complete graph, and the two graphs give the same sum of the same codes."""
    codes: list[np.ndarray] = []
    sums: list[tuple[SecAggConfig, np.ndarray]] = []
    encode, result = RingEncoding.encode, SecAggServer.result

    def spy_encode(self, delta, weight, rng):
        codes.append(encode(self, delta, weight, rng))
        return codes[-1]

    def spy_result(self):
        sums.append((self.config, result(self)))
        return sums[-1][1]

    monkeypatch.setattr(RingEncoding, "encode", spy_encode)
    monkeypatch.setattr(SecAggServer, "result", spy_result)
    run_simulation(RunConfig(**SPARSE))
    run_simulation(RunConfig(**(SPARSE | {"secagg_neighbours": None})))
    (sparse, sparse_sum), (complete, complete_sum) = sums
    assert sparse.neighbours == 6 and sparse.threshold == 5 and complete.neighbours is None
    assert len(codes) == 16
    plain = [np.sum(np.stack(codes[i : i + 8]).astype(np.uint64), axis=0) for i in (0, 8)]
    assert np.array_equal(sparse_sum, plain[0]) and np.array_equal(complete_sum, plain[1])
    assert np.array_equal(plain[0], plain[1])  # the same codes: each device rounds with its own seed


def _codes(n: int, d: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << 8, d).astype(np.uint32) for u in range(n)}


def test_dropouts_within_each_neighbourhood_tolerance_still_unmask_and_beyond_it_fail() -> None:
    """16 devices of degree 8 (a round of 16 with secagg_neighbours=8): neighbourhoods of 9, threshold 7, so
    each tolerates 2 dropouts. Two devices drop (one before, one after its upload): the sum is the plain sum
    of the survivors' codes, as the complete graph unmasks it. Three of one device's neighbours vanishing
    after their upload leave 6 of its 9 shares: unmasking fails, it does not give a wrong sum."""
    n, degree = 16, round_neighbours(8, 16)
    assert degree == 8
    codes = _codes(n, 300, 0)
    sparse = SecAggConfig(
        n, default_threshold(degree + 1), 8, 300, neighbours=degree, round_id=1, graph_seed=7
    )
    complete = SecAggConfig(n, default_threshold(n), 8, 300, round_id=1)
    for cfg in (sparse, complete):
        total, report = run_secagg(codes, cfg, drop_before_upload={3}, drop_after_upload={11})
        assert report.survivors == [u for u in range(n) if u != 3]
        assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in report.survivors))
    target = 0
    gone = sorted(neighbours(sparse)[target])[:3]
    with pytest.raises(SecAggError, match="shares of client"):
        run_secagg(codes, sparse, drop_after_upload=gone)


def test_distributed_dp_keeps_m_min_a_count_of_the_whole_sum_under_secagg_plus(secagg_servers) -> None:
    """m_min counts the devices in the sum the server unmasks, which SecAgg+ leaves the only one it sees: its
    default stays SecAgg's threshold for the whole expected round (2·8//3 + 1 = 6), not the neighbourhood's
    (5), so each device's noise and ε are those of the complete graph. The server and devices hold that floor
    in the sparse round; the neighbourhood threshold governs share recovery only."""
    ddp = dict(dp_noise=0.5, dp_delta=1e-3, dp_noise_source="seeded")
    sparse, complete = RunConfig(**(SPARSE | ddp)), RunConfig(**(SPARSE | ddp | {"secagg_neighbours": None}))
    assert sparse.min_contributors() == complete.min_contributors() == 6
    assert sparse.device_noise_std() == complete.device_noise_std()
    a, b = run_simulation(sparse), run_simulation(complete)
    assert [(s.config.neighbours, s.config.threshold, s.min_inputs) for s in secagg_servers] == [
        (6, 5, 6),
        (None, 6, 6),
    ]
    assert [r.epsilon for r in a.rounds] == [r.epsilon for r in b.rounds]
    assert a.rounds[0].test_accuracy == b.rounds[0].test_accuracy  # the same noised codes, the same sum
