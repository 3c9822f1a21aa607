import numpy as np
import pytest
import torch

from deltaplane.codecs import decompress, get_codec
from deltaplane.data import load_digits, train_test_split
from deltaplane.sim import RunConfig, build_model, make_clients
from deltaplane.sim.seeding import Stream, torch_generator

CFG = RunConfig(clients=6, local_epochs=1, codec="topk(0.05) | quant(bits=8)")


# As run_simulation does: a tiny CNN trains fastest (and repeatably) on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    return train_test_split(load_digits())[0]


def test_clients_hold_every_train_sample_exactly_once(train) -> None:
    clients = make_clients(CFG, train)
    assert [c.cid for c in clients] == list(range(6))
    images = torch.cat([torch.cat([c.train.x, c.holdout.x]) for c in clients])
    assert len(images) == len(train)
    key = lambda x: sorted(map(tuple, x.reshape(len(x), -1).tolist()))  # noqa: E731
    assert key(images) == key(train.x)
    for c in clients:
        assert c.num_samples == len(c.train)
        assert len(c.train) + len(c.holdout) >= CFG.min_client_samples
        # held-out share is about holdout_fraction of the shard
        share = len(c.holdout) / (len(c.train) + len(c.holdout))
        assert abs(share - CFG.holdout_fraction) < 0.05


def test_each_client_has_its_own_compressor(train) -> None:
    clients = make_clients(CFG, train)
    assert len({id(c.compressor) for c in clients}) == 6
    assert len({c.compressor.seed for c in clients}) == 6
    assert all(c.compressor.codec.spec == get_codec(CFG.codec).spec for c in clients)
    assert all(c.compressor.error_feedback for c in clients)


def test_local_update_is_deterministic_and_leaves_global_state_alone(train) -> None:
    client = make_clients(CFG, train)[0]
    model = build_model(0)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = {k: v.clone() for k, v in global_state.items()}
    d1 = client.local_update(
        model, global_state, CFG, torch_generator(0, Stream.LOCAL_TRAINING, 1, 0), lr=0.1
    )
    d2 = client.local_update(
        model, global_state, CFG, torch_generator(0, Stream.LOCAL_TRAINING, 1, 0), lr=0.1
    )
    d3 = client.local_update(
        model, global_state, CFG, torch_generator(0, Stream.LOCAL_TRAINING, 2, 0), lr=0.1
    )
    assert all(torch.equal(v, snapshot[k]) for k, v in global_state.items())
    assert list(d1) == list(global_state)
    assert d1.norm() > 0
    assert d1.allclose(d2, rtol=0, atol=0)
    assert not d1.allclose(d3)


def test_training_improves_local_accuracy(train) -> None:
    client = make_clients(CFG.replace(local_epochs=20), train)[0]
    model = build_model(0)
    before = client.evaluate(model)
    state = model.state_dict()
    delta = client.local_update(
        model, state, CFG.replace(local_epochs=20), torch.Generator().manual_seed(0), lr=0.1
    )
    model.load_state_dict(delta.apply(state))
    assert client.evaluate(model) > max(before, 0.5)


def test_upload_is_a_real_payload_and_keeps_the_residual_on_the_device(train) -> None:
    client = make_clients(CFG, train)[0]
    model = build_model(0)
    state = model.state_dict()
    delta = client.local_update(model, state, CFG, torch.Generator().manual_seed(0), lr=0.1)
    payload = client.upload(delta, base_id="m", base_version=4)
    assert isinstance(payload, bytes) and len(payload) < delta.nbytes / 10
    received = decompress(payload, expect_base=("m", 4))
    residual = client.compressor.state.residual
    assert residual is not None
    assert (received + residual).allclose(delta, atol=1e-6)
    nonzero = np.count_nonzero(received.flatten().numpy())
    assert nonzero == sum(max(1, int(np.ceil(0.05 * v.numel()))) for v in delta.values())
