"""The state log's seal: a new process's first read re-hashes the sealed entries instead of verifying each
signature, and still refuses everything the exhaustive check refuses, with its message.

Each tampering is made after a read with the key stored a seal (every verified read seals here: ``AFTER`` 1), and
checked by a fresh handle's verified read (the fast path) and by ``verify()`` (every signature). The tampering
tests pass on the release before seals too (no seal: every read is exhaustive); the count of signature checks
is what changed.
"""

import base64
import hashlib
import sqlite3

import pytest
import torch
from tests.registry.test_state_log import _entries, _sql

from deltaplane.errors import IntegrityError, SignatureError
from deltaplane.registry import Registry, load_signer
from deltaplane.registry.signing import TRUSTED_KEYS_ENV, Signer, Verifier

try:
    from deltaplane.registry import seal as _seal
except ImportError:  # the release before seals
    _seal = None


@pytest.fixture(autouse=True)
def _every_read_seals(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    if _seal is not None:
        monkeypatch.setattr(_seal, "AFTER", 1)


@pytest.fixture
def home(tmp_path):
    """m@1..3 tagged and evaluated (7 entries: a checkpoint, 3 tag moves, 3 evaluations), then read once with the key: the seal covers all of them."""
    reg = Registry.create(tmp_path / "h")
    for n in (1, 2, 3):
        art = reg.register_model("m", {"w": torch.full((4,), float(n))})
        reg._move_tag("m", "production", n, action="promote")
        reg.record_evaluation(art, "gate", {"accuracy": n / 10})
    assert Registry(tmp_path / "h").tags("m", verify=True) == {"production": 3}
    return tmp_path / "h"


def _refused(home, expected: str) -> None:
    """A fresh handle's first verified read and the exhaustive verify both refuse, naming ``expected``."""
    with pytest.raises((IntegrityError, SignatureError)) as exc:
        Registry(home).tags("m", verify=True)
    assert expected in str(exc.value), exc.value
    problems = Registry(home).verify().problems
    assert any(expected in p for p in problems), problems


def _count_entry_checks(monkeypatch) -> list[int]:
    """Record the index of every state log entry whose signature is verified."""
    seen: list[int] = []
    real = Verifier.verify

    def verify(self, context, signature):
        if context.get("kind") == "state-log":
            seen.append(context["seq"])
        return real(self, context, signature)

    monkeypatch.setattr(Verifier, "verify", verify)
    return seen


def test_a_new_process_verifies_no_sealed_entry_again(home, monkeypatch):
    seen = _count_entry_checks(monkeypatch)
    reg = Registry(home)
    assert reg.tags("m", verify=True) == {"production": 3}
    assert seen == []  # fails before seals: every entry, 1..7
    reg.set_tag("m", "staging", 1)  # entry 8, after the seal
    assert Registry(home).tags("m", verify=True) == {"production": 3, "staging": 1}
    assert seen == [8]  # verified one by one, then sealed with the rest
    assert Registry(home).tags("m", verify=True) == {"production": 3, "staging": 1}
    assert seen == [8]


def test_an_edited_entry_in_the_middle_is_refused(home):
    seq, _, _, text, _ = _entries(home)[3]
    forged = text.replace('"number":2', '"number":1')
    assert forged != text
    digest = hashlib.sha256(forged.encode()).hexdigest()
    _sql(home, f"UPDATE state_log SET entry=?, sha256=? WHERE seq={seq}", args=(forged, digest))
    _refused(home, f"state log entry {seq}: signature by")


def test_an_edited_entry_left_unhashed_is_refused(home):
    seq, _, _, text, _ = _entries(home)[3]
    _sql(
        home,
        f"UPDATE state_log SET entry=? WHERE seq={seq}",
        args=(text.replace('"number":2', '"number":1'),),
    )
    _refused(home, f"state log entry {seq} was altered")


def test_a_broken_signature_in_the_middle_is_refused(home):
    # the registry's own key over another statement: valid text, a signature that does not verify
    bogus = load_signer(home).sign({"kind": "state-log", "seq": 4, "sha256": "0" * 64}).to_text()
    _sql(home, "UPDATE state_log SET signature=? WHERE seq=4", args=(bogus,))
    _refused(home, "state log entry 4: signature by")


def test_a_signature_swapped_for_an_untrusted_keys_is_refused(home):
    seq, _, digest, _, _ = _entries(home)[4]
    evil = Signer.generate().sign({"kind": "state-log", "seq": seq, "sha256": digest}).to_text()
    _sql(home, f"UPDATE state_log SET signature=? WHERE seq={seq}", args=(evil,))
    _refused(home, f"state log entry {seq}: signed by untrusted key")


def test_a_forged_entry_the_registry_then_signed_on_top_of_is_refused(home):
    """The case that rules out checking only the newest signature: the registry appends records without
    re-verifying, so its next honest entry names the forged one as ``prev``."""
    from deltaplane.registry import eventlog

    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    try:
        head = eventlog.read_head(con)
        forged = eventlog._write(con, Signer.generate(), head, eventlog.withdraw_change("eu", "", 0.0))
    finally:
        con.close()
    reg = Registry(home)
    reg.record_evaluation(reg.get("m", 3), "gate", {"accuracy": 0.9})  # signed on top of the forgery
    assert eventlog.Head.parse(Registry(home).verify().log_head).index == forged.index + 1
    _refused(home, f"state log entry {forged.index}: signed by untrusted key")


def test_a_removed_entry_is_refused(home):
    _sql(home, "DELETE FROM state_log WHERE seq=5")
    _refused(home, "state log entry 5 is missing")


def test_a_log_cut_below_its_seal_is_refused_without_a_recorded_head(home):
    """New with seals: the seal names its newest entry, so a shorter log is caught (the exhaustive check alone
    accepts it: a valid chain; it needs --expect-head). Deleting the seal too is the limit that remains."""
    _sql(home, "DELETE FROM state_log WHERE seq > 4")
    _refused(home, "the state log ends at entry 4, but the recorded head 7:")
    _sql(home, "DELETE FROM state_log_seal")  # the documented limit of a chain: only the tables now differ
    problems = Registry(home).verify().problems
    assert problems and all(p.startswith(("tags:", "tag_history:", "evaluations")) for p in problems), (
        problems
    )


def test_a_seal_re_signed_by_an_untrusted_key_is_ignored(home):
    """An attacker's seal over an edited log: not trusted, so every signature is checked and the edit found."""
    import json

    seq, _, _, text, _ = _entries(home)[3]
    forged = text.replace('"number":2', '"number":1')
    digest = hashlib.sha256(forged.encode()).hexdigest()
    _sql(home, f"UPDATE state_log SET entry=?, sha256=? WHERE seq={seq}", args=(forged, digest))
    con = sqlite3.connect(home / "registry.db")
    (doc,) = con.execute("SELECT seal FROM state_log_seal").fetchone()
    con.close()
    evil = Signer.generate()
    stmt = {k: v for k, v in json.loads(doc).items() if k != "signature"}
    _sql(
        home,
        "UPDATE state_log_seal SET seal=?",
        args=(json.dumps({**stmt, "signature": evil.sign(stmt).to_text()}),),
    )
    _refused(home, f"state log entry {seq}: signature by")


def test_a_pinned_reader_does_not_take_a_seal_naming_a_key_it_does_not_trust(home, tmp_path, monkeypatch):
    """Entries signed by a second key the home trusts (keys/trusted/): the home's seal names that key, and a
    reader pinned to the registry's key alone checks every signature and refuses that entry."""
    from deltaplane.registry import eventlog

    other = Signer.generate()
    (home / "keys" / "trusted").mkdir()
    (home / "keys" / "trusted" / "other.pub").write_bytes(base64.b64encode(other.public_raw) + b"\n")
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO withdrawals (cohort, reason, at) VALUES ('eu', '', 0.0)")
        eventlog._write(con, other, eventlog.read_head(con), eventlog.withdraw_change("eu", "", 0.0))
        con.execute("COMMIT")
    finally:
        con.close()
    assert Registry(home).withdrawn_cohorts(verify=True) == {
        "eu"
    }  # trusting both keys: seals through entry 8
    pin = tmp_path / "pin.pub"
    pin.write_bytes((home / "keys" / "signing.ed25519.pub").read_bytes())
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(pin))
    _refused(home, "state log entry 8: signed by untrusted key")


@pytest.mark.parametrize(
    "statements",
    [
        ["DROP TABLE state_log_seal", "CREATE TABLE state_log_seal (id INTEGER PRIMARY KEY, other TEXT)"],
        # JSON's Infinity as the index: int() raises OverflowError, which is no ValueError
        [
            "UPDATE state_log_seal SET seal = "
            '\'{"seq": Infinity, "sha256": "", "signatures": "", "keys": {}, "signature": ""}\''
        ],
    ],
    ids=["another-table", "infinite-index"],
)
def test_a_seal_row_that_is_no_seal_is_ignored_not_a_crash(home, statements):
    """Before, reads, verify and repair raised sqlite3.OperationalError / OverflowError (no deltaplane error)
    on these: a seal that cannot be read is as none, every signature is checked, and the next write seals again."""
    _sql(home, *statements)
    assert Registry(home).tags("m", verify=True) == {"production": 3}
    assert Registry(home).verify().problems == []
    Registry(home).repair_from_log()
    Registry(home).set_tag("m", "staging", 1)  # seals entries 1..7 before appending 8, over the row
    con = sqlite3.connect(home / "registry.db")
    try:
        assert _seal.read(con, load_signer(home).verifier()).index == 7
    finally:
        con.close()


def test_a_read_needs_no_usable_signing_key(home):
    """Before, a verified read with a seal due loaded the home's signing key and raised when it could not (a
    file it may not read, one replaced by something else): a read never needed the key, and still does not."""
    Registry(home).set_tag("m", "staging", 1)  # a seal is due on the next read
    (home / "keys" / "signing.ed25519.pem").write_text("not a key\n")
    assert Registry(home).tags("m", verify=True) == {"production": 3, "staging": 1}
