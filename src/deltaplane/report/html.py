"""Render a report document as one self-contained HTML page (inline CSS, inline SVG charts, no network).

One file that opens anywhere, can be attached to an issue or archived with the run, and needs no server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from html import escape
from typing import Any

from deltaplane.report.charts import report_charts
from deltaplane.report.plots import personalization_png

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(36rem, 1fr)); gap: 1rem; }
.charts > div { border: 1px solid #ddd; padding: 0.3rem; max-width: 60rem; }
.stopped { background: #fff4e5; border: 1px solid #e69f00; padding: 0.5rem 0.8rem; }
.warn { color: #9a3412; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; }
"""

_COLUMNS = (
    ("run", "name", "{}"),
    ("codec", "codec", "{}"),
    ("rounds", "rounds", "{}"),
    ("final acc.", "final_accuracy", "{:.4f}"),
    ("client acc. mean", "client_accuracy_mean", "{:.4f}"),
    ("client acc. min", "client_accuracy_min", "{:.4f}"),
    ("uplink bytes", "uplink_bytes", "{:,}"),
    ("downlink bytes", "downlink_bytes", "{:,}"),
    # what each ratio divides: the baseline run's uplink bytes (fp32 frames, headers included; the terminal's
    # "vs fp32 run"), or the raw float32 tensors the run's updates hold (no frame at all)
    ("uplink vs baseline run", "ratio_vs_baseline", "{:.1f}×"),
    ("uplink vs raw fp32 tensors", "ratio_vs_raw", "{:.1f}×"),
    # the change against the baseline, as the deploy section and the terminal print it: a compressed run above
    # the baseline reads +0.28 (it read "points below baseline -0.28", a double negative)
    ("points vs baseline", "accuracy_drop_points", "{:+.2f}"),
    ("ε", "epsilon", "{:.3f}"),
    ("ε neighbours", "dp_adjacency", "{}"),  # what ε holds for: add/remove, zero-out, replace-one
    ("refused updates", "rejected", "{}"),
    ("backdoor success", "backdoor_success", "{:.3f}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
)


def _num(value: Any, fmt: str = "{}") -> str:
    """``value`` formatted by ``fmt`` and HTML-escaped; "—" for ``None``. Every number (and every other value)
    interpolated into the page goes through here or :func:`html.escape`: a report document is JSON that may have
    been edited or come from elsewhere, and a string where a number belongs must show as text, not markup. A
    value ``fmt`` cannot format (text where a number belongs) is shown as it is, escaped."""
    if value is None:
        return "—"
    try:
        text = fmt.format(value)
    except (TypeError, ValueError):
        text = str(value)
    return escape(text)


def _cell(fmt: str, value: Any) -> str:
    if value is None:
        return "<td>—</td>"
    cls = ' class="num"' if isinstance(value, int | float) else ""
    return f"<td{cls}>{_num(value, fmt)}</td>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _psi(x: Any) -> str:
    """A PSI to 3 decimals; "—" where none was measured (too few samples in the window)."""
    return _num(x, "{:.3f}") if isinstance(x, int | float) and not isinstance(x, bool) else "—"


def _drift_section(runs: Any) -> str:
    """Per-round drift figures of runs that carry them (``deltaplane run --transport http``), else nothing."""
    parts = []
    for run in runs:
        rows = run.get("drift") or []
        if not rows:
            continue
        body = "".join(
            f"<tr><td>{_num(r['round'])}</td>"
            f'<td class="num">{_psi(r.get("prediction_psi"))}</td>'
            f'<td class="num">{_psi(r.get("max_feature_psi"))}</td>'
            f"<td>{escape('; '.join(r['alerts'])) or 'none'}</td></tr>"
            for r in rows
        )
        t = run.get("transport") or {}
        parts.append(
            f"<h3>{escape(run['name'])}</h3><p>Computed by the service from device-reported histograms "
            f"(pixel intensities per feature, predicted-class counts) against the training set and label prior; "
            f"{_num(t.get('requests', '?'))} HTTP requests, "
            f"{_num(t.get('uploads_accepted', '?'))} uploads accepted, "
            f"registry integrity {'ok' if t.get('registry_ok') else 'NOT ok'}. A PSI of — means the round's "
            "window held too few samples to test (the monitor's <code>min_samples</code>).</p>"
            "<table><thead><tr><th>round</th><th>prediction PSI</th><th>max feature PSI</th><th>alerts</th>"
            f"</tr></thead><tbody>{body}</tbody></table>"
        )
    return "<h2>Drift</h2>" + "".join(parts) if parts else ""


def _device_cost_section(runs: Any) -> str:
    """Per-round device cost of every run that carries it (``RunResult.device_cost``), else nothing."""
    rows = []
    for run in runs:
        dc = run.get("device_cost")
        if not dc:
            continue
        m = dc["mean"]
        links = list(m["total_uj"])
        rows.append(
            f"<tr><td>{escape(run['name'])}</td>"
            f'<td class="num">{_num(m["train_macs"], "{:,.0f}")}</td>'
            f'<td class="num">{_num(_milli(m["compute_uj"]), "{:,.2f}")}</td>'
            f'<td class="num">{_num(m["bytes_up"], "{:,.0f}")}</td><td class="num">{_num(m["bytes_down"], "{:,.0f}")}</td>'
            + "".join(f'<td class="num">{_num(_milli(m["radio_uj"][k]), "{:,.2f}")}</td>' for k in links)
            + "".join(f'<td class="num">{_num(_milli(m["total_uj"][k]), "{:,.2f}")}</td>' for k in links)
            + "</tr>"
        )
        head_links = links
        sources = dc["sources"]
        first = dc
    if not rows:
        return ""
    head = (
        "<th>run</th><th>training MACs</th><th>training mJ</th><th>bytes up</th><th>bytes down</th>"
        + "".join(f"<th>radio mJ ({escape(k)})</th>" for k in head_links)
        + "".join(f"<th>total mJ ({escape(k)})</th>" for k in head_links)
    )
    cites = "; ".join(f"{escape(k)}: {escape(v)}" for k, v in sources["links"].items())
    return (
        "<h2>Device cost per round</h2>"
        f"<p>What one round cost a mean participating device ({escape(first['profile'])} profile), averaged "
        f"over the rounds: local training of {_num(first['train_samples_per_device'], '{:.1f}')} samples × "
        f"{_num(first['local_epochs'])} epoch(s) at {_num(first['forward_macs_per_sample'], '{:,}')} forward MACs "
        "per sample "
        f"(training ≈ 3× forward), and the bytes it sent and received. Estimates, not measurements: "
        f"{escape(first['note'])}. Compute: {escape(sources['profile'])}. Radio: {cites}.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _scaled(x: Any, factor: float) -> Any:
    """``x · factor`` for a number; anything else as it is (shown escaped by :func:`_num`)."""
    return x * factor if isinstance(x, int | float) and not isinstance(x, bool) else x


def _milli(x: Any) -> Any:
    return _scaled(x, 1e-3)


def _points(x: Any) -> Any:
    return _scaled(x, 100)


def _neg(x: Any) -> Any:
    return _scaled(x, -1)


def _pct(x: float | None) -> str:
    return _num(_points(x), "{:.2f}%")


def _followup_sections(followup: Mapping[str, Any] | None) -> str:
    """Personalization, merge and deploy sections (``deltaplane run`` with its follow-up), else nothing."""
    if not followup:
        return ""
    p, m, d = followup["personalization"], followup["merge"], followup["deploy"]
    if p.get("in_round", False):
        how = (
            f"Each of the {_num(p['devices'])} devices personalized in every round of the federation "
            f"({escape(p['method'])}), as the run's devices did; these are its personal models after the last round"
        )
    else:
        how = (
            f"The run did not personalize; after it, each of the {_num(p['devices'])} devices fine-tuned the final "
            f"global model once for {_num(p['epochs'])} local epoch(s) (post-hoc {escape(p['method'])})"
        )
    mix = " (α-mix: global + α·personal delta, α chosen on its own held-out split, α = 0 allowed)"
    pers = (
        "<h2>Personalization</h2>"
        f"<p>{how}{mix if p['method'] == 'alpha_mix' else ''}; {_num(p['devices_personalized'])} serve a personal "
        "model rather than the global one. Accuracy is on each device's own "
        "label mix (per-class test accuracy weighted by its class shares).</p>"
        "<table><thead><tr><th>model</th><th>device acc. mean</th><th>device acc. min</th></tr></thead><tbody>"
        f'<tr><td>global</td><td class="num">{_pct(p["global_accuracy_mean"])}</td>'
        f'<td class="num">{_pct(p["global_accuracy_min"])}</td></tr>'
        f'<tr><td>personalized</td><td class="num">{_pct(p["personal_accuracy_mean"])}</td>'
        f'<td class="num">{_pct(p["personal_accuracy_min"])}</td></tr></tbody></table>'
        f"<p>Mean change {_num(_points(p['gain_mean']), '{:+.2f}')} points; worst device "
        f"{_num(_points(p['gain_min']), '{:+.2f}')} points.</p>"
        + (
            _img(personalization_png(p["clients"]), "per-device accuracy, global vs personalized")
            # FedPer/FedBN: no global figure to plot against (engine.scoring.has_global_model)
            if p.get("global_accuracy_mean") is not None
            else ""
        )
    )
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td class="num">{_pct(r["test_accuracy"])}</td>'
        f'<td class="num">{_pct(r.get("mean_device_accuracy"))}</td></tr>'
        for name, r in m["results"].items()
    )
    mer = (
        f"<h2>Merge</h2><p>Skipped: {escape(m['skipped'])}.</p>"
        if m.get("skipped")
        else f"<h2>Merge</h2><p>The {_num(m['models'])} personalized models merged into one around the {escape(m['base'])} "
        "(TIES: top-20% task-vector entries, sign consensus, disjoint mean; task arithmetic: mean task vector), "
        "scored on the global test set and on the devices' label mixes.</p>"
        "<table><thead><tr><th>model</th><th>test acc.</th><th>device acc. mean</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    if d.get("refused"):
        missed = "".join(f"<li>{escape(r)}</li>" for r in d["reasons"])
        dep = (
            "<h2>Deploy</h2><p>Refused: the global model missed the quality gates <code>deltaplane deploy</code> "
            f"applies by default, so no artifact was written.</p><ul>{missed}</ul>"
        )
        return pers + mer + dep
    files = ", ".join(f"<code>{escape(f)}</code>" for f in d["files"])
    dep = (
        f"<h2>Deploy</h2><p>Global model, magnitude-pruned to {_num(d['prune'])} sparsity (fine-tuned "
        f"{_num(d['finetune_epochs'])} epochs with masks held), {escape(d['quant_scheme'])}; written to "
        f"<code>{escape(d['out_dir'])}</code>: {files}. It passed the {_num(d['gates_passed'])} quality gates "
        "<code>deltaplane deploy</code> applies by default.</p>"
        "<table><tbody>"
        f'<tr><th>fp32 safetensors</th><td class="num">{_num(d["fp32_safetensors_bytes"], "{:,}")} B</td></tr>'
        f'<tr><th>artifact</th><td class="num">{_num(d["artifact_bytes"], "{:,}")} B '
        f"({_num(d['compression_ratio'], '{:.2f}')}× smaller)</td></tr>"
        f'<tr><th>accuracy fp32 → artifact</th><td class="num">{_pct(d["accuracy_fp32"])} → '
        f"{_pct(d['accuracy_compressed'])} ({_num(_neg(d['accuracy_drop_points']), '{:+.2f}')} points)</td></tr>"
        f'<tr><th>batch-1 latency vs fp32 PyTorch</th><td class="num">{_num(d["latency_ratio_batch1"], "{:.2f}")}×</td></tr>'
        "</tbody></table>"
    )
    return pers + mer + dep


def render_html(report: Mapping[str, Any]) -> str:
    """The HTML page for a document made by :func:`~deltaplane.report.summary.build_report`."""
    runs = report["runs"]
    summary = report["summary"]
    # privacy/safety columns only where some run has them (a clean fp32 run has no ε, no attack)
    columns = [
        c
        for c in _COLUMNS
        if c[1] not in ("epsilon", "dp_adjacency", "rejected", "backdoor_success", "accuracy_drop_points")
        or any(row.get(c[1]) for row in summary)
    ]
    head = "".join(f"<th>{escape(h)}</th>" for h, _, _ in columns)
    body = "".join(
        "<tr>"
        + "".join(
            _cell(fmt, _neg(row.get(key)) if key == "accuracy_drop_points" else row.get(key))
            for _, key, fmt in columns
        )
        + "</tr>"
        for row in summary
    )
    notes = "".join(
        f'<p class="stopped"><b>{escape(row["name"])}</b>: {escape(row["stopped"])}. The report holds every '
        "round done before the stop.</p>"
        for row in summary
        if row.get("stopped")
    )
    notes += "".join(
        f'<p class="warn">Warning: <b>{escape(row["name"])}</b> is {_num(row["accuracy_drop_points"], "{:.2f}")} accuracy '
        "points below the baseline; read its byte ratio with that in mind.</p>"
        for row in summary
        if (row.get("accuracy_drop_points") or 0) >= 1.0
    )
    charts = "".join(f"<div>{c}</div>" for c in report_charts(runs))
    configs = "".join(
        f"<details><summary>config of {escape(run['name'])}</summary>"
        f"<pre>{escape(json.dumps(run['config'], indent=2, sort_keys=True))}</pre></details>"
        for run in runs
    )
    baseline = report.get("baseline")
    note = f"Ratios are against the run <b>{escape(baseline)}</b>." if baseline else "No baseline run."
    title = escape(str(report.get("title", "deltaplane report")))
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head><body>'
        f"<h1>{title}</h1>"
        f"<h2>Summary</h2>{notes}<p>{note} Bytes are real payload lengths, headers included.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f'<h2>Rounds</h2><div class="charts">{charts}</div>'
        + _device_cost_section(runs)
        + _drift_section(runs)
        + _followup_sections(report.get("followup"))
        + f"<h2>Configurations</h2>{configs}</body></html>\n"
    )
