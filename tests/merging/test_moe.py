"""Mixture of experts: routing learned from task labels or expert labels; only selected experts run."""

import pytest
import torch
from torch import nn

import deltaplane as dp
from deltaplane.merging import MixtureOfExperts


def _domains(n: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two domains: label = sign of feature 1, but in domain 1 features are negated (an "inverted" domain)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    dom = (torch.arange(n) % 2).long()
    y = (x[:, 1] > 0).long()
    x = torch.where(dom[:, None] == 1, -x, x)
    x[:, 3] = dom.float() * 3 - 1.5  # a feature that reveals the domain (what a router can learn to read)
    return x, y, dom


def _expert(sign: float) -> dict[str, torch.Tensor]:
    w = torch.zeros(2, 4)
    w[1, 1], w[0, 1] = sign, -sign
    return {"weight": w, "bias": torch.zeros(2)}


def test_router_learns_from_task_labels_alone() -> None:
    x, y, dom = _domains()
    moe = MixtureOfExperts.from_states(nn.Linear(4, 2), [_expert(1.0), _expert(-1.0)], top_k=1, hidden=16)
    losses = moe.fit_router(x, y, epochs=30, lr=0.03, seed=0)
    assert losses[-1] < losses[0]
    acc = (moe(x).argmax(1) == y).float().mean().item()
    assert acc > 0.97
    # each expert alone is right on only its own domain: 50% overall
    for e in moe.experts:
        assert abs((e(x).argmax(1) == y).float().mean().item() - 0.5) < 0.06
    assert (moe.route(x)[1][:, 0] == dom).float().mean() > 0.97


def test_top2_gates_sum_to_one_and_only_selected_experts_run() -> None:
    x, _y, _dom = _domains(64)
    experts = [_expert(1.0), _expert(-1.0), _expert(0.5)]
    moe = MixtureOfExperts.from_states(nn.Linear(4, 2), experts, top_k=2)
    gates, index = moe.route(x)
    assert gates.shape == (64, 2) and torch.allclose(gates.sum(1), torch.ones(64))
    calls = []
    for i, e in enumerate(moe.experts):
        e.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0].shape[0])))
    out = moe(x)
    ran = sum(n for _, n in calls)
    # output is exactly the gate-weighted sum of the two chosen experts
    manual = torch.stack(
        [
            sum(gates[b, j] * moe.experts[int(index[b, j])](x[b : b + 1])[0] for j in range(2))
            for b in range(64)
        ]
    )
    assert torch.allclose(out, manual, atol=1e-6)
    assert ran == 64 * 2  # each example ran through exactly two experts


def test_from_deltas_and_bad_arguments() -> None:
    base = nn.Linear(4, 2)
    d = dp.Delta.between(base.state_dict(), _expert(1.0))
    moe = MixtureOfExperts.from_states(base, [d, d])
    assert torch.allclose(moe.experts[0].weight, _expert(1.0)["weight"], atol=1e-6)
    with pytest.raises(dp.ConfigError, match="top_k"):
        MixtureOfExperts.from_states(base, [d], top_k=2)
    with pytest.raises(dp.ShapeMismatch, match="expert 0"):
        MixtureOfExperts.from_states(base, [{"weight": torch.zeros(3, 4), "bias": torch.zeros(2)}])
    with pytest.raises(dp.ConfigError, match="needs task labels"):
        moe.fit_router(torch.zeros(2, 4))
