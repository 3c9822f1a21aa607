"""deltaplane — the control plane for model deltas.

``import deltaplane as dp`` gives the core: :class:`Delta`, codecs (:func:`get_codec`, :class:`Compressor`,
:func:`decompress`), aggregators (:class:`FedAvg`) and the typed errors. Heavier subsystems (simulator,
service, Flower adapters, reports) are imported from their own subpackages so that this import stays light.
"""

from deltaplane.aggregation import Aggregator, FedAvg
from deltaplane.codecs import (
    Codec,
    Compressor,
    CompressorState,
    Encoded,
    Pipeline,
    available_codecs,
    decompress,
    get_codec,
    read_header,
    register_codec,
)
from deltaplane.delta import Delta, StateDict
from deltaplane.errors import (
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

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Codec",
    "CodecError",
    "Compressor",
    "CompressorState",
    "ConfigError",
    "DecodeError",
    "Delta",
    "DeltaplaneError",
    "Encoded",
    "FedAvg",
    "InvalidUpdate",
    "Pipeline",
    "PrivacyBudgetExceeded",
    "ShapeMismatch",
    "SpecError",
    "StateDict",
    "VersionMismatch",
    "__version__",
    "available_codecs",
    "decompress",
    "get_codec",
    "merge",
    "merge_files",
    "read_header",
    "register_codec",
]
