import logging
import math

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import validate_update


def test_one_bad_client_never_poisons_or_aborts_the_round(caplog) -> None:
    like = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    agg = dp.Validate(dp.FedAvg(), like=like, expected_version="v7", max_norm=100.0)
    good = dp.Delta({"w": torch.ones(2, 2), "b": torch.ones(2)})
    bad = {
        "nan": dp.Delta({"w": torch.full((2, 2), math.nan), "b": torch.ones(2)}),
        "inf": dp.Delta({"w": torch.ones(2, 2), "b": torch.tensor([math.inf, 0.0])}),
        "shape": dp.Delta({"w": torch.ones(3, 2), "b": torch.ones(2)}),
        "names": dp.Delta({"w": torch.ones(2, 2)}),
        "norm": dp.Delta({"w": torch.full((2, 2), 1e3), "b": torch.ones(2)}),
    }
    with caplog.at_level(logging.WARNING, logger="deltaplane.aggregation"):
        assert agg.add(good, 1.0, base_version="v7", client_id="ok1")
        for cid, d in bad.items():
            assert not agg.add(d, 1.0, base_version="v7", client_id=cid)
        assert not agg.add(good, 1.0, base_version="v6", client_id="stale")
        assert not agg.add(good, 1.0, client_id="unversioned")
        assert not agg.add(good, -1.0, base_version="v7", client_id="negweight")
        assert agg.add(3 * good, 1.0, base_version="v7", client_id="ok2")
    assert agg.result()["w"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    kinds = {r.client_id: type(r.error) for r in agg.rejections}
    assert kinds == {
        "nan": dp.InvalidUpdate,
        "inf": dp.InvalidUpdate,
        "shape": dp.ShapeMismatch,
        "names": dp.ShapeMismatch,
        "norm": dp.InvalidUpdate,
        "stale": dp.VersionMismatch,
        "unversioned": dp.VersionMismatch,
        "negweight": dp.InvalidUpdate,
    }
    assert agg.measurements["rejected"] == 8.0 and agg.measurements["accepted"] == 2.0
    assert sum("rejected update from client" in r.message for r in caplog.records) == 8


def test_raise_mode_and_first_update_sets_layout() -> None:
    agg = dp.Validate(dp.FedAvg(), on_invalid="raise")
    agg.add(dp.Delta({"w": torch.ones(2)}))
    with pytest.raises(dp.ShapeMismatch):
        agg.add(dp.Delta({"w": torch.ones(3)}))
    assert agg.result()["w"].tolist() == [1.0, 1.0]
    with pytest.raises(dp.InvalidUpdate, match="must be a deltaplane.Delta"):
        validate_update({"w": torch.ones(2)})


def test_bad_update_rejected_inside_a_dp_chain_leaves_state_clean() -> None:
    agg = dp.Validate(dp.DPFedAvg(clip=1.0, noise_multiplier=0.0), max_norm=50.0)
    assert agg.add(dp.Delta({"w": torch.tensor([0.0, 2.0])}))
    assert not agg.add(dp.Delta({"w": torch.tensor([0.0, 99.0])}))
    assert agg.result()["w"].tolist() == [0.0, 1.0]
    assert agg.measurements["clipped_fraction"] == 1.0
