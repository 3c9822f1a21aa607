"""Turn a device's update into ring codes for secure aggregation, and the unmasked sum back into a mean.

This is the "SecAgg-mask" end of the client step: after the update has been through the device's own codec
(top-k, quantization, error feedback — whatever the run compresses with), the device decodes its own payload
and quantizes *that* into the ring, so secure aggregation sums exactly what a plaintext round would have
decoded, up to one quantization step. The wire then carries the masked ring vector instead of the payload.

Weighted FedAvg without revealing weights: the device scales its values by ``w / weight_scale`` (``w`` its
number of examples, ``weight_scale`` a public typical value such as the mean over invited devices) and appends
``w`` itself as one extra integer slot. The unmasked sum then holds ``Σ (wᵢ / weight_scale) xᵢ`` and ``Σ wᵢ``
exactly, and the weighted mean is ``weight_scale · Σ(...) / Σ wᵢ`` — the server never sees a single ``wᵢ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deltaplane.aggregation.secagg.errors import SecAggError
from deltaplane.aggregation.secagg.ring import dequantize_sum, quantize
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError

__all__ = ["RingEncoding", "max_ring_weight"]


def max_ring_weight(bits: int) -> int:
    """The largest example count a weighted ring of ``bits``-bit codes carries: ``2^bits − 1``, the top of its
    weight slot (:meth:`RingEncoding.check_weight` refuses anything above it)."""
    return (1 << bits) - 1


@dataclass(frozen=True)
class RingEncoding:
    """How an update becomes ``numel + 1`` codes of ``bits`` bits (values, then the weight slot).

    Args:
        bits: bits per code; with ``n`` clients the ring has ``bits + ⌈log₂ n⌉`` bits.
        clip_range: each (scaled) value is clipped to ``±clip_range`` before quantization.
        weight_scale: public normalizer of the example-count weights; 0 means an unweighted mean.
    """

    bits: int = 16
    clip_range: float = 1.0
    weight_scale: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 31:
            raise ConfigError(f"bits must be in [1, 31]. Found {self.bits}")
        if not (self.clip_range > 0 and np.isfinite(self.clip_range)):
            raise ConfigError(f"clip_range must be positive and finite. Found {self.clip_range!r}")
        if not (self.weight_scale >= 0 and np.isfinite(self.weight_scale)):
            raise ConfigError(f"weight_scale must be >= 0 (0: unweighted). Found {self.weight_scale!r}")

    @property
    def weighted(self) -> bool:
        return self.weight_scale > 0

    @staticmethod
    def vector_size(like: Delta) -> int:
        """Codes per device for updates shaped like ``like``: every value plus the weight slot."""
        _check_float(like)
        return like.numel() + 1

    def check_weight(self, weight: int) -> None:
        """Refuse a weight this ring cannot carry: a weighted ring puts the example count in one ``bits``-bit
        slot, so it must be an integer in ``[1, 2^bits)`` (any weight fits an unweighted ring: its slot is 1).
        A device knows its count before it trains, so it can refuse a round here before spending a pass."""
        if self.weighted and (
            not isinstance(weight, int | np.integer) or not 1 <= weight <= max_ring_weight(self.bits)
        ):
            raise SecAggError(
                f"a weighted SecAgg round needs an integer example count in [1, 2^{self.bits}). Found {weight!r}"
            )

    def encode(self, delta: Delta, weight: int, rng: np.random.Generator) -> np.ndarray:
        """The device's codes: unbiased stochastic rounding of the (weight-scaled, clipped) values, then ``w``."""
        self.check_weight(weight)
        if self.weighted:
            scale, slot = float(weight) / self.weight_scale, int(weight)
        else:
            scale, slot = 1.0, 1
        _check_float(delta)
        delta.check_finite()
        values = delta.flatten().double().numpy() * scale
        codes = quantize(values, clip_range=self.clip_range, bits=self.bits, rng=rng)
        return np.concatenate([codes, np.array([slot], dtype=np.uint32)])

    def decode_sum(self, total: np.ndarray, *, count: int, like: Delta) -> tuple[Delta, int]:
        """(mean update, total weight) from the exact integer sum of ``count`` devices' codes.

        Masks hide each input but cannot stop a malicious device from sending any ring value in place of its
        codes. Every honest sum lies in a known range (each of ``count`` codes is in ``[0, 2^bits − 1]``, each
        weight in ``[1, 2^bits − 1]``, or exactly 1 unweighted), so a sum outside it proves some input was out
        of range and is refused with :class:`SecAggError` rather than decoded into a wrong mean (a weight sum
        wrapped to 0 or 1 would divide by zero or inflate the mean by the true total weight). A malicious
        device can still add any *in-range* value: that is a poisoning the norm guard may catch, not this.
        """
        _check_float(like)
        n = like.numel()
        if total.shape != (n + 1,):
            raise SecAggError(f"the unmasked sum has {total.shape[0]} values, expected {n + 1}")
        if count < 1:
            raise SecAggError("no device is in the sum")
        levels = (1 << self.bits) - 1
        weight = int(total[n])
        low, high = (count, count * levels) if self.weighted else (count, count)
        if not low <= weight <= high:
            raise SecAggError(
                f"the unmasked weight sum is {weight}, outside [{low}, {high}] for {count} devices' "
                f"{'example counts' if self.weighted else 'unweighted slots (1 each)'}: some device sent an "
                "out-of-range input, so the sum cannot be trusted; the round cannot be published"
            )
        top = int(total[:n].max()) if n else 0
        if top > count * levels:
            raise SecAggError(
                f"an unmasked value sum is {top}, above {count * levels} ({count} devices' {self.bits}-bit codes): "
                "some device sent an out-of-range input, so the sum cannot be trusted; the round cannot be published"
            )
        summed = dequantize_sum(total[:n], count=count, clip_range=self.clip_range, bits=self.bits)
        mean = summed * (self.weight_scale / weight) if self.weighted else summed / count
        # each device's (scaled) values are clipped to ±clip_range, so |mean| ≤ clip_range · weight_scale·count/Σw
        bound = self.clip_range * (self.weight_scale * count / weight if self.weighted else 1.0) * (1 + 1e-9)
        if n and not (np.isfinite(mean).all() and float(np.abs(mean).max()) <= bound):
            raise SecAggError(
                f"the decoded mean leaves ±{bound:.6g}, the range the encoding allows; the round cannot be published"
            )
        return like.unflatten(torch.from_numpy(mean).to(torch.float32)), weight


def _check_float(delta: Delta) -> None:
    # an integer tensor (a step counter) cannot be averaged in the ring; refuse rather than drop it silently
    bad = [k for k, v in delta.items() if not v.is_floating_point()]
    if bad:
        raise SecAggError(
            f"secure aggregation sums floating-point tensors only; '{bad[0]}' is {delta[bad[0]].dtype}"
        )
