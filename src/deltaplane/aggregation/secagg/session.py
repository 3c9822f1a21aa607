"""Run a whole secure aggregation round in-process: for simulations, tests and benchmarks.

The message flow is exactly what a networked deployment would carry — each client object only sees what the
server routes to it, and the server only sees what clients send — so measured upload bytes are real wire sizes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from deltaplane.aggregation.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer
from deltaplane.aggregation.secagg.ring import dequantize_sum, quantize
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import ConfigError, DeltaplaneError

__all__ = ["SecAggReport", "run_secagg", "secure_mean"]


@dataclass(frozen=True)
class SecAggReport:
    """What happened in one round: who made it, and how many bytes each client uploaded."""

    survivors: list[int]
    dropped: list[int]
    responders: list[int]
    upload_bytes: dict[int, int]
    ring_bits: int

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
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[np.ndarray, SecAggReport]:
    """The exact integer sum of the codes of every client that uploaded, and a :class:`SecAggReport`.

    Args:
        codes: client id → its quantized update (integers in ``[0, 2^bits)``), for every invited client.
        config: the round's public parameters.
        drop_before_upload: clients that vanish after sharing keys but before sending their masked input.
        drop_after_upload: clients that send their masked input and then vanish (they are in the sum).
        randbytes: secret randomness for all clients (seeded only in reproducible simulations).
    """
    clients = {u: SecAggClient(u, config, randbytes=randbytes) for u in codes}
    server = SecAggServer(config)
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    keys = server.broadcast_keys()
    for u, c in clients.items():
        server.receive_shares(u, c.share_keys(keys))
    for u, c in clients.items():
        if u not in drop_before_upload:
            server.receive_masked_input(u, c.masked_input(server.shares_for(u), codes[u]))
    survivors, dropped = server.unmask_request()
    responders = [u for u in survivors if u not in drop_after_upload]
    for u in responders:
        server.receive_unmask(u, clients[u].unmask(survivors, dropped))
    total = server.result()
    report = SecAggReport(survivors, dropped, responders, dict(server.bytes_received), config.ring_bits)
    return total, report


def secure_mean(
    deltas: Sequence[Delta],
    *,
    bits: int = 16,
    clip_range: float = 1.0,
    threshold: int | None = None,
    neighbours: int | None = None,
    drop_before_upload: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
    round_id: int = 0,
    seed: int | None = None,
) -> tuple[Delta, SecAggReport]:
    """The mean of the uploaded clients' deltas, computed through secure aggregation.

    Each delta is flattened, clipped to ``±clip_range`` per value and quantized to ``bits`` bits with unbiased
    stochastic rounding on the client; the server sees only masked ring elements. ``seed`` makes the whole
    round reproducible (client secrets included) — for simulations only; None uses the OS's secure randomness.
    """
    if not deltas:
        raise DeltaplaneError("no client delta was given; nothing to aggregate")
    if not clip_range > 0:
        raise ConfigError(f"clip_range must be positive. Found {clip_range!r}")
    like = deltas[0]
    for d in deltas[1:]:
        check_compatible(like, d, "client deltas")
    for d in deltas:
        d.check_finite()
    n = len(deltas)
    group = (neighbours if neighbours is not None else n - 1) + 1
    threshold = threshold if threshold is not None else group // 2 + 1
    flat0 = like.flatten()
    cfg = SecAggConfig(
        num_clients=n, threshold=threshold, bits=bits, vector_size=max(1, flat0.numel()),
        neighbours=neighbours, round_id=round_id, graph_seed=0 if seed is None else seed,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    randbytes = rng.bytes if seed is not None else secrets.token_bytes
    codes = {
        u: quantize(d.flatten().numpy(), clip_range=clip_range, bits=bits, rng=np.random.default_rng(rng.integers(2**63)))
        for u, d in enumerate(deltas)
    }  # fmt: skip
    total, report = run_secagg(
        codes,
        cfg,
        drop_before_upload=drop_before_upload,
        drop_after_upload=drop_after_upload,
        randbytes=randbytes,
    )
    count = len(report.survivors)
    mean = dequantize_sum(total, count=count, clip_range=clip_range, bits=bits) / count
    return like.unflatten(torch.from_numpy(mean).float()), report
