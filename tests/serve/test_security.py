"""Security acceptance suite: the real service (``deltaplane serve`` in its own process) with TLS on loopback.

Attacks: a man in the middle with a foreign certificate, and one inside the TLS path (a compromised proxy)
swapping models, replaying old answers and downgrading; an unauthenticated 200 MB JSON body (rejected before
parsing, server RSS flat within 20 MB); an upload replayed into a later round; a SIGKILL with an open round;
a NaN evaluation at the promotion gate; a tampered encrypted blob.
"""

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.errors import DowngradeRefused, SignatureError
from deltaplane.registry import Registry
from deltaplane.serve import AdminClient, BackgroundServer, DeviceClient, ServiceError, client_context
from deltaplane.serve.tls import make_tls_bundle, server_ssl_options

from .conftest import ADMIN, cnn_state

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class LiveService:
    """``deltaplane serve --tls-cert ... --tls-key ...`` as a subprocess over a prepared registry."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.reg = Registry.create(self.home)
        v1 = self.reg.register_model("cnn", cnn_state(0), governance={"cohorts": ["seed"]})
        self.reg._move_tag("cnn", "production", v1.number, action="promote")
        other = self.reg.register_model("other", cnn_state(9))
        self.reg._move_tag("other", "production", other.number, action="promote")
        self.tls = make_tls_bundle(root / "tls", hosts=["127.0.0.1"])
        (root / "nan_eval.py").write_text(
            "def evaluate(state):\n    return {'accuracy': float('nan'), 'ood_accuracy': 1.0}\n"
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([SRC, str(root)]),
            "DELTAPLANE_ADMIN_TOKEN": ADMIN,
            "OMP_NUM_THREADS": "1",
        }
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ctx = client_context(self.tls.ca_cert)
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self) -> "LiveService":
        cmd = [
            sys.executable,
            "-m",
            "deltaplane.cli",
            "serve",
            "--home",
            str(self.home),
            "--port",
            str(self.port),
        ]
        cmd += ["--tls-cert", str(self.tls.server_cert), "--tls-key", str(self.tls.server_key)]
        cmd += ["--evaluator", "nan_eval:evaluate"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", verify=self.ctx, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
        raise AssertionError("service did not start: " + self.log.read_text()[-2000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def admin(self) -> AdminClient:
        return AdminClient(self.url, ADMIN, tls=self.ctx)

    def device(self, device_id: str, cohort: str = "default", **kw) -> DeviceClient:
        token = self.admin().issue_token(device_id, cohort)
        return DeviceClient(self.url, token, verifier=self.reg.verifier, tls=self.ctx, **kw)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    svc = LiveService(tmp_path_factory.mktemp("live")).start()
    yield svc
    svc.kill()


def upload_payload(reg: Registry, base: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    state = reg.load_state(f"cnn@{base}")
    delta = Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()})
    return Compressor("topk(0.2) | quant(bits=8)", seed=seed).compress(
        delta, base_id="cnn", base_version=base
    )


class InPathMitm(httpx.BaseTransport):
    """An attacker inside the TLS path (a compromised proxy): sees and rewrites plaintext HTTP."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.upstream = httpx.HTTPTransport(verify=ctx)
        self.mode = "pass"
        self.recorded: httpx.Response | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.mode == "swap":
            url = request.url.copy_with(path=request.url.path.replace("/cnn/", "/other/"))
            request = httpx.Request(request.method, url, headers=request.headers)
        if self.mode == "replay" and self.recorded is not None:
            return httpx.Response(200, headers=self.recorded.headers, content=self.recorded.content)
        resp = self.upstream.handle_request(request)
        resp.read()
        headers = dict(resp.headers)
        if self.mode == "swap":
            headers["x-deltaplane-model"] = "cnn"  # relabel the foreign model
        if self.mode == "strip-rollback":
            headers.pop("x-deltaplane-rollback", None)
        out = httpx.Response(resp.status_code, headers=headers, content=resp.content)
        if self.mode == "pass" and request.url.path.endswith("/download"):
            self.recorded = out
        return out


def test_mitm_with_a_foreign_certificate_is_refused(live, tmp_path):
    rogue = make_tls_bundle(tmp_path / "rogue", hosts=["127.0.0.1"])
    from fastapi import FastAPI

    with BackgroundServer(
        FastAPI(), ssl_options=server_ssl_options(rogue.server_cert, rogue.server_key)
    ) as s:
        dev = DeviceClient(s.url, "t.t", verifier=live.reg.verifier, tls=live.ctx)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            dev.fetch("cnn")


def test_mitm_model_swap_and_downgrade_are_refused(live):
    mitm = InPathMitm(live.ctx)
    token = live.admin().issue_token("victim")
    http = httpx.Client(base_url=live.url, transport=mitm, timeout=30)
    dev = DeviceClient(live.url, token, verifier=live.reg.verifier, client=http)
    mitm.mode = "swap"
    with pytest.raises(SignatureError):
        dev.fetch("cnn")
    assert dev.state is None
    mitm.mode = "pass"
    assert dev.fetch("cnn")[0] == 1
    old_answer = mitm.recorded  # the validly signed v1 answer, captured on the wire
    v2 = live.reg.register_model("cnn", cnn_state(2), parent=1, governance={"cohorts": ["seed"]})
    live.reg._move_tag("cnn", "production", v2.number, action="promote")
    assert dev.fetch("cnn")[0] == v2.number
    mitm.mode, mitm.recorded = "replay", old_answer  # downgrade by replaying the old answer
    with pytest.raises(SignatureError):
        dev.fetch("cnn")
    assert dev.version == v2.number
    # downgrade by moving the tag back without a signed rollback record: refused by the device
    mitm.mode = "pass"
    live.reg._move_tag("cnn", "production", 1, action="promote")
    with pytest.raises(DowngradeRefused):
        dev.fetch("cnn")
    assert dev.version == v2.number


def test_unauthenticated_oversized_json_is_rejected_before_parsing(live):
    pid = live.proc.pid
    before = _rss_mb(pid)
    chunk = b"[" + b"1," * (1 << 19)
    for declared in (True, False):
        raw = socket.create_connection(("127.0.0.1", live.port), timeout=30)
        tls = live.ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        head = "POST /v1/models/cnn/report HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += "Content-Length: 209715200\r\n" if declared else "Transfer-Encoding: chunked\r\n"
        tls.sendall((head + "\r\n").encode())
        piece = chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk)
        tls.sendall(piece)  # 1 MB of the 200 MB body ...
        answer = tls.recv(4096)  # ... and the answer is already there: decided from the headers alone
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"connection: close" in answer.lower()
        sent, t0 = len(chunk), time.monotonic()
        try:  # keep pushing the rest: whatever the server does with it, it must not buffer or parse it
            while sent < 200 << 20 and time.monotonic() - t0 < 30:
                tls.sendall(piece)
                sent += len(chunk)
        except (ssl.SSLError, OSError):
            pass
        tls.close()
    t = time.perf_counter()
    assert httpx.get(live.url + "/healthz", verify=live.ctx).status_code == 200
    assert time.perf_counter() - t < 1.0
    after = _rss_mb(pid)
    print(f"server RSS {before:.1f} MB -> {after:.1f} MB after two unauthenticated 200 MB JSON bodies")
    assert after - before < 20, (before, after)
    # with a plain client: a clean 401 and no body read
    r = httpx.post(live.url + "/v1/models/cnn/report", content=b"{}", verify=live.ctx)
    assert r.status_code == 401


def test_replay_into_a_later_round_is_refused(live):
    admin = live.admin()
    base = live.reg.tag("cnn", "production")
    r1 = admin.open_round("cnn", base_version=base)
    dev = live.device("replayer")
    captured = upload_payload(live.reg, base, 1)
    dev.upload("cnn", r1["round"], captured, nonce=r1["nonce"])
    admin.close_round("cnn", r1["round"])
    r2 = admin.open_round("cnn", base_version=base)
    for nonce in (
        r1["nonce"],
        r2["nonce"],
    ):  # replayed with the device's token (anyone else may send any bytes)
        with pytest.raises(ServiceError) as e:
            dev.upload("cnn", r2["round"], captured, nonce=nonce)
        assert e.value.status == 409
    admin.abort_round("cnn", r2["round"])


def test_restart_with_an_open_round_keeps_round_and_uploads(live):
    admin = live.admin()
    base = live.reg.tag("cnn", "production")
    opened = admin.open_round("cnn", base_version=base)
    for i in range(2):
        live.device(f"r{i}", "eu").upload("cnn", opened["round"], upload_payload(live.reg, base, 10 + i))
    live.kill()  # SIGKILL: no shutdown hook runs
    live.start()
    info = live.device("probe").round("cnn")
    assert (info["round"], info["uploads"], info["nonce"]) == (opened["round"], 2, opened["nonce"])
    closed = live.admin().close_round("cnn", opened["round"])
    assert closed["uploads"] == 2 and closed["version"] is not None
    assert "eu" in live.reg.get("cnn", closed["version"]).governance.cohorts


def test_nan_evaluation_is_blocked_at_the_gate(live):
    cand = live.reg.register_model("cnn", cnn_state(5), parent=1)
    before = live.reg.tag("cnn", "production")
    res = live.admin().promote("cnn", cand.number)
    assert not res["promoted"] and "not a finite number" in res["regressions"][0]
    assert live.reg.tag("cnn", "production") == before


def test_tampered_encrypted_blob_is_refused(live):
    victim = live.reg.register_model("cnn", cnn_state(6), parent=1)
    path = live.reg.blob_path(victim.sha256)
    raw = bytearray(path.read_bytes())
    assert raw[:4] == b"DPEB"
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    live.reg.set_tag("cnn", "staging", victim.number)
    with pytest.raises(ServiceError) as e:
        live.device("t").fetch("cnn", channel="staging")
    assert e.value.status == 409 and "AES-GCM" in e.value.detail and str(live.home) not in e.value.detail
    assert any("AES-GCM" in p for p in Registry(live.home).verify().problems)
