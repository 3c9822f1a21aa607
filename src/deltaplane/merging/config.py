"""Merge configs in mergekit's YAML format, so users can bring the configs they already have.

Accepted (the subset of mergekit that the supported methods use)::

    merge_method: ties            # any name from deltaplane.merging.available_methods()
    base_model: ./base            # folder (HF layout) or .safetensors file; may also be listed under models
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters: {weight: 0.5}
    parameters: {normalize: true, density: 0.2}   # shared, or a default for a per-model parameter
    dtype: float32                # compute/output dtype; also allows inputs of mixed dtypes (cast to it)
    out_dtype: bfloat16           # optional output dtype

Relative model paths are resolved against the folder of the YAML file. mergekit features outside this subset
(``slices``, per-layer gradients, LoRA ``model+adapter`` references, hub ids) are refused with a message rather
than half-applied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltaplane.errors import ConfigError
from deltaplane.merging.checkpoint import parse_dtype

__all__ = ["MergeConfig", "ModelEntry", "load_config"]


class ModelEntry(BaseModel):
    """One ``models:`` entry: where the model is and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_ref(cls, v: Any) -> Any:
        if isinstance(v, dict) and set(v) <= {"path", "model"}:  # mergekit's long form {model: {path: ...}}
            v = v.get("path", v.get("model"))
        if isinstance(v, str) and "+" in v and not Path(v).exists():
            raise ValueError(
                f"'{v}': LoRA 'model+adapter' references are not supported; merge the adapter first"
            )
        return v


class MergeConfig(BaseModel):
    """A validated merge configuration (see the module docstring for the YAML)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    root: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="config", exclude=True)

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_ref(cls, v: Any) -> Any:
        if isinstance(v, dict) and set(v) <= {"path", "model"}:
            v = v.get("path", v.get("model"))
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_dtype(v)
            except ConfigError as exc:
                raise ValueError(str(exc).split(": ", 1)[1]) from None
        return v

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


def load_config(config: str | os.PathLike[str] | dict[str, Any] | MergeConfig) -> MergeConfig:
    """Parse and validate a merge config from a YAML file, a dict or a :class:`MergeConfig`.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown keys, wrong types; the message names the file and
            the field (``merge.yaml: models.1.parameters: ...``).
    """
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        data, root, source = config, Path("."), "config"
    else:
        import yaml

        path = Path(config)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read merge config ({exc.strerror or exc})") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = ""
            mark = getattr(exc, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1}, column {mark.column + 1}"
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
        root = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping with merge_method and models")
    if "slices" in data:
        raise ConfigError(f"{source}: mergekit 'slices' (layer stacking) are not supported; use 'models'")
    try:
        cfg = MergeConfig.model_validate({**data, "root": root, "source": source})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    return cfg
