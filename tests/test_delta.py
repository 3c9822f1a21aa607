import math

import pytest
import torch

import deltaplane as dp
from deltaplane.delta import atomic_write_bytes, check_compatible


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "fc.bias": torch.randn(10, generator=g),
        "steps": torch.tensor([7]),
    }


def test_between_and_apply_round_trip() -> None:
    base, new = _state(0), _state(1)
    d = dp.Delta.between(base, new)
    out = d.apply(base)
    for k in base:
        assert (
            torch.equal(out[k], new[k]) if not base[k].is_floating_point() else torch.allclose(out[k], new[k])
        )
    assert torch.equal(d["steps"], torch.tensor([0]))
    half = d.apply(base, scale=0.5)
    assert torch.allclose(half["fc.bias"], base["fc.bias"] + 0.5 * (new["fc.bias"] - base["fc.bias"]))


def test_arithmetic_exact_values() -> None:
    a = dp.Delta({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])})
    b = dp.Delta({"w": torch.tensor([0.5, -1.0]), "n": torch.tensor([1])})
    assert (a + b)["w"].tolist() == [1.5, 1.0]
    assert (a - b)["w"].tolist() == [0.5, 3.0]
    assert (-a)["w"].tolist() == [-1.0, -2.0]
    assert (2 * a)["w"].tolist() == [2.0, 4.0]
    assert (a * 2)["n"].tolist() == [3]  # integer buffers are not scaled
    assert (a / 4)["w"].tolist() == [0.25, 0.5]


def test_measures() -> None:
    d = dp.Delta({"w": torch.tensor([3.0, 4.0]), "h": torch.zeros(2, 3, dtype=torch.float16)})
    assert d.norm() == pytest.approx(5.0)
    assert d.numel() == 8
    assert d.nbytes == 2 * 4 + 6 * 2
    assert d.flatten().tolist() == [3.0, 4.0, 0, 0, 0, 0, 0, 0]
    back = d.unflatten(d.flatten() * 2)
    assert back["w"].tolist() == [6.0, 8.0] and back["h"].dtype == torch.float16
    with pytest.raises(dp.ShapeMismatch):
        d.unflatten(torch.zeros(3))


def test_mismatches_name_the_tensor() -> None:
    a = dp.Delta({"w": torch.zeros(2, 2)})
    with pytest.raises(dp.ShapeMismatch, match="'w'.*shape"):
        a + dp.Delta({"w": torch.zeros(2, 3)})
    with pytest.raises(dp.ShapeMismatch, match="'w'.*dtype"):
        dp.Delta.between({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(dp.ShapeMismatch, match="names"):
        a.apply({"v": torch.zeros(2, 2)})
    check_compatible(a, {"w": torch.ones(2, 2)})


def test_finite_checks() -> None:
    d = dp.Delta({"ok": torch.ones(2), "bad": torch.tensor([1.0, math.nan])})
    assert not d.is_finite()
    with pytest.raises(dp.InvalidUpdate, match="'bad'"):
        d.check_finite()


def test_type_checks() -> None:
    with pytest.raises(TypeError):
        dp.Delta({"w": [1, 2]})  # type: ignore[dict-item]


def test_save_load(tmp_path) -> None:
    d = dp.Delta.between(_state(0), _state(1))
    path = tmp_path / "sub" / "d.safetensors"
    d.save(path, metadata={"round": "3"})
    back = dp.Delta.load(path)
    assert list(back) == list(d) and all(torch.equal(back[k], d[k]) for k in d)
    assert not list(path.parent.glob("*.tmp"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(dp.DecodeError):
        dp.Delta.load(tmp_path / "junk.safetensors")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_boolean_tensors_change_by_flipping() -> None:
    """``new - base`` of a boolean tensor raised torch's RuntimeError, and ``apply`` ORed: a change that turned a
    value off could never be applied. A boolean change is the set of flipped values (XOR), so ``apply`` gives
    ``new`` back exactly, changes compose by XOR (``+`` and ``-``) and are their own negation."""
    base = {"m": torch.tensor([True, True, False, False])}
    new = {"m": torch.tensor([True, False, True, False])}
    d = dp.Delta.between(base, new)
    assert d["m"].dtype == torch.bool and d["m"].tolist() == [False, True, True, False]
    assert d.apply(base)["m"].tolist() == new["m"].tolist()
    assert d.apply(base, scale=0.5)["m"].tolist() == new["m"].tolist()  # like integer buffers: not scaled
    back = dp.Delta.between(new, base)
    assert (d + back)["m"].tolist() == [False] * 4  # there and back: nothing changed
    assert (d - d)["m"].tolist() == [False] * 4 and torch.equal((-d)["m"], d["m"])
    assert d.norm() == 0.0 and d.is_finite()


def test_tied_tensors_save_and_load_back(tmp_path) -> None:
    """One tensor under two names (a state dict with tied embeddings) made safetensors raise a bare RuntimeError
    ("Some tensors share memory"); a saved checkpoint loads back as two equal tensors."""
    shared = torch.arange(6.0).reshape(2, 3)
    d = dp.Delta({"embed.weight": shared, "lm_head.weight": shared, "rows": shared[1]})
    d.save(tmp_path / "tied.safetensors")
    back = dp.Delta.load(tmp_path / "tied.safetensors")
    assert list(back) == list(d) and all(torch.equal(back[k], d[k]) for k in d)


@pytest.mark.parametrize("order", ["5", '[1, "a"]', '{"a": 1}', '"ab"', "[null]", "true"])
def test_a_malformed_name_order_is_ignored_not_a_crash(tmp_path, order) -> None:
    """``deltaplane.order`` is metadata any writer can set: a number or a list mixing numbers and names raised
    TypeError out of ``Delta.load``. Anything but a list of exactly the file's names is ignored (file order)."""
    from safetensors.torch import save_file

    save_file(
        {"b": torch.ones(1), "a": torch.zeros(1)},
        tmp_path / "d.safetensors",
        metadata={"deltaplane.order": order},
    )
    assert list(dp.Delta.load(tmp_path / "d.safetensors")) == ["a", "b"]


def test_load_names_a_path_that_is_not_utf8_as_a_usage_error(tmp_path):
    """Before: Delta.load of a file whose name is not UTF-8 (b'bad\\xff.safetensors') was a DecodeError
    'Path ... is not valid UTF-8' (compress/apply: exit 1, as if the file were corrupt); the file is fine, only
    the safetensors library cannot take its name. Now a ConfigError (exit 2) that says to rename it."""
    import os

    from safetensors.torch import save

    path = tmp_path / os.fsdecode(b"bad\xff.safetensors")
    path.write_bytes(save({"w": torch.ones(2)}))
    with pytest.raises(dp.ConfigError, match="cannot open a path that is not UTF-8; rename the file"):
        dp.Delta.load(path)
    (tmp_path / "good.safetensors").write_bytes(path.read_bytes())
    assert torch.equal(dp.Delta.load(tmp_path / "good.safetensors")["w"], torch.ones(2))
