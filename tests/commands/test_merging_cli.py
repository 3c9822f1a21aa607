"""`deltaplane merge CONFIG -o OUT` through a Typer app built with commands.merging.register."""

from pathlib import Path

import torch
import typer
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from deltaplane.commands.merging import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("version")
    def _version() -> None:  # a second command so typer keeps `merge` as a subcommand
        pass

    return app


def test_merge_command_writes_model(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 3, generator=g)}
    for name, sd in {"base": base, "a": {"w": base["w"] + 1}, "b": {"w": base["w"] - 0.5}}.items():
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": "base",
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 2.0}}]}  # fmt: skip
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(_app(), ["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "merged 1 tensors" in res.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.allclose(out["w"], base["w"] + 1.0 - 1.0, atol=1e-6)  # +1·1 + 2·(−0.5)
    # one row (3 elements) per chunk: the same model
    args = ["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out2"), "--chunk-elements", "3", "-q"]
    assert CliRunner().invoke(_app(), [*args, "--threads", "2"]).exit_code == 0
    assert torch.equal(load_file(tmp_path / "out2" / "model.safetensors")["w"], out["w"])
    res = CliRunner().invoke(_app(), [*args, "--threads", "0", "--overwrite"])
    assert res.exit_code == 2 and "--threads" in res.output
    bad = ["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out3"), "--chunk-elements", "0"]
    res = CliRunner().invoke(_app(), bad)
    assert res.exit_code == 2 and "chunk_elements must be positive" in res.output


def test_merge_command_reports_errors_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("merge_method: [unclosed\n")
    res = CliRunner().invoke(_app(), ["merge", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "bad.yaml: invalid YAML" in res.output
    assert not (tmp_path / "out").exists()


def test_bad_shard_size(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        _app(), ["merge", str(tmp_path / "x.yaml"), "-o", str(tmp_path / "o"), "--max-shard-size", "lots"]
    )
    assert res.exit_code == 2 and "size must look like" in res.output


def test_a_shard_size_beyond_the_float_range_is_a_usage_error(tmp_path: Path) -> None:
    """Before: --max-shard-size inf (or 1e309, 1e400GB) ended in an OverflowError traceback (exit 1)."""
    for size in ("inf", "1e309", "1e400GB", "nan"):
        res = CliRunner().invoke(
            _app(), ["merge", str(tmp_path / "x.yaml"), "-o", str(tmp_path / "o"), "--max-shard-size", size]
        )
        assert res.exit_code == 2, (size, res.output, res.exception)
        assert "size must look like 5GB, 500MB or 1000000" in res.output and repr(size) in res.output


def test_error_with_brackets_is_printed_verbatim(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": "[gone]"}]})
    )
    res = CliRunner().invoke(_app(), ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2 and "[gone]" in res.output


def test_an_output_under_a_file_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    """Before: `-o afile/x` was a FileExistsError traceback (exit 1), `-o afile` 'output folder already exists'."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, words in ((afile, "afile' is a file, not a folder"), (afile / "x", "cannot be created")):
        res = CliRunner().invoke(_app(), ["merge", str(tmp_path / "m.yaml"), "-o", str(out)])
        assert res.exit_code == 2 and words in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    assert afile.read_text() == "mine"


def test_a_bad_config_is_refused_before_the_progress_bar(tmp_path: Path) -> None:
    """Before: the bar ('merge ━━━ 0/?') was drawn, then the error printed under it. Now every check the config
    allows runs first: the error is the only output, exit 2, and nothing is written."""
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.zeros(2, 2)}, tmp_path / name / "model.safetensors")
    models = [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "base", "parameters": {"weight": 1.0}}]
    bad = {
        "unknown method": (
            {"merge_method": "nosuch", "models": models},
            "c.yaml: unknown merge method 'nosuch'",
        ),
        "missing model": (
            {"merge_method": "linear", "models": [*models, {"model": "gone"}]},
            "gone' not found",
        ),
        "bad weight": (
            {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": "x"}}, models[1]]},
            "'weight' must be a finite float",
        ),
        "bad density": (
            {
                "merge_method": "ties",
                "base_model": "base",
                "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 7}}],
            },
            "'density' must be in [0, 1]",
        ),
        "della density ± epsilon": (  # was checked per tensor, during the merge, under the bar
            {
                "merge_method": "della",
                "base_model": "base",
                "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.15}}],
            },
            "c.yaml, model 0: DELLA needs density ± epsilon inside (0, 1)",
        ),
    }
    for case, (cfg, words) in bad.items():
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        res = CliRunner().invoke(_app(), ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out")])
        assert res.exit_code == 2, (case, res.output)
        assert res.output.startswith("error:") and words in res.output, (case, res.output)
        assert "━" not in res.output and "0/?" not in res.output, (case, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base", "c.yaml"]


def test_an_output_folder_holding_an_input_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    """Before: `--overwrite` with -o an input model's folder (or a folder above the inputs, or the config's) merged,
    then replaced that folder with the output: the input models were deleted."""
    (tmp_path / "zoo").mkdir()
    for name in ("base", "a", "zoo/b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2, 2)}, tmp_path / name / "model.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": "base",
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "zoo/b", "parameters": {"weight": 1.0}}]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out, held in (("a", "a"), ("zoo", "zoo/b"), ("base", "base"), (".", "base")):
        res = CliRunner().invoke(
            _app(), ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / out), "--overwrite", "-q"]
        )
        assert res.exit_code == 2, (out, res.output)
        assert "holds the input" in res.output and f"{held}/model.safetensors" in res.output, (
            out,
            res.output,
        )
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    # an output inside an input's folder replaces nothing of it: allowed
    res = CliRunner().invoke(
        _app(), ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "a" / "merged")]
    )
    assert res.exit_code == 0, res.output
    assert torch.equal(load_file(tmp_path / "a" / "model.safetensors")["w"], torch.ones(2, 2))


def test_the_working_directory_as_output_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Before: `-o . --overwrite` from a folder holding no input merged, then failed to move the working directory
    aside (EBUSY, exit 1) and left a hidden '..old-XXXX' folder behind with the folder's files in it."""
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2, 2)}, tmp_path / name / "model.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", ".."):
        res = CliRunner().invoke(_app(), ["merge", str(tmp_path / "c.yaml"), "-o", out, "--overwrite", "-q"])
        assert res.exit_code == 2, (out, res.output)
        assert "is the working directory or holds it" in " ".join(res.output.split()), res.output
    assert sorted(p.name for p in (tmp_path / "work").rglob("*")) == ["notes.txt", "sub"]
