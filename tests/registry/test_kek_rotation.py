"""Key rotation with other handles and processes at work, environment-supplied keys, and the encryption setting.

Each guarantee is checked against something the rotating handle does not control: a second Registry object, a
second process writing blobs during the rotation, a fresh Registry opened after the old keys are gone.
"""

import base64
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from deltaplane.errors import ConfigError, IntegrityError
from deltaplane.registry import Registry
from deltaplane.registry.encryption import KEK_ENV, KeyRing, kek_id


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.zeros(8)}


def key_files(home):
    return sorted(p.stem for p in KeyRing.key_dir(home).glob("*.key"))


# -- 1. rotation while other handles are open --------------------------------------------------------------
def test_a_second_handle_keeps_writing_and_reading_across_a_rotation(tmp_path):
    home = tmp_path / "h"
    rotating = Registry.create(home)
    other = Registry(home)  # e.g. the running service
    other.register_model("m", state(0))  # its key ring is loaded now, with the old key current
    rotating.register_model("m", state(1))
    old = key_files(home)
    rotating.rotate_kek()
    current = rotating.keyring.current
    assert key_files(home) == [current] and current not in old  # the old key is gone
    other.register_model("m", state(2))  # written by the stale handle after the rotation
    other.attach_card(other.get("m", 3), {"note": "after rotation"})
    # the stale handle reads what the rotation re-wrapped
    assert torch.equal(other.load_state("m@2")["w"], state(1)["w"])
    fresh = Registry(home)  # a restart: only the new key file exists
    for n in (1, 2, 3):
        assert torch.equal(fresh.load_state(f"m@{n}")["w"], state(n - 1)["w"])
    assert fresh.card(fresh.get("m", 3)) == {"note": "after rotation"}
    assert fresh.verify().ok


_WRITER = textwrap.dedent(
    """
    import os, sys
    from deltaplane.registry import Registry
    reg = Registry(sys.argv[1])
    for line in sys.stdin:
        for _ in range(int(line)):
            print(reg.put_blob(os.urandom(512)), flush=True)
        print("done", flush=True)
    """
)


def _read_until_done(proc, out):
    for line in proc.stdout:
        if line.strip() == "done":
            return
        out.append(line.strip())
    raise AssertionError(f"writer died: {proc.stderr.read()}")


def test_blobs_a_second_process_writes_before_during_and_after_a_rotation_stay_readable(tmp_path):
    home = tmp_path / "h"
    reg = Registry.create(home)
    mine = [reg.put_blob(os.urandom(512)) for _ in range(150)]  # so that the rotation takes a while
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    theirs: list[str] = []
    try:
        proc.stdin.write("20\n")
        proc.stdin.flush()
        _read_until_done(proc, theirs)  # before: the writer's key ring holds the old key as current
        proc.stdin.write("300\n")
        proc.stdin.flush()
        theirs.append(proc.stdout.readline().strip())  # it is writing now ...
        old = key_files(home)
        reg.rotate_kek()  # ... while this re-wraps
        _read_until_done(proc, theirs)
        proc.stdin.write("20\n")
        proc.stdin.flush()
        _read_until_done(proc, theirs)  # after
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert key_files(home) == [reg.keyring.current] and not set(old) & set(key_files(home))
    fresh = Registry(home)
    unreadable = []
    for sha in mine + theirs:
        try:
            fresh.get_blob(sha)
        except IntegrityError as exc:
            unreadable.append(str(exc))
    assert not unreadable, f"{len(unreadable)} of {len(mine + theirs)} blobs lost: {unreadable[:2]}"


# -- 2. rotation with keys from the environment ------------------------------------------------------------
def b64(*keys):
    return ",".join(base64.b64encode(k).decode() for k in keys)


def test_rotation_with_environment_keys_persists_and_says_what_to_remove(tmp_path, monkeypatch):
    home = tmp_path / "h"
    old, new = os.urandom(32), os.urandom(32)
    monkeypatch.setenv(KEK_ENV, b64(old))
    reg = Registry.create(home)
    reg.register_model("m", state(0))
    with pytest.raises(ConfigError, match=r"put the new key first in \$DELTAPLANE_KEK"):
        reg.rotate_kek(new)  # a key file would lose to the environment after a restart
    assert not key_files(home)
    monkeypatch.setenv(KEK_ENV, b64(new, old))  # the operator's step: new key first, old one after it
    restarted = Registry(home)
    restarted.register_model("m", state(1))
    rotation = restarted.rotate_kek()
    assert rotation.current == kek_id(new) and rotation.retired == (kek_id(old),)
    assert rotation.rewrapped == 1 and not key_files(home)  # m@2 already used the new key; no file written
    assert "remove them from $DELTAPLANE_KEK" in rotation.advice and kek_id(old) in rotation.advice
    monkeypatch.setenv(KEK_ENV, b64(new))  # the old key removed from the variable, then a restart
    fresh = Registry(home)
    assert fresh.keyring.current == kek_id(new)  # the rotation persisted
    for n in (1, 2):
        assert torch.equal(fresh.load_state(f"m@{n}")["w"], state(n - 1)["w"])
    # a process still started with only the old key must not seal new blobs with it
    monkeypatch.setenv(KEK_ENV, b64(old))
    with pytest.raises(ConfigError, match="retired"):
        Registry(home).put_blob(b"written by a stale process")


def test_kek_file_variable_with_several_keys_and_moving_from_key_files(tmp_path, monkeypatch):
    home = tmp_path / "h"
    reg = Registry.create(home)  # a key file first
    reg.register_model("m", state(0))
    first = key_files(home)
    new, spare = os.urandom(32), os.urandom(32)
    keyfile = tmp_path / "kek.txt"
    keyfile.write_text(f"{b64(new)}\n{b64(spare)}\n")
    monkeypatch.setenv("DELTAPLANE_KEK_FILE", str(keyfile))
    with pytest.raises(ConfigError, match=r"first in \$DELTAPLANE_KEK_FILE"):
        Registry(home).rotate_kek(os.urandom(32))
    rotation = Registry(home).rotate_kek()
    assert rotation.current == kek_id(new) and rotation.removed_files == (f"{first[0]}.key",)
    assert "DELTAPLANE_KEK_FILE" in rotation.advice and not key_files(home)
    keyfile.write_text(b64(new))
    assert torch.equal(Registry(home).load_state("m@1")["w"], state(0)["w"])


def test_cli_rotate_key_with_environment_keys(tmp_path):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    home = str(tmp_path / "h")
    old, new = os.urandom(32), os.urandom(32)
    runner = CliRunner()
    assert runner.invoke(app, ["registry", "init", "--home", home], env={KEK_ENV: b64(old)}).exit_code == 0
    (tmp_path / "new.key").write_text(b64(new))
    r = runner.invoke(
        app,
        ["registry", "rotate-key", "--home", home, "--key-file", str(tmp_path / "new.key")],
        env={KEK_ENV: b64(old)},
    )
    assert r.exit_code != 0 and "first in $DELTAPLANE_KEK" in " ".join(r.output.split())
    r = runner.invoke(app, ["registry", "rotate-key", "--home", home], env={KEK_ENV: b64(new, old)})
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and f"with key {kek_id(new)}" in out and "remove them from $DELTAPLANE_KEK" in out


# -- 3. the encryption setting cannot be dropped with registry.json ----------------------------------------
def recorded(home):
    con = sqlite3.connect(home / "registry.db")
    try:
        return con.execute("SELECT value FROM settings WHERE name='encryption'").fetchone()
    finally:
        con.close()


def test_deleting_or_editing_registry_json_does_not_turn_encryption_off(tmp_path):
    home = tmp_path / "h"
    Registry.create(home).register_model("m", state(0))
    settings = home / "registry.json"
    settings.unlink()
    with pytest.raises(ConfigError, match=r"registry.json is missing.*'aes-256-gcm'.*restore it"):
        Registry(home)
    with pytest.raises(ConfigError, match="is missing"):
        Registry.create(home)  # `registry init` again neither
    assert not settings.exists()  # ... nor writes a plaintext setting
    settings.write_text(json.dumps({"encryption": "none"}))
    with pytest.raises(ConfigError, match="cannot be changed by editing the file"):
        Registry(home)
    settings.write_text(json.dumps({"encryption": "aes-256-gcm"}))  # restored as the message says
    reg = Registry(home)
    a = reg.register_model("m", state(1))
    assert reg.encrypted and reg.blob_path(a.sha256).read_bytes()[:4] == b"DPEB" and reg.verify().ok


def test_a_registry_from_before_the_recorded_setting_gets_it_from_registry_json(tmp_path):
    enc, plain = tmp_path / "enc", tmp_path / "plain"
    Registry.create(enc).register_model("m", state(0))
    Registry.create(plain, encrypt=False).register_model("m", state(0))
    for home in (enc, plain):  # as an older deltaplane left them
        con = sqlite3.connect(home / "registry.db")
        con.execute("DROP TABLE IF EXISTS settings")
        con.close()
    assert Registry(enc).encrypted and not Registry(plain).encrypted
    assert recorded(enc) == ("aes-256-gcm",) and recorded(plain) == ("none",)
    (enc / "registry.json").unlink()
    with pytest.raises(ConfigError, match="is missing"):
        Registry(enc)


def test_a_registry_from_before_encryption_opens_as_plaintext(tmp_path):
    home = tmp_path / "h"
    Registry.create(home, encrypt=False).register_model("m", state(0))
    (home / "registry.json").unlink()  # neither the file nor the record existed then
    con = sqlite3.connect(home / "registry.db")
    con.execute("DROP TABLE settings")
    con.close()
    old = Registry(home)
    assert not old.encrypted and old.verify().ok
    b = old.register_model("m", state(1))
    assert b"deltaplane.order" in old.blob_path(b.sha256).read_bytes()
    assert not Registry.create(home).encrypted and recorded(home) == ("none",)


def test_a_rotation_streams_each_blob_and_the_result_opens_with_cryptography_directly(tmp_path, monkeypatch):
    # rotate_kek read every blob whole (and copied it twice more): peak memory was three times the largest
    # blob (3.1 GiB for a 1 GiB blob). It now reads a header and copies the ciphertext in chunks.
    import hashlib
    import tracemalloc

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from deltaplane.registry import store

    old_kek, new_kek = os.urandom(32), os.urandom(32)
    monkeypatch.setenv(KEK_ENV, base64.b64encode(old_kek).decode())
    reg = Registry.create(tmp_path / "h")
    data = os.urandom(1 << 20) * 24  # 24 MiB
    digest = reg.put_blob(data)
    sealed = reg.blob_path(digest).read_bytes()
    monkeypatch.setenv(KEK_ENV, ",".join(base64.b64encode(k).decode() for k in (new_kek, old_kek)))
    monkeypatch.setattr(store, "_COPY_CHUNK", 256 << 10, raising=False)
    reg = Registry(tmp_path / "h")
    tracemalloc.start()
    try:
        assert reg.rotate_kek().rewrapped == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"the rotation allocated {peak / 2**20:.1f} MiB at its peak for a 24 MiB blob"
    raw = reg.blob_path(digest).read_bytes()
    klen = raw[5]
    off = 6 + klen
    assert raw[6:off].decode() == kek_id(new_kek) and raw[off + 60 :] == sealed[sealed[5] + 6 + 60 :]
    dek = AESGCM(new_kek).decrypt(
        raw[off : off + 12], raw[off + 12 : off + 60], b"deltaplane/kek-wrap/v1\x00" + digest.encode()
    )
    plain = AESGCM(dek).decrypt(
        raw[off + 60 : off + 72], raw[off + 72 :], b"deltaplane/blob/v1\x00" + digest.encode()
    )
    assert hashlib.sha256(plain).hexdigest() == digest
    monkeypatch.setenv(KEK_ENV, base64.b64encode(new_kek).decode())  # the old key is no longer needed
    assert Registry(tmp_path / "h").get_blob(digest) == data
