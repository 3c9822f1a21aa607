"""ServerStep.state_dict(): a server that stops between rounds and loads it continues bit for bit (the service
stores it with every round: tests/serve/test_rounds.py). Each chain here holds state that lives across rounds."""

from __future__ import annotations

import io

import pytest
import torch

from deltaplane.aggregation import FedOpt
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig, ServerStep, make_task
from deltaplane.errors import ConfigError

CHAINS = {
    "fedadam + stochastic downlink": {
        "aggregator": "fedadam",
        "downlink_codec": "topk(0.2) | quant(bits=8, stochastic=true)",
    },
    "adaptive-clip DP": {"clip": "adaptive", "dp_noise": 0.5},
    "fedyogi + fixed-clip DP": {"aggregator": "fedyogi", "clip": "1.0", "dp_noise": 0.3},
    "foolsgold": {"defense": "foolsgold"},
    "flame": {"defense": "flame(noise=0.001)"},
    "norm bound with noise": {"defense": "norm_bound(max_norm=0.5, noise=0.001)"},
    "fedper": {"personalization": "fedper"},
}


def _rounds(cfg: RunConfig, rounds: int, *, restart_at: int | None = None, snapshot: bool = True):
    task = make_task(cfg)
    init = {k: v.detach().clone() for k, v in task.build_model(0).state_dict().items()}
    step = ServerStep.for_run(cfg, task, init, base_id="m")
    for rnd in range(1, rounds + 1):
        if rnd == restart_at:  # a new process: a fresh step, the weights from the registry, the saved state
            buf = io.BytesIO()
            torch.save(step.state_dict(), buf)
            state = step.state
            step = ServerStep.for_run(cfg, task, init, base_id="m")
            if snapshot:
                step.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            step.open(rnd, version=rnd - 1, state=state)
        else:
            step.open(rnd)
        for c in range(4):
            g = torch.Generator().manual_seed(100 * rnd + c)
            step.receive_delta(
                str(c),
                Delta(
                    {
                        k: 0.05 * torch.randn(v.shape, generator=g)
                        for k, v in init.items()
                        if k not in step.local_keys
                    }
                ),
                10 + c,
            )
        step.close()
    return step.state


@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_restored_server_step_continues_bit_for_bit(chain) -> None:
    cfg = RunConfig(clients=4, **CHAINS[chain])
    straight = _rounds(cfg, 4)
    restored = _rounds(cfg, 4, restart_at=3)
    assert all(torch.equal(straight[k], restored[k]) for k in straight)


def test_without_the_snapshot_a_stateful_chain_drifts() -> None:
    cfg = RunConfig(clients=4, **CHAINS["fedadam + stochastic downlink"])
    straight, fresh = _rounds(cfg, 4), _rounds(cfg, 4, restart_at=3, snapshot=False)
    assert not all(torch.equal(straight[k], fresh[k]) for k in straight)


def test_a_snapshot_of_another_chain_is_refused() -> None:
    task = make_task(RunConfig())
    init = {k: v.detach().clone() for k, v in task.build_model(0).state_dict().items()}
    adam = ServerStep.for_run(RunConfig(aggregator="fedadam"), task, init, base_id="m")
    plain = ServerStep.for_run(RunConfig(), task, init, base_id="m")
    with pytest.raises(ConfigError, match="checkpoint holds a FedAdam"):
        plain.load_state_dict(adam.state_dict())


def _trained_step(cfg: RunConfig):
    """(task, initial weights, a server step after one round of 4 clients' random deltas, its saved snapshot)."""
    task = make_task(cfg)
    init = {k: v.detach().clone() for k, v in task.build_model(0).state_dict().items()}
    trained = ServerStep.for_run(cfg, task, init, base_id="m")
    trained.open(1)
    for c in range(4):
        g = torch.Generator().manual_seed(c)
        trained.receive_delta(
            str(c), Delta({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in init.items()}), 1
        )
    trained.close()
    snap = io.BytesIO()
    torch.save(trained.state_dict(), snap)
    return task, init, trained, snap


def test_a_snapshot_of_another_models_run_is_refused_at_load() -> None:
    """FedAdam's moments of another model (other tensor names or shapes) loaded without error; the mismatch
    surfaced only as a ShapeMismatch at the next round's close, after a round of client training. The step
    knows its model's layout: the restore refuses them, naming the tensor, and leaves the step as it was."""
    cfg = RunConfig(clients=4, aggregator="fedadam")
    task, init, _, snap = _trained_step(cfg)

    name = next(
        k for k, v in init.items() if v.dim() == 2
    )  # a weight matrix, one output more in the other model
    wider = dict(init) | {name: torch.zeros(init[name].shape[0] + 1, *init[name].shape[1:])}
    for other, cause in (
        (wider, f"m['{name}'] has shape"),
        ({**init, "extra.weight": torch.zeros(3)}, "extra.weight"),
    ):
        step = ServerStep.for_run(cfg, task, other, base_id="m")
        with pytest.raises(ConfigError, match="belong to another model") as refused:
            step.load_state_dict(torch.load(io.BytesIO(snap.getvalue()), weights_only=True))
        assert cause in str(refused.value)
        assert not step.aggregator.find(FedOpt).state.m  # left as it was: nothing restored
    same = ServerStep.for_run(cfg, task, init, base_id="m")
    same.load_state_dict(torch.load(io.BytesIO(snap.getvalue()), weights_only=True))  # its own model: loads


def test_a_downlink_residual_of_another_dtype_is_refused_at_load() -> None:
    """A downlink residual with this model's names and shapes but another dtype (float16, float64, int64: a
    snapshot edited or written by other code) loaded and failed only as a ShapeMismatch at the next round's
    close, after a round of client training. It is refused at load, naming the tensor and both dtypes, and
    nothing is restored."""
    cfg = RunConfig(clients=4, aggregator="fedadam", downlink_codec="topk(0.2)")
    task, init, _, snap = _trained_step(cfg)
    state = torch.load(io.BytesIO(snap.getvalue()), weights_only=True)
    name = next(iter(state["downlink"]["residual"]))
    for dtype in (torch.float16, torch.float64, torch.int64):
        residual = dict(state["downlink"]["residual"]) | {name: state["downlink"]["residual"][name].to(dtype)}
        step = ServerStep.for_run(cfg, task, init, base_id="m")
        with pytest.raises(ConfigError, match="downlink error feedback belongs to another model") as refused:
            step.load_state_dict({**state, "downlink": {**state["downlink"], "residual": residual}})
        assert f"[{name!r}] is {dtype}, this model's tensor {name!r} torch.float32" in str(refused.value)
        assert step.publisher.compressor.state.residual is None  # left as it was: nothing restored
        assert not step.aggregator.find(FedOpt).state.m
    same = ServerStep.for_run(cfg, task, init, base_id="m")
    same.load_state_dict(state)  # the snapshot as written loads


def test_a_downlink_residual_of_another_model_is_refused_at_load() -> None:
    """The downlink compressor's error-feedback residual of another model (other tensor names or shapes) loaded
    without error and failed only as a ShapeMismatch at the next round's close. It is refused at load, naming
    the tensor, before anything is restored: the chain's moments and the downlink are left as they were."""
    cfg = RunConfig(clients=4, aggregator="fedadam", downlink_codec="topk(0.2)")
    task, init, trained, snap = _trained_step(cfg)
    assert trained.publisher.compressor.state.residual is not None  # a lossy downlink keeps one

    name = next(k for k, v in init.items() if v.dim() == 2)
    wider = dict(init) | {name: torch.zeros(init[name].shape[0] + 1, *init[name].shape[1:])}
    for other, cause in (
        (wider, f"residual['{name}'] has shape"),
        ({**init, "extra.weight": torch.zeros(3)}, "no residual for this model's tensor 'extra.weight'"),
    ):
        step = ServerStep.for_run(cfg, task, other, base_id="m")
        with pytest.raises(ConfigError, match="downlink error feedback belongs to another model") as refused:
            step.load_state_dict(torch.load(io.BytesIO(snap.getvalue()), weights_only=True))
        assert cause in str(refused.value)
        assert step.publisher.compressor.state.residual is None  # left as it was: nothing restored
        assert step.publisher.compressor.state.rounds == 0
        assert not step.aggregator.find(FedOpt).state.m
        assert step.version == 0
    # another downlink codec: a ConfigError too, and again before the chain is restored
    step = ServerStep.for_run(RunConfig(clients=4, aggregator="fedadam", downlink_codec="topk(0.1)"), task, init,
                              base_id="m")  # fmt: skip
    with pytest.raises(ConfigError, match="codec 'topk"):
        step.load_state_dict(torch.load(io.BytesIO(snap.getvalue()), weights_only=True))
    assert not step.aggregator.find(FedOpt).state.m
    same = ServerStep.for_run(cfg, task, init, base_id="m")
    same.load_state_dict(torch.load(io.BytesIO(snap.getvalue()), weights_only=True))  # its own model: loads
    assert (
        same.publisher.compressor.state.residual.keys() == trained.publisher.compressor.state.residual.keys()
    )
