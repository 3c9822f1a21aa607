import hashlib

import pytest
import torch

from deltaplane.errors import NotFound, PromotionRefused
from deltaplane.registry import Registry, Tolerance, promote, rollback
from deltaplane.registry.promotion import production_stack


def prune(state, keep: float):
    out = {}
    for k, v in state.items():
        thresh = v.abs().flatten().kthvalue(max(1, int((1 - keep) * v.numel()))).values
        out[k] = torch.where(v.abs() > thresh, v, torch.zeros_like(v))
    return out


def test_gate_blocks_over_pruned_model_and_rollback_is_byte_identical(tmp_path, train, evaluate):
    reg = Registry.create(tmp_path / "h")
    weak = reg.register_model("digits", train(12))
    good = reg.register_model("digits", train(600), parent=weak.number)
    better = reg.register_model("digits", train(1200), parent=good.number)
    pruned_state = prune(train(1200), keep=0.05)
    pruned = reg.register_model(
        "digits", pruned_state, parent=better.number, lineage={"deploy_recipe": "prune 95%"}
    )

    first = promote(reg, weak.ref, evaluator=evaluate)  # no production yet: promoted on its own numbers
    assert first.promoted and first.baseline_metrics is None
    r = promote(reg, good.ref, evaluator=evaluate)
    assert r.promoted and r.candidate_metrics["accuracy"] > 0.85 > 0.6 > r.baseline_metrics["accuracy"]
    r2 = promote(
        reg, better.ref, evaluator=evaluate, tolerance=Tolerance({"accuracy": 0.01, "ood_accuracy": 0.02})
    )
    with pytest.raises(PromotionRefused, match="accuracy drops by") as info:
        promote(reg, pruned.ref, evaluator=evaluate)
    assert "REFUSED" in str(info.value)
    assert reg.tag("digits", "production") == better.number  # the refused model never went live
    # the refusal is measured, not assumed: the pruned model really is worse on the clean test set
    res = promote(reg, pruned.ref, evaluator=evaluate, raise_on_refusal=False)
    assert res.candidate_metrics["accuracy"] < res.baseline_metrics["accuracy"] - 0.01
    assert len(reg.evaluations(pruned)) == 2
    card = reg.card(
        reg.get("digits", better.number)
    )  # promotion attaches a model card with the gate's metrics
    assert card["metrics"] == r2.candidate_metrics and card["evaluation"]["promoted_to"] == "production"
    assert reg.card(pruned) is None

    before = reg.get_blob(reg.get("digits", good.number).sha256)
    back = rollback(reg, "digits")
    assert back.number == good.number and reg.tag("digits", "production") == good.number
    restored = reg.read(reg.resolve("digits:production"))
    assert restored == before and hashlib.sha256(restored).hexdigest() == good.sha256
    assert rollback(reg, "digits").number == weak.number  # a second rollback goes one further back
    assert production_stack(reg, "digits") == [weak.number]
    with pytest.raises(NotFound, match="no previous version"):
        rollback(reg, "digits")


def test_gate_refuses_ood_regression_and_withdrawn_cohort(tmp_path, train, evaluate):
    reg = Registry.create(tmp_path / "h")
    prod = reg.register_model("digits", train(600))
    reg._move_tag("digits", "production", prod.number, action="promote")
    cand = reg.register_model("digits", train(1200, seed=1), governance={"cohorts": ["eu"]})

    calls = []

    def evaluator(state):
        calls.append(1)
        m = evaluate(state)
        # the candidate (evaluated first) is reported with a collapsed OOD accuracy
        return {**m, "ood_accuracy": m["ood_accuracy"] - 0.2} if len(calls) == 1 else m

    with pytest.raises(PromotionRefused, match="ood_accuracy drops"):
        promote(reg, cand.ref, evaluator=evaluator)
    reg.withdraw_cohort("eu")
    with pytest.raises(PromotionRefused, match="withdrawn cohort 'eu'"):
        promote(reg, cand.ref, evaluator=evaluate)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "n/a", None])
def test_gate_blocks_non_finite_metrics(tmp_path, train, evaluate, bad):
    reg = Registry.create(tmp_path / "h")
    good = reg.register_model("digits", train(600))
    promote(reg, good.ref, evaluator=evaluate)
    cand = reg.register_model("digits", train(1200), parent=good.number)

    def broken(state):
        return {**evaluate(state), "accuracy": bad}

    res = promote(reg, cand.ref, evaluator=broken, raise_on_refusal=False)
    assert not res.promoted and "not a finite number" in res.regressions[0]
    assert reg.tag("digits", "production") == good.number
    # no baseline yet: a NaN first promotion is blocked too
    other = reg.register_model("fresh", train(600))
    with pytest.raises(PromotionRefused, match="accuracy"):
        promote(reg, other.ref, evaluator=broken)


def test_gate_blocks_a_missing_metric(tmp_path, train, evaluate):
    reg = Registry.create(tmp_path / "h")
    good = reg.register_model("digits", train(600))
    promote(reg, good.ref, evaluator=evaluate)
    cand = reg.register_model("digits", train(1200), parent=good.number)
    res = promote(reg, cand.ref, evaluator=lambda s: {"accuracy": 0.99}, raise_on_refusal=False)
    assert not res.promoted and "returned no 'ood_accuracy'" in res.regressions[0]


def _three_productions(home) -> Registry:
    reg = Registry.create(home)
    for i in range(3):
        v = reg.register_model("m", {"w": torch.full((2,), float(i))})
        reg._move_tag("m", "production", v.number, action="promote")
    return reg


def test_a_failed_rollback_record_leaves_the_tag_and_its_history(tmp_path, monkeypatch):
    """The tag move and the signed rollback record are one transaction: no moved tag without its record."""
    reg = _three_productions(tmp_path / "h")
    history = reg.tag_history("m", "production")

    def broken_sign(context):
        raise OSError("signing key unreadable")

    monkeypatch.setattr(reg.signer, "sign", broken_sign)
    with pytest.raises(OSError, match="signing key unreadable"):
        rollback(reg, "m")
    fresh = Registry(tmp_path / "h")  # another connection sees what was committed
    assert fresh.tag("m", "production") == 3
    assert fresh.tag_history("m", "production") == history
    assert fresh.rollback_record("m", 2, 3) is None


def test_concurrent_rollbacks_each_pop_one_version(tmp_path, monkeypatch):
    """Two rollbacks at once (two registry handles, as two processes) go two versions back, not twice to one.

    Each computation of the stack waits (briefly) for the other one: before the fix both computed the same
    stack and both moved the tag to version 2.
    """
    import contextlib
    import threading

    from deltaplane.registry import promotion

    _three_productions(tmp_path / "h")
    meet = threading.Barrier(2, timeout=1.5)
    real = promotion.production_stack

    def slow_stack(registry, model, tag="production"):
        stack = real(registry, model, tag)
        # with the fix the other rollback is blocked on the write lock: this wait times out
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait()
        return stack

    monkeypatch.setattr(promotion, "production_stack", slow_stack)
    got: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            got.append(rollback(Registry(tmp_path / "h"), "m").number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(got) == [1, 2]
    assert Registry(tmp_path / "h").tag("m", "production") == 1


def test_a_promotion_card_states_its_evaluator_and_data_and_drift_not_measured(tmp_path, train, evaluate):
    """The card said nothing of which evaluator and data produced its metrics, filed promoted_to under lineage
    and left drift blank."""
    from deltaplane.monitor import ModelCard

    reg = Registry.create(tmp_path / "h")
    first = reg.register_model("digits", train(600), lineage={"round": 3})
    promote(
        reg, first.ref, evaluator=evaluate, evaluator_name="tests:evaluate", evaluation_data="held-out 20%"
    )
    cand = reg.register_model("digits", train(1200), parent=first.number)

    def scored(state):
        return evaluate(state)

    scored.data = "digits test split, noisy copy for OOD"  # what an evaluator declares, like .tolerance
    promote(reg, cand.ref, evaluator=scored)
    card = reg.card(cand)
    assert "promoted_to" not in card["lineage"] and card["lineage"]["parent"] == first.number
    ev = card["evaluation"]
    assert ev["data"] == scored.data and "scored" in ev["evaluator"] and ev["promoted_to"] == "production"
    assert ev["compared_with"] == first.ref and "accuracy may drop by at most 0.01" in ev["gate"]
    assert card["drift"]["status"] == "not measured"
    first_card = reg.card(first)
    assert first_card["evaluation"]["data"] == "held-out 20%" and first_card["lineage"] == {
        "parent": None,
        "round": 3,
    }
    md = ModelCard.from_dict(card).to_markdown()
    assert "- data: digits test split" in md and "- not measured" in md
    assert "## Lineage\n- parent: 1\n\n" in md  # the tag it moved is not lineage


def test_a_failed_card_attach_leaves_the_tag_unmoved(tmp_path, train, evaluate, monkeypatch):
    """The card was attached after the tag moved, outside a transaction: a failed attach left a promoted
    version with no card. Now the move and the card are one transaction."""
    reg = Registry.create(tmp_path / "h")
    first = reg.register_model("digits", train(600))
    promote(reg, first.ref, evaluator=evaluate)
    cand = reg.register_model("digits", train(1200), parent=first.number)
    history = reg.tag_history("digits", "production")

    def broken_attach(artifact, card):
        raise OSError("disk full")

    monkeypatch.setattr(reg, "attach_card", broken_attach)
    with pytest.raises(OSError, match="disk full"):
        promote(reg, cand.ref, evaluator=evaluate)
    fresh = Registry(tmp_path / "h")  # what was committed, seen from another connection
    assert fresh.tag("digits", "production") == first.number
    assert fresh.tag_history("digits", "production") == history and fresh.card(cand) is None
    fresh.check_state(model="digits", tag="production")  # the signed state log agrees with the tags


def test_a_tag_moved_by_another_process_during_the_evaluation_is_not_overwritten(tmp_path, train, evaluate):
    """Two promotions at once: each gate read the tag before evaluating. The one finishing second compared its
    candidate with a version the tag no longer held, and moved the tag over the other's promotion anyway."""
    from deltaplane.errors import Conflict

    reg = Registry.create(tmp_path / "h")
    prod = reg.register_model("digits", train(300))
    reg._move_tag("digits", "production", prod.number, action="promote")
    strong = reg.register_model("digits", train(1200), parent=prod.number)
    weaker = reg.register_model("digits", train(600, seed=1), parent=prod.number)
    other = Registry(tmp_path / "h")  # another process's connection

    def evaluator(state):
        if not getattr(evaluator, "raced", False):  # while this gate evaluates, the other one finishes
            evaluator.raced = True
            promote(other, strong.ref, evaluator=evaluate)
        return evaluate(state)

    with pytest.raises(Conflict, match=rf"moved to v{strong.number} while .* evaluated against {prod.ref}"):
        promote(reg, weaker.ref, evaluator=evaluator)
    assert reg.tag("digits", "production") == strong.number  # the other promotion stands
    assert reg.card(weaker) is None
    assert [d["candidate"] for d in reg.promotion_decisions("digits")] == [strong.number]
    assert promote(reg, weaker.ref, evaluator=evaluate, raise_on_refusal=False).baseline_metrics is not None


def test_a_cohort_withdrawn_during_the_evaluation_stops_the_promotion(tmp_path, train, evaluate):
    reg = Registry.create(tmp_path / "h")
    cand = reg.register_model("digits", train(600), governance={"cohorts": ["eu"]})
    other = Registry(tmp_path / "h")

    def evaluator(state):
        other.withdraw_cohort("eu")
        return evaluate(state)

    with pytest.raises(PromotionRefused, match="withdrawn cohort 'eu'"):
        promote(reg, cand.ref, evaluator=evaluator)
    with pytest.raises(NotFound):
        reg.tag("digits", "production")


def test_a_forged_tag_history_is_refused_before_anything_is_evaluated(tmp_path):
    """Before: a tag_history row written straight into registry.db let promote() run the evaluator and record
    verdicts for both versions, and only the tag move was refused (a deleted withdrawal was refused up front)."""
    import sqlite3

    from deltaplane.errors import IntegrityError

    reg = Registry.create(tmp_path / "h")
    reg.register_model("m", {"w": torch.zeros(2)})
    reg.register_model("m", {"w": torch.ones(2)}, parent=1)
    reg._move_tag("m", "production", 1, action="promote")
    con = sqlite3.connect(tmp_path / "h" / "registry.db", isolation_level=None)
    con.execute(
        "INSERT INTO tag_history (model, tag, number, previous, action, reason, at) "
        "VALUES ('m', 'production', 1, 2, 'rollback', '', 0)"
    )
    con.close()
    reg = Registry(tmp_path / "h")
    calls = []

    def evaluator(state):
        calls.append(1)
        return {"accuracy": 1.0, "ood_accuracy": 1.0}

    with pytest.raises(IntegrityError, match="tag_history|history"):
        promote(reg, "m@2", evaluator=evaluator)
    assert calls == [] and reg.evaluations(reg.get("m", 2)) == [] and reg.evaluations(reg.get("m", 1)) == []


def test_promoting_the_version_the_tag_holds_again_does_not_make_rollback_a_no_op(tmp_path):
    # promote m@2 twice (a re-check after an evaluator change): rollback must still go back to m@1, not "roll
    # back" from m@2 to m@2 and sign a rollback record for it
    from deltaplane.registry import Registry, Tolerance, promote, rollback, state_to_bytes

    reg = Registry.create(tmp_path / "home", encrypt=False)
    for i in range(2):
        reg.register_model("m", state_to_bytes({"w": torch.full((1,), float(i))}))
    gate = {"evaluator": lambda s: {"accuracy": 0.9}, "tolerance": Tolerance({"accuracy": 0.01})}
    for ref in ("m@1", "m@2", "m@2"):
        promote(reg, ref, **gate)
    reg._move_tag("m", "production", 2, action="promote")  # a move onto the same version: no new stack entry
    assert production_stack(reg, "m") == [1, 2]
    assert rollback(reg, "m").number == 1
    assert reg.tag("m", "production", verify=True) == 1
    with pytest.raises(NotFound, match="no previous version"):
        rollback(reg, "m")


@pytest.mark.parametrize("to", ["../prod", "prod uction", "", "x" * 129])
def test_a_tag_no_move_could_name_is_refused_before_the_evaluator_runs(tmp_path, to):
    from deltaplane.errors import ConfigError
    from deltaplane.registry import state_to_bytes

    reg = Registry.create(tmp_path / "home", encrypt=False)
    art = reg.register_model("m", state_to_bytes({"w": torch.zeros(1)}))
    calls = []

    def evaluate(state):
        calls.append(1)
        return {"accuracy": 0.9}

    with pytest.raises(ConfigError, match="tag must be"):
        promote(reg, "m@1", to=to, evaluator=evaluate, tolerance=Tolerance({"accuracy": 0.01}))
    assert calls == [] and reg.evaluations(art) == [] and reg.promotion_decisions("m") == []


# -- every way onto a gated tag (production, production.<cohort>) passes the gate or is refused ----------------
def _two_versions(tmp_path, *, cohorts=()):
    """m@1 (accuracy 0.9 under _scored) in production through the gate, m@2 (accuracy 0.5) registered."""
    reg = Registry.create(tmp_path / "home", encrypt=False)
    reg.register_model("m", {"w": torch.full((2,), 0.9)})
    reg.register_model("m", {"w": torch.full((2,), 0.5)}, parent=1, governance={"cohorts": list(cohorts)})
    promote(reg, "m@1", evaluator=_scored)
    return reg


def _scored(state):
    s = float(state["w"].mean())
    return {"accuracy": s, "ood_accuracy": s}


@pytest.mark.parametrize("tag", ["production", "production.eu", "production.EU", "production.eu-west.2"])
def test_set_tag_cannot_move_a_gated_tag_around_the_gate(tmp_path, tag):
    # production.<cohort> is what that cohort's devices are served before production (serve/app.py resolve_tag)
    reg = _two_versions(tmp_path)
    history = reg.tag_history("m", "production")
    with pytest.raises(PromotionRefused, match="promot"):
        reg.set_tag("m", tag, 2)
    assert reg.tags("m", verify=True) == {"production": 1}
    assert reg.tag_history("m", "production", verify=True) == history
    reg.set_tag("m", "staging", 2)  # an ungated tag still moves without the gate
    assert reg.tags("m", verify=True) == {"production": 1, "staging": 2}


@pytest.mark.parametrize("action", ["promote", "rollback"])
@pytest.mark.parametrize("tag", ["production", "production.eu", "staging"])
def test_set_tag_cannot_claim_the_gates_action(tmp_path, tag, action):
    # set_tag(action="promote") used to skip every check of the gate: a worse m@2 went to production unevaluated
    reg = _two_versions(tmp_path)
    with pytest.raises(PromotionRefused, match=f"set_tag.action='{action}'. is refused"):
        reg.set_tag("m", tag, 2, action=action)
    assert reg.tags("m", verify=True) == {"production": 1}
    assert [h["action"] for h in reg.tag_history("m", "production", verify=True)] == ["promote"]
    assert reg.evaluations(reg.get("m", 2)) == []  # nothing was recorded as if the gate had run


@pytest.mark.parametrize(
    "tag", ["production ", " production", "production\n", "prоduction", "production\u200b", "production/eu"]
)
def test_a_look_alike_of_production_is_no_tag_at_all(tmp_path, tag):
    # whitespace, a Cyrillic 'о', a zero-width space: refused by name, before anything is written
    from deltaplane.errors import ConfigError

    reg = _two_versions(tmp_path)
    with pytest.raises(ConfigError, match="tag must be"):
        reg.set_tag("m", tag, 2)
    with pytest.raises(ConfigError, match="tag must be"):
        promote(reg, "m@2", to=tag, evaluator=_scored)
    assert reg.tags("m", verify=True) == {"production": 1}


def test_a_cohorts_first_production_is_gated_against_what_that_cohort_is_served(tmp_path):
    # until production.eu exists, eu devices run production (m@1, accuracy 0.9): m@2 (0.5) used to be gated
    # against nothing and promoted to production.eu, a 0.4 drop for every eu device
    reg = _two_versions(tmp_path)
    res = promote(reg, "m@2", to="production.eu", evaluator=_scored, raise_on_refusal=False)
    # production.eu held nothing: m@1 is what it was gated against, not what it held
    assert not res.promoted and res.previous is None and res.compared_with == "m@1 (production)"
    assert "stays at nothing" in res.summary() and "gated against m@1 (production)" in res.summary()
    assert reg.promotion_decisions("m")[-1]["previous"] is None
    assert any("accuracy drops by 0.4000" in r for r in res.regressions), res.regressions
    assert "production.eu" not in reg.tags("m", verify=True)
    # a candidate as good as production passes, and from then on production.eu is gated against its own holder
    reg.register_model("m", {"w": torch.full((2,), 0.95)}, parent=1)
    first = promote(reg, "m@3", to="production.eu", evaluator=_scored)
    assert first.promoted and first.previous is None and first.compared_with == "m@1 (production)"
    assert "promoted to m:production.eu (it held nothing)" in first.summary()
    assert reg.card(reg.get("m", 3))["evaluation"]["compared_with"] == "m@1"
    reg.register_model("m", {"w": torch.full((2,), 0.96)}, parent=1)
    then = promote(reg, "m@4", to="production.eu", evaluator=_scored)
    assert then.previous == "m@3" and then.compared_with == "m@3 (production.eu)"
    assert "gated against" not in then.summary()
    assert reg.tags("m", verify=True) == {"production": 1, "production.eu": 4}


def test_a_cohorts_first_production_is_not_taken_when_production_moved_meanwhile(tmp_path):
    from deltaplane.errors import Conflict

    reg = _two_versions(tmp_path)
    reg.register_model("m", {"w": torch.full((2,), 0.95)}, parent=1)

    def moving(state):  # production moves while the candidate is evaluated against m@1
        if reg.tag_history("m", "production")[-1]["number"] != 3:
            promote(reg, "m@3", evaluator=_scored)
        return _scored(state)

    with pytest.raises(Conflict, match="m:production moved to v3"):
        promote(reg, "m@1", to="production.eu", evaluator=moving)
    assert reg.tags("m", verify=True) == {"production": 3}


def test_the_first_production_may_be_placed_but_not_with_a_withdrawn_cohort(tmp_path):
    reg = Registry.create(tmp_path / "home", encrypt=False)
    reg.register_model("m", {"w": torch.zeros(2)}, governance={"cohorts": ["eu"]})
    reg.register_model("m", {"w": torch.ones(2)}, governance={"cohorts": ["us"]})
    reg.withdraw_cohort("eu")
    with pytest.raises(PromotionRefused, match="withdrawn cohort 'eu'"):
        reg.set_tag("m", "production", 1)
    assert reg.tags("m") == {}
    reg.set_tag("m", "production", 2)  # a new model's initial version: nothing to gate it against
    assert reg.tags("m", verify=True) == {"production": 2}
