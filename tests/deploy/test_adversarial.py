"""FGSM/PGD against closed forms and invariants; the adversarial gate blocks a level that is easier to attack."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deltaplane.deploy import save_checkpoint, torch_predictor
from deltaplane.deploy.adversarial import adversarial_eval, fgsm, pgd, token_adversarial_eval
from deltaplane.errors import ConfigError


def test_fgsm_matches_the_softmax_regression_gradient_in_closed_form():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x, y = torch.rand(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    logits = x.numpy() @ W.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y.numpy()]) @ W  # d CE / dx for softmax regression (up to the 1/N of the mean)
    want = np.clip(x.numpy() + 0.1 * np.sign(grad), 0, 1)
    assert np.allclose(fgsm(lin, x, y, 0.1).numpy(), want, atol=1e-6)


def _float64_fgsm(model, x, y, eps):
    """An independent FGSM: the summed cross-entropy in float64, its input gradient's sign, one step."""
    x = x.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x).double(), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def test_fgsm_and_pgd_are_not_masked_by_a_saturated_softmax(trained_cnn, digits):
    """The same classifier with its logits ×100 (every decision unchanged) is as easy to attack: its softmax
    rounds to one-hot in float32 and the plain gradient to 0, which left inputs unperturbed (98.7% "robust")."""
    import copy

    _, _, xte, yte = digits
    x, y = torch.from_numpy(xte[:200]), torch.from_numpy(yte[:200])
    hot = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        hot.fc2.weight.mul_(100)
        hot.fc2.bias.mul_(100)
        assert torch.equal(hot(x).argmax(1), trained_cnn(x).argmax(1))
    acc = lambda m, a: float((m(a).argmax(1) == y).float().mean())  # noqa: E731
    clean = acc(trained_cnn, x)
    # the unscaled model: exactly the float64 reference's adversarial inputs
    assert torch.equal(fgsm(trained_cnn, x, y, 0.1), _float64_fgsm(trained_cnn, x, y, 0.1))
    for attack in (fgsm, pgd):
        plain, scaled = acc(trained_cnn, attack(trained_cnn, x, y, 0.1)), acc(hot, attack(hot, x, y, 0.1))
        assert scaled < clean - 0.3, (attack.__name__, clean, scaled)
        assert abs(scaled - plain) < 0.05, (attack.__name__, plain, scaled)
    res = adversarial_eval(trained_cnn, hot, torch_predictor(hot), xte[:200], yte[:200], eps=(0.1,))
    assert all(abs(r["drop_points"]) < 5 for r in res["rows"]), res["rows"]  # was −40: "more robust"


class _Rounded(nn.Module):
    """The trained CNN behind a rounding of its input to the digits' 1/16 grid: as easy to fool, but its input
    gradient is exactly zero everywhere."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 16) / 16)


def test_a_model_without_input_gradients_is_not_reported_robust(tmp_path, trained_cnn, digits):
    """FGSM left every input unchanged and reported 99.5% adversarial accuracy at ε = 0.1 (the clean one) for a
    model that FGSM / PGD crafted on the unrounded CNN (BPDA) take to 35% / 22%: refused as unattackable, naming the way out, and nothing written."""
    from deltaplane.deploy import deploy_classifier
    from deltaplane.errors import UnsupportedLayer

    xtr, _, xte, yte = digits
    model = _Rounded(trained_cnn).eval()
    with pytest.raises(UnsupportedLayer, match=r"exactly zero on 397 of 397 .*--attack-eps 0"):
        adversarial_eval(model, model, torch_predictor(model), xte, yte, eps=(0.1,))
    with pytest.raises(UnsupportedLayer, match="cannot attack the compressed model"):
        adversarial_eval(trained_cnn, model, torch_predictor(model), xte, yte, eps=(0.1,))
    kw = {"x_test": xte, "y_test": yte, "x_calib": xtr[:16], "quant": "none", "latency_iters": 2}
    with pytest.raises(UnsupportedLayer):
        deploy_classifier(model, tmp_path / "o", adversarial_eps=(0.05,), device_cost=False, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("eps", [float("nan"), float("inf")])
def test_non_finite_eps_is_refused(trained_cnn, digits, eps):
    """A NaN ε made every input NaN (a constant argmax) and reported a drop of 0; inf likewise measured nothing."""
    _, _, xte, yte = digits
    with pytest.raises(ConfigError, match="finite positive"):
        adversarial_eval(
            trained_cnn, trained_cnn, torch_predictor(trained_cnn), xte[:10], yte[:10], eps=(eps,)
        )


def test_pgd_stays_in_the_ball_and_beats_fgsm(trained_cnn, digits):
    _, _, xte, yte = digits
    x, y = torch.from_numpy(xte[:200]), torch.from_numpy(yte[:200])
    adv = pgd(trained_cnn, x, y, 0.1, steps=10, seed=1)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    acc = lambda a: float((trained_cnn(a).argmax(1) == y).float().mean())  # noqa: E731
    with torch.no_grad():
        clean, a_pgd = acc(x), acc(adv)
    a_fgsm = acc(fgsm(trained_cnn, x, y, 0.1).detach())
    assert a_pgd < a_fgsm < clean
    assert torch.equal(adv, pgd(trained_cnn, x, y, 0.1, steps=10, seed=1))  # seeded
    with pytest.raises(ConfigError):
        pgd(trained_cnn, x, y, 0.1, steps=0)


def test_same_model_has_zero_adversarial_drop(trained_cnn, digits):
    _, _, xte, yte = digits
    res = adversarial_eval(
        trained_cnn, trained_cnn, torch_predictor(trained_cnn), xte[:100], yte[:100], eps=(0.05,)
    )
    assert [r["drop_points"] for r in res["rows"]] == [0.0, 0.0]
    assert set(res["quality"]["adversarial_drop_points"]) == {"fgsm ε=0.05", "pgd ε=0.05"}
    with pytest.raises(ConfigError):
        adversarial_eval(trained_cnn, trained_cnn, torch_predictor(trained_cnn), xte, yte, eps=(-1,))


def test_cli_adversarial_gate_blocks_a_level(app, tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    ckpt = save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})
    base = ["deploy", str(ckpt), "--prune", "0.97", "--finetune-epochs", "0", "--attack-eps", "0.05"]
    loose = ["--max-accuracy-drop", "100", "--max-ood-drop", "100", "--max-disagreement", "100"]
    r = CliRunner().invoke(app, [*base, *loose, "--max-adv-drop", "100", "-o", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    drop = m["quality"]["adversarial_drop_points"]["fgsm ε=0.05"]
    assert drop > 1.0 and "## Adversarial robustness" in (tmp_path / "ok" / "MODEL_CARD.md").read_text()
    r = CliRunner().invoke(app, [*base, *loose, "--max-adv-drop", "1", "-o", str(tmp_path / "no")])
    assert r.exit_code == 3 and "max-adv-drop" in r.output and not (tmp_path / "no").exists()


def test_encoder_attack_on_input_embeddings():
    from deltaplane.deploy.adversarial import encoder_adversarial_eval
    from deltaplane.deploy.tokens import random_tokens

    enc = _tiny("bert")
    toks = random_tokens(97, 8, 10, seed=3)
    res = encoder_adversarial_eval(enc, enc, toks, eps=(0.5, 2.0))
    assert res["metric"] == "cosine" and all(r["drop_points"] == 0.0 for r in res["rows"])
    pgd = {r["eps"]: r["fp32"] for r in res["rows"] if r["attack"] == "pgd"}
    assert pgd[2.0] < pgd[0.5] < 1.0  # a larger budget moves the embedding further
    with pytest.raises(ConfigError, match="text-classification and next-token"):
        token_adversarial_eval(enc, enc, toks, task="sentence-embedding")


def _tiny(kind: str, num_labels: int = 3):
    """A small seeded Hugging Face model from a config: ``gpt2``, ``bert`` (an encoder) or a BERT classifier."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    bert = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**bert), add_pooling_layer=False).eval()
    cfg = transformers.BertConfig(**bert, num_labels=num_labels, initializer_range=0.5)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_decoder_attack_raises_the_next_token_loss_from_hugging_faces_own():
    from deltaplane.deploy.tokens import random_tokens

    lm = _tiny("gpt2")
    toks = random_tokens(97, 6, 12, seed=4)
    ids = torch.from_numpy(toks[:, 0])
    with torch.no_grad():  # Hugging Face's own shifted next-token loss and accuracy on the clean inputs
        out = lm(input_ids=ids, labels=ids)
        clean_acc = float((out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean())
    res = token_adversarial_eval(lm, lm, toks, task="next-token", eps=(1e-6, 1.0))
    assert all(r["drop_points"] == 0.0 for r in res["rows"])  # same model: no gap
    tiny = {r["attack"]: r for r in res["rows"] if r["eps"] == 1e-6}
    big = {r["attack"]: r for r in res["rows"] if r["eps"] == 1.0}
    assert tiny["pgd"]["fp32_loss"] == pytest.approx(float(out.loss), rel=1e-3)
    assert tiny["fgsm"]["fp32"] == pytest.approx(clean_acc)
    assert big["pgd"]["fp32_loss"] > float(out.loss) + 0.1 and big["fgsm"]["fp32_loss"] > float(out.loss)


def test_sequence_classifier_attack_targets_fp32s_clean_class():
    from deltaplane.deploy.tokens import random_tokens

    clf = _tiny("bert-cls")
    toks = random_tokens(97, 16, 10, seed=5)
    res = token_adversarial_eval(clf, clf, toks, task="text-classification", eps=(1e-6, 0.5, 2.0))
    pgd = {r["eps"]: r["fp32"] for r in res["rows"] if r["attack"] == "pgd"}
    assert pgd[1e-6] == 1.0  # a negligible budget keeps every clean prediction
    assert pgd[0.5] < 1.0 and pgd[2.0] < 1.0  # a real budget flips some of them


def test_cli_gates_a_pruned_decoder_on_adversarial_next_token_accuracy(app, tmp_path):
    lm = _tiny("gpt2")
    lm.save_pretrained(tmp_path / "lm")
    base = ["deploy", str(tmp_path / "lm"), "--random-tokens", "--prune", "0.9", "--quant", "none"]
    base += ["--attack-eps", "0.5", "--max-accuracy-drop", "100"]
    r = CliRunner().invoke(app, [*base, "--max-adv-drop", "100", "-o", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    rows = m["adversarial"]["rows"]
    assert {r["attack"] for r in rows} == {"fgsm", "pgd"} and all("compressed_loss" in r for r in rows)
    assert "next-token accuracy" in m["adversarial"]["method"]
    card = (tmp_path / "ok" / "MODEL_CARD.md").read_text()
    assert "## Adversarial robustness" in card and "(loss " in card
    worst = max(m["quality"]["adversarial_drop_points"].values())
    limit = worst - 0.5  # just under what was measured: the same deploy must now be refused
    r = CliRunner().invoke(app, [*base, "--max-adv-drop", f"{limit}", "-o", str(tmp_path / "no")])
    assert r.exit_code == 3 and "max-adv-drop" in r.output and not (tmp_path / "no").exists()


def _scaled(model, module, factor: float):
    """``model`` with ``module``'s weight and bias ×``factor``: the same decisions, ×``factor`` logits."""
    import copy

    hot = copy.deepcopy(model)
    with torch.no_grad():
        target = hot
        for name in module:
            target = getattr(target, name)
        target.weight.mul_(factor)
        target.bias.mul_(factor)
    return hot


def test_sequence_classifier_attack_does_not_depend_on_the_logits_scale():
    """Two classes: the input gradient of the cross-entropy is a positive multiple of ∇(z_other − z_y) whatever
    the logits' scale, so ×100 logits (margins up to ~750) must be attacked exactly as the model itself. Before,
    their float32 softmax rounded to one-hot, the gradient to 0, and FGSM left 100% of fp32's classes (78% at
    scale 1) — the confident model looked robust."""
    from deltaplane.deploy.tokens import random_tokens

    clf = _tiny("bert-cls", num_labels=2)
    hot = _scaled(clf, ("classifier",), 100.0)
    toks = random_tokens(97, 32, 10, seed=5)
    plain = token_adversarial_eval(clf, clf, toks, task="text-classification", eps=(0.5, 1.0))["rows"]
    scaled = token_adversarial_eval(hot, hot, toks, task="text-classification", eps=(0.5, 1.0))["rows"]
    assert [r["fp32"] for r in scaled] == [r["fp32"] for r in plain]
    assert all(r["fp32"] < 0.9 for r in scaled)


def test_decoder_attack_is_not_masked_by_a_confident_next_token_softmax():
    """A decoder scored on its own greedy continuation (every target its argmax) with ×1e5 logits: the plain
    float32 cross-entropy's gradient is 0 at every position, so FGSM kept next-token accuracy at 100% (86% now)
    and PGD moved only by its random start. The gradient is rescaled per sequence, not per position (which would
    reweight a sequence's sum)."""
    lm = _tiny("gpt2")
    start = torch.arange(8).view(8, 1) * 11 % 97
    with torch.no_grad():
        ids = lm.generate(
            start, attention_mask=torch.ones_like(start), max_new_tokens=9, do_sample=False, pad_token_id=0
        )
    toks = np.stack([ids.numpy(), np.ones_like(ids.numpy())], 1)
    hot = _scaled(lm, ("transformer", "ln_f"), 1e5)
    rows = token_adversarial_eval(hot, hot, toks, task="next-token", eps=(1e-6, 1.0))["rows"]
    acc = {(r["attack"], r["eps"]): r["fp32"] for r in rows}
    assert acc["fgsm", 1e-6] == 1.0  # every target is the clean prediction
    assert acc["fgsm", 1.0] < 0.9 and acc["pgd", 1.0] < 0.7, acc  # were 1.0 and 0.72 (the random start only)


def test_encoder_fgsm_is_an_attack_not_the_sign_of_rounding_noise():
    """At δ = 0 the cosine to the clean fp32 embedding is at its maximum: fp32's gradient there is rounding noise
    (‖∇‖ ~7e-7 against ~4e-2 at δ = ε/2, a larger BERT), and plain FGSM stepped along its sign — the float32 and
    float64 copies of one model moved in different directions (1 − cos 0.019 vs 0.013), 2.5× a random sign's.
    R+FGSM steps along a real gradient: the same in both precisions (0.028), 3.6× the largest of 5 random signs."""
    import copy

    from deltaplane.deploy.adversarial import _embed_forward, _input_embeddings, encoder_adversarial_eval
    from deltaplane.deploy.tokens import random_tokens

    enc = _tiny("bert")
    toks = random_tokens(97, 8, 10, seed=3)
    f32 = encoder_adversarial_eval(enc, enc, toks, eps=(0.5, 1.0), attacks=("fgsm",))["rows"]
    e64 = copy.deepcopy(enc).double()
    f64 = encoder_adversarial_eval(e64, e64, toks, eps=(0.5, 1.0), attacks=("fgsm",))["rows"]
    for a, b in zip(f32, f64, strict=True):
        assert 1 - a["fp32"] == pytest.approx(1 - b["fp32"], rel=1e-3)
    ids, mask = torch.from_numpy(toks[:, 0]), torch.from_numpy(toks[:, 1])
    with torch.no_grad():
        x, scale = _input_embeddings(enc)(ids), float(_input_embeddings(enc).weight.std())
        clean = _embed_forward(enc, x, mask)
        for row in f32:
            signs = [
                (torch.rand(x.shape, generator=torch.Generator().manual_seed(k)) * 2 - 1).sign()
                for k in range(5)
            ]
            rand = [
                1 - float((_embed_forward(enc, x + row["eps"] * scale * s, mask) * clean).sum(-1).mean())
                for s in signs
            ]
            assert 1 - row["fp32"] > 3 * max(rand), (row, rand)


def _rounded_embeddings(model, grid: float = 4.0):
    """``model`` with its embedding layer's output (input embeddings + positions, after LayerNorm) rounded to a
    1/``grid`` grid: a quantizer without a straight-through estimator on the path the text attacks take."""
    import copy

    rounded = copy.deepcopy(model)
    rounded.base_model.embeddings.register_forward_hook(lambda _m, _i, out: torch.round(out * grid) / grid)
    return rounded


@pytest.mark.parametrize("kind", ["bert", "bert-cls"])
def test_a_text_model_without_embedding_gradients_is_not_reported_robust(kind):
    """A BERT whose embedding output is rounded has an input-embedding gradient of exactly 0: FGSM left every
    embedding where it was and the classifier kept 100% of its classes at ε = 0.5 (25% unrounded; PGD 87.5%,
    its random start only, against 12.5%), so it read as robust. Refused as the image models are, naming the
    way out, whichever side (fp32 or compressed) is rounded."""
    from deltaplane.deploy.adversarial import encoder_adversarial_eval
    from deltaplane.deploy.tokens import random_tokens
    from deltaplane.errors import UnsupportedLayer

    model = _tiny(kind)
    rounded = _rounded_embeddings(model)
    toks = random_tokens(97, 8, 10, seed=5)
    if kind == "bert":
        run = lambda ref, cmp: encoder_adversarial_eval(ref, cmp, toks, eps=(0.5,))  # noqa: E731
    else:
        run = lambda ref, cmp: token_adversarial_eval(ref, cmp, toks, task="text-classification", eps=(0.5,))  # noqa: E731
    with pytest.raises(UnsupportedLayer, match=r"fp32 model: .*exactly zero on 8 of 8 .*--attack-eps 0"):
        run(rounded, rounded)
    with pytest.raises(UnsupportedLayer, match="cannot attack the compressed model"):
        run(model, rounded)
    run(model, model)  # the same model unrounded is attacked
