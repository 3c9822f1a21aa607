"""A signed seal over a verified prefix of the state log, so a new process need not check every signature again.

Checking every entry's Ed25519 signature is most of a registry's first read in a new process (1.3 s of 1.8 s
for 12,002 entries). Checking only the newest signature would not do: an entry's signature covers its hash and,
through ``prev``, every entry before it, but the registry signs new entries (cards, evaluations, withdrawals)
on top of whatever its newest entry is, so an entry forged at the end, or with a broken signature, would be
vouched for by the next honest one.

Instead, a process holding the signing key that has verified the log through entry ``H`` writes one row to
``state_log_seal``: its key's signature of ``{"kind": "state-log-seal", "seq": H, "sha256": <entry H's hash>,
"signatures": <running SHA-256 of every signature text 1..H>, "keys": {key id: SHA-256 of the public key}}``.
A reader whose trusted keys include the sealing key and every key named in ``keys`` then re-hashes entries
1..H and their signature texts (cheap) instead of verifying them: equal hashes mean the very bytes a holder of
a trusted key verified under those same keys. Anything else (no seal, a seal by an untrusted key, a key of
``keys`` the reader does not trust, a hash that differs, an entry that does not replay) and the reader checks
every signature, as before, so it refuses exactly what the exhaustive check refuses, with the same message.

A seal also names entry ``H``: a log that no longer holds it (cut short, or cut and appended to) is refused
without ``--expect-head`` (:func:`problem`). Deleting the seal row removes that check and the speed-up, no more.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from deltaplane.errors import SignatureError
from deltaplane.registry.signing import Signer, Verifier

__all__ = ["AFTER", "GENESIS", "Seal", "fold", "key_id", "read", "write"]

GENESIS = "0" * 64  # the running signature digest before entry 1
AFTER = (
    256  # seal again once this many entries were verified one by one since the last seal (~30 ms of checks)
)
_DDL = "CREATE TABLE IF NOT EXISTS state_log_seal (id INTEGER PRIMARY KEY CHECK (id = 1), seal TEXT NOT NULL)"


@dataclass(frozen=True)
class Seal:
    """A verified seal: entries 1..``index`` (the last hashing to ``sha256``) had the signatures whose running
    digest is ``signatures``, each verified with the key of ``keys`` (key id -> SHA-256 of the public key)."""

    index: int
    sha256: str
    signatures: str
    keys: dict[str, str]

    def statement(self) -> dict[str, Any]:
        return {
            "kind": "state-log-seal",
            "seq": self.index,
            "sha256": self.sha256,
            "signatures": self.signatures,
            "keys": self.keys,
        }


def fold(digest: str, signature: str) -> str:
    """The running digest after one more entry's signature text (the previous digest has a fixed length)."""
    return hashlib.sha256(f"{digest}{signature}".encode()).hexdigest()


def key_id(signature: object) -> str | None:
    """The key id a signature text names (None for anything that is not ``key_id:...`` text)."""
    if not isinstance(signature, str):
        return None
    kid, sep, _ = signature.partition(":")
    return kid if sep and kid else None


def read(con: sqlite3.Connection, verifier: Verifier) -> Seal | None:
    """The stored seal when ``verifier`` trusts the key that signed it and every key it names; else None.

    None is never a finding: without a usable seal the reader checks every signature, as it always did.
    """
    try:
        row = con.execute("SELECT seal FROM state_log_seal WHERE id = 1").fetchone()
    except sqlite3.OperationalError as exc:
        if not _missing(exc):
            raise
        return None  # no table yet, or one of another shape (whoever can write the file made it): no seal
    try:
        doc: Any = json.loads(row[0]) if row is not None else None  # None (no row) fails below as TypeError
        seal = Seal(int(doc["seq"]), str(doc["sha256"]), str(doc["signatures"]), dict(doc["keys"]))
        verifier.verify(seal.statement(), doc["signature"])
    # OverflowError: JSON's Infinity as an index; anything in the row is whatever the file's writer put there
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError, SignatureError):
        return None
    if any(verifier.fingerprint(kid) != fp for kid, fp in seal.keys.items()):
        return None
    return seal


def write(con: sqlite3.Connection, signer: Signer, seal: Seal) -> None:
    """Store ``seal`` (of entries this process verified) signed by ``signer``, unless a seal ``signer`` made is
    stored that is as new (one it cannot verify, written by someone else, is replaced).

    Call inside a write transaction.
    """
    con.execute(_DDL)
    stored = read(con, signer.verifier())
    if stored is not None and stored.index >= seal.index:
        return
    doc = {**seal.statement(), "signature": signer.sign(seal.statement()).to_text()}
    insert = "INSERT OR REPLACE INTO state_log_seal (id, seal) VALUES (1, ?)"
    try:
        con.execute(insert, (json.dumps(doc, sort_keys=True),))
    except sqlite3.OperationalError as exc:
        if not _missing(exc):
            raise
        # a table of another shape under the name: it held no seal this could read, so it is replaced
        con.execute("DROP TABLE state_log_seal")
        con.execute(_DDL)
        con.execute(insert, (json.dumps(doc, sort_keys=True),))


def _missing(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says the seal's table or column is not there (not a locked or read-only database)."""
    return any(s in str(exc) for s in ("no such table", "no such column", "has no column"))
