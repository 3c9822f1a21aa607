"""`deltaplane run --transport http` reports the bytes that crossed the wire: checked against the request and
response bodies counted by a transport under httpx (raw, before any content decoding), not against deltaplane's
own counters. What the per-round figures leave out (the devices' first full model, the wire session, SecAgg's
server-to-device messages, HTTP headers) is measured here too, as docs/engine.md's "What the byte counts
count" says."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch
from tests.default_run import SMALL_DEFAULT_RUN

import deltaplane.serve.federation as federation
from deltaplane.serve.federation import MODEL, run_http_simulation
from deltaplane.sim import RunConfig, run_simulation

CFG = SMALL_DEFAULT_RUN
_OPEN = re.compile(rf"^/admin/models/{MODEL}/(rounds|secagg)$")
_UPLOAD = re.compile(
    rf"^/v1/models/{MODEL}/(rounds/\d+/update|secagg/\d+/(keys|shares|masked|consistency|unmask))$"
)


@dataclass
class Exchange:
    """One request as the transport carried it: its round (0 before the first round opens), body sizes."""

    round: int
    method: str
    path: str
    sent: int
    received: int = 0


class _CountedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, exchange: Exchange) -> None:
        self.inner, self.exchange = inner, exchange

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.exchange.received += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class Wiretap(httpx.BaseTransport):
    """Counts every request and response body that goes through the socket transport it wraps."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log: list[Exchange] = []
        self.round = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and _OPEN.match(path):
            self.round += 1
        exchange = Exchange(self.round, request.method, path, len(request.read()))
        self.log.append(exchange)
        response = self.inner.handle_request(request)
        response.stream = _CountedStream(response.stream, exchange)  # type: ignore[arg-type]
        return response

    def uploads(self, rnd: int) -> int:
        return sum(
            e.sent for e in self.log if e.round == rnd and e.method == "POST" and _UPLOAD.match(e.path)
        )

    def downloads(self, rnd: int) -> int:
        return sum(e.received for e in self.log if e.round == rnd and e.path.endswith("/download"))

    def received(self, rnd: int, suffix: str) -> int:
        return sum(e.received for e in self.log if e.round == rnd and e.path.endswith(suffix))


@pytest.fixture
def wiretap(monkeypatch: pytest.MonkeyPatch) -> Wiretap:
    """The HTTP run's one client (coordinator and devices), sending through a :class:`Wiretap`."""
    tap = Wiretap()
    real = federation._http_client

    def tapped(base_url, timeout, tls, service_spki=None, **kw):
        return real(base_url, timeout, tls, service_spki, transport=tap, **kw)

    monkeypatch.setattr(federation, "_http_client", tapped)
    return tap


def test_http_round_bytes_are_the_bodies_that_crossed_the_wire(wiretap: Wiretap) -> None:
    result = run_http_simulation(CFG)
    assert [r.uplink_bytes for r in result.rounds] == [wiretap.uploads(r) for r in (1, 2)]
    # every device fetches the round's new version (a signed delta) after the round: that is the downlink
    assert [r.downlink_bytes for r in result.rounds] == [wiretap.downloads(r) for r in (1, 2)]
    assert result.total_uplink_bytes == sum(wiretap.uploads(r) for r in (1, 2)) > 0
    # the same uploads as in process, byte for byte (the compact frame names no model id)
    assert [r.uplink_bytes for r in run_simulation(CFG).rounds] == [r.uplink_bytes for r in result.rounds]
    # left out of the rounds' figures, measured and reported apart: each device's first full model, the wire
    # session's text (fetched once for the run's devices)
    setup = result.transport["setup_downlink_bytes"]
    assert setup["initial_models"] == wiretap.downloads(0) >= CFG.clients * result.raw_update_bytes
    assert setup["session"] == wiretap.received(1, "/session") > 0


def test_http_secagg_uplink_is_every_message_a_device_sent(wiretap: Wiretap) -> None:
    result = run_http_simulation(CFG.replace(secagg=True, clip="2.0", downlink_codec="identity"))
    # keys, shares, the masked input and the unmasking shares: the whole protocol's upload, not one payload
    assert [r.uplink_bytes for r in result.rounds] == [wiretap.uploads(r) for r in (1, 2)]
    masked = sum(e.sent for e in wiretap.log if e.path.endswith("/masked"))
    assert result.total_uplink_bytes > masked > 0
    # the downlink is the model's alone: the roster, inbox and unmask lists a device fetches are not in it
    assert [r.downlink_bytes for r in result.rounds] == [wiretap.downloads(r) for r in (1, 2)]
    assert wiretap.received(1, "/inbox") > 0


def test_raw_fp32_bytes_are_those_a_fedper_device_uploads() -> None:
    # FedPer keeps its head (fc2) on the device: the raw fp32 an update is compared with is the rest
    cfg = RunConfig(clients=3, rounds=1, local_epochs=1, personalization="fedper", wire="self-describing")
    seq, http = run_simulation(cfg), run_http_simulation(cfg)
    for result in (seq, http):
        sizes = {k: v.numel() * v.element_size() for k, v in result.final_state.items()}
        assert result.raw_update_bytes == sum(n for k, n in sizes.items() if not k.startswith("fc2."))
        # uncompressed, the uploads are the raw tensors plus their frames: never fewer bytes than raw
        sent = result.raw_update_bytes * cfg.clients
        assert sent < result.total_uplink_bytes < sent + 400 * cfg.clients
    assert torch.equal(seq.final_state["fc1.weight"], http.final_state["fc1.weight"])
