import copy

import pytest
import torch
from torch import nn

from deltaplane.deploy import (
    GradualPruner,
    GradualSchedule,
    PruneResult,
    channel_prune,
    magnitude_prune,
    masked_finetune,
    nm_mask,
    nm_prune,
    prunable_layers,
    sparsegpt_prune,
    sparsity_of,
    wanda_prune,
    wanda_scores,
)
from deltaplane.errors import ConfigError, DeltaplaneError, UnsupportedLayer


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.2, 1.5, float("nan"), "0.5", True])
def test_ratio_outside_open_interval_is_config_error(helpers, bad):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        magnitude_prune(helpers.cnn(), bad)
    with pytest.raises(ConfigError):
        channel_prune(helpers.cnn(), bad, example_input=torch.zeros(1, 1, 8, 8))


def test_global_magnitude_exact_count_and_threshold(helpers):
    torch.manual_seed(0)
    m = helpers.cnn()
    weights = torch.cat([p.weight.detach().abs().flatten() for p in prunable_layers(m).values()])
    res = magnitude_prune(m, 0.7)
    n = weights.numel()
    kept = sum(int(mk.sum()) for mk in res.masks.values())
    assert kept == n - round(0.7 * n)
    assert abs(sparsity_of(m) - 0.7) < 1e-3
    # every kept weight is at least as large as every pruned one (one global threshold)
    layers = prunable_layers(m)
    pruned_max = max(
        float((layers[k].weight.detach().abs() * 0 + weights.new_tensor(0)).max()) for k in layers
    )
    kept_min = min(float(layers[k].weight.detach().abs()[mk].min()) for k, mk in res.masks.items())
    dropped = torch.sort(weights).values[round(0.7 * n) - 1]
    assert kept_min >= float(dropped) and pruned_max == 0.0


def test_layerwise_magnitude_gives_each_layer_the_ratio(helpers):
    m = helpers.cnn()
    res = magnitude_prune(m, 0.5, scope="layer")
    for name, s in res.layer_sparsity().items():
        numel = res.masks[name].numel()
        assert s == pytest.approx(round(0.5 * numel) / numel)


def test_nm_mask_keeps_n_largest_per_group():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 1.0, -2.0, 0.0]])
    mask = nm_mask(w.abs(), 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, False, True, False]]


def test_nm_prune_2_4_pattern_and_skips_incompatible_layer(helpers):
    m = helpers.cnn()
    res = nm_prune(m, 2, 4)
    assert "conv1" in res.skipped and "multiple of m=4" in res.skipped["conv1"]  # 1·3·3 = 9 inputs
    for name in ("conv2", "fc1", "fc2"):
        w = dict(m.named_modules())[name].weight.detach()
        groups = (w.reshape(w.shape[0], -1) != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2
    assert res.sparsity == pytest.approx(0.5)
    with pytest.raises(UnsupportedLayer, match="conv1"):
        nm_prune(helpers.cnn(), 2, 4, include=["conv1"])


def test_unsupported_layer_named_explicitly(helpers):
    with pytest.raises(UnsupportedLayer, match="MaxPool2d"):
        magnitude_prune(helpers.cnn(), 0.5, include=["pool"])
    with pytest.raises(UnsupportedLayer, match="no prunable layer"):
        magnitude_prune(nn.Sequential(nn.LSTM(4, 4)), 0.5)
    assert issubclass(UnsupportedLayer, DeltaplaneError)


def test_wanda_scores_match_definition_and_protect_large_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.ones(16, 8)
    x[:, 0] = 10.0  # feature 0 has a large norm: its weights must survive
    scores = wanda_scores(nn.Sequential(lin), [x])
    expected = lin.weight.abs() * (x**2).sum(0).sqrt()
    assert torch.allclose(scores["0"], expected)
    model = nn.Sequential(lin)
    wanda_prune(model, [x], sparsity=0.5)
    assert bool((lin.weight[:, 0] != 0).all())
    assert int((lin.weight == 0).sum()) == 12


def test_wanda_beats_magnitude_on_outlier_features():
    # A layer whose inputs have a few large-norm features: Wanda keeps the weights that matter for the output.
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32)
    scale = torch.ones(64)
    scale[::8] = 20.0  # one outlier feature in every other group of 4
    x = torch.randn(512, 64, generator=g) * scale
    ref = lin(x).detach()
    errs = {}
    for method in ("magnitude", "wanda"):
        m = copy.deepcopy(nn.Sequential(lin))
        if method == "wanda":
            wanda_prune(m, [x], n=2, m=4)
        else:
            nm_prune(m, 2, 4)
        errs[method] = float(((m(x).detach() - ref) ** 2).mean())
    assert errs["wanda"] < 0.5 * errs["magnitude"]


def test_wanda_conv_via_im2col(helpers, digits):
    xtr = torch.from_numpy(digits[0][:64])
    m = helpers.cnn()
    res = wanda_prune(m, [xtr], sparsity=0.5, exclude=["conv1"])
    assert set(res.masks) == {"conv2", "fc1", "fc2"}
    assert res.sparsity == pytest.approx(0.5, abs=0.01)


def test_gradual_schedule_cubic():
    s = GradualSchedule(final_sparsity=0.8, begin_step=10, end_step=110, frequency=10)
    assert s.sparsity_at(0) == 0.0
    assert s.sparsity_at(10) == pytest.approx(0.0)
    assert s.sparsity_at(60) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert s.sparsity_at(65) == s.sparsity_at(60)  # updates only every `frequency` steps
    assert s.sparsity_at(110) == pytest.approx(0.8) and s.sparsity_at(10_000) == pytest.approx(0.8)
    with pytest.raises(ConfigError):
        GradualSchedule(final_sparsity=0.8, begin_step=5, end_step=5)


def test_gradual_pruning_reaches_target_and_keeps_accuracy(helpers, digits, trained_cnn):
    xtr, ytr, xte, yte = digits
    m = copy.deepcopy(trained_cnn)
    base = helpers.acc(m, xte, yte)
    steps_per_epoch = -(-len(ytr) // 32)
    sched = GradualSchedule(final_sparsity=0.9, begin_step=0, end_step=4 * steps_per_epoch, frequency=20)
    pruner = GradualPruner(m, sched, exclude=["conv1"])
    masked_finetune(m, torch.from_numpy(xtr), torch.from_numpy(ytr), epochs=6, lr=0.01, seed=1, pruner=pruner)
    assert sparsity_of(m, exclude=["conv1"]) == pytest.approx(0.9, abs=1e-3)
    assert PruneResult(pruner.masks).sparsity == pytest.approx(0.9, abs=1e-3)
    assert helpers.acc(m, xte, yte) >= base - 0.03


def test_masked_finetune_holds_masks(helpers, digits, trained_cnn):
    xtr, ytr = torch.from_numpy(digits[0]), torch.from_numpy(digits[1])
    m = copy.deepcopy(trained_cnn)
    res = magnitude_prune(m, 0.7, exclude=["conv1"])
    masked_finetune(m, xtr, ytr, epochs=1, lr=0.05, seed=0, masks=res.masks)
    for name, mask in res.masks.items():
        assert not dict(m.named_modules())[name].weight[~mask].any()
    assert not torch.equal(m.fc1.weight, trained_cnn.fc1.weight)  # the kept weights did train
    with pytest.raises(ConfigError):
        masked_finetune(m, xtr, ytr, epochs=1, lr=0.0, seed=0)


def test_channel_prune_shrinks_shapes_and_fixes_consumers(helpers, trained_cnn, digits):
    x = torch.from_numpy(digits[2][:4])
    res = channel_prune(trained_cnn, 0.5, example_input=x)
    m = res.model
    assert m.conv1.weight.shape == (4, 1, 3, 3)
    assert m.conv2.weight.shape == (8, 4, 3, 3)
    assert m.fc1.weight.shape == (32, 8 * 4 * 4)  # flatten: each kept channel brings its 4×4 block
    assert m.fc2.weight.shape == (10, 32)
    assert "fc2" in res.skipped  # feeds the model output
    assert res.params_after < 0.3 * res.params_before
    assert m(x).shape == (4, 10)
    # the kept channels carry exactly the original computation for conv1 → conv2 input columns
    keep = res.kept["conv1"]
    assert torch.equal(m.conv1.weight, trained_cnn.conv1.weight[keep])
    assert torch.equal(m.conv2.weight, trained_cnn.conv2.weight[res.kept["conv2"]][:, keep])
    assert trained_cnn.conv1.weight.shape == (8, 1, 3, 3)  # the source model is untouched


def test_channel_prune_batchnorm_and_residual():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.bn(self.a(x)))
            return self.c(self.b(h) + h)  # residual: a and b must keep their width

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    res = channel_prune(net, 0.5, example_input=x)
    assert "a" in res.skipped and "b" in res.skipped
    assert res.model(x).shape == (2, 4, 6, 6)

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(torch.relu(self.bn(self.a(x))))

    chain = Chain()
    chain.bn.running_mean.uniform_(-1, 1)
    chain.eval()
    res = channel_prune(chain, 0.25, example_input=x)
    assert res.model.bn.num_features == 6 and res.model.bn.running_mean.shape == (6,)
    keep = res.kept["a"]
    assert torch.equal(res.model.bn.running_mean, chain.bn.running_mean[keep])
    # dropping channels only removes their contribution: output = full output minus dropped channels' terms
    full = chain.c.weight[:, keep]
    assert torch.equal(res.model.c.weight, full)


def test_sequential_wanda_prunes_in_forward_order_and_is_no_worse():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    scale = torch.ones(32)
    scale[::8] = 10.0
    calib = [torch.randn(128, 32, generator=g) * scale for _ in range(2)]
    test = torch.randn(256, 32, generator=g) * scale
    ref = net(test).detach()
    errs = {}
    for seq in (False, True):
        m = copy.deepcopy(net)
        res = wanda_prune(m, calib, n=2, m=4, sequential=seq)
        assert res.sparsity == pytest.approx(0.5)
        errs[seq] = float(((m(test).detach() - ref) ** 2).mean())
    assert errs[True] <= errs[False] * 1.05
    with pytest.raises(ConfigError, match="not both"):
        wanda_prune(copy.deepcopy(net), calib, sparsity=0.5, n=2, m=4)


def _identity_conv_columns(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """What a Conv2d's weight rows multiply, from the layer's own forward: a copy whose filters are the identity
    over the ``in·kh·kw`` inputs outputs exactly those inputs at every position (its own padding mode included)."""
    eye = copy.deepcopy(layer).double()
    k = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    eye.out_channels, eye.bias = k, None
    eye.weight = nn.Parameter(torch.eye(k, dtype=torch.float64).reshape(k, *layer.weight.shape[1:]))
    with torch.no_grad():
        out = eye(x.double())  # (B, k, H', W')
    return out.permute(0, 2, 3, 1).reshape(-1, k)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=4, padding="same", dilation=2),  # even kernel: torch pads one more on the right
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular"),
        dict(kernel_size=3, padding="valid", stride=2),
    ],
)
def test_wanda_and_sparsegpt_see_the_conv_inputs_the_layer_multiplies(conv):
    # Wanda's and SparseGPT's im2col ignored padding strings ('same' raised a raw TypeError from unfold) and the
    # padding mode (reflect/circular layers were scored on zero padding they never see)
    from deltaplane.deploy.sparsegpt import input_hessian

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, **conv), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(3))
    x = torch.randn(5, 2, 9, 9)
    net(x)  # materialise the lazy head
    cols = _identity_conv_columns(net[0], x)
    scores = wanda_scores(net, [x], include=["0"])["0"]
    w = net[0].weight.detach().abs().reshape(4, -1).double()
    torch.testing.assert_close(
        scores.reshape(4, -1).double(), w * cols.pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-6
    )
    h = input_hessian(net, "0", [x])
    torch.testing.assert_close(h, 2 * cols.T @ cols / len(cols), rtol=1e-9, atol=1e-9)
    assert sparsegpt_prune(copy.deepcopy(net), [x], sparsity=0.5).sparsity > 0.4
    assert wanda_prune(copy.deepcopy(net), [x], sparsity=0.5).sparsity > 0.4


def test_calibration_batches_that_do_not_fit_the_model_are_a_config_error():
    # flat (N, 64) batches for a CNN crashed inside the pruners' hooks with raw IndexError / NotImplementedError
    from deltaplane.deploy.smoothquant import smooth_layernorm_inputs

    def cnn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))

    flat = [torch.randn(4, 64)]
    for prune in (
        lambda m: wanda_prune(m, flat, sparsity=0.5),
        lambda m: wanda_prune(m, flat, sparsity=0.5, sequential=True),
        lambda m: sparsegpt_prune(m, flat, n=2, m=4),
        lambda m: smooth_layernorm_inputs(m, flat),
    ):
        with pytest.raises(ConfigError, match=r"calibration batch 0 \(\(4, 64\)\) does not fit Sequential"):
            prune(cnn())
    with pytest.raises(
        UnsupportedLayer, match="grouped conv"
    ):  # deltaplane's own errors pass through as they are
        wanda_prune(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), [torch.randn(1, 2, 5, 5)], sparsity=0.5)


@pytest.mark.parametrize("tokens", [5, 6])  # 6 == the Linear's 6 channels: shapes fit, the function did not
def test_channel_prune_never_changes_what_kept_channels_compute(tokens):
    # a Linear on (B, T, C) flattened into a Linear: the consumer lost the columns of whole *tokens* (as if
    # channels were dim 1), an IndexError when T != C and a silently different model when T == C
    class TokenMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(tokens * 6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flatten(torch.relu(self.a(x)), 1))

    class ConvNet(nn.Module):  # channels on dim 1: flatten's per-channel blocks are pruned
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6 * 16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flatten(torch.relu(self.a(x)), 1))

    torch.manual_seed(0)
    for model, x in ((TokenMLP(), torch.randn(3, tokens, 4)), (ConvNet(), torch.randn(3, 1, 4, 4))):
        r = channel_prune(model, 0.5, example_input=x)
        # independent reference: the original model with the removed channels zeroed computes the same thing
        ref = copy.deepcopy(model)
        dropped = torch.ones(6, dtype=torch.bool)
        dropped[r.kept.get("a", torch.arange(6))] = False
        with torch.no_grad():
            ref.a.weight[dropped] = 0
            ref.a.bias[dropped] = 0
            torch.testing.assert_close(r.model(x), ref(x))
        assert ("a" in r.kept) == isinstance(model, ConvNet), r.skipped
