"""A delta records the base it was taken against (base_fingerprint) and refuses to be applied to another."""

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltaplane as dp
from deltaplane.delta import BASE_SHA256_KEY, short_fingerprint

SRC = Path(__file__).resolve().parents[1] / "src"


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(6, 4, generator=g),
        "fc.bias": torch.randn(6, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def _tuned(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base.items()}
    out["fc.weight"] += 0.5
    out["steps"] += 1
    return out


def _reference(state: dict[str, torch.Tensor]) -> str:
    """The encoding the docstring specifies, written independently: numpy little-endian bytes, struct."""
    h = hashlib.sha256(b"deltaplane.base_sha256/v1\0" + struct.pack("<Q", len(state)))
    for name in sorted(state):
        t = state[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits are the high half of a float32
            raw = (t.float().numpy().astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            arr = t.numpy()
            raw = arr.astype(arr.dtype.newbyteorder("<"), order="C").tobytes()
        h.update(struct.pack("<I", len(name.encode())) + name.encode() + bytes([len(dtype)]) + dtype.encode())
        h.update(struct.pack("<I", t.dim()) + b"".join(struct.pack("<Q", n) for n in t.shape))
        h.update(struct.pack("<Q", len(raw)) + raw)
    return h.hexdigest()


def test_fingerprint_follows_the_documented_encoding_and_ignores_dict_order() -> None:
    base = _base()
    fp = dp.base_fingerprint(base)
    assert fp == _reference(base)
    assert dp.base_fingerprint(dict(reversed(list(base.items())))) == fp
    # a strided view hashes as its contiguous copy; a tensor that needs grad as its values
    strided = dict(base, **{"fc.weight": base["fc.weight"].t().contiguous().t()})
    assert not strided["fc.weight"].is_contiguous() and dp.base_fingerprint(strided) == fp
    assert dp.base_fingerprint(dict(base, **{"fc.weight": base["fc.weight"].requires_grad_()})) == fp


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "import torch, deltaplane as dp\n"
        "g = torch.Generator().manual_seed(0)\n"
        "s = {'fc.weight': torch.randn(6, 4, generator=g), 'fc.bias': torch.randn(6, generator=g).to(torch.bfloat16),"
        " 'steps': torch.tensor(7), 'mask': torch.tensor([True, False, True]), 'empty': torch.zeros(0, 3)}\n"
        "print(dp.base_fingerprint(dict(sorted(s.items(), reverse=True))))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == dp.base_fingerprint(_base())


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["fc.weight"].view(-1)[13].add_(1e-6),  # one value
        lambda s: s["mask"].__setitem__(1, True),  # one boolean
        lambda s: s.__setitem__("fc.bias", s["fc.bias"].float()),  # dtype only
        lambda s: s.__setitem__("fc.weight", s["fc.weight"].reshape(4, 6)),  # shape only, same bytes
        lambda s: s.__setitem__("fc.weight2", s.pop("fc.weight")),  # name only
        lambda s: s.__setitem__("extra", torch.zeros(0)),  # one more (empty) tensor
    ],
)
def test_fingerprint_changes_with_any_change(change) -> None:
    base = _base()
    other = {k: v.clone() for k, v in base.items()}
    change(other)
    assert dp.base_fingerprint(other) != dp.base_fingerprint(base)


def test_apply_refuses_another_base_and_accepts_its_own() -> None:
    base = _base()
    d = dp.Delta.between(base, _tuned(base), record_base=True)
    assert d.base_sha256 == dp.base_fingerprint(base)
    assert torch.equal(d.apply(base)["fc.weight"], base["fc.weight"] + 0.5)
    other = {k: v.clone() for k, v in base.items()}
    other["fc.weight"][0, 0] += 1.0  # same layout, another model
    with pytest.raises(dp.BaseMismatch) as err:
        d.apply(other)
    msg = str(err.value)
    assert short_fingerprint(d.base_sha256) in msg and short_fingerprint(dp.base_fingerprint(other)) in msg
    assert "check_base=False" in msg and "--allow-other-base" in msg
    assert isinstance(err.value, dp.VersionMismatch)
    assert torch.equal(d.apply(other, check_base=False)["fc.weight"], other["fc.weight"] + 0.5)


def test_a_copy_keeps_the_record_unless_told_otherwise() -> None:
    """`Delta(d)` used to drop d's base record, so the copy applied to any base without a word."""
    base = _base()
    d = dp.Delta.between(base, _tuned(base), record_base=True)
    other = {k: v.clone() for k, v in base.items()}
    other["fc.weight"][0, 0] += 1.0
    copy = dp.Delta(d)
    assert copy.base_sha256 == d.base_sha256
    with pytest.raises(dp.BaseMismatch):
        copy.apply(other)
    assert dp.Delta(d, base_sha256=dp.base_fingerprint(other)).base_sha256 == dp.base_fingerprint(other)
    assert dp.Delta(d.with_base_sha256(None)).base_sha256 is None
    assert dp.Delta(dict(d)).base_sha256 is None  # plain tensors carry no record


def test_a_delta_without_a_record_applies_as_before() -> None:
    base = _base()
    d = dp.Delta.between(
        base, _tuned(base)
    )  # the default: the round engine's per-client delta hashes nothing
    assert d.base_sha256 is None
    other = {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}
    assert torch.equal(d.apply(other)["fc.weight"], other["fc.weight"] + 0.5)


def test_save_and_load_keep_the_record(tmp_path: Path) -> None:
    from safetensors import safe_open

    base = _base()
    d = dp.Delta.between(base, _tuned(base), record_base=True)
    d.save(tmp_path / "d.safetensors", metadata={"note": "x"})
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        assert f.metadata()[BASE_SHA256_KEY] == dp.base_fingerprint(base)
    back = dp.Delta.load(tmp_path / "d.safetensors")
    assert back.base_sha256 == d.base_sha256
    other = dict(base, **{"steps": torch.tensor(8)})
    with pytest.raises(dp.BaseMismatch):
        back.apply(other)
    # an old file (no record) loads with none and applies anywhere
    dp.Delta.between(base, _tuned(base)).save(tmp_path / "old.safetensors")
    assert dp.Delta.load(tmp_path / "old.safetensors").base_sha256 is None


@pytest.mark.parametrize("bad", ["abc", "G" * 64, "A" * 64, "0" * 65, "0" * (1 << 16)])
def test_a_damaged_record_is_refused_not_ignored(tmp_path: Path, bad: str) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "d.safetensors", metadata={BASE_SHA256_KEY: bad})
    with pytest.raises(dp.DecodeError, match="not a SHA-256 fingerprint"):
        dp.Delta.load(tmp_path / "d.safetensors")
    with pytest.raises(dp.InvalidUpdate, match="64 lowercase hex"):
        dp.Delta({"w": torch.ones(2)}, base_sha256=bad)
    d = dp.Delta({"w": torch.ones(2)})
    with pytest.raises(dp.InvalidUpdate, match="reserved"):
        d.save(tmp_path / "e.safetensors", metadata={BASE_SHA256_KEY: "0" * 64})


def test_arithmetic_keeps_the_record_only_where_the_maths_keeps_the_base() -> None:
    base = _base()
    a = dp.Delta.between(base, _tuned(base), record_base=True)
    b = dp.Delta.between(base, {k: v.clone() for k, v in base.items()}, record_base=True)
    fp = a.base_sha256
    assert (0.5 * a).base_sha256 == fp and (a / 2).base_sha256 == fp
    assert a.map(lambda _, t: t).base_sha256 == fp
    assert (a + b).base_sha256 == fp  # task arithmetic: both against base, so is the sum
    assert (a - b).base_sha256 is None  # tuned_a - tuned_b: applies to tuned_b, not to base
    assert (-a).base_sha256 is None  # tuned -> base
    unrecorded = dp.Delta.between(base, _tuned(base))
    assert (a + unrecorded).base_sha256 is None
    assert (
        a.with_base_sha256(None).base_sha256 is None
        and a.with_base_sha256(None)["fc.weight"] is a["fc.weight"]
    )


def _hand_built(entries: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """The documented encoding of (name, dtype name, shape, little-endian value bytes), names already sorted."""
    h = hashlib.sha256(b"deltaplane.base_sha256/v1\0" + struct.pack("<Q", len(entries)))
    for name, dtype, shape, raw in entries:
        h.update(struct.pack("<I", len(name)) + name.encode() + bytes([len(dtype)]) + dtype.encode())
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", n) for n in shape))
        h.update(struct.pack("<Q", len(raw)) + raw)
    return h.hexdigest()


def test_conjugate_and_negative_views_hash_as_the_values_they_show() -> None:
    # x.conj() and torch's negative views keep the un-conjugated / un-negated values in memory with a flag: the
    # fingerprint is of the values the tensor holds, as Delta.between and apply see them (was: RuntimeError)
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    w = torch._neg_view(torch.tensor([1.5, -2.0]))
    assert z.is_conj() and w.is_neg()
    expected = _hand_built(
        [
            ("w", "float32", (2,), struct.pack("<2f", -1.5, 2.0)),
            ("z", "complex64", (2,), struct.pack("<4f", 1.0, -2.0, 3.0, 4.0)),
        ]
    )
    assert dp.base_fingerprint({"z": z, "w": w}) == expected
    d = dp.Delta.between(
        {"z": z, "w": w}, {"z": z.resolve_conj() + 1, "w": w.resolve_neg() + 1}, record_base=True
    )
    assert d.base_sha256 == expected
    d.apply({"z": z.resolve_conj(), "w": w.resolve_neg()})  # the same values, materialized: the same base


def test_a_big_endian_machine_hashes_complex_values_as_a_little_endian_one(monkeypatch) -> None:
    """On a big-endian machine a complex64 value is two big-endian float32s; each is swapped on its own.

    Simulated: tensors whose memory holds the big-endian bytes, with the module told the machine is big-endian.
    Swapping the whole 8-byte element (as before) put the imaginary part first.
    """
    import types

    import deltaplane.delta as delta_mod

    def as_big_endian(fmt: str, values: list[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.frombuffer(bytearray(struct.pack(">" + fmt, *values)), dtype=dtype).clone()

    state = {
        "f": as_big_endian("2f", [1.5, -2.0], torch.float32),
        "z": as_big_endian("4f", [1.0, 2.0, -3.0, 0.5], torch.complex64),
        "zz": as_big_endian("2d", [0.25, -8.0], torch.complex128),
    }
    monkeypatch.setattr(delta_mod, "sys", types.SimpleNamespace(byteorder="big"))
    expected = _hand_built(
        [
            ("f", "float32", (2,), struct.pack("<2f", 1.5, -2.0)),
            ("z", "complex64", (2,), struct.pack("<4f", 1.0, 2.0, -3.0, 0.5)),
            ("zz", "complex128", (1,), struct.pack("<2d", 0.25, -8.0)),
        ]
    )
    assert dp.base_fingerprint(state) == expected
    monkeypatch.undo()  # the same values held little-endian, on this (little-endian) machine
    assert sys.byteorder == "little"
    little = {
        "f": torch.tensor([1.5, -2.0]),
        "z": torch.tensor([1 + 2j, -3 + 0.5j], dtype=torch.complex64),
        "zz": torch.tensor([0.25 - 8j], dtype=torch.complex128),
    }
    assert dp.base_fingerprint(little) == expected


def test_a_merge_of_deltas_keeps_their_common_record() -> None:
    base = _base()
    a = dp.Delta.between(base, _tuned(base), record_base=True)
    b = dp.Delta.between(base, {k: v.clone() for k, v in base.items()}, record_base=True)
    merged = dp.merge("linear", None, [a, b])
    assert merged.base_sha256 == a.base_sha256
    assert torch.equal(merged["fc.weight"], (a["fc.weight"] + b["fc.weight"]) / 2)
    applied = dp.merge("linear", base, [a, b])  # its own base: applied
    assert torch.equal(applied["fc.weight"], base["fc.weight"] + merged["fc.weight"])
    other = {k: v.clone() for k, v in base.items()}
    other["fc.weight"] += 1
    with pytest.raises(dp.errors.BaseMismatch):
        dp.merge("linear", other, [a, b])
    # deltas that record different bases (or none) give a delta recording none: nothing to check it against
    assert dp.merge("linear", None, [a, b.with_base_sha256(None)]).base_sha256 is None
    assert (
        dp.merge("linear", None, [a, dp.Delta.between(other, _tuned(other), record_base=True)]).base_sha256
        is None
    )


@pytest.mark.parametrize("kind", ["quantized", "sparse", "meta"])
def test_tensors_whose_bytes_are_not_their_values_are_refused(kind: str) -> None:
    """A quantized tensor's bytes are its integer codes: two bases of different values (x at scale 0.1, 2x at
    scale 0.2) hashed alike, so a delta recording one applied silently to the other. Sparse and meta tensors
    failed with torch's own RuntimeError/NotImplementedError."""
    import warnings

    x = torch.randn(8, generator=torch.Generator().manual_seed(0))
    if kind == "quantized":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantized tensor creation
            q1 = torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)
            q2 = torch.quantize_per_tensor(2 * x, 0.2, 0, torch.qint8)
        assert torch.equal(q1.int_repr(), q2.int_repr()) and not torch.equal(q1.dequantize(), q2.dequantize())
        bad, fix = q1, "t.dequantize()"
    elif kind == "sparse":
        bad, fix = torch.eye(3).to_sparse(), "t.to_dense()"
    else:
        bad, fix = torch.empty(3, device="meta"), "load the base's weights first"
    with pytest.raises(TypeError, match="tensor 'w'") as refused:
        dp.base_fingerprint({"w": bad})
    assert fix in str(refused.value)
