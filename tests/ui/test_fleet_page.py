"""The Fleet page's drift table, rendered from the service's state (no browser, no service)."""

from __future__ import annotations

import re
from html import unescape

from deltaplane.ui.pages import fleet_page


def _row(html: str, feature: str) -> list[str]:
    """The cells of the drift table's row for ``feature``, as text."""
    table = re.search(r'<table id="drift-table-wine">.*?</table>', html, re.S).group(0)
    row = next(r for r in re.findall(r"<tr>.*?</tr>", table, re.S) if f"<td>{feature}</td>" in r)
    return [unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def test_an_untested_drift_row_says_why_it_has_no_psi():
    # a small fleet's window (3 devices of a few dozen held-out samples each) is below min_samples: the row has
    # no PSI nor p-value, and the page must say so rather than show dashes and "no" as for a tested, calm signal
    untested = {"psi": None, "stat": None, "p": None, "p_adjusted": None, "drifted": False}
    window = {
        "rows": [
            {
                "kind": "feature",
                "name": "f0",
                **untested,
                "note": "not enough samples: 23.88 < min_samples 30",
            },
            {
                "kind": "feature",
                "name": "f1",
                **untested,
                "drifted": True,
                "error": "drift check failed on f1 <x>",
            },
            {"kind": "feature", "name": "f2", "psi": 0.01, "stat": 0.1, "p": 0.9, "p_adjusted": 0.9},
        ]
    }
    html = fleet_page({"drift": {"wine": [window]}})
    assert "<th>note</th>" in html
    assert _row(html, "f0") == [
        "feature",
        "f0",
        "—",
        "—",
        "—",
        "—",
        "no",
        "not enough samples: 23.88 < min_samples 30",
    ]
    assert _row(html, "f1")[-2:] == ["yes", "drift check failed on f1 <x>"]  # escaped, shown as text
    assert "on f1 &lt;x&gt;" in html
    assert _row(html, "f2") == ["feature", "f2", "0.010", "0.100", "0.9", "0.9", "no", ""]


def test_the_fleet_page_says_which_neighbours_its_epsilon_holds_for():
    """Under distributed DP the service's ε holds for zero-out neighbours, not add/remove: the page says so above
    the closed rounds' ε; without DP (no label) it says nothing."""
    html = fleet_page({"closed_rounds": [], "dp_adjacency": "zero-out"})
    assert '<b data-field="dp_adjacency">zero-out</b> neighbours' in html and "noise share kept" in html
    assert 'data-field="dp_adjacency"' not in fleet_page({"closed_rounds": [], "dp_adjacency": None})
    assert "<script" not in fleet_page(
        {"closed_rounds": [], "dp_adjacency": "<script>"}
    )  # unknown: not shown
