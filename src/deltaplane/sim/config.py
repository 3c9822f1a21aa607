"""The configuration of one simulated federated run, validated field by field, loadable from YAML.

Every hyperparameter of a run lives here and nowhere else, so a run is reproduced from its config alone
(the report stores it next to the metrics). Invalid values raise :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltaplane.errors import ConfigError, DeltaplaneError

__all__ = ["RunConfig"]


class RunConfig(BaseModel):
    """Hyperparameters of a federated run on digits; the defaults are the ``deltaplane run`` setting.

    The defaults were tuned with ``benchmarks/foundation.py``: fp32 FedAvg over 20 non-IID clients reaches
    0.967 test accuracy in 120 rounds (about 35 s of CPU per run on one core), and 1% top-k + 8-bit with
    error feedback, which lags fp32 for the first ~100 rounds, matches it by round 120 at 90× fewer uplink
    bytes. Two local epochs at lr 0.2 suit both: more local work per round helps fp32 but leaves top-k a
    larger residual to catch up on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- federation ---------------------------------------------------------------------------------
    clients: int = Field(20, ge=1, description="number of simulated devices")
    alpha: float = Field(0.5, gt=0, description="Dirichlet label-skew concentration (smaller: more skew)")
    rounds: int = Field(120, ge=1, description="communication rounds")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="share of clients that train in a round")
    min_client_samples: int = Field(20, ge=2, description="least number of samples a client holds")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of each client's data held out")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of digits in the global test set")
    train_shifts: int = Field(
        0,
        ge=0,
        le=8,
        description="add this many one-pixel-shifted copies of every training image (1,000+ clients need them)",
    )
    # -- local training -----------------------------------------------------------------------------
    local_epochs: int = Field(2, ge=1, description="passes over the local data per round")
    batch_size: int = Field(32, ge=1, description="local mini-batch size")
    lr: float = Field(0.2, gt=0, description="client SGD learning rate")
    lr_decay: float = Field(1.0, gt=0, le=1, description="client lr is multiplied by this after every round")
    momentum: float = Field(0.9, ge=0, lt=1, description="client SGD momentum (reset every round)")
    # -- compression ---------------------------------------------------------------------------------
    codec: str = Field("identity", description="uplink codec spec, e.g. 'topk(0.01) | quant(bits=8)'")
    error_feedback: bool = Field(True, description="keep the uplink compression error on the device")
    downlink_codec: str = Field("identity", description="codec for the global update sent to devices")
    downlink_error_feedback: bool = Field(True, description="server keeps the downlink compression error")
    # -- server -------------------------------------------------------------------------------------
    server_lr: float = Field(1.0, gt=0, description="scale of the averaged delta applied to the global model")
    # -- reproducibility ------------------------------------------------------------------------------
    seed: int = Field(0, ge=0, description="seeds the partition, the initial model and every round")
    # Apart from `seed` so that runs with different seeds are scored on the same test images.
    split_seed: int = Field(0, ge=0, description="seeds the global train/test split")
    threads: int = Field(1, ge=1, description="torch CPU threads (fixed so timings and results repeat)")

    @field_validator("codec", "downlink_codec")
    @classmethod
    def _valid_codec(cls, spec: str) -> str:
        from deltaplane.codecs import get_codec

        try:
            get_codec(spec)
        except DeltaplaneError as exc:
            raise ValueError(str(exc)) from None
        return spec

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "config") -> RunConfig:
        """Validate a mapping (e.g. parsed YAML); raise :class:`ConfigError` naming every bad field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RunConfig:
        """Load a config from a YAML file of ``field: value`` lines; missing fields take their defaults."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        return cls.from_mapping({} if data is None else data, source=str(path))

    def client_lr(self, rnd: int) -> float:
        """The client learning rate in round ``rnd`` (1-based): ``lr · lr_decay^(rnd-1)``.

        A decaying step lets the last rounds settle instead of jumping around the optimum, which matters
        most for error feedback: the residual a device still holds is flushed in ever smaller steps.
        """
        return self.lr * self.lr_decay ** (rnd - 1)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied and validated (``model_copy`` would skip validation)."""
        return self.from_mapping(self.model_dump() | changes, source="options")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of every field."""
        return self.model_dump(mode="json")


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; valid fields: {', '.join(RunConfig.model_fields)}"
        problems.append(f"field '{field}': {msg}")
    return f"invalid {source}: " + "; ".join(problems)
