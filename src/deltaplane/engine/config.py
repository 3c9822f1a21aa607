"""The configuration of one simulated federated run, validated field by field, loadable from YAML.

Every hyperparameter of a run lives here and nowhere else, so a run is reproduced from its config alone
(the report stores it next to the metrics). Invalid values raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deltaplane.choices import (
    AGGREGATORS,
    DEFAULT_ALPHA,
    DEFAULT_ROUNDS,
    DEFAULT_SEED,
    ENGINES,
    PERSONALIZATIONS,
    TASKS,
    TRANSPORTS,
    Choices,
)
from deltaplane.engine.buildable import aggregation_builds, codec_builds, dgc_builds
from deltaplane.errors import ConfigError, DeltaplaneError
from deltaplane.textfile import read_config_text
from deltaplane.yamlio import load_yaml

if TYPE_CHECKING:
    from deltaplane.aggregation import Aggregator, Validate
    from deltaplane.engine.dgc import DGC
    from deltaplane.engine.task import Task
    from deltaplane.personalization import Personalizer

__all__ = ["CHOICES", "RunConfig"]


#: The fields whose value is a registered name, and the registry each one reads (:mod:`deltaplane.choices`).
#: ``codec``/``downlink_codec``, ``defense`` and ``attack`` are specs checked by their own registries.
CHOICES: dict[str, Choices] = {
    "aggregator": AGGREGATORS,
    "personalization": PERSONALIZATIONS,
    "engine": ENGINES,
    "transport": TRANSPORTS,
}


#: ``secagg_range``'s default (distributed DP raises it to :meth:`RunConfig.min_secagg_range` when larger)
SECAGG_RANGE = 8.0


class RunConfig(BaseModel):
    """Hyperparameters of a federated run on digits; the defaults are the ``deltaplane run`` setting.

    The defaults were tuned with ``benchmarks/foundation.py``: fp32 FedAvg over 20 non-IID clients reaches
    0.967 test accuracy in 120 rounds (about 35 s of CPU per run on one core), and 1% top-k + 8-bit with
    error feedback, which lags fp32 for the first ~100 rounds, matches it by round 120 at 120× fewer uplink
    bytes (the ``foundation`` section of docs/benchmarks.md). Two local epochs at lr 0.2 suit both: more local work per round helps fp32 but leaves top-k a
    larger residual to catch up on.
    """

    # no float option means anything at ±inf or NaN (an infinite lr or FedProx μ only diverged in round 1,
    # an infinite memory budget or Dirichlet α crashed the batched and population engines): refused here
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # -- task (the model and data; see deltaplane.engine.Task) ---------------------------------------
    # every TASKS entry has a target (Choice.target is optional for the other tables)
    task: str = Field(  # type: ignore[assignment]  # Choice.target is str | None; TASKS entries all set it
        TASKS["digits"].target,
        description="import path 'package.module:factory' of a function returning a deltaplane.engine.Task, "
        f"or a built-in task: {TASKS.names()}",
    )
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options passed to the task factory"
    )
    # -- federation ---------------------------------------------------------------------------------
    clients: int = Field(20, ge=1, description="number of simulated devices")
    alpha: float = Field(
        DEFAULT_ALPHA, gt=0, description="Dirichlet label-skew concentration (smaller: more skew)"
    )
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, description="communication rounds")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="share of clients that train in a round")
    min_client_samples: int = Field(20, ge=2, description="least number of samples a client holds")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of each client's data held out")
    client_eval_every: int = Field(
        1,
        ge=0,
        description="score every device's held-out data every N-th round and the last (1: every round; "
        "0: never, test set only, like Flower's fraction_evaluate=0 or pfl-research's central evaluation)",
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of digits in the global test set")
    train_shifts: int = Field(
        0,
        ge=0,
        le=8,
        description="add this many one-pixel-shifted copies of every training image (1,000+ clients need them)",
    )
    # -- local training -----------------------------------------------------------------------------
    local_epochs: int = Field(2, ge=1, description="passes over the local data per round")
    batch_size: int = Field(32, ge=1, description="local mini-batch size")
    lr: float = Field(0.2, gt=0, description="client SGD learning rate")
    lr_decay: float = Field(1.0, gt=0, le=1, description="client lr is multiplied by this after every round")
    momentum: float = Field(0.9, ge=0, lt=1, description="client SGD momentum (reset every round)")
    # -- compression ---------------------------------------------------------------------------------
    codec: str = Field("identity", description="uplink codec spec, e.g. 'topk(0.01) | quant(bits=8)'")
    error_feedback: bool = Field(True, description="keep the uplink compression error on the device")
    downlink_codec: str = Field("identity", description="codec for the global update sent to devices")
    downlink_error_feedback: bool = Field(True, description="server keeps the downlink compression error")
    wire: Literal["compact", "self-describing"] = Field(
        "compact",
        description="uplink payload framing: 'compact' (layout agreed once per session, a few bytes of "
        "framing per update) or 'self-describing' (every payload carries its tensor table)",
    )
    entropy_coding: bool = Field(
        True, description="compact frames code each byte field losslessly where that makes it smaller"
    )
    # -- Deep Gradient Compression's device-side techniques (Lin et al. 2018; see deltaplane.engine.dgc) ---
    momentum_correction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="DGC momentum correction m: each device sends its velocity u <- m*u + update (error "
        "feedback accumulates u, not the update); 0: off",
    )
    local_clip: float | None = Field(
        None,
        gt=0,
        description="DGC local clipping: L2 norm a device's update is scaled to before accumulation",
    )
    local_clip_relative: float | None = Field(
        None,
        gt=1,
        description="scale-free DGC local clipping, kappa > 1: a device scales its update down to kappa times "
        "an average of its own earlier update norms (not on its first participation); exclusive with "
        "local_clip",
    )
    momentum_masking: bool = Field(
        False, description="DGC momentum factor masking: zero the velocity where a value was sent"
    )
    sparsity_warmup: int = Field(
        0,
        ge=0,
        description="DGC warm-up: over this many first rounds the uplink sparsifier's density falls "
        "geometrically from 1 to its ratio; 0: off",
    )
    # -- server -------------------------------------------------------------------------------------
    server_lr: float = Field(
        1.0, gt=0, description="FedAvg's server step: the global model moves by server_lr × the mean delta"
    )
    # -- aggregation you can trust (see docs/aggregation.md) ------------------------------------------
    aggregator: str = Field("fedavg", description=f"server optimizer: {AGGREGATORS.names()}")
    server_opt_lr: float | None = Field(
        None, gt=0, description="server optimizer lr (its default when unset)"
    )
    clip: str | None = Field(None, description="per-client L2 clip norm: a number or 'adaptive'")
    dp_noise: float = Field(
        0.0, ge=0, description="DP-FedAvg noise multiplier z (0: no differential privacy)"
    )
    dp_delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="delta at which epsilon is reported; under DP it must be below 1/clients",
    )
    epsilon_budget: float | None = Field(None, gt=0, description="stop before epsilon would exceed this")
    dp_noise_source: Literal["auto", "secure", "seeded"] = Field(
        "auto",
        description=(
            "where DP noise (central, adaptive-clip count, local) and DP client sampling come from: 'secure' = "
            "the OS CSPRNG (nobody can reproduce it); 'seeded' = derived from `seed` (reproducible, but NOT "
            "private against anyone who knows the seed); 'auto' = secure on real devices (HTTP service, deployed "
            "Flower, device-side client step), seeded in simulations"
        ),
    )
    local_dp_noise: float = Field(
        0.0, ge=0, description="local DP: each device clips to `clip` and adds this noise multiplier itself"
    )
    secagg: bool = Field(False, description="aggregate through secure aggregation (server sees masked sums)")
    secagg_authenticated: bool = Field(
        False,
        description="authenticated SecAgg rounds (Bonawitz et al. 2017 §4–6, against a server that substitutes "
        "keys or shows devices different survivor sets): each device is enrolled by the run's own enrollment "
        "authority, signs its key advertisement, checks its neighbours' and runs the consistency check before it "
        "unmasks; the sums, and so the models, are those of the same run without it. Needs secagg",
    )
    secagg_bits: int = Field(20, ge=2, le=24, description="bits per value of the securely aggregated update")
    secagg_range: float = Field(
        SECAGG_RANGE,
        gt=0,
        description="per-value clip range of the securely aggregated update (default 8); under distributed DP "
        "(dp_noise with secagg) at least clip + 6·σ_d so that it never clips a device's noised value: left "
        "out, it is sized so (the larger of 8 and that); given smaller, the config is refused",
    )
    secagg_min_contributors: int | None = Field(
        None,
        ge=1,
        description="distributed DP (dp_noise with secagg): each device adds noise z·clip/sqrt(this), and a "
        "round whose secure sum has fewer contributors is not published (its noise would be below z·clip); "
        "default: SecAgg's threshold for a round of the expected size, 2·m//3 + 1 (m clients per round)",
    )
    secagg_neighbours: int | None = Field(
        None,
        ge=2,
        description="SecAgg+ (Bell et al. 2020): each device masks with and shares its secrets to only this many "
        "others (even), in a sparse graph; default: the complete graph. It must give neighbourhoods the devices "
        "accept for a round of the expected size (at least min(m, 2⌈log₂ m⌉ + 1) devices, m clients per round); the "
        "threshold is ⌊2g/3⌋ + 1 of each neighbourhood of g. A round drawn larger than expected gets the least "
        "degree its devices accept, one in which every device would neighbour every other the complete graph",
    )
    attack: str | None = Field(
        None, description="poisoning attack and malicious fraction, e.g. 'backdoor:0.2'"
    )
    defense: str | None = Field(
        None,
        description="robust aggregation spec, e.g. 'foolsgold', 'flame(noise=0.001)', 'fltrust', "
        "'geometric_median', 'centered_clip(tau=1)'",
    )
    root_samples: int = Field(100, ge=10, description="clean samples the server trains on for FLTrust")
    max_update_norm: float | None = Field(None, gt=0, description="reject client updates with a larger norm")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal term mu on the clients (0: plain FedAvg)")
    # -- personalization (per-device state; see deltaplane.personalization) --------------------------
    personalization: str = Field(
        "none", description=f"per-device personalization: {PERSONALIZATIONS.names()}"
    )
    personal_epochs: int = Field(2, ge=1, description="local epochs of personal training per round")
    personal_lr: float = Field(0.05, gt=0, description="learning rate of personal training")
    ditto_lambda: float = Field(
        0.1, ge=0, description="Ditto's pull λ of the personal model toward the global one"
    )
    fedper_head: str = Field("fc2", description="comma-separated layer prefixes FedPer keeps on the device")
    # -- reproducibility ------------------------------------------------------------------------------
    seed: int = Field(
        DEFAULT_SEED, ge=0, description="seeds the partition, the initial model and every round"
    )
    # Apart from `seed` so that runs with different seeds are scored on the same test images.
    split_seed: int = Field(0, ge=0, description="seeds the global train/test split")
    threads: int = Field(1, ge=1, description="torch CPU threads (fixed so timings and results repeat)")
    # -- engine ---------------------------------------------------------------------------------------
    # Sequential by default: it is bit-for-bit what the HTTP transport and the Flower engine compute, so a
    # result reproduces across runtimes; 'batched' is faster but differs by float32 rounding, which 120 rounds
    # of top-k can grow into a different final model. `deltaplane run` picks 'batched' unless told
    # (deltaplane.cli.DEFAULT_RUN_ENGINE): its report says which engine ran.
    engine: str = Field(
        "sequential",
        description="; ".join(f"'{name}' {c.summary}" for name, c in ENGINES.items()),
    )
    transport: str = Field(
        "inproc", description="; ".join(f"'{name}': {c.summary}" for name, c in TRANSPORTS.items())
    )
    memory_budget_mb: float = Field(
        256.0, gt=0, description="memory the batched engine may use for the clients it trains at once"
    )

    @field_validator("aggregator", "personalization", "engine", "transport")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        try:
            return CHOICES[info.field_name].check(name)  # type: ignore[index]  # field_name: set for a field validator
        except DeltaplaneError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("task")
    @classmethod
    def _task_path(cls, task: str) -> str:
        """A built-in task's short name (``digits``) stands for its import path."""
        return TASKS[task].target if task in TASKS else task  # type: ignore[return-value]  # every TASKS target is set

    @field_validator("codec", "downlink_codec")
    @classmethod
    def _valid_codec(cls, spec: str) -> str:
        if codec_builds(spec):  # certain without building it (or loading torch): deltaplane.engine.buildable
            return spec
        from deltaplane.codecs import get_codec

        try:
            get_codec(spec)
        except DeltaplaneError as exc:
            raise ValueError(str(exc)) from None
        return spec

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``clients: {count: true}`` was 1 client: pydantic reads a bool as the int 1 or 0. Only a field that
        holds a bool takes true/false."""
        if isinstance(value, bool):
            assert info.field_name is not None  # a field validator always runs for a field
            ann = cls.model_fields[info.field_name].annotation
            kinds = typing.get_args(ann) or (ann,)
            if bool not in kinds and any(k in (int, float) for k in kinds):
                raise ValueError(f"takes a number, not {str(value).lower()}")
        return value

    @field_validator("clip", mode="before")
    @classmethod
    def _clip_number(cls, clip: Any) -> Any:
        """``clip: 1.0`` in YAML is a number; the field holds a number or 'adaptive' as text."""
        if isinstance(clip, int | float) and not isinstance(clip, bool):
            return str(clip)
        return clip

    @field_validator("clip")
    @classmethod
    def _valid_clip(cls, clip: str | None) -> str | None:
        if clip is None or clip == "adaptive":
            return clip
        try:
            value = float(clip)
        except ValueError:
            raise ValueError(f"clip must be a positive number or 'adaptive'. Found {clip!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"clip must be a positive finite number. Found {value!r}")
        return clip

    @field_validator("attack")
    @classmethod
    def _valid_attack(cls, spec: str | None) -> str | None:
        from deltaplane.engine.attacks import parse_attack

        if spec is not None:
            try:
                parse_attack(spec)
            except DeltaplaneError as exc:
                raise ValueError(str(exc)) from None
        return spec

    @model_validator(mode="after")
    def _valid_aggregation(self) -> RunConfig:
        # the chain and the DGC options are built to be checked unless they certainly build, which
        # deltaplane.engine.buildable decides without torch for a process that only reads the file
        if not aggregation_builds(self):
            self._check_aggregation_by_building()
        if not dgc_builds(self):
            self._check_dgc_by_building()
        if (self.dp_noise > 0 or self.local_dp_noise > 0) and self.dp_delta * self.clients >= 1:
            # (ε, δ)-DP with δ ≥ 1/N admits "publish one random client's data in the clear"; δ ≪ 1/N is the
            # standard requirement (Dwork & Roth 2014, §2.3), whether δ was given or left at its default
            raise ValueError(
                f"dp_delta={self.dp_delta:g} is not below 1/clients = {1 / self.clients:g}: a δ that large allows "
                "a mechanism that releases a client's data outright; set dp_delta well below 1/clients, e.g. "
                f"{10 ** math.floor(math.log10(0.1 / self.clients)):g}"
            )
        # (an attack fraction's attacker count is checked by the driver that runs it, against the count it applies
        # to, which the population engine may override: attacker_count)
        if self.local_dp_noise > 0:
            if self.clip is None or self.clip == "adaptive":
                raise ValueError("local_dp_noise needs a numeric clip (the device clips before adding noise)")
            if self.dp_noise > 0:
                raise ValueError("choose central (dp_noise) or local (local_dp_noise) DP, not both")
        if self.secagg_authenticated and not self.secagg:
            raise ValueError(
                "secagg_authenticated authenticates secure aggregation rounds (signed key advertisements, the "
                "consistency check), and this run has none: set secagg too, or drop secagg_authenticated"
            )
        if self.secagg:
            if self.attack and _forges_frames(self.attack):
                raise ValueError(
                    f"attack={self.attack!r} forges a wire frame, but under secagg a device sends masked ring "
                    "vectors, never a frame; run it without secagg"
                )
            if self.defense not in (None, "none") or self.max_update_norm is not None:
                raise ValueError(
                    "secagg hides individual updates, so per-update defenses and norm checks cannot run on the "
                    "server; drop defense / max_update_norm or secagg"
                )
            if self.clip == "adaptive":
                raise ValueError("with secagg, clip must be a number (clients clip before masking)")
            if self.clients_per_round() < 2:
                # the "sum" of one masked input is that input: every round would fail (or show it)
                raise ValueError(
                    f"secagg needs at least 2 clients per round, and this run samples "
                    f"{self.clients_per_round()} of {self.clients}: SecAgg cannot hide a lone device's update "
                    "(the sum of one input is the input); raise sample_fraction or clients"
                )
        self._check_distributed_dp()
        self._check_secagg_neighbours()
        return self

    def _check_aggregation_by_building(self) -> None:
        """Build the aggregator chain; check its innermost rule against the codec and the round's size."""
        try:
            agg = self.build_aggregator()
            from deltaplane.aggregation import FedAvg, check_defense_codec

            defence: Aggregator = agg
            while (inner := getattr(defence, "inner", None)) is not None:
                defence = inner
            if not isinstance(defence, FedAvg):  # the innermost rule meets the decoded uplink payloads
                check_defense_codec(defence, self.codec)
            need = getattr(defence, "min_updates", 1)
            if need > self.clients_per_round():
                raise ConfigError(
                    f"defense {self.defense!r} needs at least {need} updates a round to close (a trimmed mean: "
                    f"to trim one a side, below which it is the plain mean), and this run trains "
                    f"{self.clients_per_round()} a round; raise clients or sample_fraction, or tolerate fewer "
                    "byzantine clients (a larger trimmed-mean beta)"
                )
        except DeltaplaneError as exc:
            raise ValueError(str(exc)) from None

    def _check_dgc_by_building(self) -> None:
        """Build the DGC options and the first round's (warmed-up) codec."""
        try:
            dgc = self.make_dgc()
            dgc.codec_for(self.codec, 1)  # a warm-up needs a sparsifier to warm up
        except DeltaplaneError as exc:
            raise ValueError(str(exc)) from None

    def _check_secagg_neighbours(self) -> None:
        """SecAgg+'s degree must be one the run's devices accept for a round of the expected size: the same
        rule (:func:`~deltaplane.aggregation.secagg.check_device_policy`) the service applies when it opens a
        round and every real device applies to its invitation, so a run is refused here, not in round 1."""
        degree = self.secagg_neighbours
        if degree is None:
            return
        if not self.secagg:
            raise ValueError(
                "secagg_neighbours is SecAgg+'s degree (how many devices each one masks with); it needs secagg"
            )
        if degree % 2:
            raise ValueError(
                f"secagg_neighbours={degree} must be even: SecAgg+'s graph joins each device to "
                "secagg_neighbours/2 devices on either side of it in a ring"
            )
        from deltaplane.aggregation.secagg import (
            SecAggConfig,
            SecAggError,
            check_device_policy,
            default_threshold,
            min_group_size,
        )

        m = self.clients_per_round()
        if degree >= m:
            raise ValueError(
                f"secagg_neighbours={degree}: a round of the {m} clients this run expects gives each device at most "
                f"{m - 1} neighbours; leave secagg_neighbours out for the complete graph"
            )
        group = degree + 1
        policy = SecAggConfig(
            num_clients=m,
            threshold=default_threshold(group),
            bits=self.secagg_bits,
            vector_size=1,
            neighbours=degree,
        )
        try:
            check_device_policy(policy)
        except SecAggError:
            least = min_group_size(m) - 1
            fix = (
                f"set secagg_neighbours to at least {least}"
                if least < m - 1
                else f"a round of {m} admits only the complete graph: leave secagg_neighbours out"
            )
            raise ValueError(
                f"secagg_neighbours={degree} gives neighbourhoods of {group} of the {m} clients this run expects per "
                f"round, and devices refuse fewer than {min_group_size(m)} (min(m, 2⌈log₂ m⌉ + 1): so the server cannot "
                f"surround a device with colluders); {fix}"
            ) from None

    def _check_distributed_dp(self) -> None:
        """dp_noise with secagg is distributed DP: the devices add the noise, and a sum of fewer than
        :meth:`min_contributors` is not published; a round that can never reach that many is refused here."""
        distributed = self.secagg and self.dp_noise > 0
        if self.secagg_min_contributors is not None and not distributed:
            raise ValueError(
                "secagg_min_contributors sizes the devices' noise of distributed DP; it needs secagg and dp_noise"
            )
        if not distributed:
            return
        if self.clip is None:
            raise ValueError("dp_noise with secagg needs a numeric clip (each device clips, then adds noise)")
        m, need = self.clients_per_round(), self.min_contributors()
        if need < 2:
            raise ValueError(
                "secagg_min_contributors must be at least 2: SecAgg cannot hide a lone device's input, so a "
                "sum of one is never published"
            )
        if need > m:
            raise ValueError(
                f"secagg_min_contributors={need} exceeds the {m} clients this run expects per round: no round "
                "could be published (a sum of fewer devices carries less than z·clip of noise); raise clients "
                "or sample_fraction, or lower secagg_min_contributors"
            )
        self._check_ring_range()

    def _check_ring_range(self) -> None:
        """Distributed DP: the ring's range clip acts on each device's noised values before the sum (it is not
        post-processing), so it must not bind. A ``secagg_range`` left out is sized to fit; one given too small
        is refused with the least range to use."""
        least = self.min_secagg_range()
        if "secagg_range" not in self.model_fields_set:
            # frozen model: set the auto-sized default once, here, as validation does (fields_set unchanged)
            self.__dict__["secagg_range"] = max(SECAGG_RANGE, least)
        elif self.secagg_range < least:
            raise ValueError(
                f"secagg_range={self.secagg_range:g} would clip the devices' noised values: under distributed "
                f"DP each device adds noise of std σ_d = z·clip/√m_min = {self.device_noise_std():.4g} to values "
                "within ±clip before SecAgg's range clip, which acts per device before the sum (not "
                "post-processing), so the privacy accounting needs it never to bind: set secagg_range to at "
                f"least clip + 6·σ_d = {least:g}, or leave it out (it is then sized so)"
            )

    def min_contributors(self) -> int:
        """m_min of distributed DP: ``secagg_min_contributors``, or SecAgg's threshold for a round of the expected
        size (:func:`~deltaplane.aggregation.secagg.default_threshold`): a sum of that many devices has noise
        of std at least z·clip, and the threshold wastes fewer Poisson rounds than m itself (about half of
        which fall short of their mean) for 1.5× the per-device noise variance."""
        if self.secagg_min_contributors is not None:
            return self.secagg_min_contributors
        from deltaplane.aggregation.secagg import default_threshold

        return default_threshold(self.clients_per_round())

    def unmask_floor(self) -> int:
        """The fewest masked inputs whose sum a device of this run helps unmask (and the honest server unmasks):
        m_min under distributed DP, since each device's noise is calibrated to a sum of that many
        (:meth:`device_noise_std`); 0 otherwise (SecAgg's threshold alone). Every driver builds its devices'
        :class:`~deltaplane.aggregation.secagg.DeviceEndpoint` with it, from the device's own config."""
        return self.min_contributors() if self.secagg and self.dp_noise > 0 else 0

    def min_secagg_range(self) -> float:
        """The least ``secagg_range`` under distributed DP, clip + 6·σ_d rounded up to two decimals
        (:func:`~deltaplane.aggregation.dp_sizes.distributed_ring_range`, what the servers check); 0 without it."""
        if not (self.secagg and self.dp_noise > 0):
            return 0.0
        from deltaplane.aggregation.dp_sizes import distributed_ring_range

        return distributed_ring_range(self.numeric_clip(), self.device_noise_std())

    @property
    def clip_value(self) -> float | str | None:
        """``clip`` as the aggregators and the devices take it: a float, ``"adaptive"`` or None.

        The field keeps a number as text (``clip: 2.0`` and ``--clip 2.0`` both give ``"2.0"``, beside
        ``"adaptive"``); what acts on it, and what reports it, wants the number."""
        return self.clip if self.clip is None or self.clip == "adaptive" else float(self.clip)

    def numeric_clip(self) -> float:
        """``clip`` as a number, for local and distributed DP, whose clip the validators require to be one.

        Raises:
            ConfigError: ``clip`` is unset or ``"adaptive"`` (a config the validators let through only when
                neither local nor distributed DP is on).
        """
        if self.clip is None or self.clip == "adaptive":
            raise ConfigError(f"local and distributed DP need a numeric clip. Found {self.clip!r}")
        return float(self.clip)

    def device_noise_std(self) -> float:
        """σ_d = z·clip/√m_min, the noise std each device adds under distributed DP (0 without it)."""
        if not (self.secagg and self.dp_noise > 0):
            return 0.0
        from deltaplane.aggregation.dp_sizes import distributed_noise_std

        return distributed_noise_std(self.dp_noise, self.numeric_clip(), self.min_contributors())

    def attacker_count(self, *, counted: str | None = None, fix: str | None = None) -> int:
        """How many devices this run's attack makes malicious, ``round(fraction · clients)`` (0 without one).

        ``clients`` is the count the fraction applies to on every driver that runs this config as it is: the
        sequential, batched, HTTP-simulation and Flower drivers' devices, and the population engine's registered
        devices (:func:`~deltaplane.sim.population.run_population` checks its own ``registered`` when given one).
        Not checked when the config is built, for that reason; every driver checks it before its first round.
        ``counted`` and ``fix`` name that count and how to raise it in the message (by default from ``engine``).

        Raises:
            ConfigError: the fraction gives no malicious device, so the attack would never run; the message
                names the count used and what to change.
        """
        if not self.attack:
            return 0
        from deltaplane.engine.attacks import malicious_count, parse_attack

        _, fraction = parse_attack(self.attack)
        population = self.engine == "population"
        counted = counted or ("registered devices (clients)" if population else "clients")
        fix = fix or ("register more devices (raise clients)" if population else "raise clients")
        return malicious_count(fraction, self.clients, spec=self.attack, counted=counted, fix=fix)

    def clients_per_round(self) -> int:
        """How many clients train in each round."""
        return max(1, min(self.clients, round(self.sample_fraction * self.clients)))

    def describe_aggregation(self) -> str:
        """A short human name of the server side of this run, e.g. ``"FedAdam + clip 1.0 + DP z=1.1"``."""
        target = AGGREGATORS[self.aggregator].target
        parts = [target.rpartition(":")[2] if target else "FedAvg"]
        if self.prox_mu > 0:
            parts[0] = "FedProx" if self.aggregator == "fedavg" else f"{parts[0]} + FedProx"
        if self.clip is not None:
            parts.append(f"clip {self.clip}")
        if self.dp_noise > 0:
            parts.append(f"{'distributed ' if self.secagg else ''}DP z={self.dp_noise:g}")
        if self.local_dp_noise > 0:
            parts.append(f"local DP z={self.local_dp_noise:g}")
        if self.secagg:
            degree = self.secagg_neighbours
            name = "SecAgg" if degree is None else f"SecAgg+ degree {degree}"
            parts.append(f"authenticated {name}" if self.secagg_authenticated else name)
        if self.defense:
            parts.append(self.defense)
        if self.personalization != "none":
            parts.append(self.personalization)
        return " + ".join(parts)

    def seeded_dp_noise(self, *, simulation: bool) -> bool:
        """Whether DP noise and DP client sampling derive from ``seed`` (reproducible, not private against
        whoever knows the seed) rather than from the OS CSPRNG; ``simulation`` says whether the driver
        simulates its devices (``dp_noise_source="auto"`` is seeded only then)."""
        if self.dp_noise_source == "auto":
            return simulation
        return self.dp_noise_source == "seeded"

    def build_aggregator(self, *, seed: int = 0, secure_noise: bool = False) -> Validate:
        """The server's aggregator chain for these options (validation → server opt → DP → clip → defense);
        ``secure_noise`` draws the DP noise from the OS CSPRNG instead of ``seed``.

        With ``secagg`` the server never sees single updates: clients clip before masking, and the chain is
        only the server optimizer, fed the securely computed mean; with ``dp_noise`` too (distributed DP) the
        devices add the noise and the chain holds :class:`~deltaplane.aggregation.dp.DistributedDP` (the same
        accountant as central DP-FedAvg with its sampling counted as revealed, no server noise)."""
        from deltaplane.aggregation import build_aggregator

        if self.secagg and self.dp_noise == 0:
            return build_aggregator(
                aggregator=self.aggregator, lr=self.server_opt_lr, server_lr=self.server_lr, seed=seed
            )
        return build_aggregator(
            aggregator=self.aggregator,
            lr=self.server_opt_lr,
            server_lr=self.server_lr,
            defense=self.defense,
            clip=self.clip_value,
            dp_noise=self.dp_noise,
            expected_clients=self.clients_per_round(),
            sampling_rate=self.clients_per_round() / self.clients,
            dp_delta=self.dp_delta,
            epsilon_budget=self.epsilon_budget,
            max_norm=self.max_update_norm,
            seed=seed,
            secure_noise=secure_noise,
            # under SecAgg the devices add the noise (defense and max_norm are refused with secagg)
            distributed_min_contributors=self.min_contributors() if self.secagg else None,
        )

    def make_dgc(self) -> DGC:
        """The device-side :class:`~deltaplane.engine.dgc.DGC` techniques these settings turn on."""
        from deltaplane.engine.dgc import DGC

        return DGC(
            momentum=self.momentum_correction,
            clip=self.local_clip,
            relative_clip=self.local_clip_relative,
            masking=self.momentum_masking,
            warmup_rounds=self.sparsity_warmup,
        )

    def make_personalizer(self) -> Personalizer:
        """The :class:`~deltaplane.personalization.Personalizer` these settings describe: the registered class
        (:data:`deltaplane.choices.PERSONALIZATIONS`), given the options its constructor takes."""
        import inspect

        cls = PERSONALIZATIONS.load(self.personalization)
        options = {
            "epochs": self.personal_epochs,
            "lr": self.personal_lr,
            "batch_size": self.batch_size,
            "lam": self.ditto_lambda,
            "head": tuple(h.strip() for h in self.fedper_head.split(",") if h.strip()),
        }
        takes = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in options.items() if k in takes})

    # -- construction -------------------------------------------------------------------------------
    def __init__(self, **data: Any) -> None:
        """Validate the keyword fields; a bad one is a :class:`ConfigError` naming every bad field, as from
        :meth:`from_mapping` (pydantic's own ``ValidationError`` is not a deltaplane error)."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _FieldErrors(exc) from None

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "config") -> RunConfig:
        """Validate a mapping (e.g. parsed YAML); raise :class:`ConfigError` naming every bad field.

        Fields may be given flat (``dp_noise: 1.0``) or in the nested sections of :data:`SECTIONS`
        (``privacy: {noise: 1.0}``); a section is a mapping under its name, so ``task: mypkg:make`` is the flat
        field and ``task: {path: mypkg:make, options: {...}}`` the section. One vocabulary, either shape.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
        data, where = _flatten(data, source=source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(_unwrap(exc), source, where)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RunConfig:
        """Load a config from a YAML file of ``field: value`` lines; missing fields take their defaults."""
        import yaml

        path = Path(path)
        text = read_config_text(path)
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        except ConfigError as exc:  # a duplicate key
            raise ConfigError(f"invalid {path}: {exc}") from None
        return cls.from_mapping({} if data is None else data, source=str(path))

    @classmethod
    def from_report(cls, path: str | os.PathLike[str], run: str | None = None) -> RunConfig:
        """The exact config of run ``run`` in a run report: ``deltaplane run -o OUT`` writes ``OUT/report.json``
        (``path`` may name it or ``OUT``); ``run`` is ``"baseline"`` or ``"compressed"`` there, and may be left
        out when the report holds one run.

        ``run_federation(RunConfig.from_report("OUT", "baseline"))`` reproduces that run's figures, because the
        report keeps every field as the run used it. Rebuilding a config by hand from the command line does
        not: ``deltaplane run`` fills in what its flags leave unset (``DELTAPLANE_SMALL``'s caps, the default
        codec and DGC options, α-mix and the batched engine for the compressed digits run), which
        :class:`RunConfig`'s own defaults do not (docs/byo.md, "A ``deltaplane run`` from Python").

        Raises:
            ConfigError: the file is not a run report, or it holds no run ``run`` (the message lists those it
                holds).
        """
        from deltaplane.report import load_report

        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        runs = load_report(path).get("runs")
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ConfigError(f"{path}: 'runs' must be a list of runs")
        names = [str(r.get("name")) for r in runs]
        if run is None and len(runs) != 1:
            raise ConfigError(f"{path} holds {len(runs)} runs ({', '.join(names)}); name the one to load")
        if run is not None and run not in names:
            raise ConfigError(f"{path} holds no run {run!r}; its runs are: {', '.join(names) or 'none'}")
        chosen = runs[0] if run is None else runs[names.index(run)]
        return cls.from_mapping(chosen.get("config"), source=f"{path} (run {chosen.get('name')!r})")

    def scores_clients(self, rnd: int) -> bool:
        """Whether round ``rnd``'s global model is scored on the devices' held-out data (the
        ``client_accuracy_*`` fields; NaN in a round that is not): every ``client_eval_every``-th round and the
        last (``config.rounds``: a privacy-budget stop ends a run earlier, on a round scored only if N names
        it), none with 0. The test set is scored every round whatever this says.

        Scoring every device every round is work the baselines' apps do not do (Flower's ``evaluate_fn`` on
        the central test set with ``fraction_evaluate=0``, pfl-research's central evaluation); what it costs a
        round is measured in docs/sim-speed.md. The HTTP service run refuses anything but 1 (its devices report
        their held-out accuracy with every round's drift summary)."""
        every = self.client_eval_every
        return every > 0 and (rnd % every == 0 or rnd == self.rounds)

    def client_lr(self, rnd: int) -> float:
        """The client learning rate in round ``rnd`` (1-based): ``lr · lr_decay^(rnd-1)``.

        A decaying step lets the last rounds settle instead of jumping around the optimum, which matters
        most for error feedback: the residual a device still holds is flushed in ever smaller steps.
        """
        return self.lr * self.lr_decay ** (rnd - 1)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied and validated (``model_copy`` would skip validation). A field sized
        from the others when left out (``secagg_range`` under distributed DP) stays left out, so it is sized
        again for the changed options."""
        data = self.model_dump()
        if "secagg_range" not in self.model_fields_set:
            del data["secagg_range"]
        return self.from_mapping(data | changes, source="options")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of every field."""
        return self.model_dump(mode="json")

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """Every field in its nested section (:data:`SECTIONS`): the YAML shape ``from_mapping`` reads back."""
        flat = self.to_dict()
        return {name: {key: flat[field] for key, field in keys.items()} for name, keys in SECTIONS.items()}


#: The nested sections of a run config: section -> {key in the section: flat field}. Every field is in one.
SECTIONS: dict[str, dict[str, str]] = {
    "task": {
        "path": "task", "options": "task_options", "test_fraction": "test_fraction", "split_seed": "split_seed",
        "train_shifts": "train_shifts",
    },
    "clients": {
        "count": "clients", "alpha": "alpha", "rounds": "rounds", "sample_fraction": "sample_fraction",
        "min_samples": "min_client_samples", "holdout_fraction": "holdout_fraction", "eval_every": "client_eval_every",
        "local_epochs": "local_epochs",
        "batch_size": "batch_size", "lr": "lr", "lr_decay": "lr_decay", "momentum": "momentum", "prox_mu": "prox_mu",
    },
    "codec": {
        "uplink": "codec", "error_feedback": "error_feedback", "downlink": "downlink_codec",
        "downlink_error_feedback": "downlink_error_feedback", "wire": "wire", "entropy": "entropy_coding",
        "momentum_correction": "momentum_correction", "local_clip": "local_clip",
        "local_clip_relative": "local_clip_relative", "momentum_masking": "momentum_masking", "sparsity_warmup": "sparsity_warmup",
    },
    "aggregation": {
        "optimizer": "aggregator", "server_lr": "server_lr", "optimizer_lr": "server_opt_lr", "defense": "defense",
        "root_samples": "root_samples", "max_update_norm": "max_update_norm",
    },
    "privacy": {
        "clip": "clip", "noise": "dp_noise", "delta": "dp_delta", "epsilon_budget": "epsilon_budget",
        "local_noise": "local_dp_noise", "noise_source": "dp_noise_source",
    },
    "secagg": {
        "enabled": "secagg", "bits": "secagg_bits", "range": "secagg_range",
        "min_contributors": "secagg_min_contributors", "neighbours": "secagg_neighbours",
        "authenticated": "secagg_authenticated",
    },
    "attack": {"spec": "attack"},
    "personalization": {
        "method": "personalization", "epochs": "personal_epochs", "lr": "personal_lr",
        "ditto_lambda": "ditto_lambda", "fedper_head": "fedper_head",
    },
    "engine": {
        "name": "engine", "transport": "transport", "seed": "seed", "threads": "threads",
        "memory_budget_mb": "memory_budget_mb",
    },
}  # fmt: skip


def flatten_sections(data: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """``data`` with every nested section (a mapping under a :data:`SECTIONS` name) spread into flat fields.

    An empty section (``privacy:`` with every key commented out, which YAML reads as null) is no section.

    Raises:
        ConfigError: an unknown key in a section (naming the section's keys), a section given a plain value, or
            a field given twice.
    """
    return _flatten(data, source=source)[0]


def _forges_frames(attack: str) -> bool:
    """Whether attack spec ``attack`` forges a wire frame (imports the attacks, and so torch, only when asked)."""
    from deltaplane.engine.attacks import parse_attack

    return parse_attack(attack)[0].forges_frames


def _flatten(data: dict[str, Any], *, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`flatten_sections`, and where each flat field was given (``clients.count``), for messages."""
    flat: dict[str, Any] = {}
    given: dict[str, str] = {}

    def put(field: str, value: Any, where: str) -> None:
        if field in given:
            raise ConfigError(f"invalid {source}: '{field}' is set twice ({given[field]} and {where})")
        given[field] = where
        flat[field] = value

    for key, value in data.items():
        section = SECTIONS.get(key)
        if section is not None and value is None:
            continue  # `privacy:` alone: a section left empty, every field at its default
        if section is not None and isinstance(value, dict):
            for sub, v in value.items():
                if sub not in section:
                    raise ConfigError(
                        f"invalid {source}: unknown key '{key}.{sub}'; valid keys of '{key}': {', '.join(section)}"
                    )
                put(section[sub], v, f"{key}.{sub}")
        elif section is not None and key not in RunConfig.model_fields:
            raise ConfigError(
                f"invalid {source}: '{key}' is a section, not a value: give its keys as a mapping, e.g. "
                f"'{key}: {{{next(iter(section))}: ...}}'; valid keys of '{key}': {', '.join(section)}"
            )
        else:
            put(key, value, key)
    return flat, given


class _FieldErrors(ConfigError):
    """Bad fields given to ``RunConfig(...)``; keeps pydantic's errors so :meth:`RunConfig.from_mapping`
    (whose ``model_validate`` goes through ``__init__``) can name them as the user wrote them."""

    def __init__(self, exc: ValidationError) -> None:
        super().__init__(_describe(exc, "RunConfig"))
        self.validation = exc


def _unwrap(exc: ValidationError) -> ValidationError:
    """The field errors behind ``exc`` when it only wraps :class:`_FieldErrors` raised by ``__init__``."""
    errors = exc.errors()
    inner = errors[0].get("ctx", {}).get("error") if len(errors) == 1 else None
    return inner.validation if isinstance(inner, _FieldErrors) else exc


def _describe(exc: ValidationError, source: str, where: dict[str, str] | None = None) -> str:
    """One line naming every bad field as the user wrote it (``clients.count``, not the flat ``clients``)."""
    where = where or {}
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in where:
            loc[0] = where[loc[0]]
        field = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; valid fields: {', '.join(RunConfig.model_fields)}"
        # a check across several fields has no single field: say so in the user's words, not "(root)"
        problems.append(f"field '{field}': {msg}" if field else msg)
    return f"invalid {source}: " + "; ".join(problems)


#: Flat RunConfig fields that are options of the default (digits) task, with their defaults.
DIGITS_OPTIONS = {"test_fraction": 0.2, "split_seed": 0, "train_shifts": 0}
_TASKS: dict[str, Any] = {}
#: The source file stamp (path, mtime in ns, size) of each task module when make_task last loaded it.
_STAMPS: dict[str, tuple[str, int, int] | None] = {}


def _source_stamp(module_name: str) -> tuple[str, int, int] | None:
    """(path, mtime in ns, size) of ``module_name``'s source file, or None when it has none or cannot be found
    (:func:`~deltaplane.engine.task.load_task` then says why it does not import)."""
    import importlib.util
    import sys

    module = sys.modules.get(module_name)
    try:
        file = (
            getattr(module, "__file__", None)
            if module
            else getattr(importlib.util.find_spec(module_name), "origin", None)
        )
        st = os.stat(file)  # type: ignore[arg-type]  # None (no file) raises TypeError, caught below
    except Exception:  # not found, a namespace package, a built-in: nothing to compare
        return None
    return (str(file), st.st_mtime_ns, st.st_size)


def _reload_if_edited(module_name: str, stamp: tuple[str, int, int] | None) -> None:
    """Re-import ``module_name`` when its source changed since make_task last loaded it (a task edited in a
    notebook): ``import`` alone returns the module already in ``sys.modules``, old code and all."""
    import importlib
    import importlib.util
    import sys

    before = _STAMPS.get(module_name)
    _STAMPS[module_name] = stamp
    module = sys.modules.get(module_name)
    if module is None or before is None or stamp is None or before == stamp:
        return
    # a rewrite within the same second and of the same size passes Python's bytecode check (whole seconds and
    # size): drop the cached bytecode so the reload compiles the new source
    Path(importlib.util.cache_from_source(stamp[0])).unlink(missing_ok=True)
    importlib.reload(module)


def make_task(config: RunConfig) -> Task:
    """The :class:`~deltaplane.engine.Task` ``config`` names, loaded once per process, options and source file.

    ``train_shifts``, ``test_fraction`` and ``split_seed`` are options of the digits task; with another task
    they are refused (its own options go in ``task_options``), never ignored. The cache is keyed by the task
    module's source file too (mtime and size): a module edited since it was loaded is re-imported and its task
    built again, so a notebook that rewrites ``mytask.py`` gets the new task, not the old one.
    """
    import json

    from deltaplane.engine.task import DEFAULT_TASK, load_task
    from deltaplane.errors import UnsupportedOption

    options = dict(config.task_options)
    if config.task == DEFAULT_TASK:
        for name in DIGITS_OPTIONS:
            options.setdefault(name, getattr(config, name))
    else:
        changed = [n for n, default in DIGITS_OPTIONS.items() if getattr(config, n) != default]
        if changed:
            raise UnsupportedOption(
                f"{', '.join(changed)} are options of the digits task, not of {config.task!r}; "
                "pass your task's own options in task_options"
            )
    module_name = config.task.partition(":")[0]
    stamp = _source_stamp(module_name)
    key = json.dumps([config.task, options, stamp], sort_keys=True, default=str)
    if key not in _TASKS:
        if len(_TASKS) > 8:
            _TASKS.clear()
        _reload_if_edited(module_name, stamp)
        _TASKS[key] = load_task(config.task, options)
    return _TASKS[key]
