"""DGC's device-side techniques (deltaplane.engine.dgc) against independent references: torch's momentum SGD,
torch's gradient clipping, FedAvgM, and the warm-up schedule printed in the paper."""

from __future__ import annotations

import pytest
import torch

from deltaplane.codecs import Compressor, decompress
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig
from deltaplane.engine.dgc import DGC, NormHistory, warmup_density, warmup_spec
from deltaplane.errors import ConfigError
from deltaplane.sim import run_simulation

# a toy quadratic f(w) = ½ wᵀAw − bᵀw with an ill-conditioned A, where momentum visibly changes the path
A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.1]])
B = torch.tensor([1.0, -2.0, 0.5])


def _grad(w: torch.Tensor) -> torch.Tensor:
    return A @ w - B


def _torch_sgd(steps: int, lr: float, momentum: float) -> list[torch.Tensor]:
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
    path = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * w @ A @ w - B @ w).backward()
        opt.step()
        path.append(w.detach().clone())
    return path


def _dgc_path(codec: str, dgc: DGC, steps: int, lr: float) -> list[torch.Tensor]:
    """A device whose local training is one gradient step (Δ = −lr·∇f), through DGC and its compressor."""
    comp = Compressor(codec, error_feedback=True, seed=0)
    w, velocity, path = torch.zeros(3), None, []
    for rnd in range(1, steps + 1):
        delta = Delta({"w": -lr * _grad(w)})
        target, velocity, _ = dgc.prepare(comp, delta, velocity, spec=codec, rnd=rnd)
        payload = comp.compress(target, base_id="toy", base_version=rnd)
        sent = decompress(payload, expect_base=("toy", rnd))
        if velocity is not None:
            velocity = dgc.settle(velocity, sent)
        w = w + sent["w"]
        path.append(w.clone())
    return path


@pytest.mark.parametrize("codec", ["identity", "topk(1.0)"])
def test_momentum_correction_at_density_one_is_momentum_sgd(codec) -> None:
    ours = _dgc_path(codec, DGC(momentum=0.9), steps=40, lr=0.1)
    ref = _torch_sgd(40, lr=0.1, momentum=0.9)
    plain = _torch_sgd(40, lr=0.1, momentum=0.0)
    assert torch.allclose(torch.stack(ours), torch.stack(ref), atol=1e-5)
    assert not torch.allclose(torch.stack(ours), torch.stack(plain), atol=1e-2)  # momentum does matter here


def test_masking_at_density_one_leaves_plain_sgd() -> None:
    # every coordinate is sent every step, so masking clears the whole velocity: no momentum is left
    ours = _dgc_path("topk(1.0)", DGC(momentum=0.9, masking=True), steps=20, lr=0.1)
    assert torch.allclose(torch.stack(ours), torch.stack(_torch_sgd(20, lr=0.1, momentum=0.0)), atol=1e-5)


def test_sparse_momentum_correction_converges_where_dense_does() -> None:
    # one coordinate of three a step: the residual holds the rest, and the path still reaches the optimum
    w_star = torch.linalg.solve(A, B)
    ours = _dgc_path("topk(0.34)", DGC(momentum=0.5, masking=True), steps=3000, lr=0.1)
    assert torch.allclose(ours[-1], w_star, atol=1e-3)


def test_local_clip_matches_torch_clip_grad_norm() -> None:
    g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]])}
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in g.values()]
    for p, t in zip(params, g.values(), strict=True):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm=6.5)
    out, _, _ = DGC(clip=6.5).prepare(Compressor("identity"), Delta(g), None, spec="identity", rnd=1)
    for p, k in zip(params, g, strict=True):
        assert torch.allclose(out[k], p.grad)
    small, _, _ = DGC(clip=100.0).prepare(Compressor("identity"), Delta(g), None, spec="identity", rnd=1)
    assert all(torch.equal(small[k], g[k]) for k in g)  # below the threshold: untouched


def _clip_run(dgc: DGC, norms: list[float]) -> tuple[list[float], NormHistory | None]:
    """Updates of the given L2 norms (along (3, 4)/5, then one coordinate) through ``dgc``'s local clip, as one
    device's successive rounds: the norms that come out, and the device's history at the end."""
    out, history = [], None
    for r in norms:
        delta = Delta({"a": torch.tensor([0.6, 0.8], dtype=torch.float64) * r, "b": torch.zeros(1, 1)})
        got, _, history = dgc.prepare(
            Compressor("identity"), delta, None, spec="identity", rnd=1, norms=history
        )
        out.append(got.norm())
    return out, history


def test_relative_clip_against_a_hand_computation() -> None:
    # κ = 2, reference = 0.5·reference + 0.5·(kept norm), the first norm taken as it is:
    #   4  (no history: untouched)        reference 4
    #   2  (bound 8: untouched)           reference 0.5·4 + 0.5·2 = 3
    #   10 (bound 6: scaled down to 6)    reference 0.5·3 + 0.5·6 = 4.5
    #   3  (bound 9: untouched)           reference 0.5·4.5 + 0.5·3 = 3.75
    #   20 (bound 7.5: scaled to 7.5)     reference 0.5·3.75 + 0.5·7.5 = 5.625
    out, history = _clip_run(DGC(relative_clip=2.0), [4.0, 2.0, 10.0, 3.0, 20.0])
    assert out == pytest.approx([4.0, 2.0, 6.0, 3.0, 7.5], rel=1e-12)
    assert history == NormHistory(5, pytest.approx(5.625, rel=1e-12))
    # a direction is kept: only the length changes
    g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[12.0]])}  # norm 13
    got, _, h = DGC(relative_clip=1.5).prepare(
        Compressor("identity"), Delta(g), None, spec="identity", rnd=1, norms=NormHistory(3, 2.0)
    )
    assert torch.allclose(got["a"], torch.tensor([3.0, 4.0]) * 3 / 13) and torch.allclose(
        got["b"], torch.tensor([[12.0 * 3 / 13]])
    )
    assert h == NormHistory(4, pytest.approx(2.5))  # 0.5·2 + 0.5·3
    # a zero reference (an all-zero update so far) bounds nothing
    out, history = _clip_run(DGC(relative_clip=2.0), [0.0, 5.0, 50.0])
    assert out == pytest.approx([0.0, 5.0, 5.0])  # 5: no bound yet, reference 2.5; 50: bound 5
    assert history == NormHistory(3, pytest.approx(3.75))


def test_relative_clip_bounds_an_exploding_update() -> None:
    """Ten ordinary rounds (norms about 1), then updates a thousand times longer: each leaves the device at
    most κ times its reference, and the reference, fed the clipped norms, grows by at most (1 + κ)/2 a round
    instead of jumping to the exploded scale; the next ordinary update is left alone."""
    g = torch.Generator().manual_seed(0)
    steady = [1.0 + 0.1 * float(torch.rand(1, generator=g)) for _ in range(10)]
    out, history = _clip_run(DGC(relative_clip=2.0), [*steady, 1000.0, 1000.0, 1000.0, 1.0])
    assert out[:10] == pytest.approx(steady)  # ordinary rounds: never clipped
    assert history is not None
    ref = history.reference
    before = _clip_run(DGC(relative_clip=2.0), steady)[1].reference  # type: ignore[union-attr]
    assert 1.0 <= before <= 1.1
    assert out[10] == pytest.approx(2 * before)
    assert out[11] == pytest.approx(2 * 1.5 * before) and out[12] == pytest.approx(2 * 1.5**2 * before)
    assert out[13] == pytest.approx(1.0)  # the ordinary update after the explosion goes through
    assert ref < 4 * before
    # without the clip the exploding rounds leave the device as they are
    assert _clip_run(DGC(), [*steady, 1000.0])[0][-1] == pytest.approx(1000.0)


def test_relative_clip_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="relative local clip must be above 1"):
        DGC(relative_clip=1.0)
    with pytest.raises(ConfigError, match="local_clip_relative"):
        RunConfig.from_mapping({"local_clip_relative": 0.9})
    with pytest.raises(ConfigError, match="not both"):
        RunConfig.from_mapping({"local_clip": 2.0, "local_clip_relative": 2.0})
    cfg = RunConfig.from_mapping({"codec": {"local_clip_relative": 2.0}})  # the yaml's codec section
    assert cfg.local_clip_relative == 2.0 and cfg.make_dgc() == DGC(relative_clip=2.0)
    assert DGC(relative_clip=2.0).active


def test_warmup_is_the_papers_schedule() -> None:
    # Lin et al. 2018, section 3.3: sparsity 75%, 93.75%, 98.4375%, 99.6%, then 99.9% (powers of 1/4 there;
    # a geometric path that lands exactly on the target here)
    got = [warmup_density(0.001, r, 4) for r in range(1, 7)]
    assert got == pytest.approx([0.25, 0.0625, 0.015625, 0.004, 0.001, 0.001], rel=0.02)
    assert warmup_spec("topk(0.001) | quant(bits=4)", 1, 4).startswith("topk(ratio=0.25")
    assert warmup_spec("stc(0.01)", 9, 4) == "stc(ratio=0.01)"


def test_warmup_without_a_sparsifier_is_refused() -> None:
    with pytest.raises(ConfigError, match="sparsity_warmup needs a sparsifying"):
        RunConfig.from_mapping({"codec": "quant(bits=8)", "sparsity_warmup": 3})
    with pytest.raises(ConfigError, match="masking needs momentum correction"):
        RunConfig.from_mapping({"momentum_masking": True})


def test_warmup_payloads_grow_sparser_round_by_round() -> None:
    cfg = RunConfig(clients=2, rounds=4, local_epochs=1, codec="topk(0.01)", sparsity_warmup=2)
    up = [r.uplink_bytes for r in run_simulation(cfg).rounds]
    # rounds 3–4 send 1% in compact frames (entropy-coded: a few percent apart); rounds 1–2 ten and five times more
    assert up[0] > up[1] > 2 * max(up[2], up[3])
    assert up[2] == pytest.approx(up[3], rel=0.1)


def test_momentum_correction_with_every_device_is_fedavgm() -> None:
    """Dense FedAvg over momentum-corrected updates, all devices every round: FedAvgM with lr 1 (the mean of
    the devices' velocities, weighted by their fixed sample counts, is the server's velocity), an independent
    implementation in deltaplane.aggregation."""
    base = RunConfig(clients=3, rounds=3, local_epochs=1, lr=0.05)
    ours = run_simulation(base.replace(momentum_correction=0.9))
    ref = run_simulation(base.replace(aggregator="fedavgm", server_opt_lr=1.0))  # FedAvgM's β is 0.9
    for k, v in ref.final_state.items():
        assert torch.allclose(ours.final_state[k], v, atol=1e-5), k
