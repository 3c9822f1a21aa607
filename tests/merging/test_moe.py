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


def _two_experts(**kwargs) -> MixtureOfExperts:
    return MixtureOfExperts.from_states(nn.Linear(4, 2), [_expert(1.0), _expert(-1.0)], **kwargs)


def test_empty_batch_gives_an_empty_output() -> None:
    """A batch of no examples routes to no expert and gives an empty output of the experts' shape (it crashed in
    the flattening and then on 'no expert ran')."""
    moe = _two_experts(top_k=2)
    gates, index = moe.route(torch.zeros(0, 4))
    assert gates.shape == (0, 2) and index.shape == (0, 2)
    assert moe(torch.zeros(0, 4)).shape == (0, 2)
    image = MixtureOfExperts.from_states(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
        [{"1.weight": torch.eye(2, 4), "1.bias": torch.zeros(2)}],
    )
    assert image(torch.zeros(0, 1, 2, 2)).shape == (0, 2)
    with pytest.raises(dp.ConfigError, match="no examples"):
        moe.fit_router(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


def test_tied_gates_go_to_the_lowest_expert_indices() -> None:
    """Equal router scores pick the first experts in order, the same on every input (topk left it to the kernel:
    experts 2 and 4 of 5 on CPU)."""
    moe = MixtureOfExperts([nn.Linear(4, 2) for _ in range(5)], in_features=4, top_k=2)
    with torch.no_grad():
        for p in moe.router.parameters():
            p.zero_()
    gates, index = moe.route(torch.randn(50, 4))
    assert (index == torch.tensor([0, 1])).all() and torch.allclose(gates, torch.full((50, 2), 0.5))


def test_fit_router_refuses_labels_that_do_not_fit() -> None:
    """Bad labels are a ConfigError naming what to fix, before training (they were IndexErrors from inside
    cross_entropy, or ran and trained on nothing)."""
    x, y, dom = _domains(32)
    moe = _two_experts()
    for bad, match in [
        (dict(expert_labels=dom + 1), "expert_labels must be expert indices in \\[0, 2\\)"),
        (dict(expert_labels=dom.float()), "expert_labels must be integer"),
        (dict(expert_labels=dom[:10]), "expert_labels has 10 labels for 32 examples"),
        (dict(y=y[:10]), "y has 10 labels for 32 examples"),
        (dict(y=y + 5), "y must be class indices in \\[0, 2\\)"),
    ]:
        with pytest.raises(dp.ConfigError, match=match):
            moe.fit_router(x, epochs=1, **bad)
    for bad in [dict(lr=float("nan")), dict(epochs=1.5), dict(batch_size=2.0), dict(lr=float("inf"))]:
        with pytest.raises(dp.ConfigError, match="must be positive"):
            moe.fit_router(x, y, **{"epochs": 1, **bad})
    with pytest.raises(dp.ConfigError, match="top_k must be an integer"):
        _two_experts(top_k=1.5)


def test_fit_router_refuses_non_finite_inputs() -> None:
    """One NaN feature made every loss NaN and left a router whose every output is NaN; now it is refused."""
    x, _y, dom = _domains(32)
    x[3, 0] = float("nan")
    moe = _two_experts()
    before = [p.clone() for p in moe.router.parameters()]
    with pytest.raises(dp.ConfigError, match="1 example"):
        moe.fit_router(x, expert_labels=dom, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, moe.router.parameters(), strict=True))


def test_experts_of_different_output_shapes_are_named() -> None:
    moe = MixtureOfExperts([nn.Linear(4, 2), nn.Linear(4, 3)], in_features=4, top_k=2)
    x, y, _dom = _domains(16)
    with pytest.raises(dp.ShapeMismatch, match="expert 1 gives outputs of shape \\(3,\\), expert 0 \\(2,\\)"):
        moe(x)
    with pytest.raises(dp.ShapeMismatch, match="expert 1 gives outputs of shape \\(3,\\), expert 0 \\(2,\\)"):
        moe.fit_router(x, y, epochs=1)


def test_fit_router_keeps_a_custom_routers_normalisation_layers() -> None:
    """fit_router re-initialises the router from its seed; a LayerNorm's weight must come back as 1 (its own
    init), not 0, which silenced the whole router: constant logits, every example routed to expert 0."""
    router = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    moe = MixtureOfExperts([nn.Linear(4, 2), nn.Linear(4, 2)], router=router)
    x, _y, dom = _domains()
    moe.fit_router(x, expert_labels=dom, epochs=30, lr=0.03, seed=0)
    assert (moe.route(x)[1][:, 0] == dom).float().mean() > 0.97
    again = MixtureOfExperts([nn.Linear(4, 2), nn.Linear(4, 2)], router=router)
    torch.manual_seed(123)  # the global RNG must not matter
    again.fit_router(x, expert_labels=dom, epochs=30, lr=0.03, seed=0)
    assert torch.equal(moe.route(x)[0], again.route(x)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_forward_on_the_experts_device() -> None:
    moe = _two_experts(top_k=2).cuda()
    assert moe(torch.randn(8, 4, device="cuda")).device.type == "cuda"
