"""`deltaplane run --downlink SPEC`: the server compresses the update it sends down and reports the bytes."""

import json
from pathlib import Path

from typer.testing import CliRunner

from deltaplane.cli import app

runner = CliRunner()


def test_run_with_a_compressed_downlink(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            "--clients",
            "4",
            "--rounds",
            "2",
            "--downlink",
            "topk(0.05) | quant(bits=8)",
            "--out",
            str(out),
        ],
        terminal_width=220,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    base, comp = doc["runs"]
    assert base["config"]["downlink_codec"] == "identity"  # the baseline is fp32 both ways
    assert comp["config"]["downlink_codec"] == "topk(0.05) | quant(bits=8)"
    assert comp["config"]["downlink_error_feedback"] is True  # the server keeps its own residual
    down_base = base["final"]["cumulative_downlink_bytes"]
    down_comp = comp["final"]["cumulative_downlink_bytes"]
    # 5% top-k with 8-bit values: ~4% of fp32, plus headers (4 devices x 2 rounds of one payload each)
    assert down_comp < 0.1 * down_base
    assert "downlink" in result.output
    kb = f"{down_comp / 1e3:.2f} kB" if down_comp >= 1e3 else f"{down_comp} B"
    assert kb in result.output


def test_bad_downlink_spec_is_a_clean_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--rounds", "1", "--downlink", "topk(2)", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "downlink_codec" in result.output


def test_codec_commands_are_registered() -> None:
    for cmd in ("compress", "decompress"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "--out" in result.output
