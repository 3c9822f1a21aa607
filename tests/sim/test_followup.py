"""The follow-up of a run: personalized devices, a merged model and a deployable artifact, with real numbers."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save

from deltaplane.apps.digits.followup import run_followup
from deltaplane.data.digits import load_digits, train_test_split
from deltaplane.deploy import read_artifact
from deltaplane.errors import ConfigError
from deltaplane.merging import merge
from deltaplane.personalization import AlphaMix, PersonalState
from deltaplane.report import render_html, write_report
from deltaplane.sim.client import make_clients
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import accuracy, build_model
from deltaplane.sim.seeding import Stream, torch_generator
from deltaplane.sim.simulation import RunResult, run_simulation

TINY = RunConfig(clients=3, rounds=2, codec="topk(0.01) | quant(bits=8)")
FAST = {"personal_epochs": 1, "finetune_epochs": 2, "latency_iters": 20}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, dict, Path]:
    run = run_simulation(TINY)
    out = tmp_path_factory.mktemp("followup") / "deploy"
    # two rounds leave the model at chance, which the default gates refuse to ship (tested below): these
    # tests are about the artifact's mechanics, so they deploy without gates
    return run, run_followup(run, out, gates=None, **FAST), out


def test_personalization_reports_every_device(done: tuple[RunResult, dict, Path]) -> None:
    _, after, _ = done
    p = after["personalization"]
    assert p["devices"] == 3 and [c["client"] for c in p["clients"]] == [0, 1, 2]
    glob = [c["global_accuracy"] for c in p["clients"]]
    pers = [c["personal_accuracy"] for c in p["clients"]]
    assert p["global_accuracy_mean"] == pytest.approx(np.mean(glob))
    assert p["personal_accuracy_min"] == pytest.approx(min(pers))
    assert p["gain_min"] == pytest.approx(min(np.subtract(pers, glob)))
    for c in p["clients"]:
        assert 0.0 < c["global_accuracy"] <= 1.0 and 0.0 < c["personal_accuracy"] <= 1.0
        if c["alpha"] == 0:  # a device that kept the global model scores exactly what the global model does
            assert c["personal_accuracy"] == c["global_accuracy"]
    assert p["devices_personalized"] == sum(c["alpha"] > 0 for c in p["clients"])
    assert (
        p["in_round"] is False and p["epochs"] == FAST["personal_epochs"]
    )  # TINY did not personalize: post hoc


def test_merged_accuracy_is_the_test_accuracy_of_the_merged_model(done: tuple[RunResult, dict, Path]) -> None:
    run, after, _ = done
    results = after["merge"]["results"]
    assert set(results) == {"global", "ties", "task_arithmetic"}
    _, test = train_test_split(load_digits(), test_fraction=TINY.test_fraction, seed=TINY.split_seed)
    model = build_model(0)
    model.load_state_dict(run.final_state)
    assert results["global"]["test_accuracy"] == accuracy(model, test) == run.final.test_accuracy
    # rebuild the fleet's personalized models from the library pieces (same seeds) and merge them here
    train, _ = train_test_split(load_digits(), test_fraction=TINY.test_fraction, seed=TINY.split_seed)
    personal = []
    for c in make_clients(TINY, train):
        state = PersonalState()
        gen = torch_generator(TINY.seed, Stream.PERSONALIZATION, TINY.rounds + 1, c.cid)
        AlphaMix(epochs=FAST["personal_epochs"]).personalize(
            model, run.final_state, state, c.train, c.holdout, generator=gen
        )
        assert state.alpha == after["personalization"]["clients"][c.cid]["alpha"]
        personal.append(AlphaMix().personal_state(run.final_state, state))
    for name, params in (("ties", {"density": 0.2}), ("task_arithmetic", {})):
        merged = merge(name, run.final_state, personal, weight=1 / 3, **params)
        model.load_state_dict(merged)
        assert results[name]["test_accuracy"] == accuracy(model, test)
        assert 0.1 < results[name]["test_accuracy"] <= 1.0  # better than chance on 10 classes


def test_a_run_that_personalized_is_reported_and_merged_as_it_ended(tmp_path: Path) -> None:
    """With in-round personalization (`deltaplane run`'s default α-mix) the follow-up trains nothing again: its
    rows are the run's last-round rows and it merges the run's own personal models."""
    run = run_simulation(TINY.replace(personalization="alpha_mix"))
    after = run_followup(run, tmp_path / "deploy", gates=None, **FAST)
    p = after["personalization"]
    assert p["method"] == "alpha_mix" and p["in_round"] is True
    assert p["epochs"] == TINY.personal_epochs != FAST["personal_epochs"]  # the run's, not a post-hoc pass
    keys = ("client", "global_accuracy", "personal_accuracy", "alpha")
    assert [{k: r[k] for k in keys} for r in p["clients"]] == run.clients
    assert p["personal_accuracy_mean"] == pytest.approx(run.final.personal_accuracy_mean)
    assert p["gain_min"] == pytest.approx(run.final.personal_gain_min)
    assert p["devices_personalized"] == sum(c["alpha"] > 0 for c in run.clients) > 0
    _, test = train_test_split(load_digits(), test_fraction=TINY.test_fraction, seed=TINY.split_seed)
    model = build_model(0)
    personal = [run.personal_states[c["client"]] for c in run.clients]
    results = after["merge"]["results"]
    for name, params in (("ties", {"density": 0.2}), ("task_arithmetic", {})):
        model.load_state_dict(merge(name, run.final_state, personal, weight=1 / 3, **params))
        assert results[name]["test_accuracy"] == accuracy(model, test)
    # the Flower engine keeps the personal models on its nodes: the rows are still the run's, nothing is merged
    flower = run_followup(
        dataclasses.replace(run, personal_states={}), tmp_path / "deploy2", gates=None, **FAST
    )
    assert flower["personalization"]["clients"] == p["clients"]
    assert set(flower["merge"]["results"]) == {"global"} and "Flower" in flower["merge"]["skipped"]
    html = render_html(
        json.loads(
            write_report([{"name": "c", **run.to_dict()}], tmp_path, followup=flower).json_path.read_text()
        )
    )
    assert "in every round of the federation" in html and "<h2>Merge</h2><p>Skipped" in html


def test_artifact_is_written_and_smaller_than_fp32(done: tuple[RunResult, dict, Path]) -> None:
    run, after, out = done
    d = after["deploy"]
    assert sorted(p.name for p in out.iterdir()) == sorted(d["files"])
    assert {"model.dpla", "model.onnx", "manifest.json", "MODEL_CARD.md"} <= set(d["files"])
    artifact = out / "model.dpla"
    assert artifact.stat().st_size == d["artifact_bytes"]
    fp32 = len(save({k: v.contiguous() for k, v in run.final_state.items()}))
    assert d["fp32_safetensors_bytes"] == fp32
    assert d["compression_ratio"] == pytest.approx(fp32 / d["artifact_bytes"])
    assert d["compression_ratio"] >= 7.5  # measured 8.3× here; 8.65× on the full default run
    assert d["weight_sparsity"] >= 0.75
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sizes"]["artifact_bytes"] == d["artifact_bytes"]
    assert read_artifact(artifact).manifest["quant"] == "int8"
    assert 0.0 < d["accuracy_compressed"] <= 1.0 and d["latency_ratio_batch1"] > 0
    assert manifest["gates"]["off"] is True and d["gates_passed"] == 0  # gates=None is recorded as off


def test_a_model_at_chance_is_not_shipped(done: tuple[RunResult, dict, Path], tmp_path: Path) -> None:
    run, shipped, _ = done
    out = tmp_path / "deploy"
    after = run_followup(run, out, **FAST)  # the default gates, as `deltaplane run` deploys
    d = after["deploy"]
    assert d["refused"] is True and not out.exists()  # nothing written, no partial folder
    assert d["accuracy_fp32"] == pytest.approx(shipped["deploy"]["accuracy_fp32"])
    assert d["accuracy_fp32"] < 0.2  # the 2-round model is at chance: the gate, not noise, refuses it
    assert any(r.startswith("min-above-chance") for r in d["reasons"]), d["reasons"]
    same = {k: v for k, v in after["personalization"].items() if k != "seconds"}
    assert same == {
        k: v for k, v in shipped["personalization"].items() if k != "seconds"
    }  # the rest still ran
    doc = json.loads(
        write_report([{"name": "c", **run.to_dict()}], tmp_path, followup=after).json_path.read_text()
    )
    html = render_html(doc)
    assert "<h2>Deploy</h2><p>Refused" in html and "min-above-chance" in html


def test_report_carries_the_followup_sections(done: tuple[RunResult, dict, Path], tmp_path: Path) -> None:
    run, after, _ = done
    files = write_report([{"name": "compressed", **run.to_dict()}], tmp_path, followup=after)
    doc = json.loads(files.json_path.read_text())
    assert doc["followup"]["deploy"]["artifact_bytes"] == after["deploy"]["artifact_bytes"]
    html = render_html(doc)
    for heading in ("<h2>Personalization</h2>", "<h2>Merge</h2>", "<h2>Deploy</h2>"):
        assert heading in html
    assert f"{after['deploy']['artifact_bytes']:,} B" in html
    with pytest.raises(ConfigError, match="followup lacks"):
        write_report([{"name": "c", **run.to_dict()}], tmp_path, followup={"merge": {}})


def test_followup_needs_final_weights(tmp_path: Path) -> None:
    run = run_simulation(TINY.replace(rounds=1))
    run.final_state = {}
    with pytest.raises(ConfigError, match="final_state"):
        run_followup(run, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_digits_mlp_follows_up_too(tmp_path: Path) -> None:
    """`deltaplane run --task-option model=mlp` ran its whole federation, then failed in the follow-up (exit 2,
    no report): the deploy was told to leave out `conv1`, which the MLP does not have."""
    run = run_simulation(RunConfig(clients=3, rounds=1, task_options={"model": "mlp"}))
    after = run_followup(run, tmp_path / "deploy", gates=None, **FAST)
    manifest = json.loads((tmp_path / "deploy" / "manifest.json").read_text())
    assert after["deploy"]["artifact"].endswith("model.dpla") and "mlp" in json.dumps(manifest)
