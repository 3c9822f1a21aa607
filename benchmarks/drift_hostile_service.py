"""Drift monitoring against one hostile enrolled device, on a real ``deltaplane serve`` process.

Starts the service on a fresh registry (models "cnn" and "other"), enrolls devices with admin-issued tokens and
measures over HTTP: (1) 9 honest devices and one reporting every input missing, 20 windows of 10: alerts raised;
(2) one device sending 30 reports before each window: how many honest reports a window of 20 (3 devices) then
closes on; (3) "other" raising 120 alerts: how many of "cnn"'s stay; (4) hostile payloads: the status codes.
Run it with ``PYTHONPATH`` at another source tree to measure that one (the audit ran it on main and on the
branch). Prints JSON; writes nothing into the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _service import free_port, wait_until_healthy
from deltaplane.monitor import DriftSpec, summarize
from deltaplane.registry import Registry

ADMIN = "admin-token-0123456789"
home = tempfile.mkdtemp(prefix="dflive-")
reg = Registry.create(home)
for m in ("cnn", "other"):
    v = reg.register_model(m, {"w": torch.zeros(4)}, lineage={"round": 0})
    reg.set_tag(m, "production", v.number, action="promote")
port = free_port()
proc = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "deltaplane.cli",
        "serve",
        "--home",
        home,
        "--port",
        str(port),
        "--admin-token",
        ADMIN,
        "--device-secret",
        "s" * 32,
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=os.environ.copy(),
)
url = f"http://127.0.0.1:{port}"
H = {"Authorization": f"Bearer {ADMIN}"}
try:
    wait_until_healthy(url, proc, 60)
    c = httpx.Client(base_url=url, timeout=60)
    tokens = {}

    def tok(d):
        if d not in tokens:
            r = c.post("/admin/devices", json={"device_id": d, "cohort": "eu"}, headers=H)
            r.raise_for_status()
            tokens[d] = r.json()["token"]
        return {"Authorization": f"Bearer {tokens[d]}"}

    def report(d, model, summary, version=1):
        return c.post(
            f"/v1/models/{model}/report", json={"version": version, "summary": summary}, headers=tok(d)
        )

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 3))
    spec = DriftSpec.fit(ref)

    def set_ref(model, **kw):
        r = c.put(
            f"/admin/models/{model}/drift-reference",
            headers=H,
            json={"spec": spec.to_dict(), "reference": summarize(spec, ref).to_dict(), **kw},
        )
        r.raise_for_status()

    out = {}
    # 1. nine honest devices + one liar (every input missing), 20 windows
    set_ref("cnn", window=10)
    alerts = 0
    windows = 0
    t0 = time.perf_counter()
    for _w in range(20):
        for i in range(9):
            report(f"d{i}", "cnn", summarize(spec, rng.normal(size=(200, 3))).to_dict()).raise_for_status()
        r = report("liar", "cnn", summarize(spec, np.full((200, 3), np.nan)).to_dict()).json()
        windows += r["drift_evaluated"]
        alerts += len(r["alerts"])
    out["liar_missing"] = {"windows": windows, "alerts": alerts, "s": round(time.perf_counter() - t0, 2)}
    # 2. one device floods: how many honest reports does a window of 20 (min 3 devices) close on?
    set_ref("cnn", window=20)
    honest_in = []
    for _w in range(5):
        for _k in range(30):
            r = report("flood", "cnn", summarize(spec, rng.normal(size=(50, 3))).to_dict())
            if r.status_code == 429:
                time.sleep(0.5)
                continue
        n = 0
        for i in range(20):
            r = report(f"d{i % 9}", "cnn", summarize(spec, rng.normal(size=(200, 3))).to_dict()).json()
            n += 1
            if r["drift_evaluated"]:
                break
        honest_in.append(n)
    out["flood_honest_reports_per_window"] = honest_in
    # 3. alerts flood on "other" vs cnn's real alerts
    set_ref("cnn", window=3)
    for i in range(3):
        r = report(f"d{i}", "cnn", summarize(spec, rng.normal(size=(300, 3)) + 3).to_dict()).json()
    cnn_alerts = len(r["alerts"])
    set_ref("other", window=3)
    t0 = time.perf_counter()
    raised = 0
    for _w in range(40):
        for i in range(3):
            r = report(f"x{i}", "other", summarize(spec, rng.normal(size=(300, 3)) + 3).to_dict())
            if r.status_code == 202:
                raised += len(r.json()["alerts"])
    kept = c.get("/admin/alerts", params={"model": "cnn"}, headers=H).json()
    out["alerts"] = {
        "cnn_raised": cnn_alerts,
        "other_raised": raised,
        "cnn_kept": len(kept),
        "total_kept": len(c.get("/admin/alerts", headers=H).json()),
    }
    # 4. hostile payloads: status codes
    good = summarize(spec, rng.normal(size=(10, 3))).to_dict()
    cases = {
        "NaN count": '{"version":1,"summary":{"n":10,"feature_counts":[[NaN,0,0,0,0,0,0,0,0,0]]}}',
        "float count": json.dumps({"version": 1, "summary": {**good, "n": 10.5}}),
        "huge count": json.dumps({"version": 1, "summary": {**good, "n": 10**12}}),
        "negative": json.dumps(
            {
                "version": 1,
                "summary": {**good, "feature_counts": [[-1, *r[1:]] for r in good["feature_counts"]]},
            }
        ),
        "wrong bins": json.dumps(
            {"version": 1, "summary": {**good, "feature_counts": [r[:-1] for r in good["feature_counts"]]}}
        ),
        "rows != n": json.dumps({"version": 1, "summary": {**good, "n": 5}}),
        "inf embedding": '{"version":1,"summary":{"n":1,"embedding_sum":[Infinity],"embedding_n":1}}',
        "unknown version": json.dumps({"version": 99, "summary": good}),
        "bool n": json.dumps({"version": 1, "summary": {**good, "n": True}}),
    }
    out["payloads"] = {
        k: c.post(
            "/v1/models/cnn/report", content=v, headers={**tok("pl"), "Content-Type": "application/json"}
        ).status_code
        for k, v in cases.items()
    }
    print(json.dumps(out, indent=1))
finally:
    proc.terminate()
    proc.wait(30)
