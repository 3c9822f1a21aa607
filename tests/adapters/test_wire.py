"""Every codec on LoRA factors: payloads restore the adapter; bytes against the materialized change."""

from __future__ import annotations

import json

import pytest
import torch

import deltaplane as dp
from deltaplane.adapters import LoRADelta, LoRALayer
from deltaplane.adapters.wire import compress_adapter, decompress_adapter
from deltaplane.codecs.wire import WireHeader, pack
from deltaplane.errors import DecodeError, VersionMismatch

SPECS = [
    "identity", "fp16", "bf16", "quant(bits=8)", "quant(bits=4, stochastic=true, chunk=64)", "sign",
    "ternary(chunk=128)", "topk(ratio=0.1)", "randk(ratio=0.2, unbiased=true)", "threshold(tau=0.01)",
    "stc(ratio=0.1)", "powersgd(rank=2, min_size=0)", "quant(bits=8) | zstd(level=3)",
    "policy(rules=\"*lora_A*: quant(bits=8); *: fp16\")",
]  # fmt: skip


def adapter(seed: int = 0) -> tuple[LoRADelta, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "enc.q.weight": torch.randn(64, 48, generator=g),
        "enc.q.bias": torch.randn(64, generator=g),
        "emb.weight": torch.randn(100, 48, generator=g),
        "head.weight": torch.randn(5, 48, generator=g),
    }
    layers = {
        "enc.q.weight": LoRALayer(torch.randn(4, 48, generator=g), 0.1 * torch.randn(64, 4, generator=g), 8.0,
                                  rslora=True, bias=torch.randn(64, generator=g)),
        "emb.weight": LoRALayer(torch.randn(4, 100, generator=g), 0.1 * torch.randn(48, 4, generator=g), 4.0,
                                embedding=True),
    }  # fmt: skip
    head = {"head.weight": base["head.weight"] + 0.1}
    return LoRADelta(layers, modules_to_save=head, task_type="SEQ_CLS"), base


@pytest.mark.parametrize("spec", SPECS)
def test_every_codec_carries_an_adapter(spec):
    lora, base = adapter()
    payload = compress_adapter(lora, spec, base_id="minilm", base_version=2)
    back = decompress_adapter(payload, expect_base=("minilm", 2))
    assert back.ranks == lora.ranks and set(back.modules_to_save) == set(lora.modules_to_save)
    for name, layer in lora.items():
        got = back[name]
        assert (got.alpha, got.rslora, got.embedding, got.bias is None) == (
            layer.alpha, layer.rslora, layer.embedding, layer.bias is None
        )  # fmt: skip
    full = lora.materialize(base)
    err = (back.materialize(base) - full).norm() / full.norm()
    if dp.get_codec(spec).exact:
        assert err == 0
    # the same codec on the materialized change costs more bytes than on the factors; except PowerSGD, which
    # itself sends a rank-2 factorization of the change (below the adapter's rank 4)
    dense = dp.Compressor(spec, error_feedback=False).compress(full)
    if not spec.startswith("powersgd"):
        assert len(payload) < len(dense)


def test_identity_factors_are_many_times_smaller_than_the_change():
    lora, base = adapter()
    factors = len(compress_adapter(lora, "identity"))
    dense = len(
        dp.Compressor("identity", error_feedback=False).compress(lora.materialize(base, only_adapted=True))
    )
    assert dense / factors > 3


def test_malformed_adapter_payloads():
    lora, _ = adapter()
    with pytest.raises(VersionMismatch):
        decompress_adapter(compress_adapter(lora, base_id="a", base_version=1), expect_base=("a", 2))
    plain = dp.Compressor("identity", error_feedback=False).compress(lora.factors())
    with pytest.raises(DecodeError, match="not an adapter"):
        decompress_adapter(plain)
    trees, _ = dp.Compressor("identity", error_feedback=False).encode(lora.factors())
    meta = json.loads(json.dumps({"lora": {"layers": {"enc.q.weight": [8.0, True, False, False, True]},
                                           "full": ["head.weight"]}}))  # fmt: skip
    with pytest.raises(DecodeError, match="not part of the adapter"):
        decompress_adapter(pack(trees, WireHeader("", 0, "identity", meta)))
    meta["lora"]["layers"]["enc.q.weight"] = [8.0, "yes", False, False, True]
    with pytest.raises(DecodeError, match="must be"):
        decompress_adapter(pack(trees, WireHeader("", 0, "identity", meta)))
    meta["lora"]["layers"] = {
        "enc.q.weight": [8.0, True, False, False, True],
        "emb.weight": [4.0, False, False, False, False],
    }
    with pytest.raises(DecodeError, match="lacks"):
        decompress_adapter(pack(trees, WireHeader("", 0, "identity", meta)))
    from deltaplane.adapters.wire import adapter_meta

    for bad in (
        5,
        ["SEQ_CLS"],
        "x" * 65,
    ):  # was taken as the task type (a list or number reached PEFT's config)
        with pytest.raises(DecodeError, match="task_type"):
            decompress_adapter(
                pack(trees, WireHeader("", 0, "identity", {"lora": {**adapter_meta(lora), "task_type": bad}}))
            )
    assert (
        decompress_adapter(pack(trees, WireHeader("", 0, "identity", {"lora": adapter_meta(lora)}))).task_type
        == "SEQ_CLS"
    )


def test_a_fan_in_fan_out_layer_survives_the_wire_and_the_bundle(tmp_path):
    """GPT-2's Conv1D layers (weight stored (in, out)): the payload header carries fan_in_fan_out, so the change
    the device rebuilds is the sender's, not its transpose (a square layer would otherwise fit the base silently)."""
    from deltaplane.adapters.bundle import AdapterBundle, write_bundle

    g = torch.Generator().manual_seed(0)
    base = {"h.attn.c_proj.weight": torch.randn(16, 16, generator=g), "h.attn.c_proj.bias": torch.zeros(16)}
    layer = LoRALayer(
        torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 4.0, fan_in_fan_out=True
    )
    lora = LoRADelta({"h.attn.c_proj.weight": layer})
    want = lora.materialize(base)["h.attn.c_proj.weight"]
    assert not torch.allclose(want, want.T, atol=1e-3)  # the orientation shows
    back = decompress_adapter(compress_adapter(lora, "identity", base_id="gpt2", base_version=1))
    assert back["h.attn.c_proj.weight"].fan_in_fan_out
    assert torch.equal(back.materialize(base)["h.attn.c_proj.weight"], want)
    write_bundle(tmp_path / "b.dplb", base, {"u": lora}, base_id="gpt2", base_quant="none", codec="identity")
    state = AdapterBundle(tmp_path / "b.dplb").model_state("u")
    assert torch.allclose(state["h.attn.c_proj.weight"], base["h.attn.c_proj.weight"] + want, atol=1e-6)
