"""The in-process transport: run a secure aggregation round between device objects and a server object.

Every message crosses as bytes (``to_bytes`` on the sender, strict ``from_bytes`` on the receiver), exactly
what the HTTP and Flower transports carry, so measured upload bytes are real wire sizes and the server object
receives nothing a networked server would not. Dropouts can be injected at every stage, and late uploads (a
masked input arriving after the unmasking request) are delivered and refused, as a real server refuses them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from deltaplane.aggregation.secagg.encoding import RingEncoding
from deltaplane.aggregation.secagg.endpoints import DeviceEndpoint, ServerEndpoint
from deltaplane.aggregation.secagg.errors import SecAggOrderError
from deltaplane.aggregation.secagg.identity import DeviceCredentials
from deltaplane.aggregation.secagg.protocol import SecAggConfig, default_threshold, group_size
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import ConfigError, DeltaplaneError

__all__ = ["Dropouts", "SecAggReport", "exchange", "run_secagg", "secure_mean"]


@dataclass(frozen=True)
class Dropouts:
    """Which devices vanish at which stage of a round (ids of invited devices).

    Args:
        before_advertise: never answer the invitation.
        before_shares: advertise keys, then vanish before sharing them.
        before_upload: share keys, then vanish before sending a masked input.
        late_upload: send the masked input only after the server asked for unmasking (it is refused).
        after_upload: upload, then vanish before unmasking (still in the sum); in an authenticated round,
            before the consistency check too (they sign nothing).
        after_signing: in an authenticated round, sign the survivor set, then vanish before unmasking (still in
            the sum); in other rounds the same as ``after_upload``.
    """

    before_advertise: Collection[int] = ()
    before_shares: Collection[int] = ()
    before_upload: Collection[int] = ()
    late_upload: Collection[int] = ()
    after_upload: Collection[int] = ()
    after_signing: Collection[int] = ()

    def plus(self, *, before_upload: Collection[int] = (), after_upload: Collection[int] = ()) -> Dropouts:
        """These dropouts with more devices vanishing before / after their upload."""
        return Dropouts(
            self.before_advertise,
            self.before_shares,
            set(self.before_upload) | set(before_upload),
            self.late_upload,
            set(self.after_upload) | set(after_upload),
            self.after_signing,
        )

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


def exchange(
    devices: Mapping[int, DeviceEndpoint], server: ServerEndpoint, dropouts: Dropouts | None = None
) -> tuple[np.ndarray, SecAggReport]:
    """Carry one round's messages, as bytes, between device endpoints and the server endpoint.

    Devices in ``dropouts`` stop at their stage; late uploaders send their masked input after the unmasking
    request, and the server refuses it (:class:`SecAggOrderError`), as it would on any transport. An
    authenticated server runs the consistency check between the request and the unmasking: every survivor still
    there signs the request, and each responder unmasks with the signatures the server forwards.
    """
    d = dropouts or Dropouts()
    for u, dev in devices.items():
        if u not in d.gone_by(0):
            server.receive(dev.advertise(), sender=u)
    roster = server.roster()
    for u, dev in devices.items():
        if u not in d.gone_by(1):
            server.receive(dev.share(roster), sender=u)
    server.close_shares()
    late: dict[int, bytes] = {}
    for u, dev in devices.items():
        if u in d.gone_by(1) or u in d.before_upload:
            continue
        masked = dev.masked_input(server.inbox(u))
        if u in d.late_upload:
            late[u] = masked
        else:
            server.receive(masked, sender=u)
    request = server.unmask_request()
    refused = []
    for u, payload in late.items():
        try:
            server.receive(payload, sender=u)
        except SecAggOrderError:
            refused.append(u)
    srv = server.server
    present = [u for u in srv.survivors if u not in d.gone_by(3)]
    signatures = None
    if srv.authenticated:  # the consistency check (Bonawitz et al. §4): survivors sign what they were sent
        for u in present:
            server.receive(devices[u].sign_survivors(request), sender=u)
        signatures = server.survivor_signatures()
    responders = [u for u in present if u not in set(d.after_signing)]
    for u in responders:
        server.receive(devices[u].unmask(request, signatures), sender=u)
    total = server.result()
    report = SecAggReport(
        list(srv.survivors),
        list(srv.dropped),
        responders,
        dict(srv.bytes_received),
        server.config.ring_bits,
        sorted(refused),
    )
    return total, report


def run_secagg(
    codes: Mapping[int, np.ndarray],
    config: SecAggConfig,
    *,
    drop_before_upload: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
    dropouts: Dropouts | None = None,
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
    credentials: Mapping[int, DeviceCredentials] | None = None,
    session: bytes = b"",
) -> tuple[np.ndarray, SecAggReport]:
    """The exact integer sum of the codes of the frozen survivors, and a :class:`SecAggReport`.

    Args:
        codes: client id → its quantized update (integers in ``[0, 2^bits)``). Each array is handed only to
            that client's :class:`DeviceEndpoint`; the server endpoint receives bytes of masked messages.
        config: the round's public parameters.
        drop_before_upload / drop_after_upload: shorthands for ``Dropouts(before_upload=..., after_upload=...)``.
        dropouts: dropouts at every stage, and late uploads (merged with the shorthands).
        randbytes: secret randomness for all clients (seeded only in reproducible simulations).
        credentials: client id → that device's enrollment (one for every client in ``codes``): an authenticated
            round, each device signing its advertisement and checking its neighbours' (``session`` names the
            round). None: the semi-honest round.
    """
    d = (dropouts or Dropouts()).plus(before_upload=drop_before_upload, after_upload=drop_after_upload)
    enc = RingEncoding(bits=config.bits)
    if credentials is not None and set(credentials) != set(codes):
        raise ConfigError(f"credentials for clients {sorted(credentials)}, codes for {sorted(codes)}")
    devices = {}
    for u, c in codes.items():
        cred = credentials[u] if credentials is not None else None
        devices[u] = DeviceEndpoint(u, config, enc, randbytes=randbytes, credentials=cred, session=session)
        devices[u].set_codes(c)
    return exchange(devices, ServerEndpoint(config, authenticated=credentials is not None), d)


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
    device_seeds: Sequence[int] | None = None,
    weight_scale: float | None = None,
    min_inputs: int = 0,
    credentials: Sequence[DeviceCredentials] | None = None,
    session: bytes = b"",
) -> tuple[Delta, SecAggReport]:
    """The (example-weighted, with ``weights``) mean of the surviving clients' deltas, via secure aggregation.

    Each client encodes its own delta with :class:`RingEncoding` (clip to ``±clip_range`` per value, quantize to
    ``bits`` bits with unbiased stochastic rounding, append its weight), then runs the protocol; the server sees
    only masked ring elements. ``seed`` makes the whole round reproducible (client secrets included) — for
    simulations only; None uses the OS's secure randomness. ``device_seeds`` (one per delta) seed each device's
    stochastic rounding on its own, so another transport running the same devices unmasks the very same sum.
    ``weight_scale`` is the public typical example count the devices scale by (default: the mean of
    ``weights``); a transport fixes it before the devices train, from the round's sampled devices.
    ``min_inputs`` (distributed DP's m_min) is the fewest survivors whose sum the server unmasks and each
    device helps unmask (:class:`~deltaplane.aggregation.secagg.SecAggClient`): fewer is a SecAggError.
    ``credentials`` (one per delta) make it an authenticated round, as :func:`run_secagg`'s: each device signs
    its advertisement under ``session`` and checks its neighbours', and the consistency check runs before the
    unmasking; the sum is the same.
    """
    if not deltas:
        raise DeltaplaneError("no client delta was given; nothing to aggregate")
    like = deltas[0]
    for dl in deltas[1:]:
        check_compatible(like, dl, "client deltas")
    n = len(deltas)
    if weights is not None and len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} deltas")
    if weight_scale is None:
        weight_scale = float(np.mean(weights)) if weights is not None else 0.0
    enc = RingEncoding(bits=bits, clip_range=clip_range, weight_scale=weight_scale)
    threshold = threshold if threshold is not None else default_threshold(group_size(neighbours, n))
    cfg = SecAggConfig(
        num_clients=n, threshold=threshold, bits=bits, vector_size=enc.vector_size(like),
        neighbours=neighbours, round_id=round_id, graph_seed=_graph_seed(seed),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    randbytes = rng.bytes if seed is not None else secrets.token_bytes
    if device_seeds is not None and len(device_seeds) != n:
        raise ConfigError(f"{len(device_seeds)} device seeds for {n} deltas")
    if credentials is not None and len(credentials) != n:
        raise ConfigError(f"{len(credentials)} device credentials for {n} deltas")
    devices = {}
    for u, dl in enumerate(deltas):  # device side: each quantizes its own update into the ring
        cred = credentials[u] if credentials is not None else None
        devices[u] = DeviceEndpoint(
            u, cfg, enc, randbytes=randbytes, min_inputs=min_inputs, credentials=cred, session=session
        )
        q = np.random.default_rng(device_seeds[u] if device_seeds is not None else rng.integers(2**63))
        devices[u].set_update(dl, int(weights[u]) if weights is not None else 1, q)
    d = (dropouts or Dropouts()).plus(before_upload=drop_before_upload, after_upload=drop_after_upload)
    server = ServerEndpoint(cfg, min_inputs=min_inputs, authenticated=credentials is not None)
    total, report = exchange(devices, server, d)
    mean, _ = enc.decode_sum(total, count=len(report.survivors), like=like)
    return mean, report


def _graph_seed(seed: int | None) -> int:
    """The public seed of the SecAgg+ graph, derived one-way from the simulation's secret ``seed``: the config
    travels to every party, and the same ``seed`` also seeds every device's secrets (``seed`` itself as the
    graph seed let whoever held the config rebuild every mask); a real round (``seed`` None) draws it fresh."""
    if seed is None:
        return secrets.randbits(32)
    return int.from_bytes(
        hashlib.sha256(b"deltaplane/secagg-graph/" + str(int(seed)).encode()).digest()[:4], "big"
    )
