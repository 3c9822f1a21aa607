"""A client's base record (meta 'deltaplane.base_sha256' in a self-describing upload) never reaches the round's
aggregate: the round's base is named by the session's base version, and a record carried into the downlink
would make every device's apply check against a base a client claimed (one client could stop the fleet)."""

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation.factory import build_aggregator


def _client(i: int) -> dp.Delta:
    g = torch.Generator().manual_seed(i)
    d = dp.Delta({"w": torch.randn(64, generator=g), "b": torch.randn(8, generator=g)})
    return d.with_base_sha256("f" * 64)  # what a decoded upload carrying the key looks like


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"server_lr": 0.5},
        {"aggregator": "fedadam"},
        {"clip": 1.0},
        {"clip": "adaptive", "expected_clients": 5},
        {"clip": 1.0, "dp_noise": 0.5, "expected_clients": 5},
        {"max_norm": 100.0},
        {"defense": "trimmed_mean(0.2)"},
        {"defense": "median"},
        {"defense": "krum"},
        {"defense": "multi_krum"},
        {"defense": "norm_bound(max_norm=2.0)"},
        {"defense": "flame"},
        {"defense": "sign_vote"},
    ],
)
@pytest.mark.parametrize("clients", [1, 5])
def test_no_aggregate_carries_a_client_record(options: dict, clients: int) -> None:
    if clients == 1 and options.get("defense") in ("krum", "multi_krum"):
        pytest.skip("Krum needs more than 4 clients")
    agg = build_aggregator(**options)
    for i in range(clients):
        agg.add(_client(i), 1.0)
    result = agg.result()
    assert result.base_sha256 is None
    assert list(result) == ["w", "b"]
