"""One chooser between a folder's model.safetensors and its index (deltaplane.shards.folder_weights), the same
refusals in deploy, registry register, the codecs commands, merge and extract-lora.

Before: deploy, register and the codecs commands read model.safetensors of a folder holding both it and an index,
merge and extract-lora read the index, so one folder was two models depending on the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from deltaplane.errors import AmbiguousCheckpoint, ConfigError
from deltaplane.shards import INDEX_NAME, WEIGHTS_NAME, folder_weights

SHARD = "model-00001-of-00001.safetensors"


def _index(folder: Path, shard: str = SHARD) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {"fc.weight": shard, "fc.bias": shard}}))


def _both(folder: Path) -> Path:
    """A folder holding two different checkpoints: model.safetensors, and an index with its own shard."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"fc.weight": torch.randn(16, 8, generator=g), "fc.bias": torch.randn(16, generator=g)},
              folder / WEIGHTS_NAME)  # fmt: skip
    save_file({"fc.weight": torch.randn(16, 8, generator=g), "fc.bias": torch.randn(16, generator=g)},
              folder / SHARD)  # fmt: skip
    _index(folder)
    (folder / "config.json").write_text('{"architecture": "DigitsCNN"}')
    return folder


def test_either_file_alone_is_chosen_and_neither_is_none(tmp_path: Path) -> None:
    assert folder_weights(tmp_path) is None
    _index(tmp_path)
    assert folder_weights(tmp_path) == tmp_path / INDEX_NAME
    (tmp_path / INDEX_NAME).unlink()
    save_file({"w": torch.zeros(2)}, str(tmp_path / WEIGHTS_NAME))
    assert folder_weights(tmp_path) == tmp_path / WEIGHTS_NAME


def test_a_folder_holding_both_is_refused_naming_both_and_what_to_remove(tmp_path: Path) -> None:
    """Before: model.safetensors was returned and the index's shard silently ignored."""
    folder = _both(tmp_path / "m")
    with pytest.raises(AmbiguousCheckpoint) as e:
        folder_weights(folder)
    msg = str(e.value)
    assert f"remove {WEIGHTS_NAME} to use the sharded checkpoint" in msg
    assert f"remove {INDEX_NAME} and its shards to use {WEIGHTS_NAME}" in msg and SHARD in msg
    assert isinstance(e.value, ConfigError)  # exit 2 in the CLI, caught by existing ConfigError handlers


def test_an_unreadable_index_beside_model_safetensors_is_still_the_ambiguity(tmp_path: Path) -> None:
    """The fix may be to remove the broken index: the message says so rather than only the index's fault."""
    folder = _both(tmp_path / "m")
    (folder / INDEX_NAME).write_text("{}")
    with pytest.raises(AmbiguousCheckpoint, match=f"unreadable: .*remove {INDEX_NAME}"):
        folder_weights(folder)


def test_an_index_naming_model_safetensors_as_its_shard_is_one_checkpoint(tmp_path: Path) -> None:
    """Some hub repositories carry an index whose one shard is model.safetensors: no ambiguity, and merge reads
    it as deploy does."""
    from deltaplane.merging.checkpoint import Checkpoint

    save_file({"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, tmp_path / WEIGHTS_NAME)
    _index(tmp_path, WEIGHTS_NAME)
    assert folder_weights(tmp_path) == tmp_path / INDEX_NAME
    assert torch.equal(Checkpoint(tmp_path)["fc.weight"], torch.ones(2, 2))


def _run_cli(tmp: Path, folder: Path, command: str) -> subprocess.CompletedProcess[str]:
    """``command`` run on ``folder`` (a checkpoint holding both files) in a real ``deltaplane`` process."""
    plain = tmp / "plain.safetensors"
    save_file({"fc.weight": torch.zeros(16, 8), "fc.bias": torch.zeros(16)}, plain)
    if command == "merge":
        cfg = {"merge_method": "task_arithmetic", "base_model": str(plain),
               "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]}  # fmt: skip
        (tmp / "m.yaml").write_text(yaml.safe_dump(cfg))
    home = ["--home", str(tmp / "home")]
    args = {
        "deploy": ["deploy", str(folder), "-o", str(tmp / "out")],
        "registry register": ["registry", "register", "m", str(folder), *home],
        "compress": [
            "compress",
            str(folder),
            "--base",
            str(plain),
            "--codec",
            "quant(bits=8)",
            "-o",
            str(tmp / "d.dpln"),
        ],
        "merge": ["merge", str(tmp / "m.yaml"), "-o", str(tmp / "out")],
        "extract-lora": [
            "extract-lora",
            str(folder),
            "--base",
            str(plain),
            "-o",
            str(tmp / "lora"),
            "--rank",
            "1",
        ],
    }[command]
    if command == "registry register":
        subprocess.run([sys.executable, "-m", "deltaplane", "registry", "init", *home], check=True)
    return subprocess.run([sys.executable, "-m", "deltaplane", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["deploy", "registry register", "compress", "merge", "extract-lora"])
def test_every_command_refuses_a_folder_holding_both_alike(tmp_path: Path, command: str) -> None:
    """Before: deploy, register and compress read model.safetensors, merge and extract-lora the index."""
    folder = _both(tmp_path / "ck")
    r = _run_cli(tmp_path, folder, command)
    assert r.returncode == 2, r.stderr[-2000:]
    err = " ".join(r.stderr.split())  # rich wraps the one-line message at the terminal's width
    assert f"holds two checkpoints, {WEIGHTS_NAME} and {INDEX_NAME}" in err, err[-2000:]
    assert f"remove {WEIGHTS_NAME} to use the sharded checkpoint" in err
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dir", "dangling"])
def test_a_weights_name_that_is_no_regular_file_is_refused_not_passed_over(tmp_path: Path, kind: str) -> None:
    """Before: registry register skipped a FIFO or folder named model.safetensors (is_file) for the index or
    'not a Hugging Face checkpoint', deploy called a dangling link missing (exists); now all name it."""
    (tmp_path / INDEX_NAME).write_text("{}")
    w = tmp_path / WEIGHTS_NAME
    {"fifo": os.mkfifo, "dir": os.mkdir, "dangling": lambda p: os.symlink(tmp_path / "gone", p)}[kind](w)
    with pytest.raises(ConfigError, match=f"{WEIGHTS_NAME}: .*weights file"):
        folder_weights(tmp_path)


def test_a_link_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot links its files into ../../blobs: the user's own folder, followed."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir()
    snap.mkdir()
    save_file({"w": torch.zeros(2)}, str(blobs / "abc"))
    (snap / WEIGHTS_NAME).symlink_to(blobs / "abc")
    assert folder_weights(snap) == snap / WEIGHTS_NAME


def test_the_three_readers_refuse_a_fifo_model_safetensors_alike(tmp_path: Path) -> None:
    """deploy's load_checkpoint, registry register's folder reader and the codecs commands' folder reader."""
    from deltaplane.commands.codecs import _load_state
    from deltaplane.deploy.bundle import load_deployable
    from deltaplane.deploy.checkpoint import load_checkpoint

    (tmp_path / "config.json").write_text('{"architecture": "X"}')
    os.mkfifo(tmp_path / WEIGHTS_NAME)
    for read in (load_checkpoint, load_deployable, _load_state):
        with pytest.raises(ConfigError, match="must be a regular file, not a FIFO"):
            read(tmp_path)
