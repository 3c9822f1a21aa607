"""Service state that must survive a restart, kept in the registry's SQLite database.

The registry owns model versions; the service adds its own tables beside them (same file, same WAL, same
``synchronous=FULL`` durability) so that one transaction can cover both — see
:meth:`deltaplane.registry.Registry.transaction`. This module holds the token revocation list, the
service's id (the audience of its device tokens) and, per enrollment authority, the highest SecAgg revocation
list the service has held (so that its list file, replaced by hand or restored from a backup with an older one,
cannot un-revoke devices across a restart).
"""

from __future__ import annotations

import base64
import os
import secrets
import time

from deltaplane.aggregation.secagg.errors import RevocationRollback
from deltaplane.aggregation.secagg.revocation import RevocationList, RevocationMark
from deltaplane.registry import Registry

__all__ = ["ServiceStore"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS revoked_tokens (
        token_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, expires_at REAL NOT NULL, at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS revoked_devices (
        device_id TEXT PRIMARY KEY, before REAL NOT NULL, at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS service_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    # the highest SecAgg revocation list held, per authority (hex id); its number as decimal text (a u64)
    """CREATE TABLE IF NOT EXISTS secagg_revocation_marks (
        authority TEXT PRIMARY KEY, sequence TEXT NOT NULL, sha256 TEXT NOT NULL, at REAL NOT NULL)""",
)


class ServiceStore:
    """The service's durable tables in ``registry``'s database (created on first use)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        with registry.transaction() as con:
            for stmt in _SCHEMA:
                con.execute(stmt)

    def audience(self) -> str:
        """This service's id, the audience its device tokens carry: random, made on first use and kept in the
        database, so it is the same for every restart and worker over this registry and differs between two
        registries (a copied registry home keeps it: give a copy its own device secret).
        """
        with self.registry.transaction() as con:
            # INSERT OR IGNORE then read: two workers starting together agree on the first one written
            con.execute(
                "INSERT OR IGNORE INTO service_settings (name, value) VALUES ('audience', ?)",
                ("svc-" + base64.urlsafe_b64encode(secrets.token_bytes(12)).decode(),),
            )
            row = con.execute("SELECT value FROM service_settings WHERE name='audience'").fetchone()
        return str(row[0])

    def revoke_token(self, token_id: str, device_id: str, expires_at: float) -> None:
        with self.registry.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO revoked_tokens (token_id, device_id, expires_at, at) VALUES (?,?,?,?)",
                (token_id, device_id, expires_at, time.time()),
            )

    def revoke_device(self, device_id: str, before: float) -> None:
        with self.registry.transaction() as con:
            con.execute(
                "INSERT INTO revoked_devices (device_id, before, at) VALUES (?,?,?) ON CONFLICT (device_id) "
                "DO UPDATE SET before=MAX(before, excluded.before), at=excluded.at",
                (device_id, before, time.time()),
            )

    def revocations(self) -> tuple[set[str], dict[str, float]]:
        """Every revoked token id, and per-device revocation times.

        All ids, whatever their row's ``expires_at``: a revocation names only the token id, so that column is
        a guess (the service's ``max_token_ttl_s`` when it was revoked), not the token's expiry, which is
        inside the token. A service restarted with a lower ``max_token_ttl_s``, or whose default
        ``token_ttl_s`` exceeds it, would otherwise forget a revocation while its token is still valid.
        """
        ids = {r[0] for r in self.registry.query("SELECT token_id FROM revoked_tokens")}
        devices = {
            r[0]: float(r[1]) for r in self.registry.query("SELECT device_id, before FROM revoked_devices")
        }
        return ids, devices

    def revocation_marks(self) -> dict[bytes, RevocationMark]:
        """The highest SecAgg revocation list this service has held, per enrollment authority id."""
        rows = self.registry.query("SELECT authority, sequence, sha256 FROM secagg_revocation_marks")
        return {bytes.fromhex(a): RevocationMark(bytes.fromhex(a), int(n), d) for a, n, d in rows}

    def hold_revocations(self, revocations: RevocationList, *, source: str | os.PathLike[str]) -> None:
        """Record ``revocations`` (verified, read from ``source``) as the highest list of its authority this
        service has held, unless it is older: a lower number than the highest, or that number with other
        contents, is a :class:`~deltaplane.aggregation.secagg.errors.RevocationRollback` naming ``source`` and
        both numbers, and the mark stays. The check and the record are one transaction, so concurrent readers
        of the file only ever raise the mark."""
        with self.registry.transaction() as con:
            row = con.execute(
                "SELECT sequence, sha256 FROM secagg_revocation_marks WHERE authority=?",
                (revocations.authority.hex(),),
            ).fetchone()
            held = None if row is None else RevocationMark(revocations.authority, int(row[0]), row[1])
            try:
                newer = revocations.supersedes(held, holder="this service")
            except RevocationRollback as exc:
                raise RevocationRollback(
                    f"{os.fspath(source)}: {exc} (it held that list before; each service start and round open "
                    "checks its file against the highest list it has held)",
                    sequence=exc.sequence,
                    held=exc.held,
                ) from None
            if newer:
                mark = revocations.mark()
                con.execute(
                    "INSERT OR REPLACE INTO secagg_revocation_marks (authority, sequence, sha256, at) "
                    "VALUES (?,?,?,?)",
                    (mark.authority.hex(), str(mark.sequence), mark.sha256, time.time()),
                )
