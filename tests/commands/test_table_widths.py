"""Every table the CLI prints, at 80 columns: each column's header and key cells are there whole.

A newcomer at an 80-column terminal found `registry list` printing each version's whole run config in its
lineage column (a screen per row) and `deltaplane run`'s results losing their last column: rich shrinks every
column evenly once its own collapse stalls, cutting numbers to ``0.96…`` and cropping ``time`` unannounced.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane import cli
from deltaplane.commands import console
from deltaplane.engine.config import RunConfig
from deltaplane.registry import Registry

WIDTH = 80


def _render(tables: list, width: int = WIDTH) -> str:
    out = Console(width=width, file=io.StringIO(), color_system=None)
    for table in tables:
        out.print(table)
    return out.file.getvalue()


def _fits(text: str, width: int = WIDTH) -> None:
    """Nothing cut: no line wider than the terminal, no cell ended in rich's ellipsis."""
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= width, text


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column terminal for the shared console and for the consoles commands create (COLUMNS)."""
    monkeypatch.setattr(console, "_width", WIDTH)
    monkeypatch.setenv("COLUMNS", str(WIDTH))


RUNS = [
    {"name": "baseline", "codec": "identity", "final_accuracy": 0.9666, "client_accuracy_mean": 0.961,
     "client_accuracy_min": 0.9, "uplink_bytes": 176_000_000, "downlink_bytes": 176_000_000,
     "ratio_vs_baseline": 1.0, "ratio_vs_raw": 1.0, "wall_time_s": 123.4},
    {"name": "compressed", "codec": "stc(0.006) | quant(bits=8)", "final_accuracy": 0.9694,
     "client_accuracy_mean": 0.962, "client_accuracy_min": 0.91, "uplink_bytes": 505_000,
     "downlink_bytes": 176_000_000, "ratio_vs_baseline": 348.2, "ratio_vs_raw": 348.2, "wall_time_s": 1234.5},
]  # fmt: skip
RUN_CELLS = ("0.9666", "0.9694", "0.961 / 0.900", "0.962 / 0.910", "176.00 MB", "505.00 kB", "348.2×", "123.4 s",
             "1234.5 s", "baseline", "compressed", "identity", "stc(0.006)", "quant(bits=8)")  # fmt: skip
RUN_HEADERS = (
    "run",
    "codec",
    "test",
    "acc",
    "client acc",
    "mean / min",
    "uplink",
    "downlink",
    "vs fp32",
    "time",
)


def test_run_results_keep_every_column_at_80() -> None:
    text = _render(cli._summary_tables(RUNS, "FedAvg + alpha_mix", "digits", width=WIDTH))
    _fits(text)
    for word in (*RUN_HEADERS, *RUN_CELLS):
        assert word in text, word
    assert "privacy and safety" not in text  # nothing to move: one table


def test_privacy_columns_move_to_their_own_table_when_they_do_not_fit() -> None:
    rows = [
        {**RUNS[0], "epsilon": None, "rejected": 0, "backdoor_success": None},
        {**RUNS[1], "epsilon": 3.2, "rejected": 4, "backdoor_success": 0.12, "stopped": True},
    ]
    text = _render(cli._summary_tables(rows, "FedAvg + clip(1.0)", "digits", width=WIDTH))
    _fits(text)
    for word in (*RUN_HEADERS, *RUN_CELLS, "ε", "rejected", "backdoor", "3.200", "0.120", "(stopped)"):
        assert word in text, word
    assert "privacy and safety" in text
    wide = _render(cli._summary_tables(rows, "FedAvg + clip(1.0)", "digits", width=200), width=200)
    assert "privacy and safety" not in wide and "1234.5 s" in wide and "3.200" in wide  # room: one table


def test_device_cost_and_followup_tables_fit_80() -> None:
    mean = {"train_macs": 164.6e6, "compute_uj": 760.0, "bytes_up": 73_410, "bytes_down": 73_530,
            "total_uj": {"wifi": 259_360.0, "lte": 473_130.0}}  # fmt: skip
    results = [{"name": "personalized-ditto-compressed", "device_cost": {"profile": "phone", "mean": mean}}]
    text = _render([cli._device_cost_table(results, width=WIDTH)])
    _fits(text)
    for word in ("training", "MACs", "mJ", "sent", "received", "total mJ", "wifi", "lte", "164.6 M", "0.76",
                 "73.41 kB", "259.36", "473.13", "personalized"):  # fmt: skip
        assert word in text, word
    after = {
        "personalization": {"method": "alpha_mix", "in_round": True, "epochs": 2, "devices": 20,
                            "devices_personalized": 20, "global_accuracy_mean": 0.9, "global_accuracy_min": 0.8,
                            "personal_accuracy_mean": 0.95, "personal_accuracy_min": 0.85, "gain_mean": 0.05,
                            "gain_min": -0.01},
        "merge": {"models": 20, "results": {"ties": {"test_accuracy": 0.91, "mean_device_accuracy": 0.9}}},
        "deploy": {"prune": 0.5, "quant": "int8", "gates_passed": 7, "artifact": "out/deploy/model.onnx",
                   "fp32_safetensors_bytes": 73_960, "artifact_bytes": 9_870, "compression_ratio": 7.49,
                   "accuracy_fp32": 0.9638, "accuracy_compressed": 0.961, "accuracy_drop_points": 0.28,
                   "latency_ratio_batch1": 1.23},
    }  # fmt: skip
    text = _render(cli._followup_tables(after))
    _fits(text)
    for word in ("device acc mean", "device acc min", "0.9500 (+5.00)", "0.8500 (+5.00)", "test acc",
                 "ties", "fp32 safetensors", "artifact", "smaller", "acc fp32", "acc artifact", "latency b=1",
                 "73.96 kB", "9.87 kB", "7.49×", "0.9610 (-0.28)", "1.23×"):  # fmt: skip
        assert word in text, word


def test_registry_list_summarizes_each_lineage_on_a_line_at_80(registry_cli, tmp_path: Path, narrow) -> None:
    reg = Registry.create(tmp_path / "home")
    config = RunConfig().to_dict()  # what `deltaplane fleet` records as a first version's lineage
    reg.register_model("digits", {"w": torch.zeros(8)}, lineage={"round": 0, "run_config": config})
    reg.register_model(
        "digits",
        {"w": torch.ones(8)},
        parent=1,
        lineage={"round": 5, "uploads": 18, "downlink_codec": "stc(0.006)", "notes": {"a": 1}},
    )
    r = registry_cli("registry", "list")
    assert r.exit_code == 0, r.output
    _fits(r.output)
    header = next(line for line in r.output.splitlines() if "ref" in line)
    for word in ("ref", "kind", "parent", "size", "tags", "lineage", "cohorts", "created"):
        assert word in header, header
    for word in ("digits@1", "digits@2", "model", "round 0", "round 5", "stc(0.006)", "+1", "registry show"):
        assert word in r.output, word
    assert "aggregator" not in r.output and "{" not in r.output  # the run config is summarized, not printed
    assert len(r.output.splitlines()) < 20, r.output
    # the machine interface keeps the whole record
    listed = json.loads(registry_cli("registry", "list", "--json").output)
    assert listed[0]["lineage"] == json.loads(json.dumps({"round": 0, "run_config": config}))
    assert listed[1]["lineage"]["notes"] == {"a": 1}
    shown = registry_cli("registry", "show", "digits@1")
    assert shown.exit_code == 0 and '"aggregator": "fedavg"' in shown.output and "…" not in shown.output


def test_extract_lora_names_every_layer_whole_at_80(tmp_path: Path, narrow) -> None:
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
    base = {n: torch.randn(24, 24, generator=g) for n in names}
    ft = {
        n: w + 0.1 * torch.randn(24, 1, generator=g) @ torch.randn(1, 24, generator=g)
        for n, w in base.items()
    }
    for folder, state in (("base", base), ("ft", ft)):
        (tmp_path / folder).mkdir()
        save_file(state, tmp_path / folder / "model.safetensors")
    r = CliRunner().invoke(
        cli.app,
        ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "base"), "--rank", "2", "-o",
         str(tmp_path / "lora")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table = r.output.split("extracted")[0]
    _fits(table)
    for word in ("layer", "shape", "rank", "rel. error", "energy kept", "svd", "24x24"):
        assert word in table, word
    # a name too long for its column folds onto the next line: the column read top to bottom has each whole
    layer_column = "".join(line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│"))
    assert all(name in layer_column for name in names), layer_column


def test_compress_table_fits_80(tmp_path: Path, narrow) -> None:
    from deltaplane.commands import codecs

    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(64, 32, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"fc.weight": base["fc.weight"] + 0.01}, tmp_path / "new.safetensors")
    app = typer.Typer()
    codecs.register(app)
    r = CliRunner().invoke(
        app,
        ["compress", str(tmp_path / "new.safetensors"), "--base", str(tmp_path / "base.safetensors"), "--codec",
         "topk(0.1)", "-o", str(tmp_path / "u.dpln")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table = r.stdout  # the codec and file note goes to stderr
    _fits(table)
    for word in (
        "tensors",
        "values",
        "raw",
        "payload",
        "bytes",
        "ratio",
        "relative",
        "error",
        "2,048",
        "8,192",
    ):
        assert word in table, word


def test_deploy_table_keeps_gate_names_whole_at_80() -> None:
    from deltaplane.commands.deploy import _table

    manifest = {
        "sizes": {"fp32_safetensors_bytes": 90_868_376, "artifact_bytes": 22_123_456, "compression_ratio": 4.11},
        "weight_sparsity": 0.5,
        "fidelity": {"top1_agreement": 0.9931},
        "adversarial": {"metric": "accuracy", "rows": [
            {"attack": "fgsm", "eps": 0.05, "fp32": 0.875, "compressed": 0.8681, "drop_points": 0.69,
             "fp32_loss": 1.092, "compressed_loss": 1.1},
        ]},
        "gates": {
            "results": [{"gate": "max-accuracy-drop", "what": "top-1 disagreement with fp32", "passed": True,
                         "margin": 1.0, "threshold": 2.0, "measured": 0.69}],
            "not_evaluated": [{"gate": "max-ood-drop", "why": "No OOD evaluation: corrupted variants are made "
                               "for image classifiers; a token model is measured on its evaluation text only."}],
        },
    }  # fmt: skip
    text = _render([_table(manifest, "deploy bert-cls: prune=none quant=int8 format=onnx", WIDTH)])
    _fits(text)  # main cut the gate's name to "max-accuracy-dr…"
    for word in ("metric", "fp32", "compressed", "change", "90,868,376", "22,123,456", "4.11× smaller", "0.9931",
                 "max-accuracy-drop", "max-ood-drop", "not evaluated", "1/1 pass", "-0.69 pts"):  # fmt: skip
        assert word in text, word


def test_deploy_table_says_larger_when_the_artifact_outgrows_fp32() -> None:
    """A 13-feature MLP federated from docs/fleet.md: 1,372 fp32 bytes, a 2,000-byte int8 ONNX artifact (graph and
    scales outweigh its weights). Before: "0.69× smaller"; now "1.46× larger", in the table and the card."""
    from deltaplane.commands.deploy import _table
    from deltaplane.deploy.card import size_change

    sizes = {"fp32_safetensors_bytes": 1_372, "artifact_bytes": 2_000, "compression_ratio": 1_372 / 2_000}
    manifest = {
        "sizes": sizes,
        "weight_sparsity": 0.0,
        "fidelity": {},
        "gates": {"passed": True, "results": []},
    }
    text = _render([_table(manifest, "deploy model.safetensors", WIDTH)])
    assert "1.46× larger" in text and "smaller" not in text
    assert size_change(4.11) == "4.11× smaller" and size_change(1.0) == "1.00× smaller"


def _lineage_table(cls: type, **options) -> Table:
    """Three wrapping columns (a long run name, codec and lineage) beside three numbers that must stay whole."""
    t = cls(title="runs", **options)
    for header in ("run", "codec", "lineage"):
        t.add_column(header, overflow="fold")  # as the CLI's tables wrap a long name: folded, never cut
    for header in ("test acc", "uplink", "time"):
        t.add_column(header, justify="right", no_wrap=True)
    t.add_row("personalized-ditto-compressed", "stc(0.006) | quant(bits=8) | zstd",
              "fedavg → ditto(lambda=0.1) → compress at round 40 of 120", "0.9694", "505.00 kB", "1234.5 s")  # fmt: skip
    t.add_row("baseline", "identity", "fedavg", "0.9666", "176.00 MB", "2026-12-06 09:15:03")
    return t


class _Sealed(Table):
    """A rich Table without the private helpers fit_table measured with (``_measure_column``,
    ``_get_padding_width``, ``_extra_width``), as a rich release that renamed them would be."""

    def _measure_column(self, *args, **kw):
        raise AssertionError("fit_table called Table._measure_column")

    def _get_padding_width(self, *args, **kw):
        raise AssertionError("fit_table called Table._get_padding_width")

    @property
    def _extra_width(self):
        raise AssertionError("fit_table read Table._extra_width")


@pytest.mark.parametrize(
    ("options", "fits", "widths"),
    [
        ({}, True, [8, 8, 9]),
        ({"box": box.SIMPLE_HEAD}, True, [8, 8, 9]),
        ({"show_edge": False, "pad_edge": False}, True, [10, 9, 10]),
        ({"box": None}, True, [10, 11, 11]),
        ({"padding": (0, 2)}, False, [None, None, None]),
    ],
)
def test_fit_table_measures_with_public_rich_api_only(options: dict, fits: bool, widths: list) -> None:
    """fit_table used three private rich helpers; it measures with Measurement.get and the table's public
    options now, to the same widths they gave (the numbers are what the helpers gave, rich 14.3)."""
    from deltaplane.commands import fit_table

    sealed = _lineage_table(_Sealed, **options)
    assert fit_table(sealed, WIDTH) is fits
    assert [c.width for c in sealed.columns] == [*widths, None, None, None]
    if fits:  # rendered by rich itself (a plain Table, the same widths): nothing cut, numbers whole
        plain = _lineage_table(Table, **options)
        for column, width in zip(plain.columns, widths, strict=False):
            column.width = width
        text = _render([plain])
        _fits(text)
        for cell in ("0.9694", "505.00 kB", "1234.5 s", "176.00 MB", "2026-12-06"):
            assert cell in text, cell


def test_the_personalization_table_puts_the_worst_device_change_apart_from_the_minimum() -> None:
    """``make run`` printed ``0.9524 (worst -0.09)`` in the 'device acc min' column under a global minimum of
    0.9467: the -0.09 was the worst device's own change, not the minimum's (+0.57), so the row contradicted
    itself. The column now shows the minimum's change, as the mean's column does, and the caption the worst
    device's."""
    after = {
        "personalization": {"method": "alpha_mix", "in_round": True, "epochs": 2, "devices": 20,
                            "devices_personalized": 16, "global_accuracy_mean": 0.9687, "global_accuracy_min": 0.9467,
                            "personal_accuracy_mean": 0.9770, "personal_accuracy_min": 0.9524, "gain_mean": 0.0083,
                            "gain_min": -0.0009},
        "merge": {"models": 20, "results": {}},
        "deploy": {"refused": True, "reasons": ["accuracy"]},
    }  # fmt: skip
    text = " ".join(_render(cli._followup_tables(after)).split())
    assert "personalized 0.9770 (+0.83) 0.9524 (+0.57)" in text, text
    assert "worst device's change -0.09 points" in text, text


def test_the_ratio_column_says_what_it_divides() -> None:
    """The terminal's ratio is against the fp32 baseline run's bytes, report.html's second one against raw fp32
    tensors: two "vs fp32" figures a little apart (347.7× and 347.5×) confused a reader; the header now names
    the fp32 run, or raw fp32 where there is no baseline and the ratio falls back to it."""

    def headers(rows: list[dict]) -> list[str]:
        return [str(c.header) for c in cli._summary_tables(rows, "FedAvg", "digits", width=WIDTH)[0].columns]

    assert "vs fp32\nrun" in headers(RUNS)
    alone = [{**r, "ratio_vs_baseline": None} for r in RUNS[1:]]  # --no-baseline
    assert "vs raw\nfp32" in headers(alone) and "vs fp32\nrun" not in headers(alone)
