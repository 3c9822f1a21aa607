"""Secure aggregation (Bonawitz et al. 2017 / SecAgg+): the server learns only the sum of quantized updates.

Needs the ``cryptography`` package (the ``aggregation`` extra); import this subpackage explicitly.
"""

from deltaplane.aggregation.secagg.encoding import RingEncoding, max_ring_weight
from deltaplane.aggregation.secagg.endpoints import DeviceEndpoint, ServerEndpoint
from deltaplane.aggregation.secagg.errors import (
    SecAggAuthError,
    SecAggError,
    SecAggFloorError,
    SecAggOrderError,
    SecAggRangeError,
)
from deltaplane.aggregation.secagg.identity import (
    CertificationRequest,
    DeviceCertificate,
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    TrustedAuthorities,
)
from deltaplane.aggregation.secagg.messages import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    Message,
    ShareInbox,
    ShareKeys,
    SignedAdvertiseKeys,
    SignedKeyRoster,
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from deltaplane.aggregation.secagg.protocol import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
    check_device_policy,
    default_threshold,
    group_size,
    min_group_size,
    neighbours,
    neighbours_of,
    round_binding,
    round_neighbours,
)
from deltaplane.aggregation.secagg.revocation import RevocationList
from deltaplane.aggregation.secagg.ring import dequantize_sum, pack, quantize, ring_bits, unpack
from deltaplane.aggregation.secagg.session import Dropouts, SecAggReport, exchange, run_secagg, secure_mean

__all__ = [
    "AdvertiseKeys",
    "CertificationRequest",
    "DeviceCertificate",
    "DeviceCredentials",
    "DeviceEndpoint",
    "DeviceIdentity",
    "Dropouts",
    "EnrollmentAuthority",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "RevocationList",
    "RingEncoding",
    "SecAggAuthError",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggFloorError",
    "SecAggOrderError",
    "SecAggRangeError",
    "SecAggReport",
    "SecAggServer",
    "ServerEndpoint",
    "ShareInbox",
    "ShareKeys",
    "SignedAdvertiseKeys",
    "SignedKeyRoster",
    "Stage",
    "SurvivorSignature",
    "SurvivorSignatures",
    "TrustedAuthorities",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_device_policy",
    "decode_message",
    "default_threshold",
    "dequantize_sum",
    "exchange",
    "group_size",
    "max_ring_weight",
    "min_group_size",
    "neighbours",
    "neighbours_of",
    "pack",
    "quantize",
    "ring_bits",
    "round_binding",
    "round_neighbours",
    "run_secagg",
    "secure_mean",
    "unpack",
]
