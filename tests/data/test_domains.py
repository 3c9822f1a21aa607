import pytest
import torch

from deltaplane.data import DOMAINS, apply_domain, gaussian_noise, invert, load_digits, rotate90, shift
from deltaplane.errors import ConfigError


def _batch() -> torch.Tensor:
    return load_digits().x[:16]


def test_rotate90_four_times_is_identity_and_input_untouched() -> None:
    x = _batch()
    before = x.clone()
    r = rotate90(x)
    assert not torch.equal(r, x)
    assert torch.equal(rotate90(x, 4), x)
    assert torch.equal(rotate90(rotate90(x), 3), x)
    assert torch.equal(x, before)


def test_invert() -> None:
    x = _batch()
    assert torch.allclose(invert(x) + x, torch.ones_like(x))


def test_gaussian_noise_is_seeded_and_clipped() -> None:
    x = _batch()
    a = gaussian_noise(x, 0.3, generator=torch.Generator().manual_seed(1))
    b = gaussian_noise(x, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert 0.1 < float((a - x).abs().mean()) < 0.3
    with pytest.raises(ConfigError):
        gaussian_noise(x, -1.0, generator=torch.Generator())


def test_shift_moves_pixels_and_fills_with_zeros() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    s = shift(x, dx=1, dy=0)
    assert s[0, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.equal(s[0, 0, :, 1:], x[0, 0, :, :3])
    up = shift(x, dx=0, dy=-1)
    assert torch.equal(up[0, 0, :3], x[0, 0, 1:]) and up[0, 0, 3].sum() == 0
    with pytest.raises(ConfigError):
        shift(x, dx=4)


def test_named_domains_keep_shape() -> None:
    x = _batch()
    for name in DOMAINS:
        assert apply_domain(name, x, seed=0).shape == x.shape
    assert torch.equal(apply_domain("noise", x, seed=5), apply_domain("noise", x, seed=5))
    with pytest.raises(ConfigError, match="unknown domain"):
        apply_domain("blur", x)
    with pytest.raises(ConfigError):
        invert(torch.zeros(8, 8))
