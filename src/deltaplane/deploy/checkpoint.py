"""Load a checkpoint (config + safetensors weights) into a model, refusing weights that do not fit the config.

Two layouts are read:

- a Hugging Face–style folder: ``config.json`` (with ``"architectures": ["BertModel"]`` or ``"architecture"``)
  next to ``model.safetensors``;
- a single ``.safetensors`` file whose metadata holds ``"config"`` (JSON with an ``"architecture"`` key).

Architectures are looked up in a registry of builders (``config dict -> nn.Module``) so that this layer does not
import the simulator or transformers until asked; runtimes register their own models
(:func:`register_architecture`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltaplane.delta import atomic_write_bytes
from deltaplane.errors import ConfigError, ShapeMismatch

__all__ = [
    "Checkpoint",
    "available_architectures",
    "load_checkpoint",
    "register_architecture",
    "save_checkpoint",
]

Builder = Callable[[dict[str, Any]], nn.Module]
_ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str, builder: Builder) -> None:
    """Make ``name`` loadable: ``builder(config)`` returns an untrained model of that architecture."""
    _ARCHITECTURES[name] = builder


def available_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def _bert(config: dict[str, Any]) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "architecture")}
    return BertModel(BertConfig(**cfg), add_pooling_layer=False)


register_architecture("BertModel", _bert)


@dataclass
class Checkpoint:
    """A loaded model with where it came from: config, SHA-256 of the weights file and its size in bytes."""

    model: nn.Module
    config: dict[str, Any]
    architecture: str
    sha256: str
    weights_nbytes: int
    path: Path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Build the model its config names and load its weights strictly.

    Raises:
        ConfigError: missing files, no architecture named, or an unknown architecture.
        ShapeMismatch: the weights do not match the config (missing/unexpected tensors, wrong shapes); the
            message lists them, so a config/weights mix-up is caught before anything is pruned or shipped.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        weights, cfg_path = p / "model.safetensors", p / "config.json"
        if not weights.exists() or not cfg_path.exists():
            raise ConfigError(f"{p} must hold config.json and model.safetensors")
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
    elif p.suffix == ".safetensors" and p.exists():
        weights = p
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ConfigError(
                f"{p} has no 'config' metadata; put a config.json beside it in a folder instead"
            )
        config = json.loads(meta["config"])
    else:
        raise ConfigError(f"{p} is neither a checkpoint folder nor a .safetensors file")
    arch = config.get("architecture") or (config.get("architectures") or [None])[0]
    if arch is None:
        raise ConfigError(f"config of {p} names no architecture ('architecture' or 'architectures')")
    if arch not in _ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(available_architectures())}")
    model = _ARCHITECTURES[arch](config)
    state = load_file(str(weights))
    # HF BERT checkpoints may carry a pooler we do not build, or a "bert." prefix from task heads.
    expected = model.state_dict()
    # Older checkpoints also save buffers that newer model code keeps non-persistent (BERT's position_ids):
    # they are derived data, not weights, so they are dropped rather than reported as unexpected.
    derived = {n for n, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k in expected or not (k.startswith("pooler.") or k in derived)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: weights {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise ShapeMismatch(
            f"weights in {weights} do not match the {arch} config: "
            + "; ".join(
                s
                for s in (
                    f"missing {missing[:5]}" if missing else "",
                    f"unexpected {unexpected[:5]}" if unexpected else "",
                    f"shape mismatch {wrong[:5]}" if wrong else "",
                )
                if s
            )
            + ". Check that config.json belongs to these weights."
        )
    model.load_state_dict(state, strict=False)
    model.eval()
    data = weights.read_bytes()
    return Checkpoint(model, config, arch, hashlib.sha256(data).hexdigest(), len(data), weights)


def save_checkpoint(
    state: Mapping[str, Tensor] | nn.Module, path: str | os.PathLike[str], config: Mapping[str, Any]
) -> Path:
    """Write a checkpoint folder :func:`load_checkpoint` reads: ``config.json`` + ``model.safetensors``.

    ``config`` must name the architecture (``{"architecture": "DigitsCNN", ...}``), e.g. for the final global
    model of a simulation (``RunResult.final_state``). Both files are written atomically.
    """
    from safetensors.torch import save

    if not (config.get("architecture") or config.get("architectures")):
        raise ConfigError("config must name the architecture ('architecture' or 'architectures')")
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    folder = Path(path)
    atomic_write_bytes(
        folder / "model.safetensors", save({k: v.detach().contiguous() for k, v in tensors.items()})
    )
    atomic_write_bytes(folder / "config.json", (json.dumps(dict(config), indent=2) + "\n").encode())
    return folder
