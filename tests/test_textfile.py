"""The one bounded reader of config, manifest, settings, tokenizer and report files (deltaplane.textfile)."""

import errno
import os
import stat
import threading

import pytest

from deltaplane.errors import ConfigError, DecodeError
from deltaplane.textfile import read_bounded_text


def _returns(fn, *args):
    """Run ``fn(*args)`` in a thread; its exception, or a failure if it is still blocked after 10 s."""
    out: list[BaseException | None] = []

    def go() -> None:
        try:
            fn(*args)
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), f"{fn.__name__} blocked on a FIFO with no writer"
    return out[0]


def test_read_bounded_text_limits_and_kinds(tmp_path):
    f = tmp_path / "a.json"
    f.write_bytes(b"x" * 100)
    assert read_bounded_text(f, limit=100, what="thing") == "x" * 100
    with pytest.raises(ConfigError, match="101 bytes, over the 100 bytes limit for a thing"):
        f.write_bytes(b"x" * 101)
        read_bounded_text(f, limit=100, what="thing")
    with pytest.raises(DecodeError, match="not UTF-8 text"):
        f.write_bytes(b"\xff")
        read_bounded_text(f, limit=100, what="thing", error=DecodeError)
    with pytest.raises(ConfigError, match="cannot read thing"):
        read_bounded_text(tmp_path / "missing", limit=100, what="thing")


def test_json_files_are_read_bounded_and_a_fifo_is_refused(tmp_path, monkeypatch):
    # report.json, a registry's settings, a deploy folder's manifest and a tokenizer were read whole with
    # read_text(): a FIFO with no writer hung each of them
    from deltaplane.deploy.bundle import _folder_manifest
    from deltaplane.merging.output import _chat_template, _vocabulary
    from deltaplane.registry.store import SETTINGS_NAME, Registry
    from deltaplane.report import load_report

    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    exc = _returns(load_report, fifo)
    assert isinstance(exc, ConfigError) and "regular file, not a FIFO" in str(exc)
    exc = _returns(_folder_manifest, fifo, "0" * 64)
    assert isinstance(exc, DecodeError) and "manifest must be a regular file" in str(exc)
    home = tmp_path / "reg"
    home.mkdir()
    (home / "registry.db").touch()  # the settings are read before the database is opened
    os.mkfifo(home / SETTINGS_NAME)
    exc = _returns(Registry, home)
    assert isinstance(exc, ConfigError) and "registry settings file must be a regular file" in str(exc)
    # a tokenizer file over its limit is refused (it was read whole); within it, read as before
    import deltaplane.merging.output as output

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"chat_template": "' + "x" * 64 + '"}')
    monkeypatch.setattr(output, "TOKENIZER_LIMIT", 64)
    with pytest.raises(ConfigError, match="over the 64 bytes limit for a tokenizer config"):
        _chat_template(tok)
    monkeypatch.setattr(output, "TOKENIZER_LIMIT", 2**20)
    assert _chat_template(tok) == "x" * 64
    # per-kind limits: a report over its limit is refused naming it
    import deltaplane.report.writer as writer

    monkeypatch.setattr(writer, "REPORT_LIMIT", 10)
    big = tmp_path / "big.json"
    big.write_text('{"format": 1, "runs": []}')
    with pytest.raises(ConfigError, match="over the 10 bytes limit for a report"):
        load_report(big)
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    assert _vocabulary(tok) is not None


def test_peft_config_run_record_and_index_are_read_bounded(tmp_path, monkeypatch):
    # adapter_config.json and a run's model.json were read whole with read_text()
    import deltaplane.adapters.peft_format as peft_format
    import deltaplane.commands.ops as ops
    from deltaplane.errors import AdapterError

    (tmp_path / "adapter_config.json").write_text('{"r": 8, "padding": "' + "x" * 200 + '"}')
    monkeypatch.setattr(peft_format, "MANIFEST_LIMIT", 100)
    with pytest.raises(AdapterError, match="over the 100 bytes limit for a PEFT adapter config"):
        peft_format._read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "model.json").write_text('{"kind": "deltaplane-run", "pad": "' + "x" * 200 + '"}')
    monkeypatch.setattr(ops, "MANIFEST_LIMIT", 100)
    with pytest.raises(ConfigError, match="over the 100 bytes limit for a run record"):
        ops._run_output(tmp_path)


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EOPNOTSUPP])
def test_no_overwrite_secret_write_works_where_hard_links_are_refused(tmp_path, monkeypatch, refusal):
    """``write_secret_file(replace=False)`` links its temp file to the target so an existing one is never
    replaced. A filesystem without hard links (vfat/exFAT on a USB key, some FUSE and SMB mounts) refuses link(2)
    with EPERM or EOPNOTSUPP: every `keys certify`, `keys identity` and `fleet enroll` then failed there, after
    `fleet enroll` had issued its tokens. It falls back to creating the target itself with O_EXCL: still 0600
    from creation, still never over an existing file, no temp file left."""
    from deltaplane.textfile import write_secret_file

    def no_links(src, dst, *args, **kwargs):
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "link", no_links)
    key = tmp_path / "device-0.identity.pem"
    write_secret_file(key, b"secret", replace=False)
    assert key.read_bytes() == b"secret" and stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        write_secret_file(key, b"other", replace=False)
    assert key.read_bytes() == b"secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-0.identity.pem"]
