"""The in-process transport: run a secure aggregation round between device objects and a server object.

Every message crosses as bytes (``to_bytes`` on the sender, strict ``from_bytes`` on the receiver), exactly
what the HTTP and Flower transports carry, so measured upload bytes are real wire sizes and the server object
receives nothing a networked server would not. Dropouts can be injected at every stage, and late uploads (a
masked input arriving after the unmasking request) are delivered and refused, as a real server refuses them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from deltaplane.aggregation.secagg.encoding import RingEncoding
from deltaplane.aggregation.secagg.errors import SecAggOrderError
from deltaplane.aggregation.secagg.messages import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from deltaplane.aggregation.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import ConfigError, DeltaplaneError

__all__ = ["Dropouts", "SecAggReport", "run_secagg", "secure_mean"]


@dataclass(frozen=True)
class Dropouts:
    """Which devices vanish at which stage of a round (ids of invited devices).

    Args:
        before_advertise: never answer the invitation.
        before_shares: advertise keys, then vanish before sharing them.
        before_upload: share keys, then vanish before sending a masked input.
        late_upload: send the masked input only after the server asked for unmasking (it is refused).
        after_upload: upload, then vanish before unmasking (still in the sum).
    """

    before_advertise: Collection[int] = ()
    before_shares: Collection[int] = ()
    before_upload: Collection[int] = ()
    late_upload: Collection[int] = ()
    after_upload: Collection[int] = ()

    def gone_by(self, stage: int) -> set[int]:
        """Devices that do not take part in stage ``stage`` (0 advertise, 1 share, 2 upload, 3 unmask)."""
        groups = [self.before_advertise, self.before_shares, self.before_upload, self.after_upload]
        out: set[int] = set()
        for g in groups[: stage + 1]:
            out |= set(g)
        if stage >= 2:
            out |= set(self.late_upload)
        return out


@dataclass(frozen=True)
class SecAggReport:
    """What happened in one round: who made it, and how many bytes each client uploaded."""

    survivors: list[int]
    dropped: list[int]
    responders: list[int]
    upload_bytes: dict[int, int]
    ring_bits: int
    #: devices whose masked input arrived after the unmasking request and was refused (typed errors)
    refused_late: list[int] = field(default_factory=list)

    def overhead(self, bits: int, vector_size: int) -> float:
        """Largest per-client upload divided by the unmasked packed ``bits``-bit update."""
        plain = math.ceil(vector_size * bits / 8)
        return max(self.upload_bytes[u] for u in self.survivors) / plain


def run_secagg(
    codes: Mapping[int, np.ndarray],
    config: SecAggConfig,
    *,
    drop_before_upload: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
    dropouts: Dropouts | None = None,
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[np.ndarray, SecAggReport]:
    """The exact integer sum of the codes of the frozen survivors, and a :class:`SecAggReport`.

    Args:
        codes: client id → its quantized update (integers in ``[0, 2^bits)``). Each array is handed only to
            that client's :class:`SecAggClient`; the server object sees bytes of masked messages.
        config: the round's public parameters.
        drop_before_upload / drop_after_upload: shorthands for ``Dropouts(before_upload=..., after_upload=...)``.
        dropouts: dropouts at every stage, and late uploads (merged with the shorthands).
        randbytes: secret randomness for all clients (seeded only in reproducible simulations).
    """
    d = dropouts or Dropouts()
    d = Dropouts(
        d.before_advertise,
        d.before_shares,
        set(d.before_upload) | set(drop_before_upload),
        d.late_upload,
        set(d.after_upload) | set(drop_after_upload),
    )
    clients = {u: SecAggClient(u, config, randbytes=randbytes) for u in codes}
    server = SecAggServer(config)

    def up(msg_bytes: bytes, cls: type) -> object:  # device -> server: decoded strictly on arrival
        return cls.from_bytes(msg_bytes, config)

    def down(msg_bytes: bytes, cls: type) -> object:  # server -> device
        return cls.from_bytes(msg_bytes, config)

    for u, c in clients.items():
        if u not in d.gone_by(0):
            server.receive_keys(up(c.advertise_keys().to_bytes(), AdvertiseKeys))  # type: ignore[arg-type]
    roster = server.roster().to_bytes()
    for u, c in clients.items():
        if u not in d.gone_by(1):
            share = c.share_keys(down(roster, KeyRoster))  # type: ignore[arg-type]
            server.receive_shares(up(share.to_bytes(), ShareKeys))  # type: ignore[arg-type]
    server.close_shares()
    late: dict[int, bytes] = {}
    for u, c in clients.items():
        if u in d.gone_by(1) or u in d.before_upload:
            continue
        masked = c.masked_input(down(server.inbox(u).to_bytes(), ShareInbox), codes[u])  # type: ignore[arg-type]
        if u in d.late_upload:
            late[u] = masked.to_bytes()
        else:
            server.receive_masked_input(up(masked.to_bytes(), MaskedInput))  # type: ignore[arg-type]
    request = server.unmask_request().to_bytes()
    refused = []
    for u, payload in late.items():
        try:
            server.receive_masked_input(up(payload, MaskedInput))  # type: ignore[arg-type]
        except SecAggOrderError:
            refused.append(u)
    req = down(request, UnmaskRequest)
    responders = [u for u in req.survivors if u not in d.gone_by(3)]  # type: ignore[attr-defined]
    for u in responders:
        server.receive_unmask(up(clients[u].unmask(req).to_bytes(), UnmaskResponse))  # type: ignore[arg-type]
    total = server.result()
    report = SecAggReport(
        list(server.survivors),
        list(server.dropped),
        responders,
        dict(server.bytes_received),
        config.ring_bits,
        sorted(refused),
    )
    return total, report


def secure_mean(
    deltas: Sequence[Delta],
    *,
    bits: int = 16,
    clip_range: float = 1.0,
    weights: Sequence[int] | None = None,
    threshold: int | None = None,
    neighbours: int | None = None,
    drop_before_upload: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
    dropouts: Dropouts | None = None,
    round_id: int = 0,
    seed: int | None = None,
) -> tuple[Delta, SecAggReport]:
    """The (example-weighted, with ``weights``) mean of the surviving clients' deltas, via secure aggregation.

    Each client encodes its own delta with :class:`RingEncoding` (clip to ``±clip_range`` per value, quantize to
    ``bits`` bits with unbiased stochastic rounding, append its weight), then runs the protocol; the server sees
    only masked ring elements. ``seed`` makes the whole round reproducible (client secrets included) — for
    simulations only; None uses the OS's secure randomness.
    """
    if not deltas:
        raise DeltaplaneError("no client delta was given; nothing to aggregate")
    like = deltas[0]
    for dl in deltas[1:]:
        check_compatible(like, dl, "client deltas")
    n = len(deltas)
    if weights is not None and len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} deltas")
    weight_scale = float(np.mean(weights)) if weights is not None else 0.0
    enc = RingEncoding(bits=bits, clip_range=clip_range, weight_scale=weight_scale)
    group = (neighbours if neighbours is not None else n - 1) + 1
    threshold = threshold if threshold is not None else group // 2 + 1
    cfg = SecAggConfig(
        num_clients=n, threshold=threshold, bits=bits, vector_size=enc.vector_size(like),
        neighbours=neighbours, round_id=round_id, graph_seed=0 if seed is None else seed,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    randbytes = rng.bytes if seed is not None else secrets.token_bytes
    codes = {
        u: enc.encode(dl, int(weights[u]) if weights is not None else 1, np.random.default_rng(rng.integers(2**63)))
        for u, dl in enumerate(deltas)
    }  # fmt: skip
    total, report = run_secagg(
        codes,
        cfg,
        drop_before_upload=drop_before_upload,
        drop_after_upload=drop_after_upload,
        dropouts=dropouts,
        randbytes=randbytes,
    )
    mean, _ = enc.decode_sum(total, count=len(report.survivors), like=like)
    return mean, report
