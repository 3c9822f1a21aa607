"""Distillation's dropout is seeded, and a monitor only watches: it cannot move the training's masks."""

from __future__ import annotations

import torch
from tests import random_layers as rl
from torch import nn

from deltaplane.deploy.recovery import distill_recover


def _distill(seed: int, monitor=None) -> nn.Module:
    teacher = rl.dropout_mlp().eval()
    calibration = rl.toy_data(n=60)[0].numpy()
    recover = distill_recover(
        teacher, calibration, task="classification", epochs=3, lr=0.01, seed=seed, monitor=monitor
    )
    student = rl.dropout_mlp()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)  # a damaged copy to recover
    recover(student, None)
    return student


def test_distillation_reproduces_from_its_seed_with_dropout() -> None:
    rl.check_seeded(_distill)


def test_a_monitor_that_draws_random_numbers_does_not_move_the_masks() -> None:
    """Before: the monitor ran inside the training's seeded fork, so a monitor that drew from torch's generator
    (a sampled evaluation) changed the dropout masks of every later step, and the recovered weights."""

    def sampling_monitor(model: nn.Module) -> dict[str, float]:
        return {"noise": float(torch.rand(3).sum())}

    assert rl.weights_hash(_distill(0, sampling_monitor)) == rl.weights_hash(_distill(0))


def test_distillation_leaves_the_accelerators_generators_as_it_found_them(monkeypatch) -> None:
    """torch.manual_seed inside a CPU-only fork seeded every CUDA device (or queued the seed for CUDA's start)
    without restoring it; the distillation now seeds exactly what it forks (deltaplane.seeding)."""
    cuda_seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    before = rl.weights_hash(_distill(7))
    assert 7 not in cuda_seeds  # (the helpers' torch.manual_seed(0) for the models' init are theirs)
    monkeypatch.undo()
    assert rl.weights_hash(_distill(7)) == before  # the same weights: the CPU seeding is as before
