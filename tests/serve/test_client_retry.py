"""DeviceClient retries a 429/503 that carries Retry-After, a bounded number of times, against a real server."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from deltaplane.errors import ConfigError
from deltaplane.serve import BackgroundServer, DeviceClient, ServiceError
from deltaplane.serve.client import retry_after

from .conftest import Service
from .test_rounds import payload


def _hold(url: str, token: str) -> socket.socket:
    """A raw socket holding one request of ``token`` in flight: an upload head whose body never comes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST /v1/models/cnn/report HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    time.sleep(0.3)  # the server has it in flight
    return sock


@pytest.fixture
def busy(tmp_path):
    """A real service where a device may hold one request in flight; yields (service, server url, token)."""
    svc = Service(tmp_path / "h", max_device_requests=1)
    token = svc.admin.issue_token("d1")
    with BackgroundServer(svc.app) as s:
        yield svc, s.url, token


def test_a_refused_request_is_sent_again_after_retry_after(busy):
    """A device whose request got 429 (its own requests in flight, the rate limit, the service's body budget)
    failed at once with ServiceError; it now waits Retry-After and sends it again, and the upload so retried
    counts once (the first was refused before it was read; a second upload to the round is a 409)."""
    svc, url, token = busy
    svc.admin.open_round("cnn")
    held = _hold(url, token)
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 1:
            held.close()  # the request in flight ends while the device waits
        time.sleep(s)

    dev = DeviceClient(url, token, verifier=svc.verifier, sleep=sleep)
    try:
        assert dev.upload("cnn", 1, payload(svc, 1))["accepted"]
        assert waits and waits[0] == 1.0 and dev.retried == len(waits)
        with pytest.raises(ServiceError, match="already uploaded to round 1") as err:
            dev.upload("cnn", 1, payload(svc, 2))  # a retry that did reach the round is refused, not counted
        assert err.value.status == 409
    finally:
        dev.close()
    assert svc.admin.round_status("cnn", 1)["uploads"] == 1
    assert svc.state.counters["rejected.device_busy"] == len(waits)


def test_retries_are_bounded_in_number_and_in_wait(busy):
    svc, url, token = busy
    held = _hold(url, token)
    try:
        waits: list[float] = []
        dev = DeviceClient(url, token, verifier=svc.verifier, retries=2, sleep=waits.append)
        with pytest.raises(ServiceError) as err:
            dev.round("cnn")
        assert err.value.status == 429 and waits == [1.0, 1.0] and dev.retried == 2  # 3 sends, then raised
        waits.clear()
        short = DeviceClient(url, token, verifier=svc.verifier, max_retry_wait=0.5, sleep=waits.append)
        with pytest.raises(ServiceError):  # asked for 1 s, more than it waits: raised at once
            short.round("cnn")
        assert waits == [] and short.retried == 0
        never = DeviceClient(url, token, verifier=svc.verifier, retries=0, sleep=waits.append)
        with pytest.raises(ServiceError):
            never.round("cnn")
        assert waits == []
    finally:
        held.close()
    with pytest.raises(ConfigError, match="retries"):
        DeviceClient(url, token, verifier=svc.verifier, retries=-1)


@pytest.mark.parametrize(
    ("status", "header", "wait"),
    [
        (429, "3", 3.0),
        (503, "0", 0.0),
        (503, None, None),  # uvicorn's own 503 (max connections) says nothing: not retried
        (500, "1", None),  # not a refusal before handling
        (409, "1", None),
        (429, "Wed, 21 Oct 2026 07:28:00 GMT", None),  # a date: not followed
        (429, "-1", None),
        (429, "²".encode(), None),  # str.isdigit() took it
        (429, "1" * 20, None),
    ],
)
def test_retry_after_is_read_strictly(status, header, wait):
    resp = httpx.Response(
        status,
        headers=[(b"retry-after", header if isinstance(header, bytes) else header.encode())]
        if header is not None
        else [],
    )
    assert retry_after(resp) == wait
