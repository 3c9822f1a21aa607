"""A ``deltaplane serve`` child process for the service benchmarks: a free loopback port, and waiting until it
answers ``/healthz`` (or stopping the benchmark when it exits or never does)."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Return once ``url``/healthz answers 200; exit the benchmark if ``proc`` ends or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"deltaplane serve did not start at {url} (exit {proc.poll()})")
        time.sleep(0.2)
