"""The SecAgg stage between the client step and the server step: masked messages in, an unmasked mean out.

The client step ends, under SecAgg, in :attr:`~deltaplane.engine.client.Upload.secure` (the device's clipped,
codec-decoded delta, still on the device). This stage runs the SecAgg(+) protocol as real messages
(:mod:`deltaplane.aggregation.secagg`): each device's :class:`~deltaplane.aggregation.secagg.DeviceEndpoint`
quantizes its delta into the ring, scaled by its example count, with the count itself in one extra masked
slot; the messages cross as bytes to a :class:`~deltaplane.aggregation.secagg.ServerEndpoint`, which only
ever holds masked inputs and their sum. The server step then gets the example-weighted mean
(:meth:`~deltaplane.engine.server.ServerStep.receive_secure_sum`) and nothing else. Every in-process driver
calls :func:`secure_round` (through :func:`deliver`); the HTTP and Flower drivers carry the same messages
over their transports.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np

from deltaplane.delta import Delta, StateDict
from deltaplane.engine.client import Upload
from deltaplane.engine.config import RunConfig
from deltaplane.engine.round_params import (  # the coordinator's too, without torch
    secure_neighbours,
    secure_weight_scale,
)
from deltaplane.engine.seeding import Stream, derive_seed

if TYPE_CHECKING:
    from torch import nn

    from deltaplane.aggregation.secagg import DeviceCredentials, SecAggError
    from deltaplane.aggregation.secagg.enrollment import RunEnrollment
    from deltaplane.engine.server import ServerStep

__all__ = [
    "check_float_uploads",
    "check_ring_carries",
    "deliver",
    "device_seed",
    "lone_input_error",
    "masked_zeros",
    "run_enrollment",
    "secure_neighbours",
    "secure_quorum",
    "secure_round",
    "secure_weight_scale",
]


def device_seed(seed: int, rnd: int, cid: int) -> int:
    """The seed of device ``cid``'s stochastic rounding into the ring in round ``rnd`` (same on every driver)."""
    return derive_seed(seed, Stream.SECAGG, rnd, cid)


def masked_zeros(state: StateDict, local_keys: Collection[str] = ()) -> Delta:
    """Zeros shaped like what a device masks in a SecAgg round on ``state``: every tensor but ``local_keys``
    (the layers a personalized federation keeps on the device). The server sizes the round's vector from it
    and the device checks an invitation against it before training: one function, so the two always agree."""
    return Delta({k: v for k, v in Delta.zeros_like(state).items() if k not in local_keys})


def check_ring_carries(config: RunConfig, num_samples: Sequence[int], *, bound: bool = False) -> None:
    """Refuse, before a run, devices whose example counts a weighted SecAgg ring cannot carry.

    A weighted round (SecAgg without distributed DP) carries each device's count in one ``secagg_bits``-bit
    slot, at most ``2^bits − 1``. A device holding more fails its encoding in process and sits every round out
    over HTTP or in a fleet (it refuses the invitation): refused here instead, the same on every driver.
    ``bound``: ``num_samples`` holds the most a device may hold (the population driver draws its devices lazily).

    Raises:
        ConfigError: a device holds more examples than the ring's weight slot carries; says which bits fit.
    """
    if not config.secagg or config.dp_noise > 0 or not num_samples:
        return
    from deltaplane.aggregation.secagg import max_ring_weight
    from deltaplane.errors import ConfigError

    most, top = max(int(n) for n in num_samples), max_ring_weight(config.secagg_bits)
    if most > top:
        raise ConfigError(
            f"a device {'may hold up to' if bound else 'holds'} {most} examples, but a weighted SecAgg round of {config.secagg_bits}-bit codes carries "
            f"example counts up to {top} (2^{config.secagg_bits} - 1): set secagg.bits (--config) to "
            f"{most.bit_length()} or more"
        )


def check_float_uploads(config: RunConfig, model: nn.Module) -> None:
    """Refuse, before a run, a model whose uploaded tensors include one that SecAgg or DP cannot carry.

    SecAgg sums floating-point tensors in its ring, and DP (central, distributed or local) clips and noises
    them; neither releases an integer tensor (BatchNorm's ``num_batches_tracked``, a step counter) exactly. Each
    such update was refused when it reached the server, round after round: the run went on, and ended, without
    a single device's update (SecAgg alone stopped in round 1). The tensors a personalization keeps on the
    device (FedBN's norms, a FedPer head) are not uploaded, so they do not count.

    Raises:
        UnsupportedOption: names the tensors and the two fixes (keep them on the devices, or build the model
            without them).
    """
    noised = (config.clip is not None and config.dp_noise > 0) or config.local_dp_noise > 0
    if not (config.secagg or noised):
        return
    local = config.make_personalizer().local_keys(model)
    ints = [
        f"{k} ({str(t.dtype).removeprefix('torch.')})"
        for k, t in model.state_dict().items()
        if k not in local and not t.is_floating_point()
    ]
    if not ints:
        return
    from deltaplane.errors import UnsupportedOption

    what = " and ".join(n for n, on in (("SecAgg", config.secagg), ("DP", noised)) if on)
    raise UnsupportedOption(
        f"{what} cannot carry the model's non-float tensors {', '.join(ints[:3])}"
        f"{' and more' if len(ints) > 3 else ''}: SecAgg sums, and DP clips and noises, floating-point tensors "
        "only, so every device's update would be refused every round; keep them on the devices (--personalization fedbn keeps BatchNorm "
        "layers local) or build the model without them (nn.BatchNorm1d(..., track_running_stats=False), "
        "nn.LayerNorm or nn.GroupNorm)"
    )


def secure_quorum(config: RunConfig) -> int:
    """The fewest secure inputs a round runs SecAgg with: 2, since the sum of a lone masked input is that input,
    or under distributed DP m_min (:meth:`RunConfig.min_contributors`, at least 2). The server unmasks whatever
    sum SecAgg gives it, and a sum of fewer than m_min devices carries noise below z·clip: withholding it from the
    published model is not enough, since the server itself would see it (``epsilon_vs_server`` assumes z·clip in
    every sum it sees). Under distributed DP a round of fewer is closed without a sum: nothing is unmasked or
    published, ε is still spent; without DP its secure inputs are refused (:func:`lone_input_error`), so a
    round left with one fails as one whose every update was refused, and nothing of it is unmasked."""
    return max(2, config.unmask_floor())


def lone_input_error(rnd: int, count: int) -> SecAggError:
    """Why a round's ``count`` (< 2) secure inputs are refused rather than summed: the sum would be the input."""
    from deltaplane.aggregation.secagg import SecAggError

    return SecAggError(
        f"round {rnd}: {count} device sent a secure update and SecAgg needs at least 2: the sum of a lone masked "
        "input is that input, so nothing is unmasked (devices dropped out or failed this round)"
    )


def run_enrollment(config: RunConfig) -> RunEnrollment | None:
    """The run's enrollment authority and its devices' identities under ``config.secagg_authenticated`` (None
    otherwise): made once per run by each driver, as an operator enrolls a fleet once, before any round."""
    if not config.secagg_authenticated:
        return None
    from deltaplane.aggregation.secagg.enrollment import RunEnrollment

    return RunEnrollment()


def _credentials(
    config: RunConfig, enrollment: RunEnrollment | None, cids: Sequence[int]
) -> list[DeviceCredentials] | None:
    """The enrolled credentials of devices ``cids`` in an authenticated run (None in another); a driver that
    runs an authenticated config without its enrollment is a ConfigError, never a silently semi-honest round."""
    if not config.secagg_authenticated:
        return None
    if enrollment is None:
        from deltaplane.errors import ConfigError

        raise ConfigError(
            "secagg_authenticated: this driver delivered an authenticated run's round without the run's "
            "enrollment (engine.secure.run_enrollment); its rounds would not be authenticated"
        )
    from deltaplane.aggregation.secagg.enrollment import device_id

    return [enrollment.credentials(device_id(c)) for c in cids]


def secure_round(
    config: RunConfig, uploads: Sequence[Upload], rnd: int, enrollment: RunEnrollment | None = None
) -> tuple[Delta, int]:
    """The example-weighted mean of ``uploads``' secure inputs through SecAgg, and the bytes the devices sent
    (every protocol message: keys, encrypted shares, masked ring values, unmasking shares; authenticated, the
    signed advertisements and the consistency check's signatures too).

    The public weight scale is the mean example count of the round's sampled devices (``uploads``, a device
    whose client step failed included): a transport fixes it before any device has trained (Flower sends it
    with the key advertisement), so every driver uses the same one. ``enrollment``: the run's
    (:func:`run_enrollment`), which an authenticated run (``config.secagg_authenticated``) needs: each device
    signs its key advertisement with its certified identity, checks its neighbours' and signs the survivor set
    before it unmasks; the sum is the same.
    """
    from deltaplane.aggregation.secagg import secure_mean

    inputs = [u for u in uploads if u.secure is not None]
    credentials = _credentials(config, enrollment, [u.cid for u in inputs])
    mean, report = secure_mean(
        [u.secure for u in uploads if u.secure is not None],  # inputs' payloads (the filter narrows them)
        # SecAgg+: the run's degree for this round's size, as the HTTP and Flower drivers open it (threshold
        # ⌊2g/3⌋ + 1 of each neighbourhood of g, secure_mean's default, as the service's)
        neighbours=secure_neighbours(config, len(inputs)),
        weights=[int(u.num_samples) for u in inputs],
        bits=config.secagg_bits,
        clip_range=config.secagg_range,
        round_id=rnd,
        seed=derive_seed(config.seed, Stream.SECAGG, rnd),
        # each device rounds with its own stream, so the Flower and HTTP drivers unmask the very same sum
        device_seeds=[device_seed(config.seed, rnd, u.cid) for u in inputs],
        weight_scale=secure_weight_scale(config, [u.num_samples for u in uploads]),
        min_inputs=config.unmask_floor(),  # distributed DP: server and devices never unmask fewer than m_min
        credentials=credentials,
        session=enrollment.session if enrollment is not None else b"",
    )
    return mean, int(np.sum(list(report.upload_bytes.values())))


def deliver(
    config: RunConfig,
    server: ServerStep,
    uploads: Sequence[Upload],
    rnd: int,
    enrollment: RunEnrollment | None = None,
) -> None:
    """Hand one in-process round's uploads to the server step, in order: a device's error is refused, a payload
    is decoded and aggregated, and the secure inputs (under SecAgg) reach it only as their SecAgg sum
    (authenticated with the run's ``enrollment``, :func:`secure_round`)."""
    run: list[tuple[str, bytes, float]] = []  # consecutive payloads, decoded together (receive_payloads)
    for u in uploads:
        if u.payload is not None and u.error is None:
            run.append((str(u.cid), u.payload, u.num_samples))
            continue
        server.receive_payloads(run)
        run = []
        if u.error is not None:
            server.refuse(str(u.cid), u.error)
    server.receive_payloads(run)
    count = sum(u.secure is not None for u in uploads)
    if config.secagg and 0 < count < secure_quorum(config) and config.dp_noise <= 0:
        for u in uploads:  # a lone secure input is never unmasked; the round fails as "every update refused"
            if u.secure is not None:
                server.refuse(str(u.cid), lone_input_error(rnd, count))
    if config.secagg and count >= secure_quorum(config):
        mean, sent = secure_round(config, uploads, rnd, enrollment)
        server.receive_secure_sum(mean, contributors=count, uplink_bytes=sent)
