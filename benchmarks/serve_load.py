"""Loopback load: 200 concurrent simulated devices against a real uvicorn server process on 127.0.0.1.

The server runs in its own process (one worker); the load generator (asyncio + httpx) in this one, so the two
share the machine's cores. Each round every device fetches the training version (signed delta after the
first round, verified and applied), uploads a compressed update and reports metrics; the operator then
closes the round into a new signed version. Bad requests (oversized, unauthenticated, malformed, stale) are
mixed into every round and must get their own 4xx. The baseline row is a bare ``/healthz`` GET storm with
the same concurrency, so the service's figures can be read relative to what uvicorn + httpx give on this
machine.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np

from _record import record, table
from _service import free_port, wait_until_healthy
from deltaplane.data.models import build_model
from deltaplane.registry import Registry
from deltaplane.serve.load import run_load

DEVICES, SECONDS = 200, 30.0
ADMIN = "bench-admin-token-0123456789"
SERVER = """
import sys, uvicorn
from deltaplane.serve import ServiceConfig, create_app
cfg = ServiceConfig(home=sys.argv[1], admin_token=sys.argv[2], device_secret="x" * 32, rate=200.0, burst=400)
uvicorn.run(create_app(cfg), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", backlog=4096)
"""


async def baseline(url: str, devices: int, seconds: float) -> tuple[float, float, float, int]:
    lat: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=devices + 8)) as http:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() - t0 < seconds:
                t = time.perf_counter()
                r = await http.get("/healthz")
                lat.append(1000 * (time.perf_counter() - t))
                errors += r.status_code != 200

        await asyncio.gather(*(worker() for _ in range(devices)))
        elapsed = time.perf_counter() - t0
    return len(lat) / elapsed, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), errors


def initial_state() -> dict:
    """The digits task's CNN (the library's model, seed 0): the weights the service ships and devices update."""
    return {k: v.detach().clone() for k, v in build_model(0).state_dict().items()}


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="load-bench-")) / "h"
    reg = Registry.create(home)
    reg.register_model("cnn", initial_state())
    reg.set_tag("cnn", "production", 1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(home), ADMIN, str(port)], env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, 120)
        b_rps, b50, b99, b_err = asyncio.run(baseline(url, DEVICES, 5.0))
        rep = asyncio.run(
            run_load(
                url,
                ADMIN,
                model="cnn",
                verifier=reg.verifier,
                devices=DEVICES,
                duration_s=SECONDS,
                min_rounds=3,
            )
        )
        alive = httpx.get(url + "/healthz").status_code == 200
        load = os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    s = rep.summary()
    print(s, rep.error_samples[:5])
    rows = [
        ["`/healthz` storm (baseline)", f"{b_rps:.0f}", f"{b50:.1f}", f"{b99:.1f}", b_err, "–", "–"],
        [
            "fetch + upload + report rounds",
            f"{rep.rps:.0f}",
            f"{s['p50_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            rep.errors,
            f"{rep.uploads_accepted} in {rep.rounds} rounds",
            rep.lost_uploads,
        ],
    ]
    bad = ", ".join(f"{k}: {sorted(set(v))} ×{len(v)}" for k, v in rep.bad_requests.items())
    body = (
        f"{DEVICES} concurrent devices for {rep.seconds:.0f} s (at least {SECONDS:.0f} s and 3 rounds), 127.0.0.1 only; the digits CNN "
        f"({sum(v.numel() for v in initial_state().values()):,} params), uplink `topk(0.1) | quant(bits=8)`, "
        "downlink = the service's signed delta (verified and applied by every device).\n\n"
        + table(
            ["workload", "requests/s", "p50 ms", "p99 ms", "errors", "uploads accepted", "lost uploads"], rows
        )
        + f"\n\nRound throughput relative to the baseline row (`/healthz` on the same service process, which "
        f"does no work per request): {rep.rps / b_rps:.2f}×. "
        f"Downlink: {s['delta_downloads']} signed delta downloads, each {s['delta_saving']}× smaller than the full "
        f"model (whole run incl. the first full downloads: {s['downlink_saving']}×). "
        f"Bad requests mixed in (expected code, got codes × count): {bad}. "
        f"Server healthy afterwards: {'yes' if alive else 'NO'}. Targets: 0 errors, 0 lost uploads.\n\n"
        f"Machine load average during the run: {load:.1f} on {os.cpu_count()} cores (the machine is shared with "
        "other jobs), so absolute rates and latencies are far below what the same code does on an idle machine; "
        "the ratio to the baseline measured in the same run is the comparable figure."
    )
    print(body)
    record("serve-load", "Service under load on loopback (200 devices)", body)


if __name__ == "__main__":
    main()
