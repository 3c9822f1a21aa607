"""`deploy --calibration-size N`: how many inputs pruning and static int8 calibrate on, for every input kind."""

import os

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deltaplane.commands.deploy import _token_inputs
from deltaplane.deploy.sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES, corpus_split

transformers = pytest.importorskip("transformers")


class _Recorder:
    """A tokenizer stand-in that records the sentences it is asked to encode (ids = word lengths)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.pad_token = "[PAD]"

    def __call__(self, sentences, **_kw):
        import numpy as np

        self.calls.append(list(sentences))
        n = max(len(s.split()) for s in sentences)
        ids = np.array([[len(w) for w in s.split()] + [0] * (n - len(s.split())) for s in sentences])
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


def test_calibration_and_distillation_text_come_from_one_prefix_and_never_the_evaluation_set(
    tmp_path, monkeypatch
) -> None:
    import deltaplane.commands.deploy as cmd

    rec = _Recorder()
    monkeypatch.setattr(cmd, "_load_tokenizer", lambda *_a: rec)
    (tmp_path / "tokenizer.json").write_text("{}")
    ev, cal, _distill, note, _ = _token_inputs(
        tmp_path,
        {},
        None,
        0,
        tokenizer_dir=None,
        random_ids=False,
        distill_sentences=1000,
        calibration_size=300,
    )
    evs, cals, dists = rec.calls  # evaluation, calibration, distillation, in that order
    assert evs == EVAL_SENTENCES and len(ev) == len(EVAL_SENTENCES)
    extra, held = corpus_split(1000, 256)
    assert cals == [*CALIBRATION_SENTENCES, *extra][:300] and len(cal) == 300
    assert dists == [*CALIBRATION_SENTENCES, *extra] and dists[:300] == cals  # distillation extends it
    assert not set(cals + dists) & set(EVAL_SENTENCES) and not set(dists) & set(held)
    assert "calibration on 300 others" in note
    # calibration larger than the distillation text: the corpus prefix grows, distillation keeps its size
    rec.calls.clear()
    _token_inputs(
        tmp_path,
        {},
        None,
        0,
        tokenizer_dir=None,
        random_ids=False,
        distill_sentences=10,
        calibration_size=200,
    )
    _, cals, dists = rec.calls
    assert len(cals) == 200 and dists == cals[: len(CALIBRATION_SENTENCES) + 10]


def test_cli_passes_the_calibration_size_to_pruning_and_refuses_zero(app, tmp_path, monkeypatch) -> None:
    import deltaplane.deploy.pipeline as pipeline

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    seen: list[int] = []
    real = pipeline.prune_model

    def spy(model, spec, calibration):
        seen.append(sum(len(b["input_ids"]) for b in calibration))
        return real(model, spec, calibration=calibration)

    monkeypatch.setattr(pipeline, "prune_model", spy)  # deploy_token_model imports it at call time
    base = ["deploy", str(tmp_path / "bert"), "--random-tokens", "--prune", "wanda:2:4", "--attack-eps", "0"]
    r = CliRunner().invoke(app, [*base, "--calibration-size", "40", "--no-gates", "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert seen == [40]
    r = CliRunner().invoke(app, [*base, "--calibration-size", "0", "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--calibration-size must be >= 1" in r.output
    assert not (tmp_path / "b").exists()
