"""deltaplane — the control plane for model deltas.

``import deltaplane as dp`` gives the core: :class:`Delta`, codecs (:func:`get_codec`, :class:`Compressor`,
:func:`decompress`), aggregators (:class:`FedAvg`) and the typed errors. Heavier subsystems (simulator,
service, Flower adapters, reports) are imported from their own subpackages so that this import stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.lazy import lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily (below)
    from deltaplane.aggregation import (
        Aggregator,
        CenteredClip,
        Clip,
        CoordinateMedian,
        DPFedAvg,
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedOpt,
        FedYogi,
        FLTrust,
        GeometricMedian,
        Krum,
        NormBound,
        PrivacyAccountant,
        QuantileClip,
        TrimmedMean,
        Validate,
    )
    from deltaplane.codecs import (
        Codec,
        Compressor,
        CompressorState,
        Encoded,
        Layout,
        Pipeline,
        available_codecs,
        decompress,
        get_codec,
        read_header,
        register_codec,
    )
    from deltaplane.delta import Delta, StateDict, base_fingerprint
    from deltaplane.errors import (
        BaseMismatch,
        CodecError,
        ConfigError,
        DecodeError,
        DeltaplaneError,
        InvalidUpdate,
        PrivacyBudgetExceeded,
        ShapeMismatch,
        SpecError,
        VersionMismatch,
    )
    from deltaplane.merging import merge, merge_files

# Lazy attributes (PEP 562): `import deltaplane` and `deltaplane --help` must not wait for torch; each name
# is imported from its module on first use, and `from deltaplane import X` works as before.
_LAZY = {
    "Aggregator": "deltaplane.aggregation",
    "available_codecs": "deltaplane.codecs",
    "BaseMismatch": "deltaplane.errors",
    "base_fingerprint": "deltaplane.delta",
    "Clip": "deltaplane.aggregation",
    "Codec": "deltaplane.codecs",
    "CodecError": "deltaplane.errors",
    "Compressor": "deltaplane.codecs",
    "CompressorState": "deltaplane.codecs",
    "ConfigError": "deltaplane.errors",
    "CoordinateMedian": "deltaplane.aggregation",
    "DecodeError": "deltaplane.errors",
    "decompress": "deltaplane.codecs",
    "Delta": "deltaplane.delta",
    "DeltaplaneError": "deltaplane.errors",
    "DPFedAvg": "deltaplane.aggregation",
    "Encoded": "deltaplane.codecs",
    "FedAdagrad": "deltaplane.aggregation",
    "FedAdam": "deltaplane.aggregation",
    "FedAvg": "deltaplane.aggregation",
    "FedAvgM": "deltaplane.aggregation",
    "FedOpt": "deltaplane.aggregation",
    "FedYogi": "deltaplane.aggregation",
    "FLTrust": "deltaplane.aggregation",
    "get_codec": "deltaplane.codecs",
    "InvalidUpdate": "deltaplane.errors",
    "CenteredClip": "deltaplane.aggregation",
    "GeometricMedian": "deltaplane.aggregation",
    "Krum": "deltaplane.aggregation",
    "Layout": "deltaplane.codecs",
    "merge": "deltaplane.merging",
    "merge_files": "deltaplane.merging",
    "NormBound": "deltaplane.aggregation",
    "Pipeline": "deltaplane.codecs",
    "PrivacyAccountant": "deltaplane.aggregation",
    "PrivacyBudgetExceeded": "deltaplane.errors",
    "QuantileClip": "deltaplane.aggregation",
    "read_header": "deltaplane.codecs",
    "register_codec": "deltaplane.codecs",
    "ShapeMismatch": "deltaplane.errors",
    "SpecError": "deltaplane.errors",
    "StateDict": "deltaplane.delta",
    "TrimmedMean": "deltaplane.aggregation",
    "Validate": "deltaplane.aggregation",
    "VersionMismatch": "deltaplane.errors",
}

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "BaseMismatch",
    "CenteredClip",
    "Clip",
    "Codec",
    "CodecError",
    "Compressor",
    "CompressorState",
    "ConfigError",
    "CoordinateMedian",
    "DPFedAvg",
    "DecodeError",
    "Delta",
    "DeltaplaneError",
    "Encoded",
    "FLTrust",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "GeometricMedian",
    "InvalidUpdate",
    "Krum",
    "Layout",
    "NormBound",
    "Pipeline",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "QuantileClip",
    "ShapeMismatch",
    "SpecError",
    "StateDict",
    "TrimmedMean",
    "Validate",
    "VersionMismatch",
    "__version__",
    "available_codecs",
    "base_fingerprint",
    "decompress",
    "get_codec",
    "merge",
    "merge_files",
    "read_header",
    "register_codec",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
