"""A :class:`Task`: the user's model and data, all the federation engine needs to know about them.

A task is a value: a model factory, the training data (one pooled dataset that the engine partitions across
devices, or one dataset per device when the data comes naturally split, like LEAF's Shakespeare by speaker),
a test set, a loss in ``torch.nn.functional`` style, and optionally a model method ``forward_stacked`` for the
batched engine's fast path. Users select one by import path, ``--task mypkg.tasks:make_task`` or ``task:`` in
the YAML; :func:`load_task` imports the factory, calls it and checks that model and data fit, so a mistake is
one :class:`~deltaplane.errors.TaskError` naming what to fix, before any round runs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.choices import TASKS
from deltaplane.data.dataset import Dataset
from deltaplane.errors import TaskError

__all__ = ["DEFAULT_TASK", "Dataset", "Task", "check_task", "load_task"]

#: The task ``deltaplane run`` federates unless told otherwise (the built-in ``digits``).
DEFAULT_TASK: str = TASKS["digits"].target  # type: ignore[assignment]

#: Loss signature: ``loss(logits, labels, reduction="mean" | "none")``, as ``torch.nn.functional`` losses.
Loss = Callable[..., Tensor]


@dataclass(frozen=True, eq=False)
class Task:
    """A model and its data, ready to federate.

    Args:
        name: short name used in reports and payload headers (``"digits"``).
        model: builds a fresh model; the engine calls it under a seeded RNG, so initial weights are a pure
            function of the run's seed.
        test: the global test set every round is scored on.
        train: pooled training data that the engine partitions across devices (Dirichlet label skew), used
            when ``clients`` is None.
        clients: one training dataset per device (a natural split); each is split into train and holdout.
        num_classes: number of output classes (default: largest label in the data + 1).
        loss: ``loss(logits, y, reduction=...)``; cross-entropy by default.
        options: the keyword options the factory was called with (recorded in reports).

    A model may define ``forward_stacked(params, x)`` (``params[name]`` of shape ``(K, *shape)``,
    ``x`` of shape ``(K, B, ...)``, logits ``(K, B, classes)``): the batched engine then runs all clients as
    one computation; otherwise it uses ``torch.func.vmap`` over the plain forward.
    """

    name: str
    model: Callable[[], nn.Module]
    test: Dataset
    train: Dataset | None = None
    clients: Sequence[Dataset] | None = None
    num_classes: int | None = None
    loss: Loss = nn.functional.cross_entropy
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.train is None) == (self.clients is None):
            raise TaskError(
                f"task {self.name!r}: give either train (one dataset the engine partitions) or clients "
                "(one dataset per device), not both and not neither"
            )
        if self.clients is not None and not self.clients:
            raise TaskError(f"task {self.name!r}: clients is empty; give at least one device's dataset")
        if self.num_classes is None:
            parts = [self.test, *(self.clients or [self.train])]  # type: ignore[list-item]
            top = max(int(d.y.max()) for d in parts if len(d))
            object.__setattr__(self, "num_classes", top + 1)

    @property
    def natural_split(self) -> bool:
        """Whether the task brings its own devices (``clients``) instead of data to partition."""
        return self.clients is not None

    def build_model(self, seed: int) -> nn.Module:
        """A fresh model whose initial weights depend only on ``seed`` (the caller's RNG state is untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.model()


def check_task(task: Task) -> None:
    """Raise :class:`TaskError` unless the model accepts the data's inputs and has one logit per class.

    Runs the model on two test samples: a wrong input shape, a wrong number of outputs or a label beyond the
    outputs is caught here, with both shapes named, rather than as a stack trace in round 1.
    """
    model = task.build_model(0)
    sample = task.test.x[:2]
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:
        raise TaskError(
            f"task {task.name!r}: the model rejects inputs of shape {list(sample.shape[1:])} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); make the model's input "
            "layer match the data"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != sample.shape[0]:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TaskError(
            f"task {task.name!r}: the model returns {shape} for a batch of {sample.shape[0]}; it must return "
            "logits of shape (batch, classes)"
        )
    if out.shape[1] < task.num_classes:  # type: ignore[operator]
        raise TaskError(
            f"task {task.name!r}: the model has {out.shape[1]} outputs but the labels go up to "
            f"{task.num_classes - 1}; give the last layer {task.num_classes} outputs"  # type: ignore[operator]
        )
    for d in task.clients or [task.train]:  # type: ignore[list-item]
        if tuple(d.x.shape[1:]) != tuple(task.test.x.shape[1:]):
            raise TaskError(
                f"task {task.name!r}: training inputs have shape {list(d.x.shape[1:])} but test inputs "
                f"{list(task.test.x.shape[1:])}; all data must share one input shape"
            )


def load_task(spec: str | Task, options: Mapping[str, Any] | None = None) -> Task:
    """The :class:`Task` that ``spec`` names (``"package.module:factory"``), built with ``options``, checked.

    The factory is any callable returning a :class:`Task`; ``options`` are passed to it as keywords (the
    ``task_options`` of a run config). A :class:`Task` passes through (checked).

    Raises:
        TaskError: the path is malformed or does not import, the factory is missing or rejects an option, it
            does not return a Task, or the model and data disagree in shape (:func:`check_task`).
    """
    options = dict(options or {})
    if isinstance(spec, Task):
        if options:
            raise TaskError("task options apply to a task factory path, not to a ready Task")
        check_task(spec)
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise TaskError(f"task {spec!r}: expected 'package.module:factory', e.g. {DEFAULT_TASK!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"task {spec!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); "
            "check the path and that its folder is on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(f"task {spec!r}: module {module_name!r} has no callable {attr!r}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise TaskError(f"task {spec!r}: options {sorted(options)} do not fit the factory ({exc})") from None
    except ValueError:  # builtins without a signature: let the call itself decide
        pass
    task = factory(**options)
    if not isinstance(task, Task):
        raise TaskError(
            f"task {spec!r}: the factory returned {type(task).__name__}, not a deltaplane.engine.Task"
        )
    if options and not task.options:
        object.__setattr__(task, "options", dict(options))
    check_task(task)
    return task
