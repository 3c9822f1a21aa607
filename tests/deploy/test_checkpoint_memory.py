"""load_checkpoint holds at most a chunk of the weights besides the model, and loads the same values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from deltaplane.deploy import checkpoint
from deltaplane.deploy.checkpoint import load_checkpoint


def _mlp(cfg: dict) -> nn.Module:
    return nn.Sequential(*(nn.Linear(cfg["width"], cfg["width"]) for _ in range(cfg["layers"])))


def _spy_on_loads(state: dict[str, torch.Tensor], monkeypatch) -> tuple[int, list[int]]:
    """Chunks of twice ``state``'s largest tensor; the bytes of every ``load_state_dict`` call, as they come."""
    largest = max(v.numel() * v.element_size() for v in state.values())
    monkeypatch.setattr(checkpoint, "LOAD_CHUNK_BYTES", 2 * largest, raising=False)
    seen: list[int] = []
    original = nn.Module.load_state_dict

    def spy(self, sd, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(sum(v.numel() * v.element_size() for v in sd.values()))
        return original(self, sd, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    return largest, seen


def test_weights_are_copied_in_chunks_with_the_values_load_file_gave(tmp_path: Path, monkeypatch) -> None:
    """load_file read the whole state dict before load_state_dict copied it in, so loading held the weights
    twice (the MiniLM deploy's load peaked at 653 MB, 571 MB in chunks). The file is now memory-mapped and copied
    LOAD_CHUNK_BYTES at a time: no load_state_dict call gets more than a chunk plus one tensor."""
    torch.manual_seed(0)
    src = _mlp({"width": 64, "layers": 6})
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"architecture": "MLP", "width": 64, "layers": 6}')
    largest, seen = _spy_on_loads(state, monkeypatch)
    ck = load_checkpoint(folder, builder=_mlp)
    assert len(seen) > 1 and max(seen) <= 3 * largest, seen
    assert all(torch.equal(ck.model.state_dict()[k], v) for k, v in state.items())
    data = (folder / "model.safetensors").read_bytes()
    assert ck.sha256 == hashlib.sha256(data).hexdigest() and ck.weights_nbytes == len(data)


def test_a_sharded_folder_is_copied_in_by_chunks_too(tmp_path: Path, monkeypatch) -> None:
    """A sharded folder (model.safetensors.index.json + shards) was read whole by load_sharded before
    load_state_dict copied it in: the weights twice, as the one-file load held them before it was chunked. Its
    shards are now read by header (the strict index checks unchanged) and copied in like one file, a chunk at
    a time; values and the SHA-256 of the shards in index order are what they were."""
    import json

    torch.manual_seed(0)
    src = _mlp({"width": 64, "layers": 6})
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    folder = tmp_path / "ck"
    folder.mkdir()
    names = list(state)
    weight_map = {}
    for i, half in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in half}, str(folder / shard))
        weight_map |= dict.fromkeys(half, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"architecture": "MLP", "width": 64, "layers": 6}')
    largest, seen = _spy_on_loads(state, monkeypatch)
    ck = load_checkpoint(folder, builder=_mlp)
    assert len(seen) > 2 and max(seen) <= 3 * largest, seen
    assert all(torch.equal(ck.model.state_dict()[k], v) for k, v in state.items())
    data = b"".join((folder / f"model-{i:05d}-of-00002.safetensors").read_bytes() for i in (1, 2))
    assert ck.sha256 == hashlib.sha256(data).hexdigest() and ck.weights_nbytes == len(data)
