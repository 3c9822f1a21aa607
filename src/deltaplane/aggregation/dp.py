"""DP-FedAvg: user-level differential privacy for federated averaging, central or local.

Central DP follows McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"
(https://arxiv.org/abs/1710.06963): each client's delta is clipped to L2 norm ``C``, the clipped deltas are
summed with equal weight (a sample-weighted sum would let one client with many samples exceed the sensitivity
``C``), Gaussian noise of std ``z·C`` is added to the sum, and the sum is divided by the expected number of
clients. With an adaptive clip (Andrew et al. 2021, https://arxiv.org/abs/1905.03871) the count of unclipped
clients is released with noise too, and the two noises share the budget of ``z``:
``z⁻² = z_Δ⁻² + (2σ_b)⁻²``, so the accountant still composes a Gaussian mechanism of multiplier ``z``.

Local DP (:func:`privatize`) clips and noises on the device, so the server never sees an un-noised update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deltaplane.aggregation.accounting import PrivacyAccountant, epsilon_for
from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
from deltaplane.aggregation.clipping import Clip, ClipEstimator, QuantileClip
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError, DeltaplaneError

__all__ = ["DPFedAvg", "DPState", "local_epsilon", "privatize"]


@dataclass
class DPState:
    """Server-side DP state: the noise generator and rounds released so far."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    rounds: int = 0


class DPFedAvg(AggregatorWrapper):
    """Central user-level DP on top of clipping: clipped, uniformly weighted sum + Gaussian noise.

    Args:
        inner: the aggregator to privatize; a :class:`Clip` (then ``clip`` must be None) or any other
            aggregator, which gets wrapped in ``Clip(inner, clip=clip)``. Defaults to ``FedAvg()``.
        clip: clip norm: a float, ``"adaptive"`` (quantile clipping with count noise
            ``max(expected_clients / 20, noise_multiplier)``)
            or a :class:`~deltaplane.aggregation.clipping.ClipEstimator`.
        noise_multiplier: ``z``; the sum gets noise of std ``z·C`` (split with the count noise when adaptive).
        expected_clients: clients per round the server expects (``q·N``); the noisy sum is divided by it, as in
            DP-FedAvg's fixed denominator, so the number of participants is not released unnoised. The actual
            count is used when None.
        accountant: a :class:`PrivacyAccountant`; each round spends from it *before* releasing the aggregate.
        seed: seed of the noise generator.

    Measurements: everything from :class:`Clip`, plus ``noise_std`` (std of the noise on the sum),
    ``noise_multiplier_sum`` (``z_Δ``) and, with an accountant, ``epsilon`` and ``delta``.

    Example:
        >>> import torch, deltaplane as dp
        >>> agg = dp.DPFedAvg(dp.Clip(dp.FedAvg(), clip=1.0), noise_multiplier=0.0)
        >>> agg.add(dp.Delta({"w": torch.tensor([3.0, 4.0])}))
        >>> agg.result()["w"].tolist()
        [0.6000000238418579, 0.800000011920929]
    """

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        clip: float | str | ClipEstimator | None = None,
        noise_multiplier: float,
        expected_clients: int | None = None,
        accountant: PrivacyAccountant | None = None,
        seed: int = 0,
    ) -> None:
        if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)) or (
            noise_multiplier < 0
        ):
            raise ConfigError(f"noise_multiplier must be non-negative. Found {noise_multiplier!r}")
        if expected_clients is not None and expected_clients < 1:
            raise ConfigError(f"expected_clients must be at least 1. Found {expected_clients!r}")
        if isinstance(inner, Clip):
            if clip is not None:
                raise ConfigError("clip was given twice: pass clip= or wrap a Clip, not both")
            clipper = inner
        else:
            if clip is None:
                raise ConfigError(
                    "DPFedAvg needs a clip norm: pass clip=1.0 or clip='adaptive', or wrap a Clip"
                )
            if clip == "adaptive":
                if expected_clients is None and noise_multiplier > 0:
                    raise ConfigError(
                        "clip='adaptive' under DP needs expected_clients (it sizes the count noise)"
                    )
                clip = QuantileClip(
                    expected_clients=expected_clients,
                    # Andrew et al. suggest m/20; at least z so that the sum keeps most of the budget
                    count_noise_std=(
                        max(expected_clients / 20, noise_multiplier) if expected_clients else 0.0
                    ),
                    seed=seed + 1,
                )
            clipper = Clip(inner, clip=clip)
        super().__init__(clipper)
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.accountant = accountant
        self.seed = seed
        self.clipper = clipper
        self.state = DPState(generator=torch.Generator().manual_seed(seed))
        self._count = 0
        self.sum_noise_multiplier = self._split_noise()

    def _split_noise(self) -> float:
        """``z_Δ``: the part of ``z`` left for the sum once the adaptive-clip count has taken its share."""
        z = self.noise_multiplier
        est = self.clipper.estimator
        sigma_b = getattr(est, "count_noise_std", 0.0) if est.adaptive else 0.0
        if z == 0 or sigma_b == 0:
            if est.adaptive and z > 0:
                raise ConfigError(
                    "an adaptive clip under DP needs count_noise_std > 0 (the count of unclipped clients is "
                    "released too); Andrew et al. suggest expected_clients / 20"
                )
            return z
        if 2 * sigma_b <= z:
            raise ConfigError(
                f"count_noise_std={sigma_b} is too small for noise_multiplier={z}: need 2·count_noise_std > z"
            )
        return (z**-2 - (2 * sigma_b) ** -2) ** -0.5

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        # equal weights: sensitivity of the sum to one client is exactly the clip norm
        self.inner.add(delta, 1.0)
        self._count += 1

    def _finish(self) -> Delta:
        if self._count == 0:
            raise DeltaplaneError("no client delta was added; nothing to aggregate")
        epsilon = self.accountant.spend() if self.accountant is not None else None  # raises before release
        c = self.clipper.estimator.value  # the clip of *this* round, read before the estimator adapts
        mean = self.inner.result()
        std = self.sum_noise_multiplier * c
        denom = float(self.expected_clients or self._count)
        g = self.state.generator

        def noised(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            total = t.double() * self._count
            if std > 0:
                total += std * torch.randn(t.shape, generator=g, dtype=torch.float64)
            return (total / denom).to(t.dtype)

        out = mean.map(lambda _, t: noised(t))
        self.state.rounds += 1
        self._own = {"noise_std": std, "noise_multiplier_sum": self.sum_noise_multiplier}
        if epsilon is not None:
            self._own |= {"epsilon": epsilon, "delta": self.accountant.delta}  # type: ignore[union-attr]
        return out

    def reset(self) -> None:
        super().reset()
        self._count = 0

    def __repr__(self) -> str:
        return (
            f"DPFedAvg({self.inner!r}, noise_multiplier={self.noise_multiplier!r}, "
            f"expected_clients={self.expected_clients!r})"
        )


def privatize(delta: Delta, *, clip: float, noise_multiplier: float, generator: torch.Generator) -> Delta:
    """Local DP on the device: clip ``delta`` to L2 norm ``clip`` and add N(0, (z·clip)²) to every value.

    Any two clipped updates differ by at most ``2·clip``, so each release is a Gaussian mechanism with
    multiplier ``z / 2`` against an arbitrary change of the device's data; see :func:`local_epsilon`.
    """
    if not clip > 0:
        raise ConfigError(f"clip must be positive. Found {clip!r}")
    if not noise_multiplier >= 0:
        raise ConfigError(f"noise_multiplier must be non-negative. Found {noise_multiplier!r}")
    delta.check_finite()
    norm = delta.norm()
    scaled = delta * (clip / norm) if norm > clip else delta
    std = noise_multiplier * clip

    def noised(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return (t.double() + std * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(t.dtype)

    return scaled.map(lambda _, t: noised(t))


def local_epsilon(*, noise_multiplier: float, rounds: int, delta: float, method: str = "rdp") -> float:
    """ε of a device that released ``rounds`` updates through :func:`privatize` (replace-one adjacency)."""
    return epsilon_for(
        noise_multiplier=noise_multiplier / 2, sampling_rate=1.0, steps=rounds, delta=delta, method=method
    )
