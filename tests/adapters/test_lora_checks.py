"""Adapters refused where they are built, not later where they are used: non-floating factors, empty adapters.

These need no PEFT install: the folders are written by hand, as a corrupted or hand-made upload would be.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from deltaplane.adapters import LoRADelta, LoRALayer, load_peft
from deltaplane.errors import AdapterError

PREFIX = "base_model.model."


def _folder(tmp_path, tensors: dict[str, torch.Tensor], **cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]} | cfg
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int64, torch.uint8])
def test_non_floating_factors_are_refused_at_load_naming_layer_and_dtype(tmp_path, dtype):
    folder = _folder(
        tmp_path,
        {
            PREFIX + "fc.lora_A.weight": torch.ones(2, 6, dtype=dtype),
            PREFIX + "fc.lora_B.weight": torch.ones(4, 2),
        },
    )
    with pytest.raises(AdapterError, match=rf"layer 'fc': lora_A has dtype {dtype}; .* floating point"):
        load_peft(folder)


def test_non_floating_factors_and_bias_are_refused_at_construction():
    with pytest.raises(AdapterError, match="lora_B has dtype torch.bool"):
        LoRALayer(torch.ones(2, 6), torch.ones(4, 2, dtype=torch.bool), alpha=2.0)
    with pytest.raises(AdapterError, match="lora_B.bias has dtype torch.int32"):
        LoRALayer(torch.ones(2, 6), torch.ones(4, 2), alpha=2.0, bias=torch.ones(4, dtype=torch.int32))
    lora = LoRADelta({"fc.weight": LoRALayer(torch.ones(2, 6), torch.ones(4, 2), alpha=2.0)})
    bad = dict(lora.factors())
    bad["fc.lora_A.weight"] = bad["fc.lora_A.weight"].to(torch.int8)
    with pytest.raises(AdapterError, match="layer 'fc.weight': lora_A has dtype torch.int8"):
        lora.with_factors(bad)


def test_float_factors_still_merge(tmp_path):
    folder = _folder(
        tmp_path,
        {PREFIX + "fc.lora_A.weight": torch.ones(2, 6), PREFIX + "fc.lora_B.weight": torch.ones(4, 2)},
    )
    merged = load_peft(folder).merged_into({"fc.weight": torch.zeros(4, 6)})
    assert torch.equal(merged["fc.weight"], torch.full((4, 6), 4.0))  # 4/2 · (B A = 2)


def test_an_adapter_file_with_no_lora_factors_is_refused(tmp_path):
    # No tensors at all: it would load as a 0-layer adapter whose merge changes nothing.
    with pytest.raises(AdapterError, match=r"holds no lora_A/lora_B tensors although .* targets \['fc'\]"):
        load_peft(_folder(tmp_path / "empty", {}))
    # Only a saved module, no factor: still not a LoRA adapter.
    head = {PREFIX + "head.weight": torch.ones(3, 4)}
    with pytest.raises(AdapterError, match="holds no lora_A/lora_B tensors"):
        load_peft(_folder(tmp_path / "head_only", head, modules_to_save=["head"]))
