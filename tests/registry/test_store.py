import hashlib
import sqlite3

import pytest
import torch

from deltaplane.errors import ConfigError, IntegrityError, NotFound, SignatureError
from deltaplane.registry import Governance, Registry, Signer, init_keys, load_verifier, state_to_bytes


def model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 1, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 32, generator=g),
        "fc.bias": torch.randn(10, generator=g),
        "steps": torch.tensor(seed),
    }


@pytest.fixture
def reg(tmp_path):
    return Registry.create(tmp_path / "home")


def test_versions_lineage_tags_and_roundtrip(reg):
    a = reg.register_model("cnn", model_state(0), lineage={"round": 0})
    b = reg.register_model(
        "cnn",
        model_state(1),
        parent=a.number,
        lineage={"round": 1, "merge_config": {"m": "ties"}},
        governance=Governance(data_sources=("digits",), cohorts=("eu", "us")),
    )
    assert (a.number, b.number) == (1, 2)
    assert b.sha256 == hashlib.sha256(state_to_bytes(model_state(1))).hexdigest()
    assert [x.number for x in reg.lineage(b)] == [1]
    assert reg.get("cnn", 2).lineage["merge_config"] == {"m": "ties"}
    assert reg.get("cnn", 2).governance.cohorts == ("eu", "us")
    loaded = reg.load_state("cnn@2")
    assert list(loaded) == list(model_state(1)) and all(
        torch.equal(loaded[k], v) for k, v in model_state(1).items()
    )
    reg._move_tag("cnn", "production", 1, action="promote")
    reg._move_tag("cnn", "production.eu", 2, action="promote")
    assert reg.resolve("cnn:production").number == 1 and reg.resolve("cnn@latest").number == 2
    assert reg.tags("cnn") == {"production": 1, "production.eu": 2}
    with pytest.raises(NotFound, match="cnn@9 does not exist"):
        reg.resolve("cnn@9")
    with pytest.raises(ConfigError):
        reg.resolve("cnn")
    with pytest.raises(NotFound):
        reg.register_model("cnn", model_state(2), parent=7)


def test_a_tag_named_with_at_says_to_use_a_colon(reg):
    """Walking docs/fleet.md, `registry pull wine@training` (the tag the rounds move) said only "version number
    must be an integer"; it now names the reference that works."""
    reg.register_model("wine", model_state(0))
    reg.set_tag("wine", "training", 1)
    with pytest.raises(ConfigError, match="a tag is named with a colon: 'wine:training'$"):
        reg.resolve("wine@training")
    assert reg.resolve("wine:training").number == 1


def test_rows_are_immutable(reg):
    reg.register_model("cnn", model_state(0))
    con = sqlite3.connect(reg.home / "registry.db")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        con.execute("UPDATE artifacts SET sha256='x'")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        con.execute("DELETE FROM artifacts")


def test_tampered_blob_is_refused_and_verify_reports_it(reg):
    a = reg.register_model("cnn", model_state(0))
    path = reg.blob_path(a.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt|tampered"):
        reg.load_state("cnn@1")
    report = reg.verify()
    assert not report.ok and any("cnn@1" in p for p in report.problems)


def test_forged_signature_and_untrusted_key_are_refused(tmp_path):
    reg = Registry.create(tmp_path / "h")
    a = reg.register_model("cnn", model_state(0))
    # a registry row signed by another key (e.g. an attacker with database access) is refused on read
    evil = Registry(tmp_path / "h", signer=Signer.generate())
    b = evil.register_model("cnn", model_state(1))
    with pytest.raises(SignatureError, match="untrusted key"):
        reg.load_state(b)
    assert reg.load_state(a)["fc.bias"].shape == (10,)
    assert not reg.verify().ok
    # trusting the other key makes it verify
    (tmp_path / "h" / "keys" / "trusted").mkdir()
    import base64

    (tmp_path / "h" / "keys" / "trusted" / "evil.pub").write_bytes(base64.b64encode(evil.signer.public_raw))
    assert Registry(tmp_path / "h").verify().ok
    assert evil.signer.key_id in load_verifier(tmp_path / "h").key_ids


def test_keys_init_refuses_to_overwrite(tmp_path):
    s = init_keys(tmp_path)
    with pytest.raises(SignatureError, match="already exists"):
        init_keys(tmp_path)
    assert init_keys(tmp_path, overwrite=True).key_id != s.key_id
    assert oct((tmp_path / "keys" / "signing.ed25519.pem").stat().st_mode & 0o777) == "0o600"


def test_governance_withdrawal_and_cards(reg):
    a = reg.register_model(
        "cnn", model_state(0), governance={"cohorts": ["eu", "us"], "data_sources": ["digits"]}
    )
    b = reg.register_model("cnn", model_state(1), governance={"cohorts": ["us"], "excluded_cohorts": ["eu"]})
    affected = reg.withdraw_cohort("eu", reason="consent withdrawn")
    assert [x.ref for x in affected] == [a.ref]
    assert reg.governance_problems(a) and not reg.governance_problems(b)
    with pytest.raises(ConfigError, match="both"):
        Governance(cohorts=("x",), excluded_cohorts=("x",))
    reg.attach_card(b, {"model": "cnn", "version": 2, "metrics": {"accuracy": 0.9}})
    assert reg.card(b)["metrics"] == {"accuracy": 0.9} and reg.card(a) is None


def test_verify_reports_missing_blob_and_orphans(reg):
    a = reg.register_model("cnn", model_state(0))
    orphan = reg.put_blob(b"left behind by an interrupted write")
    report = reg.verify()
    assert report.ok and report.orphans == [orphan] and report.rows_checked == 1
    assert reg.gc(min_age_s=0) == 1 and reg.verify().orphans == []
    reg.blob_path(a.sha256).unlink()
    assert any("missing" in p for p in reg.verify().problems)


def test_open_without_registry_says_how_to_create(tmp_path):
    with pytest.raises(NotFound, match="registry init"):
        Registry(tmp_path / "nothing")


def test_blob_names_are_digests_and_a_crafted_order_is_a_decode_error(tmp_path):
    """blob_path built a path from any string ("../x" reached outside blobs/, and discard_blob deleted it);
    a safetensors file whose 'deltaplane.order' lists non-names raised a bare TypeError."""
    import json

    from safetensors.torch import save

    from deltaplane.errors import DecodeError

    reg = Registry.create(tmp_path / "home")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for name in ("../../victim.txt", "..//" + str(victim), "AB" * 32, "a" * 63):
        with pytest.raises(IntegrityError, match="not a blob name"):
            reg.discard_blob(name)
    assert victim.read_text() == "keep"
    data = save({"w": torch.zeros(3)}, metadata={"deltaplane.order": json.dumps([1, "w"])})
    with pytest.raises(DecodeError, match="deltaplane.order"):
        reg.register_model("m", data)


def test_a_registry_that_cannot_be_created_says_where_and_what_to_do(tmp_path):
    """A home under a file (or in /proc, or under a read-only folder) was a bare OSError ('[Errno 20] Not a
    directory', exit 1 from the CLI); it is a ConfigError naming the folder and the option to change."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        ConfigError, match=r"cannot create a registry at .*a-file/home: Not a directory; choose"
    ):
        Registry.create(tmp_path / "a-file" / "home")
