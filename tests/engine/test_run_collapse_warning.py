"""`deltaplane run` says when a run diverged or ended at chance, and what to change.

Before, 4 digits devices at the default lr 0.2 and momentum 0.9 reached 0.30 in round 1 and sat at chance
(0.10) from round 2 on; the run printed a test accuracy of 0.0975 and nothing else, and only the deploy gate,
much later, said the model was no better than guessing. At lr 0.05 the same devices reach 0.97.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from deltaplane import cli


def _run(tmp_path: Path, *args: str):
    argv = ["run", "--rounds", "6", "--no-baseline", "--no-followup", "-o", str(tmp_path / "out"), *args]
    return CliRunner().invoke(cli.app, argv, terminal_width=400)


def test_a_diverged_run_is_called_so_with_what_to_change(tmp_path: Path) -> None:
    result = _run(tmp_path, "--clients", "4", "--codec", "identity")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "baseline: test accuracy fell from 0.295 (round 1) to 0.100 (0.103: guessing)" in out, out
    assert "training diverged. Try a smaller learning rate (now 0.2;" in out


def test_a_run_that_learns_gets_no_such_warning(tmp_path: Path) -> None:
    cfg = tmp_path / "lr.yaml"
    cfg.write_text("clients:\n  count: 4\n  lr: 0.05\n")
    result = _run(tmp_path, "-c", str(cfg), "--codec", "identity")
    assert result.exit_code == 0, result.output
    assert "diverged" not in result.output and "chance level" not in result.output, result.output


def test_the_warning_reads_the_test_sets_chance_level() -> None:
    rounds = [{"round": r, "test_accuracy": a} for r, a in enumerate([0.12, 0.11, 0.105, 0.11, 0.104], 1)]
    msgs: list[str] = []
    orig = cli.err_console.print
    try:
        cli.err_console.print = lambda m, **kw: msgs.append(m)  # type: ignore[method-assign]
        cli._warn_collapsed({"name": "r", "rounds": rounds, "config": {"lr": 0.2}}, chance=0.103)
        cli._warn_collapsed({"name": "s", "rounds": rounds, "config": {"lr": 0.2}}, chance=0.05)
        cli._warn_collapsed({"name": "t", "rounds": rounds[:3], "config": {"lr": 0.2}}, chance=0.103)
    finally:
        cli.err_console.print = orig  # type: ignore[method-assign]
    assert len(msgs) == 1 and "r: test accuracy ended at chance level, 0.104 (0.103: guessing)" in msgs[0]
