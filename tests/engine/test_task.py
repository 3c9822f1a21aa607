"""Loading a task by import path: the default digits task, and one-line typed errors for every mistake."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from deltaplane.engine import DEFAULT_TASK, RunConfig, Task, load_task, make_task
from deltaplane.engine.task import Dataset
from deltaplane.errors import TaskError, UnsupportedOption


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A task module in a user folder, outside the package (as a user would write it)."""
    (tmp_path / "mytasks.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from deltaplane.engine import Task, Dataset

            def _data(n, features, classes, seed):
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(n, features, generator=g)
                return Dataset(x, (x[:, 0] > 0).long() % classes)

            def good(features=4):
                return Task(name="toy", model=lambda: nn.Linear(features, 2),
                            train=_data(200, features, 2, 0), test=_data(50, features, 2, 1))

            def wrong_input():
                return Task(name="toy", model=lambda: nn.Linear(7, 2),
                            train=_data(200, 4, 2, 0), test=_data(50, 4, 2, 1))

            def too_few_outputs():
                t = good()
                return Task(name="toy", model=lambda: nn.Linear(4, 1), train=t.train, test=t.test)

            def too_many_outputs(num_classes=None):
                t = good()
                return Task(name="toy", model=lambda: nn.Linear(4, 10), train=t.train, test=t.test,
                            num_classes=num_classes)

            def sparse_labels():  # raw ids (e.g. a database's): 3 classes named 0, 7 and 10**9
                t, ids = good(), torch.tensor([0, 7, 10**9])
                g = torch.Generator().manual_seed(2)
                train, test = (Dataset(d.x, ids[torch.randint(0, 3, (len(d),), generator=g)])
                               for d in (t.train, t.test))
                return Task(name="toy", model=lambda: nn.Linear(4, 3), train=train, test=test)

            def not_a_task():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mytasks"
    sys.modules.pop("mytasks", None)


def test_default_task_is_digits() -> None:
    task = load_task(DEFAULT_TASK)
    assert task.name == "digits" and task.num_classes == 10
    assert len(task.train) == 1438 and len(task.test) == 359
    assert sum(p.numel() for p in task.build_model(0).parameters()) == 18_346


def test_user_task_loads_with_options(user_module: str) -> None:
    task = load_task(f"{user_module}:good", {"features": 4})
    assert task.name == "toy" and task.num_classes == 2 and task.options == {"features": 4}


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("no_such_module_xyz:make", {}, "module 'no_such_module_xyz' does not import"),
        # the factories are listed, so a misspelt name is a one-glance fix
        (
            "mytasks:missing",
            {},
            "has no callable 'missing'; its functions: good, not_a_task, sparse_labels, too_few_outputs",
        ),
        # a file name for a module name was "'mytasks' is not a package", which names no fix
        (
            "mytasks.py:good",
            {},
            r"'mytasks.py' is a file name, not a module name.*\('mytasks:good' for mytasks.py\)",
        ),
        ("mytasks", {}, "expected 'package.module:factory'"),
        ("mytasks:good", {"colour": "red"}, "options \\['colour'\\] do not fit the factory"),
        ("mytasks:not_a_task", {}, "returned int, not a deltaplane.engine.Task"),
        ("mytasks:wrong_input", {}, "the model rejects inputs of shape \\[4\\]"),
        (
            "mytasks:too_few_outputs",
            {},
            r"the model has 1 outputs but the task has 2 classes \(labels up to 1\); ",
        ),
        # more outputs than classes was accepted silently (extra logits take predictions)
        (
            "mytasks:too_many_outputs",
            {},
            r"10 outputs but the task has 2 classes \(labels up to 1\); .*num_classes=10",
        ),
        (
            "mytasks:too_many_outputs",
            {"num_classes": 3},
            r"10 outputs but the task has 3 classes \(num_classes\); give",
        ),
    ],
)
def test_bad_tasks_are_one_line_task_errors(user_module, spec, options, match) -> None:
    with pytest.raises(TaskError, match=match) as info:
        load_task(spec, options)
    assert "\n" not in str(info.value)


def test_sparse_label_ids_are_told_to_be_mapped_not_given_a_billion_outputs(user_module) -> None:
    # labels 0, 7 and 10**9 said "give the last layer 1000000001 outputs"
    with pytest.raises(TaskError) as info:
        load_task(f"{user_module}:sparse_labels")
    msg = str(info.value)
    assert "only 3 distinct ids from 0 to 1000000000; map them to 0..2" in msg
    assert "the model has 3 outputs but the task has 1000000001 classes (labels up to 1000000000)" in msg
    assert msg.endswith("give the last layer 3 outputs") and "\n" not in msg


def test_task_needs_exactly_one_kind_of_training_data() -> None:
    data = Dataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TaskError, match="either train .* or clients"):
        Task(name="t", model=lambda: nn.Linear(2, 2), test=data)
    with pytest.raises(TaskError, match="either train .* or clients"):
        Task(name="t", model=lambda: nn.Linear(2, 2), test=data, train=data, clients=[data])


def test_digits_options_are_refused_for_another_task(user_module: str) -> None:
    cfg = RunConfig(task=f"{user_module}:good", train_shifts=2)
    with pytest.raises(UnsupportedOption, match="train_shifts are options of the digits task"):
        make_task(cfg)


def test_train_shifts_reach_the_digits_task() -> None:
    assert len(make_task(RunConfig(train_shifts=2)).train) == 3 * 1438


def test_digits_task_has_an_mlp_option() -> None:
    task = load_task(DEFAULT_TASK, {"model": "mlp"})
    assert sum(p.numel() for p in task.build_model(0).parameters()) == 2_410
    wide = load_task(DEFAULT_TASK, {"model": "cnn_wide"}).build_model(0)
    assert sum(p.numel() for p in wide.parameters()) == 1_078_666  # the ≥1M-parameter frontier model
    assert wide(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(TaskError, match="model must be one of \\['cnn', 'cnn_wide', 'mlp'\\]"):
        load_task(DEFAULT_TASK, {"model": "resnet"})


def test_make_task_reloads_a_task_module_edited_in_the_same_process(tmp_path, monkeypatch) -> None:
    # make_task cached by path and options only, and import returned the module already loaded: a notebook that
    # rewrote mytask.py kept getting the old task. Both rewrites below keep the file's size and whole-second
    # mtime (what Python's bytecode check compares), the hardest case for a reload.
    import os

    source = textwrap.dedent(
        """
        import torch
        from torch import nn
        from deltaplane.engine import Dataset, Task

        def make():
            x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
            y = (x[:, 0] > 0).long()
            return Task(name="{name}", model=lambda: nn.Linear(3, 2), train=Dataset(x[20:], y[20:]),
                        test=Dataset(x[:20], y[:20]))
        """
    )
    path = tmp_path / "edited_task.py"
    second = (os.stat(tmp_path).st_mtime_ns // 10**9) * 10**9

    def write(name: str, ms: int) -> None:
        path.write_text(source.replace("{name}", name))
        os.utime(path, ns=(second + ms * 10**6, second + ms * 10**6))

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_task", raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as for most users: a stale .pyc could be reused
    cfg = RunConfig(task="edited_task:make")
    try:
        write("v1", 100)
        first = make_task(cfg)
        assert first.name == "v1" and make_task(cfg) is first  # unchanged: the cached task
        write("v2", 200)
        assert make_task(cfg).name == "v2"
        write("v3", 300)
        again = make_task(cfg)
        assert again.name == "v3" and make_task(cfg) is again
    finally:
        sys.modules.pop("edited_task", None)
