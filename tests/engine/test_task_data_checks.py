"""A user's task with odd data or an odd model is one TaskError at load, naming what to fix — never an index
error in the loss in round 1, a NaN device the server refuses forever, or a traceback from the user's code.

Each factory below is a mistake a newcomer makes (docs/byo.md's task with one thing changed); the test loads it
as ``deltaplane run --task`` does, and then runs the CLI on two of them for the exit code and the one line.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
from typer.testing import CliRunner

from deltaplane.engine import load_task
from deltaplane.errors import TaskError

ODD = """
import numpy as np
import torch
from torch import nn
from deltaplane.engine import Dataset, Task

g = torch.Generator().manual_seed(0)
X = torch.randn(200, 6, generator=g)
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()  # classes 0, 1, 2


def mlp(out=3):
    return lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, out))


def task(train=None, test=None, **kw):
    train = Dataset(X[40:], Y[40:]) if train is None else train
    test = Dataset(X[:40], Y[:40]) if test is None else test
    return Task(name="odd", model=kw.pop("model", mlp()), train=train, test=test, **kw)


def numpy_arrays():  # straight from scikit-learn
    return task(Dataset(X[40:].numpy(), Y[40:].numpy()), Dataset(X[:40].numpy(), Y[:40].numpy()))

def string_labels():
    names = np.array(["low", "mid", "high"])[Y.numpy()]
    return task(Dataset(X[40:], names[40:]), Dataset(X[:40], names[:40]))

def float_labels():
    return task(Dataset(X[40:], Y[40:].float()), Dataset(X[:40], Y[:40].float()))

def regression_targets():  # a float target, as for an MSE head
    t = X[:, 0] * 0.5 + 0.1
    return task(Dataset(X[40:], t[40:]), Dataset(X[:40], t[:40]), model=mlp(1), num_classes=1)

def column_labels():
    return task(Dataset(X[40:], Y[40:, None]))

def negative_labels():  # -1 .. 1
    return task(Dataset(X[40:], Y[40:] - 1), Dataset(X[:40], Y[:40] - 1))

def label_beyond_num_classes():
    y = Y.clone()
    y[100] = 7
    return task(Dataset(X[40:], y[40:]), num_classes=3)

def int32_labels():
    return task(Dataset(X[40:], Y[40:].int()), Dataset(X[:40], Y[:40].int()))

def int32_train_labels():  # the test set's are int64: only they go through the loss at load
    return task(Dataset(X[40:], Y[40:].int()))

def uint8_labels():  # cross-entropy takes them; the batched trainer's gather did not
    return task(Dataset(X[40:], Y[40:].to(torch.uint8)), Dataset(X[:40], Y[:40].to(torch.uint8)))

def float64_train_inputs():  # the test set's are float32: only they go through the model at load
    return task(Dataset(X[40:].double(), Y[40:]))

def float64_inputs():
    return task(Dataset(X[40:].double(), Y[40:]), Dataset(X[:40].double(), Y[:40]))

def num_classes_float():
    return task(num_classes=3.0)

def num_classes_zero():
    return task(num_classes=0)

def features_with_grad():  # embeddings from an encoder run outside torch.no_grad()
    x = X * torch.ones(6, requires_grad=True)
    return task(Dataset(x[40:], Y[40:]), Dataset(x[:40], Y[:40]))

def empty_test():
    return task(test=Dataset(X[:0], Y[:0]))

def nan_feature():
    x = X.clone()
    x[57, 2] = float("nan")
    return task(Dataset(x[40:], Y[40:]))

def model_instance():
    return task(model=mlp()())

def model_fails(hidden="abc"):
    return task(model=lambda: nn.Linear(6, hidden))

def factory_fails():
    raise FileNotFoundError("data/patients.csv")

def mismatched_lengths():
    return task(Dataset(X[40:], Y[41:]))
"""


@pytest.fixture
def odd(tmp_path, monkeypatch):
    (tmp_path / "oddtasks.py").write_text(textwrap.dedent(ODD))
    (tmp_path / "brokenmod.py").write_text("def make_task(:\n")
    (tmp_path / "needsdep.py").write_text("import not_installed_dep_xyz\n\ndef make_task():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "oddtasks"
    for name in ("oddtasks", "brokenmod", "needsdep"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (
            "numpy_arrays",
            r"Dataset x must be a torch.Tensor, not numpy.ndarray; convert it with torch.as_tensor",
        ),
        ("string_labels", r"Dataset y must be a torch.Tensor, not numpy.ndarray.*map strings to 0..C-1"),
        ("float_labels", r"test.y holds float32 values; labels are integer class ids 0..C-1 \(y.long\(\)\)"),
        (
            "regression_targets",
            r"test.y holds float32 targets such as -?\d\.\d+: a regression target\. The engine federates "
            r"classifiers .*regression is not supported; .*bin the target into classes .*docs/byo.md, 'Regression'",
        ),
        ("column_labels", r"one class id per sample, shape \(N,\); got shape \[160, 1\].*y.squeeze\(1\)"),
        ("negative_labels", r"test.y holds labels from -1 to 1, but class ids must be in \[0, 2\)"),
        ("label_beyond_num_classes", r"train.y holds labels from 0 to 7, but class ids must be in \[0, 3\)"),
        ("int32_labels", r"test.y holds int32 labels; the engine takes int64 class ids .*\(y.long\(\)\)"),
        (
            "int32_train_labels",
            r"train.y holds int32 labels; the engine takes int64 class ids .*\(y.long\(\)\)",
        ),
        ("uint8_labels", r"test.y holds uint8 labels; the engine takes int64 class ids .*\(y.long\(\)\)"),
        (
            "float64_train_inputs",
            r"training inputs have dtype float64 but test inputs float32; .*\(float inputs: x.float\(\)\)",
        ),
        ("float64_inputs", r"rejects inputs of shape \[6\] and dtype float64.*x.float\(\)"),
        ("num_classes_float", r"num_classes must be a positive integer \(the model's outputs\), not 3.0"),
        ("num_classes_zero", r"num_classes must be a positive integer \(the model's outputs\), not 0"),
        ("features_with_grad", r"test.x requires grad .*outside torch.no_grad\(\)\); pass x.detach\(\)"),
        ("empty_test", r"the test set is empty"),
        ("nan_feature", r"train.x has NaN or Inf values in 1 samples \(the first is sample 17\)"),
        ("model_instance", r"model must be a function that builds a fresh model.*not a Sequential instance"),
        ("model_fails", r"building the model failed \(TypeError: .*; at oddtasks.py:\d+\)"),
        ("factory_fails", r"the factory failed \(FileNotFoundError: data/patients.csv; at oddtasks.py:\d+\)"),
        ("mismatched_lengths", r"dataset has 160 inputs but 159 labels; at oddtasks.py:\d+"),
    ],
)
def test_odd_data_and_models_are_one_line_task_errors(odd: str, factory: str, match: str) -> None:
    with pytest.raises(TaskError, match=match) as info:
        load_task(f"{odd}:{factory}")
    assert "\n" not in str(info.value)


def test_a_regression_target_is_not_told_to_become_class_ids_by_truncation(odd: str) -> None:
    # y.long() is right for class ids saved as floats (float_labels) but truncates a regression target into
    # classes nobody meant: the message for real-valued targets says regression is not supported instead
    with pytest.raises(TaskError) as info:
        load_task(f"{odd}:regression_targets")
    assert "y.long()" not in str(info.value)
    with pytest.raises(TaskError, match=r"\(y.long\(\)\)"):
        load_task(f"{odd}:float_labels")


def test_a_module_that_fails_to_import_or_a_file_path_is_a_task_error(odd: str) -> None:
    with pytest.raises(TaskError, match=r"importing module 'brokenmod' failed \(SyntaxError"):
        load_task("brokenmod:make_task")
    with pytest.raises(
        TaskError, match=r"'\./oddtasks' is not a module name.*'mytask:make_task' for mytask.py"
    ):
        load_task("./oddtasks:numpy_arrays")


def test_a_missing_dependency_of_the_task_module_is_not_blamed_on_the_path(odd: str) -> None:
    # the module is found; what it imports is not installed: the path and PYTHONPATH are not what to fix
    with pytest.raises(TaskError) as info:
        load_task("needsdep:make_task")
    message = str(info.value)
    assert (
        "importing module 'needsdep' failed (ModuleNotFoundError: No module named 'not_installed_dep_xyz'"
        in message
    )
    assert "at needsdep.py:1" in message and "install what it imports" in message
    assert "PYTHONPATH" not in message
    # a module that is not there still points at the path
    with pytest.raises(TaskError, match=r"module 'nosuchmod_xyz' does not import .*PYTHONPATH"):
        load_task("nosuchmod_xyz:make_task")
    with pytest.raises(TaskError, match=r"module 'oddtasks.sub' does not import .*PYTHONPATH"):
        load_task("oddtasks.sub:make_task")


def test_an_option_the_factory_lacks_is_named_alone(odd: str) -> None:
    with pytest.raises(TaskError, match=r"options \['colour'\] do not fit"):
        load_task(f"{odd}:model_fails", {"hidden": 4, "colour": "red"})


def test_the_cli_prints_one_line_and_exits_2(odd: str, tmp_path) -> None:
    from deltaplane.cli import app

    for factory, words in (
        ("negative_labels", "class ids must be in [0, 2)"),
        ("factory_fails", "patients.csv"),
    ):
        out = tmp_path / factory
        result = CliRunner().invoke(app, ["run", "--task", f"{odd}:{factory}", "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
        assert not out.exists()
