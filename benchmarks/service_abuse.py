"""Slow-body and refusal attacks on a real ``deltaplane serve`` (docs/security.md, the request guard).

Each scenario starts its own ``deltaplane serve`` process at its defaults (a fresh registry in a temporary folder,
one model ``cnn``, port chosen free, 127.0.0.1) and attacks it over loopback with raw sockets:

- **trickle, k tokens**: k enrolled device tokens each hold four chunked uploads and send one byte a second,
  reconnecting whenever answered (the slow-loris of the body budget); meanwhile an honest device uploads 256 KiB
  with its Content-Length once a second, retrying after the ``Retry-After`` of a 429 or 503. Reported: honest
  uploads that reached their endpoint (any answer but the guard's 408/429/503), tries, latency median and worst
  (from the first try to the endpoint's answer, waits included), and the attackers' reconnections.
- **pace**: one honest 256 KiB upload with its Content-Length sent at a steady rate (8 KiB/s, then 3 KiB/s, around
  the default minimum of 4 KiB/s after a 10 s grace): its status line and how long it took.
- **refusals**: one token holds its four requests in flight and W connections at once send ``GET
  /v1/models/cnn/round`` with it for S seconds: refusals per second (they spend the device's rate, ``--rate 20
  --burst 40`` by default, and past it go out one per 1/rate s).

Usage::

    python benchmarks/service_abuse.py            # the recorded run (about 3 minutes of attacks)
    python benchmarks/service_abuse.py --quick    # shorter windows, printed only (nothing recorded)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import torch

from _record import record, table
from _service import free_port, wait_until_healthy
from deltaplane.registry import Registry

ADMIN = "bench-admin-token-0123456789"
MODEL = "cnn"
UPLOAD = f"/v1/models/{MODEL}/rounds/1/update"
HONEST_BYTES = 256 << 10
#: the guard's own answers: a body too slow (408), or refused before it was read (429, 503)
GUARD_CODES = (408, 429, 503)


@dataclass
class Server:
    """A ``deltaplane serve`` child process on 127.0.0.1."""

    port: int
    home: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, device_id: str) -> str:
        """A device token issued by the admin API, as an operator enrolls a device."""
        r = httpx.post(
            self.url + "/admin/devices",
            json={"device_id": device_id},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        r.raise_for_status()
        return str(r.json()["token"])

    def counters(self) -> dict[str, int]:
        r = httpx.get(self.url + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        r.raise_for_status()
        return dict(r.json()["counters"])


@contextlib.contextmanager
def serve(*extra: str) -> Iterator[Server]:
    """A fresh registry holding ``cnn`` (tagged production) and ``deltaplane serve`` on it, at its defaults."""
    with tempfile.TemporaryDirectory(prefix="service-abuse-") as tmp:
        home = Path(tmp) / "home"
        reg = Registry.create(home)
        v = reg.register_model(MODEL, {"w": torch.zeros(1000)}, lineage={"round": 0})
        reg.set_tag(MODEL, "production", v.number)
        reg.close()
        port = free_port()
        argv = [sys.executable, "-m", "deltaplane.cli", "serve", "--home", str(home), "--port", str(port)]
        argv += ["--admin-token", ADMIN, "--device-secret", "s" * 32, *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = Server(port, home)
        try:
            wait_until_healthy(server.url, proc, 120)
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _status(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0: the connection closed without one)."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def trickle(k: int, seconds: float) -> dict[str, object]:
    """k tokens x 4 chunked uploads at 1 byte/s against an honest 256 KiB upload a second, for ``seconds``."""
    with serve() as srv:
        evil = [srv.token(f"evil{i}") for i in range(k)]
        honest = srv.token("honest")
        stop = time.monotonic() + seconds
        reconnects = [0]

        def trickler(token: str) -> None:
            head = (
                f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
            while time.monotonic() < stop:
                try:
                    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                        sock.sendall(head)
                        sock.settimeout(1.0)
                        while time.monotonic() < stop:
                            sock.sendall(b"1\r\nx\r\n")  # one byte of body a second
                            try:
                                sock.recv(1)  # answered (refused or dropped) or closed: reconnect
                                reconnects[0] += 1
                                break
                            except TimeoutError:
                                pass
                except OSError:
                    time.sleep(0.2)

        threads = [threading.Thread(target=trickler, args=(t,), daemon=True) for t in evil for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # the attack holds its bodies before the first honest try
        body = b"\0" * HONEST_BYTES
        headers = {"Authorization": f"Bearer {honest}", "Content-Type": "application/octet-stream"}
        latencies: list[float] = []
        tries, begun, refusals, endpoint = 0, 0, collections.Counter[int](), collections.Counter[int]()
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            while time.monotonic() < stop - 1:
                t0, begun = time.monotonic(), begun + 1  # an upload begun (the last may be cut by the window)
                while time.monotonic() < stop:
                    tries += 1
                    r = http.post(UPLOAD, content=body, headers=headers)
                    if r.status_code not in GUARD_CODES:
                        latencies.append(time.monotonic() - t0)
                        endpoint[r.status_code] += 1
                        break
                    refusals[r.status_code] += 1
                    time.sleep(float(r.headers.get("retry-after", "1")))
                time.sleep(1.0)
        counters = srv.counters()
        for t in threads:
            t.join(timeout=5)
    return {
        "k": k,
        "passed": len(latencies),
        "tries": tries,
        "median_s": statistics.median(latencies) if latencies else None,
        "worst_s": max(latencies) if latencies else None,
        "refusals": dict(refusals),
        "endpoint": dict(endpoint),
        "reconnects": reconnects[0],
        "dropped_slow": counters.get("rejected.body_too_slow", 0),
        "device_bodies": counters.get("rejected.device_bodies", 0),
        "busy_bodies": counters.get("rejected.busy_bodies", 0),
        "begun": begun,
    }


def pace(rate: float) -> dict[str, object]:
    """One 256 KiB upload with its Content-Length sent at ``rate`` bytes/s: its status line and duration."""
    with serve() as srv:
        token = srv.token("slow")
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(
                f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nContent-Length: {HONEST_BYTES}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            )
            t0, sent, piece, answer = time.monotonic(), 0, 1024, b""
            sock.setblocking(False)
            while sent < HONEST_BYTES:
                with contextlib.suppress(BlockingIOError):
                    answer += sock.recv(4096)  # answered before the body ended: refused
                if answer:
                    break
                with contextlib.suppress(OSError):
                    sock.sendall(b"\0" * piece)
                sent += piece
                time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
            sock.setblocking(True)
            sock.settimeout(60)
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
                    answer += chunk
            took = time.monotonic() - t0
    line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return {"rate": rate, "sent": sent, "took_s": took, "status": _status(answer), "line": line}


def refusals(seconds: float, workers: int) -> dict[str, object]:
    """One token holding its four requests in flight, hammered by ``workers`` connections at once."""
    with serve() as srv:
        token = srv.token("evil")
        held = []
        for _ in range(4):  # the device's max_device_requests: every further request is refused at the door
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(
                f"POST /v1/models/{MODEL}/report HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                "Content-Length: 100\r\n\r\n{".encode()
            )
            held.append(sock)
        time.sleep(0.5)
        codes = collections.Counter[int]()
        head = f"GET /v1/models/{MODEL}/round HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()

        async def worker(end: float) -> None:
            while time.monotonic() < end:
                reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                writer.write(head)
                codes[_status(await reader.read())] += 1
                writer.close()

        async def hammer() -> None:
            end = time.monotonic() + seconds
            await asyncio.gather(*(worker(end) for _ in range(workers)))

        t0 = time.monotonic()
        asyncio.run(hammer())
        took = time.monotonic() - t0
        for sock in held:
            sock.close()
    total = sum(codes.values())
    return {"answers": dict(codes), "total": total, "seconds": took, "per_s": total / took}


def _s(x: object) -> str:
    return "–" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="shorter windows (15 s, k = 4 only); records nothing"
    )
    args = ap.parse_args()
    window, ks, hammer_s, workers = (15.0, (4,), 3.0, 16) if args.quick else (40.0, (4, 8), 5.0, 32)
    load_before = os.getloadavg()[0]
    rows_t = []
    for k in ks:
        r = trickle(k, window)
        print("trickle", r, flush=True)
        rows_t.append(
            [
                k,
                4 * k,
                f"{r['passed']} of {r['begun']}",
                r["tries"],
                ", ".join(f"{c} ×{n}" for c, n in sorted(r["refusals"].items())) or "none",
                _s(r["median_s"]),
                _s(r["worst_s"]),
                ", ".join(f"{c} ×{n}" for c, n in sorted(r["endpoint"].items())),
                r["dropped_slow"],
                f"{r['reconnects']:,}",
            ]
        )
    rows_p = []
    for rate in (8192.0, 3072.0):
        r = pace(rate)
        print("pace", r, flush=True)
        rows_p.append([f"{rate / 1024:.0f} KiB/s", f"{r['sent']:,}", r["line"], f"{r['took_s']:.1f}"])
    h = refusals(hammer_s, workers)
    print("refusals", h, flush=True)
    after = (h["total"] - 40) / h["seconds"]
    load_after = os.getloadavg()[0]
    body = (
        f"Each scenario against its own `deltaplane serve --home H --admin-token T --device-secret S` at the "
        f"service's defaults (body timeout 120 s, minimum body rate 4 KiB/s after a 10 s grace, four requests in "
        f"flight per device, a device's share of the body budget 16 MiB of 128 MiB, `--rate 20 --burst 40`), "
        f"attacked over loopback with raw sockets from this process; 1-min load average {load_before:.1f} "
        f"before and {load_after:.1f} after (the attackers, the server and the honest device share the "
        f"cores).\n\n"
        f"**Trickle.** *k* device tokens each hold four chunked uploads to `{UPLOAD}` and send one byte a second, "
        f"reconnecting whenever answered; an honest device uploads 256 KiB with its Content-Length once a second "
        f"for {window:.0f} s, retrying after each refusal's `Retry-After`. An upload *passed* when it reached its "
        "endpoint (any answer but the guard's 408, 429 or 503; no round is open, so the endpoint answers 409 after "
        "reading the body); its latency runs from its first try to that answer, waits included.\n\n"
        + table(
            [
                "k tokens",
                "trickled bodies",
                "honest uploads passed",
                "tries",
                "guard refusals (code ×n)",
                "median s",
                "worst s",
                "endpoint answers",
                "bodies dropped as too slow",
                "attacker reconnections",
            ],
            rows_t,
        )
        + "\n\n**Pace.** One 256 KiB upload with its Content-Length sent at a steady rate on a raw socket "
        "(the answer's status line; seconds from the head to the answer).\n\n"
        + table(["rate", "bytes sent", "answer", "seconds"], rows_p)
        + f"\n\n**Refusals.** One token holds its four requests in flight; {workers} connections at once send "
        f"`GET /v1/models/{MODEL}/round` with it for {hammer_s:.0f} s (each connection waits for its answer): "
        f"{h['total']:,} answers in {h['seconds']:.1f} s ({h['per_s']:.0f}/s; "
        + ", ".join(f"{c} ×{n}" for c, n in sorted(h["answers"].items()))
        + f"), that is the burst of 40 and then {after:.1f}/s against `--rate 20`. Connections still waiting "
        "their turn when the window closes are answered after it, which is why the run outlasts the window."
    )
    print(body)
    if args.quick:
        print("(--quick: nothing recorded)")
        return
    record("service-abuse", "Slow-body and refusal attacks on a real service", body)


if __name__ == "__main__":
    main()
