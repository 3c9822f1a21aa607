"""Compact uplink frames on Flower: delta_mod(wire="compact") and DeltaStrategy(uplink_codec=...)."""

from __future__ import annotations

import pytest
import torch
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from tests.flower.test_adapters import _add_one, _state

from deltaplane.codecs import is_compact
from deltaplane.errors import ConfigError
from deltaplane.flower import DeltaStrategy, delta_mod
from deltaplane.flower.records import UPLINK_KEY, state_to_arrays

SPEC = "topk(0.5) | quant(bits=8)"


def _run(loopback_grid, wire: str, uplink_codec: str | None):
    app = ClientApp(mods=[delta_mod(codec=SPEC, wire=wire)])
    app.train()(_add_one)

    class Recording(loopback_grid):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.received: list = []

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            self.received.extend(replies)
            return replies

    grid = Recording(app, 3)
    strategy = DeltaStrategy(
        inner=FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3),
        base_id="m",
        uplink_codec=uplink_codec,
    )
    result = strategy.start(grid, state_to_arrays(_state(0.0)), num_rounds=2)
    return strategy, result.arrays.to_torch_state_dict(), grid


def test_compact_uplink_gives_the_same_model_in_fewer_bytes(loopback_grid) -> None:
    full, want, _ = _run(loopback_grid, "self-describing", None)
    compact, got, grid = _run(loopback_grid, "compact", SPEC)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    replies = [m for m in grid.received if UPLINK_KEY in m.content.config_records]
    assert replies and all(is_compact(m.content.config_records[UPLINK_KEY]["payload"]) for m in replies)
    for a, b in zip(compact.traffic, full.traffic, strict=True):
        assert a.uplink_payload_bytes < b.uplink_payload_bytes  # the tensor table is not sent


def test_a_strategy_without_the_uplink_codec_refuses_compact_payloads(loopback_grid) -> None:
    from deltaplane.errors import InvalidUpdate

    with pytest.raises(InvalidUpdate, match="uplink_codec.*every update of the round was refused"):
        _run(loopback_grid, "compact", None)
    with pytest.raises(ConfigError):
        delta_mod(codec=SPEC, wire="tiny")


def test_one_node_sending_a_compact_frame_is_refused_and_the_round_goes_on(loopback_grid) -> None:
    """A strategy without wire sessions raised out of the round for every node when one node's payload started
    with b"DQ" (a compact frame's magic); that node is now refused like any undecodable payload."""

    def hostile(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 100:  # one node of three lies
            reply.content.config_records[UPLINK_KEY]["payload"] = b"DQ" + bytes(20)
        return reply

    app = ClientApp(mods=[hostile, delta_mod(codec="fp16")])  # +1 exactly: the honest nodes agree
    app.train()(_add_one)
    strategy = DeltaStrategy(
        inner=FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=3), base_id="m"
    )
    result = strategy.start(loopback_grid(app, 3), state_to_arrays(_state(0.0)), num_rounds=2)
    got = result.arrays.to_torch_state_dict()
    torch.testing.assert_close(got["w"], torch.full((4, 5), 2.0))  # two rounds of the honest nodes' +1
    assert [t.rejected for t in strategy.traffic] == [1, 1]
