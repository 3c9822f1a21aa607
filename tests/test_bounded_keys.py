"""Key, trusted-key and token files are read bounded (`deltaplane.textfile.KEY_LIMIT`, regular files only).

They were read whole with read_text/read_bytes: a FIFO named as `--trusted`, as a `*.pub` in a registry's
`keys/trusted/`, or as a device's `--token-file` blocked the command for good, and a multi-GiB file was read
into memory. Each test runs the read in a thread (`tests.test_textfile._returns`) so a hang fails it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.test_textfile import _returns
from typer.testing import CliRunner

from deltaplane.errors import ConfigError
from deltaplane.registry.signing import load_trusted_keys, load_verifier


def test_a_fifo_as_the_trusted_keys_pin_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "keys.pub")
    err = _returns(load_trusted_keys, tmp_path / "keys.pub")
    assert isinstance(err, ConfigError) and "must be a regular file, not a FIFO" in str(err), err


def test_a_fifo_among_a_homes_trusted_keys_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keys" / "trusted").mkdir(parents=True)
    os.mkfifo(tmp_path / "keys" / "trusted" / "peer.pub")
    err = _returns(load_verifier, tmp_path)
    assert isinstance(err, ConfigError) and "peer.pub" in str(err) and "FIFO" in str(err), err


def test_an_oversized_trusted_keys_file_is_refused_naming_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "keys.pub"
    with big.open("wb") as f:
        f.truncate((1 << 20) + 1)  # sparse: no disk used
    with pytest.raises(ConfigError, match="over the 1 MiB limit"):
        load_trusted_keys(big)


def test_a_fifo_as_a_devices_token_file_is_refused(tmp_path: Path) -> None:
    from deltaplane import cli

    os.mkfifo(tmp_path / "device.token")
    (tmp_path / "fed.yaml").write_text("clients: {count: 2, rounds: 1}\n")
    (tmp_path / "signing.pub").write_text("")  # never reached: the token is read first
    args = ["fleet", "device", "--url", "https://127.0.0.1:9", "--token-file", str(tmp_path / "device.token"),
            "--federation", str(tmp_path / "fed.yaml"), "--device", "0", "--model", "cnn",
            "--trusted", str(tmp_path / "signing.pub")]  # fmt: skip
    results: list = []
    assert _returns(lambda: results.append(CliRunner().invoke(cli.app, args))) is None
    (r,) = results
    assert r.exit_code != 0 and "must be a regular file, not a FIFO" in " ".join(r.output.split()), r.output


def _keys_tls(out: Path, *extra: str):
    from deltaplane import cli

    results: list = []
    assert (
        _returns(
            lambda: results.append(CliRunner().invoke(cli.app, ["keys", "tls", "--out", str(out), *extra]))
        )
        is None
    )
    (r,) = results
    return r.exit_code, " ".join(r.output.split())


def test_a_fifo_as_the_tls_ca_key_is_refused(tmp_path: Path) -> None:
    """`deltaplane keys tls` over a folder with a CA read ca.key whole: a FIFO there blocked it for good."""
    assert _keys_tls(tmp_path / "t")[0] == 0
    (tmp_path / "t" / "ca.key").unlink()
    os.mkfifo(tmp_path / "t" / "ca.key")
    code, out = _keys_tls(tmp_path / "t")
    assert code == 2 and "must be a regular file, not a FIFO" in out, out


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("garbage-key", "ca.key is not an unencrypted PEM private key"),
        ("garbage-cert", "ca.pem is not a PEM certificate"),
        ("no-key", "ca.pem exists but"),
        ("no-cert", "ca.key exists but"),
        ("other-cert", "ca.pem is not the certificate of"),
    ],
)
def test_a_damaged_tls_ca_is_refused_not_replaced_or_used(tmp_path: Path, damage: str, says: str) -> None:
    """A CA that cannot be used gave a traceback (not PEM), a bare 'No such file' (no ca.pem), certificates no
    device could verify (a ca.pem of another key), or, with ca.key gone, a new CA written over the ca.pem every
    device trusts. Each is refused, the files are left as they were, and --force still makes a new CA."""
    t = tmp_path / "t"
    assert _keys_tls(t)[0] == 0
    if damage == "garbage-key":
        (t / "ca.key").write_text("garbage")
    elif damage == "garbage-cert":
        (t / "ca.pem").write_text("garbage")
    elif damage == "no-key":
        (t / "ca.key").unlink()
    elif damage == "no-cert":
        (t / "ca.pem").unlink()
    else:
        assert _keys_tls(tmp_path / "other")[0] == 0
        (t / "ca.pem").write_bytes((tmp_path / "other" / "ca.pem").read_bytes())
    before = {p.name: p.read_bytes() for p in t.iterdir()}
    code, out = _keys_tls(t)
    assert code == 2 and says in out and "--force" in out, out
    assert {p.name: p.read_bytes() for p in t.iterdir()} == before
    code, out = _keys_tls(t, "--force")
    assert code == 0, out


def test_a_fifo_as_the_services_device_secret_is_refused(tmp_path: Path) -> None:
    from deltaplane.serve.auth import device_secret

    (tmp_path / "keys").mkdir()
    os.mkfifo(tmp_path / "keys" / "device-secret")
    err = _returns(device_secret, tmp_path)
    assert isinstance(err, ConfigError) and "must be a regular file, not a FIFO" in str(err), err


@pytest.mark.parametrize("name", ["extra.key", "retired.json"])
def test_a_fifo_among_a_registrys_key_encryption_keys_is_refused(tmp_path: Path, name: str) -> None:
    """An encrypted registry read every `keys/kek/*.key` (and the retired-key list) whole at each open: a FIFO
    there blocked every command on the registry for good."""
    import torch

    from deltaplane.registry import Registry
    from deltaplane.registry.encryption import KeyRing

    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", {"w": torch.ones(3)})
    os.mkfifo(KeyRing.key_dir(tmp_path / "h") / name)
    err = _returns(lambda: Registry(tmp_path / "h").load_state("m@1"))
    assert isinstance(err, ConfigError) and name in str(err) and "not a FIFO" in str(err), err


def test_a_key_file_removed_while_the_ring_loads_is_skipped(tmp_path: Path, monkeypatch) -> None:
    """A rotation's clean-up may delete an old key file between the listing and the read: skipped, as before."""
    import torch

    from deltaplane.registry import Registry
    from deltaplane.registry.encryption import KeyRing

    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", {"w": torch.ones(3)})
    gone = KeyRing.key_dir(tmp_path / "h") / "gone.key"
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [*real_glob(self, pattern), gone])
    assert torch.equal(Registry(tmp_path / "h").load_state("m@1")["w"], torch.ones(3))


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_fifo_or_an_overlong_file_as_a_registry_blob_is_refused_not_read(
    tmp_path: Path, encrypt: bool
) -> None:
    """Registry blobs were read whole: a FIFO in a blob's place blocked every reader of that version (and
    `registry verify`) for good, and a file grown to any size was read into memory before its hash refused it.
    A blob must be a regular file no longer than its artifact's recorded size (and the envelope)."""
    import torch

    from deltaplane.errors import IntegrityError
    from deltaplane.registry import Registry

    reg = Registry.create(tmp_path / "h", encrypt=encrypt)
    art = reg.register_model("m", {"w": torch.ones(3)})
    blob = reg.blob_path(art.sha256)
    blob.unlink()
    os.mkfifo(blob)
    err = _returns(lambda: Registry(tmp_path / "h").load_state("m@1"))
    assert isinstance(err, IntegrityError) and "not a regular file" in str(err), err
    report: list = []
    assert _returns(lambda: report.append(Registry(tmp_path / "h").verify())) is None
    assert not report[0].ok and any("not a regular file" in p for p in report[0].problems), report[0].problems
    blob.unlink()
    with blob.open("wb") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse: reading it whole would exhaust memory
    with pytest.raises(IntegrityError, match=f"more than the {art.size} recorded for it"):
        Registry(tmp_path / "h").load_state("m@1")
    problems = Registry(tmp_path / "h").verify().problems
    assert sum(f"more than the {art.size} recorded for it" in p for p in problems) == 2, problems


def test_registry_verify_reads_an_orphan_no_further_than_the_longest_blob_it_records(tmp_path: Path) -> None:
    """An orphan blob (no row records its size) was read whole by `registry verify`; one longer than every blob
    the registry records and than 64 MiB is none of its blobs, and is named without being read."""
    import torch

    from deltaplane.registry import Registry

    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", {"w": torch.ones(3)})
    sha = "ab" * 32
    orphan = reg.blob_path(sha)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    with orphan.open("wb") as f:
        f.truncate((64 << 20) + 8192)  # sparse
    report = Registry(tmp_path / "h").verify()
    assert any(f"blob {sha} holds {(64 << 20) + 8192} bytes, more than any blob this registry records" in p
               for p in report.problems), report.problems  # fmt: skip


def test_registry_verify_bounds_a_model_cards_blob_too(tmp_path: Path) -> None:
    """A model card's blob records no size; verify read it whole. It is bounded like an orphan's, and a card
    of ordinary size still verifies."""
    import torch

    from deltaplane.registry import Registry

    reg = Registry.create(tmp_path / "h")
    art = reg.register_model("m", {"w": torch.ones(3)})
    sha = reg.attach_card(art, {"intended_use": "x" * 10_000})  # larger than the model itself
    assert Registry(tmp_path / "h").verify().ok
    with reg.blob_path(sha).open("r+b") as f:
        f.truncate((64 << 20) + 8192)
    problems = Registry(tmp_path / "h").verify().problems
    assert any(f"blob {sha} holds {(64 << 20) + 8192} bytes, more than any blob" in p for p in problems), (
        problems
    )
