"""Delta downlink: send a device on version *i* the compressed change to version *j*, not the whole model.

The trick that makes a *lossy* downlink exact: the server publishes version *j* as ``base_i + decode(payload)``
— the very payload it will send — instead of compressing an update it already applied. A device applying the
payload to its copy of *i* then computes the same float additions and ends up with byte-identical weights,
which it checks against the signed SHA-256 of *j* (and falls back to the full model if anything is off).
What the codec dropped is not lost: it stays in the server's :class:`~deltaplane.codecs.Compressor` residual
(error feedback, as in double-compression schemes such as DoubleSqueeze, https://arxiv.org/abs/1905.05957)
and goes out with the next round.

Downlink body for deltas (a chain of one or more hops, little-endian)::

    b"DPCH" | u8 version (=1) | u16 count | count × (u32 base, u32 target, u32 length) | payloads

Every body the service sends is signed (:mod:`deltaplane.registry.signing`) with a statement naming the model,
the versions and both the body's and the target model's SHA-256.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from deltaplane.codecs import Compressor, Layout, decompress
from deltaplane.codecs.wire import read_table
from deltaplane.delta import Delta
from deltaplane.errors import DecodeError, IntegrityError
from deltaplane.registry.signing import Signer, Verifier
from deltaplane.registry.store import Artifact, Governance, Registry, state_from_bytes, state_to_bytes

__all__ = [
    "Downlink",
    "apply_downlink",
    "apply_payload",
    "made_by_round",
    "made_by_statement",
    "pack_chain",
    "payload_layout",
    "plan_downlink",
    "publish_update",
    "serve_statement",
    "unpack_chain",
]

CHAIN_MAGIC = b"DPCH"
_CHAIN_HEAD = struct.Struct("<4sBH")
_HOP = struct.Struct("<III")
MAX_HOPS = 64


def pack_chain(hops: list[tuple[int, int, bytes]]) -> bytes:
    """Frame ``(base, target, payload)`` hops into one downlink body."""
    head = _CHAIN_HEAD.pack(CHAIN_MAGIC, 1, len(hops)) + b"".join(_HOP.pack(b, t, len(p)) for b, t, p in hops)
    return head + b"".join(p for _, _, p in hops)


def unpack_chain(body: bytes) -> list[tuple[int, int, bytes]]:
    """Parse :func:`pack_chain` output strictly; :class:`DecodeError` on anything malformed."""
    if len(body) < _CHAIN_HEAD.size:
        raise DecodeError("downlink chain is truncated")
    magic, version, count = _CHAIN_HEAD.unpack_from(body)
    if magic != CHAIN_MAGIC or version != 1:
        raise DecodeError(f"not a deltaplane downlink chain (magic {magic!r}, version {version})")
    if not 1 <= count <= MAX_HOPS:
        raise DecodeError(f"downlink chain has {count} hops; expected 1..{MAX_HOPS}")
    offset = _CHAIN_HEAD.size + count * _HOP.size
    if offset > len(body):
        raise DecodeError("downlink chain hop table is truncated")
    hops = []
    for i in range(count):
        base, target, length = _HOP.unpack_from(body, _CHAIN_HEAD.size + i * _HOP.size)
        if offset + length > len(body):
            raise DecodeError(f"downlink hop {i} claims {length} bytes beyond the body")
        hops.append((base, target, bytes(body[offset : offset + length])))
        offset += length
    if offset != len(body):
        raise DecodeError(f"{len(body) - offset} trailing bytes after the downlink chain")
    return hops


def payload_layout(payload: bytes, state: Mapping[str, torch.Tensor]) -> Layout:
    """The layout ``payload`` must have to change ``state``: all of its tensors, or only some of them.

    A personalized federation (FedPer's head, FedBN's norms kept on the devices) shares, and so sends, only
    some tensors; any name the payload declares must be one of ``state``'s, with its shape and dtype
    (:class:`~deltaplane.errors.ShapeMismatch` otherwise). Only the tensor table is read.
    """
    layout = Layout.of(state)
    names = read_table(payload).trees.keys()
    return layout if names == layout.keys() else layout.only(names)


def apply_payload(
    payload: bytes, state: Mapping[str, torch.Tensor], *, expect_base: tuple[str, int]
) -> dict[str, torch.Tensor]:
    """``state`` plus the decoded ``payload``; tensors the payload leaves out stay as they are.

    Decoding is as strict as :func:`~deltaplane.codecs.decompress` with ``expect_layout``: the payload's
    tensors are checked against ``state`` (:func:`payload_layout`) before anything is decoded.
    """
    delta = decompress(payload, expect_base=expect_base, expect_layout=payload_layout(payload, state))
    if len(delta) == len(state):
        return delta.apply(state)
    changed = delta.apply({k: state[k] for k in delta})
    return {k: changed.get(k, v) for k, v in state.items()}


def publish_update(
    registry: Registry,
    model: str,
    parent: int,
    update: Delta,
    *,
    compressor: Compressor,
    lineage: Mapping[str, Any] | None = None,
    governance: Governance | Mapping[str, Any] | None = None,
) -> tuple[Artifact, Artifact]:
    """Register ``parent + decode(compress(update))`` as a new model version plus the payload as its delta.

    ``compressor`` is the server's downlink encoder; keep it across rounds (its residual is the error
    feedback). ``update`` may cover only some of the model's tensors (the shared layers of a personalized
    federation); the others keep the parent's values. Returns ``(model_version, delta_artifact)``.
    """
    base_state = registry.load_state(registry.get(model, parent))
    payload = compressor.compress(update, base_id=model, base_version=parent)
    new_state = apply_payload(payload, base_state, expect_base=(model, parent))
    lineage = {"downlink_codec": compressor.codec.spec, **dict(lineage or {})}
    version = registry.register_model(model, new_state, parent=parent, lineage=lineage, governance=governance)
    delta = registry.register_delta(
        model,
        payload,
        base=parent,
        target=version.number,
        lineage=lineage,
        governance=governance,
        expect_layout=payload_layout(payload, base_state),
    )
    return version, delta


@dataclass(frozen=True)
class Downlink:
    """What a device is sent: ``kind`` is ``"full"``, ``"delta"`` or ``"none"`` (already current)."""

    kind: str
    model: str
    version: int
    base: int | None
    body: bytes
    signature: str
    target_sha256: str
    full_bytes: int

    def statement(self) -> dict[str, Any]:
        if self.kind == "full":
            return {
                "kind": "model",
                "model": self.model,
                "version": self.version,
                "base": None,
                "target": None,
                "sha256": self.target_sha256,
            }
        return {
            "kind": "downlink",
            "model": self.model,
            "version": self.version,
            "base": self.base,
            "sha256": hashlib.sha256(self.body).hexdigest(),
            "target_sha256": self.target_sha256,
        }

    @property
    def saving(self) -> float:
        """Full-model bytes divided by bytes sent (1.0 for a full download)."""
        return self.full_bytes / max(1, len(self.body))


def serve_statement(
    model: str, channel: str, version: int, target_sha256: str, nonce: str, kind: str
) -> dict[str, Any]:
    """What the service signs for *each* download answer, bound to the device's fresh ``nonce``.

    An artifact signature says "these bytes are model M version N"; it cannot say "N is what you should run
    now". This statement does: it names the model and channel the device asked for, the version and target
    hash the service answered with (``kind`` "full", "delta" or "none" — so a 204 is signed too) and the
    device's random nonce, so a man in the middle can neither swap in another model, replay an older answer
    (downgrade) nor fake "you are up to date" (freeze) without the signing key.
    """
    return {
        "kind": "serve",
        "model": model,
        "channel": channel,
        "version": version,
        "sha256": target_sha256,
        "nonce": nonce,
        "answer": kind,
    }


def made_by_round(artifact: Artifact) -> int | None:
    """The federated round that made ``artifact`` (its signed lineage's ``round``), or None for a version no
    round made (a registered base, whose lineage says round 0 or nothing; a merge, a rebuild, an upload)."""
    rnd = artifact.lineage.get("round")
    return rnd if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 1 else None


def made_by_statement(
    model: str, channel: str, version: int, target_sha256: str, nonce: str, rnd: int | None, *, pinned: bool
) -> dict[str, Any]:
    """What the service signs (``X-Deltaplane-Round-Signature``) to tell a device which round made the version
    it answers with (``rnd``; None: no round made it), bound to the request's ``nonce``.

    A personalized device adapts its personal state to each round's version with that round's random stream
    (the simulator's ``(seed, PERSONALIZATION, round, device)``); one that never saw a round open learns the
    round here. ``pinned`` says whether the answer is the version the device asked for by number (``?version=``,
    a device catching up on versions it missed) rather than the one it should run now: only a current answer
    carries :func:`serve_statement`, and a pinned statement can never pass for one, so a man in the middle who
    rewrites a device's request into a pinned one for an old version gains no downgrade.
    """
    return {
        "kind": "made-by",
        "model": model,
        "channel": channel,
        "version": version,
        "sha256": target_sha256,
        "nonce": nonce,
        "round": rnd,
        "pinned": pinned,
    }


def rollback_offer_statement(
    model: str, channel: str, version: int, target_sha256: str, nonce: str, record: str
) -> dict[str, Any]:
    """What the service signs when it offers a rollback record (``X-Deltaplane-Rollback-Offer``): the record's
    header text (``tag:supersedes:signature``) for the version it answers with, bound to this request's
    ``nonce``.

    A rollback record alone is valid for ever: one replayed long after the rollback it was made for (its tag has
    moved on since) would let a man in the middle take a device back. The service offers a record only while it
    is current (:meth:`~deltaplane.registry.store.Registry.rollback_record`) and says so for this request only;
    the device refuses a record without this signature over its own nonce.
    """
    return {
        "kind": "rollback-offer",
        "model": model,
        "channel": channel,
        "version": version,
        "sha256": target_sha256,
        "nonce": nonce,
        "record": record,
    }


def _chain(registry: Registry, model: str, have: int, want: Artifact) -> list[Artifact] | None:
    hops: list[Artifact] = []
    cur = want
    while cur.number != have:
        if cur.parent is None or len(hops) >= MAX_HOPS:
            return None
        d = registry.find_delta(model, cur.parent, cur.number)
        if d is None:
            return None
        hops.append(d)
        cur = registry.get(model, cur.parent)
    return hops[::-1]


def plan_downlink(
    registry: Registry, signer: Signer, model: str, want: int, have: int | None = None
) -> Downlink:
    """The cheapest signed way to bring a device holding ``have`` to ``want``: a delta chain or the full model.

    A chain is used only when every hop is registered and the chain is smaller than the full model.
    """
    target = registry.get(model, want)
    if have == want:
        return Downlink("none", model, want, have, b"", "", target.sha256, target.size)
    hops = _chain(registry, model, have, target) if have is not None and have < want else None
    if hops:
        links: list[tuple[int, int, bytes]] = []
        for h in hops:
            assert h.base is not None and h.target is not None  # a hop is a delta artifact (find_delta)
            links.append((h.base, h.target, registry.read(h)))  # read() verifies each hop
        body = pack_chain(links)
        if len(body) < target.size:
            return _signed(Downlink("delta", model, want, have, body, "", target.sha256, target.size), signer)
    # read() verifies the artifact's own signature; the device gets one over the device statement, which the
    # stored one no longer is (it also covers registry metadata devices never see)
    body = registry.read(target)
    return _signed(Downlink("full", model, want, None, body, "", target.sha256, target.size), signer)


def _signed(dl: Downlink, signer: Signer) -> Downlink:
    return replace(dl, signature=signer.sign(dl.statement()).to_text())


def apply_downlink(
    dl: Downlink, verifier: Verifier, base_state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Verify a downlink and return the model it delivers (device side).

    Raises :class:`~deltaplane.errors.SignatureError` for an unsigned/tampered body, and
    :class:`~deltaplane.errors.IntegrityError` if applying a delta does not reproduce the signed target hash
    (the device should then fetch the full model).
    """
    if dl.kind == "none":
        if base_state is None:
            raise DecodeError("downlink says the device is current, but no base state was given")
        return dict(base_state)
    verifier.verify_bytes(dl.body, dl.statement(), dl.signature)
    if dl.kind == "full":
        return state_from_bytes(dl.body)
    if base_state is None:
        raise DecodeError(f"a delta from version {dl.base} needs the device's current weights")
    state = dict(base_state)
    expected = dl.base
    for base, target, payload in unpack_chain(dl.body):
        if base != expected:
            raise DecodeError(f"downlink hop from {base} does not continue from version {expected}")
        state = apply_payload(payload, state, expect_base=(dl.model, base))
        expected = target
    if expected != dl.version:
        raise DecodeError(f"downlink chain ends at {expected}, not at the announced version {dl.version}")
    if hashlib.sha256(state_to_bytes(state)).hexdigest() != dl.target_sha256:
        raise IntegrityError(
            f"applying the delta to version {dl.base} did not reproduce {dl.model}@{dl.version}; "
            "the device's base weights differ — fetch the full model"
        )
    return state
