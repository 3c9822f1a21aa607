"""Acceptance (#13, 2): secure aggregation over HTTP against a real `deltaplane serve` process on loopback.

50 simulated devices, each with its own device token, run one SecAgg round for the digits CNN (18,346 values)
while 30% drop out at different stages: 3 never answer, 3 vanish after advertising keys, 3 after sharing
them, 3 upload their masked input only after the unmasking request (the server must refuse them with 409) and 3
vanish after uploading (they stay in the sum). The published model must equal the base plus the mean decoded from
the survivors' plaintext codes, summed exactly in the integer domain (checked against the sum the devices'
codes give, computed here independently).

Baseline in the same run and on the same server: a plain round where the same 50 devices upload the same updates
compressed with ``fp16`` (16 bits per value, as the SecAgg codes) through the ordinary update endpoint.

Authenticated rounds (message version 5) in the same run, on the same server, with the same devices, updates and
dropouts: enrolled devices (a fresh enrollment authority certifies each one's identity key, not timed: enrollment
happens once, out of band) sign their key advertisements, check all 49 neighbours' certificates and signatures in
the roster, and sign the unmasking request in the consistency check before unmasking. Unauthenticated and
authenticated rounds alternate, ``PAIRS`` of each (the first round also pays the server's warm-up); the times
reported are each kind's median round, and the ratio is of those medians.
Expansion: the masked input alone is the additive-masking limit (ring bits / code bits = (16 + ⌈log₂ 50⌉) / 16);
the whole protocol adds keys, encrypted shares and unmasking shares. Devices run 4 at a time on this machine.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np
import torch

from _service import free_port, wait_until_healthy
from deltaplane.aggregation.secagg import Dropouts, RingEncoding, SecAggConfig, ring_bits, run_secagg
from deltaplane.codecs import Compressor
from deltaplane.data.models import build_model
from deltaplane.delta import Delta
from deltaplane.registry import Registry
from deltaplane.serve import AdminClient, DeviceClient
from deltaplane.serve.secagg_fleet import FleetReport, device_rng, enroll_fleet, run_secagg_fleet

N, BITS, CLIP, SEED = 50, 16, 0.25, 0
PAIRS = 5  # unauthenticated and authenticated rounds, alternating
MODEL = "digits-cnn"


def start_server(home: Path, token: str, secret: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "deltaplane.cli", "serve", "--home", str(home), "--port", str(port),
        "--downlink-codec", "identity", "--rate", "1000", "--burst", "1000",
        "--max-examples", "1000",  # the devices hold under 120 examples; a 16-bit weighted ring carries 65,535
    ]  # fmt: skip
    env = {
        **os.environ,
        "DELTAPLANE_ADMIN_TOKEN": token,
        "DELTAPLANE_DEVICE_SECRET": secret,
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, 120)
    except SystemExit:
        proc.kill()
        raise SystemExit(
            f"deltaplane serve did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
        ) from None
    return proc, url


def median_run(runs: list[tuple[FleetReport, float]]) -> tuple[FleetReport, float]:
    """The run whose round time (stages, unmasking, publishing) is the median of ``runs`` (an odd count)."""
    return sorted(runs, key=lambda r: r[0].seconds)[len(runs) // 2]


def in_process_seconds(cfg: SecAggConfig, codes: dict, drops: Dropouts) -> dict[bool, float]:
    """The same round in process (every device's work and the server's on one thread, no HTTP), unauthenticated
    and authenticated alternating, ``PAIRS`` each: the median seconds of each kind. Their difference is the CPU
    the 50 devices spend on authentication (certificates and signatures made and checked), all on one core."""
    creds = dict(enumerate(enroll_fleet([f"secagg-device-{i}" for i in range(N)])))
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(PAIRS):
        for authenticated in (False, True):
            t0 = time.perf_counter()
            run_secagg(
                codes, cfg, dropouts=drops, credentials=creds if authenticated else None, session=b"b/1"
            )
            times[authenticated].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def plain_round(
    url: str, token: str, reg: Registry, updates: list[Delta], weights: list[int]
) -> tuple[float, int]:
    """The baseline: the same devices upload fp16 payloads through the plain update endpoint."""
    with httpx.Client(base_url=url, timeout=120) as http:
        admin = AdminClient(url, token, client=http)
        devices = [
            DeviceClient(url, admin.issue_token(f"plain-{i}"), verifier=reg.verifier, client=http)
            for i in range(N)
        ]
        opened = admin.open_round(MODEL)
        payloads = [
            Compressor("fp16", seed=i).compress(u, base_id=MODEL, base_version=opened["base_version"])
            for i, u in enumerate(updates)
        ]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(
                pool.map(
                    lambda i: devices[i].upload(MODEL, opened["round"], payloads[i], num_examples=weights[i]),
                    range(N),
                )
            )
        admin.close_round(MODEL, opened["round"])
        return time.perf_counter() - t0, max(len(p) for p in payloads)


def main() -> None:
    from _record import record, table

    torch.set_num_threads(1)
    base = {k: v.detach().clone() for k, v in build_model(0).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    updates = [
        Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}) for _ in range(N)
    ]
    weights = [int(w) for w in np.random.default_rng(2).integers(10, 120, N)]
    drops = Dropouts(
        before_advertise={0, 1, 2},
        before_shares={3, 4, 5},
        before_upload={6, 7, 8},
        late_upload={9, 10, 11},
        after_upload={12, 13, 14},
    )
    token, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="deltaplane-secagg-http-") as tmp:
        home = Path(tmp) / "home"
        reg = Registry.create(home)
        v1 = reg.register_model(MODEL, base, lineage={"round": 0})
        reg.set_tag(MODEL, "production", v1.number)
        proc, url = start_server(home, token, secret)
        try:
            runs: dict[bool, list[tuple[FleetReport, float]]] = {False: [], True: []}
            for _ in range(PAIRS):
                for authenticated in (False, True):
                    t0 = time.perf_counter()
                    r = run_secagg_fleet(
                        url, token, MODEL, updates, weights, verifier=reg.verifier, dropouts=drops,
                        bits=BITS, clip_range=CLIP, weight_scale=float(np.mean(weights)), seed=SEED, workers=4,
                        authenticated=authenticated,
                    )  # fmt: skip
                    runs[authenticated].append((r, time.perf_counter() - t0))
            plain_s, plain_payload = plain_round(url, token, reg, updates, weights)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # independent check, from the devices' side, of every round: their codes summed exactly, and the
        # published model (base: the version the round trained from; each round publishes the next one)
        enc = RingEncoding(bits=BITS, clip_range=CLIP, weight_scale=float(np.mean(weights)))
        codes = {i: enc.encode(updates[i], weights[i], device_rng(SEED, i)) for i in range(N)}
        final = Registry(home)
        exact_sum = exact_model = True
        for r, _ in runs[False] + runs[True]:
            total = sum(codes[u].astype(np.uint64) for u in r.survivors)
            exact_sum &= (
                r.published["sum_sha256"] == hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
            )
            mean, weight = enc.decode_sum(total, count=len(r.survivors), like=Delta.zeros_like(base))
            published = final.load_state(final.get(MODEL, r.published["version"]))
            expected = mean.apply(final.load_state(final.get(MODEL, r.status["base_version"])))
            exact_model &= all(torch.equal(published[k], expected[k]) for k in base)
        fedavg = sum(weights[u] * updates[u].flatten().double() for u in r.survivors) / weight
        err = float((mean.flatten().double() - fedavg).abs().max())
        same_members = all(
            (r.survivors, r.dropped, r.refused_late)
            == (runs[False][0][0].survivors, runs[False][0][0].dropped, [9, 10, 11])
            for r, _ in runs[False] + runs[True]
        )
        rep, secagg_s = median_run(runs[False])
        auth, auth_s = median_run(runs[True])
    inproc = in_process_seconds(SecAggConfig.from_dict(rep.config), codes, drops)

    values = Delta.zeros_like(base).numel()
    k = ring_bits(BITS, N)
    plain_codes = -(-((values + 1) * BITS) // 8)
    masked = -(-((values + 1) * k) // 8) + 14  # header and id
    per_device = [rep.bytes_sent[u] for u in rep.survivors if u not in drops.after_upload]
    per_device_auth = [auth.bytes_sent[u] for u in auth.survivors if u not in drops.after_upload]
    rows = [
        ["devices invited / in the sum / dropped", f"{N} / {len(rep.survivors)} / {N - len(rep.survivors)}"],
        ["dropouts", "3 before keys, 3 after keys, 3 after shares, 3 late uploads (refused 409), 3 after upload"],
        ["late uploads refused with 409", f"{len(rep.refused_late)} of 3"],
        ["rounds run: unauthenticated / authenticated, alternating (same devices and dropouts)", f"{PAIRS} / {PAIRS}, same survivors: {'yes' if same_members else 'NO'}"],
        ["unmasked sum == survivors' codes summed (integers), every round", "yes" if exact_sum else "NO"],
        ["published model == base + mean decoded from that sum (bit-exact), every round", "yes" if exact_model else "NO"],
        ["max abs(mean − plaintext weighted FedAvg of the survivors)", f"{err:.2e} (16-bit rounding)"],
        ["SecAgg round (median): the four stages, unmasking and publishing (s)", f"{rep.seconds:.2f}"],
        *[[f"  stage: {name} (s)", f"{s:.2f}"] for name, s in rep.stage_seconds.items()],
        ["authenticated SecAgg round (median): signed keys, the consistency check, unmasking, publishing (s)", f"{auth.seconds:.2f}"],
        *[[f"  stage: {name} (s)", f"{s:.2f}"] for name, s in auth.stage_seconds.items()],
        ["time ratio authenticated / unauthenticated SecAgg (medians)", f"{auth.seconds / rep.seconds:.2f}×"],
        ["the same rounds in process, all 50 devices on one thread: unauthenticated / authenticated (s, medians)", f"{inproc[False]:.2f} / {inproc[True]:.2f} = {inproc[True] / inproc[False]:.2f}×"],
        ["  authentication CPU per device (that difference / the 47 that advertised; 44 checked the roster, 35 the signatures)", f"{1e3 * (inproc[True] - inproc[False]) / 47:.1f} ms"],
        ["plain round, same devices: fp16 uploads, aggregate and publish (s)", f"{plain_s:.2f}"],
        ["time ratio SecAgg / plain", f"{rep.seconds / plain_s:.1f}× (authenticated {auth.seconds / plain_s:.1f}×)"],
        ["whole SecAgg run incl. token issue and invitations (s)", f"{secagg_s:.2f} (authenticated {auth_s:.2f}, enrollment of 50 devices included)"],
        ["values per update (+1 weight slot)", f"{values:,}"],
        ["masked input bytes / plaintext 16-bit codes (additive-masking limit)", f"{masked:,} / {plain_codes:,} = {masked / plain_codes:.3f}× (ring {k} bits / {BITS})"],
        ["whole protocol per device (keys, shares, masked input, unmasking)", f"{max(per_device):,} bytes"],
        ["  vs the plain fp16 payload", f"{max(per_device) / plain_payload:.3f}× ({plain_payload:,} bytes)"],
        ["  vs raw fp32 update", f"{max(per_device) / (4 * values):.3f}× ({4 * values:,} bytes)"],
        ["  authenticated (certificate and signature in the advertisement, the survivor signature)", f"{max(per_device_auth):,} bytes (+{max(per_device_auth) - max(per_device):,}, {max(per_device_auth) / max(per_device):.3f}×)"],
    ]  # fmt: skip
    for r in rows:
        print(" | ".join(r), flush=True)
    if not (exact_sum and exact_model and same_members):
        raise SystemExit("SecAgg over HTTP is not exact")
    record(
        "secagg_http",
        "Secure aggregation over HTTP (issue #13 acceptance 2)",
        "50 simulated devices against a real `deltaplane serve` process on loopback (digits CNN, 16-bit codes, "
        "complete graph, threshold 34), 30% dropping out at different stages; unauthenticated and authenticated "
        f"rounds (SecAgg message version 5: signed key advertisements, the consistency check) alternating, {PAIRS} "
        "of each, times of each kind's median round:\n\n" + table(["measure", "value"], rows),
    )


if __name__ == "__main__":
    main()
