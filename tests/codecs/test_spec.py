import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import format_spec, parse_spec


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("identity", "identity"),
        ("fp16", "fp16"),
        ("topk(0.01)", "topk(ratio=0.01)"),
        ("quant(4)", "quant(bits=4, stochastic=false, chunk=512, scale=max)"),
        (
            " topk( ratio = 0.05 )|quant(bits=2,stochastic=TRUE, chunk=64) ",
            "topk(ratio=0.05) | quant(bits=2, stochastic=true, chunk=64, scale=max)",
        ),
    ],
)
def test_canonical_specs_round_trip(spec: str, canonical: str) -> None:
    c = dp.get_codec(spec)
    assert c.spec == canonical
    assert repr(c) == canonical
    assert dp.get_codec(canonical).spec == canonical
    assert dp.get_codec(c) is c


def test_parse_and_format() -> None:
    assert parse_spec("a(1, x=2.5, y=true, z='s t') | b") == [
        ("a", [1], {"x": 2.5, "y": True, "z": "s t"}),
        ("b", [], {}),
    ]
    assert format_spec("a", {"x": 2.5, "y": False, "z": "s t"}) == "a(x=2.5, y=false, z='s t')"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("nope", "unknown codec 'nope'"),
        ("topk(", "expected"),
        ("topk(0.1", "expected"),
        ("topk(ratio=)", "missing value"),
        ("topk(ratio=2)", r"ratio must be in \(0, 1\]"),
        ("topk(0.1, 0.2)", "positional"),
        ("quant(bits=9)", "bits must be an integer in 1..8"),
        ("quant(bits=4.5)", "bits"),
        ("quant(bitz=4)", "unknown parameter"),
        ("quant(bits=4, bits=5)", "twice"),
        ("topk(0.1) |", "expected"),
        ("topk(0.1) quant", "expected"),
        ("quant(bits=4, 3)", "positional value after keyword"),
    ],
)
def test_bad_specs_say_what_to_fix(spec: str, message: str) -> None:
    with pytest.raises(dp.SpecError, match=message):
        dp.get_codec(spec)


def test_pipe_operator() -> None:
    p = dp.get_codec("topk(0.1)") | dp.get_codec("quant(bits=8)")
    assert isinstance(p, dp.Pipeline)
    assert p.spec == dp.get_codec("topk(0.1) | quant(8)").spec
    assert p == dp.get_codec(p.spec)


@pytest.mark.parametrize(
    "spec",
    [
        "quant(bits=4) | topk(0.1)",
        "identity | quant(4)",
        "fp16 | bf16",
        "sign | quant(4)",
        "ternary | quant(4) | zstd",
        "stc(0.1) | quant(8)",
        "powersgd(rank=2) | quant(8) | topk(0.1)",
    ],
)
def test_a_stage_that_would_never_run_is_a_spec_error(spec: str) -> None:
    """A stage compresses only the float fields the stage before it leaves: after quant, sign, stc... (no
    float field) it never ran, and such a pipeline was accepted and silently sent the first stage alone
    (``quant(4) | topk(0.1)``: every value at 4 bits, not a tenth of them)."""
    with pytest.raises(dp.SpecError, match="would never run"):
        dp.get_codec(spec)
    first, *rest = spec.split(" | ")
    with pytest.raises(dp.CodecError, match="would never run"):
        dp.Pipeline([dp.get_codec(first), *(dp.get_codec(r) for r in rest)])


@pytest.mark.parametrize(
    "spec",
    [
        "topk(0.1) | topk(0.5) | quant(4)",
        "randk(0.1) | stc(0.1)",
        "powersgd(rank=1, min_size=0, fallback=sign) | bf16",
        "fp16 | zstd",
        "threshold(0.1) | fp16 | zstd",
    ],
)
def test_stages_that_each_compress_what_the_last_left_are_pipelines(spec: str) -> None:
    codec = dp.get_codec(spec)
    d = dp.Delta({"w": torch.linspace(-1, 1, 600).reshape(20, 30)})
    payload = dp.Compressor(codec, error_feedback=False).compress(d)
    assert dp.decompress(payload, expect_layout=d)["w"].shape == (20, 30)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # a missing comma read 'quant(bits=4 chunk=8)' as two arguments, a trailing one was skipped
        ("quant(bits=4 chunk=8)", r"at character 14: expected ',' or '\)' after an argument, got 'chunk'"),
        ("quant(4 8)", r"at character 9: expected ',' or '\)'"),
        ("quant(bits=4,)", r"at character 14: trailing ',' before '\)'"),
        ("quant(bits=4, )", r"at character 15: trailing ','"),
        ("topk(ratio=0.1,, )", "at character 16: unexpected ','"),
        ("quant(,4)", "at character 7: unexpected ','"),
        # '1_000' was float('1_000') = 1000.0, so the error said "Found 1000.0"
        ("quant(chunk=1_000)", "at character 13: cannot read number '1_000'"),
        ("topk(1_0)", "at character 6: cannot read number '1_0'"),
        ("quant(bits=4) quant", "at character 15: expected '|', got 'quant'"),
        # Python's float() and int() read any script's digits: 'quant(bits=٨)' was quant(bits=8)
        ("quant(bits=٨)", r"at character 12: non-ASCII character '٨' \(U\+0668\)"),
        ("topk(0.٠١)", r"at character 8: non-ASCII character '٠' \(U\+0660\)"),
        # a Cyrillic 'о' in a name: 'unknown codec' listing a 'topk' that looks the same
        ("tоpk(0.01)", r"at character 2: non-ASCII character 'о' \(U\+043E\)"),
        ("quant(bits=8,\u00a0chunk=64)", r"at character 14: non-ASCII character '\\xa0' \(U\+00A0\)"),
        # float('1e999') is inf, which the grammar excludes ('no nan or inf'); it reached the codec as inf
        ("threshold(tau=1e999)", r"at character 15: number '1e999' is out of the float range"),
        ("topk(-1e400)", r"at character 6: number '-1e400' is out of the float range"),
    ],
)
def test_the_grammar_is_strict_and_errors_name_the_position(spec: str, message: str) -> None:
    with pytest.raises(dp.SpecError, match=message):
        dp.get_codec(spec)


def test_the_same_strictness_holds_for_defences() -> None:
    """Defences share the grammar (docs/aggregation.md, 'One spec grammar')."""
    from deltaplane.aggregation.factory import parse_defense

    with pytest.raises(dp.ConfigError, match="expected ',' or"):
        parse_defense("norm_bound(max_norm=2.0 noise=0.001)")
    parse_defense("norm_bound(max_norm=2.0, noise=0.001)")


def test_spacing_and_plain_numbers_still_parse() -> None:
    assert parse_spec(" a ( 1 , x = -2.5e-3 , y = .5, z = 5. ) |b( )") == [
        ("a", [1], {"x": -2.5e-3, "y": 0.5, "z": 5.0}),
        ("b", [], {}),
    ]


def test_quoted_strings_may_hold_any_character_and_round_trip() -> None:
    codec = dp.get_codec('policy(rules="*.é: fp16; *: identity")')
    assert dp.get_codec(codec.spec) == codec


def test_defences_and_attacks_refuse_the_same_numbers() -> None:
    from deltaplane.aggregation.factory import parse_defense
    from deltaplane.engine.attacks import parse_attack

    with pytest.raises(dp.ConfigError, match="non-ASCII character"):
        parse_defense("trimmed_mean(bucket=٢)")
    with pytest.raises(dp.ConfigError, match="out of the float range"):
        parse_attack("sign_flip(0.2, scale=1e999)")  # was SignFlip(scale=inf)
