"""One int8 base + many compressed adapters in one file, switched at load time."""

from __future__ import annotations

import pytest
import torch

from deltaplane.adapters import LoRADelta, LoRALayer
from deltaplane.adapters.bundle import AdapterBundle, write_bundle
from deltaplane.errors import AdapterMismatch, DecodeError, NotFound


def fleet(n: int = 4):
    g = torch.Generator().manual_seed(0)
    base = {
        "enc.q.weight": torch.randn(64, 256, generator=g) * 0.05,
        "enc.q.bias": torch.randn(64, generator=g) * 0.05,
        "head.weight": torch.randn(3, 64, generator=g) * 0.05,
        "position_ids": torch.arange(16),
    }
    users = {}
    for i in range(n):
        layer = LoRALayer(torch.randn(4, 256, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1, 8.0)
        users[f"user{i}"] = LoRADelta(
            {"enc.q.weight": layer}, modules_to_save={"head.weight": torch.randn(3, 64, generator=g)}
        )
    return base, users


def test_switching_adapters_gives_each_users_model(tmp_path):
    base, users = fleet()
    info = write_bundle(tmp_path / "f.dplb", base, users, base_id="enc-v1", level=3)
    assert info.nbytes == (tmp_path / "f.dplb").stat().st_size
    assert info.nbytes < info.base_nbytes + sum(info.adapter_nbytes.values()) + 2000
    bundle = AdapterBundle(tmp_path / "f.dplb")
    assert bundle.names == list(users) and bundle.base_id == "enc-v1"
    for name, lora in users.items():
        exact = lora.merged_into(base)
        got = bundle.model_state(name)
        assert got.keys() == exact.keys() and torch.equal(got["position_ids"], base["position_ids"])
        for k in ("enc.q.weight", "head.weight"):
            rel = float((got[k] - exact[k]).norm() / exact[k].norm())
            assert rel < 0.02, (name, k, rel)  # int8 base + int8 factors
        # each user gets their own model, not a neighbour's
        other = users["user0" if name != "user0" else "user1"].merged_into(base)
        assert float((got["head.weight"] - other["head.weight"]).norm()) > 1.0
    # a full int8 copy per user would cost ~N x base; the adapters are a small fraction of it
    assert sum(info.adapter_nbytes.values()) < info.base_nbytes


def test_only_the_requested_adapter_is_read(tmp_path):
    base, users = fleet(3)
    write_bundle(tmp_path / "f.dplb", base, users, level=3)
    data = bytearray((tmp_path / "f.dplb").read_bytes())
    data[-5] ^= 0xFF  # corrupt the last adapter's bytes
    (tmp_path / "bad.dplb").write_bytes(bytes(data))
    bundle = AdapterBundle(tmp_path / "bad.dplb")
    bundle.model_state("user0")  # unaffected
    with pytest.raises(DecodeError, match="user2.*SHA-256"):
        bundle.adapter("user2")
    with pytest.raises(NotFound, match="user9"):
        bundle.adapter("user9")


def test_malformed_bundles_and_bad_adapters(tmp_path):
    base, users = fleet(2)
    write_bundle(tmp_path / "f.dplb", base, users, level=3)
    data = (tmp_path / "f.dplb").read_bytes()
    for bad, match in [(b"XXXX" + data[4:], "not an adapter bundle"), (data[:20], "exceeds the file"),
                       (data[:5] + b"\x00\x00\x00\x00" + data[9:], "not valid JSON")]:  # fmt: skip
        (tmp_path / "bad.dplb").write_bytes(bad)
        with pytest.raises(DecodeError, match=match):
            AdapterBundle(tmp_path / "bad.dplb")
    (tmp_path / "short.dplb").write_bytes(data[:-100])
    with pytest.raises(DecodeError, match="outside the file"):
        AdapterBundle(tmp_path / "short.dplb")
    wrong = {"u": LoRADelta({"enc.k.weight": LoRALayer(torch.zeros(2, 256), torch.zeros(64, 2), 2.0)})}
    with pytest.raises(AdapterMismatch, match="enc.k"):
        write_bundle(tmp_path / "never.dplb", base, wrong)
    assert not (tmp_path / "never.dplb").exists()


@pytest.mark.parametrize(("key", "value"), [("manifest", 123), ("manifest", [1, 2]), ("base_id", {"a": 1})])
def test_a_header_field_of_the_wrong_type_is_a_decode_error(tmp_path, key, value):
    # from a review: a non-object manifest escaped as a bare TypeError, and any base_id was str()-ed
    import json

    from deltaplane.adapters.bundle import _PREFIX

    base = {"fc.weight": torch.randn(8, 16)}
    good = tmp_path / "b.dplb"
    write_bundle(
        good, base, {"u": LoRADelta({"fc.weight": LoRALayer(torch.randn(2, 16), torch.randn(8, 2), 2.0)})}
    )
    data = good.read_bytes()
    magic, version, hlen = _PREFIX.unpack(data[: _PREFIX.size])
    header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
    header[key] = value
    hb = json.dumps(header).encode()
    bad = tmp_path / "bad.dplb"
    bad.write_bytes(_PREFIX.pack(magic, version, len(hb)) + hb + data[_PREFIX.size + hlen :])
    with pytest.raises(DecodeError, match=key):
        AdapterBundle(bad)
