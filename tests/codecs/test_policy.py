"""Per-layer codec policy: rules by name pattern, size and rank, carried in the payload."""

import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import Policy, read_header

RULES = "*.bias | *norm*: fp16; numel<1000: quant(bits=8); *.weight & ndim==2: topk(0.05) | quant(bits=4); *: sign"


def _model() -> dp.Delta:
    g = torch.Generator().manual_seed(0)
    return dp.Delta(
        {
            "enc.norm.weight": torch.randn(64, generator=g),
            "fc.weight": torch.randn(100, 50, generator=g),
            "fc.bias": torch.randn(100, generator=g),
            "small.weight": torch.randn(10, 10, generator=g),
            "conv.weight": torch.randn(16, 8, 3, 3, generator=g),
        }
    )


def test_rules_pick_codecs_in_order() -> None:
    p = dp.get_codec(f"policy(rules='{RULES}')")
    d = _model()
    picked = {k: p.select(k, v).spec.split("(")[0] for k, v in d.items()}
    assert picked == {
        "enc.norm.weight": "fp16",
        "fc.weight": "topk",
        "fc.bias": "fp16",
        "small.weight": "quant",
        "conv.weight": "sign",  # 4-D: not 'ndim==2'
    }


def test_payload_carries_each_tensors_codec() -> None:
    d = _model()
    spec = f"policy(rules='{RULES}') | zstd(level=5)"
    payload = dp.Compressor(spec, error_feedback=False).compress(d)
    out = dp.decompress(payload)  # the receiver needs nothing but the payload
    assert torch.equal(out["fc.bias"], d["fc.bias"].half().float())
    kept = out["fc.weight"] != 0
    assert int(kept.sum()) == 250
    assert read_header(payload).codec == dp.get_codec(spec).spec
    sizes = {
        k: len(
            dp.Compressor(
                dp.get_codec(f"policy(rules='{RULES}')").select(k, v), error_feedback=False
            ).compress(dp.Delta({k: v}))
        )
        for k, v in d.items()
    }
    assert sizes["fc.weight"] < 0.15 * 4 * 5000


def test_python_and_config_constructors_match_the_spec() -> None:
    a = Policy.from_rules([("*.bias", "fp16"), ("*", "topk(0.01) | quant(bits=4)")])
    b = Policy.from_config(
        {"rules": [{"match": "*.bias", "codec": "fp16"}], "default": "topk(0.01) | quant(bits=4)"}
    )
    c = dp.get_codec("policy(rules='*.bias: fp16; *: topk(0.01)|quant(4)')")
    assert a.spec == b.spec == c.spec
    assert dp.get_codec(c.spec).spec == c.spec


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("", "non-empty"),
        ("*.bias fp16", "must read 'CONDITION: CODEC'"),
        ("numel<<3: fp16", "cannot read condition"),
        ("numel<\u0663: fp16", "cannot read condition"),  # an Arabic-Indic 3: digits are ASCII, as in specs
        ("*: nope", "unknown codec"),
        ("*: quant(8) | zstd", "cannot be a policy or end in a lossless stage"),
    ],
)
def test_bad_rules_say_what_to_fix(rules: str, message: str) -> None:
    with pytest.raises(dp.CodecError, match=message):
        Policy(rules=rules)


def test_unmatched_tensor_is_an_error_naming_it() -> None:
    comp = dp.Compressor("policy(rules='*.bias: fp16')")
    with pytest.raises(dp.CodecError, match="no rule matches tensor 'fc.weight'"):
        comp.compress(dp.Delta({"fc.weight": torch.ones(3, 3)}))
    with pytest.raises(dp.CodecError, match="unknown keys"):
        Policy.from_config({"rule": []})
