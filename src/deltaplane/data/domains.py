"""Domain shifts of the digits images: each turns one dataset into a related task for a device or a merge.

Personalization and merging need several *different but related* tasks; rotating, inverting, noising or
shifting the same digits gives them without another download. Each transform is a pure function of a batch
``(N, 1, H, W)`` of images in [0, 1] and returns a new batch of the same shape (the input is not modified);
randomness comes only from an explicit ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deltaplane.errors import ConfigError

__all__ = ["DOMAINS", "apply_domain", "gaussian_noise", "invert", "rotate90", "shift"]


def _check_images(x: Tensor) -> None:
    if x.dim() != 4:
        raise ConfigError(f"expected images of shape (N, C, H, W). Found shape {tuple(x.shape)}")


def rotate90(x: Tensor, k: int = 1) -> Tensor:
    """Rotate every image by ``k`` quarter turns counter-clockwise."""
    _check_images(x)
    return torch.rot90(x, k, dims=(-2, -1)).contiguous()


def invert(x: Tensor) -> Tensor:
    """Swap ink and paper: ``1 - x``."""
    _check_images(x)
    return 1.0 - x


def gaussian_noise(x: Tensor, std: float = 0.2, *, generator: torch.Generator) -> Tensor:
    """Add N(0, ``std``²) noise to every pixel, clipped back into [0, 1]."""
    _check_images(x)
    if std < 0:
        raise ConfigError(f"std must be non-negative. Found {std}")
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * std
    return (x + noise).clamp_(0.0, 1.0)


def shift(x: Tensor, dx: int = 1, dy: int = 1) -> Tensor:
    """Translate every image ``dx`` pixels right and ``dy`` down, filling the vacated border with 0.

    Unlike ``torch.roll`` nothing wraps around: a digit pushed off the edge is cut, as a camera would.
    """
    _check_images(x)
    h, w = x.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        raise ConfigError(f"shift ({dx}, {dy}) moves the whole {h}×{w} image out of frame")
    out = torch.zeros_like(x)
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


#: The named domains with their default strength; each maps (images, generator) to shifted images.
DOMAINS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "identity": lambda x, g: x.clone(),
    "rotate90": lambda x, g: rotate90(x),
    "invert": lambda x, g: invert(x),
    "noise": lambda x, g: gaussian_noise(x, 0.2, generator=g),
    "shift": lambda x, g: shift(x, 1, 1),
}


def apply_domain(name: str, x: Tensor, *, seed: int = 0) -> Tensor:
    """Apply the named domain of :data:`DOMAINS` to ``x``; ``seed`` fixes any randomness (noise)."""
    try:
        fn = DOMAINS[name]
    except KeyError:
        raise ConfigError(f"unknown domain '{name}'; available: {', '.join(DOMAINS)}") from None
    return fn(x, torch.Generator().manual_seed(seed))
