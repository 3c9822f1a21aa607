"""A real uvicorn server in its own process on 127.0.0.1, 200 concurrent simulated devices (short CI version)."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from deltaplane.registry import Registry
from deltaplane.serve.load import run_load

ADMIN = "load-admin-token-0123456789"

SERVER = """
import sys, uvicorn
from deltaplane.serve import ServiceConfig, create_app
cfg = ServiceConfig(home=sys.argv[1], admin_token=sys.argv[2], device_secret="x" * 32, rate=200.0, burst=400)
uvicorn.run(create_app(cfg), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", backlog=4096)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, make_state):
    home = tmp_path / "home"
    reg = Registry.create(home)
    reg.register_model("cnn", make_state(0))
    reg.set_tag("cnn", "production", 1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(home), ADMIN, str(port)], env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a loaded CI machine can take a while to import torch + fastapi
    while True:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start")
        time.sleep(0.1)
    yield url, reg
    proc.terminate()
    proc.wait(timeout=20)
    assert proc.returncode in (0, -15)


def test_200_devices_on_loopback_no_errors_no_lost_uploads(server):
    url, reg = server
    report = asyncio.run(
        run_load(url, ADMIN, model="cnn", verifier=reg.verifier, devices=200, duration_s=2.0)
    )
    s = report.summary()
    assert report.errors == 0, report.error_samples[:5]
    assert report.rounds >= 1 and report.uploads_accepted == 200 * report.rounds, s
    assert report.lost_uploads == 0, s
    assert all(set(codes) == {int(name[-4:-1])} for name, codes in report.bad_requests.items()), s
    assert len(report.bad_requests) == 4
    # every closed round became a new signed, verifiable version
    assert [a.number for a in reg.versions("cnn", kind="model")] == list(range(1, report.rounds + 2))
    assert reg.verify().ok
