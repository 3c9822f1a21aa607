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
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from deltaplane.choices import DEFAULT_TASK
from deltaplane.data.dataset import Dataset
from deltaplane.errors import ConfigError, DeltaplaneError, TaskError

__all__ = ["DEFAULT_TASK", "Dataset", "Task", "check_task", "load_task"]

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
        codec: the uplink codec spec ``deltaplane run`` uses for this task when neither ``--codec`` nor the
            config names one (``None``: the run's default, ``stc(0.006)`` with DGC, chosen for the digits CNN
            over tens of rounds). A task whose federated state is small and trained in few rounds, such as an
            adapter's factors and a head, names a codec measured to stay close to fp32 on it: a sparsifier
            sends a small share of each tensor per round and error feedback delivers the rest only over later
            rounds.

    A model may define ``forward_stacked(params, x)`` (``params[name]`` of shape ``(K, *shape)``,
    ``x`` of shape ``(K, B, ...)``, logits ``(K, B, classes)``): the batched engine then runs all clients as
    one computation; otherwise it uses ``torch.func.vmap`` over the plain forward.
    """

    name: str
    model: Callable[[], nn.Module]
    test: Dataset
    train: Dataset | None = None
    clients: Sequence[Dataset] | None = None
    # None (the default) is "from the labels": __post_init__ replaces it, so a built Task always holds an int;
    # typed int for every reader of a built Task, hence the cast of the default
    num_classes: int = cast(int, None)
    loss: Loss = nn.functional.cross_entropy
    options: Mapping[str, Any] = field(default_factory=dict)
    codec: str | None = None

    def __post_init__(self) -> None:
        if (self.train is None) == (self.clients is None):
            raise TaskError(
                f"task {self.name!r}: give either train (one dataset the engine partitions) or clients "
                "(one dataset per device), not both and not neither"
            )
        if self.clients is not None and not self.clients:
            raise TaskError(f"task {self.name!r}: clients is empty; give at least one device's dataset")
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 1
        ):  # a float count reached range() in the population engine as a TypeError
            raise TaskError(
                f"task {self.name!r}: num_classes must be a positive integer (the model's outputs), not "
                f"{self.num_classes!r}; leave it out to use the largest label + 1"
            )
        if self.codec is not None:  # a spec that does not parse is the task's mistake, named before any round
            from deltaplane.codecs import get_codec

            try:
                get_codec(self.codec)
            except DeltaplaneError as exc:
                raise TaskError(f"task {self.name!r}: codec {self.codec!r} does not parse: {exc}") from None
        if self.num_classes is None:
            parts = [self.test, *(self.clients or [self.train])]
            tops = [int(d.y.max()) for d in parts if len(d)]
            if not tops:
                raise TaskError(f"task {self.name!r}: its datasets hold no samples")
            object.__setattr__(self, "num_classes", max(tops) + 1)
            object.__setattr__(self, "_classes_from_labels", True)

    @property
    def num_classes_given(self) -> bool:
        """Whether ``num_classes`` was given, rather than taken as the largest label + 1 (messages say which)."""
        return not getattr(self, "_classes_from_labels", False)

    @property
    def natural_split(self) -> bool:
        """Whether the task brings its own devices (``clients``) instead of data to partition."""
        return self.clients is not None

    def build_model(self, seed: int) -> nn.Module:
        """A fresh model whose initial weights depend only on ``seed`` (the caller's RNG state is untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.model()


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: enough to say what failed, on one line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: Where Python's and installed packages' own files live: a frame there is not the user's code.
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _where(exc: BaseException) -> str:
    """``"; at file.py:line"``: the innermost frame of the user's own code (not Python's, torch's or ours) that
    ``exc`` passed through, so a one-line message still points at the line to fix; ``""`` if there is none."""
    here = str(Path(__file__).resolve().parents[1])  # deltaplane itself
    found, tb = "", exc.__traceback__
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if not file.startswith(("<", here, *_LIBRARY_DIRS)):
            found = f"; at {Path(file).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _datasets(task: Task) -> list[tuple[str, Dataset]]:
    """Every dataset of ``task`` with the name a message gives it (``test``, ``train``, ``clients[3]``)."""
    own = [(f"clients[{i}]", d) for i, d in enumerate(task.clients)] if task.clients is not None else []
    return [("test", task.test), *own, *([("train", task.train)] if task.train is not None else [])]


def _regression_refusal(task: str, name: str, y: Tensor) -> str:
    """Why float targets that are not whole numbers are refused, and what to do instead of ``y.long()``.

    ``y.long()`` is the fix for class ids saved as floats (``0.0``/``1.0``); on a regression target it
    truncates values into classes nobody meant, so a regression gets its own message.
    """
    first = y[y != y.round()][0].item()
    return (
        f"task {task!r}: {name}.y holds {str(y.dtype).removeprefix('torch.')} targets such as {first:.4g}: a "
        "regression target. The engine federates classifiers (labels are int64 class ids 0..C-1; rounds, the "
        "devices' held-out reports and deploy's gates are scored by accuracy), so regression is not supported; "
        "to federate this data, bin the target into classes with the same edges in every dataset (e.g. "
        "torch.bucketize(y, edges) with edges at quantiles of the training targets) and give the model one "
        "output per class (docs/byo.md, 'Regression')"
    )


def _check_data(task: Task) -> None:
    """Labels are int class ids in ``[0, num_classes)`` and float inputs are finite, in every dataset.

    A label out of range is an index error deep in the loss, in round 1; a NaN feature makes its device's
    every update NaN, which the server then refuses round after round without saying why.
    """
    if len(task.test) == 0:
        raise TaskError(f"task {task.name!r}: the test set is empty; every round is scored on it")
    for name, d in _datasets(task):
        if d.x.requires_grad:
            # features computed by a model outside torch.no_grad() carry its graph: the first backward pass of
            # local training freed it, and the second failed ("backward through the graph a second time")
            raise TaskError(
                f"task {task.name!r}: {name}.x requires grad (it was computed from tensors that do, e.g. by an "
                "encoder outside torch.no_grad()); pass x.detach()"
            )
        if d.y.is_floating_point() and len(d) and not bool((d.y == d.y.round()).all()):
            # a regression target: y.long() would truncate it into nonsense classes, so the advice differs
            raise TaskError(_regression_refusal(task.name, name, d.y))
        if d.y.is_floating_point() or d.y.is_complex() or d.y.dtype == torch.bool:
            raise TaskError(
                f"task {task.name!r}: {name}.y holds {str(d.y.dtype).removeprefix('torch.')} values; labels "
                "are integer class ids 0..C-1 (y.long())"
            )
        if d.y.dtype != torch.int64:
            # the test set's labels alone go through the loss in check_task; int32 training labels failed in
            # cross-entropy in round 1, uint8 ones in the batched trainer's gather (the sequential loop took them)
            raise TaskError(
                f"task {task.name!r}: {name}.y holds {str(d.y.dtype).removeprefix('torch.')} labels; the engine "
                "takes int64 class ids in every dataset (y.long())"
            )
        if len(d) and (int(d.y.min()) < 0 or int(d.y.max()) >= task.num_classes):
            raise TaskError(
                f"task {task.name!r}: {name}.y holds labels from {int(d.y.min())} to {int(d.y.max())}, but class "
                f"ids must be in [0, {task.num_classes}) (num_classes={task.num_classes}); map them to 0..C-1 "
                "or raise num_classes"
            )
        if d.x.is_floating_point() and len(d):
            bad = ~torch.isfinite(d.x.reshape(len(d), -1)).all(dim=1)
            if bool(bad.any()):
                raise TaskError(
                    f"task {task.name!r}: {name}.x has NaN or Inf values in {int(bad.sum())} samples (the first is "
                    f"sample {int(bad.nonzero()[0, 0])}); impute or drop them"
                )


def _build_checked_model(task: Task) -> nn.Module:
    """``task.model()`` as the engine calls it, or :class:`TaskError` saying what ``model`` must be."""
    if isinstance(task.model, nn.Module) or not callable(task.model):
        raise TaskError(
            f"task {task.name!r}: model must be a function that builds a fresh model (model=MyNet or "
            f"model=lambda: MyNet(...)), not a {type(task.model).__name__} instance: the engine builds one per "
            "seed and per device"
        )
    try:
        model = task.build_model(0)
    except Exception as exc:
        raise TaskError(
            f"task {task.name!r}: building the model failed ({_first_line(exc)}{_where(exc)}); check the task's "
            "options and its model function"
        ) from exc
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: model() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _label_ids(task: Task) -> Tensor:
    """The distinct label ids of all of ``task``'s datasets, sorted."""
    return torch.unique(torch.cat([d.y.reshape(-1) for _, d in _datasets(task)]))


def _check_outputs(task: Task, outputs: int) -> None:
    """:class:`TaskError` unless the model has exactly one output per class, naming both numbers.

    Fewer outputs than classes is an index error in the loss; more is accepted by the loss but wrong all the
    same: the extra logits take softmax mass and predictions, as classes no label ever names, and the population
    engine sizes its per-class statistics by ``num_classes``.
    """
    classes = task.num_classes
    if outputs == classes:
        return
    given = "num_classes" if task.num_classes_given else f"labels up to {classes - 1}"
    if outputs < classes:
        ids = _label_ids(task)
        if (
            len(ids) <= classes // 2
        ):  # most ids unused (e.g. raw ids like 10**9): a bigger layer is not the fix
            raise TaskError(
                f"task {task.name!r}: the model has {outputs} outputs but the task has {classes} classes "
                f"({given}), and the labels use only {len(ids)} distinct ids from {int(ids[0])} to {int(ids[-1])}; "
                f"map them to 0..{len(ids) - 1} (the same map for every dataset, e.g. torch.unique(y, "
                f"return_inverse=True) on all labels) and give the last layer {len(ids)} outputs"
            )
        raise TaskError(
            f"task {task.name!r}: the model has {outputs} outputs but the task has {classes} classes ({given}); "
            f"give the last layer {classes} outputs"
        )
    raise TaskError(
        f"task {task.name!r}: the model has {outputs} outputs but the task has {classes} classes ({given}); "
        f"give the last layer {classes} outputs"
        + ("" if task.num_classes_given else f", or set num_classes={outputs} if some classes have no sample")
    )


def check_task(task: Task) -> None:
    """Raise :class:`TaskError` unless the model accepts the data's inputs and has one logit per class.

    Runs the model and the loss on two test samples: a wrong input shape or dtype, a wrong number of outputs or
    labels the loss cannot take are caught here, with both shapes named, rather than as a stack trace in round 1;
    so are labels out of ``[0, num_classes)``, labels that are not int64, NaN/Inf inputs anywhere in the data,
    and training inputs of another shape or dtype than the test inputs the model was tried on.
    """
    _check_data(task)
    model = _build_checked_model(task)
    sample = task.test.x[:2]
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:
        raise TaskError(
            f"task {task.name!r}: the model rejects inputs of shape {list(sample.shape[1:])} and dtype "
            f"{str(sample.dtype).removeprefix('torch.')} ({_first_line(exc)}); make the model's input layer "
            "match the data (float inputs: x.float())"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != sample.shape[0]:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TaskError(
            f"task {task.name!r}: the model returns {shape} for a batch of {sample.shape[0]}; it must return "
            "logits of shape (batch, classes)"
        )
    _check_outputs(task, int(out.shape[1]))
    labels = task.test.y[: sample.shape[0]]
    try:
        with torch.no_grad():
            task.loss(out, labels)
    except Exception as exc:
        raise TaskError(
            f"task {task.name!r}: the loss rejects the model's output with labels of dtype "
            f"{str(labels.dtype).removeprefix('torch.')} ({_first_line(exc)}); labels are int64 class ids "
            "(y.long()) and loss(logits, y, reduction=...) must take them"
        ) from None
    # exactly one of clients and train is set (__post_init__), so this is clients, or [train]
    for d in [*(task.clients or ()), *([task.train] if task.train is not None else [])]:
        if tuple(d.x.shape[1:]) != tuple(task.test.x.shape[1:]):
            raise TaskError(
                f"task {task.name!r}: training inputs have shape {list(d.x.shape[1:])} but test inputs "
                f"{list(task.test.x.shape[1:])}; all data must share one input shape"
            )
        if d.x.dtype != task.test.x.dtype:  # only the test inputs went through the model above
            raise TaskError(
                f"task {task.name!r}: training inputs have dtype {str(d.x.dtype).removeprefix('torch.')} but "
                f"test inputs {str(task.test.x.dtype).removeprefix('torch.')}; give all data the dtype the model "
                "takes (float inputs: x.float())"
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
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise TaskError(
            f"task {spec!r}: {module_name!r} is not a module name; name the module as Python imports it "
            "('mytask:make_task' for mytask.py), from its folder or with that folder on PYTHONPATH"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if not _is_itself(module_name, exc):  # found, but something it imports is missing: not a path problem
            raise TaskError(
                f"task {spec!r}: importing module {module_name!r} failed ({_first_line(exc)}{_where(exc)}); "
                "install what it imports or fix that import"
            ) from exc
        if module_name.endswith(".py"):  # a file name typed for a module name: 'mytask.py:make_task'
            stem = module_name.removesuffix(".py")
            raise TaskError(
                f"task {spec!r}: {module_name!r} is a file name, not a module name; name the module as Python "
                f"imports it ('{stem}:{attr}' for {module_name}), from its folder or with that folder on PYTHONPATH"
            ) from None
        raise TaskError(
            f"task {spec!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); "
            "check the path and that its folder is on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module itself fails (a syntax error, a missing data file)
        raise TaskError(
            f"task {spec!r}: importing module {module_name!r} failed ({_first_line(exc)}{_where(exc)})"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        own = sorted(
            name
            for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")
        )
        listed = f"; its functions: {', '.join(own)}" if own else "; it defines no function"
        raise TaskError(f"task {spec!r}: module {module_name!r} has no callable {attr!r}{listed}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise TaskError(
            f"task {spec!r}: options {_misfits(factory, options)} do not fit the factory ({exc})"
        ) from None
    except ValueError:  # builtins without a signature: let the call itself decide
        pass
    try:
        task = factory(**options)
    except (TaskError, ConfigError):
        raise  # already says what is wrong (a Dataset of numpy arrays, a Task without data)
    except DeltaplaneError as exc:  # e.g. a Dataset of 100 inputs, 99 labels: bad task data
        raise TaskError(f"task {spec!r}: {exc}{_where(exc)}") from exc
    except Exception as exc:  # the user's code: name where it failed, keep the cause for a debugger
        raise TaskError(f"task {spec!r}: the factory failed ({_first_line(exc)}{_where(exc)})") from exc
    if not isinstance(task, Task):
        raise TaskError(
            f"task {spec!r}: the factory returned {type(task).__name__}, not a deltaplane.engine.Task"
        )
    if options and not task.options:
        object.__setattr__(task, "options", dict(options))
    check_task(task)
    return task


def _is_itself(module_name: str, exc: ImportError) -> bool:
    """Whether ``exc`` says ``module_name`` itself (or a package above it) is not found, rather than a module it
    imports: only then are the path and PYTHONPATH what to check."""
    missing = exc.name
    return missing is None or module_name == missing or module_name.startswith(missing + ".")


def _misfits(factory: Callable[..., Any], options: Mapping[str, Any]) -> list[str]:
    """The option names ``factory`` does not take (all of them when it cannot tell)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return sorted(options)
    return sorted(set(options) - set(params)) or sorted(options)
