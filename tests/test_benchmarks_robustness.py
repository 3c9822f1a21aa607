"""benchmarks/robustness.py's ``--uplink``: another codec in the default codec's place, cached apart from it.

The robustness sections were measured on ``stc(0.002)`` with DGC (``DEFAULT_CODEC``); ``--uplink`` measures the
same tables on another codec with the same DGC options. Its runs must never be read back as another uplink's (nor
as the same codec's without DGC), and the sections recorded before the option must keep their cache names and text.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
from tests.benchmark_scripts import benchmark_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rb():
    with benchmark_module("robustness.py", "bench_robustness") as module:
        yield module


def test_an_uplink_runs_with_the_default_codecs_dgc_options_and_caches_apart(rb) -> None:
    new = (rb.uplink("stc(0.006)"), "backdoor:0.2", "trigger_attribution", 1, 80)
    bare = ("stc(0.006)", *new[1:])
    old = (rb.uplink(rb.DEFAULT_CODEC), *new[1:])
    cfg = rb.config(new)
    assert (cfg.codec, cfg.momentum_correction, cfg.momentum_masking) == ("stc(0.006)", 0.5, True)
    assert rb.config(bare).momentum_masking is False  # a codec named bare (--clean-codec) runs without DGC
    keys = {rb._key(new), rb._key(bare), rb._key(old), rb._key(("stc(0.0006)", *new[1:]))}
    assert len(keys) == 4
    assert rb._key(new).name == "stc-0.006-_backdoor-0.2_trigger_attribution_1_80_dgc.json"


def test_the_default_codecs_runs_keep_the_cache_names_they_were_recorded_under(rb) -> None:
    assert rb.uplink(rb.DEFAULT_CODEC) == rb.DEFAULT_CODEC
    job = (rb.DEFAULT_CODEC, None, "none", 0, 80)
    assert rb._key(job).name == "stc-0.002-_None_none_0_80_dgc.json"
    cfg = rb.config(job)
    assert (cfg.codec, cfg.momentum_correction, cfg.momentum_masking) == ("stc(0.002)", 0.5, True)


def _accept(rb, monkeypatch, **over) -> tuple[list[tuple], str]:
    """The jobs accept asks for and the section body it records, on made-up results."""
    import _record

    asked, recorded = [], []

    def fake_run_all(jobs, workers):
        asked.extend(jobs)
        return {j: {"accuracy": 0.95, "backdoor": None if j[1] is None else 0.05} for j in jobs}

    monkeypatch.setattr(rb, "run_all", fake_run_all)
    monkeypatch.setattr(_record, "record", lambda key, title, body: recorded.append(body))
    args = argparse.Namespace(
        seeds=3, best=["trigger_attribution"], workers=1, key_suffix=None, uplink=rb.DEFAULT_CODEC
    )
    args.codecs = list(rb.CODECS)
    vars(args).update(over)
    rb.accept(args)
    return asked, recorded[0]


def test_accept_on_the_default_codec_only_measures_the_uplink_and_names_it(rb, monkeypatch) -> None:
    jobs, body = _accept(rb, monkeypatch, uplink="stc(0.006)", codecs=["default"])
    assert {j[0] for j in jobs} == {"stc(0.006)+dgc"} and len(jobs) == 9
    assert "default = `stc(0.006)` with DGC" in body and "`--uplink 'stc(0.006)'`" in body
    assert "`identity`" not in body.split("\n\n")[0]


def test_accept_without_the_options_measures_both_codecs_as_recorded(rb, monkeypatch) -> None:
    jobs, body = _accept(rb, monkeypatch)
    assert {j[0] for j in jobs} == {rb.DEFAULT_CODEC, "identity"}
    assert body.startswith(
        "Codecs: default = `stc(0.002)` with DGC momentum correction 0.5 and momentum masking (as "
        "`deltaplane run`), and `identity`. 80 rounds, 20 clients,"
    )
    assert "--uplink" not in body


def test_a_traced_run_without_attack_is_the_clean_sections_run(rb) -> None:
    # robustness_trace.py --attack none traces (and fills the cache of) robustness.py clean's run: attack None
    spec = importlib.util.spec_from_file_location("bench_trace", ROOT / "benchmarks" / "robustness_trace.py")
    trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace)
    d = "trigger_attribution(norm_cap=10)"
    clean = (rb.uplink("stc(0.006)"), None, d, 2, 80)
    assert trace.job("default", 2, d, 80, "none", "stc(0.006)") == clean
    assert trace.rb._key(clean) == rb._key(clean)  # the same cache file as the clean section reads
    assert trace.job("default", 0, d, 80, "dba:0.3", "stc(0.006)")[1] == "dba:0.3"


def _grid(rb, monkeypatch, results, **over) -> tuple[list[tuple], str]:
    """The jobs grid asks for and the section body it records, on the made-up ``results(job)`` (None: not run)."""
    import _record

    asked, recorded = [], []

    def fake_run_all(jobs, workers):
        asked.extend(jobs)
        return {j: results(j) for j in jobs}

    monkeypatch.setattr(rb, "run_all", fake_run_all)
    monkeypatch.setattr(_record, "record", lambda key, title, body: recorded.append((key, body)))
    args = argparse.Namespace(
        grid_rounds=80,
        grid_seeds=1,
        uplink="stc(0.006)",
        attacks=["backdoor", "dba"],
        fractions=[0.3],
        defenses=["trigger_attribution"],
        workers=1,
        key_suffix="x",
    )
    vars(args).update(over)
    rb.grid(args)
    return asked, recorded[0][1]


def _flip(job) -> dict:
    """Seed 1 lets the plain backdoor in (0.97), seeds 0 and 2 keep it out; the clean run has no backdoor."""
    _, attack, _, seed, _ = job
    bd = None if attack is None else 0.97 if (attack, seed) == ("backdoor:0.3", 1) else 0.0
    return {"accuracy": 0.95 + 0.01 * seed, "backdoor": bd}


def test_grid_seeds_runs_every_cell_per_seed_and_counts_the_seeds_the_backdoor_got_in(
    rb, monkeypatch
) -> None:
    jobs, body = _grid(rb, monkeypatch, _flip, grid_seeds=3)
    assert len(jobs) == len(set(jobs)) == 3 * (1 + 2)  # per seed: the clean run and 2 attack cells
    assert {j[3] for j in jobs} == {0, 1, 2} and {j[0] for j in jobs} == {"stc(0.006)+dgc"}
    assert "seeds 0, 1, 2" in body and "clean FedAvg 0.950, 0.960, 0.970" in body
    summary, per_seed = body.split("Per seed:")
    assert "| backdoor | 30% | 0.960 / 1 of 3 above 0.5, mean 0.32 |" in summary
    assert "| dba | 30% | 0.960 / 0 of 3 above 0.5, mean 0.00 |" in summary
    assert "| backdoor | 30% | 1 | 0.960 / 0.97 |" in per_seed
    assert per_seed.count("| dba | 30% |") == 3


def test_grid_seeds_says_which_seeds_did_not_finish(rb, monkeypatch) -> None:
    _, body = _grid(rb, monkeypatch, lambda j: None if j[3] == 2 else _flip(j), grid_seeds=3)
    assert "clean FedAvg 0.950, 0.960, not run" in body
    assert "0.955 / 1 of 2 above 0.5, mean 0.48 (1 not run)" in body
    assert "| dba | 30% | 2 | not run |" in body


def test_the_grid_without_the_option_is_seed_0_as_recorded(rb, monkeypatch) -> None:
    jobs, body = _grid(rb, monkeypatch, _flip)
    assert {j[3] for j in jobs} == {0} and len(jobs) == 3
    assert "momentum masking, seed 0, **80 rounds**, clean FedAvg 0.950. Cells:" in body
    assert "| attack | malicious | trigger_attribution |" in body and "Per seed" not in body
    assert "| backdoor | 30% | 0.950 / 0.00 |" in body


def test_a_trace_counts_as_capped_exactly_the_updates_norm_cap_scales_down() -> None:
    # robustness_trace.py's `capped` is how docs/aggregation.md counts the bound's engagements: it must be the
    # rows bound_norms changes (kept and over cap x the median of all rows), not the rows kept out
    import torch

    from deltaplane.aggregation.attribution import bound_norms

    spec = importlib.util.spec_from_file_location("bench_trace", ROOT / "benchmarks" / "robustness_trace.py")
    trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace)
    x = torch.ones(5, 4)  # norms 2, 2, 2, then 30 (kept) and 50 (kept out): median 2, cap 10 -> bound 20
    x[3] *= 15
    x[4] *= 25
    ids, kept = ["a", "b", "c", "d", "e"], [0, 1, 2, 3]
    kept_max, capped = trace.over_cap(x, ids, kept, 10.0)
    changed = [ids[i] for i in range(5) if not torch.equal(bound_norms(x, 10.0, kept)[i], x[i])]
    assert list(capped) == changed == ["d"]
    assert capped["d"] == pytest.approx(15.0) and kept_max == pytest.approx(15.0)
    assert trace.over_cap(x, ids, kept, 20.0)[1] == {}  # 15x is under a cap of 20
    assert trace.over_cap(x, ids, kept, None) == (pytest.approx(15.0), {})


def test_a_section_measured_apart_says_so_and_the_full_table_does_not(rb, monkeypatch) -> None:
    # the geometric median and centered clipping were measured in sections of their own (--key-suffix), after
    # the full grid: their text must say the rows were not run beside the full table's
    _, apart = _grid(rb, monkeypatch, _flip, key_suffix="geometric median and centered clipping")
    assert "measured apart from the full table" in apart
    assert "without “— geometric median and centered clipping”" in apart
    _, full = _grid(rb, monkeypatch, _flip, key_suffix=None)
    assert "apart" not in full


def test_the_tau_sweep_asks_for_each_radius_under_each_attack_and_names_the_best_worst_case(
    rb, monkeypatch
) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_cc_tau", ROOT / "benchmarks" / "centered_clip_tau.py"
    )
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    asked, recorded = [], []

    def fake(jobs, workers):  # τ = 3 keeps 0.9 everywhere; the others lose to the scaled sign flip
        asked.extend(jobs)
        return {
            j: {
                "accuracy": 0.9 if j[2] == "centered_clip(3)" or "scale" not in str(j[1]) else 0.1,
                "backdoor": 0.5 if j[1] and j[1].startswith("backdoor") else None,
            }
            for j in jobs
        }

    monkeypatch.setattr(sweep, "run_all", fake)
    monkeypatch.setattr(sweep, "record", lambda key, title, body: recorded.append((key, body)))
    monkeypatch.setattr(sys, "argv", ["centered_clip_tau.py", "--taus", "1", "3", "30", "--seeds", "2"])
    sweep.main()
    assert len(asked) == len(set(asked)) == 4 * 5 * 2  # FedAvg and 3 radii × 5 columns × 2 seeds
    assert {j[0] for j in asked} == {rb.DEFAULT_CODEC} and {j[4] for j in asked} == {80}
    key, body = recorded[0]
    assert key == "centered-clip-tau" and "the best worst case is `τ = 3`" in body
    assert "| `centered_clip(3)` | 0.900 | 0.900 | 0.900 | 0.900 | 0.900 / 0.50 | 0.900 |" in body


def _main(rb, monkeypatch, argv: list[str]) -> tuple[list[tuple], str]:
    """The jobs ``robustness.py ARGV`` asks for and the body it records, every run made up (accuracy 0.9)."""
    import _record

    asked, recorded = [], []

    def fake_run_all(jobs, workers):
        asked.extend(jobs)
        return {j: {"accuracy": 0.9, "backdoor": None if j[1] is None else 0.0} for j in jobs}

    monkeypatch.setattr(rb, "run_all", fake_run_all)
    monkeypatch.setattr(_record, "record", lambda key, title, body: recorded.append((key, body)))
    monkeypatch.setattr(sys, "argv", ["robustness.py", *argv])
    rb.main()
    return asked, recorded[0][1]


def test_the_default_grid_measures_sign_vote_the_geometric_median_and_centered_clipping(
    rb, monkeypatch
) -> None:
    # sign_vote was left out of the grid, and the geometric median and centered clipping measured only in a
    # section of their own at 20%: all three are columns of the default grid, and its text no longer says
    # sign_vote is left out
    jobs, body = _main(rb, monkeypatch, ["grid", "--attacks", "backdoor", "--fractions", "0.2"])
    header = next(ln for ln in body.splitlines() if ln.startswith("| attack |"))
    for rule in ("sign_vote", "geometric_median", "centered_clip"):
        assert f" {rule} |" in header
        assert (rb.DEFAULT_CODEC, "backdoor:0.2", rule, 0, 80) in jobs
    assert "left out" not in body
    assert len(jobs) == len(set(jobs)) == 1 + len(rb.GRID_DEFENSES)


def test_the_clean_comparison_runs_each_default_rule_once(rb, monkeypatch) -> None:
    jobs, body = _main(rb, monkeypatch, ["clean", "--clean-seeds", "1"])
    assert len(jobs) == len(set(jobs))
    defaults = [j[2] for j in jobs if j[0] == rb.DEFAULT_CODEC]
    for rule in ("sign_vote", "geometric_median", "centered_clip"):
        assert defaults.count(rule) == 1
        assert f"| default | {rule} | 0.900 |" in body
