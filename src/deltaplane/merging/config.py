"""Merge configs in mergekit's YAML format, so users can bring the configs they already have, unchanged.

Accepted, with mergekit's meaning::

    merge_method: ties            # any name from deltaplane.merging.available_methods()
    base_model: ./base            # folder (HF layout) or .safetensors file; may also be listed under models
    models:                       # either models ...
      - model: ./math             # or the long form {model: {path: ./math}}
        parameters: {weight: 1.0, density: [1, 0.7, 0.1]}   # a gradient over the layers
      - model: ./code
        parameters:
          weight: [{filter: self_attn, value: 0.5}, {value: 1.0}]   # per-tensor filters
    # slices:                     # ... or slices: layer ranges stacked into a new model (frankenmerges)
    #   - sources: [{model: ./a, layer_range: [0, 4]}]
    #   - sources: [{model: ./b, layer_range: [2, 6]}]
    parameters: {normalize: true, density: 0.2, int8_mask: true}   # shared, or a default for per-model ones
    dtype: bfloat16               # compute dtype, as in mergekit (inputs are cast to it)
    out_dtype: bfloat16           # optional output dtype
    tokenizer_source: base        # base | union | a model: whose tokenizer files the output gets
    chat_template: chatml         # chatml | auto | a Jinja template
    name: my-merge                # the model card's title

**Parameter settings** (:func:`evaluate_setting`, as mergekit's): a scalar; a *gradient* — a list of numbers
interpolated linearly over the layers, ``t = layer / (layers − 1)`` (tensors outside the numbered layers —
embeddings, final norms, heads — take ``t = 0``; a list of non-numbers picks ``values[int(t (n − 1))]``); or a list
of ``{filter, value}`` conditions, the first whose ``filter`` is a substring of the tensor name winning (no
``filter`` or ``*`` matches all). Precedence: a model's (slice source's) own parameters, then the slice's, then
the global ``parameters:``.

Relative model paths are resolved against the folder of the YAML file. What cannot be done offline or without
re-aligning embeddings is refused with the reason: hub ids (nothing is downloaded), LoRA ``model+adapter``
references, ``modules``, ``tokenizer.tokens`` and tokenizers whose vocabularies differ.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deltaplane.errors import ConfigError
from deltaplane.merging.checkpoint import parse_dtype
from deltaplane.textfile import read_config_text
from deltaplane.yamlio import describe_yaml_error, load_yaml

__all__ = [
    "MergeConfig",
    "ModelEntry",
    "SliceDefinition",
    "SliceSource",
    "TokenizerSettings",
    "evaluate_setting",
    "load_config",
]

_LONG_FORM = "a path string, or mergekit's long form {model: {path: ...}}"


def _model_ref(v: Any) -> Any:
    """mergekit's model reference forms → a path string; LoRA references are refused with what to do instead."""
    if isinstance(v, dict):
        if v.get("lora"):
            raise ValueError(
                f"{v!r}: LoRA adapter references are not supported here; merge the adapter into its model first"
            )
        inner = v.get("model", v.get("path"))
        if isinstance(inner, dict):
            inner = inner.get("path")
        if not isinstance(inner, str):
            raise ValueError(f"a model must be {_LONG_FORM}. Found {v!r}")
        v = inner
    elif not isinstance(v, str):
        raise ValueError(f"a model must be {_LONG_FORM}. Found {v!r}")
    if "+" in v and not Path(v).exists():
        raise ValueError(f"'{v}': LoRA 'model+adapter' references are not supported; merge the adapter first")
    return v


def _check_setting(v: Any, where: str = "parameter") -> Any:
    """A parameter setting must be a scalar, a gradient list or filter conditions (see the module docstring)."""
    scalar = (bool, int, float, str)
    if v is None or isinstance(v, scalar):
        return v
    if isinstance(v, dict):
        extra = set(v) - {"filter", "value"}
        if "value" not in v or extra:
            raise ValueError(f"a {where} condition needs 'value' and optionally 'filter'. Found {v!r}")
        if v.get("filter") is not None and not isinstance(v["filter"], str):
            raise ValueError(f"a {where} filter must be a string. Found {v['filter']!r}")
        _check_setting(v["value"], where)
        return v
    if isinstance(v, list):
        if all(isinstance(e, scalar) for e in v):
            return v
        for e in v:
            if not isinstance(e, dict):
                raise ValueError(f"a {where} list mixes values and conditions: {v!r}")
            _check_setting(e, where)
        return v
    raise ValueError(f"a {where} must be a number, a list (gradient) or filter conditions. Found {v!r}")


def _parameters(v: Any) -> Any:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"parameters must be a mapping. Found {v!r}")
    for key, value in v.items():
        _check_setting(value, f"parameter '{key}'")
    return v


def _optional_model_ref(v: Any) -> Any:
    return v if v is None else _model_ref(v)


# a model reference and a parameters block are validated alike wherever they stand
_ModelRef = Annotated[str, BeforeValidator(_model_ref)]
_OptionalModelRef = Annotated[str | None, BeforeValidator(_optional_model_ref)]
_Parameters = Annotated[dict[str, Any], BeforeValidator(_parameters)]


def evaluate_setting(
    setting: Any, tensor_name: str, t: float, *, read: Callable[[Any], Any] | None = None
) -> Any:
    """The value of one parameter setting for tensor ``tensor_name`` at layer position ``t`` ∈ [0, 1].

    Mirrors mergekit's ``evaluate_setting``: numeric gradients interpolate between neighbouring points, other
    lists pick a point; filter conditions pick the first match by substring; ``None`` when no condition matches
    (the next scope then decides). ``read`` is applied to each scalar first, as mergekit applies the parameter's
    validator: :meth:`~deltaplane.merging.base.Param.read` makes ``"1e-3"`` (a string to YAML 1.1) a number, so
    ``[1e-3, 1]`` interpolates rather than picking a point as a list of labels would.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting if read is None else read(setting)
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        if read is not None:
            setting = [read(e) for e in setting]
        numeric = all(isinstance(e, int | float) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, read=read)
    return None


class ModelEntry(BaseModel):
    """One ``models:`` entry: where the model is and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: _ModelRef
    parameters: _Parameters = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of a slice: layers ``[start, stop)`` of a model, with optional per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: _ModelRef
    layer_range: tuple[int, int]
    parameters: _Parameters = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, stop) with 0 <= start < stop. Found {list(v)}")
        return v


class SliceDefinition(BaseModel):
    """One output slice: the same number of layers from each source, merged layer by layer."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base_model: _OptionalModelRef = None
    parameters: _Parameters = Field(default_factory=dict)
    residual_weight: float | None = None
    """In mergekit's schema but unused by mergekit's merge; accepted and reported as ignored."""

    @model_validator(mode="after")
    def _same_length(self) -> SliceDefinition:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "all sources of a slice must span the same number of layers. Found "
                + ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            )
        return self


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid")

    source: str | dict[str, Any] = "base"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template (the OpenAI/Qwen chat format), which ``chat_template: chatml`` names."""


class MergeConfig(BaseModel):
    """A validated merge configuration (see the module docstring for the YAML)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: _OptionalModelRef = None
    models: list[ModelEntry] | None = None
    slices: list[SliceDefinition] | None = None
    parameters: _Parameters = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | dict[str, Any] | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None
    root: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="config", exclude=True)
    text: str | None = Field(default=None, exclude=True)
    """The YAML text as given (written next to the output as ``mergekit_config.yml``)."""

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_dtype(v)
            except ConfigError as exc:
                raise ValueError(str(exc).split(": ", 1)[1]) from None
        return v

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tok_source(cls, v: Any) -> Any:
        return v if v is None or v in ("base", "union") else _model_ref(v)

    @model_validator(mode="after")
    def _one_layout(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' and 'slices' (a non-empty list)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both")
        return self

    def resolve(self, ref: str) -> Path:
        """A model reference as a path (relative ones against the config's folder)."""
        p = Path(os.path.expanduser(ref))
        return p if p.is_absolute() else self.root / p

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.dtype, self.source) if self.dtype else None

    @property
    def output_dtype(self) -> torch.dtype | None:
        if self.out_dtype:
            return parse_dtype(self.out_dtype, self.source)
        return self.compute_dtype


_ABSENT = {
    "modules": "mergekit 'modules' (per-module merges of multimodal models) are not supported; use models or slices",
}


def load_config(config: str | os.PathLike[str] | dict[str, Any] | MergeConfig) -> MergeConfig:
    """Parse and validate a merge config from a YAML file, a dict or a :class:`MergeConfig`.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown keys, wrong types; the message names the file and
            the field (``merge.yaml: models.1.parameters: ...``).
    """
    if isinstance(config, MergeConfig):
        return config
    text: str | None = None
    if isinstance(config, dict):
        data, root, source = config, Path("."), "config"
    else:
        import yaml

        path = Path(config)
        source = str(path)
        text = read_config_text(path, what="merge config")
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: {describe_yaml_error(exc)}") from exc
        except ConfigError as exc:  # a key given twice
            raise ConfigError(f"{path}: {exc}") from None
        root = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping with merge_method and models")
    for key, why in _ABSENT.items():
        if key in data:
            raise ConfigError(f"{source}: {why}")
    try:
        cfg = MergeConfig.model_validate({**data, "root": root, "source": source, "text": text})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: {_message(e)}" for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    return cfg


def _message(error: Any) -> str:
    msg = str(error["msg"])
    return re.sub(r"^(Value error|Assertion failed), ", "", msg)
