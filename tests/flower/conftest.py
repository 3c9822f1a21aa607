"""Fixtures for driving deltaplane's Flower adapters in process: a Grid that calls ClientApps directly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

pytest.importorskip("flwr", reason="the 'flower' extra is not installed")

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every new Message with the running task's identity, which a SuperLink would set."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


#: Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
CLIENT_APP_RAISED_EXCEPTION = 2


class LoopbackGrid:
    """A Flower Grid stand-in: node *i* (id ``node_ids[i]``, default ``100 + i``) runs ``app`` with
    partition-id *i* and its own persistent Context, called synchronously. A ClientApp that raises answers
    with an error reply, as Flower's runtimes do (``vce_api.py``, ``run_clientapp.py``). Everything but the
    transport is Flower's real code path."""

    def __init__(self, app: ClientApp, num_nodes: int, node_ids: list[int] | None = None) -> None:
        self.app = app
        ids = node_ids if node_ids is not None else [100 + i for i in range(num_nodes)]
        self.contexts = {
            ids[i]: Context(
                run_id=1,
                node_id=ids[i],
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
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # what Flower's runtime does with any ClientApp exception
                error = Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>")
                replies.append(Message(error, reply_to=msg))
        return replies


@pytest.fixture
def loopback_grid() -> type[LoopbackGrid]:
    return LoopbackGrid


@pytest.fixture
def run_flower(loopback_grid: type[LoopbackGrid], tmp_path_factory: pytest.TempPathFactory):
    """``run_flower(cfg)``: the run's task on Flower's ServerApp over the loopback grid; returns the rounds'
    metrics and the final model state. Under ``cfg.secagg_authenticated`` each node is enrolled in its
    node_config as ``deltaplane run --engine flower`` enrolls it (``enroll_nodes``)."""
    from deltaplane.flower import task_client_app, task_server_app
    from deltaplane.flower.engine import enroll_nodes

    def run(cfg: Any) -> tuple[list, dict]:
        rounds: list = []
        finals: dict = {}
        server = task_server_app(
            cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
        )
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        nodes = enroll_nodes(cfg, str(tmp_path_factory.mktemp("enrollment")))
        server(grid=loopback_grid(task_client_app(cfg, node_configs=nodes), cfg.clients), context=context)
        return rounds, finals

    return run
