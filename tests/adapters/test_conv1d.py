"""GPT-2's ``Conv1D`` layers (weights stored (in, out), PEFT's ``fan_in_fan_out``) against the real PEFT package:
PEFT-saved adapters read identically, ours load in PEFT, extraction writes what PEFT applies, and an adapter whose
saved flag is provably wrong for a layer is refused naming ``fan_in_fan_out``."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from deltaplane.adapters import LoRADelta, LoRALayer, load_peft, save_peft
from deltaplane.adapters.extract import extract_lora
from deltaplane.errors import AdapterMismatch, UnsupportedAdapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONV1D_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(cls=None, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, **extra,
    )  # fmt: skip
    return (cls or transformers.GPT2LMHeadModel)(cfg).eval()


def peft_model(model, config):
    with warnings.catch_warnings():  # PEFT warns as it sets fan_in_fan_out from each module's type
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).eval()


def max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


@pytest.mark.parametrize("flag", [False, True])
def test_peft_gpt2_adapter_materializes_to_peft_merged_weights(tmp_path, flag):
    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=CONV1D_TARGETS, fan_in_fan_out=flag, init_lora_weights=False
    )
    pm = peft_model(model, cfg)
    pm.save_pretrained(tmp_path)
    merged = pm.merge_and_unload().state_dict()
    lora = load_peft(tmp_path)
    assert all(layer.fan_in_fan_out for layer in lora.values())  # PEFT saved the flag its Conv1D layers use
    assert lora["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # (in, out), as the base stores it
    assert max_diff(lora.merged_into(base), merged) <= 1e-6
    assert (
        float(
            (merged["transformer.h.1.mlp.c_fc.weight"] - base["transformer.h.1.mlp.c_fc.weight"]).abs().max()
        )
        > 1e-3
    )


def test_our_fan_in_fan_out_adapter_gives_peft_outputs(tmp_path):
    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    layers = {}
    for i, name in enumerate(
        n for n in base if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
    ):
        inp, out = base[name].shape  # Conv1D: (in, out)
        r = 2 + i % 2  # mixed ranks and alphas: rank_pattern / alpha_pattern
        layers[name] = LoRALayer(
            torch.randn(r, inp, generator=g),
            torch.randn(out, r, generator=g),
            alpha=3.0 + i,
            fan_in_fan_out=True,
        )
    lora = LoRADelta(layers)
    save_peft(lora, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").eval()
    ids = torch.randint(0, 50, (2, 8), generator=g)
    with torch.no_grad():
        logits_peft = pm(input_ids=ids).logits
    model.load_state_dict(lora.merged_into(base))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert torch.allclose(ours, logits_peft, atol=1e-5)
    with torch.no_grad():
        assert float((ours - tiny_gpt2()(input_ids=ids).logits).abs().max()) > 1e-2  # the adapter changes it


def test_a_layer_whose_saved_flag_is_provably_wrong_is_refused_naming_fan_in_fan_out(tmp_path):
    """PEFT picks fan_in_fan_out per module type but saves the last module's flag: on GPT-2 with a Linear head
    (``score``) wrapped last, adapter_config.json says false for the Conv1D ``c_attn`` layers too."""
    model = tiny_gpt2(transformers.GPT2ForSequenceClassification, num_labels=3)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "score"], init_lora_weights=False)
    peft_model(model, cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    lora = load_peft(tmp_path)
    with pytest.raises(AdapterMismatch, match=r"c_attn\.weight' has shape \(48, 16\) \(fan_in_fan_out=False\).*"
                       r"transposed, \(16, 48\).*Conv1D.*fan_in_fan_out=True"):  # fmt: skip
        lora.materialize(base)


def _fine_tune(base: dict, seed: int = 1) -> dict:
    """Every Conv1D weight and bias changed (the biases travel as lora_B.bias, PEFT's lora_bias)."""
    g = torch.Generator().manual_seed(seed)
    conv1d = tuple(f"{m}.{p}" for m in ("c_attn", "c_fc", "c_proj") for p in ("weight", "bias"))
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if k.endswith(conv1d) else v.clone()
        for k, v in base.items()
    }


def _optimum(delta: torch.Tensor, k: int) -> float:
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()))


def test_extracting_conv1d_layers_gives_what_peft_applies(tmp_path):
    from deltaplane.adapters.extract import CONV1D

    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ft = _fine_tune(base)
    result = extract_lora(ft, base, rank=4, fan_in_fan_out=[CONV1D])
    assert {layer.fan_in_fan_out for layer in result.lora.values()} == {True}
    assert all(layer.bias is not None for layer in result.lora.values())
    for rep in result.layers:  # the Eckart–Young optimum of the same change, transposed or not
        assert rep.rel_error == pytest.approx(_optimum(ft[rep.name] - base[rep.name], 4), rel=1e-4)
    result.lora.save_peft(tmp_path / "ad")
    merged = (
        peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").merge_and_unload().state_dict()
    )
    assert max_diff(result.lora.merged_into(base), merged) <= 1e-6
    bias = "transformer.h.1.attn.c_attn.bias"  # (out,): PEFT adds scaling · lora_B.bias, exactly the change
    assert torch.allclose(merged[bias], ft[bias], atol=1e-6)
    square = "transformer.h.0.attn.c_proj.weight"  # (16, 16): PEFT would transpose a plain (Linear) factoring
    full = extract_lora({square: ft[square]}, {square: base[square]}, rank=16, fan_in_fan_out=[CONV1D])
    full.lora.save_peft(tmp_path / "sq")
    merged = (
        peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "sq").merge_and_unload().state_dict()
    )
    assert float((merged[square] - ft[square]).abs().max()) <= 1e-5


def test_a_gpt2_folder_is_extracted_for_peft_by_default_and_by_the_cli(tmp_path):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    tuned = tiny_gpt2()
    tuned.load_state_dict(_fine_tune(model.state_dict()))
    tuned.save_pretrained(tmp_path / "ft")
    result = extract_lora(tmp_path / "ft", tmp_path / "base", rank=2)
    assert result.lora and all(layer.fan_in_fan_out for layer in result.lora.values())
    run = CliRunner().invoke(app, ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "base"), "--rank", "2", "-q", "-o", str(tmp_path / "ad")])  # fmt: skip
    assert run.exit_code == 0, run.output
    base = model.state_dict()
    merged = (
        peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ad").merge_and_unload().state_dict()
    )
    assert max_diff(load_peft(tmp_path / "ad").merged_into(base), merged) <= 1e-6
    assert max_diff(result.lora.merged_into(base), merged) <= 1e-6
    # fan_in_fan_out names the layers itself: none here, and the biases prove the weights are stored (in, out), so
    # the plain factoring PEFT cannot load is refused before any SVD (it failed, after them, as a bias/rank clash)
    with pytest.raises(
        AdapterMismatch, match=r"c_attn\.weight' has shape \(16, 48\) but its bias has 48 .*--fan-in-fan-out"
    ):
        extract_lora(tmp_path / "ft", tmp_path / "base", rank=2, fan_in_fan_out=[])


def test_a_gpt2_state_dict_without_fan_in_fan_out_is_refused_naming_it():
    """A state dict does not say its modules' types; the biases' lengths prove GPT-2's layout."""
    base = tiny_gpt2().state_dict()
    with pytest.raises(
        AdapterMismatch, match=r"bias has \d+ values: it is stored \(in, out\).*--fan-in-fan-out"
    ):
        extract_lora(_fine_tune(base), base, rank=2)


def test_saving_an_adapter_mixing_layouts_names_the_layers():
    a = LoRALayer(torch.ones(1, 3), torch.ones(2, 1), 1.0, fan_in_fan_out=True)
    b = LoRALayer(torch.ones(1, 3), torch.ones(2, 1), 1.0)
    with pytest.raises(UnsupportedAdapter, match=r"fan_in_fan_out on \['x.weight'\].*two adapters"):
        LoRADelta({"x.weight": a, "y.weight": b}).save_peft("/nonexistent/never-written")


@pytest.mark.parametrize(
    ("kind", "weights", "kwargs"),
    [
        ("linear", [2.0, -0.5], {}),
        ("cat", [2.0, -0.5], {}),
        ("svd", [2.0, -0.5], {}),
        ("ties", [1.0, 1.0], {"density": 0.5}),
    ],
)
def test_merging_conv1d_adapters_equals_peft_add_weighted_adapter(kind, weights, kwargs):
    """PEFT's add_adapter keeps the config's fan_in_fan_out (false by default) for a second adapter on GPT-2,
    whose layers are Conv1D whatever it says, so both configs name it here."""
    from peft.utils import get_peft_model_state_dict

    from deltaplane.adapters import from_peft_state
    from deltaplane.adapters.merge import merge_adapters

    def config(alpha):
        return peft.LoraConfig(
            r=2, lora_alpha=alpha, target_modules=CONV1D_TARGETS, fan_in_fan_out=True, init_lora_weights=False
        )

    pm = peft.get_peft_model(tiny_gpt2(), config(4), adapter_name="a")
    pm.add_adapter("b", config(4 if kind == "ties" else 7))  # TIES: equal scalings (see docs/adapters.md)
    adapters = [
        from_peft_state(pm.peft_config[n].to_dict(), get_peft_model_state_dict(pm, adapter_name=n))
        for n in "ab"
    ]
    merged = merge_adapters(adapters, weights, kind, **kwargs)
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=kind, **kwargs)
    checked = 0
    for module_name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            layer = merged[module_name + ".weight"]
            assert layer.fan_in_fan_out
            assert float((layer.delta_weight() - module.get_delta_weight("m")).abs().max()) <= 1e-5, (
                module_name
            )
            checked += 1
    assert checked == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in two blocks
