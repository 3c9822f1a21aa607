"""Personalizers on plain torch modules: what stays local, α selection, Ditto's proximal pull."""

import math

import pytest
import torch
from torch import nn

import deltaplane as dp
from deltaplane.personalization import (
    AlphaMix,
    Ditto,
    FedBN,
    FedPer,
    Personalizer,
    PersonalState,
    accuracy,
    choose_alpha,
    get_personalizer,
    train_sgd,
)


class Net(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _data(seed: int, n: int = 120, perm: tuple[int, ...] = (0, 1, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """3 linearly separable classes; a client's label permutation makes its task differ from the global one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    base = x[:, :3].argmax(1)
    return x, torch.tensor(perm)[base]


def test_fedper_keeps_head_local() -> None:
    m = Net()
    p = FedPer(head=["fc2"])
    assert p.local_keys(m) == {"fc2.weight", "fc2.bias"}
    state = PersonalState()
    trained = {k: v + 1 for k, v in m.state_dict().items()}
    p.keep_local(trained, state, m)
    assert set(state.local) == {"fc2.weight", "fc2.bias"}
    start = p.start_state(m.state_dict(), state)
    assert torch.equal(start["fc2.weight"], trained["fc2.weight"]) and torch.equal(
        start["fc1.weight"], m.fc1.weight
    )
    up = p.shared(dp.Delta.between(m.state_dict(), trained), m)
    assert set(up) == {"fc1.weight", "fc1.bias"}
    with pytest.raises(dp.ConfigError, match="matches no tensor"):
        FedPer(head=["decoder"]).local_keys(m)


def test_fedbn_keeps_norm_layers_and_statistics_local() -> None:
    m = Net(bn=True)
    assert FedBN().local_keys(m) == {
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
    }  # fmt: skip
    with pytest.raises(dp.ConfigError, match="batch-norm layers; this model has none"):
        FedBN().local_keys(Net())


def test_choose_alpha_exact_scores_and_tie_break() -> None:
    torch.manual_seed(0)
    m = Net()
    val = _data(1, perm=(1, 2, 0))  # this device's labels are permuted: the global model is wrong for it
    glob = train_sgd(
        m, m.state_dict(), _data(0), epochs=30, lr=0.1, generator=torch.Generator().manual_seed(0)
    )
    personal = train_sgd(
        m, glob, _data(2, perm=(1, 2, 0)), epochs=15, lr=0.1, generator=torch.Generator().manual_seed(0)
    )
    delta = dp.Delta.between(glob, personal)
    alpha, scores = choose_alpha(m, glob, delta, val, alphas=[0.0, 0.5, 1.0])
    for a, s in scores.items():
        assert s == accuracy(m, delta.apply(glob, scale=a), val)
    assert scores[0.0] < 0.2 and scores[1.0] > 0.9 and alpha > 0
    zero = dp.Delta.zeros_like(glob)
    assert choose_alpha(m, glob, zero, val)[0] == 0.0  # all candidates tie exactly: the global model is kept


def test_choose_alpha_takes_only_a_small_step_when_validation_accuracy_ties() -> None:
    m = nn.Linear(3, 3, bias=False)
    glob = {"weight": torch.eye(3)}
    sharpen = dp.Delta({"weight": 2 * torch.eye(3)})  # same predictions, sharper: cross-entropy falls with α
    x = torch.eye(3) + 0.1
    val = (x, torch.arange(3))
    alpha, scores = choose_alpha(m, glob, sharpen, val)
    assert set(scores.values()) == {1.0}  # every α is equally accurate: the device cannot tell them apart
    assert alpha == 0.25  # lowest cross-entropy among α ≤ tie_alpha_max, not α = 1
    assert choose_alpha(m, glob, sharpen, val, tie_alpha_max=0.5)[0] == 0.5
    assert choose_alpha(m, glob, sharpen, val, tie_alpha_max=0.0)[0] == 0.0
    with pytest.raises(dp.ConfigError, match="tie_alpha_max must be in"):
        AlphaMix(tie_alpha_max=1.5)


def test_alpha_mix_improves_a_shifted_device_and_keeps_global_for_a_typical_one() -> None:
    torch.manual_seed(0)
    m = Net()
    glob = train_sgd(
        m, m.state_dict(), _data(0, 300), epochs=15, lr=0.1, generator=torch.Generator().manual_seed(0)
    )
    p = AlphaMix(epochs=10, lr=0.1)
    shifted, typical = PersonalState(), PersonalState()
    perm = (1, 2, 0)
    p.personalize(
        m, glob, shifted, _data(3, perm=perm), _data(4, perm=perm), generator=torch.Generator().manual_seed(1)
    )
    p.personalize(m, glob, typical, _data(5), _data(6), generator=torch.Generator().manual_seed(1))
    test_shift, test_typ = _data(7, 400, perm), _data(8, 400)
    assert accuracy(m, p.personal_state(glob, shifted), test_shift) > accuracy(m, glob, test_shift) + 0.5
    assert accuracy(m, p.personal_state(glob, typical), test_typ) >= accuracy(m, glob, test_typ) - 0.02
    assert shifted.alpha > 0 and shifted.history[-1]["alpha"] == shifted.alpha
    with pytest.raises(dp.ConfigError, match="include 0.0"):
        AlphaMix(alphas=[0.5, 1.0])


def test_ditto_lambda_interpolates_between_local_and_global() -> None:
    torch.manual_seed(0)
    m = Net()
    glob = {k: v.clone() for k, v in m.state_dict().items()}
    data = _data(9, perm=(2, 0, 1))
    free, tied = PersonalState(), PersonalState()
    Ditto(lam=0.0, epochs=5, lr=0.1).personalize(
        m, glob, free, data, data, generator=torch.Generator().manual_seed(0)
    )
    plain = train_sgd(m, glob, data, epochs=5, lr=0.1, generator=torch.Generator().manual_seed(0))
    assert all(torch.allclose(free.personal_model[k], plain[k]) for k in plain)  # λ = 0: local training
    Ditto(lam=100.0, epochs=5, lr=0.005).personalize(
        m, glob, tied, data, data, generator=torch.Generator().manual_seed(0)
    )
    d_free = dp.Delta.between(glob, free.personal_model).norm()
    d_tied = dp.Delta.between(glob, tied.personal_model).norm()
    assert d_tied < 0.1 * d_free  # strong λ keeps v_k near the global model


def test_registry() -> None:
    assert isinstance(get_personalizer("ditto", lam=0.5), Ditto)
    assert type(get_personalizer("none")) is Personalizer
    with pytest.raises(dp.ConfigError, match="unknown personalization"):
        get_personalizer("magic")
    with pytest.raises(dp.ConfigError, match="lam must be non-negative"):
        get_personalizer("ditto", lam=-1)


def test_a_partial_personalization_that_keeps_every_tensor_local_is_refused() -> None:
    """A FedPer head covering every layer left nothing to federate: every upload was empty and the server's
    mean crashed with torch's RuntimeError. Refused when the layout is worked out, before any round."""
    with pytest.raises(dp.ConfigError, match="nothing would be federated"):
        FedPer(head=["fc1", "fc2"]).local_keys(Net())
    assert FedPer(head=["fc1"]).local_keys(Net()) == {"fc1.weight", "fc1.bias"}

    class OnlyNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

    with pytest.raises(dp.ConfigError, match="nothing would be federated"):
        FedBN().local_keys(OnlyNorm())
    with pytest.raises(dp.ConfigError, match="head must be"):
        FedPer(head=["fc2", 3])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Ditto(lam=math.inf), "lam"),
        (lambda: Ditto(lam=math.nan), "lam"),
        (lambda: Ditto(lr=math.nan), "lr"),
        (lambda: AlphaMix(lr=math.inf), "lr"),
        (lambda: AlphaMix(alphas=(0.0, 0.5, 2.0)), r"\[0, 1\]"),
        (lambda: AlphaMix(alphas=(0.0, math.nan)), r"\[0, 1\]"),
        (lambda: AlphaMix(batch_size=0), "batch_size"),
        (lambda: Ditto(epochs=1.5), "epochs"),
    ],
)
def test_personalizer_options_no_run_can_use_are_refused(make, match) -> None:
    """NaN passed ``lam < 0`` and ``lr <= 0``; λ = ∞ and lr = ∞ passed too and trained the personal model to NaN
    (``deltaplane run --personalization ditto`` with ``ditto_lambda: .inf`` served a NaN model); an α of 2
    extrapolated past the personal model although APFL's mix, and the simulator's report, keep α in [0, 1]."""
    with pytest.raises(dp.ConfigError, match=match):
        make()


def test_ditto_with_an_infinite_lambda_was_a_nan_model() -> None:
    """What λ = ∞ did (the proximal gradient overflows): train_sgd now refuses it, as the constructor does."""
    m = Net()
    with pytest.raises(dp.ConfigError, match="prox_lambda"):
        train_sgd(
            m, m.state_dict(), _data(0), epochs=1, lr=0.1, generator=torch.Generator().manual_seed(0),
            prox_center={k: v + 1 for k, v in m.state_dict().items()}, prox_lambda=math.inf,
        )  # fmt: skip


def test_numpy_data_as_scikit_learn_gives_it_personalizes_like_tensors() -> None:
    """``(x, y)`` straight from a scikit-learn loader (float64 and int64 NumPy arrays) is an ``(x, y)`` pair as
    the docs say: it personalizes exactly as the same data in float32 tensors (it failed inside the model with
    ``linear(): argument 'input' must be Tensor``); a pair with a label per example missing is refused by name."""
    m = Net()
    g = {k: v.clone() for k, v in m.state_dict().items()}
    (xt, yt), (xv, yv) = _data(1, 80, (2, 0, 1)), _data(2, 30, (2, 0, 1))
    as_numpy = ((xt.double().numpy(), yt.numpy()), (xv.double().numpy(), yv.numpy()))
    a, b = PersonalState(), PersonalState()
    AlphaMix(epochs=2).personalize(m, g, a, (xt, yt), (xv, yv), generator=torch.Generator().manual_seed(0))
    AlphaMix(epochs=2).personalize(m, g, b, *as_numpy, generator=torch.Generator().manual_seed(0))
    assert a.alpha == b.alpha and a.history == b.history
    assert all(torch.equal(a.personal_delta[k], b.personal_delta[k]) for k in a.personal_delta)
    assert accuracy(m, g, as_numpy[1]) == accuracy(m, g, (xv, yv))
    with pytest.raises(dp.ConfigError, match=r"one label per example: x has shape \(80, 4\), y \(79,\)"):
        train_sgd(m, g, (xt.numpy(), yt.numpy()[:79]), epochs=1, lr=0.1, generator=torch.Generator())


def test_fedbn_and_fedper_personalize_refuse_a_model_they_cannot_personalize() -> None:
    """Outside a federation, ``personalize`` then ``personal_state`` on a model without batch-norm (FedBN) or a
    head prefix matching nothing (FedPer) returned silently and served the global model as the personal one."""
    m = Net()
    data = _data(1, 20)
    for p, msg in ((FedBN(), "batch-norm"), (FedPer(head=["decoder"]), "matches no tensor")):
        with pytest.raises(dp.ConfigError, match=msg):
            p.personalize(m, m.state_dict(), PersonalState(), data, data, generator=torch.Generator())
    FedPer(head=["fc2"]).personalize(
        m, m.state_dict(), PersonalState(), data, data, generator=torch.Generator()
    )
    FedBN().personalize(Net(bn=True), Net(bn=True).state_dict(), PersonalState(), data, data, generator=torch.Generator())  # fmt: skip


def _near_unit_val(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` validation examples, one class after another: each near its class's unit vector."""
    x = torch.eye(3)[torch.arange(n) % 3] + 0.1
    return x, torch.arange(n) % 3


def test_significant_alpha_keeps_the_global_model_on_weak_evidence() -> None:
    m = nn.Linear(3, 3, bias=False)
    glob = {"weight": torch.eye(3)}
    # sharpens class 0 and 1, blurs class 2 towards class 0: a lower mean cross-entropy on 6 examples, but the
    # per-example changes disagree in sign (noise-sized evidence); the tie-cap rule moves on it, the test does not
    mixed = dp.Delta({"weight": torch.tensor([[1.0, 0, 0.3], [0, 1.0, 0], [0, 0, -0.1]])})
    val = _near_unit_val(6)
    old, scores = choose_alpha(m, glob, mixed, val)
    assert set(scores.values()) == {1.0} and old == 0.25  # the tie-cap rule takes a step on a tie
    assert choose_alpha(m, glob, mixed, val, significance=0.05)[0] == 0.0
    # a personal step that lowers every example's loss alike is significant: the most accurate α, then the
    # lowest loss, is taken (here α = 1, where the tie-cap rule stops at 0.25)
    sharpen = dp.Delta({"weight": 2 * torch.eye(3)})
    assert choose_alpha(m, glob, sharpen, val, significance=0.05)[0] == 1.0
    with pytest.raises(dp.ConfigError, match="significance must be in"):
        AlphaMix(significance=1.5)


def test_significant_alpha_needs_a_p_value_below_the_bonferroni_level() -> None:
    """The paired one-sided t-test of per-example losses, scipy's, at ``level / (number of α > 0)``."""
    from scipy.stats import ttest_rel

    from deltaplane.personalization.alpha_mix import significant_alpha

    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    better = torch.tensor([0.2, 0.9, 0.4, 1.1, 0.3, 0.8])  # lower on average, one example worse
    p = float(ttest_rel(better.numpy(), base.numpy(), alternative="less").pvalue)
    scores = {0.0: 0.5, 1.0: 0.5}
    losses = {0.0: base, 1.0: better}
    assert significant_alpha(scores, losses, level=1.01 * p) == 1.0
    assert significant_alpha(scores, losses, level=0.99 * p) == 0.0
    # with three more α on the grid the level is shared four ways
    grid = {0.0: 0.5, 0.25: 0.0, 0.5: 0.0, 0.75: 0.0, 1.0: 0.5}
    four = {a: (better if a == 1.0 else base + 1) for a in grid} | {0.0: base}
    assert significant_alpha(grid, four, level=1.01 * p) == 0.0
    assert significant_alpha(grid, four, level=4.04 * p) == 1.0
    # less accurate than the global model on validation: never taken, however low its loss
    assert significant_alpha({0.0: 0.6, 1.0: 0.5}, losses, level=0.5) == 0.0
