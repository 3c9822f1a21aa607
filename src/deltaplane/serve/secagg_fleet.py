"""A simulated fleet running one secure aggregation round against a live service (tests, benchmarks, demos).

Each device is a :class:`~deltaplane.serve.secagg_client.SecAggDevice` with its own token; devices run each stage
concurrently over one pooled HTTP connection set, and the operator closes each stage once the devices that
are still there have spoken (a deployment would close it at a deadline instead). Dropouts are injected at every
stage (:class:`~deltaplane.aggregation.secagg.Dropouts`), including late uploads, which the server must refuse
with 409. The report says who made it, how long each stage took and how many bytes each device sent.

An *authenticated* round (``authenticated=True``) enrolls every device first, as an operator does out of band
(``fleet enroll --authority-key``): a fresh enrollment authority certifies each device's fresh identity key, and
each device trusts that authority alone; the devices then sign their key advertisements, check every neighbour's
certificate and signature in the roster, and run the consistency check before unmasking
(:mod:`deltaplane.aggregation.secagg.identity`).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from deltaplane.aggregation.secagg import DeviceCredentials, Dropouts
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.delta import Delta
from deltaplane.errors import DeltaplaneError
from deltaplane.registry.signing import Verifier
from deltaplane.serve.client import AdminClient, DeviceClient, ServiceError, _http_client
from deltaplane.serve.secagg_client import SecAggDevice

__all__ = ["FleetReport", "device_rng", "enroll_fleet", "run_secagg_fleet"]

#: the cohort the harness's device tokens and certificates name (a device trusts neighbours of its own cohort)
COHORT = "secagg"


def device_rng(seed: int, device: int) -> np.random.Generator:
    """The stochastic-rounding generator of simulated device ``device`` (tests recompute its codes with it)."""
    return np.random.default_rng([seed, device])


@dataclass
class FleetReport:
    """What one fleet round did: membership, timing per stage, bytes per device, the published version."""

    round: int
    config: dict[str, Any]
    survivors: list[int]
    dropped: list[int]
    refused_late: list[int]
    stage_seconds: dict[str, float]
    bytes_sent: dict[int, int]
    published: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())


def enroll_fleet(names: Sequence[str], *, valid_s: int = 86_400) -> list[DeviceCredentials]:
    """Credentials for devices ``names``: one fresh enrollment authority (kept nowhere: the harness's round
    needs no more devices) certifies a fresh identity key per device, valid ``valid_s`` seconds, in
    :data:`COHORT`; every device trusts that authority. What ``fleet enroll --authority-key`` does on disk."""
    enrollment = RunEnrollment(cohort=COHORT, valid_s=valid_s)
    return [enrollment.credentials(d) for d in names]


def run_secagg_fleet(
    base_url: str,
    admin_token: str,
    model: str,
    updates: Sequence[Delta],
    weights: Sequence[int],
    *,
    verifier: Verifier,
    dropouts: Dropouts | None = None,
    bits: int | None = None,
    clip_range: float = 1.0,
    weight_scale: float | None = None,
    neighbours: int | None = None,
    seed: int = 0,
    workers: int = 8,
    authenticated: bool = False,
    tls: ssl.SSLContext | None = None,
    service_spki: str | None = None,
    allow_plain_http: bool = False,
) -> FleetReport:
    """Run one SecAgg round of ``len(updates)`` simulated devices against the service at ``base_url``.

    Device ``i`` holds ``updates[i]`` (relative to the round's base version) and ``weights[i]`` examples; it
    quantizes them into the ring itself with :func:`device_rng` ``(seed, i)``. Secret randomness comes from the
    OS. ``weight_scale`` defaults to the mean of ``weights`` (as in process: the round publishes the
    example-weighted mean); 0 averages unweighted. ``bits`` (the ring's bits per value) defaults to the
    service's: its ``--federation``'s ``secagg.bits``, else a run config's default (20), which carries the
    service's default ``--max-examples``. ``verifier`` holds the registry's public keys the devices trust.
    ``authenticated`` enrolls the devices (:func:`enroll_fleet`, not timed: enrollment happens once, out of band)
    and opens an authenticated round: signed advertisements and a ``consistency check`` stage, in which the
    survivors that are still there sign the unmasking request. ``tls`` is the devices' (and the operator's)
    SSL context for an ``https://`` service (:func:`~deltaplane.serve.tls.client_context`); ``service_spki``
    pins the service's key (``sha256:<hex>``, as :class:`~deltaplane.serve.DeviceClient` does): a server
    presenting another key is refused during the first handshake
    (:class:`~deltaplane.errors.ServiceKeyMismatch`), before anything is sent. Returns a
    :class:`FleetReport`; ``allow_plain_http`` lets the devices take an authenticated round from a plain-HTTP
    service off loopback (:class:`~deltaplane.serve.secagg_client.SecAggDevice`); raises :class:`~deltaplane.serve.ServiceError` on any unexpected status.
    """
    n = len(updates)
    dropouts = dropouts or Dropouts()
    if weight_scale is None:
        weight_scale = float(np.mean(weights))
    limits = httpx.Limits(max_connections=workers * 2, max_keepalive_connections=workers * 2)
    with _http_client(base_url, 120, tls, service_spki, limits=limits) as http:
        admin = AdminClient(base_url, admin_token, client=http)
        names = [f"secagg-device-{i}" for i in range(n)]
        tokens = [admin.issue_token(d, COHORT) for d in names]
        credentials = enroll_fleet(names) if authenticated else [None] * n
        ring = {} if bits is None else {"bits": bits}  # None: the service's (its federation's, else 20)
        signed = {"authenticated": True} if authenticated else {}
        opened = admin.open_secagg(
            model,
            names,
            **ring,
            **signed,
            clip_range=clip_range,
            weight_scale=weight_scale,
            neighbours=neighbours,
        )
        rnd = int(opened["round"])
        clients = [
            DeviceClient(base_url, t, verifier=verifier, client=http, service_spki=service_spki)
            for t in tokens
        ]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            devices = list(
                pool.map(
                    lambda i: SecAggDevice(
                        clients[i], model, rnd, credentials=credentials[i], allow_plain_http=allow_plain_http
                    ),
                    range(n),
                )
            )
            for i, dev in enumerate(devices):  # on each device: its update into the ring
                dev.set_update(updates[i], int(weights[i]), device_rng(seed, i))
            times: dict[str, float] = {}

            def stage(name: str, who: list[int], step: str) -> None:
                t0 = time.perf_counter()
                list(pool.map(lambda i: getattr(devices[i], step)(), who))
                times[name] = time.perf_counter() - t0

            def advance() -> dict[str, Any]:
                return admin.advance_secagg(model, rnd)

            everyone = list(range(n))
            stage("advertise keys", [i for i in everyone if i not in dropouts.gone_by(0)], "advertise")
            advance()
            stage("share keys", [i for i in everyone if i not in dropouts.gone_by(1)], "share")
            advance()
            on_time = [i for i in everyone if i not in dropouts.gone_by(2)]
            late = [i for i in everyone if i in set(dropouts.late_upload) and i not in dropouts.gone_by(1)]
            t0 = time.perf_counter()
            late_msgs = dict(
                pool.map(lambda i: (i, devices[i].endpoint.masked_input(devices[i].get("inbox"))), late)
            )
            list(pool.map(lambda i: devices[i].upload(), on_time))
            times["masked input"] = time.perf_counter() - t0
            status = advance()
            refused = []
            for i, body in late_msgs.items():  # arrives after the unmasking request: must be refused
                try:
                    devices[i].post("masked", body)
                except ServiceError as exc:
                    if exc.status != 409:
                        raise
                    refused.append(i)
                else:
                    raise DeltaplaneError(
                        f"the service accepted device {i}'s masked input after unmasking began"
                    )
            survivors = list(status["survivors"])
            answering = [i for i in survivors if i not in dropouts.gone_by(3)]
            if authenticated:  # the survivors still there sign the request; the check closes once t signed
                stage("consistency check", answering, "vouch")
                advance()
            stage("unmasking", answering, "unmask")
            t0 = time.perf_counter()
            closed = admin.close_secagg(model, rnd)
            times["unmask and publish"] = time.perf_counter() - t0
        return FleetReport(
            round=rnd,
            config=opened["config"],
            survivors=closed["survivors"],
            dropped=closed["dropped"],
            refused_late=sorted(refused),
            stage_seconds=times,
            bytes_sent={i: d.bytes_sent for i, d in enumerate(devices)},
            published=closed["published"],
            status=closed,
        )
