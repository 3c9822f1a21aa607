"""LoRADelta against the real PEFT package, both ways, and the typed errors for adapters we cannot take."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from deltaplane.adapters import LoRADelta, LoRALayer, load_peft, save_peft
from deltaplane.errors import AdapterError, AdapterMismatch, InvalidUpdate, UnsupportedAdapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def train_peft_adapter(model, config, steps: int = 3):
    """A few real optimizer steps through PEFT, so B is not PEFT's zero init."""
    pm = peft.get_peft_model(model, config)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 60, (4, 10), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        loss = pm(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"]),
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["query", "key", "dense"],
             rank_pattern={"intermediate.dense": 2}, alpha_pattern={"output.dense": 3}),
        dict(r=3, lora_alpha=5, lora_bias=True, target_modules=["value", "dense"]),
    ],
)  # fmt: skip
def test_peft_trained_adapter_materializes_to_peft_merged_weights(tmp_path, kwargs):
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = peft.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, **kwargs)
    pm = train_peft_adapter(model, cfg)
    pm.save_pretrained(tmp_path)
    merged = pm.merge_and_unload().state_dict()

    lora = load_peft(tmp_path)
    t = kwargs["target_modules"][1]
    v = next(k for k in lora if k.endswith(f"{t}.weight")).removesuffix(".weight")
    if kwargs.get("lora_bias"):
        assert lora[v + ".weight"].bias is not None
    assert set(lora.modules_to_save) == {"classifier.weight", "classifier.bias"}  # the SEQ_CLS head, in full
    if kwargs.get("rank_pattern"):
        assert lora["bert.encoder.layer.1.intermediate.dense.weight"].rank == 2
    ours = lora.merged_into(base)
    assert max_diff(ours, merged) <= 1e-6
    # the change is real: the adapted weights moved
    assert float((merged[v + ".weight"] - base[v + ".weight"]).abs().max()) > 1e-4
    if kwargs.get("lora_bias"):
        assert float((merged[v + ".bias"] - base[v + ".bias"]).abs().max()) > 1e-4


def test_our_adapter_loads_in_peft(tmp_path):
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    layers = {}
    for i, name in enumerate(
        n for n in base if n.endswith(("query.weight", "value.weight", "output.dense.weight"))
    ):
        out, inp = base[name].shape
        r = 2 + i % 3  # mixed ranks -> rank_pattern
        layers[name] = LoRALayer(
            torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), alpha=4.0 + i, rslora=True
        )
    emb = "bert.embeddings.word_embeddings.weight"
    layers[emb] = LoRALayer(torch.randn(3, 60, generator=g), torch.randn(32, 3, generator=g), 6.0, True, True)
    head = {
        k: base[k] + torch.randn(base[k].shape, generator=g) for k in ("classifier.weight", "classifier.bias")
    }
    lora = LoRADelta(layers, modules_to_save=head, task_type="SEQ_CLS")
    save_peft(lora, tmp_path / "ad")

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad")
    ids = torch.randint(0, 60, (2, 8), generator=g)
    with torch.no_grad():
        logits_peft = pm(input_ids=ids).logits
    merged = pm.merge_and_unload().state_dict()
    assert max_diff(lora.merged_into(base), merged) <= 1e-6
    model.load_state_dict(lora.merged_into(base))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, logits_peft, atol=1e-5)
    # round trip through our own reader
    again = load_peft(tmp_path / "ad")
    assert again.ranks == lora.ranks
    assert again.factors().allclose(lora.factors(), rtol=0, atol=0)


def test_target_module_missing_in_base_names_it(tmp_path):
    model = tiny_bert()
    pm = train_peft_adapter(model, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    lora = load_peft(tmp_path)
    bare = {k.removeprefix("bert."): v for k, v in tiny_bert().state_dict().items() if k.startswith("bert.")}
    with pytest.raises(AdapterMismatch, match=r"encoder\.layer\.0\.attention\.self\.query.*with_prefix"):
        lora.materialize(bare)
    # the fix the message names works
    assert lora.with_prefix(remove="bert.").materialize(bare).norm() > 0
    other = transformers.BertModel(
        transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(AdapterMismatch, match="different model"):
        lora.with_prefix(remove="bert.").materialize(other.state_dict())


def _saved(tmp_path, **kwargs):
    pm = train_peft_adapter(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query"], **kwargs), steps=1)
    pm.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(cfg))


def test_rank_mismatches_are_typed(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, r=8)
    with pytest.raises(AdapterMismatch, match=r"rank 4 but adapter_config.json says r=8"):
        load_peft(folder)
    _edit_config(folder, r=4)
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = t[key][:, :3].contiguous()
    save_file(t, f)
    with pytest.raises(AdapterMismatch, match="rank mismatch: A has 4 rows but B has 3 columns"):
        load_peft(folder)
    with pytest.raises(AdapterMismatch, match="rank mismatch"):
        LoRALayer(torch.zeros(2, 5), torch.zeros(4, 3), alpha=1.0)


def test_unsupported_peft_configs_are_refused(tmp_path):
    with pytest.raises(UnsupportedAdapter, match="use_dora"):
        load_peft(_saved(tmp_path / "dora", use_dora=True))
    folder = _saved(tmp_path / "plain")
    for field, value in [
        ("bias", "all"),
        ("use_qalora", True),
        ("init_lora_weights", "pissa"),
        ("peft_type", "IA3"),
    ]:
        _edit_config(folder, **{field: value})
        with pytest.raises(UnsupportedAdapter, match=field if field != "peft_type" else "IA3"):
            load_peft(folder)
        _edit_config(folder, use_qalora=False, bias="none", init_lora_weights=True, peft_type="LORA")
    load_peft(folder)  # back to a plain LoRA: loads


def test_malformed_folders(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_peft(tmp_path)
    folder = _saved(tmp_path / "a")
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    good = load_file(f)
    t = dict(good)
    t["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(t, f)
    with pytest.raises(AdapterError, match="unexpected tensor 'base_model.model.bert.pooler.dense.weight'"):
        load_peft(folder)
    t = {k: v for k, v in good.items() if not k.endswith("lora_B.weight")}
    save_file(t, f)
    with pytest.raises(AdapterError, match="no lora_B factor"):
        load_peft(folder)
    t = dict(good)
    t[next(k for k in t if k.endswith("lora_A.weight"))][0, 0] = float("nan")
    save_file(t, f)
    with pytest.raises(InvalidUpdate, match="NaN"):
        load_peft(folder)
    save_file(good, f)
    t = dict(good)
    t["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.bias"] = torch.zeros(32)
    save_file(t, f)
    with pytest.raises(AdapterError, match='set "lora_bias": true'):
        load_peft(folder)
    save_file(good, f)
    _edit_config(folder, target_modules=["value"])
    with pytest.raises(AdapterError, match="not covered by target_modules"):
        load_peft(folder)


def test_factors_round_trip_and_checks():
    g = torch.Generator().manual_seed(0)
    lora = LoRADelta(
        {"fc.weight": LoRALayer(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 2.0)}
    )
    f = lora.factors()
    assert list(f) == ["fc.lora_A.weight", "fc.lora_B.weight"]
    back = lora.with_factors(f * 2.0)
    assert torch.allclose(back["fc.weight"].delta_weight(), 4 * lora["fc.weight"].delta_weight())
    with pytest.raises(AdapterMismatch, match="missing"):
        lora.with_factors({"fc.lora_A.weight": f["fc.lora_A.weight"]})


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("alpha_pattern", {"query": "x"}, r"alpha_pattern\['query'\] must be a finite positive number"),
        ("alpha_pattern", {"query": float("nan")}, r"alpha_pattern\['query'\]"),
        ("rank_pattern", {"query": "4"}, r"rank_pattern\['query'\] must be a positive integer"),
        ("rank_pattern", {"query": 4.5}, r"rank_pattern\['query'\]"),
        ("r", 0, "'r' must be a positive integer"),
        ("lora_alpha", float("nan"), "'lora_alpha' must be a finite positive number"),
        ("lora_alpha", float("inf"), "'lora_alpha'"),
    ],
)
def test_bad_config_numbers_are_typed_and_name_key_and_file(tmp_path, field, value, named):
    folder = _saved(tmp_path)
    _edit_config(folder, **{field: value})
    with pytest.raises(AdapterError, match=r"adapter_config\.json: " + named):
        load_peft(folder)


@pytest.mark.parametrize(
    "layer_kwargs",
    [
        dict(layers_to_transform=[1], layers_pattern="layer"),
        dict(layers_to_transform=1, layers_pattern=["nope", "layer"]),
        dict(layers_to_transform=[0]),  # no layers_pattern: the number after the second dotted segment
    ],
)
def test_layers_to_transform_selects_the_layers_peft_adapts(tmp_path, layer_kwargs):
    from safetensors.torch import load_file, save_file

    targets = ["query", "dense"]
    # which modules PEFT itself wraps (the pooler's 'dense' has no layer index: PEFT skips it too) under these options, over every module PEFT's targets match
    wrapped = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=targets, **layer_kwargs))
    peft_set = {
        n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")
    }
    # an adapter trained on every layer, whose config then says layers_to_transform: factors PEFT would skip
    folder = tmp_path / "a"
    pm = train_peft_adapter(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False), 1
    )
    pm.save_pretrained(folder)
    _edit_config(folder, **layer_kwargs)
    f = folder / "adapter_model.safetensors"
    every = load_file(f)
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in every}
    assert peft_set < modules  # the options do drop some layers
    with pytest.raises(AdapterError, match="outside layers_to_transform"):
        load_peft(folder)
    # keep only the factors PEFT applies: then both agree on the merged weights
    save_file(
        {
            k: v
            for k, v in every.items()
            if k.removeprefix("base_model.model.").split(".lora_")[0] in peft_set
        },
        f,
    )
    base = tiny_bert()
    expected = peft.PeftModel.from_pretrained(tiny_bert(), folder).merge_and_unload().state_dict()
    lora = load_peft(folder)
    assert {k.removesuffix(".weight") for k in lora} == peft_set
    assert max_diff(lora.merged_into(base.state_dict()), expected) <= 1e-6


def test_malformed_layers_to_transform_is_typed(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, layers_to_transform=["1"])
    with pytest.raises(AdapterError, match="adapter_config.json: 'layers_to_transform' must be"):
        load_peft(folder)
    _edit_config(folder, layers_to_transform=[1], layers_pattern=3)
    with pytest.raises(AdapterError, match="'layers_pattern' must be"):
        load_peft(folder)


class _ConvAndAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.mha = torch.nn.MultiheadAttention(4, 2)


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("conv", r"layer 'conv' has 4-D factors.*convolution"),
        ("mha", r"'mha\.base_layer\.out_proj'.*MultiheadAttention"),
    ],
)
def test_peft_layers_that_are_not_one_weights_b_a_are_refused_naming_the_layer_kind(tmp_path, target, named):
    """PEFT's LoRA on a convolution (kernels, not matrices) and on nn.MultiheadAttention (a packed in_proj_weight
    plus an out_proj nested in base_layer) are not ΔW = s·B A on a tensor of the base's name: refused by kind."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        _ConvAndAttention(), peft.LoraConfig(r=2, target_modules=[target], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapter, match=named):
        load_peft(tmp_path)


def test_peft_bias_lora_only_is_refused_naming_bias(tmp_path):
    with pytest.raises(UnsupportedAdapter, match="bias='lora_only'"):
        load_peft(_saved(tmp_path, bias="lora_only"))
