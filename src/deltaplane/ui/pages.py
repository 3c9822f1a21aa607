"""HTML for each dashboard page, rendered on the server from the read-only sources (no JavaScript, no CDN).

Every number on a page is printed from ``report.json``, the registry or the fleet snapshot with a fixed format
and carries a ``data-field`` attribute naming where it came from, so the browser test can compare what a person
sees with the source document.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from deltaplane.registry.lineage import summarize_lineage
from deltaplane.report.charts import report_charts
from deltaplane.report.svg import Series, line_chart
from deltaplane.ui.sources import PAGE_ROWS, config_diff, finite

__all__ = [
    "compare_page",
    "error_page",
    "fleet_page",
    "home_page",
    "login_page",
    "model_page",
    "registry_page",
    "run_page",
    "runs_page",
]

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { background: #14213d; color: #fff; padding: 0.6rem 1.5rem; display: flex; gap: 1.5rem; align-items: baseline; }
header a { color: #fff; text-decoration: none; } header a.here { text-decoration: underline; }
header .brand { font-weight: bold; font-size: 1.1rem; }
main { padding: 1rem 1.5rem 3rem; max-width: 90rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; background: #fff; }
th, td { border: 1px solid #d0d0d0; padding: 0.25rem 0.55rem; vertical-align: top; }
th { background: #eef0f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; } .bad { color: #b42318; font-weight: bold; } .muted { color: #666; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid #d0d0d0; padding: 0.6rem 1rem; min-width: 11rem; }
.card .v { font-size: 1.5rem; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(34rem, 1fr)); gap: 1rem; }
.charts > div { background: #fff; border: 1px solid #d0d0d0; padding: 0.4rem; max-width: 60rem; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
pre { background: #f3f3f3; padding: 0.5rem; overflow-x: auto; }
form.inline { display: inline; }
"""

#: The CSP source of the one stylesheet every page inlines: the browser applies that ``<style>`` and nothing
#: else (no injected ``<style>``, no ``style=`` attribute), without allowing inline styles in general.
STYLE_HASH = "'sha256-" + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode() + "'"

_NAV = (("/ui/", "Overview"), ("/ui/runs", "Runs"), ("/ui/registry", "Registry"), ("/ui/fleet", "Fleet"))


def _page(title: str, body: str, *, here: str = "", nav: bool = True) -> str:
    links = "".join(
        f'<a href="{href}"{" class=here" if href == here else ""}>{escape(label)}</a>' for href, label in _NAV
    )
    head = (
        f'<header><span class="brand">deltaplane</span>{links}'
        '<form class="inline" method="post" action="/ui/logout"><button>sign out</button></form></header>'
        if nav
        else '<header><span class="brand">deltaplane</span></header>'
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · deltaplane</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_CSS}</style></head>'
        f"<body>{head}<main><h1>{escape(title)}</h1>{body}</main></body></html>\n"
    )


def _num(value: Any, fmt: str = "{:.4f}", field: str = "") -> str:
    attr = f' data-field="{escape(field)}"' if field else ""
    return f'<td class="num"{attr}>{_fmt(value, fmt)}</td>'


def _diverged(flag: bool | None) -> str:
    """A closed round's divergence cell: whether the trusted coordinator's divergence check warned on the
    version it published ("—": no trusted coordinator checked it)."""
    if flag is None:
        return "<td data-field='diverged'>—</td>"
    return "<td class='bad' data-field='diverged'>yes</td>" if flag else "<td data-field='diverged'>no</td>"


def _when(ts: float | None) -> str:
    """``ts`` (unix s) as a UTC date; a time no date holds (past year 9999: a revocation list's u64 times can
    be) as its number, so that one odd value never makes the whole page a 500."""
    if ts is None:
        return "—"
    try:
        return _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"{ts} (unix s)"


def _table(head: Sequence[str], rows: Iterable[str], *, table_id: str = "") -> str:
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(rows)
    if not body:
        body = f'<tr><td colspan="{len(head)}" class="muted">none</td></tr>'
    tid = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


#: Rows per page of a run's per-round table: a whole ordinary run on one page, a bounded page for a long one.
ROUND_ROWS = 500


def _page_of(items: Sequence[Any], page: int, per: int = PAGE_ROWS) -> list[Any]:
    """Page ``page`` (from 1) of ``items``, ``per`` a page."""
    return list(items[(page - 1) * per : page * per])


def _pager(
    path: str,
    query: Mapping[str, Any],
    param: str,
    page: int,
    total: int,
    per: int = PAGE_ROWS,
    labels: tuple[str, str] = ("← newer", "older →"),
) -> str:
    """ "rows a–b of n" with links to the previous and next page (the other query parameters kept); ``labels``
    name those two links: newer and older for the tables listed newest first, earlier and later for a run's
    rounds (round 1 first). A page past the last says so and links back to the last page."""
    if total <= per and page == 1:
        return ""
    last = max(1, -(-total // per))

    def link(n: int, label: str) -> str:
        return f'<a href="{escape(path)}?{escape(urlencode({**query, param: n}))}" rel="nofollow">{label}</a>'

    if page > last:  # an old link, or a hand-made address: no rows, and none of the n claimed as shown
        return (
            f'<p class="pager" data-pager="{escape(param)}">no rows on page {page}: {total} in all, on '
            f"{last} page(s) · {link(last, 'the last page')}</p>"
        )
    first_row, last_row = min(total, (page - 1) * per + 1), min(total, page * per)
    parts = [f"rows {first_row}–{last_row} of {total}"]
    if page > 1:
        parts.append(link(page - 1, labels[0]))
    if page < last:
        parts.append(link(page + 1, labels[1]))
    return f'<p class="pager" data-pager="{escape(param)}">{" · ".join(parts)}</p>'


def _card(label: str, value: str, field: str) -> str:
    return f'<div class="card"><div class="muted">{escape(label)}</div><div class="v" data-field="{escape(field)}">{value}</div></div>'


def login_page(error: str = "") -> str:
    msg = f'<p class="bad">{escape(error)}</p>' if error else ""
    body = (
        f"{msg}<p>Sign in with the service's admin token (the one <code>deltaplane serve</code> or "
        "<code>deltaplane ui</code> printed, or <code>DELTAPLANE_ADMIN_TOKEN</code>).</p>"
        '<form method="post" action="/ui/login"><label>admin token '
        '<input type="password" name="token" autocomplete="current-password" size="40" required></label> '
        '<button type="submit">sign in</button></form>'
    )
    return _page("Sign in", body, nav=False)


def error_page(status: int, message: str) -> str:
    return _page(
        f"{status}", f'<p class="bad">{escape(message)}</p><p><a href="/ui/">back to the overview</a></p>'
    )


def _skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """A visible note for the reports left out of a listing, each with the reason."""
    if not skipped:
        return ""
    items = "".join(f"<li><code>{escape(rel)}</code>: {escape(why)}</li>" for rel, why in skipped)
    return f'<div id="skipped-reports"><p class="bad">{len(skipped)} report(s) left out:</p><ul>{items}</ul></div>'


def _search_notes(notes: Sequence[str]) -> str:
    """A visible note for what the search for reports could not cover (cut short, unreadable folders)."""
    if not notes:
        return ""
    return '<div id="search-notes">' + "".join(f'<p class="bad">{escape(n)}</p>' for n in notes) + "</div>"


#: what the overview and the runs table say when the dashboard was started without a runs folder
_NO_RUNS_FOLDER = (
    '<p class="muted" id="no-runs-folder">This dashboard has no runs folder: start <code>deltaplane serve</code> '
    "with <code>--runs FOLDER</code> to list the run reports (<code>report.json</code>) under it.</p>"
)


def home_page(
    runs: Sequence[Mapping[str, Any]],
    models: int,
    fleet: Mapping[str, Any] | None,
    skipped: Sequence[tuple[str, str]] = (),
    registry_error: str = "",
    search_notes: Sequence[str] = (),
    runs_folder: bool = True,
) -> str:
    """The overview; ``runs_folder`` False when the dashboard has no runs folder to list (``deltaplane serve``
    without ``--runs``): the runs card then says so rather than count 0 runs."""
    open_rounds = len(fleet.get("open_rounds", [])) if fleet else None
    devices = len(fleet.get("devices", [])) if fleet else None
    cards = (
        _card("runs", str(len(runs)) if runs_folder else "—", "runs")
        + _card("models", str(models), "models")
        + _card("open rounds", "—" if open_rounds is None else str(open_rounds), "open_rounds")
        + _card("devices seen", "—" if devices is None else str(devices), "devices")
    )
    fleet_note = (
        ""
        if fleet
        else '<p class="muted">No live fleet: this dashboard was started by <code>deltaplane ui</code>.</p>'
    )
    if fleet:
        fleet_note += _revocations_alert(fleet.get("revocations"))
    if not runs_folder:
        fleet_note += _NO_RUNS_FOLDER
    latest = "".join(
        f'<tr><td><a href="/ui/run?{urlencode({"report": r["report"], "name": r["name"]})}">'
        f"{escape(r['report'])} / {escape(r['name'])}</a></td>" + _num(r["test_accuracy"]) + "</tr>"
        for r in runs[:5]
    )
    return _page(
        "Overview",
        f'<div class="cards">{cards}</div>{fleet_note}<h2>Latest runs</h2>'
        + _table(["run", "final test accuracy"], [latest])
        + _search_notes(search_notes)
        + _skipped(skipped)
        + (
            f'<p class="bad" id="registry-error">registry: {escape(registry_error)}</p>'
            if registry_error
            else ""
        ),
        here="/ui/",
    )


def runs_page(
    runs: Sequence[Mapping[str, Any]],
    skipped: Sequence[tuple[str, str]] = (),
    page: int = 1,
    search_notes: Sequence[str] = (),
    runs_folder: bool = True,
) -> str:
    """The runs table; ``runs_folder`` False says the dashboard has no runs folder (see :func:`home_page`)."""
    if not runs_folder:
        return _page("Runs", _NO_RUNS_FOLDER, here="/ui/runs")
    rows = []
    for r in _page_of(runs, page):
        q = urlencode({"report": r["report"], "name": r["name"]})
        stopped = f' <span class="bad">{escape(str(r["stopped"]))}</span>' if r.get("stopped") else ""
        rows.append(
            f'<tr><td><input type="checkbox" name="run" value="{escape(r["report"] + "::" + r["name"])}"></td>'
            f'<td><a href="/ui/run?{q}">{escape(r["report"])} / {escape(r["name"])}</a>{stopped}</td>'
            f"<td>{escape(str(r['codec']))}</td>"
            + _num(r["rounds"], "{}")
            + _num(r["test_accuracy"], "{:.4f}", "test_accuracy")
            + _num(r["epsilon"], "{:.3f}", "epsilon")
            + _num(r["uplink_bytes"], "{:,}", "uplink_bytes")
            + _num(r["downlink_bytes"], "{:,}", "downlink_bytes")
            + _num(r["wall_time_s"], "{:.1f}")
            + "</tr>"
        )
    table = _table(
        [
            "",
            "run",
            "uplink codec",
            "rounds",
            "final test acc.",
            "ε",
            "uplink bytes",
            "downlink bytes",
            "wall s",
        ],
        rows,
        table_id="runs",
    )
    body = (
        '<form method="get" action="/ui/compare"><p>Tick two runs and '
        '<button type="submit">compare</button> them side by side.</p>'
        f"{table}</form>{_pager('/ui/runs', {}, 'page', page, len(runs))}"
        f"{_search_notes(search_notes)}{_skipped(skipped)}"
    )
    return _page("Runs", body, here="/ui/runs")


def run_charts(runs: Sequence[Mapping[str, Any]]) -> str:
    """The report's charts (shared with report.html) for one run or several runs overlaid."""
    return '<div class="charts">' + "".join(f"<div>{c}</div>" for c in report_charts(runs)) + "</div>"


_ROUND_COLUMNS = (
    ("round", "round", "{}"),
    ("clients", "clients", "{}"),
    ("test acc.", "test_accuracy", "{:.4f}"),
    ("client mean", "client_accuracy_mean", "{:.4f}"),
    ("client min", "client_accuracy_min", "{:.4f}"),
    ("client p10", "client_accuracy_p10", "{:.4f}"),
    ("client median", "client_accuracy_median", "{:.4f}"),
    ("client p90", "client_accuracy_p90", "{:.4f}"),
    ("client max", "client_accuracy_max", "{:.4f}"),
    ("uplink B", "uplink_bytes", "{:,}"),
    ("downlink B", "downlink_bytes", "{:,}"),
    ("ε", "epsilon", "{:.3f}"),
    ("ε neighbours", "dp_adjacency", "{}"),  # what ε holds for: add/remove, zero-out, replace-one
    ("clipped", "clipped_fraction", "{:.2f}"),
    ("rejected", "rejected", "{}"),
    ("backdoor", "backdoor_success", "{:.3f}"),
    ("seconds", "seconds", "{:.3f}"),
)


def _rounds_table(rounds: Sequence[Mapping[str, Any]], table_id: str, page: int = 1) -> str:
    """Page ``page`` of the per-round table; its columns are those any round of the run fills."""
    cols = [
        c
        for c in _ROUND_COLUMNS
        if c[1] in ("round", "clients") or any(r.get(c[1]) is not None for r in rounds)
    ]
    rows = [
        f'<tr data-round="{escape(str(r.get("round")))}">'
        + "".join(_num(r.get(k), f, k) for _, k, f in cols)
        + "</tr>"
        for r in _page_of(rounds, page, ROUND_ROWS)
    ]
    return _table([h for h, _, _ in cols], rows, table_id=table_id)


def _headline(run: Mapping[str, Any], prefix: str = "") -> str:
    final = run.get("final", {})
    cards = _card(
        "final test accuracy", _fmt(final.get("test_accuracy"), "{:.4f}"), f"{prefix}final.test_accuracy"
    )
    cards += _card(
        "uplink bytes", _fmt(final.get("cumulative_uplink_bytes"), "{:,}"), f"{prefix}final.uplink"
    )
    cards += _card(
        "downlink bytes", _fmt(final.get("cumulative_downlink_bytes"), "{:,}"), f"{prefix}final.downlink"
    )
    cards += _card("ε (final)", _fmt(final.get("epsilon"), "{:.3f}"), f"{prefix}final.epsilon")
    return f'<div class="cards">{cards}</div>'


def _fmt(v: Any, fmt: str) -> str:
    """``v`` in ``fmt``, "—" when absent or not finite; a value of the wrong type (a hand-edited report's
    ``"n/a"``) is shown as it is rather than failing the page."""
    if v is None or (isinstance(v, float) and not finite(v)):
        return "—"
    try:
        return escape(fmt.format(v))
    except (TypeError, ValueError):
        return escape(str(v))


def run_page(report: str, doc: Mapping[str, Any], run: Mapping[str, Any], rounds_page: int = 1) -> str:
    """One run: headline, charts of every round, page ``rounds_page`` of the per-round table, config."""
    rounds = run.get("rounds", [])
    stopped = (
        f'<p class="bad" data-field="stopped">{escape(str(run["stopped"]))}</p>' if run.get("stopped") else ""
    )
    others = [r["name"] for r in doc["runs"] if r["name"] != run["name"]]
    compare = "".join(
        f'<li><a href="/ui/compare?{urlencode([("run", report + "::" + run["name"]), ("run", report + "::" + o)])}">'
        f"compare with {escape(o)}</a></li>"
        for o in others[:PAGE_ROWS]
    )
    if len(others) > PAGE_ROWS:  # a report of many runs: the runs table pages through them all
        compare += (
            f'<li class="muted">and {len(others) - PAGE_ROWS} more: tick two on the '
            '<a href="/ui/runs">runs table</a></li>'
        )
    body = (
        f"<p>Report <code>{escape(report)}</code> · {escape(str(doc.get('title', '')))}</p>{stopped}"
        + _headline(run)
        + (f"<ul>{compare}</ul>" if compare else "")
        + run_charts([run])
        + "<h2>Per round</h2>"
        + _rounds_table(rounds, "rounds", rounds_page)
        + _pager(
            "/ui/run",
            {"report": report, "name": run["name"]},
            "rounds",
            rounds_page,
            len(rounds),
            ROUND_ROWS,
            labels=(
                "← earlier rounds",
                "later rounds →",
            ),  # round 1 first, unlike the tables listed newest first
        )
        + "<h2>Configuration</h2>"
        + f'<pre id="config">{escape(json.dumps(run.get("config", {}), indent=2, sort_keys=True))}</pre>'
    )
    return _page(f"Run {run['name']}", body, here="/ui/runs")


def compare_page(a: tuple[str, Mapping[str, Any]], b: tuple[str, Mapping[str, Any]]) -> str:
    (ka, ra), (kb, rb) = a, b
    diff = config_diff(ra.get("config", {}), rb.get("config", {}))
    diff_rows = [
        f"<tr><td><code>{escape(k)}</code></td><td>{escape(json.dumps(va))}</td><td>{escape(json.dumps(vb))}</td></tr>"
        for k, va, vb in diff
    ]
    metrics = (
        ("final test accuracy", "test_accuracy", "{:.4f}"),
        ("client accuracy mean", "client_accuracy_mean", "{:.4f}"),
        ("client accuracy min", "client_accuracy_min", "{:.4f}"),
        ("uplink bytes", "cumulative_uplink_bytes", "{:,}"),
        ("downlink bytes", "cumulative_downlink_bytes", "{:,}"),
        ("ε", "epsilon", "{:.3f}"),
        ("backdoor success", "backdoor_success", "{:.3f}"),
    )
    fa, fb = ra.get("final", {}), rb.get("final", {})
    mrows = []
    for label, key, fmt in metrics:
        va, vb = fa.get(key), fb.get(key)
        if va is None and vb is None:
            continue
        delta = vb - va if finite(va) and finite(vb) else None
        mrows.append(
            f"<tr><td>{escape(label)}</td>"
            + _num(va, fmt, f"a.{key}")
            + _num(vb, fmt, f"b.{key}")
            + _num(delta, "{:+.4f}" if "bytes" not in label else "{:+,}", f"delta.{key}")
            + "</tr>"
        )
    body = (
        f"<h2>Metrics</h2>{_table(['metric', 'A: ' + ka, 'B: ' + kb, 'B − A'], mrows, table_id='compare-metrics')}"
        f"<h2>Config diff</h2>{_table(['field', 'A', 'B'], diff_rows, table_id='config-diff')}"
        f"<h2>A and B over the rounds</h2>{run_charts([dict(ra, name='A: ' + ka), dict(rb, name='B: ' + kb)])}"
    )
    return _page("Compare runs", body, here="/ui/runs")


def registry_page(
    models: Sequence[Mapping[str, Any]], total: int, home: str | None, page: int = 1, exists: bool = True
) -> str:
    """Page ``page`` of the models (``models`` holds that page's rows, ``total`` counts them all); ``exists``
    False when ``home`` holds no registry yet, which the page says (with the command that makes one) rather
    than show an empty table as if the registry were empty."""
    rows = [
        f'<tr><td><a href="/ui/registry/{escape(quote(m["model"], safe=""))}">{escape(m["model"])}</a></td>'
        + _num(m["versions"], "{}", "versions")
        + _num(m["deltas"], "{}", "deltas")
        + _num(m["latest"], "{}", "latest")
        + f"<td>{escape(', '.join(f'{t} → {n}' for t, n in sorted(m['tags'].items())))}</td></tr>"
        for m in models
    ]
    if not home:
        where = "<p>No registry configured.</p>"
    elif not exists:
        where = (
            f'<p class="bad" id="no-registry">No registry at <code>{escape(home)}</code> yet: '
            f"<code>deltaplane registry init --home {escape(home)}</code> makes one (or start the dashboard "
            "with <code>--home</code> naming the registry folder).</p>"
        )
    else:
        where = f"<p>Registry at <code>{escape(home)}</code>.</p>"
    return _page(
        "Registry",
        where
        + _table(["model", "versions", "deltas", "latest", "tags"], rows, table_id="models")
        + _pager("/ui/registry", {}, "page", page, total),
        here="/ui/registry",
    )


def _lineage_svg(versions: Sequence[Mapping[str, Any]]) -> str:
    """Parents as edges between version boxes (deltas drawn as base → target), newest on the right: the model
    versions of ``versions`` (the page shown, so the graph is bounded like the table) and the edges among them."""
    arts = [v["artifact"] for v in versions if v["artifact"].kind == "model"]
    if not arts:
        return ""
    pos = {a.number: i for i, a in enumerate(sorted(arts, key=lambda a: a.number))}
    w, h, gap = 92, 34, 40
    width = len(pos) * (w + gap) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="lineage" viewBox="0 0 {width} 120" width="{min(width, 1400)}">',
        "<title>lineage</title>",
    ]
    for a in arts:
        x = 10 + pos[a.number] * (w + gap)
        src = a.lineage.get("source") or a.lineage.get("kind") or ""
        if a.parent is not None and a.parent in pos:
            px: float = 10 + pos[a.parent] * (w + gap) + w
            parts.append(f'<line x1="{px}" y1="60" x2="{x}" y2="60" stroke="#555" marker-end="url(#arrow)"/>')
        for extra in a.lineage.get("parents", []) if isinstance(a.lineage.get("parents"), list) else []:
            if isinstance(extra, int) and extra in pos and extra != a.parent:
                px = 10 + pos[extra] * (w + gap) + w / 2
                parts.append(
                    f'<path d="M{px},43 C{px},5 {x + w / 2},5 {x + w / 2},43" fill="none" stroke="#999"/>'
                )
        parts.append(
            f'<rect x="{x}" y="43" width="{w}" height="{h}" rx="4" fill="#eef0f4" stroke="#14213d"/>'
        )
        parts.append(
            f'<text x="{x + w / 2}" y="58" font-size="12" text-anchor="middle">@{escape(str(a.number))}</text>'
        )
        parts.append(
            f'<text x="{x + w / 2}" y="72" font-size="10" text-anchor="middle">{escape(str(src)[:14])}</text>'
        )
    parts.insert(
        2,
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
    )
    parts.append("</svg>")
    return "".join(parts)


def model_page(view: Mapping[str, Any], *, page: int = 1, history: int = 1, decisions: int = 1) -> str:
    """One model; ``view`` holds page ``page`` of its versions, the three long tables are paged separately."""
    model = view["model"]
    here = f"/ui/registry/{quote(model, safe='')}"
    query = {"page": page, "history": history, "decisions": decisions}
    vrows = []
    for v in view["versions"]:
        a = v["artifact"]
        sig = '<span class="ok">verified</span>' if v["signature_ok"] else '<span class="bad">FAILED</span>'
        gov = a.governance
        problems = "".join(f'<div class="bad">{escape(p)}</div>' for p in v["governance_problems"])
        evals = "; ".join(
            ", ".join(
                f"{k}={val:.4f}" for k, val in sorted(e["metrics"].items()) if isinstance(val, int | float)
            )
            for e in v["evaluations"][-1:]
        )
        vrows.append(
            f'<tr data-version="{escape(str(a.number))}" data-kind="{escape(a.kind)}"><td>{escape(a.ref)}</td><td>{escape(a.kind)}</td>'
            + _num(a.size, "{:,}", "size")
            + f"<td>{'' if a.parent is None else escape(str(a.parent))}</td>"
            f"<td>{'' if a.base is None else escape(f'{a.base} → {a.target}')}</td>"
            f"<td>{escape(a.codec or '')}</td>"
            f"<td data-field='signature'>{sig}</td>"
            f"<td>{escape(', '.join(v['tags']))}</td>"
            f"<td>{escape(', '.join(gov.cohorts))}{problems}</td>"
            f"<td>{escape(', '.join(gov.excluded_cohorts))}</td>"
            f"<td data-field='lineage'>{escape(summarize_lineage(a.lineage)[0])}</td>"
            f"<td>{escape(evals)}</td><td>{_when(a.created_at)}</td></tr>"
        )
    versions = _table(
        [
            "version",
            "kind",
            "bytes",
            "parent",
            "delta",
            "codec",
            "signature",
            "tags",
            "cohorts",
            "excludes",
            "lineage",
            "last evaluation",
            "created",
        ],
        vrows,
        table_id="versions",
    )
    hist_rows = [
        f"<tr><td>{escape(tag)}</td><td>{escape(h['action'])}</td><td>{escape(str(h['number']))}</td>"
        f"<td>{'' if h['previous'] is None else escape(str(h['previous']))}</td><td>{escape(h['reason'])}</td><td>{_when(h['at'])}</td></tr>"
        for tag, h in _page_of(view["history"], history)
    ]
    dec_rows = []
    for d in _page_of(sorted(view["decisions"], key=lambda d: -(d.get("at") or 0)), decisions):
        verdict = '<span class="ok">promoted</span>' if d["promoted"] else '<span class="bad">refused</span>'
        nums = "; ".join(
            f"{k}: {v:.4f}"
            + (f" (was {d['baseline'][k]:.4f})" if d["baseline"] and k in d["baseline"] else "")
            for k, v in sorted(d["metrics"].items())
            if isinstance(v, int | float)
        )
        dec_rows.append(
            f'<tr data-promoted="{str(d["promoted"]).lower()}"><td>@{escape(str(d["candidate"]))} → :{escape(d["tag"])}</td>'
            f"<td>{verdict}</td><td>{escape(nums)}</td><td>{escape('; '.join(d['reasons']))}</td>"
            f"<td>{escape(d['evaluator'])}</td><td>{_when(d['at'])}</td></tr>"
        )
    withdrawn = ", ".join(view["withdrawn"]) or "none"
    body = (
        "<h2>Lineage</h2>"
        + _lineage_svg(view["versions"])
        + "<h2>Versions</h2>"
        + versions
        # the lineage column is a summary (a fleet's first version carries its whole run config); say where the
        # whole record is, as `registry list` does, so nothing is hidden unsaid
        + '<p class="muted">lineage: a summary (+N more: fields not shown); the whole record: '
        "<code>deltaplane registry show REF</code></p>"
        + _pager(here, query, "page", page, view.get("version_count", len(view["versions"])))
        + "<h2>Tags</h2>"
        + _table(
            ["tag", "action", "version", "previous", "reason", "when"], hist_rows, table_id="tag-history"
        )
        + _pager(here, query, "history", history, len(view["history"]))
        + "<h2>Promotion decisions</h2>"
        + _table(
            ["candidate", "verdict", "gate numbers", "reasons", "evaluator", "when"],
            dec_rows,
            table_id="decisions",
        )
        + _pager(here, query, "decisions", decisions, len(view["decisions"]))
        + f"<h2>Governance</h2><p>Withdrawn cohorts: <span data-field='withdrawn'>{escape(withdrawn)}</span></p>"
    )
    return _page(f"Model {model}", body, here="/ui/registry")


def _kind(r: Mapping[str, Any]) -> str:
    """A round's kind as the fleet page prints it: plain, or SecAgg (``secagg, authenticated`` for a round of
    signed key advertisements, so the operator can see that ``coordinate --authenticated`` took effect) with
    its open stage while it is open, and how many invited devices a closed one left out as revoked."""
    kind = str(r.get("kind", "plain"))
    if kind == "secagg" and r.get("authenticated"):
        kind = "secagg, authenticated"
    if r.get("revoked"):
        kind += f" ({len(r['revoked'])} revoked, left out)"
    return f"{kind} ({r['stage']})" if r.get("stage") else kind


#: revoked devices the fleet page lists (a list holds up to 4096); the count and the file give the rest
REVOKED_SHOWN = 100
#: devices a round's row names as left out for being revoked, before "+N more"
ROUND_REVOKED_SHOWN = 10
#: how an operator re-issues and uploads the list, as every warning of the revocation panel ends
_REISSUE = (
    "re-issue it (<code>deltaplane keys revoke --authority-key enrollment.ed25519.pem --out FILE</code>, "
    "without <code>--device</code>) and upload it (<code>POST /admin/secagg/revocations</code>, body: that file)"
)


def _duration(seconds: float) -> str:
    """A span as an operator reads it at a glance: the two largest units (``6 d 23 h``, ``11 h 59 min``)."""
    s = int(abs(seconds))
    d, h, m = s // 86_400, s % 86_400 // 3_600, s % 3_600 // 60
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    return f"{m} min" if m else f"{s} s"


def _left_out(r: Mapping[str, Any]) -> str:
    """The cell naming the invited devices a SecAgg round's open left out as revoked (bounded)."""
    revoked = [str(d) for d in r.get("revoked") or ()]
    if not revoked:
        return '<td class="muted" data-field="revoked">—</td>'
    more = len(revoked) - ROUND_REVOKED_SHOWN
    names = escape(", ".join(revoked[:ROUND_REVOKED_SHOWN])) + (f" (+{more} more)" if more > 0 else "")
    return f'<td class="bad" data-field="revoked" data-count="{len(revoked)}">{names}</td>'


def _revocation_notes(rev: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What the operator must know of the service's revocation list, as ``(kind, HTML)`` warnings: its state
    (see :func:`deltaplane.serve.revocation_routes.revocations_status`) and whether it is checked."""
    state, rl, file = rev["state"], rev.get("list") or {}, escape(rev.get("file", ""))
    notes: list[tuple[str, str]] = []
    if state == "stale":
        notes.append(
            (
                "stale",
                f"Stale: past its next update ({_when(rl['next_update'])}, "
                f"{_duration(rev['now'] - rl['next_update'])} ago). Authenticated rounds are refused from "
                f"{_when(rl['refused_from'])} (the clock skew allowed) until a current list is held: {_REISSUE}.",
            )
        )
    elif state == "expiring":
        notes.append(
            (
                "expiring",
                f"Expires in {_duration(rl['next_update'] - rev['now'])} ({_when(rl['next_update'])}): "
                f"{_REISSUE} before then, or authenticated rounds are refused.",
            )
        )
    elif state == "missing":
        notes.append(
            (
                "missing",
                f"No list held: <code>{file}</code> (--secagg-revocations) does not exist yet, so authenticated "
                f"rounds are refused until one is uploaded: issue it (<code>deltaplane keys revoke "
                "--authority-key enrollment.ed25519.pem --out FILE</code>) and upload it "
                "(<code>POST /admin/secagg/revocations</code>).",
            )
        )
    elif state == "invalid":
        notes.append(
            (
                "invalid",
                f"The held list cannot be used: {escape(rev.get('error', ''))}. Authenticated rounds are "
                "refused until a list the enrollment authority signed is uploaded.",
            )
        )
    elif state == "none":
        notes.append(
            (
                "none",
                "Authenticated SecAgg rounds run on this service without a revocation list: the service leaves "
                "no revoked device out (devices holding a list still refuse rosters that seat one). Restart it "
                "with <code>--secagg-revocations FILE --secagg-enrollment-authority enrollment.ed25519.pub</code>.",
            )
        )
    if rev.get("file") and not rev.get("checked"):
        notes.append(
            (
                "unchecked",
                "Unchecked: without <code>--secagg-enrollment-authority</code> the service does not verify the "
                "list's signature or authority (devices still verify their own copy), and refuses uploads of a "
                "newer list.",
            )
        )
    return notes


def _revocations_alert(rev: Mapping[str, Any] | None) -> str:
    """The overview's one line when the revocation list needs the operator (the Fleet page says what to do)."""
    kinds = [kind for kind, _ in _revocation_notes(rev)] if rev else []
    if not kinds:
        return ""
    return (
        f'<p class="bad" id="revocations-alert">Revocation list: {escape(", ".join(kinds))}; see the '
        '<a href="/ui/fleet#revocations">Fleet page</a>.</p>'
    )


#: revoked identity keys the fleet page names (their SHA-256, shortened), before "+N more"
REVOKED_KEYS_SHOWN = 5


def _revoked_keys(keys: Sequence[str]) -> str:
    """The revoked-keys cell: how many keys the list revokes, and the first :data:`REVOKED_KEYS_SHOWN` of their
    SHA-256 digests shortened as ``keys revoke`` prints them (``SHA256:0123456789abcdef…``), escaped."""
    if not keys:
        return "0"
    shown = ", ".join(f"SHA256:{escape(str(k)[:16])}…" for k in keys[:REVOKED_KEYS_SHOWN])
    more = len(keys) - REVOKED_KEYS_SHOWN
    return f"{len(keys):,}: <code>{shown}</code>" + (f" (+{more:,} more)" if more > 0 else "")


def _revocations_panel(rev: Mapping[str, Any] | None) -> str:
    """The fleet page's revocation panel: whether a list is held, its authority, number, times, revoked
    devices (at most :data:`REVOKED_SHOWN`) and revoked keys (:func:`_revoked_keys`), and a warning for each state
    the operator must act on."""
    if rev is None:
        return ""
    notes = _revocation_notes(rev)
    parts = [f'<p class="bad" data-warning="{kind}">{html}</p>' for kind, html in notes]
    rl = rev.get("list")
    if rev["state"] == "unused":
        parts.append(
            '<p class="muted">This service keeps no revocation list: only authenticated SecAgg rounds use one '
            "(<code>deltaplane serve --secagg-revocations FILE --secagg-enrollment-authority "
            "enrollment.ed25519.pub</code>).</p>"
        )
    if rl is not None:
        if rev["state"] == "current":
            parts.append(
                f'<p class="ok" id="revocations-current">Current: next update in '
                f"{_duration(rl['next_update'] - rev['now'])}.</p>"
            )
        left = rl["next_update"] - rev["now"]
        expires = f"in {_duration(left)}" if left >= 0 else f"{_duration(left)} ago"
        rows = [
            ("file", f"<code>{escape(rev['file'])}</code>", "file"),
            ("authority", f"<code>{escape(str(rl['authority']))}</code>", "authority"),
            ("number", escape(str(rl["sequence"])), "sequence"),
            ("issued", _when(rl["issued"]), "issued"),
            ("next update", f"{_when(rl['next_update'])} ({expires})", "next_update"),
            (
                "signature",
                "verified under the authority key" if rev.get("checked") else "unchecked",
                "checked",
            ),
            ("revoked devices", f"{len(rl['revoked']):,}", "revoked"),
            ("revoked keys", _revoked_keys(rl.get("keys") or []), "keys"),
        ]
        parts.append(
            '<table id="revocation-list"><tbody>'
            + "".join(
                f'<tr><th>{escape(label)}</th><td data-field="revocations.{field}">{value}</td></tr>'
                for label, value, field in rows
            )
            + "</tbody></table>"
        )
        shown = rl["revoked"][:REVOKED_SHOWN]
        parts.append(
            _table(
                ["revoked device", "cohort"],
                (f"<tr><td>{escape(str(d))}</td><td>{escape(str(c))}</td></tr>" for d, c in shown),
                table_id="revoked-devices",
            )
        )
        if len(rl["revoked"]) > len(shown):
            parts.append(
                f'<p class="muted" id="revoked-more">and {len(rl["revoked"]) - len(shown):,} more '
                f"(the whole list: <code>{escape(rev['file'])}</code>)</p>"
            )
    return f'<h2>Revocations</h2><div id="revocations" data-state="{escape(rev["state"])}">{"".join(parts)}</div>'


#: what each ``dp_adjacency`` means, for the Fleet page's note above its ε columns
_NEIGHBOURS = {
    "add/remove": "one device, with all its data, added or removed (central DP)",
    "zero-out": "one device's data replaced by none while it still takes part, its noise share kept (distributed DP "
    "under SecAgg: removing a device would also remove its noise)",
    "replace-one": "one device's data changed arbitrarily (local DP: each device's own ε)",
}


def _neighbours(adjacency: Any) -> str:
    """The note saying which neighbouring datasets the page's ε holds for (nothing without DP)."""
    if not isinstance(adjacency, str) or adjacency not in _NEIGHBOURS:
        return ""
    return (
        f'<p class="muted">ε holds for <b data-field="dp_adjacency">{escape(adjacency)}</b> neighbours: '
        f"{escape(_NEIGHBOURS[adjacency])}.</p>"
    )


def fleet_page(fleet: Mapping[str, Any] | None) -> str:
    if not fleet:
        return _page(
            "Fleet",
            '<p class="muted">No live fleet: start the dashboard with <code>deltaplane serve</code> to see rounds, '
            "devices and drift.</p>",
            here="/ui/fleet",
        )
    rounds = [
        f"<tr><td>{escape(r['model'])}</td>"
        + _num(r["round"], "{}", "round")
        + f"<td>{escape(_kind(r))}</td>"
        + _num(r["base_version"], "{}")
        + _num(r["uploads"], "{}", "uploads")
        + _left_out(r)
        + f"<td>{_when(r.get('opened_at'))}</td></tr>"
        for r in fleet.get("open_rounds", [])
    ]
    closed = [
        f"<tr><td>{escape(r['model'])}</td>"
        + _num(r["round"], "{}", "round")
        + f"<td>{escape(_kind(r))}</td>"
        + _num(r["version"], "{}", "version")
        + _num(r["contributors"], "{}", "contributors")
        + _num(r["epsilon"], "{:.3f}", "epsilon")
        # the round's own label, as stored with its ε ("unknown": closed before it was stored); blank: no ε
        + f"<td data-field='epsilon_neighbours'>{escape(str(r.get('dp_adjacency') or ''))}</td>"
        + _num(r.get("local_epsilon_max"), "{:.3f}", "local_epsilon_max")
        + _num(r.get("holdout_accuracy_mean"), "{:.3f}", "holdout_accuracy_mean")
        + _num(r.get("holdout_accuracy_min"), "{:.3f}", "holdout_accuracy_min")
        + _num(r.get("holdout_samples_min"), "{}", "holdout_samples_min")
        # the trusted coordinator's measure on the task's test set ("—": none measured this version)
        + _num(r.get("test_accuracy"), "{:.3f}", "test_accuracy")
        + _num(r.get("test_samples"), "{}", "test_samples")
        + _diverged(r.get("diverged"))
        + _num(r.get("global_accuracy_mean"), "{:.3f}", "global_accuracy_mean")
        + _num(r.get("personal_accuracy_mean"), "{:.3f}", "personal_accuracy_mean")
        + _num(r.get("personal_gain_min"), "{:+.3f}", "personal_gain_min")
        + _num(r.get("reports"), "{}", "reports")
        + _left_out(r)
        + f"<td>{_when(r.get('closed_at'))}</td></tr>"
        for r in fleet.get("closed_rounds", [])
    ]
    ended = [
        f"<tr><td>{escape(r['model'])}</td>"
        + _num(r["round"], "{}", "unpublished_round")
        + f"<td>{escape(_kind(r))}</td>"
        + f"<td class='bad' data-field='outcome'>{escape(str(r['outcome']))}</td>"
        + _num(r.get("invited"), "{}", "invited")
        + _num(r.get("contributors"), "{}", "took_part")
        + _left_out(r)
        # why: the coordinator's or operator's words, or an error's (a device's id, a cohort name): escaped
        + f"<td data-field='reason'>{escape(str(r.get('reason', '')))}</td>"
        + f"<td>{_when(r.get('closed_at'))}</td></tr>"
        for r in fleet.get("unpublished_rounds", [])
    ]
    devices = [
        f"<tr><td>{escape(d['device'])}</td><td>{escape(d['cohort'])}</td>"
        + _num(d["requests"], "{}")
        + f"<td>{_when(d['last_seen'])}</td></tr>"
        for d in fleet.get("devices", [])
    ]
    uploads = [
        f"<tr><td>{escape(k)}</td>" + _num(v, "{:,}", f"uploads.{k}") + "</tr>"
        for k, v in sorted(fleet.get("uploads", {}).items())
    ]
    drift_parts = []
    for model, windows in sorted(fleet.get("drift", {}).items()):
        features: dict[str, list[tuple[float, float | None]]] = {}
        for i, w in enumerate(windows, start=1):
            for row in w.get("rows", []):
                if row.get("psi") is not None:
                    features.setdefault(f"{row['kind']}:{row['name']}", []).append((i, row["psi"]))
        top = sorted(features, key=lambda k: -max(v or 0 for _, v in features[k]))[:6]
        chart = line_chart(
            [Series(k, features[k]) for k in top],
            title=f"{model}: PSI per window (6 largest)",
            x_label="window",
            y_label="PSI",
            y_min=0,
            chart_id=f"drift-{model}",
        )
        last = windows[-1] if windows else {}
        rows = [
            f"<tr><td>{escape(str(r.get('kind')))}</td><td>{escape(str(r.get('name')))}</td>"
            + _num(r.get("psi"), "{:.3f}")
            + _num(r.get("stat"), "{:.3f}")
            + _num(r.get("p"), "{:.3g}")
            + _num(r.get("p_adjusted"), "{:.3g}")  # what "drifted" is decided on (Holm over the window)
            + f"<td>{'<span class=bad>yes</span>' if r.get('drifted') else 'no'}</td>"
            # why a row has no PSI or p-value (too few samples in the window) or why its check failed: without
            # it an untested row reads as dashes and "no", the same as a signal that was tested and is fine
            + f"<td>{escape(str(r.get('error') or r.get('note') or ''))}</td></tr>"
            for r in last.get("rows", [])
        ]
        drift_parts.append(
            f"<h3>{escape(model)}</h3><div class='charts'><div>{chart}</div></div>"
            + _table(
                ["kind", "feature", "PSI", "test statistic", "p", "p (Holm)", "drifted", "note"],
                rows,
                table_id=f"drift-table-{model}",
            )
        )
    # a stored monitor the service could not read at start: without this the model read as never monitored
    for model, why in sorted(fleet.get("drift_unreadable", {}).items()):
        drift_parts.append(
            f"<h3>{escape(model)}</h3><p class='bad' data-field='drift-unreadable'>its stored drift monitor "
            f"could not be read at start ({escape(why)}); its reports feed no monitor until its reference is "
            f"set again (PUT /admin/models/{escape(model)}/drift-reference)</p>"
        )
    # an open window that lost reports at start: its next report is computed on fewer than were sent
    for model, why in sorted(fleet.get("drift_window_losses", {}).items()):
        drift_parts.append(
            f"<p class='bad' data-field='drift-window-loss'>{escape(model)}: {escape(why)}</p>"
        )
    alerts = [
        f"<tr><td>{escape(a['model'])}</td><td>{escape(a['alert'])}</td><td>{escape(str(a.get('version', '')))}</td>"
        f"<td>{_when(a.get('at'))}</td></tr>"
        for a in reversed(fleet.get("alerts", []))
    ]
    body = (
        "<h2>Open rounds</h2>"
        + _table(
            ["model", "round", "kind", "base version", "uploads", "left out (revoked)", "opened"],
            rounds,
            table_id="open-rounds",
        )
        + "<h2>Closed rounds</h2>"
        + _neighbours(fleet.get("dp_adjacency"))
        + _table(
            [
                "model",
                "round",
                "kind",
                "version",
                "devices in it",
                "ε spent",
                "ε neighbours",
                "local ε (max reported)",
                "held-out accuracy mean",
                "min",
                "smallest held-out set",
                "test accuracy (coordinator)",
                "test samples",
                "diverged",
                "global, own label mix",
                "personal, own label mix",
                "worst device's change",
                "reports",
                "left out (revoked)",
                "closed",
            ],
            closed,
            table_id="closed-rounds",
        )
        # aborted (nobody uploaded, too few devices for a SecAgg stage, a close refused) or lost in a restart:
        # without this table such a round was reported by the coordinator's terminal only
        + "<h2>Ended without publishing</h2>"
        + _table(
            [
                "model",
                "round",
                "kind (stage)",
                "outcome",
                "invited",
                "took part",
                "left out (revoked)",
                "why",
                "ended",
            ],
            ended,
            table_id="unpublished-rounds",
        )
        + _revocations_panel(fleet.get("revocations"))
        + "<h2>Uploads</h2>"
        + _table(["outcome", "count"], uploads, table_id="uploads")
        + "<h2>Devices seen</h2>"
        + _table(["device", "cohort", "requests", "last seen"], devices, table_id="devices")
        + "<h2>Drift</h2>"
        + ("".join(drift_parts) or '<p class="muted">no drift reference set</p>')
        + "<h2>Alerts</h2>"
        + _table(["model", "alert", "version", "when"], alerts, table_id="alerts")
    )
    return _page("Fleet", body, here="/ui/fleet")
