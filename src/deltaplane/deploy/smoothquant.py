"""SmoothQuant: move activation outliers into the weights before int8 quantization.

Xiao et al. 2023, *SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models*,
<https://arxiv.org/abs/2211.10438>. A Linear ``y = X W^T`` equals ``(X diag(s)^-1) (W diag(s))^T`` for any
positive per-input-channel ``s``. Transformer activations that leave a LayerNorm have a few channels far larger
than the rest, so a per-tensor int8 activation scale (what ONNX Runtime's dynamic quantization computes per
call) spends its range on them; the weights are tame. With

    s_j = max|X_j|^α / max|W_:,j|^(1−α)        (α = 0.5: split the difficulty evenly)

the scaled activations have no outlier channel and the scaled weights still quantize well (per output
channel). The paper folds ``1/s`` into the preceding LayerNorm; in a post-LN encoder (BERT, MiniLM) that
LayerNorm's output is also the residual stream, so folding would change the model. Here the ``1/s`` is an
explicit per-channel multiply in front of the Linear (:class:`SmoothedLinear`): one element-wise ``Mul`` in the
exported graph, exact in fp32, and it leaves the residual path alone.

Which Linears: those whose input *is* a LayerNorm's output (found by running one batch with hooks) — the
query/key/value projections and the feed-forward input of BERT-style blocks, where the outliers live. Linears
fed by the same tensor share one ``s`` (the max of their weight columns), so they see the same activations.

Why hand-written: ORT's quantization tooling has no SmoothQuant pass (Intel Neural Compressor has one, but it
is a large dependency for twenty lines of maths), and the rewrite must happen on the PyTorch model before
export so the fp32 graph that ships stays verifiable against the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.deploy.prune import run_calibration
from deltaplane.errors import ConfigError

__all__ = ["SmoothedLinear", "layernorm_fed_linears", "smooth_layernorm_inputs"]


class SmoothedLinear(nn.Module):
    """``linear(x * inv_scale)``: a Linear whose weight columns were multiplied by ``1 / inv_scale``."""

    inv_scale: Tensor  # a registered buffer (moves with .to() and is saved in the state dict)

    def __init__(self, linear: nn.Linear, inv_scale: Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x * self.inv_scale)


def layernorm_fed_linears(model: nn.Module, batch: Mapping[str, Tensor] | Tensor) -> list[list[str]]:
    """Groups of ``nn.Linear`` names (in module order) whose input is the output of one ``nn.LayerNorm``.

    Found by running ``batch`` once with forward hooks: a Linear belongs to a group when the tensor it receives
    is the very tensor a LayerNorm returned (same storage and shape; dropout in eval mode passes it through).
    A Linear whose weight is tied to another module (a decoder's LM head sharing the embedding table) is left
    out: scaling its columns would change the embedding too.
    """
    ln_out: dict[tuple[int, tuple[int, ...]], int] = {}
    alive: list[Tensor] = []  # every LayerNorm output stays referenced, so no later tensor reuses its storage
    groups: dict[int, list[str]] = {}
    handles = []

    def on_ln(_m: nn.Module, _i: Any, out: Tensor) -> None:
        alive.append(out)
        ln_out[(out.data_ptr(), tuple(out.shape))] = len(ln_out)

    def on_linear(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key in ln_out and name not in groups.setdefault(ln_out[key], []):
                groups[ln_out[key]].append(name)

        return hook

    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_hook(on_ln))
        elif isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1:  # a tied head stays as it is
            handles.append(m.register_forward_pre_hook(on_linear(name)))
    try:
        run_calibration(model, [batch])
    finally:
        for h in handles:
            h.remove()
    return [g for _, g in sorted(groups.items()) if g]


def smooth_layernorm_inputs(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    *,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Apply SmoothQuant in place to every LayerNorm-fed Linear of ``model``; returns what it did.

    Args:
        model: an fp32 module in eval mode (called as ``model(**batch)`` or ``model(batch)``).
        batches: calibration inputs (e.g. 64–512 sentences in batches); the per-channel activation maxima are
            taken over all of them.
        alpha: migration strength in [0, 1]: 0 leaves activations as they are, 1 moves all of their range into
            the weights.

    Returns:
        ``{"alpha", "linears", "groups", "max_activation_ratio"}`` — the last is the largest ratio of a
        channel's max |x| to the median channel's max before smoothing (how outlier-heavy the inputs were).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1]. Found {alpha}")
    batches = list(batches)
    if not batches:
        raise ConfigError("SmoothQuant needs at least one calibration batch")
    groups = layernorm_fed_linears(model, batches[0])
    modules = dict(model.named_modules())
    amax: dict[str, Tensor] = {}
    handles = []

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)

        return hook

    for g in groups:
        handles.append(modules[g[0]].register_forward_pre_hook(record(g[0])))
    try:
        run_calibration(model, batches)
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for g in groups:
        if not torch.isfinite(amax[g[0]]).all():
            raise ConfigError(
                f"SmoothQuant: the calibration activations entering {g[0]!r} are not finite (NaN or Inf); "
                "the model or its calibration inputs are broken"
            )
        xmax = amax[g[0]].clamp_min(1e-5)
        worst = max(worst, float(xmax.max() / xmax.median()))
        wmax = torch.stack([modules[n].weight.detach().abs().amax(0) for n in g]).amax(0).clamp_min(1e-5)
        s = (xmax.pow(alpha) / wmax.pow(1.0 - alpha)).clamp_min(1e-5)
        for n in g:
            lin = modules[n]
            with torch.no_grad():
                lin.weight.mul_(s.to(lin.weight.dtype))
            parent_name, _, child = n.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, SmoothedLinear(lin, (1.0 / s).to(lin.weight.dtype)))
    return {
        "alpha": alpha,
        "linears": sum(len(g) for g in groups),
        "groups": len(groups),
        "max_activation_ratio": worst,
    }
