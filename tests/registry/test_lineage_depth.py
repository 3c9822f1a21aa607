"""Walks over a version's lineage (consent, rebuild base, ancestors) on chains of any length and on a
registry.db edited to hold a loop: bounded time, no RecursionError, a typed error where the data is wrong."""

import sys

import pytest
import torch

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
