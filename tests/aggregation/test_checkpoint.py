"""Server checkpoints (aggregation/checkpoint.py): a chain restored from a saved snapshot continues bit for bit;
a snapshot of another configuration, a malformed one or one with impossible optimizer moments is refused with a
ConfigError, and the chain it was offered to is left as it was."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch

import deltaplane as dp
from deltaplane.aggregation import ServerOptimizerState, build_aggregator
from deltaplane.aggregation.checkpoint import chain_state, load_chain_state


def _round(agg: Any, seed: int) -> dp.Delta:
    agg.reset()
    g = torch.Generator().manual_seed(seed)
    for c in range(5):
        agg.add(
            dp.Delta({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}),
            1.0 + c,
            client_id=str(c),
        )
    return agg.result()


def _saved(agg: Any) -> dict[str, Any]:
    """What a restarted process reads back: the snapshot through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(chain_state(agg), buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def _moments(agg: Any) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in agg.find(dp.FedOpt).state.state_dict().items()}


@pytest.mark.parametrize(
    "options",
    [
        {"aggregator": "fedadam"},
        {"aggregator": "fedyogi", "clip": "adaptive"},
        {"aggregator": "fedavgm", "defense": "median"},
    ],
)
def test_a_restored_chain_continues_bit_for_bit(options) -> None:
    live = build_aggregator(**options)
    for r in range(2):
        _round(live, r)
    snap = _saved(live)
    restored = build_aggregator(**options)
    load_chain_state(restored, snap)
    for r in range(2, 4):
        a, b = _round(live, r), _round(restored, r)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("saved", "offered", "field"),
    [
        ({"aggregator": "fedadam", "lr": 0.01}, {"aggregator": "fedadam", "lr": 0.5}, "lr"),
        (
            {"aggregator": "fedadam", "max_norm": 100.0},
            {"aggregator": "fedadam", "max_norm": 5.0},
            "max_norm",
        ),
        # a federation switched from seeded to OS-CSPRNG noise kept drawing the snapshot's seeded noise
        (
            {"dp_noise": 1.0, "clip": 1.0, "expected_clients": 5, "seed": 3},
            {"dp_noise": 1.0, "clip": 1.0, "expected_clients": 5, "secure_noise": True},
            "seed",
        ),
    ],
)
def test_a_snapshot_of_another_configuration_is_refused_and_changes_nothing(saved, offered, field) -> None:
    """Restoring overwrote every attribute, configuration included: a server restarted with a tighter max_norm,
    another server lr or secure DP noise ran on with the snapshot's values and said nothing."""
    old = build_aggregator(**saved)
    _round(old, 0)
    chain = build_aggregator(**offered)
    _round(chain, 1)
    before = copy.deepcopy(chain_state(chain))
    with pytest.raises(dp.ConfigError, match=f"{field}=.*configured with {field}="):
        load_chain_state(chain, _saved(old))
    after = chain_state(chain)
    assert repr(after) == repr(before)  # nothing restored halfway


def _corrupt(snap: dict[str, Any], name: str, fn) -> dict[str, Any]:
    """``snap`` with the FedAdam moments ``name`` ("m" or "v") of the chain below mapped by ``fn``."""
    snap = copy.deepcopy(snap)
    items = snap["attrs"]["inner"]["attrs"]["state"]["attrs"][name]["items"]
    for item in items:
        item[1] = fn(item[1])
    return snap


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: _corrupt(s, "m", lambda t: t * math.nan), "holds NaN"),
        (lambda s: _corrupt(s, "v", lambda t: -t - 1.0), "negative"),
        (lambda s: _corrupt(s, "v", lambda t: torch.ones(1, dtype=torch.float64)), "shape"),
        (lambda s: {k: v for k, v in s.items() if k != "attrs"}, "malformed"),
    ],
)
def test_a_corrupted_snapshot_is_refused_and_changes_nothing(mutate, match) -> None:
    """A NaN moment or a negative v was restored and the next round released a NaN update; a v of another shape
    was broadcast (a wrong step, silently); a snapshot missing a field was a bare KeyError."""
    live = build_aggregator(aggregator="fedadam")
    _round(live, 0)
    snap = _saved(live)
    chain = build_aggregator(aggregator="fedadam")
    _round(chain, 1)
    before = _moments(chain)
    with pytest.raises(dp.ConfigError, match=match):
        load_chain_state(chain, mutate(snap))
    assert all(torch.equal(before[k], t) for k, t in _moments(chain).items())
    assert _round(chain, 2).is_finite()


def test_server_optimizer_state_dicts_are_checked() -> None:
    opt = dp.FedAdam()
    opt.add(dp.Delta({"w": torch.ones(3)}))
    opt.result()
    sd = opt.state.state_dict()
    assert ServerOptimizerState.from_state_dict(sd).step == 1
    with pytest.raises(dp.ConfigError, match="step"):
        ServerOptimizerState.from_state_dict({k: t for k, t in sd.items() if k != "step"})
    with pytest.raises(dp.ConfigError, match="negative"):
        ServerOptimizerState.from_state_dict({**sd, "v.w": -sd["v.w"]})
    with pytest.raises(dp.ConfigError, match="NaN"):
        dp.FedAdam(
            state=ServerOptimizerState(step=1, m={"w": torch.full((3,), math.nan, dtype=torch.float64)})
        )


def test_a_second_moment_of_another_layout_than_the_round_is_refused() -> None:
    """Only m was compared with the round's delta: a v of shape (1,) was broadcast into every coordinate."""
    state = ServerOptimizerState(
        step=1, m={"w": torch.zeros(3, dtype=torch.float64)}, v={"w": torch.zeros(3, dtype=torch.float64)}
    )
    opt = dp.FedAdam(state=state)
    state.v["w"] = torch.ones(1, dtype=torch.float64)  # changed after the constructor's check
    opt.add(dp.Delta({"w": torch.ones(3)}))
    with pytest.raises(dp.ShapeMismatch, match="shape"):
        opt.result()


def test_another_models_moments_are_refused_at_load_given_the_layout_and_named_at_the_round_without() -> None:
    """A FedAdam snapshot of another model loaded silently and failed at the next round's close with a bare
    ShapeMismatch. Given the model's layout the restore refuses it (ConfigError naming the tensor, chain left as
    it was); without one, the round's check says the moments belong to another model."""
    from deltaplane.codecs.layout import Layout

    live = build_aggregator(aggregator="fedadam")
    _round(live, 0)  # moments for w (4, 3) and b (3,)
    snap = _saved(live)
    other = Layout.of({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    chain = build_aggregator(aggregator="fedadam")
    with pytest.raises(
        dp.ConfigError, match=r"m\['w'\] has shape \(4, 3\), this model's tensor 'w' \(2, 3\)"
    ):
        load_chain_state(chain, snap, layout=other)
    assert not chain.find(dp.FedOpt).state.m and chain.find(dp.FedOpt).state.step == 0
    load_chain_state(chain, snap, layout=Layout.of({"w": torch.zeros(4, 3), "b": torch.zeros(3)}))  # its own

    blind = build_aggregator(aggregator="fedadam")
    load_chain_state(blind, snap)  # no layout at hand: cannot tell yet
    blind.add(dp.Delta({"w": torch.ones(2, 3), "b": torch.ones(3)}), client_id="x")
    with pytest.raises(dp.ShapeMismatch, match=r"m\['w'\].*belong to another model"):
        blind.result()


def _foolsgold_history_of(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A saved FoolsGold chain after one round of 4 clients of a model with these float tensors."""
    live = build_aggregator(defense="foolsgold")
    g = torch.Generator().manual_seed(0)
    for c in range(4):
        live.add(dp.Delta({k: torch.randn(s, generator=g) for k, s in shapes.items()}), 1.0, client_id=str(c))
    live.result()
    return _saved(live)


def test_another_models_foolsgold_history_is_refused_at_load_and_named_at_the_round_without_a_layout() -> (
    None
):
    """FoolsGold's client histories of another model loaded silently, and the next round's close failed with a
    bare RuntimeError (vectors of two lengths summed) after a round of client training. Given the model's layout
    the restore refuses them (ConfigError naming the tensor, the chain left as it was); without one, the round
    says the histories belong to another model."""
    from deltaplane.aggregation.robust import FoolsGold
    from deltaplane.codecs.layout import Layout

    snap = _foolsgold_history_of({"w": (4, 3), "b": (3,)})
    for other, cause in (
        ({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, r"tensors\['w'\] has shape \(4, 3\), this model's tensor 'w' \(2, 3\)"),
        ({"w": torch.zeros(4, 3), "c": torch.zeros(3)}, r"tensors\['b'\] is for a tensor this model does not have"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(3), "e": torch.zeros(2)}, r"has no values for this model's tensor 'e'"),
    ):  # fmt: skip
        chain = build_aggregator(defense="foolsgold")
        with pytest.raises(dp.ConfigError, match=cause) as refused:
            load_chain_state(chain, snap, layout=Layout.of(other))
        assert "belong to another model" in str(refused.value)
        assert not chain.find(FoolsGold).state.history  # left as it was
    own = build_aggregator(defense="foolsgold")
    load_chain_state(own, snap, layout=Layout.of({"w": torch.zeros(4, 3), "b": torch.zeros(3)}))
    assert set(own.find(FoolsGold).state.history) == {"0", "1", "2", "3"}

    # a snapshot from before the tensors were recorded: its histories' length still tells another model
    blind = build_aggregator(defense="foolsgold")
    load_chain_state(blind, snap)  # no layout at hand: cannot tell yet
    blind.find(FoolsGold).state.tensors = {}  # as restored from a snapshot without the record
    chain2 = copy.deepcopy(blind)
    with pytest.raises(dp.ConfigError, match=r"history\['0'\] holds 15 values, this model's float tensors 9"):
        load_chain_state(
            chain2, chain_state(blind), layout=Layout.of({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
        )
    for c in range(4):
        blind.add(dp.Delta({"w": torch.ones(2, 3), "b": torch.ones(3)}), 1.0, client_id=str(c))
    with pytest.raises(dp.ShapeMismatch, match=r"history\['0'\] holds 15 values.*belong to another model"):
        blind.result()


def test_another_models_attribution_shadow_is_refused_at_load() -> None:
    """trigger_attribution keeps the mass it held out of the model as one flat vector (the shadow offset) across
    rounds: another model's loaded silently and failed at the next inversion. Given the layout it is refused."""
    from deltaplane.aggregation.attribution import BackdoorAttribution
    from deltaplane.codecs.layout import Layout

    chain = build_aggregator(defense="trigger_attribution")
    st = chain.find(BackdoorAttribution).state
    st.shadow, st.tensors = (
        torch.zeros(15),
        {"w": (4, 3), "b": (3,)},
    )  # what a round of a (4, 3) + (3,) model keeps
    snap = _saved(chain)
    fresh = build_aggregator(defense="trigger_attribution")
    with pytest.raises(
        dp.ConfigError, match=r"tensors\['w'\] has shape \(4, 3\).*shadow offset belongs to another"
    ):
        load_chain_state(fresh, snap, layout=Layout.of({"w": torch.zeros(2, 3), "b": torch.zeros(3)}))
    assert fresh.find(BackdoorAttribution).state.shadow is None
    load_chain_state(fresh, snap, layout=Layout.of({"w": torch.zeros(4, 3), "b": torch.zeros(3)}))
    assert fresh.find(BackdoorAttribution).state.shadow is not None


def test_a_foolsgold_history_no_run_makes_is_refused() -> None:
    """A NaN history or one of another length (a corrupted or hand-made snapshot) loaded silently; now
    the restore refuses it, naming the client, as the optimizer's moments are."""
    from deltaplane.aggregation.robust import FoolsGold

    snap = _foolsgold_history_of({"w": (4, 3), "b": (3,)})
    live = build_aggregator(defense="foolsgold")
    load_chain_state(live, snap)
    live.find(FoolsGold).state.history["2"][0] = math.nan
    chain = build_aggregator(defense="foolsgold")
    with pytest.raises(dp.ConfigError, match=r"history\['2'\] holds NaN"):
        load_chain_state(chain, _saved(live))
    live.find(FoolsGold).state.history["2"] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(dp.ConfigError, match="differ in length"):
        load_chain_state(chain, _saved(live))
    assert not chain.find(FoolsGold).state.history
