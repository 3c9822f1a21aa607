"""mergekit parity: every method against mergekit's own kernels, its config semantics, and its output habits."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import deltaplane as dp
from deltaplane.merging import merge, merge_files
from deltaplane.merging.config import evaluate_setting

mk_registry = pytest.importorskip("mergekit.merge_methods.registry", reason="mergekit (the 'merging' extra)")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

N_LAYERS = 4


def _mk(name: str, tensors: list[torch.Tensor], base_index: int | None, **params: object) -> torch.Tensor:
    """mergekit's own kernel on one tensor group (what mergekit-yaml runs per tensor)."""
    g = TensorGroup.from_tensors(tensors, base_index=base_index, name="w")
    return mk_registry.get(name)([g], parameters=params)[0]


def _tensors(shape: tuple[int, ...] = (40, 30), n: int = 3, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


W3 = [1.0, 0.5, 0.7]
D3 = [0.5, 0.3, 0.8]
# (method, mergekit parameters, our keyword arguments, models, with base)
KERNEL_CASES = [
    ("linear", {"weight": W3}, {"weights": W3}, 3, False),
    ("task_arithmetic", {"weight": W3, "lambda": 0.8}, {"weights": W3, "lambda": 0.8}, 3, True),
    ("ties", {"weight": W3, "density": D3}, {"weights": W3, "densities": D3}, 3, True),
    ("ties", {"weight": W3, "density": D3, "rescale": True}, {"weights": W3, "densities": D3, "rescale": True}, 3, True),
    ("ties", {"weight": W3, "density": 0.4, "int8_mask": True}, {"weights": W3, "density": 0.4, "int8_mask": True}, 3, True),
    ("breadcrumbs_ties", {"weight": W3, "density": 0.5, "gamma": 0.05}, {"weights": W3, "density": 0.5, "gamma": 0.05}, 3, True),
    ("breadcrumbs", {"weight": W3, "density": 0.5, "gamma": 0.05, "rescale": True},
     {"weights": W3, "density": 0.5, "gamma": 0.05, "rescale": True}, 3, True),
    ("della", {"weight": W3, "density": 1.0}, {"weights": W3, "density": 1.0}, 3, True),
    ("della_linear", {"weight": W3, "density": 1.0}, {"weights": W3, "density": 1.0}, 3, True),
    ("sce", {"select_topk": 0.5}, {"select_topk": 0.5}, 3, True),
    ("sce", {}, {}, 3, True),
    ("slerp", {"t": 0.3}, {"t": 0.3}, 1, True),
    ("nuslerp", {"weight": [1.0, 0.3]}, {"weights": [1.0, 0.3]}, 2, True),
    ("nuslerp", {"weight": [1.0, 0.3]}, {"weights": [1.0, 0.3]}, 2, False),
    ("nuslerp", {"weight": [1.0, 0.3], "nuslerp_flatten": False}, {"weights": [1.0, 0.3], "nuslerp_flatten": False}, 2, True),
    ("nuslerp", {"weight": [1.0, 0.3], "nuslerp_flatten": False, "nuslerp_row_wise": True},
     {"weights": [1.0, 0.3], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, True),
    ("multislerp", {"weight": W3}, {"weights": W3}, 3, True),
    ("multislerp", {"weight": W3}, {"weights": W3}, 3, False),
    ("karcher", {}, {}, 3, False),
    ("karcher", {"max_iter": 3}, {"max_iter": 3}, 3, True),
    ("model_stock", {}, {}, 3, True),
    ("model_stock", {"filter_wise": True}, {"filter_wise": True}, 3, True),
    ("nearswap", {"t": 0.03}, {"t": 0.03}, 1, True),
    ("arcee_fusion", {}, {}, 1, True),
    ("passthrough", {"scale": [0.5]}, {"scale": 0.5}, 1, False),
    ("ram", {}, {}, 3, True),
    ("ram", {"epsilon": 0.05}, {"epsilon": 0.05}, 3, True),
    ("ramplus_tl", {}, {}, 3, True),
    ("ramplus_tl", {"epsilon": 0.05, "r": 0.5, "alpha": 0.9}, {"epsilon": 0.05, "r": 0.5, "alpha": 0.9}, 3, True),
]  # fmt: skip


@pytest.mark.parametrize(("method", "mk_params", "kwargs", "n", "with_base"), KERNEL_CASES)
@pytest.mark.parametrize("shape", [(40, 30), (37,)])
def test_every_method_matches_mergekits_kernel(method, mk_params, kwargs, n, with_base, shape) -> None:  # type: ignore[no-untyped-def]
    base, models = _tensors(shape, n)
    want = _mk(method, ([base] if with_base else []) + models, 0 if with_base else None, **mk_params)
    got = merge(method, {"w": base} if with_base else None, [{"w": m} for m in models], **kwargs)["w"]
    # same formula; the only freedom is float32 rounding (we reduce norms and dots in float64)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    "setting",
    [0.5, [0, 1], [1, 0.7, 0.1], [0, 0.5, 0.3, 0.7, 1], ["a", "b", "c"], [True, False],
     [{"filter": "attn", "value": [0, 1]}, {"value": 0.3}], [{"filter": "mlp", "value": 2}],
     {"filter": "attn", "value": 0.4}, [{"filter": "*", "value": [1, 2, 3]}]],
)  # fmt: skip
def test_gradients_and_filters_evaluate_like_mergekit(setting) -> None:  # type: ignore[no-untyped-def]
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as mk_evaluate

    def to_mk(s):  # type: ignore[no-untyped-def]
        if isinstance(s, dict):
            return ConditionalParameter(**s)
        if isinstance(s, list) and s and isinstance(s[0], dict):
            return [ConditionalParameter(**c) for c in s]
        return s

    for name in ("layers.1.attn.q.weight", "layers.1.mlp.up.weight"):
        for t in (0.0, 0.2, 1 / 3, 0.5, 0.9, 1.0):
            assert evaluate_setting(setting, name, t) == mk_evaluate(
                name, to_mk(setting), t, validate=lambda v: v
            )


# -- files: a tiny "transformer" in HF layout -----------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "a", "b", "c", "d"]


def _layered_state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        return {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
    s = {"model.embed_tokens.weight": torch.randn(len(VOCAB), 8, generator=g)}
    for i in range(N_LAYERS):
        s[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        s[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g)
        s[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g)
    s["model.norm.weight"] = torch.randn(8, generator=g)
    s["lm_head.weight"] = torch.randn(len(VOCAB), 8, generator=g)
    return s


def _save(folder: Path, state: dict, vocab: list[str] = VOCAB, dtype: str | None = "float32") -> None:
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    cfg: dict = {"model_type": "llama", "num_hidden_layers": N_LAYERS, "transformers_version": "4.46.0"}
    if dtype:
        cfg["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = {"model": {"type": "WordPiece", "vocab": {w: i for i, w in enumerate(vocab)}}, "added_tokens": []}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))


@pytest.fixture
def llama(tmp_path: Path) -> tuple[Path, dict, list[dict]]:
    base = _layered_state(0)
    models = [_layered_state(i, base) for i in (1, 2, 3)]
    _save(tmp_path / "base", base)
    for i, m in enumerate(models):
        _save(tmp_path / f"m{i}", m)
    return tmp_path, base, models


def _cfg(root: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    p = root / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_gradient_and_filter_are_applied_per_layer(llama) -> None:  # type: ignore[no-untyped-def]
    root, base, models = llama
    cfg = {"merge_method": "task_arithmetic", "base_model": "base",
           "models": [{"model": "m0", "parameters": {"weight": [{"filter": "self_attn", "value": [0, 1]},
                                                                {"value": 0.25}]}}]}  # fmt: skip
    merge_files(_cfg(root, cfg), root / "out")
    got = load_file(root / "out" / "model.safetensors")
    for i in range(N_LAYERS):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        w = i / (N_LAYERS - 1)  # the gradient [0, 1] at t = layer / (layers − 1)
        torch.testing.assert_close(got[q], base[q] + w * (models[0][q] - base[q]))
        up = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(got[up], base[up] + 0.25 * (models[0][up] - base[up]))
    # outside the layers t = 0 (the gradient's first point), and the filter did not match: 0.25
    e = "model.embed_tokens.weight"
    torch.testing.assert_close(got[e], base[e] + 0.25 * (models[0][e] - base[e]))


@pytest.mark.parametrize(
    "cfg",
    [
        {"merge_method": "slerp", "base_model": "a", "parameters": {"t": [0.0, 0.5, 0.3, 0.7, 1.0]},
         "models": [{"model": "a"}, {"model": "b"}]},
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [1.0, 0.0]}},
                                              {"model": "b", "parameters": {"weight": [0.2, 1.0]}}]},
        # a density gradient down to 0 (refused as "must be in (0, 1]" before)
        {"merge_method": "ties", "base_model": "a",
         "models": [{"model": "b", "parameters": {"weight": 1.0, "density": [1.0, 0.5, 0.0]}}]},
        # YAML 1.1 reads 1e-1 as a string; mergekit's validator makes it a number, so the gradient interpolates
        # (it picked a point, as a list of labels, before: weight 0.1 at t = 1/3 where mergekit has 0.4)
        {"merge_method": "task_arithmetic", "base_model": "a",
         "models": [{"model": "b", "parameters": {"weight": ["1e-1", 1]}}], "parameters": {"lambda": "5e-1"}},
    ],
)  # fmt: skip
def test_gradients_outside_the_layers_match_mergekit_end_to_end(tmp_path, cfg) -> None:
    """Pre *and* post weights (embedding, final norm, head) take a gradient's value at t = 0, as mergekit's planner
    does since v0.1.2 (mergekit/plan.py, plan_module: one ConfigReader(t=0) for pre and post weights; before
    arcee-ai/mergekit#534 the post weights used t=1). Checked against mergekit's own run_merge on a real Llama,
    as are gradients that reach a density of 0 and gradients of numbers YAML leaves as strings."""
    transformers = pytest.importorskip("transformers")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    llama_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(llama_cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.save_pretrained(tmp_path / name, safe_serialization=True)
    cfg = json.loads(json.dumps(cfg).replace('"a"', json.dumps(str(tmp_path / "a"))).replace(
        '"b"', json.dumps(str(tmp_path / "b"))))  # fmt: skip
    cfg["dtype"] = "float32"
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(lazy_unpickle=False))
    merge_files(_cfg(tmp_path, cfg), tmp_path / "dp")
    mk = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "dp" / "model.safetensors")
    a = load_file(tmp_path / "a" / "model.safetensors")
    assert mk.keys() == ours.keys()
    for k in mk:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-5, atol=1e-6, msg=k)
    if cfg["merge_method"] == "slerp":  # t = 0 outside the layers: the base's final norm and head
        assert torch.equal(mk["model.norm.weight"], a["model.norm.weight"])
        assert torch.equal(mk["lm_head.weight"], a["lm_head.weight"])


def test_slices_stack_layers_and_renumber(llama) -> None:  # type: ignore[no-untyped-def]
    root, _base, models = llama
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "m0", "layer_range": [0, 3]}]},
        {"sources": [{"model": {"model": {"path": "m1"}}, "layer_range": [1, 4]}]}]}  # fmt: skip
    merge_files(_cfg(root, cfg), root / "out")
    got = load_file(root / "out" / "model.safetensors")
    src = [(models[0], 0), (models[0], 1), (models[0], 2), (models[1], 1), (models[1], 2), (models[1], 3)]
    for out_i, (m, in_i) in enumerate(src):
        for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{out_i}.{part}"], m[f"model.layers.{in_i}.{part}"])
    assert torch.equal(
        got["model.embed_tokens.weight"], models[0]["model.embed_tokens.weight"]
    )  # first slice
    assert torch.equal(got["lm_head.weight"], models[1]["lm_head.weight"])  # last slice
    assert len(got) == 6 * 3 + 3
    assert json.loads((root / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_slices_merge_each_layer_with_slice_parameters(llama) -> None:  # type: ignore[no-untyped-def]
    root, _base, models = llama
    cfg = {"merge_method": "linear", "slices": [{"sources": [
        {"model": "m0", "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
        {"model": "m1", "layer_range": [2, 4]}], "parameters": {"weight": 1.0}}]}  # fmt: skip
    merge_files(_cfg(root, cfg), root / "out")
    got = load_file(root / "out" / "model.safetensors")
    k = "self_attn.q_proj.weight"
    # output layer 0 = m0 layer 0 (weight 1) with m1 layer 2 (weight 1); layer 1 = m0 layer 1 (weight 0), m1 layer 3
    torch.testing.assert_close(
        got[f"model.layers.0.{k}"], (models[0][f"model.layers.0.{k}"] + models[1][f"model.layers.2.{k}"]) / 2
    )
    torch.testing.assert_close(got[f"model.layers.1.{k}"], models[1][f"model.layers.3.{k}"])


def test_slice_base_must_be_a_source(llama) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = llama
    cfg = {"merge_method": "ties", "base_model": "base", "parameters": {"weight": 1.0},
           "slices": [{"sources": [{"model": "m0", "layer_range": [0, 2]}]}]}  # fmt: skip
    with pytest.raises(dp.ConfigError, match="base model 'base' must be one of the slice's sources"):
        merge_files(_cfg(root, cfg), root / "out")
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": "m0", "layer_range": [0, 2]}, {"model": "m1", "layer_range": [3, 5]}]}]}  # fmt: skip
    with pytest.raises(dp.ConfigError, match=r"model 'm1' has 4 layers; layers \[3, 5\) do not exist"):
        merge_files(_cfg(root, cfg), root / "out")
    cfg["slices"][0]["sources"][1]["layer_range"] = [1, 4]
    with pytest.raises(dp.ConfigError, match="same number of layers"):
        merge_files(_cfg(root, cfg), root / "out")


def test_half_precision_computes_like_mergekit_unless_exact(llama) -> None:  # type: ignore[no-untyped-def]
    root, base, models = llama
    cfg = {"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
           "models": [{"model": f"m{i}", "parameters": {"weight": w, "density": 1.0}} for i, w in enumerate(W3)],
           "parameters": {"lambda": 0.9}}  # fmt: skip
    res = merge_files(_cfg(root, cfg), root / "out")
    got = load_file(root / "out" / "model.safetensors")
    k = "model.layers.1.mlp.up_proj.weight"
    want = _mk("ties", [base[k].bfloat16()] + [m[k].bfloat16() for m in models], 0, weight=W3, density=1.0,
               **{"lambda": 0.9})  # fmt: skip
    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want)
    assert res.notes == ()
    ta = cfg | {"merge_method": "task_arithmetic", "parameters": {"normalize": True}}
    for m in ta["models"]:
        m["parameters"] = {"weight": m["parameters"]["weight"]}
    merge_files(_cfg(root, ta), root / "ta")
    want = _mk("task_arithmetic", [base[k].bfloat16()] + [m[k].bfloat16() for m in models], 0, weight=W3,
               normalize=True)  # fmt: skip
    assert torch.equal(load_file(root / "ta" / "model.safetensors")[k], want)
    exact = merge_files(_cfg(root, cfg), root / "exact", exact_accumulation=True)
    assert not torch.equal(load_file(root / "exact" / "model.safetensors")[k], want)  # float32, rounded once
    assert any("float32" in n and "bfloat16" in n for n in exact.notes)
    assert "exact-accumulation" in (root / "exact" / "README.md").read_text()


def test_linear_needs_weight_like_mergekit(llama) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = llama
    cfg = {
        "merge_method": "linear",
        "models": [{"model": "m0"}, {"model": "m1", "parameters": {"weight": 1}}],
    }
    with pytest.raises(dp.ConfigError, match="needs parameter 'weight' for model 'm0'"):
        merge_files(_cfg(root, cfg), root / "out")


def test_outputs_recipe_card_dtype_and_umask(llama) -> None:  # type: ignore[no-untyped-def]
    root, _, models = llama
    (root / "nodtype").mkdir()
    _save(root / "nd", models[0], dtype=None)  # a donor config without any dtype key
    cfg = {"merge_method": "linear", "name": "tiny-soup", "out_dtype": "bfloat16",
           "models": [{"model": "nd", "parameters": {"weight": 1.0}}, {"model": "m1", "parameters": {"weight": 1.0}}]}  # fmt: skip
    path = _cfg(root, cfg)
    old = os.umask(0o027)
    try:
        merge_files(path, root / "out")
    finally:
        os.umask(old)
    out = root / "out"
    assert (out.stat().st_mode & 0o777) == 0o750  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (out / "mergekit_config.yml").read_text() == path.read_text()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "# tiny-soup" in card and "linear" in card and "nd" in card
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tokenizer_source_and_chat_template(llama) -> None:  # type: ignore[no-untyped-def]
    root, _, models = llama
    cfg = {"merge_method": "ties", "base_model": "base", "tokenizer_source": "union", "chat_template": "chatml",
           "models": [{"model": f"m{i}", "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)]}  # fmt: skip
    merge_files(_cfg(root, cfg), root / "out")
    tc = json.loads((root / "out" / "tokenizer_config.json").read_text())
    assert (
        tc["chat_template"].startswith("{% for message in messages %}")
        and "<|im_start|>" in tc["chat_template"]
    )
    assert tc["model_max_length"] == 16  # the rest of the source's tokenizer config is kept
    # a model with another vocabulary: union would need embedding surgery — refused, nothing written
    _save(root / "other", models[2], vocab=[*VOCAB[:-1], "zz"])
    cfg["models"].append({"model": "other", "parameters": {"weight": 1.0}})
    with pytest.raises(dp.ConfigError, match="vocabularies differ"):
        merge_files(_cfg(root, cfg), root / "out2")
    assert not (root / "out2").exists()
    cfg["models"].pop()
    for bad, msg in (({"chat_template": "vicuna-ish"}, "unknown chat_template"),
                     ({"tokenizer_source": None, "tokenizer": {"source": "base", "tokens": {"<x>": {}}}}, "tokens")):  # fmt: skip
        with pytest.raises(dp.ConfigError, match=msg):
            merge_files(_cfg(root, cfg | bad), root / "out3")


def test_bin_checkpoint_says_how_to_convert(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    for i in (1, 2):  # sharded: converted by the class that saved it (AutoModel would drop the head)
        (tmp_path / "m" / f"pytorch_model-0000{i}-of-00002.bin").write_bytes(b"not unpickled")
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    with pytest.raises(
        dp.ConfigError,
        match=r"pytorch_model.*not safetensors.*BertForSequenceClassification.*save_pretrained",
    ):
        merge_files(
            {"merge_method": "passthrough", "models": [{"model": str(tmp_path / "m")}]}, tmp_path / "o"
        )


def test_ties_keep_all_matches_the_reference_kthvalue(llama) -> None:  # type: ignore[no-untyped-def]
    # the TIES reference code: keep |τ| >= the k-th largest value (torch.kthvalue on the (n − k + 1)-th smallest)
    base = torch.zeros(64)
    m = torch.tensor([1.0, -1.0, 2.0, 0.5] * 16)  # 16 entries tie at every magnitude
    k = int(0.4 * 64)
    kth = m.abs().kthvalue(64 - k + 1).values
    want = torch.where(m.abs() >= kth, m, torch.zeros_like(m))
    got = merge("ties", {"w": base}, [{"w": m}], density=0.4, ties="keep_all")["w"]
    assert torch.equal(got, want)
    by_index = merge("ties", {"w": base}, [{"w": m}], density=0.4)["w"]
    assert int((by_index != 0).sum()) == k  # exactly k kept: the ties at 1.0 with the lowest indices
    kept_ones = (by_index.abs() == 1).nonzero().flatten()
    assert torch.equal(kept_ones, (m.abs() == 1).nonzero().flatten()[: len(kept_ones)])


def test_della_keeps_large_entries_more_often_as_mergekit_does() -> None:
    from mergekit.sparsify import della_magprune

    tau = torch.linspace(0.01, 1, 50).reshape(1, 50) * torch.tensor([1.0, -1.0] * 25)
    ours = torch.zeros(50)
    theirs = torch.zeros(50)
    trials = 400
    torch.manual_seed(0)
    for s in range(trials):
        out = merge("della_linear", {"w": torch.zeros(1, 50)}, [{"w": tau}], density=0.5, epsilon=0.4, seed=s,
                    rescale=False)["w"]  # fmt: skip
        ours += (out != 0).flatten().float()
        theirs += (della_magprune(tau, 0.5, 0.4) != 0).flatten().float()
    ours, theirs = ours / trials, theirs / trials
    # keep probability rises from density − ε = 0.1 to density + ε = 0.9 with the magnitude rank, in both
    assert (
        abs(ours[:10].mean() - theirs[:10].mean()) < 0.08
        and abs(ours[-10:].mean() - theirs[-10:].mean()) < 0.08
    )
    assert ours[:10].mean() < 0.25 and ours[-10:].mean() > 0.75


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_merge_leaves_no_temp_folder(llama, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = llama
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f"m{i}", "parameters": {"weight": 1.0}} for i in range(3)],
    }
    path = _cfg(root, cfg)
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT: give the child Python's own handler, as an interactive run has (`make test &` would else fail).
    code = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from deltaplane.merging import merge_files
        def slow(done, total, name):
            print("tensor", done, flush=True)
            time.sleep(0.5)
        merge_files({str(path)!r}, {str(root / "out")!r}, progress=slow)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("tensor")  # mid-merge: the temporary folder exists now
    assert [p for p in root.iterdir() if p.name.startswith(".out.dp1-")]
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    # SIGTERM: SystemExit(143) after cleanup; SIGINT: KeyboardInterrupt, then Python dies by SIGINT itself
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT)
    time.sleep(0.1)
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")] and not (root / "out").exists()


def test_cli_exact_accumulation_says_so(llama) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from deltaplane.cli import app

    root, _, _ = llama
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float16",
           "models": [{"model": "m0", "parameters": {"weight": 0.5}}]}  # fmt: skip
    res = CliRunner().invoke(
        app, ["merge", str(_cfg(root, cfg)), "-o", str(root / "out"), "--exact-accumulation"]
    )  # not -q: merge's -q silences its notes too (docs/cli.md's output rule), this one included
    assert res.exit_code == 0, res.output
    assert "note: computed in float32" in res.output and "mergekit computes in float16" in res.output


def test_arcee_fusion_with_negative_zero_importances() -> None:
    # a model equal to the base except for tiny changes in one column: most importances are ±0 (KL rounds below 0)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 30, generator=g)
    model = base.clone()
    model[:, 0] += 1e-6 * torch.randn(64, generator=g)
    model[:5] += torch.randn(5, 30, generator=g)
    want = _mk("arcee_fusion", [base, model], 0)
    got = merge("arcee_fusion", {"w": base}, [{"w": model}])["w"]
    assert torch.equal(got, want)


def test_ties_argsort_reproduces_mergekits_choice_among_ties() -> None:
    # task vectors on a grid of 1/40: thousands of entries tie at each threshold (as bfloat16 ones do)
    base, models = _tensors((64, 48), 3)
    models = [base + torch.round((m - base) * 40) / 40 for m in models]
    want = _mk("ties", [base, *models], 0, weight=W3, density=D3)
    got = merge("ties", {"w": base}, [{"w": m} for m in models], weights=W3, densities=D3, ties="argsort")[
        "w"
    ]
    assert torch.equal(got, want)
    by_index = merge("ties", {"w": base}, [{"w": m} for m in models], weights=W3, densities=D3)["w"]
    assert not torch.equal(by_index, want)  # the default breaks those ties by index


@pytest.mark.parametrize(
    "extra",
    [{}, {"lambda": 0.6}, {"normalize": False}, {"weight": [1.0, -0.5, 0.7]}, {"weight": [0.3, 0.3, 0.3]}],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_consensus_is_bit_identical_to_mergekits_kernel(extra: dict, dtype: torch.dtype) -> None:
    """The float-only consensus (hardshrink trim, max(s·τ, 0)) gives mergekit's numbers bit for bit."""
    base, models = _tensors((64, 48), 3, dtype=torch.float64)
    base, models = base.to(dtype), [(m + torch.randn(m.shape, generator=torch.Generator().manual_seed(9))).to(dtype)
                                    for m in models]  # fmt: skip
    mk = {"weight": W3, "density": D3} | extra
    ours = {"weights": mk.pop("weight"), "densities": mk.pop("density")} | mk
    want = _mk("ties", [base, *models], 0, weight=ours["weights"], density=D3, **mk)
    # argsort: the same pick as mergekit among any tied magnitudes, so only the arithmetic is compared
    got = merge("ties", {"w": base}, [{"w": m} for m in models], ties="argsort", **ours)["w"]
    assert torch.equal(got, want)
    if dtype == torch.float64:  # no ties among float64 magnitudes: the default (hardshrink) trim agrees too
        got = merge("ties", {"w": base}, [{"w": m} for m in models], **ours)["w"]
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("method", "params", "said"),
    [
        ("slerp", {"t": 0.3}, "the norms and the dot product"),
        ("model_stock", {}, "the norms and dot products of the task vectors"),
        ("ties", {"weight": 1.0, "density": 0.5, "rescale": True}, "L1 norms"),
        ("ties", {"weight": 1.0, "density": 0.5}, None),  # no sum: nothing to say
        ("nuslerp", {"weight": 1.0, "nuslerp_flatten": False}, None),  # per vector, in float32 like mergekit
        ("nuslerp", {"weight": 1.0}, "the norms and the dot product"),
    ],
)
def test_float64_sums_are_stated_in_the_output(llama, method: str, params: dict, said: str | None) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = llama
    n = {"slerp": 1, "nuslerp": 2}.get(method, 3)
    mine = {k: v for k, v in params.items() if k in ("weight", "density")}
    cfg = {"merge_method": method, "base_model": "base", "parameters": {k: v for k, v in params.items() if k not in mine},
           "models": [{"model": f"m{i}", "parameters": mine} for i in range(n)]}  # fmt: skip
    if method == "slerp":
        cfg = {"merge_method": "slerp", "base_model": "base", "parameters": params,
               "models": [{"model": "base"}, {"model": "m0"}]}  # fmt: skip
    res = merge_files(_cfg(root, cfg), root / "out")
    stated = [x for x in res.notes if "float64" in x]
    card = (root / "out" / "README.md").read_text()
    if said is None:
        assert not stated and "float64" not in card
    else:
        assert len(stated) == 1 and said in stated[0] and "mergekit sums in the compute dtype" in stated[0]
        assert stated[0] in card


def test_card_title_is_the_output_folder_without_name(llama) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = llama
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f"m{i}", "parameters": {"weight": 1.0}} for i in range(2)],
    }
    merge_files(_cfg(root, cfg), root / "my-soup")
    card = (root / "my-soup" / "README.md").read_text()
    assert "\n# my-soup\n" in card  # not the temporary staging folder's name
    # what the models are: transformers' own config.json (model_type + transformers_version)
    assert (
        "library_name: transformers" in card
        and "pre-trained `transformers` models (model_type `llama`)" in card
    )


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0]])
def test_linear_refuses_weights_summing_to_zero(llama, weights) -> None:  # type: ignore[no-untyped-def]
    root, _, models = llama
    cfg = {"merge_method": "linear", "models": [{"model": f"m{i}", "parameters": {"weight": w}}
                                                for i, w in enumerate(weights)]}  # fmt: skip
    path = _cfg(root, cfg)
    with pytest.raises(dp.ConfigError, match=r"merge\.yaml.*weights sum to 0.*normalize: false"):
        merge_files(path, root / "out")
    assert not (root / "out").exists()
    with pytest.raises(dp.ConfigError, match="weights sum to 0"):
        merge("linear", None, [models[0], models[1]], weights=weights)
    # without normalizing, the plain weighted sum is what was asked for
    got = merge("linear", None, [models[0], models[1]], weights=weights, normalize=False)
    k = "model.norm.weight"
    torch.testing.assert_close(got[k], weights[0] * models[0][k] + weights[1] * models[1][k])


def test_slerp_model_count_error_names_the_config(llama) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = llama
    cfg = {"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5},
           "models": [{"model": "m0"}, {"model": "m1"}]}  # fmt: skip
    with pytest.raises(
        dp.ConfigError, match=r"merge\.yaml: merge method 'slerp' interpolates exactly two models"
    ):
        merge_files(_cfg(root, cfg), root / "out")


@pytest.mark.parametrize("scale", [1e-12, 1e-3])
def test_l1_rescale_of_a_near_zero_task_vector_matches_mergekit(scale) -> None:
    """mergekit's rescaled_masked_tensor leaves the masked vector unscaled when ‖τ‖₁ or ‖τ̂‖₁ is under eps = 1e-7
    (no division by a vanishing norm); ours must do the same, and rescale as usual above it."""
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(40, 30)  # τ = the model itself, so no base value hides the tiny entries
    models = [scale * torch.randn(40, 30, generator=g) for _ in range(2)]
    params = {"weight": [1.0, 0.5], "density": 0.5, "rescale": True}
    want = _mk("ties", [base, *models], 0, **params)
    got = merge(
        "ties", {"w": base}, [{"w": m} for m in models], weights=[1.0, 0.5], density=0.5, rescale=True
    )["w"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    unscaled = _mk("ties", [base, *models], 0, **(params | {"rescale": False}))
    assert torch.equal(want, unscaled) == (
        scale < 1e-9
    )  # the case is sensitive: rescaling changes the values


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", [(40, 30), (37,)])
def test_density_zero_drops_the_task_vector_as_mergekit_does(
    method: str, rescale: bool, shape: tuple
) -> None:
    """mergekit's sparsifiers return zeros at ``density <= 0`` (a density gradient such as ``[1, 0.5, 0]`` reaches
    it at the last layer): that model's task vector is dropped from the tensor, its weight still counts in a
    normalizing divisor without sign consensus. Refused as "must be in (0, 1]" before; and TIES' trim kept one entry
    (at least one survives at any positive density)."""
    base, models = _tensors(shape, 3)
    params = {"weight": W3, "density": [0.0, 0.5, 1.0], "rescale": rescale, "normalize": True}
    if method.startswith(("dare", "della")):  # random drops: only the deterministic densities are compared
        params["density"] = [0.0, 1.0, 0.0]
    want = _mk(method, [base, *models], 0, **params)
    got = merge(method, {"w": base}, [{"w": m} for m in models], weights=W3, densities=params["density"],
                rescale=rescale, normalize=True)["w"]  # fmt: skip
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("t", [-0.3, 1.2, 2.0])
@pytest.mark.parametrize("second", ["random", "parallel", "antiparallel"])
def test_slerp_extrapolates_outside_0_1_like_mergekit(t: float, second: str) -> None:
    """mergekit's slerp takes any ``t`` (``t: 1.2`` goes on along the arc past the second model); it was refused
    as "must be in [0, 1]". The same formula, the colinear fallback to lerp included."""
    _, (a, b) = _tensors((40, 30), 2)
    b = {"random": b, "parallel": 2 * a, "antiparallel": -a}[second]
    want = _mk("slerp", [a, b], 0, t=t)
    got = merge("slerp", {"w": a}, [{"w": b}], t=t)["w"]
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("zero", ["base", "model", "tiny"])
def test_slerp_with_a_zero_endpoint_matches_mergekit(zero: str) -> None:
    """A zero (or norm ≤ 1e-8) endpoint — a zero-initialised bias — is orthogonal to the other in mergekit's slerp
    (its norm counts as 1): ``cos(πt/2) v₀ + sin(πt/2) v₁``, not the linear interpolation ``(1 − t) v₀ + t v₁``."""
    _, (a, b) = _tensors((37,), 2)
    if zero == "tiny":
        a = a * 1e-10
    else:
        (a if zero == "base" else b).zero_()
    want = _mk("slerp", [a, b], 0, t=0.3)
    got = merge("slerp", {"w": a}, [{"w": b}], t=0.3)["w"]
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(("method", "params"), [("linear", {"weight": [1.0, 0.5]}), ("slerp", {"t": 0.3})])
def test_out_dtype_casts_the_half_result_of_an_upcasting_kernel(
    tmp_path: Path, method: str, params: dict
) -> None:
    """mergekit's linear and slerp compute bfloat16 inputs in float32 but return bfloat16; ``out_dtype: float32``
    casts that result, so the output holds bfloat16 values (not the float32 intermediate)."""
    base = _layered_state(0)
    for i in (1, 2):
        _save(
            tmp_path / f"m{i}",
            {k: v.bfloat16() for k, v in _layered_state(i, base).items()},
            dtype="bfloat16",
        )
    weights = params.get("weight", [None, None])
    cfg = {"merge_method": method, "out_dtype": "float32",
           "models": [{"model": f"m{i}", **({"parameters": {"weight": w}} if w else {})}
                      for i, w in zip((1, 2), weights, strict=True)],
           "parameters": {k: v for k, v in params.items() if k != "weight"}}  # fmt: skip
    if method == "slerp":
        cfg["base_model"] = "m1"
    merge_files(_cfg(tmp_path, cfg), tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    ins = [load_file(tmp_path / f"m{i}" / "model.safetensors") for i in (1, 2)]
    for k in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        want = _mk(method, [m[k] for m in ins], 0 if method == "slerp" else None, **params)
        assert want.dtype == torch.bfloat16 and got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want.float(), rtol=0, atol=0)


def test_card_says_what_the_merged_models_are(tmp_path: Path) -> None:
    """The card said "a merge of pre-trained language models" and `library_name: transformers` of any merge,
    a plain torch MLP's too: transformers is now claimed only for a config.json that transformers wrote (the
    llama models' card: test_card_title_is_the_output_folder_without_name)."""
    root = tmp_path
    mlp = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    for name, config in (("mlp0", {"architecture": "WalkMLP", "d_in": 3}), ("mlp1", None)):
        (root / name).mkdir()
        save_file(mlp, root / name / "model.safetensors")
        if config is not None:
            (root / name / "config.json").write_text(json.dumps(config))
    for donor, said in (("mlp0", "`WalkMLP` models (PyTorch weights"), ("mlp1", "no config.json names")):
        cfg = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (donor, "mlp1" if donor == "mlp0" else "mlp0")]}  # fmt: skip
        merge_files(_cfg(root, cfg), root / f"out-{donor}")
        card = (root / f"out-{donor}" / "README.md").read_text()
        assert (
            "library_name" not in card and "language models" not in card and "transformers models" not in card
        )
        assert said in card, card


def _tiny_llamas(root: Path, tied: dict[str, bool]) -> None:
    """Tiny random Llamas saved by transformers, named by ``tied``'s keys, tied embeddings where it says."""
    transformers = pytest.importorskip("transformers")
    for seed, (name, tie) in enumerate(tied.items()):
        torch.manual_seed(seed)
        llama_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             tie_word_embeddings=tie)  # fmt: skip
        model = transformers.LlamaForCausalLM(llama_cfg)
        with torch.no_grad():
            for q in model.parameters():
                q.add_(torch.randn_like(q))
        model.save_pretrained(root / name, safe_serialization=True)


def test_a_tied_model_lends_its_embedding_as_the_head_like_mergekit(tmp_path: Path) -> None:
    """A model saved with ``tie_word_embeddings: true`` has no ``lm_head.weight``: mergekit reads its embedding in
    its place (the architecture's ``tied_names``), as ``transformers`` does when loading it, so it merges with an
    untied fine-tune of the same architecture. It was refused ("lacks tensor(s) ['lm_head.weight']")."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    _tiny_llamas(tmp_path, {"a": False, "t": True})
    assert "lm_head.weight" not in load_file(tmp_path / "t" / "model.safetensors")
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(tmp_path / m), "parameters": {"weight": w}} for m, w in (("a", 0.7), ("t", 0.3))]}  # fmt: skip
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(lazy_unpickle=False))
    res = merge_files(_cfg(tmp_path, cfg), tmp_path / "dp")
    mk = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "dp" / "model.safetensors")
    assert mk.keys() == ours.keys()
    for k in mk:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [n for n in res.notes if "lm_head" in n] == [
        f"'{tmp_path / 't'}' has tied embeddings (tie_word_embeddings: true) and no 'lm_head.weight': its "
        "'model.embed_tokens.weight' is merged in its place, as transformers loads it and as mergekit reads it"
    ]  # and not also said to be a non-floating tensor copied from the reference
    assert json.loads((tmp_path / "dp" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize(
    "cfg",
    [
        {"merge_method": "linear", "models": [{"model": "t", "parameters": {"weight": 0.3}},
                                              {"model": "a", "parameters": {"weight": 0.7}}]},
        {"merge_method": "linear", "base_model": "t",  # a linear base is one more input, and the config's donor
         "models": [{"model": "u", "parameters": {"weight": 0.4}}, {"model": "a", "parameters": {"weight": 0.6}},
                    {"model": "t", "parameters": {"weight": 0.2}}]},
        {"merge_method": "ties", "base_model": "t",
         "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "u", "parameters": {"weight": 0.5, "density": 0.7}}]},
        {"merge_method": "task_arithmetic", "base_model": "t",
         "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "t2", "parameters": {"weight": 0.5}}]},
        {"merge_method": "slerp", "base_model": "t", "parameters": {"t": [0.4, 0.3, 1.0]},
         "models": [{"model": "t"}, {"model": "a"}]},
    ],
)  # fmt: skip
def test_a_tied_reference_merges_the_head_and_unties_the_config(tmp_path: Path, cfg: dict) -> None:
    """A tied model as the reference (the base, else the first model) with an untied one after it: mergekit plans
    ``lm_head.weight`` because an input holds it (the head is ``optional``) and reads each tied input's embedding
    in its place; we match it tensor by tensor. mergekit copies the donor's config with ``tie_word_embeddings:
    true`` beside that head (transformers 4 then re-ties it and drops the merged head); ours says ``false``, every
    other key kept, and the notes say so. It was refused ("make an untied model the reference")."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    _tiny_llamas(tmp_path, {"t": True, "a": False, "u": False, "t2": True})
    models = re.compile(r'("model": |"base_model": )"(t|a|u|t2)"')
    cfg = json.loads(
        models.sub(lambda m: m.group(1) + json.dumps(str(tmp_path / m.group(2))), json.dumps(cfg))
    )
    cfg["dtype"] = "float32"
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"), MergeOptions(lazy_unpickle=False))
    res = merge_files(_cfg(tmp_path, cfg), tmp_path / "dp")
    mk = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "dp" / "model.safetensors")
    assert "lm_head.weight" in mk and mk.keys() == ours.keys()
    for k in mk:
        torch.testing.assert_close(ours[k], mk[k], rtol=1e-5, atol=1e-5, msg=k)
    assert not torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    donor = json.loads((tmp_path / "t" / "config.json").read_text())
    got = json.loads((tmp_path / "dp" / "config.json").read_text())
    assert donor["tie_word_embeddings"] is True and got["tie_word_embeddings"] is False
    assert {k: v for k, v in got.items() if k != "tie_word_embeddings"} == {
        k: v for k, v in donor.items() if k != "tie_word_embeddings"
    }
    assert any("config.json says tie_word_embeddings: false" in n for n in res.notes), res.notes
