"""`deltaplane compress` / `decompress` driven through a Typer app, on safetensors files."""

import re
from pathlib import Path

import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltaplane as dp
from deltaplane.commands.codecs import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _files(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(64, 32, generator=g), "fc.bias": torch.randn(64, generator=g)}
    new = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(new, tmp_path / "new.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "new.safetensors", base, new


def test_compress_then_decompress_round_trip(tmp_path: Path) -> None:
    base_p, new_p, base, new = _files(tmp_path)
    runner = CliRunner()
    out = tmp_path / "u.dpln"
    spec = "policy(rules='*.bias: fp16; *: quant(bits=8)') | zstd"
    r = runner.invoke(
        _app(),
        [
            "compress",
            str(new_p),
            "--base",
            str(base_p),
            "--codec",
            spec,
            "-o",
            str(out),
            "--base-id",
            "m",
            "--base-version",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ratio" in r.output
    payload = out.read_bytes()
    assert dp.read_header(payload).base_version == 3
    assert len(payload) < 0.4 * (64 * 32 + 64) * 4

    model = tmp_path / "model.safetensors"
    r = runner.invoke(
        _app(), ["decompress", str(out), "--base", str(base_p), "-o", str(model), "--expect-base-id", "m"]
    )
    assert r.exit_code == 0, r.output
    got = load_file(model)
    for k in new:
        assert float((got[k] - new[k]).abs().max()) < 0.01 * 4 / 127 + 1e-3

    delta_p = tmp_path / "delta.safetensors"
    r = runner.invoke(_app(), ["decompress", str(out), "-o", str(delta_p)])
    assert r.exit_code == 0, r.output
    d = dp.Delta.load(delta_p)
    assert torch.allclose(d["fc.weight"] + base["fc.weight"], got["fc.weight"])


def test_errors_are_reported_without_writing(tmp_path: Path) -> None:
    base_p, new_p, _, _ = _files(tmp_path)
    runner = CliRunner()
    out = tmp_path / "u.dpln"
    r = runner.invoke(
        _app(), ["compress", str(new_p), "--base", str(base_p), "--codec", "topk(2)", "-o", str(out)]
    )
    assert r.exit_code == 2 and "ratio must be in (0, 1]" in r.output
    assert not out.exists()
    runner.invoke(
        _app(),
        [
            "compress",
            str(new_p),
            "--base",
            str(base_p),
            "--codec",
            "fp16",
            "-o",
            str(out),
            "--base-version",
            "2",
        ],
    )
    r = runner.invoke(
        _app(), ["decompress", str(out), "-o", str(tmp_path / "x.safetensors"), "--expect-base-version", "5"]
    )
    assert r.exit_code == 1 and "v2" in r.output  # a failure of the input, not of the command line
    bad = tmp_path / "bad.dpln"
    bad.write_bytes(out.read_bytes()[:-3])
    r = runner.invoke(_app(), ["decompress", str(bad), "-o", str(tmp_path / "y.safetensors")])
    assert r.exit_code == 1 and "invalid deltaplane payload" in r.output
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_a_folder_given_as_the_output_file_is_a_usage_error(tmp_path: Path) -> None:
    """Before: the whole compression ran, then exit 1 on '[Errno 21] Is a directory: .../.adir.x.tmp -> adir'."""
    base_p, new_p, _, _ = _files(tmp_path)
    folder = tmp_path / "adir"
    folder.mkdir()
    runner = CliRunner()
    r = runner.invoke(
        _app(), ["compress", str(new_p), "--base", str(base_p), "--codec", "topk(0.1)", "-o", str(folder)]
    )
    assert r.exit_code == 2 and "is a directory" in _unboxed(r.output), r.output
    payload = tmp_path / "u.dpln"
    args = ["compress", str(new_p), "--base", str(base_p), "--codec", "topk(0.1)", "-o", str(payload)]
    assert runner.invoke(_app(), args).exit_code == 0
    r = runner.invoke(_app(), ["decompress", str(payload), "-o", str(folder)])
    assert r.exit_code == 2 and "is a directory" in _unboxed(r.output), r.output
    # a folder given as the payload is a usage error too (it was exit 1, "[Errno 21]"); as --base, a folder
    # without a checkpoint in it is one, saying what it lacks (a checkpoint folder is read: see below)
    out = tmp_path / "d.safetensors"
    for args, said in ((["decompress", str(folder), "-o", str(out)], "is a directory"),
                       (["decompress", str(payload), "--base", str(folder), "-o", str(out)], "holds neither"),
                       (["compress", str(new_p), "--base", str(folder), "--codec", "topk(0.1)", "-o", str(out)],
                        "holds neither")):  # fmt: skip
        r = runner.invoke(_app(), args)
        assert r.exit_code == 2 and said in _unboxed(r.output), (args, r.output)
    assert not out.exists()
    assert (
        list(folder.iterdir()) == []
        and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    )


def _unboxed(text: str) -> str:
    """Typer's error box, as one line of words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_an_output_under_a_file_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    """Before: compress -o afile/x.dpln exited 1 with '[Errno 17] File exists: 'afile''."""
    base_p, new_p, _, _ = _files(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    runner = CliRunner()
    args = [
        "compress",
        str(new_p),
        "--base",
        str(base_p),
        "--codec",
        "topk(0.1)",
        "-o",
        str(afile / "x.dpln"),
    ]
    r = runner.invoke(_app(), args)
    assert r.exit_code == 2 and "is a file, not a folder" in _unboxed(r.output), r.output
    payload = tmp_path / "u.dpln"
    args = ["compress", str(new_p), "--base", str(base_p), "--codec", "topk(0.1)", "-o", str(payload)]
    assert runner.invoke(_app(), args).exit_code == 0
    r = runner.invoke(_app(), ["decompress", str(payload), "-o", str(afile / "d.safetensors")])
    assert r.exit_code == 2 and "is a file, not a folder" in _unboxed(r.output), r.output
    assert afile.read_text() == "not a folder"


def test_a_checkpoint_with_boolean_and_integer_buffers_round_trips_exactly(tmp_path: Path) -> None:
    """A boolean buffer (a causal mask, a pruning mask) made Delta.between raise torch's RuntimeError ("Subtraction
    ... with two bool tensors is not supported"): `compress` ended in a traceback. The change of a boolean tensor
    is which values flipped (XOR), and applying it flips them back."""
    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(8, 4, generator=g),
        "mask": torch.tensor([True, False, True, False]),
        "steps": torch.tensor(7),
    }
    new = {"w": base["w"] + 0.5, "mask": torch.tensor([True, True, False, False]), "steps": torch.tensor(9)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(new, tmp_path / "new.safetensors")
    runner = CliRunner()
    args = ["--base", str(tmp_path / "base.safetensors")]
    r = runner.invoke(
        _app(),
        [
            "compress",
            str(tmp_path / "new.safetensors"),
            *args,
            "--codec",
            "identity",
            "-o",
            str(tmp_path / "u"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        _app(), ["decompress", str(tmp_path / "u"), *args, "-o", str(tmp_path / "out.safetensors")]
    )
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out.safetensors")
    for k in ("mask", "steps"):
        assert got[k].dtype == new[k].dtype and torch.equal(got[k], new[k]), k
    assert torch.allclose(got["w"], new["w"])


def test_a_delta_is_applied_only_to_the_base_it_was_taken_against(tmp_path: Path) -> None:
    """Before, `decompress --base other` wrote other + delta (a model nobody trained) without a word, and a
    saved delta file recorded nothing that could tell. Now compress records the base's fingerprint, the
    delta file keeps it, and `decompress --base` / `apply --base` refuse another base unless told."""
    base_p, new_p, base, new = _files(tmp_path)
    other = {k: v + 1.0 for k, v in base.items()}  # the same layout: only the fingerprint tells them apart
    other_p = tmp_path / "other.safetensors"
    save_file(other, other_p)
    runner = CliRunner()
    payload = tmp_path / "u.dpln"
    r = runner.invoke(
        _app(), ["compress", str(new_p), "--base", str(base_p), "--codec", "identity", "-o", str(payload)]
    )
    assert r.exit_code == 0, r.output
    fp = dp.base_fingerprint(base)
    assert dp.read_header(payload.read_bytes()).meta == {"deltaplane.base_sha256": fp}
    out = tmp_path / "model.safetensors"

    for cmd in (["decompress", str(payload)], ["apply", str(tmp_path / "d.safetensors")]):
        if cmd[0] == "apply":  # the delta file written by decompress keeps the record
            r = runner.invoke(_app(), ["decompress", str(payload), "-o", str(tmp_path / "d.safetensors")])
            assert r.exit_code == 0 and dp.Delta.load(tmp_path / "d.safetensors").base_sha256 == fp
        r = runner.invoke(_app(), [*cmd, "--base", str(other_p), "-o", str(out)])
        text = _unboxed(r.output)
        assert r.exit_code == 1 and f"sha256:{fp[:12]}" in text and "--allow-other-base" in text, (cmd, text)
        assert f"sha256:{dp.base_fingerprint(other)[:12]}" in text and not out.exists()
        r = runner.invoke(_app(), [*cmd, "--base", str(other_p), "-o", str(out), "--allow-other-base"])
        assert r.exit_code == 0, r.output
        assert "applied anyway (--allow-other-base)" in _unboxed(r.output), r.output  # the skip is not silent
        assert torch.allclose(
            load_file(out)["fc.weight"],
            other["fc.weight"] + (new["fc.weight"] - base["fc.weight"]),
            atol=1e-6,
        )
        out.unlink()
        for flag in ([], ["--allow-other-base"]):  # the right base: applied, with or without the flag
            r = runner.invoke(_app(), [*cmd, "--base", str(base_p), "-o", str(out), *flag])
            assert r.exit_code == 0 and "applied anyway" not in _unboxed(r.output), r.output
        assert torch.allclose(load_file(out)["fc.weight"], new["fc.weight"], atol=1e-6)
        out.unlink()


def test_payloads_and_deltas_without_a_record_apply_to_any_base(tmp_path: Path) -> None:
    base_p, new_p, base, new = _files(tmp_path)
    other = {k: v + 1.0 for k, v in base.items()}
    save_file(other, tmp_path / "other.safetensors")
    runner = CliRunner()
    payload = tmp_path / "u.dpln"
    args = ["compress", str(new_p), "--base", str(base_p), "--codec", "identity", "-o", str(payload)]
    assert runner.invoke(_app(), [*args, "--no-record-base"]).exit_code == 0
    assert dp.read_header(payload.read_bytes()).meta == {}
    out = tmp_path / "m.safetensors"
    r = runner.invoke(
        _app(), ["decompress", str(payload), "--base", str(tmp_path / "other.safetensors"), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    dp.Delta.between(base, new).save(tmp_path / "old.safetensors")  # a delta file from before the record
    r = runner.invoke(
        _app(),
        [
            "apply",
            str(tmp_path / "old.safetensors"),
            "--base",
            str(tmp_path / "other.safetensors"),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0 and "no base recorded" in r.output, r.output
    assert torch.allclose(
        load_file(out)["fc.bias"], other["fc.bias"] + (new["fc.bias"] - base["fc.bias"]), atol=1e-6
    )


def test_a_fifo_given_as_a_checkpoint_or_delta_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Before: compress, decompress --base and apply memory-mapped a FIFO given as a safetensors file: with no
    writer, open() blocked for good (the command hung); now a one-line usage error before anything is written."""
    import os
    import subprocess
    import sys

    base_p, new_p, _, _ = _files(tmp_path)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    payload, out = tmp_path / "u.dpln", tmp_path / "out.safetensors"
    assert (
        CliRunner()
        .invoke(
            _app(), ["compress", str(new_p), "--base", str(base_p), "--codec", "fp16", "-o", str(payload)]
        )
        .exit_code
        == 0
    )
    for args in (
        ["compress", str(fifo), "--base", str(base_p), "--codec", "fp16", "-o", str(tmp_path / "v.dpln")],
        ["compress", str(new_p), "--base", str(fifo), "--codec", "fp16", "-o", str(tmp_path / "v.dpln")],
        ["decompress", str(payload), "--base", str(fifo), "-o", str(out)],
        ["apply", str(fifo), "--base", str(base_p), "-o", str(out)],
        ["apply", str(new_p), "--base", str(fifo), "-o", str(out)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "deltaplane", *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "must be a regular file, not a FIFO (named pipe)" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "v.dpln").exists()


def test_a_seed_beyond_64_bits_is_a_usage_error(tmp_path: Path) -> None:
    """Before: compress --seed 18446744073709551616 ended in torch's "ValueError: Overflow when unpacking long
    long" traceback (exit 1); now a one-line usage error naming the range, and nothing is written."""
    base_p, new_p, _, _ = _files(tmp_path)
    out = tmp_path / "u.dpln"
    args = ["compress", str(new_p), "--base", str(base_p), "--codec", "fp16", "-o", str(out), "--seed"]
    for seed in (str(2**64), str(-(2**63) - 1), "99999999999999999999999"):
        r = CliRunner().invoke(_app(), [*args, seed])
        assert r.exit_code == 2, (seed, r.output, r.exception)
        assert "seed must be an integer from -2**63 to 2**64 - 1" in r.output and seed in r.output
        assert not out.exists()
    assert CliRunner().invoke(_app(), [*args, str(2**64 - 1)]).exit_code == 0  # the largest seed torch takes


def test_quiet_compress_prints_the_table_alone(tmp_path: Path) -> None:
    """`deltaplane -q compress` printed its codec/base/file note anyway (a console of its own that --quiet never
    reached); the note is stderr's, which -q silences, and the table stays on stdout."""
    from deltaplane.cli import app
    from deltaplane.commands import set_verbosity

    base_p, new_p, _, _ = _files(tmp_path)
    args = ["compress", str(new_p), "--base", str(base_p), "--codec", "quant(bits=8)"]
    try:
        loud = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a.dpln")])
        quiet = CliRunner().invoke(app, ["-q", *args, "-o", str(tmp_path / "b.dpln")])
    finally:
        set_verbosity(0)  # the callback set it for the process: leave the next test its notes
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    assert "ratio" in loud.stdout and "ratio" in quiet.stdout
    assert "codec quant(bits=8," in loud.stderr and f"wrote {tmp_path / 'a.dpln'}" in loud.stderr
    assert "codec" not in quiet.stderr and "wrote" not in quiet.output


def _sharded(folder: Path, state: dict, index: dict | None = None) -> Path:
    """``state`` as a Hugging Face sharded folder, one tensor per shard (``index`` replaces the true index)."""
    import json

    folder.mkdir()
    weight_map = {}
    for i, (k, v) in enumerate(state.items()):
        shard = f"model-{i + 1:05d}-of-{len(state):05d}.safetensors"
        save_file({k: v}, folder / shard)
        weight_map[k] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index or {"weight_map": weight_map}))
    return folder


def test_checkpoint_folders_are_read_through_the_strict_shard_reader(tmp_path: Path) -> None:
    """compress/decompress/apply took only .safetensors files (a folder was a usage error), so a merged or
    Hugging Face checkpoint had to be re-saved first. A folder is now read as deploy and registry register read
    it: model.safetensors, else the index through deltaplane.shards, which refuses a shard outside the folder."""
    base_p, _, base, new = _files(tmp_path)
    base_dir = _sharded(tmp_path / "base", base)
    single = tmp_path / "single"
    single.mkdir()
    save_file(new, single / "model.safetensors")
    runner = CliRunner()
    payload, delta, out = tmp_path / "u.dpln", tmp_path / "d.safetensors", tmp_path / "o.safetensors"
    r = runner.invoke(
        _app(), ["compress", str(single), "--base", str(base_dir), "--codec", "identity", "-o", str(payload)]
    )
    assert r.exit_code == 0, r.output
    assert runner.invoke(_app(), ["decompress", str(payload), "-o", str(delta)]).exit_code == 0
    r = runner.invoke(_app(), ["apply", str(delta), "--base", str(base_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert all(torch.allclose(load_file(out)[k], new[k], atol=1e-6) for k in new)
    out.unlink()
    # a traversal index: the shard named '../' is never read, nothing is written
    (tmp_path / "outside").mkdir()
    save_file({"fc.weight": base["fc.weight"]}, tmp_path / "outside" / "w.safetensors")
    save_file({"fc.bias": base["fc.bias"]}, tmp_path / "outside" / "b.safetensors")
    evil = {"weight_map": {"fc.weight": "../outside/w.safetensors", "fc.bias": "../outside/b.safetensors"}}
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "model.safetensors.index.json").write_text(__import__("json").dumps(evil))
    for cmd in (
        ["apply", str(delta), "--base", str(tmp_path / "evil"), "-o", str(out)],
        ["decompress", str(payload), "--base", str(tmp_path / "evil"), "-o", str(out)],
        ["compress", str(tmp_path / "evil"), "--base", str(base_p), "--codec", "identity", "-o", str(out)],
    ):
        r = runner.invoke(_app(), cmd)
        text = _unboxed(r.output)
        assert r.exit_code == 1 and "names shard '../outside/" in text and "bare .safetensors" in text, (
            cmd,
            text,
        )
        assert not out.exists()
    # a folder of neither kind names what it lacks (a usage error)
    (tmp_path / "empty").mkdir()
    r = runner.invoke(_app(), ["apply", str(delta), "--base", str(tmp_path / "empty"), "-o", str(out)])
    assert r.exit_code == 2 and "neither model.safetensors nor" in _unboxed(r.output), r.output
