"""Evaluation harness: clean and corrupted accuracy, calibration error, latency — fp32 vs compressed side by side.

A compressed model is judged on more than clean accuracy: pruning and quantization can cost disproportionately
on shifted inputs (Hooker et al. 2019, "What Do Compressed Deep Neural Networks Forget?",
https://arxiv.org/abs/1911.05248). :func:`compare` therefore flags every corruption whose accuracy drop exceeds
the clean drop. Everything works on a ``predict(x: ndarray) -> logits`` callable, so PyTorch models, ONNX
Runtime sessions and artifacts are measured by the same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deltaplane.errors import ConfigError

__all__ = [
    "Comparison",
    "Evaluation",
    "Latency",
    "compare",
    "corruptions",
    "evaluate",
    "expected_calibration_error",
    "measure_latency",
    "onnx_predictor",
    "torch_predictor",
]

Predict = Callable[[np.ndarray], np.ndarray]


def torch_predictor(model: nn.Module) -> Predict:
    """``predict(x) -> logits`` for a PyTorch model (eval mode, no autograd)."""
    model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return predict


def onnx_predictor(session: Any) -> Predict:
    """``predict(x) -> logits`` for a single-input ONNX Runtime session."""
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return predict


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017, https://arxiv.org/abs/1706.04599).

    ``Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|``: how far the model's confidence is from its accuracy. Quantization
    can leave accuracy intact while making the model over-confident, which this catches.
    """
    if n_bins < 1:
        raise ConfigError(f"n_bins must be positive. Found {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- corruptions (images N×C×H×W in [0, 1]) ------------------------------------------------------------------
def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = torch.nn.functional.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def corruptions(
    x: np.ndarray,
    *,
    seed: int = 0,
    noise_std: float = 0.15,
    degrees: float = 20.0,
    blur_sigma: float = 0.8,
    shift_px: int = 1,
) -> dict[str, np.ndarray]:
    """Corrupted / shifted copies of a batch of images: ``noise``, ``rotation``, ``blur``, ``shift``.

    In the spirit of ImageNet-C (Hendrycks & Dietterich 2019, https://arxiv.org/abs/1903.12261): Gaussian pixel
    noise (seeded, clipped to [0, 1]), a rotation by ``degrees`` (bilinear), a Gaussian blur, and a translation
    by ``shift_px`` pixels right and down (zero fill).
    """
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if t.ndim != 4:
        raise ConfigError(f"corruptions expect images N×C×H×W. Found shape {tuple(t.shape)}")
    g = torch.Generator().manual_seed(seed)
    noise = (t + noise_std * torch.randn(t.shape, generator=g)).clamp(0, 1)
    a = math.radians(degrees)
    rot = _affine(t, torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]))
    r = max(1, math.ceil(2 * blur_sigma))
    k1 = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * blur_sigma**2))
    k2 = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    c = t.shape[1]
    blur = torch.nn.functional.conv2d(t, k2.expand(c, 1, *k2.shape), padding=r, groups=c)
    shifted = torch.zeros_like(t)
    shifted[..., shift_px:, shift_px:] = t[..., : t.shape[2] - shift_px, : t.shape[3] - shift_px]
    return {
        k: v.numpy() for k, v in {"noise": noise, "rotation": rot, "blur": blur, "shift": shifted}.items()
    }


# -- latency ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    """Per-call wall time percentiles in microseconds, at one batch size."""

    batch_size: int
    p50_us: float
    p95_us: float


def measure_latency(
    predict: Predict, x: np.ndarray, *, batch_size: int, iters: int = 300, warmup: int = 30
) -> Latency:
    """Time ``predict`` on batches of ``batch_size`` (cycling through ``x``); p50/p95 of per-call times.

    Percentiles rather than means because device latency budgets are about the tail, and a shared CPU adds
    outliers that would drag a mean around.
    """
    if batch_size < 1 or iters < 1:
        raise ConfigError(f"batch_size and iters must be positive. Found {batch_size}, {iters}")
    n = len(x)
    batches = [np.ascontiguousarray(x[(np.arange(batch_size) + i * batch_size) % n]) for i in range(8)]
    for i in range(warmup):
        predict(batches[i % 8])
    times = np.empty(iters)
    for i in range(iters):
        b = batches[i % 8]
        t0 = time.perf_counter()
        predict(b)
        times[i] = time.perf_counter() - t0
    return Latency(batch_size, float(np.percentile(times, 50) * 1e6), float(np.percentile(times, 95) * 1e6))


# -- evaluation ---------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """One model's numbers: accuracy (clean + each variant), ECE on clean, latency per batch size, size."""

    name: str
    accuracy: dict[str, float]
    ece: float
    latency: dict[int, Latency] = field(default_factory=dict)
    size_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "ece": self.ece,
            "latency_us": {str(b): {"p50": v.p50_us, "p95": v.p95_us} for b, v in self.latency.items()},
            "size_bytes": self.size_bytes,
        }


def evaluate(
    name: str,
    predict: Predict,
    x: np.ndarray,
    y: np.ndarray,
    *,
    variants: Mapping[str, np.ndarray] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    latency_iters: int = 300,
    size_bytes: int | None = None,
) -> Evaluation:
    """Accuracy on the clean set and on every variant (same labels), ECE on clean, latency at ``batch_sizes``."""
    logits = predict(np.ascontiguousarray(x, dtype=np.float32))
    acc = {"clean": float((logits.argmax(1) == y).mean())}
    ece = expected_calibration_error(_softmax(logits.astype(np.float64)), y)
    for k, xv in (variants or {}).items():
        acc[k] = float((predict(np.ascontiguousarray(xv, dtype=np.float32)).argmax(1) == y).mean())
    lat = {
        b: measure_latency(
            predict, np.ascontiguousarray(x, dtype=np.float32), batch_size=b, iters=latency_iters
        )
        for b in batch_sizes
    }
    return Evaluation(name, acc, ece, lat, size_bytes)


@dataclass
class Comparison:
    """A compressed model against its fp32 baseline: drops in points, latency ratios, and robustness flags."""

    baseline: Evaluation
    candidate: Evaluation
    drops: dict[str, float]  # accuracy points lost per split (positive = worse)
    flagged: list[str]  # variants whose drop exceeds the clean drop (+ tolerance)
    latency_ratio: dict[int, float]  # candidate p50 / baseline p50
    size_ratio: float | None  # baseline size / candidate size

    def to_dict(self) -> dict[str, Any]:
        return {
            "drops_points": self.drops,
            "ood_flags": self.flagged,
            "latency_ratio_p50": {str(k): v for k, v in self.latency_ratio.items()},
            "size_ratio": self.size_ratio,
        }


def compare(baseline: Evaluation, candidate: Evaluation, *, tolerance: float = 0.0) -> Comparison:
    """Side-by-side numbers; flags every variant that *loses* accuracy beyond the clean drop by > ``tolerance``.

    A clean gain counts as a zero clean drop, so a variant is flagged only when it really drops (``d > 0``) and by
    more than clean does. ``tolerance`` is in accuracy points; 0 (the default) flags any larger OOD drop, which on
    a few hundred test images includes single-image differences.
    """
    drops = {
        k: 100.0 * (baseline.accuracy[k] - candidate.accuracy.get(k, float("nan"))) for k in baseline.accuracy
    }
    # Only a *drop* beyond the clean drop is flagged: a clean gain counts as no drop, so a split that merely
    # gains less than clean did (or gains more) is not blamed.
    floor = max(drops["clean"], 0.0) + tolerance
    flagged = [k for k, d in drops.items() if k != "clean" and d > 0 and d > floor]
    lat = {
        b: candidate.latency[b].p50_us / baseline.latency[b].p50_us
        for b in baseline.latency
        if b in candidate.latency
    }
    size = (
        baseline.size_bytes / candidate.size_bytes if baseline.size_bytes and candidate.size_bytes else None
    )
    return Comparison(baseline, candidate, drops, flagged, lat, size)
