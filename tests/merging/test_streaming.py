"""Streaming merge from safetensors: same numbers as in memory, HF layout in and out, strict bad-input handling."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import deltaplane as dp
from deltaplane.merging import merge, merge_files
from deltaplane.merging.checkpoint import Checkpoint, SafetensorsWriter


def _state(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "embed.weight": torch.randn(30, 8, generator=g),
            "layer.0.weight": torch.randn(8, 8, generator=g),
            "layer.0.bias": torch.randn(8, generator=g),
            "norm.weight": torch.randn(8, generator=g),
            "steps": torch.tensor([7]),
        }
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }


def _save_hf(folder: Path, state: dict, shards: int = 1) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    (folder / "tokenizer.json").write_text("{}")
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / fname)
        weight_map |= dict.fromkeys(part, fname)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[Path, dict, list[dict]]:
    base = _state(0)
    models = [_state(i, base) for i in (1, 2, 3)]
    _save_hf(tmp_path / "base", base, shards=2)  # sharded index in
    for i, m in enumerate(models):
        _save_hf(tmp_path / f"m{i}", m)
    return tmp_path, base, models


def _write_cfg(root: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    p = root / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {k: ck[k] for k in ck}


MERGEKIT_TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "base"},  # mergekit lists the base too; it carries no task vector
        {"model": "m0", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "m1", "parameters": {"weight": 0.5, "density": 0.3}},
        {"model": "m2", "parameters": {"weight": 0.8}},
    ],
    "parameters": {"density": 0.7, "normalize": True, "weight": 1.0},
    "dtype": "float32",
}


def test_streamed_equals_in_memory_and_hf_layout(zoo) -> None:  # type: ignore[no-untyped-def]
    root, base, models = zoo
    seen = []
    res = merge_files(
        _write_cfg(root, MERGEKIT_TIES), root / "out", progress=lambda d, n, name: seen.append(d)
    )
    expected = merge("ties", base, models, densities=[0.5, 0.3, 0.7], weights=[1.0, 0.5, 0.8])
    got = _read_all(root / "out")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert seen == list(range(1, 6)) and res.n_tensors == 5
    # the sharded base read in row chunks of 2 rows (16 elements): the same model, bit for bit
    merge_files(_write_cfg(root, MERGEKIT_TIES), root / "out_chunked", chunk_elements=16)
    chunked = _read_all(root / "out_chunked")
    assert all(torch.equal(chunked[k], expected[k]) for k in expected)
    assert json.loads((root / "out" / "config.json").read_text())["model_type"] == "toy"
    assert (root / "out" / "tokenizer.json").exists()
    # the file is real safetensors with our metadata
    with safe_open(str(root / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata()["merge_method"] == "ties"


@pytest.mark.parametrize(
    ("method", "params", "kwargs"),
    [
        ("linear", {}, {"weights": [1.0, 2.0, 3.0]}),
        ("task_arithmetic", {"lambda": 0.5}, {"weights": [1.0, 2.0, 3.0], "lambda": 0.5}),
        ("dare_ties", {"seed": 4}, {"weights": [1.0, 2.0, 3.0], "density": 0.5, "seed": 4}),
        ("breadcrumbs", {"gamma": 0.05}, {"weights": [1.0, 2.0, 3.0], "density": 0.5, "gamma": 0.05}),
        ("model_stock", {}, {}),
    ],
)
def test_every_method_streams_like_memory(zoo, method, params, kwargs) -> None:  # type: ignore[no-untyped-def]
    root, base, models = zoo
    entries = []
    for i in range(3):
        mp = {}
        if "weights" in kwargs:
            mp["weight"] = kwargs["weights"][i]
        if "density" in kwargs:
            mp["density"] = kwargs["density"]
        entries.append({"model": f"m{i}", "parameters": mp})
    cfg = {"merge_method": method, "base_model": "base", "models": entries, "parameters": params}
    if method == "linear":  # mergekit would average an unlisted base_model as one more input
        del cfg["base_model"]
    p = _write_cfg(root, cfg)
    merge_files(p, root / "out")
    call_base = None if method == "linear" else base
    expected = merge(method, call_base, models, **kwargs)
    got = _read_all(root / "out")
    for k in expected:
        assert torch.equal(got[k], expected[k]), (method, k)


def test_slerp_and_fisher_files(zoo) -> None:  # type: ignore[no-untyped-def]
    root, base, models = zoo
    cfg = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "m0"}],
           "parameters": {"t": 0.25}}  # fmt: skip
    merge_files(_write_cfg(root, cfg), root / "s")
    exp = merge("slerp", base, [models[0]], t=0.25)
    assert all(torch.equal(_read_all(root / "s")[k], exp[k]) for k in exp)
    fishers = [{k: torch.rand(v.shape) for k, v in m.items() if v.is_floating_point()} for m in models[:2]]
    for i, f in enumerate(fishers):
        save_file(f, root / f"fisher{i}.safetensors")
    cfg = {"merge_method": "fisher", "models": [{"model": f"m{i}", "parameters": {"fisher": f"fisher{i}.safetensors"}}
                                                 for i in range(2)]}  # fmt: skip
    merge_files(_write_cfg(root, cfg), root / "f")
    exp = merge("fisher", None, models[:2], fishers=fishers)
    got = _read_all(root / "f")
    assert all(torch.equal(got[k], exp[k]) for k in exp)


def _fisher_cfg(root: Path, n: int = 3) -> dict:
    for i in range(n - 1):  # the last model's Fisher file is missing
        save_file({"w": torch.rand(3)}, root / f"fisher{i}.safetensors")
    return {"merge_method": "fisher",
            "models": [{"model": f"m{i}", "parameters": {"fisher": f"fisher{i}.safetensors"}} for i in range(n)]}  # fmt: skip


def test_a_missing_fisher_file_is_named_as_one(zoo) -> None:  # type: ignore[no-untyped-def]
    """It was reported as "model '…/fisher2.safetensors' not found": a model path the config never named."""
    root, _, models = zoo
    path = _write_cfg(root, _fisher_cfg(root))
    with pytest.raises(dp.ConfigError, match=r"parameter 'fisher' of model 'm2': fisher file '.*fisher2.safetensors' "
                                             r"not found") as info:  # fmt: skip
        merge_files(path, root / "out")
    assert str(path) in str(info.value)
    with pytest.raises(dp.ConfigError, match=r"^fisher file '.*nowhere.safetensors' not found"):
        merge(
            "fisher",
            None,
            models[:2],
            fishers=[str(root / "fisher0.safetensors"), str(root / "nowhere.safetensors")],
        )
    _no_leftovers(root)


def test_a_fifo_model_is_refused_naming_it(tmp_path: Path) -> None:
    """Before: a FIFO given as a model (merge, extract-lora) was taken for a folder and globbed: exit 1 with
    "[Errno 20] Not a directory", which says neither which input nor what to fix."""
    import os

    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(dp.ConfigError, match=r"m.safetensors: a model must be a regular file, not a FIFO"):
        Checkpoint(fifo)
    with pytest.raises(dp.ConfigError, match=r"a fisher file must be a regular file, not a FIFO"):
        Checkpoint(fifo, what="fisher file")


@pytest.mark.parametrize(
    "change",
    [
        {"models": [{"model": "m0"}, {"model": "m1"}, {"model": "nowhere"}]},  # refused while opening the models
        "fisher",  # refused while opening the Fisher files, after the models
        {"base_model": "base", "merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5},
         "models": [{"model": "m0"}, {"model": "m1"}], "tokenizer_source": "nowhere"},  # refused after planning
    ],
)  # fmt: skip
def test_inputs_opened_before_a_refusal_are_closed(zoo, monkeypatch, change) -> None:  # type: ignore[no-untyped-def]
    """Checkpoints opened before a refusal partway through opening the inputs were left for the caller, who
    never got them; every one that was opened is closed (a Checkpoint counting its own closes stands in for one
    holding an OS handle)."""
    root, _, _ = zoo
    opened: list[Checkpoint] = []

    class Counted(Checkpoint):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self.closes = 0
            opened.append(self)

        def close(self) -> None:
            self.closes += 1

    import deltaplane.merging.plan as plan_module

    monkeypatch.setattr(plan_module, "Checkpoint", Counted)
    cfg = (
        _fisher_cfg(root)
        if change == "fisher"
        else {"merge_method": "linear", "parameters": {"weight": 1.0}} | change
    )
    with pytest.raises(dp.ConfigError):
        merge_files(_write_cfg(root, cfg), root / "out")
    assert len(opened) >= 2  # the refusal came after some inputs were open
    assert [ck.closes for ck in opened] == [1] * len(opened), [ck.path.name for ck in opened]


def test_sharded_output_and_out_dtype(zoo) -> None:  # type: ignore[no-untyped-def]
    root, base, models = zoo
    cfg = MERGEKIT_TIES | {"out_dtype": "bfloat16"}
    res = merge_files(_write_cfg(root, cfg), root / "out", max_shard_bytes=600)
    index = json.loads((root / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((root / "out" / s).exists() for s in shards)
    assert index["metadata"]["total_size"] == res.nbytes
    got = _read_all(root / "out")
    assert got["layer.0.weight"].dtype == torch.bfloat16 and got["steps"].dtype == torch.int64
    assert json.loads((root / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expected = merge("ties", base, models, densities=[0.5, 0.3, 0.7], weights=[1.0, 0.5, 0.8])
    assert torch.equal(got["embed.weight"], expected["embed.weight"].to(torch.bfloat16))


def _no_leftovers(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temp folder left behind"


def test_mismatched_shape_names_file_and_tensor(zoo) -> None:  # type: ignore[no-untyped-def]
    root, _base, models = zoo
    bad = dict(models[1])
    bad["layer.0.weight"] = torch.zeros(8, 9)
    _save_hf(root / "bad", bad)
    cfg = MERGEKIT_TIES | {"models": [{"model": "m0"}, {"model": "bad"}]}
    with pytest.raises(dp.ShapeMismatch) as info:
        merge_files(_write_cfg(root, cfg), root / "out")
    msg = str(info.value)
    assert "layer.0.weight" in msg and str(root / "bad") in msg and "(8, 9)" in msg
    _no_leftovers(root)


@pytest.mark.parametrize(
    "cache_bytes", [2**20, 0]
)  # read once, or re-read on every pass (checked on the first)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_input_names_file_and_tensor(zoo, bad_value: float, cache_bytes: int) -> None:  # type: ignore[no-untyped-def]
    root, _base, models = zoo
    bad = dict(models[1])
    bad["embed.weight"] = bad["embed.weight"].clone()
    bad["embed.weight"][29, 3] = bad_value  # in the last row: found by a chunked read, not only a whole one
    _save_hf(root / "bad", bad)
    cfg = MERGEKIT_TIES | {"models": [{"model": "m0"}, {"model": "bad"}]}
    with pytest.raises(dp.InvalidUpdate) as info:
        merge_files(_write_cfg(root, cfg), root / "out", chunk_elements=16, cache_bytes=cache_bytes)
    msg = str(info.value)
    assert "embed.weight" in msg and str(root / "bad") in msg and "NaN or Inf" in msg
    _no_leftovers(root)
    # the in-memory API refuses it too, naming the model
    with pytest.raises(dp.InvalidUpdate, match=r"model 1: tensor 'embed.weight' holds NaN or Inf"):
        merge("ties", _base, [models[0], bad], density=0.5)


def test_mismatched_names(zoo) -> None:  # type: ignore[no-untyped-def]
    root, _, models = zoo
    renamed = {("layer.1.weight" if k == "layer.0.weight" else k): v for k, v in models[1].items()}
    _save_hf(root / "renamed", renamed)
    cfg = MERGEKIT_TIES | {"models": [{"model": "m0"}, {"model": "renamed"}]}
    with pytest.raises(
        dp.ShapeMismatch, match=r"lacks tensor\(s\) \['layer.0.weight'\].*extra.*layer.1.weight"
    ):
        merge_files(_write_cfg(root, cfg), root / "out")
    _no_leftovers(root)


def test_dtype_mix_is_promoted_like_mergekit(zoo) -> None:  # type: ignore[no-untyped-def]
    root, _base, models = zoo
    _save_hf(root / "half", {k: v.half() if v.is_floating_point() else v for k, v in models[1].items()})
    cfg = {k: v for k, v in MERGEKIT_TIES.items() if k != "dtype"} | {
        "models": [{"model": "m0"}, {"model": "half"}]
    }
    merge_files(_write_cfg(root, cfg), root / "out")  # float32 + float16 inputs: computed in float32
    got = _read_all(root / "out")
    assert got["embed.weight"].dtype == torch.float32
    merge_files(_write_cfg(root, cfg | {"dtype": "float16"}), root / "out16")  # cast on request
    assert _read_all(root / "out16")["embed.weight"].dtype == torch.float16


@pytest.mark.parametrize(
    ("cfg", "text"),
    [
        ({"merge_method": "ties", "models": [{"model": "m0"}]}, "needs base_model"),
        (MERGEKIT_TIES | {"base_model": "nowhere"}, "never downloads"),
        (MERGEKIT_TIES | {"merge_method": "magic"}, "unknown merge method 'magic'"),
        (MERGEKIT_TIES | {"tokenizer_sourc": "base"}, "tokenizer_sourc: Extra inputs are not permitted"),
        (MERGEKIT_TIES | {"dtype": "float7"}, "unknown dtype 'float7'"),
        (MERGEKIT_TIES | {"parameters": {"density": 2}}, "'density' must be in [0, 1]"),
        (MERGEKIT_TIES | {"models": [{"model": "m0", "parameters": {"weight": ["a", 1]}}]}, "finite float"),
        (
            MERGEKIT_TIES | {"models": [{"model": "m0", "parameters": {"weight": [{"val": 1}]}}]},
            "needs 'value'",
        ),
        (
            MERGEKIT_TIES | {"models": [{"model": {"modle": {"path": "m0"}}}]},
            "long form {model: {path: ...}}",
        ),
        (
            MERGEKIT_TIES | {"slices": [{"sources": [{"model": "m0", "layer_range": [0, 1]}]}]},
            "exactly one of",
        ),
        ({"merge_method": "linear"}, "exactly one of 'models' and 'slices'"),
        (
            MERGEKIT_TIES | {"models": [{"model": "m0"}], "parameters": {}},
            "needs parameter 'weight' for model 'm0'",
        ),
        (MERGEKIT_TIES | {"modules": {}}, "'modules'"),
    ],
)
def test_bad_configs(zoo, cfg, text) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = zoo
    path = _write_cfg(root, cfg)
    with pytest.raises(dp.ConfigError) as info:
        merge_files(path, root / "out")
    assert text in str(info.value)
    assert str(path) in str(info.value) or "nowhere" in str(info.value) or "magic" in str(info.value)
    _no_leftovers(root)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1\n")
    with pytest.raises(dp.ConfigError, match=r"broken.yaml: invalid YAML at line \d+"):
        merge_files(p, tmp_path / "out")
    _no_leftovers(tmp_path)


def test_failure_midway_leaves_nothing_and_keeps_existing_output(zoo) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = zoo
    cfg = _write_cfg(root, MERGEKIT_TIES)

    def boom(done: int, total: int, name: str) -> None:
        if done == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        merge_files(cfg, root / "out", progress=boom)
    _no_leftovers(root)
    merge_files(cfg, root / "out")
    with pytest.raises(dp.ConfigError, match="already exists"):
        merge_files(cfg, root / "out")
    before = _read_all(root / "out")
    with pytest.raises(RuntimeError):
        merge_files(cfg, root / "out", overwrite=True, progress=boom)
    assert all(torch.equal(before[k], v) for k, v in _read_all(root / "out").items())  # old output intact
    merge_files(cfg, root / "out", overwrite=True)
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")]


def test_signal_while_swapping_in_the_output_is_deferred(zoo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A SIGTERM between moving the old output aside and renaming the new one in must not lose both."""
    import os
    import signal

    root, _, _ = zoo
    cfg = _write_cfg(root, MERGEKIT_TIES)
    merge_files(cfg, root / "out")
    (root / "out" / "marker").write_text("old")
    real_replace = os.replace
    calls = []

    def replace_then_terminate(src, dst):  # type: ignore[no-untyped-def]
        if not calls:  # moving the old output aside: the signal arrives right after
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_terminate)
    with pytest.raises(SystemExit):  # delivered once the swap is done
        merge_files(cfg, root / "out", overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 2 and not (root / "out" / "marker").exists()  # the new output is in place
    assert (root / "out" / "model.safetensors").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")]


def test_threads_cache_and_chunking_do_not_change_the_output(zoo) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = zoo
    cfg = _write_cfg(root, MERGEKIT_TIES)
    before = torch.get_num_threads()
    merge_files(cfg, root / "ref", threads=None)
    ref = _read_all(root / "ref")
    for i, kwargs in enumerate(
        [{"threads": 2}, {"chunk_elements": 16, "cache_bytes": 0}, {"chunk_elements": 16}]
    ):
        merge_files(cfg, root / f"o{i}", **kwargs)
        got = _read_all(root / f"o{i}")
        assert all(torch.equal(got[k], ref[k]) for k in ref), kwargs
    assert torch.get_num_threads() == before  # restored
    for bad in ({"threads": 0}, {"cache_bytes": -1}):
        with pytest.raises(dp.ConfigError, match=next(iter(bad))):
            merge_files(cfg, root / "bad", **bad)


def test_writer_refuses_undeclared_and_incomplete(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32), ("b", (1,), torch.int64)])
    with pytest.raises(dp.DecodeError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(1, dtype=torch.int64))
    w.write("a", torch.tensor([1.0, 2.0]))
    with pytest.raises(dp.DecodeError, match="never written"):
        w.close()


def test_corrupt_input_is_decode_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(dp.DecodeError, match="model.safetensors"):
        Checkpoint(tmp_path / "m")


def test_peak_memory_is_bounded_by_tensors_not_models(tmp_path: Path) -> None:
    """Base + 3 models of 48 MB each merge with far less than one model's worth of extra memory."""
    n_tensors, size = 24, 500_000  # 24 × 2 MB = 48 MB per model, 192 MB of inputs
    names = [f"layers.{i}.weight" for i in range(n_tensors)]
    for m in ("base", "a", "b", "c"):
        (tmp_path / m).mkdir()
        g = torch.Generator().manual_seed(hash(m) % 1000)
        entries = [(n, (size,), torch.float32) for n in names]
        values = torch.randn(size, generator=g)  # one random tensor per model, written under every name
        with SafetensorsWriter(tmp_path / m / "model.safetensors", entries) as w:
            for n in names:
                w.write(n, values)
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": m, "parameters": {"density": 0.2, "weight": 1.0}} for m in "abc"]}  # fmt: skip
    _write_cfg(tmp_path, cfg)
    code = textwrap.dedent(f"""
        import torch
        from deltaplane.merging import merge_files
        def peak_mb():  # VmHWM: ru_maxrss would carry the (bigger) pytest parent's peak across exec
            return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        before = peak_mb()
        merge_files({str(tmp_path / "merge.yaml")!r}, {str(tmp_path / "out")!r})
        print(before, peak_mb())
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    before_mb, peak_mb = int(out[0]), int(out[1])
    # in-memory would need ≥ 192 MB more; streaming needs a few 2 MB tensors plus TIES scratch
    assert peak_mb - before_mb < 60, (before_mb, peak_mb)


@pytest.mark.parametrize(
    ("values", "extra", "words"),
    [  # finite inputs whose merge overflows float16 (largest 65504): was written as Inf, silently
        (
            (4e4, 4e4),
            {"out_dtype": "float16", "parameters": {"normalize": False}},
            "merge overflows float32 / float16",
        ),
        ((4e4, 4e4), {"dtype": "float16", "parameters": {"normalize": False}}, "merge overflows float16"),
        # a finite input beyond the config's dtype: was "holds NaN or Inf values", blaming a sound file
        ((7e4, 1.0), {"dtype": "float16"}, "a/model.safetensors: tensor 'w' holds values beyond the range"),
    ],
)
def test_overflow_of_a_half_dtype_is_refused_and_explained(tmp_path: Path, values, extra, words) -> None:  # type: ignore[no-untyped-def]
    for name, v in zip("ab", values, strict=True):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((4, 3), v), "b": torch.ones(3)}, tmp_path / name / "model.safetensors")
    cfg = {"merge_method": "linear", **extra,
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in "ab"]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(dp.InvalidUpdate, match="float32 or bfloat16") as err:
        merge_files(tmp_path / "c.yaml", tmp_path / "out")
    assert words in str(err.value) and "'w'" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a",
        "b",
        "c.yaml",
    ]  # no output, no temporary folder


def test_the_in_memory_merge_refuses_a_half_overflow_as_merge_files_does() -> None:
    """Before: merge() of float16 inputs computed in float32 and cast back, returning Inf for 6e4 + 6e4 silently,
    where merge_files refuses the same merge."""
    half = {"w": torch.full((2,), 6e4, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)}
    with pytest.raises(
        dp.InvalidUpdate, match=r"merged tensor 'w' .* overflows float16 \(largest value 65504\)"
    ):
        merge("linear", None, [half, half], normalize=False)
    ok = merge("linear", None, [half, half])  # the mean stays in range
    assert ok["w"].dtype == torch.float16 and torch.equal(ok["w"], half["w"])


def test_a_torch_saved_state_dict_is_refused_with_a_conversion_that_works(tmp_path: Path) -> None:
    """A user's own model saved with ``torch.save(model.state_dict(), 'ft.pt')`` (or a folder holding only a
    ``pytorch_model.bin``): the refusal's one-line conversion must run as printed and give a file the merge takes.
    It used to suggest ``AutoModel.from_pretrained`` on the folder *above* the ``.pt`` file, which is no model."""
    import re

    base = _state(0)
    save_file(base, tmp_path / "base.safetensors")
    torch.save(_state(1, base), tmp_path / "ft.pt")
    (tmp_path / "ft_dir").mkdir()
    torch.save(_state(2, base), tmp_path / "ft_dir" / "pytorch_model.bin")
    for ref, converted in (("ft.pt", "ft.safetensors"), ("ft_dir", "ft_dir")):
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": str(tmp_path / "base.safetensors"),
            "models": [{"model": str(tmp_path / ref), "parameters": {"weight": 1.0}}],
        }
        with pytest.raises(dp.ConfigError, match="not safetensors") as err:
            merge_files(cfg, tmp_path / "out", overwrite=True)
        assert "AutoModel" not in str(err.value)
        command = re.search(r'python -c "([^"]+)"', str(err.value))
        assert command, str(err.value)
        subprocess.run([sys.executable, "-c", command.group(1)], check=True)
        if ref == "ft.pt":
            assert "then name 'ft.safetensors' in the config" in str(err.value)
        cfg["models"][0]["model"] = str(tmp_path / converted)
        merge_files(cfg, tmp_path / "out", overwrite=True)  # the converted checkpoint merges


def test_a_fine_tune_without_the_bases_integer_buffer_merges_and_says_so(tmp_path: Path) -> None:
    """The shipped all-MiniLM-L6-v2 holds ``embeddings.position_ids`` (int64); a fine-tune of it saved by a
    newer transformers does not. Non-floating tensors are copied from the base, never merged, so the merge takes
    it from the base (with a note) instead of refusing the pair; a missing *float* tensor is still refused."""
    base = _state(0)
    ft = {k: v for k, v in _state(1, base).items() if k != "steps"}
    _save_hf(tmp_path / "base", base)
    _save_hf(tmp_path / "ft", ft)
    cfg = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "ft"), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    res = merge_files(cfg, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("steps"), base["steps"])
    assert any("lacks the non-floating tensor(s) ['steps']" in n for n in res.notes)
    # the same pair the other way round (the base without the buffer): the output follows the base
    cfg2 = {**cfg, "base_model": str(tmp_path / "ft"), "models": [{"model": str(tmp_path / "base"), "parameters": {"weight": 1.0, "density": 0.5}}]}  # fmt: skip
    res = merge_files(cfg2, tmp_path / "out2")
    with safe_open(tmp_path / "out2" / "model.safetensors", "pt") as f:
        assert "steps" not in list(f.keys())
    assert any("left out of the output" in n for n in res.notes)
    del ft["norm.weight"]
    _save_hf(tmp_path / "ft2", ft)
    cfg["models"][0]["model"] = str(tmp_path / "ft2")
    with pytest.raises(dp.ShapeMismatch, match=r"lacks tensor\(s\) \['norm.weight'\]"):
        merge_files(cfg, tmp_path / "out3")
