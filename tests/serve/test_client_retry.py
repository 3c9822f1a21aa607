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


class _Trickle(httpx.SyncByteStream):
    def __init__(self, body: bytes, pause: float) -> None:
        self.body, self.pause = body, pause

    def __iter__(self):
        yield self.body[:1024]
        time.sleep(self.pause)
        yield self.body[1024:]


class _SlowUploads(httpx.HTTPTransport):
    """A link that is slow for the first ``slow`` uploads: 1 KiB of the body, a pause of ``pause`` seconds (past
    the service's grace), then the rest."""

    def __init__(self, *, slow: int, pause: float) -> None:
        super().__init__()
        self.slow, self.pause = slow, pause

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/update") and self.slow:
            self.slow -= 1
            request.stream = _Trickle(request.read(), self.pause)  # the declared length is kept
        return super().handle_request(request)


@pytest.fixture
def paced(tmp_path):
    """A real service whose bodies must keep 1 MiB/s after a 0.5 s grace (a dropped body's device waits 3 s)."""
    svc = Service(tmp_path / "h", min_body_rate=1 << 20, body_rate_grace_s=0.5, body_timeout_s=60)
    token = svc.admin.issue_token("d1")
    with BackgroundServer(svc.app) as s:
        yield svc, s.url, token


def _device(url, token, svc, *, slow: int, waits: list[float]) -> DeviceClient:
    def sleep(s: float) -> None:
        waits.append(s)
        time.sleep(s)

    http = httpx.Client(base_url=url, transport=_SlowUploads(slow=slow, pause=1.5), timeout=20)
    return DeviceClient(url, token, verifier=svc.verifier, client=http, sleep=sleep)


def test_an_upload_dropped_for_its_pace_is_sent_again_once_its_penalty_ends(paced):
    """A device on a briefly slow link got the pace rule's 408 (no Retry-After) and lost its upload and the
    round; the 408 now says when the device may send again (the penalty, 6 graces: 3 s), the client sends the
    upload once more then, and it counts once: a second upload to the round is still a 409."""
    svc, url, token = paced
    svc.admin.open_round("cnn")
    waits: list[float] = []
    dev = _device(url, token, svc, slow=1, waits=waits)
    try:
        assert dev.upload("cnn", 1, payload(svc, 1))["accepted"]
        assert waits == [3.0] and dev.retried == 1
        with pytest.raises(ServiceError, match="already uploaded to round 1") as err:
            dev.upload("cnn", 1, payload(svc, 2))
        assert err.value.status == 409
    finally:
        dev.close()
    assert svc.admin.round_status("cnn", 1)["uploads"] == 1
    assert svc.state.counters["rejected.body_too_slow"] == 1


def test_an_upload_slow_twice_is_raised_with_its_penalty(paced):
    """Slow again after its one retry: the link, not a moment. The 408 is raised with the wait it asks (the
    device loop sits the round out on it), and nothing reached the round."""
    svc, url, token = paced
    svc.admin.open_round("cnn")
    waits: list[float] = []
    dev = _device(url, token, svc, slow=2, waits=waits)
    try:
        with pytest.raises(ServiceError, match="--min-body-rate") as err:
            dev.upload("cnn", 1, payload(svc, 1))
    finally:
        dev.close()
    assert err.value.status == 408 and err.value.retry_after == 3.0 and waits == [3.0]
    assert svc.admin.round_status("cnn", 1)["uploads"] == 0
    assert svc.state.counters["rejected.body_too_slow"] == 2


def test_fleet_device_sits_out_a_round_whose_upload_was_dropped_as_too_slow(monkeypatch):
    """`fleet device` stopped on the pace rule's 408 (not a refusal it knew): it now says so and sits the round
    out, to take the next one; a 408 without Retry-After (the body timeout) still stops it."""
    from types import SimpleNamespace

    from deltaplane.serve import fleet

    said: list[str] = []
    dev = SimpleNamespace(step=SimpleNamespace(personalizer=SimpleNamespace(name="none")), log=said.append)
    info = {"round": 3, "base_version": 1, "kind": "plain"}

    def slow(*_):
        raise ServiceError(408, "the request body arrived at 10 bytes/s", retry_after=60.0)

    monkeypatch.setattr(fleet, "plain_round", slow)
    assert fleet.take_part(dev, info, stage_wait=1) is False
    assert "round 3" in said[0] and "too slow" in said[0] and "60 s" in said[0]

    def timed_out(*_):
        raise ServiceError(408, "the request body did not arrive within 120 s")

    monkeypatch.setattr(fleet, "plain_round", timed_out)
    with pytest.raises(ServiceError):
        fleet.take_part(dev, info, stage_wait=1)
