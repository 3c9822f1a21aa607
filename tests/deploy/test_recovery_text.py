"""Distillation at scale: a text corpus that ships with Python, held-out early stopping, masks kept exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from deltaplane.deploy import nm_prune
from deltaplane.deploy.recovery import distill_recover
from deltaplane.deploy.sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES, corpus_split, text_corpus
from deltaplane.deploy.tokens import random_tokens
from deltaplane.errors import ConfigError

transformers = pytest.importorskip("transformers")


def test_the_stdlib_corpus_is_large_disjoint_and_stable():
    corpus = text_corpus()
    assert len(corpus) > 5000  # thousands of sentences, not 64
    cal, held = corpus_split(3000, 300)
    assert len(cal) == 3000 and len(held) == 300 and not set(cal) & set(held)
    assert not set(corpus) & (set(EVAL_SENTENCES) | set(CALIBRATION_SENTENCES))
    more, held2 = corpus_split(4000, 300)
    # asking for more text never moves a sentence across the split
    assert more[:3000] == cal and held2 == held
    assert all(40 <= len(s) <= 200 and s[0].isupper() for s in cal)
    with pytest.raises(ConfigError, match="corpus has"):
        corpus_split(len(corpus) + 1)


def _tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_early_stopping_keeps_the_best_held_out_weights_and_the_2_4_pattern():
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    result = nm_prune(student, 2, 4)
    cal = random_tokens(97, 120, 10, seed=2)
    rec = distill_recover(
        teacher, cal, task="sentence-embedding", epochs=6, lr=3e-3, batch_size=8, patience=2
    )
    report = rec(student, result)
    assert report["holdout_inputs"] == 12 and report["calibration_inputs"] == 108
    assert report["history"] and report["distill_loss_after"] < report["distill_loss_before"]
    assert report["distill_loss_after"] == pytest.approx(min(h["holdout_loss"] for h in report["history"]))
    modules = dict(student.named_modules())
    for name, mask in result.masks.items():  # 2 of every 4 weights kept, the other 2 still exactly zero
        assert bool((mask.reshape(-1, 4).sum(1) == 2).all())
        assert bool((modules[name].weight.detach()[~mask] == 0).all())
    emb = student.embeddings.word_embeddings.weight
    assert torch.equal(emb, teacher.embeddings.word_embeddings.weight)  # embedding tables are never trained


def test_a_run_that_never_beats_the_pruned_model_gives_it_back_unchanged():
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    result = nm_prune(student, 2, 4)
    pruned = {k: v.clone() for k, v in student.state_dict().items()}
    cal = random_tokens(97, 60, 10, seed=3)
    rec = distill_recover(teacher, cal, task="sentence-embedding", epochs=3, lr=50.0, patience=1, warmup=0.0)
    report = rec(student, result)  # lr 50 wrecks every step: no held-out measurement improves
    assert report["stopped_early"] and report["best_step"] == 0
    assert all(torch.equal(student.state_dict()[k], v) for k, v in pruned.items())
    with pytest.raises(ConfigError):
        distill_recover(teacher, cal, task="sentence-embedding", epochs=1, holdout=1.0)


def test_a_monitor_draws_the_curve_but_never_picks_the_weights():
    teacher = _tiny_bert()
    student = copy.deepcopy(teacher)
    result = nm_prune(student, 2, 4)
    cal = random_tokens(97, 80, 10, seed=4)
    probe = torch.from_numpy(random_tokens(97, 6, 10, seed=5))
    with torch.no_grad():
        ref = teacher(input_ids=probe[:, 0], attention_mask=probe[:, 1]).last_hidden_state.mean(1)
    calls: list[bool] = []

    def cosine(model) -> dict[str, float]:
        calls.append(model.training)
        out = model(input_ids=probe[:, 0], attention_mask=probe[:, 1]).last_hidden_state.mean(1)
        c = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        return {"cos_min": c.min(), "cos_mean": c.mean()}

    lines: list[str] = []

    def run(monitor):
        s = copy.deepcopy(student)
        rec = distill_recover(
            teacher,
            cal,
            task="sentence-embedding",
            epochs=3,
            lr=3e-3,
            batch_size=8,
            progress=lines.append,
            monitor=monitor,
        )
        return s, rec(s, result)

    watched, report = run(cosine)
    plain, plain_report = run(None)
    hist = report["history"]
    assert hist[0]["step"] == 0 and len(calls) == len(hist) and not any(calls)  # eval mode, once per point
    assert all(0 < h["cos_min"] <= h["cos_mean"] <= 1 for h in hist)
    assert hist[-1]["cos_mean"] > hist[0]["cos_mean"]  # distillation moves the probe towards fp32
    assert any("cos_min" in line for line in lines)
    # the monitor only observes: the same steps, the same kept weights as an unmonitored run
    assert report["best_step"] == plain_report["best_step"]
    assert all(torch.equal(watched.state_dict()[k], v) for k, v in plain.state_dict().items())
