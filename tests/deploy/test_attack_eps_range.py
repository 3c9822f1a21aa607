"""An attack ε at or beyond the width of the space it perturbs is refused, naming the valid range: an L∞ ball
that wide holds every input, so ``--attack-eps 1e9`` replaced each digit by a corner of [0, 1], recorded a
"drop" that measures nothing and counted the max-adv-drop gate as evaluated."""

import pytest
from tests.deploy.test_adversarial import _tiny
from typer.testing import CliRunner

from deltaplane.deploy import save_checkpoint, torch_predictor
from deltaplane.deploy.adversarial import (
    adversarial_eval,
    encoder_adversarial_eval,
    token_adversarial_eval,
)
from deltaplane.errors import ConfigError


@pytest.mark.parametrize("eps", [1e9, 1.0, 3.5])
def test_an_eps_as_wide_as_the_data_range_is_refused(trained_cnn, digits, eps):
    _, _, xte, yte = digits
    assert (float(xte[:50].min()), float(xte[:50].max())) == (0.0, 1.0)
    with pytest.raises(
        ConfigError, match=r"must be in \(0, 1\) of the input values \(the data range \[0, 1\]\)"
    ):
        adversarial_eval(
            trained_cnn, trained_cnn, torch_predictor(trained_cnn), xte[:50], yte[:50], eps=(0.05, eps)
        )


def test_the_range_follows_the_data_not_a_constant(trained_cnn, digits):
    """Inputs in [0, 16] (digits unscaled) take an ε of 8: the limit is the data's width."""
    _, _, xte, yte = digits
    x = xte[:20] * 16
    res = adversarial_eval(trained_cnn, trained_cnn, torch_predictor(trained_cnn), x, yte[:20], eps=(8.0,))
    assert [r["eps"] for r in res["rows"]] == [8.0, 8.0]
    with pytest.raises(ConfigError, match=r"must be in \(0, 16\)"):
        adversarial_eval(trained_cnn, trained_cnn, torch_predictor(trained_cnn), x, yte[:20], eps=(16.0,))


def test_cli_refuses_an_absurd_attack_eps_before_any_work(app, tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    ckpt = save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "--attack-eps", "1e9", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "must be in (0, 1)" in r.output and "pruning" not in r.output and not out.exists()


def test_token_models_refuse_an_eps_beyond_their_embedding_range():
    from deltaplane.deploy.adversarial import check_embedding_eps
    from deltaplane.deploy.tokens import random_tokens

    enc = _tiny("bert")
    table = enc.get_input_embeddings().weight.detach()
    limit = float((table.max() - table.min()) / table.std())
    toks = random_tokens(97, 4, 10, seed=3)
    match = rf"must be in \(0, {limit:.3g}\d*\) × the embedding table's std"
    for eps in (1e9, limit * 1.01):
        with pytest.raises(ConfigError, match=match):
            encoder_adversarial_eval(enc, enc, toks, eps=(eps,))
    lm = _tiny("gpt2")
    with pytest.raises(ConfigError, match=r"× the embedding table's std"):
        token_adversarial_eval(lm, lm, toks, task="next-token", eps=(1e9,))
    check_embedding_eps((0.05, limit * 0.99), enc)  # inside the range: accepted
