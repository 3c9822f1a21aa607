"""Deep Gradient Compression's training-side techniques, as a stage of the client step.

Lin, Han, Mao, Wang, Dally, "Deep Gradient Compression: Reducing the Communication Bandwidth for Distributed
Training", ICLR 2018 (https://arxiv.org/abs/1712.01887). DGC sends only the largest accumulated gradient
coordinates and keeps the rest on the worker; four techniques keep accuracy at 99.9% sparsity:

* **momentum correction** — accumulate the *velocity*, not the gradient, in the residual (Algorithm 1 with
  eq. 4): ``u ← m·u + g`` and ``v ← v + u``; send ``sparse(v)``; with nothing dropped this is momentum SGD;
* **local gradient clipping** — clip ``g`` on the worker *before* it is added to the accumulation (the paper
  scales a global threshold by ``N^(-1/2)``; here the threshold is given per device, or, scale-free, as a
  multiple κ of the device's own earlier update norms: :class:`NormHistory`);
* **momentum factor masking** — where a coordinate was sent, zero its momentum too (``u ← u ⊙ ¬mask``) so
  stale momentum does not keep pushing a coordinate whose accumulated value just went out;
* **warm-up** — exponentially increasing sparsity over the first epochs (the paper: 75%, 93.75%, 98.4375%,
  99.6%, then 99.9%), i.e. a density falling geometrically from 1 to the target.

In federated learning a device's "gradient" for a round is its update ``Δ`` (new − base: a pseudo-gradient
with the step already applied, so the sign convention is the server's ``w ← w + Δ``). The residual ``v`` is
the device's error-feedback residual (:class:`~deltaplane.codecs.Compressor`), so the stage below feeds ``u``
to the compressor instead of ``Δ``: the compressor adds its residual (``v ← v + u``), sends the codec's part
and keeps the rest, which is DGC's accumulation with any codec, not only top-k. With all devices in every
round, dense FedAvg over momentum-corrected updates is FedAvgM (server momentum ``m``, server lr 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaplane.codecs import Compressor, get_codec
from deltaplane.codecs.base import Pipeline, format_spec
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError

__all__ = ["DGC", "NormHistory", "warmup_density", "warmup_spec"]

#: codecs whose ``ratio`` is the share of coordinates they send (what the warm-up raises in early rounds)
SPARSIFIERS = ("topk", "stc", "randk")
#: the relative clip's reference is an exponential moving average of a device's (clipped) update norms with
#: this weight on the past: it follows the norms' drift over training within a few participations
NORM_DECAY = 0.5


@dataclass(frozen=True)
class NormHistory:
    """What a device remembers of its own update norms for DGC's relative local clip (two numbers, kept on
    the device beside its velocity, never sent).

    Args:
        count: the participations recorded so far.
        reference: the exponential moving average (weight :data:`NORM_DECAY` on the past) of the norms of the
            device's updates *after* clipping, the first one taken as it is.

    The rule, for a device with relative clip κ whose update has L2 norm ``r``:

    * on its first participation (no history) there is nothing to compare with: the update is not clipped,
      and ``reference = r``;
    * afterwards the update is scaled down to ``κ · reference`` if it is longer, and with ``r'`` the norm it
      keeps, ``reference ← NORM_DECAY · reference + (1 − NORM_DECAY) · r'``.

    Feeding the clipped norm back makes the reference robust: one exploding update moves it by at most a factor
    ``NORM_DECAY + (1 − NORM_DECAY)·κ``, so a run of them cannot raise the bound faster than that per round,
    while a device whose updates shrink as training converges tightens its bound within a few rounds. A
    reference of 0 (a device whose update was all zeros) bounds nothing until a non-zero norm is recorded.
    """

    count: int
    reference: float

    def bound(self, kappa: float) -> float | None:
        """The L2 norm an update is clipped to (``None``: no bound yet)."""
        return kappa * self.reference if self.count > 0 and self.reference > 0 else None

    def record(self, kept: float) -> NormHistory:
        """The history after an update that kept norm ``kept`` (after clipping)."""
        if self.count == 0:
            return NormHistory(1, kept)
        return NormHistory(self.count + 1, NORM_DECAY * self.reference + (1 - NORM_DECAY) * kept)


#: a device that has not participated yet
NO_HISTORY = NormHistory(0, 0.0)


def warmup_density(target: float, rnd: int, rounds: int) -> float:
    """DGC's warm-up: the density in round ``rnd`` (1-based) of a ``rounds``-round warm-up toward ``target``.

    The density falls geometrically from 1: ``target^(rnd / (rounds + 1))`` for ``rnd ≤ rounds``, then
    ``target``. With ``target = 0.001`` and four warm-up rounds this is the paper's schedule: 25%, 6.25%,
    1.5625%, 0.39%, then 0.1% (sparsity 75%, 93.75%, 98.4375%, 99.6%, 99.9%).
    """
    if rnd > rounds:
        return target
    return target ** (rnd / (rounds + 1))


def warmup_spec(spec: str, rnd: int, rounds: int) -> str:
    """``spec`` with every sparsifier's ``ratio`` replaced by its :func:`warmup_density` in round ``rnd``.

    Raises:
        ConfigError: ``spec`` has no top-level sparsifier (``topk``, ``stc``, ``randk``) to warm up.
    """
    codec = get_codec(spec)
    stages = codec.stages if isinstance(codec, Pipeline) else [codec]
    out, found = [], False
    for stage in stages:
        params = stage.get_params()
        if stage.name in SPARSIFIERS:
            found = True
            params["ratio"] = warmup_density(float(params["ratio"]), rnd, rounds)
        out.append(format_spec(stage.name, params))
    if not found:
        raise ConfigError(
            f"sparsity_warmup needs a sparsifying uplink codec ({', '.join(SPARSIFIERS)}) at the top level of "
            f"the spec; {spec!r} has none: set sparsity_warmup to 0 or use e.g. 'topk(0.003)'"
        )
    return " | ".join(out)


@dataclass(frozen=True)
class DGC:
    """The device-side DGC options of a run (all off by default: the stage is then the identity).

    Args:
        momentum: momentum correction factor ``m`` (0: off): the device sends its velocity ``u ← m·u + Δ``.
        clip: local clipping: the device's update is scaled down to this L2 norm before it is accumulated.
        relative_clip: scale-free local clipping, κ > 1: the update is scaled down to κ times the device's own
            earlier update norms (:class:`NormHistory`: not on its first participation); exclusive with
            ``clip``. An absolute threshold is one model's update scale; κ means the same for every model.
        masking: momentum factor masking: zero the velocity where the payload carried a value.
        warmup_rounds: sparsity warm-up: the codec's density falls from 1 to its own over these rounds.
    """

    momentum: float = 0.0
    clip: float | None = None
    relative_clip: float | None = None
    masking: bool = False
    warmup_rounds: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum correction must be in [0, 1). Found {self.momentum!r}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"local clip must be positive. Found {self.clip!r}")
        if self.relative_clip is not None:
            if not self.relative_clip > 1:
                raise ConfigError(
                    f"relative local clip must be above 1 (a multiple of the device's usual update norm). "
                    f"Found {self.relative_clip!r}"
                )
            if self.clip is not None:
                raise ConfigError(
                    "choose the absolute local clip (local_clip) or the relative one (local_clip_relative), "
                    "not both: each sets the bound the device clips to"
                )
        if self.masking and self.momentum == 0:
            raise ConfigError(
                "momentum factor masking needs momentum correction (set momentum_correction > 0)"
            )
        if self.warmup_rounds < 0:
            raise ConfigError(f"sparsity warm-up must be 0 or more rounds. Found {self.warmup_rounds!r}")

    @property
    def active(self) -> bool:
        """Whether any technique is on (the client step then runs device by device)."""
        return self.momentum > 0 or self.clipping or self.warmup_rounds > 0

    @property
    def clipping(self) -> bool:
        """Whether the device clips its update (absolute or relative local clip)."""
        return self.clip is not None or self.relative_clip is not None

    def clip_scale(self, norm: float, history: NormHistory | None) -> tuple[float | None, NormHistory | None]:
        """Local clipping of an update of L2 norm ``norm`` by a device with ``history`` (``None``: none yet).

        Returns the factor to scale the update by (``None``: leave it as it is) and the device's new history
        (``None`` unless the clip is relative)."""
        bound = self.clip
        if self.relative_clip is not None:
            bound = (history or NO_HISTORY).bound(self.relative_clip)
        scale = bound / norm if bound is not None and norm > bound else None
        if self.relative_clip is None:
            return scale, None
        # a scale is set only under a bound, so a clipped update kept the bound's norm
        return scale, (history or NO_HISTORY).record(norm if scale is None or bound is None else bound)

    def warming(self, rnd: int) -> bool:
        """Whether round ``rnd`` (1-based) is a warm-up round, whose codec differs from the run's."""
        return 0 < rnd <= self.warmup_rounds

    def codec_for(self, spec: str, rnd: int) -> str:
        """The uplink codec spec of round ``rnd`` (1-based): warmed up during the first rounds."""
        return warmup_spec(spec, rnd, self.warmup_rounds) if self.warmup_rounds else spec

    def prepare(
        self,
        compressor: Compressor,
        delta: Delta,
        velocity: Delta | None,
        *,
        spec: str,
        rnd: int,
        norms: NormHistory | None = None,
    ) -> tuple[Delta, Delta | None, NormHistory | None]:
        """Before compression: clip locally, fold ``delta`` into the velocity, and set the round's codec.

        Returns what to compress (the velocity with momentum correction, else the clipped delta), the new
        velocity (``None`` without momentum correction) and the device's new :class:`NormHistory` (``None``
        without the relative clip; ``norms`` is the one before). The compressor's error feedback then adds its
        residual to what it is given: DGC's ``v ← v + u``. A driver keeps the new velocity and history only
        if the update is compressed (a failed round leaves both as they were).
        """
        if self.clipping:
            scale, norms = self.clip_scale(delta.norm(), norms)
            if scale is not None:
                delta = delta * scale
        compressor.use_codec(self.codec_for(spec, rnd))
        if self.momentum == 0:
            return delta, None, norms
        u = delta if velocity is None else velocity * self.momentum + delta
        return u, u, norms

    def settle(self, velocity: Delta, sent: Delta | None) -> Delta:
        """After compression: momentum factor masking zeroes the velocity where the payload (decoded into
        ``sent``) carried a value; without masking the velocity is kept as it is."""
        if not self.masking:
            return velocity
        if sent is None:
            raise ConfigError("momentum factor masking needs the decoded payload")
        return Delta({k: torch.where(sent[k] != 0, torch.zeros_like(v), v) for k, v in velocity.items()})
