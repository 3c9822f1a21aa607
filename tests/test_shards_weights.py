"""One chooser between a folder's model.safetensors and its index (deltaplane.shards.folder_weights), the same
refusals in deploy, registry register and the codecs commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltaplane.errors import ConfigError
from deltaplane.shards import INDEX_NAME, WEIGHTS_NAME, folder_weights


def test_model_safetensors_first_then_the_index_then_none(tmp_path: Path) -> None:
    assert folder_weights(tmp_path) is None
    (tmp_path / INDEX_NAME).write_text("{}")
    assert folder_weights(tmp_path) == tmp_path / INDEX_NAME
    save_file({"w": torch.zeros(2)}, str(tmp_path / WEIGHTS_NAME))
    assert folder_weights(tmp_path) == tmp_path / WEIGHTS_NAME


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
