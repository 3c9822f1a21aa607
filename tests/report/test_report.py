import json
import math
import re
from pathlib import Path

import pytest

from deltaplane.errors import ConfigError
from deltaplane.report import REPORT_FORMAT, build_report, load_report, summarize, write_report


def _run(name: str, codec: str, per_round_bytes: int, accs: list[float], clients: int = 4) -> dict:
    rounds = [
        {
            "round": i + 1,
            "clients": clients,
            "test_accuracy": a,
            "client_accuracy_mean": a - 0.01,
            "client_accuracy_min": a - 0.1,
            "uplink_bytes": per_round_bytes,
            "downlink_bytes": 2 * per_round_bytes,
            "cumulative_uplink_bytes": per_round_bytes * (i + 1),
            "cumulative_downlink_bytes": 2 * per_round_bytes * (i + 1),
            "seconds": 0.5,
        }
        for i, a in enumerate(accs)
    ]
    return {
        "name": name,
        "config": {"codec": codec, "clients": clients},
        "num_params": 1000,
        "raw_update_bytes": 4000,
        "wall_time_s": 1.5,
        "final": rounds[-1],
        "rounds": rounds,
    }


RUNS = [
    _run("baseline", "identity", 4 * 4100, [0.5, 0.8, 0.9]),
    _run("compressed", "topk(0.01) | quant(bits=8)", 4 * 82, [0.3, 0.7, 0.89]),
]


def test_summary_rows_and_ratios() -> None:
    base, comp = summarize(RUNS, baseline="baseline")
    assert (base.name, base.codec, base.rounds, base.final_accuracy) == ("baseline", "identity", 3, 0.9)
    assert base.ratio_vs_baseline == 1.0
    assert comp.uplink_bytes == 3 * 4 * 82
    assert comp.ratio_vs_baseline == pytest.approx(4100 / 82)
    assert comp.ratio_vs_raw == pytest.approx(4000 / 82)  # 12 updates of 4000 raw bytes each
    assert comp.client_accuracy_min == pytest.approx(0.79)
    assert [r.ratio_vs_baseline for r in summarize(RUNS)] == [None, None]


def test_bad_runs_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one run"):
        summarize([])
    with pytest.raises(ConfigError, match="unique"):
        summarize([RUNS[0], RUNS[0]])
    with pytest.raises(ConfigError, match="baseline 'fp32'"):
        summarize(RUNS, baseline="fp32")
    broken = {k: v for k, v in RUNS[0].items() if k != "rounds"}
    with pytest.raises(ConfigError, match="rounds"):
        summarize([broken])


def test_write_report_files_exist_and_parse(tmp_path: Path) -> None:
    files = write_report(RUNS, tmp_path / "out", baseline="baseline", title="test run")
    assert files.json_path == tmp_path / "out" / "report.json"
    doc = json.loads(files.json_path.read_text())
    assert doc == load_report(files.json_path) == files.report
    assert doc["format"] == REPORT_FORMAT and doc["baseline"] == "baseline"
    assert [r["name"] for r in doc["runs"]] == ["baseline", "compressed"]
    assert doc["summary"][1]["ratio_vs_baseline"] == pytest.approx(4100 / 82)

    html = files.html_path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<title>test run</title>" in html
    assert "topk(0.01) | quant(bits=8)" in html
    assert "50.0×" in html  # the ratio vs baseline, formatted
    # each ratio says what it divides (the terminal's is the first): "ratio vs raw fp32" read as the same figure
    assert "<th>uplink vs baseline run</th>" in html and "<th>uplink vs raw fp32 tensors</th>" in html
    # self-contained: inline SVG charts (accuracy, clients, accuracy vs bytes, bytes, time), nothing external
    charts = re.findall(r'<svg [^>]*id="(chart-[a-z_-]+)"', html)
    assert charts[:4] == ["chart-accuracy", "chart-clients", "chart-accuracy-bytes", "chart-bytes"]
    assert charts[-1] == "chart-seconds"
    assert "chart-epsilon" not in charts  # no run recorded ε: no empty chart
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "<img" not in html
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_nan_becomes_null_and_html_escapes(tmp_path: Path) -> None:
    run = _run("<b>x</b>", "identity", 100, [0.5])
    run["final"] = dict(run["final"], client_accuracy_min=float("nan"))
    files = write_report([run], tmp_path)
    assert json.loads(files.json_path.read_text())["summary"][0]["client_accuracy_min"] is None
    html = files.html_path.read_text()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


def test_a_report_whose_last_round_scored_no_device_summarizes_again(tmp_path: Path) -> None:
    """A final round that scored no device's held-out data (``client_eval_every``, or a Poisson round that sampled
    nobody) is null in report.json: summarizing that report again (the dashboard, ``deltaplane report``) gave
    ``float(None)``, a TypeError; it is NaN again, written back as null."""
    run = _run("r", "identity", 100, [0.5])
    run["final"] = dict(run["final"], client_accuracy_mean=None, client_accuracy_min=None)
    row = summarize([run])[0]
    assert math.isnan(row.client_accuracy_mean) and math.isnan(row.client_accuracy_min)
    files = write_report([run], tmp_path)
    assert json.loads(files.json_path.read_text())["summary"][0]["client_accuracy_mean"] is None


def test_load_report_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"format": 99}')
    with pytest.raises(ConfigError, match="not a deltaplane report"):
        load_report(tmp_path / "a.json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_report(tmp_path / "missing.json")


def test_a_deeply_nested_report_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="cannot read report .*nested too deeply"):
        load_report(path)


def test_build_report_keeps_runs_verbatim() -> None:
    doc = build_report(RUNS, baseline="baseline")
    assert doc["runs"] == RUNS


def test_a_secagg_run_shows_what_was_really_sent() -> None:
    """SecAgg uploads masked ring values, not the codec's payload: the summary says so (issue 22)."""
    from deltaplane.report.summary import sent_codec

    assert sent_codec({"codec": "topk(0.01)", "secagg": False}) == "topk(0.01)"
    assert sent_codec({"codec": "identity", "secagg": True, "secagg_bits": 20}) == (
        "SecAgg masked 20-bit ring values (of identity)"
    )
    run = _run("secure", "identity", 100, [0.5])
    run["config"] = dict(run["config"], secagg=True, secagg_bits=16)
    (row,) = summarize([run])
    assert row.codec.startswith("SecAgg masked 16-bit ring values")


@pytest.mark.parametrize(
    "ys",
    [
        [1e308, -1e308],  # finite, but the span overflows to inf
        [0.0, 5e-324],  # a span below the float resolution of a tick step
        [0.5],  # one point
        [0.5, 0.5, 0.5],  # constant
        [-3.0, -1.0, -2.0],  # negative
    ],
)
def test_line_chart_draws_or_says_why_for_any_finite_values(ys: list[float]) -> None:
    from deltaplane.report.svg import Series, line_chart

    svg = line_chart([Series("s", list(enumerate(ys)))], title="t", x_label="x", y_label="y")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "nan" not in svg and "inf" not in svg  # no coordinate is NaN or infinite


def test_report_charts_of_a_run_without_rounds_are_empty_not_a_key_error() -> None:
    from deltaplane.report.charts import report_charts

    charts = report_charts([{"name": "r", "config": {"codec": "identity"}}])
    assert charts and all("no data" in c for c in charts)


def test_the_drift_section_escapes_what_it_prints_and_shows_unmeasured_psi(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    run = _run("d", "identity", 100, [0.5])
    run["drift"] = [
        {"round": evil, "prediction_psi": None, "max_feature_psi": float("nan"), "alerts": [evil]},
        {"round": 2, "prediction_psi": 0.25, "max_feature_psi": 0.5, "alerts": []},
    ]
    run["transport"] = {"requests": evil, "uploads_accepted": evil, "registry_ok": True}
    html = write_report([run], tmp_path).html_path.read_text()
    drift = html[html.index("<h2>Drift</h2>") :]
    assert "<script>" not in html and drift.count("&lt;script&gt;") == 4
    assert drift.count('<td class="num">—</td>') == 2  # None, and NaN (written to report.json as null)
    assert '<td class="num">0.250</td><td class="num">0.500</td>' in drift


def test_a_report_that_cannot_be_rendered_leaves_the_folder_as_it_was(tmp_path: Path, monkeypatch) -> None:
    write_report(RUNS, tmp_path, baseline="baseline", title="first")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(report: dict) -> str:
        raise ValueError("a chart cannot draw this")

    monkeypatch.setattr("deltaplane.report.writer.render_html", broken)
    with pytest.raises(ValueError, match="cannot draw"):
        write_report(RUNS[:1], tmp_path, title="second")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no new json beside the old html
    with pytest.raises(ValueError, match="cannot draw"):
        write_report(RUNS[:1], tmp_path / "new")
    assert not (tmp_path / "new" / "report.json").exists()


def test_every_number_in_the_followup_and_device_cost_sections_is_escaped(monkeypatch) -> None:
    # a report document is JSON that may have been edited: text where a number belongs shows as text. The counts
    # and figures of the follow-up and device-cost sections were interpolated raw (a device count of
    # '<script>' went into the page as markup)
    from deltaplane.report import html as report_html

    evil = "<script>alert(1)</script>"
    monkeypatch.setattr(report_html, "personalization_png", lambda clients: b"png")
    pers = {
        "devices": evil,
        "epochs": evil,
        "method": "alpha",
        "devices_personalized": evil,
        "global_accuracy_mean": 0.5,
        "global_accuracy_min": evil,
        "personal_accuracy_mean": 0.625,
        "personal_accuracy_min": None,
        "gain_mean": 0.125,
        "gain_min": evil,
        "clients": [],
    }
    merged = {"models": evil, "base": "global model", "results": {"ties": {"test_accuracy": evil}}}
    deploy = {
        "prune": 0.8,
        "finetune_epochs": evil,
        "quant_scheme": "int8",
        "out_dir": "out",
        "files": ["model.onnx"],
        "gates_passed": evil,
        "fp32_safetensors_bytes": 12345,
        "artifact_bytes": evil,
        "compression_ratio": evil,
        "accuracy_fp32": 0.9,
        "accuracy_compressed": evil,
        "accuracy_drop_points": evil,
        "latency_ratio_batch1": evil,
    }
    html = report_html._followup_sections({"personalization": pers, "merge": merged, "deploy": deploy})
    assert "<script>" not in html and html.count("&lt;script&gt;") == 14
    # numbers still read as before
    assert "50.00%" in html and "62.50%" in html and "+12.50 points" in html and "12,345 B" in html
    cost = {
        "mean": {
            "train_macs": evil,
            "compute_uj": 2500.0,
            "bytes_up": 1000,
            "bytes_down": evil,
            "radio_uj": {"wifi": evil},
            "total_uj": {"wifi": 1500.0},
        },
        "sources": {"links": {"wifi": "a paper"}, "profile": "phone"},
        "profile": "phone",
        "train_samples_per_device": evil,
        "local_epochs": evil,
        "forward_macs_per_sample": evil,
        "note": "estimates",
    }
    html = report_html._device_cost_section([{"name": "r", "device_cost": cost}])
    assert "<script>" not in html and html.count("&lt;script&gt;") == 6
    assert '<td class="num">2.50</td>' in html and '<td class="num">1,000</td>' in html


def test_the_summary_gives_each_runs_change_against_the_baseline_with_its_sign() -> None:
    """make run's report.html printed "points below baseline: -0.28" for a compressed run 0.28 point above its
    baseline (a double negative); the column is now the change, +0.28 above and -1.00 below, as the report's
    deploy section and the terminal print a change."""
    from deltaplane.report import render_html

    runs = [_run("baseline", "identity", 4100, [0.9]), _run("above", "sign", 82, [0.9028])]
    runs.append(_run("below", "sign", 82, [0.89]))
    html = render_html(build_report(runs, baseline="baseline"))
    assert "<th>points vs baseline</th>" in html and "below baseline" not in html
    cells = {n: re.search(rf"<td>{n}</td>(.*?)</tr>", html).group(1) for n in ("above", "below")}
    assert ">+0.28<" in cells["above"] and ">-1.00<" in cells["below"], cells


def test_epsilon_is_shown_with_the_neighbours_it_holds_for(tmp_path: Path) -> None:
    """report.json's rounds carry ``dp_adjacency`` (RoundMetrics); the summary, report.html and the dashboard's
    run page show it beside ε, so a distributed-DP run's ε is not read as an add/remove guarantee."""
    from deltaplane.ui.pages import _rounds_table

    run = _run("distributed", "identity", 100, [0.5, 0.6])
    for i, r in enumerate(run["rounds"]):
        r |= {"epsilon": 1.5 * (i + 1), "dp_adjacency": "zero-out"}
    files = write_report([run, _run("plain", "identity", 100, [0.5, 0.6])], tmp_path / "out")
    assert [row["dp_adjacency"] for row in files.report["summary"]] == ["zero-out", None]
    html = files.html_path.read_text()
    assert "<th>ε neighbours</th>" in html and ">zero-out<" in html
    page = _rounds_table(run["rounds"], "rounds")
    assert "<th>ε neighbours</th>" in page and 'data-field="dp_adjacency">zero-out<' in page
    assert (
        "ε neighbours" not in write_report(RUNS, tmp_path / "plain").html_path.read_text()
    )  # no DP: no column
