"""LoRA extraction against numpy's SVD (Eckart–Young optimum), PEFT loading, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deltaplane.adapters import load_peft
from deltaplane.adapters.extract import extract_lora, low_rank_factors
from deltaplane.errors import AdapterMismatch, ConfigError


def decaying(m: int, n: int, seed: int, decay: float = 0.85) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * s) @ v.T


def optimum(delta: torch.Tensor, k: int) -> float:
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()))


@pytest.mark.parametrize("k", [1, 4, 16])
def test_full_svd_reaches_the_eckart_young_optimum(k):
    d = decaying(48, 30, seed=k).float()
    A, B, err, kept, randomized = low_rank_factors(d, rank=k)
    assert not randomized and A.shape == (k, 30) and B.shape == (48, k)
    assert err == pytest.approx(optimum(d, k), rel=1e-4, abs=1e-6)
    assert float((d - B @ A).norm() / d.norm()) == pytest.approx(err, rel=1e-4)
    assert kept == pytest.approx(1 - optimum(d, k) ** 2, abs=1e-5)


def test_randomized_svd_is_within_five_percent_of_optimum():
    d = decaying(600, 500, seed=1, decay=0.97).float()
    _, _, err, _, randomized = low_rank_factors(d, rank=16, randomized_above=256)
    assert randomized
    assert optimum(d, 16) <= err <= 1.05 * optimum(d, 16)


def test_energy_picks_the_smallest_rank_holding_it():
    d = decaying(40, 40, seed=2, decay=0.8)
    s2 = np.linalg.svd(d.numpy(), compute_uv=False) ** 2
    want = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9) + 1)
    A, _, _, kept, _ = low_rank_factors(d, energy=0.9)
    assert A.shape[0] == want and kept >= 0.9
    A, _, _, _, _ = low_rank_factors(d, energy=0.9, rank=3)  # the cap wins
    assert A.shape[0] == 3


def _models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "embeddings.word_embeddings.weight": torch.randn(50, 24, generator=g),
        "layer.0.query.weight": torch.randn(24, 24, generator=g),
        "layer.0.query.bias": torch.randn(24, generator=g),
        "layer.0.up.weight": torch.randn(40, 24, generator=g),
        "layer.0.up.bias": torch.randn(40, generator=g),
        "layer.0.norm.weight": torch.ones(24),
        "position_ids": torch.arange(8),
    }
    ft = dict(base)
    ft["embeddings.word_embeddings.weight"] = base["embeddings.word_embeddings.weight"] + 0.1
    ft["layer.0.query.weight"] = base["layer.0.query.weight"] + decaying(24, 24, 5).float()
    ft["layer.0.query.bias"] = base["layer.0.query.bias"] + 0.5
    ft["layer.0.up.weight"] = base["layer.0.up.weight"] + decaying(40, 24, 6).float()
    ft["layer.0.norm.weight"] = base["layer.0.norm.weight"] * 1.1
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    return base, ft


def test_extraction_from_files_reports_layers_and_what_it_cannot_hold(tmp_path):
    base, ft = _models(tmp_path)
    result = extract_lora(tmp_path / "ft", tmp_path / "base", rank=4)
    assert list(result.lora) == ["layer.0.query.weight", "layer.0.up.weight"]
    for r in result.layers:
        delta = ft[r.name] - base[r.name]
        assert r.rank == 4 and r.rel_error == pytest.approx(optimum(delta, 4), rel=1e-4)
    # the bias change travels as lora_B.bias; the embedding and the norm are reported, not silently dropped
    assert result.lora["layer.0.query.weight"].bias is not None
    assert set(result.uncaptured) == {"embeddings.word_embeddings.weight", "layer.0.norm.weight"}
    # full rank reproduces the fine-tune on the adapted layers
    full = extract_lora(ft, base, rank=64)
    merged = full.lora.merged_into(base)
    assert torch.allclose(merged["layer.0.up.weight"], ft["layer.0.up.weight"], atol=1e-5)
    assert torch.allclose(merged["layer.0.query.bias"], ft["layer.0.query.bias"], atol=1e-6)


def tiny_bert_fine_tune():
    """A tiny random BertModel, its state dict, and that state with every floating tensor moved (a fine-tune)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
    )
    model = transformers.BertModel(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ft = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }
    return model, base, ft


def test_extracted_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model, base, ft = tiny_bert_fine_tune()
    result = extract_lora(ft, base, energy=0.5, rank=12)
    assert len({r.rank for r in result.layers}) > 1  # per-layer ranks -> rank_pattern / alpha_pattern
    result.lora.save_peft(tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "ad")
    merged = pm.merge_and_unload().state_dict()
    ours = result.lora.merged_into(base)
    assert max(float((merged[k] - ours[k]).abs().max()) for k in ours) <= 1e-6
    assert load_peft(tmp_path / "ad").ranks == result.lora.ranks


def truncation(delta: torch.Tensor, k: int) -> np.ndarray:
    """numpy's best rank-k approximation of ``delta`` (Eckart–Young): ``U_k Σ_k V_kᵀ``."""
    u, s, vt = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("kwargs", [dict(rank=3), dict(energy=0.5, rank=12)])
def test_peft_applies_numpys_rank_r_truncation_of_each_change(tmp_path, kwargs):
    """Independent of our own materialize: what PEFT merges from the extracted folder (its own scaling from r,
    lora_alpha, rank_pattern and alpha_pattern) is numpy's truncated SVD of W_ft − W_base, layer by layer, and
    each changed bias exactly."""
    peft = pytest.importorskip("peft")
    model, base, ft = tiny_bert_fine_tune()
    result = extract_lora(ft, base, **kwargs)
    result.lora.save_peft(tmp_path / "ad")
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    assert len(result.layers) == 7  # q, k, v, attention output, intermediate, output, pooler
    for rep in result.layers:
        want = truncation(ft[rep.name] - base[rep.name], rep.rank)
        got = (merged[rep.name].double() - base[rep.name].double()).numpy()
        assert np.abs(got - want).max() <= 2e-6, rep.name
        bias = rep.name.removesuffix(".weight") + ".bias"
        assert torch.allclose(merged[bias] - base[bias], ft[bias] - base[bias], atol=1e-6)


def test_bad_requests(tmp_path):
    base, ft = _models(tmp_path)
    with pytest.raises(ConfigError, match="needs a rank"):
        extract_lora(ft, base)
    with pytest.raises(ConfigError, match="energy must be in"):
        extract_lora(ft, base, energy=1.5)
    other = dict(ft)
    other["layer.0.up.weight"] = torch.zeros(41, 24)
    with pytest.raises(AdapterMismatch, match="layer.0.up.weight"):
        extract_lora(other, base, rank=2)
    del other["layer.0.up.weight"]
    with pytest.raises(AdapterMismatch, match="lacks"):
        extract_lora(other, base, rank=2)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    _models(tmp_path)
    out = tmp_path / ("adapter-" + "x" * 100) / "[v2]"  # printed whole: not wrapped, [v2] is not rich markup
    res = CliRunner().invoke(app, ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                                   "--rank", "3", "-o", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"into {out} in " in res.output, res.output
    assert "layer.0.up.weight" in res.output and "not in the adapter" in res.output
    assert load_peft(out).ranks == {"layer.0.query.weight": 3, "layer.0.up.weight": 3}
    again = [
        "extract-lora",
        str(tmp_path / "ft"),
        "--base",
        str(tmp_path / "base"),
        "--rank",
        "2",
        "-o",
        str(out),
    ]
    res = CliRunner().invoke(app, again)  # an earlier adapter is never replaced silently
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert load_peft(out).ranks["layer.0.query.weight"] == 3
    assert CliRunner().invoke(app, [*again, "--overwrite"]).exit_code == 0
    assert load_peft(out).ranks["layer.0.query.weight"] == 2
    res = CliRunner().invoke(app, ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "nope"),
                                   "--rank", "3", "-o", str(tmp_path / "x")])  # fmt: skip
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "x").exists()
    # an output under a file: a usage error before any work (was exit 1, "[Errno 17] File exists: 'afile'")
    (tmp_path / "afile").write_text("not a folder")
    res = CliRunner().invoke(app, ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                                   "--rank", "3", "-o", str(tmp_path / "afile" / "lora")])  # fmt: skip
    assert res.exit_code == 2 and "is a file, not a folder" in " ".join(res.output.split()), res.output
    # a pattern that is not a regex: a usage error naming it (was a re.error traceback, exit 1), no output
    for option in ("--include", "--exclude"):
        res = CliRunner().invoke(app, ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                                       "--rank", "3", option, "[[", "-o", str(tmp_path / "y")])  # fmt: skip
        assert res.exit_code == 2 and "'[[' is not a regular expression" in res.output, res.output
        assert not (tmp_path / "y").exists()


def test_low_rank_factors_refuses_non_finite_input_before_the_svd():
    # from a review: the SVD ran first and failed with torch's bare _LinAlgError
    from deltaplane.errors import InvalidUpdate

    delta = torch.randn(6, 4)
    delta[1, 2] = float("nan")
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        low_rank_factors(delta, rank=2)


def test_a_fine_tune_saved_without_the_bases_position_ids_still_extracts(tmp_path):
    """A BERT checkpoint saved by an older transformers holds ``embeddings.position_ids`` (an int64 buffer); a
    fine-tune of it saved by a newer one does not (shipped all-MiniLM-L6-v2 → ``save_pretrained``). Buffers are
    never extracted, so the fine-tune is not refused for it; a missing *weight* still is."""
    base, ft = _models(tmp_path)
    del ft["position_ids"]
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    result = extract_lora(tmp_path / "ft", tmp_path / "base", rank=4)
    assert list(result.lora) == ["layer.0.query.weight", "layer.0.up.weight"]
    del ft["layer.0.up.bias"]
    with pytest.raises(AdapterMismatch, match=r"lacks \['layer.0.up.bias'\]"):
        extract_lora(ft, base, rank=4)
