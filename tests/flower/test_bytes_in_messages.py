"""The Flower driver reports the bytes its messages carried: checked against the records a grid saw go to and
come back from the nodes (each reply's uplink payload or SecAgg message, each instruction's downlink chain),
not against the strategy's own counters. Flower's real ServerApp and ClientApps on a loopback grid."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Context, Message, RecordDict
from tests.default_run import SMALL_DEFAULT_RUN

from deltaplane.flower import task_client_app, task_server_app
from deltaplane.flower.records import CONTROL_KEY, DOWNLINK_KEY, UPLINK_KEY
from deltaplane.flower.secagg import SECAGG_KEY
from deltaplane.sim import RunConfig, run_simulation

CFG = SMALL_DEFAULT_RUN.replace(rounds=3)


def _tapped(grid_type: type) -> type:
    class Tapped(grid_type):  # type: ignore[misc, valid-type]
        """The loopback grid, noting per round what each reply carried up and which downlink payloads went down."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.round = 1
            self.up: dict[int, int] = {}
            #: version v → the payload taking a node from v to v + 1, and how many nodes were sent it
            self.down: dict[int, tuple[bytes, int]] = {}

        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> list[Message]:
            messages = list(messages)
            for msg in messages:
                content = msg.content
                if DOWNLINK_KEY in content:
                    start = int(content.config_records[CONTROL_KEY]["downlink-from"])
                    for v, payload in enumerate(content.config_records[DOWNLINK_KEY]["payloads"], start):
                        got, n = self.down.get(v, (bytes(payload), 0))
                        assert got == payload  # one payload per version, the same to every node
                        self.down[v] = (got, n + 1)
            replies = super().send_and_receive(messages, timeout=timeout)
            for reply in replies:
                if reply.has_error():
                    continue
                records = reply.content.config_records
                sent = len(records[UPLINK_KEY]["payload"]) if UPLINK_KEY in records else 0
                sent += len(records[SECAGG_KEY]["message"]) if SECAGG_KEY in records else 0
                self.up[self.round] = self.up.get(self.round, 0) + sent
            return replies

    return Tapped


def _run(cfg: RunConfig, loopback_grid: type) -> tuple[list, object]:
    rounds: list = []
    grid = _tapped(loopback_grid)(task_client_app(cfg), cfg.clients)

    def on_round(metrics, traffic) -> None:
        rounds.append(metrics)
        grid.round += 1

    server = task_server_app(cfg, on_round=on_round, on_done=lambda s, st: None)
    server(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return rounds, grid


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_flower_round_bytes_are_what_its_messages_carried(loopback_grid, secagg: bool) -> None:
    cfg = CFG.replace(secagg=True, clip="2.0", downlink_codec="identity") if secagg else CFG
    rounds, grid = _run(cfg, loopback_grid)
    # uplink: each node's payload (under SecAgg every protocol message it sent), counted from the replies
    assert [r.uplink_bytes for r in rounds] == [grid.up[r] for r in (1, 2, 3)]
    assert [r.uplink_bytes for r in rounds] == [r.uplink_bytes for r in run_simulation(cfg).rounds]
    # downlink: round r's payload, which every node is sent (in the next instruction's chain) to stay in sync;
    # the last round's travels after the run, so no message carries it
    sent = [grid.down[v] for v in (0, 1)]
    assert all(nodes == cfg.clients for _, nodes in sent)
    assert [r.downlink_bytes for r in rounds[:2]] == [len(p) * nodes for p, nodes in sent]


@pytest.mark.slow
def test_run_flower_raw_fp32_bytes_leave_out_fedper_head() -> None:
    """``run_flower`` (Ray) states one update's raw fp32 size as the other drivers do: FedPer's head (fc2) stays
    on the node, so it is not part of what the report's "vs raw fp32" divides."""
    from deltaplane.flower.engine import run_flower

    result = run_flower(RunConfig(clients=2, rounds=1, local_epochs=1, personalization="fedper"), num_cpus=1)
    sizes = {k: v.numel() * v.element_size() for k, v in result.final_state.items()}
    assert result.raw_update_bytes == sum(n for k, n in sizes.items() if not k.startswith("fc2."))
    assert result.raw_update_bytes == run_simulation(result.config).raw_update_bytes
