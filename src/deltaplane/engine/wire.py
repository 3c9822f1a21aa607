"""The run's wire sessions: which compact frame each side uses for updates of a given layout.

A :class:`~deltaplane.codecs.WireSession` fixes the model layout, the uplink codec and the base id once, so
each update travels as a compact frame (a few bytes of framing instead of a ~150-byte tensor table). Both the
client step and the server step hold a :class:`Sessions`: each builds the session of the layout it sends or
expects (the shared tensors: personalization keeps some on the device) the first time it needs it, and the
two agree because :meth:`WireSession.create` is deterministic. A transport where the device should take the
server's word instead (the HTTP service: ``GET .../session``) installs the fetched session with
:meth:`Sessions.install`, and a server keeps accepting self-describing payloads (made by any deltaplane
version), decoded as strictly against the same layout and base version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.codecs import Layout, WireSession
from deltaplane.errors import ConfigError

if TYPE_CHECKING:
    from deltaplane.engine.config import RunConfig

__all__ = ["WIRE_FORMATS", "Sessions"]

#: ``RunConfig.wire`` values: compact frames (the default) or the self-describing format for every update
WIRE_FORMATS = ("compact", "self-describing")


class Sessions:
    """Wire sessions by layout for one codec and base id (``compact=False``: none, self-describing only)."""

    def __init__(self, codec: str, base_id: str, *, compact: bool = True, entropy: bool = True) -> None:
        self.codec, self.base_id, self.compact, self.entropy = codec, base_id, compact, entropy
        self._by_layout: dict[str, WireSession] = {}
        #: whether a session was installed from elsewhere (:meth:`install`) rather than built here
        self.fetched = False

    @classmethod
    def for_config(cls, config: RunConfig, base_id: str) -> Sessions:
        """The uplink sessions of a :class:`~deltaplane.engine.RunConfig` (``wire``, ``entropy_coding``)."""
        if config.wire not in WIRE_FORMATS:
            raise ConfigError(f"wire must be one of {WIRE_FORMATS}, got {config.wire!r}")
        return cls(config.codec, base_id, compact=config.wire == "compact", entropy=config.entropy_coding)

    def get(self, layout: Layout) -> WireSession | None:
        """The session for updates of ``layout`` (built once), or ``None`` when updates are self-describing."""
        if not self.compact:
            return None
        key = layout.digest()
        session = self._by_layout.get(key)
        if session is None and self.fetched:
            # the server's word is the session: a device whose update has another layout than the one the server
            # framed cannot upload compact, and must not frame it in a session of its own the server never saw
            raise ConfigError(
                "the wire session fetched from the server is for another layout than this update's "
                f"({len(layout)} tensors); fetch the session of the model being trained"
            )
        if session is None:
            session = WireSession.create(layout, self.codec, base_id=self.base_id, entropy=self.entropy)
            self._by_layout[key] = session
        return session

    def install(self, session: WireSession) -> None:
        """Use ``session`` (e.g. fetched from the server) for updates of its layout."""
        if session.codec != self.codec_spec or session.base_id != self.base_id:
            raise ConfigError(
                f"wire session for codec {session.codec!r} and base {session.base_id!r} does not match this "
                f"run's codec {self.codec_spec!r} and base {self.base_id!r}"
            )
        self.compact, self.fetched = True, True
        self._by_layout[session.layout.digest()] = session

    @property
    def codec_spec(self) -> str:
        from deltaplane.codecs import get_codec

        return get_codec(self.codec).spec
