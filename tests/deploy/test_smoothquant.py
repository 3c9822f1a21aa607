"""SmoothQuant before int8: an exact rewrite in fp32 that shrinks int8 error on outlier-heavy activations."""

import numpy as np
import pytest
import torch

from deltaplane.deploy.smoothquant import SmoothedLinear, layernorm_fed_linears, smooth_layernorm_inputs
from deltaplane.deploy.tokens import deploy_token_model
from deltaplane.errors import ConfigError

transformers = pytest.importorskip("transformers")


def _outlier_bert(layers: int = 2) -> torch.nn.Module:
    """A tiny BERT whose LayerNorms emit a few huge channels, as trained transformers' do."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight[[3, 17]] = 40.0  # two outlier channels after every LayerNorm
    return model


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, 97, (8, 12), generator=g),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
        }
        for _ in range(n)
    ]


def test_finds_exactly_the_layernorm_fed_linears_of_bert():
    model = _outlier_bert()
    groups = layernorm_fed_linears(model, _batches(1)[0])
    expected = []
    for i in range(2):
        p = f"encoder.layer.{i}."
        expected += [[p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"]]
        expected += [[p + "intermediate.dense"]]
    assert groups == expected  # not attention.output.dense (fed by attention) nor output.dense (fed by GELU)


def test_smoothing_is_exact_in_fp32_and_removes_the_outlier_channels():
    model = _outlier_bert()
    batch = _batches(1, seed=1)[0]
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    report = smooth_layernorm_inputs(model, _batches(), alpha=1.0)
    assert report["linears"] == 8 and report["groups"] == 4 and report["max_activation_ratio"] > 10
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # alpha = 1 moves the whole activation range into the weights: on the calibration data every channel the
    # Linear sees has max |x| = 1 exactly (the paper's limit case), so no outlier channel is left.
    seen: list[torch.Tensor] = []
    lin = model.encoder.layer[0].attention.self.query
    assert isinstance(lin, SmoothedLinear)
    h = lin.linear.register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().amax((0, 1))))
    with torch.no_grad():
        for b in _batches():
            model(**b)
    h.remove()
    torch.testing.assert_close(torch.stack(seen).amax(0), torch.ones(32), rtol=1e-4, atol=1e-4)


def test_alpha_out_of_range_and_no_calibration_are_refused():
    with pytest.raises(ConfigError, match="alpha"):
        smooth_layernorm_inputs(_outlier_bert(1), _batches(1), alpha=1.5)
    with pytest.raises(ConfigError, match="calibration"):
        smooth_layernorm_inputs(_outlier_bert(1), [])


def _tokens(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return np.concatenate(
        [np.stack([b["input_ids"].numpy(), b["attention_mask"].numpy()], 1) for b in batches]
    )


@pytest.mark.parametrize("reduce_range", [False, True])
def test_smoothquant_shrinks_the_int8_error_of_the_shipped_onnx(tmp_path, monkeypatch, reduce_range):
    """End to end through ORT's dynamic int8 (7-bit weights as on CPUs without VNNI, or full 8-bit)."""
    import deltaplane.deploy.quantize as quantize

    monkeypatch.setattr(quantize, "saturating_int8", lambda: reduce_range)
    ev, cal = _tokens(_batches(2, seed=7)), _tokens(_batches(4, seed=3))
    worst = {}
    for alpha in (None, 0.5):
        res = deploy_token_model(
            _outlier_bert(),
            tmp_path / f"m{alpha}",
            task="sentence-embedding",
            eval_tokens=ev,
            calib_tokens=cal,
            quant="int8",
            smooth=alpha,
            latency_iters=1,
            device_cost=False,
        )
        worst[alpha] = 1 - res.manifest["fidelity"]["cosine_min"]
        assert (res.manifest["smoothquant"] is None) == (alpha is None)
    assert worst[0.5] < 0.7 * worst[None], worst


def test_a_tied_lm_head_is_left_alone_and_the_decoder_stays_exact():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, and fed by ln_f
    batch = _batches(1)[0]
    with torch.no_grad():
        before = model(**batch).logits
    emb = model.transformer.wte.weight.detach().clone()
    smooth_layernorm_inputs(model, _batches())
    assert not isinstance(model.lm_head, SmoothedLinear)
    assert torch.equal(model.transformer.wte.weight, emb)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-4)


def test_non_finite_calibration_activations_are_refused_with_the_layer():
    model = _outlier_bert(1)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[5] = float("nan")  # a corrupt checkpoint
    with pytest.raises(ConfigError, match="encoder.layer.0.attention.self.query.*not finite"):
        smooth_layernorm_inputs(model, _batches(1))
