"""``deltaplane.wording.count``: the noun of a count in the number it takes."""

from __future__ import annotations

import pytest

from deltaplane.wording import count


@pytest.mark.parametrize(
    ("n", "words", "text"),
    [
        (1, ("device",), "1 device"),
        (0, ("device",), "0 devices"),
        (2, ("device",), "2 devices"),
        (1, ("identity", "identities"), "1 identity"),
        (3, ("identity", "identities"), "3 identities"),
        (1, ("orphan blob",), "1 orphan blob"),
    ],
)
def test_count_takes_the_singular_for_one_only(n: int, words: tuple[str, ...], text: str) -> None:
    assert count(n, *words) == text
