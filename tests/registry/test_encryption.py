"""Encryption at rest (AES-GCM envelope, rotation) and the registry's low-severity audit findings."""

import base64
import os
import shutil
import sqlite3

import pytest
import torch

from deltaplane.errors import ConfigError, IntegrityError, NotFound
from deltaplane.registry import Registry
from deltaplane.registry.encryption import KEK_ENV, KeyRing, kek_id


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)}


def test_blobs_are_encrypted_by_default_and_plaintext_needs_an_opt_out(tmp_path):
    reg = Registry.create(tmp_path / "enc")
    a = reg.register_model("m", state())
    raw = reg.blob_path(a.sha256).read_bytes()
    assert raw[:4] == b"DPEB" and b"deltaplane.order" not in raw  # the safetensors header is not visible
    assert torch.equal(reg.load_state("m@1")["w"], state()["w"]) and reg.verify().ok
    plain = Registry.create(tmp_path / "plain", encrypt=False)
    b = plain.register_model("m", state())
    assert b"deltaplane.order" in plain.blob_path(b.sha256).read_bytes()
    assert not plain.encrypted and Registry(tmp_path / "plain").verify().ok


def test_tampered_or_moved_encrypted_blob_is_refused(tmp_path):
    reg = Registry.create(tmp_path / "h")
    a, b = reg.register_model("m", state(0)), reg.register_model("m", state(1))
    path = reg.blob_path(a.sha256)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="AES-GCM"):
        reg.load_state("m@1")
    report = reg.verify()
    assert any("AES-GCM" in p for p in report.problems)
    # a valid encrypted blob copied under another blob's name fails too (its name is authenticated)
    shutil.copy(reg.blob_path(b.sha256), path)
    with pytest.raises(IntegrityError, match="AES-GCM"):
        reg.get_blob(a.sha256)


def test_wrong_or_missing_key_cannot_read(tmp_path, monkeypatch):
    reg = Registry.create(tmp_path / "h")
    a = reg.register_model("m", state())
    shutil.rmtree(KeyRing.key_dir(tmp_path / "h"))
    monkeypatch.setenv(KEK_ENV, base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(IntegrityError, match="not loaded"):
        Registry(tmp_path / "h").get_blob(a.sha256)


def test_kek_from_the_environment_and_rotation(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv(KEK_ENV, base64.b64encode(key).decode())
    reg = Registry.create(tmp_path / "h")
    assert not list(KeyRing.key_dir(tmp_path / "h").glob("*.key"))  # nothing written next to the data
    arts = [reg.register_model("m", state(i)) for i in range(3)]
    before = {a.sha256: reg.blob_path(a.sha256).read_bytes() for a in arts}
    monkeypatch.delenv(KEK_ENV)
    with pytest.raises(NotFound, match="no key-encryption key"):
        Registry(tmp_path / "h").get_blob(arts[0].sha256)  # no key at all: nothing readable
    new = os.urandom(32)  # the new key goes first in the variable, the old one after it
    monkeypatch.setenv(KEK_ENV, f"{base64.b64encode(new).decode()},{base64.b64encode(key).decode()}")
    assert reg.rotate_kek().rewrapped == 3
    for a in arts:
        raw = reg.blob_path(a.sha256).read_bytes()
        assert raw != before[a.sha256] and raw[-100:] == before[a.sha256][-100:]  # only the header changed
        assert kek_id(new).encode() in raw[:40]
    monkeypatch.setenv(KEK_ENV, base64.b64encode(new).decode())  # the old key is gone
    fresh = Registry(tmp_path / "h")
    assert all(torch.equal(fresh.load_state(a)["w"], state(i)["w"]) for i, a in enumerate(arts))
    assert fresh.verify().ok
    monkeypatch.setenv(KEK_ENV, base64.b64encode(key).decode())
    with pytest.raises(IntegrityError):  # the old key no longer opens rotated blobs
        Registry(tmp_path / "h").get_blob(arts[0].sha256)


def test_verify_reports_a_malformed_database_instead_of_crashing(tmp_path):
    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", state())
    reg.close()
    db = tmp_path / "h" / "registry.db"
    for extra in ("-wal", "-shm"):
        (tmp_path / "h" / f"registry.db{extra}").unlink(missing_ok=True)
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IntegrityError, match="not a readable SQLite database"):
        Registry(tmp_path / "h")


def test_names_ending_in_a_newline_are_refused(tmp_path):
    reg = Registry.create(tmp_path / "h")
    with pytest.raises(ConfigError):
        reg.register_model("m\n", state())
    with pytest.raises(ConfigError):
        reg.resolve("m@1\n")


def test_a_corrupt_blob_of_the_same_size_is_repaired_on_rewrite(tmp_path):
    reg = Registry.create(tmp_path / "h", encrypt=False)
    a = reg.register_model("m", state())
    path = reg.blob_path(a.sha256)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    reg.put_blob(reg_bytes := bytes(raw[:100]) + bytes([raw[100] ^ 0xFF]) + bytes(raw[101:]))
    assert path.read_bytes() == reg_bytes and reg.verify().ok


def test_missing_blob_errors_do_not_leak_server_paths(tmp_path):
    reg = Registry.create(tmp_path / "h")
    a = reg.register_model("m", state())
    reg.blob_path(a.sha256).unlink()
    with pytest.raises(IntegrityError) as e:
        reg.get_blob(a.sha256)
    assert str(tmp_path) not in str(e.value)


def test_cli_verify_reports_a_malformed_database_and_rotate_key(tmp_path):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    home = str(tmp_path / "h")
    runner = CliRunner()
    assert runner.invoke(app, ["registry", "init", "--home", home]).exit_code == 0
    Registry(home).register_model("m", state())
    r = runner.invoke(app, ["registry", "rotate-key", "--home", home])
    assert r.exit_code == 0 and "1 blob re-wrapped" in r.output and "deleted old key files" in r.output
    assert runner.invoke(app, ["registry", "verify", "--home", home]).exit_code == 0
    for f in ("registry.db-wal", "registry.db-shm"):
        (tmp_path / "h" / f).unlink(missing_ok=True)
    (tmp_path / "h" / "registry.db").write_bytes(b"garbage" * 1000)
    r = runner.invoke(app, ["registry", "verify", "--home", home])
    assert r.exit_code == 1 and "not a readable SQLite database" in r.output


def test_a_registry_from_before_encryption_stays_plaintext(tmp_path):
    reg = Registry.create(tmp_path / "h", encrypt=False)
    reg.register_model("m", state())
    (tmp_path / "h" / "registry.json").unlink()  # as written by an older deltaplane: no file, no record
    con = sqlite3.connect(tmp_path / "h" / "registry.db")
    con.execute("DROP TABLE settings")
    con.close()
    again = Registry.create(tmp_path / "h")
    assert not again.encrypted and again.verify().ok


# -- the envelope, opened with the cryptography package from the documented layout ---------------------------
def _envelope(raw: bytes) -> dict:
    """b"DPEB" | u8 version | u8 kid_len | kid | wrap_nonce(12) | wrapped_dek(48) | nonce(12) | ciphertext+tag"""
    assert raw[:4] == b"DPEB" and raw[4] == 1
    off = 6 + raw[5]
    return {
        "kid": raw[6:off].decode(),
        "wrap_nonce": raw[off : off + 12],
        "wrapped": raw[off + 12 : off + 60],
        "nonce": raw[off + 60 : off + 72],
        "body": raw[off + 72 :],
    }


def _open(raw: bytes, kek: bytes, name: str) -> tuple[bytes, bytes]:
    """(data key, plaintext) of a sealed blob named ``name``, with AES-GCM from cryptography directly."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    e = _envelope(raw)
    dek = AESGCM(kek).decrypt(e["wrap_nonce"], e["wrapped"], b"deltaplane/kek-wrap/v1\x00" + name.encode())
    return dek, AESGCM(dek).decrypt(e["nonce"], e["body"], b"deltaplane/blob/v1\x00" + name.encode())


def test_a_blob_opens_with_cryptography_only_under_its_own_name(tmp_path, monkeypatch):
    import hashlib

    from cryptography.exceptions import InvalidTag

    kek = os.urandom(32)
    monkeypatch.setenv(KEK_ENV, base64.b64encode(kek).decode())
    reg = Registry.create(tmp_path / "h")
    a, b = reg.register_model("m", state(0)), reg.register_model("m", state(1))
    raw_a = reg.blob_path(a.sha256).read_bytes()
    _, plain = _open(raw_a, kek, a.sha256)
    assert hashlib.sha256(plain).hexdigest() == a.sha256 and plain == reg.read(a)
    assert _envelope(raw_a)["kid"] == kek_id(kek)
    with pytest.raises(InvalidTag):  # version 1's blob presented as version 2's: its name is the AAD
        _open(raw_a, kek, b.sha256)
    # the same move through the registry: version 2's row now finds version 1's (validly sealed) blob
    shutil.copy(reg.blob_path(a.sha256), reg.blob_path(b.sha256))
    with pytest.raises(IntegrityError, match="AES-GCM"):
        Registry(tmp_path / "h").load_state("m@2")


def test_every_blob_gets_its_own_data_key_and_a_rotation_reencrypts_nothing(tmp_path, monkeypatch):
    """AES-GCM must never see one (key, nonce) pair twice: each blob has a fresh random data key and nonce, a
    rotation re-wraps only the data key (fresh wrap nonce; the ciphertext, its key and nonce are unchanged), and
    a corrupt blob rewritten is sealed afresh."""
    from deltaplane.registry import state_to_bytes

    old, new = os.urandom(32), os.urandom(32)
    monkeypatch.setenv(KEK_ENV, base64.b64encode(old).decode())
    reg = Registry.create(tmp_path / "h")
    arts = [reg.register_model("m", state(i)) for i in range(12)]
    arts.append(reg.register_model("m", state(0)))  # the same weights again: one blob, sealed once
    assert len({a.sha256 for a in arts}) == 12
    before = {a.sha256: reg.blob_path(a.sha256).read_bytes() for a in arts}
    envs = {sha: _envelope(raw) for sha, raw in before.items()}
    deks = {sha: _open(raw, old, sha)[0] for sha, raw in before.items()}
    assert len(set(deks.values())) == 12
    assert len({e["nonce"] for e in envs.values()}) == 12
    assert len({e["wrap_nonce"] for e in envs.values()}) == 12  # 12 wraps under one KEK, 12 nonces
    monkeypatch.setenv(KEK_ENV, f"{base64.b64encode(new).decode()},{base64.b64encode(old).decode()}")
    assert reg.rotate_kek().rewrapped == 12
    for sha in before:
        after = reg.blob_path(sha).read_bytes()
        e = _envelope(after)
        assert (e["nonce"], e["body"]) == (envs[sha]["nonce"], envs[sha]["body"])
        assert e["kid"] == kek_id(new) and e["wrap_nonce"] != envs[sha]["wrap_nonce"]
        assert _open(after, new, sha)[0] == deks[sha]
    # a blob corrupted, then written again: sealed under a new data key and nonce, not the old pair reused
    sha = arts[0].sha256
    damaged = bytearray(reg.blob_path(sha).read_bytes())
    damaged[-1] ^= 1
    reg.blob_path(sha).write_bytes(bytes(damaged))
    monkeypatch.setenv(KEK_ENV, base64.b64encode(new).decode())
    fresh = Registry(tmp_path / "h")
    assert fresh.put_blob(fresh.read(arts[1])) == arts[1].sha256  # an intact blob is kept as it is
    assert fresh.blob_path(arts[1].sha256).read_bytes()[-64:] == before[arts[1].sha256][-64:]
    state_bytes = state_to_bytes(state(0))
    assert fresh.put_blob(state_bytes) == sha
    resealed = fresh.blob_path(sha).read_bytes()
    dek, plain = _open(resealed, new, sha)
    assert plain == state_bytes and dek != deks[sha] and _envelope(resealed)["nonce"] != envs[sha]["nonce"]


@pytest.mark.parametrize("edit", ["kid", "version", "truncated"])
def test_a_header_edited_to_name_another_key_or_format_is_a_typed_error(tmp_path, monkeypatch, edit):
    """The header's key id is not authenticated, but naming another loaded key only unwraps with the wrong
    key: an IntegrityError, as for a format or a length that is not the registry's."""
    a_key, b_key = os.urandom(32), os.urandom(32)
    monkeypatch.setenv(KEK_ENV, base64.b64encode(a_key).decode())
    reg = Registry.create(tmp_path / "h")
    art = reg.register_model("m", state())
    path = reg.blob_path(art.sha256)
    raw = path.read_bytes()
    if edit == "kid":
        raw = raw.replace(kek_id(a_key).encode(), kek_id(b_key).encode(), 1)
    elif edit == "version":
        raw = raw[:4] + b"\x02" + raw[5:]
    else:
        raw = raw[:80]
    path.write_bytes(raw)
    monkeypatch.setenv(KEK_ENV, f"{base64.b64encode(a_key).decode()},{base64.b64encode(b_key).decode()}")
    match = {
        "kid": "data key fails the AES-GCM tag",
        "version": "encryption format 2",
        "truncated": "truncated",
    }
    with pytest.raises(IntegrityError, match=match[edit]):
        Registry(tmp_path / "h").load_state("m@1")


def test_a_write_that_fails_midway_leaves_no_blob_and_no_temp_file(tmp_path, monkeypatch):
    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", state(0))
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "h" / "blobs").rglob("*") if p.is_file())

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        reg.register_model("m", state(1))
    monkeypatch.undo()
    assert (
        sorted(p.relative_to(tmp_path) for p in (tmp_path / "h" / "blobs").rglob("*") if p.is_file()) == files
    )
    assert [a.number for a in reg.versions("m")] == [1] and Registry(tmp_path / "h").verify().ok


def test_a_plaintext_registry_keeps_a_file_that_starts_with_the_envelope_magic(tmp_path):
    # an unencrypted registry took any blob starting with b"DPEB" as sealed and could not read it back (no key,
    # or not an envelope): whether blobs are encrypted is the registry's setting, signed in its state log
    import hashlib

    from deltaplane.registry import eventlog

    reg = Registry.create(tmp_path / "plain", encrypt=False)
    looks_sealed = b"DPEB\x01\x10" + bytes(range(256)) * 4  # what an envelope header starts with
    v = reg.register_model("m", state(), files={"tokenizer.model": looks_sealed})  # binary, any first bytes
    stored = reg.blob_path(hashlib.sha256(looks_sealed).hexdigest()).read_bytes()
    assert stored == looks_sealed  # on disk as given: this registry encrypts nothing
    again = Registry(tmp_path / "plain")
    assert again.load_files(again.get("m", v.number)) == {"tokenizer.model": looks_sealed}
    assert again.get_blob(hashlib.sha256(looks_sealed).hexdigest()) == looks_sealed
    assert again.verify().ok, again.verify().problems
    con = sqlite3.connect(tmp_path / "plain" / "registry.db")
    try:  # the setting is in the signed log, not only in registry.json and its copy in the database
        assert eventlog.replay(con, again.verifier).settings == {"encryption": "none"}
    finally:
        con.close()


def test_an_encrypted_registry_refuses_a_plaintext_blob_whatever_its_first_bytes(tmp_path):
    import hashlib

    reg = Registry.create(tmp_path / "enc")
    data = b"not sealed" * 10
    digest = reg.put_blob(data)
    reg.blob_path(digest).write_bytes(data)  # a plaintext file that hashes to its name, swapped in behind
    with pytest.raises(IntegrityError, match="stored in plaintext in an encrypted registry"):
        Registry(tmp_path / "enc").get_blob(digest)
    assert hashlib.sha256(data).hexdigest() == digest


def test_turning_encryption_off_behind_the_registry_is_caught_by_the_signed_setting(tmp_path):
    # registry.json and registry.db's settings row agree (the check at open passes), but the signed log says
    # encrypted: nothing is written in plaintext, and verify names the setting
    import json

    home = tmp_path / "enc"
    Registry.create(home).register_model("m", state())
    (home / "registry.json").write_text(json.dumps({"encryption": "none"}))
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    con.execute("UPDATE settings SET value='none' WHERE name='encryption'")
    con.close()
    reg = Registry(home)
    assert not reg.encrypted
    with pytest.raises(IntegrityError, match="signed state log says this registry's blobs are encrypted"):
        reg.put_blob(b"secret weights")
    assert any("records encryption 'none', but the signed state log says" in p for p in reg.verify().problems)
