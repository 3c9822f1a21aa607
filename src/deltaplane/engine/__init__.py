"""The federation engine: a :class:`Task` (your model and data), one client step and one server step.

Every runtime — sequential, batched and population simulators (``deltaplane.sim``), the HTTP service
(``deltaplane.serve``), Flower (``deltaplane.flower``) — is a thin driver over :class:`ClientStep` and
:class:`ServerStep`; it decides only where a step runs and how its messages travel.

Its public names load on first use (:mod:`deltaplane.lazy`): reading a federation file
(:mod:`deltaplane.engine.config`) must not wait for torch, which the client and server steps need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.lazy import lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily (below)
    from deltaplane.data.dataset import Dataset
    from deltaplane.engine.client import ClientStep, Upload
    from deltaplane.engine.config import RunConfig, make_task
    from deltaplane.engine.federation import Client, build_clients, make_clients, sample_clients
    from deltaplane.engine.metrics import accuracy, evaluate_clients, label_mix_accuracy, logits, round_scores
    from deltaplane.engine.results import RoundMetrics, RunResult
    from deltaplane.engine.secure import deliver, secure_round
    from deltaplane.engine.server import MemoryPublisher, Publisher, RoundOutcome, ServerStep
    from deltaplane.engine.task import DEFAULT_TASK, Task, check_task, load_task

_LAZY = {
    "accuracy": "deltaplane.engine.metrics",
    "build_clients": "deltaplane.engine.federation",
    "check_task": "deltaplane.engine.task",
    "Client": "deltaplane.engine.federation",
    "ClientStep": "deltaplane.engine.client",
    "Dataset": "deltaplane.data.dataset",
    "DEFAULT_TASK": "deltaplane.engine.task",
    "deliver": "deltaplane.engine.secure",
    "evaluate_clients": "deltaplane.engine.metrics",
    "label_mix_accuracy": "deltaplane.engine.metrics",
    "load_task": "deltaplane.engine.task",
    "logits": "deltaplane.engine.metrics",
    "make_clients": "deltaplane.engine.federation",
    "make_task": "deltaplane.engine.config",
    "MemoryPublisher": "deltaplane.engine.server",
    "Publisher": "deltaplane.engine.server",
    "round_scores": "deltaplane.engine.metrics",
    "RoundMetrics": "deltaplane.engine.results",
    "RoundOutcome": "deltaplane.engine.server",
    "RunConfig": "deltaplane.engine.config",
    "RunResult": "deltaplane.engine.results",
    "sample_clients": "deltaplane.engine.federation",
    "secure_round": "deltaplane.engine.secure",
    "ServerStep": "deltaplane.engine.server",
    "Task": "deltaplane.engine.task",
    "Upload": "deltaplane.engine.client",
}

__all__ = [
    "DEFAULT_TASK",
    "Client",
    "ClientStep",
    "Dataset",
    "MemoryPublisher",
    "Publisher",
    "RoundMetrics",
    "RoundOutcome",
    "RunConfig",
    "RunResult",
    "ServerStep",
    "Task",
    "Upload",
    "accuracy",
    "build_clients",
    "check_task",
    "deliver",
    "evaluate_clients",
    "label_mix_accuracy",
    "load_task",
    "logits",
    "make_clients",
    "make_task",
    "round_scores",
    "sample_clients",
    "secure_round",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
