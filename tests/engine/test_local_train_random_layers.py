"""Local training is a pure function of the start state and the device's generator, dropout included."""

from __future__ import annotations

import torch
from tests import random_layers as rl
from torch import nn

from deltaplane.data.dataset import Dataset
from deltaplane.engine.seeding import Stream, torch_generator
from deltaplane.engine.training import local_train


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))


def _train(model: nn.Module, start: dict, data: Dataset, client: int):
    g = torch_generator(0, Stream.LOCAL_TRAINING, 1, client)
    return local_train(model, start, data, g, epochs=2, batch_size=8, lr=0.1, momentum=0.9)


def test_dropout_masks_follow_the_devices_generator_not_the_global_one() -> None:
    """Before: dropout drew from torch's global generator, which nothing seeded per device, so the same seed
    gave another update whenever anything else had drawn from it (two runs of one federation on the MiniLM
    docstrings task, whose encoder has dropout, reached 0.369 and 0.325 after two rounds). Now the update
    depends only on the start state and the device's generator, the caller's global state is left as it
    was, and two devices still get different masks."""
    g = torch.Generator().manual_seed(5)
    data = Dataset(torch.randn(48, 16, generator=g), torch.randint(0, 4, (48,), generator=g))
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1)
    first = _train(model, start, data, client=3)
    torch.manual_seed(2)  # another global state: a process that drew other numbers before
    torch.rand(1000)
    before = torch.get_rng_state()
    again = _train(model, start, data, client=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is untouched
    for k in first:
        assert torch.equal(first[k], again[k]), k
    other = _train(model, start, data, client=4)
    assert any(not torch.equal(first[k], other[k]) for k in first)

    # without dropout nothing changes: the same update as a plain loop over the generator's batch orders
    plain = nn.Sequential(nn.Linear(16, 4))
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    got = _train(plain, start, data, client=3)
    plain.load_state_dict(start)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    g = torch_generator(0, Stream.LOCAL_TRAINING, 1, 3)
    for _ in range(2):
        order = torch.randperm(48, generator=g)
        for first_row in range(0, 48, 8):
            idx = order[first_row : first_row + 8]
            value = nn.functional.cross_entropy(plain(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    for k, v in plain.state_dict().items():
        assert torch.equal(got[k], v - start[k]), k


def test_the_same_update_in_a_fresh_process_with_another_hash_seed() -> None:
    """The masks depend on the device's generator alone, not on the process: a fresh interpreter (another
    ``PYTHONHASHSEED``, its global generator drawn from first) trains the same update, bit for bit."""
    code = (
        "from deltaplane.data.dataset import Dataset\n"
        "from deltaplane.engine.seeding import Stream, torch_generator\n"
        "from deltaplane.engine.training import local_train\n"
        "m = rl.dropout_mlp()\n"
        "g = torch_generator(0, Stream.LOCAL_TRAINING, 1, 3)\n"
        "d = local_train(m, m.state_dict(), Dataset(*rl.toy_data()), g, epochs=2, batch_size=8, lr=0.1, momentum=0.9)\n"
        "print(rl.weights_hash(d))\n"
    )
    torch.manual_seed(9)
    model = rl.dropout_mlp()
    here = _train(model, model.state_dict(), Dataset(*rl.toy_data()), client=3)
    assert rl.hash_in_fresh_process(code) == rl.weights_hash(here)
