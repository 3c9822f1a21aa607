"""SparseGPT: exact N:M pattern, lower reconstruction error than magnitude and Wanda on the same pattern, and the
least-squares optimum for its own mask as an independent floor; keep-everything leaves the weights unchanged."""

import copy

import pytest
import torch
from torch import nn

from deltaplane.deploy import (
    input_hessian,
    nm_mask,
    parse_prune,
    prune_model,
    sparsegpt_prune,
    sparsegpt_weights,
    wanda_prune,
)
from deltaplane.errors import ConfigError


def _data(seed: int, tokens: int = 512, cols: int = 64, rows: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # correlated input features with uneven scales, as in a transformer's activations
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mix
    x = x * torch.linspace(0.2, 3.0, cols)
    return torch.randn(rows, cols, generator=g), x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2.0 * x.T @ x / x.shape[0]


def _err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() @ (w.double() - w_hat.double()).T))


def _exact_nm(w: torch.Tensor, n: int, m: int) -> bool:
    nz = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
    return bool((nz == n).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_2_4_beats_magnitude_and_wanda_on_the_same_exact_pattern(seed):
    w, x = _data(seed)
    new, keep = sparsegpt_weights(w, _hessian(x), n=2, m=4, blocksize=16)
    assert _exact_nm(new, 2, 4) and torch.equal(keep, new != 0)
    magnitude = w * nm_mask(w.abs(), 2, 4)
    wanda = w * nm_mask(w.abs() * x.norm(dim=0), 2, 4)
    assert _exact_nm(magnitude, 2, 4) and _exact_nm(wanda, 2, 4)
    e_sgpt, e_mag, e_wanda = _err(w, new, x), _err(w, magnitude, x), _err(w, wanda, x)
    assert e_sgpt < e_wanda < e_mag
    # independent floor: per-row least squares over SparseGPT's own kept weights (numpy-free torch.linalg.lstsq)
    best = torch.zeros_like(w, dtype=torch.float64)
    target = x.double() @ w.double().T
    for r in range(w.shape[0]):
        cols = keep[r].nonzero().flatten()
        best[r, cols] = torch.linalg.lstsq(x.double()[:, cols], target[:, r : r + 1]).solution.flatten()
    e_best = _err(w, best, x)
    assert e_best <= e_sgpt * (1 + 1e-9) and e_sgpt < 2.0 * e_best


def test_keep_everything_leaves_weights_unchanged():
    w, x = _data(3)
    for kwargs in ({"n": 4, "m": 4}, {"sparsity": 0.0}):
        new, keep = sparsegpt_weights(w, _hessian(x), blocksize=16, **kwargs)
        assert keep.all()
        torch.testing.assert_close(new, w, rtol=0, atol=0)


def test_unstructured_sparsity_count_per_block():
    w, x = _data(4)
    new, keep = sparsegpt_weights(w, _hessian(x), sparsity=0.5, blocksize=64)
    assert int((~keep).sum()) == w.numel() // 2 and torch.equal(keep, new != 0)
    wanda = w * (w.abs() * x.norm(dim=0) >= (w.abs() * x.norm(dim=0)).median(dim=1, keepdim=True).values)
    assert _err(w, new, x) < _err(w, wanda, x)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 8)
        self.first = nn.Linear(6, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.c(torch.relu(self.b(torch.relu(self.a(h)))))


def test_model_layer_sequential_2_4_through_the_prune_spec():
    torch.manual_seed(0)
    model = _MLP()
    cal = [torch.randn(64, 6) @ torch.randn(6, 6) for _ in range(4)]
    test = torch.randn(256, 6) @ torch.randn(6, 6)
    spec = parse_prune("sparsegpt:2:4")
    assert spec == {"method": "sparsegpt", "n": 2, "m": 4}
    with torch.no_grad():
        ref = model(test)
    sg, res = prune_model(copy.deepcopy(model), spec, calibration=cal)
    assert "first" in res.skipped and "6" in res.skipped["first"]  # 6 inputs: no 2:4 pattern, left dense
    for name in ("a", "b", "c"):
        assert _exact_nm(getattr(sg, name).weight, 2, 4)
    wd = copy.deepcopy(model)
    wanda_prune(wd, cal, n=2, m=4, sequential=True)
    with torch.no_grad():
        assert float((sg(test) - ref).norm()) < float((wd(test) - ref).norm())
    assert parse_prune("sparsegpt:0.5") == {"method": "sparsegpt", "sparsity": 0.5}


def test_bad_input_is_config_error():
    model = _MLP()
    with pytest.raises(ConfigError, match="calibration"):
        sparsegpt_prune(model, [], n=2, m=4)
    with pytest.raises(ConfigError, match="not both"):
        sparsegpt_prune(model, [torch.randn(2, 6)], n=2, m=4, sparsity=0.5)
    with pytest.raises(ConfigError, match="0 < n < m"):
        sparsegpt_prune(model, [torch.randn(2, 6)], n=4, m=4)
    with pytest.raises(ConfigError, match="never reached"):
        input_hessian(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "1", [])


def test_non_finite_calibration_is_a_config_error_not_a_linalg_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    bad = torch.randn(16, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="Hessian holds NaN/Inf"):
        sparsegpt_prune(net, [bad], n=2, m=4)
