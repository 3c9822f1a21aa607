"""The SecAgg stage between the client step and the server step: masked inputs in, an unmasked sum out.

The client step ends, under SecAgg, in :attr:`~deltaplane.engine.client.Upload.secure` (the device's clipped,
codec-decoded delta, still on the device); this stage runs the SecAgg(+) protocol over the round's devices
and gives the server step (:meth:`~deltaplane.engine.server.ServerStep.receive_secure_sum`) only the weighted
mean. Every driver calls :func:`secure_round`; the transport of the protocol's messages (in process today)
is the one place a driver changes.

Each device scales its delta by ``m·nᵢ/Σn`` before masking (the server announces ``Σn``: it knows each
device's sample count, as plain FedAvg weighs by it), so the secure *uniform* mean is the sample-weighted
mean FedAvg would compute.
"""

from __future__ import annotations

from collections.abc import Sequence

from deltaplane.delta import Delta
from deltaplane.engine.client import Upload
from deltaplane.engine.config import RunConfig
from deltaplane.engine.seeding import Stream, derive_seed

__all__ = ["secure_round"]


def secure_round(config: RunConfig, uploads: Sequence[Upload], rnd: int) -> tuple[Delta, int]:
    """The sample-weighted mean of ``uploads``' secure inputs through SecAgg, and the bytes the devices sent
    (masked ring values, what actually crossed the wire)."""
    from deltaplane.aggregation.secagg import secure_mean

    inputs = [u for u in uploads if u.secure is not None]
    total = sum(u.num_samples for u in inputs)
    scaled = [u.secure * (len(inputs) * u.num_samples / total) for u in inputs]  # type: ignore[operator]
    mean, report = secure_mean(
        scaled,
        bits=config.secagg_bits,
        clip_range=config.secagg_range,
        round_id=rnd,
        seed=derive_seed(config.seed, Stream.SECAGG, rnd),
    )
    return mean, sum(report.upload_bytes.values())
