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
2. **Masked input** — ``u`` uploads ``yᵤ = xᵤ + PRG(bᵤ) + Σ_{v>u} PRG(sᵤᵥ) − Σ_{v<u} PRG(sᵤᵥ)  (mod 2ᵏ)`` where
   ``xᵤ`` are its quantized codes and ``sᵤᵥ = HKDF(X25519(sᵤ, s_v))``. The server folds ``yᵤ`` into a running
   sum and drops it: pairwise masks cancel in the sum, self-masks hide ``yᵤ`` even if pairwise masks are later
   revealed.
3. **Unmask** — the server names who uploaded (survivors) and who did not (dropped). Each responding client
   returns, for every neighbour, *either* its share of ``bᵤ`` (uploaded) *or* of ``sᵤ`` (dropped) — never both,
   and it refuses a request that asks for both. The server rebuilds the self-masks of the survivors and the
   dangling pairwise masks of the dropped clients and removes them. Clients that vanish *after* uploading are
   still in the sum: their self-masks come back from their neighbours' shares.

The server object holds public keys, ciphertexts it cannot open, the running masked sum and at most the shares it
asked for; it never holds an individual unmasked update (tests check every attribute). Threat model: semi-honest
server and clients (no signatures / consistency round, which the malicious-secure variant adds).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from deltaplane.aggregation.secagg import shamir
from deltaplane.aggregation.secagg.prg import agree, derive, expand_mask
from deltaplane.aggregation.secagg.ring import pack, ring_bits, unpack
from deltaplane.errors import ConfigError, DecodeError, DeltaplaneError

__all__ = ["AdvertiseKeys", "SecAggClient", "SecAggConfig", "SecAggError", "SecAggServer", "neighbours"]

ID_BYTES = 4


class SecAggError(DeltaplaneError):
    """The secure aggregation protocol cannot go on (too few clients left, a refused or malformed message)."""


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
        if self.vector_size < 1:
            raise ConfigError(f"vector_size must be positive. Found {self.vector_size}")
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
    def context(self) -> bytes:
        return b"round:" + str(self.round_id).encode()


def neighbours(config: SecAggConfig) -> dict[int, frozenset[int]]:
    """The communication graph: complete, or SecAgg+'s Harary graph on a public random permutation."""
    n = config.num_clients
    if config.neighbours is None:
        return {u: frozenset(set(range(n)) - {u}) for u in range(n)}
    order = np.random.default_rng(config.graph_seed).permutation(n)
    pos = {int(u): i for i, u in enumerate(order)}
    half = config.neighbours // 2
    return {
        u: frozenset(int(order[(pos[u] + d) % n]) for d in range(-half, half + 1) if d != 0) for u in range(n)
    }


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0 message: a client's two X25519 public keys."""

    client_id: int
    c_public: bytes
    s_public: bytes

    def to_bytes(self) -> bytes:
        return self.client_id.to_bytes(ID_BYTES, "big") + self.c_public + self.s_public


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _pair_context(config: SecAggConfig, u: int, v: int) -> bytes:
    a, b = min(u, v), max(u, v)
    return config.context + b"/" + str(a).encode() + b"-" + str(b).encode()


def _pair_mask(
    config: SecAggConfig, s_private: X25519PrivateKey, s_public_peer: bytes, u: int, v: int
) -> np.ndarray:
    key = derive(agree(s_private, s_public_peer), "mask", _pair_context(config, u, v))
    return expand_mask(key, config.vector_size, config.ring_bits)


def _self_mask(config: SecAggConfig, seed: bytes, u: int) -> np.ndarray:
    key = derive(seed, "self-mask", config.context + b"/" + str(u).encode())
    return expand_mask(key, config.vector_size, config.ring_bits)


@dataclass
class _ClientState:
    c_key: X25519PrivateKey
    s_key: X25519PrivateKey
    self_seed: bytes = b""
    peers: dict[int, AdvertiseKeys] = field(default_factory=dict)
    received: dict[int, bytes] = field(default_factory=dict)
    own_shares: tuple[int, int] = (0, 0)
    uploaded: bool = False
    revealed: dict[int, str] = field(default_factory=dict)


class SecAggClient:
    """One device in a secure aggregation round; holds its keys and secrets in :attr:`state`.

    Args:
        client_id: this client's id in ``[0, num_clients)``.
        config: the round's public parameters.
        randbytes: source of secret randomness (``secrets.token_bytes`` by default). Pass a seeded source
            only in simulations that must be reproducible.
    """

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if not 0 <= client_id < config.num_clients:
            raise ConfigError(f"client_id must be in [0, {config.num_clients}). Found {client_id}")
        self.client_id = client_id
        self.config = config
        self._rand = randbytes
        self._graph = neighbours(config)[client_id]
        self.state = _ClientState(
            c_key=X25519PrivateKey.from_private_bytes(randbytes(32)),
            s_key=X25519PrivateKey.from_private_bytes(randbytes(32)),
        )

    # -- round 0 ------------------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        return AdvertiseKeys(self.client_id, _raw_public(self.state.c_key), _raw_public(self.state.s_key))

    # -- round 1 ------------------------------------------------------------------------------------
    def _aead(self, peer: int) -> AESGCM:
        shared = agree(self.state.c_key, self.state.peers[peer].c_public)
        return AESGCM(derive(shared, "share-encryption", _pair_context(self.config, self.client_id, peer)))

    def share_keys(self, keys: Mapping[int, AdvertiseKeys]) -> dict[int, bytes]:
        """Split ``bᵤ`` and ``sᵤ`` among the neighbours that advertised keys; one ciphertext per neighbour."""
        u, cfg = self.client_id, self.config
        peers = {v: keys[v] for v in self._graph if v in keys}
        if len(peers) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {u}: only {len(peers)} neighbours advertised keys; threshold {cfg.threshold}"
            )
        self.state.peers = peers
        self.state.self_seed = self._rand(32)
        xs = [v + 1 for v in [*peers, u]]  # share points are id + 1 (0 is the secret)
        b_sh = shamir.split(self.state.self_seed, threshold=cfg.threshold, xs=xs, randbytes=self._rand)
        s_sh = shamir.split(
            _raw_private(self.state.s_key), threshold=cfg.threshold, xs=xs, randbytes=self._rand
        )
        self.state.own_shares = (b_sh[u + 1], s_sh[u + 1])
        out = {}
        for v in peers:
            plain = shamir.share_to_bytes(b_sh[v + 1]) + shamir.share_to_bytes(s_sh[v + 1])
            nonce = self._rand(12)
            aad = _pair_context(cfg, u, v) + b"/from:" + str(u).encode()
            out[v] = nonce + self._aead(v).encrypt(nonce, plain, aad)
        return out

    # -- round 2 ------------------------------------------------------------------------------------
    def masked_input(self, ciphertexts: Mapping[int, bytes], codes: np.ndarray) -> bytes:
        """Mask this client's quantized ``codes`` (uint, each < 2^bits) and return them packed in the ring."""
        cfg, u = self.config, self.client_id
        codes = np.asarray(codes)
        if codes.shape != (cfg.vector_size,):
            raise SecAggError(f"client {u}: input has shape {codes.shape}, expected ({cfg.vector_size},)")
        if codes.dtype.kind not in "ui" or (codes.size and (codes.min() < 0 or codes.max() >= 1 << cfg.bits)):
            raise SecAggError(f"client {u}: inputs must be integer codes in [0, 2^{cfg.bits})")
        # only neighbours whose shares arrived take part: the others dropped before round 2
        self.state.received = {v: ct for v, ct in ciphertexts.items() if v in self.state.peers}
        if len(self.state.received) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {u}: only {len(self.state.received)} neighbours left; aborting the round"
            )
        y = codes.astype(np.uint32) + _self_mask(cfg, self.state.self_seed, u)
        for v in self.state.received:
            p = _pair_mask(cfg, self.state.s_key, self.state.peers[v].s_public, u, v)
            if u < v:  # uint32 wraps mod 2^32, a multiple of 2^k
                y += p
            else:
                y -= p
        self.state.uploaded = True
        return pack(y & np.uint32((1 << cfg.ring_bits) - 1), cfg.ring_bits)

    # -- round 3 ------------------------------------------------------------------------------------
    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """For each neighbour: its self-mask share if it uploaded, its mask-key share if it dropped — never both."""
        cfg, u = self.config, self.client_id
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            raise SecAggError(
                f"client {u}: refusing to unmask: clients {sorted(surv & drop)[:5]} listed as both"
            )
        if not self.state.uploaded or u not in surv:
            raise SecAggError(f"client {u}: refusing to unmask a round it is not listed as a survivor of")
        if len(surv) < cfg.threshold:
            raise SecAggError(f"client {u}: only {len(surv)} survivors; threshold {cfg.threshold}")
        out: dict[int, bytes] = {}
        for v in surv | drop:
            want = "b" if v in surv else "s"
            if self.state.revealed.get(v, want) != want:
                raise SecAggError(f"client {u}: refusing to reveal both secrets of client {v}")
            if v == u:
                b, s = self.state.own_shares
            elif v in self.state.received:
                ct = self.state.received[v]
                aad = _pair_context(cfg, u, v) + b"/from:" + str(v).encode()
                try:
                    plain = self._aead(v).decrypt(ct[:12], ct[12:], aad)
                except InvalidTag as exc:
                    raise SecAggError(
                        f"client {u}: share ciphertext from client {v} failed authentication"
                    ) from exc
                b = shamir.share_from_bytes(plain[: shamir.SHARE_BYTES])
                s = shamir.share_from_bytes(plain[shamir.SHARE_BYTES :])
            else:
                continue
            self.state.revealed[v] = want
            out[v] = shamir.share_to_bytes(b if want == "b" else s)
        return out


class SecAggServer:
    """The untrusted aggregator: routes messages, folds masked inputs into one running sum, then unmasks it.

    Memory is O(vector) for the sum plus O(clients²) small messages (O(clients · neighbours) with SecAgg+).
    """

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.graph = neighbours(config)
        self.keys: dict[int, AdvertiseKeys] = {}
        self.mailbox: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> ciphertext
        self.share_senders: set[int] = set()
        self.uploaded: list[int] = []
        self.masked_sum = np.zeros(config.vector_size, dtype=np.uint32)
        self.responses: dict[int, dict[int, bytes]] = {}  # responder -> owner -> share
        self.bytes_received: dict[int, int] = {}

    def _count(self, u: int, n: int) -> None:
        self.bytes_received[u] = self.bytes_received.get(u, 0) + n

    def receive_keys(self, msg: AdvertiseKeys) -> None:
        if (
            not 0 <= msg.client_id < self.config.num_clients
            or len(msg.c_public) != 32
            or len(msg.s_public) != 32
        ):
            raise DecodeError(f"malformed key advertisement from client {msg.client_id}")
        self.keys[msg.client_id] = msg
        self._count(msg.client_id, len(msg.to_bytes()))

    def broadcast_keys(self) -> dict[int, AdvertiseKeys]:
        if len(self.keys) < self.config.threshold:
            raise SecAggError(
                f"only {len(self.keys)} clients advertised keys; threshold {self.config.threshold}"
            )
        return dict(self.keys)

    def receive_shares(self, sender: int, ciphertexts: Mapping[int, bytes]) -> None:
        for v, ct in ciphertexts.items():
            if v not in self.graph[sender]:
                raise SecAggError(f"client {sender} sent shares to non-neighbour {v}")
            self.mailbox.setdefault(v, {})[sender] = ct
            self._count(sender, ID_BYTES + len(ct))
        self.share_senders.add(sender)

    def shares_for(self, recipient: int) -> dict[int, bytes]:
        return dict(self.mailbox.get(recipient, {}))

    def receive_masked_input(self, sender: int, payload: bytes) -> None:
        """Fold one masked input into the running sum; the payload itself is not kept."""
        cfg = self.config
        if sender not in self.share_senders or sender in self.uploaded:
            raise SecAggError(f"unexpected masked input from client {sender}")
        y = unpack(payload, cfg.ring_bits, cfg.vector_size)
        self.masked_sum += y  # wraps mod 2^32; reduced mod 2^k at the end
        self.uploaded.append(sender)
        self._count(sender, len(payload))

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """(survivors, dropped): who uploaded, and who shared keys but did not upload."""
        if len(self.uploaded) < self.config.threshold:
            raise SecAggError(
                f"only {len(self.uploaded)} masked inputs arrived; threshold {self.config.threshold}"
            )
        return sorted(self.uploaded), sorted(self.share_senders - set(self.uploaded))

    def receive_unmask(self, responder: int, shares: Mapping[int, bytes]) -> None:
        self.responses[responder] = dict(shares)
        self._count(responder, sum(ID_BYTES + len(s) for s in shares.values()))

    def _recover(self, owner: int, lam_cache: dict[frozenset[int], dict[int, int]]) -> bytes:
        t = self.config.threshold
        pts = {r + 1: shamir.share_from_bytes(sh[owner]) for r, sh in self.responses.items() if owner in sh}
        if len(pts) < t:
            raise SecAggError(f"only {len(pts)} shares of client {owner}'s secret arrived; threshold {t}")
        xs = frozenset(sorted(pts)[:t])
        if xs not in lam_cache:
            lam_cache[xs] = shamir.lagrange_at_zero(sorted(xs))
        return shamir.combine(pts, threshold=t, lam=lam_cache[xs])

    def result(self) -> np.ndarray:
        """The exact integer sum of the survivors' codes (uint64)."""
        cfg = self.config
        survivors, dropped = self.unmask_request()
        total = self.masked_sum.copy()
        lam: dict[frozenset[int], dict[int, int]] = {}
        for u in survivors:
            total -= _self_mask(cfg, self._recover(u, lam), u)
        for u in dropped:
            s_key = X25519PrivateKey.from_private_bytes(self._recover(u, lam))
            for v in survivors:
                if v in self.graph[u] and u in self.mailbox.get(v, {}):
                    p = _pair_mask(cfg, s_key, self.keys[v].s_public, u, v)
                    # v added +p if v < u else −p for its pair with u; take it back out
                    if v < u:
                        total -= p
                    else:
                        total += p
        return (total & np.uint32((1 << cfg.ring_bits) - 1)).astype(np.uint64)
