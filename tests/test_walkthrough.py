"""A new user's first hour, end to end through the installed ``deltaplane`` command, at small sizes.

run (3 rounds) → its checkpoint → registry register → promote (evaluator file) → keys tls → serve over TLS (a
real subprocess on loopback) → a device pinned to the CA fetches and verifies the model → deploy → register the
deploy artifact. Every step checks a number, a signature or a file; the server is stopped however the test ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent  # the venv's entry points, as `make` installs them
ADMIN = "walkthrough-admin-token-0123456789"

EVALUATOR = '''\
"""The gate's evaluator: accuracy of the digits CNN on the digits test split, clean and with pixel noise."""
import torch
from deltaplane.data.digits import load_digits, train_test_split
from deltaplane.data.models import DigitsCNN
from deltaplane.personalization import accuracy

_, TEST = train_test_split(load_digits(), test_fraction=0.2, seed=0)
NOISY = type(TEST)(TEST.x + 0.2 * torch.randn(TEST.x.shape, generator=torch.Generator().manual_seed(0)), TEST.y)


def evaluate(state):
    return {"accuracy": accuracy(DigitsCNN(), state, TEST), "ood_accuracy": accuracy(DigitsCNN(), state, NOISY)}
'''


def deltaplane(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "deltaplane"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"deltaplane {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("DELTAPLANE_")}
    e.update(HOME=str(tmp_path / "user"), OMP_NUM_THREADS="1", COLUMNS="160", DELTAPLANE_ADMIN_TOKEN=ADMIN)
    (tmp_path / "user").mkdir()
    return e


def test_first_hour(tmp_path: Path, env: dict[str, str]) -> None:
    home = tmp_path / "registry"
    h = ("--home", str(home))

    # 1. a small federated run writes a checkpoint and a report
    deltaplane(
        "run",
        "--rounds",
        "3",
        "--clients",
        "4",
        "--no-baseline",
        "--no-followup",
        "-o",
        "run",
        cwd=tmp_path,
        env=env,
    )
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    last = report["runs"][-1]
    assert [r["round"] for r in last["rounds"]] == [1, 2, 3] and last["final"]["clients"] == 4
    run_accuracy = last["final"]["test_accuracy"]
    state = load_file(tmp_path / "run" / "model.safetensors")
    assert {"conv1.weight", "fc2.bias"} <= set(state)

    # 2. a registry; the run is registered as version 1, signed, and the registry verifies
    deltaplane("registry", "init", *h, cwd=tmp_path, env=env)
    registered = deltaplane("registry", "register", "digits", "run", *h, cwd=tmp_path, env=env)
    assert "registered digits@1" in registered.stdout + registered.stderr
    shown = json.loads(deltaplane("registry", "show", "digits@1", "--json", *h, cwd=tmp_path, env=env).stdout)
    assert shown["lineage"]["run"]["final"]["test_accuracy"] == run_accuracy and shown["signature"]
    pulled = tmp_path / "pulled"
    deltaplane("registry", "pull", "digits@1", "-o", str(pulled), *h, cwd=tmp_path, env=env)
    pulled_state = load_file(pulled / "model.safetensors")
    assert pulled_state.keys() == state.keys()
    assert all(torch.equal(pulled_state[k], v) for k, v in state.items()), (
        "the registry returns the run's weights"
    )
    assert "registry OK" in deltaplane("registry", "verify", *h, cwd=tmp_path, env=env).stdout

    # 3. promote through the gate with an evaluator given as a file; the gate's accuracy is the run's
    (tmp_path / "evals.py").write_text(EVALUATOR)
    promoted = deltaplane(
        "registry", "promote", "digits@1", "--evaluator", "evals.py:evaluate", *h, cwd=tmp_path, env=env
    )
    assert "digits@1 promoted to digits:production" in promoted.stdout + promoted.stderr
    shown = json.loads(deltaplane("registry", "show", "digits@1", "--json", *h, cwd=tmp_path, env=env).stdout)
    # an independent evaluation (the evaluator file) agrees with the run's own test accuracy, to the bit
    assert shown["evaluations"][-1]["metrics"]["accuracy"] == run_accuracy

    # 4. TLS keys, then the service over HTTPS on a loopback port
    deltaplane("keys", "tls", *h, "--host", "127.0.0.1", cwd=tmp_path, env=env)
    tls = home / "tls"
    assert (tls / "ca.pem").is_file() and (tls / "server.pem").is_file()
    assert (tls / "server.key").stat().st_mode & 0o077 == 0, "the private key is not readable by others"
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [str(BIN / "deltaplane"), "serve", *h, "--port", str(port),
         "--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        from deltaplane.registry.signing import load_verifier
        from deltaplane.serve.client import AdminClient, DeviceClient
        from deltaplane.serve.tls import client_context

        url = f"https://127.0.0.1:{port}"
        ctx = client_context(tls / "ca.pem")
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", verify=ctx, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                "serve never answered:\n" + (tmp_path / "serve.log").read_text()
            )
            time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA is turned away
            httpx.get(f"{url}/healthz", timeout=5)

        # 5. a device pinned to the CA fetches production, verifies the signatures and gets the run's weights
        admin = AdminClient(url, ADMIN, tls=ctx)
        token = admin.issue_token("phone-001")
        device = DeviceClient(url, token, verifier=load_verifier(home), tls=ctx)
        version, fetched = device.fetch("digits")
        assert version == 1
        assert device.sha256 == shown["sha256"]  # the signed hash the registry holds
        assert all(torch.equal(fetched[k], v) for k, v in state.items())
        device.close()
        admin.close()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()

    # 6. deploy the promoted model for devices: a smaller artifact, then register it. Three rounds of 4 devices
    # under the default 0.2% uplink leave the model at chance (≈ 10%): the quality gates refuse to ship it (exit 3,
    # nothing written) — the point of the gates — so this smoke run ships it with --no-gates, recorded as such
    deploy = ["deploy", "run/model.safetensors", "--prune", "2:4", "--quant", "int8", "--finetune-epochs", "1",
              "-o", "deployed"]  # fmt: skip
    refused = subprocess.run(
        [str(BIN / "deltaplane"), *deploy], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    if run_accuracy < 0.19:  # below the default --min-above-chance bar on 10 classes
        assert refused.returncode == 3 and "min-above-chance" in refused.stderr, (
            refused.stdout + refused.stderr
        )
        assert not (tmp_path / "deployed").exists()
        out = deltaplane(*deploy, "--no-gates", cwd=tmp_path, env=env)
    else:
        assert refused.returncode == 0, refused.stdout + refused.stderr
        out = refused
    deployed = tmp_path / "deployed"
    manifest = json.loads((deployed / "manifest.json").read_text())
    source = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert manifest["source_sha256"] == hashlib.sha256(source).hexdigest()  # it shipped the promoted weights
    assert manifest["prune"] == "2:4" and manifest["weight_sparsity"] > 0.4
    assert (deployed / "model.dpla").stat().st_size * 3 < len(source), "the artifact is several times smaller"
    assert (deployed / "MODEL_CARD.md").is_file() and (deployed / "model.onnx").is_file()
    assert "gates" in out.stdout
    deltaplane("registry", "register", "digits-device", "deployed", *h, cwd=tmp_path, env=env)
    listed = json.loads(deltaplane("registry", "list", "--json", *h, cwd=tmp_path, env=env).stdout)
    assert {v["ref"] for v in listed} == {"digits@1", "digits-device@1"}
    assert "registry OK" in deltaplane("registry", "verify", *h, cwd=tmp_path, env=env).stdout
