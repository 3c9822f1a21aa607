"""The federation engine: a :class:`Task` (your model and data), one client step and one server step.

Every runtime — sequential, batched and population simulators (``deltaplane.sim``), the HTTP service
(``deltaplane.serve``), Flower (``deltaplane.flower``) — is a thin driver over :class:`ClientStep` and
:class:`ServerStep`; it decides only where a step runs and how its messages travel.
"""

from deltaplane.data.dataset import Dataset
from deltaplane.engine.client import ClientStep, Upload
from deltaplane.engine.config import RunConfig, make_task
from deltaplane.engine.federation import Client, build_clients, make_clients, sample_clients
from deltaplane.engine.metrics import accuracy, evaluate_clients, label_mix_accuracy, logits, round_scores
from deltaplane.engine.results import RoundMetrics, RunResult
from deltaplane.engine.secure import deliver, secure_round
from deltaplane.engine.server import MemoryPublisher, Publisher, RoundOutcome, ServerStep
from deltaplane.engine.task import DEFAULT_TASK, Task, check_task, load_task

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
