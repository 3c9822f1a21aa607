"""1,000 clients, 5% sampled per round: per-round wall time and peak memory, in-process engine vs Flower's
simulation engine (Ray), on this machine.

Digits has only 1,437 training images, so the run adds 8 one-pixel-shifted copies (``train_shifts=8``,
~13 images per client) and lowers ``min_client_samples`` to 2; otherwise the default task and codec.
Peak memory is the largest resident set of the whole process tree (the benchmark process plus every Ray
process it starts), sampled every 50 ms; each engine runs in its own fresh Python process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from _record import record, table  # benchmarks/ is on sys.path when a script here runs

ROUNDS = 5
CONFIG = dict(
    clients=1000,
    sample_fraction=0.05,
    rounds=ROUNDS,
    train_shifts=8,
    min_client_samples=2,
    codec="topk(0.01) | quant(bits=8)",
)


def _child(engine: str) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from deltaplane.sim import RunConfig

    cfg = RunConfig(**CONFIG)
    t0 = time.perf_counter()
    if engine == "inprocess":
        from deltaplane.sim import run_simulation

        result = run_simulation(cfg)
    else:
        from deltaplane.flower import run_flower

        result = run_flower(cfg)
    out = {
        "wall": time.perf_counter() - t0,
        "rounds": [r.seconds for r in result.rounds],
        "acc": result.final.test_accuracy,
        "clients": [r.clients for r in result.rounds],
        "uplink": result.total_uplink_bytes,
    }
    print("RESULT " + json.dumps(out), flush=True)


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, read from /proc (Linux; no psutil needed)."""
    parent, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss.get(p, 0) for p in tree)


def _measure(engine: str) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", engine],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[7:]), "peak_rss": peak[0]}


def main() -> None:
    res = {}
    for engine in ("inprocess", "flower"):
        print(f"running {engine} ...", flush=True)
        res[engine] = _measure(engine)
        print(res[engine], flush=True)
    base = res["inprocess"]
    steady = {k: sum(v["rounds"][1:]) / (ROUNDS - 1) for k, v in res.items()}
    rows = []
    for name, key in (("in-process", "inprocess"), ("Flower simulation (Ray)", "flower")):
        r = res[key]
        rows.append(
            [
                name,
                f"{r['rounds'][0]:.1f} s",
                f"{steady[key]:.2f} s ({steady[key] / steady['inprocess']:.2f}×)",
                f"{r['wall']:.1f} s ({r['wall'] / base['wall']:.2f}×)",
                f"{r['peak_rss'] / 2**20:,.0f} MiB ({r['peak_rss'] / base['peak_rss']:.2f}×)",
                f"{r['acc']:.4f}",
            ]
        )
    codec = CONFIG["codec"].replace("|", "\\|")  # a bare | would split the markdown cell
    body = (
        f"{CONFIG['clients']} clients, {int(CONFIG['sample_fraction'] * 100)}% sampled per round "
        f"({res['inprocess']['clients'][0]} clients/round), {ROUNDS} rounds, codec "
        f"`{codec}`, train_shifts={CONFIG['train_shifts']}, "
        f"min_client_samples={CONFIG['min_client_samples']}. Each round includes scoring the global model on "
        "the test set and on all 1,000 clients' held-out shards (as `deltaplane run` does).\n\n"
        + table(
            [
                "engine",
                "round 1",
                "rounds 2+ mean (ratio)",
                "total wall (ratio)",
                "peak RSS, process tree",
                "acc",
            ],
            rows,
        )
        + f"\n\nBoth engines completed all {ROUNDS} rounds of 1,000 clients on this 2-core machine. Flower's "
        "round 1 includes starting Ray; its peak RSS counts the Ray head processes and the ClientApp actors."
    )
    print(body)
    record("flower-scale", "1,000-client simulation: in-process vs Flower (Ray)", body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
