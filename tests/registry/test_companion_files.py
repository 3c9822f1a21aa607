"""A version's companion files (tokenizer, generation config): stored, signed through the lineage, given back.

``registry register`` of a Hugging Face folder used to keep only the weights and config.json, so a pulled
MiniLM had no tokenizer and ``deploy`` on it needed ``--tokenizer``. The files are now blobs named in the signed
lineage; these tests pin what may be carried, that edits are caught, and that gc keeps them.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch

from deltaplane.errors import ConfigError, DecodeError, IntegrityError, SignatureError
from deltaplane.registry import Registry
from deltaplane.shards import COMPANION_FILES, read_companion_files

TOKENIZER = {"vocab.txt": b"[PAD]\n[UNK]\nhello\n", "tokenizer_config.json": b'{"do_lower_case": true}'}


def _registry(tmp_path: Path) -> Registry:
    return Registry.create(tmp_path / "home", encrypt=False)


def test_files_come_back_byte_for_byte_and_gc_keeps_them(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    art = reg.register_model("m", {"w": torch.ones(2)}, files=TOKENIZER)
    assert set(art.lineage["files"]) == set(TOKENIZER)
    assert art.lineage["files"]["vocab.txt"]["bytes"] == len(TOKENIZER["vocab.txt"])
    assert reg.load_files(reg.resolve("m@1")) == TOKENIZER
    report = reg.verify()
    assert report.ok and report.orphans == [], report.problems
    assert reg.gc(min_age_s=0) == 0
    assert reg.load_files(reg.resolve("m@1")) == TOKENIZER
    # a version registered without files (every version made before the registry carried them) has none
    old = reg.register_model("m", {"w": torch.zeros(2)})
    assert "files" not in old.lineage and reg.load_files(old) == {}


@pytest.mark.parametrize(
    "name", ["../evil.txt", "/tmp/evil", "model.safetensors", "config.json", "sub/vocab.txt"]
)
def test_register_refuses_a_file_the_registry_does_not_carry(tmp_path: Path, name: str) -> None:
    reg = _registry(tmp_path)
    with pytest.raises(ConfigError, match="not files the registry carries"):
        reg.register_model("m", {"w": torch.ones(2)}, files={name: b"x"})
    assert reg.versions() == []


def test_a_lineage_may_not_set_files_itself(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    with pytest.raises(ConfigError, match="lineage key 'files' is the registry's"):
        reg.register_model("m", {"w": torch.ones(2)}, lineage={"files": {"vocab.txt": {"sha256": "0" * 64}}})
    with pytest.raises(ConfigError, match="lineage key 'files' is the registry's"):  # not silently replaced
        reg.register_model("m", {"w": torch.ones(2)}, lineage={"files": "mine"}, files=TOKENIZER)
    assert reg.versions() == []


def _edit_lineage(home: Path, lineage: dict) -> None:
    con = sqlite3.connect(home / "registry.db")
    with con:
        con.execute("DROP TRIGGER IF EXISTS artifacts_immutable_u")  # what someone editing the file can do
        con.execute("UPDATE artifacts SET lineage=? WHERE id=1", (json.dumps(lineage),))
    con.close()


def test_an_edited_file_entry_is_refused_path_or_hash(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    art = reg.register_model("m", {"w": torch.ones(2)}, files=TOKENIZER)
    entry = art.lineage["files"]["vocab.txt"]
    # a traversal name is not a file the registry carries: never written (an older release's own lineage
    # 'files' reads the same way), and the edit is caught by the signature over the lineage
    _edit_lineage(reg.home, {"files": {"../../evil.txt": entry}})
    reg = Registry(reg.home)
    assert reg.load_files(reg.resolve("m@1")) == {}
    with pytest.raises(SignatureError):
        reg.load_state(reg.resolve("m@1"))
    assert not reg.verify().ok
    # a companion name with a malformed hash: the registry's shape, not what it writes
    _edit_lineage(reg.home, {"files": {"vocab.txt": {"sha256": "../evil", "bytes": 3}}})
    reg = Registry(reg.home)
    with pytest.raises(IntegrityError, match="not an entry the registry writes"):
        reg.load_files(reg.resolve("m@1"))
    assert any("not an entry the registry writes" in p for p in reg.verify().problems)
    # a well-formed entry pointing at other bytes: the signature over the lineage no longer verifies
    other = reg.put_blob(b"other vocabulary\n")
    _edit_lineage(reg.home, {**art.lineage, "files": {"vocab.txt": {"sha256": other, "bytes": 17}}})
    reg = Registry(reg.home)
    with pytest.raises(SignatureError):
        reg.load_files(reg.resolve("m@1"))


def test_a_tampered_file_blob_is_refused(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    art = reg.register_model("m", {"w": torch.ones(2)}, files=TOKENIZER)
    reg.blob_path(art.lineage["files"]["vocab.txt"]["sha256"]).write_bytes(b"[PAD]\n[UNK]\nhellO\n")
    with pytest.raises(IntegrityError):
        reg.load_files(art)
    assert not reg.verify().ok


def test_read_companion_files_takes_only_known_names_inside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in TOKENIZER.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not a tokenizer file")
    assert read_companion_files(folder) == TOKENIZER
    assert list(read_companion_files(folder)) == [n for n in COMPANION_FILES if n in TOKENIZER]
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", folder / "merges.txt")
    with pytest.raises(DecodeError, match="link leading outside"):
        read_companion_files(folder)
    (folder / "merges.txt").unlink()
    os.mkfifo(folder / "merges.txt")  # would hang an unbounded reader
    with pytest.raises(DecodeError, match="regular file"):
        read_companion_files(folder)
