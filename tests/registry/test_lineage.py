"""`summarize_lineage`: the one line `registry list` prints for a version's lineage."""

from deltaplane.engine.config import RunConfig
from deltaplane.registry.lineage import summarize_lineage


def test_known_fields_read_as_words_in_a_fixed_order() -> None:
    # a service round's version: its round (plain_round is the same round), uploads and downlink codec
    lineage = {"uploads": 18, "downlink_codec": "stc(0.006)", "round": 5, "plain_round": 5, "examples": 1234,
               "round_cohorts": ["eu"], "excluded_cohorts": ["us"]}  # fmt: skip
    assert summarize_lineage(lineage) == (
        "round 5, 18 uploads, 1234 examples, downlink stc(0.006), excluded us",
        0,
    )
    assert summarize_lineage({"secagg_round": 3, "round_cohorts": ["eu"]}) == ("SecAgg round 3", 0)


def test_a_run_config_is_named_not_printed() -> None:
    config = RunConfig(codec="topk(0.01)").to_dict()
    text, omitted = summarize_lineage({"round": 0, "run_config": config})
    assert (text, omitted) == ("round 0, run config (codec topk(0.01))", 0)
    run = {"run": "compressed", "task": "digits", "config": config, "final": {"test_accuracy": 0.96941}}
    source = {"file": "model.safetensors", "sha256": "ab" * 32, "bytes": 74_000}
    assert summarize_lineage({"run": run, "source": source})[0] == (
        "run compressed on digits, acc 0.9694, codec topk(0.01), from model.safetensors"
    )


def test_other_fields_show_short_values_and_count_the_rest() -> None:
    lineage = {"deploy_recipe": "int8", "seed": 3, "merge_config": {"method": "ties"}, "parents": [1, 2],
               "note": "x" * 40}  # fmt: skip
    text, omitted = summarize_lineage(lineage)
    assert text == f"deploy_recipe=int8, note={'x' * 27}…, seed=3, +2 more" and omitted == 2
    assert summarize_lineage({}) == ("—", 0)
    assert (
        summarize_lineage({"deploy": {"prune": 0.5, "quant": "int8", "sizes": {}}})[0]
        == "deploy prune 50% + int8"
    )
