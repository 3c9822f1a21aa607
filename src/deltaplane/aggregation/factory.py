"""Build an aggregator chain from plain options (CLI flags, YAML fields): one place that knows the legal orders.

Inside-out, a round's updates go through: the **defence** (the combination rule: mean, trimmed mean, median,
Krum, FLTrust; or a norm bound in front of the mean) → **clipping** → **DP noise** → the **server optimizer** →
and, outermost, **validation** of every incoming update. So ``build_aggregator(aggregator="fedadam",
dp_noise=1.0, clip="adaptive", defense="norm_bound:5")`` is
``Validate(FedAdam(DPFedAvg(Clip(NormBound(FedAvg())))))``; with ``aggregator="fedavg"`` the server
optimizer is plain server SGD at ``server_lr`` (:class:`~deltaplane.aggregation.ServerSGD`, omitted at 1).
"""

from __future__ import annotations

from deltaplane.aggregation.accounting import PrivacyAccountant
from deltaplane.aggregation.base import Aggregator
from deltaplane.aggregation.clipping import Clip, NormBound, QuantileClip
from deltaplane.aggregation.dp import DPFedAvg
from deltaplane.aggregation.fedavg import FedAvg
from deltaplane.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerSGD
from deltaplane.aggregation.robust import CoordinateMedian, FLTrust, Krum, TrimmedMean
from deltaplane.aggregation.validation import Validate
from deltaplane.errors import ConfigError

__all__ = ["DEFENSES", "SERVER_OPTIMIZERS", "build_aggregator", "parse_defense"]

SERVER_OPTIMIZERS = {
    "fedavg": None,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
}
DEFENSES = ("none", "trimmed_mean", "median", "krum", "multi_krum", "norm_bound", "fltrust")


def parse_defense(spec: str | None) -> Aggregator:
    """``"trimmed_mean:0.2"``, ``"median"``, ``"krum:2"`` (f), ``"multi_krum:2"``, ``"norm_bound:5.0"`` (or ``"norm_bound:adaptive"``: the median norm),
    ``"fltrust"`` or ``"none"`` → the innermost aggregator."""
    if spec is None or spec == "none":
        return FedAvg()
    name, _, arg = spec.partition(":")
    name = name.strip()
    if name not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r}; choose one of {list(DEFENSES)}")
    try:
        if name == "trimmed_mean":
            return TrimmedMean(beta=float(arg) if arg else 0.1)
        if name == "median":
            return CoordinateMedian()
        if name in ("krum", "multi_krum"):
            return Krum(byzantine=int(arg) if arg else 1, select=1 if name == "krum" else None)
        if name == "norm_bound":
            return NormBound(
                FedAvg(), max_norm="adaptive" if arg == "adaptive" else float(arg) if arg else 1.0
            )
        return FLTrust()
    except ValueError:
        raise ConfigError(f"defense {spec!r}: the parameter after ':' must be a number") from None


def build_aggregator(
    *,
    aggregator: str = "fedavg",
    lr: float | None = None,
    server_lr: float = 1.0,
    defense: str | None = None,
    clip: float | str | None = None,
    dp_noise: float = 0.0,
    expected_clients: int | None = None,
    sampling_rate: float = 1.0,
    dp_delta: float = 1e-5,
    epsilon_budget: float | None = None,
    accountant: str = "rdp",
    max_norm: float | None = None,
    expected_version: str | int | None = None,
    seed: int = 0,
) -> Validate:
    """The composed chain for these options (see the module docstring for the order).

    Args:
        aggregator: server optimizer: ``fedavg``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedavgm``.
        lr: server optimizer learning rate (its default when None); ``fedavg`` has none, use ``server_lr``.
        server_lr: FedAvg's server step ``η`` (plain server SGD, :class:`ServerSGD`); the adaptive optimizers
            take their step from ``lr`` instead, so ``server_lr`` other than 1 with them is refused.
        defense: robust combination rule spec (:func:`parse_defense`).
        clip: per-client clip norm (float or ``"adaptive"``); required when ``dp_noise > 0``.
        dp_noise: DP noise multiplier ``z`` (0: no DP).
        expected_clients: clients per round (DP-FedAvg's fixed denominator; sizes adaptive-clip count noise).
        sampling_rate: probability that a client is in a round (for the accountant).
        dp_delta: δ at which ε is reported.
        epsilon_budget: stop with :class:`~deltaplane.errors.PrivacyBudgetExceeded` before exceeding it.
        accountant: ``"rdp"`` or ``"pld"``.
        max_norm: validation bound on incoming update norms (reject above it).
        expected_version: base model version that updates must declare.
        seed: seeds DP noise and adaptive-clip count noise.
    """
    if aggregator not in SERVER_OPTIMIZERS:
        raise ConfigError(f"unknown aggregator {aggregator!r}; choose one of {list(SERVER_OPTIMIZERS)}")
    if dp_noise < 0:
        raise ConfigError(f"dp_noise must be non-negative. Found {dp_noise!r}")
    inner = parse_defense(defense)
    if dp_noise > 0 and (getattr(inner, "streaming", True) is False or isinstance(inner, FLTrust)):
        raise ConfigError(
            f"defense {defense!r} cannot be combined with DP noise: DP-FedAvg calibrates noise to a clipped *sum*; "
            "use defense='norm_bound:…' (or none) with --dp-noise"
        )
    node: Aggregator = inner
    if dp_noise > 0:
        if clip is None:
            raise ConfigError("DP noise needs a clip norm: set clip to a number or 'adaptive'")
        if clip == "adaptive":
            if expected_clients is None:
                raise ConfigError("clip='adaptive' with DP needs expected_clients")
            # Andrew et al. suggest σ_b = m/20; at least z, so the sum keeps ≥ 3/4 of the noise budget
            sigma_b = max(expected_clients / 20, dp_noise)
            est = QuantileClip(expected_clients=expected_clients, count_noise_std=sigma_b, seed=seed + 1)
            node = Clip(node, clip=est)
        else:
            node = Clip(node, clip=clip)
        acc = PrivacyAccountant(
            noise_multiplier=dp_noise,
            sampling_rate=sampling_rate,
            delta=dp_delta,
            method=accountant,
            budget=epsilon_budget,
        )
        node = DPFedAvg(
            node, noise_multiplier=dp_noise, expected_clients=expected_clients, accountant=acc, seed=seed
        )
    elif clip is not None:
        node = Clip(
            node, clip=QuantileClip(expected_clients=expected_clients) if clip == "adaptive" else clip
        )
    elif epsilon_budget is not None:
        raise ConfigError("epsilon_budget needs DP noise (dp_noise > 0)")
    opt = SERVER_OPTIMIZERS[aggregator]
    if opt is not None:
        if server_lr != 1.0:
            raise ConfigError(
                f"server_lr={server_lr:g} is FedAvg's server step; {aggregator} takes its step from "
                "server_opt_lr (lr) instead: drop server_lr or use aggregator 'fedavg'"
            )
        node = opt(node) if lr is None else opt(node, lr=lr)
    elif lr is not None:
        raise ConfigError("fedavg has no server optimizer lr; its server step is server_lr")
    elif server_lr != 1.0:
        node = ServerSGD(node, lr=server_lr)
    return Validate(node, expected_version=expected_version, max_norm=max_norm)
