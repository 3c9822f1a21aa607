"""α-mix's and Ditto's personal training on the batched engine's stack equals the per-device loop's."""

import numpy as np
import pytest
import torch
from torch import nn

import deltaplane.engine.metrics as metrics
import deltaplane.engine.scoring as scoring
import deltaplane.personalization.alpha_mix as alpha_mix
import deltaplane.personalization.ditto as ditto
from deltaplane.data.digits import load_digits
from deltaplane.delta import Delta
from deltaplane.engine.metrics import class_accuracy, class_accuracy_stacked
from deltaplane.errors import ConfigError
from deltaplane.personalization import AlphaMix, Ditto, PersonalState, train_sgd
from deltaplane.sim import RunConfig, build_model, run_simulation
from deltaplane.sim.batched import BatchedTrainer

# Shards of awkward sizes (test_batched's): a short batch, exact multiples of 32, a single sample.
from .test_batched import SIZES, _shards, _VmapOnly


def _starts(model: nn.Module) -> tuple[dict, list[dict]]:
    """A global state and one different start state per device (as α-mix's ``global + personal``)."""
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    return glob, [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in SIZES]


@pytest.mark.parametrize("path", ["stacked", "vmap"])
@pytest.mark.parametrize("budget", [256 * 2**20, 1])  # all devices at once; one device per chunk
@pytest.mark.parametrize("lam", [0.0, 0.5])  # α-mix's plain fine-tuning; Ditto's proximal pull
def test_train_from_equals_train_sgd_per_device(path: str, budget: int, lam: float) -> None:
    model = build_model(3)
    glob, starts = _starts(model)
    shards = _shards()
    seq = [
        train_sgd(
            model,
            s,
            d,
            epochs=2,
            lr=0.05,
            batch_size=32,
            generator=torch.Generator().manual_seed(c),
            prox_center=glob,
            prox_lambda=lam,
        )
        for c, (s, d) in enumerate(zip(starts, shards, strict=True))
    ]
    prefix = "" if path == "stacked" else "net."
    trainer = BatchedTrainer(build_model(0) if path == "stacked" else _VmapOnly(), memory_budget=budget)
    gens = [torch.Generator().manual_seed(c) for c in range(len(SIZES))]
    got = trainer.train_from(
        [{prefix + k: v for k, v in s.items()} for s in starts],
        shards,
        gens,
        epochs=2,
        batch_size=32,
        lr=0.05,
        momentum=0.9,
        prox_center={prefix + k: v for k, v in glob.items()},
        prox_lambda=lam,
        loss=nn.functional.cross_entropy,
    )
    for c, want in enumerate(seq):
        assert set(got[c]) == {prefix + k for k in want}
        for k, t in want.items():
            # the batched engine's tolerance for local training (tests/sim/test_batched.py: 4e-6 plain, 1e-5
            # with a proximal term); the devices moved by far more
            assert torch.allclose(got[c][prefix + k], t, rtol=0, atol=1e-5 if lam else 4e-6), (c, k)
        assert max(float((want[k] - starts[c][k]).abs().max()) for k in want) > 1e-3
    # each generator advanced as train_sgd advances it: one randperm per epoch
    again = torch.Generator().manual_seed(0)
    for _ in range(2):
        torch.randperm(SIZES[0], generator=again)
    assert torch.equal(torch.randperm(10, generator=gens[0]), torch.randperm(10, generator=again))


@pytest.mark.parametrize("personalizer", [AlphaMix(), Ditto(lam=0.5)], ids=["alpha_mix", "ditto"])
def test_personalize_many_on_the_stack_equals_one_device_after_another(personalizer) -> None:
    """Two rounds, so the second starts from each device's own personal state; the same α and (within the
    batched engine's tolerance) the same personal models as :meth:`personalize` device by device."""
    model = build_model(3)
    glob, _ = _starts(model)
    shards = _shards()
    trainer = BatchedTrainer(build_model(0))
    loop = [PersonalState() for _ in SIZES]
    stack = [PersonalState() for _ in SIZES]
    for rnd in range(2):
        glob = {k: v + 0.01 * rnd for k, v in glob.items()}

        def gens(rnd=rnd) -> list[torch.Generator]:
            return [torch.Generator().manual_seed(100 * rnd + c) for c in range(len(SIZES))]

        for s, d, g in zip(loop, shards, gens(), strict=True):
            personalizer.personalize(model, glob, s, d, d, generator=g)
        personalizer.personalize_many(
            model, glob, stack, shards, shards, generators=gens(), train_many=trainer.train_from
        )
        for a, b in zip(loop, stack, strict=True):
            assert (
                a.alpha == b.alpha and a.history == b.history
            )  # α-mix: each candidate's validation accuracy
            mine, theirs = personalizer.personal_state(glob, a), personalizer.personal_state(glob, b)
            for k, t in mine.items():
                assert torch.allclose(theirs[k], t, rtol=0, atol=1e-5), k
    assert any(s.alpha > 0 for s in stack) or isinstance(personalizer, Ditto)


@pytest.mark.parametrize("method", ["alpha_mix", "ditto"])
def test_batched_personalized_run_trains_on_the_stack_and_equals_the_sequential_run(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batched α-mix / Ditto run trains every device's personal model in one ``train_from`` call a round
    (train_sgd is never called), and reports what the sequential engine reports."""
    cfg = RunConfig(clients=6, rounds=2, personalization=method)
    seq = run_simulation(cfg.replace(engine="sequential"))

    calls: list[int] = []
    real = BatchedTrainer.train_from

    def counted(self, starts, *args, **kwargs):
        calls.append(len(starts))
        return real(self, starts, *args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("personal training ran one device at a time on the batched engine")

    scored: list[int] = []
    real_scoring = scoring.class_accuracy_stacked

    def counted_scoring(model, states, *args, **kwargs):
        scored.append(len(states))
        return real_scoring(model, states, *args, **kwargs)

    monkeypatch.setattr(BatchedTrainer, "train_from", counted)
    monkeypatch.setattr(alpha_mix, "train_sgd", refused)
    monkeypatch.setattr(alpha_mix, "choose_alpha", refused)  # the candidates are scored stacked too
    monkeypatch.setattr(ditto, "train_sgd", refused)
    monkeypatch.setattr(scoring, "class_accuracy_stacked", counted_scoring)
    bat = run_simulation(cfg.replace(engine="batched"))
    assert calls == [cfg.clients] * cfg.rounds  # every device, once a round
    assert len(scored) == cfg.rounds and sum(scored) > 0  # the personal models scored stacked each round

    # one round's weights differ by float rounding only (≤ 1e-6, test_batched.py), and it grows ~30× a round
    for a, b in zip(seq.rounds, bat.rounds, strict=True):
        assert abs(a.test_accuracy - b.test_accuracy) <= 1 / 359
        for key in ("client_mix_accuracy_mean", "personal_accuracy_mean", "personal_accuracy_min"):
            assert abs(getattr(a, key) - getattr(b, key)) <= 0.01, key
    assert [r["alpha"] for r in seq.clients] == [r["alpha"] for r in bat.clients]
    for cid, state in seq.personal_states.items():
        for k, t in state.items():
            assert torch.allclose(bat.personal_states[cid][k], t, rtol=0, atol=1e-3), (cid, k)
    if method == "alpha_mix":  # the devices' personal deltas, not only the α-mixed models they serve
        assert bat.final.personal_accuracy_mean != bat.final.client_mix_accuracy_mean


def test_personal_deltas_are_the_trained_weights_minus_the_global_model() -> None:
    """α-mix keeps ``trained − global`` from the stacked weights, as from train_sgd's."""
    model = build_model(3)
    glob, _ = _starts(model)
    shards = _shards()[:2]
    state = PersonalState()
    trained = BatchedTrainer(build_model(0)).train_from(
        [glob, glob],
        shards,
        [torch.Generator().manual_seed(0)] * 2,
        epochs=1,
        batch_size=32,
        lr=0.05,
        momentum=0.9,
    )
    calls: list[dict] = []
    AlphaMix(epochs=1).personalize_many(
        model,
        glob,
        [state, PersonalState()],
        shards,
        shards,
        generators=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
        train_many=lambda *a, **k: calls.append(k) or trained,
    )
    assert calls and calls[0]["loss"] is nn.functional.cross_entropy and calls[0]["momentum"] == 0.9
    want = Delta.between(glob, trained[0])
    assert state.personal_delta is not None
    assert all(torch.equal(state.personal_delta[k], want[k]) for k in want)


def test_alphas_chosen_stacked_equal_those_chosen_device_by_device() -> None:
    """Every device's candidates scored in one stacked pass: the same α and validation accuracies as
    :func:`choose_alpha` one device at a time (validation splits of different sizes, one empty; chunked)."""
    model = build_model(3)
    glob, starts = _starts(model)
    data = load_digits()
    vals = [data.subset(range(300 + 20 * c, 300 + 20 * c + n)) for c, n in enumerate([12, 5, 0, 17, 1])]
    deltas = [Delta.between(glob, s) for s in starts]
    # a delta worth taking: the start states trained a little on the validation data itself
    deltas[0] = Delta.between(
        glob, train_sgd(model, glob, vals[0], epochs=5, lr=0.1, generator=torch.Generator().manual_seed(0))
    )
    for max_samples, significance in ((1 << 16, None), (1, None), (1 << 16, 0.05), (1, 0.05)):
        got = alpha_mix.choose_alphas_stacked(
            model, glob, deltas, vals, max_samples=max_samples, significance=significance
        )
        want = [
            alpha_mix.choose_alpha(model, glob, d, v, significance=significance)
            for d, v in zip(deltas, vals, strict=True)
        ]
        assert got == want
        assert any(a > 0 for a, _ in want)  # some device moved off the global model, by either rule
    with pytest.raises(ConfigError, match="forward_stacked"):
        alpha_mix.choose_alphas_stacked(_VmapOnly(), glob, deltas, vals)


def test_personal_models_scored_stacked_equal_one_at_a_time() -> None:
    model = build_model(3)
    _, starts = _starts(model)
    test = load_digits().subset(range(1000, 1359))
    got = class_accuracy_stacked(model, starts, test, 10, copies=2)  # chunks of 2, 2 and 1
    for state, row in zip(starts, got, strict=True):
        assert np.array_equal(row, class_accuracy(model, state, test, 10))


def _per_class_masked(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """The per-class accuracy as it was computed before the bincount one: a masked float32 mean per class."""
    return np.array(
        [float((pred[y == c] == c).float().mean()) if (y == c).any() else 0.0 for c in range(num_classes)]
    )


def test_per_class_accuracy_counted_equals_the_masked_mean_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(11)
    for n in (0, 1, 7, 359, 1000):
        y = torch.randint(0, 12, (n,), generator=g)  # labels 10 and 11 lie outside the 10 classes scored
        y[y == 3] = 4  # a class with no sample scores 0
        for pred in (torch.randint(0, 12, (n,), generator=g), y.clone(), torch.where(y % 2 == 0, y, 0)):
            got = metrics._per_class(pred, y, 10)
            assert got.dtype == np.float64 and got.shape == (10,)
            assert np.array_equal(got, _per_class_masked(pred, y, 10)), n
            assert got[3] == 0.0


def test_personal_models_scored_in_even_passes_of_the_sample_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 models on the 359-sample test set: two passes of 10 (not 16 and 4), each model's per-class
    accuracies bit for bit what the earlier passes of 16 and one model at a time give."""
    model = build_model(3)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(20)]
    test = load_digits().subset(range(1000, 1359))
    passes: list[int] = []
    real = type(model).forward_stacked

    def counted(self, params, x):
        passes.append(x.shape[0])
        return real(self, params, x)

    monkeypatch.setattr(type(model), "forward_stacked", counted)
    got = class_accuracy_stacked(model, states, test, 10)
    assert passes == [10, 10]
    before = class_accuracy_stacked(model, states, test, 10, copies=16)  # the earlier default: 16 and 4
    assert passes[2:] == [16, 4]
    for row, old, state in zip(got, before, states, strict=True):
        assert np.array_equal(row, old)
        assert np.array_equal(row, class_accuracy(model, state, test, 10))
    assert class_accuracy_stacked(model, [], test, 10) == []
    with pytest.raises(ConfigError, match="copies must be at least 1"):
        class_accuracy_stacked(model, states, test, 10, copies=0)


def test_personalized_run_reports_what_the_earlier_scoring_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched α-mix run's every round and device row, bit for bit, with the personal models scored the
    earlier way (passes of 16, a masked mean per class) and the new way."""
    cfg = RunConfig(clients=20, rounds=3, engine="batched", personalization="alpha_mix")
    new = run_simulation(cfg)
    real = metrics.class_accuracy_stacked
    monkeypatch.setattr(metrics, "_per_class", _per_class_masked)
    monkeypatch.setattr(scoring, "class_accuracy_stacked", lambda *a, **k: real(*a, **k, copies=16))
    old = run_simulation(cfg)
    fields = (
        "client_mix_accuracy_mean",
        "personal_accuracy_mean",
        "personal_accuracy_min",
        "personal_gain_min",
    )
    for a, b in zip(old.rounds, new.rounds, strict=True):
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        assert a.test_accuracy == b.test_accuracy
    assert old.clients == new.clients
    assert new.final.personal_accuracy_mean != new.final.client_mix_accuracy_mean  # personal models scored
