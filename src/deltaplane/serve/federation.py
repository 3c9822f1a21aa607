"""``deltaplane run --transport http``: the simulator's federation, over a real service on loopback.

Same clients, data, local training, codecs and seeds as :func:`deltaplane.sim.run_simulation`, but every byte
travels through HTTP: a registry in a scratch folder holds the signed versions, a uvicorn server on
``127.0.0.1`` (random port) runs the rounds, and each simulated device is a :class:`DeviceClient` with its own
token that fetches the training version (a signed delta it verifies and applies), uploads its compressed
update (validated by the server against the base version) and reports a drift summary of its held-out data
and predictions. Uploads are sent one device at a time in client order, so FedAvg sums in the same order as
in process and the two transports produce the same weights — which the tests check.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from deltaplane.data.digits import load_digits, train_test_split
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError
from deltaplane.monitor import DriftSpec, summarize
from deltaplane.registry import Registry
from deltaplane.serve.app import ServiceConfig, create_app
from deltaplane.serve.client import AdminClient, DeviceClient
from deltaplane.serve.server import BackgroundServer
from deltaplane.sim.client import evaluate_clients, make_clients, round_scores
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import build_model
from deltaplane.sim.seeding import Stream, derive_seed, numpy_rng, torch_generator
from deltaplane.sim.simulation import RoundMetrics, RunResult, sample_clients

__all__ = ["HttpRunResult", "run_http_simulation"]

MODEL = "digits-cnn"


@dataclass
class HttpRunResult(RunResult):
    """A :class:`RunResult` plus what the HTTP transport measured and the drift monitor reported per round."""

    transport: dict[str, Any] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "transport": self.transport, "drift": self.drift}


def _predictions(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def run_http_simulation(
    config: RunConfig,
    *,
    progress: Callable[[RoundMetrics], None] | None = None,
    home: str | Path | None = None,
) -> HttpRunResult:
    """Run ``config`` with simulated devices talking to a real local server (see the module docstring)."""
    _check_supported(config)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    scratch = None
    if home is None:
        scratch = tempfile.TemporaryDirectory(prefix="deltaplane-http-")
        home = scratch.name
    try:
        return _run(config, progress, Path(home))
    finally:
        torch.set_num_threads(prev_threads)
        if scratch is not None:
            scratch.cleanup()


#: RunConfig fields the HTTP transport does not implement, with the value that means "off".
_INPROC_ONLY = {
    "aggregator": "fedavg",
    "clip": None,
    "dp_noise": 0.0,
    "secagg": False,
    "attack": None,
    "defense": None,
    "max_update_norm": None,
    "prox_mu": 0.0,
    "personalization": "none",
}


def _check_supported(config: RunConfig) -> None:
    """Refuse options the HTTP transport would otherwise silently ignore."""
    used = [k for k, off in _INPROC_ONLY.items() if getattr(config, k, off) != off]
    if used:
        raise ConfigError(
            f"--transport http runs plain FedAvg; these options need the in-process transport: {', '.join(used)}"
        )


def _run(config: RunConfig, progress: Callable[[RoundMetrics], None] | None, home: Path) -> HttpRunResult:
    start = time.perf_counter()
    train, test = train_test_split(load_digits(), test_fraction=config.test_fraction, seed=config.split_seed)
    clients = make_clients(config, train)
    model = build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reg = Registry.create(home)
    v0 = reg.register_model(
        MODEL,
        initial,
        lineage={"round": 0, "run_config": config.to_dict()},
        governance={"data_sources": ["sklearn digits"], "cohorts": ["simulated"]},
    )
    reg.set_tag(MODEL, "production", v0.number, reason="initial model")
    admin_token = secrets.token_urlsafe(24)
    service = ServiceConfig(
        home=str(home),
        admin_token=admin_token,
        device_secret=secrets.token_urlsafe(32),
        rate=1e6,  # simulated devices are trusted and fast; rate limits are exercised by the load benchmark
        burst=1_000_000,
        max_upload_bytes=max(8 << 20, 4 * Delta.zeros_like(initial).nbytes),
        downlink_codec=config.downlink_codec,
        downlink_error_feedback=config.downlink_error_feedback,
        downlink_seed=derive_seed(config.seed, Stream.DOWNLINK_CODEC),
        server_lr=config.server_lr,
    )
    # Drift reference: pixel histograms of the training set and the label prior (what a good model predicts).
    flat_train = train.x.reshape(len(train), -1).numpy()
    spec = DriftSpec.fit(flat_train, n_classes=10, n_bins=8)
    reference = summarize(spec, flat_train, train.y.numpy())
    raw_bytes = Delta.zeros_like(initial).nbytes
    history: list[RoundMetrics] = []
    drift: list[dict[str, Any]] = []
    requests = 0
    with (
        BackgroundServer(create_app(service)) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        admin = AdminClient(server.url, admin_token, client=http)
        admin.set_drift_reference(MODEL, spec.to_dict(), reference.to_dict(), window=len(clients))
        devices = [
            DeviceClient(
                server.url,
                admin.issue_token(f"client-{c.cid}", "simulated"),
                verifier=reg.verifier,
                client=http,
            )
            for c in clients
        ]
        for d in devices:  # every device starts from the initial model (not counted, as in process)
            d.fetch(MODEL, channel="training")
        requests += 2 + 2 * len(devices)
        cum_up = cum_down = 0
        for rnd in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            opened = admin.open_round(MODEL)
            base = opened["base_version"]
            chosen = sample_clients(
                config.clients, config.sample_fraction, numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd)
            )
            uplink = 0
            for cid in chosen:
                client, dev = clients[cid], devices[cid]
                gen = torch_generator(config.seed, Stream.LOCAL_TRAINING, rnd, cid)
                delta = client.local_update(model, dev.state, config, gen, lr=config.client_lr(rnd))
                payload = client.upload(delta, base_id=MODEL, base_version=base)
                dev.upload(MODEL, opened["round"], payload, num_examples=client.num_samples)
                uplink += len(payload)
            closed = admin.close_round(MODEL, opened["round"])
            before = sum(d.bytes_received for d in devices)
            for d in devices:
                d.fetch(MODEL, channel="training")
            down = sum(d.bytes_received for d in devices) - before
            requests += 2 + 2 * len(chosen) + len(devices)
            cum_up += uplink
            cum_down += down
            model.load_state_dict(devices[0].state)
            client_acc = evaluate_clients(model, clients)
            alerts: list[str] = []
            for c, d in zip(clients, devices, strict=True):  # summaries only: histograms and class counts
                x = c.holdout.x.reshape(len(c.holdout), -1).numpy()
                s = summarize(spec, x, _predictions(model, c.holdout.x))
                alerts += d.report(
                    MODEL,
                    version=closed["version"],
                    metrics={"holdout_accuracy": client_acc[c.cid]},
                    summary=s.to_dict(),
                    round_id=opened["round"],
                )["alerts"]
            requests += len(devices) + 2
            rows = admin._get(f"/admin/models/{MODEL}/drift")[-1]["rows"]
            feature_psi = [r["psi"] for r in rows if r["kind"] == "feature"]
            pred = next(r for r in rows if r["kind"] == "prediction")
            drift.append(
                {
                    "round": rnd,
                    "version": closed["version"],
                    "alerts": alerts,
                    "max_feature_psi": max(feature_psi) if feature_psi else 0.0,
                    "prediction_psi": pred["psi"],
                    "prediction_p": pred["p"],
                }
            )
            metrics = RoundMetrics(
                round=rnd,
                clients=len(chosen),
                **round_scores(model, test, client_acc),
                uplink_bytes=uplink,
                downlink_bytes=down,
                cumulative_uplink_bytes=cum_up,
                cumulative_downlink_bytes=cum_down,
                seconds=time.perf_counter() - t0,
            )
            history.append(metrics)
            if progress is not None:
                progress(metrics)
        stats = admin.stats()["counters"]
        final_state = dict(devices[0].state)
    report = reg.verify()
    return HttpRunResult(
        config=config,
        rounds=history,
        num_params=sum(v.numel() for v in initial.values()),
        raw_update_bytes=raw_bytes,
        wall_time_s=time.perf_counter() - start,
        final_state=final_state,
        transport={
            "kind": "http",
            "server": "uvicorn on 127.0.0.1",
            "requests": requests,
            "uploads_accepted": int(stats.get("uploads.accepted", 0)),
            "rejected": {k: v for k, v in stats.items() if k.startswith("rejected.")},
            "registry_versions": len(reg.versions(MODEL, kind="model")),
            "registry_ok": report.ok,
        },
        drift=drift,
    )
