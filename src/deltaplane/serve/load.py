"""Loopback load generator: many simulated devices fetching and uploading against a running service.

Each simulated device is an asyncio task with its own token, model version and compressor. Rounds repeat
until the time budget is spent: the operator opens a round, every device fetches the training version (a
signed delta once it has a base), verifies and applies it, uploads a compressed update for the round and
reports metrics; the operator closes the round (aggregate → new signed version). Latency is measured per
request; an *error* is any unexpected status or transport failure; a *lost upload* is one the device saw
accepted that the server did not count into the round it closed. Bad requests (oversized, unauthenticated,
malformed, stale) are mixed in and must each get their own 4xx.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.registry.downlink import Downlink, apply_downlink
from deltaplane.registry.signing import Verifier
from deltaplane.serve.client import direct_if_loopback

__all__ = ["LoadReport", "run_load"]


@dataclass
class LoadReport:
    devices: int = 0
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    rounds: int = 0
    uploads_accepted: int = 0
    uploads_counted: int = 0
    bad_requests: dict[str, list[int]] = field(default_factory=dict)
    bytes_down: int = 0
    full_bytes_equivalent: int = 0
    delta_downloads: int = 0
    delta_bytes: int = 0
    delta_full_equivalent: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def lost_uploads(self) -> int:
        return self.uploads_accepted - self.uploads_counted

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "requests_per_s": round(self.rps, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "errors": self.errors,
            "rounds": self.rounds,
            "uploads_accepted": self.uploads_accepted,
            "lost_uploads": self.lost_uploads,
            "downlink_saving": round(self.full_bytes_equivalent / max(1, self.bytes_down), 1),
            "delta_downloads": self.delta_downloads,
            "delta_saving": round(self.delta_full_equivalent / max(1, self.delta_bytes), 1),
            "bad_requests": self.bad_requests,
        }


async def run_load(
    url: str,
    admin_token: str,
    *,
    model: str,
    verifier: Verifier,
    devices: int = 200,
    duration_s: float = 10.0,
    codec: str = "topk(0.1) | quant(bits=8)",
    seed: int = 0,
    min_rounds: int = 1,
) -> LoadReport:
    """Drive ``devices`` concurrent simulated devices against the service at ``url`` for ``duration_s``.

    At least ``min_rounds`` rounds run even if that takes longer (from the second round on, devices receive
    deltas instead of full models).
    """
    import httpx

    report = LoadReport(devices=devices)
    limits = httpx.Limits(max_connections=devices + 8, max_keepalive_connections=devices + 8)
    async with httpx.AsyncClient(
        base_url=url, timeout=300.0, limits=limits, **direct_if_loopback(url)
    ) as http:
        admin = {"Authorization": f"Bearer {admin_token}"}

        async def call(method: str, path: str, expect: tuple[int, ...], **kw: Any) -> httpx.Response | None:
            t = time.perf_counter()
            try:
                resp = await http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                report.errors += 1
                report.error_samples.append(f"{method} {path}: {type(exc).__name__} {exc}"[:200])
                return None
            report.latencies_ms.append(1000 * (time.perf_counter() - t))
            report.requests += 1
            if resp.status_code not in expect:
                report.errors += 1
                report.error_samples.append(f"{method} {path}: {resp.status_code} {resp.text[:120]}")
                return None
            return resp

        tokens = []
        for i in range(devices):
            r = await call(
                "POST",
                "/admin/devices",
                (200,),
                json={"device_id": f"dev{i}", "cohort": f"c{i % 4}"},
                headers=admin,
            )
            tokens.append(r.json()["token"] if r is not None else "")
        states: list[dict[str, torch.Tensor] | None] = [None] * devices
        versions: list[int | None] = [None] * devices
        comps = [Compressor(codec, error_feedback=True, seed=seed + i) for i in range(devices)]

        async def device(i: int, round_id: int, base: int, nonce: str) -> None:
            h = {"Authorization": f"Bearer {tokens[i]}"}
            params: dict[str, Any] = {"channel": "training"}
            if versions[i] is not None:
                params["have"] = versions[i]
            r = await call("GET", f"/v1/models/{model}/download", (200, 204), params=params, headers=h)
            if r is None:
                return
            if r.status_code == 200:
                hd = r.headers
                dl = Downlink(
                    hd["x-deltaplane-kind"],
                    model,
                    int(hd["x-deltaplane-version"]),
                    int(hd["x-deltaplane-base"]) if hd["x-deltaplane-base"] else None,
                    r.content,
                    hd["x-deltaplane-signature"],
                    hd["x-deltaplane-target-sha256"],
                    int(hd["x-deltaplane-full-bytes"]),
                )
                report.bytes_down += len(dl.body)
                report.full_bytes_equivalent += dl.full_bytes
                if dl.kind == "delta":
                    report.delta_downloads += 1
                    report.delta_bytes += len(dl.body)
                    report.delta_full_equivalent += dl.full_bytes
                states[i] = apply_downlink(dl, verifier, states[i])  # verified: signature + target hash
                versions[i] = dl.version
            state = states[i]
            if versions[i] != base or state is None:  # a device holds a state whenever it holds a version
                report.errors += 1
                report.error_samples.append(f"dev{i} holds v{versions[i]} but round {round_id} is on v{base}")
                return
            g = torch.Generator().manual_seed(seed * 7919 + i * 101 + round_id)
            update = Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()})
            payload = comps[i].compress(update, base_id=model, base_version=base)
            r = await call(
                "POST",
                f"/v1/models/{model}/rounds/{round_id}/update",
                (202,),
                content=payload,
                params={"num_examples": 1 + i % 7},
                headers={**h, "Content-Type": "application/octet-stream", "X-Deltaplane-Round-Nonce": nonce},
            )
            if r is not None:
                report.uploads_accepted += 1
            await call(
                "POST",
                f"/v1/models/{model}/report",
                (202,),
                json={"version": base, "metrics": {"loss": 0.5}},
                headers=h,
            )

        async def bad_requests(round_id: int, base: int, nonce: str) -> None:
            h = {
                "Authorization": f"Bearer {tokens[0]}",
                "Content-Type": "application/octet-stream",
                "X-Deltaplane-Round-Nonce": nonce,
            }
            path = f"/v1/models/{model}/rounds/{round_id}/update"
            good = Compressor("fp16").compress(
                Delta({k: torch.zeros_like(v) for k, v in (states[0] or {}).items()}),
                base_id=model,
                base_version=base,
            )
            stale = Compressor("fp16").compress(
                Delta({k: torch.zeros_like(v) for k, v in (states[0] or {}).items()}),
                base_id=model,
                base_version=base + 1000,
            )
            cases: dict[str, tuple[int, dict[str, Any]]] = {
                "oversized (413)": (413, {"content": b"\0" * (9 << 20), "headers": h}),
                "unauthenticated (401)": (401, {"content": good}),
                "malformed (400)": (400, {"content": b"DPLN garbage", "headers": h}),
                "stale base (409)": (409, {"content": stale, "headers": h}),
            }
            for name, (code, kw) in cases.items():
                t = time.perf_counter()
                try:
                    resp = await http.post(path, **kw)
                except httpx.HTTPError as exc:
                    report.errors += 1
                    report.error_samples.append(f"{name}: {type(exc).__name__} {exc}"[:200])
                    continue
                report.latencies_ms.append(1000 * (time.perf_counter() - t))
                report.requests += 1
                report.bad_requests.setdefault(name, []).append(resp.status_code)
                if resp.status_code != code:
                    report.errors += 1
                    report.error_samples.append(f"{name}: got {resp.status_code} {resp.text[:100]}")

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration_s or report.rounds < min_rounds:
            r = await call("POST", f"/admin/models/{model}/rounds", (200,), json={}, headers=admin)
            if r is None:
                break
            rid, base, nonce = r.json()["round"], r.json()["base_version"], r.json()["nonce"]
            await asyncio.gather(
                bad_requests(rid, base, nonce), *(device(i, rid, base, nonce) for i in range(devices))
            )
            r = await call("POST", f"/admin/models/{model}/rounds/{rid}/close", (200,), headers=admin)
            if r is None:
                break
            report.uploads_counted += r.json()["uploads"]
            report.rounds += 1
        report.seconds = time.perf_counter() - t0
        ok = await call("GET", "/healthz", (200,))
        if ok is None:
            report.error_samples.append("server not healthy after the run")
    return report
