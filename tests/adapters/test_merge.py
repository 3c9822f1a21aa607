"""Adapter merging against PEFT's own add_weighted_adapter on the same adapters."""

from __future__ import annotations

import pytest
import torch

from deltaplane.adapters import LoRADelta, LoRALayer, from_peft_state
from deltaplane.adapters.merge import COMBINATION_TYPES, merge_adapters
from deltaplane.errors import AdapterMismatch, ConfigError, UnsupportedAdapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.utils import get_peft_model_state_dict, merge_utils  # noqa: E402

NAMES = ("a", "b", "c")


def peft_with_adapters(ranks=(4, 4, 4), alphas=(8, 4, 16), **config):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40
    )
    model = transformers.BertModel(cfg)
    pm = None
    for name, r, alpha in zip(NAMES, ranks, alphas, strict=True):
        c = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value", "intermediate.dense"],
                            init_lora_weights=False, **config)  # fmt: skip
        if pm is None:
            pm = peft.get_peft_model(model, c, adapter_name=name)
        else:
            pm.add_adapter(name, c)
    return pm


def ours(pm, name: str) -> LoRADelta:
    state = get_peft_model_state_dict(pm, adapter_name=name)
    return from_peft_state(pm.peft_config[name].to_dict(), state)


def theirs(pm, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for module_name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[module_name + ".weight"] = (
                module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach(), module.scaling[name]
            )  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("kind", "weights", "kwargs"),
    [
        ("linear", [2.0, 0.5, -1.0], {}),
        ("cat", [2.0, 0.5, -1.0], {}),
        ("svd", [2.0, 0.5, -1.0], {}),
        ("svd", [1.0, 1.0, 1.0], {"svd_rank": 6}),
        ("magnitude_prune", [2.0, 0.5, 1.0], {"density": 0.3}),
        ("magnitude_prune_svd", [2.0, 0.5, 1.0], {"density": 0.3}),
        ("ties", [1.0, 1.0, 1.0], {"density": 0.4}),
        ("ties_svd", [1.5, 1.5, 1.5], {"density": 0.4}),
        ("ties", [1.0, 1.0, 1.0], {"density": 0.4, "majority_sign_method": "frequency"}),
        ("ties_svd", [2.0, 0.5, 1.0], {"density": 0.4, "majority_sign_method": "frequency"}),
    ],
)
def test_equals_peft_add_weighted_adapter(kind, weights, kwargs):
    # equal alphas for the TIES cases: PEFT elects the sign on unweighted factors, we on weighted ones (docs)
    alphas = (8, 8, 8) if kind.startswith("ties") and "frequency" not in str(kwargs) else (8, 4, 16)
    pm = peft_with_adapters(alphas=alphas)
    adapters = [ours(pm, n) for n in NAMES]
    merged = merge_adapters(adapters, weights, kind, **kwargs)
    pm.add_weighted_adapter(list(NAMES), weights, "m", combination_type=kind, **kwargs)
    ref = theirs(pm, "m")
    assert set(merged) == set(ref)
    for name, (A, B, scaling) in ref.items():
        layer = merged[name]
        assert layer.scaling == scaling == 1.0
        delta = scaling * B @ A
        assert float((layer.delta_weight() - delta).abs().max()) <= 1e-5, name
        if not kind.endswith("svd"):  # factor by factor (an SVD's factors are unique only up to signs)
            assert torch.allclose(layer.A, A, atol=1e-6) and torch.allclose(layer.B, B, atol=1e-6)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd"])
def test_dare_equals_peft_given_the_same_masks(kind, monkeypatch):
    """DARE's masks come from our seeded generators; handed to PEFT, its result is ours."""
    from deltaplane.merging.base import tensor_generator

    pm = peft_with_adapters(alphas=(8, 8, 8))
    adapters = [ours(pm, n) for n in NAMES]
    density, seed = 0.5, 7
    masks = []  # (raw tensor PEFT will prune, our mask for it)
    for name in adapters[0]:
        if kind.endswith("svd"):
            for i, a in enumerate(adapters):
                t = a[name].delta_weight()
                masks.append((t, torch.rand(t.shape, generator=tensor_generator(seed, name, i)) < density))
        else:
            for part in ("A", "B"):
                for i, a in enumerate(adapters):
                    t = getattr(a[name], part)
                    g = tensor_generator(seed, f"{name}.{part}", i)
                    masks.append((t, torch.rand(t.shape, generator=g) < density))

    def random_pruning(tensor, density, rescale):
        mask = next(m for t, m in masks if t.shape == tensor.shape and torch.allclose(t, tensor, atol=1e-7))
        out = tensor * mask
        return out / density if rescale else out

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    merged = merge_adapters(adapters, [1.0, 1.0, 1.0], kind, density=density, seed=seed)
    pm.add_weighted_adapter(list(NAMES), [1.0, 1.0, 1.0], "m", combination_type=kind, density=density)
    for name, (A, B, scaling) in theirs(pm, "m").items():
        assert float((merged[name].delta_weight() - scaling * B @ A).abs().max()) <= 1e-5


def test_cat_is_exact_and_svd_is_the_best_rank_r():
    g = torch.Generator().manual_seed(0)
    adapters = [
        LoRADelta(
            {"w": LoRALayer(torch.randn(r, 20, generator=g), torch.randn(12, r, generator=g), alpha=2.0 * r)}
        )
        for r in (2, 3)
    ]
    exact = sum(w * a["w"].delta_weight() for a, w in zip(adapters, (1.0, -0.5), strict=True))
    cat = merge_adapters(adapters, [1.0, -0.5], "cat")
    assert cat["w"].rank == 5 and torch.allclose(cat["w"].delta_weight(), exact, atol=1e-5)
    svd = merge_adapters(adapters, [1.0, -0.5], "svd", svd_rank=5)
    assert torch.allclose(svd["w"].delta_weight(), exact, atol=1e-4)


def test_bad_merges_are_typed():
    g = torch.Generator().manual_seed(0)
    a = LoRADelta({"w": LoRALayer(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 2.0)})
    b = LoRADelta({"w": LoRALayer(torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g), 2.0)})
    with pytest.raises(AdapterMismatch, match="equal ranks"):
        merge_adapters([a, b], [1, 1], "linear")
    assert merge_adapters([a, b], [1, 1], "svd")["w"].rank == 3
    with pytest.raises(ConfigError, match="needs a density"):
        merge_adapters([a, a], [1, 1], "ties")
    with pytest.raises(ConfigError, match="unknown combination_type"):
        merge_adapters([a, a], [1, 1], "average")
    with pytest.raises(ConfigError, match="2 weights for 1"):
        merge_adapters([a], [1, 1])
    head = a.replace(modules_to_save={"head.weight": torch.zeros(2, 2)})
    with pytest.raises(UnsupportedAdapter, match="modules_to_save"):
        merge_adapters([head, a], [1, 1])
    assert set(COMBINATION_TYPES) >= {"linear", "ties", "dare_ties", "svd", "ties_svd", "cat"}


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_a_lora_bias_is_merged_not_dropped(kind):
    """merge_adapters used to drop every lora_B.bias (lora_bias=True) silently: the merged model kept the
    base's biases. The bias changes wᵢ sᵢ bᵢ are vectors, so cat / svd / linear sum them exactly."""
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.zeros(4, 6), "fc.bias": torch.zeros(4)}

    def adapter(bias: bool) -> LoRADelta:
        A, B = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
        return LoRADelta(
            {"fc.weight": LoRALayer(A, B, 3.0, bias=torch.randn(4, generator=g) if bias else None)}
        )

    adapters, weights = [adapter(True), adapter(False), adapter(True)], [1.0, 0.5, -2.0]
    # what each adapter alone does to the bias, weighted: the independent reference
    want = sum(w * (a.merged_into(base)["fc.bias"]) for a, w in zip(adapters, weights, strict=True))
    merged = merge_adapters(adapters, weights, kind, density=1.0, svd_rank=6)
    got = merged.merged_into(base)["fc.bias"]
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert float(want.abs().max()) > 0.5
    assert merge_adapters(adapters[1:2], [1.0], kind)["fc.weight"].bias is None
    # TIES trims and elects signs on the bias changes too: not the sum, but never dropped
    assert merge_adapters(adapters, weights, "ties", density=0.5)["fc.weight"].bias is not None


@pytest.mark.parametrize(
    ("kind", "weights", "kwargs"),
    [
        ("cat", [2.0, 0.5, -1.0], {}),
        ("svd", [2.0, 0.5, -1.0], {"svd_rank": 12}),
        ("linear", [1.0], {}),
        ("svd", [1.0], {}),
    ],
)
def test_rslora_adapters_merge_to_the_weighted_sum_of_their_changes(kind, weights, kwargs):
    """The reference is PEFT's own ΔWᵢ of each source adapter (scaling α/√r): an exact combination (cat, a
    full-rank svd, one adapter with weight 1) must give Σ wᵢ ΔWᵢ. PEFT 0.21's add_weighted_adapter does not here:
    its merged adapter keeps use_rslora from the first adapter while setting lora_alpha = r, so its scaling is
    √r instead of 1 (huggingface/peft#3449); ours has α = r and no rslora, scaling 1."""
    pm = peft_with_adapters(ranks=(4, 4, 4), alphas=(8, 4, 16), use_rslora=True)
    names = NAMES[: len(weights)]
    merged = merge_adapters([ours(pm, n) for n in names], weights, kind, **kwargs)
    checked = 0
    for module_name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "a" in module.lora_A:
            want = sum(w * module.get_delta_weight(n) for w, n in zip(weights, names, strict=True))
            layer = merged[module_name + ".weight"]
            assert layer.scaling == 1.0 and not layer.rslora
            assert float((layer.delta_weight() - want).abs().max()) <= 2e-5 * float(want.abs().max()), (
                module_name
            )
            checked += 1
    assert checked == 3
