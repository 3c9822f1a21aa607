"""What a registry signature proves against someone who can write ``registry.db`` (or the whole home).

The attacker here edits the SQLite file directly (dropping the immutability trigger is one statement), as anyone
with write access to the home can; the checks are the public read and verify paths on a fresh handle.
"""

import sqlite3

import pytest
import torch

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.errors import SignatureError
from deltaplane.registry import Registry, publish_update


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(16, 16, generator=g), "a.bias": torch.randn(16, generator=g)}


def _tamper(home, sql: str, args=()) -> None:
    """Change artifact rows behind the registry's back, as a writer of registry.db can."""
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    try:
        con.execute("DROP TRIGGER IF EXISTS artifacts_immutable_u")
        assert con.execute(sql, args).rowcount == 1
    finally:
        con.close()


@pytest.fixture
def home(tmp_path):
    """m@1, then a published m@2 (parent 1, cohort 'eu', lineage round 1) with its delta m@3 (codec set)."""
    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", _state(0), governance={"cohorts": ["us"]})
    g = torch.Generator().manual_seed(5)
    update = Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in _state(0).items()})
    comp = Compressor("topk(0.25) | quant(bits=8)", seed=0)
    v2, d = publish_update(
        reg, "m", 1, update, compressor=comp, lineage={"round": 1}, governance={"cohorts": ["eu"]}
    )
    assert (v2.number, d.number, d.codec) == (2, 3, comp.codec.spec)
    assert Registry(tmp_path / "h").verify().ok
    return tmp_path / "h"


@pytest.mark.parametrize(
    ("what", "sql", "number"),
    [
        # drop a cohort, so a withdrawal of 'eu' no longer reaches m@2
        ("governance", """UPDATE artifacts SET governance='{"cohorts": ["us"]}' WHERE number=2""", 2),
        (
            "lineage",
            """UPDATE artifacts SET lineage='{"downlink_codec": "x", "round": 7}' WHERE number=2""",
            2,
        ),
        ("parent", "UPDATE artifacts SET parent=NULL WHERE number=2", 2),  # cut the lineage walk
        ("codec", "UPDATE artifacts SET codec='raw' WHERE number=3", 3),
    ],
    ids=["governance", "lineage", "parent", "codec"],
)
def test_tampered_metadata_fails_verification(home, what, sql, number):
    _tamper(home, sql)
    reg = Registry(home)
    report = reg.verify()
    assert not report.ok and any(p.startswith(f"m@{number}:") for p in report.problems), report.problems
    art = reg.get("m", number)
    with pytest.raises(SignatureError, match="altered"):
        reg.read(art)
    if art.kind == "model":
        with pytest.raises(SignatureError):
            reg.load_state(art, verify=True)
    assert [p.partition(":")[0] for p in report.problems] == [f"m@{number}"]
    assert reg.load_state("m@1")  # the untouched version still loads


@pytest.mark.parametrize("version", [1, 3, 0])
def test_a_new_signature_cannot_be_relabelled_as_another_statement(home, version):
    """A row signed over the metadata cannot be passed off as an old-format row (nor an unknown format)."""
    _tamper(home, "UPDATE artifacts SET statement_version=? WHERE number=2", (version,))
    reg = Registry(home)
    with pytest.raises(SignatureError):
        reg.load_state("m@2")
    assert [p.partition(":")[0] for p in reg.verify().problems] == ["m@2"]


def test_rows_signed_before_metadata_was_signed_still_verify(home):
    """A registry written before the change (no statement_version column, signature over the old statement)
    opens, verifies (with a note that the metadata is not covered) and loads."""
    reg = Registry(home)
    old = reg.get("m", 2)
    for a in reg.versions():
        # the old statement, exactly as releases before metadata signing signed it
        legacy = {
            "kind": a.kind,
            "model": a.model,
            "version": a.number,
            "base": a.base,
            "target": a.target,
            "sha256": a.sha256,
        }
        sig = reg.signer.sign(legacy).to_text()
        _tamper(home, "UPDATE artifacts SET signature=? WHERE id=?", (sig, a.id))
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    con.execute("ALTER TABLE artifacts DROP COLUMN statement_version")  # as an old registry.db has it
    con.close()
    reg = Registry(home)  # adds the column: existing rows are version 1
    assert reg.get("m", 2).statement_version == 1
    report = reg.verify()
    assert report.ok, report.problems
    assert [n.partition(" (")[0] for n in report.notes] == [
        "3 artifacts were signed before metadata was signed"
    ]
    assert "m@1, m@2, m@3" in report.notes[0] and "not covered" in report.notes[0]
    assert torch.equal(reg.load_state("m@2")["a.bias"], Registry(home).load_state(old)["a.bias"])
    # what an old-format signature never covered: its metadata is not checked (hence the note) ...
    _tamper(home, """UPDATE artifacts SET governance='{"cohorts": []}' WHERE number=2""")
    assert Registry(home).verify().ok
    # ... but its bytes and version still are
    _tamper(home, "UPDATE artifacts SET number=9 WHERE number=2")
    assert not Registry(home).verify().ok
    # new rows in the migrated registry are signed over their metadata
    new = Registry(home).register_model("m", _state(3), parent=1)
    assert new.statement_version == 2 and "statement" in new.statement()


def test_full_downlink_of_a_new_artifact_verifies_on_a_device(home):
    """Devices verify a full model against the device statement (kind, model, version, sha256): the service
    signs it, since the stored signature now covers more."""
    from deltaplane.registry import apply_downlink, plan_downlink

    reg = Registry(home)
    dl = plan_downlink(reg, reg.signer, "m", want=2, have=None)
    assert dl.kind == "full"
    got = apply_downlink(dl, reg.signer.verifier())
    assert torch.equal(got["a.bias"], reg.load_state("m@2")["a.bias"])


def _take_over(home) -> None:
    """What a writer of the home can do: replace keys/ with a key pair of its own and re-sign every artifact
    (here after clearing m@2's governance, so a withdrawal of 'eu' would miss it) and the signed state log."""
    from deltaplane.registry import init_keys

    _tamper(home, """UPDATE artifacts SET governance='{"cohorts": []}' WHERE number=2""")
    evil = init_keys(home, overwrite=True)
    for a in Registry(home, verifier=evil.verifier()).versions():
        _tamper(
            home, "UPDATE artifacts SET signature=? WHERE id=?", (evil.sign(a.statement()).to_text(), a.id)
        )
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    con.execute("DROP TRIGGER IF EXISTS state_log_append_only_u")
    for seq, digest in con.execute("SELECT seq, sha256 FROM state_log").fetchall():
        sig = evil.sign({"kind": "state-log", "seq": seq, "sha256": digest}).to_text()
        con.execute("UPDATE state_log SET signature=? WHERE seq=?", (sig, seq))
    con.close()


def _pin(home, where) -> None:
    """Keep the registry's public key outside the home (a directory of *.pub files)."""
    where.mkdir()
    (where / "registry.pub").write_bytes((home / "keys" / "signing.ed25519.pub").read_bytes())


def test_a_pin_outside_the_home_refuses_a_home_whose_keys_were_replaced(home, tmp_path, monkeypatch):
    from deltaplane.registry.signing import TRUSTED_KEYS_ENV

    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    _pin(home, tmp_path / "pin")
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(tmp_path / "pin"))
    assert Registry(home).verify().ok  # the pin trusts the registry's real key
    _take_over(home)

    monkeypatch.delenv(TRUSTED_KEYS_ENV)
    assert Registry(home).verify().ok  # trusting the home's own keys: the take-over verifies
    assert Registry(home).get("m", 2).governance.cohorts == ()

    for pin in (tmp_path / "pin", tmp_path / "pin" / "registry.pub"):  # a directory or a file of keys
        monkeypatch.setenv(TRUSTED_KEYS_ENV, str(pin))
        reg = Registry(home)
        report = reg.verify()
        # the three artifacts and the state log's first entry (the chain is not checked past it)
        assert len(report.problems) == 4 and all("untrusted key" in p for p in report.problems)
        with pytest.raises(SignatureError, match="untrusted key"):
            reg.load_state("m@2")
    # an explicit verifier is the same pin from Python
    from deltaplane.registry.signing import load_trusted_keys

    monkeypatch.delenv(TRUSTED_KEYS_ENV)
    assert not Registry(home, verifier=load_trusted_keys(tmp_path / "pin")).verify().ok


def test_cli_verify_takes_a_pin(home, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from deltaplane.cli import app
    from deltaplane.registry.signing import TRUSTED_KEYS_ENV

    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    _pin(home, tmp_path / "pin")
    runner = CliRunner()
    verify = ["registry", "verify", "--home", str(home)]
    r = runner.invoke(app, [*verify, "--trusted", str(tmp_path / "pin")])
    assert r.exit_code == 0 and "registry OK" in r.output and "pinned" in r.output
    _take_over(home)
    r = runner.invoke(app, verify)
    assert r.exit_code == 0 and "keys inside the home" in r.output  # says what it proved: not much
    r = runner.invoke(app, [*verify, "--trusted", str(tmp_path / "pin")])
    assert r.exit_code == 1 and "untrusted key" in r.output
    r = runner.invoke(app, [*verify, "--trusted", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "nowhere" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "no public keys"),
        ("# only a comment\n", "no public keys"),
        ("not base64!\n", "line 1"),
        ("QUJD\n", "32 bytes"),  # base64 of 3 bytes
    ],
    ids=["missing", "empty", "comment", "garbage", "short"],
)
def test_a_bad_pin_is_a_config_error(tmp_path, content, message):
    from deltaplane.errors import ConfigError
    from deltaplane.registry.signing import load_trusted_keys

    path = tmp_path / "keys.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_trusted_keys(path)


# -- what the signatures cover, checked with the cryptography package, not deltaplane's verifier ------------
def _ed25519(home):
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = base64.b64decode((home / "keys" / "signing.ed25519.pub").read_text().strip())
    return Ed25519PublicKey.from_public_bytes(raw)


def _signed_bytes(context) -> bytes:
    import json

    return b"deltaplane/artifact/v1\x00" + json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


def _sig(text: str) -> bytes:
    import base64

    return base64.b64decode(text.partition(":")[2])


def test_an_artifact_signature_covers_exactly_the_documented_fields(home):
    """The statement written out by hand from the docs (Artifact.statement), checked with cryptography: every
    covered field changed breaks it; the row id and created_at are not covered (hence the card check below)."""
    import hashlib
    import json

    from cryptography.exceptions import InvalidSignature

    key = _ed25519(home)
    con = sqlite3.connect(home / "registry.db")
    con.row_factory = sqlite3.Row
    row = con.execute("SELECT * FROM artifacts WHERE number=2").fetchone()
    con.close()

    def digest(text: str) -> str:
        canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    stmt = {
        "kind": "model",
        "model": "m",
        "version": 2,
        "base": None,
        "target": None,
        "sha256": row["sha256"],
        "statement": 2,
        "size": row["size"],
        "parent": 1,
        "codec": None,
        "lineage_sha256": digest(row["lineage"]),
        "governance_sha256": digest(row["governance"]),
    }
    assert json.loads(row["governance"])["cohorts"] == ["eu", "us"]  # the parent's cohort flowed down
    key.verify(_sig(row["signature"]), _signed_bytes(stmt))
    changes = {
        "kind": "delta",
        "model": "n",
        "version": 3,
        "base": 1,
        "target": 2,
        "sha256": "0" * 64,
        "statement": 1,
        "size": row["size"] + 1,
        "parent": None,
        "codec": "raw",
        "lineage_sha256": digest('{"round": 2}'),
        "governance_sha256": digest('{"cohorts": ["us"]}'),
    }
    assert set(changes) == set(stmt)
    for field, value in changes.items():
        with pytest.raises(InvalidSignature):
            key.verify(_sig(row["signature"]), _signed_bytes({**stmt, field: value}))
    for extra in ("id", "created_at"):  # not in the statement: a signature says nothing about them
        with pytest.raises(InvalidSignature):
            key.verify(_sig(row["signature"]), _signed_bytes({**stmt, extra: row[extra]}))


def test_one_versions_signature_does_not_verify_another_versions_row(home):
    """Signature and weights of m@1 copied onto m@2's row (or m@2's signature onto m@1's bytes): refused."""
    con = sqlite3.connect(home / "registry.db")
    sig1, sha1, size1 = con.execute("SELECT signature, sha256, size FROM artifacts WHERE number=1").fetchone()
    con.close()
    _tamper(home, "UPDATE artifacts SET signature=? WHERE number=2", (sig1,))
    reg = Registry(home)
    with pytest.raises(SignatureError):
        reg.load_state("m@2")
    _tamper(home, "UPDATE artifacts SET sha256=?, size=? WHERE number=2", (sha1, size1))
    with pytest.raises(SignatureError):
        Registry(home).load_state("m@2")
    assert [p.partition(":")[0] for p in Registry(home).verify().problems] == ["m@2"]


def test_a_tag_move_is_signed_in_the_state_log_as_documented(home):
    """The newest state log entry is the tag move; its signature, checked with cryptography, covers
    {kind: state-log, seq, sha256(entry)}, and the entry names the tag, the version and the previous entry."""
    import hashlib
    import json

    reg = Registry(home)
    reg.set_tag("m", "staging", 2)
    con = sqlite3.connect(home / "registry.db")
    seq, prev, sha, entry, sig = con.execute(
        "SELECT seq, prev, sha256, entry, signature FROM state_log ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    before = con.execute("SELECT sha256 FROM state_log WHERE seq=?", (seq - 1,)).fetchone()
    con.close()
    assert hashlib.sha256(entry.encode()).hexdigest() == sha
    doc = json.loads(entry)
    assert doc["prev"] == prev and (before is None or before[0] == prev)
    assert {k: doc[k] for k in ("op", "model", "tag", "number")} == {
        "op": "tag",
        "model": "m",
        "tag": "staging",
        "number": 2,
    }
    _ed25519(home).verify(_sig(sig), _signed_bytes({"kind": "state-log", "seq": seq, "sha256": sha}))


def test_swapped_artifact_row_ids_do_not_move_a_promotion_card(tmp_path):
    """Cards point to their version by row id, which no signature covers: ids swapped in registry.db showed
    m@1's promotion card (the gate's passing metrics) as the card of m@3, which the gate refused."""
    from deltaplane.errors import IntegrityError
    from deltaplane.registry import promote

    h = tmp_path / "h"
    reg = Registry.create(h, encrypt=False)
    for i in range(3):
        reg.register_model("m", {"w": torch.full((2,), 0.9 - 0.3 * i)})

    def ev(state):
        return {"accuracy": float(state["w"].mean()), "ood_accuracy": float(state["w"].mean())}

    promote(reg, "m@1", evaluator=ev)
    assert not promote(reg, "m@3", evaluator=ev, raise_on_refusal=False).promoted
    assert reg.card(reg.get("m", 3)) is None
    con = sqlite3.connect(h / "registry.db", isolation_level=None)
    con.execute("DROP TRIGGER artifacts_immutable_u")
    ids = dict(con.execute("SELECT number, id FROM artifacts").fetchall())
    con.execute("UPDATE artifacts SET id=999 WHERE number=1")
    con.execute("UPDATE artifacts SET id=? WHERE number=3", (ids[1],))
    con.execute("UPDATE artifacts SET id=? WHERE number=1", (ids[3],))
    con.close()
    reg = Registry(h)
    # the log binds the card row to m@1 (its weights' SHA-256 too), so the swap is named before the card is read
    with pytest.raises(
        IntegrityError, match=r"the model card of m@3 \(cards row 1\): cards row 1 was recorded for m@1"
    ):
        reg.card(reg.get("m", 3))
    problems = reg.verify().problems
    assert (
        f"cards row 1 was recorded for m@1 (weights {reg.get('m', 1).sha256[:12]}…), but registry.db now links it "
        f"to m@3 (weights {reg.get('m', 3).sha256[:12]}…): artifact rows or the row's artifact id were changed "
        "behind the registry's back"
    ) in problems
    assert (
        "the model card of m@3 is m@1's: the cards row or the artifact row ids were edited in registry.db "
        "(restore it from a backup)"
    ) in problems
    # the gate's evaluations of m@1 and m@3 moved with the swap too: each is named
    assert sum(p.startswith("evaluations row") for p in problems) == 3


def _swap_artifact_ids(db, a: int, b: int) -> None:
    """What a tamperer with sqlite3 does: swap the row ids of versions ``a`` and ``b`` of model m."""
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("DROP TRIGGER IF EXISTS artifacts_immutable_u")
        ids = dict(con.execute("SELECT number, id FROM artifacts WHERE model='m'").fetchall())
        con.execute("UPDATE artifacts SET id=-1 WHERE model='m' AND number=?", (a,))
        con.execute("UPDATE artifacts SET id=? WHERE model='m' AND number=?", (ids[a], b))
        con.execute("UPDATE artifacts SET id=? WHERE model='m' AND number=?", (ids[b], a))
    finally:
        con.close()


def test_swapped_artifact_row_ids_do_not_move_evaluations(tmp_path):
    # an evaluation row names its version by artifact row id only, and its row digest (in the log) covers that
    # id, not the version: swapping two artifact rows' ids moved m@2's scores to m@1 with every signature intact
    import hashlib

    from deltaplane.errors import IntegrityError

    h = tmp_path / "h"
    reg = Registry.create(h, encrypt=False)
    good = reg.register_model("m", {"w": torch.full((2,), 0.9)})
    bad = reg.register_model("m", {"w": torch.full((2,), 0.1)})
    reg.record_evaluation(good, "gate", {"accuracy": 0.9})
    reg.record_evaluation(bad, "gate", {"accuracy": 0.1})
    _swap_artifact_ids(h / "registry.db", 1, 2)
    # the artifacts themselves still verify: their signatures cover model, number and weights, not the row id
    con = sqlite3.connect(h / "registry.db")
    rows = con.execute("SELECT id, number, sha256 FROM artifacts ORDER BY number").fetchall()
    con.close()
    assert [r[0] for r in rows] == [good.id + 1, good.id] and rows[0][2] == good.sha256
    assert hashlib.sha256(Registry(h).read(Registry(h).get("m", 1))).hexdigest() == good.sha256
    reg = Registry(h)
    with pytest.raises(IntegrityError, match=r"evaluation row 2 of m@1.*was recorded for m@2 \(weights "):
        reg.evaluations(reg.get("m", 1))
    with pytest.raises(IntegrityError, match=r"evaluation row 1 of m@2.*was recorded for m@1 \(weights "):
        reg.evaluations(reg.get("m", 2))
    problems = reg.verify().problems
    assert [p for p in problems if p.startswith("evaluations row")] == [
        f"evaluations row {n} was recorded for m@{n} (weights {sha[:12]}…), but registry.db now links it to "
        f"m@{3 - n} (weights {other[:12]}…): artifact rows or the row's artifact id were changed behind the "
        "registry's back"
        for n, sha, other in ((1, good.sha256, bad.sha256), (2, bad.sha256, good.sha256))
    ]
    _swap_artifact_ids(h / "registry.db", 1, 2)  # swapped back: everything reads and verifies again
    reg = Registry(h)
    assert [e["metrics"] for e in reg.evaluations(reg.get("m", 2))] == [{"accuracy": 0.1}]
    assert reg.verify().ok
