"""Service throughput against bare uvicorn, measured with a load generator that is not the bottleneck.

Servers run in their own process (one uvicorn worker each, the same h11 protocol and hardening settings);
the load generator is several processes of raw non-blocking sockets sending precomputed HTTP/1.1 requests
over keep-alive connections (no HTTP client library on the hot path). Two workloads:

* ``GET /healthz``: a raw ASGI app (the floor: uvicorn alone), a bare FastAPI app, and the deltaplane service;
* one device round trip = ``GET download`` (the full signed model) + ``POST update`` (a distinct wire payload
  per device, bound to the round's nonce): a bare FastAPI app that returns the same bytes and swallows the
  upload, against the real service (token check, nonce-bound signed answer, payload validation, norm check,
  durable upload record with fsync, streaming aggregation).

Ratios are taken within the same run. Pass ``--seconds`` / ``--procs`` / ``--conns`` / ``--devices`` to change
the load. (No external tool is needed; ``wrk``, Debian package ``wrk``, would do for the /healthz rows.)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record, table

ADMIN = "bench-admin-token-0123456789"

SERVERS = {
    "raw": """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
""",
    "fastapi": """
from fastapi import FastAPI, Request
from fastapi.responses import Response
app = FastAPI()
MODEL = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else b""
@app.get("/healthz")
def healthz():
    return {"status": "ok"}
@app.get("/v1/models/{model}/download")
def download(model: str):
    return Response(MODEL, media_type="application/octet-stream")
@app.post("/v1/models/{model}/rounds/{r}/update", status_code=202)
async def update(model: str, r: int, request: Request):
    n = len(await request.body())
    return {"accepted": True, "round": r, "uploads": n}
""",
    "deltaplane": """
from deltaplane.serve import ServiceConfig, create_app
app = create_app(ServiceConfig(home=sys.argv[2], admin_token=sys.argv[3], device_secret="x" * 32,
                               rate=1e6, burst=10**6, auth_failure_burst=10**6))
""",
}
RUNNER = """
import sys, types, uvicorn
from deltaplane.serve.server import _hardening
{app}
# the service's uvicorn settings for every server (a bare ASGI function has no app.state to read limits from)
hardening = _hardening(app if hasattr(app, "state") else types.SimpleNamespace(state=types.SimpleNamespace()))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
            backlog=4096, **hardening)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, *args: str) -> None:
        self.port = _free_port()
        code = RUNNER.format(app=SERVERS[kind])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.port), *args], env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"{kind} server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytearray]:
    """Block until one full response is in ``buf``; return (status, the rest of the buffer)."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).decode("latin-1")
            status = int(head.split(" ", 2)[1])
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            total = end + 4 + length
            if len(buf) >= total:
                return status, buf[total:]
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def _worker(port: int, scripts: list[list[bytes]], seconds: float, loop: bool, out: mp.Queue) -> None:
    """Run each connection's request script (repeating it when ``loop``), ``len(scripts)`` connections."""
    sel = selectors.DefaultSelector()
    conns = []
    for script in scripts:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append({"sock": s, "script": script, "i": 0, "buf": bytearray()})
    ok = bad = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for c in conns:
        c["sock"].sendall(c["script"][0])
        sel.register(c["sock"], selectors.EVENT_READ, c)
    active = len(conns)
    while active and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            chunk = c["sock"].recv(1 << 20)
            if not chunk:
                sel.unregister(c["sock"])
                active -= 1
                continue
            c["buf"] += chunk
            while True:  # complete responses in the buffer
                end = c["buf"].find(b"\r\n\r\n")
                if end < 0:
                    break
                head = bytes(c["buf"][:end]).decode("latin-1")
                length = next(
                    (
                        int(v)
                        for k, _, v in (ln.partition(":") for ln in head.split("\r\n")[1:])
                        if k.strip().lower() == "content-length"
                    ),
                    0,
                )
                if len(c["buf"]) < end + 4 + length:
                    break
                status = int(head.split(" ", 2)[1])
                ok, bad = (ok + 1, bad) if status < 400 else (ok, bad + 1)
                del c["buf"][: end + 4 + length]
                c["i"] += 1
                if c["i"] == len(c["script"]):
                    if not loop:
                        sel.unregister(c["sock"])
                        active -= 1
                        break
                    c["i"] = 0
                c["sock"].sendall(c["script"][c["i"]])
    elapsed = time.perf_counter() - t0
    for c in conns:
        c["sock"].close()
    out.put((ok, bad, elapsed))


def drive(
    port: int, scripts: list[list[bytes]], *, procs: int, seconds: float, loop: bool
) -> dict[str, float]:
    """Spread connection scripts over ``procs`` processes; return requests/s and error count."""
    q: mp.Queue = mp.Queue()
    parts = [scripts[i::procs] for i in range(procs)]
    ps = [mp.Process(target=_worker, args=(port, p, seconds, loop, q)) for p in parts if p]
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    ok = sum(r[0] for r in results)
    bad = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    return {"ok": ok, "errors": bad, "seconds": elapsed, "rps": ok / elapsed}


def get(path: str, token: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


def post(path: str, body: bytes, token: str, nonce: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"X-Deltaplane-Round-Nonce: {nonce}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def asgi_cost_us(n: int = 2000) -> dict[str, float]:
    """Microseconds per /healthz call of the bare FastAPI app and of the service, called directly (best of 3)."""
    import asyncio

    from fastapi import FastAPI

    from deltaplane.registry import Registry
    from deltaplane.serve import ServiceConfig, create_app

    bare = FastAPI()

    @bare.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    with tempfile.TemporaryDirectory() as tmp:
        Registry.create(tmp)
        service = create_app(ServiceConfig(home=tmp, admin_token=ADMIN, device_secret="x" * 32))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/healthz",
            "raw_path": b"/healthz",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "root_path": "",
        }

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(_: dict) -> None:
            return None

        async def run(app: object) -> float:
            for _ in range(200):
                await app(dict(scope), receive, send)  # type: ignore[operator]
            t = time.perf_counter()
            for _ in range(n):
                await app(dict(scope), receive, send)  # type: ignore[operator]
            return (time.perf_counter() - t) / n * 1e6

        return {
            name: min(asyncio.run(run(app)) for _ in range(3))
            for name, app in (("fastapi", bare), ("deltaplane", service))
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--conns", type=int, default=32, help="keep-alive connections in all")
    ap.add_argument(
        "--devices", type=int, default=600, help="devices (fetch+upload pairs) in the round workload"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from deltaplane.codecs import Compressor
    from deltaplane.delta import Delta
    from deltaplane.registry import Registry
    from deltaplane.serve import AdminClient

    rows: list[list[object]] = []
    healthz = [[get("/healthz")] for _ in range(args.conns)]
    results: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    for kind in ("raw", "fastapi"):
        srv = Server(kind)
        try:
            r = drive(srv.port, healthz, procs=args.procs, seconds=args.seconds, loop=True)
        finally:
            srv.stop()
        results[kind] = r["rps"]
        rows.append(
            [
                f"/healthz, bare {'uvicorn (raw ASGI)' if kind == 'raw' else 'FastAPI'}",
                f"{r['rps']:,.0f}",
                r["errors"],
            ]
        )

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        reg = Registry.create(home)
        g = torch.Generator().manual_seed(0)
        state = {
            "conv1.weight": 0.1 * torch.randn(16, 1, 3, 3, generator=g),
            "conv1.bias": torch.zeros(16),
            "conv2.weight": 0.1 * torch.randn(32, 16, 3, 3, generator=g),
            "conv2.bias": torch.zeros(32),
            "fc.weight": 0.1 * torch.randn(10, 128, generator=g),
            "fc.bias": torch.zeros(10),
        }
        v1 = reg.register_model("cnn", state)
        reg.set_tag("cnn", "production", v1.number)
        model_file = Path(tmp) / "model.bin"
        model_file.write_bytes(reg.read(v1))
        srv = Server("deltaplane", str(home), ADMIN)
        try:
            r = drive(srv.port, healthz, procs=args.procs, seconds=args.seconds, loop=True)
            results["deltaplane"] = r["rps"]
            rows.append(["/healthz, deltaplane service", f"{r['rps']:,.0f}", r["errors"]])
            admin = AdminClient(f"http://127.0.0.1:{srv.port}", ADMIN)
            tokens = [admin.issue_token(f"d{i}", "bench") for i in range(args.devices)]
            rnd = admin.open_round("cnn")
            payloads = [
                Compressor("fp16", seed=i).compress(
                    Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}),
                    base_id="cnn",
                    base_version=v1.number,
                )
                for i in range(args.devices)
            ]
            path = f"/v1/models/cnn/rounds/{rnd['round']}/update"
            scripts = [
                [get("/v1/models/cnn/download", tokens[i]), post(path, payloads[i], tokens[i], rnd["nonce"])]
                for i in range(args.devices)
            ]
            r = drive(srv.port, scripts, procs=args.procs, seconds=120, loop=False)
            closed = admin.close_round("cnn", rnd["round"])
            results["round_deltaplane"] = r["ok"] / 2 / r["seconds"]
            rows.append(
                [
                    f"fetch+upload, deltaplane ({args.devices} devices, {closed['uploads']} uploads counted)",
                    f"{results['round_deltaplane']:,.0f} pairs/s",
                    r["errors"],
                ]
            )
        finally:
            srv.stop()
        srv = Server("fastapi", str(model_file))
        try:
            r = drive(srv.port, scripts, procs=args.procs, seconds=120, loop=False)
            results["round_fastapi"] = r["ok"] / 2 / r["seconds"]
            rows.append(
                [
                    "fetch+upload, bare FastAPI (same bytes, no checks)",
                    f"{results['round_fastapi']:,.0f} pairs/s",
                    r["errors"],
                ]
            )
        finally:
            srv.stop()

    # The same /healthz through the ASGI apps in process (no sockets): what the app stack itself costs.
    asgi = asgi_cost_us()
    rows.append(["/healthz in process (ASGI call), bare FastAPI", f"{asgi['fastapi']:.0f} us/request", 0])
    rows.append(
        ["/healthz in process (ASGI call), deltaplane service", f"{asgi['deltaplane']:.0f} us/request", 0]
    )

    ratio_h = results["deltaplane"] / results["raw"]
    ratio_f = results["deltaplane"] / results["fastapi"]
    ratio_r = results["round_deltaplane"] / results["round_fastapi"]
    for row in rows:
        print(" | ".join(str(x) for x in row))
    summary = (
        f"/healthz: the service does {ratio_h:.2f}x the requests/s of bare uvicorn and {ratio_f:.2f}x bare "
        f"FastAPI; fetch+upload: {ratio_r:.2f}x bare FastAPI."
    )
    print(summary)
    body = table(["workload", "throughput", "errors"], rows) + "\n\n" + summary + "\n\n"
    body += (
        f"Load generator: {args.procs} processes of raw non-blocking sockets, {args.conns} keep-alive "
        f"connections for /healthz ({args.seconds:.0f} s per row); the round workload runs each device's "
        "GET+POST once over its own connection. Server: one uvicorn worker (h11, the service's hardening "
        f"settings) in its own process. Machine load average before the run: {load_before:.1f} "
        f"on {os.cpu_count()} cores (shared), so absolute figures are low; the ratios are what to read.\n\n"
        "What the overhead is: on /healthz, almost all of it is FastAPI's (bare FastAPI vs raw ASGI); the "
        "service's own stack adds the RequestGuard middleware (a path check; /healthz needs no token), and "
        "the in-process rows call both apps directly, without sockets, to show that cost alone. On the round, per "
        "request: the HMAC token check, the Ed25519 signature over the device's nonce on every download, "
        "and per upload the wire-format validation against the base, the norm check, the SHA-256 and an "
        "fsync'd blob + SQLite commit (the upload is durable before it is acknowledged) and the streaming "
        "float64 aggregation.\n"
    )
    record("service-throughput", "Service throughput vs bare uvicorn (#15)", body)


if __name__ == "__main__":
    main()
