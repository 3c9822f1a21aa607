"""Load a checkpoint (config + safetensors weights) into a model, refusing weights that do not fit the config.

Two layouts are read:

- a Hugging Face–style folder: ``config.json`` (with ``"architectures": ["BertModel"]`` or ``"architecture"``)
  next to ``model.safetensors``;
- a single ``.safetensors`` file whose metadata holds ``"config"`` (JSON with an ``"architecture"`` key).

The architecture is resolved, in order, from: a builder passed by the caller (a callable, ``"pkg.mod:fn"`` or
``"path/to/file.py:fn"``, what ``deploy --builder`` takes); the registry of builders (``config dict ->
nn.Module``, :func:`register_architecture`); the ``deltaplane.architectures`` entry-point group of installed
packages (an entry point named like the architecture, pointing at a builder); and finally any class that
``transformers`` exports under the name in ``architectures`` (BERT-like encoders, ``*ForSequenceClassification``,
``GPT2LMHeadModel``...), built offline from the config alone (``AutoConfig.for_model(model_type, ...)``).
:func:`infer_task` says what a loaded model does (sentence embedding, text classification, next-token, or a
tensor classifier), which decides how ``deploy`` evaluates it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltaplane.errors import ConfigError, DecodeError, ShapeMismatch
from deltaplane.shards import INDEX_NAME, folder_weights, shard_shapes
from deltaplane.textfile import (
    MANIFEST_LIMIT,
    atomic_write_bytes,
    read_bounded_text,
    require_regular_file,
    safetensors_path,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Checkpoint",
    "available_architectures",
    "infer_task",
    "load_checkpoint",
    "register_architecture",
    "resolve_builder",
    "save_checkpoint",
]

ENTRY_POINT_GROUP = "deltaplane.architectures"

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


def import_file(path: Path, what: str) -> Any:
    """Import the Python file ``path`` (a ``--builder`` or ``--evaluator`` given as ``file.py:function``) as
    ``python path`` would run it: its folder goes first on ``sys.path`` (and stays), so the file can import the
    modules beside it — a user's evaluator importing their own model class from ``train.py`` failed with
    ``No module named 'train'`` unless the shell's working directory happened to be on the path.

    Raises:
        ConfigError: the file does not exist or is not importable as a module (``what`` names its role).
    """
    import importlib.util
    import sys

    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_spec = importlib.util.spec_from_file_location(f"_deltaplane_{what}_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def resolve_builder(spec: str | Builder) -> Builder:
    """A builder from ``"pkg.mod:fn"`` (importable module) or ``"path/to/file.py:fn"`` (a file), or a callable.

    Raises ``ConfigError`` naming what is missing, so a typo in ``--builder`` is one line, not a traceback.
    """
    import importlib

    if callable(spec):
        return spec
    mod_name, sep, fn_name = str(spec).rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"builder {spec!r} must look like 'pkg.module:function' or 'file.py:function'")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            module = import_file(Path(mod_name), "builder")
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # an import error inside the user's module: say where, in one line
        raise ConfigError(f"cannot import builder module {mod_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{mod_name} has no callable {fn_name!r}")
    return fn


def _entry_point_builder(arch: str) -> Builder | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == arch:
            try:
                return ep.load()
            except Exception as e:
                raise ConfigError(
                    f"entry point {ep.value!r} for architecture {arch!r} failed to load: {e}"
                ) from e
    return None


def _hf_builder(arch: str, config: dict[str, Any]) -> Builder | None:
    """Any ``transformers`` model class named ``arch``, built from the config alone (no download)."""
    if "model_type" not in config:
        return None
    try:
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "config_class")):
        return None

    def build(cfg: dict[str, Any]) -> nn.Module:
        from transformers import AutoConfig

        rest = {k: v for k, v in cfg.items() if k not in ("architecture", "model_type")}
        try:
            hf_cfg = AutoConfig.for_model(cfg["model_type"], **rest)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"transformers cannot build a {cfg['model_type']!r} config: {e}") from e
        hf_cfg._attn_implementation = "eager"  # plain ops: exports to ONNX and differentiates everywhere
        return cls(hf_cfg)

    return build


def _builder_for(arch: str, config: dict[str, Any]) -> Builder:
    if arch in _ARCHITECTURES:
        return _ARCHITECTURES[arch]
    found = _entry_point_builder(arch) or _hf_builder(arch, config)
    if found is None:
        raise ConfigError(
            f"unknown architecture {arch!r}; known: {', '.join(available_architectures())}, any "
            f"transformers class (config.json with model_type), an entry point in group {ENTRY_POINT_GROUP!r}, "
            "or pass --builder pkg.module:function"
        )
    return found


def infer_task(checkpoint: Checkpoint) -> str:
    """What the model does, for evaluation: ``sentence-embedding``, ``text-classification``, ``next-token`` or
    ``classification`` (a tensor-in, logits-out model such as an image classifier).

    A config may say so itself (``"task": ...``); otherwise the architecture name decides: Hugging Face
    ``*ForSequenceClassification`` → text classification, ``*LMHeadModel`` / ``*ForCausalLM`` → next token, any
    other ``transformers`` model with a ``model_type`` → sentence embedding (mean pooling of its last hidden
    state); everything else is a tensor classifier.
    """
    task = checkpoint.config.get("task")
    if task:
        return str(task)
    arch = checkpoint.architecture
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith(("LMHeadModel", "ForCausalLM")):
        return "next-token"
    if "model_type" in checkpoint.config or arch == "BertModel":
        return "sentence-embedding"
    return "classification"


def _tied_aliases(model: nn.Module, present: set[str]) -> set[str]:
    """Names of tensors that share storage with a present one (a decoder's LM head tied to its embedding):
    safetensors checkpoints store such a tensor once, so its other names are not missing."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    out: set[str] = set()
    for names in by_ptr.values():
        if len(names) > 1 and present.intersection(names):
            out.update(n for n in names if n not in present)
    return out


@dataclass
class Checkpoint:
    """A loaded model with where it came from: config, SHA-256 of the weights file and its size in bytes."""

    model: nn.Module
    config: dict[str, Any]
    architecture: str
    sha256: str
    weights_nbytes: int
    path: Path


def load_checkpoint(path: str | os.PathLike[str], *, builder: str | Builder | None = None) -> Checkpoint:
    """Build the model its config names and load its weights strictly.

    ``builder`` (a callable or ``"pkg.mod:fn"`` / ``"file.py:fn"``) builds the model from the config instead of
    the architecture lookup (module docstring); the config then need not name an architecture, and a
    ``.safetensors`` file without ``config`` metadata (a federated task's model, as ``registry pull`` writes it)
    is built from the empty config ``{}``.

    Raises:
        ConfigError: missing files, a checkpoint or weights file that is not a regular file (a FIFO would block
            the reader for good), a config that is not a JSON object (config.json or the ``config`` metadata),
            no architecture named, or an unknown architecture.
        DecodeError: the weights file is not readable safetensors (truncated, junk); the message names it. A
            sharded folder (``model.safetensors.index.json`` + shards, as ``deltaplane merge --max-shard-size``
            writes) is read through :func:`deltaplane.shards.load_sharded`, which refuses a hostile or
            inconsistent index the same way.
        ShapeMismatch: the weights do not match the config (missing/unexpected tensors, wrong shapes); the
            message lists them, so a config/weights mix-up is caught before anything is pruned or shipped.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.is_dir():
        # model.safetensors, else a `deltaplane merge --max-shard-size` output's index (read through it below)
        weights, cfg_path = folder_weights(p), p / "config.json"
        if weights is None or not cfg_path.exists():
            raise ConfigError(
                f"{p} must hold config.json and model.safetensors (or {INDEX_NAME} and the shards it names)"
            )
        text = read_bounded_text(cfg_path, limit=MANIFEST_LIMIT, what="model config")
        try:
            config = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
    elif p.suffix == ".safetensors" and p.exists():
        weights = require_regular_file(p, what="checkpoint")  # safe_open would block on a FIFO for good
        name = safetensors_path(p, what="checkpoint")
        try:
            with safe_open(name, "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise DecodeError(f"{p} is not a readable safetensors file: {e}") from e
        if "config" not in meta and builder is None:
            # a model the fleet or `deltaplane run --task` federated is plain weights: its task's code builds it
            raise ConfigError(
                f"{p} has no 'config' metadata, so nothing says which model it holds: pass --builder "
                "file.py:function (a function(config) -> nn.Module that builds your model; config is {} here), "
                "or put a config.json beside it in a folder"
            )
        try:
            config = json.loads(meta["config"]) if "config" in meta else {}
        except ValueError as e:
            raise ConfigError(f"the 'config' metadata of {p} is not valid JSON: {e}") from e
        cfg_path = p
    else:
        raise ConfigError(f"{p} is neither a checkpoint folder nor a .safetensors file")
    if not isinstance(config, dict):
        raise ConfigError(
            f"the config of {p} ({cfg_path.name}) must be a JSON object, not {type(config).__name__}"
        )
    arch = config.get("architecture") or (config.get("architectures") or [None])[0]
    if builder is not None:
        build = resolve_builder(builder)
        arch = arch or getattr(build, "__name__", "custom")
    elif arch is None:
        raise ConfigError(
            f"config of {p} names no architecture ('architecture' or 'architectures'); or pass a builder"
        )
    else:
        build = _builder_for(arch, config)
    try:
        model = build(config)
    except ConfigError:
        raise
    except Exception as e:  # the user's builder or transformers refused the config
        raise ConfigError(f"building {arch!r} from the config of {p} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the builder for {arch!r} returned {type(model).__name__}, not a torch nn.Module")
    if weights.name == INDEX_NAME:
        # strict index: shards inside the folder, each tensor where it claims; headers only, the weights are
        # copied in below one shard and chunk at a time
        shapes, shards = shard_shapes(p)
        files = list(shards)
    else:  # a regular file: require_regular_file above, or folder_weights for a folder's model.safetensors
        name = safetensors_path(weights, what="weights file")
        try:  # the header only: tensors are read one chunk at a time once they are known to fit (below)
            with safe_open(name, "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:  # truncated, junk, or a header that lies
            raise DecodeError(
                f"{weights} is not a readable safetensors file: {e}; re-save the checkpoint or copy it again"
            ) from e
        shards, files = {weights: list(shapes)}, [weights]
    # HF BERT checkpoints may carry a pooler we do not build, or a "bert." prefix from task heads.
    expected = model.state_dict()
    # Older checkpoints also save buffers that newer model code keeps non-persistent (BERT's position_ids):
    # they are derived data, not weights, so they are dropped rather than reported as unexpected.
    derived = {n for n, _ in model.named_buffers()} - set(expected)
    keep = [k for k in shapes if k in expected or not (k.startswith("pooler.") or k in derived)]
    missing = sorted(set(expected) - set(keep) - _tied_aliases(model, set(keep)))
    unexpected = sorted(set(keep) - set(expected))
    wrong = [
        f"{k}: weights {shapes[k]} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in shapes and shapes[k] != tuple(expected[k].shape)
    ]
    del expected  # references to every parameter: not needed while the weights are copied in
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
    kept = set(keep)
    for f, names in shards.items():  # one file, or each shard in index order
        _load_in_chunks(model, f, [k for k in names if k in kept])
    model.eval()
    # one file: its SHA-256; shards: the SHA-256 of their bytes in index order (the index itself only routes)
    digest, nbytes = hashlib.sha256(), 0
    for f in files:
        with f.open("rb") as fh:  # in blocks: the whole file read at once was another copy of the weights
            for block in iter(functools.partial(fh.read, 1 << 20), b""):
                digest.update(block)
                nbytes += len(block)
    return Checkpoint(model, config, arch, digest.hexdigest(), nbytes, weights)


LOAD_CHUNK_BYTES = 64 * 2**20
"""Most bytes of weights read from the file before they are copied into the model (see :func:`_load_in_chunks`)."""


def _load_in_chunks(model: nn.Module, weights: Path, names: list[str]) -> None:
    """Copy the tensors ``names`` of the safetensors file ``weights`` into ``model``, :data:`LOAD_CHUNK_BYTES` at
    a time, through ``load_state_dict`` (so a module's own loading hooks still run).

    ``load_file`` read the whole state dict first, so loading held the weights twice (the model's parameters
    and the file's tensors) until it returned; here the file is memory-mapped by ``safe_open`` and at most a
    chunk is held besides the model. The values are the same: ``load_state_dict`` copies either way.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(safetensors_path(weights, what="weights file"), "pt") as f:
            chunk: dict[str, Tensor] = {}
            held = 0
            for k in names:
                chunk[k] = f.get_tensor(k)
                held += chunk[k].numel() * chunk[k].element_size()
                if held >= LOAD_CHUNK_BYTES:
                    model.load_state_dict(chunk, strict=False)
                    chunk, held = {}, 0
            model.load_state_dict(chunk, strict=False)
    except (SafetensorError, OSError, ValueError) as e:  # the file changed or is damaged past its header
        raise DecodeError(
            f"{weights} is not a readable safetensors file: {e}; re-save the checkpoint or copy it again"
        ) from e


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
