"""Fixtures shared across test folders.

``byo_task``: docs/byo.md's user task file, on sys.path. ``plaintext_watch``: the instrument of the "no server-side object ever holds an individual plaintext update"
tests (secure aggregation on every transport). Device-side code registers what each device must keep to itself
(its quantized codes, its float update); the test then feeds the watch every byte the server side received
and every object it holds, and the watch fails if any registered pattern shows up.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

BYO_DOC = Path(__file__).resolve().parents[1] / "docs" / "byo.md"


def stateful_settings(examples: int, steps: int) -> Any:
    """Hypothesis settings of a state-machine test: ``examples`` runs of up to ``steps`` steps in CI,
    ``$DP_STATEFUL_EXAMPLES`` runs to search longer; no deadline (a step may write to disk)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("DP_STATEFUL_EXAMPLES", examples)),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@pytest.fixture
def one_thread():
    """torch on one intra-op thread during the test, as the simulator and the CLI run it: a float reduction
    sums in the same order everywhere, so results recorded or compared across runs stay the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def byo_task(tmp_path, monkeypatch) -> str:
    """docs/byo.md's ``mytask.py`` (the block starting ``# mytask.py``), written into a user folder on sys.path,
    as a reader would save it; yields the task path ``"mytask:make_task"``."""
    blocks = re.findall(r"```python\n(.*?)```", BYO_DOC.read_text(), re.S)
    (tmp_path / "mytask.py").write_text(next(b for b in blocks if b.startswith("# mytask.py")))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mytask:make_task"
    sys.modules.pop("mytask", None)


BIG_TASK = """
import torch
from torch import nn

from deltaplane.engine import Dataset, Task


def make_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300_000, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return Task(name="big", model=lambda: nn.Linear(2, 2), train=Dataset(x[:-1000], y[:-1000]),
                test=Dataset(x[-1000:], y[-1000:]))
"""


@pytest.fixture
def big_task(tmp_path, monkeypatch) -> str:
    """A user's task whose two devices (``clients=2``) each hold ~120,000 training samples, more than a server's
    default bound on a claimed example count (100,000); yields its task path."""
    (tmp_path / "bigtask.py").write_text(BIG_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "bigtask:make_task"
    sys.modules.pop("bigtask", None)


TIED_TASK = """
import torch
from torch import nn

from deltaplane.engine import Dataset, Task


class TiedMLP(nn.Module):
    \"\"\"A hidden layer used twice under two names (one parameter, as a tied embedding and output head).\"\"\"

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.hidden = nn.Linear(width, width)
        self.again = nn.Linear(width, width)
        self.again.weight = self.hidden.weight
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.hidden(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.again(h)))


def make_task(width: int = 32) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return Task(name="tied", model=lambda: TiedMLP(width), train=Dataset(x[:500], y[:500]),
                test=Dataset(x[500:], y[500:]))
"""


@pytest.fixture
def tied_task(tmp_path, monkeypatch) -> str:
    """A user's task whose model ties one weight under two names (``hidden.weight`` and ``again.weight``, the
    kept name); yields its task path."""
    (tmp_path / "tiedtask.py").write_text(TIED_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiedtask:make_task"
    sys.modules.pop("tiedtask", None)


DIVERGING_TASK = """
import torch
from torch import nn

from deltaplane.engine import Dataset, Task


def margin_mse(logits, y, reduction="mean"):
    per = (logits[:, 1] - logits[:, 0] - (2 * y - 1).float()) ** 2
    return per if reduction == "none" else per.mean()


def make_task(scale: float = 3.0) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * scale
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return Task(name="margin", model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
                train=Dataset(x[:500], y[:500]), test=Dataset(x[500:], y[500:]), loss=margin_mse)
"""


BN_TASK = """
import torch
from torch import nn

from deltaplane.engine import Dataset, Task


def make_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(480, 6, generator=g)
    x[:, 0] = x[:, 0] * 4 + 2  # features of different scales: what the norm layers learn
    y = ((x[:, 0] - 2) / 4 + x[:, 1] - 0.5 * x[:, 2] > 0).long()
    return Task(name="bn", model=lambda: nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                                        nn.Linear(16, 2)),
                train=Dataset(x[:400], y[:400]), test=Dataset(x[400:], y[400:]))
"""


@pytest.fixture
def bn_task(tmp_path, monkeypatch) -> str:
    """A user's task whose model has a batch-norm layer (``1.weight``, ``1.bias`` and its running statistics),
    what FedBN keeps on each device; yields its task path."""
    (tmp_path / "bntask.py").write_text(BN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "bntask:make_task"
    sys.modules.pop("bntask", None)


@pytest.fixture
def diverging_task(tmp_path, monkeypatch) -> str:
    """A user's regression-style task (a squared-error loss on the logits' margin, inputs of std 3) whose
    training diverges at lr 0.05 within one round (scale=1 trains at lr 0.05); yields its task path."""
    (tmp_path / "divtask.py").write_text(DIVERGING_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "divtask:make_task"
    sys.modules.pop("divtask", None)


@pytest.fixture
def watch_passes(monkeypatch) -> list[int]:
    """One entry per forward pass the divergence watch runs of its own (``DivergenceWatch.loss``, still
    computed): a driver that hands it its round scoring's loss runs one, for the initial model."""
    from deltaplane.engine.divergence import DivergenceWatch

    calls: list[int] = []
    real = DivergenceWatch.loss

    def counting(self: DivergenceWatch, state: dict) -> float:
        calls.append(1)
        return real(self, state)

    monkeypatch.setattr(DivergenceWatch, "loss", counting)
    return calls


class PlaintextWatch:
    """Byte patterns of plaintext updates that must never reach the server, and the checks that look for them."""

    def __init__(self) -> None:
        self.patterns: dict[bytes, str] = {}
        self.arrays: list[np.ndarray] = []

    def add_codes(self, codes: np.ndarray, *, bits: int, ring_bits: int, label: str) -> None:
        """A device's plaintext ring codes, as the server would see them unmasked (packed or raw)."""
        from deltaplane.aggregation.secagg import pack

        codes = np.asarray(codes, dtype=np.uint32)
        self.arrays.append(codes.copy())
        n = len(codes)
        starts = sorted({0, (n // 2) // 8 * 8, max(0, (n - 64) // 8 * 8)})
        for i in starts:
            win = codes[i : i + 64]
            if len(win) < 16:
                continue
            for k in {bits, ring_bits, 8, 16, 32}:
                if k in (8, 16) and win.max() >= 1 << k:
                    continue
                self.patterns[pack(win, k)] = f"{label}: codes[{i}:{i + len(win)}] packed at {k} bits"

    def add_floats(self, values: torch.Tensor | np.ndarray, *, label: str) -> None:
        """A device's float update (as float32, float64 and float16 bytes)."""
        flat = torch.as_tensor(values).reshape(-1).detach().cpu()
        n = flat.numel()
        for i in sorted({0, n // 2, max(0, n - 16)}):
            win = flat[i : i + 16]
            if win.numel() < 8 or not bool(win.abs().sum() > 0):
                continue
            for dt in (torch.float32, torch.float64, torch.float16):
                self.patterns[win.to(dt).numpy().tobytes()] = f"{label}: values[{i}:{i + 16}] as {dt}"

    def check_bytes(self, data: bytes | bytearray | memoryview, where: str) -> None:
        data = bytes(data)
        for pat, label in self.patterns.items():
            if pat in data:
                raise AssertionError(f"plaintext reached the server: {label} found in {where}")

    def check_object(self, root: Any, where: str, *, depth: int = 10) -> int:
        """Walk ``root`` (attributes, containers, arrays, tensors, bytes); returns how many leaves were checked."""
        seen: set[int] = set()
        count = 0

        def walk(obj: Any, d: int, path: str) -> None:
            nonlocal count
            if d > depth or id(obj) in seen:
                return
            seen.add(id(obj))
            if isinstance(obj, bytes | bytearray | memoryview):
                count += 1
                self.check_bytes(obj, f"{where}{path}")
            elif isinstance(obj, np.ndarray):
                count += 1
                for a in self.arrays:
                    if obj.shape == a.shape and np.array_equal(obj.astype(np.uint64), a):
                        raise AssertionError(f"plaintext codes held at {where}{path}")
                if obj.dtype != object:
                    self.check_bytes(obj.tobytes(), f"{where}{path}")
            elif isinstance(obj, torch.Tensor):
                count += 1
                if obj.numel():
                    self.check_bytes(obj.detach().cpu().contiguous().numpy().tobytes(), f"{where}{path}")
            elif isinstance(obj, dict):
                for k, v in list(obj.items()):
                    walk(k, d + 1, f"{path}[{k!r}]")
                    walk(v, d + 1, f"{path}[{k!r}]")
            elif isinstance(obj, list | tuple | set | frozenset):
                for i, v in enumerate(list(obj)):
                    walk(v, d + 1, f"{path}[{i}]")
            elif isinstance(obj, str | int | float | bool | type(None)):
                return
            else:
                attrs = getattr(obj, "__dict__", None)
                if attrs is None and hasattr(obj, "__slots__"):
                    attrs = {s: getattr(obj, s, None) for s in obj.__slots__}
                if isinstance(attrs, dict):
                    for k, v in list(attrs.items()):
                        walk(v, d + 1, f"{path}.{k}")

        walk(root, 0, "")
        return count


@pytest.fixture
def plaintext_watch() -> PlaintextWatch:
    gc.collect()
    return PlaintextWatch()


@pytest.fixture
def secagg_servers(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every :class:`~deltaplane.aggregation.secagg.SecAggServer` any driver builds during the test (in process,
    the service's rounds, Flower's strategy), in order: what graph and floor each driver really ran."""
    from deltaplane.aggregation.secagg import SecAggServer

    built: list[SecAggServer] = []
    init = SecAggServer.__init__

    def spy(self: SecAggServer, config: Any, **kwargs: Any) -> None:
        init(self, config, **kwargs)
        built.append(self)

    monkeypatch.setattr(SecAggServer, "__init__", spy)
    return built


class PlanStarted(Exception):
    """Raised instead of running ``deltaplane run``'s plan: the command got past every check, the driver's
    preflight included (the ``no_runs`` fixture)."""


@pytest.fixture
def no_runs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record each plan ``deltaplane run`` would execute (a list of ``(name, RunConfig)``), run nothing: the command
    then stops with ``PlanStarted``."""
    from deltaplane import cli

    plans: list = []

    def execute(plan):
        plans.append(plan)
        raise PlanStarted

    monkeypatch.setattr(cli, "_execute", execute)
    return plans


@pytest.fixture
def registry_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The ``registry``/``keys`` commands on a home of their own (``tmp_path / "home"``): ``registry_cli(*args)``."""
    import typer
    from typer.testing import CliRunner

    from deltaplane.commands.ops import register as register_ops

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register_ops(app)
    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])
