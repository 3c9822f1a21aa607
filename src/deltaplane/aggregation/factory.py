"""Build an aggregator chain from plain options (CLI flags, YAML fields): one place that knows the legal orders.

Inside-out, a round's updates go through: the **defence** (the combination rule: mean, trimmed mean, median,
Krum, FLTrust; or a norm bound in front of the mean) → **clipping** → **DP noise** → the **server optimizer** →
and, outermost, **validation** of every incoming update. So ``build_aggregator(aggregator="fedadam",
dp_noise=1.0, clip="adaptive", defense="norm_bound:5")`` is
``Validate(FedAdam(DPFedAvg(Clip(NormBound(FedAvg())))))``; with ``aggregator="fedavg"`` the server
optimizer is plain server SGD at ``server_lr`` (:class:`~deltaplane.aggregation.ServerSGD`, omitted at 1).
"""

from __future__ import annotations

from typing import Any

from deltaplane.aggregation.accounting import PrivacyAccountant
from deltaplane.aggregation.base import Aggregator
from deltaplane.aggregation.clipping import Clip, NormBound, QuantileClip
from deltaplane.aggregation.dp import DistributedDP, DPFedAvg
from deltaplane.aggregation.fedavg import FedAvg
from deltaplane.aggregation.fedopt import ServerSGD
from deltaplane.aggregation.robust import (
    DEFAULT_TAU,
    FLAME,
    CenteredClip,
    CoordinateMedian,
    FLTrust,
    FoolsGold,
    GeometricMedian,
    Krum,
    SignVote,
    TrimmedMean,
)
from deltaplane.aggregation.validation import Validate
from deltaplane.choices import AGGREGATORS
from deltaplane.errors import ConfigError, IncompatibleDefense
from deltaplane.specs import parse_one_spec

__all__ = ["DEFENSES", "SERVER_OPTIMIZERS", "build_aggregator", "check_defense_codec", "parse_defense"]

#: name -> server optimizer class (None: FedAvg as server SGD), from :data:`deltaplane.choices.AGGREGATORS`
SERVER_OPTIMIZERS = {name: AGGREGATORS.load(name) for name in AGGREGATORS}
#: defence name → (builder, parameters in positional order with defaults); ``name(param=value)`` specs.
DEFENSE_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "trimmed_mean": ("beta", "bucket"),
    "median": ("byzantine", "bucket"),
    "krum": ("byzantine",),
    "multi_krum": ("byzantine",),
    "geometric_median": ("nu", "max_iter", "ftol", "weighted", "start"),
    "centered_clip": ("tau", "iterations"),
    "norm_bound": ("max_norm", "noise"),
    "fltrust": (),
    "flame": ("noise",),
    "foolsgold": ("confidence", "centred", "binary"),
    "sign_vote": (),
    "trigger_attribution": (
        "threshold",
        "every",
        "steps",
        "lam",
        "unlearn",
        "unlearn_lr",
        "switch",
        "sticky",
        "score",
        "invert",
        "shadow",
        "reputation",
        "norm_cap",
    ),
}
DEFENSES = tuple(DEFENSE_PARAMS)
#: trigger_attribution's named choices: parameter -> the tuple of :mod:`~deltaplane.aggregation.attribution`
#: that lists its legal values (read when a spec names one, so this module does not import the rule)
ATTRIBUTION_CHOICES = {
    "switch": "SWITCHES",
    "score": "SCORES",
    "invert": "INVERSIONS",
    "shadow": "SHADOWS",
    "reputation": "REPUTATIONS",
}


def parse_defense(spec: str | None, *, seed: int = 0) -> Aggregator:
    """A defence spec → the innermost aggregator; every defence ignores client-claimed weights.

    The grammar is the codecs' (:func:`deltaplane.codecs.parse_spec`): ``name(param=value)`` with the first
    parameter also positional, e.g. ``"trimmed_mean(0.2)"``, ``"median"`` (bucketed by 2), ``"median(bucket=1)"`` (the plain median), ``"median(4)"`` (mean around median), ``"multi_krum(byzantine=4)"``,
    ``"geometric_median"`` (RFA; ``geometric_median(weighted=true)``: the paper's example-count weights),
    ``"centered_clip(tau=3, iterations=1)"``, ``"norm_bound(max_norm=2.0, noise=0.001)"`` (``max_norm=adaptive``: the median norm, not with DP noise),
    ``"fltrust"``, ``"flame(noise=0.001)"``, ``"foolsgold"``, ``"sign_vote"`` or ``"none"``. The older
    ``"name:value"`` form (``"trimmed_mean:0.2"``) means ``name(value)``. ``seed`` seeds a defence's noise.
    """
    if spec is None or spec.strip() in ("", "none"):
        return FedAvg()
    text = spec.strip()
    if ":" in text and "(" not in text:
        name, _, arg = text.partition(":")
        text = f"{name.strip()}({arg.strip()})" if arg.strip() else name.strip()
    name, args, kwargs = parse_one_spec(text, label=f"defense spec {spec!r}", noun="rules")
    if name not in DEFENSE_PARAMS:
        raise ConfigError(f"unknown defense {name!r}; choose one of {list(DEFENSES)}")
    names = DEFENSE_PARAMS[name]
    if len(args) > len(names):
        raise ConfigError(f"defense {name!r} takes at most {len(names)} positional parameter(s); got {args}")
    # each value's type is checked per key below (the spec grammar gives numbers, strings and bools)
    params: dict[str, Any] = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            raise ConfigError(f"defense {name!r} has no parameter {key!r}; its parameters: {list(names)}")
        if key in params:
            raise ConfigError(f"defense {name!r}: {key!r} given twice")
        params[key] = value
    for key, value in params.items():
        if key in ("every", "steps", "unlearn", "bucket", "max_iter", "iterations") and not (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            raise ConfigError(f"defense {name!r}: {key} must be an integer. Found {value!r}")
        if key == "start":  # the geometric median's starting point
            if value not in GeometricMedian.STARTS:
                raise ConfigError(
                    f"defense {name!r}: start must be one of {list(GeometricMedian.STARTS)}. Found {value!r}"
                )
            continue
        if key in ATTRIBUTION_CHOICES:  # trigger_attribution's named choices
            from deltaplane.aggregation import attribution

            allowed = getattr(attribution, ATTRIBUTION_CHOICES[key])
            if value not in allowed:
                raise ConfigError(f"defense {name!r}: {key} must be one of {list(allowed)}. Found {value!r}")
            continue
        if key in ("centred", "binary", "sticky", "weighted"):
            if not isinstance(value, bool):
                raise ConfigError(f"defense {name!r}: {key} must be true or false. Found {value!r}")
            continue
        if isinstance(value, bool) or not (
            isinstance(value, int | float) or (key, value) == ("max_norm", "adaptive")
        ):
            raise ConfigError(f"defense {name!r}: {key} must be a number. Found {value!r}")
    if name == "none":
        return FedAvg()
    if name == "trimmed_mean":
        return TrimmedMean(beta=float(params.get("beta", 0.1)), bucket=params.get("bucket", 1), seed=seed)
    if name == "median":
        b = params.get("byzantine")
        if b is not None and not isinstance(b, int):
            raise ConfigError(f"defense 'median': byzantine must be an integer. Found {b!r}")
        return CoordinateMedian(byzantine=b, bucket=params.get("bucket"), seed=seed)
    if name in ("krum", "multi_krum"):
        f = params.get("byzantine", 1)
        if not isinstance(f, int):
            raise ConfigError(f"defense {name!r}: byzantine must be an integer. Found {f!r}")
        return Krum(byzantine=f, select=1 if name == "krum" else None)
    if name == "geometric_median":
        return GeometricMedian(
            nu=float(params.get("nu", 1e-6)),
            max_iter=params.get("max_iter", 100),
            ftol=float(params.get("ftol", 1e-6)),
            weighted=bool(params.get("weighted", False)),
            start=str(params.get("start", "median")),
        )
    if name == "centered_clip":
        return CenteredClip(tau=float(params.get("tau", DEFAULT_TAU)), iterations=params.get("iterations", 1))
    if name == "norm_bound":
        bound = params.get("max_norm", 1.0)
        return NormBound(
            FedAvg(),
            max_norm=bound if bound == "adaptive" else float(bound),
            noise=float(params.get("noise", 0.0)),
            seed=seed,
        )
    if name == "flame":
        return FLAME(noise=float(params.get("noise", 0.001)), seed=seed)
    if name == "foolsgold":
        return FoolsGold(
            confidence=float(params.get("confidence", 1.0)),
            centred=bool(params.get("centred", False)),
            binary=bool(params.get("binary", False)),
        )
    if name == "sign_vote":
        return SignVote()
    if name == "trigger_attribution":
        from deltaplane.aggregation.attribution import BackdoorAttribution

        return BackdoorAttribution(
            threshold=float(params.get("threshold", 3.0)),
            every=params.get("every", 5),
            steps=params.get("steps", 300),
            lam=float(params.get("lam", 0.01)),
            unlearn=params.get("unlearn", 10),
            unlearn_lr=float(params.get("unlearn_lr", 0.05)),
            switch=params.get("switch"),
            sticky=params.get("sticky"),
            score=params.get("score", "both"),
            invert=params.get("invert", "fixed"),
            shadow=params.get("shadow", "full"),
            reputation=params.get("reputation", "floor"),
            norm_cap=None if params.get("norm_cap") is None else float(params["norm_cap"]),
        )
    return FLTrust()


def check_defense_codec(defense: Aggregator, codec: str) -> None:
    """Refuse a defence over an uplink codec it is not valid with.

    A coordinate-wise rule (median, trimmed mean; ``sparse_ok = False``) over a sparsifying codec (a stage with
    ``sparsifies``: top-k, rand-k, threshold, STC) sees mostly zeros at every coordinate, takes them for votes
    and stops the model learning (trimmed mean over ``topk(0.01)`` collapses the default federation to chance).

    Raises:
        IncompatibleDefense: the combination is known to break.
    """
    from deltaplane.codecs import get_codec

    if getattr(defense, "sparse_ok", True):
        return
    c = get_codec(codec)
    sparse = [s.spec for s in getattr(c, "stages", [c]) if getattr(s, "sparsifies", False)]
    if sparse:
        raise IncompatibleDefense(
            f"{defense!r} is coordinate-wise and the uplink codec {codec!r} sparsifies ({sparse[0]}): most "
            "coordinates would be zero votes and the model would stop learning; use flame, foolsgold, "
            "norm_bound, fltrust, multi_krum or sign_vote, or a dense codec"
        )


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
    secure_noise: bool = False,
    distributed_min_contributors: int | None = None,
) -> Validate:
    """The composed chain for these options (see the module docstring for the order).

    Args:
        aggregator: server optimizer: ``fedavg``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedavgm``.
        lr: server optimizer learning rate (its default when None); ``fedavg`` has none, use ``server_lr``.
        server_lr: FedAvg's server step ``η`` (plain server SGD, :class:`ServerSGD`); the adaptive optimizers
            take their step from ``lr`` instead, so ``server_lr`` other than 1 with them is refused.
        defense: robust combination rule spec (:func:`parse_defense`); check it against the uplink codec with
            :func:`check_defense_codec`.
        clip: per-client clip norm (float or ``"adaptive"``); required when ``dp_noise > 0``.
        dp_noise: DP noise multiplier ``z`` (0: no DP).
        expected_clients: clients per round (DP-FedAvg's fixed denominator; sizes adaptive-clip count noise).
        sampling_rate: probability ``q`` that a client is in a round (for the accountant, which assumes Poisson
            sampling at this rate: draw rounds with :func:`~deltaplane.aggregation.sampling.sample_round`).
        dp_delta: δ at which ε is reported.
        epsilon_budget: stop with :class:`~deltaplane.errors.PrivacyBudgetExceeded` before exceeding it.
        accountant: ``"rdp"`` or ``"pld"``.
        max_norm: validation bound on incoming update norms (reject above it).
        expected_version: base model version that updates must declare.
        seed: seeds DP noise and adaptive-clip count noise (unless ``secure_noise``) and defences' noise.
        secure_noise: draw the DP noise and the adaptive-clip count noise from the OS CSPRNG instead of
            ``seed`` (:mod:`~deltaplane.aggregation.noise`): what every real deployment needs, since anyone who
            knows a seed can subtract the noise it made.
        distributed_min_contributors: with ``dp_noise``, the devices add the noise under SecAgg (distributed
            DP) and a sum of fewer contributors than this is not published: the chain's DP node is then
            :class:`~deltaplane.aggregation.dp.DistributedDP` (no server noise, the same accountant but with
            the sampling counted as revealed, which amplifies δ only: see its docstring), fed the unmasked
            unweighted mean;
            ``clip`` must be a number and ``defense`` none.
    """
    if aggregator not in SERVER_OPTIMIZERS:
        raise ConfigError(f"unknown aggregator {aggregator!r}; choose one of {list(SERVER_OPTIMIZERS)}")
    # a NaN passes `dp_noise < 0` and fails `dp_noise > 0`: it built a chain without any DP, silently
    if isinstance(dp_noise, bool) or not (isinstance(dp_noise, int | float) and dp_noise >= 0):
        raise ConfigError(f"dp_noise must be a non-negative number (0: no DP). Found {dp_noise!r}")
    inner = parse_defense(defense, seed=seed + 2)
    plain = isinstance(inner, FedAvg) or (
        isinstance(inner, NormBound) and isinstance(inner.inner, FedAvg) and not inner.noise
    )
    if dp_noise > 0 and not plain:
        raise IncompatibleDefense(
            f"defense {defense!r} cannot be combined with DP noise: DP-FedAvg calibrates noise to a clipped *sum*; "
            "use a fixed norm bound without noise (defense='norm_bound(2.0)') or none with --dp-noise"
        )
    node: Aggregator = inner
    dp_seed = None if secure_noise else seed
    if dp_noise > 0:
        if clip is None:
            raise ConfigError("DP noise needs a clip norm: set clip to a number or 'adaptive'")
        acc = PrivacyAccountant(
            noise_multiplier=dp_noise,
            sampling_rate=sampling_rate,
            delta=dp_delta,
            method=accountant,
            budget=epsilon_budget,
            # distributed DP: the devices' noise shares reveal who took part (DistributedDP says why)
            revealed_sampling=distributed_min_contributors is not None,
        )
        if distributed_min_contributors is not None:
            node = _distributed(
                inner, clip, dp_noise, expected_clients, distributed_min_contributors, acc, defense
            )
        elif clip == "adaptive":
            if expected_clients is None:
                raise ConfigError("clip='adaptive' with DP needs expected_clients")
            # Andrew et al. suggest σ_b = m/20; at least z, so the sum keeps ≥ 3/4 of the noise budget
            sigma_b = max(expected_clients / 20, dp_noise)
            est = QuantileClip(
                expected_clients=expected_clients,
                count_noise_std=sigma_b,
                seed=None if dp_seed is None else dp_seed + 1,
            )
            node = Clip(node, clip=est)
        else:
            node = Clip(node, clip=clip)
        if not isinstance(node, DistributedDP):
            node = DPFedAvg(
                node,
                noise_multiplier=dp_noise,
                expected_clients=expected_clients,
                accountant=acc,
                seed=dp_seed,
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


def _distributed(
    inner: Aggregator,
    clip: float | str,
    dp_noise: float,
    expected_clients: int | None,
    min_contributors: int,
    acc: PrivacyAccountant,
    defense: str | None,
) -> DistributedDP:
    """The DP node of distributed DP under SecAgg; what it cannot serve is refused with the reason."""
    if not isinstance(inner, FedAvg) or (defense or "none").strip() != "none":
        raise IncompatibleDefense(
            f"defense {defense!r} cannot run under SecAgg: the server sees only the unmasked sum"
        )
    if clip == "adaptive":
        raise ConfigError(
            "distributed DP needs a numeric clip: each device clips before masking, and an adaptive clip would "
            "need the devices' clipped counts in the clear"
        )
    if expected_clients is None:
        raise ConfigError("distributed DP needs expected_clients (the fixed denominator, q·N)")
    return DistributedDP(
        clip=float(clip),
        noise_multiplier=dp_noise,
        expected_clients=expected_clients,
        min_contributors=min_contributors,
        accountant=acc,
    )
