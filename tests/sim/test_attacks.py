import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.sim.attacks import (
    Backdoor,
    GaussianNoise,
    SignFlip,
    add_trigger,
    choose_malicious,
    parse_attack,
)


def test_parse_specs() -> None:
    atk, frac = parse_attack("backdoor:0.2")
    assert isinstance(atk, Backdoor) and frac == 0.2 and atk.boost == 1.0
    atk, frac = parse_attack("backdoor:0.1:boost=5,target=3")
    assert atk.boost == 5 and atk.target == 3 and frac == 0.1
    assert isinstance(parse_attack("sign_flip:0.3")[0], SignFlip)
    for bad, match in [("nope:0.1", "unknown attack"), ("sign_flip", "needs a malicious fraction"),
                       ("sign_flip:1.5", r"in \(0, 1\)"), ("backdoor:0.2:color=1", "unexpected keyword")]:  # fmt: skip
        with pytest.raises(dp.ConfigError, match=match):
            parse_attack(bad)


def test_update_attacks() -> None:
    g = torch.Generator().manual_seed(0)
    d = dp.Delta({"w": torch.ones(10_000)})
    assert SignFlip(scale=2.0).poison_update(d, g)["w"].unique().tolist() == [-2.0]
    noise = GaussianNoise(std=0.5).poison_update(d, g)["w"]
    assert noise.std().item() == pytest.approx(0.5, rel=0.03)
    assert parse_attack("model_replacement:0.1:boost=8")[0].poison_update(d, g)["w"][0].item() == 8.0


def test_backdoor_and_label_flip_poison_data() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.zeros(10, 1, 8, 8), torch.arange(10)
    px, py = Backdoor(target=7, poison_fraction=0.3).poison_data(x, y, g)
    stamped = (px[:, 0, 5:7, 5:7] == 1.0).all(dim=(1, 2))
    assert stamped.sum() == 3 and (py[stamped] == 7).all() and torch.equal(py[~stamped], y[~stamped])
    assert add_trigger(x)[0, 0].sum().item() == 4.0 and x.sum() == 0  # input untouched
    assert parse_attack("label_flip:0.1")[0].poison_data(x, y, g)[1].tolist() == list(range(9, -1, -1))
    assert len(choose_malicious(100, 0.2, np.random.default_rng(0))) == 20
