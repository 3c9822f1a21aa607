"""Error feedback needs a contraction: codecs say whether they are one, and the Compressor warns if not."""

import warnings

import pytest
import torch

from deltaplane.codecs import Compressor, get_codec


@pytest.mark.parametrize(
    "spec, contractive",
    [
        ("identity", True),
        ("topk(0.01) | quant(bits=8)", True),
        ("quant(bits=2, stochastic=true)", True),
        ("quant(bits=4, stochastic=true, scale=norm)", False),
        ("ternary", False),
        ("randk(0.01)", True),
        ("randk(0.01, unbiased=true)", False),
        ("randk(0.6, unbiased=true)", True),
        ("topk(0.1) | ternary", False),
        ("policy(rules='*.bias: fp16; *: ternary')", False),
        ("policy(rules='*.bias: fp16; *: stc(0.01)')", True),
    ],
)
def test_contractive_flag(spec: str, contractive: bool) -> None:
    assert get_codec(spec).contractive is contractive


@pytest.mark.parametrize("spec", ["ternary", "randk(0.01, unbiased=true)"])
def test_rescaled_and_ternary_errors_exceed_the_input(spec: str) -> None:
    """What the flag claims, measured: the expected squared error is larger than ‖x‖²."""
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    c = Compressor(spec, error_feedback=False, seed=1)
    sent = c.encode({"x": x})[1]["x"]
    assert float((sent - x).pow(2).sum()) > float(x.pow(2).sum())
    exact = Compressor("topk(0.1)", error_feedback=False).encode({"x": x})[1]["x"]
    assert float((exact - x).pow(2).sum()) < float(x.pow(2).sum())  # top-k is a contraction


def test_compressor_warns_about_error_feedback_on_a_non_contraction() -> None:
    with pytest.warns(UserWarning, match="not a contraction.*error_feedback=False"):
        Compressor("ternary", error_feedback=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Compressor("ternary", error_feedback=False)
        Compressor("topk(0.01) | quant(bits=8)", error_feedback=True)
