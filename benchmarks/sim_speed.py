"""Simulator speed: per-round wall time of the batched engine vs the sequential loop vs Flower's simulation.

Default workload (RunConfig defaults): 20 non-IID digits clients, DigitsCNN (18,346 params), 2 local epochs,
batch 32, SGD lr 0.2 momentum 0.9; and the issue's workload, the same with 1 local epoch. All run in this one
process/run:
* deltaplane, engine="batched" (1 and 2 torch threads) and engine="sequential" (1 thread) (real payloads,
  FedAvg, every device's held-out data and the test set scored each round: the default, the issue's figure);
* deltaplane, engine="batched", threads=2 with ``client_eval_every=0``: the matched workload, the test set only
  each round, which is all Flower's and pfl-research's apps here evaluate (an added comparison, not the issue's);
* Flower 1.42 simulation (Ray backend, 2 actors of 1 CPU each: the machine has 2 cores), the same model,
  shards and local training (our ``Client.local_update``), FedAvg, and a centralised test evaluation per round.
Per-round time is the median over rounds 2.. (round 1 pays one-time warm-up); Flower's start-up (Ray, actors,
until the first round begins) is reported separately. Also: equivalence of the two engines over the full run.

Usage: .venv/bin/python benchmarks/sim_speed.py [--rounds 12] [--skip-flower] [--equivalence-rounds 120]
       .venv/bin/python benchmarks/sim_speed.py --scale [--scale-rounds 50]   (10,000 clients)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _record import record, table
from deltaplane.sim import RunConfig, run_simulation


def ours(cfg: RunConfig) -> tuple[float, list[float], object]:
    t0 = time.perf_counter()
    result = run_simulation(cfg)
    total = time.perf_counter() - t0
    return total, [r.seconds for r in result.rounds], result


STARTUP_CHILD = """
import time
t0 = time.perf_counter()
from deltaplane.sim import RunConfig, run_simulation
t_import = time.perf_counter()
r = run_simulation(RunConfig(rounds=1, engine="batched", local_epochs={epochs}))
print(t_import - t0, r.wall_time_s - r.rounds[0].seconds)
"""


def our_startup(cfg: RunConfig) -> tuple[float, float]:
    """Our start-up in a fresh interpreter: (imports, set-up until round 1 begins: task, data, devices, model),
    measured like pfl's (from the script's first line, interpreter start excluded)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", STARTUP_CHILD.format(epochs=cfg.local_epochs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    imports, setup = (float(v) for v in out.split()[-2:])
    return imports, setup


PHASES = {  # what the in-process driver calls in a round, by the name a reader knows it
    "start_batched": "local training (all clients, stacked)",
    "_upload_stacked": "encode every update into its payload",
    "deliver": "server: decode, validate, FedAvg",
    "score_round": "score the test set and every client's held-out data",
}


def breakdown(cfg: RunConfig) -> tuple[dict[str, float], float, float]:
    """Where a batched round's wall time goes: median seconds per round of each driver phase (rounds 2..), the
    median round, and the share of local training spent inside oneDNN's convolution kernels (torch profiler
    over three more trainings of one round's clients)."""
    from torch.profiler import profile

    import deltaplane.sim.simulation as driver

    spent: dict[str, list[float]] = {name: [] for name in PHASES}
    captured: dict[str, tuple] = {}
    originals = {name: getattr(driver, name) for name in PHASES}

    def timed(name: str):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = originals[name](*args, **kwargs)
                if name == "start_batched":  # the training itself, not only its start
                    out.result()
                    captured["train"] = (args, kwargs)
                return out
            finally:
                spent[name].append(time.perf_counter() - t0)

        return call

    try:
        for name in PHASES:
            setattr(driver, name, timed(name))
        _, per_round, _ = ours(cfg)
    finally:
        for name, fn in originals.items():
            setattr(driver, name, fn)
    phases = {name: statistics.median(t[1:]) for name, t in spent.items()}
    args, kwargs = captured["train"]
    with profile() as prof:
        for _ in range(3):
            originals["start_batched"](*args, **kwargs).result()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(
        e.self_cpu_time_total
        for e in events
        if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward")
    )
    return phases, statistics.median(per_round[1:]), conv / total


def flower(cfg: RunConfig, rounds: int) -> tuple[float, list[float], float]:
    """Start-up seconds, per-round seconds and final test accuracy of Flower's simulation engine."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation as flwr_run

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        from deltaplane.data.digits import load_digits, train_test_split
        from deltaplane.sim.client import make_clients
        from deltaplane.sim.model import DigitsCNN
        from deltaplane.sim.seeding import Stream, torch_generator

        torch.set_num_threads(1)
        global _CLIENTS  # built once per Ray actor, like a device that keeps its data
        try:
            clients = _CLIENTS
        except NameError:
            train_set, _ = train_test_split(
                load_digits(), test_fraction=cfg.test_fraction, seed=cfg.split_seed
            )
            clients = _CLIENTS = make_clients(cfg, train_set)
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        model = DigitsCNN()
        state = msg.content["arrays"].to_torch_state_dict()
        gen = torch_generator(cfg.seed, Stream.LOCAL_TRAINING, rnd, pid)
        delta = clients[pid].local_update(model, state, cfg, gen, lr=cfg.client_lr(rnd))
        new = delta.apply(state)
        content = RecordDict(
            {"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": clients[pid].num_samples})}
        )
        return Message(content=content, reply_to=msg)

    stamps: list[float] = []
    accs: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from deltaplane.data.digits import load_digits, train_test_split
        from deltaplane.sim.model import accuracy, build_model
        from deltaplane.sim.seeding import Stream, derive_seed

        _, test = train_test_split(load_digits(), test_fraction=cfg.test_fraction, seed=cfg.split_seed)
        model = build_model(derive_seed(cfg.seed, Stream.MODEL_INIT))
        n = cfg.clients

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            accs.append(accuracy(model, test))
            stamps.append(time.perf_counter())
            return MetricRecord({"accuracy": accs[-1]})

        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            evaluate_fn=evaluate,
        )

    t0 = time.perf_counter()
    flwr_run(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    if len(stamps) != rounds + 1:
        raise RuntimeError(f"Flower ran {len(stamps) - 1} of {rounds} rounds")
    per_round = [b - a for a, b in itertools.pairwise(stamps)]
    # Ray starts its actors when the first round's tasks arrive: start-up is the time until round 1 ends,
    # less what a steady round takes.
    startup = stamps[1] - t0 - statistics.median(per_round[1:])
    return startup, per_round, accs[-1]


def pfl(cfg: RunConfig, rounds: int, python: str) -> tuple[float, list[float], float]:
    """Run benchmarks/sim_speed_pfl.py under pfl's own interpreter on the same shards and initial weights."""
    import json
    import subprocess
    import tempfile

    import numpy as np

    from deltaplane.data.digits import load_digits, train_test_split
    from deltaplane.sim.client import make_clients
    from deltaplane.sim.model import build_model
    from deltaplane.sim.seeding import Stream, derive_seed

    train, test = train_test_split(load_digits(), test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    clients = make_clients(cfg, train)
    init = build_model(derive_seed(cfg.seed, Stream.MODEL_INIT)).state_dict()
    arrays = {f"x{c.cid}": c.train.x.numpy() for c in clients} | {
        f"y{c.cid}": c.train.y.numpy() for c in clients
    }
    arrays |= {f"init.{k}": v.numpy() for k, v in init.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.npz"
        np.savez(
            path,
            n_clients=len(clients),
            test_x=test.x.numpy(),
            test_y=test.y.numpy(),
            batch_size=cfg.batch_size,
            epochs=cfg.local_epochs,
            lr=cfg.lr,
            momentum=cfg.momentum,
            **arrays,
        )
        script = Path(__file__).resolve().parent / "sim_speed_pfl.py"
        out = subprocess.run(
            [python, str(script), str(path), str(rounds)], capture_output=True, text=True, check=True
        ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["startup_s"], res["per_round_s"], res["test_accuracy"]


def scale(rounds: int, registered: int, per_round: int) -> None:
    """10,000 registered clients, 100 per round: wall time, peak memory (< 2 GB target)."""
    from deltaplane.sim.population import run_population

    cfg = RunConfig(rounds=rounds, codec="topk(0.01) | quant(bits=8)")
    r = run_population(cfg, registered=registered, per_round=per_round)
    med = statistics.median(r.seconds[1:]) if len(r.seconds) > 1 else r.seconds[0]
    line = (
        f"{registered:,} registered clients, {per_round} sampled per round, {rounds} rounds, codec "
        f"`{cfg.codec}` with error feedback (fp16 residual store, {r.residual_store_bytes / 2**20:.0f} MiB held "
        f"at the end, {r.residual_store_max_bytes / 2**20:.0f} MiB if every client trained), batched engine: wall time {r.wall_time_s:.1f} s, median {med:.2f} s/round, "
        f"peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB (whole process, torch included; target < 2048 MiB), "
        f"test accuracy after the last round {r.test_accuracy[-1]:.3f} (max over rounds "
        f"{max(r.test_accuracy):.3f}), uplink {r.uplink_bytes / 2**20:.1f} MiB."
    )
    print(line)
    record("sim_scale", "Simulator scale: 10,000 registered clients", line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", action="store_true", help="run only the 10,000-client scale benchmark")
    parser.add_argument("--scale-rounds", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--equivalence-rounds", type=int, default=120)
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--pfl-python", help="python of a separate venv with pfl installed (pfl pins dp-accounting<0.6)"
    )
    args = parser.parse_args()
    if args.scale:
        scale(args.scale_rounds, 10_000, 100)
        return
    base = RunConfig(rounds=args.rounds)

    # Equivalence over the full default run (120 rounds).
    full = base.replace(rounds=args.equivalence_rounds)
    _, seq_times, seq = ours(full.replace(engine="sequential"))
    _, bat_times, bat = ours(full.replace(engine="batched"))
    d_acc = max(abs(a.test_accuracy - b.test_accuracy) for a, b in zip(seq.rounds, bat.rounds, strict=True))
    d_acc10 = max(
        abs(a.test_accuracy - b.test_accuracy) for a, b in zip(seq.rounds[:10], bat.rounds[:10], strict=True)
    )
    d_param = max(float((seq.final_state[k] - bat.final_state[k]).abs().max()) for k in seq.final_state)
    print(f"equivalence over {full.rounds} rounds: max |Δacc| {d_acc:.4f}, max |Δparam| {d_param:.2e}")

    # Two workloads: our default (2 local epochs) and the (1 local epoch); everything else the same.
    sections = []
    for epochs, label in [(base.local_epochs, "default workload"), (1, "the issue's workload")]:
        work = base.replace(local_epochs=epochs)
        sections.append(compare(work, label, args))
    body = (
        f"{base.clients} non-IID digits clients, DigitsCNN (18,346 params), batch {base.batch_size}, SGD lr "
        f"{base.lr} momentum {base.momentum}, identity codec; local epochs as stated per table. Median per-round "
        f"wall time over rounds 2–{args.rounds}. Each of our rounds: train all clients, encode every update into "
        "a real wire payload (CRC, error-feedback state) and decode it on the server, validate, FedAvg, evaluate "
        "the new model on every client's held-out data and on the test set (the matched-workload row: on the "
        "test set only, `client_eval_every=0`); Flower's: the same local training "
        "(our `Client.local_update`), FedAvg, test-set evaluation; pfl-research's: central test-set evaluation. Every engine ran twice, in two passes of all "
        "of them (ours, Flower, pfl-research), so a slower or faster spell of the machine falls on all alike; "
        "the medians are over both passes. Flower runs 2 Ray actors of 1 CPU each (the machine has 2 "
        "cores); ours run with 1 torch thread, and the batched engine also with `threads=2`: half of the round's "
        "clients trained in the process itself and half in one forked worker process, one torch thread each "
        "(`BatchedTrainer(workers=2)`)."
        "\n\n"
        + "\n\n".join(sections)
        + f"\n\nEquivalence over the full {full.rounds}-round default run, same seed: max over rounds of "
        f"|test acc(batched) − test acc(sequential)| = {d_acc:.4f}; max |Δparam| of the final model = "
        f"{d_param:.2e}; final test accuracy {bat.final.test_accuracy:.3f} (batched) vs "
        f"{seq.final.test_accuracy:.3f} (sequential); over the first 10 rounds max |Δacc| = {d_acc10:.4f}. "
        f"Batched/sequential median per-round ratio over those two 120-round runs: "
        f"{statistics.median(bat_times[1:]) / statistics.median(seq_times[1:]):.2f}×.\n"
    )
    record("sim_speed", "Simulator speed: batched engine vs sequential loop vs Flower", body)


def compare(work: RunConfig, label: str, args: argparse.Namespace) -> str:
    """One workload: our engines, Flower and pfl-research; returns its markdown table and notes."""
    engines = {
        "sequential": work.replace(engine="sequential"),
        "batched": work.replace(engine="batched"),
        "batched2": work.replace(engine="batched", threads=2),
        # the baselines' workload: Flower's app scores the test set only (evaluate_fn, fraction_evaluate=0),
        # pfl-research's its central test set; ours by default scores every device's held-out data too
        "batched2_test": work.replace(engine="batched", threads=2, client_eval_every=0),
    }
    times: dict[str, list[float]] = {k: [] for k in engines}
    accs: dict[str, float] = {}
    startups: dict[str, list[float]] = {"flower": [], "pfl": []}
    # Two passes, each running every engine once (ours, Flower, pfl-research), so that a slower or faster
    # spell of a shared machine falls on all of them alike; medians are over both passes' rounds 2..
    for _ in range(2):
        for name, cfg in engines.items():
            _, per_round, result = ours(cfg)
            times[name] += per_round[1:]
            accs[name] = result.final.test_accuracy  # type: ignore[attr-defined]
        if not args.skip_flower:
            startup, f_times, accs["flower"] = flower(work, args.rounds)
            times.setdefault("flower", []).extend(f_times[1:])
            startups["flower"].append(startup)
        if args.pfl_python:
            startup, p_times, accs["pfl"] = pfl(work, args.rounds, args.pfl_python)
            times.setdefault("pfl", []).extend(p_times[1:])
            startups["pfl"].append(startup)
    med = {name: statistics.median(t) for name, t in times.items()}
    phases, round_s, conv_share = breakdown(engines["batched"])
    parts = ", ".join(f"{PHASES[name]} {t * 1000:.1f}" for name, t in phases.items())
    where = (
        f"Where a batched round goes (1 thread, one more run, median ms per round over rounds 2–{args.rounds}; "
        f"round {round_s * 1000:.1f}): {parts}; the rest (sampling, server close, metrics) "
        f"{(round_s - sum(phases.values())) * 1000:.1f}. oneDNN's convolution kernels (forward and backward of "
        f"the two convolutions) take {conv_share:.0%} of local training's CPU time (torch profiler)"
    )
    imports, setup = our_startup(work)
    notes = [
        where,
        f"deltaplane start-up (fresh interpreter: imports {imports:.1f} s, then task, data, devices and model "
        f"{setup:.2f} s, until round 1 begins): {imports + setup:.1f} s; test accuracy after {args.rounds} "
        f"rounds: {accs['sequential']:.3f} (sequential), {accs['batched']:.3f} (batched, 1 thread), "
        f"{accs['batched2']:.3f} (batched, 2 threads)",
    ]
    if not args.skip_flower:
        notes.append(
            f"Flower start-up (Ray init, 2 actors, time to the end of round 1 less a steady round; the lesser of "
            f"the two passes): {min(startups['flower']):.1f} s; Flower test accuracy after {args.rounds} rounds: "
            f"{accs['flower']:.3f}"
        )
    if args.pfl_python:
        notes.append(
            f"pfl-research 0.6.0 (separate venv, SimulatedBackend, 1 process; its own batch order and sampler): "
            f"start-up {min(startups['pfl']):.1f} s (imports, data, model; the lesser of the two passes), test "
            f"accuracy after {args.rounds} rounds {accs['pfl']:.3f}"
        )
    ref = med.get("flower", med["sequential"])
    ref_name = "Flower" if "flower" in med else "sequential"
    rows = []
    for name, row_label in [
        ("flower", "Flower 1.42 simulation (Ray, 2 actors)"),
        ("pfl", "pfl-research 0.6.0 (SimulatedBackend)"),
        ("sequential", "deltaplane engine=sequential, 1 thread"),
        ("batched", "deltaplane engine=batched, 1 thread"),
        (
            "batched2",
            "deltaplane engine=batched, threads=2 (+1 forked worker process: next round begun at once, the last one scored in the worker)",
        ),
        (
            "batched2_test",
            "matched workload: deltaplane engine=batched, threads=2, client_eval_every=0 (the test set only each "
            "round, as Flower's and pfl-research's apps; no device's held-out data)",
        ),
    ]:
        if name in med:
            rows.append([row_label, f"{med[name] * 1000:.1f}", f"{med[name] / ref:.3f}×"])
            print(
                f"[{label}] {row_label}: {med[name] * 1000:.1f} ms/round ({med[name] / ref:.3f}× {ref_name})"
            )
    two = med["batched2"] / med["batched"]
    notes.append(
        f"`threads=2` (a second share of the clients in a forked worker process) took {two:.2f}× the one-thread "
        f"round in this run: "
        + (
            "the second core helped"
            if two < 0.95
            else "no gain on this machine at this load (training is ~3/4 of a round, and the two workers "
            "share the 2 cores with everything else running)"
        )
    )
    for n in notes:
        print(f"[{label}] {n}")
    if "flower" in med and "pfl" in med:
        best = min(("batched", "batched2"), key=lambda k: med[k])
        f_ratio, p_ratio = med[best] / med["flower"], med[best] / med["pfl"]
        notes.append(
            f"Targets (issue #16): ≤ 0.08× Flower and ≤ 0.25× pfl-research per round. Best batched setting "
            f"({'threads=2' if best == 'batched2' else 'threads=1'}): {f_ratio:.3f}× Flower "
            f"({'met' if f_ratio <= 0.08 else 'NOT met'}), {p_ratio:.3f}× pfl-research "
            f"({'met' if p_ratio <= 0.25 else 'NOT met'})"
        )
        print(f"[{label}] {notes[-1]}")
        m_flower, m_pfl = med["batched2_test"] / med["flower"], med["batched2_test"] / med["pfl"]
        notes.append(
            f"Matched workload (an added comparison, not the issue's figure, which is the default workload's "
            f"above): with the devices' held-out scoring off (`client_eval_every=0`), so that each engine "
            f"evaluates the same thing each round (the test set), `threads=2` took {m_flower:.3f}× Flower and "
            f"{m_pfl:.3f}× pfl-research; the held-out scoring cost the default `threads=2` round "
            f"{(med['batched2'] - med['batched2_test']) * 1000:+.1f} ms in this run (one run's engines are "
            "measured one after another: a paired A/B is in docs/sim-speed.md)"
        )
        print(f"[{label}] {notes[-1]}")
    head = f"**{label.capitalize()}: {work.local_epochs} local epoch{'s' if work.local_epochs > 1 else ''}.**"
    return "\n\n".join(
        [head, table(["engine", "ms / round", f"× {ref_name}"], rows), *[n + "." for n in notes]]
    )


if __name__ == "__main__":
    main()
