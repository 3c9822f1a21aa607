"""Privacy accounting for DP-FedAvg with Google's ``dp-accounting`` package (RDP and PLD accountants).

Each round of DP-FedAvg is a Poisson-subsampled Gaussian mechanism: every client joins with probability ``q``
(the sampling rate) and the clipped sum gets Gaussian noise of std ``z·C`` (``z`` the noise multiplier). The
accountant composes ``steps`` such rounds and converts the result to ε at the chosen δ, either with Rényi DP
(Mironov 2017, https://arxiv.org/abs/1702.07476; the conservative standard) or with privacy loss distributions
(Koskela et al. 2020 / Doroshenko et al. 2022, https://arxiv.org/abs/2207.04380; tighter). We call the library
rather than re-deriving the bounds: subtle mistakes in accounting silently void the guarantee.

Distributed DP samples too, but its devices' noise shares reveal who took part, so its rounds are accounted with
*revealed* sampling (``revealed_sampling=True``): with probability ``q`` one Gaussian mechanism of multiplier
``z`` that the adversary knows it faces, otherwise nothing (:func:`revealed_sampling_rdp`; the argument is in
:class:`~deltaplane.aggregation.dp.DistributedDP`). The Gaussian's own curves still come from dp-accounting;
only the mixture with an observed index, whose formula is one line, is written here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from deltaplane.errors import ConfigError, PrivacyBudgetExceeded

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ADD_REMOVE",
    "REPLACE_ONE",
    "ZERO_OUT",
    "PrivacyAccountant",
    "PrivacyAccountantState",
    "dp_event",
    "epsilon_for",
    "noise_for_epsilon",
    "revealed_sampling_rdp",
]

#: The neighbouring datasets each mechanism's ε is stated against, recorded beside ε wherever it is shown or
#: stored (``dp_adjacency``): an ε means nothing without the adjacency it was computed for.
#: Central DP-FedAvg (:class:`~deltaplane.aggregation.dp.DPFedAvg`): one client, with all of its data, added or removed.
ADD_REMOVE = "add/remove"
#: Distributed DP (:class:`~deltaplane.aggregation.dp.DistributedDP`): one device's data replaced by none; the device still takes part, so
#: its update is zero and its noise share stays in the sum. The relation (a record replaced by a special
#: "zero" record) is Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private (Deep)
#: Learning without Sampling or Shuffling", https://arxiv.org/abs/2103.00039, Definition 1.1, as dp-accounting
#: cites it for ``NeighboringRelation.REPLACE_SPECIAL``; keeping the noise share is deltaplane's reading of
#: it for device-added noise, not the paper's (a central-DP paper). Add/remove cannot hold there: removing a device also removes
#: its noise share (variance n·σ_d² against (n−1)·σ_d²), and at n = m_min it flips publish / not publish.
ZERO_OUT = "zero-out"
#: Local DP (:func:`~deltaplane.aggregation.dp.privatize`): one device's data changed arbitrarily (two clipped updates differ by ≤ 2·clip).
REPLACE_ONE = "replace-one"

METHODS = ("rdp", "pld")
#: most rounds the PLD accountant composes: its distribution's support, and so its memory, grows with the
#: rounds (measured: 0.38 GB at 10 million, 3.3 GB at a billion, 226 GB asked for at 10**12). RDP composes
#: any number of rounds in constant memory.
PLD_MAX_STEPS = 10_000_000
#: largest epsilon (by RDP, an upper bound of PLD's) for which the PLD accountant runs: its memory grows with
#: the privacy loss it has to represent (measured: 0.38 GB at RDP epsilon 1.1e3, 0.9 GB at 1.4e5, 24 GB at
#: 1.4e7, 299 GB asked for at 2.2e7), and a guarantee that weak is vacuous whichever accountant states it.
PLD_MAX_EPSILON = 10_000.0
#: the PLD accountant's discretization of the privacy loss (dp-accounting's pessimistic rounding: an upper bound)
PLD_DISCRETIZATION = 1e-3


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:  # a dp_accounting.DpEvent
    """The ``dp_accounting`` event of ``steps`` rounds of the (Poisson-subsampled) Gaussian mechanism."""
    import dp_accounting

    one = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        one = dp_accounting.PoissonSampledDpEvent(sampling_rate, one)
    return dp_accounting.SelfComposedDpEvent(one, steps)


def revealed_sampling_rdp(noise_multiplier: float, sampling_rate: float, orders: np.ndarray) -> np.ndarray:
    """The Rényi DP curve, at ``orders``, of one round of *revealed* Poisson sampling: with probability ``q`` the
    adversary sees a Gaussian mechanism of multiplier ``z`` (sensitivity 1) and knows it does, otherwise an
    output that does not depend on the client.

    Both worlds pick the same branch with the same probability, so the Rényi divergence of the pair with its
    observed branch is ``exp((α−1)·D_α) = (1 − q) + q·exp((α−1)·α/(2z²))`` (the Gaussian's D_α is α/(2z²) in
    either order, so this bounds both orders). Computed in log space: at large orders the exponent overflows
    a float long before the curve stops mattering."""
    import numpy as np
    from scipy.special import logsumexp

    a = np.asarray(orders, dtype=float)
    gauss = a / (2.0 * noise_multiplier**2)
    if sampling_rate >= 1.0:
        return gauss
    terms = np.stack([np.full_like(a, math.log1p(-sampling_rate)), math.log(sampling_rate) + (a - 1) * gauss])
    return np.asarray(logsumexp(terms, axis=0) / (a - 1), dtype=float)


def _revealed_pld(noise_multiplier: float, sampling_rate: float) -> Any:  # a dp_accounting PLD
    """The privacy loss distribution of one round of revealed sampling: dp-accounting's Gaussian PLD mixed, with
    weight ``q``, with the identity's (a mixture with an observed index is the mixture of the PLDs)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    gauss = pld.from_gaussian_mechanism(noise_multiplier, value_discretization_interval=PLD_DISCRETIZATION)
    if sampling_rate >= 1.0:
        return gauss
    return gauss.compute_mixture(pld.identity(PLD_DISCRETIZATION), sampling_rate)


def _check_schedule(*, sampling_rate: float, steps: int, delta: float, method: str) -> None:
    """Refuse a schedule dp-accounting would reject untyped or, worse, silently compute something for."""
    if not (isinstance(sampling_rate, int | float) and 0.0 < sampling_rate <= 1.0):
        raise ConfigError(f"sampling_rate must be in (0, 1]. Found {sampling_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ConfigError(f"steps (rounds) must be a non-negative integer. Found {steps!r}")
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ConfigError(f"delta must be in (0, 1). Found {delta!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}. Found {method!r}")
    if method == "pld" and steps > PLD_MAX_STEPS:
        raise ConfigError(
            f"the PLD accountant's memory grows with the rounds: at most {PLD_MAX_STEPS:,} rounds. Found "
            f"{steps:,}; use method 'rdp' (--method rdp), which composes any number of rounds"
        )


def epsilon_for(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    method: str = "rdp",
    revealed_sampling: bool = False,
) -> float:
    """ε after ``steps`` rounds at ``delta`` (0.0 for zero steps, ``inf`` for zero noise).

    The mechanism is DP-FedAvg's round as run: clients Poisson-sampled at rate ``sampling_rate``
    (:func:`~deltaplane.aggregation.sampling.sample_round`), one Gaussian mechanism of multiplier
    ``noise_multiplier`` per round (with an adaptive clip its noisy count shares that multiplier), adjacency
    adding or removing one client. ``revealed_sampling``: the adversary learns whether the client was sampled
    (distributed DP, whose devices' noise shares make the contributor count part of the mechanism; zero-out
    neighbours, :data:`ZERO_OUT`): each round is then, with probability ``sampling_rate``, one Gaussian it
    knows it faces (:func:`revealed_sampling_rdp`), which amplifies δ but not ε as hidden sampling does. At
    rate 1 both are the plain Gaussian."""
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)) or (
        noise_multiplier < 0
    ):
        raise ConfigError(f"noise_multiplier must be non-negative. Found {noise_multiplier!r}")
    _check_schedule(sampling_rate=sampling_rate, steps=steps, delta=delta, method=method)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    revealed = revealed_sampling and sampling_rate < 1.0  # at q = 1 both are dp-accounting's Gaussian
    try:  # dp-accounting's arithmetic over- or underflows, untyped, at extreme multipliers
        if method == "rdp" and revealed:
            orders, rdp = _revealed_rdp_per_step(noise_multiplier, sampling_rate)
            return float(rdp_privacy_accountant.compute_epsilon(orders, rdp * steps, delta)[0])
        if method == "rdp":
            per_step = _rdp_per_step(noise_multiplier, sampling_rate)
            if per_step is not None:
                orders, rdp = per_step
                return float(rdp_privacy_accountant.compute_epsilon(orders, rdp * steps, delta)[0])
            acc = rdp_privacy_accountant.RdpAccountant()
        else:
            bound = epsilon_for(
                noise_multiplier=noise_multiplier,
                sampling_rate=sampling_rate,
                steps=steps,
                delta=delta,
                revealed_sampling=revealed,
            )
            if bound > PLD_MAX_EPSILON:
                raise ConfigError(
                    f"epsilon is {bound:.4g} by RDP (vacuous), over the {PLD_MAX_EPSILON:g} up to which the PLD "
                    "accountant runs (its memory grows with the privacy loss); use method "
                    "'rdp' (--method rdp), or more noise or fewer rounds"
                )
            if revealed:
                composed = _revealed_pld(noise_multiplier, sampling_rate).self_compose(steps)
                return float(composed.get_epsilon_for_delta(delta))
            acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
        return float(acc.get_epsilon(delta))
    except ConfigError:
        raise
    except (ArithmeticError, ValueError) as exc:  # ZeroDivisionError, OverflowError, int(inf)
        raise ConfigError(
            f"the {method} accountant cannot compute epsilon for noise_multiplier {noise_multiplier!r} "
            f"({type(exc).__name__}: {exc}); a multiplier between 1e-3 and 1e3 covers every useful setting"
        ) from None


def noise_for_epsilon(
    *,
    epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    method: str = "rdp",
    revealed_sampling: bool = False,
) -> float:
    """The smallest noise multiplier whose ε after ``steps`` rounds is at most ``epsilon`` (dp-accounting's
    ``calibrate_dp_mechanism``, Brent's method on the accountant; with ``revealed_sampling`` below rate 1,
    bisection on :func:`epsilon_for`, to the same relative tolerance)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be positive. Found {epsilon!r}")
    _check_schedule(sampling_rate=sampling_rate, steps=steps, delta=delta, method=method)
    if steps == 0:
        raise ConfigError("steps (rounds) must be at least 1 to calibrate a noise multiplier")

    if revealed_sampling and sampling_rate < 1.0:
        return _calibrate_revealed(
            epsilon=epsilon, sampling_rate=sampling_rate, steps=steps, delta=delta, method=method
        )

    def fresh() -> Any:  # a dp_accounting PrivacyAccountant (the package ships no types)
        if method == "rdp":
            return rdp_privacy_accountant.RdpAccountant()
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)

    return float(
        dp_accounting.calibrate_dp_mechanism(
            fresh, lambda z: dp_event(z, sampling_rate, steps), epsilon, delta, tol=1e-4
        )
    )


def _calibrate_revealed(
    *, epsilon: float, sampling_rate: float, steps: int, delta: float, method: str
) -> float:
    """The least z (relative tolerance 1e-4) whose revealed-sampling ε is at most ``epsilon``: ε falls as z
    grows, so bisection between a z that fails and one that holds finds it."""

    def eps(z: float) -> float:
        return epsilon_for(
            noise_multiplier=z,
            sampling_rate=sampling_rate,
            steps=steps,
            delta=delta,
            method=method,
            revealed_sampling=True,
        )

    lo, hi = 1e-3, 1.0
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(
                f"no noise multiplier up to 1e4 keeps epsilon at {epsilon:g} over {steps} rounds at delta "
                f"{delta:g}; ask for a larger epsilon or fewer rounds"
            )
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= epsilon else (mid, hi)
    return hi


@lru_cache(maxsize=64)
def _revealed_rdp_per_step(noise_multiplier: float, sampling_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """dp-accounting's default RDP orders and :func:`revealed_sampling_rdp` at them, computed once per (z, q)."""
    import numpy as np
    from dp_accounting.rdp import rdp_privacy_accountant

    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    return orders, revealed_sampling_rdp(noise_multiplier, sampling_rate, orders)


@lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sampling_rate: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The RDP curve of one round, computed once: RDP composes additively, so ``steps`` rounds cost
    ``steps × rdp`` and ε after every round is one cheap conversion instead of a fresh (slow, for fractional
    orders) RDP computation. Falls back to None if ``dp-accounting`` changes the attributes read here."""
    import numpy as np
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event(noise_multiplier, sampling_rate, 1))
    orders, rdp = getattr(acc, "_orders", None), getattr(acc, "_rdp", None)
    if orders is None or rdp is None:
        return None
    return np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)


@dataclass
class PrivacyAccountantState:
    """How much has been spent: the number of rounds composed so far and the ε they cost."""

    steps: int = 0
    epsilon: float = 0.0


class PrivacyAccountant:
    """Tracks ε across rounds and refuses a round that would exceed ``budget``.

    Args:
        noise_multiplier: ``z``, noise std divided by the clip norm.
        sampling_rate: probability ``q`` that a given client takes part in a round (clients per round / total).
        delta: target δ at which ε is reported (typically below 1 / number of clients).
        method: ``"rdp"`` (Rényi DP) or ``"pld"`` (privacy loss distributions, tighter, slower).
        budget: largest ε allowed; :meth:`spend` raises :class:`PrivacyBudgetExceeded` *before* a round that
            would go over it, so the model released so far stays within budget.
        revealed_sampling: the adversary learns whether the client was sampled (distributed DP under SecAgg:
            see :func:`epsilon_for`); the sampling then amplifies δ only.

    Example:
        >>> acc = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5, budget=0.97)
        >>> round(acc.spend(), 3)
        0.956
        >>> acc.spend()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        deltaplane.errors.PrivacyBudgetExceeded: round 2 would raise epsilon to 0.9767 > budget 0.97 ...
        >>> acc.state.steps
        1
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        method: str = "rdp",
        budget: float | None = None,
        revealed_sampling: bool = False,
    ) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be non-negative. Found {noise_multiplier!r}")
        if not 0.0 < sampling_rate <= 1.0:
            raise ConfigError(f"sampling_rate must be in (0, 1]. Found {sampling_rate!r}")
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1). Found {delta!r}")
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}. Found {method!r}")
        if budget is not None and not budget > 0:
            raise ConfigError(f"budget must be positive. Found {budget!r}")
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.method = method
        self.budget = budget
        self.revealed_sampling = bool(revealed_sampling)
        self.state = PrivacyAccountantState()

    def epsilon_after(self, steps: int) -> float:
        """ε after ``steps`` rounds in total."""
        return epsilon_for(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            steps=steps,
            delta=self.delta,
            method=self.method,
            revealed_sampling=self.revealed_sampling,
        )

    @property
    def epsilon(self) -> float:
        """ε spent so far."""
        return self.state.epsilon

    def remaining_rounds(self, limit: int = 100_000) -> int:
        """How many more rounds fit in the budget, at most ``limit`` (``limit`` when there is no budget).

        Bisection on ε, which grows with the number of rounds: ``lo`` always fits, ``hi`` is the first count
        known not to fit or one past ``limit`` — so when every round up to the limit fits, the answer is the
        limit itself, not one less."""
        if self.budget is None:
            return limit
        lo, hi = self.state.steps, self.state.steps + limit + 1
        if limit == 0 or self.epsilon_after(lo + 1) > self.budget:
            return 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon_after(mid) <= self.budget else (lo, mid)
        return lo - self.state.steps

    def spend(self, steps: int = 1) -> float:
        """Account for ``steps`` more rounds and return the new ε; raise before going over the budget."""
        eps = self.epsilon_after(self.state.steps + steps)
        if self.budget is not None and eps > self.budget:
            raise PrivacyBudgetExceeded(
                f"round {self.state.steps + 1} would raise epsilon to {eps:.4g} > budget {self.budget:.4g} "
                f"(delta={self.delta:g}); stop training, or raise the budget / noise multiplier"
            )
        self.state.steps += steps
        self.state.epsilon = eps
        return eps

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self.noise_multiplier!r}, sampling_rate={self.sampling_rate!r}, "
            f"delta={self.delta!r}, method={self.method!r}, budget={self.budget!r}"
            + (", revealed_sampling=True)" if self.revealed_sampling else ")")
        )
