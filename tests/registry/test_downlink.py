import pytest
import torch

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.errors import DecodeError, IntegrityError
from deltaplane.registry import Registry, apply_downlink, plan_downlink, publish_update, state_to_bytes
from deltaplane.registry.downlink import pack_chain, unpack_chain


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 64, generator=g), "a.bias": torch.randn(64, generator=g)}


@pytest.fixture
def reg(tmp_path):
    r = Registry.create(tmp_path / "h")
    r.register_model("m", state(0))
    return r


def round_update(seed):
    g = torch.Generator().manual_seed(100 + seed)
    return Delta(
        {"a.weight": 0.01 * torch.randn(64, 64, generator=g), "a.bias": 0.01 * torch.randn(64, generator=g)}
    )


def test_published_versions_reached_by_delta_chain_are_byte_identical(reg):
    comp = Compressor("topk(0.05) | quant(bits=8)", error_feedback=True, seed=0)
    v2, d12 = publish_update(reg, "m", 1, round_update(1), compressor=comp, lineage={"round": 1})
    v3, _ = publish_update(reg, "m", 2, round_update(2), compressor=comp, lineage={"round": 2})
    assert (v2.number, d12.number, v3.number) == (2, 3, 4) and d12.base == 1 and d12.target == 2
    assert comp.state.residual is not None  # what the downlink codec dropped waits for the next round
    verifier = reg.verifier
    one = plan_downlink(reg, reg.signer, "m", want=2, have=1)
    two = plan_downlink(reg, reg.signer, "m", want=4, have=1)
    assert one.kind == two.kind == "delta" and len(unpack_chain(two.body)) == 2
    assert one.saving > 10
    s1 = reg.load_state("m@1")
    assert state_to_bytes(apply_downlink(one, verifier, s1)) == reg.read(v2)
    assert state_to_bytes(apply_downlink(two, verifier, s1)) == reg.read(v3)
    full = plan_downlink(reg, reg.signer, "m", want=4, have=None)
    assert full.kind == "full" and full.saving == 1.0
    assert state_to_bytes(apply_downlink(full, verifier)) == reg.read(v3)
    assert plan_downlink(reg, reg.signer, "m", want=4, have=4).kind == "none"
    # a device whose weights drifted from v1 cannot silently end up with wrong weights
    wrong = {k: v + 1e-3 for k, v in s1.items()}
    with pytest.raises(IntegrityError, match="fetch the full model"):
        apply_downlink(one, verifier, wrong)


def test_no_registered_delta_falls_back_to_full(reg):
    reg.register_model("m", state(5), parent=1)  # registered without a delta artifact
    assert plan_downlink(reg, reg.signer, "m", want=2, have=1).kind == "full"


def test_chain_framing_is_strict():
    body = pack_chain([(1, 2, b"abc"), (2, 3, b"de")])
    assert unpack_chain(body) == [(1, 2, b"abc"), (2, 3, b"de")]
    for bad in (body[:-1], body + b"x", b"XXXX" + body[4:], body[:6]):
        with pytest.raises(DecodeError):
            unpack_chain(bad)


def test_a_partial_update_changes_only_its_tensors_and_reaches_devices_verified(reg):
    # a personalized federation (FedPer's head kept on the devices) publishes only the shared layers
    comp = Compressor("quant(bits=8)", error_feedback=True, seed=0)
    shared = Delta({"a.weight": round_update(1)["a.weight"]})
    v2, d = publish_update(reg, "m", 1, shared, compressor=comp)
    base, new = reg.load_state(reg.get("m", 1)), reg.load_state(v2)
    assert torch.equal(new["a.bias"], base["a.bias"]) and not torch.equal(new["a.weight"], base["a.weight"])
    assert len(reg.read(d)) < 64 * 64 + 1000  # the bias is not on the wire
    got = apply_downlink(plan_downlink(reg, reg.signer, "m", want=2, have=1), reg.verifier, base)
    assert all(torch.equal(got[k], new[k]) for k in new)


def test_a_payload_naming_a_tensor_the_model_lacks_is_refused_before_decoding(reg):
    from deltaplane.errors import ShapeMismatch
    from deltaplane.registry.downlink import apply_payload

    base = reg.load_state(reg.get("m", 1))
    stray = Compressor("identity").compress(Delta({"b.weight": torch.ones(3)}), base_id="m", base_version=1)
    with pytest.raises(ShapeMismatch, match="b.weight"):
        apply_payload(stray, base, expect_base=("m", 1))
    wrong = Compressor("identity").compress(Delta({"a.bias": torch.ones(3)}), base_id="m", base_version=1)
    with pytest.raises(ShapeMismatch, match="a.bias"):
        apply_payload(wrong, base, expect_base=("m", 1))
