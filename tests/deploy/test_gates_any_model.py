"""Quality gates that refuse a broken compression, and `deploy` on any model (HF configs, user builders)."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deltaplane.deploy import load_checkpoint, register_architecture, render_model_card, save_checkpoint
from deltaplane.deploy.checkpoint import infer_task
from deltaplane.deploy.gates import Gates, ood_excess_drops
from deltaplane.deploy.profile import Evaluation, Latency, compare
from deltaplane.errors import ConfigError


def test_ood_flag_only_on_a_real_drop_beyond_the_clean_drop():
    lat = {1: Latency(1, 10.0, 12.0)}
    base = Evaluation("a", {"clean": 0.90, "noise": 0.80, "blur": 0.70, "shift": 0.50}, 0.02, lat, 1000)
    # clean gains 2 points; noise gains 1 (less than clean: not a drop), blur loses 1, shift unchanged
    cand = Evaluation("b", {"clean": 0.92, "noise": 0.81, "blur": 0.69, "shift": 0.50}, 0.02, lat, 100)
    cmp = compare(base, cand)
    assert cmp.flagged == ["blur"]
    excess = ood_excess_drops(cmp.drops)
    assert excess["noise"] == pytest.approx(-1.0) and excess["blur"] == pytest.approx(1.0)
    assert excess["shift"] == pytest.approx(0.0)
    # a clean *drop* raises the bar: blur losing 1 point while clean loses 2 is not flagged
    cand2 = Evaluation("c", {"clean": 0.88, "noise": 0.77, "blur": 0.69, "shift": 0.50}, 0.02, lat, 100)
    assert compare(base, cand2).flagged == ["noise"]


def test_gates_check_margins_and_validation():
    g = Gates(min_cosine=0.98, max_accuracy_drop=1.0, max_ood_drop=3.0, max_adv_drop=None)
    res = g.check(
        {
            "cosine_min": 0.53,
            "accuracy_drop_points": 0.5,
            "ood_excess_drop_points": {"shift": 4.2, "blur": -1.0},
        }
    )
    by = {(r.gate, r.what): r for r in res}
    cos = by[("min-cosine", "min cosine to fp32")]
    assert not cos.passed and cos.margin == pytest.approx(-0.45)
    assert "short by 0.45" in cos.describe()
    assert by[("max-accuracy-drop", "clean accuracy drop")].passed
    shift = by[("max-ood-drop", "shift drop beyond clean")]
    assert not shift.passed and shift.margin == pytest.approx(-1.2) and "over by 1.2" in shift.describe()
    assert by[("max-ood-drop", "blur drop beyond clean")].passed
    assert Gates.off().check({"cosine_min": 0.0}) == []
    with pytest.raises(ConfigError, match="min-cosine"):
        Gates(min_cosine=1.5)
    with pytest.raises(ConfigError, match="max-ood-drop"):
        Gates(max_ood_drop=-1)


def test_model_card_limitations_follow_the_numbers():
    manifest = {
        "model": "m",
        "prune": "0.8",
        "quant": "int8",
        "source_sha256": "0" * 64,
        "format": "onnx",
        "quant_scheme": "int8",
        "weight_sparsity": 0.8,
        "sizes": {"artifact_bytes": 10, "fp32_safetensors_bytes": 80, "compression_ratio": 8.0},
        "baseline": {
            "accuracy": {"clean": 0.9, "noise": 0.8, "blur": 0.7},
            "ece": 0.02,
            "latency_us": {"1": {"p50": 10.0, "p95": 11.0}},
        },
        "compressed": {
            "accuracy": {"clean": 0.91, "noise": 0.805, "blur": 0.68},
            "ece": 0.02,
            "latency_us": {"1": {"p50": 5.0, "p95": 6.0}},
        },
        "comparison": {"drops_points": {"clean": -1.0, "noise": -0.5, "blur": 2.0}, "ood_flags": ["blur"]},
    }
    card = render_model_card(manifest)
    lim = card.split("## Limitations")[1]
    assert "did not drop" in lim and "On blur inputs the compressed model loses 2.00 points" in lim
    assert "noise" not in lim  # noise gained: no limitation may claim it lost accuracy


@pytest.fixture()
def digits_ckpt(tmp_path, trained_cnn):
    from deltaplane.sim.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(trained_cnn.state_dict())
    return save_checkpoint(model, tmp_path / "ckpt", {"architecture": "DigitsCNN"})


def test_cli_gate_failure_exits_3_with_margin_and_writes_nothing(app, tmp_path, digits_ckpt):
    out = tmp_path / "out"
    args = ["deploy", str(digits_ckpt), "--prune", "0.97", "--finetune-epochs", "0", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 3, r.output
    assert "REFUSED" in r.output and "max-accuracy-drop" in r.output and "FAIL" in r.output
    assert "refused to ship:" in r.output and "over by" in r.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no artifact, no temp dir
    # the same compression ships when the operator lowers the bar explicitly
    r = CliRunner().invoke(app, [*args, "--no-gates"])
    assert r.exit_code == 0, r.output
    assert (out / "model.dpla").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["quality"]["accuracy_drop_points"] > 1.0
    assert m["gates"]["off"] and m["gates"]["passed"] is None  # nothing was checked: not "passed"


# -- any model ----------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _tiny_hf(tmp_path, kind: str, initializer_range: float = 0.02):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
            initializer_range=initializer_range,  # large weights make pruning matter, as in a trained model
        )
        model = (
            transformers.BertForSequenceClassification(cfg)
            if kind == "bert-cls"
            else transformers.BertModel(cfg, add_pooling_layer=False)
        )
    model.save_pretrained(tmp_path / kind)  # HF layout: config.json (architectures, model_type) + safetensors
    return tmp_path / kind, model


@pytest.mark.parametrize(
    ("kind", "task", "row"),
    [
        ("bert", "sentence-embedding", "cosine to fp32"),
        ("bert-cls", "text-classification", "top-1 agreement"),
        ("gpt2", "next-token", "KL(fp32"),
    ],
)
def test_cli_deploys_hf_architectures_built_from_config(app, tmp_path, kind, task, row):
    folder, model = _tiny_hf(tmp_path, kind)
    ck = load_checkpoint(folder)
    assert infer_task(ck) == task and type(ck.model).__name__ == type(model).__name__
    for k, v in model.state_dict().items():  # strict load, tied LM head included
        assert torch.equal(ck.model.state_dict()[k], v), k
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(folder), "--quant", "int8", "--random-tokens", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert row in r.output and "exporting ONNX" in r.output  # progress per stage
    assert "WARNING:root" not in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == task and m["sizes"]["compression_ratio"] > 1.5 and m["gates"]["passed"]
    assert (
        "random token" in (out / "MODEL_CARD.md").read_text()
    )  # no tokenizer: the card says what was measured
    import onnxruntime as ort

    s = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    got = s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    with torch.no_grad():
        o = model.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(1, 5, dtype=torch.long))
    want = o.logits if hasattr(o, "logits") else o.last_hidden_state.mean(1)
    if task == "sentence-embedding":
        want = torch.nn.functional.normalize(want, dim=-1)
    # int8 weights: close to fp32, not equal
    assert np.abs(got - want.numpy()).max() < 0.2 * np.abs(want.numpy()).max() + 0.05


def _word_tokenizer(folder, words: list[str]) -> None:
    """A word-level tokenizer over ``words`` (plus [PAD], [UNK]), built and saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(folder))


def test_token_model_without_tokenizer_is_refused_unless_given_one(app, tmp_path):
    from deltaplane.deploy.sentences import EVAL_SENTENCES

    folder, _ = _tiny_hf(tmp_path, "bert-cls")  # vocab 97, no tokenizer files
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(folder), "--attack-eps", "0", "-o", str(out)])
    assert r.exit_code == 2 and "--tokenizer" in r.output and "--random-tokens" in r.output, r.output
    assert not out.exists()  # refused before anything ran
    words = sorted({w for s in EVAL_SENTENCES for w in s.replace(".", " ").replace("?", " ").split()})
    _word_tokenizer(tmp_path / "tok", words[:95])  # 97 tokens: this model's vocabulary
    r = CliRunner().invoke(
        app,
        # a random-init classifier's logits are near-ties: int8 may flip 1 of the 32 sentences (3.1 points)
        # depending on the CPU's int8 kernels, so the accuracy bar is the tokenizer test's, not a shipping one
        ["deploy", str(folder), "--tokenizer", str(tmp_path / "tok"), "--attack-eps", "0",
         "--max-accuracy-drop", "10", "-o", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["fidelity"]["inputs"] == len(EVAL_SENTENCES) and "inputs_note" not in m
    card = (out / "MODEL_CARD.md").read_text()
    assert "held-out English sentences" in card and "random token" not in card
    _word_tokenizer(tmp_path / "big", words[:150])  # ids past the embedding table: another model's tokenizer
    r = CliRunner().invoke(
        app, ["deploy", str(folder), "--tokenizer", str(tmp_path / "big"), "-o", str(tmp_path / "o2")]
    )
    assert r.exit_code == 2 and "vocab_size 97" in r.output, r.output


@pytest.mark.parametrize("fifo", ["tokenizer.json", "vocab.txt", "sentences"])
def test_a_fifo_among_the_tokenizer_files_or_sentences_is_refused_not_waited_on(app, tmp_path, fifo):
    """AutoTokenizer.from_pretrained opened the --tokenizer folder's files itself and `--sentences` was read
    whole with read_text: a FIFO there blocked deploy for good (and a multi-GiB file was read into memory)."""
    from tests.test_textfile import _returns

    folder, _ = _tiny_hf(tmp_path, "bert-cls")
    _word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(95)])
    args = ["deploy", str(folder), "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "out")]
    if fifo == "sentences":
        os.mkfifo(tmp_path / "s.txt")
        args += ["--sentences", str(tmp_path / "s.txt")]
    else:
        (tmp_path / "tok" / fifo).unlink(missing_ok=True)
        os.mkfifo(tmp_path / "tok" / fifo)
    results: list = []
    assert _returns(lambda: results.append(CliRunner().invoke(app, args))) is None
    (r,) = results
    assert r.exit_code == 2 and "must be a regular file, not a FIFO" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()


USER_MODULE = textwrap.dedent(
    """
    from torch import nn

    class MyMLP(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.fc1 = nn.Linear(64, hidden)
            self.fc2 = nn.Linear(hidden, 10)

        def forward(self, x):
            return self.fc2(nn.functional.relu(self.fc1(x)))

    def build(config):
        return MyMLP(config["hidden"])
    """
)


def test_cli_deploys_a_user_defined_model_by_builder(app, tmp_path, monkeypatch, digits):
    (tmp_path / "my_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models

    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    net = my_models.MyMLP(32)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, y = torch.from_numpy(xtr.reshape(-1, 64)), torch.from_numpy(ytr)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    ckpt = save_checkpoint(
        net, tmp_path / "mlp", {"architecture": "MyMLP", "hidden": 32, "input_shape": [64]}
    )
    r = CliRunner().invoke(app, ["deploy", str(ckpt), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown architecture 'MyMLP'" in r.output and "--builder" in r.output
    for spec in ("my_models:build", f"{tmp_path / 'my_models.py'}:build"):
        out = tmp_path / f"out{len(spec)}"
        r = CliRunner().invoke(
            app,
            [
                "deploy",
                str(ckpt),
                "--builder",
                spec,
                "--prune",
                "2:4",
                "--finetune-epochs",
                "3",
                "--attack-eps",
                "0.02",
                "--max-ood-drop",  # an MLP on [64] gets the digits' OOD splits too; 2:4 costs it ~13 on rotation
                "20",
                "-o",
                str(out),
            ],
        )
        assert r.exit_code == 0, r.output
        m = json.loads((out / "manifest.json").read_text())
        assert set(m["quality"]["ood_excess_drop_points"]) == {"noise", "rotation", "blur", "shift"}
        assert m["weight_sparsity"] == pytest.approx(0.5) and m["baseline"]["accuracy"]["clean"] > 0.85
    r = CliRunner().invoke(
        app, ["deploy", str(ckpt), "--builder", "my_models:nope", "-o", str(tmp_path / "y")]
    )
    assert r.exit_code == 2 and "no callable 'nope'" in r.output
    sys.modules.pop("my_models", None)


def test_entry_point_architecture(tmp_path, monkeypatch):
    """An installed package can register an architecture under the `deltaplane.architectures` group."""
    (tmp_path / "ep_models.py").write_text(USER_MODULE)
    dist = tmp_path / "ep_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deltaplane.architectures]\nEpMLP = ep_models:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import ep_models

    net = ep_models.MyMLP(8)
    ckpt = save_checkpoint(net, tmp_path / "ep", {"architecture": "EpMLP", "hidden": 8})
    ck = load_checkpoint(ckpt)
    assert type(ck.model).__name__ == "MyMLP" and infer_task(ck) == "classification"
    assert torch.equal(ck.model.fc1.weight, net.fc1.weight)
    register_architecture("EpMLP", ep_models.build)  # the registry wins over entry points; same result
    assert torch.equal(load_checkpoint(ckpt).model.fc2.bias, net.fc2.bias)
    sys.modules.pop("ep_models", None)


def test_pruned_encoder_below_min_cosine_is_refused(tmp_path):
    """The library raises QualityGateFailed (with the manifest) and publishes nothing — the 2:4 MiniLM case."""
    from deltaplane.deploy.tokens import deploy_token_model, random_tokens
    from deltaplane.errors import QualityGateFailed

    folder, _ = _tiny_hf(tmp_path, "bert", initializer_range=0.5)
    ck = load_checkpoint(folder)
    kw = dict(
        task="sentence-embedding",
        eval_tokens=random_tokens(97, 12, 10, seed=1),
        calib_tokens=random_tokens(97, 12, 10, seed=2),
        quant="int8",
        latency_iters=2,
    )
    with pytest.raises(QualityGateFailed, match="min-cosine: min cosine to fp32") as e:
        deploy_token_model(ck.model, tmp_path / "o", gates=Gates(), prune="2:4", **kw)
    assert e.value.manifest["fidelity"]["cosine_min"] < 0.9 and not e.value.manifest["gates"]["passed"]
    # a token model has no OOD variants and was given no FGSM/PGD budget: both gates are listed, with why
    listed = {g["gate"]: g["why"] for g in e.value.manifest["gates"]["not_evaluated"]}
    assert "token model" in listed["max-ood-drop"] and "adversarial_eps" in listed["max-adv-drop"]
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bert"]
    r = deploy_token_model(ck.model, tmp_path / "o", gates=Gates(), **kw)  # int8 alone passes the default
    assert r.manifest["gates"]["results"][0]["passed"] and (tmp_path / "o" / "model.dpla").exists()
