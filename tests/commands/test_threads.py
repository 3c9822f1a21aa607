"""``--threads`` on every long-running command: checked against the machine, applied, then restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import deltaplane.merging.streaming as streaming
from deltaplane.cli import app
from deltaplane.commands import EXIT_USAGE, available_cpus, check_threads, cpu_threads
from deltaplane.errors import ConfigError

runner = CliRunner()
LONG_RUNNING = ["run", "merge", "compress", "decompress", "deploy", "serve", "extract-lora"]


@pytest.mark.parametrize("command", LONG_RUNNING)
def test_every_long_running_command_takes_threads(command: str) -> None:
    r = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "--threads" in r.output


def test_more_threads_than_cpus_is_refused_before_any_work(tmp_path: Path) -> None:
    too_many = available_cpus() + 1
    with pytest.raises(ConfigError, match=f"--threads {too_many} exceeds the {available_cpus()} CPUs"):
        check_threads(too_many)
    base = {"w": torch.zeros(4, 4)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": torch.ones(4, 4)}, tmp_path / "new.safetensors")
    out = tmp_path / "u.dpln"
    args = ["compress", str(tmp_path / "new.safetensors"), "--base", str(tmp_path / "base.safetensors")]
    r = runner.invoke(app, [*args, "--codec", "identity", "-o", str(out), "--threads", str(too_many)])
    assert r.exit_code == EXIT_USAGE
    assert "exceeds" in r.output and not out.exists()
    r = runner.invoke(app, ["run", "--threads", str(too_many), "-o", str(tmp_path / "run")])
    assert r.exit_code == EXIT_USAGE and "exceeds" in r.output


def test_the_command_runs_with_its_threads_and_restores_the_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge's tensor work sees --threads (default 1); the in-process caller's own setting comes back."""
    seen: list[int] = []
    real = streaming._run  # the merge's tensor work (PreparedMerge.run), after prepare_merge's checks

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_run", spy)
    g = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        save_file({"w": torch.randn(8, 8, generator=g)}, tmp_path / f"{name}.safetensors")
    config = tmp_path / "merge.yaml"
    config.write_text(
        "merge_method: ties\nbase_model: {}\nparameters: {{density: 0.5}}\nmodels:\n".format(
            tmp_path / "base.safetensors"
        )
        + "".join(f"  - model: {tmp_path / n}.safetensors\n    parameters: {{weight: 1.0}}\n" for n in "ab")
    )
    before = torch.get_num_threads()
    wanted = min(2, available_cpus())
    for extra, expect in (([], 1), (["--threads", str(wanted)], wanted)):
        out = tmp_path / f"out{expect}"
        r = runner.invoke(app, ["merge", str(config), "-o", str(out), "-q", *extra])
        assert r.exit_code == 0, r.output
        assert seen[-1] == expect
        assert torch.get_num_threads() == before
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
