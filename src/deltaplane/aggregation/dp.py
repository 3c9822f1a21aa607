"""DP-FedAvg: user-level differential privacy for federated averaging, central or local.

Central DP follows McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"
(https://arxiv.org/abs/1710.06963): each client's delta is clipped to L2 norm ``C``, the clipped deltas are
summed with equal weight (a sample-weighted sum would let one client with many samples exceed the sensitivity
``C``), Gaussian noise of std ``z·C`` is added to the sum, and the sum is divided by the expected number of
clients. With an adaptive clip (Andrew et al. 2021, https://arxiv.org/abs/1905.03871) the *centred* count of
unclipped clients ``Σ(bᵢ − ½)`` (sensitivity ½) is released with noise ``σ_b`` too, and the two noises share the
budget of ``z``: ``z⁻² = z_Δ⁻² + (2σ_b)⁻²``, so the pair is one Gaussian mechanism of multiplier ``z`` and the
accountant composes exactly that.

The guarantee holds under these conditions, each enforced here rather than assumed:

* adjacency is adding or removing one client (all of its data) — :data:`ADD_REMOVE`; :class:`DistributedDP`
  states the same figure for zero-out neighbours (:data:`ZERO_OUT`), local DP for replace-one — and clients are
  sampled by Poisson sampling with the accountant's rate (distributed DP's accountant counts that sampling as
  revealed, see :class:`DistributedDP`) (:func:`deltaplane.aggregation.sampling.sample_round` does this when DP is on);
* the sum is over clipped, uniformly weighted updates: inside :class:`DPFedAvg` only fixed norm bounds and
  :class:`~deltaplane.aggregation.fedavg.FedAvg` may sit (an adaptive norm bound would adapt from
  an un-noised count; a robust rule or server optimizer would change the sensitivity) — anything else is a
  :class:`~deltaplane.errors.ConfigError`;
* every tensor is privatized: a non-floating-point tensor (a step counter) is refused with
  :class:`~deltaplane.errors.NotPrivatizable`, never released exactly;
* the denominator is fixed (``expected_clients``), a round with no client still releases noise, and the
  measurements of a noised round carry only released values (clip, noisy unclipped fraction, noise, ε).

Local DP (:func:`privatize`) clips and noises on the device, so the server never sees an un-noised update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# the adjacency labels live with the accountant: a coordinator states them without torch
from deltaplane.aggregation.accounting import (
    ADD_REMOVE,
    REPLACE_ONE,
    ZERO_OUT,
    PrivacyAccountant,
    epsilon_for,
)
from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
from deltaplane.aggregation.clipping import Clip, ClipEstimator, QuantileClip
from deltaplane.aggregation.dp_sizes import distributed_noise_std, distributed_ring_range
from deltaplane.aggregation.fedavg import FedAvg
from deltaplane.aggregation.noise import secure_randn
from deltaplane.delta import Delta, StateDict, check_compatible
from deltaplane.errors import ConfigError, InvalidUpdate, NotPrivatizable, TooFewUpdates

__all__ = [
    "ADD_REMOVE",
    "REPLACE_ONE",
    "ZERO_OUT",
    "DPFedAvg",
    "DPState",
    "DistributedDP",
    "distributed_noise",
    "distributed_noise_std",
    "distributed_ring_range",
    "local_epsilon",
    "privatize",
]


@dataclass
class DPState:
    """Server-side DP state: the noise generator (None: secure noise, see :mod:`~deltaplane.aggregation.noise`)
    and rounds released so far."""

    generator: torch.Generator | None = field(default_factory=lambda: torch.Generator().manual_seed(0))
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
            DP-FedAvg's fixed denominator, so the number of participants is not released unnoised. Required
            when ``noise_multiplier > 0``; without noise the actual count is used when None.
        accountant: a :class:`PrivacyAccountant`; each round spends from it *before* releasing the aggregate.
        seed: seed of the noise generator, for reproducible simulations only: anyone who knows it can subtract
            the noise. ``None`` (what real deployments use) draws the noise from the OS CSPRNG
            (:func:`~deltaplane.aggregation.noise.secure_randn`), which nobody can reproduce.
        like: the layout (names, shapes, dtypes) of the updates, so that a round no client took part in still
            releases its noise (Poisson sampling makes such rounds); learned from the first update when None.

    Measurements: ``noise_std`` (std of the noise on the sum), ``noise_multiplier_sum`` (``z_Δ``), ``clip``
    and, with an accountant, ``epsilon`` and ``delta``; with an adaptive clip, ``clipped_fraction`` as released
    (``1 − b̄``, noised). With noise, the inner aggregators' exact statistics (client count, mean norm, exact
    clipped fraction) are *not* passed on: they are functions of the private updates. Without noise
    (``noise_multiplier=0``) every inner measurement is passed on.

    Example:
        >>> import torch, deltaplane as dp
        >>> agg = dp.DPFedAvg(dp.Clip(dp.FedAvg(), clip=1.0), noise_multiplier=0.0)
        >>> agg.add(dp.Delta({"w": torch.tensor([3.0, 4.0])}))
        >>> agg.result()["w"].tolist()
        [0.6000000238418579, 0.800000011920929]
    """

    #: the adjacency its ε is stated under (see :data:`ADD_REMOVE`)
    adjacency = ADD_REMOVE

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        clip: float | str | ClipEstimator | None = None,
        noise_multiplier: float,
        expected_clients: int | None = None,
        accountant: PrivacyAccountant | None = None,
        seed: int | None = 0,
        like: StateDict | None = None,
    ) -> None:
        if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)) or (
            noise_multiplier < 0
        ):
            raise ConfigError(f"noise_multiplier must be non-negative. Found {noise_multiplier!r}")
        if expected_clients is not None and expected_clients < 1:
            raise ConfigError(f"expected_clients must be at least 1. Found {expected_clients!r}")
        if expected_clients is None and noise_multiplier > 0:
            raise ConfigError(
                "DPFedAvg with noise needs expected_clients (q·N): dividing by the actual number of clients "
                "would release that number without noise"
            )
        if isinstance(inner, Clip):
            if clip is not None:
                raise ConfigError("clip was given twice: pass clip= or wrap a Clip, not both")
            clipper = inner
        else:
            if clip is None:
                raise ConfigError(
                    "DPFedAvg needs a clip norm: pass clip=1.0 or clip='adaptive', or wrap a Clip"
                )
            if clip == "adaptive":  # (under noise expected_clients is set: checked above)
                clip = QuantileClip(
                    expected_clients=expected_clients,
                    # Andrew et al. suggest m/20; at least z so that the sum keeps most of the budget
                    count_noise_std=(
                        max(expected_clients / 20, noise_multiplier) if expected_clients else 0.0
                    ),
                    seed=None if seed is None else seed + 1,
                )
            clipper = Clip(inner, clip=clip)
        super().__init__(clipper)
        _check_private_chain(clipper.inner)
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.accountant = accountant
        self.seed = seed
        self.like = like
        self.clipper = clipper
        self.state = DPState(generator=None if seed is None else torch.Generator().manual_seed(seed))
        self._layout: dict[str, torch.Tensor] | None = None if like is None else _layout(like)
        self._count = 0
        self.sum_noise_multiplier = self._split_noise()

    def _split_noise(self) -> float:
        """``z_Δ``: the part of ``z`` left for the sum once the adaptive-clip count has taken its share."""
        z = self.noise_multiplier
        est = self.clipper.estimator
        sigma_b = getattr(est, "count_noise_std", 0.0) if est.adaptive else 0.0
        if est.adaptive and z > 0 and getattr(est, "expected_clients", None) is None:
            raise ConfigError(
                "an adaptive clip under DP needs its expected_clients set: the unclipped fraction divides the "
                "noisy count by it, and dividing by the actual number of clients would release that number"
            )
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

    def set_layout(self, like: StateDict) -> None:
        """Declare the updates' names, shapes and dtypes, so that a round with no client releases noise too."""
        self.like = like
        self._layout = _layout(like)

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        _refuse_non_float(delta, "DP-FedAvg")
        if self._layout is not None:
            check_compatible(self._layout, delta, "DP-FedAvg layout and client delta")
        # equal weights: sensitivity of the sum to one client is exactly the clip norm
        self.inner.add(delta, 1.0)
        if self._layout is None:
            self._layout = _layout(delta)
        self._count += 1

    @property
    def measurements(self) -> dict[str, float]:
        """The last round's measurements; with noise, only values the mechanism released (see the class)."""
        inner = getattr(self.inner, "measurements", {})
        if self.noise_multiplier > 0:
            inner = {"clip": inner["clip"]} if "clip" in inner else {}
        return {**inner, **self._own}

    def _finish(self) -> Delta:
        if self._count == 0 and (self._layout is None or self.expected_clients is None):
            raise TooFewUpdates("no client delta was added; nothing to aggregate")
        acc = self.accountant
        epsilon = acc.spend() if acc is not None else None  # raises before release
        est = self.clipper.estimator
        c = est.value  # the clip of *this* round, read before the estimator adapts
        if self._count:
            mean = self.inner.result()  # the Clip adapts its estimator here
        else:  # nobody sampled: the sum is zero, and both noises are still released
            est.update(0, 0)
            mean = _zeros(self._layout)
        std = self.sum_noise_multiplier * c
        denom = float(self.expected_clients or self._count)
        g = self.state.generator

        def noised(t: torch.Tensor) -> torch.Tensor:
            total = t.double() * self._count
            if std > 0:
                total += std * gaussian(t.shape, g)
            return (total / denom).to(t.dtype)

        out = mean.map(lambda _, t: noised(t))
        self.state.rounds += 1
        self._own = {"clip": c, "noise_std": std, "noise_multiplier_sum": self.sum_noise_multiplier}
        released = getattr(getattr(est, "state", None), "released_fraction", None)
        if est.adaptive and released is not None and self.noise_multiplier > 0:
            self._own["clipped_fraction"] = min(1.0, max(0.0, 1.0 - released))
        if acc is not None and epsilon is not None:
            self._own |= {"epsilon": epsilon, "delta": acc.delta}
        return out

    def reset(self) -> None:
        super().reset()
        self._count = 0

    def __repr__(self) -> str:
        return (
            f"DPFedAvg({self.inner!r}, noise_multiplier={self.noise_multiplier!r}, "
            f"expected_clients={self.expected_clients!r})"
        )


def distributed_noise(delta: Delta, *, clip: float, std: float, generator: torch.Generator | None) -> Delta:
    """A device's share of distributed DP (before SecAgg encodes it into the ring): ``delta`` clipped to L2
    norm ``clip`` (the sum's sensitivity) plus N(0, std²) on every value.

    The clip is applied to what is actually summed (the codec's output, error feedback included), so the
    sensitivity is ``clip`` whatever the codec did. ``generator`` None draws from the OS CSPRNG (a real
    device: the server must not be able to subtract the noise); a seeded one is for simulations only."""
    _refuse_non_float(delta, "distributed DP")
    delta.check_finite()
    norm = delta.norm()
    scaled = delta * (clip / norm) if norm > clip else delta
    return scaled.map(lambda _, t: (t.double() + std * gaussian(t.shape, generator)).to(t.dtype))


class DistributedDP(DPFedAvg):
    """The server side of distributed DP under secure aggregation (Kairouz, Liu & Steinke 2021's setting,
    https://arxiv.org/abs/2102.06387, with
    continuous Gaussian noise): each device clipped its update to ``clip`` and added N(0, σ_d²),
    σ_d = z·C/√m_min (:func:`distributed_noise`), before SecAgg masked it; the server receives only the
    unmasked, *unweighted* mean of ``n`` contributors (:meth:`expect_sum` then :meth:`add`) and adds no noise.

    A sum of ``n ≥ min_contributors`` carries noise of std √n·σ_d ≥ z·C, at least central DP-FedAvg's, so the
    release is published as DP-FedAvg's: the noisy sum over the fixed ``expected_clients``, after the same
    accountant (Poisson rate q, z, δ, budget) has spent the round. A sum of fewer contributors carries less
    than z·C: it is **not published** (the round's update is zero and ``secure_sum_published`` is 0); the round
    still spends ε, so the *schedule* never depends on how many devices contributed. A round without any
    contributor publishes nothing either (its devices added no noise; the server adds none).

    ε is stated under **zero-out** adjacency (:data:`ZERO_OUT`, :attr:`adjacency`), not add/remove: the
    contributor count, and with it the noise in the sum (n·σ_d²), does depend on whether a device took part,
    so removing one changes the noise as well as the signal (at n = min_contributors it even flips publish /
    not publish); replacing its data by none leaves its noise share in the sum, which is what the Gaussian
    accounting of multiplier z covers.

    **Sampling.** Devices are Poisson-sampled at rate q (:func:`~deltaplane.aggregation.sampling.sample_round`),
    but amplification by *hidden* sampling (dp-accounting's ``PoissonSampledDpEvent``, the same curve for
    add/remove and for its zero-record relation ``REPLACE_SPECIAL``) does not hold: it assumes the noise on the
    sum does not depend on who was sampled, and here each sampled device brings its own noise share, so the
    noise variance reveals the count n. Measured (``tests/aggregation/test_dp_adjacency.py``, N 100, q 0.1,
    z 1, m_min 10, δ 1e-5, one round): the amplified ε 2.133 (RDP) would hold only with δ ≥ 1.56e-5 for
    zero-out neighbours, and PLD's 1.685 only with δ ≥ 7.0e-5. Nor does hidden sampling at rate n/N hold once
    n is known: given n the sampled set is a uniform n-subset, so a device that is in displaces one that would
    have been (the other devices all send v, the device −v: its presence moves the sum by 2v, its zero-out
    neighbour's by v), and that pair spends more than the Poisson-sampled Gaussian of rate n/N (the test shows
    it).

    What does hold is **revealed sampling**: give the adversary the whole sampled set S (it can only gain:
    ε of (S, Y) ≥ ε of Y; the server knows S anyway). Under zero-out adjacency S has the same law in both
    worlds (participation does not depend on the data), so the pair of output laws is a mixture with an
    observed index S. For S without the device, or with fewer than m_min contributors (nothing published),
    the output's law is the same in both worlds; for S with the device and |S| = n ≥ m_min the output is the
    others' sum plus the device's clipped update (or zero) plus N(0, n·σ_d²·I): a Gaussian mechanism of
    sensitivity C and multiplier √(n/m_min)·z ≥ z. So for every ε ≥ 0 and in both orders,
    δ(ε) = Σ_S P(S)·δ_S(ε) ≤ P(device in S)·δ_Gauss,z(ε) ≤ q·δ_Gauss,z(ε): each round is dominated by the pair
    "with probability q, known to the adversary, a Gaussian of multiplier z, else nothing", whose Rényi
    divergence is exp((α−1)·D_α) = (1 − q) + q·exp((α−1)·α/(2z²)) and whose privacy loss distribution is the
    q-mixture of the Gaussian's and the identity's. Dominating pairs and RDP compose over adaptively chosen
    rounds (Zhu, Dong & Wang 2022, https://arxiv.org/abs/2106.08567, Thm. 10; Mironov 2017), and each round's
    bound holds given any history, since each round's sample is fresh. The accountant composes exactly that
    (:class:`~deltaplane.aggregation.accounting.PrivacyAccountant` with ``revealed_sampling=True``): at N 100,
    q 0.1, z 1, δ 1e-5, one round costs 4.176 (RDP) / 3.804 (PLD) instead of q = 1's 4.729 / 4.377, and 100
    rounds 25.4 / 22.9 instead of 96.1. It amplifies δ, not ε: every round still risks a full Gaussian.

    The bound needs only that a device contributes to a round with probability at most q, independently of
    its data and of earlier rounds, and that a published sum carries noise of multiplier at least z; it does
    not use the law of n, so devices that drop out, or a server that declares others dropped, cannot push it
    up. (Using that law, z_n = √(n/m_min)·z and the unpublished n < m_min, would be tighter — 3.80 / 3.41
    after one round at the figures above — but would hold only while n follows Binomial(N, q), which dropouts
    change.) It does need the sampling itself to be honest: a server that samples a device more often than q
    spends more than it reports. Drivers that do not sample (the HTTP service's real devices, the fleet
    coordinator) refuse ``dp_noise`` with ``sample_fraction < 1`` and account at q = 1. An accountant with
    hidden sampling below rate 1 (``revealed_sampling=False``) is refused with
    :class:`~deltaplane.errors.ConfigError`.

    Measurements: ``clip``, ``noise_std`` (z·C, the least noise std on a published sum), ``device_noise_std``
    (σ_d), ``noise_multiplier_sum`` (z), ``secure_sum_published`` (1 or 0), ``epsilon``/``delta`` (the
    accountant's, revealed sampling at q) and ``epsilon_vs_server`` (the same figure, kept for the records that
    name it: revealed sampling already gives the adversary who took part, as the server knows).
    """

    #: the adjacency its ε is stated under (see :data:`ZERO_OUT`)
    adjacency = ZERO_OUT

    def __init__(
        self,
        *,
        clip: float,
        noise_multiplier: float,
        expected_clients: int,
        min_contributors: int,
        accountant: PrivacyAccountant | None = None,
        like: StateDict | None = None,
    ) -> None:
        if isinstance(min_contributors, bool) or not (
            isinstance(min_contributors, int) and min_contributors >= 1
        ):
            raise ConfigError(f"min_contributors must be a positive integer. Found {min_contributors!r}")
        if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
            raise ConfigError(f"distributed DP needs a positive numeric clip. Found {clip!r}")
        super().__init__(
            Clip(FedAvg(), clip=float(clip)),
            noise_multiplier=noise_multiplier,
            expected_clients=expected_clients,
            accountant=accountant,
            seed=None,  # the server draws no noise
            like=like,
        )
        if accountant is not None and accountant.sampling_rate < 1.0 and not accountant.revealed_sampling:
            raise ConfigError(
                f"distributed DP cannot claim amplification by hidden sampling (accountant sampling_rate "
                f"{accountant.sampling_rate:g}): each sampled device adds its own noise share, so the sum's noise "
                "reveals how many took part; give its accountant revealed_sampling=True (what build_aggregator "
                "does) or sampling_rate=1.0"
            )
        self.min_contributors = min_contributors
        self.device_noise_std = distributed_noise_std(noise_multiplier, float(clip), min_contributors)
        #: the least SecAgg ring range whose clip does not bind on the devices' noised values
        self.min_ring_range = distributed_ring_range(float(clip), self.device_noise_std)
        self._contributors = 0
        self._mean: Delta | None = None

    def check_ring_range(self, clip_range: float) -> None:
        """Refuse (ConfigError) a SecAgg ring range below :attr:`min_ring_range`: its per-device clip would
        bind on the noised values, which the accounting does not cover (every driver's server checks it)."""
        if clip_range < self.min_ring_range:
            raise ConfigError(
                f"a SecAgg ring range (clip_range / secagg_range) of {clip_range:g} would clip the devices' "
                f"noised values under distributed DP (σ_d = {self.device_noise_std:.4g}); the per-device clip is "
                f"not post-processing of the noised sum: use a range of at least clip + 6·σ_d = "
                f"{self.min_ring_range:g}"
            )

    def expect_sum(self, contributors: int) -> None:
        """Say how many devices' noised updates the next :meth:`add` (the unmasked mean) sums."""
        self._contributors = int(contributors)

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        """The round's unmasked unweighted mean (``weight`` is ignored: every device weighs 1, as in DP-FedAvg)."""
        if self._mean is not None:
            raise InvalidUpdate("distributed DP takes one secure sum per round, not individual updates")
        _refuse_non_float(delta, "distributed DP")
        if self._layout is not None:
            check_compatible(self._layout, delta, "distributed DP layout and the secure sum")
        else:
            self._layout = _layout(delta)
        self._mean = delta
        self._count = self._contributors

    def _finish(self) -> Delta:
        if self._mean is None and self._layout is None:
            raise TooFewUpdates("no secure sum was added; nothing to aggregate")
        acc = self.accountant
        epsilon = acc.spend() if acc is not None else None  # raises before release
        mean = self._mean
        n = self._contributors if mean is not None else 0
        published = n >= self.min_contributors
        assert self.expected_clients is not None  # a required argument of DistributedDP
        denom = float(self.expected_clients)  # fixed, as DP-FedAvg's (set: noise > 0)
        if mean is not None and published:
            out = mean.map(lambda _, t: (t.double() * n / denom).to(t.dtype))
        else:  # too little noise in this sum (or none): publish nothing of it
            out = _zeros(self._layout if self._layout is not None else mean)
        self.state.rounds += 1
        c = float(self.clipper.estimator.value)
        self._own = {
            "clip": c,
            "noise_std": self.noise_multiplier * c,
            "device_noise_std": self.device_noise_std,
            "noise_multiplier_sum": self.noise_multiplier,
            "secure_sum_published": 1.0 if published else 0.0,
        }
        if acc is not None and epsilon is not None:
            self._own |= {
                "epsilon": epsilon,
                "delta": acc.delta,
                # revealed sampling already hands the adversary the sampled set, as the server knows it
                "epsilon_vs_server": epsilon,
            }
        return out

    def reset(self) -> None:
        super().reset()
        self._mean = None
        self._contributors = 0

    def __repr__(self) -> str:
        return (
            f"DistributedDP(clip={self.clipper.estimator.value!r}, noise_multiplier={self.noise_multiplier!r}, "
            f"expected_clients={self.expected_clients!r}, min_contributors={self.min_contributors!r})"
        )


def privatize(
    delta: Delta, *, clip: float, noise_multiplier: float, generator: torch.Generator | None
) -> Delta:
    """Local DP on the device: clip ``delta`` to L2 norm ``clip`` and add N(0, (z·clip)²) to every value.

    ``generator`` None draws the noise from the OS CSPRNG (what a real device does: the server must not be able
    to reproduce it); a seeded generator is for reproducible simulations only.

    Any two clipped updates differ by at most ``2·clip``, so each release is a Gaussian mechanism with
    multiplier ``z / 2`` against an arbitrary change of the device's data; see :func:`local_epsilon`.
    """
    if not clip > 0:
        raise ConfigError(f"clip must be positive. Found {clip!r}")
    if not noise_multiplier >= 0:
        raise ConfigError(f"noise_multiplier must be non-negative. Found {noise_multiplier!r}")
    _refuse_non_float(delta, "local DP")
    delta.check_finite()
    norm = delta.norm()
    scaled = delta * (clip / norm) if norm > clip else delta
    std = noise_multiplier * clip

    def noised(t: torch.Tensor) -> torch.Tensor:
        return (t.double() + std * gaussian(t.shape, generator)).to(t.dtype)

    return scaled.map(lambda _, t: noised(t))


def gaussian(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """float64 N(0, 1) noise of ``shape``: from ``generator`` when seeded, else from the OS CSPRNG."""
    if generator is None:
        return secure_randn(shape)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def local_epsilon(*, noise_multiplier: float, rounds: int, delta: float, method: str = "rdp") -> float:
    """ε of a device that released ``rounds`` updates through :func:`privatize` (replace-one adjacency)."""
    return epsilon_for(
        noise_multiplier=noise_multiplier / 2, sampling_rate=1.0, steps=rounds, delta=delta, method=method
    )


def _refuse_non_float(delta: Delta, mechanism: str) -> None:
    """Raise :class:`NotPrivatizable` for the first tensor that clipping and Gaussian noise cannot cover."""
    for name, t in delta.items():
        if not t.is_floating_point():
            raise NotPrivatizable(
                f"tensor '{name}' is {t.dtype}: {mechanism} clips and noises floating-point tensors only and will "
                "not release it exactly; leave non-float tensors (step counters, masks) out of updates"
            )


def _zeros(layout: StateDict | Delta | None) -> Delta:
    """A zero delta of ``layout``'s shapes and dtypes: the sum an aggregate of no (published) update releases.

    Raises:
        TooFewUpdates: no layout to take them from (no update was added and none was announced); ``_finish``
            refuses that case first, so this says the same.
    """
    if layout is None:
        raise TooFewUpdates("no client delta was added; nothing to aggregate")
    return Delta({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in layout.items()})


def _layout(like: StateDict) -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes of ``like`` as storage-free meta tensors."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in like.items()}


def _check_private_chain(node: object) -> None:
    """Refuse, under :class:`DPFedAvg`, anything that would break "the sum of clipped updates, sensitivity C".

    Allowed below the DP clip: fixed norm bounds (:class:`Clip` / ``NormBound`` with a constant bound) and, at
    the bottom, ``FedAvg``. Not :class:`~deltaplane.aggregation.validation.Validate`: it skips a bad update without
    raising, so the clients counted here and those summed below would differ (validate outside, as the factory
    does)."""
    while True:
        if isinstance(node, FedAvg):
            return
        if isinstance(node, Clip) and node.estimator.adaptive:
            raise ConfigError(
                f"{type(node).__name__} with an adaptive bound inside DPFedAvg would adapt from an un-noised "
                "count of the clients' norms (nothing accounts for it); under DP use a fixed bound "
                "(e.g. norm_bound:5) and let the DP clip adapt (clip='adaptive'), whose count is noised and "
                "accounted"
            )
        if not isinstance(node, Clip):
            raise ConfigError(
                f"{type(node).__name__} cannot sit inside DPFedAvg: the noise is calibrated to a uniform sum of "
                "clipped updates; only fixed norm bounds and FedAvg may be wrapped (put Validate and server "
                "optimizers outside DPFedAvg)"
            )
        node = node.inner
