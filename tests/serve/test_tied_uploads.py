"""A plain service (``deltaplane serve`` without ``--federation``) and a model with tied weights: it has no task,
so it cannot know which names are one parameter, and it does not take them from the device or from equal values
(engine.tied). A device's untied update (its aliases left out) is refused as before, but the refusal now says
why and what to do; an update of every name is taken as always."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.engine.tied import tied_aliases, untie
from deltaplane.serve import ServiceError

from .conftest import Service


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 4)
        self.again = nn.Linear(4, 4)
        self.again.weight = self.hidden.weight


def _round_and_delta(tmp_path):
    torch.manual_seed(0)
    net = _Tied()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    svc = Service(tmp_path / "h", initial=state)
    r = svc.admin.open_round("cnn")
    delta = Delta({k: torch.full_like(v, 0.01) for k, v in state.items()})
    return svc, r, delta, tied_aliases(net)


def _upload(svc, r, delta, device="d1"):
    payload = Compressor("identity").compress(delta, base_id="cnn", base_version=r["base_version"])
    return svc.device(device).upload("cnn", r["round"], payload, nonce=r["nonce"])


def test_an_untied_update_is_refused_with_what_to_do(tmp_path) -> None:
    svc, r, delta, aliases = _round_and_delta(tmp_path)
    with pytest.raises(ServiceError) as e:
        _upload(svc, r, untie(delta, aliases))
    assert e.value.status == 422
    assert "missing ['hidden.weight']" in e.value.detail  # the layout's own words, as before
    assert "leaves out 'hidden.weight' (equal to 'again.weight')" in e.value.detail
    assert "deltaplane serve --federation <file>" in e.value.detail
    assert "or have the devices upload every name of the state dict" in e.value.detail


def test_an_update_of_every_name_is_taken_and_the_names_stay_equal(tmp_path) -> None:
    svc, r, delta, _ = _round_and_delta(tmp_path)
    _upload(svc, r, delta)
    version = svc.admin.close_round("cnn", r["round"])["version"]
    state = svc.reg.load_state(f"cnn@{version}")
    assert torch.equal(state["hidden.weight"], state["again.weight"])


def test_an_update_missing_a_tensor_with_no_equal_twin_keeps_the_plain_refusal(tmp_path) -> None:
    svc, r, delta, _ = _round_and_delta(tmp_path)
    with pytest.raises(ServiceError) as e:
        _upload(svc, r, Delta({k: v for k, v in delta.items() if k != "again.bias"}))
    assert e.value.status == 422 and "missing ['again.bias']" in e.value.detail
    assert "tied" not in e.value.detail


def test_equal_twins_names_candidates_only_where_values_are_equal() -> None:
    from deltaplane.engine.tied import equal_twins

    state = {"a": torch.ones(3), "b": torch.ones(3), "c": torch.zeros(3), "d": torch.ones(2)}
    assert equal_twins(["a", "c", "d", "nope"], ["b"], state) == {"a": "b"}
