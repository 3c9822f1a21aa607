"""Secure aggregation (Bonawitz et al. 2017 / SecAgg+): the server learns only the sum of quantized updates.

Needs the ``cryptography`` package (the ``aggregation`` extra); import this subpackage explicitly.

Its public names load on first use (:mod:`deltaplane.lazy`): importing a submodule that needs no torch (the
enrollment's keys and certificates, which ``fleet enroll`` and ``keys`` use) must not import every aggregator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.lazy import lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily (below)
    from deltaplane.aggregation.secagg.encoding import RingEncoding, max_ring_weight
    from deltaplane.aggregation.secagg.endpoints import DeviceEndpoint, ServerEndpoint
    from deltaplane.aggregation.secagg.errors import (
        AdvertisementUnbound,
        KeyRevoked,
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
    from deltaplane.aggregation.secagg.session import (
        Dropouts,
        SecAggReport,
        exchange,
        run_secagg,
        secure_mean,
    )

_LAZY = {
    "AdvertiseKeys": "deltaplane.aggregation.secagg.messages",
    "CertificationRequest": "deltaplane.aggregation.secagg.identity",
    "check_device_policy": "deltaplane.aggregation.secagg.protocol",
    "decode_message": "deltaplane.aggregation.secagg.messages",
    "default_threshold": "deltaplane.aggregation.secagg.protocol",
    "dequantize_sum": "deltaplane.aggregation.secagg.ring",
    "DeviceCertificate": "deltaplane.aggregation.secagg.identity",
    "DeviceCredentials": "deltaplane.aggregation.secagg.identity",
    "DeviceEndpoint": "deltaplane.aggregation.secagg.endpoints",
    "DeviceIdentity": "deltaplane.aggregation.secagg.identity",
    "Dropouts": "deltaplane.aggregation.secagg.session",
    "EnrollmentAuthority": "deltaplane.aggregation.secagg.identity",
    "exchange": "deltaplane.aggregation.secagg.session",
    "group_size": "deltaplane.aggregation.secagg.protocol",
    "KeyRoster": "deltaplane.aggregation.secagg.messages",
    "MaskedInput": "deltaplane.aggregation.secagg.messages",
    "max_ring_weight": "deltaplane.aggregation.secagg.encoding",
    "Message": "deltaplane.aggregation.secagg.messages",
    "min_group_size": "deltaplane.aggregation.secagg.protocol",
    "neighbours": "deltaplane.aggregation.secagg.protocol",
    "neighbours_of": "deltaplane.aggregation.secagg.protocol",
    "pack": "deltaplane.aggregation.secagg.ring",
    "quantize": "deltaplane.aggregation.secagg.ring",
    "KeyRevoked": "deltaplane.aggregation.secagg.errors",
    "AdvertisementUnbound": "deltaplane.aggregation.secagg.errors",
    "RevocationList": "deltaplane.aggregation.secagg.revocation",
    "ring_bits": "deltaplane.aggregation.secagg.ring",
    "RingEncoding": "deltaplane.aggregation.secagg.encoding",
    "round_binding": "deltaplane.aggregation.secagg.protocol",
    "round_neighbours": "deltaplane.aggregation.secagg.protocol",
    "run_secagg": "deltaplane.aggregation.secagg.session",
    "SecAggAuthError": "deltaplane.aggregation.secagg.errors",
    "SecAggClient": "deltaplane.aggregation.secagg.protocol",
    "SecAggConfig": "deltaplane.aggregation.secagg.protocol",
    "SecAggError": "deltaplane.aggregation.secagg.errors",
    "SecAggFloorError": "deltaplane.aggregation.secagg.errors",
    "SecAggOrderError": "deltaplane.aggregation.secagg.errors",
    "SecAggRangeError": "deltaplane.aggregation.secagg.errors",
    "SecAggReport": "deltaplane.aggregation.secagg.session",
    "SecAggServer": "deltaplane.aggregation.secagg.protocol",
    "secure_mean": "deltaplane.aggregation.secagg.session",
    "ServerEndpoint": "deltaplane.aggregation.secagg.endpoints",
    "ShareInbox": "deltaplane.aggregation.secagg.messages",
    "ShareKeys": "deltaplane.aggregation.secagg.messages",
    "SignedAdvertiseKeys": "deltaplane.aggregation.secagg.messages",
    "SignedKeyRoster": "deltaplane.aggregation.secagg.messages",
    "Stage": "deltaplane.aggregation.secagg.protocol",
    "SurvivorSignature": "deltaplane.aggregation.secagg.messages",
    "SurvivorSignatures": "deltaplane.aggregation.secagg.messages",
    "TrustedAuthorities": "deltaplane.aggregation.secagg.identity",
    "UnmaskRequest": "deltaplane.aggregation.secagg.messages",
    "UnmaskResponse": "deltaplane.aggregation.secagg.messages",
    "unpack": "deltaplane.aggregation.secagg.ring",
}

__all__ = [
    "AdvertiseKeys",
    "AdvertisementUnbound",
    "CertificationRequest",
    "DeviceCertificate",
    "DeviceCredentials",
    "DeviceEndpoint",
    "DeviceIdentity",
    "Dropouts",
    "EnrollmentAuthority",
    "KeyRevoked",
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

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
