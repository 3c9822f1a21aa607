import pytest
import torch

import deltaplane as dp


def _deltas(n: int, seed: int = 0) -> list[dp.Delta]:
    g = torch.Generator().manual_seed(seed)
    return [
        dp.Delta({"w": torch.randn(50, 20, generator=g), "b": torch.randn(20, generator=g)}) for _ in range(n)
    ]


def test_error_feedback_recovers_dropped_mass() -> None:
    """Σ sent + final residual == Σ true deltas (exactly, up to float rounding), so nothing is lost."""
    comp = dp.Compressor("topk(0.02) | quant(bits=4)", error_feedback=True, seed=0)
    deltas = _deltas(30)
    sent = [dp.decompress(comp.compress(d)) for d in deltas]
    total_true = sum(deltas[1:], deltas[0])
    total_sent = sum(sent[1:], sent[0])
    assert comp.state.residual is not None
    assert (total_sent + comp.state.residual).allclose(total_true, atol=1e-4)
    # and the residual stays bounded rather than growing with the number of rounds
    assert comp.state.residual.norm() < 0.5 * total_true.norm() * 30**0.5


def test_error_feedback_beats_no_feedback_over_rounds() -> None:
    deltas = _deltas(40, seed=1)
    truth = sum(deltas[1:], deltas[0])
    errs = {}
    for ef in (True, False):
        comp = dp.Compressor("topk(0.01)", error_feedback=ef)
        sent = [dp.decompress(comp.compress(d)) for d in deltas]
        errs[ef] = (sum(sent[1:], sent[0]) - truth).norm() / truth.norm()
    assert errs[True] < 0.7 * errs[False]


def test_deterministic_given_seed() -> None:
    d = _deltas(3)
    a = [dp.Compressor("quant(bits=2, stochastic=true)", seed=7).compress(x) for x in d]
    b = [dp.Compressor("quant(bits=2, stochastic=true)", seed=7).compress(x) for x in d]
    c = [dp.Compressor("quant(bits=2, stochastic=true)", seed=8).compress(x) for x in d]
    assert a == b and a != c


def test_state_dict_resumes_exactly() -> None:
    deltas = _deltas(6)
    ref = dp.Compressor("topk(0.1) | quant(bits=2, stochastic=true)", seed=3)
    expected = [ref.compress(d) for d in deltas]
    first = dp.Compressor("topk(0.1) | quant(bits=2, stochastic=true)", seed=3)
    for d in deltas[:3]:
        first.compress(d)
    resumed = dp.Compressor("topk(0.1) | quant(bits=2, stochastic=true)", seed=99)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.compress(d) for d in deltas[3:]] == expected[3:]
    with pytest.raises(dp.DeltaplaneError, match="codec"):
        dp.Compressor("identity").load_state_dict(first.state_dict())


def test_bad_input_is_refused() -> None:
    comp = dp.Compressor("topk(0.1)")
    with pytest.raises(dp.InvalidUpdate, match="'w'"):
        comp.compress(dp.Delta({"w": torch.tensor([float("nan"), 1.0])}))
    comp.compress(dp.Delta({"w": torch.ones(4)}))
    with pytest.raises(dp.ShapeMismatch, match="error-feedback"):
        comp.compress(dp.Delta({"w": torch.ones(5)}))
    with pytest.raises(dp.SpecError):
        dp.Compressor("topk(ratio=-1)")


def test_ratio_on_a_realistic_layer() -> None:
    d = dp.Delta({"w": torch.randn(256, 64)})
    p = dp.Compressor("topk(0.01) | quant(bits=8)").compress(d)
    assert d.nbytes / len(p) > 50


@pytest.mark.parametrize(
    "spec",
    [
        "sign",
        "stc(0.02)",
        "powersgd(rank=2, min_size=0)",
        "randk(0.05)",
        "threshold(tau=1.5) | quant(bits=4)",
    ],
)
def test_error_feedback_recovers_dropped_mass_for_biased_codecs(spec: str) -> None:
    """EF-signSGD, STC, PowerSGD... : Σ sent + residual == Σ true, and Σ sent alone gets close over rounds."""
    deltas = _deltas(25, seed=2)
    comp = dp.Compressor(spec, error_feedback=True, seed=0)
    sent = [dp.decompress(comp.compress(d)) for d in deltas]
    total_true = sum(deltas[1:], deltas[0])
    total_sent = sum(sent[1:], sent[0])
    assert (total_sent + comp.state.residual).allclose(total_true, atol=1e-3)
    no_ef = dp.Compressor(spec, error_feedback=False, seed=0)
    sent_no_ef = [dp.decompress(no_ef.compress(d)) for d in deltas]
    err_ef = (total_sent - total_true).norm() / total_true.norm()
    err_no = (sum(sent_no_ef[1:], sent_no_ef[0]) - total_true).norm() / total_true.norm()
    assert err_ef < 0.8 * err_no


def test_powersgd_warm_start_lives_in_the_compressor_state() -> None:
    g = torch.Generator().manual_seed(3)
    low = dp.Delta(
        {"w": torch.randn(60, 4, generator=g) @ torch.randn(4, 50, generator=g), "b": torch.ones(5)}
    )
    comp = dp.Compressor("powersgd(rank=4, min_size=0)", error_feedback=False, seed=0)
    comp.compress(low)
    assert set(comp.state.codec) == {"w"}  # the fallback (fp16) tensor keeps no state
    assert tuple(comp.state.codec["w"]["/"]["q"].shape) == (50, 4)
    # a stateless codec in the same Compressor API keeps none
    plain = dp.Compressor("topk(0.1)", error_feedback=False)
    plain.compress(low)
    assert plain.state.codec == {}


def test_powersgd_state_resumes_exactly() -> None:
    deltas = _deltas(6, seed=4)
    spec = "powersgd(rank=2, min_size=0) | quant(bits=8)"
    ref = dp.Compressor(spec, seed=1)
    expected = [ref.compress(d) for d in deltas]
    first = dp.Compressor(spec, seed=1)
    for d in deltas[:3]:
        first.compress(d)
    resumed = dp.Compressor(spec, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.compress(d) for d in deltas[3:]] == expected[3:]
    cold = dp.Compressor(spec, seed=1)
    cold.load_state_dict({**first.state_dict(), "codec_state": {}})
    assert cold.compress(deltas[3]) != expected[3]  # without the warm start the result differs


def test_powersgd_with_error_feedback_tracks_a_drifting_low_rank_signal() -> None:
    g = torch.Generator().manual_seed(9)
    u, v = torch.randn(80, 3, generator=g), torch.randn(3, 70, generator=g)
    comp = dp.Compressor("powersgd(rank=3, min_size=0)", error_feedback=True, seed=0)
    errs = []
    for t in range(12):
        d = dp.Delta({"w": (u + 0.01 * t) @ v + 0.01 * torch.randn(80, 70, generator=g)})
        out = dp.decompress(comp.compress(d))
        errs.append(float((out["w"] - d["w"]).norm() / d["w"].norm()))
    assert errs[-1] < 0.05


def test_a_plain_mapping_compresses_like_a_delta_round_after_round() -> None:
    """compress() takes a name -> tensor mapping (it checked one for NaN), but with error feedback the second
    round added the residual to the dict: TypeError. Each round's bytes equal those of the same deltas."""
    g = torch.Generator().manual_seed(0)
    rounds = [{"w": torch.randn(40, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    as_dict = dp.Compressor("topk(0.1) | quant(bits=4)", seed=3)
    as_delta = dp.Compressor("topk(0.1) | quant(bits=4)", seed=3)
    for d in rounds:
        assert as_dict.compress(d, base_version=1) == as_delta.compress(dp.Delta(d), base_version=1)
        _, sent = as_dict.encode(d)
        assert sent.keys() == d.keys()
        as_delta.encode(dp.Delta(d))
    assert torch.equal(as_dict.state.residual["w"], as_delta.state.residual["w"])


def test_a_state_of_another_codec_is_a_config_error_and_restores_nothing() -> None:
    """Before: a bare DeltaplaneError, which callers mapping ConfigError to HTTP 422 or exit 2 did not catch."""
    from deltaplane.codecs import Compressor
    from deltaplane.errors import ConfigError

    quant = Compressor("quant(bits=8)")
    rounds = quant.state.rounds
    with pytest.raises(
        ConfigError, match=r"state is for codec 'topk\(ratio=0.1\)', this compressor uses 'quant\(bits=8"
    ):
        quant.load_state_dict(Compressor("topk(0.1)").state_dict())
    assert quant.state.rounds == rounds
