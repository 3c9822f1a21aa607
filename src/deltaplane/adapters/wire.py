"""Adapters on the wire: any codec compresses a :class:`LoRADelta`'s factors; the payload restores the adapter.

The factors are an ordinary :class:`~deltaplane.delta.Delta` (:meth:`LoRADelta.factors`), so every codec,
pipeline and error-feedback :class:`~deltaplane.codecs.Compressor` applies unchanged and the payload is the usual
framed wire format. What makes factors an adapter again — each layer's ``α``, rslora and layout flags, which
tensors are saved in full — travels in the header's ``meta`` under ``"lora"`` and is validated as strictly as the
tensors: a payload whose metadata does not match its tensors is a :class:`~deltaplane.errors.DecodeError`.

Sending an adapter rather than its materialized change is the large saving: ``r (out + in)`` values per layer
instead of ``out · in``, before any codec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from deltaplane.adapters.lora import LoRADelta, LoRALayer
from deltaplane.codecs import Compressor, Limits, decompress, read_header
from deltaplane.codecs.base import Codec
from deltaplane.errors import AdapterError, DecodeError

__all__ = ["adapter_meta", "compress_adapter", "decompress_adapter", "lora_from_factors"]


def adapter_meta(lora: LoRADelta) -> dict[str, Any]:
    """The header metadata that turns ``lora.factors()`` back into ``lora``."""
    return {
        "layers": {
            name: [layer.alpha, layer.rslora, layer.embedding, layer.fan_in_fan_out, layer.bias is not None]
            for name, layer in lora.items()
        },
        "full": list(lora.modules_to_save),
        "task_type": lora.task_type or "",
    }


def lora_from_factors(meta: Any, factors: Mapping, *, where: str = "payload") -> LoRADelta:
    """Rebuild an adapter from :func:`adapter_meta`'s metadata and the factor tensors; strict.

    Raises:
        DecodeError: the metadata is malformed or does not name exactly the tensors present.
    """
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("layers"), dict)
        or not isinstance(meta.get("full"), list)
    ):
        raise DecodeError(f"{where}: adapter metadata must hold 'layers' (object) and 'full' (list)")
    layers: dict[str, LoRALayer] = {}
    expected: set[str] = set()
    for name, spec in meta["layers"].items():
        if not (
            isinstance(spec, list)
            and len(spec) == 5
            and isinstance(spec[0], int | float)
            and not isinstance(spec[0], bool)
            and math.isfinite(spec[0])
            and all(isinstance(x, bool) for x in spec[1:])
        ):
            raise DecodeError(
                f"{where}: adapter metadata for layer '{name}' must be [alpha, rslora, embedding, fan_in_fan_out, bias]"
            )
        alpha, rslora, embedding, fifo, has_bias = spec
        module = name.removesuffix(".weight")
        ka, kb = (
            (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B")
            if embedding
            else (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
        )
        kbias = f"{module}.lora_B.bias"
        need = [ka, kb, *([kbias] if has_bias else [])]
        missing = [k for k in need if k not in factors]
        if missing:
            raise DecodeError(f"{where}: adapter layer '{name}' lacks tensor(s) {missing}")
        expected.update(need)
        try:
            layers[name] = LoRALayer(
                factors[ka],
                factors[kb],
                float(alpha),
                rslora,
                embedding,
                fifo,
                factors[kbias] if has_bias else None,
            )
        except AdapterError as exc:
            raise DecodeError(f"{where}: adapter layer '{name}': {exc}") from None
    full = meta["full"]
    if not all(isinstance(k, str) for k in full):
        raise DecodeError(f"{where}: adapter metadata 'full' must list tensor names")
    missing = [k for k in full if k not in factors]
    if missing:
        raise DecodeError(f"{where}: adapter full tensor(s) {missing[:5]} are missing")
    expected.update(full)
    extra = sorted(set(factors) - expected)
    if extra:
        raise DecodeError(
            f"{where}: tensor(s) {extra[:5]} are not part of the adapter its metadata describes"
        )
    task_type = meta.get("task_type", "")
    if not isinstance(task_type, str) or len(task_type) > 64:
        raise DecodeError(f"{where}: adapter metadata 'task_type' must be a short string (a PEFT task type)")
    return LoRADelta(layers, modules_to_save={k: factors[k] for k in full}, task_type=task_type or None)


def compress_adapter(
    lora: LoRADelta,
    codec: str | Codec | Compressor = "identity",
    *,
    base_id: str = "",
    base_version: int = 0,
    seed: int = 0,
) -> bytes:
    """Encode ``lora``'s factors with ``codec`` (a spec, a codec, or a device's :class:`Compressor` with its
    error-feedback state) into one wire payload that :func:`decompress_adapter` reads."""
    comp = codec if isinstance(codec, Compressor) else Compressor(codec, error_feedback=False, seed=seed)
    return comp.compress(
        lora.factors(), base_id=base_id, base_version=base_version, meta={"lora": adapter_meta(lora)}
    )


def decompress_adapter(
    payload: bytes, *, expect_base: tuple[str, int] | None = None, limits: Limits | None = None
) -> LoRADelta:
    """Decode a payload from :func:`compress_adapter`, strictly (see :func:`deltaplane.codecs.decompress`).

    Raises:
        DecodeError: a malformed payload, or one that does not carry an adapter.
        VersionMismatch: ``expect_base`` differs from the payload's base.
    """
    header = read_header(payload, limits=limits)
    if "lora" not in header.meta:
        raise DecodeError("payload carries a plain delta, not an adapter (no 'lora' metadata)")
    factors = decompress(payload, expect_base=expect_base, limits=limits)
    return lora_from_factors(header.meta["lora"], factors)
