"""SecAgg and DP on a model with an integer tensor in its uploads (BatchNorm's ``num_batches_tracked``): before,
every device's update was refused at the server round after round (``NotPrivatizable``), and the run ended
"successfully" without one update (distributed DP: test accuracy flat from round 1; SecAgg alone: a
``SecAggError`` in round 1). Now every driver refuses it before the run, naming the tensor and the fixes; with
FedBN the norms stay on the devices and the run trains."""

from __future__ import annotations

import sys

import pytest

from deltaplane.apps.runner import preflight, run_federation
from deltaplane.engine import RunConfig
from deltaplane.errors import UnsupportedOption

BN_TASK = """
import torch
from torch import nn

from deltaplane.engine import Dataset, Task


def make_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return Task(name="bn", model=lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
                train=Dataset(x[40:], y[40:]), test=Dataset(x[:40], y[:40]))
"""


@pytest.fixture
def bn_task(tmp_path, monkeypatch) -> str:
    (tmp_path / "bntask.py").write_text(BN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "bntask:make_task"
    sys.modules.pop("bntask", None)


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"secagg": True}, "SecAgg"),
        ({"clip": "1.0", "dp_noise": 0.8}, "DP"),
        ({"clip": "1.0", "dp_noise": 0.8, "secagg": True}, "SecAgg and DP"),
        ({"clip": "1.0", "local_dp_noise": 0.5, "dp_delta": 1e-3}, "DP"),
    ],
)
@pytest.mark.parametrize("driver", [{"engine": "sequential"}, {"engine": "batched"}, {"transport": "http"}])
def test_secagg_and_dp_refuse_an_integer_buffer_before_the_run(bn_task, options, what, driver) -> None:
    cfg = RunConfig(task=bn_task, clients=3, rounds=1, **driver, **options)
    with pytest.raises(
        UnsupportedOption,
        match=rf"^{what} cannot carry the model's non-float tensors 1\.num_batches_tracked \(int64\): .*"
        r"--personalization fedbn.*track_running_stats=False",
    ):
        preflight(cfg)


def test_fedbn_keeps_the_norms_on_the_devices_and_dp_trains(bn_task) -> None:
    cfg = RunConfig(task=bn_task, clients=3, rounds=2, clip="1.0", dp_noise=0.3, personalization="fedbn")
    preflight(cfg)
    result = run_federation(cfg.replace(codec="identity"))
    assert result.final.test_accuracy > 0.6
    assert (
        int(result.final_state["1.num_batches_tracked"]) == 0
    )  # never uploaded: the global one is untouched


@pytest.mark.parametrize("options", [{"secagg": True}, {"clip": 1.0, "dp_noise": 0.5}])
def test_a_fleet_device_refuses_an_integer_upload_at_start(bn_task, options) -> None:
    # `fleet device` builds its model from the same federation file: under SecAgg or DP the service would refuse
    # its every update; it says why before it trains (before it even asks the service for anything)
    from deltaplane.serve.fleet import load_device

    config = RunConfig(task=bn_task, clients=3, rounds=1, **options)
    with pytest.raises(UnsupportedOption, match="num_batches_tracked"):
        load_device(None, config, 0, model="bn")  # type: ignore[arg-type]  # never reached: refused first
