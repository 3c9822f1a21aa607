"""Companion files (tokenizer, generation config) along a version's lineage.

A fleet round's model, a fine-tune registered with ``--parent`` and a deploy artifact registered back all lost
the tokenizer their parent was registered with, so pulling them gave a folder ``deploy`` refused. Versions from
an older release whose own lineage used the key ``files`` must keep verifying and pulling.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.errors import SignatureError
from deltaplane.registry import Registry, publish_update, state_to_bytes

TOKENIZER = {"vocab.txt": b"[PAD]\n[UNK]\nhello\n", "tokenizer_config.json": b'{"do_lower_case": true}'}
STATE = {"w": torch.ones(4, 4), "b": torch.zeros(4)}


def _registry(tmp_path: Path) -> Registry:
    return Registry.create(tmp_path / "home", encrypt=False)


def _blobs(reg: Registry) -> set[str]:
    return {p.name for p in (reg.home / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"}


def test_a_child_inherits_its_parents_files_unless_given_its_own(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    v1 = reg.register_model("m", STATE, files=TOKENIZER)
    stored = _blobs(reg)
    v2 = reg.register_model("m", {"w": torch.full((4, 4), 2.0), "b": torch.zeros(4)}, parent=v1.number)
    assert v2.lineage["files"] == v1.lineage["files"] and reg.load_files(v2) == TOKENIZER
    assert len(_blobs(reg) - stored) == 1  # v2's weights; the files are the same blobs, nothing copied
    # a fleet round publishes its model through publish_update: it keeps the tokenizer too
    v3, _ = publish_update(
        reg, "m", v2.number, Delta({"w": 0.1 * torch.ones(4, 4)}), compressor=Compressor("quant(bits=8)")
    )
    assert reg.load_files(v3) == TOKENIZER
    own = {"vocab.txt": b"[PAD]\nother\n"}
    assert reg.load_files(reg.register_model("m", STATE, parent=v3.number, files=own)) == own
    assert (
        "files" not in reg.register_model("m", STATE, parent=v3.number, files={}).lineage
    )  # explicitly none
    assert reg.verify().ok and reg.gc(min_age_s=0) == 0


def test_a_parent_entry_edited_into_the_database_is_not_inherited(tmp_path: Path) -> None:
    """The child's signature would cover what it inherits: an edited parent row must not come out signed."""
    reg = _registry(tmp_path)
    v1 = reg.register_model("m", STATE, files=TOKENIZER)
    other = reg.put_blob(b"[PAD]\nplanted\n")
    lineage = {**v1.lineage, "files": {"vocab.txt": {"sha256": other, "bytes": 14}}}
    con = sqlite3.connect(reg.home / "registry.db")
    with con:
        con.execute("DROP TRIGGER IF EXISTS artifacts_immutable_u")
        con.execute("UPDATE artifacts SET lineage=? WHERE id=1", (json.dumps(lineage),))
    con.close()
    reg = Registry(reg.home)
    with pytest.raises(SignatureError):
        reg.register_model("m", STATE, parent=1)
    assert [a.ref for a in reg.versions()] == ["m@1"]


@pytest.mark.parametrize(
    "theirs", [["train.csv", "eval.csv"], 3, {"train.csv": {"sha256": "ab" * 32, "bytes": 10}}, {}]
)
def test_an_older_releases_own_files_lineage_still_verifies_and_pulls(tmp_path, registry_cli, theirs) -> None:
    """Before the registry carried companion files, ``register_model`` took a user lineage with ``files``
    (the older release inserted it as given, signed): such a version has no companion files."""
    cli = registry_cli
    reg = _registry(tmp_path)
    old = reg._insert(  # what the older release's register_model did with lineage={"files": ...}
        model="m",
        kind="model",
        data=state_to_bytes(STATE),
        parent=None,
        base=None,
        target=None,
        codec=None,
        lineage={"files": theirs, "round": 1},
        governance=None,
    )
    assert reg.load_files(old) == {}
    report = reg.verify()
    assert report.ok, report.problems
    out = tmp_path / "pulled"
    r = cli("registry", "pull", "m@1", "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    child = reg.register_model("m", STATE, parent=1)  # nothing to inherit
    assert "files" not in child.lineage and reg.load_files(child) == {}
