"""The request guard: authentication before any body byte is read, body caps while streaming, auth throttling."""

import asyncio
import contextlib
import json
import sys

import pytest

from deltaplane.errors import ConfigError
from deltaplane.serve import ServiceConfig

from .conftest import ADMIN, Service


def call(
    app,
    method,
    path,
    *,
    token=None,
    chunks=(),
    content_length=None,
    client="10.0.0.1",
    stall=False,
    answer=None,
):
    """Drive the ASGI app directly; return (status, body, how many body chunks the app pulled). ``stall``: the
    body never ends (its last chunk says more is coming, and none does); ``answer``: a dict given the response's
    headers."""
    headers = [(b"host", b"testserver")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    headers.append((b"content-type", b"application/json"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": (client, 1234),
        "server": ("testserver", 80),
    }
    chunks = list(chunks)
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            more = pulled < len(chunks) or stall
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": more}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if answer is not None:
        answer.update((k.decode(), v.decode()) for k, v in start["headers"])
    return start["status"], body, pulled


def test_unauthenticated_body_is_never_read(service):
    chunk = b"[" + b"1," * 500_000
    for path in ("/v1/models/cnn/report", "/admin/devices", "/v1/models/cnn/rounds/1/update"):
        status, body, pulled = call(service.app, "POST", path, chunks=[chunk] * 100, content_length=10**8)
        assert status == 401 and pulled == 0, (path, status, body)
        status, _, pulled = call(service.app, "POST", path, token="forged.token", chunks=[chunk] * 100)
        assert status == 401 and pulled == 0


def test_every_body_is_capped_while_streaming(service):
    token = service.admin.issue_token("d1")
    chunk = b" " * (256 << 10)
    # chunked JSON (no Content-Length) to an authenticated endpoint: refused once past the cap, not parsed
    status, body, pulled = call(
        service.app, "POST", "/v1/models/cnn/report", token=token, chunks=[chunk] * 64
    )
    cap = service.config.max_json_bytes
    assert status == 413 and str(cap) in json.loads(body)["detail"]
    assert pulled == cap // len(chunk) + 1  # stopped reading at the cap
    status, _, pulled = call(service.app, "POST", "/admin/devices", token=ADMIN, content_length=10**9)
    assert status == 413 and pulled == 0  # a declared size over the cap: refused before reading
    ok = json.dumps({"version": 1, "metrics": {"accuracy": 0.5}}).encode()
    assert call(service.app, "POST", "/v1/models/cnn/report", token=token, chunks=[ok])[0] == 202


def test_a_refused_admin_token_says_what_to_fix(service):
    """A wrong admin token got "missing or invalid admin token" and nothing more: `deltaplane fleet enroll`
    and `coordinate` printed only that. The 401 now names the token to send and where it comes from."""
    for token in (None, "wrong-admin-token-0000"):
        status, body, _ = call(service.app, "GET", "/admin/stats", token=token)
        detail = json.loads(body)["detail"]
        assert status == 401 and detail.startswith("missing or invalid admin token"), detail
        assert "DELTAPLANE_ADMIN_TOKEN" in detail and "Authorization: Bearer" in detail, detail
    assert call(service.app, "GET", "/admin/stats", token=ADMIN)[0] == 200


def test_failed_authentication_is_throttled_per_address(tmp_path):
    svc = Service(tmp_path / "h", auth_failure_burst=5, auth_failure_rate=0.01)
    good = svc.admin.issue_token("d1")
    codes = [call(svc.app, "GET", "/v1/models/cnn/round", token=f"guess{i}.x")[0] for i in range(8)]
    assert codes == [401] * 5 + [429] * 3
    # bad tokens from the throttled address stay refused, their bodies unread
    status, _, pulled = call(svc.app, "POST", "/v1/models/cnn/report", token="guess.y", chunks=[b"{}"])
    assert status == 429 and pulled == 0
    # another address is unaffected
    assert call(svc.app, "GET", "/v1/models/cnn/download", token=good, client="10.0.0.2")[0] == 200


def test_a_valid_device_token_passes_an_address_throttled_by_bad_ones(tmp_path):
    """A device behind the same NAT as an attacker sending bad tokens was locked out with a valid token; a
    device token (a 256-bit MAC) cannot be guessed, so checking it on a throttled address is no oracle."""
    svc = Service(tmp_path / "h", auth_failure_burst=5, auth_failure_rate=0.01)
    good = svc.admin.issue_token("d1")
    flood = [call(svc.app, "GET", "/v1/models/cnn/round", token=f"guess{i}.x")[0] for i in range(20)]
    assert flood == [401] * 5 + [429] * 15
    assert call(svc.app, "GET", "/v1/models/cnn/download", token=good)[0] == 200
    body = json.dumps({"version": 1, "metrics": {"accuracy": 0.5}}).encode()
    assert call(svc.app, "POST", "/v1/models/cnn/report", token=good, chunks=[body])[0] == 202
    assert call(svc.app, "GET", "/v1/models/cnn/round", token="guess.z")[0] == 429  # still throttled
    # the device flood does not throttle the admin from that address; guessing the admin token throttles
    # the admin token, which then gets no check (a static secret: no verdict while throttled)
    assert call(svc.app, "GET", "/admin/stats", token=ADMIN)[0] == 200
    guesses = [call(svc.app, "GET", "/admin/stats", token=f"admin-guess-{i:08d}")[0] for i in range(6)]
    assert guesses == [401] * 5 + [429]
    assert call(svc.app, "GET", "/admin/stats", token=ADMIN)[0] == 429
    assert call(svc.app, "GET", "/v1/models/cnn/download", token=good)[0] == 200


def test_json_cap_is_configurable():
    with pytest.raises(ConfigError, match="max_json_bytes"):
        ServiceConfig(home=".", admin_token=ADMIN, max_json_bytes=10)


def test_small_unauthenticated_bodies_get_a_clean_401_on_a_real_socket(tmp_path):
    import httpx

    from deltaplane.serve import BackgroundServer, create_app

    svc = Service(tmp_path / "h", auth_failure_burst=1000)
    with BackgroundServer(create_app(svc.config)) as s, httpx.Client(base_url=s.url) as http:
        body = b"\0" * (32 << 10)  # sent after the headers: still in flight when the guard answers
        codes = [http.post("/v1/models/cnn/rounds/1/update", content=body).status_code for _ in range(30)]
    assert codes == [401] * 30


def test_a_body_that_stops_arriving_gets_408_after_the_body_timeout(service_factory):
    """uvicorn's header deadline does not cover the body: a client could trickle (or stall) it forever and
    hold the connection and up to a body cap of memory; any route, authenticated or not."""
    import time

    svc = service_factory(body_timeout_s=0.5)
    token = svc.admin.issue_token("d1")
    for path, tok, length in (
        ("/v1/models/cnn/report", token, None),  # authenticated, chunked: the read stalls
        ("/nowhere", None, 10_000),  # outside /v1 and /admin: the guard reads the body first
        ("/v1/models/cnn/report", None, 10_000),  # unauthenticated, small: drained before the 401
    ):
        start = time.monotonic()
        status, body, _ = call(
            svc.app, "POST", path, token=tok, chunks=[b"{"], content_length=length, stall=True
        )
        assert time.monotonic() - start < 10, path
        assert status == (401 if tok is None and path.startswith("/v1") else 408), (path, status, body)
    assert svc.state.counters["rejected.body_timeout"] == 3
    assert ServiceConfig(home="h", admin_token="a" * 32).body_timeout_s == 120.0


def test_connections_beyond_max_connections_get_503(tmp_path, monkeypatch):
    """uvicorn was started without limit_concurrency: a connection flood could hold every file descriptor."""
    import socket
    import time

    import httpx
    import uvicorn

    from deltaplane.serve import BackgroundServer, create_app, serve

    svc = Service(tmp_path / "h", max_connections=3)
    app = create_app(svc.config)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    serve(app)  # what `deltaplane serve` starts
    assert seen["limit_concurrency"] == 3
    assert Service(tmp_path / "d").config.max_connections == 1000  # the default
    token = svc.admin.issue_token("d1")
    with BackgroundServer(app) as s:
        assert s._config.limit_concurrency == 3
        host, port = s.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]  # hold three connections
        time.sleep(0.3)
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=s.url, headers=auth) as http:
            assert http.get("/v1/models/cnn/download").status_code == 503
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        with httpx.Client(base_url=s.url, headers=auth) as http:
            assert http.get("/v1/models/cnn/download").status_code == 200
    with pytest.raises(ConfigError, match="max_connections"):
        ServiceConfig(home=".", admin_token=ADMIN, max_connections=1)


@pytest.mark.parametrize("where", ["header", "query"])
def test_a_request_head_above_16_kib_gets_431_on_a_real_socket(tmp_path, where):
    """docs/security.md says request heads must fit in 16 KiB, but uvicorn's h11 limit only catches a head
    arriving in pieces: one delivered in a single read (a 100 kB header, an 80 kB query) was parsed and
    served. The guard refuses any head above MAX_HEAD_BYTES with 431 now."""
    import httpx

    from deltaplane.serve import BackgroundServer

    svc = Service(tmp_path / "h")
    token = svc.admin.issue_token("d1")
    big = "a" * (40 << 10)
    with BackgroundServer(svc.app) as s, httpx.Client(base_url=s.url) as http:
        headers = {"Authorization": f"Bearer {token}"}
        ok = http.get("/v1/models/cnn/download", headers=headers)
        if where == "header":
            resp = http.get("/v1/models/cnn/download", headers={**headers, "X-Padding": big})
        else:
            resp = http.get(f"/v1/models/cnn/download?pad={big}", headers=headers)
    assert ok.status_code == 200
    assert resp.status_code == 431 and "16384-byte limit" in resp.json()["detail"]


def test_a_body_outside_v1_and_admin_is_capped_at_64_kib(service):
    """No route outside /v1 and /admin reads a body but the dashboard's sign-in form (4 KiB): such bodies, which
    nobody authenticated, were buffered up to max_json_bytes (2 MiB) each, 2 GB over 1000 connections."""
    chunk = b" " * (16 << 10)
    for path in ("/nowhere", "/ui/login", "/healthz"):
        status, body, pulled = call(service.app, "POST", path, chunks=[chunk] * 64)
        assert status == 413 and "65536-byte limit" in json.loads(body)["detail"], (path, status, body)
        assert pulled == 5, path  # stopped reading at 64 KiB
    status, _, pulled = call(service.app, "POST", "/nowhere", content_length=1 << 20)
    assert status == 413 and pulled == 0


def _hold_upload(url: str, token: str, sent: int):
    """A raw socket that sends an upload's head and ``sent`` bytes of its chunked body, then stops."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/models/cnn/rounds/1/update HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + (f"Authorization: Bearer {token}\r\n".encode() if token else b"")
        + b"\r\n"
    )
    chunk = b"\0" * (64 << 10)
    with contextlib.suppress(OSError):  # a refused request's connection is closed under the sender
        for _ in range(sent // len(chunk)):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    return sock


def test_one_device_holds_at_most_max_device_requests_in_flight(tmp_path):
    """The per-device rate limit is spent only once the endpoint runs, after the body arrived: one device token
    could hold every connection (1000) with an upload buffering (8 MiB each). A hostile client on raw sockets
    holds four uploads; the fifth gets 429 at once, another device is still served, and once the four end the
    device is served again."""
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    # four chunked uploads reserve four caps: above one device's default share of the body budget, tested apart
    svc = Service(tmp_path / "h", max_device_requests=4, max_device_body_bytes=4 * (8 << 20))
    evil, honest = svc.admin.issue_token("evil"), svc.admin.issue_token("honest")
    with BackgroundServer(svc.app) as s, httpx.Client(base_url=s.url, timeout=10) as http:
        held = [_hold_upload(s.url, evil, 256 << 10) for _ in range(4)]
        time.sleep(0.3)
        resp = http.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {evil}"})
        assert resp.status_code == 429, resp.text
        assert "4 requests in flight" in resp.json()["detail"] and resp.headers["retry-after"] == "1"
        assert (
            http.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {honest}"}).status_code
            == 200
        )
        for sock in held:
            sock.close()
        deadline, busy = time.monotonic() + 5, 0
        while time.monotonic() < deadline:  # the server sees the four disconnects
            code = http.get(
                "/v1/models/cnn/download", headers={"Authorization": f"Bearer {evil}"}
            ).status_code
            if code == 200:
                break
            busy += code == 429  # asked before the server saw every disconnect: refused, and counted, again
            time.sleep(0.1)
        else:
            raise AssertionError("the device was not served again once its requests ended")
    assert svc.state.counters["rejected.device_busy"] == 1 + busy
    assert Service(tmp_path / "d").config.max_device_requests == 4  # the default
    with pytest.raises(ConfigError, match="max_device_requests"):
        ServiceConfig(home=".", admin_token=ADMIN, max_device_requests=0)


def _rss_mb() -> float:
    from pathlib import Path

    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_held_bodies_leave_the_servers_memory_flat(tmp_path):
    """The hostile client of the two tests above at scale: 60 anonymous connections each holding 1 MiB of a
    body, and one device token holding 30 uploads of 4 MiB, grew the server by ~60 MB and ~120 MB; now by the
    four uploads the device may hold (16 MB) and the anonymous bodies' 64 KiB each."""
    import time

    from deltaplane.serve import BackgroundServer

    svc = Service(tmp_path / "h")
    evil = svc.admin.issue_token("evil")
    with BackgroundServer(svc.app) as s:
        before = _rss_mb()
        held = [_hold_upload(s.url, evil, 4 << 20) for _ in range(30)]
        held += [_hold_upload(s.url, "", 1 << 20) for _ in range(60)]
        time.sleep(0.5)
        grown = _rss_mb() - before
        for sock in held:
            sock.close()
    assert grown < 50, f"server grew by {grown:.0f} MB"


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the route's source address), or None."""
    import ipaddress
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
            host = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(host).is_loopback or host == "0.0.0.0" else host


def test_one_address_cannot_hold_every_connection(tmp_path):
    """uvicorn's limit_concurrency counts every client together: one address opening max_connections sockets
    (and renewing them every header deadline) left every device a 503. Its connections beyond
    max_connections_per_address are answered 503 and closed now, and a device elsewhere is served."""
    import socket
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    host = _non_loopback_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address to attack from")
    svc = Service(tmp_path / "h", max_connections=30, max_connections_per_address=10)
    token = svc.admin.issue_token("honest")
    with BackgroundServer(svc.app, host="0.0.0.0") as s:
        port = int(s.url.rsplit(":", 1)[1])
        held = [socket.create_connection((host, port)) for _ in range(40)]  # a slowloris from one address
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        held[-1].settimeout(5)
        refused = held[-1].recv(4096)
        assert refused.startswith(b"HTTP/1.1 503") and b"holds 10 connections" in refused, refused
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:  # another address: still served
            resp = http.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
        for sock in held:
            sock.close()
    assert Service(tmp_path / "d").config.max_connections_per_address == 100  # the default
    with pytest.raises(ConfigError, match="max_connections_per_address"):
        ServiceConfig(home=".", admin_token=ADMIN, max_connections_per_address=0)


def test_a_client_that_stops_reading_a_download_is_dropped(tmp_path):
    """uvicorn has no write deadline: a device that asked for a model and never read it held its connection
    for ever (the keep-alive close waits for the unsent buffer), counted against max_connections for good.
    A response whose buffer stays full for write_timeout seconds is aborted now, the service's own
    (ServiceConfig.write_timeout_s, `serve --write-timeout`; it had no flag, 60 s fixed)."""
    import socket
    import time

    import torch

    from deltaplane.serve import BackgroundServer

    svc = Service(
        tmp_path / "h", initial={"w": torch.zeros(2_500_000)}, write_timeout_s=1.0
    )  # a 10 MB download
    tokens = [svc.admin.issue_token(f"d{i}") for i in range(3)]
    with BackgroundServer(svc.app) as s:
        host, port = s.url.removeprefix("http://").split(":")
        held = []
        for token in tokens:
            sock = socket.socket()
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
            )  # reads nothing: the server's buffer fills
            sock.connect((host, int(port)))
            sock.sendall(
                f"GET /v1/models/cnn/download HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            )
            held.append(sock)
        connections = s._server.server_state.connections
        time.sleep(0.5)
        assert len(connections) == 3  # sending, stalled
        deadline = time.monotonic() + 10
        while connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not connections, f"{len(connections)} stalled connections still held"
        for sock in held:
            sock.close()


def _hold_declared(url: str, token: str, declared: int, sent: int = 1024):
    """A raw socket that sends an upload's head declaring ``declared`` bytes, then ``sent`` of them, and stops."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/models/cnn/rounds/1/update HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {declared}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        + b"\0" * sent
    )
    return sock


def _served_again(http, headers, deadline_s: float = 10.0):
    """Poll a small report until it is accepted; the answers seen on the way."""
    import time

    body = {"version": 1, "metrics": {"accuracy": 0.5}}
    seen, deadline = [], time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        code = http.post("/v1/models/cnn/report", json=body, headers=headers).status_code
        seen.append(code)
        if code == 202:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not served again once the held bodies ended: {seen[-5:]}")


def test_bodies_in_flight_share_one_budget_across_devices(tmp_path):
    """The cap per device bounds one token, not n of them: n enrolled or stolen tokens held n x 4 uploads of
    max_upload_bytes buffering. Now every authenticated body reserves its Content-Length (a chunked one its
    route's whole cap) from max_body_bytes_in_flight before a byte is read: two attacker tokens holding
    four uploads fill it, any further body gets 503 with Retry-After at once, unread, a download (no body)
    still passes, and an honest device's report is served once the held bodies end."""
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    cap = 256 << 10
    svc = Service(
        tmp_path / "h",
        max_upload_bytes=cap,
        max_json_bytes=64 << 10,
        max_body_bytes_in_flight=4 * cap,
        max_device_body_bytes=2 * cap,  # the budget alone here: the share per device is tested below
    )
    evil = [svc.admin.issue_token(f"evil{i}") for i in range(2)]
    honest = {"Authorization": f"Bearer {svc.admin.issue_token('honest')}"}
    with BackgroundServer(svc.app) as s, httpx.Client(base_url=s.url, timeout=10) as http:
        held = [_hold_upload(s.url, evil[0], 64 << 10) for _ in range(2)]  # chunked: each reserves the cap
        held += [_hold_declared(s.url, evil[1], cap) for _ in range(2)]  # declared: its Content-Length
        time.sleep(0.5)
        guard = _guard_of(svc.app)
        assert guard.body_bytes_in_flight == 4 * cap
        resp = http.post("/v1/models/cnn/report", json={"version": 1, "metrics": {}}, headers=honest)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "2", resp.text
        assert f"{4 * cap}-byte budget" in resp.json()["detail"] and "--max-body-bytes-in-flight" in resp.text
        third = {
            "Authorization": f"Bearer {svc.admin.issue_token('evil2')}"
        }  # a fresh token: not device-busy
        assert http.post("/v1/models/cnn/report", json={"version": 1}, headers=third).status_code == 503
        assert http.get("/v1/models/cnn/download", headers=honest).status_code == 200  # no body, no reserve
        admin = {"Authorization": f"Bearer {ADMIN}"}  # the operator is not locked out: it revokes the tokens
        for device_id in ("evil0", "evil1"):
            assert http.post(f"/admin/devices/{device_id}/revoke", headers=admin).status_code == 200
        for sock in held:
            sock.close()
        _served_again(http, honest)
        time.sleep(0.2)
        assert guard.body_bytes_in_flight == 0  # every reservation given back, refused ones included
    assert svc.state.counters["rejected.busy_bodies"] >= 2


def test_one_device_reserves_at_most_its_share_of_the_body_budget(tmp_path):
    """Four tokens each holding four slow chunked uploads filled the whole budget and refused every honest
    upload for the body timeout. Now one device reserves at most max_device_body_bytes (by default an eighth of
    the budget, at least one body cap): its next body gets 429 with Retry-After at once, unread, naming the
    flag; the budget keeps room for the other devices, whose uploads are served."""
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    cap = 256 << 10
    svc = Service(
        tmp_path / "h", max_upload_bytes=cap, max_json_bytes=64 << 10, max_body_bytes_in_flight=8 * cap
    )
    assert svc.config.device_body_share == cap  # 8 caps / 8, at least one cap
    evil = svc.admin.issue_token("evil")
    honest = {"Authorization": f"Bearer {svc.admin.issue_token('honest')}"}
    with BackgroundServer(svc.app) as s, httpx.Client(base_url=s.url, timeout=10) as http:
        held = [_hold_upload(s.url, evil, 64 << 10)]  # chunked: reserves its cap, the device's whole share
        time.sleep(0.5)
        guard = _guard_of(svc.app)
        assert guard.body_bytes_in_flight == cap
        again = {"Authorization": f"Bearer {evil}"}
        resp = http.post("/v1/models/cnn/report", json={"version": 1, "metrics": {}}, headers=again)
        assert resp.status_code == 429 and resp.headers["retry-after"] == "2", resp.text
        detail = resp.json()["detail"]
        assert f"device evil already reserves {cap} bytes" in detail and "--max-device-body-bytes" in detail
        assert guard.body_bytes_in_flight == cap  # the refused one reserved nothing
        _served_again(http, honest)  # another device still fits the budget
        for sock in held:
            sock.close()
        seen = _served_again(http, again)  # its own share given back once its held body ended
        time.sleep(0.2)
        assert guard.body_bytes_in_flight == 0 and not guard._device_bytes
    # asked before the server saw the disconnect: refused, and counted, again
    assert svc.state.counters["rejected.device_bodies"] == 1 + seen.count(429)


def test_a_body_slower_than_the_minimum_rate_is_dropped_after_the_grace(tmp_path):
    """A body trickled (or stalled) held its reservation for the whole body timeout (120 s): k tokens so held
    the budget for two minutes per connection. After the grace a body must average min_body_rate bytes/s from
    its head on: a stalled one gets 408 naming the rate and the flag, long before the body timeout, and its
    reservation is given back; a body that keeps pace is served."""
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    svc = Service(tmp_path / "h", min_body_rate=1 << 20, body_rate_grace_s=0.5, body_timeout_s=60)
    token = svc.admin.issue_token("slow")
    with BackgroundServer(svc.app) as s:
        start = time.monotonic()
        sock = _hold_upload(s.url, token, 64 << 10)  # 64 KiB, then nothing: behind 1 MiB/s after 0.5 s
        sock.settimeout(10)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
        sock.close()
        took = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"--min-body-rate" in answer and b"at least 1048576 bytes/s" in answer
        assert 0.4 < took < 5, took
        assert _guard_of(svc.app).body_bytes_in_flight == 0
        with httpx.Client(base_url=s.url, timeout=10) as http:
            # a trickler that reconnects at once held its share for ever: its device waits six graces (3 s)
            headers = {"Authorization": f"Bearer {token}"}
            resp = http.post("/v1/models/cnn/report", json={"version": 1, "metrics": {}}, headers=headers)
            assert resp.status_code == 429 and "may send another in" in resp.text, resp.text
            assert 1 <= int(resp.headers["retry-after"]) <= 3
            other = {"Authorization": f"Bearer {svc.admin.issue_token('other')}"}
            assert _served_again(http, other) == [202]  # another device is not held up
            _served_again(http, headers)
    assert svc.state.counters["rejected.body_too_slow"] == 1
    assert svc.state.counters["rejected.device_slow"] >= 1


def test_a_body_behind_the_pace_of_its_declared_length_is_dropped_before_the_body_timeout(service_factory):
    """A body that declares 1 MiB and trickles held its 1 MiB reservation for the whole body timeout at the cost
    of the minimum rate (4 KiB/s). It must also keep the pace that brings its reserved bytes within the body
    timeout, the line from (grace, 0) to (body timeout, its length): behind it, 408 naming the reservation."""
    import time

    svc = service_factory(min_body_rate=1, body_rate_grace_s=0.2, body_timeout_s=20)
    token = svc.admin.issue_token("d1")
    start = time.monotonic()
    status, body, _ = call(
        svc.app, "POST", "/v1/models/cnn/rounds/1/update", token=token, chunks=[b"\0" * 1024],
        content_length=1 << 20, stall=True,
    )  # fmt: skip
    assert time.monotonic() - start < 5  # 0.2 s + 19.8 s x 1 KiB / 1 MiB: about 0.22 s
    assert status == 408 and b"the 1048576 bytes it reserved within 20 s" in body, body


def test_the_device_share_and_the_minimum_rate_have_defaults_and_refuse_what_cannot_work():
    config = ServiceConfig(home=".", admin_token=ADMIN)
    assert config.device_body_share == 16 << 20  # 128 MiB / 8: two full uploads
    assert config.min_body_rate == 4096 and config.body_rate_grace_s == 10
    small = ServiceConfig(home=".", admin_token=ADMIN, max_body_bytes_in_flight=8 << 20)
    assert small.device_body_share == 8 << 20  # never below one body cap
    with pytest.raises(ConfigError, match="max_device_body_bytes must be at least"):
        ServiceConfig(home=".", admin_token=ADMIN, max_device_body_bytes=1 << 20)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ConfigError, match="min_body_rate must be"):
            ServiceConfig(home=".", admin_token=ADMIN, min_body_rate=bad)
    with pytest.raises(ConfigError, match="body_rate_grace_s must be"):
        ServiceConfig(home=".", admin_token=ADMIN, body_rate_grace_s=0)


def _guard_of(app):
    """The RequestGuard instance in a started app's middleware stack."""
    from deltaplane.serve.guard import RequestGuard

    node = app.middleware_stack
    while not isinstance(node, RequestGuard):
        node = node.app
    return node


def test_the_body_budget_defaults_to_sixteen_uploads_and_refuses_one_that_no_body_could_pass(tmp_path):
    config = ServiceConfig(home=".", admin_token=ADMIN, max_upload_bytes=1 << 20, max_json_bytes=64 << 10)
    assert config.max_body_bytes_in_flight is None and config.body_budget == 16 << 20
    assert ServiceConfig(home=".", admin_token=ADMIN).body_budget == 128 << 20  # 16 x 8 MiB
    with pytest.raises(ConfigError, match="max_body_bytes_in_flight must be at least"):
        ServiceConfig(home=".", admin_token=ADMIN, max_body_bytes_in_flight=(8 << 20) - 1)


def test_a_request_refused_for_the_budget_is_never_read(tmp_path):
    """The budget is checked before the body is read: a declared body that does not fit is refused with its
    bytes unpulled (a small one is drained, for a clean answer; a large one is not read at all)."""
    svc = Service(tmp_path / "h", max_body_bytes_in_flight=8 << 20)
    token = svc.admin.issue_token("d1")
    assert call(svc.app, "GET", "/v1/models/cnn/round", token=token)[0] in (200, 404, 409)  # builds the stack
    _guard_of(svc.app).body_bytes_in_flight = 8 << 20  # every byte already reserved
    status, body, pulled = call(
        svc.app, "POST", "/v1/models/cnn/rounds/1/update", token=token, content_length=1 << 20,
        chunks=[b"\0" * (64 << 10)] * 16,
    )  # fmt: skip
    assert status == 503 and pulled == 0, body


def test_a_body_declaring_a_length_and_chunks_is_refused(tmp_path):
    """h11 frames a body with both Content-Length and Transfer-Encoding by its chunks and ignores the length, so
    "Content-Length: 1" reserved one byte of the body budget for a body up to the cap (and a proxy framing it
    by the length would be smuggled a second request). RFC 9112 6.3 lets a server refuse it: 400, unread."""
    import socket

    from deltaplane.serve import BackgroundServer

    svc = Service(tmp_path / "h")
    token = svc.admin.issue_token("d1")
    body = json.dumps({"version": 1, "metrics": {"accuracy": 0.5}}).encode()
    with BackgroundServer(svc.app) as s:
        host, port = s.url.removeprefix("http://").split(":")
        for framing in (
            b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked\r\n",
        ):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /v1/models/cnn/report HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {token}\r\n".encode()
                    + framing
                    + b"\r\n"
                    + b"%x\r\n" % len(body)
                    + body
                    + b"\r\n0\r\n\r\n"
                )
                answer = b""
                while b"}" not in answer:  # the JSON detail closes the answer
                    answer += sock.recv(4096)
            status = int(answer.split(b" ")[1])
            assert status == (400 if b"Content-Length" in framing else 202), answer
            assert status == 202 or b"both Content-Length and Transfer-Encoding" in answer, answer
    assert svc.state.counters["rejected.bad_content_length"] == 1


def test_refusals_at_the_door_spend_the_devices_rate_and_are_paced_past_it(tmp_path):
    """A refusal before the body is read (429/503) spent nothing of the device's rate limit: one token got
    ~750 refusals a second from the guard. Refusals now spend it, and past it a device's refusals go out one
    per 1/rate s: 12 requests at once of a device holding its one request in flight, at 2/s with a burst of
    2, take about 4.5 s instead of one; the operator and another device are served meanwhile at once."""
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    from .test_client_retry import _hold

    svc = Service(tmp_path / "h", max_device_requests=1, rate=2.0, burst=2)
    evil, honest = svc.admin.issue_token("evil"), svc.admin.issue_token("honest")
    with BackgroundServer(svc.app) as s, httpx.Client(base_url=s.url, timeout=20) as http:
        held = _hold(s.url, evil)
        start = time.monotonic()
        threads, codes = _hammer(s.url, evil, 12)
        time.sleep(0.3)
        t0 = time.monotonic()
        admin = http.get("/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"})
        assert admin.status_code == 200, admin.text
        got = http.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {honest}"})
        assert got.status_code == 200 and time.monotonic() - t0 < 1.0
        for t in threads:
            t.join()
        took = time.monotonic() - start
        held.close()
    assert codes == [429] * 12
    assert took > 3.5, took  # 2 from the burst, then 10 paced at 2/s (the first at once)
    assert svc.state.counters["rejected.rate_limited"] >= 9


def test_a_device_that_waits_exactly_the_slowness_penalty_retry_after_is_served(tmp_path):
    """The slowness penalty's 429 rounded its Retry-After to the nearest second: with 1.3 s of it left it said
    1, and a device that waited exactly that was refused again. Rounded up, the wait it is told covers the
    penalty: its first request after that wait is served."""
    import time

    svc = Service(tmp_path / "h", min_body_rate=1 << 20, body_rate_grace_s=0.25, body_timeout_s=60)
    token = svc.admin.issue_token("slow")
    report = json.dumps({"version": 1, "metrics": {}}).encode()

    def send_report(answer=None):
        return call(
            svc.app,
            "POST",
            "/v1/models/cnn/report",
            token=token,
            chunks=[report],
            content_length=len(report),
            answer=answer,
        )[:2]

    # a stalled body: dropped after the grace (408), its device penalized for six graces (1.5 s)
    assert call(svc.app, "POST", "/v1/models/cnn/report", token=token, chunks=[b"{"], stall=True)[0] == 408
    time.sleep(0.2)  # 1.3 s of the penalty left: to the nearest second 1, rounded up 2
    answer: dict[str, str] = {}
    status, body = send_report(answer)
    assert status == 429 and b"may send another in" in body, body
    time.sleep(int(answer["retry-after"]))  # exactly what it was told
    status, body = send_report()
    assert status == 202, body


def test_a_device_that_waits_exactly_the_rate_limit_retry_after_is_served(tmp_path):
    """The rate limit's 429 rounded 2.5 s to 2 (half to even): a device that waited exactly that found its
    bucket at 0.8 of a request and was refused again. Rounded up, it is served."""
    import time

    svc = Service(tmp_path / "h", rate=0.4, burst=1)
    token = svc.admin.issue_token("d")
    download = "/v1/models/cnn/download"
    assert call(svc.app, "GET", download, token=token)[0] == 200  # the burst's one request
    answer: dict[str, str] = {}
    status, body, _ = call(svc.app, "GET", download, token=token, answer=answer)
    assert status == 429 and b"rate limit" in body, body
    time.sleep(int(answer["retry-after"]))  # exactly what it was told
    status, body, _ = call(svc.app, "GET", download, token=token)
    assert status == 200, body


def test_refusals_waiting_their_turn_hold_at_most_a_quarter_of_the_connections(tmp_path):
    """An over-rate refusal waits its turn (one per 1/rate s) holding its connection, and those connections
    were unbounded: 8 requests of one token (loopback is exempt from the cap per address) held 7 of the 8
    max_connections for up to 14 s, and another device got uvicorn's 503. Now at most a quarter of
    max_connections (2 here) wait their turn, the rest are answered at once, and the other device is served
    during the attack."""
    import time

    import httpx

    from deltaplane.serve import BackgroundServer

    svc = Service(tmp_path / "h", max_connections=8, rate=0.5, burst=1)
    evil, honest = svc.admin.issue_token("evil"), svc.admin.issue_token("honest")
    with BackgroundServer(svc.app) as s:
        with httpx.Client(base_url=s.url, timeout=20) as http:  # its burst's one request
            assert http.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {evil}"}).is_success
        start, threads, codes = time.monotonic(), [], []
        for i in range(8):  # one at a time, so that each reaches the guard (none gets uvicorn's 503)
            more, seen = _hammer(s.url, evil, 1)
            threads += more
            codes.append(seen)
            deadline = time.monotonic() + 10
            while svc.state.counters["rejected.rate_limited"] < i + 1:
                assert time.monotonic() < deadline, dict(svc.state.counters)
                time.sleep(0.02)
        with httpx.Client(base_url=s.url, timeout=20) as http:
            got = http.get("/v1/models/cnn/download", headers={"Authorization": f"Bearer {honest}"})
        assert got.status_code == 200, (got.status_code, got.text[:200])
        for t in threads:
            t.join()
        took = time.monotonic() - start
    assert [c for seen in codes for c in seen] == [429] * 8
    assert took > 1.8, took  # the refusals that may wait still wait their turn (2 s apart)


def _hammer(url: str, token: str, n: int):
    """``n`` threads started at once, each sending one ``GET /v1/models/cnn/round`` with ``token`` on its own
    connection; returns (the threads, the list their status codes are appended to)."""
    import threading

    import httpx

    codes: list[int] = []

    def hammer() -> None:
        with httpx.Client(base_url=url, timeout=20) as mine:
            resp = mine.get("/v1/models/cnn/round", headers={"Authorization": f"Bearer {token}"})
            codes.append(resp.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, codes


def test_over_rate_refusals_stay_at_the_rate_under_continuous_arrivals(monkeypatch):
    """The door checked only the device's bucket: while refusals waited their turn, each token the bucket
    refilled let the next request skip the queue, take it and be refused at once (its device busy), and the
    refusal whose turn came next found nothing left but went out anyway, so up to twice the rate of refusals
    went out (~25/s against --rate 20 in one benchmark run). Now a request of a device whose next refusal turn
    is still ahead joins the queue. Driven on a fake clock: a device holding its one request in flight, one
    request every 50 ms for 10 s, at 2/s with a burst of 1, gets its refusals one per 0.5 s (before: 41, half of them its device busy)."""
    import itertools
    import time
    import types

    from deltaplane.serve import auth
    from deltaplane.serve.auth import DeviceIdentity, RateLimiter
    from deltaplane.serve.guard import RequestGuard

    clock = [1000.0]
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))

    class FakeClockLoop(asyncio.SelectorEventLoop):
        """An event loop on ``clock``: the test moves it forward (timers fire once it passes them)."""

        def time(self) -> float:
            return clock[0]

    limit = RateLimiter(rate=2.0, burst=1)
    counters: dict[str, int] = {}

    async def endpoint(scope, receive, send):  # spends the rate, as the service's endpoints do, and holds
        limit.acquire("evil")
        await asyncio.Event().wait()

    guard = RequestGuard(
        endpoint,
        check_device=lambda token: DeviceIdentity("evil", "c") if token == "t" else None,
        admin_token=ADMIN,
        max_upload_bytes=1 << 20,
        max_json_bytes=64 << 10,
        failures=RateLimiter(rate=1.0, burst=10),
        on_reject=lambda name: counters.__setitem__(name, counters.get(name, 0) + 1),
        max_device_requests=1,
        rate_limit=limit,
    )
    answers: list[tuple[float, int]] = []  # (clock, status) of each answer

    async def request() -> None:
        scope = {
            "type": "http", "method": "GET", "path": "/v1/models/cnn/round", "raw_path": b"/v1/models/cnn/round",
            "query_string": b"", "headers": [(b"authorization", b"Bearer t")], "client": ("10.0.0.1", 1),
        }  # fmt: skip

        async def receive():
            await asyncio.Event().wait()  # a GET without a body: never read

        async def send(message):
            if message["type"] == "http.response.start":
                answers.append((clock[0], message["status"]))

        await guard(scope, receive, send)

    async def settle() -> None:  # let every task that can run, run (nothing waits on a real clock)
        for _ in range(20):
            await asyncio.sleep(0)

    async def attack() -> None:
        tasks = [asyncio.ensure_future(request())]  # the device's one request in flight: its burst
        await settle()
        # the attack begins 0.1 s later: its first refusal finds a fifth of a request refilled, so the bucket
        # holds one again 0.1 s before the next turn (as when a turn's timer fires late on a busy loop)
        clock[0] = start = clock[0] + 0.1
        for i in range(200):  # one request every 50 ms for 10 s
            tasks.append(asyncio.ensure_future(request()))
            await settle()
            clock[0] = start + (i + 1) * 0.05
            await settle()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with asyncio.Runner(loop_factory=FakeClockLoop) as runner:
        runner.run(attack())
    assert {status for _, status in answers} == {429}, answers
    # the first at once, then one per 0.5 s: 20 in the 10 s (before: every refill one more, its device busy)
    assert len(answers) <= 21, (len(answers), counters)
    assert len(answers) >= 19, (len(answers), counters)
    assert all(b - a >= 0.5 - 1e-9 for (a, _), (b, _) in itertools.pairwise(answers)), answers
