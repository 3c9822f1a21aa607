"""Loopback deployment: a real SuperLink and two SuperNodes (subprocesses, insecure, 127.0.0.1 only) run
examples/flower-app with ``flwr run`` for two rounds. Every process is killed on exit, pass or fail."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the 'flower' extra is not installed")

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower-app"
BIN = Path(sys.executable).parent
DEADLINE_S = 150


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_port(port: int, procs: list[subprocess.Popen], deadline: float) -> None:
    """Block until something listens on 127.0.0.1:``port`` (the SuperLink takes seconds to start)."""
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a Flower process exited during start-up (see its log)")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after start-up")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:  # each started in its own session: its whole group (app subprocesses too) goes
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# Runs in CI (acceptance: a loopback deployment passes there): about 30 s on an idle 2-core machine, 68-80 s
# under heavy load, since every round each SuperNode starts a fresh `flwr-clientapp` that imports torch.
def test_superlink_and_two_supernodes_complete_rounds(
    tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    out = _deploy(tmp_path, processes, ["", ""], "num-server-rounds=2")
    rounds = re.findall(r"deltaplane round (\d): test acc ([0-9.]+), uplink (\d+) B payload", out)
    # 1% top-k + 8-bit of an 18,346-parameter CNN: a few hundred bytes per node, not 73 kB of fp32
    assert all(0 < int(r[2]) < 2 * 2_000 for r in rounds), rounds


@pytest.mark.slow
def test_enrolled_supernodes_run_authenticated_secagg_rounds(
    tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    """The deployed App with ``secagg=true secagg-authenticated=true``: each SuperNode enrolled by the
    ``--node-config`` line ``deltaplane keys certify`` prints for it, as README.md says."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for args in (["enrollment", "--out", "enrollment"],
                 ["certify", "--authority-key", "enrollment/enrollment.ed25519.pem", "--out", "nodes", "--devices", "2"]):  # fmt: skip
        done = subprocess.run([str(BIN / "deltaplane"), "keys", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if "flower-supernode" in line)
    enrolled = [shlex.split(lines[f"device-{i}"])[2] for i in range(2)]
    out = _deploy(tmp_path, processes, enrolled, "num-server-rounds=2 secagg=true secagg-authenticated=true")
    assert "SecAggError" not in out, out[-3000:]
    rounds = re.findall(r"deltaplane round (\d): test acc ([0-9.]+), uplink (\d+) B payload", out)
    # the masked ring codes of every parameter went up (tens of kB per node), not the 1% top-k payloads
    assert all(int(r[2]) > 2 * 18_346 for r in rounds), rounds


def _deploy(
    tmp_path: Path, processes: list[subprocess.Popen], node_configs: list[str], run_config: str
) -> str:
    """A SuperLink and two SuperNodes (node *i* with ``node_configs[i]`` after its partition) run the example
    for two rounds with ``run_config``; returns ``flwr run``'s output once it printed both rounds."""
    # Flower 1.42 serves the Fleet, Control and Runtime APIs of a SuperLink on one HTTP port.
    link, node0, node1 = _free_ports(3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-deployment"\n\n'
        f'[superlink.local-deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode spawn flwr-* apps
    }

    def start(name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("w")
        processes.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    t0 = time.monotonic()
    start(
        "superlink",
        "flower-superlink",
        "--insecure",
        # deltaplane is installed here already; no `uv sync` of the app's dependencies (no network in CI)
        "--disable-runtime-dependency-installation",
        "--host=127.0.0.1",
        f"--port={link}",
    )
    _wait_for_port(link, processes, t0 + 60)
    for i, port in enumerate((node0, node1)):
        start(
            f"supernode{i}",
            "flower-supernode",
            "--insecure",
            f"--superlink=127.0.0.1:{link}",
            f"--node-config=partition-id={i} num-partitions=2 {node_configs[i]}".strip(),
            "--host=127.0.0.1",
            f"--port={port}",
        )

    run = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(APP),
            "local-deployment",
            "--stream",
            "--run-config",
            run_config,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    out = run.stdout + run.stderr
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert run.returncode == 0, out + logs
    assert "deltaplane done: 2 rounds" in out, out + logs
    rounds = re.findall(r"deltaplane round (\d): test acc ([0-9.]+), uplink (\d+) B payload", out)
    assert [r[0] for r in rounds] == ["1", "2"], out
    assert time.monotonic() - t0 < DEADLINE_S
    return out


LOCAL_SUPERLINK_PORT = 39091  # where `flwr run . local` starts (or finds) Flower's local SuperLink


def test_flwr_run_local_runs_the_example_from_a_checkout(tmp_path: Path) -> None:
    """`flwr run . local` as the example's README says (issue 22): Flower's own local simulation SuperLink,
    with runtime dependency installation off so the checkout's deltaplane is used (it is not on PyPI)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", LOCAL_SUPERLINK_PORT)) == 0:
            pytest.fail(f"a local Flower SuperLink already listens on {LOCAL_SUPERLINK_PORT}; stop it first")
    home = tmp_path / "flwr-home"
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    try:
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local", "--stream", "--run-config", "num-server-rounds=2"],
            cwd=APP,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S * 2,
        )
    finally:  # the local SuperLink outlives `flwr run`: stop the one this test started (its database is ours)
        subprocess.run(["pkill", "-f", f"flower-superlink.*{home}"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "deltaplane done: 2 rounds" in out, out[-3000:]
    assert "Exit Code" not in out and "uv sync failed" not in out
