"""Update compression: codecs, pipelines, error feedback and the wire format.

Example:
    >>> import torch, deltaplane as dp
    >>> codec = dp.get_codec("topk(0.01) | quant(bits=8)")
    >>> comp = dp.Compressor(codec, error_feedback=True, seed=0)
    >>> delta = dp.Delta({"w": torch.randn(100, 100)})
    >>> payload = comp.compress(delta)
    >>> len(payload) < delta.nbytes / 50
    True
"""

from deltaplane.codecs import lossless, lowrank, policy, quantize, sparsify, ternary  # noqa: F401  (register)
from deltaplane.codecs.base import (
    Codec,
    Encoded,
    Pipeline,
    available_codecs,
    decode_tree,
    format_spec,
    get_codec,
    parse_spec,
    register_codec,
    split_lossless,
)
from deltaplane.codecs.compressor import (
    Compressor,
    CompressorState,
    compress_many,
    decode_delta,
    decompress,
    decompress_many,
    encode_delta,
    read_header,
)
from deltaplane.codecs.layout import Layout, TensorLayout
from deltaplane.codecs.lossless import Zstd
from deltaplane.codecs.lowrank import PowerSGD
from deltaplane.codecs.policy import Policy
from deltaplane.codecs.quantize import BF16, FP16, Identity, Quantize, Sign
from deltaplane.codecs.session import WireSession, is_compact
from deltaplane.codecs.sparsify import STC, RandK, Threshold, TopK
from deltaplane.codecs.ternary import Ternary
from deltaplane.codecs.wire import Limits, WireHeader, pack, unpack

__all__ = [
    "BF16",
    "FP16",
    "STC",
    "Codec",
    "Compressor",
    "CompressorState",
    "Encoded",
    "Identity",
    "Layout",
    "Limits",
    "Pipeline",
    "Policy",
    "PowerSGD",
    "Quantize",
    "RandK",
    "Sign",
    "TensorLayout",
    "Ternary",
    "Threshold",
    "TopK",
    "WireHeader",
    "WireSession",
    "Zstd",
    "available_codecs",
    "compress_many",
    "decode_delta",
    "decode_tree",
    "decompress",
    "decompress_many",
    "encode_delta",
    "format_spec",
    "get_codec",
    "is_compact",
    "pack",
    "parse_spec",
    "read_header",
    "register_codec",
    "split_lossless",
    "unpack",
]
