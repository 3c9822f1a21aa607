from pathlib import Path

import pytest
import torch

from deltaplane.data.dataset import Dataset
from deltaplane.data.digits import load_digits, train_test_split
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError
from deltaplane.sim import RunConfig
from deltaplane.sim.population import ClientPopulation, ResidualStore, run_population


def test_lazy_clients_are_rebuilt_identically_and_differ_from_each_other() -> None:
    cfg = RunConfig()
    train, _ = train_test_split(load_digits())
    pop = ClientPopulation(cfg, train, size=10_000)
    a, b, c = pop.client(9_999), pop.client(9_999), pop.client(17)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.holdout.y, b.holdout.y)
    assert not torch.equal(a.train.y[:5], c.train.y[:5]) or len(a.train) != len(c.train)
    for cl in (a, c):
        assert cfg.min_client_samples <= len(cl.train) + len(cl.holdout) <= 100
        assert len(cl.holdout) >= 1
    with pytest.raises(ConfigError, match=r"client id must be in \[0, 10000\)"):
        pop.client(10_000)


def test_residual_store_is_fp16_and_lazy() -> None:
    like = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}
    store = ResidualStore(clients=1000, like=like)
    assert store.nbytes == 1000 * 17 * 2
    assert store.get(3) is None
    r = Delta({"w": torch.full((3, 4), 0.1), "b": torch.arange(5.0)})
    store.put(3, r)
    back = store.get(3)
    assert back["w"].dtype == torch.float32 and back["w"].shape == (3, 4)
    assert float((back["w"] - 0.1).abs().max()) <= 0.1 * 2**-11  # fp16 rounding, relative 2^-11
    assert torch.equal(back["b"], torch.arange(5.0))
    assert store.get(4) is None


def _resident_bytes() -> int:
    """This process's resident memory now (not its peak), from /proc."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_residual_store_takes_memory_only_for_clients_that_trained() -> None:
    """The store was one zeroed (clients, params) fp16 tensor, said to be backed by the OS only row by row;
    torch.zeros writes every page, so 50,000 registered clients of 2,048 values took 195 MiB before any of
    them trained (10,000 of DigitsCNN: 350 MiB; a million: a 34 GiB allocation that failed)."""
    like = {"w": torch.zeros(2048)}
    before = _resident_bytes()
    store = ResidualStore(clients=50_000, like=like)
    assert store.nbytes == 50_000 * 2048 * 2  # what it would hold if every client trained
    assert _resident_bytes() - before < 16 * 2**20
    store.put(49_999, Delta({"w": torch.ones(2048)}))
    assert store.stored_bytes == 2048 * 2 and torch.equal(store.get(49_999)["w"], torch.ones(2048))
    with pytest.raises(ConfigError, match=r"client id must be in \[0, 50000\)"):
        store.get(50_000)


def _check(result, registered: int, per_round: int, rounds: int) -> None:
    assert result.registered == registered and len(result.seconds) == rounds
    assert result.peak_rss_bytes < 2 * 2**30
    assert result.uplink_bytes > 0
    # 1% top-k + 8-bit payloads: far below per_round raw fp32 updates (18,346 floats each)
    assert result.uplink_bytes < rounds * per_round * 18_346 * 4 / 30


def test_small_population_is_deterministic_and_compact() -> None:
    cfg = RunConfig(rounds=2, local_epochs=1, codec="topk(0.01) | quant(bits=8)")
    result = run_population(cfg, registered=500, per_round=10)
    _check(result, 500, 10, 2)
    again = run_population(cfg, registered=500, per_round=10)
    assert again.test_accuracy == result.test_accuracy
    assert again.sampled_accuracy == result.sampled_accuracy
    assert again.uplink_bytes == result.uplink_bytes
    # the store holds one fp16 row per client that trained (reported as what every registered client would
    # take); at most the clients sampled over the rounds, at least those of the largest round
    row, sampled = 18_346 * 2, [r.clients for r in result.rounds]
    assert max(sampled) * row <= result.residual_store_bytes <= sum(sampled) * row
    assert result.residual_store_max_bytes == 500 * row  # the ceiling: every registered client trained
    one = run_population(cfg.replace(rounds=1), registered=500, per_round=10)
    assert one.residual_store_bytes == one.rounds[0].clients * row
    with pytest.raises(ConfigError, match="per_round must be in"):
        run_population(cfg, registered=5, per_round=6)


@pytest.mark.slow
def test_ten_thousand_clients_hundred_per_round_fifty_rounds_under_2gb() -> None:
    cfg = RunConfig(rounds=50, codec="topk(0.01) | quant(bits=8)")
    result = run_population(cfg, registered=10_000, per_round=100)
    _check(result, 10_000, 100, 50)
    assert result.test_accuracy[-1] > 0.5


def test_identity_codec_keeps_no_residual() -> None:
    """The exact codec sends everything: error feedback has nothing to store, and the run still works."""
    cfg = RunConfig(rounds=2, local_epochs=1, codec="identity")
    result = run_population(cfg, registered=50, per_round=5)
    from deltaplane.codecs import Compressor, WireSession
    from deltaplane.sim import build_model
    from deltaplane.sim.population import BASE_ID

    zero = Delta.zeros_like(build_model(0).state_dict())
    # raw fp32 in a compact frame (the default wire): a few bytes of framing, whatever the base version
    session = WireSession.create(zero, "identity", base_id=BASE_ID)
    sizes = [len(Compressor("identity").compress(zero, base_version=v, session=session)) for v in (0, 1)]
    assert len(result.seconds) == 2 and result.uplink_bytes == 5 * sum(sizes)
    assert all(zero.nbytes < n < zero.nbytes + 32 for n in sizes)


def test_population_runs_the_whole_server_chain() -> None:
    """The population driver used to ignore aggregator, clipping, DP and the downlink; each now changes the run."""
    base = RunConfig(rounds=2, local_epochs=1, codec="topk(0.05) | quant(bits=8)")
    plain = run_population(base, registered=200, per_round=8)
    assert plain.epsilon == [None, None]
    dp = run_population(base.replace(clip="0.5", dp_noise=1.0), registered=200, per_round=8)
    assert dp.epsilon[0] is not None and 0 < dp.epsilon[0] < dp.epsilon[1]  # the accountant runs
    # labelled with its neighbours as on every other driver (central DP: add/remove one client)
    assert [r.dp_adjacency for r in dp.rounds] == ["add/remove"] * 2
    assert [r.dp_adjacency for r in plain.rounds] == [None, None]
    for change in (
        {"aggregator": "fedadam"},
        {"defense": "multi_krum(2)"},  # a coordinate-wise rule over top-k is refused (IncompatibleDefense)
        {"defense": "geometric_median"},
        {"defense": "centered_clip(0.01)"},
        {"downlink_codec": "quant(bits=4)"},
    ):
        other = run_population(base.replace(**change), registered=200, per_round=8)
        # the final weights, not the accuracy: two runs that learned nothing both score chance
        assert any(not torch.equal(other.final_state[k], v) for k, v in plain.final_state.items()), change


def test_population_refuses_personalization_with_the_reason() -> None:
    from deltaplane.errors import UnsupportedOption

    with pytest.raises(UnsupportedOption, match="personal model per device"):
        run_population(RunConfig(rounds=1, personalization="alpha_mix"), registered=50, per_round=5)


def test_population_keeps_each_devices_dgc_velocity() -> None:
    """DGC's momentum correction on lazily built devices: the velocity waits in its own fp16 store, so with
    every device in every round the run follows FedAvgM (server momentum 0.9, the mean of the velocities)."""
    base = RunConfig(rounds=3, local_epochs=1, codec="identity")
    plain = run_population(base, registered=6, per_round=6)
    dgc = run_population(base.replace(momentum_correction=0.9), registered=6, per_round=6)
    ref = run_population(base.replace(aggregator="fedavgm", server_opt_lr=1.0), registered=6, per_round=6)
    moved = {k: float((dgc.final_state[k] - plain.final_state[k]).abs().max()) for k in plain.final_state}
    assert max(moved.values()) > 1e-3  # the velocity changes the run
    for k, v in ref.final_state.items():  # the velocity is stored in fp16: relative error 2^-11 a round
        assert torch.allclose(dgc.final_state[k], v, atol=1e-4, rtol=1e-3), k
    warm = run_population(base.replace(codec="topk(0.01)", sparsity_warmup=2), registered=6, per_round=6)
    cold = run_population(base.replace(codec="topk(0.01)"), registered=6, per_round=6)
    assert warm.uplink_bytes > 3 * cold.uplink_bytes  # rounds 1–2 send 22% and 5% of the values


def test_population_keeps_each_devices_norm_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """DGC's relative clip on lazily built devices: a device's update-norm history outlives the round's device
    object, so a device sampled for the k-th time arrives with k − 1 norms recorded (the first time with none),
    and the clip then binds (the run differs from one without it)."""
    from deltaplane.engine.client import ClientStep

    seen: list[tuple[int, int]] = []
    uplink_stacked = ClientStep.uplink_stacked

    def spy(self, clients, *args, **kwargs):
        seen.extend((c.cid, 0 if c.norms is None else c.norms.count) for c in clients)
        return uplink_stacked(self, clients, *args, **kwargs)

    monkeypatch.setattr(ClientStep, "uplink_stacked", spy)
    base = RunConfig(rounds=4, local_epochs=1, codec="stc(0.05)", momentum_correction=0.5)
    clipped = run_population(base.replace(local_clip_relative=1.05), registered=6, per_round=3)
    times: dict[int, int] = {}
    for cid, count in seen:
        assert count == times.get(cid, 0), cid
        times[cid] = count + 1
    assert len(seen) == 12 and max(times.values()) >= 2
    plain = run_population(base, registered=6, per_round=3)
    assert any(not torch.equal(clipped.final_state[k], v) for k, v in plain.final_state.items())


def test_a_poisson_round_that_samples_nobody_still_releases_its_noise() -> None:
    """Central DP samples each device with probability q (Poisson): seed 13 picks nobody of 6 in round 2. The
    population driver crashed there (torch.cat of no held-out sets); like every other driver it now closes the
    round (noise only, ε spent) and has no sampled device to score."""
    import math

    cfg = RunConfig(
        clients=6, rounds=2, local_epochs=1, sample_fraction=1 / 3, clip="1.0", dp_noise=0.3, seed=13
    )
    result = run_population(cfg)
    first, empty = result.rounds
    assert first.clients > 0 and empty.clients == 0
    assert empty.epsilon > first.epsilon  # the empty round was released, and counted
    assert any(not torch.equal(result.final_state[k], v) for k, v in _after_round_1(cfg).items())
    assert math.isnan(empty.client_accuracy_mean) and math.isnan(result.sampled_accuracy[-1])
    assert 0 <= empty.test_accuracy <= 1


def _after_round_1(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return run_population(cfg.replace(rounds=1)).final_state


def test_a_stateful_codec_keeps_each_devices_state_across_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """PowerSGD warm-starts each tensor's power iteration from the device's Q of its last round (as on the
    sequential driver). The population driver builds a fresh compressor per round and carried only the
    residual, so every round started cold from a random Q, silently."""
    from deltaplane.codecs.lowrank import PowerSGD

    calls: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (Q given, Q kept) per matrix encode
    encode = PowerSGD.encode_stateful

    def spy(self, x, rng, state):
        given = state.get("q")
        out = encode(self, x, rng, state)
        if "q" in state:
            calls.append((None if given is None else given.clone(), state["q"].clone()))
        return out

    monkeypatch.setattr(PowerSGD, "encode_stateful", spy)
    cfg = RunConfig(rounds=2, local_epochs=1, codec="powersgd(rank=2, min_size=64)")
    run_population(cfg, registered=4, per_round=4)  # every device in both rounds
    warm = [(i, given) for i, (given, _) in enumerate(calls) if given is not None]
    assert len(warm) == 4 * 4  # round 2: each device's four matrices (conv1, conv2, fc1, fc2)
    for i, given in warm:  # each warm start is the very Q a device kept from an earlier round
        assert any(torch.equal(given, kept) for _, kept in calls[:i])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="lists child processes from /proc")
def test_a_failing_population_run_stops_its_training_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """With threads=2 a forked worker trains a share of each round. A run that raised left it running for as
    long as anything held the exception's traceback (the sequential/batched driver already stopped its own)."""
    import os

    import deltaplane.engine.server as server_module

    close = server_module.ServerStep.close

    def failing(self):
        if self._round == 2:
            raise RuntimeError("boom at round 2")
        return close(self)

    monkeypatch.setattr(server_module.ServerStep, "close", failing)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    with pytest.raises(RuntimeError, match="boom") as caught:
        run_population(RunConfig(rounds=3, local_epochs=1, threads=2), registered=8, per_round=4)
    assert caught.value is not None and children.read_text().split() == []


def test_a_pool_without_some_label_still_deals_out_clients() -> None:
    """A task's class count can include a label only its test set holds. ClientPopulation drew each client's
    label mix over every class, and a client given samples of the missing label was a bare ValueError from
    numpy ("a cannot be empty"); the sequential driver's partition ran. Mixes now cover the pool's labels."""
    train, _ = train_test_split(load_digits())
    keep = train.y != 9
    pool = type(train)(train.x[keep], train.y[keep])
    pop = ClientPopulation(RunConfig(alpha=0.1), pool, size=200, num_classes=10)
    clients = [pop.client(cid) for cid in range(200)]
    assert all(9 not in c.train.y.tolist() + c.holdout.y.tolist() for c in clients)
    assert len({int(y) for c in clients for y in c.train.y}) == 9


def test_a_model_that_cannot_be_stacked_is_refused_before_the_run(tmp_path, monkeypatch):
    """The population engine refused a BatchNorm model only inside round 1 (its progress bar already running);
    the preflight `deltaplane run` calls (check_supported) now says so before anything starts."""
    import sys
    import textwrap

    from deltaplane.errors import UnsupportedOption
    from deltaplane.sim.population import check_supported

    (tmp_path / "bntask.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from deltaplane.engine import Dataset, Task

            X = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
            Y = (X[:, 0] > 0).long()

            def make():
                return Task(
                    name="bn",
                    model=lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
                    train=Dataset(X[80:], Y[80:]),
                    test=Dataset(X[:80], Y[:80]),
                )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(
            UnsupportedOption, match=r"has buffers \(1\.running_mean.*use the sequential engine"
        ):
            check_supported(RunConfig(task="bntask:make", clients=4, engine="population"))
    finally:
        sys.modules.pop("bntask", None)


@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_a_devices_held_out_samples_are_not_in_its_training_data(alpha: float) -> None:
    """Clients draw their samples with replacement, and the holdout was split off the draw by position: a
    sample drawn twice could land on both sides, so a device's held-out accuracy (the sampled and client
    accuracies every round reports) partly scored its own training samples. Every sample here carries its id
    as its only feature; no id may be on both sides. One label has a single sample: a draw of it alone must not
    be a client that trains and tests on the same sample either."""
    y = torch.tensor([0] * 40 + [1] * 30 + [2])
    pool = Dataset(torch.arange(len(y), dtype=torch.float32)[:, None], y)
    pop = ClientPopulation(RunConfig(alpha=alpha), pool, size=300)
    for cid in range(300):
        c = pop.client(cid)
        train_ids, held_ids = set(c.train.x[:, 0].tolist()), set(c.holdout.x[:, 0].tolist())
        assert held_ids and train_ids and not train_ids & held_ids, cid
    with pytest.raises(ConfigError, match="training pool holds 1 sample"):
        ClientPopulation(RunConfig(), Dataset(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)), size=3)


def test_population_dgc_round_is_stacked_and_the_same_as_device_by_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The population runner's DGC rounds (velocities from the fp16 store, masking, clip, warm-up) run on the
    stack, with the metrics, bytes and final weights of the device-by-device uplink; before, every DGC round
    went device by device (the spy counts no call)."""
    import deltaplane.engine.client as client_step

    cfg = RunConfig(
        rounds=4,
        local_epochs=1,
        codec="stc(0.05)",
        momentum_correction=0.5,
        momentum_masking=True,
        local_clip=2.0,
        sparsity_warmup=1,
    )
    calls: list[int] = []
    real = client_step.ClientStep.uplink_stacked

    def spy(self, clients, stacked, **kwargs):
        calls.append(len(clients))
        return real(self, clients, stacked, **kwargs)

    monkeypatch.setattr(client_step.ClientStep, "uplink_stacked", spy)
    ours = run_population(cfg, registered=12, per_round=5)
    assert calls == [5, 5, 5, 5]
    monkeypatch.setattr(client_step.ClientStep, "stacks_uplink", property(lambda self: False))
    loop = run_population(cfg, registered=12, per_round=5)
    assert calls == [5, 5, 5, 5]
    strip = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in ours.rounds]
    assert strip == [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in loop.rounds]
    assert all(torch.equal(ours.final_state[k], loop.final_state[k]) for k in loop.final_state)


def test_population_attacked_round_stacks_the_honest_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """With attackers, the population runner's honest devices are compressed on the stack (an attacker, trained
    in the stack too, is poisoned and uploads on its own), with the metrics, bytes and final weights of every
    honest device through ClientStep.finish; before, an attacked round never reached the stack (the spy
    counts no call)."""
    import deltaplane.engine.client as client_step

    cfg = RunConfig(
        rounds=3, local_epochs=1, attack="sign_flip(0.25)", codec="stc(0.05)", momentum_correction=0.5
    )
    calls: list[list[int]] = []
    real = client_step.ClientStep.uplink_stacked

    def spy(self, clients, stacked, **kwargs):
        calls.append([c.cid for c in clients])
        assert not {c.cid for c in clients} & self.malicious
        return real(self, clients, stacked, **kwargs)

    monkeypatch.setattr(client_step.ClientStep, "uplink_stacked", spy)
    ours = run_population(cfg, registered=12, per_round=6)
    assert len(calls) == 3 and sum(map(len, calls)) < 18  # every round, some sampled devices attacked
    monkeypatch.setattr(client_step.ClientStep, "stacks_uplink", property(lambda self: False))
    loop = run_population(cfg, registered=12, per_round=6)
    assert len(calls) == 3
    strip = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in ours.rounds]
    assert strip == [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in loop.rounds]
    assert all(torch.equal(ours.final_state[k], loop.final_state[k]) for k in loop.final_state)


_ATTACKS = [
    "model_replacement(0.25)",  # backdoor data, update boosted 10×
    "bounded_backdoor(0.25, boost=5, max_norm=1.5)",  # boosted, then scaled to a norm
    "dba(0.25, boost=3)",  # each attacker stamps its own trigger pixel
    "label_flip(0.25)",
    "sign_flip(0.25, scale=2)",
    "gaussian(0.25)",  # the update replaced by noise from the stream data poisoning left off
]


@pytest.mark.parametrize(("attack", "threads"), [(a, 1) for a in _ATTACKS] + [("model_replacement(0.25)", 2)])
def test_population_trains_attackers_in_the_stack_as_the_sequential_engine_does(
    monkeypatch: pytest.MonkeyPatch, attack: str, threads: int
) -> None:
    """Attackers train in the stack (the spy sees them reach the stacked trainer; before, only the honest devices
    did and each attacker ran ClientStep.run on its own), on the same poisoned data and with the same poisoning
    of the update as the sequential engine's client step: each attacker's sent update (decoded from its real
    payload) equals ClientStep.train → transform run device by device on a fresh step, to the batched
    engine's float32 tolerance (4e-6, times the attack's scaling), and its trained row does not depend on
    which devices share its stack (trained alone, in a stack of one)."""
    import deltaplane.sim.population as population
    from deltaplane.codecs import decompress
    from deltaplane.engine import ClientStep, make_task, sample_clients
    from deltaplane.engine.seeding import Stream, numpy_rng
    from deltaplane.sim.batched import BatchedTrainer
    from deltaplane.sim.simulation import BASE_ID

    cfg = RunConfig(
        rounds=2, local_epochs=1, attack=attack, codec="identity", wire="self-describing", threads=threads
    )
    seen: list[tuple] = []
    real_start, real_upload = population.start_batched, population._upload_stacked

    def start_spy(config, trainer, global_state, clients, rnd, data=None, **kwargs):
        pending = real_start(config, trainer, global_state, clients, rnd, data, **kwargs)
        state = {k: v.clone() for k, v in global_state.items()}
        seen.append((list(clients), data, state, rnd, pending.result()))
        return pending

    sent: dict[tuple[int, int], bytes] = {}

    def upload_spy(step, clients, stacked, version, rnd, **kwargs):
        uploads = real_upload(step, clients, stacked, version, rnd, **kwargs)
        sent.update({(rnd, u.cid): u.payload for u in uploads})
        return uploads

    monkeypatch.setattr(population, "start_batched", start_spy)
    monkeypatch.setattr(population, "_upload_stacked", upload_spy)
    run_population(cfg, registered=12, per_round=8)

    pcfg = population._population_config(cfg, 12, 8)
    task = make_task(pcfg)
    malicious = ClientStep(pcfg, task, base_id=BASE_ID).malicious
    for rnd, (clients, *_) in enumerate(seen, start=1):  # every sampled device trains in the stack
        drawn = sample_clients(12, pcfg.sample_fraction, numpy_rng(pcfg.seed, Stream.CLIENT_SAMPLING, rnd))
        assert [c.cid for c in clients] == drawn, f"round {rnd}: attackers {sorted(malicious & set(drawn))}"
    assert any(c.cid in malicious for clients, *_ in seen for c in clients), "no attacker sampled"
    model = task.build_model(0)
    for clients, data, state, rnd, stacked in seen:
        assert sent.keys() >= {(rnd, c.cid) for c in clients}  # every device, attackers too, uploaded
        for i, client in enumerate(clients):
            if client.cid not in malicious:
                continue
            ref = ClientStep(
                pcfg, task, base_id=BASE_ID
            )  # fresh attack streams: the sequential engine's step
            poisoned = ref.training_data(client, rnd)
            assert torch.equal(data[i].x, poisoned.x) and torch.equal(data[i].y, poisoned.y)
            trained = ref.train(
                client, model, state, rnd
            )  # local_train, one device (re-poisons, same stream)
            want = ref.transform(client, trained, model=model, global_state=state, rnd=rnd)
            row = {k: t[i] for k, t in stacked.items()}
            for name, t in trained.items():
                assert torch.allclose(row[name], t, rtol=0, atol=4e-6), (attack, rnd, client.cid, name)
            got = decompress(sent[(rnd, client.cid)], expect_base=(BASE_ID, rnd - 1))
            scale = max(1.0, want.norm() / trained.norm())
            for name, t in want.items():
                assert torch.allclose(got[name], t, rtol=0, atol=4e-6 * scale), (
                    attack,
                    rnd,
                    client.cid,
                    name,
                )
                assert not torch.equal(t, trained[name]) or attack.startswith("label_flip")  # it was poisoned
            # the same row trained alone: nothing of it comes from its stack-mates
            alone = BatchedTrainer(task.build_model(0), loss=task.loss)
            try:
                solo = real_start(pcfg, alone, state, [client], rnd, [data[i]]).result()
            finally:
                alone.close()
            for name, t in solo.items():
                assert torch.allclose(row[name], t[0], rtol=0, atol=4e-6), (attack, rnd, client.cid, name)


def test_an_attack_fraction_applies_to_the_registered_devices() -> None:
    """``sign_flip(0.001)`` of 1,000 registered devices is one attacker: it was refused because the config's
    own ``clients`` (20) gave none, though the population engine draws its attackers among the registered
    devices (``ClientStep`` over ``clients = registered``). A fraction giving none of the registered devices is
    refused before the run, naming that count."""
    from deltaplane.engine import ClientStep, make_task
    from deltaplane.sim import population
    from deltaplane.sim.simulation import BASE_ID

    cfg = RunConfig(rounds=1, local_epochs=1, attack="sign_flip(0.001)")
    result = run_population(cfg, registered=1000, per_round=4)
    assert result.registered == 1000 and len(result.rounds) == 1
    pcfg = population._population_config(cfg, 1000, 4)
    malicious = ClientStep(pcfg, make_task(pcfg), base_id=BASE_ID).malicious
    assert len(malicious) == 1 and all(0 <= cid < 1000 for cid in malicious)

    big = RunConfig(clients=1000, rounds=1, attack="sign_flip(0.001)")  # one of its 1,000 clients
    with pytest.raises(
        ConfigError,
        match=r"attack 'sign_flip\(0\.001\)': .* of 100 registered devices rounds to no malicious client.*"
        r"at least 0\.01 .*run_population's registered",
    ):
        run_population(big, registered=100, per_round=4)


def test_population_refuses_a_forged_frame_as_the_sequential_engine_does() -> None:
    """`malformed_frame`: the population driver's attackers (compressed on their own, after the stack) send the
    CRC-valid frame that lies about a shape, and its server refuses each, as many a round as the sequential
    driver's, and goes on with the others."""
    from deltaplane.sim import run_simulation

    cfg = RunConfig(
        clients=8,
        rounds=2,
        local_epochs=1,
        attack="malformed_frame(0.25)",
        codec="topk(0.05) | quant(bits=8)",
    )
    seq = run_simulation(cfg)
    pop = run_simulation(cfg.replace(engine="population"))
    assert [(r.clients, r.rejected) for r in pop.rounds] == [(r.clients, r.rejected) for r in seq.rounds]
    assert [r.rejected for r in seq.rounds] == [2, 2]
