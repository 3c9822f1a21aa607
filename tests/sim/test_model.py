import torch

from deltaplane.data import Dataset
from deltaplane.sim import DigitsCNN, accuracy, build_model


def test_param_count_and_state_dict_names() -> None:
    model = DigitsCNN()
    assert sum(p.numel() for p in model.parameters()) == 18_346
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (8, 1, 3, 3),
        "conv1.bias": (8,),
        "conv2.weight": (16, 8, 3, 3),
        "conv2.bias": (16,),
        "fc1.weight": (64, 256),
        "fc1.bias": (64,),
        "fc2.weight": (10, 64),
        "fc2.bias": (10,),
    }
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_model(7), build_model(7), build_model(8)
    assert torch.rand(1).item() == expected_next.item()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_accuracy() -> None:
    model = DigitsCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.fc2.bias[3] = 1.0  # always predicts class 3
    data = Dataset(torch.zeros(4, 1, 8, 8), torch.tensor([3, 3, 1, 3]))
    assert accuracy(model, data) == 0.75
    assert accuracy(model, Dataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))) == 0.0


def test_scoring_logits_are_the_plain_models_whatever_the_batch_size() -> None:
    """``logits`` cuts a scoring batch into up to four stacked copies (the last padded with zero samples):
    every sample's logits are still the plain model's, none dropped or shifted, for sizes that divide
    evenly, that need padding, and that are too small to cut."""
    from deltaplane.data.digits import load_digits
    from deltaplane.engine.metrics import logits

    model = build_model(3)
    x = load_digits().x
    for n in (0, 1, 15, 16, 33, 64, 101, 359):
        got = logits(model, x[:n])
        with torch.no_grad():
            want = model(x[:n])
        assert got.shape == (n, 10)
        assert torch.allclose(got, want, rtol=0, atol=1e-5), n
        assert torch.equal(got.argmax(1), want.argmax(1)), n


def test_scoring_hands_a_models_forward_stacked_real_weight_copies() -> None:
    """A model's own ``forward_stacked`` may ``view()`` its stacked weights (the batched engine hands it real
    stacks): scoring's copies must be real tensors too, not a stride-0 ``expand()`` that cannot be viewed."""
    from deltaplane.data.digits import load_digits
    from deltaplane.data.models import DigitsCNN
    from deltaplane.engine.metrics import logits

    class Flattening(DigitsCNN):
        def forward_stacked(self, params, x):  # type: ignore[no-untyped-def]
            flat = {k: v.view(-1) for k, v in params.items()}  # as a model packing its weights might
            return super().forward_stacked({k: flat[k].view(v.shape) for k, v in params.items()}, x)

    model = Flattening()
    x = load_digits().x[:100]
    with torch.no_grad():
        assert torch.allclose(logits(model, x), model(x), rtol=0, atol=1e-5)
