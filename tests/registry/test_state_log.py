"""The signed state log: tags, tag history and consent withdrawals edited behind the registry's back are caught.

The attacker edits ``registry.db`` directly, as anyone who can write the home can (dropping a trigger is one
statement); every check goes through the public API or CLI on a fresh handle.
"""

import hashlib
import itertools
import json
import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from deltaplane.errors import ConfigError, IntegrityError, SignatureError
from deltaplane.registry import Registry, promote, rollback
from deltaplane.registry.signing import TRUSTED_KEYS_ENV, Signer


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(seed))}


def _sql(home, *statements, args=()) -> None:
    """Run SQL on registry.db as a writer of the file can (the append-only triggers dropped first)."""
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    try:
        con.execute("DROP TRIGGER IF EXISTS state_log_append_only_u")
        con.execute("DROP TRIGGER IF EXISTS state_log_append_only_d")
        for s in statements:
            con.execute(s, args)
    finally:
        con.close()


def _pass(evaluator_state) -> dict[str, float]:
    return {"accuracy": 1.0, "ood_accuracy": 1.0}


@pytest.fixture(autouse=True)
def _no_pin(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)


@pytest.fixture
def home(tmp_path):
    """m@1..3; production 1 -> 2 (promoted) -> 3; staging -> 1; cohort 'eu' (in m@3) withdrawn."""
    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", _state(1))
    reg.register_model("m", _state(2), parent=1)
    reg.register_model("m", _state(3), parent=2, governance={"cohorts": ["eu"]})
    reg._move_tag("m", "production", 1, action="promote")
    reg._move_tag("m", "production", 2, action="promote")
    reg.set_tag("m", "staging", 1)
    reg._move_tag("m", "production", 3, action="promote")
    reg.withdraw_cohort("eu", reason="consent withdrawn")
    report = Registry(tmp_path / "h").verify()
    assert report.ok and not report.notes, (report.problems, report.notes)
    return tmp_path / "h"


def _problems(home) -> list[str]:
    report = Registry(home).verify()
    assert not report.ok
    return report.problems


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE tags SET number=1 WHERE tag='production'", "tags: m:production points to version 1"),
        ("DELETE FROM tags WHERE tag='production'", "tags: m:production is missing"),
        ("INSERT INTO tags VALUES ('m', 'canary', 1, 0.0)", "tags: m:canary -> 1 is not in the signed log"),
    ],
    ids=["moved", "deleted", "inserted"],
)
def test_a_tag_changed_in_the_database_fails_verify_and_verified_reads(home, sql, expected):
    _sql(home, sql)
    assert any(p.startswith(expected) for p in _problems(home)), _problems(home)
    reg = Registry(home)
    with pytest.raises(IntegrityError, match="differ from its signed state log"):
        reg.tags("m", verify=True)
    if "canary" not in sql:
        with pytest.raises(IntegrityError, match="m:production"):
            reg.load_state("m:production")  # a tag reference resolved with verification
    assert reg.load_state("m@1")  # a version number needs no tag
    tag = "canary" if "canary" in sql else "production"
    with pytest.raises(IntegrityError, match="differ"):
        reg._move_tag("m", tag, 2, action="promote")  # a move would sign a 'previous' that someone else wrote
    reg.set_tag("m", "staging", 2)  # another tag still moves


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE tag_history SET number=1 WHERE id=2", "tag_history: row 2 (m:production) differs"),
        ("DELETE FROM tag_history WHERE id=2", "tag_history: row 2 (m:production -> 2) is missing"),
        (
            "INSERT INTO tag_history (model, tag, number, previous, action, reason, at) "
            "VALUES ('m', 'production', 1, 3, 'promote', '', 0.0)",
            "tag_history: row 5 (m:production -> 1) is not in the signed log",
        ),
    ],
    ids=["edited", "deleted", "inserted"],
)
def test_a_tag_history_row_changed_in_the_database_fails_verify_and_rollback(home, sql, expected):
    _sql(home, sql)
    assert any(p.startswith(expected) for p in _problems(home)), _problems(home)
    reg = Registry(home)
    with pytest.raises(IntegrityError, match="tag_history"):
        rollback(reg, "m")  # the forged history would choose the version the signed rollback record names
    assert reg.tags("m") == {"production": 3, "staging": 1}
    assert reg.rollback_record("m", 2, 3) is None and reg.rollback_record("m", 1, 3) is None
    with pytest.raises(IntegrityError):
        reg.tag_history("m", "production", verify=True)


def test_a_deleted_withdrawal_fails_verify_and_the_promotion_gate(home):
    from deltaplane.errors import PromotionRefused

    reg = Registry(home)
    reg._move_tag("m", "production", 2, action="promote")
    with pytest.raises(PromotionRefused, match="withdrawn cohort 'eu'"):
        promote(reg, "m@3", evaluator=_pass)
    evaluated = len(reg.evaluations(reg.get("m", 3)))
    _sql(home, "DELETE FROM withdrawals WHERE cohort='eu'")
    assert _problems(home) == ["withdrawals: cohort 'eu' is missing; the signed log records its withdrawal"]
    reg = Registry(home)
    assert reg.withdrawn_cohorts() == set()  # what the table says, unverified
    with pytest.raises(IntegrityError, match="withdrawals: cohort 'eu' is missing"):
        promote(reg, "m@3", evaluator=_pass)
    assert reg.tag("m", "production") == 2  # not promoted
    assert len(reg.evaluations(reg.get("m", 3))) == evaluated  # refused before anything was evaluated
    with pytest.raises(IntegrityError):
        reg.governance_problems(reg.get("m", 3), verify=True)


def test_a_withdrawal_is_recorded_even_when_the_tags_were_tampered_with(home):
    """Recording a withdrawal is never blocked by tampering elsewhere (the tag move is, see above)."""
    _sql(home, "UPDATE tags SET number=1 WHERE tag='production'")
    reg = Registry(home)
    reg.withdraw_cohort("us")
    assert Registry(home).withdrawn_cohorts(verify=True) == {"eu", "us"}


def _entries(home) -> list[tuple]:
    con = sqlite3.connect(home / "registry.db")
    try:
        return con.execute(
            "SELECT seq, prev, sha256, entry, signature FROM state_log ORDER BY seq"
        ).fetchall()
    finally:
        con.close()


def test_log_entry_edits_fail_verify(home):
    """Each way of editing the log itself: the text alone, the text and its hash, a removed entry."""
    seq, _, _, text, _ = _entries(home)[-2]  # the last production move (-> 3)
    forged = text.replace('"number":3', '"number":1')
    assert forged != text
    cases = [
        (f"UPDATE state_log SET entry=? WHERE seq={seq}", (forged,), f"state log entry {seq} was altered"),
        (
            f"UPDATE state_log SET entry=?, sha256=? WHERE seq={seq}",
            (forged, hashlib.sha256(forged.encode()).hexdigest()),
            f"state log entry {seq}: signature by",
        ),
        (f"DELETE FROM state_log WHERE seq={seq - 1}", (), f"state log entry {seq - 1} is missing"),
    ]
    for sql, args, expected in cases:
        backup = _entries(home)
        _sql(home, sql, args=args)
        problems = _problems(home)
        assert len(problems) == 1 and problems[0].startswith(expected), problems
        with pytest.raises((IntegrityError, SignatureError)):
            Registry(home).tags("m", verify=True)
        _sql(home, "DELETE FROM state_log")
        con = sqlite3.connect(home / "registry.db", isolation_level=None)
        con.executemany("INSERT INTO state_log VALUES (?,?,?,?,?)", backup)
        con.close()
        assert Registry(home).verify().ok


def _rewrite_log(home, signer: Signer, edit) -> None:
    """An attacker who knows the format rewrites the log, re-chaining and re-signing every entry with ``signer``
    (``edit`` returns the entry to write, or None to leave it out)."""
    rows = _entries(home)
    _sql(home, "DELETE FROM state_log")
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    prev, seq = "0" * 64, 0
    for *_, text, _ in rows:
        entry = edit(json.loads(text))
        if entry is None:
            continue
        seq += 1
        entry = {**entry, "prev": prev, "seq": seq}
        new = json.dumps(entry, sort_keys=True, separators=(",", ":"))  # the documented canonical form
        digest = hashlib.sha256(new.encode()).hexdigest()
        sig = signer.sign({"kind": "state-log", "seq": seq, "sha256": digest}).to_text()
        con.execute("INSERT INTO state_log VALUES (?,?,?,?,?)", (seq, prev, digest, new, sig))
        prev = digest
    con.close()


def test_a_log_re_signed_with_the_wrong_key_fails(home):
    """A consistent forgery (tables and log agree) signed by a key the registry does not trust."""
    _sql(home, "DELETE FROM withdrawals")
    _rewrite_log(home, Signer.generate(), lambda e: None if e["op"] == "withdraw" else e)
    problems = _problems(home)
    assert len(problems) == 1 and "untrusted key" in problems[0], problems


def _take_over(home) -> None:
    """A writer of the home replaces keys/ with its own pair, re-signs every artifact, moves production back to
    m@1 and drops the withdrawal — and rewrites the log to match, signed with its key."""
    from deltaplane.registry import init_keys

    evil = init_keys(home, overwrite=True)
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    con.execute("DROP TRIGGER IF EXISTS artifacts_immutable_u")
    for a in Registry(home, verifier=evil.verifier()).versions():
        con.execute("UPDATE artifacts SET signature=? WHERE id=?", (evil.sign(a.statement()).to_text(), a.id))
    con.execute("UPDATE tags SET number=1 WHERE tag='production'")
    con.execute("UPDATE tag_history SET number=1 WHERE id=4")
    con.execute("DELETE FROM withdrawals")
    con.close()

    def edit(e):
        if e["op"] == "withdraw":
            return None
        return {**e, "number": 1} if e.get("history_id") == 4 else e

    _rewrite_log(home, evil, edit)


def test_a_pin_outside_the_home_refuses_a_home_whose_keys_were_replaced(home, tmp_path, monkeypatch):
    """Mirrors tests/registry/test_trust.py for artifacts: the take-over verifies against the home's own keys
    and fails against a pin kept outside the home."""
    pin = tmp_path / "pin"
    pin.mkdir()
    (pin / "registry.pub").write_bytes((home / "keys" / "signing.ed25519.pub").read_bytes())
    _take_over(home)
    reg = Registry(home)
    assert reg.verify().ok, reg.verify().problems  # trusting the home's own keys: the take-over verifies
    assert reg.tag("m", "production", verify=True) == 1 and reg.withdrawn_cohorts(verify=True) == set()

    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(pin))
    reg = Registry(home)
    problems = reg.verify().problems
    assert any(p.startswith("state log entry 1: signed by untrusted key") for p in problems), problems
    with pytest.raises(SignatureError, match="untrusted key"):
        reg.tag("m", "production", verify=True)
    with pytest.raises(SignatureError, match="untrusted key"):
        promote(reg, "m@3", evaluator=_pass)


def test_concurrent_tag_moves_from_two_processes_keep_the_chain_linear(home, tmp_path):
    """Two processes move tags at once; every move is in the log, in one unbroken chain, matching the tables."""
    go = tmp_path / "go"
    worker = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from deltaplane.registry.store import Registry
        reg = Registry(sys.argv[1])
        while not Path(sys.argv[2]).exists():
            time.sleep(0.005)
        for i in range(25):
            reg._move_tag("m", sys.argv[3], 1 + i % 3, reason=f"{sys.argv[3]} {i}", action="promote")
        """
    )
    before = len(_entries(home))
    procs = [
        subprocess.Popen([sys.executable, "-c", worker, str(home), str(go), tag], stderr=subprocess.PIPE)
        for tag in ("production", "canary")
    ]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    entries = _entries(home)
    assert [e[0] for e in entries] == list(range(1, before + 51))
    assert all(e[1] == p[2] for p, e in itertools.pairwise(entries))  # each names its predecessor
    report = Registry(home).verify()
    assert report.ok, report.problems
    reg = Registry(home)
    assert len(reg.tag_history("m", "production", verify=True)) == 3 + 25
    assert len(reg.tag_history("m", "canary", verify=True)) == 25
    assert report.log_head == f"{before + 50}:{entries[-1][2]}"


def test_a_failed_signature_leaves_no_tag_move(home, monkeypatch):
    """The table change and its log entry are one transaction: no move without its signed entry."""
    reg = Registry(home)

    def broken(context):
        raise OSError("signing key unreadable")

    monkeypatch.setattr(reg.signer, "sign", broken)
    with pytest.raises(OSError, match="unreadable"):
        reg._move_tag("m", "production", 1, action="promote")
    with pytest.raises(OSError, match="unreadable"):
        reg.withdraw_cohort("us")
    fresh = Registry(home)
    assert fresh.tags("m") == {"production": 3, "staging": 1} and fresh.withdrawn_cohorts() == {"eu"}
    assert fresh.verify().ok


def _make_old(home) -> None:
    """Turn a registry into one made before the log (no state_log table, no marker), as old releases left it."""
    _sql(home, "DROP TABLE state_log", "DELETE FROM settings WHERE name='state_log'")


def test_an_old_registry_is_migrated_with_a_signed_checkpoint(home):
    _make_old(home)
    reg = Registry(home)  # the first open with the signing key writes the checkpoint
    report = reg.verify()
    assert report.ok and report.log_head.startswith("1:"), report.problems
    assert len(report.notes) == 1 and "history before it is unsigned" in report.notes[0]
    assert reg.tags("m", verify=True) == {"production": 3, "staging": 1}
    assert reg.withdrawn_cohorts(verify=True) == {"eu"}
    # later changes append to it ...
    reg.set_tag("m", "staging", 2)
    report = Registry(home).verify()
    assert report.ok and report.log_head.startswith("2:") and len(report.notes) == 1
    # ... and it protects what it found
    _sql(home, "DELETE FROM withdrawals")
    assert _problems(home) == ["withdrawals: cohort 'eu' is missing; the signed log records its withdrawal"]


def test_migration_needs_the_signing_key_and_verified_reads_refuse_until_then(home, tmp_path):
    _make_old(home)
    key = home / "keys" / "signing.ed25519.pem"
    saved = key.read_bytes()
    key.unlink()
    reg = Registry(home)
    report = reg.verify()
    assert report.ok and report.log_head is None
    assert any("no signed state log yet" in n for n in report.notes), report.notes
    with pytest.raises(IntegrityError, match="no signed state log yet"):
        reg.tags("m", verify=True)
    key.write_bytes(saved)
    assert Registry(home).tags("m", verify=True) == {"production": 3, "staging": 1}


def test_an_emptied_log_is_not_restarted(home):
    """Deleting every entry (but not the marker entry 1 left) does not make the registry look like an old one."""
    _sql(home, "DELETE FROM state_log")
    reg = Registry(home)  # opens; writes no new checkpoint
    assert _entries(home) == []
    assert any("entries were deleted" in p for p in _problems(home))
    with pytest.raises(IntegrityError, match="deleted"):
        reg.set_tag("m", "staging", 2)
    with pytest.raises(IntegrityError, match="deleted"):
        reg.tags("m", verify=True)


def test_expect_head_catches_a_truncated_log(home):
    """The limit of a chain: removing the newest entries leaves a valid log. A head recorded elsewhere catches it."""
    recorded = Registry(home).verify().log_head
    reg = Registry(home)
    reg.set_tag("m", "staging", 2)
    assert reg.verify(expect_head=recorded).ok  # the log grew past the recorded head: fine
    # an attacker removes the newest entries (the withdrawal and the last promotion) and their table rows
    n = int(recorded.partition(":")[0])
    _sql(home, f"DELETE FROM state_log WHERE seq >= {n - 1}")
    _sql(home, "DELETE FROM withdrawals", "DELETE FROM tag_history WHERE id >= 4")
    _sql(
        home,
        "UPDATE tags SET number=2, updated_at=(SELECT at FROM tag_history WHERE id=2) WHERE tag='production'",
    )
    _sql(
        home,
        "UPDATE tags SET number=1, updated_at=(SELECT at FROM tag_history WHERE id=3) WHERE tag='staging'",
    )
    assert Registry(home).verify().ok  # the documented limit: a shorter chain is still a valid chain
    problems = Registry(home).verify(expect_head=recorded).problems
    assert problems == [
        f"the state log ends at entry {n - 2}, but the recorded head {recorded} is entry {n}: entries were "
        "removed since it was recorded (or the log was replaced)"
    ]
    with pytest.raises(ConfigError, match="INDEX:SHA256"):
        Registry(home).verify(expect_head="12:abc")


def test_cli_verify_prints_the_head_and_checks_expect_head(home):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    runner = CliRunner()
    verify = ["registry", "verify", "--home", str(home)]
    r = runner.invoke(app, verify)
    head = Registry(home).verify().log_head
    assert r.exit_code == 0 and f"state log head {head}" in r.output and "registry OK" in r.output
    assert runner.invoke(app, [*verify, "--expect-head", head]).exit_code == 0
    rewritten = f"{head.partition(':')[0]}:{'0' * 64}"
    r = runner.invoke(app, [*verify, "--expect-head", rewritten])
    assert r.exit_code == 1 and "the log was rewritten" in r.output
    _sql(home, "UPDATE tags SET number=1 WHERE tag='production'")
    r = runner.invoke(app, verify)
    assert r.exit_code == 1 and "tags: m:production points to version 1, the signed log says 3" in r.output
    r = runner.invoke(app, [*verify, "--expect-head", "nonsense"])
    assert r.exit_code == 2 and "INDEX:SHA256" in r.output and "Traceback" not in r.output


# -- repair: the tables rewritten from the verified log ------------------------------------------------------
def _dump(home) -> dict[str, list[tuple]]:
    """Every row of every table of registry.db (the log, artifacts and evaluations included), read by a second
    connection; sorted, as a row's place in the file is not its content."""
    con = sqlite3.connect(home / "registry.db")
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {n: sorted(con.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names}
    finally:
        con.close()


_FORGE_ALL = (
    "UPDATE tags SET number=1, updated_at=0.0 WHERE tag='production'",
    "DELETE FROM withdrawals WHERE cohort='eu'",
    "INSERT INTO tag_history (model, tag, number, previous, action, reason, at) "
    "VALUES ('m', 'production', 1, 3, 'rollback', 'forged', 0.0)",
)


@pytest.mark.parametrize(
    "statements",
    [_FORGE_ALL[:1], _FORGE_ALL[1:2], _FORGE_ALL[2:], _FORGE_ALL],
    ids=["forged-tag", "deleted-withdrawal", "fake-history-row", "all-three"],
)
def test_repair_restores_the_tables_from_the_signed_log(home, statements):
    from deltaplane.errors import PromotionRefused

    Registry(home).record_evaluation(Registry(home).get("m", 1), "e", {"accuracy": 0.5})
    before = _dump(home)
    _sql(home, *statements)
    with pytest.raises(IntegrityError, match="differ from its signed state log"):
        Registry(home).check_state()  # what promotion, rollback and the service refuse on
    head = Registry(home).verify().log_head
    report = Registry(home).repair_from_log(expect_head=head)
    assert report.applied and report.log_head == head and len(report.differences) == len(statements)
    assert Registry(home).verify(expect_head=head).ok
    after = _dump(home)
    # every row as it was, to the column; artifacts, evaluations and the log untouched
    assert after == before | {"sqlite_sequence": after["sqlite_sequence"]}
    assert Registry(home).repair_from_log().differences == []
    reg = Registry(home)
    with pytest.raises(PromotionRefused, match="withdrawn cohort 'eu'"):  # the gate sees the withdrawal again
        promote(reg, "m@3", to="staging", evaluator=_pass)
    assert promote(reg, "m@2", evaluator=_pass).promoted  # promotion works again
    assert reg.tag("m", "production", verify=True) == 2 and reg.verify().ok


def test_repair_dry_run_changes_nothing(home):
    _sql(home, *_FORGE_ALL)
    before = _dump(home)
    report = Registry(home).repair_from_log(dry_run=True)
    assert not report.applied and len(report.differences) == 3
    assert any("no --expect-head given" in n for n in report.notes), report.notes
    assert _dump(home) == before


def test_repair_warns_about_each_withdrawal_it_removes(home):
    _sql(home, "INSERT INTO withdrawals VALUES ('us', 'unsigned', 1.0)")
    report = Registry(home).repair_from_log()
    assert report.differences == ["withdrawals: cohort 'us' is not in the signed log"]
    assert any("record it again (`deltaplane registry withdraw us`)" in n for n in report.notes), report.notes
    assert Registry(home).withdrawn_cohorts(verify=True) == {"eu"}


def _bad_signature(home) -> None:
    seq, *_ = _entries(home)[-1]
    from deltaplane.registry import load_signer

    # the registry's own key, over another statement: a signature that does not verify, not an untrusted key
    bogus = load_signer(home).sign({"kind": "state-log", "seq": seq, "sha256": "0" * 64}).to_text()
    _sql(home, f"UPDATE state_log SET signature=? WHERE seq={seq}", args=(bogus,))


def _edited_entry(home) -> None:
    seq, _, _, text, _ = _entries(home)[-2]
    forged = text.replace('"number":3', '"number":1')
    digest = hashlib.sha256(forged.encode()).hexdigest()
    _sql(home, f"UPDATE state_log SET entry=?, sha256=? WHERE seq={seq}", args=(forged, digest))


def _wrong_key(home) -> None:
    _rewrite_log(home, Signer.generate(), lambda e: None if e["op"] == "withdraw" else e)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_edited_entry, "signature by"),
        (_bad_signature, "state log entry 6: signature by"),
        (_wrong_key, "untrusted key"),
        (lambda home: _sql(home, "DELETE FROM state_log WHERE seq=3"), "entry 3 is missing"),
        (lambda home: _sql(home, "DELETE FROM state_log"), "entries were deleted"),
    ],
    ids=["edited-entry", "bad-signature", "re-signed-with-another-key", "removed-entry", "emptied"],
)
def test_repair_refuses_a_log_that_does_not_verify_and_changes_nothing(home, tamper, expected):
    # a table change too: what a repair from a forged log would otherwise "fix" the wrong way
    _sql(home, "DELETE FROM withdrawals")
    tamper(home)
    before = _dump(home)
    for dry_run in (True, False):
        with pytest.raises(IntegrityError, match="does not verify") as exc:
            Registry(home).repair_from_log(dry_run=dry_run)
        assert expected in str(exc.value) and "Nothing was changed" in str(exc.value)
    assert _dump(home) == before


def test_repair_applies_the_trust_pin(home, tmp_path, monkeypatch):
    pin = tmp_path / "pin"
    pin.mkdir()
    (pin / "registry.pub").write_bytes((home / "keys" / "signing.ed25519.pub").read_bytes())
    _take_over(home)
    _sql(home, "INSERT INTO withdrawals VALUES ('eu', 'the owner knows', 1.0)")
    assert Registry(home).repair_from_log(dry_run=True).differences  # the attacker's keys would "repair" it
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(pin))
    before = _dump(home)
    with pytest.raises(IntegrityError, match="untrusted key"):
        Registry(home).repair_from_log()
    assert _dump(home) == before


def test_repair_refuses_a_truncated_log_given_the_recorded_head(home):
    recorded = Registry(home).verify().log_head
    n = int(recorded.partition(":")[0])
    _sql(home, f"DELETE FROM state_log WHERE seq >= {n - 1}")  # the withdrawal and the last promotion
    before = _dump(home)
    with pytest.raises(IntegrityError, match=f"ends at entry {n - 2}.*Nothing was changed"):
        Registry(home).repair_from_log(expect_head=recorded)
    rewritten = f"{n - 2}:{'0' * 64}"
    with pytest.raises(IntegrityError, match="the log was rewritten"):
        Registry(home).repair_from_log(expect_head=rewritten)
    with pytest.raises(ConfigError, match="INDEX:SHA256"):
        Registry(home).repair_from_log(expect_head="nonsense")
    assert _dump(home) == before
    # the documented limit: without the head, the shorter log verifies and the repair reverts to it
    report = Registry(home).repair_from_log(dry_run=True)
    assert "withdrawals: cohort 'eu' is not in the signed log" in report.differences


def test_cli_repair(home):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    runner = CliRunner()
    repair = ["registry", "repair", "--home", str(home)]
    head = Registry(home).verify().log_head
    r = runner.invoke(app, repair)
    assert r.exit_code == 0 and "nothing to repair" in r.output, r.output
    _sql(home, *_FORGE_ALL)
    before = _dump(home)
    r = runner.invoke(app, [*repair, "--dry-run"])
    assert r.exit_code == 0 and "would rewrite: tags: m:production points to version 1" in r.output, r.output
    assert "nothing changed" in r.output and _dump(home) == before
    r = runner.invoke(app, [*repair, "--expect-head", f"{head.partition(':')[0]}:{'0' * 64}"])
    assert r.exit_code == 1 and "the log was rewritten" in r.output and _dump(home) == before
    r = runner.invoke(app, [*repair, "--expect-head", "nonsense"])
    assert r.exit_code == 2 and "INDEX:SHA256" in r.output and _dump(home) == before
    r = runner.invoke(app, [*repair, "--expect-head", head])
    assert r.exit_code == 0, r.output
    assert "rewrote: withdrawals: cohort 'eu' is missing" in r.output and "repaired 3 rows" in r.output
    assert "tag_history: row 5 (m:production -> 1) is not in the signed log" in r.output
    assert (
        runner.invoke(app, ["registry", "verify", "--home", str(home), "--expect-head", head]).exit_code == 0
    )
    _bad_signature(home)
    r = runner.invoke(app, repair)
    assert r.exit_code == 1 and "does not verify" in r.output and "Traceback" not in r.output


def _with_records(home) -> None:
    """Two model cards, two evaluations and two promotion verdicts, written through the registry (signed)."""
    reg = Registry(home)
    one, two = reg.get("m", 1), reg.get("m", 2)
    reg.attach_card(one, {"intended_use": "first"})
    reg.attach_card(two, {"intended_use": "second"})
    reg.record_evaluation(one, "gate", {"accuracy": 0.5})
    reg.record_evaluation(two, "gate", {"accuracy": 0.9})
    for candidate, promoted in ((2, True), (1, False)):
        reg.record_promotion_decision(
            "m", "production", candidate, previous=1, promoted=promoted, evaluator="gate",
            metrics={"accuracy": 0.9}, baseline=None, reasons=[] if promoted else ["regressed"],
        )  # fmt: skip
    report = Registry(home).verify()
    assert report.ok and not report.notes, (report.problems, report.notes)


@pytest.mark.parametrize(
    ("statements", "expected"),
    [
        (  # the two versions' cards swapped: each version now shows the other's card
            [
                "UPDATE cards SET sha256 = (SELECT sha256 FROM cards WHERE id=2) || ':' || sha256 WHERE id=1",
                "UPDATE cards SET sha256 = substr((SELECT sha256 FROM cards WHERE id=1), 66) WHERE id=2",
                "UPDATE cards SET sha256 = substr(sha256, 1, 64) WHERE id=1",
            ],
            ["cards row 1 differs", "cards row 2 differs"],
        ),
        (["UPDATE evaluations SET metrics='{\"accuracy\": 0.99}' WHERE id=1"], ["evaluations row 1 differs"]),
        (["UPDATE promotion_decisions SET promoted=1 WHERE id=2"], ["promotion_decisions row 2 differs"]),
        (["DELETE FROM evaluations WHERE id=2"], ["evaluations row 2 is missing"]),
        (
            ["INSERT INTO cards (artifact, sha256, at) SELECT artifact, sha256, at FROM cards WHERE id=2"],
            ["cards row 3 is not in the signed state log"],
        ),
    ],
    ids=["cards-swapped", "score-edited", "verdict-flipped", "evaluation-deleted", "card-inserted"],
)
def test_verify_sees_cards_evaluations_and_verdicts_edited_in_registry_db(home, statements, expected):
    """Cards, evaluations and promotion verdicts were outside the signed state log: swapping two versions' card
    rows or editing a score in registry.db passed `registry verify`. Each insert now appends a log entry with the
    row's SHA-256."""
    _with_records(home)
    _sql(home, *statements)
    problems = _problems(home)
    for e in expected:
        assert any(e in p for p in problems), problems
    assert len(problems) == len(expected), problems


_READS = {
    "card": lambda reg, n: reg.card(reg.get("m", n)),
    "evaluations": lambda reg, n: reg.evaluations(reg.get("m", n)),
    "decisions": lambda reg, n: reg.promotion_decisions("m"),
}


@pytest.mark.parametrize(
    ("statements", "read", "number", "expected"),
    [
        (  # the two versions' card rows swapped: m@1 would show m@2's card
            ["UPDATE cards SET artifact = 3 - artifact"],
            "card",
            1,
            r"the model card of m@1 \(cards row 2\): cards row 2 differs from the signed state log",
        ),
        (  # an evaluation moved to another version
            ["UPDATE evaluations SET artifact=2 WHERE id=1"],
            "evaluations",
            2,
            "evaluation row 1 of m@2: evaluations row 1 differs",
        ),
        (
            ["UPDATE evaluations SET metrics='{\"accuracy\": 0.99}' WHERE id=1"],
            "evaluations",
            1,
            "row 1 differs",
        ),
        (
            ["UPDATE promotion_decisions SET promoted=1 WHERE id=2"],
            "decisions",
            0,
            "decision row 2: .* differs",
        ),
        (
            ["INSERT INTO cards (artifact, sha256, at) SELECT 1, sha256, at FROM cards WHERE id=2"],
            "card",
            1,
            "cards row 3 is not in the signed state log",
        ),
        (
            [
                "INSERT INTO evaluations (artifact, evaluator, metrics, at) "
                "VALUES (1, 'gate', '{\"accuracy\": 1.0}', 0.0)"
            ],
            "evaluations",
            1,
            "evaluations row 3 is not in the signed state log",
        ),
    ],
    ids=[
        "cards-swapped",
        "evaluation-moved",
        "score-edited",
        "verdict-flipped",
        "card-inserted",
        "eval-inserted",
    ],
)
def test_reads_check_cards_evaluations_and_verdicts_against_the_signed_log(
    home, statements, read, number, expected
):
    """card(), evaluations() and promotion_decisions() served an edited, moved or inserted row as genuine (only
    verify checked them): now each read is an IntegrityError naming the row, on a fresh handle and on one whose
    verified replay was cached before the edit."""
    _with_records(home)
    warm = Registry(home)
    _READS[read](warm, number)  # caches the verified replay on this handle
    _sql(home, *statements)
    for reg in (warm, Registry(home)):
        with pytest.raises(IntegrityError, match=expected):
            _READS[read](reg, number)


def test_reads_label_each_row_signed(home):
    _with_records(home)
    reg = Registry(home)
    assert reg.card_entry(reg.get("m", 2)) == ({"intended_use": "second"}, "signed")
    assert [e["record"] for e in reg.evaluations(reg.get("m", 1))] == ["signed"]
    assert [d["record"] for d in reg.promotion_decisions("m")] == ["signed", "signed"]


def _old_rows(home) -> None:
    """Make ``home`` a registry from before rows were signed holding a card and evaluations ids 1 and 3 (2 was
    never written: an id gap), then start its log as the first open with the key does."""
    blob = Registry(home).put_blob(b'{"intended_use": "old"}')
    _sql(
        home,
        f"INSERT INTO cards (artifact, sha256, at) VALUES (1, '{blob}', 0.0)",
        "INSERT INTO evaluations (id, artifact, evaluator, metrics, at) VALUES (1, 1, 'old', '{\"accuracy\": 0.1}', 0.0)",
        "INSERT INTO evaluations (id, artifact, evaluator, metrics, at) VALUES (3, 1, 'old', '{\"accuracy\": 0.3}', 0.0)",
    )
    _make_old(home)


def test_rows_written_before_rows_were_signed_load_labelled_and_bound_as_found(home):
    """A registry from before: its cards/evaluations rows have no record entries. They still load, labelled
    "legacy"; the checkpoint binds them as found, so an edit of one is caught; rows from then on are signed."""
    _old_rows(home)
    reg = Registry(home)
    report = reg.verify()
    assert report.ok, report.problems
    assert any(
        "2 evaluations rows are unsigned (written before" in n and "bound as found" in n for n in report.notes
    )
    assert reg.card_entry(reg.get("m", 1)) == ({"intended_use": "old"}, "legacy")
    assert [e["record"] for e in reg.evaluations(reg.get("m", 1))] == ["legacy", "legacy"]
    reg.record_evaluation(reg.get("m", 2), "new", {"accuracy": 0.7})
    assert [e["record"] for e in Registry(home).evaluations(reg.get("m", 2))] == ["signed"]
    assert Registry(home).verify().ok
    _sql(home, "UPDATE evaluations SET metrics='{\"accuracy\": 1.0}' WHERE evaluator='new'")
    assert any("evaluations row 4 differs" in p for p in _problems(home))
    _sql(home, "UPDATE evaluations SET metrics='{\"accuracy\": 0.7}' WHERE evaluator='new'")
    _sql(home, "UPDATE evaluations SET metrics='{\"accuracy\": 0.9}' WHERE id=1")  # a legacy row edited
    assert _problems(home) == [
        "evaluations row 1 differs from the signed state log: edited behind the registry's back"
    ]
    with pytest.raises(IntegrityError, match="evaluation row 1 of m@1"):
        Registry(home).evaluations(reg.get("m", 1))


def test_a_row_inserted_into_an_id_gap_below_the_first_signed_row_is_caught(home):
    """The gap 2 between legacy rows 1 and 3, below the first signed row 4: such a row passed verify and reads as
    an "unsigned" legacy row. The log now lists the legacy rows, so it is neither."""
    _old_rows(home)
    reg = Registry(home)
    reg.record_evaluation(reg.get("m", 2), "new", {"accuracy": 0.7})
    _sql(
        home,
        "INSERT INTO evaluations (id, artifact, evaluator, metrics, at) VALUES (2, 1, 'gate', '{}', 0.0)",
    )
    assert _problems(home) == [
        "evaluations row 2 is not in the signed state log: written behind the registry's back"
    ]
    with pytest.raises(IntegrityError, match="evaluations row 2 is not in the signed state log"):
        Registry(home).evaluations(reg.get("m", 1))


def _log_of_an_older_release(home) -> None:
    """registry.db as the release before legacy rows were bound left it: a checkpoint without "records", record
    entries for rows 3 on (ids 1 and 2 written before), no binding of the older rows."""
    from deltaplane.registry import eventlog, load_signer

    reg = Registry(home)
    for i in (1, 2, 3):
        reg.record_evaluation(reg.get("m", 1), "gate", {"accuracy": i / 10})
    _make_old(home)
    _sql(home, "DELETE FROM settings WHERE name IN ('state_log_records', 'state_log_versions')")
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    con.row_factory = sqlite3.Row
    try:
        for ddl in eventlog._DDL:
            con.execute(ddl)
        now, signer = eventlog.read_tables(con), load_signer(home)
        head = eventlog._write(con, signer, None, {
            "op": "checkpoint", "at": 1.0,
            "tags": [[m, t, *v] for (m, t), v in sorted(now.tags.items())],
            "tag_history": [[i, *v] for i, v in sorted(now.tag_history.items())],
            "withdrawals": [[c, *v] for c, v in sorted(now.withdrawals.items())],
        })  # fmt: skip
        old = {k: v for k, v in eventlog.record_change(con, "evaluations", 3).items() if k != "of"}
        eventlog._write(con, signer, head, old)
        con.execute("INSERT INTO settings VALUES ('state_log', '1')")
    finally:
        con.close()


def test_a_log_from_an_older_release_binds_its_legacy_rows_on_the_first_open_with_the_key(home):
    """Without the key its rows below the first signed id read as "unsigned" (not verified, labelled); the first
    open with the key appends one entry binding them, after which a row inserted into the log's gap is caught."""
    _log_of_an_older_release(home)
    key = home / "keys" / "signing.ed25519.pem"
    saved = key.read_bytes()
    key.unlink()
    reg = Registry(home)
    assert [e["record"] for e in reg.evaluations(reg.get("m", 1))] == ["unsigned", "unsigned", "signed"]
    assert any("not verified; open the registry once with its signing key" in n for n in reg.verify().notes)
    key.write_bytes(saved)
    reg = Registry(home)
    assert [e["record"] for e in reg.evaluations(reg.get("m", 1))] == ["legacy", "legacy", "signed"]
    assert reg.verify().ok and len(_entries(home)) == 5
    assert [json.loads(e[3])["op"] for e in _entries(home)[2:]] == ["legacy", "versions", "settings"]
    Registry(home)  # bound once: deleting the settings shortcuts does not bind again
    _sql(home, "DELETE FROM settings WHERE name IN ('state_log_records', 'state_log_versions')")
    assert Registry(home).verify().ok and len(_entries(home)) == 5
    _sql(home, "DELETE FROM evaluations WHERE id=2")
    _sql(
        home,
        "INSERT INTO evaluations (id, artifact, evaluator, metrics, at) VALUES (2, 2, 'gate', '{}', 0.0)",
    )
    assert any("evaluations row 2 differs" in p for p in _problems(home))


def _swap_versions(home, a: int, b: int) -> None:
    """Swap the artifact row ids of m@a and m@b in registry.db, as a tamperer with sqlite3 would."""
    ids = dict(_query(home, "SELECT number, id FROM artifacts WHERE model='m'"))
    _sql(
        home,
        "DROP TRIGGER IF EXISTS artifacts_immutable_u",
        f"UPDATE artifacts SET id=-1 WHERE model='m' AND number={a}",
        f"UPDATE artifacts SET id={ids[a]} WHERE model='m' AND number={b}",
        f"UPDATE artifacts SET id={ids[b]} WHERE model='m' AND number={a}",
    )


def _query(home, sql: str) -> list[tuple]:
    con = sqlite3.connect(home / "registry.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_rows_recorded_before_versions_were_bound_are_bound_as_found_on_the_first_open_with_the_key(home):
    """A log from the release before: record entries without ``of`` (and no signed settings). Without the key
    such rows read as before and verify notes them; the first open with the key appends a ``versions`` entry
    (their versions as found) and a ``settings`` entry, after which a swap of artifact ids is caught."""
    _log_of_an_older_release(home)
    key = home / "keys" / "signing.ed25519.pem"
    saved = key.read_bytes()
    key.unlink()
    reg = Registry(home)
    assert [e["metrics"] for e in reg.evaluations(reg.get("m", 1))][-1] == {"accuracy": 0.3}
    notes = reg.verify().notes
    assert any("1 evaluations rows are not bound to the version they are of" in n for n in notes), notes
    key.write_bytes(saved)
    reg = Registry(home)
    report = reg.verify()
    assert report.ok and not any("not bound to the version" in n for n in report.notes), report
    versions = json.loads(_entries(home)[-2][3])
    m1 = reg.get("m", 1)
    assert versions["op"] == "versions"
    assert versions["versions"]["evaluations"] == [[i, "m", 1, m1.sha256] for i in (1, 2, 3)]
    assert json.loads(_entries(home)[-1][3])["settings"] == {"encryption": "aes-256-gcm"}
    _swap_versions(home, 1, 2)
    with pytest.raises(IntegrityError, match=r"evaluation row 1 of m@2.*was recorded for m@1 \(weights"):
        Registry(home).evaluations(Registry(home).get("m", 2))
    assert sum("was recorded for m@1" in p for p in _problems(home)) == 3


def test_registry_show_labels_rows_written_before_rows_were_signed(home):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    _old_rows(home)
    reg = Registry(home)
    reg.record_evaluation(reg.get("m", 1), "new", {"accuracy": 0.7})
    r = CliRunner().invoke(app, ["registry", "show", "m@1", "--home", str(home)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the table folds long cells
    label = "(unsigned: written before rows were signed; bound as found since)"
    for score in ("0.1000", "0.3000"):  # the time in between is local time
        assert re.search(rf"accuracy={score} \([0-9: -]+\) {re.escape(label)}", text), text
    assert (
        f"card attached {label}" in text and text.count(label) == 3
    )  # the signed evaluation is not labelled
    r = CliRunner().invoke(app, ["registry", "show", "m@1", "--home", str(home), "--json"])
    doc = json.loads(r.output)
    assert doc["card_record"] == "legacy" and [e["record"] for e in doc["evaluations"]] == ["legacy"] * 2 + [
        "signed"
    ]
    _sql(home, "UPDATE evaluations SET metrics='{\"accuracy\": 0.9}' WHERE id=1")
    r = CliRunner().invoke(app, ["registry", "show", "m@1", "--home", str(home)])
    assert r.exit_code == 1 and "evaluations row 1 differs" in r.output and "Traceback" not in r.output


def test_pull_refuses_a_withdrawal_deleted_from_registry_db(home, tmp_path):
    """pull wrote consent.withdrawn_cohorts [] for m@3 (trained on 'eu') once the withdrawal row was deleted."""
    from typer.testing import CliRunner

    from deltaplane.cli import app

    pull = ["registry", "pull", "m@3", "--home", str(home), "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(app, pull)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["consent"]["withdrawn_cohorts"] == [
        "eu"
    ]
    _sql(home, "DELETE FROM withdrawals")
    r = CliRunner().invoke(app, [*pull[:-1], str(tmp_path / "out2")])
    assert r.exit_code == 1 and "withdrawals: cohort 'eu' is missing" in r.output, r.output
    assert not (tmp_path / "out2").exists()


def test_pull_refuses_a_tag_moved_in_registry_db(home, tmp_path):
    """pull m:production wrote m@1 (the version an edited tag row named) as verified; the signed log says m@3."""
    from typer.testing import CliRunner

    from deltaplane.cli import app

    pull = ["registry", "pull", "m:production", "--home", str(home), "--out"]
    r = CliRunner().invoke(app, [*pull, str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["number"] == 3
    _sql(home, "UPDATE tags SET number=1 WHERE model='m' AND tag='production'")
    r = CliRunner().invoke(app, [*pull, str(tmp_path / "out2")])
    assert r.exit_code == 1 and "m:production points to version 1, the signed log says 3" in r.output, (
        r.output
    )
    assert not (tmp_path / "out2").exists()


def test_a_copy_without_keys_says_which_key_to_trust(tmp_path, monkeypatch):
    """A copy of registry.db and blobs/ without keys/ (a backup, a dashboard's replica): `registry show` said only
    "no public keys under …; run `deltaplane keys init`", and a new key verifies nothing the registry's key signed."""
    import shutil

    from typer.testing import CliRunner

    from deltaplane.cli import app
    from deltaplane.errors import MissingTrustedKeys, NotFound

    reg = Registry.create(tmp_path / "h", encrypt=False)
    art = reg.register_model("m", _state(1))
    reg.attach_card(art, {"intended_use": "tests"})
    reg.record_evaluation(art, "holdout", {"accuracy": 0.9})
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "h" / "registry.json", copy)
    with sqlite3.connect(tmp_path / "h" / "registry.db") as src, sqlite3.connect(copy / "registry.db") as dst:
        src.backup(dst)  # as a backup is made (the WAL included)
    shutil.copytree(tmp_path / "h" / "blobs", copy / "blobs")
    with pytest.raises(MissingTrustedKeys, match=TRUSTED_KEYS_ENV) as caught:
        Registry(copy).card(art)
    assert isinstance(caught.value, NotFound)  # callers catching NotFound keep working
    r = CliRunner().invoke(app, ["registry", "show", "m@1", "--home", str(copy)])
    assert r.exit_code == 1 and TRUSTED_KEYS_ENV in r.output and "keys/trusted" in r.output, r.output
    assert "a new key verifies nothing" in r.output and "Traceback" not in r.output
    monkeypatch.setenv(
        TRUSTED_KEYS_ENV, str(tmp_path / "h" / "keys" / "signing.ed25519.pub")
    )  # the fix it names
    r = CliRunner().invoke(app, ["registry", "show", "m@1", "--home", str(copy)])
    assert r.exit_code == 0 and "holdout" in r.output, r.output


def test_repair_lists_cards_evaluations_and_verdicts_it_cannot_restore(home):
    """repair said "nothing to repair: the tables equal the signed state log" (exit 0) over an edited score."""
    from typer.testing import CliRunner

    from deltaplane.cli import app

    _with_records(home)
    _sql(home, "UPDATE evaluations SET metrics='{\"accuracy\": 0.99}' WHERE id=1")
    rep = Registry(home).repair_from_log()
    assert rep.unrepaired == [
        "evaluations row 1 differs from the signed state log: edited behind the registry's back"
    ]
    assert not rep.differences and not rep.applied
    r = CliRunner().invoke(app, ["registry", "repair", "--home", str(home)])
    assert r.exit_code == 1 and "cannot repair: evaluations row 1 differs" in r.output, r.output
    assert "nothing to repair" not in r.output
