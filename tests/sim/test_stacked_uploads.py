"""The batched engine compresses all clients' updates on the stack: same payloads as one client at a time."""

from __future__ import annotations

import pytest
import torch

import deltaplane.engine.client as client_step
from deltaplane.delta import Delta
from deltaplane.errors import DeltaplaneError
from deltaplane.sim import RunConfig, run_simulation


def _one_by_one(
    compressors, stacked, *, base_id, base_version, return_exceptions=False, meta=None, session=None
):
    """The per-client path: each compressor on its own row, as Client.upload would."""
    out: list[bytes | DeltaplaneError] = []
    for i, c in enumerate(compressors):
        delta = Delta({k: v[i] for k, v in stacked.items()})
        try:
            if session is not None:
                out.append(c.compress(delta, base_version=base_version, session=session))
                continue
            out.append(c.compress(delta, base_id=base_id, base_version=base_version, meta=meta))
        except DeltaplaneError as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out


@pytest.mark.parametrize("feedback", [True, False])
def test_batched_run_has_the_same_bytes_and_accuracy(monkeypatch: pytest.MonkeyPatch, feedback: bool) -> None:
    cfg = RunConfig(
        clients=6, rounds=3, engine="batched", codec="topk(0.01) | quant(bits=8)", error_feedback=feedback
    )
    calls: list[int] = []
    real = client_step.compress_many

    def counting(compressors, *args, **kwargs):
        calls.append(len(compressors))
        return real(compressors, *args, **kwargs)

    monkeypatch.setattr(client_step, "compress_many", counting)
    stacked = run_simulation(cfg)
    assert calls == [6, 6, 6]  # every round's uploads went through the stacked path
    monkeypatch.setattr(client_step, "compress_many", _one_by_one)
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert [r.test_accuracy for r in stacked.rounds] == [r.test_accuracy for r in loop.rounds]
    assert all(torch.equal(stacked.final_state[k], loop.final_state[k]) for k in loop.final_state)
    # top-k 1% + 8-bit values of a ~6k-parameter model: far below 1/50 of the raw fp32 update per client
    assert 0 < stacked.rounds[0].uplink_bytes < 6 * stacked.raw_update_bytes / 50


def test_local_dp_keeps_the_per_client_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local DP changes each update on its own before compressing: compress_many is not used."""

    def refuse(*args, **kwargs):
        raise AssertionError("compress_many must not run with local DP")

    monkeypatch.setattr(client_step, "compress_many", refuse)
    cfg = RunConfig(clients=4, rounds=1, engine="batched", clip="1.0", local_dp_noise=0.5)
    assert run_simulation(cfg).final.clients == 4


def test_stacked_upload_failure_is_one_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose compression fails is refused, as in the per-client loop; the round goes on."""
    real = client_step.compress_many

    def poison_first(compressors, stacked, **kwargs):
        stacked = {k: v.clone() for k, v in stacked.items()}
        next(iter(stacked.values()))[0].fill_(float("nan"))
        return real(compressors, stacked, **kwargs)

    monkeypatch.setattr(client_step, "compress_many", poison_first)
    result = run_simulation(RunConfig(clients=4, rounds=1, engine="batched", codec="quant(bits=8)"))
    assert result.final.rejected == 1 and result.final.clients == 4


# -- DGC on the stack ------------------------------------------------------------------------------------------
DGC_RUN = dict(
    clients=6,
    rounds=5,
    engine="batched",
    codec="stc(0.05)",
    momentum_correction=0.5,
    momentum_masking=True,
    local_clip=2.0,
    sparsity_warmup=2,
)


def _metrics(result) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.rounds]


def test_dgc_round_is_stacked_and_the_same_as_device_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Momentum correction, masking, local clip and warm-up on the stack: every round's metrics, bytes and
    the final weights are those of the device-by-device uplink (which the sequential engine runs). Before,
    a DGC round never reached the stack (the spy counts no call)."""
    cfg = RunConfig(**DGC_RUN)
    stacked_rounds: list[int] = []
    real = client_step.ClientStep.uplink_stacked

    def spy(self, clients, stacked, **kwargs):
        stacked_rounds.append(kwargs["rnd"])
        return real(self, clients, stacked, **kwargs)

    monkeypatch.setattr(client_step.ClientStep, "uplink_stacked", spy)
    ours = run_simulation(cfg)
    assert stacked_rounds == [1, 2, 3, 4, 5]
    # the per-device path: the batched engine hands each trained delta to ClientStep.finish
    monkeypatch.setattr(client_step.ClientStep, "stacks_uplink", property(lambda self: False))
    loop = run_simulation(cfg)
    assert stacked_rounds == [1, 2, 3, 4, 5]
    assert _metrics(ours) == _metrics(loop)
    assert all(torch.equal(ours.final_state[k], loop.final_state[k]) for k in loop.final_state)
    assert ours.rounds[0].uplink_bytes > ours.rounds[-1].uplink_bytes > 0  # warm-up: denser at first


def _dgc_devices(cfg: RunConfig):
    from deltaplane.engine import make_task
    from deltaplane.engine.federation import build_clients

    task = make_task(cfg)
    return client_step.ClientStep(cfg, task, base_id="m"), build_clients(cfg, task)


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum_correction=0.5, momentum_masking=True, local_clip=0.3, sparsity_warmup=2),
        dict(momentum_correction=0.9, local_clip=0.3),  # no masking: the velocity is u as it is
        dict(momentum_correction=0.5, momentum_masking=True, error_feedback=False),
        dict(local_clip=0.3),  # clip alone: no velocity
        # the relative clip: each row against its own device's history (none yet for device 4 in round 2)
        dict(momentum_correction=0.5, momentum_masking=True, local_clip_relative=1.1),
        dict(local_clip_relative=1.05),
        dict(sparsity_warmup=3),
    ],
)
@pytest.mark.parametrize("codec", ["stc(0.05)", "topk(0.05) | quant(bits=8)", "randk(0.1)"])
def test_uplink_stacked_equals_uplink(options: dict, codec: str) -> None:
    """Payloads, residuals, generators, codecs and velocities after several rounds of uplink_stacked are
    those of uplink one device at a time, with some devices' clip binding and some without a velocity yet."""
    _check_uplink_stacked(options, codec)


@pytest.mark.parametrize("codec", ["powersgd(rank=1)", "stc(0.05)"])
def test_uplink_stacked_device_by_device_fallback(codec: str) -> None:
    """Where compress_many goes device by device (a stateful codec; a NaN update), masking decodes each
    payload as uplink does, and the failing device gets uplink's error and keeps its velocity."""
    _check_uplink_stacked(dict(momentum_correction=0.5, momentum_masking=True), codec, nan_row=True)


def _check_uplink_stacked(options: dict, codec: str, *, nan_row: bool = False) -> None:
    import copy

    cfg = RunConfig(clients=5, codec=codec, **options)
    step, clients = _dgc_devices(cfg)
    twins = copy.deepcopy(clients)
    g = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (4, 3, 3), "fc.bias": (7,), "one": (1,)}
    for rnd in range(1, 6):
        # row 1 stays small (its clip never binds); device 4 joins in round 2 (no velocity yet, beside devices
        # with one) and device 3 skips round 2 (a velocity from an older round)
        chosen = [i for i in range(5) if not (rnd == 1 and i == 4) and not (rnd == 2 and i == 3)]
        stacked = {k: torch.randn(len(chosen), *s, generator=g) * 0.2 for k, s in shapes.items()}
        stacked["fc.bias"][0, :3] = 0.0
        for t in stacked.values():
            t[1 % len(chosen)] *= 0.01
        if nan_row and rnd == 3:
            stacked["fc.bias"][0, 2] = float("nan")
        ours = step.uplink_stacked([clients[i] for i in chosen], stacked, version=rnd, rnd=rnd)
        ref = [
            step.uplink(twins[i], Delta({k: t[row] for k, t in stacked.items()}), version=rnd, rnd=rnd)
            for row, i in enumerate(chosen)
        ]
        assert [(u.cid, u.payload, str(u.error)) for u in ours] == [
            (u.cid, u.payload, str(u.error)) for u in ref
        ]
        assert sum(u.error is not None for u in ours) == (nan_row and rnd == 3)
        for a, b in zip(clients, twins, strict=True):
            sa, sb = a.compressor.state_dict(), b.compressor.state_dict()
            assert sa["codec"] == sb["codec"] and sa["rounds"] == sb["rounds"]
            assert torch.equal(sa["rng_state"], sb["rng_state"])
            assert (sa["residual"] is None) == (sb["residual"] is None)
            for k in sa["residual"] or {}:
                assert torch.equal(sa["residual"][k], sb["residual"][k]), k
            assert a.norms == b.norms
            assert (a.velocity is None) == (b.velocity is None)
            for k in a.velocity or {}:
                assert torch.equal(a.velocity[k].view(torch.int32), b.velocity[k].view(torch.int32)), k


# -- attackers and personalization: the honest devices on the stack -----------------------------------------------
def _recorded_run(monkeypatch: pytest.MonkeyPatch, cfg: RunConfig, *, stacked: bool):
    """The run and every upload handed to the server, in order: (round, cid, payload, error), with the stacked
    uplink on or forced off (every device through ClientStep.finish, one by one)."""
    import deltaplane.sim.simulation as driver

    sent: list[tuple] = []
    real = driver.deliver

    def recording(config, server, uploads, rnd, enrollment=None):
        sent.extend((rnd, u.cid, u.payload, str(u.error)) for u in uploads)
        return real(config, server, uploads, rnd, enrollment)

    with monkeypatch.context() as m:
        m.setattr(driver, "deliver", recording)
        if not stacked:
            m.setattr(client_step.ClientStep, "stacks_uplink", property(lambda self: False))
        return run_simulation(cfg), sent


def _spy_stacked(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The devices of every call to ClientStep.uplink_stacked, by id."""
    calls: list[list[int]] = []
    real = client_step.ClientStep.uplink_stacked

    def spy(self, clients, stacked, **kwargs):
        calls.append([c.cid for c in clients])
        return real(self, clients, stacked, **kwargs)

    monkeypatch.setattr(client_step.ClientStep, "uplink_stacked", spy)
    return calls


ATTACKED = dict(clients=10, rounds=3, engine="batched", local_epochs=1)


@pytest.mark.parametrize(
    "options",
    [
        # the robustness benchmark's run: deltaplane run's codec and DGC, backdoor attackers
        dict(attack="backdoor(0.3)", codec="stc(0.05)", momentum_correction=0.5, momentum_masking=True),
        dict(attack="gaussian(0.2)", codec="topk(0.05) | quant(bits=8)", sample_fraction=0.6),
        dict(attack="sign_flip(0.3)", defense="median"),
    ],
)
def test_attacked_round_stacks_the_honest_devices(monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    """With attackers, the honest devices' uplink runs on the stack and every attacker's poisoning and uplink
    on its own: the server receives the same payloads in the same (sampled) order, and the run has the same
    metrics and final weights, as with every device through ClientStep.finish. Before, no attacked round
    reached the stack (the spy counts no call)."""
    cfg = RunConfig(**ATTACKED, **options)
    calls = _spy_stacked(monkeypatch)
    ours, ours_sent = _recorded_run(monkeypatch, cfg, stacked=True)
    step = client_step.ClientStep(cfg, _task(cfg), base_id="m")
    assert step.malicious and len(calls) == cfg.rounds
    assert all(c and not set(c) & step.malicious for c in calls)  # honest devices only, every round
    assert sum(map(len, calls)) + sum(cid in step.malicious for _, cid, _, _ in ours_sent) == len(ours_sent)
    loop, loop_sent = _recorded_run(monkeypatch, cfg, stacked=False)
    assert len(calls) == cfg.rounds  # forced off: no further call
    assert ours_sent == loop_sent
    assert _metrics(ours) == _metrics(loop)
    assert all(torch.equal(ours.final_state[k], loop.final_state[k]) for k in loop.final_state)


def _task(cfg: RunConfig):
    from deltaplane.engine import make_task

    return make_task(cfg)


@pytest.mark.parametrize("method", ["alpha_mix", "ditto"])
def test_personalized_round_is_stacked(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """α-mix and Ditto share the whole trained delta (they adapt each device after the round), so their
    uplink runs on the stack: same payloads, metrics (personal ones included), personal models and final
    weights as device by device. Before, a personalized round never reached the stack."""
    cfg = RunConfig(
        clients=6, rounds=2, engine="batched", local_epochs=1, personalization=method, codec="topk(0.05)"
    )
    calls = _spy_stacked(monkeypatch)
    ours, ours_sent = _recorded_run(monkeypatch, cfg, stacked=True)
    assert calls == [list(range(6))] * 2
    loop, loop_sent = _recorded_run(monkeypatch, cfg, stacked=False)
    assert ours_sent == loop_sent
    assert _metrics(ours) == _metrics(loop) and ours.clients == loop.clients
    assert all(torch.equal(ours.final_state[k], loop.final_state[k]) for k in loop.final_state)
    for cid, state in loop.personal_states.items():
        assert all(torch.equal(ours.personal_states[cid][k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("method", "stacks"), [("none", True), ("alpha_mix", True), ("ditto", True), ("fedper", False)]
)
def test_stacks_uplink_with_personalization(method: str, stacks: bool) -> None:
    """Only a personalizer that keeps layers on the device (its stage 2 stores them and drops them from the
    shared delta, device by device) keeps the per-device uplink, attackers or not; no model need be passed."""
    for attack in (None, "sign_flip(0.5)"):
        cfg = RunConfig(clients=4, personalization=method, attack=attack)
        step = client_step.ClientStep(cfg, _task(cfg), base_id="m")
        assert step.stacks_uplink is stacks
        assert step.stackable is (stacks and attack is None)


@pytest.mark.parametrize(
    "codec, cls",
    [
        ("threshold(0.01)", "Threshold"),
        ("randk(0.05)", "RandK"),
        ("topk(0.01, approx=true)", "TopK"),
        ("topk(0.05) | quant(bits=8)", "TopK"),
        ("stc(0.01)", "STC"),
    ],
)
def test_batched_run_decodes_sparse_updates_on_the_stack(
    monkeypatch: pytest.MonkeyPatch, codec: str, cls: str
) -> None:
    """The residual's and the server's decode take the stacked path (no per-row decode, no per-row index
    read: fails before for threshold, randk and approximate top-k; randk's encode regenerates positions row
    by row) and give the final weights the per-row
    decode gives, bit for bit."""
    import deltaplane.codecs.sparsify as sparsify
    from deltaplane.codecs.base import Codec

    cfg = RunConfig(clients=5, rounds=2, engine="batched", codec=codec)
    codec_cls = getattr(sparsify, cls)

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("per-row decode called")

    with monkeypatch.context() as m:
        m.setattr(codec_cls, "decode", refuse)
        m.setattr(sparsify, "decode_indices", refuse)
        stacked = run_simulation(cfg)
    monkeypatch.setattr(codec_cls, "decode_rows", Codec.decode_rows)  # the per-row default
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert all(torch.equal(stacked.final_state[k], loop.final_state[k]) for k in loop.final_state)


@pytest.mark.parametrize(
    "codec, cls", [("stc(0.002)", "STC"), ("topk(0.01) | quant(bits=8)", "TopK"), ("topk(0.3)", "TopK")]
)
def test_batched_run_codes_positions_on_the_stack(
    monkeypatch: pytest.MonkeyPatch, codec: str, cls: str
) -> None:
    """The sender codes every row's positions at once (encode_indices is called only for the wire session's
    template, once per tensor, not per device and round: fails before) and the run ends with the bytes and
    final weights of the per-row encode (the codec's own encode, row by row)."""
    import hashlib

    import deltaplane.codecs.sparsify as sparsify
    from deltaplane.codecs.base import Codec

    cfg = RunConfig(clients=5, rounds=3, engine="batched", codec=codec)
    calls = []
    per_row = sparsify.encode_indices

    def spy(*args: object) -> tuple[str, bytes]:
        calls.append(args)
        return per_row(*args)

    def digest(state: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].contiguous().numpy().tobytes())
        return h.hexdigest()

    with monkeypatch.context() as m:
        m.setattr(sparsify, "encode_indices", spy)
        stacked = run_simulation(cfg)
    assert 0 < len(calls) <= len(stacked.final_state)  # the session's template: one call a tensor
    monkeypatch.setattr(getattr(sparsify, cls), "encode_rows", Codec.encode_rows)  # encode, row by row
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert digest(stacked.final_state) == digest(loop.final_state)


@pytest.mark.parametrize("engine", ["batched", "population"])
def test_round_frames_are_made_together(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Every round's compact frames come from one WireSession.pack_many call for all of its devices, never
    from pack device by device (fails before: there was no pack_many), and the run's bytes and final
    weights are those of framing each device with pack."""
    from deltaplane.codecs import WireSession
    from deltaplane.sim.population import run_population

    cfg = RunConfig(clients=5, rounds=2, engine="batched", codec="topk(0.05) | quant(bits=8)")

    def run() -> object:
        if engine == "population":
            return run_population(cfg, registered=40, per_round=5)
        return run_simulation(cfg)

    calls: list[int] = []
    real = WireSession.pack_many

    def spy(self: WireSession, trees: list, base_version: int) -> list[bytes]:
        calls.append(len(trees))
        return real(self, trees, base_version)

    def refuse(*args: object) -> bytes:
        raise AssertionError("a frame packed device by device")

    with monkeypatch.context() as m:
        m.setattr(WireSession, "pack_many", spy)
        m.setattr(WireSession, "pack", refuse)
        together = run()
    assert calls == [5, 5]
    one = WireSession.pack
    monkeypatch.setattr(WireSession, "pack_many", lambda self, trees, v: [one(self, t, v) for t in trees])
    alone = run()
    assert [r.uplink_bytes for r in together.rounds] == [r.uplink_bytes for r in alone.rounds]
    assert all(torch.equal(together.final_state[k], v) for k, v in alone.final_state.items())
