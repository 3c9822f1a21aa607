"""A device's durable count of its local-DP releases: the ``.releases`` file ``deltaplane fleet device`` keeps.

Under local DP (``local_dp_noise``) each update a device sends is one release of the Gaussian mechanism, and
its ε (:func:`~deltaplane.aggregation.dp.local_epsilon`, replace-one adjacency) grows with how many it has
sent: a count held in memory only starts again at zero when the device restarts, and the device then reports
a smaller ε than it has spent (the dashboard's ``local_epsilon_max`` takes the largest self-report). So the
count lives in a small file beside the device's other persisted state (its token, its revocation list), and
is written, atomically, *before* the noised update leaves the device: a crash can only over-count, never
under-count. A file that cannot be read as a count (damaged, another device's, a format this version does not
know) is refused with :class:`~deltaplane.errors.ReleaseCountDamaged`, never silently reset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deltaplane.errors import ReleaseCountDamaged
from deltaplane.textfile import atomic_write_bytes, read_bounded_bytes

__all__ = ["RELEASES_FORMAT", "RELEASES_LIMIT", "read_releases", "write_releases"]

#: the file's layout number (``{"format": 1, "device": partition, "releases": n}``)
RELEASES_FORMAT = 1
#: the most bytes read from a releases file: a real one is under 100 bytes
RELEASES_LIMIT = 4096


def read_releases(path: str | os.PathLike[str], *, device: int) -> int:
    """The releases device ``device`` recorded in ``path`` (0 when the file does not exist yet: a device that
    never sent a locally privatized update).

    Raises:
        ReleaseCountDamaged: the file is not a regular file, is over :data:`RELEASES_LIMIT` bytes, is not this
            format's JSON, names another device, or holds something other than a non-negative integer count.
    """
    p = Path(path)
    data = read_bounded_bytes(
        p, limit=RELEASES_LIMIT, what="device release count", error=ReleaseCountDamaged, missing_ok=True
    )
    if data is None:
        return 0
    fix = (
        "it is what this device's local-DP ε is counted from, so it is not reset: restore it, or if the device "
        "is known to have sent no update since it was written, write the count its reports last showed"
    )
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ReleaseCountDamaged(f"{p}: the device release count is not JSON (damaged); {fix}") from None
    releases = doc.get("releases") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != RELEASES_FORMAT:
        raise ReleaseCountDamaged(
            f"{p}: not a device release count of format {RELEASES_FORMAT} (damaged, or from another version); "
            f"{fix}"
        )
    if doc.get("device") != device or isinstance(doc.get("device"), bool):
        raise ReleaseCountDamaged(
            f"{p}: the release count of device {doc.get('device')!r}, not of device {device}; give each device "
            "its own file (--releases)"
        )
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 0:
        raise ReleaseCountDamaged(f"{p}: the release count {releases!r} is not a non-negative integer; {fix}")
    return releases


def write_releases(path: str | os.PathLike[str], *, device: int, releases: int) -> None:
    """Record that device ``device`` has released ``releases`` locally privatized updates (atomic: a reader
    sees the old count or the new one, never part of a file). Call it before the update leaves the device."""
    doc = {"format": RELEASES_FORMAT, "device": device, "releases": releases}
    atomic_write_bytes(path, (json.dumps(doc) + "\n").encode("utf-8"))
