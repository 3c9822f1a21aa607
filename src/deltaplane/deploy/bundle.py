"""Read what ``deploy`` wrote (or any model file) as a state dict plus provenance, e.g. to register it.

``deltaplane registry register NAME PATH`` stores model versions as state dicts; :func:`load_deployable` turns
each accepted input into one, strictly:

- ``.safetensors``: the tensors as they are;
- ``.dpla``: the device artifact, decoded by :func:`~deltaplane.deploy.read_artifact` (magic, SHA-256, ranges
  checked): its tensors exactly as shipped (int8 codes and scales of a quantized graph included);
- ``.onnx``: the model's initializers (checked with ``onnx.checker`` first);
- a deploy output folder: its ``model.dpla``, with ``manifest.json`` recorded in the lineage;
- a Hugging Face folder: ``model.safetensors`` (or its shards), ``config.json`` whole in the lineage and the
  tokenizer's and generation config's files (:func:`~deltaplane.shards.read_companion_files`) as ``files``,
  which the registry stores and signs with the version so ``registry pull`` writes the folder back whole.

The lineage names the source file, its SHA-256 and, for artifacts, the deploy recipe and the measured quality
(sizes, fidelity, gates), so the registry can tell which compressed version came from which run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deltaplane.deploy.publish import file_sha256
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.shards import INDEX_NAME, folder_weights, load_sharded, read_companion_files
from deltaplane.textfile import MANIFEST_LIMIT, read_bounded_text, require_regular_file, safetensors_path

__all__ = ["Deployable", "load_deployable"]

_MANIFEST_KEYS = (
    "model",
    "source_sha256",  # the weights it compressed: `registry register` links the version holding them
    "task",
    "prune",
    "quant",
    "quant_scheme",
    "weight_sparsity",
    "sizes",
    "quality",
    "gates",
)


@dataclass
class Deployable:
    """A state dict to register, what it came from (``lineage`` entries) and the files that go with it (a
    Hugging Face folder's tokenizer and generation config, by name)."""

    state: dict[str, Tensor]
    lineage: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in _MANIFEST_KEYS if k in manifest}


def _folder_manifest(mf: Path, artifact_sha256: str) -> dict[str, Any]:
    """A deploy folder's ``manifest.json``, refused (:class:`DecodeError`) unless it is a JSON object that
    describes the folder's ``model.dpla``: its recorded ``sha256["model.dpla"]``, when present, must be the
    file's. Otherwise another model's quality and gates (a refused model's file copied beside a passing
    deploy's manifest) would be registered as this model's lineage. A manifest that records hashes must also
    be the one of the folder's ``model.onnx`` (the graph a device runs): one changed or swapped after the deploy,
    or one the deploy did not write (a ``--format weights`` deploy), is the same mix of two deploys."""
    text = read_bounded_text(mf, limit=MANIFEST_LIMIT, what="manifest", error=DecodeError)
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:  # recursion: nested past Python's limit
        raise DecodeError(f"{mf} is not valid JSON: {e!s:.200}") from e
    if not isinstance(manifest, dict):
        raise DecodeError(
            f"{mf} is not a deploy manifest (a JSON object); it holds a {type(manifest).__name__}"
        )
    hashes = manifest.get("sha256")
    recorded = hashes.get("model.dpla") if isinstance(hashes, dict) else None
    if recorded is not None and recorded != artifact_sha256:
        raise DecodeError(
            f"{mf} describes another model.dpla (SHA-256 {str(recorded)[:16]}…, the file's is "
            f"{artifact_sha256[:16]}…): the folder mixes two deploys; register the .dpla file alone or deploy again"
        )
    graph = mf.parent / "model.onnx"
    if isinstance(hashes, dict) and os.path.lexists(graph):
        want, have = hashes.get("model.onnx"), file_sha256(graph) if graph.is_file() else "(not a file)"
        if want != have:
            said = f"SHA-256 {str(want)[:16]}…" if want is not None else "no model.onnx"
            raise DecodeError(
                f"{mf} describes another model.onnx ({said}, the file's is {have[:16]}…): the graph beside "
                "model.dpla is not the one this deploy evaluated; register the .dpla file alone or deploy again"
            )
    return manifest


def load_deployable(path: str | os.PathLike[str]) -> Deployable:
    """The state dict and provenance of a ``.safetensors``, ``.dpla`` or ``.onnx`` file or a deploy folder.

    Raises:
        ConfigError: a path of another kind (a missing path; a FIFO, device or socket, named as such), or a
            folder without ``model.dpla``/``model.safetensors``.
        DecodeError: a file that does not decode as what its suffix says.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "model.dpla").is_file():
            out = load_deployable(p / "model.dpla")
            mf = p / "manifest.json"
            if mf.is_file():
                out.lineage["deploy"] = _summary(_folder_manifest(mf, out.lineage["source"]["sha256"]))
            return out
        hf = _hf_folder(p)
        if hf is not None:
            return hf
        raise ConfigError(
            f"{p} is not a `deltaplane run` output (model.json + model.safetensors), a deploy output "
            "(model.dpla) or a Hugging Face checkpoint (model.safetensors / model.safetensors.index.json); a .bin "
            "checkpoint must be converted first (load it with torch and save_file(state, 'model.safetensors'))"
        )
    if not os.path.lexists(p):
        raise ConfigError(f"{p} does not exist")
    require_regular_file(p, what="model file")  # a FIFO is not "missing": name what it is
    source = {"file": p.name, "sha256": file_sha256(p), "bytes": p.stat().st_size}
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        name = safetensors_path(p, what="model file")
        try:
            with safe_open(name, "pt") as f:
                meta = f.metadata() or {}
            out = Deployable(_in_recorded_order(load_file(name), meta), {"source": source})
        except (SafetensorError, OSError, ValueError) as e:
            raise DecodeError(f"{p} is not a readable safetensors file: {e}") from e
        try:  # a `deltaplane run` model's config (its architecture), so a pulled copy can be deployed
            config = json.loads(meta["config"])
        except (KeyError, ValueError):
            config = None
        if isinstance(config, dict):
            out.lineage["config"] = config
        return out
    if suffix == ".dpla":
        from deltaplane.deploy.artifact import read_artifact

        art = read_artifact(p)  # strict: DecodeError on anything malformed
        lineage = {"source": source | {"format": "dpla"}, "deploy": _summary(art.manifest)}
        return Deployable(art.state_dict(), lineage)
    if suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load(str(p))
            onnx.checker.check_model(model)
        except Exception as e:  # onnx raises its own ValidationError / DecodeError types
            raise DecodeError(f"{p} is not a valid ONNX model: {e}") from e
        state = {
            init.name: torch.from_numpy(np.array(numpy_helper.to_array(init)))
            for init in model.graph.initializer
        }
        if not state:
            raise ConfigError(f"{p} has no initializers (weights) to register")
        return Deployable(
            state, {"source": source | {"format": "onnx", "opset": model.opset_import[0].version}}
        )
    raise ConfigError(f"{p}: registry register takes .safetensors, .dpla, .onnx or a deploy output folder")


def _in_recorded_order(tensors: dict[str, Tensor], meta: dict[str, str]) -> dict[str, Tensor]:
    """``tensors`` in the order a registry file records (``deltaplane.order``, as ``registry pull`` writes it),
    else as read.

    Safetensors files keep no order of their own, so a pulled version registered again would otherwise get
    another tensor order, hence other canonical bytes and another SHA-256: a new model to the registry, cut
    off from the version (and the consent record) it was pulled from."""
    try:
        order = json.loads(meta.get("deltaplane.order", "null"))
    except ValueError:
        return tensors
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        return tensors
    if sorted(order) != sorted(tensors):  # names missing, extra or repeated: the file's own order
        return tensors
    return {k: tensors[k] for k in order}


def _hf_folder(p: Path) -> Deployable | None:
    """A Hugging Face-layout folder: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``,
    with ``config.json`` recorded in the lineage and the tokenizer and generation files kept (None when the
    folder is not one; :func:`deltaplane.shards.folder_weights` chooses, as for deploy)."""
    weights = folder_weights(p)
    if weights is None:
        return None
    if weights.name == INDEX_NAME:
        state, shards = load_sharded(p)  # the strict index reader deploy also uses
        out = Deployable(
            state,
            {
                "source": {
                    "file": weights.name,
                    "shards": [f.name for f in shards],
                    "sha256": file_sha256(weights),
                }
            },
        )
    else:
        out = load_deployable(weights)
    cfg = p / "config.json"
    if cfg.is_file():
        text = read_bounded_text(cfg, limit=MANIFEST_LIMIT, what="model config", error=DecodeError)
        try:
            conf = json.loads(text)
        except ValueError as e:
            raise DecodeError(f"{cfg} is not valid JSON: {e}") from e
        out.lineage["hf_config"] = {
            k: conf[k]
            for k in ("architectures", "model_type", "torch_dtype")
            if isinstance(conf, dict) and k in conf
        }
        if isinstance(conf, dict):  # the whole config.json: `registry pull` writes it back beside the weights
            out.lineage["config"] = conf
    out.files = read_companion_files(p)
    return out
