"""Deep Gradient Compression's training-side techniques, as a stage of the client step.

Lin, Han, Mao, Wang, Dally, "Deep Gradient Compression: Reducing the Communication Bandwidth for Distributed
Training", ICLR 2018 (https://arxiv.org/abs/1712.01887). DGC sends only the largest accumulated gradient
coordinates and keeps the rest on the worker; four techniques keep accuracy at 99.9% sparsity:

* **momentum correction** — accumulate the *velocity*, not the gradient, in the residual (Algorithm 1 with
  eq. 4): ``u ← m·u + g`` and ``v ← v + u``; send ``sparse(v)``; with nothing dropped this is momentum SGD;
* **local gradient clipping** — clip ``g`` on the worker *before* it is added to the accumulation (the paper
  scales a global threshold by ``N^(-1/2)``; here the threshold is given per device);
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

__all__ = ["DGC", "warmup_density", "warmup_spec"]

#: codecs whose ``ratio`` is the share of coordinates they send (what the warm-up raises in early rounds)
SPARSIFIERS = ("topk", "stc", "randk")


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
        masking: momentum factor masking: zero the velocity where the payload carried a value.
        warmup_rounds: sparsity warm-up: the codec's density falls from 1 to its own over these rounds.
    """

    momentum: float = 0.0
    clip: float | None = None
    masking: bool = False
    warmup_rounds: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum correction must be in [0, 1). Found {self.momentum!r}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"local clip must be positive. Found {self.clip!r}")
        if self.masking and self.momentum == 0:
            raise ConfigError(
                "momentum factor masking needs momentum correction (set momentum_correction > 0)"
            )
        if self.warmup_rounds < 0:
            raise ConfigError(f"sparsity warm-up must be 0 or more rounds. Found {self.warmup_rounds!r}")

    @property
    def active(self) -> bool:
        """Whether any technique is on (the client step then runs device by device)."""
        return self.momentum > 0 or self.clip is not None or self.warmup_rounds > 0

    def warming(self, rnd: int) -> bool:
        """Whether round ``rnd`` (1-based) is a warm-up round, whose codec differs from the run's."""
        return 0 < rnd <= self.warmup_rounds

    def codec_for(self, spec: str, rnd: int) -> str:
        """The uplink codec spec of round ``rnd`` (1-based): warmed up during the first rounds."""
        return warmup_spec(spec, rnd, self.warmup_rounds) if self.warmup_rounds else spec

    def prepare(
        self, compressor: Compressor, delta: Delta, velocity: Delta | None, *, spec: str, rnd: int
    ) -> tuple[Delta, Delta | None]:
        """Before compression: clip locally, fold ``delta`` into the velocity, and set the round's codec.

        Returns what to compress (the velocity with momentum correction, else the clipped delta) and the
        new velocity (``None`` without momentum correction). The compressor's error feedback then adds its
        residual to what it is given: DGC's ``v ← v + u``.
        """
        if self.clip is not None:
            norm = delta.norm()
            if norm > self.clip:
                delta = delta * (self.clip / norm)
        compressor.use_codec(self.codec_for(spec, rnd))
        if self.momentum == 0:
            return delta, None
        u = delta if velocity is None else velocity * self.momentum + delta
        return u, u

    def settle(self, velocity: Delta, sent: Delta | None) -> Delta:
        """After compression: momentum factor masking zeroes the velocity where the payload (decoded into
        ``sent``) carried a value; without masking the velocity is kept as it is."""
        if not self.masking:
            return velocity
        if sent is None:
            raise ConfigError("momentum factor masking needs the decoded payload")
        return Delta({k: torch.where(sent[k] != 0, torch.zeros_like(v), v) for k, v in velocity.items()})
