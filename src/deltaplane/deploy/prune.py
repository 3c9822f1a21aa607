"""Pruning: magnitude (global / layer-wise), N:M semi-structured, Wanda, structured channels, gradual schedules.

Every unstructured method computes a boolean *mask* per prunable weight (``True`` = kept) and multiplies it in
place. We deliberately do not use ``torch.nn.utils.prune``: its re-parametrisation renames ``weight`` to
``weight_orig`` + a forward pre-hook, which changes state-dict keys, breaks ``load_state_dict`` against the
source checkpoint and leaks into ONNX export. Plain masked tensors keep the model an ordinary model.

Structured channel pruning is different in kind: it removes whole output channels / neurons and really shrinks
tensor shapes, fixing up the consumer layer (and any BatchNorm in between), so the smaller model is smaller and
faster with any runtime, no sparse kernels needed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from deltaplane.errors import ConfigError, DeltaplaneError, UnsupportedLayer

__all__ = [
    "ChannelPruneResult",
    "GradualPruner",
    "GradualSchedule",
    "PruneResult",
    "apply_masks",
    "channel_prune",
    "check_sparsity",
    "magnitude_prune",
    "nm_mask",
    "nm_prune",
    "prunable_layers",
    "run_calibration",
    "sparsity_of",
    "wanda_prune",
    "wanda_scores",
]

PRUNABLE = (nn.Linear, nn.Conv2d)
PrunableLayer = nn.Linear | nn.Conv2d  # what `prunable_layers` returns: a layer whose `.weight` is a Tensor


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """Return ``value`` as a float if it lies strictly inside (0, 1), else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name} must be a fraction strictly between 0 and 1. Found {value!r}")
    return float(value)


def prunable_layers(
    model: nn.Module, *, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[str, PrunableLayer]:
    """The model's ``nn.Linear`` and ``nn.Conv2d`` layers by qualified name (what every pruner acts on).

    Args:
        model: any module.
        include: only these layer names; naming a layer of another type raises :class:`UnsupportedLayer`
            (rather than silently leaving it dense).
        exclude: layer names to leave dense (e.g. a tiny first conv or the classifier head).
    """
    modules = dict(model.named_modules())
    if include is not None:
        out: dict[str, PrunableLayer] = {}
        for name in include:
            if name not in modules:
                raise ConfigError(
                    f"no layer named {name!r} in the model; layers: {', '.join(list(modules)[1:9])}..."
                )
            layer = modules[name]
            if not isinstance(layer, PRUNABLE):
                raise UnsupportedLayer(
                    f"layer {name!r} is a {type(layer).__name__}; pruning supports "
                    f"{', '.join(t.__name__ for t in PRUNABLE)} only. Remove it from `include`."
                )
            out[name] = layer
    else:
        out = {n: m for n, m in modules.items() if isinstance(m, PRUNABLE)}
    unknown = [n for n in exclude if n not in modules]
    if unknown:
        raise ConfigError(f"exclude names unknown layers: {unknown}")
    out = {n: m for n, m in out.items() if n not in set(exclude)}
    if not out:
        raise UnsupportedLayer(
            f"{type(model).__name__} has no prunable layer (nn.Linear / nn.Conv2d) left after include/exclude"
        )
    return out


def _rows(weight: Tensor) -> Tensor:
    # (out, in) for Linear, (out, in·kh·kw) for Conv2d: the "input features" each output row reads.
    return weight.reshape(weight.shape[0], -1)


def _conv_columns(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """The im2col rows ``(positions, in·kh·kw)`` of a Conv2d's input ``x``: what each output row multiplies.

    Padded as the layer pads: ``padding="same"`` (split left/right as torch does, ``total // 2`` first),
    ``"valid"``, or numbers, with the layer's ``padding_mode`` (``reflect``, ``replicate``, ``circular`` pad with
    input values, not zeros). ``unfold``'s own ``padding`` takes neither strings nor modes.
    """
    if layer.padding == "valid":
        pads = [0, 0, 0, 0]
    elif layer.padding == "same":
        pads = []
        for d, k in zip(
            reversed(layer.dilation), reversed(layer.kernel_size), strict=True
        ):  # F.pad: W, then H
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = cast("tuple[int, int]", layer.padding)  # Conv2d's only strings are "valid" and "same"
        pads = [pw, pw, ph, ph]
    if x.dim() == 3:  # an unbatched (C, H, W) input
        x = x.unsqueeze(0)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    if any(pads):
        x = nn.functional.pad(x, pads, mode=mode)
    cols = nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class PruneResult:
    """What a pruner did: the masks it applied (``True`` = kept) and layers it left alone, with the reason."""

    masks: dict[str, Tensor]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Share of zeroed weights over the pruned layers."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights of ``model`` in place (``masks[layer]`` has the weight's shape)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        w = modules[name].weight
        if mask.shape != w.shape:
            raise ConfigError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
        w.mul_(mask.to(w.dtype))


def _threshold_mask(score: Tensor, sparsity: float) -> Tensor:
    """Keep the ``1 - sparsity`` largest scores (ties broken by position, so the count is exact)."""
    k = round(sparsity * score.numel())
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(score.flatten(), k, largest=False, sorted=False).indices] = False
    return mask.reshape(score.shape)


@torch.no_grad()
def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> PruneResult:
    """Zero the smallest-magnitude weights, over all prunable layers at once or per layer.

    Global scope (one threshold for the whole model) lets redundant layers give up more weights than sensitive
    ones, which is why it usually loses less accuracy at equal sparsity (Blalock et al. 2020,
    https://arxiv.org/abs/2003.03033); layer-wise scope gives every layer exactly ``sparsity``.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer'. Found {scope!r}")
    layers = prunable_layers(model, include=include, exclude=exclude)
    if scope == "layer":
        masks = {n: _threshold_mask(m.weight.abs(), sparsity) for n, m in layers.items()}
    else:
        flat = torch.cat([m.weight.abs().flatten() for m in layers.values()])
        keep = _threshold_mask(flat, sparsity)
        masks, start = {}, 0
        for n, m in layers.items():
            masks[n] = keep[start : start + m.weight.numel()].reshape(m.weight.shape)
            start += m.weight.numel()
    apply_masks(model, masks)
    return PruneResult(masks)


def nm_mask(score: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each output row (N:M sparsity).

    2:4 is the pattern NVIDIA Ampere+ sparse tensor cores execute at 2× throughput (Mishra et al. 2021,
    https://arxiv.org/abs/2104.08378); groups run along the input dimension, as the hardware requires.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ConfigError(f"N:M needs integers 0 < n < m. Found {n}:{m}")
    rows = _rows(score)
    if rows.shape[1] % m:
        raise UnsupportedLayer(f"input size {rows.shape[1]} is not a multiple of m={m}")
    groups = rows.reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(score.shape)


@torch.no_grad()
def nm_prune(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    scores: Mapping[str, Tensor] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> PruneResult:
    """N:M semi-structured pruning by magnitude, or by ``scores`` (e.g. :func:`wanda_scores`).

    Layers whose input size is not a multiple of ``m`` (e.g. a first conv reading 1×3×3 = 9 values) cannot carry
    the pattern; they are left dense and listed in :attr:`PruneResult.skipped` with the reason.
    """
    layers = prunable_layers(model, include=include, exclude=exclude)
    masks, skipped = {}, {}
    for name, layer in layers.items():
        score = scores[name] if scores is not None else layer.weight.abs()
        try:
            masks[name] = nm_mask(score, n, m)
        except UnsupportedLayer as e:
            if include is not None:
                raise UnsupportedLayer(f"layer {name!r}: {e}") from None
            skipped[name] = f"{e}; left dense"
    apply_masks(model, masks)
    return PruneResult(masks, skipped)


def _describe_batch(b: Any) -> str:
    """A calibration batch's shapes, for an error message: ``(16, 64)``, ``input_ids (2, 9)``..."""

    def shape(t: Any) -> str:
        return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__

    if isinstance(b, Mapping):
        return ", ".join(f"{k} {shape(v)}" for k, v in b.items())
    if isinstance(b, tuple | list):
        return ", ".join(shape(v) for v in b)
    return shape(b)


def run_calibration(model: nn.Module, batches: Iterable[Any]) -> None:
    """Feed calibration batches through ``model`` (a tensor, a tuple of positional args, or a dict of kwargs).

    A batch the model cannot take (a wrong shape or type) is a :class:`ConfigError` naming the batch's shapes,
    not whatever the first layer (or a pruner's hook on it) raises.
    """
    with torch.no_grad():
        for i, b in enumerate(batches):
            try:
                if isinstance(b, Mapping):
                    model(**b)
                elif isinstance(b, tuple | list):
                    model(*b)
                else:
                    model(b)
            except DeltaplaneError:
                raise
            except Exception as e:  # torch raises RuntimeError, IndexError, TypeError... for a wrong input
                raise ConfigError(
                    f"calibration batch {i} ({_describe_batch(b)}) does not fit {type(model).__name__}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass calibration inputs "
                    "shaped like the model's input"
                ) from e


def _forward_order(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Any]) -> list[str]:
    """``layers``' names in the order a forward pass over ``batches`` (one batch is enough) reaches them, then
    those it does not reach, in ``layers``' order: the order in which a layer-sequential pruner (sequential
    Wanda, SparseGPT) visits them, so that each is scored on what the already-pruned layers before it give."""
    order: list[str] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, _a, name=name: order.append(name) if name not in order else None
        )
        for name, layer in layers.items()
    ]
    try:
        run_calibration(model, batches)
    finally:
        for h in handles:
            h.remove()
    return order + [x for x in layers if x not in order]


@torch.no_grad()
def wanda_scores(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Wanda importance ``|W_ij| · ‖X_j‖₂`` per weight, from activations on calibration data.

    Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"
    (https://arxiv.org/abs/2306.11695): a weight matters in proportion to its magnitude times the norm of the
    input feature it multiplies, which protects weights that read the large outlier features of transformers.
    For a Conv2d the input features are its im2col columns (channel × kernel position). Norms are collected in
    one pass through the dense model (the paper's layer-sequential variant differs only in that each block
    sees the already-pruned blocks' outputs).
    """
    layers = prunable_layers(model, include=include, exclude=exclude)
    sumsq: dict[str, Tensor] = {}

    def hook(name: str, layer: nn.Module) -> Callable[..., None]:
        def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float()
            if isinstance(layer, nn.Conv2d):
                if layer.groups != 1:
                    raise UnsupportedLayer(
                        f"Wanda: grouped conv {name!r} (groups={layer.groups}) is not supported"
                    )
                x = _conv_columns(layer, x)  # (B·L, C·kh·kw)
            else:
                x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            s = (x * x).sum(0)
            sumsq[name] = sumsq[name] + s if name in sumsq else s

        return fn

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        run_calibration(model, calibration)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in sumsq]
    if missing:
        raise ConfigError(
            f"Wanda: calibration data never reached layers {missing}; pass data that does or exclude them"
        )
    return {
        n: (_rows(layers[n].weight.abs()) * sumsq[n].sqrt()).reshape(layers[n].weight.shape) for n in layers
    }


def _given(value: int | None) -> int:
    """``value``, which the caller's either-or check guarantees is set on this path (N:M without sparsity)."""
    if value is None:
        raise ConfigError("N:M pruning needs both n and m")
    return value


def _wanda_masks(
    scores: Mapping[str, Tensor], sparsity: float | None, n: int | None, m: int | None, strict: bool
) -> tuple[dict[str, Tensor], dict[str, str]]:
    masks, skipped = {}, {}
    for name, s in scores.items():
        if sparsity is None:  # then n and m are set (wanda_prune checked: one or the other)
            try:
                masks[name] = nm_mask(s, _given(n), _given(m))
            except UnsupportedLayer as e:
                if strict:
                    raise UnsupportedLayer(f"layer {name!r}: {e}") from None
                skipped[name] = f"{e}; left dense"
            continue
        rows = _rows(s)
        k = round(sparsity * rows.shape[1])
        keep = torch.ones_like(rows, dtype=torch.bool)
        if k:
            keep.scatter_(1, torch.topk(rows, k, dim=1, largest=False).indices, False)
        masks[name] = keep.reshape(s.shape)
    return masks, skipped


@torch.no_grad()
def wanda_prune(
    model: nn.Module,
    calibration: Sequence[Any],
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    sequential: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> PruneResult:
    """Wanda pruning, fine-tune free: unstructured per-output-row ``sparsity``, or N:M with ``n`` and ``m``.

    As in the paper, unstructured Wanda compares weights within each output row (not across the layer), which
    is what makes the activation-norm factor matter. With ``sequential=True`` layers are pruned one at a time in
    forward order, each scored on activations produced by the already-pruned layers before it (the paper prunes
    block by block this way), so later layers compensate for the error upstream; it costs one calibration pass
    per layer instead of one in total.
    """
    if (sparsity is None) == (n is None or m is None):
        raise ConfigError("wanda_prune needs either sparsity=... or n=... and m=... (not both)")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    if not sequential:
        scores = wanda_scores(model, calibration, include=include, exclude=exclude)
        masks, skipped = _wanda_masks(scores, sparsity, n, m, strict=include is not None)
        apply_masks(model, masks)
        return PruneResult(masks, skipped)
    layers = prunable_layers(model, include=include, exclude=exclude)
    masks, skipped = {}, {}
    for name in _forward_order(model, layers, list(calibration)[:1]):
        scores = wanda_scores(model, calibration, include=[name])
        mk, sk = _wanda_masks(scores, sparsity, n, m, strict=include is not None)
        apply_masks(model, mk)
        masks.update(mk)
        skipped.update(sk)
    return PruneResult(masks, skipped)


def sparsity_of(
    model: nn.Module, *, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> float:
    """Share of exactly-zero weights over the model's prunable layers."""
    layers = prunable_layers(model, include=include, exclude=exclude)
    total = sum(m.weight.numel() for m in layers.values())
    return sum(int((m.weight == 0).sum()) for m in layers.values()) / total


# -- gradual magnitude pruning (Zhu & Gupta 2017) ------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GradualSchedule:
    """Cubic sparsity ramp of Zhu & Gupta 2017, "To prune, or not to prune" (https://arxiv.org/abs/1710.01878).

    ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(t_end − t_0))³`` for ``t_0 ≤ t ≤ t_end``, updated every
    ``frequency`` steps: prune fast while there are many redundant weights, slowly near the target, and let
    fine-tuning between updates recover accuracy.
    """

    final_sparsity: float
    begin_step: int = 0
    end_step: int
    frequency: int = 1
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "final_sparsity")
        if not 0.0 <= self.initial_sparsity < self.final_sparsity:
            raise ConfigError(
                f"initial_sparsity must be in [0, final_sparsity). Found {self.initial_sparsity}"
            )
        if not 0 <= self.begin_step < self.end_step:
            raise ConfigError(f"need 0 <= begin_step < end_step. Found {self.begin_step}, {self.end_step}")
        if self.frequency < 1:
            raise ConfigError(f"frequency must be positive. Found {self.frequency}")

    def sparsity_at(self, step: int) -> float:
        """Target sparsity at training step ``step`` (0 before ``begin_step``, final after ``end_step``)."""
        if step < self.begin_step:
            return 0.0
        t = min(step, self.end_step)
        t = self.begin_step + (t - self.begin_step) // self.frequency * self.frequency
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        if step >= self.end_step:
            frac = 1.0
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def is_update_step(self, step: int) -> bool:
        return step == self.end_step or (
            self.begin_step <= step < self.end_step and (step - self.begin_step) % self.frequency == 0
        )


class GradualPruner:
    """Prune → fine-tune → prune...: call :meth:`step` after every optimizer step of your training loop.

    At update steps it recomputes magnitude masks at the schedule's current sparsity; at every step it
    re-applies the masks so weights the optimizer revived stay zero. The masks are the pruner's only state
    (:attr:`masks`), so a run can be checkpointed and resumed.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: GradualSchedule,
        *,
        scope: str = "global",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.scope = scope
        self.include = include
        self.exclude = exclude
        self.masks: dict[str, Tensor] = {}
        prunable_layers(model, include=include, exclude=exclude)  # validate now, not at step 1000

    @torch.no_grad()
    def step(self, step: int) -> float:
        """Update/re-apply masks for ``step``; returns the sparsity the model now has over pruned layers."""
        if self.schedule.is_update_step(step):
            target = self.schedule.sparsity_at(step)
            if target > 0:
                self.masks = magnitude_prune(
                    self.model, target, scope=self.scope, include=self.include, exclude=self.exclude
                ).masks
        if self.masks:
            apply_masks(self.model, self.masks)
            return PruneResult(self.masks).sparsity
        return 0.0


# -- structured channel pruning ------------------------------------------------------------------------------
# Ops a channel index passes through unchanged (elementwise / pooling), so pruning the producer's channel c
# only requires dropping column c of the consumer.
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.ELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
)
_PASS_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    nn.functional.relu,
    nn.functional.gelu,
    nn.functional.silu,
    nn.functional.max_pool2d,
    nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d,
    nn.functional.dropout,
    nn.functional.leaky_relu,
}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}


@dataclass
class ChannelPruneResult:
    """A new, smaller model plus what was removed: ``kept[layer]`` are the surviving output channel indices."""

    model: nn.Module
    kept: dict[str, Tensor]
    skipped: dict[str, str]
    params_before: int
    params_after: int


def _flatten_start(node: Any) -> int | None:
    if node.op == "call_module":
        return None
    if node.op == "call_function" and node.target is torch.flatten:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if node.op == "call_method" and node.target == "flatten":
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return None


@torch.no_grad()
def channel_prune(
    model: nn.Module,
    ratio: float,
    *,
    example_input: Tensor,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> ChannelPruneResult:
    """Remove the ``ratio`` least important output channels/neurons of each prunable layer; shapes shrink.

    Importance is the L1 norm of each output filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets",
    https://arxiv.org/abs/1608.08710). The model is traced with ``torch.fx`` to find, for each Conv2d/Linear,
    the single layer that consumes its channels (through activations, pooling, BatchNorm and ``flatten``); that
    consumer loses the matching input columns — for a ``flatten`` the whole ``H·W`` block of each channel.
    Layers whose output feeds anything else (a residual add, a concat, the model output) cannot shrink without
    breaking shapes; they are kept whole and reported in :attr:`ChannelPruneResult.skipped`.

    Returns a pruned deep copy; ``model`` itself is left untouched.
    """
    ratio = check_sparsity(ratio, "ratio")
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        traced = symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable control flow
        raise UnsupportedLayer(
            f"channel pruning needs a torch.fx-traceable model; {type(model).__name__} is not: {e}"
        ) from e
    ShapeProp(traced).propagate(example_input)
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    candidates = prunable_layers(new, include=include, exclude=exclude)
    skipped: dict[str, str] = {}
    kept: dict[str, Tensor] = {}
    params_before = sum(p.numel() for p in new.parameters())
    plans = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or node.target not in candidates:
            continue
        name = node.target
        layer = modules[name]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            skipped[name] = f"grouped conv (groups={layer.groups})"
            continue
        bns: list[str] = []
        spatial = 1
        cur = node
        consumer = None
        while True:
            users = list(cur.users)
            if len(users) != 1:
                skipped[name] = f"output feeds {len(users)} nodes (branch/residual)"
                break
            u = users[0]
            if u.op == "call_module" and isinstance(modules.get(u.target), PRUNABLE):
                cons = modules[u.target]
                if isinstance(cons, nn.Conv2d) and cons.groups != 1:
                    skipped[name] = f"consumer {u.target!r} is a grouped conv"
                elif (
                    isinstance(cons, nn.Linear)
                    and spatial == 1
                    and cur.meta["tensor_meta"].shape[-1] != layer.weight.shape[0]
                ):
                    skipped[name] = f"consumer {u.target!r} does not read channels on its last dim"
                else:
                    consumer = u.target
                break
            if u.op == "call_module" and isinstance(modules.get(u.target), nn.BatchNorm1d | nn.BatchNorm2d):
                bns.append(u.target)
            elif (u.op == "call_module" and isinstance(modules.get(u.target), nn.Flatten)) or _flatten_start(
                u
            ) == 1:
                shape = cur.meta["tensor_meta"].shape
                if isinstance(layer, nn.Linear) and len(shape) > 2:
                    # a Linear's channels are its last dim: flatten(1) of (B, T, C) interleaves them with T
                    skipped[name] = f"its {len(shape)}-D output is flattened (channels on the last dim)"
                    break
                spatial = math.prod(shape[2:])
            elif not (
                (u.op == "call_module" and isinstance(modules.get(u.target), _PASS_MODULES))
                or (u.op == "call_function" and u.target in _PASS_FUNCTIONS)
                or (u.op == "call_method" and u.target in _PASS_METHODS)
            ):
                skipped[name] = f"output passes through {u.op} {getattr(u.target, '__name__', u.target)!r}"
                break
            cur = u
        if consumer is not None:
            plans.append((name, bns, spatial, consumer))
    for name, bns, spatial, consumer in plans:
        layer = modules[name]
        out = layer.weight.shape[0]
        n_keep = max(1, out - round(ratio * out))
        importance = _rows(layer.weight).abs().sum(1)
        keep = torch.sort(torch.topk(importance, n_keep).indices).values
        kept[name] = keep
        layer.weight = nn.Parameter(layer.weight[keep].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[keep].clone())
        if isinstance(layer, nn.Linear):
            layer.out_features = n_keep
        else:
            layer.out_channels = n_keep
        for bn_name in bns:
            bn = modules[bn_name]
            for attr in ("weight", "bias"):
                if getattr(bn, attr) is not None:
                    setattr(bn, attr, nn.Parameter(getattr(bn, attr)[keep].clone()))
            for attr in ("running_mean", "running_var"):
                if getattr(bn, attr) is not None:
                    setattr(bn, attr, getattr(bn, attr)[keep].clone())
            bn.num_features = n_keep
        cons = modules[consumer]
        cols = (keep[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1) if spatial > 1 else keep
        cons.weight = nn.Parameter(cons.weight[:, cols].clone())
        if isinstance(cons, nn.Linear):
            cons.in_features = cons.weight.shape[1]
        else:
            cons.in_channels = cons.weight.shape[1]
    params_after = sum(p.numel() for p in new.parameters())
    return ChannelPruneResult(new, kept, skipped, params_before, params_after)
