"""Fixtures for driving deltaplane's Flower adapters in process: a Grid that calls ClientApps directly."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

pytest.importorskip("flwr", reason="the 'flower' extra is not installed")

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every new Message with the running task's identity, which a SuperLink would set."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class LoopbackGrid:
    """A Flower Grid stand-in: node *i* (id ``100 + i``) runs ``app`` with partition-id *i* and its own
    persistent Context, called synchronously. Everything but the transport is Flower's real code path."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


@pytest.fixture
def loopback_grid() -> type[LoopbackGrid]:
    return LoopbackGrid
