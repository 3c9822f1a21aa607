"""An adversarial review's findings (session 37): long lineage chains, a registry.db edited behind the registry's
back (loops, columns of the wrong type, JSON the registry never writes, non-text signatures), lineage and
references JSON or int() cannot take, key files that are not files. Each: bounded time, a typed deltaplane error
naming what to fix, never a RecursionError / JSON / type traceback."""

import sqlite3
import sys
import threading

import pytest
import torch

from deltaplane.errors import IntegrityError
from deltaplane.registry import Governance, Registry, state_to_bytes


@pytest.fixture
def reg(tmp_path):
    return Registry.create(tmp_path / "home", encrypt=False)


def test_consent_walks_a_parent_chain_longer_than_the_recursion_limit(reg):
    # a service publishes one version per round, each the parent of the next: a long-lived model's chain
    # is longer than Python's recursion limit, and the consent walk must still reach its first version
    data = state_to_bytes({"w": torch.zeros(1)})
    first = reg.register_model("m", data, governance=Governance(cohorts=("eu",)))
    art = first
    for _ in range(sys.getrecursionlimit() + 50):
        art = reg.register_model("m", data, parent=art.number)
    assert reg.contributors(art) == {"eu"}
    assert reg.last_unaffected("m", art.number).number == art.number  # nothing withdrawn yet
    reg.withdraw_cohort("eu")
    assert reg.governance_problems(art, verify=True) == [f"{art.ref} was trained on withdrawn cohort 'eu'"]
    assert reg.last_unaffected("m", art.number) is None
    assert len(reg.affected_by("eu")) == art.number


def _run_bounded(fn, seconds: float = 20.0):
    """``fn()``'s result or exception, failing the test (not hanging it) if it runs longer than ``seconds``."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # handed to the test
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    return out


def test_a_parent_loop_written_into_registry_db_is_an_integrity_error_not_an_endless_walk(tmp_path):
    # rows can be inserted behind the registry's back (only UPDATE/DELETE are refused by triggers): a version
    # naming itself as its parent must not hang `lineage`, the rebuild's `last_unaffected` or the consent walk
    home = tmp_path / "home"
    reg = Registry.create(home, encrypt=False)
    reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    con = sqlite3.connect(home / "registry.db")
    with con:
        con.execute(
            "INSERT INTO artifacts (model, number, kind, sha256, size, parent, lineage, governance, signature, "
            "created_at) SELECT model, 2, kind, sha256, size, 2, lineage, governance, signature, created_at "
            "FROM artifacts WHERE number=1"
        )
    con.close()
    looped = reg.get("m", 2)
    for call in (lambda: reg.lineage(looped), lambda: reg.last_unaffected("m", 2)):
        out = _run_bounded(call)
        assert isinstance(out.get("error"), IntegrityError), out
        assert "m@2 names parent version 2" in str(out["error"])
    assert _run_bounded(lambda: reg.contributors(looped))["value"] == set()
    assert any("m@2" in p for p in reg.verify().problems)


def _nested(depth: int) -> dict:
    out: dict = {}
    cur = out
    for _ in range(depth - 1):
        cur["a"] = {}
        cur = cur["a"]
    return out


def test_lineage_json_cannot_store_is_a_config_error_and_nothing_is_registered(reg):
    from deltaplane.errors import ConfigError

    data = state_to_bytes({"w": torch.zeros(1)})
    for bad in (_nested(5000), {1: "a", "b": 2}):  # were RecursionError and TypeError
        with pytest.raises(ConfigError, match="lineage"):
            reg.register_model("m", data, lineage=bad)
    from deltaplane.registry.store import LINEAGE_DEPTH

    looped: dict = {}
    looped["self"] = looped
    for bad in (
        _nested(5000),
        _nested(LINEAGE_DEPTH + 1),
        {1: "a", "b": 2},
        looped,
        {"x": [[[_nested(70)]]]},
    ):
        with pytest.raises(ConfigError, match="lineage"):
            reg.register_model("m", data, lineage=bad)
    assert reg.versions() == []
    art = reg.register_model("m", data, lineage={"deep": _nested(LINEAGE_DEPTH - 1)})
    assert reg.get("m", art.number).lineage == {"deep": _nested(LINEAGE_DEPTH - 1)}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_lineage_nan_or_infinity_is_a_config_error_as_on_the_cli(reg, value):
    """The CLI's --lineage refuses NaN/Infinity; the Python API stored them (json writes the non-JSON 'NaN')."""
    from deltaplane.errors import ConfigError

    data = state_to_bytes({"w": torch.zeros(1)})
    with pytest.raises(ConfigError, match="lineage cannot be stored as JSON.*finite"):
        reg.register_model("m", data, lineage={"run": {"loss": [0.5, value]}})
    assert reg.versions() == []


def test_cli_lineage_nested_too_deeply_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from deltaplane.cli import app

    home = tmp_path / "home"
    Registry.create(home, encrypt=False)
    save_file({"w": torch.zeros(2)}, tmp_path / "s.safetensors")
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    args = [
        "registry",
        "register",
        "m",
        str(tmp_path / "s.safetensors"),
        "--home",
        str(home),
        "--lineage",
        deep,
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    assert "--lineage is nested too deeply" in out.output
    assert Registry(home).versions() == []


@pytest.mark.parametrize(
    "edit",
    [
        "lineage='{'",
        "lineage='" + '{"a":' * 3000 + "1" + "}" * 3000 + "'",
        "lineage='[1]'",
        "governance='[1]'",
        'governance=\'{"cohorts": "eu"}\'',
        "parent='abc'",
        "size='big'",
        "number='2x'",
    ],
)
def test_an_edited_artifact_row_is_reported_by_verify_and_refused_by_reads_never_a_traceback(tmp_path, edit):
    home = tmp_path / "home"
    reg = Registry.create(home, encrypt=False)
    reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    reg.register_model("m", state_to_bytes({"w": torch.ones(1)}), parent=1)
    con = sqlite3.connect(home / "registry.db")
    with con:
        con.execute("DROP TRIGGER artifacts_immutable_u")  # what someone editing the file can do
        con.execute(f"UPDATE artifacts SET {edit} WHERE id=2")
    con.close()
    reg = Registry(home)
    report = reg.verify()
    assert report.rows_checked == 2
    assert any("registry.db row 'm@2" in p and "edited" in p for p in report.problems), report.problems
    assert not any("m@1" in p for p in report.problems)  # the other row is still checked, and fine
    with pytest.raises(IntegrityError, match="registry.db row 'm@2"):
        reg.versions("m")
    assert reg.get("m", 1).number == 1


def test_a_state_log_signature_that_is_not_text_is_a_signature_error_not_a_traceback(tmp_path):
    from deltaplane.errors import SignatureError

    home = tmp_path / "home"
    reg = Registry.create(home, encrypt=False)
    reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    reg.set_tag("m", "production", 1)
    con = sqlite3.connect(home / "registry.db")
    with con:
        con.execute("DROP TRIGGER state_log_append_only_u")
        con.execute("UPDATE state_log SET signature=x'00ff' WHERE seq=(SELECT MAX(seq) FROM state_log)")
    con.close()
    reg = Registry(home)
    assert any("malformed signature" in p for p in reg.verify().problems)
    with pytest.raises(SignatureError, match="malformed signature"):
        reg.check_state()
    with pytest.raises(IntegrityError, match="malformed signature"):
        reg.repair_from_log()


@pytest.mark.parametrize("ref", ["m@" + "1" * 5000, "m:" + "t" * 5000, "m@" + "9" * 129, 7, None])
def test_an_overlong_or_non_text_reference_is_a_config_error(reg, ref):
    # 5,000 digits was a ValueError from int() (Python's limit on digits converted), and a long tag was
    # echoed whole in the NotFound message
    from deltaplane.errors import ConfigError

    reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    with pytest.raises(ConfigError, match="version reference must be") as info:
        reg.resolve(ref)
    assert len(str(info.value)) < 400


def test_a_state_log_entry_nested_past_json_depth_is_reported_by_the_unsigned_checks(tmp_path):
    # gc replays the log without signatures: an entry whose hash column was recomputed for deeply nested JSON
    # reached json.loads and raised RecursionError out of gc and verify(signatures=False)
    import hashlib

    home = tmp_path / "home"
    reg = Registry.create(home, encrypt=False)
    reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    reg.set_tag("m", "production", 1)
    text = '{"x":' * 5000 + "1" + "}" * 5000
    con = sqlite3.connect(home / "registry.db")
    with con:
        con.execute("DROP TRIGGER state_log_append_only_u")
        con.execute(
            "UPDATE state_log SET entry=?, sha256=? WHERE seq=(SELECT MAX(seq) FROM state_log)",
            (text, hashlib.sha256(text.encode()).hexdigest()),
        )
    con.close()
    reg = Registry(home)
    assert any("is malformed" in p for p in reg.verify(signatures=False).problems)
    assert reg.gc() == 0
    assert not reg.verify().ok  # with signatures: the entry's signature no longer matches its hash


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("UPDATE evaluations SET metrics='{'", "evaluation row 1 of m@1"),
        ("UPDATE evaluations SET metrics='" + "[" * 5000 + "]" * 5000 + "'", "evaluation row 1 of m@1"),
        ("UPDATE cards SET sha256=(SELECT sha256 FROM artifacts LIMIT 1)", "the model card of m@1"),
        ("UPDATE promotion_decisions SET reasons='{'", "promotion decision row 1"),
    ],
)
def test_an_edited_card_or_evaluation_row_is_an_integrity_error_not_a_decode_error(tmp_path, edit, match):
    # `registry show` printed a JSONDecodeError / RecursionError / UnicodeDecodeError traceback for these
    from deltaplane.registry import Tolerance, promote

    home = tmp_path / "home"
    reg = Registry.create(home)
    art = reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    promote(reg, "m@1", evaluator=lambda s: {"accuracy": 0.9}, tolerance=Tolerance({"accuracy": 0.01}))
    con = sqlite3.connect(home / "registry.db")
    with con:
        con.execute(edit)
    con.close()
    with pytest.raises(IntegrityError, match=match):
        reg.card(art)
        reg.evaluations(art)
        reg.promotion_decisions("m")


@pytest.mark.parametrize("special", ["fifo", "dir", "/dev/zero"])
def test_a_kek_file_that_is_not_a_regular_file_is_named_as_such_not_as_missing(
    tmp_path, monkeypatch, special
):
    # $DELTAPLANE_KEK_FILE naming a FIFO said "which does not exist": the operator was sent looking for a file
    # that is there
    import os

    from deltaplane.errors import ConfigError
    from deltaplane.registry.encryption import KeyRing

    home = tmp_path / "home"
    path = tmp_path / special
    if special == "fifo":
        os.mkfifo(path)
    elif special == "dir":
        path.mkdir()
    else:
        path = special
    monkeypatch.setenv("DELTAPLANE_KEK_FILE", str(path))
    with pytest.raises(ConfigError, match="must be a regular file"):
        KeyRing.load(home)


def test_model_bytes_whose_order_nests_past_the_recursion_limit_are_a_decode_error():
    """A safetensors file whose 'deltaplane.order' metadata is 100,000 nested lists raised RecursionError."""
    import torch
    from safetensors.torch import save

    from deltaplane.errors import DecodeError
    from deltaplane.registry.store import state_from_bytes

    data = save({"a": torch.zeros(2)}, metadata={"deltaplane.order": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(DecodeError, match="not a safetensors state dict: maximum recursion depth"):
        state_from_bytes(data)
