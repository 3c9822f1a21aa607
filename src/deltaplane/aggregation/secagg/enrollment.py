"""Enrolling devices offline: identity keys certified by the enrollment authority, written as devices read them.

``deltaplane fleet enroll --authority-key`` (devices of the HTTP service, with their tokens) and ``deltaplane keys
certify`` (Flower SuperNodes, or any device enrolled without a running service) both go through here, so the two
write the same files: ``device-I.identity.pem`` (the identity key, PKCS#8 PEM) and ``device-I.cert`` (its
certificate, :class:`~deltaplane.aggregation.secagg.identity.DeviceCertificate`'s bytes), each mode 0600 and
written atomically. :class:`~deltaplane.aggregation.secagg.identity.DeviceCredentials` ``.from_files`` reads them
back with the authority's public key (``enrollment.ed25519.pub``); a Flower node names the three files in its
``node_config`` under :data:`NODE_CONFIG_KEYS` (:func:`node_config_arg` writes that argument).

The stronger flow keeps each identity key on its device: ``deltaplane keys identity`` makes the key there
(:func:`new_identity_request`, :func:`write_identity_request`: ``device-I.identity.pem`` and ``device-I.request``,
a self-signed :class:`~deltaplane.aggregation.secagg.identity.CertificationRequest`), the operator certifies the
request (``keys certify --request``: :func:`read_request`, :func:`certify_requests`, :func:`write_certificate`)
and sends back ``device-I.cert`` only, which the device puts next to its key.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from deltaplane.aggregation.secagg.errors import SecAggAuthError
from deltaplane.aggregation.secagg.identity import (
    REQUEST_MAX_BYTES,
    CertificationRequest,
    DeviceCertificate,
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    TrustedAuthorities,
    key_fingerprint,
)
from deltaplane.aggregation.secagg.reservations import (
    Reservation,
    format_line,
    parse_fields,
    run_state,
    this_run,
)
from deltaplane.aggregation.secagg.revocation import RevocationList, read_server_revocations
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.textfile import (
    KEY_LIMIT,
    atomic_write_bytes,
    read_bounded_bytes,
    read_bounded_text,
    write_secret_file,
)

__all__ = [
    "AUTHORITY_PUBLIC_NAME",
    "ISSUED_MARK_NAME",
    "LEDGER_MAX_BYTES",
    "LEDGER_NAME",
    "MAX_REQUEST_PARTITION",
    "NODE_CONFIG_KEYS",
    "RESERVED_MAX_BYTES",
    "RESERVED_NAME",
    "REVOCATIONS_NODE_CONFIG_KEY",
    "RunEnrollment",
    "certify",
    "certify_requests",
    "check_held_key",
    "check_ledger_room",
    "check_not_issued",
    "check_not_reserved",
    "check_not_revoked",
    "device_id",
    "enrollment_lock",
    "fleet_cohort",
    "held_partitions",
    "identity_files",
    "load_authority",
    "new_identity_request",
    "next_device_ids",
    "node_config_arg",
    "read_held_revocations",
    "read_request",
    "read_reservations",
    "record_issued",
    "recover_reservations",
    "release_ids",
    "renews_held_key",
    "request_file",
    "reserve_ids",
    "revoked_certificates",
    "write_certificate",
    "write_identity",
    "write_identity_request",
    "writing_all_or_nothing",
]

#: the authority's public key file (``deltaplane keys enrollment`` writes it next to ``enrollment.ed25519.pem``)
AUTHORITY_PUBLIC_NAME = "enrollment.ed25519.pub"
#: the file of an enrollment folder holding the highest device id ever issued or revoked there (``device-I``, one
#: line): all an earlier release kept, read as every id up to it issued; still written, so that release refuses
#: the ids this one issued
ISSUED_MARK_NAME = "enrollment.issued"
#: the file of an enrollment folder listing every device id issued or revoked there, as ascending ranges
#: (``device-I`` or ``device-I..device-J`` a line): ids are only ever added, so exactly these are refused
LEDGER_NAME = "enrollment.ledger"
#: the file of an enrollment folder listing the ids runs in flight reserved (:func:`reserve_ids`): a range a line
#: as in the ledger, followed by the run that reserved it (:mod:`~deltaplane.aggregation.secagg.reservations`)
RESERVED_NAME = "enrollment.reserved"
#: the most bytes an id file holds (:data:`LEDGER_NAME`, :data:`RESERVED_NAME`): tens of thousands of separate
#: ranges; a run of ids issued together is one line
LEDGER_MAX_BYTES = KEY_LIMIT
#: the most bytes :data:`RESERVED_NAME` holds: its lines name their run too, so are longer than the ledger's;
#: :func:`reserve_ids` refuses a reservation past it, before any token is asked for
RESERVED_MAX_BYTES = 4 * KEY_LIMIT
#: the largest partition id a certification request may name (``device-I``, I of at most 18 digits: what
#: :func:`read_request` takes), so ``keys identity`` never makes a key whose request would be refused
MAX_REQUEST_PARTITION = 10**18 - 1
#: the ``node_config`` keys naming a Flower node's SecAgg enrollment, files on the node (all three or none): its
#: identity key, its certificate and the enrollment authority's public key it trusts
NODE_CONFIG_KEYS = ("secagg-identity-key", "secagg-certificate", "secagg-enrollment-authority")
#: the optional ``node_config`` key naming the enrollment authority's revocation list on the node (``deltaplane keys
#: revoke`` writes it): only with :data:`NODE_CONFIG_KEYS`, and the node then refuses rounds seating a revoked device
REVOCATIONS_NODE_CONFIG_KEY = "secagg-revocations"


def device_id(partition: int) -> str:
    """The device id of partition ``partition`` (Flower's ``partition-id``): what ``fleet enroll`` and ``keys certify``
    certify and SecAgg rounds invite."""
    return f"device-{partition}"


#: a device id as :func:`device_id` makes it (I of at most 18 digits, no leading zero), its partition id grouped
_DEVICE_ID = r"device-(0|[1-9][0-9]{0,17})"
#: the partition id in a file ``device-I.*`` an enrollment folder holds (token, key, certificate, request, list)
_DEVICE_FILE = re.compile(_DEVICE_ID + r"\.[a-z.]+")


def held_partitions(out: str | os.PathLike[str], suffix: str | None = None) -> list[int]:
    """The partition ids of the devices with a file ``device-I.*`` in ``out`` (only ``device-I{suffix}`` when
    ``suffix`` is given, e.g. ``".token"``), sorted; none for a folder that does not exist."""
    folder = Path(out)
    if not folder.is_dir():
        return []
    found = {
        int(m.group(1))
        for p in folder.iterdir()
        if (m := _DEVICE_FILE.fullmatch(p.name)) is not None and (suffix is None or p.name.endswith(suffix))
    }
    return sorted(found)


def issued_mark(out: str | os.PathLike[str]) -> int | None:
    """The highest partition id the enrollment folder ``out``'s mark (:data:`ISSUED_MARK_NAME`) names, None when
    the folder keeps none. A file that does not hold one ``device-I`` line is a :class:`ConfigError` naming it:
    guessing would risk handing out an id again."""
    path = Path(out) / ISSUED_MARK_NAME
    if not os.path.lexists(path):
        return None
    text = read_bounded_text(path, limit=KEY_LIMIT, what="issued device ids mark")
    m = re.fullmatch(_DEVICE_ID, text.strip())
    if m is None:
        raise ConfigError(
            f"{path} does not hold the highest device id issued in {path.parent} (one line, device-I); write the "
            "highest id ever issued or revoked there back into it, then rerun"
        )
    return int(m.group(1))


#: one line of an id file (:data:`LEDGER_NAME`, :data:`RESERVED_NAME`): ``device-I``, or ``device-I..device-J``
#: (I < J, both included)
_ID_RANGE = re.compile(_DEVICE_ID + r"(?:\.\." + _DEVICE_ID + r")?")


def _read_ids(path: Path, what: str) -> list[tuple[int, int]] | None:
    """The id ranges (first, last) the id file ``path`` holds, None when there is none. A line that is not a
    range, or ranges out of order or overlapping (not what :func:`_write_ids` writes), is a
    :class:`ConfigError` naming the file and line: guessing would risk handing out an id again."""
    if not os.path.lexists(path):
        return None
    ranges: list[tuple[int, int]] = []
    text = read_bounded_text(path, limit=LEDGER_MAX_BYTES, what=what)
    for n, line in enumerate(text.splitlines(), 1):
        m = _ID_RANGE.fullmatch(line.strip())
        first, last = (0, -1) if m is None else (int(m.group(1)), int(m.group(2) or m.group(1)))
        if m is None or last < first or (ranges and first <= ranges[-1][1] + 1):
            raise ConfigError(
                f"{path}, line {n}: {line.strip()[:60]!r} is not a device id range (device-I or "
                "device-I..device-J, ascending, apart): restore the file deltaplane wrote (ids issued there are "
                "never handed out again), then rerun"
            )
        ranges.append((first, last))
    return ranges


def _merged(*groups: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of ``groups`` as one ascending list of disjoint, non-adjacent ranges."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(r for g in groups for r in g):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _write_ids(path: Path, ranges: list[tuple[int, int]]) -> None:
    """Write ``ranges`` (:func:`_merged`) as the id file ``path``, 0600 and atomically (a crash leaves the old
    file or the new one, never part of one); an empty list removes the file. More than
    :data:`LEDGER_MAX_BYTES` is a :class:`ConfigError`, raised before anything is written."""
    text = _ids_text(path, ranges)
    if ranges:
        write_secret_file(path, text)
    else:
        Path(path).unlink(missing_ok=True)


def _ids_text(path: Path, ranges: list[tuple[int, int]]) -> bytes:
    """What :func:`_write_ids` writes as ``path``; a :class:`ConfigError` past :data:`LEDGER_MAX_BYTES`."""
    text = "".join(device_id(a) + ("" if a == b else f"..{device_id(b)}") + "\n" for a, b in ranges).encode()
    if len(text) > LEDGER_MAX_BYTES:
        raise ConfigError(
            f"{path} would hold {len(ranges):,} separate id ranges ({len(text):,} bytes, more than "
            f"{LEDGER_MAX_BYTES:,}): issue ids in runs (--add K, --devices N) rather than scattered ones"
        )
    return text


def _partitions(devices: Iterable[str]) -> list[int]:
    return [int(m.group(1)) for d in devices if (m := re.fullmatch(_DEVICE_ID, d)) is not None]


def _recorded(out: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The ids the enrollment folder ``out`` records as issued or revoked there: its ledger
    (:data:`LEDGER_NAME`), every id up to its mark (:data:`ISSUED_MARK_NAME`) past the ledger's last (a folder
    of an earlier release, which kept the mark alone, or one such a release issued ids in since), and every
    device holding an issued file (a token, an identity key, a certificate; a request alone is not one). With
    no ledger, every id up to the highest of these counts (what an earlier release refused)."""
    ledger = _read_ids(Path(out) / LEDGER_NAME, "issued device ids ledger")
    mark = issued_mark(out)
    held = sorted({i for suffix in _ISSUED_SUFFIXES for i in held_partitions(out, suffix)})
    if ledger is None:
        top = max([*held, *([] if mark is None else [mark])], default=None)
        return [] if top is None else [(0, top)]
    last = ledger[-1][1] if ledger else -1
    legacy = [(last + 1, mark)] if mark is not None and mark > last else []
    return _merged(ledger, legacy, [(i, i) for i in held])


def read_reservations(out: str | os.PathLike[str]) -> list[Reservation]:
    """The runs of ids ``fleet enroll`` runs reserved in ``out`` (:data:`RESERVED_NAME`) and have not recorded,
    ascending, each with the run that reserved it (None for a line of an earlier release, which names none).
    A line that is not a range and its run, or ranges out of order or overlapping, is a :class:`ConfigError`
    naming the file and line: guessing would risk handing out an id again."""
    path = Path(out) / RESERVED_NAME
    if not os.path.lexists(path):
        return []
    found: list[Reservation] = []
    text = read_bounded_text(path, limit=RESERVED_MAX_BYTES, what="reserved device ids")
    for n, line in enumerate(text.splitlines(), 1):
        ids, _, fields = line.strip().partition(" ")
        m = _ID_RANGE.fullmatch(ids)
        first, last = (0, -1) if m is None else (int(m.group(1)), int(m.group(2) or m.group(1)))
        try:
            owner = parse_fields(" " + fields if fields else "")
        except ValueError:
            m = None
        if m is None or last < first or (found and first <= found[-1].last):
            raise ConfigError(
                f"{path}, line {n}: {line.strip()[:60]!r} is not a reservation (device-I or device-I..device-J, "
                "then the run that reserved it; ascending, apart): restore the file deltaplane wrote, then rerun"
            )
        found.append(Reservation(first, last, owner))
    return found


def _write_reservations(out: str | os.PathLike[str], reservations: list[Reservation]) -> None:
    """Write ``reservations`` (ascending, disjoint) as ``out``'s :data:`RESERVED_NAME`, 0600 and atomically;
    none removes the file."""
    path = Path(out) / RESERVED_NAME
    text = "".join(map(format_line, reservations)).encode()
    if len(text) > RESERVED_MAX_BYTES:
        raise ConfigError(
            f"{path} would hold {len(reservations):,} reservations ({len(text):,} bytes, more than "
            f"{RESERVED_MAX_BYTES:,}): wait for the runs in flight, or `fleet enroll --recover` those killed"
        )
    if reservations:
        write_secret_file(path, text)
    else:
        path.unlink(missing_ok=True)


def _reserved(out: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The ids runs of ``fleet enroll`` have reserved in ``out`` (:data:`RESERVED_NAME`) and not yet recorded."""
    return [(r.first, r.last) for r in read_reservations(out)]


def _hits(ranges: list[tuple[int, int]], devices: Iterable[str]) -> list[str]:
    """The devices of ``devices`` whose partition lies in one of ``ranges``."""
    return [
        d
        for d in devices
        if (m := re.fullmatch(_DEVICE_ID, d)) is not None
        and any(a <= int(m.group(1)) <= b for a, b in ranges)
    ]


def _line_bound(first: int, last: int) -> int:
    """The most bytes recording ids ``first`` … ``last``, or any first part of them, can add to a ledger,
    whatever it holds: its own line, or one more byte where it extends a one-id line into a range."""
    return len(_ids_text(Path(), [(first, last)])) + 1


def check_ledger_room(
    out: str | os.PathLike[str],
    ids: list[tuple[int, int]],
    *,
    reserving: Sequence[tuple[int, int]] = (),
    releasing: Iterable[str] = (),
) -> None:
    """Refuse, with a :class:`ConfigError`, ids ``ids`` (ranges) that ``out``'s ledger (:data:`LEDGER_NAME`, at
    most :data:`LEDGER_MAX_BYTES`) could not hold beside every id it records and every id runs in flight reserved
    (:data:`RESERVED_NAME`), ``reserving`` (ranges this run reserves) included: the one capacity check of every
    run adding ids there (:func:`reserve_ids`, :func:`record_issued`). A reserved run of ids counts as its own
    line (:func:`_line_bound`) until recorded, whatever its neighbours: its run records it once the service
    issued its tokens, or only the first of them (a run that failed part-way), in any order beside the other
    runs in flight, when refusing would lose tokens that are valid on the service; counted merged with its
    neighbours, a first part recorded, or a run recorded while the one between it and the ledger was still in
    flight, took one line more than was counted. So a ``keys certify`` beside an in-flight ``fleet enroll``
    near the bound is refused rather than that enroll. The reservations holding ``releasing`` (the run's own,
    recorded now) are not counted: what it records comes out of their room."""
    gone = set(_partitions(releasing))
    recorded = _merged(_recorded(out), ids)
    pending = [
        (r.first, r.last)
        for r in read_reservations(out)
        if not any(r.first <= i <= r.last for i in gone)
        and not any(a <= r.first and r.last <= b for a, b in recorded)  # recorded already, not yet released
    ]
    path = Path(out) / LEDGER_NAME
    size = len(_ids_text(path, recorded)) + sum(_line_bound(a, b) for a, b in [*pending, *reserving])
    if size > LEDGER_MAX_BYTES:
        raise ConfigError(
            f"{path} would hold {len(recorded) + len(pending) + len(reserving):,} separate id ranges (up to "
            f"{size:,} bytes once the runs in flight record theirs, more than {LEDGER_MAX_BYTES:,}): issue ids "
            "in runs (--add K, --devices N) rather than scattered ones"
        )


def record_issued(
    out: str | os.PathLike[str], devices: Iterable[str], *, releasing: Iterable[str] = ()
) -> None:
    """Add the partition ids of ``devices`` to the enrollment folder ``out``'s ledger (:data:`LEDGER_NAME`),
    with every id it already records (:func:`_recorded`: an earlier release's mark becomes the ids up to it), then
    raise its mark (:data:`ISSUED_MARK_NAME`) to the ledger's last id, each 0600 and written atomically: what
    ``fleet enroll``, ``keys certify`` (issuing) and ``keys revoke --enrolled`` (revoking) record, under
    :func:`enrollment_lock`. An id never leaves the ledger, so none is handed out again, even once its files are
    removed and with no revocation list given; the mark keeps an earlier release refusing them. An id that is
    not ``device-I`` (no partition) is not counted. A ledger that could not hold them beside every id runs of
    ``fleet enroll`` reserved is refused before anything is written (:func:`check_ledger_room`).

    ``releasing``: the ids the run reserved (:func:`reserve_ids`), given back once the ledger is written (the
    ledger first: a run killed in between leaves its ids recorded and reserved, never neither); their room in
    the ledger was counted when they were reserved, so recording them, or a first part of them, always fits."""
    releasing = list(releasing)
    ids = [(i, i) for i in _partitions(devices)]
    ranges = _merged(_recorded(out), ids) if ids else []  # nothing recorded: the folder stays as it was
    if ranges:
        check_ledger_room(out, ids, releasing=releasing)
        _write_ids(Path(out) / LEDGER_NAME, ranges)
        held = issued_mark(out)
        if held is None or ranges[-1][1] > held:
            write_secret_file(Path(out) / ISSUED_MARK_NAME, f"{device_id(ranges[-1][1])}\n".encode())
    if releasing:
        release_ids(out, releasing)


def reserve_ids(out: str | os.PathLike[str], devices: Iterable[str]) -> None:
    """Reserve ``devices``' ids in ``out`` (:data:`RESERVED_NAME`) for a run that issues them outside the lock
    (``fleet enroll`` asks the service for their tokens): until :func:`release_ids`, every other run refuses them
    (:func:`check_not_reserved`) and ``--add`` takes ids past them. A run killed outright leaves them reserved,
    and refused: the service may have issued their tokens. A ledger that could not hold them too is refused
    here (:func:`check_ledger_room`), before any token is asked for, not once the service issued them.

    Each run of consecutive ids is a line naming this process (its pid, host, boot and start time:
    :func:`~deltaplane.aggregation.secagg.reservations.this_run`), so ``fleet enroll --recover`` can tell a
    killed run's ids from those of a run still going (:func:`recover_reservations`)."""
    new = _merged((i, i) for i in _partitions(devices))
    check_ledger_room(out, [], reserving=new)
    held = read_reservations(out)
    if any(a <= r.last and r.first <= b for a, b in new for r in held):  # the caller's check_not_reserved
        raise ConfigError(f"ids of {_listed(list(devices))} are already reserved in {out} ({RESERVED_NAME})")
    owner = this_run()
    mine = [Reservation(a, b, owner) for a, b in new]
    _write_reservations(out, sorted([*held, *mine], key=lambda r: r.first))


def release_ids(out: str | os.PathLike[str], devices: Iterable[str]) -> None:
    """Take ``devices``' ids out of ``out``'s reservations (:func:`reserve_ids`), removing the file once empty:
    the run has recorded those it issued (:func:`record_issued`) and gives the others back. A line keeps its
    run; cutting ids out of its middle leaves two lines of that run."""
    left = read_reservations(out)
    for i in sorted(set(_partitions(devices))):  # cut i out of the line holding it
        left = [
            Reservation(a, b, r.owner)
            for r in left
            for a, b in (
                ((r.first, i - 1), (i + 1, r.last)) if r.first <= i <= r.last else ((r.first, r.last),)
            )
            if a <= b
        ]
    _write_reservations(out, left)


def recover_reservations(
    out: str | os.PathLike[str], abandoned: Sequence[str] = ()
) -> tuple[list[tuple[Reservation, str]], list[tuple[Reservation, str, str]]]:
    """What ``fleet enroll --recover`` takes back in ``out``: the reservations whose run is provably dead
    (:func:`~deltaplane.aggregation.secagg.reservations.run_state`: this host, that process gone) and those
    ``abandoned`` names (their range exactly as the file and the command print it, ``device-5..device-9``: the
    operator's word that their run is dead, another host's or an earlier release's, or even one still going),
    each with why; and the others, left, each with its state (``"live"`` or ``"unknown"``) and why. An ``abandoned`` range
    that is no reservation there is a :class:`ConfigError` naming those there: nothing is guessed."""
    held = read_reservations(out)
    spans = {r.span: r for r in held}
    unknown = [a for a in abandoned if a not in spans]
    if unknown:
        there = ", ".join(spans) or "none"
        raise ConfigError(
            f"--abandoned {unknown[0]} is not a reservation in {out} ({RESERVED_NAME}: {there}); give a "
            "reserved range exactly as `fleet enroll --recover` prints it"
        )
    chosen, left = [], []
    for r in held:
        state, why = run_state(r.owner)
        if state == "dead":
            chosen.append((r, why))
        elif r.span in abandoned:
            chosen.append((r, f"--abandoned ({why})"))
        else:
            left.append((r, state, why))
    return chosen, left


#: the files of an enrollment folder that show their device's id was issued there
_ISSUED_SUFFIXES = (".token", ".identity.pem", ".cert")


def check_not_reserved(out: str | os.PathLike[str], devices: Sequence[str]) -> None:
    """Refuse ``devices`` that another run reserved in ``out`` (:func:`reserve_ids`) and is issuing now, whatever
    the command's override: a :class:`ConfigError` naming them and the file."""
    hit = _hits(_reserved(out), devices)
    if hit:
        raise ConfigError(
            f"{_listed(hit)} {'is' if len(hit) == 1 else 'are'} being issued by another run in {out} "
            f"({RESERVED_NAME}): wait for it, or take new ids (--add K). A run killed outright leaves its ids "
            f"there (its tokens may have been issued): `deltaplane fleet enroll --out {out} --url URL --recover` "
            "revokes them on the service and records the ids as spent"
        )


def _listed(devices: Sequence[str]) -> str:
    return f"{', '.join(devices[:5])}{' …' if len(devices) > 5 else ''}"


def check_not_issued(
    out: str | os.PathLike[str],
    devices: Sequence[str],
    *,
    option: str = "--add K",
    override: str | None = None,
) -> None:
    """Refuse to issue a key or token to any of ``devices`` that ``out`` records as issued or revoked
    (:func:`_recorded`: its ledger, and every id up to an earlier release's mark): a :class:`ConfigError` naming
    them and what to do instead.

    Such an id's files may have been removed: issuing it again would give the id a second key (or token) while
    the first stays valid until its certificate expires, and a revocation list cannot refuse the old key
    without the id. An id the ledger does not hold (below the highest, never issued) is free. A new device
    takes a new id (``option``); ``override`` names the flag, where the command has one, that issues such ids
    anyway."""
    hit = _hits(_recorded(out), devices)
    if not hit:
        return
    also = (
        ""
        if override is None
        else f", or, for an id never issued there or one whose earlier key is known destroyed, {override} "
        "(an earlier key of the id stays valid until its certificate expires)"
    )
    raise ConfigError(
        f"{_listed(hit)} {'was' if len(hit) == 1 else 'were'} already issued or revoked in {out} ({LEDGER_NAME}, "
        f"or up to an earlier release's {ISSUED_MARK_NAME}): an id never gets a second key or token silently; "
        f"enrol a new device under a new id ({option} takes the next free ones){also}"
    )


def renews_held_key(out: str | os.PathLike[str], request: CertificationRequest) -> bool:
    """Whether ``request`` asks to certify anew the identity key ``out`` already holds for its device (its
    ``device-I.cert`` certifies that key, or its ``device-I.identity.pem`` is that key, which
    :func:`check_held_key` checks): a renewal, not a second key for the id."""
    key, cert = identity_files(out, request.device_id)
    if os.path.isfile(cert) and _held_certificate(cert).identity_public == request.identity_public:
        return True
    return os.path.lexists(key)  # check_held_key refused any key there but the request's own


@contextmanager
def enrollment_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the enrollment folder ``out`` itself (created if missing), waiting for it:
    every command issuing ids there (``fleet enroll``, ``keys certify``, ``keys revoke --enrolled``) takes it
    around its choice of ids, checks and writes, so two concurrent ``--add`` runs never take the same ids nor
    drop an id from :data:`LEDGER_NAME` the other recorded (``fleet enroll`` reserves its ids under it, asks the
    service for their tokens without it, then records them under it again). Locking the folder leaves no file in it; the
    kernel releases the lock when the process dies. A folder this call created is removed again when the
    block fails and leaves it empty (a refused run leaves nothing behind)."""
    folder = Path(out)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    except BaseException:
        if created:
            with suppress(OSError):  # not empty: what the block wrote there is its own to take back
                folder.rmdir()
        raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def writing_all_or_nothing(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Write the files ``paths`` (small secrets of an enrollment folder: keys, certificates, the mark) all or
    none: if the block raises (an ``OSError``, a refusal, ctrl-C), each is put back as it was before, its bytes
    and mode, or removed if it was not there, and the exception goes on. A path that is not a regular file
    (a folder in its place) is left alone. Only a process killed outright leaves the files it wrote; callers
    record the ids (:func:`record_issued`) before writing, so those ids are never handed out again."""
    before: list[tuple[Path, bytes | None, int]] = []
    for p in map(Path, paths):
        if os.path.lexists(p) and not (p.is_file() and not p.is_symlink()):
            continue
        old = read_bounded_bytes(p, limit=KEY_LIMIT, what="enrollment file") if p.exists() else None
        before.append((p, old, stat.S_IMODE(p.stat().st_mode) if old is not None else 0))
    try:
        yield
    except BaseException:
        for p, old, mode in reversed(before):
            if old is None:
                p.unlink(missing_ok=True)
            else:
                write_secret_file(p, old)
                os.chmod(p, mode)
        raise


def next_device_ids(out: str | os.PathLike[str], count: int, *, revoked: Iterable[str] = ()) -> list[str]:
    """The ``count`` device ids a fleet enrolled in ``out`` grows by: the ids past every ``device-I`` with a file
    there, past every id its ledger records as issued or revoked (:func:`record_issued`), past every id a run
    has reserved (:func:`reserve_ids`) and past every one ``revoked`` names (a revocation list's devices), so a
    replacement never takes the id of a device that exists, was issued or was revoked: the service and the
    devices match the list by device id, and a reused id would be refused as revoked, or would revive one."""
    taken = held_partitions(out)
    taken += [b for _, b in _recorded(out)[-1:] + _reserved(out)[-1:]]
    taken += _partitions(revoked)
    start = max(taken, default=-1) + 1
    if start + count - 1 > MAX_REQUEST_PARTITION:
        raise ConfigError(
            f"no device id is left past device-{start - 1}: ids are device-I, I of at most 18 digits"
        )
    return [device_id(start + k) for k in range(count)]


def check_not_revoked(
    devices: Sequence[str],
    revocations: RevocationList,
    source: str | os.PathLike[str],
    *,
    requests: Sequence[tuple[str | os.PathLike[str], CertificationRequest]] = (),
) -> None:
    """Refuse to enrol any of ``devices`` that ``revocations`` (read from ``source``) names, in any cohort: a
    :class:`ConfigError` saying to enrol a replacement under a new id. The service matches the list by device id
    alone (it learns a device's cohort only from its key advertisement), so a re-certified revoked id would be
    left out of every round, and dropping it from the list would readmit the leaked key.

    A certification request of ``requests`` (its file, the request) for a key the list revokes is refused
    whatever id it asks for (the leaked key asking to be certified anew under another id), checked first: the
    device needs a new key, not only a new id. Both are :class:`ConfigError` (exit 2): an input the list
    forbids, refused before anything is written, as a revoked id is (a device refusing a revoked key in a
    round raises :class:`~deltaplane.aggregation.secagg.errors.KeyRevoked` instead)."""
    for path, r in requests:
        if revocations.names_key(r.identity_public):
            fp = key_fingerprint(r.identity_public)
            raise ConfigError(
                f"{path} asks to certify identity key SHA256:{fp.hex()[:16]}… as {r.device_id}, and {source} (list "
                f"number {revocations.sequence}) revokes that key: it is never certified again, under any id. The "
                "device generates a new identity key (`deltaplane keys identity` on the device) and sends its new "
                "request"
            )
    named = {d for d, _ in revocations.revoked}
    hit = [d for d in devices if d in named]
    if hit:
        raise ConfigError(
            f"{', '.join(hit)} {'is' if len(hit) == 1 else 'are'} revoked in {source} (list number "
            f"{revocations.sequence}): a revoked device id is never reused; enrol a replacement under a new id "
            "(--add 1 takes the next free one)"
        )


def revoked_certificates(
    authority: EnrollmentAuthority,
    devices: Sequence[str],
    certificates: Sequence[str | os.PathLike[str]],
    enrolled: str | os.PathLike[str] | None,
) -> tuple[list[DeviceCertificate], list[str]]:
    """What ``keys revoke`` revokes: the certificates at hand, and the ids of ``devices`` with none.

    Each file of ``certificates``, and each device of ``devices`` whose ``device-I.cert`` the enrollment folder
    ``enrolled`` holds, is read as a certificate ``authority`` issued (its signature checked; an expired one is
    still revoked: its key may be certified again), so its device id, cohort and identity key are revoked. The
    devices left (no certificate at hand) are revoked by id only, their key not covered. A file that is not a
    certificate, another authority's, or a ``device-I.cert`` naming another device is a :class:`ConfigError`
    naming it."""
    trusted = authority.trust()
    found: list[tuple[Path, DeviceCertificate]] = []
    for path in [Path(p) for p in certificates]:
        found.append((path, _issued_certificate(trusted, path)))
    uncovered = []
    for d in devices:
        if any(c.device_id == d for _, c in found):
            continue
        cert_path = None if enrolled is None else identity_files(enrolled, d)[1]
        if cert_path is None or not os.path.lexists(cert_path):
            uncovered.append(d)
            continue
        cert = _issued_certificate(trusted, cert_path)
        if cert.device_id != d:
            raise ConfigError(
                f"{cert_path} certifies {cert.device_id!r}, not {d}: put {d}'s own certificate there"
            )
        found.append((cert_path, cert))
    return [c for _, c in found], uncovered


def _issued_certificate(trusted: TrustedAuthorities, path: Path) -> DeviceCertificate:
    """The certificate in ``path`` once the authority ``trusted`` holds signed it; a :class:`ConfigError` naming
    the file otherwise."""
    cert = _held_certificate(path, what="its key cannot be revoked")
    try:
        trusted.check(cert, now=0.0)  # its signature; an expired certificate's key is revoked all the same
    except SecAggAuthError as exc:
        raise ConfigError(
            f"{path}: {exc}; give a certificate this --authority-key issued (another authority's list revokes "
            "that authority's certificates)"
        ) from None
    return cert


def fleet_cohort(out: str | os.PathLike[str], cohort: str | None) -> str:
    """The cohort ``fleet enroll --add`` and ``keys certify --add`` certify new devices in: that of the certificates in ``out`` (a device
    trusts neighbours of its own cohort only), which ``--cohort``, if given, must match; ``--cohort`` or
    ``fleet`` when ``out`` holds none. A certificate there that does not decode is the operator's folder to
    fix, not a failure of the command: a :class:`ConfigError` (exit 2) naming the file and what to do."""
    held = {_held_certificate(p).cohort for p in sorted(Path(out).glob("device-*.cert"))}
    if len(held) > 1 and cohort is None:
        raise ConfigError(
            f"the certificates in {out} name cohorts {sorted(held)}: give --cohort, one of them"
        )
    if cohort is not None and held and cohort not in held:
        raise ConfigError(
            f"--cohort {cohort!r}, but the fleet in {out} is certified in {sorted(held)}: its devices would refuse "
            "the new one as a neighbour; give the fleet's cohort"
        )
    return cohort if cohort is not None else next(iter(held), "fleet")


def _held_certificate(
    path: Path, *, what: str = "the fleet's cohort cannot be read from it"
) -> DeviceCertificate:
    """The device certificate in ``path``, a file of an enrollment folder; a malformed one is a
    :class:`ConfigError` naming it and ``what`` cannot be done (by default: its device's cohort cannot be told)."""
    data = read_bounded_bytes(path, limit=KEY_LIMIT, what="device certificate")
    try:
        return DeviceCertificate.from_bytes(data)
    except DecodeError as exc:
        raise ConfigError(
            f"{path} is not a device certificate ({exc}), so {what}: put the "
            f"device's certificate back (the device-I.cert `keys certify` or `fleet enroll` wrote) or move the "
            f"file out of {path.parent}, then rerun"
        ) from None


def read_held_revocations(
    path: str | os.PathLike[str], authority: EnrollmentAuthority | None
) -> RevocationList:
    """The operator's revocation list in ``path`` (``keys revoke --out``), verified under ``authority`` when the
    command holds its key; a missing, malformed or (given the key) forged file is a :class:`ConfigError`."""
    return read_server_revocations(path, None if authority is None else authority.trust(), legacy=True)


def identity_files(out: str | os.PathLike[str], device: str) -> tuple[Path, Path]:
    """Where device ``device``'s identity key and certificate live in ``out`` (``device-I.identity.pem``,
    ``device-I.cert``): one naming for every command that writes them and every doc that reads them."""
    return Path(out) / f"{device}.identity.pem", Path(out) / f"{device}.cert"


def load_authority(path: str | os.PathLike[str]) -> EnrollmentAuthority:
    """The enrollment authority in the private key file ``path``; a missing, oversized or malformed file, or a
    key that is not Ed25519, is a :class:`ConfigError` naming the file and what to give instead."""
    try:
        pem = read_bounded_text(path, limit=KEY_LIMIT, what="enrollment authority key").encode()
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; give the enrollment authority's private key (`deltaplane keys enrollment --out DIR` writes "
            "DIR/enrollment.ed25519.pem)"
        ) from None
    try:
        return EnrollmentAuthority.from_pem(pem)
    except ConfigError as exc:
        raise ConfigError(
            f"{path} is not an enrollment authority's private key ({exc}): give the enrollment.ed25519.pem that "
            "`deltaplane keys enrollment` wrote (not its .pub, nor a TLS or registry signing key)"
        ) from None


def certify(
    authority: EnrollmentAuthority,
    devices: Sequence[str],
    *,
    cohort: str,
    valid_days: float,
    now: float | None = None,
) -> list[DeviceIdentity]:
    """A fresh identity key per device of ``devices``, certified by ``authority`` in ``cohort`` for ``valid_days``
    days from ``now`` (default: the clock). Everything is made before anything is written, so a device name the
    certificate format refuses (:class:`ConfigError`) leaves no file behind."""
    expires = _expires(valid_days, now)
    return [DeviceIdentity.enroll(authority, d, cohort=cohort, expires=expires) for d in devices]


def _expires(valid_days: float, now: float | None) -> int:
    return int((time.time() if now is None else now) + valid_days * 86400)


def certify_requests(
    authority: EnrollmentAuthority,
    requests: Sequence[CertificationRequest],
    *,
    valid_days: float,
    now: float | None = None,
) -> list[DeviceCertificate]:
    """A certificate per verified request (:func:`read_request`) of the key, device id and cohort it names, valid
    for ``valid_days`` days from ``now`` (default: the clock): :func:`certify` for keys the devices made, with
    no private key on the authority's side."""
    expires = _expires(valid_days, now)
    return [
        authority.issue(r.device_id, r.identity_public, cohort=r.cohort, expires=expires) for r in requests
    ]


def check_held_key(
    out: str | os.PathLike[str], request: CertificationRequest, source: str | os.PathLike[str]
) -> None:
    """Refuse to certify ``request`` (read from ``source``) into ``out`` if ``out`` holds another identity key of
    its device: a :class:`ConfigError` naming both files.

    When node and operator share a folder, an older ``device-I.identity.pem`` left in it would sit next to a
    certificate for another key, and the mismatch would only show when the node starts. No key there, or the
    request's own key (``keys identity`` and ``keys certify`` run in one folder), is fine; a file there that is
    not an Ed25519 PEM key is refused too (a node would read it)."""
    key = identity_files(out, request.device_id)[0]
    if not os.path.lexists(key):
        return
    what = (
        f"remove the stale {key.name} from {out} (or put the device's own key, the one {source} was made with, "
        "there), or choose another --out"
    )
    pem = read_bounded_text(key, limit=KEY_LIMIT, what="device identity key").encode()
    try:
        held = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        held = None
    if not isinstance(held, Ed25519PrivateKey):
        raise ConfigError(
            f"{key} is not an Ed25519 identity key, and a certificate for {source}'s key would be written next "
            f"to it; {what}"
        )
    public = held.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if public != request.identity_public:
        raise ConfigError(
            f"{key} holds another identity key than the one {source} asks to certify: the node reading {out} "
            f"would hold a certificate for another key than its own; {what}"
        )


def request_file(out: str | os.PathLike[str], device: str) -> Path:
    """Where ``keys identity`` writes device ``device``'s certification request in ``out`` (``device-I.request``,
    next to its key, :func:`identity_files`)."""
    return Path(out) / f"{device}.request"


def new_identity_request(device: str, *, cohort: str) -> tuple[bytes, CertificationRequest]:
    """A fresh identity key for ``device`` (PKCS#8 PEM, what :func:`write_identity` writes) and its
    self-signed request to be certified in ``cohort``; a name the format refuses is a :class:`ConfigError`."""
    key = Ed25519PrivateKey.generate()
    request = CertificationRequest.sign(key, device, cohort=cohort)
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), request


def write_identity_request(
    out: str | os.PathLike[str], key_pem: bytes, request: CertificationRequest, *, replace: bool = True
) -> tuple[Path, Path]:
    """Write a device's own identity key (0600 from its creation) and its request into ``out``, each atomically;
    returns the two paths. Unless ``replace``, an identity key already there, even one that appeared after the
    caller checked, is a :class:`ConfigError` and nothing is written (:func:`write_secret_file`)."""
    key, req = identity_files(out, request.device_id)[0], request_file(out, request.device_id)
    write_secret_file(key, key_pem, replace=replace)
    # the key is this run's now: a request beside it is replaced whatever it was (it must match this key)
    atomic_write_bytes(req, request.to_bytes())
    return key, req


def read_request(path: str | os.PathLike[str]) -> CertificationRequest:
    """The verified certification request in ``path``, read bounded (:data:`REQUEST_MAX_BYTES`); a missing,
    oversized, truncated or forged one is a :class:`ConfigError` naming the file and what is wrong."""
    data = read_bounded_bytes(path, limit=REQUEST_MAX_BYTES, what="certification request")
    try:
        request = CertificationRequest.from_bytes(data)
    except DecodeError as exc:
        raise ConfigError(
            f"{path} is not a valid certification request ({exc}): give the device-I.request that "
            "`deltaplane keys identity` wrote on the device"
        ) from None
    # the device id names the files written for it: only device-I (what keys identity asks for), never a path
    if re.fullmatch(_DEVICE_ID, request.device_id) is None:
        raise ConfigError(
            f"{path} asks for device id {request.device_id!r}; requests are for device-I, I a partition id"
        )
    return request


def write_identity(
    out: str | os.PathLike[str], identity: DeviceIdentity, *, replace: bool = True
) -> tuple[Path, Path]:
    """Write ``identity``'s key and certificate into ``out`` (:func:`identity_files`), each 0600 from its creation
    and atomically (never a half-written key); returns the two paths. Unless ``replace``, either file already
    there, even one that appeared after the caller checked (another run writing the same device), is a
    :class:`ConfigError` and neither is left written by this call.

    A certificate that cannot be written (that :class:`ConfigError`, or an ``OSError``: a read-only folder, a
    folder in its place) takes back the key this call created and re-raises: a key without its certificate
    would only mislead the node reading ``out``. A key this call replaced (``replace``) is not removed: the
    caller asked for it to be replaced."""
    key = identity_files(out, identity.device_id)[0]
    created = not os.path.lexists(key)
    write_secret_file(key, identity.key_pem(), replace=replace)
    try:
        return key, write_certificate(out, identity.certificate, replace=replace)
    except BaseException:
        if created:
            key.unlink(missing_ok=True)
        raise


def write_certificate(
    out: str | os.PathLike[str], certificate: DeviceCertificate, *, replace: bool = True
) -> Path:
    """Write ``certificate`` into ``out`` as its device's ``device-I.cert`` (:func:`identity_files`), 0600 and
    atomically; returns its path. Unless ``replace``, a certificate already there is a :class:`ConfigError`."""
    cert = identity_files(out, certificate.device_id)[1]
    write_secret_file(cert, certificate.to_bytes(), replace=replace)
    return cert


def node_config_arg(
    identity_key: str | os.PathLike[str],
    certificate: str | os.PathLike[str],
    authority: str | os.PathLike[str],
) -> str:
    """The ``flower-supernode --node-config`` value naming a node's enrollment (:data:`NODE_CONFIG_KEYS`).

    Flower reads each ``key=value`` pair as TOML, so every path is a TOML basic string (JSON's escaping is
    TOML's for these characters); quote the whole value for the shell (``shlex.quote``).
    """
    paths = [os.fspath(p) for p in (identity_key, certificate, authority)]
    quoted = next((p for p in paths if '"' in p), None)
    if quoted is not None:  # Flower's pattern ends a quoted value at the first '"', escaped or not
        raise ConfigError(
            f"Flower's --node-config cannot carry a path with a '\"' in it: {quoted!r}; rename it"
        )
    return " ".join(f"{k}={json.dumps(p)}" for k, p in zip(NODE_CONFIG_KEYS, paths, strict=True))


class RunEnrollment:
    """A simulated run's enrollment: one enrollment authority made for the run, kept in memory only, and each
    device's identity certified by it the first time the device is asked for.

    What an operator does out of band before authenticated SecAgg rounds (``deltaplane keys enrollment``, then
    ``fleet enroll --authority-key`` or ``keys certify``), done once per simulated run, so that every driver of
    ``RunConfig.secagg_authenticated`` runs the very protocol a deployment does: signed key advertisements,
    signed rosters and the consistency check. The keys are fresh (OS randomness), not derived from the run's
    seed: signatures are deterministic and never enter a sum, so the run's models are still exact and
    reproducible. ``session`` is a fresh name of the run that in-process rounds bind their signatures to (the
    HTTP service and Flower bind them to their own round and run names).

    Args:
        cohort: the cohort every certificate names (a device trusts neighbours of its own cohort only).
        valid_s: seconds each certificate stays valid from the run's start.
    """

    def __init__(self, *, cohort: str = "simulation", valid_s: int = 30 * 86_400) -> None:
        self.authority = EnrollmentAuthority.generate()
        self.cohort = cohort
        self.expires = int(time.time()) + int(valid_s)
        self.session = b"deltaplane-run/" + secrets.token_hex(8).encode()
        self._trusted = self.authority.trust()
        self._issued: dict[str, DeviceCredentials] = {}

    def credentials(self, device: str) -> DeviceCredentials:
        """Device ``device``'s credentials: its identity key (certified on first use, then the same one) and
        the run's authority as the one it trusts."""
        creds = self._issued.get(device)
        if creds is None:
            ident = DeviceIdentity.enroll(self.authority, device, cohort=self.cohort, expires=self.expires)
            creds = self._issued[device] = DeviceCredentials(ident, self._trusted)
        return creds

    def write_node_config(self, out: str | os.PathLike[str], device: str) -> dict[str, str]:
        """Write device ``device``'s identity key and certificate (:func:`write_identity`) and the authority's
        public key into ``out``; returns the ``node_config`` entries naming them (:data:`NODE_CONFIG_KEYS`),
        what a Flower SuperNode of the run is started with."""
        ident = self.credentials(device).identity
        key, cert = write_identity(out, ident)
        pub = Path(out) / AUTHORITY_PUBLIC_NAME
        if not pub.exists():
            pub.write_text(self.authority.public_text() + "\n")
        return dict(zip(NODE_CONFIG_KEYS, (os.fspath(key), os.fspath(cert), os.fspath(pub)), strict=True))
