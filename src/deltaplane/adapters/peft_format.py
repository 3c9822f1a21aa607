"""Read and write PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

The folder is what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads. Tensor keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_embedding_A`` / ``_B`` for embeddings)
and ``base_model.model.<module>.<param>`` for ``modules_to_save``. A layer's rank and α come from ``r`` /
``lora_alpha`` unless ``rank_pattern`` / ``alpha_pattern`` name it, matched the way PEFT's ``get_pattern_key``
does (a pattern matches a module path ending in it).

Loading is strict: every PEFT feature whose meaning we would silently change is refused with
:class:`~deltaplane.errors.UnsupportedAdapter` naming the field (DoRA, bias training, initializations that
rewrite the base weights...), ranks are checked against the config, and unknown tensors are errors, not warnings.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from deltaplane.adapters.lora import LoRADelta, LoRALayer, module_of
from deltaplane.errors import AdapterError, AdapterMismatch, InvalidUpdate, UnsupportedAdapter
from deltaplane.staging import stage_dir, sweep
from deltaplane.textfile import MANIFEST_LIMIT, read_bounded_text, safetensors_path

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "check_config",
    "from_peft_state",
    "load_peft",
    "peft_config",
    "save_peft",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# initializations that only choose the starting factors; the others (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ)
# rewrite the base weights, so their factors only mean something on top of that rewritten base
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")

# field -> (value meaning "not used", what to do instead)
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA's magnitude vector is not a low-rank delta; merge the adapter with PEFT first"),
    "bias": (
        "none",
        "trained biases are not supported; use bias='none' or list the module in modules_to_save",
    ),
    "target_parameters": (None, "LoRA on nn.Parameter targets is not supported; target modules instead"),
    "use_qalora": (False, "QA-LoRA is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) is not supported"),
    "layer_replication": (None, "layer replication changes the base model's layers; not supported"),
    "trainable_token_indices": (None, "trainable tokens are not supported"),
    "megatron_config": (None, "Megatron parallel layers are not supported"),
    "use_bdlora": (None, "block-diagonal LoRA is not supported"),
    "arrow_config": (None, "Arrow routing is not supported"),
    "monteclora_config": (None, "MonteCLoRA is not supported"),
    "velora_config": (None, "VeLoRA is not supported"),
    "kasa_config": (None, "KaSA is not supported"),
    "ensure_weight_tying": (False, "tied adapter weights are not supported"),
}


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` matching ``module`` as PEFT's ``get_pattern_key`` matches it, or ``None``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _is_target(module: str, targets: Any) -> bool:
    if targets is None:
        return True  # PEFT fills defaults per architecture; the file's keys are then the truth
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _in_layers(module: str, cfg: Mapping[str, Any]) -> bool:
    """Whether ``layers_to_transform`` / ``layers_pattern`` keep ``module``, as PEFT's ``check_target_module_exists``
    decides it: only for a list of target names (or PEFT's defaults, or ``all-linear``, which PEFT expands into
    one) that ``module`` matches by suffix, not when it names ``module`` whole or is a regex. The layer index is
    the first number after a ``layers_pattern`` segment (or, without one, after the second dotted segment)."""
    indexes, patterns = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    targets = cfg.get("target_modules")
    if indexes is None or indexes == [] or (isinstance(targets, str) and targets != "all-linear"):
        return True
    if isinstance(targets, list) and module in targets:
        return True
    if not patterns:  # PEFT: an empty layers_pattern accepts any layer name
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if match := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module):
                break
    if not match:
        return False
    index = int(match["idx"])
    return index == indexes if isinstance(indexes, int) else index in indexes


def _check_layer_kind(module: str, A: Tensor, B: Tensor, where: str) -> None:
    """Raise :class:`UnsupportedAdapter` for the PEFT LoRA layers that are not ``ΔW = s · B A`` on one weight:
    a convolution's (4-D or 3-D factors, ``ΔW`` a convolution of the two kernels) and ``nn.MultiheadAttention``'s
    (PEFT adapts its packed ``in_proj_weight`` and, nested under ``base_layer``, its ``out_proj``)."""
    if ".base_layer." in f".{module}.":
        raise UnsupportedAdapter(
            f"{where}: layer '{module}' sits inside a wrapped module's base_layer, as PEFT writes LoRA on "
            "nn.MultiheadAttention; that LoRA is not supported: target its projections' nn.Linear modules instead, "
            "or merge the adapter with PEFT (merge_and_unload) and use the full weights"
        )
    if A.dim() != 2 or B.dim() != 2:
        raise UnsupportedAdapter(
            f"{where}: layer '{module}' has {A.dim()}-D factors (lora_A {tuple(A.shape)}, lora_B "
            f"{tuple(B.shape)}): LoRA on a convolution (nn.Conv1d/Conv2d/Conv3d) is not supported; merge the "
            "adapter with PEFT (merge_and_unload) and use the full weights"
        )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"'{folder}' is not a PEFT adapter folder: {CONFIG_NAME} is missing")
    text = read_bounded_text(path, limit=MANIFEST_LIMIT, what="PEFT adapter config", error=AdapterError)
    try:
        cfg = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: Any, where: str = CONFIG_NAME) -> None:
    """Raise unless ``cfg`` (an ``adapter_config.json`` dict) is a LoRA config whose meaning we keep exactly.

    Raises:
        AdapterError: not an object, or ``r`` / ``lora_alpha`` / patterns malformed.
        UnsupportedAdapter: another PEFT type, or a LoRA feature we do not handle (named in the message).
    """
    if not isinstance(cfg, dict):
        raise AdapterError(f"{where}: must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise UnsupportedAdapter(
            f"{where}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported"
        )
    for key, (unused, why) in _REFUSED.items():
        value = cfg.get(key)
        if value is not None and value != unused and value not in (False, {}, []):
            raise UnsupportedAdapter(f"{where}: {key}={value!r}: {why}")
    init = cfg.get("init_lora_weights", True)
    if init not in _SAFE_INITS:
        raise UnsupportedAdapter(
            f"{where}: init_lora_weights={init!r} rewrites the base weights, so these factors do not apply to the "
            "original base; save with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    indexes, patterns = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if indexes is not None and not (
        _is_index(indexes) or (isinstance(indexes, list) and all(_is_index(i) for i in indexes))
    ):
        raise AdapterError(
            f"{where}: 'layers_to_transform' must be a layer index or a list of them. Found {indexes!r}"
        )
    if patterns is not None and not (
        isinstance(patterns, str)
        or (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns))
    ):
        raise AdapterError(f"{where}: 'layers_pattern' must be a name or a list of names. Found {patterns!r}")
    _check_number(cfg.get("r"), "'r'", where, rank=True)
    _check_number(cfg.get("lora_alpha"), "'lora_alpha'", where, rank=False)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{where}: '{key}' must be an object. Found {cfg.get(key)!r}")
        for name, value in pattern.items():
            _check_number(value, f"{key}[{name!r}]", where, rank=key == "rank_pattern")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_number(value: Any, what: str, where: str, *, rank: bool) -> None:
    """Raise :class:`AdapterError` naming ``what`` and the file unless ``value`` is a finite positive number (an
    integer for a rank): PEFT builds its layers from these, so anything else is a broken config, not a LoRA."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and rank:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if rank else "a finite positive number"
        raise AdapterError(f"{where}: {what} must be {kind}. Found {value!r}")


def load_peft(path: str | os.PathLike[str]) -> LoRADelta:
    """Read a PEFT LoRA adapter folder into a :class:`LoRADelta`.

    Raises:
        AdapterError: the folder, config or tensor file is missing or malformed; the file holds no LoRA factor; a
            tensor key is not a LoRA factor or a ``modules_to_save`` tensor; a factor lacks its partner.
        UnsupportedAdapter: the config uses a PEFT feature we do not handle (the message names the field).
        AdapterMismatch: a layer's rank disagrees between ``lora_A``, ``lora_B`` and ``r`` / ``rank_pattern``.
        InvalidUpdate: a tensor holds NaN or Inf.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UnsupportedAdapter(
                f"{folder}: only adapter_model.bin (pickle) is present; re-save with safe_serialization=True"
            )
        raise AdapterError(f"{folder}: {WEIGHTS_NAME} is missing")
    name = safetensors_path(weights, what="adapter")
    try:
        tensors = load_file(name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights}: cannot read ({exc})") from None
    return from_peft_state(cfg, tensors, where=str(weights))


def from_peft_state(
    cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], *, where: str = "adapter"
) -> LoRADelta:
    """A :class:`LoRADelta` from a PEFT config dict and adapter state dict (``get_peft_model_state_dict``'s keys,
    with or without the ``base_model.model.`` prefix): how a LoRA trained in memory with PEFT becomes a delta.

    Raises the errors of :func:`load_peft`.
    """
    cfg = dict(cfg)
    check_config(cfg, where)
    weights = where
    save_modules = list(cfg.get("modules_to_save") or [])
    factors: dict[str, dict[str, Tensor]] = {}
    embedding: dict[str, bool] = {}
    full: dict[str, Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", name) or re.fullmatch(
            r"(.+)\.lora_embedding_(A|B)", name
        )
        if name.endswith(".lora_B.bias"):
            if not cfg.get("lora_bias", False):
                raise AdapterError(
                    f"{weights}: tensor '{key}' is a LoRA bias but {CONFIG_NAME} has lora_bias=false, so PEFT "
                    'would ignore it; set "lora_bias": true to apply it (or delete the tensor to drop it)'
                )
            factors.setdefault(name.removesuffix(".lora_B.bias"), {})["bias"] = t
            continue
        if m:
            module, which = m.group(1), m.group(2)
            is_emb = "lora_embedding_" in name
            if embedding.setdefault(module, is_emb) != is_emb:
                raise AdapterError(f"{weights}: module '{module}' has both lora_A/B and lora_embedding_A/B")
            factors.setdefault(module, {})[which] = t
            continue
        module = name.rsplit(".", 1)[0]
        if any(module == s or module.endswith("." + s) for s in save_modules):
            full[name] = t
            continue
        raise AdapterError(
            f"{weights}: unexpected tensor '{key}' (neither a LoRA factor nor in modules_to_save {save_modules})"
        )

    targets = cfg.get("target_modules")
    if not factors:
        # A file emptied by a failed save (or holding only saved modules) would load as an adapter that changes no
        # LoRA layer, so merging or federating it would silently do nothing; refuse it while the file is named.
        raise AdapterError(
            f"{weights}: holds no lora_A/lora_B tensors although {CONFIG_NAME} targets {targets!r}; "
            "re-save the adapter (an adapter with no LoRA layers changes nothing)"
        )
    excluded = cfg.get("exclude_modules")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    layers: dict[str, LoRALayer] = {}
    for module, ab in factors.items():
        if not {"A", "B"} <= set(ab):
            missing = "B" if "A" in ab else "A"
            raise AdapterError(f"{weights}: layer '{module}' has no lora_{missing} factor")
        _check_layer_kind(module, ab["A"], ab["B"], weights)
        if not _is_target(module, targets) or (excluded and _is_target(module, excluded)):
            raise AdapterError(
                f"{weights}: layer '{module}' is not covered by target_modules={targets!r} "
                f"(exclude_modules={excluded!r}); add it to target_modules"
            )
        if not _in_layers(module, cfg):
            raise AdapterError(
                f"{weights}: layer '{module}' is outside layers_to_transform={cfg.get('layers_to_transform')!r} "
                f"(layers_pattern={cfg.get('layers_pattern')!r}), so PEFT would not apply it; add its layer to "
                "layers_to_transform or delete its factors"
            )
        rk = pattern_key(rank_pattern, module)
        r_cfg = rank_pattern[rk] if rk is not None else cfg["r"]
        ak = pattern_key(alpha_pattern, module)
        alpha = alpha_pattern[ak] if ak is not None else cfg["lora_alpha"]
        A, B = ab["A"], ab["B"]
        try:
            layer = LoRALayer(
                A,
                B,
                alpha=float(alpha),
                rslora=bool(cfg.get("use_rslora", False)),
                embedding=embedding.get(module, False),
                fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)) and not embedding.get(module, False),
                bias=ab.get("bias"),
            )
        except AdapterError as exc:
            raise type(exc)(f"{weights}: layer '{module}': {exc}") from None
        if layer.rank != r_cfg:
            where = f"rank_pattern[{rk!r}]" if rk is not None else "r"
            raise AdapterMismatch(
                f"{weights}: layer '{module}' has rank {layer.rank} but {CONFIG_NAME} says {where}={r_cfg}; "
                f"fix {where} (or add '{module}' to rank_pattern)"
            )
        layers[module + ".weight"] = layer
    lora = LoRADelta(
        layers,
        modules_to_save=full,
        base_model=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type"),
    )
    try:
        lora.check_finite()
    except InvalidUpdate as exc:
        raise InvalidUpdate(f"{weights}: {exc}") from None
    return lora


def peft_config(lora: LoRADelta) -> dict[str, Any]:
    """The ``adapter_config.json`` content describing ``lora`` for PEFT.

    The most common (rank, α) becomes ``r`` / ``lora_alpha``; other layers go to ``rank_pattern`` /
    ``alpha_pattern`` under their escaped full module path, which PEFT matches to that module only.
    """
    if not lora:
        raise AdapterError("cannot describe an adapter with no LoRA layers for PEFT")
    flags = {(layer.rslora, layer.fan_in_fan_out) for layer in lora.values() if not layer.embedding}
    rslora = {layer.rslora for layer in lora.values()}
    if len(rslora) > 1 or len(flags) > 1:
        fifo = sorted(name for name, layer in lora.items() if layer.fan_in_fan_out)
        mixed = f" (fan_in_fan_out on {fifo[:3]}, not on the others)" if len(flags) > 1 else ""
        raise UnsupportedAdapter(
            "PEFT stores use_rslora and fan_in_fan_out once per adapter; this adapter mixes them across "
            f"layers{mixed}: save its layers as two adapters (extract-lora --include / --exclude)"
        )
    r, alpha = Counter((layer.rank, layer.alpha) for layer in lora.values()).most_common(1)[0][0]
    rank_pattern, alpha_pattern = {}, {}
    for name, layer in lora.items():
        key = re.escape(module_of(name))
        if layer.rank != r:
            rank_pattern[key] = layer.rank
        if layer.alpha != alpha:
            alpha_pattern[key] = _number(layer.alpha)
    modules = sorted({name.rsplit(".", 1)[0] for name in lora.modules_to_save})
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": lora.base_model,
        "task_type": lora.task_type,
        "r": r,
        "lora_alpha": _number(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(module_of(name) for name in lora),
        "modules_to_save": modules or None,
        "use_rslora": next(iter(rslora)),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in lora.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": any(layer.bias is not None for layer in lora.values()),
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft(lora: LoRADelta, path: str | os.PathLike[str]) -> None:
    """Write ``lora`` as a PEFT adapter folder, atomically (never a half-written folder or file).

    Raises:
        AdapterError: the adapter has no layers.
        UnsupportedAdapter: layers disagree on settings PEFT keeps per adapter (rslora, fan-in-fan-out).
    """
    from safetensors.torch import save_file

    folder = Path(path)
    cfg = peft_config(lora)
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in lora.factors().items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep(folder)  # staging of a killed save into the same folder
    tmp = stage_dir(folder)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        if not folder.exists():
            os.replace(tmp, folder)
            return
        folder.mkdir(exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # each file replaced atomically
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
