"""Secure aggregation (Bonawitz et al. 2017 / SecAgg+): the server learns only the sum of quantized updates.

Needs the ``cryptography`` package (the ``aggregation`` extra); import this subpackage explicitly.
"""

from deltaplane.aggregation.secagg.protocol import (
    AdvertiseKeys,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    neighbours,
)
from deltaplane.aggregation.secagg.ring import dequantize_sum, pack, quantize, ring_bits, unpack
from deltaplane.aggregation.secagg.session import SecAggReport, run_secagg, secure_mean

__all__ = [
    "AdvertiseKeys",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggReport",
    "SecAggServer",
    "dequantize_sum",
    "neighbours",
    "pack",
    "quantize",
    "ring_bits",
    "run_secagg",
    "secure_mean",
    "unpack",
]
