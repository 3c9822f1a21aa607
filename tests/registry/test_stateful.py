"""The registry under random sequences of operations, against a plain-Python model of what it must hold.

Hypothesis drives registrations (with parents, sources and cohorts), tag moves, rollbacks, consent withdrawals,
key rotations, garbage collection, model cards and re-opening the registry from disk, in any order. After every
step the registry must agree with the model: every version's bytes, parent and contributing cohorts (walked
through parents *and* sources, transitively), every tag, which versions a withdrawal blocks, the rollback stack,
and a clean ``verify`` whose signed log still contains every head seen before (nothing rewritten).

40 runs of up to 25 steps here (a few seconds); ``DP_STATEFUL_EXAMPLES=1000`` searches longer. Checked against
planted bugs: a rollback stack that pushes the version a rollback returns to again is found (with 300 runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests.conftest import stateful_settings

from deltaplane.errors import NotFound, PromotionRefused
from deltaplane.registry import Registry
from deltaplane.registry.promotion import rollback

MODELS = ("alpha", "beta")
TAGS = ("production", "staging")
COHORTS = ("c1", "c2", "c3")


@dataclass
class Version:
    value: float  # the state is {"w": full((3,), value)}
    parent: int | None
    own: frozenset[str]
    sources: tuple[tuple[str, int], ...] = ()


@dataclass
class Model:
    """What the registry must hold, kept without the registry's code."""

    versions: dict[str, list[Version]] = field(default_factory=lambda: {m: [] for m in MODELS})
    tags: dict[tuple[str, str], int] = field(default_factory=dict)
    stacks: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # the tag's promotion stack
    withdrawn: set[str] = field(default_factory=set)

    def contributors(self, model: str, number: int) -> set[str]:
        v = self.versions[model][number - 1]
        out = set(v.own)
        if v.parent is not None:
            out |= self.contributors(model, v.parent)
        for m, n in v.sources:
            out |= self.contributors(m, n)
        return out


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        self.home = self._tmp.name
        self.reg = Registry.create(self.home)
        self.model = Model()
        self.heads: list[str] = []
        self.counter = 0

    def teardown(self) -> None:
        self.reg.close()
        self._tmp.cleanup()

    def _existing(self, data, model: str | None = None) -> tuple[str, int] | None:
        choices = [
            (m, n) for m in MODELS if model in (None, m) for n in range(1, len(self.model.versions[m]) + 1)
        ]
        return data.draw(st.sampled_from(choices)) if choices else None

    @rule(
        data=st.data(),
        model=st.sampled_from(MODELS),
        cohorts=st.sets(st.sampled_from(COHORTS), max_size=2),
        with_parent=st.booleans(),
        with_source=st.booleans(),
    )
    def register(self, data, model, cohorts, with_parent, with_source) -> None:
        parent = self._existing(data, model) if with_parent else None
        source = self._existing(data) if with_source else None
        self.counter += 1
        value = float(self.counter)
        art = self.reg.register_model(
            model,
            {"w": torch.full((3,), value)},
            parent=parent[1] if parent else None,
            governance={"cohorts": sorted(cohorts)},
            sources=[f"{source[0]}@{source[1]}"] if source else (),
        )
        versions = self.model.versions[model]
        versions.append(
            Version(value, parent[1] if parent else None, frozenset(cohorts), (source,) if source else ())
        )
        assert art.number == len(versions)

    @rule(data=st.data(), tag=st.sampled_from(TAGS))
    def set_tag(self, data, tag) -> None:
        target = self._existing(data)
        if target is None:
            return
        model, number = target
        self.reg._move_tag(model, tag, number, action="promote")
        self.model.tags[(model, tag)] = number
        stack = self.model.stacks.setdefault((model, tag), [])
        if not stack or stack[-1] != number:  # a move onto the version the tag holds changes nothing
            stack.append(number)

    @rule(model=st.sampled_from(MODELS), tag=st.sampled_from(TAGS))
    def roll_back(self, model, tag) -> None:
        stack = self.model.stacks.get((model, tag), [])
        if len(stack) < 2:
            with pytest.raises(NotFound):
                rollback(self.reg, model, tag=tag)
            return
        if self.model.contributors(model, stack[-2]) & self.model.withdrawn:
            # never back onto a version that may not be served (nothing moves)
            with pytest.raises(PromotionRefused):
                rollback(self.reg, model, tag=tag)
            return
        got = rollback(self.reg, model, tag=tag)
        stack.pop()
        assert got.number == stack[-1]
        self.model.tags[(model, tag)] = stack[-1]
        # a device on any newer version may follow the rollback: the signed record covers them all
        newest = len(self.model.versions[model])
        assert self.reg.rollback_record(model, stack[-1], newest) is not None

    @rule(cohort=st.sampled_from(COHORTS))
    def withdraw(self, cohort) -> None:
        affected = self.reg.withdraw_cohort(cohort)
        self.model.withdrawn.add(cohort)
        expected = {
            (m, n)
            for m in MODELS
            for n in range(1, len(self.model.versions[m]) + 1)
            if cohort in self.model.contributors(m, n)
        }
        assert {(a.model, a.number) for a in affected} == expected

    @rule()
    def rotate_key(self) -> None:
        self.reg.rotate_kek()

    @rule()
    def collect_garbage(self) -> None:
        assert self.reg.gc(min_age_s=0) == 0  # nothing here is an orphan

    @precondition(lambda self: any(self.model.versions.values()))
    @rule(data=st.data())
    def attach_card(self, data) -> None:
        model, number = self._existing(data)
        card = {"note": f"card {self.counter}"}
        self.reg.attach_card(self.reg.get(model, number), card)
        assert self.reg.card(self.reg.get(model, number)) == card

    @rule()
    def reopen(self) -> None:
        self.reg.close()
        self.reg = Registry(self.home)

    @invariant()
    def holds_what_was_written(self) -> None:
        for m in MODELS:
            versions = self.model.versions[m]
            assert [a.number for a in self.reg.versions(m)] == list(range(1, len(versions) + 1))
            for n, v in enumerate(versions, start=1):
                art = self.reg.get(m, n)
                assert art.parent == v.parent
                assert torch.equal(self.reg.load_state(art)["w"], torch.full((3,), v.value))
                contributors = self.model.contributors(m, n)
                assert self.reg.contributors(art) == contributors
                assert bool(self.reg.governance_problems(art, verify=True)) == bool(
                    contributors & self.model.withdrawn
                )
            assert self.reg.tags(m, verify=True) == {
                t: n for (mm, t), n in self.model.tags.items() if mm == m
            }
        assert self.reg.withdrawn_cohorts(verify=True) == self.model.withdrawn

    @invariant()
    def verifies_with_every_earlier_head(self) -> None:
        report = self.reg.verify()
        assert report.ok, report.problems
        for head in self.heads[-3:]:  # a head seen before is still in the log: nothing was rewritten
            assert self.reg.verify(signatures=False, expect_head=head).ok
        if report.log_head is not None and report.log_head not in self.heads:
            self.heads.append(report.log_head)


RegistryMachine.TestCase.settings = stateful_settings(40, 25)
test_registry_under_random_operations = RegistryMachine.TestCase
