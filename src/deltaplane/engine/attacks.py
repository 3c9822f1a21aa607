"""Poisoning attacks for the simulator: what a malicious fraction of clients does to its data or its update.

An :class:`Attack` may change a malicious client's training data before local training (:meth:`poison_data`)
and/or its update after training (:meth:`poison_update`). Attacks are specified as text, ``"backdoor:0.2"``
(name, then the fraction of malicious clients), and built with :func:`parse_attack`.

* ``sign_flip`` — send ``−scale·Δ`` (Damaskinos et al. 2018; the classic untargeted attack).
* ``model_replacement`` — train the backdoor and scale the update by ``boost`` (default 10) so it dominates
  the average (Bagdasaryan et al. 2020, https://arxiv.org/abs/1807.00459).
* ``label_flip`` — train on labels ``y → C − 1 − y`` (Fang et al. 2020, https://arxiv.org/abs/1911.11815).
* ``gaussian`` — send pure Gaussian noise of std ``std`` (Blanchard et al. 2017).
* ``backdoor`` — pixel-pattern backdoor (Gu et al. 2017 BadNets, https://arxiv.org/abs/1708.06733; in FL,
  Bagdasaryan et al. 2020): stamp a 2×2 bright square in the bottom-right corner of a share of the client's
  images and relabel them ``target``; optionally boost the update (model replacement).
* ``bounded_backdoor`` — the adaptive "constrain-and-scale" attacker (Bagdasaryan et al. 2020 §4; Sun et al.
  2019): train the backdoor, boost it, then scale the update to exactly ``max_norm`` — the largest norm a norm
  bound or an adaptive clip would let through — so that clipping no longer takes its boost away.
* ``malformed_frame`` — a protocol-level attacker: the device sends a well-formed, CRC-valid wire frame whose
  tensor table lies about a shape (the first tensor of asymmetric shape declared reversed, e.g. ``[8, 1, 3, 3]``
  as ``[3, 3, 1, 8]``: the same element count and field lengths, so nothing but the server's strict check of
  the layout tells it apart from an honest update). Every driver's server refuses it (``ShapeMismatch``) and
  the round goes on without it; the device's own state (error feedback) moves as an honest device's does.
* ``dba`` — distributed backdoor (Xie et al. 2020, ICLR, https://openreview.net/forum?id=rkgyS0VFvr): the 2×2
  trigger is split into its 4 pixels and the ``i``-th attacker stamps only pixel ``i mod 4``; no single
  attacker trains the whole trigger, yet the global model is tested with the whole one.

Specs use the codecs' grammar, ``"backdoor(0.2, boost=5)"`` (the first parameter is the malicious
fraction); the older ``"backdoor:0.2:boost=5"`` means the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from deltaplane.delta import Delta
from deltaplane.errors import ConfigError, UnsupportedOption
from deltaplane.specs import parse_one_spec

if TYPE_CHECKING:
    from deltaplane.codecs import WireSession

__all__ = [
    "ATTACKS",
    "Attack",
    "Backdoor",
    "BoundedBackdoor",
    "DistributedBackdoor",
    "GaussianNoise",
    "LabelFlip",
    "MalformedFrame",
    "ModelReplacement",
    "SignFlip",
    "add_trigger",
    "choose_malicious",
    "malicious_count",
    "parse_attack",
]


def add_trigger(x: Tensor, part: int | None = None) -> Tensor:
    """Images ``(N, 1, 8, 8)`` in [0, 1] with the backdoor trigger: a 2×2 square at full intensity, bottom right
    (``part`` 0–3: only that pixel of the square, a distributed backdoor's local trigger)."""
    x = x.clone()
    if part is None:
        x[..., -3:-1, -3:-1] = 1.0
    else:
        r, c = divmod(part % 4, 2)
        x[..., -3 + r, -3 + c] = 1.0
    return x


class Attack:
    """No-op base: honest behaviour. Subclasses override one or both hooks."""

    name = "none"

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The training data a malicious client actually trains on."""
        return x, y

    def poison_update(self, delta: Delta, generator: torch.Generator) -> Delta:
        """The update a malicious client actually sends."""
        return delta

    #: whether the attacker replaces its wire payload itself (:meth:`forge`), after its honest compression
    forges_frames = False

    def forge(self, payload: bytes, session: WireSession | None = None) -> bytes:
        """The bytes a malicious client sends instead of its honest ``payload`` (a compact frame of the
        :class:`~deltaplane.codecs.WireSession` ``session``, or self-describing); ``payload`` itself here."""
        return payload

    def for_attacker(self, rank: int) -> Attack:
        """The attack as the ``rank``-th malicious client runs it (the same for all but distributed attacks)."""
        return self

    def fit(self, task: Any) -> Attack:
        """The attack on ``task``'s data (a :class:`~deltaplane.engine.Task`): itself unless it depends on the
        data; raises :class:`ConfigError` or :class:`UnsupportedOption` when it cannot apply to that data."""
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class SignFlip(Attack):
    """Send ``−scale · Δ``."""

    name = "sign_flip"

    def __init__(self, *, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ConfigError(f"scale must be positive. Found {scale!r}")
        self.scale = scale

    def poison_update(self, delta: Delta, generator: torch.Generator) -> Delta:
        return delta * (-self.scale)


class GaussianNoise(Attack):
    """Replace the update with N(0, std²) noise."""

    name = "gaussian"

    def __init__(self, *, std: float = 0.5) -> None:
        if not std > 0:
            raise ConfigError(f"std must be positive. Found {std!r}")
        self.std = std

    def poison_update(self, delta: Delta, generator: torch.Generator) -> Delta:
        return delta.map(
            lambda _, t: (
                self.std * torch.randn(t.shape, generator=generator, dtype=t.dtype)
                if t.is_floating_point()
                else t
            )
        )


class MalformedFrame(Attack):
    """Send a CRC-valid frame whose tensor table declares a wrong shape (see the module docstring).

    The lie is told on what the device would have sent (its payload decoded, re-encoded with the same codec and
    framed as it was framed: compact in the device's wire session, else self-describing), so the forged frame is
    the same on every driver, and only the declared shape is wrong: a server that skipped its layout check
    would reshape the update and apply it. The device's own compressor compressed the honest update first (its
    error feedback moves as an honest device's), as a faulty or hostile client library would.
    """

    name = "malformed_frame"
    forges_frames = True

    def forge(self, payload: bytes, session: WireSession | None = None) -> bytes:
        from deltaplane.codecs import Compressor, decompress, is_compact
        from deltaplane.codecs.fuzzing import parse, serialize, serialize_compact
        from deltaplane.codecs.wire import read_table

        compact = is_compact(payload)
        if compact:
            if session is None:
                raise ConfigError("malformed_frame: a compact payload needs its wire session to be re-framed")
            header = session.read_frame(payload)[0].header
        else:
            header = read_table(payload).header
        sent = decompress(payload, session=session if compact else None)
        frame = Compressor(header.codec, error_feedback=False).compress(
            sent, base_id=header.base_id, base_version=header.base_version
        )
        doc = parse(frame).doc
        node = next((row[2] for row in doc["t"] if row[2]["s"] != row[2]["s"][::-1]), None)
        if node is None:
            raise ConfigError(
                "malformed_frame: every tensor of this model has a symmetric shape; no lie to tell"
            )
        node["s"] = node["s"][::-1]
        if session is not None and compact:  # compact implies a session (refused above without one)
            return serialize_compact(doc, session, base_version=header.base_version)[0]
        return serialize(doc, header="dict")


class LabelFlip(Attack):
    """Train on flipped labels ``y → num_classes − 1 − y``."""

    name = "label_flip"

    def __init__(self, *, num_classes: int | None = None) -> None:
        if num_classes is not None and num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2. Found {num_classes!r}")
        #: given in the spec, else the task's (:meth:`fit`); 10, the digits', for an attack not fitted to a task
        self._given = num_classes
        self.num_classes = 10 if num_classes is None else num_classes

    def fit(self, task: Any) -> Attack:
        # flipped with the digits' 10 classes, a 2-class task's labels became 9 and 8: an index error in the
        # loss in round 1
        if self._given is None:
            return LabelFlip(num_classes=task.num_classes)
        if self._given > task.num_classes:
            raise ConfigError(
                f"attack label_flip(num_classes={self._given}) flips labels into 0..{self._given - 1}, but task "
                f"{task.name!r} has {task.num_classes} classes; leave num_classes out to use the task's"
            )
        return self

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return x, self.num_classes - 1 - y


class Backdoor(Attack):
    """Pixel-pattern backdoor: a share ``poison_fraction`` of the client's images get the trigger and the label
    ``target``; the rest stay clean so the model keeps its main-task accuracy. ``boost > 1`` also scales the
    update (model replacement)."""

    name = "backdoor"

    def __init__(self, *, target: int = 0, poison_fraction: float = 0.5, boost: float = 1.0) -> None:
        if not 0 < poison_fraction <= 1:
            raise ConfigError(f"poison_fraction must be in (0, 1]. Found {poison_fraction!r}")
        if not boost > 0:
            raise ConfigError(f"boost must be positive. Found {boost!r}")
        self.target = target
        self.poison_fraction = poison_fraction
        self.boost = boost

    def fit(self, task: Any) -> Attack:
        shape = list(task.test.x.shape[1:])
        if len(shape) != 3 or min(shape[1:]) < 3:
            # add_trigger indexes the last two axes as pixels: on inputs (N, features) it overwrote two
            # features of the last samples but one, and the run reported a backdoor that was never planted
            raise UnsupportedOption(
                f"attack {self.name!r} stamps a pixel square on images (C, H, W of 3×3 or more), and task "
                f"{task.name!r} has inputs of shape {shape}; use sign_flip, gaussian or label_flip"
            )
        if not (isinstance(self.target, int) and 0 <= self.target < task.num_classes):
            raise ConfigError(
                f"attack {self.name!r}: target {self.target!r} is not a class of task {task.name!r} "
                f"(0..{task.num_classes - 1})"
            )
        return self

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = len(y)
        k = max(1, math.ceil(self.poison_fraction * n))
        idx = torch.randperm(n, generator=generator)[:k]
        x, y = x.clone(), y.clone()
        x[idx] = add_trigger(x[idx])
        y[idx] = self.target
        return x, y

    def poison_update(self, delta: Delta, generator: torch.Generator) -> Delta:
        return delta * self.boost if self.boost != 1.0 else delta


class BoundedBackdoor(Backdoor):
    """Constrain-and-scale backdoor (Bagdasaryan et al. 2020, https://arxiv.org/abs/1807.00459, §4): boost the
    backdoor update, then scale it to exactly ``max_norm`` — an attacker that knows (or guesses) the server's
    norm bound sends the largest update the bound lets through, in the backdoor's direction."""

    name = "bounded_backdoor"

    def __init__(
        self, *, target: int = 0, poison_fraction: float = 0.5, boost: float = 5.0, max_norm: float = 2.0
    ) -> None:
        super().__init__(target=target, poison_fraction=poison_fraction, boost=boost)
        if not max_norm > 0:
            raise ConfigError(f"max_norm must be positive. Found {max_norm!r}")
        self.max_norm = max_norm

    def poison_update(self, delta: Delta, generator: torch.Generator) -> Delta:
        norm = (delta * self.boost).norm()
        return delta * (self.boost * self.max_norm / norm) if norm > 0 else delta


class DistributedBackdoor(Backdoor):
    """Distributed backdoor attack (Xie et al. 2020, ICLR, https://openreview.net/forum?id=rkgyS0VFvr): the
    global trigger (the 2×2 square) is cut into 4 local triggers (its pixels); attacker ``i`` stamps only local
    trigger ``i mod 4``. Success is measured with the whole trigger."""

    name = "dba"

    def __init__(
        self, *, target: int = 0, poison_fraction: float = 0.5, boost: float = 1.0, part: int | None = None
    ) -> None:
        super().__init__(target=target, poison_fraction=poison_fraction, boost=boost)
        if part is not None and not (isinstance(part, int) and 0 <= part < 4):
            raise ConfigError(f"part must be 0, 1, 2 or 3. Found {part!r}")
        self.part = part

    def for_attacker(self, rank: int) -> Attack:
        return DistributedBackdoor(
            target=self.target, poison_fraction=self.poison_fraction, boost=self.boost, part=rank % 4
        )

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.part is None:
            return super().poison_data(x, y, generator)
        n = len(y)
        k = max(1, math.ceil(self.poison_fraction * n))
        idx = torch.randperm(n, generator=generator)[:k]
        x, y = x.clone(), y.clone()
        x[idx] = add_trigger(x[idx], self.part)
        y[idx] = self.target
        return x, y


class ModelReplacement(Backdoor):
    """Scaled model replacement (Bagdasaryan et al. 2020, https://arxiv.org/abs/1807.00459): train the backdoor,
    then scale the update by ``boost`` (≈ number of clients / server lr) so that it replaces the global model."""

    name = "model_replacement"

    def __init__(self, *, target: int = 0, poison_fraction: float = 0.5, boost: float = 10.0) -> None:
        super().__init__(target=target, poison_fraction=poison_fraction, boost=boost)


ATTACKS: dict[str, Callable[..., Attack]] = {
    "none": Attack,
    "sign_flip": SignFlip,
    "model_replacement": ModelReplacement,
    "gaussian": GaussianNoise,
    "label_flip": LabelFlip,
    "backdoor": Backdoor,
    "bounded_backdoor": BoundedBackdoor,
    "dba": DistributedBackdoor,
    "malformed_frame": MalformedFrame,
}


def parse_attack(spec: str) -> tuple[Attack, float]:
    """``"backdoor(0.2)"`` or ``"backdoor(fraction=0.2, boost=5)"`` → (attack, malicious fraction).

    The grammar is the codecs' (:func:`deltaplane.codecs.parse_spec`); the older
    ``"name:fraction:key=value,key=value"`` (``"backdoor:0.2:boost=5"``) means the same.
    """
    text = spec.strip()
    if "(" not in text and ":" in text:
        parts = text.split(":")
        if len(parts) > 3:  # name:fraction:k=v,k=v — anything after a third ':' used to be dropped silently
            raise ConfigError(
                f"attack spec {spec!r}: write 'name:fraction:key=value,key=value' (separate the parameters "
                f"with ',') or, better, '{parts[0].strip()}(fraction, key=value)'"
            )
        inner = ", ".join(
            p for p in [parts[1].strip(), *(parts[2].split(",") if len(parts) > 2 else [])] if p
        )
        text = f"{parts[0].strip()}({inner})"
    name, args, kwargs = parse_one_spec(text, label=f"attack spec {spec!r}", noun="attacks")
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    if name == "none":
        return Attack(), 0.0
    if len(args) > 1:
        raise ConfigError(
            f"attack spec {spec!r}: only the fraction is positional; name the others (key=value)"
        )
    if args and "fraction" in kwargs:
        raise ConfigError(f"attack spec {spec!r}: fraction given twice")
    fraction = args[0] if args else kwargs.pop("fraction", None)
    kwargs.pop("fraction", None)
    if fraction is None:
        raise ConfigError(f"attack spec {spec!r} needs a malicious fraction, e.g. '{name}(0.2)'")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ConfigError(f"attack fraction must be a number in (0, 1). Found {fraction!r}")
    if not 0 < fraction < 1:
        raise ConfigError(f"attack fraction must be in (0, 1). Found {fraction!r}")
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"attack parameter {key}={value!r} must be a number")
    try:
        return ATTACKS[name](**kwargs), float(fraction)
    except TypeError as exc:
        raise ConfigError(f"attack {name!r}: {exc}") from None


def malicious_count(
    fraction: float,
    devices: int,
    *,
    spec: str | None = None,
    counted: str = "clients",
    fix: str = "raise clients",
) -> int:
    """``round(fraction · devices)``: how many of ``devices`` an attack's malicious fraction makes attackers.

    ``devices`` is the count the fraction applies to on the driver that runs the attack: ``clients`` on the
    sequential, batched, HTTP-simulation and Flower drivers, the registered devices on the population engine
    (:func:`~deltaplane.sim.population.run_population`'s ``registered``). ``counted`` names that count and
    ``fix`` how to raise it, for the message.

    Raises:
        ConfigError: the fraction gives no attacker at all (the run would go ahead unattacked and still report
            a backdoor success); the message names the count used and the least fraction giving one attacker.
    """
    k = round(fraction * devices)
    if fraction > 0 and k == 0:
        what = f"attack {spec!r}: a" if spec else "A"
        raise ConfigError(
            f"{what} malicious fraction of {fraction:g} of {devices} {counted} rounds to no malicious client, "
            f"so the attack would not run; use a fraction of at least {1 / devices:.3g} (one of {devices}) "
            f"or {fix}"
        )
    return k


def choose_malicious(
    num_clients: int,
    fraction: float,
    rng: np.random.Generator,
    *,
    spec: str | None = None,
    counted: str = "clients",
    fix: str = "raise clients",
) -> frozenset[int]:
    """The ids of ``round(fraction · num_clients)`` malicious clients, fixed for the whole run.

    Raises:
        ConfigError: a positive fraction that gives no malicious client (:func:`malicious_count`).
    """
    k = malicious_count(fraction, num_clients, spec=spec, counted=counted, fix=fix)
    return frozenset(int(i) for i in rng.choice(num_clients, size=k, replace=False)) if k else frozenset()
