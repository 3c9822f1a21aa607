"""Secure aggregation: the server learns the sum of client updates and nothing about any single one.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(https://eprint.iacr.org/2017/281), semi-honest variant, with the sparse communication graph of SecAgg+ (Bell et
al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", https://eprint.iacr.org/2020/704)
as an option. Four rounds, each a method on :class:`SecAggClient` and its partner on :class:`SecAggServer`:

0. **Advertise keys** — each client ``u`` makes two X25519 key pairs: ``c`` (encrypting shares) and ``s``
   (pairwise masks), and sends both public keys.
1. **Share keys** — ``u`` draws a self-mask seed ``bᵤ`` and Shamir-shares ``bᵤ`` and its mask key ``sᵤ`` (t of
   its neighbours needed), encrypting each neighbour's pair of shares under ``HKDF(X25519(cᵤ, c_v))`` with
   AES-GCM; the server only routes the ciphertexts.
2. **Masked input** — ``u`` uploads ``yᵤ = xᵤ + PRG(bᵤ) + Σ_{v>u} PRG(sᵤᵥ) − Σ_{v<u} PRG(sᵤᵥ)`` where
   ``xᵤ`` are its quantized codes packed into lane words (several ``k``-bit values per 64-bit word, each word
   masked modulo ``2^W``, :func:`~deltaplane.aggregation.secagg.ring.to_words`) and
   ``sᵤᵥ = HKDF(X25519(sᵤ, s_v))``. The server folds ``yᵤ`` into a running
   sum and drops it: pairwise masks cancel in the sum, self-masks hide ``yᵤ`` even if pairwise masks are later
   revealed.
3. **Unmask** — the server closes stage 2 and *freezes* who uploaded (survivors) and who did not (dropped);
   a masked input arriving later is refused with :class:`SecAggOrderError` and never enters the sum. Each
   responding client returns, for every neighbour, *either* its share of ``bᵤ`` (uploaded) *or* of ``sᵤ``
   (dropped) — never both, and it refuses a request that asks for both, or (``min_inputs``: distributed DP's
   m_min, from the device's own configuration) one whose survivors are fewer. The server rebuilds the self-masks of
   the survivors and the dangling pairwise masks of the dropped clients and removes them. Clients that vanish
   *after* uploading are still in the sum: their self-masks come back from their neighbours' shares.

Every message is a plain value (:mod:`deltaplane.aggregation.secagg.messages`) with a strict byte encoding, so
the same state machines run in process, over HTTP and over Flower. Each side accepts only the messages of its
current stage; anything else is a :class:`SecAggOrderError` that leaves the state unchanged.

The server object holds public keys, ciphertexts it cannot open, the running masked sum and at most the shares it
asked for; it never holds an individual unmasked update (tests check every attribute). Threat model: semi-honest
server and clients, plus, in *authenticated* rounds, a server that substitutes keys: each device signs its key
advertisement with an identity key an enrollment authority certified (:mod:`~deltaplane.aggregation.secagg.
identity`, Bonawitz et al. §4's PKI), and refuses a roster whose every neighbour's certificate and signature do not
verify (:class:`SecAggAuthError`). Authenticated rounds also run the malicious-secure variant's *consistency
check* between stages 2 and 3 (:attr:`Stage.CONSISTENCY`): each survivor signs the unmasking request it received
(:func:`~deltaplane.aggregation.secagg.identity.consistency_statement`), the server forwards the signatures, and
a device reveals shares only once ``threshold`` certified devices of its neighbourhood (itself included) signed
that very request; docs/aggregation.md says what this adds and what remains.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from deltaplane.aggregation.secagg import shamir
from deltaplane.aggregation.secagg.errors import (
    SecAggAuthError,
    SecAggError,
    SecAggFloorError,
    SecAggOrderError,
)
from deltaplane.aggregation.secagg.identity import (
    DeviceCertificate,
    DeviceCredentials,
    advertisement_statement,
    consistency_statement,
)
from deltaplane.aggregation.secagg.messages import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    ShareInbox,
    ShareKeys,
    SignedAdvertiseKeys,
    SignedKeyRoster,
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskRequest,
    UnmaskResponse,
)
from deltaplane.aggregation.secagg.prg import MASK_KEY_BYTES, add_masks, agree, contributory, derive
from deltaplane.aggregation.secagg.revocation import RevocationList
from deltaplane.aggregation.secagg.ring import (
    from_words,
    pack_words,
    reduce_words,
    ring_bits,
    to_words,
    unpack_words,
    word_count,
)
from deltaplane.errors import ConfigError, DecodeError, DeltaplaneError

__all__ = [
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "Stage",
    "check_device_policy",
    "default_threshold",
    "group_size",
    "min_group_size",
    "neighbours",
    "neighbours_of",
    "round_binding",
    "round_neighbours",
]

_FIELDS = ("num_clients", "threshold", "bits", "vector_size", "neighbours", "round_id", "graph_seed")


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one secure aggregation round, known to the server and every client.

    Args:
        num_clients: clients invited (ids ``0 … num_clients − 1``).
        threshold: shares needed to rebuild a secret; also the fewest clients that may take part in unmasking.
            Must exceed half a neighbourhood so two disjoint groups cannot both unmask.
        bits: bits per quantized value the clients feed in (codes in ``[0, 2^bits)``).
        vector_size: number of values per client.
        neighbours: SecAgg+ degree (even); each client masks with and shares to only that many others.
            None: the complete graph of the original protocol.
        round_id: binds every derived key to this round, so nothing is reused across rounds.
        graph_seed: public seed of the SecAgg+ graph.
    """

    num_clients: int
    threshold: int
    bits: int
    vector_size: int
    neighbours: int | None = None
    round_id: int = 0
    graph_seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clients < 2:
            raise ConfigError(f"num_clients must be at least 2. Found {self.num_clients}")
        if not 1 <= self.bits <= 31:
            raise ConfigError(f"bits must be in [1, 31]. Found {self.bits}")
        if not 0 <= self.round_id < 2**32:
            raise ConfigError(f"round_id must be in [0, 2^32). Found {self.round_id}")
        if not 1 <= self.vector_size <= 2**31:
            raise ConfigError(f"vector_size must be in [1, 2^31]. Found {self.vector_size}")
        if self.neighbours is not None and not (
            2 <= self.neighbours < self.num_clients and self.neighbours % 2 == 0
        ):
            raise ConfigError(
                f"neighbours must be an even number in [2, num_clients). Found {self.neighbours}"
            )
        group = self.group_size
        if not group // 2 < self.threshold <= group:
            raise ConfigError(
                f"threshold must be in ({group // 2}, {group}] for neighbourhoods of {group}. Found {self.threshold}"
            )
        ring_bits(self.bits, self.num_clients)  # raises if the sum cannot fit 32 bits

    @property
    def group_size(self) -> int:
        """Clients holding shares of one client's secrets (its neighbours and itself)."""
        return (self.neighbours if self.neighbours is not None else self.num_clients - 1) + 1

    @property
    def ring_bits(self) -> int:
        """``k``: the masked sum lives in ``Z / 2ᵏ``."""
        return ring_bits(self.bits, self.num_clients)

    @property
    def packed_bytes(self) -> int:
        """Bytes of one masked input: ``vector_size`` values at ``ring_bits`` bits (the additive-masking limit)."""
        return (self.vector_size * self.ring_bits + 7) // 8

    @property
    def context(self) -> bytes:
        return b"round:" + str(self.round_id).encode()

    def to_dict(self) -> dict[str, int | None]:
        """JSON-ready form, sent to devices with the round's invitation."""
        return {k: getattr(self, k) for k in _FIELDS}

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> SecAggConfig:
        """Inverse of :meth:`to_dict`; a missing, unknown or non-integer field is a :class:`ConfigError`."""
        if not isinstance(doc, Mapping) or set(doc) != set(_FIELDS):
            have = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
            raise ConfigError(f"a SecAgg config has exactly the fields {list(_FIELDS)}; got {have}")
        for k in _FIELDS:
            v = doc[k]
            if not (v is None and k == "neighbours") and (type(v) is not int or not 0 <= v < 2**32):
                raise ConfigError(f"SecAgg config field {k!r} must be an integer in [0, 2^32). Found {v!r}")
        return cls(**doc)  # type: ignore[arg-type]  # every field was checked an int (neighbours: or None) above


def default_threshold(group: int) -> int:
    """The smallest threshold devices accept for neighbourhoods of ``group``: more than two thirds of it.

    Why two thirds: the server can send some of a target's neighbours an unmasking request that lists the
    target as a survivor and others one that lists it as dropped. Honest devices answer one kind each, so with
    ``c`` colluders in the group the server gets ``t`` shares of both secrets only if ``2t ≤ group + c``, i.e.
    ``c ≥ 2t − group``. With ``t > 2·group/3`` that needs more than a third of the group colluding (and
    ``c ≥ t`` reveals a secret anyway); with a bare majority ``t = group//2 + 1`` one or two colluders suffice.
    Bonawitz et al. (CCS 2017) state their actively-secure variant for ``t > 2n/3`` for the same reason. The
    price: unmasking needs ``t`` survivors of each neighbourhood, so fewer than a third of it may drop.
    """
    return 2 * group // 3 + 1


def min_group_size(num_clients: int) -> int:
    """The smallest neighbourhood (a device and its neighbours) devices accept in a round of ``num_clients``.

    SecAgg+ (Bell et al., CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead") keeps
    its guarantee only for graphs of degree ``Θ(log n)``, with constants set by the fractions of corrupt and
    dropped devices tolerated (their concrete parameters are larger still: e.g. about 3% of 10⁴ clients).
    A server-chosen degree of 2 lets it seat two colluders as a target's only neighbours. This floor,
    ``2⌈log₂ n⌉ + 1`` (capped at ``n``: the complete graph), refuses such degenerate graphs; it is a floor,
    not Bell et al.'s bound for a given corruption rate, which an operator should use for large rounds.
    """
    return min(num_clients, 2 * math.ceil(math.log2(num_clients)) + 1)


def group_size(degree: int | None, num_clients: int) -> int:
    """The neighbourhood of a round of ``num_clients`` devices on SecAgg+'s graph of ``degree`` (None: the
    complete graph): a device and its neighbours, whose size sets the threshold (:func:`default_threshold`)."""
    return (degree if degree is not None else num_clients - 1) + 1


def round_neighbours(degree: int | None, num_clients: int) -> int | None:
    """The SecAgg+ degree a round of ``num_clients`` devices runs when ``degree`` was chosen for rounds of some
    expected size (a run's ``secagg_neighbours``, a strategy's ``neighbours``); None is the complete graph.

    A round's size is known only once it is drawn (Poisson sampling, dropouts before the round), so the chosen
    degree is adapted to it, the same way on every driver: a round larger than expected gets the least even
    degree its devices accept (:func:`min_group_size`) when that is larger, since they would refuse a sparser
    graph (:func:`check_device_policy`); a round in which a neighbourhood would hold every device (degree at
    least ``num_clients - 1``) runs the complete graph, which is what that degree means there.
    """
    if degree is None or num_clients < 2:
        return None
    least = min_group_size(num_clients) - 1
    chosen = max(degree, least + least % 2)  # SecAgg+'s Harary graph needs an even degree
    return None if chosen >= num_clients - 1 else chosen


def check_device_policy(config: SecAggConfig) -> None:
    """What a real device checks before it takes part: the server chose these parameters, not the device.

    Raises :class:`SecAggError` naming the parameter when the neighbourhood is smaller than
    :func:`min_group_size` or the threshold is at most two thirds of it (:func:`default_threshold`).
    """
    group, floor = config.group_size, min_group_size(config.num_clients)
    if group < floor:
        raise SecAggError(
            f"refusing this SecAgg round: neighbours={config.neighbours} gives neighbourhoods of {group} of "
            f"{config.num_clients} devices; devices need at least {floor} (degree {floor - 1}, or the complete "
            "graph) so the server cannot surround a device with colluders"
        )
    if config.threshold < default_threshold(group):
        raise SecAggError(
            f"refusing this SecAgg round: threshold={config.threshold} for neighbourhoods of {group}; devices "
            f"need more than two thirds of the neighbourhood ({default_threshold(group)}) so inconsistent "
            "unmasking requests cannot reveal both secrets of a device"
        )


def neighbours(config: SecAggConfig) -> dict[int, frozenset[int]]:
    """The communication graph: complete, or SecAgg+'s Harary graph on a public random permutation."""
    return dict(_graph(config.num_clients, config.neighbours, config.graph_seed))


def neighbours_of(config: SecAggConfig, u: int) -> frozenset[int]:
    """Client ``u``'s neighbours in :func:`neighbours`' graph, built alone: O(clients) time and memory.

    A device needs only its own neighbourhood. Building the whole graph costs O(clients²) for the complete
    one (about 0.6 GB at 3,000 clients), so a server that invites a device to a large round could exhaust it.
    """
    n, degree = config.num_clients, config.neighbours
    if degree is None:
        return frozenset(range(n)) - {u}
    order = _order(n, config.graph_seed)
    return _harary(order, int(np.flatnonzero(order == u)[0]), degree)


def _order(n: int, seed: int) -> np.ndarray:
    # the public random permutation the SecAgg+ Harary graph is laid on
    return np.random.default_rng(seed).permutation(n)


def _harary(order: np.ndarray, pos: int, degree: int) -> frozenset[int]:
    # the neighbours of the client at position ``pos`` of ``order``: ``degree / 2`` on each side, wrapping
    half, n = degree // 2, len(order)
    return frozenset(int(order[(pos + d) % n]) for d in range(-half, half + 1) if d != 0)


@lru_cache(maxsize=8)
def _graph(n: int, degree: int | None, seed: int) -> dict[int, frozenset[int]]:
    # the server's whole graph (O(clients · degree)): once per round's parameters
    if degree is None:
        return {u: frozenset(set(range(n)) - {u}) for u in range(n)}
    order = _order(n, seed)
    return dict(sorted((int(u), _harary(order, i, degree)) for i, u in enumerate(order)))


def round_binding(config: SecAggConfig, session: bytes) -> bytes:
    """What a signed key advertisement is bound to (32 bytes): the round's public parameters (round id, graph
    seed, sizes, threshold) and ``session``, the driver's name for the round (on the service the service's
    identity as the device saw it, then ``model/round``: :func:`deltaplane.serve.service_identity.service_session`).
    An advertisement signed for one round does not verify in another whose parameters or session differ."""
    doc = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(b"deltaplane/secagg/round-binding/v1\x00" + doc + b"\x00" + bytes(session)).digest()


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _pair_context(config: SecAggConfig, u: int, v: int) -> bytes:
    # config.context + b"/a-b" in one formatting step: every device builds ~4 per neighbour
    return b"round:%d/%d-%d" % ((config.round_id, u, v) if u < v else (config.round_id, v, u))


def _pair_key(
    config: SecAggConfig, s_private: X25519PrivateKey, s_public_peer: bytes, u: int, v: int
) -> bytes:
    """The PRG key of the pairwise mask of ``u`` and ``v`` (both derive it; the server only from shares)."""
    return derive(agree(s_private, s_public_peer), "mask", _pair_context(config, u, v), MASK_KEY_BYTES)


def _self_key(config: SecAggConfig, seed: bytes, u: int) -> bytes:
    """The PRG key of ``u``'s self-mask, from its seed ``bᵤ``."""
    return derive(seed, "self-mask", config.context + b"/" + str(u).encode(), MASK_KEY_BYTES)


class Stage:
    """The protocol's stages, in order; each side accepts only the messages of its current stage."""

    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASKED = "masked input"
    #: authenticated rounds only: survivors sign the unmasking request they received (Bonawitz et al. §4)
    CONSISTENCY = "consistency check"
    UNMASK = "unmasking"
    DONE = "done"


def _aad(config: SecAggConfig, sender: int, recipient: int) -> bytes:
    return _pair_context(config, sender, recipient) + b"/from:" + str(sender).encode()


class SecAggClient:
    """The device side of one round: holds its keys and secrets, answers each stage once, in order.

    Partner: :class:`SecAggServer`. Each method takes the server's message for the stage and returns the
    device's reply (plain message objects; ``to_bytes()`` / ``Message.from_bytes`` put them on any wire).
    Calling a stage out of order raises :class:`SecAggOrderError` and changes nothing.

    Args:
        client_id: this client's id in ``[0, num_clients)``.
        config: the round's public parameters.
        randbytes: source of secret randomness (``secrets.token_bytes`` by default). Pass a seeded source
            only in simulations that must be reproducible.
        min_inputs: the fewest masked inputs (survivors) whose sum this device helps unmask, besides SecAgg's
            threshold: under distributed DP the m_min its own noise was calibrated to (0: no floor). It comes
            from the device's own configuration, never from the server's messages, so a server that is
            misconfigured or breaks the protocol cannot talk the device into revealing a shorter sum.
        credentials: the device's enrollment (identity key, certificate, trusted authorities): it then signs
            its key advertisement and refuses any roster that is not a :class:`SignedKeyRoster` in which every
            neighbour's certificate and signature verify (:class:`SecAggAuthError`, state unchanged), and it runs
            the consistency check (:meth:`sign_survivors`; :meth:`unmask` needs the signatures). None: the
            semi-honest protocol, whose roster and survivor sets the server could falsify.
        session: the driver's name for this round, bound into the signed advertisements with the config
            (:func:`round_binding`); every device of the round must use the same.
    """

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        min_inputs: int = 0,
        credentials: DeviceCredentials | None = None,
        session: bytes = b"",
    ) -> None:
        if not 0 <= client_id < config.num_clients:
            raise ConfigError(f"client_id must be in [0, {config.num_clients}). Found {client_id}")
        if isinstance(min_inputs, bool) or not (isinstance(min_inputs, int) and min_inputs >= 0):
            raise ConfigError(f"min_inputs must be a non-negative integer. Found {min_inputs!r}")
        self.client_id = client_id
        self.config = config
        self.min_inputs = min_inputs
        self.credentials = credentials
        self._binding = round_binding(config, session)
        self._rand = randbytes
        self._graph = neighbours_of(config, client_id)  # its own neighbourhood only: O(clients)
        self._c_key = X25519PrivateKey.from_private_bytes(randbytes(32))
        self._s_key = X25519PrivateKey.from_private_bytes(randbytes(32))
        self._self_seed = b""
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (c_public, s_public)
        self._received: dict[int, bytes] = {}  # neighbour -> ciphertext of its shares for us
        self._own_shares: tuple[int, int] = (0, 0)
        self._revealed: dict[int, str] = {}
        #: authenticated rounds: slot -> certified identity key (Ed25519, raw) of this device and each neighbour
        #: whose advertisement verified; the consistency check counts signatures by these keys only
        self._identities: dict[int, bytes] = {}
        self._vouched = b""  # digest of the one unmasking request this device signed (consistency check)
        self._aeads: dict[int, AESGCM] = {}  # neighbour -> share cipher (derived again after a restore)
        self.stage = Stage.ADVERTISE

    def _expect(self, stage: str, what: str) -> None:
        if self.stage != stage:
            raise SecAggOrderError(
                f"client {self.client_id}: cannot {what} at stage '{self.stage}' (needs '{stage}')",
                stage=self.stage,
            )

    def _check_round(self, msg: object) -> None:
        rid = getattr(msg, "round_id", None)
        if rid != self.config.round_id:
            raise SecAggOrderError(
                f"client {self.client_id}: message for round {rid}, this is round {self.config.round_id}",
                stage=self.stage,
            )

    # -- persistence (a device that handles each stage in a fresh process keeps this in its own storage) --
    def export_state(self) -> bytes:
        """This client's whole state, secrets included, as bytes for the *device's own* storage (e.g. a
        Flower node's ``Context.state``); never send it anywhere."""
        doc = {
            "client_id": self.client_id,
            "stage": self.stage,
            "c_key": _raw_private(self._c_key).hex(),
            "s_key": _raw_private(self._s_key).hex(),
            "self_seed": self._self_seed.hex(),
            "peers": {str(v): [c.hex(), k.hex()] for v, (c, k) in self._peers.items()},
            "received": {str(v): ct.hex() for v, ct in self._received.items()},
            "own_shares": [str(self._own_shares[0]), str(self._own_shares[1])],
            "revealed": {str(v): w for v, w in self._revealed.items()},
            "min_inputs": self.min_inputs,
            "authenticated": self.credentials is not None,
            "identities": {str(v): k.hex() for v, k in self._identities.items()},
            "vouched": self._vouched.hex(),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def restore(
        cls,
        config: SecAggConfig,
        data: bytes,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        credentials: DeviceCredentials | None = None,
        session: bytes = b"",
    ) -> SecAggClient:
        """Inverse of :meth:`export_state` for the round of ``config``; a malformed state is a DecodeError. A
        state exported with credentials is restored only with credentials (and the same ``session``): a resumed
        device must not start accepting rosters it would have refused."""
        try:
            doc = json.loads(data)
            if bool(doc.get("authenticated", False)) and credentials is None:
                raise SecAggAuthError(
                    "this SecAgg state authenticates its rosters; restore it with the device's credentials"
                )
            self = cls(
                int(doc["client_id"]),
                config,
                randbytes=randbytes,
                min_inputs=int(doc.get("min_inputs", 0)),
                credentials=credentials,
                session=session,
            )
            if doc["stage"] not in _ORDER:
                raise ValueError(f"unknown stage {doc['stage']!r}")
            self.stage = doc["stage"]
            self._c_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["c_key"]))
            self._s_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["s_key"]))
            self._self_seed = bytes.fromhex(doc["self_seed"])
            self._peers = {int(v): (bytes.fromhex(c), bytes.fromhex(k)) for v, (c, k) in doc["peers"].items()}
            self._received = {int(v): bytes.fromhex(ct) for v, ct in doc["received"].items()}
            self._own_shares = (int(doc["own_shares"][0]), int(doc["own_shares"][1]))
            self._revealed = {int(v): str(w) for v, w in doc["revealed"].items()}
            self._identities = {int(v): bytes.fromhex(k) for v, k in doc.get("identities", {}).items()}
            self._vouched = bytes.fromhex(doc.get("vouched", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"malformed SecAgg client state: {exc}") from None
        return self

    # -- stage 0 ----------------------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        """The two public keys (repeatable until the keys are shared, e.g. when a transport retries)."""
        self._expect(Stage.ADVERTISE, "advertise keys")
        c, s, u = _raw_public(self._c_key), _raw_public(self._s_key), self.client_id
        if self.credentials is None:
            return AdvertiseKeys(self.config.round_id, u, c, s)
        ident = self.credentials.identity
        sig = ident.sign(advertisement_statement(self._binding, u, ident.device_id, c, s))
        return SignedAdvertiseKeys(self.config.round_id, u, c, s, ident.certificate.to_bytes(), sig)

    def _authenticate(self, roster: KeyRoster, peers: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Refuse (:class:`SecAggAuthError`) unless every neighbour's advertisement in ``roster`` carries a
        certificate from a trusted authority and its certified key's signature for this round and slot, and no
        device holds two slots. Changes nothing: called before the roster's keys are used. Returns each slot's
        certified identity key (this device's own included), which the consistency check verifies with."""
        cred, u = self.credentials, self.client_id
        assert cred is not None
        if not isinstance(roster, SignedKeyRoster):
            raise SecAggAuthError(
                f"client {u}: this device authenticates its neighbours' keys, and the server sent an unsigned "
                "roster; refused"
            )
        devices = {cred.identity.device_id: u}
        identities = {u: cred.identity.certificate.identity_public}
        for v, keys in peers.items():
            if v not in roster.attestations:
                raise SecAggAuthError(f"client {u}: roster slot {v} carries no signature; refused", client=v)
            cert, sig = roster.attestations[v]
            verified: DeviceCertificate = cred.verify(self._binding, v, keys, cert, sig)
            name = verified.device_id
            if devices.setdefault(name, v) != v:
                raise SecAggAuthError(
                    f"client {u}: device {name!r} holds roster slots {devices[name]} and {v}; refused",
                    client=v,
                )
            if verified.identity_public in identities.values():  # one key, two certificates: one device
                raise SecAggAuthError(
                    f"client {u}: roster slot {v}'s identity key is another slot's too; refused", client=v
                )
            identities[v] = verified.identity_public
        return identities

    # -- stage 1 ----------------------------------------------------------------------------------------
    def _share_cipher(self, peer: int, c_public: bytes) -> AESGCM:
        """The AES-GCM cipher of the shares between this client and ``peer`` (SecAggError: a low-order key)."""
        context = _pair_context(self.config, self.client_id, peer)
        return AESGCM(derive(agree(self._c_key, c_public), "share-encryption", context))

    def _aead(self, peer: int) -> AESGCM:
        if peer not in self._aeads:  # one X25519 agreement per neighbour: sharing and unmasking both need it
            self._aeads[peer] = self._share_cipher(peer, self._peers[peer][0])
        return self._aeads[peer]

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Split ``bᵤ`` and ``sᵤ`` among the neighbours in the roster; one ciphertext per neighbour."""
        self._expect(Stage.ADVERTISE, "share keys")
        self._check_round(roster)
        u, cfg = self.client_id, self.config
        mine = (_raw_public(self._c_key), _raw_public(self._s_key))
        if roster.keys.get(u) != mine:
            raise SecAggError(f"client {u}: the key roster does not carry this client's own keys; aborting")
        peers = {v: roster.keys[v] for v in sorted(self._graph) if v in roster.keys}
        if len({c for c, _ in peers.values()} | {mine[0]}) != len(peers) + 1:
            raise SecAggError(f"client {u}: the key roster repeats a public key; aborting")
        if len(peers) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {u}: only {len(peers)} neighbours advertised keys; threshold {cfg.threshold}"
            )
        identities = self._authenticate(roster, peers) if self.credentials is not None else {}
        # every agreement before any state changes: a roster with a low-order key is refused as a whole
        aeads = {v: self._share_cipher(v, c) for v, (c, _) in peers.items()}
        self._peers, self._aeads, self._identities = peers, aeads, identities
        self._self_seed = self._rand(32)
        xs = [v + 1 for v in [*peers, u]]  # share points are id + 1 (0 is the secret)
        b_sh = shamir.split(self._self_seed, threshold=cfg.threshold, xs=xs, randbytes=self._rand)
        s_sh = shamir.split(_raw_private(self._s_key), threshold=cfg.threshold, xs=xs, randbytes=self._rand)
        self._own_shares = (b_sh[u + 1], s_sh[u + 1])
        out = {}
        nonces = self._rand(12 * len(peers))  # one draw for every neighbour's fresh 12-byte nonce
        for i, v in enumerate(peers):
            plain = shamir.share_to_bytes(b_sh[v + 1]) + shamir.share_to_bytes(s_sh[v + 1])
            nonce = nonces[12 * i : 12 * i + 12]
            out[v] = nonce + self._aead(v).encrypt(nonce, plain, _aad(cfg, u, v))
        self.stage = Stage.SHARE
        return ShareKeys(cfg.round_id, u, out)

    # -- stage 2 ----------------------------------------------------------------------------------------
    def masked_input(self, inbox: ShareInbox, codes: np.ndarray) -> MaskedInput:
        """Mask this client's quantized ``codes`` (integers in ``[0, 2^bits)``), packed at ``ring_bits`` bits.

        Pairwise masks are added for exactly the neighbours whose shares reached this client (the others
        dropped before stage 2), which is the set the server will use to cancel them.
        """
        self._expect(Stage.SHARE, "send a masked input")
        self._check_round(inbox)
        cfg, u = self.config, self.client_id
        if inbox.client_id != u:
            raise SecAggError(f"client {u}: received the share inbox of client {inbox.client_id}")
        stray = set(inbox.ciphertexts) - set(self._peers)
        if stray:
            raise SecAggError(f"client {u}: inbox holds shares from non-neighbours {sorted(stray)[:5]}")
        codes = np.asarray(codes)
        if codes.shape != (cfg.vector_size,):
            raise SecAggError(f"client {u}: input has shape {codes.shape}, expected ({cfg.vector_size},)")
        bad = SecAggError(f"client {u}: inputs must be integer codes in [0, 2^{cfg.bits})")
        signed = codes.dtype.kind == "i"  # an unsigned array needs no pass for its minimum
        if codes.dtype.kind not in "ui" or (
            codes.size and signed and (codes.min() < 0 or codes.max() >= 1 << cfg.bits)
        ):
            raise bad
        if len(inbox.ciphertexts) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {u}: only {len(inbox.ciphertexts)} neighbours left; aborting the round"
            )
        try:  # an unsigned input's range is checked block by block as it is read into the words
            y = to_words(codes, cfg.ring_bits, below=None if signed else 1 << cfg.bits)
        except ValueError:
            raise bad from None
        # + PRG(bᵤ), + PRG(sᵤᵥ) for v > u, − PRG(sᵤᵥ) for v < u, on lane words (ring.to_words): they wrap
        # modulo 2^64, a multiple of every word's group, which packing reduces to. Every key is agreed before
        # the state changes (a roster's low-order key is a SecAggError that leaves this client as it was)
        masks = [(_self_key(cfg, self._self_seed, u), 1)] + [
            (_pair_key(cfg, self._s_key, self._peers[v][1], u, v), 1 if u < v else -1)
            for v in sorted(inbox.ciphertexts)
        ]
        self._received = dict(inbox.ciphertexts)
        add_masks(y, masks)
        self.stage = Stage.MASKED
        return MaskedInput(cfg.round_id, u, pack_words(y, cfg.ring_bits, cfg.vector_size))

    # -- stage 3 ----------------------------------------------------------------------------------------
    def _check_request(self, request: UnmaskRequest, what: str) -> None:
        """The checks an unmasking request must pass before this device signs it or answers it (nothing changes)."""
        self._expect(Stage.MASKED, what)
        self._check_round(request)
        cfg, u = self.config, self.client_id
        surv, drop = set(request.survivors), set(request.dropped)
        if surv & drop:
            raise SecAggError(
                f"client {u}: refusing to unmask: clients {sorted(surv & drop)[:5]} listed as both"
            )
        if u not in surv:
            raise SecAggError(f"client {u}: refusing to unmask a round it is not listed as a survivor of")
        if len(surv) < cfg.threshold:
            raise SecAggError(f"client {u}: only {len(surv)} survivors; threshold {cfg.threshold}")
        if len(surv) < self.min_inputs:  # checked before any share is produced: nothing is revealed
            raise SecAggFloorError(
                f"client {u}: refusing to unmask a sum of {len(surv)} masked inputs: this device's distributed-DP "
                f"noise is calibrated to a sum of at least {self.min_inputs} (m_min), so a smaller one would "
                "reveal its update with too little noise",
                survivors=len(surv),
                floor=self.min_inputs,
            )

    def sign_survivors(self, request: UnmaskRequest) -> SurvivorSignature:
        """The consistency check (authenticated rounds): sign the unmasking request this device received.

        A device vouches for one request only: asked to sign another (a server telling devices different
        survivor sets and shopping for signatures), it refuses (:class:`SecAggAuthError`); the same request again
        gets the same signature (Ed25519 is deterministic), so a transport may retry.
        """
        self._check_request(request, "sign the survivor set")
        u, cred = self.client_id, self.credentials
        if cred is None:
            raise SecAggError(
                f"client {u}: this device has no identity to sign with; only authenticated rounds have a "
                "consistency check"
            )
        digest = request_digest(request)
        if self._vouched and self._vouched != digest:
            raise SecAggAuthError(
                f"client {u}: refusing to sign a second, different unmasking request in this round (it signed "
                "another survivor set already): the server is telling devices different survivor sets"
            )
        self._vouched = digest
        return SurvivorSignature(
            self.config.round_id, u, cred.identity.sign(consistency_statement(self._binding, u, digest))
        )

    def _check_consistency(self, request: UnmaskRequest, signatures: SurvivorSignatures | None) -> None:
        """Refuse (:class:`SecAggAuthError`) unless this device signed ``request`` and at least ``threshold``
        distinct certified devices of its neighbourhood (itself included), each a survivor of ``request``, signed
        exactly the request it received; signatures that do not verify, or come from outside, do not count."""
        u, t = self.client_id, self.config.threshold
        if not isinstance(signatures, SurvivorSignatures):
            raise SecAggAuthError(
                f"client {u}: refusing to unmask without the consistency check's signatures (this device "
                "authenticates its round)"
            )
        self._check_round(signatures)
        digest = request_digest(request)
        if self._vouched != digest:
            raise SecAggAuthError(
                f"client {u}: refusing to unmask a request it did not sign"
                + (" (it signed another survivor set)" if self._vouched else "")
            )
        surv = set(request.survivors)
        assert self.credentials is not None
        vouching, bad, outside = {self.credentials.identity.certificate.identity_public}, [], []
        for v, sig in sorted(signatures.signatures.items()):
            if v == u:  # this device counts once, as itself
                continue
            key = self._identities.get(v)
            if key is None or v not in surv:
                outside.append(v)
                continue
            try:
                Ed25519PublicKey.from_public_bytes(key).verify(
                    sig, consistency_statement(self._binding, v, digest)
                )
            except InvalidSignature:
                bad.append(v)
                continue
            vouching.add(key)
        if len(vouching) < t:
            raise SecAggAuthError(
                f"client {u}: refusing to unmask: {len(vouching)} devices of its neighbourhood (itself included) "
                f"signed the unmasking request it received, threshold {t} (signatures that do not verify on this "
                f"request: {bad[:5]}; from non-survivors or outside its neighbourhood: {outside[:5]})"
            )

    def unmask(self, request: UnmaskRequest, signatures: SurvivorSignatures | None = None) -> UnmaskResponse:
        """For each neighbour: its self-mask share if it uploaded, its mask-key share if it dropped — never both.

        With credentials (an authenticated round) ``signatures`` is the consistency check's result, checked first
        (:meth:`_check_consistency`): a device reveals nothing for a request ``threshold`` of its neighbourhood
        did not sign. Without credentials there is no consistency check and ``signatures`` must be None.
        """
        self._check_request(request, "unmask")
        cfg, u = self.config, self.client_id
        surv, drop = set(request.survivors), set(request.dropped)
        if self.credentials is not None:
            self._check_consistency(request, signatures)
        elif signatures is not None:
            raise SecAggError(f"client {u}: survivor signatures in a round without device identities")
        out: dict[int, bytes] = {}
        # only clients this one holds shares of (or has revealed before) can matter: its neighbours, not the round
        held = self._received.keys() | {u} | self._revealed.keys()
        for v in sorted((surv | drop) & held):
            want = "b" if v in surv else "s"
            if self._revealed.get(v, want) != want:
                raise SecAggError(f"client {u}: refusing to reveal both secrets of client {v}")
            if v == u:
                b, s = self._own_shares
            elif v in self._received:
                ct = self._received[v]
                try:
                    plain = self._aead(v).decrypt(ct[:12], ct[12:], _aad(cfg, v, u))
                except InvalidTag as exc:
                    raise SecAggError(
                        f"client {u}: share ciphertext from client {v} failed authentication"
                    ) from exc
                b = shamir.share_from_bytes(plain[: shamir.SHARE_BYTES])
                s = shamir.share_from_bytes(plain[shamir.SHARE_BYTES :])
            else:
                continue
            out[v] = shamir.share_to_bytes(b if want == "b" else s)
        for v in out:  # only once every share was produced: a refused request reveals nothing
            self._revealed[v] = "b" if v in surv else "s"
        return UnmaskResponse(cfg.round_id, u, out)


class SecAggServer:
    """The untrusted aggregator: routes messages, folds masked inputs into one running sum, then unmasks it.

    Partner: :class:`SecAggClient`. A stage closes when the driver says so (every expected message arrived, or
    a deadline passed): :meth:`roster` closes key advertisement, :meth:`close_shares` closes share exchange,
    :meth:`unmask_request` closes masked inputs and *freezes the survivor set*, :meth:`survivor_signatures` closes
    an authenticated round's consistency check, :meth:`result` ends the round.
    Whatever arrives for a closed stage (a late masked input, say) is refused with :class:`SecAggOrderError`
    and changes nothing, so the sum always covers exactly the frozen survivors.

    The object holds public keys, ciphertexts it cannot open, the running masked sum and the shares it asked
    for; it never holds an individual unmasked update. Memory is O(vector) for the sum plus O(clients²) small
    messages (O(clients · neighbours) with SecAgg+).
    """

    def __init__(
        self,
        config: SecAggConfig,
        *,
        min_inputs: int = 0,
        authenticated: bool = False,
        revocations: RevocationList | None = None,
    ) -> None:
        self.config = config
        #: an authenticated round takes only signed advertisements (:class:`SignedAdvertiseKeys`) and sends a
        #: :class:`SignedKeyRoster`; devices with credentials refuse any other roster whatever this says
        self.authenticated = authenticated
        #: the enrollment authority's revocation list, if the operator gave the server one: an advertisement
        #: certified for a device it revokes is refused, so the round goes on without that device (devices
        #: holding the list would refuse the whole roster). A courtesy, not the guarantee: devices check too.
        self.revocations = revocations
        #: client -> (certificate, signature), forwarded in the roster unverified
        self.attestations: dict[int, tuple[bytes, bytes]] = {}
        #: the fewest masked inputs the server unmasks (besides the threshold): distributed DP's m_min, whose
        #: noise is calibrated to that many devices; a sum of fewer would reach the server under-noised
        self.min_inputs = min_inputs
        self.graph = neighbours(config)
        self.stage = Stage.ADVERTISE
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self._c_owner: dict[bytes, int] = {}  # share-encryption public key -> the client that advertised it
        self.mailbox: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> ciphertext
        self.share_senders: set[int] = set()
        self.uploaded: list[int] = []
        # lane words (ring.to_words), wrapping modulo 2^64: a multiple of each word's group, reduced at the end
        self.masked_sum = np.zeros(word_count(config.vector_size, config.ring_bits), dtype=np.uint64)
        self.signatures: dict[int, bytes] = {}  # survivor -> its signature of the request (consistency check)
        self._signatures: SurvivorSignatures | None = None
        self.responses: dict[int, dict[int, bytes]] = {}  # responder -> owner -> share
        self.bytes_received: dict[int, int] = {}
        self._roster: KeyRoster | None = None
        self._request: UnmaskRequest | None = None
        self._result: np.ndarray | None = None

    def _count(self, u: int, n: int) -> None:
        self.bytes_received[u] = self.bytes_received.get(u, 0) + n

    def _expect(self, stage: str, what: str) -> None:
        if self.stage != stage:
            late = _ORDER.index(self.stage) > _ORDER.index(stage)
            raise SecAggOrderError(
                f"{what} refused: the server is at stage '{self.stage}' "
                + ("(that stage is closed: too late)" if late else f"(it accepts this at '{stage}')"),
                stage=self.stage,
            )

    def _check_round(self, msg: object, sender: int) -> None:
        rid = getattr(msg, "round_id", None)
        if rid != self.config.round_id:
            raise SecAggOrderError(
                f"message from client {sender} is for round {rid}, this is round {self.config.round_id}",
                stage=self.stage,
            )

    # -- stage 0 ----------------------------------------------------------------------------------------
    def receive_keys(self, msg: AdvertiseKeys) -> None:
        self._expect(Stage.ADVERTISE, f"key advertisement from client {msg.client_id}")
        self._check_round(msg, msg.client_id)
        if isinstance(msg, SignedAdvertiseKeys) != self.authenticated:
            raise SecAggError(
                f"client {msg.client_id} sent {'a signed' if not self.authenticated else 'an unsigned'} key "
                f"advertisement; this round takes {'signed' if self.authenticated else 'unsigned'} ones"
            )
        if (
            not 0 <= msg.client_id < self.config.num_clients
            or len(msg.c_public) != 32
            or len(msg.s_public) != 32
        ):
            raise DecodeError(f"malformed key advertisement from client {msg.client_id}")
        if msg.client_id in self.keys:
            raise SecAggOrderError(f"client {msg.client_id} already advertised keys", stage=self.stage)
        # a low-order key makes every agreement with it fail: each neighbour's masking, and the unmasking
        if not (contributory(msg.c_public) and contributory(msg.s_public)):
            raise DecodeError(
                f"key advertisement from client {msg.client_id} holds a low-order X25519 point, with which no "
                "shared secret can be agreed; send keys made by X25519PrivateKey.generate()"
            )
        # devices refuse a roster that repeats a share key (protocol.SecAggClient.share_keys): a repeat would let
        # two colluding devices stop every neighbourhood holding both, so the later one is refused instead
        first = self._c_owner.get(msg.c_public)
        if first is not None:
            raise SecAggError(
                f"client {msg.client_id} advertised the share-encryption key client {first} already advertised; "
                "refused (devices would refuse a roster that repeats it): send freshly generated keys"
            )
        if isinstance(msg, SignedAdvertiseKeys) and self.revocations is not None:
            cert = DeviceCertificate.from_bytes(msg.certificate)
            # its device or its key (KeyRevoked): refused here, as every device would refuse the roster
            self.revocations.check_certificate(cert, client=msg.client_id, where=f"client {msg.client_id}: ")
        self.keys[msg.client_id] = (msg.c_public, msg.s_public)
        if isinstance(msg, SignedAdvertiseKeys):  # forwarded as is: the devices, not the server, verify it
            self.attestations[msg.client_id] = (msg.certificate, msg.signature)
        self._c_owner[msg.c_public] = msg.client_id
        self._count(msg.client_id, msg.wire_size())

    def roster(self) -> KeyRoster:
        """Close key advertisement (first call) and return the roster every device needs for stage 1."""
        if self._roster is None:
            self._expect(Stage.ADVERTISE, "closing key advertisement")
            if len(self.keys) < self.config.threshold:
                raise SecAggError(
                    f"only {len(self.keys)} clients advertised keys; threshold {self.config.threshold}"
                )
            keys = dict(sorted(self.keys.items()))
            self._roster = (
                SignedKeyRoster(self.config.round_id, keys, dict(sorted(self.attestations.items())))
                if self.authenticated
                else KeyRoster(self.config.round_id, keys)
            )
            self.stage = Stage.SHARE
        return self._roster

    # -- stage 1 ----------------------------------------------------------------------------------------
    def receive_shares(self, msg: ShareKeys) -> None:
        sender = msg.client_id
        self._expect(Stage.SHARE, f"shares from client {sender}")
        self._check_round(msg, sender)
        if sender not in self.keys:
            raise SecAggOrderError(
                f"client {sender} sent shares but is not in the key roster", stage=self.stage
            )
        if sender in self.share_senders:
            raise SecAggOrderError(f"client {sender} already sent its shares", stage=self.stage)
        expected = self.graph[sender] & set(self.keys)
        if set(msg.ciphertexts) != expected:
            raise SecAggError(
                f"client {sender} must send one ciphertext to each of its {len(expected)} neighbours in the "
                f"roster; got {len(msg.ciphertexts)} (missing {sorted(expected - set(msg.ciphertexts))[:5]}, "
                f"extra {sorted(set(msg.ciphertexts) - expected)[:5]})"
            )
        for v, ct in msg.ciphertexts.items():
            self.mailbox.setdefault(v, {})[sender] = ct
        self.share_senders.add(sender)
        self._count(sender, msg.wire_size())

    def close_shares(self) -> None:
        """Close share exchange: from now on each device that shared may fetch its inbox and mask."""
        self._expect(Stage.SHARE, "closing share exchange")
        if len(self.share_senders) < self.config.threshold:
            raise SecAggError(
                f"only {len(self.share_senders)} clients shared keys; threshold {self.config.threshold}"
            )
        # ciphertexts from or to clients that did not share are never used: drop them
        self.mailbox = {
            v: {u: ct for u, ct in box.items() if u in self.share_senders}
            for v, box in self.mailbox.items()
            if v in self.share_senders
        }
        self.stage = Stage.MASKED

    def inbox(self, recipient: int) -> ShareInbox:
        """The ciphertexts addressed to ``recipient`` by the clients that shared (after :meth:`close_shares`)."""
        if self.stage == Stage.SHARE:
            raise SecAggOrderError(
                "share exchange is still open; the inbox is not final yet", stage=self.stage
            )
        if recipient not in self.share_senders:
            raise SecAggOrderError(f"client {recipient} did not share keys in time", stage=self.stage)
        return ShareInbox(
            self.config.round_id, recipient, dict(sorted(self.mailbox.get(recipient, {}).items()))
        )

    # -- stage 2 ----------------------------------------------------------------------------------------
    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Fold one masked input into the running sum; the input itself is not kept."""
        sender, cfg = msg.client_id, self.config
        self._expect(Stage.MASKED, f"masked input from client {sender}")
        self._check_round(msg, sender)
        if sender not in self.share_senders:
            raise SecAggOrderError(
                f"client {sender} did not share keys, so it cannot upload", stage=self.stage
            )
        if sender in self.uploaded:
            raise SecAggOrderError(f"client {sender} already uploaded its masked input", stage=self.stage)
        # its words added straight into the running sum; wraps mod 2^64, reduced to each word's group at the end
        unpack_words(msg.packed, cfg.ring_bits, cfg.vector_size, self.masked_sum)
        self.uploaded.append(sender)
        self._count(sender, msg.wire_size())

    def unmask_request(self) -> UnmaskRequest:
        """Close masked inputs and freeze (survivors, dropped); repeated calls return the same request."""
        if self._request is None:
            self._expect(Stage.MASKED, "the unmasking request")
            if len(self.uploaded) < self.config.threshold:
                raise SecAggError(
                    f"only {len(self.uploaded)} masked inputs arrived; threshold {self.config.threshold}"
                )
            if len(self.uploaded) < self.min_inputs:
                raise SecAggError(
                    f"only {len(self.uploaded)} masked inputs arrived; distributed DP needs {self.min_inputs} "
                    "(its noise is calibrated to that many devices): the sum is not unmasked"
                )
            self._request = UnmaskRequest(
                self.config.round_id,
                tuple(sorted(self.uploaded)),
                tuple(sorted(self.share_senders - set(self.uploaded))),
            )
            self.stage = Stage.CONSISTENCY if self.authenticated else Stage.UNMASK
        return self._request

    # -- consistency check (authenticated rounds) --------------------------------------------------------
    def receive_signature(self, msg: SurvivorSignature) -> None:
        """A survivor's signature of the unmasking request, kept to forward (the devices verify it)."""
        sender = msg.client_id
        self._expect(Stage.CONSISTENCY, f"survivor signature from client {sender}")
        self._check_round(msg, sender)
        if sender not in self.survivors:
            raise SecAggOrderError(
                f"client {sender} is not a survivor; it is not asked to sign", stage=self.stage
            )
        if sender in self.signatures:
            raise SecAggOrderError(f"client {sender} already signed the survivor set", stage=self.stage)
        self.signatures[sender] = msg.signature
        self._count(sender, msg.wire_size())

    def survivor_signatures(self) -> SurvivorSignatures:
        """Close the consistency check (first call) and return the signatures every survivor needs to unmask.

        Raises :class:`SecAggError`, staying at the check (more signatures may come), while fewer than
        ``threshold`` survivors signed: no device would unmask. The survivor set itself stays as frozen: a
        survivor that signs nothing is still in the sum (its self-mask comes back from its neighbours' shares).
        """
        if self._signatures is None:
            self._expect(Stage.CONSISTENCY, "closing the consistency check")
            if len(self.signatures) < self.config.threshold:
                raise SecAggError(
                    f"only {len(self.signatures)} survivors signed the unmasking request; threshold "
                    f"{self.config.threshold}"
                )
            self._signatures = SurvivorSignatures(self.config.round_id, dict(sorted(self.signatures.items())))
            self.stage = Stage.UNMASK
        return self._signatures

    # -- stage 3 ----------------------------------------------------------------------------------------
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        responder = msg.client_id
        self._expect(Stage.UNMASK, f"unmasking response from client {responder}")
        self._check_round(msg, responder)
        req = self._request
        assert req is not None
        if responder not in req.survivors:
            raise SecAggOrderError(
                f"client {responder} is not a survivor; it is not asked to unmask", stage=self.stage
            )
        if responder in self.responses:
            raise SecAggOrderError(
                f"client {responder} already answered the unmasking request", stage=self.stage
            )
        allowed = (self.graph[responder] | {responder}) & (set(req.survivors) | set(req.dropped))
        if not set(msg.shares) <= allowed:
            raise SecAggError(
                f"client {responder} sent shares of clients it was not asked about: "
                f"{sorted(set(msg.shares) - allowed)[:5]}"
            )
        self.responses[responder] = dict(msg.shares)
        self._count(responder, msg.wire_size())

    def _recover(self, owner: int, lam_cache: dict[tuple[int, ...], dict[int, int]]) -> bytes:
        t = self.config.threshold
        pts = {r + 1: shamir.share_from_bytes(sh[owner]) for r, sh in self.responses.items() if owner in sh}
        if len(pts) < t:
            raise SecAggError(f"only {len(pts)} shares of client {owner}'s secret arrived; threshold {t}")
        points = sorted(pts)
        xs = tuple(points[:t])
        if xs not in lam_cache:
            lam_cache[xs] = shamir.lagrange_at_zero(xs)
        check = None
        if len(points) > t:  # the extra share checks the others: keyed by the points and the extra point
            key = (*xs, -points[t])
            if key not in lam_cache:
                lam_cache[key] = shamir.lagrange_at(xs, points[t])
            check = lam_cache[key]
        try:
            return shamir.combine(pts, threshold=t, lam=lam_cache[xs], check=check)
        except DeltaplaneError as exc:  # a corrupted share: the sum would be wrong, so refuse it
            raise SecAggError(
                f"the unmasking shares of client {owner}'s secret are inconsistent ({exc}); some survivor sent a "
                "corrupted share, so the sum cannot be trusted"
            ) from None

    def result(self) -> np.ndarray:
        """The exact integer sum (uint64) of the frozen survivors' codes; ends the round.

        Raises :class:`SecAggError` (and stays at the unmasking stage, so more responses may still come)
        while some survivor's self-mask or some dropped client's mask key lacks ``threshold`` shares.
        """
        if self._result is not None:
            return self._result
        self._expect(Stage.UNMASK, "computing the result")
        cfg, req = self.config, self._request
        assert req is not None
        lam: dict[tuple[int, ...], dict[int, int]] = {}
        # every secret is rebuilt before any mask is expanded: a missing share fails fast, changing nothing
        masks = [(_self_key(cfg, self._recover(u, lam), u), -1) for u in req.survivors]
        for u in req.dropped:
            s_key = X25519PrivateKey.from_private_bytes(self._recover(u, lam))
            for v in req.survivors:
                if u in self.mailbox.get(v, {}):  # v masked with u: u shared with v before dropping
                    # v added +PRG(s_uv) if v < u else −PRG(s_uv) for its pair with u; take it back out
                    masks.append((_pair_key(cfg, s_key, self.keys[v][1], u, v), -1 if v < u else 1))
        total = self.masked_sum.copy()
        add_masks(total, masks)
        self._result = from_words(
            reduce_words(total, cfg.vector_size, cfg.ring_bits), cfg.ring_bits, cfg.vector_size
        )
        self.masked_sum = np.zeros(0, dtype=total.dtype)
        self.stage = Stage.DONE
        return self._result

    @property
    def survivors(self) -> tuple[int, ...]:
        """The frozen survivor set (empty before :meth:`unmask_request`)."""
        return self._request.survivors if self._request is not None else ()

    @property
    def dropped(self) -> tuple[int, ...]:
        """Clients that shared keys but are not in the sum (empty before :meth:`unmask_request`)."""
        return self._request.dropped if self._request is not None else ()


_ORDER = [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK, Stage.DONE]


def request_digest(request: UnmaskRequest) -> bytes:
    """SHA-256 of an unmasking request's exact encoding (round id, survivors, dropped): what devices sign."""
    return hashlib.sha256(request.to_bytes()).digest()
