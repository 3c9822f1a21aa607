"""`deltaplane run --downlink SPEC`: the server compresses the update it sends down and reports the bytes."""

import json
from pathlib import Path

from typer.testing import CliRunner

from deltaplane.cli import app

runner = CliRunner()


def test_run_with_a_compressed_downlink(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--clients", "4", "--rounds", "2", "--downlink", "topk(0.05) | quant(bits=8)"]
    result = runner.invoke(
        app, [*args, "--no-baseline", "--no-followup", "--out", str(out)], terminal_width=220
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    (comp,) = doc["runs"]
    assert comp["config"]["downlink_codec"] == "topk(0.05) | quant(bits=8)"
    assert comp["config"]["downlink_error_feedback"] is True  # the server keeps its own residual
    down = comp["final"]["cumulative_downlink_bytes"]
    fp32 = comp["raw_update_bytes"] * 4 * 2  # one update to each of 4 devices in each of 2 rounds
    # 5% top-k with 8-bit values: ~4% of fp32 plus positions and headers
    assert 0.02 * fp32 < down < 0.1 * fp32
    assert "downlink" in result.output
    kb = f"{down / 1e3:.2f} kB" if down >= 1e3 else f"{down} B"
    assert kb in result.output


def test_the_baseline_is_fp32_both_ways() -> None:
    from deltaplane.cli import _plan_runs
    from deltaplane.sim import RunConfig

    plan = _plan_runs(RunConfig(codec="stc(0.01)", downlink_codec="quant(bits=8)"), with_baseline=True)
    assert [(n, c.codec, c.downlink_codec) for n, c in plan] == [
        ("baseline", "identity", "identity"),
        ("compressed", "stc(0.01)", "quant(bits=8)"),
    ]
    (only,) = _plan_runs(RunConfig(codec="identity", downlink_codec="fp16"), with_baseline=True)[1:]
    assert only[1].downlink_codec == "fp16"  # a compressed downlink alone still gets its fp32 baseline


def test_bad_downlink_spec_is_a_clean_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--rounds", "1", "--downlink", "topk(2)", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "downlink_codec" in result.output


def test_codec_commands_are_registered() -> None:
    for cmd in ("compress", "decompress"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "--out" in result.output
