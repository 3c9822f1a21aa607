"""Per-client L2 clipping with a fixed or an adaptive (quantile-tracking) clip norm.

Fixed and adaptive clipping run the same code path, as in TensorFlow Federated's ``clipping_factory``: a float
clip is promoted to a :class:`ConstantClip` estimator, and :class:`Clip` only ever asks its estimator for the
current value and tells it, once per round, how many clients were at or under it.

Adaptive clipping follows Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"
(https://arxiv.org/abs/1905.03871): the clip ``C`` tracks the ``γ``-quantile of client update norms with the
geometric update ``C ← C · exp(−η (b̄ − γ))``, where ``b̄`` is the fraction of clients whose norm was ≤ C. Under
DP the count is released through a Gaussian mechanism too, and, as in Andrew et al. §3 and TF Privacy's
``QuantileEstimatorQuery``, the released statistic is the *centred* count ``Σᵢ (bᵢ − ½) + N(0, σ_b²)``: adding or
removing one client moves it by exactly ½ whatever that client's norm, so its noise multiplier is ``2σ_b``, which
is what :class:`~deltaplane.aggregation.dp.DPFedAvg` assumes when it splits its noise budget. Then
``b̄ = (that sum) / m + ½`` with ``m`` the expected number of clients (a fixed denominator: the actual number of
participants is not released). An uncentred count ``Σᵢ bᵢ`` moves by 1, which halves its real noise multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

import numpy as np
import torch

from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
from deltaplane.aggregation.counters import IntegerMedians
from deltaplane.aggregation.noise import secure_normal
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError, InvalidUpdate

__all__ = [
    "Clip",
    "ClipEstimator",
    "ConstantClip",
    "NormBound",
    "QuantileClip",
    "QuantileClipState",
    "StartsFromNorms",
    "as_estimator",
]


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be positive. Found {value!r}")
    return float(value)


@runtime_checkable
class ClipEstimator(Protocol):
    """Where a clip norm comes from: a constant, or a process that adapts it between rounds."""

    adaptive: bool

    @property
    def value(self) -> float:
        """The clip norm to use in the current round."""
        ...

    def update(self, below: int, count: int) -> None:
        """End of round: ``below`` of ``count`` clients had an update norm ≤ :attr:`value`."""
        ...


class StartsFromNorms(ClipEstimator, Protocol):
    """An estimator whose first round is unclipped (:attr:`value` infinite) and that starts from its norms:
    :class:`QuantileClip` with ``initial=None``."""

    def start(self, norms: list[float]) -> None:
        """End of the unclipped first round: start from that round's update norms."""
        ...


class ConstantClip:
    """A fixed clip norm (what a float ``clip`` is promoted to)."""

    adaptive = False

    def __init__(self, value: float) -> None:
        self._value = _positive("clip", value)

    @property
    def value(self) -> float:
        return self._value

    def update(self, below: int, count: int) -> None:
        """A constant does not adapt."""

    def __repr__(self) -> str:
        return f"ConstantClip({self._value!r})"


@dataclass
class QuantileClipState:
    """The learned part of :class:`QuantileClip`: the current clip and the count-noise generator (None: the
    count noise comes from the OS CSPRNG, see :mod:`~deltaplane.aggregation.noise`)."""

    value: float
    rounds: int = 0
    rng: np.random.Generator | None = field(default_factory=lambda: np.random.default_rng(0))
    #: ``b̄`` of the last update as released (noised under DP): the estimated unclipped fraction
    released_fraction: float | None = None


class QuantileClip:
    """Adaptive clip tracking the ``target_quantile`` of client update norms (Andrew et al. 2021).

    With ``initial=None`` the first round is not clipped and the tracker starts from that round's
    ``target_quantile`` of the update norms, then follows the geometric update. A fixed start far from the norms
    costs rounds: from 0.1 to honest norms ~2 the update (at most ``e^{η/2}`` a round) needs ~30 rounds, in
    which a norm bound shrinks every honest update. This start reads raw norms, so it is refused with count noise
    (under DP the start must be a public number).

    Args:
        initial: clip norm of the first round; None: no clip in the first round, then its quantile.
        target_quantile: fraction ``γ`` of clients that should be unclipped (0.5 = median norm).
        learning_rate: ``η`` of the geometric update ``C ← C · exp(−η (b̄ − γ))``.
        count_noise_std: std ``σ_b`` of the Gaussian noise added to the centred count ``Σ(bᵢ − ½)`` of
            unclipped clients (0 without DP; Andrew et al. suggest ``expected_clients / 20``); its noise
            multiplier is ``2σ_b`` since one client moves the centred count by ½.
        expected_clients: denominator of ``b̄``; the actual number of clients when None.
        seed: seed of the count-noise generator (reproducible simulations only: whoever knows it can subtract
            the noise); None draws the count noise from the OS CSPRNG, as real deployments do.
    """

    adaptive = True

    def __init__(
        self,
        *,
        initial: float | None = 0.1,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_std: float = 0.0,
        expected_clients: int | None = None,
        seed: int | None = 0,
    ) -> None:
        if initial is not None:
            _positive("initial", initial)
        if not 0.0 < target_quantile < 1.0:
            raise ConfigError(f"target_quantile must be in (0, 1). Found {target_quantile!r}")
        _positive("learning_rate", learning_rate)
        if not (math.isfinite(count_noise_std) and count_noise_std >= 0):
            raise ConfigError(f"count_noise_std must be non-negative. Found {count_noise_std!r}")
        if initial is None and count_noise_std:
            raise ConfigError(
                "initial=None starts the clip from the first round's raw update norms, which DP cannot release; "
                "give a public initial clip with count_noise_std > 0"
            )
        if expected_clients is not None and expected_clients < 1:
            raise ConfigError(f"expected_clients must be at least 1. Found {expected_clients!r}")
        self.initial = initial
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate
        self.count_noise_std = count_noise_std
        self.expected_clients = expected_clients
        self.seed = seed
        start = math.inf if initial is None else float(initial)
        self.state = QuantileClipState(value=start, rng=None if seed is None else np.random.default_rng(seed))

    @property
    def value(self) -> float:
        return self.state.value

    def start(self, norms: list[float]) -> None:
        """End of the unclipped first round (``initial=None``): start from the quantile of its norms."""
        if norms:
            self.state.value = max(float(np.quantile(norms, self.target_quantile)), 1e-12)
            self.state.rounds += 1

    def update(self, below: int, count: int) -> None:
        """Release the centred count ``Σ(bᵢ − ½)`` (+ noise) and move the clip toward the target quantile.

        With ``expected_clients`` set, a round with no clients still releases (noise only) and adapts, so
        whether anyone took part is not given away by a skipped update."""
        m = self.expected_clients or count
        if m == 0:
            return
        centred = below - count / 2  # one client more or fewer moves it by exactly ½
        if self.count_noise_std:
            rng = self.state.rng
            noise = secure_normal if rng is None else lambda std: rng.normal(0.0, std)
            centred += noise(self.count_noise_std)
        frac = centred / m + 0.5
        self.state.value *= math.exp(-self.learning_rate * (frac - self.target_quantile))
        self.state.released_fraction = frac
        self.state.rounds += 1

    def __repr__(self) -> str:
        return (
            f"QuantileClip(initial={self.initial!r}, target_quantile={self.target_quantile!r}, "
            f"learning_rate={self.learning_rate!r}, count_noise_std={self.count_noise_std!r})"
        )


def as_estimator(clip: float | str | ClipEstimator, *, expected_clients: int | None = None) -> ClipEstimator:
    """Promote ``clip`` to an estimator: a float → :class:`ConstantClip`, ``"adaptive"`` → :class:`QuantileClip`."""
    if isinstance(clip, ClipEstimator) and not isinstance(clip, int | float | str):
        return clip
    if isinstance(clip, str):
        if clip == "adaptive":
            return QuantileClip(expected_clients=expected_clients)
        try:
            clip = float(clip)
        except ValueError:
            raise ConfigError(f"clip must be a positive number or 'adaptive'. Found {clip!r}") from None
    if isinstance(clip, bool) or not isinstance(clip, int | float):
        raise ConfigError(f"clip must be a positive number, 'adaptive' or a ClipEstimator. Found {clip!r}")
    return ConstantClip(clip)


class Clip(AggregatorWrapper):
    """Scale each client delta to L2 norm at most ``clip`` before passing it on (streaming, O(model)).

    Measurements: ``clip`` (the norm used this round), ``clipped_fraction``, ``mean_norm`` (before clipping).

    Example:
        >>> import torch, deltaplane as dp
        >>> agg = dp.Clip(dp.FedAvg(), clip=1.0)
        >>> agg.add(dp.Delta({"w": torch.tensor([3.0, 4.0])}))
        >>> agg.result()["w"].tolist(), agg.measurements["clipped_fraction"]
        ([0.6000000238418579, 0.800000011920929], 1.0)
    """

    def __init__(self, inner: Aggregator | None = None, *, clip: float | str | ClipEstimator = 1.0) -> None:
        from deltaplane.aggregation.fedavg import FedAvg

        super().__init__(inner if inner is not None else FedAvg())
        self.clip = clip
        self.estimator = as_estimator(clip)
        self._below = 0
        self._count = 0
        self._norm_sum = 0.0
        self._norms: list[float] = []  # this round's norms, for an estimator that starts from them

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        delta.check_finite()
        c = self.estimator.value
        norm = delta.norm()
        clipped = delta * (c / norm) if norm > c else delta
        self.inner.add(clipped, weight)  # counted only once the inner aggregator accepted it
        self._below += norm <= c
        self._count += 1
        self._norm_sum += norm
        if not math.isfinite(c):
            self._norms.append(norm)

    def _finish(self) -> Delta:
        out = self.inner.result()
        c = self.estimator.value
        self._own = {
            "clipped_fraction": 1.0 - self._below / self._count if self._count else 0.0,
            "mean_norm": self._norm_sum / self._count if self._count else 0.0,
        }
        if math.isfinite(c):
            self._own["clip"] = c
            self.estimator.update(self._below, self._count)
        else:  # an unclipped first round (QuantileClip(initial=None)): start from its norms
            # only an estimator that starts from the norms reports an infinite clip (a ConstantClip is finite)
            cast(StartsFromNorms, self.estimator).start(self._norms)
        return out

    def reset(self) -> None:
        super().reset()
        self._below, self._count, self._norm_sum, self._norms = 0, 0, 0.0, []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, clip={self.clip!r})"


class NormBound(Clip):
    """Norm bounding against model-replacement and backdoor attacks (Sun et al. 2019, "Can You Really Backdoor
    Federated Learning?", https://arxiv.org/abs/1911.07963): the same engine as :class:`Clip`, registered under
    its robustness name with ``max_norm`` as the bound, plus the paper's *weak DP*: ``noise > 0`` adds
    ``N(0, noise²)`` to every coordinate of the mean (seeded by ``seed``; not a privacy guarantee — use
    :class:`~deltaplane.aggregation.dp.DPFedAvg` for that). Streaming, O(model).

    ``max_norm="adaptive"`` bounds by the median update norm: the first round is not bounded and gives the start
    (its median norm), then :class:`QuantileClip` tracks the median round by round.

    Like every robust rule it **ignores client weights**: each bounded update enters the mean with weight 1. A
    weight (``num_examples``) is something a client claims, and one client claiming 10⁶ examples would otherwise
    own a weighted mean however small its bounded norm.

    Example:
        >>> import torch, deltaplane as dp
        >>> agg = dp.NormBound(dp.FedAvg(), max_norm=1.0)
        >>> agg.add(dp.Delta({"w": torch.tensor([0.5])}), weight=10)
        >>> agg.add(dp.Delta({"w": torch.tensor([-9.0])}), weight=1e6)  # bounded to -1, weight ignored
        >>> agg.result()["w"].item()
        -0.25
    """

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        max_norm: float | str | ClipEstimator = 1.0,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        # "adaptive": the median norm, tracked from the first round's median (QuantileClip(initial=None)) rather
        # than from Andrew et al.'s DP start of 0.1, which shrank every honest update for ~30 rounds
        super().__init__(inner, clip=QuantileClip(initial=None) if max_norm == "adaptive" else max_norm)
        if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
            raise ConfigError(f"noise must be a finite non-negative number. Found {noise!r}")
        self.max_norm = max_norm
        self.noise = float(noise)
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        # integer tensors escape the norm (it is taken over floats): their lower median, not the inner mean
        self._counters = IntegerMedians()

    def _finish(self) -> Delta:
        out = self._counters.apply(super()._finish())
        if self.noise > 0:  # Sun et al.'s weak DP: a small N(0, noise²) on every coordinate of the mean
            out = out.map(
                lambda _, t: (
                    t + self.noise * torch.randn(t.shape, generator=self._gen, dtype=t.dtype)
                    if t.is_floating_point()
                    else t
                )
            )
            self._own["noise"] = self.noise
        return out

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise InvalidUpdate(f"weight must be a finite non-negative number. Found {weight!r}")
        super().add(delta, 1.0)  # the claimed weight is checked, then ignored (see the class docstring)
        self._counters.add(delta)  # (once the inner aggregator accepted it)

    def reset(self) -> None:
        super().reset()
        self._counters.reset()

    def __repr__(self) -> str:
        return f"NormBound({self.inner!r}, max_norm={self.max_norm!r}, noise={self.noise!r})"
