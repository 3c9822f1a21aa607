"""Row-chunked merging: same numbers as whole-tensor merging, exact top-k selection, strict pread reader."""

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import deltaplane as dp
from deltaplane.merging import get_method, merge, merge_files
from deltaplane.merging.base import _split_kwargs, lookup_tensor_params, merge_in_chunks, row_ranges
from deltaplane.merging.checkpoint import Checkpoint, SafetensorsWriter
from deltaplane.merging.task_arithmetic import select_largest

# (method, kwargs, exact): exact → bit-identical; reductions (norms, dot products) may move the last bits
CASES = [
    ("linear", {"weights": [1.0, 2.0, 0.5]}, True),
    ("task_arithmetic", {"weights": [1.0, 2.0, 0.5], "lambda": 0.7}, True),
    ("ties", {"densities": [0.2, 0.5, 0.9], "weights": [1.0, 0.5, 2.0]}, True),
    ("dare_linear", {"density": 0.4, "seed": 5, "rescale_norm": "density"}, True),
    ("dare_ties", {"density": 0.4, "seed": 5, "rescale_norm": "density"}, True),
    ("dare_ties", {"density": 0.4, "seed": 5}, False),  # L1 rescale: a sum over the chunks
    ("ties", {"density": 0.3, "rescale": True}, False),
    ("ties", {"density": 0.3, "ties": "keep_all"}, True),
    ("ties", {"densities": [0.2, 0.5, 0.9], "ties": "argsort"}, True),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 2, "rescale": False}, True),
    ("della_linear", {"density": 0.5, "seed": 2}, False),
    ("sce", {"select_topk": 0.5}, False),
    ("nuslerp", {"weights": [1.0, 3.0]}, False),
    ("nuslerp", {"weights": [1.0, 3.0], "nuslerp_flatten": False}, False),
    ("nuslerp", {"weights": [1.0, 3.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
    ("multislerp", {"weights": [1.0, 2.0, 0.5]}, False),
    ("karcher", {}, False),
    ("nearswap", {"t": 0.5}, True),
    ("arcee_fusion", {}, True),
    ("passthrough", {"scale": 0.5}, True),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, True),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}, True),
    ("fisher", {"weights": [1.0, 2.0, 0.5]}, True),
    ("model_stock", {}, False),
    ("model_stock", {"filter_wise": True}, False),
    ("slerp", {"t": 0.3}, False),
    ("ram", {"epsilon": 0.5}, True),  # noise ~ N(0, 1): entries changed by one, several or no model
    ("ramplus_tl", {"epsilon": 0.5, "r": 0.5, "alpha": 0.9}, True),
]
SHAPES = [(37, 5), (53,), (), (4, 3, 7), (0, 4)]  # 37 rows: not a multiple of the chunk; 1-D; 0-d; 3-D; empty


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, ties: bool = False) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(sum(shape) + 7)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = []
    for _ in range(3):
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        if ties:  # few distinct magnitudes: many entries tie at every top-k threshold
            noise = torch.round(noise * 2) / 2
        models.append((base + noise).to(dtype))
    return base.to(dtype), models


def _merge(method: str, kwargs: dict, base: torch.Tensor, models: list, chunk: int | None) -> torch.Tensor:
    m = get_method(method)
    kwargs = dict(kwargs)
    if method == "fisher":
        g = torch.Generator().manual_seed(1)
        kwargs["fishers"] = [{"w": torch.rand(base.shape, generator=g, dtype=base.dtype)} for _ in models]
    if method in ("slerp", "nearswap", "arcee_fusion", "passthrough"):
        models = models[:1]
    if method == "nuslerp":
        models = models[:2]
    params = lookup_tensor_params(m, _split_kwargs(m, len(models), kwargs), "w")
    use_base = None if method in ("linear", "fisher", "passthrough") else base.clone()
    return merge_in_chunks(m, "w", use_base, [t.clone() for t in models], params, chunk)


@pytest.mark.parametrize(("method", "kwargs", "exact"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_whole_tensor(method: str, kwargs: dict, exact: bool, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        base, models = _inputs(shape, dtype, ties=method in ("ties", "breadcrumbs", "breadcrumbs_ties"))
        m = get_method(method)
        n = {"nuslerp": 2, "slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1}.get(method, 3)
        if method != "fisher" and m.whole_tensor(shape, _split_kwargs(m, n, kwargs)):
            continue  # such tensors are merged whole in the streaming path too
        whole = _merge(method, kwargs, base, models, None)
        assert whole.shape == base.shape
        for chunk in (1, 10, 15, 10_000):  # 10 → 2 rows of 5: 37 rows end in a 1-row chunk
            got = _merge(method, kwargs, base, models, chunk)
            if exact:
                assert torch.equal(got, whole), (method, shape, chunk)
            else:
                tol = 1e-6 if dtype == torch.float32 else 1e-13
                torch.testing.assert_close(got, whole, rtol=tol, atol=tol)


def test_row_ranges_cover_rows_without_splitting_them() -> None:
    assert row_ranges((37, 5), 10) == [(s, min(s + 2, 37)) for s in range(0, 37, 2)]
    assert row_ranges((3, 100), 10) == [(0, 1), (1, 2), (2, 3)]  # a row larger than the chunk is one chunk
    assert row_ranges((), 10) == [(0, 1)]
    assert row_ranges((0, 4), 10) == [(0, 0)]
    assert row_ranges((37, 5), None) == [(0, 37)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_largest_is_exact_topk_in_chunks(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(100_003, generator=g, dtype=dtype).abs()
    ks = [1, 20_000, 100_003]
    chunks = list(a.split(7_777))
    found = select_largest(lambda: ((0, c) for c in chunks), [ks])[0]
    ordered = a.sort(descending=True).values
    for k, sel in zip(ks, found, strict=True):
        assert sel.value.dtype == dtype and sel.value == ordered[k - 1]
        assert sel.n_greater == int((a > ordered[k - 1]).sum())
        mask = torch.cat([sel.mask(c) for c in chunks])
        assert int(mask.sum()) == k
        assert torch.equal(mask.nonzero().squeeze(1).sort().values, torch.topk(a, k).indices.sort().values)


def test_select_largest_breaks_ties_by_index_across_chunks() -> None:
    a = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 2.0, 2.0, 3.0, 2.0])  # top 4: both 3s + the first two 2s
    chunks = list(a.split(2))
    sel = select_largest(lambda: ((0, c) for c in chunks), [[4]])[0][0]
    assert (float(sel.value), sel.n_greater, sel.n_equal) == (2.0, 2, 5)
    mask = torch.cat([sel.mask(c) for c in chunks])
    assert mask.tolist() == [False, True, True, True, False, False, False, True, False]


# -- streaming, on disk -----------------------------------------------------------------------------------


def _write_models(root: Path, shape: tuple[int, ...], ties: bool) -> tuple[dict, list[dict]]:
    base, models = _inputs(shape, torch.float32, ties=ties)
    states = [{"big.weight": t, "vec": t.reshape(-1)[:11].clone(), "scalar": t.reshape(-1)[0].clone(),
               "steps": torch.tensor([3, 4])} for t in [base, *models]]  # fmt: skip
    for name, state in zip(["base", "m0", "m1", "m2"], states, strict=True):
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors")
    return states[0], states[1:]


@pytest.mark.parametrize(
    ("method", "params", "kwargs"),
    [
        ("ties", {"density": 0.3}, {"density": 0.3}),
        ("dare_ties", {"density": 0.5, "seed": 2}, {"density": 0.5, "seed": 2}),
        ("breadcrumbs", {"density": 0.4, "gamma": 0.05}, {"density": 0.4, "gamma": 0.05}),
        ("model_stock", {}, {}),
    ],
)
def test_streamed_in_small_chunks_equals_in_memory(
    tmp_path: Path, method: str, params: dict, kwargs: dict
) -> None:
    base, models = _write_models(tmp_path, (301, 17), ties=True)
    cfg = {"merge_method": method, "base_model": "base", "models": [{"model": f"m{i}"} for i in range(3)],
           "parameters": params | ({} if method == "model_stock" else {"weight": 1.0})}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    merge_files(tmp_path / "c.yaml", tmp_path / "out", chunk_elements=100)  # 5 rows of 17 per chunk
    got = Checkpoint(tmp_path / "out")
    expected = merge(method, base, models, **kwargs)
    for k in expected:
        if method == "model_stock" and expected[k].is_floating_point():
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[k], expected[k]), k


def test_read_rows_returns_exact_slices_from_shards(tmp_path: Path) -> None:
    state = {"a": torch.arange(60, dtype=torch.float32).reshape(12, 5), "b": torch.arange(7).to(torch.bfloat16),
             "c": torch.tensor(2.5, dtype=torch.float64), "d": torch.tensor([True, False, True])}  # fmt: skip
    save_file({"a": state["a"], "c": state["c"]}, tmp_path / "s1.safetensors")
    save_file({"b": state["b"], "d": state["d"]}, tmp_path / "s2.safetensors")
    weight_map = {"a": "s1.safetensors", "c": "s1.safetensors", "b": "s2.safetensors", "d": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = Checkpoint(tmp_path)
    assert torch.equal(ck.read_rows("a", 3, 8), state["a"][3:8])
    assert torch.equal(ck.read_rows("a", 12, 12), state["a"][12:12])
    assert (
        torch.equal(ck.read_rows("b", 2, 5), state["b"][2:5])
        and ck.read_rows("b", 0, 1).dtype == torch.bfloat16
    )
    assert torch.equal(ck["c"], state["c"]) and ck["c"].shape == ()
    assert torch.equal(ck["d"], state["d"])
    with pytest.raises(IndexError):
        ck.read_rows("a", 10, 13)


@pytest.mark.parametrize("outside", ["../outside.safetensors", "ABS", "link.safetensors"])
def test_a_merge_input_index_naming_a_shard_outside_its_folder_is_refused(
    tmp_path: Path, outside: str
) -> None:
    """A merge input's index is checked as deploy's is (deltaplane.shards): it used to join any name it held to
    the folder, so '../x', an absolute path or a link leading out read a safetensors file from elsewhere."""
    folder, elsewhere = tmp_path / "in", tmp_path / "outside.safetensors"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, elsewhere)
    if outside == "ABS":
        outside = str(elsewhere)
    elif outside == "link.safetensors":
        (folder / outside).symlink_to(elsewhere)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": outside}}))
    with pytest.raises(dp.DecodeError, match="inside|outside"):
        Checkpoint(folder)


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    ("content", "text"),
    [
        (b"\x01\x02", "shorter than its 8-byte header length"),
        (struct.pack("<Q", 1000) + b"{}", "does not fit the file"),
        (struct.pack("<Q", 4) + b"{bad", "header is not valid JSON"),
        (
            _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
            "tensor 'w': data ends",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "tensor 'w': data_offsets",
        ),
        (
            _raw({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "tensor 'w' has unsupported",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "tensor 'w': shape",
        ),
        (_raw({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "tensor 'w': header entry needs"),
        (
            _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
            "tensor 'w' starts at",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
            "bytes after the last",
        ),
    ],
)
def test_bad_files_are_decode_errors_naming_file_and_tensor(
    tmp_path: Path, content: bytes, text: str
) -> None:
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(content)
    with pytest.raises(dp.DecodeError) as info:
        Checkpoint(tmp_path / "m")
    assert text in str(info.value) and str(f) in str(info.value)


def test_truncated_input_fails_the_merge_without_partial_output(tmp_path: Path) -> None:
    _write_models(tmp_path, (64, 8), ties=False)
    cfg = {"merge_method": "ties", "base_model": "base", "models": [{"model": f"m{i}"} for i in range(3)],
           "parameters": {"density": 0.5, "weight": 1.0}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    f = tmp_path / "m1" / "model.safetensors"
    full = f.read_bytes()
    f.write_bytes(full[:-100])  # a truncated download: the header promises more than the file holds
    with pytest.raises(dp.DecodeError, match=rf"{f}: tensor '[\w.]+': data ends"):
        merge_files(tmp_path / "c.yaml", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "c.yaml", "m0", "m1", "m2"]
    # truncated after its header was read: the read itself names the file and the tensor
    f.write_bytes(full)
    ck = Checkpoint(tmp_path / "m1")
    f.write_bytes(full[:200])
    with pytest.raises(dp.DecodeError, match=rf"{f}: tensor 'big.weight': the file ends after"):
        ck.read_rows("big.weight", 0, 64)


def test_writer_takes_row_blocks_and_refuses_bad_ones(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", (5, 2), torch.float32), ("b", (), torch.int64)])
    a = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    w.write("a", a[:3])
    with pytest.raises(dp.DecodeError, match=r"expected tensor 'a' \(5, 2\).*24 of 40 bytes"):
        w.write("a", torch.zeros(3, 2))  # would overflow the declared 5 rows
    with pytest.raises(dp.DecodeError, match="expected tensor 'a'"):
        w.write("a", torch.zeros(2, 3))  # wrong row shape
    w.write("a", a[3:])
    w.write("b", torch.tensor(9))
    w.close()
    ck = Checkpoint(tmp_path / "x.safetensors")
    assert torch.equal(ck["a"], a) and int(ck["b"]) == 9
    w = SafetensorsWriter(tmp_path / "y.safetensors", [("a", (5, 2), torch.float32)])
    w.write("a", a[:1])
    with pytest.raises(dp.DecodeError, match="only in part: 'a' has 8 bytes"):
        w.close()


def test_peak_memory_follows_the_chunk_not_the_largest_tensor(tmp_path: Path) -> None:
    """Base + 3 models whose single tensor is 48 MB: chunked TIES needs a few MB, whole-tensor ≥ 4 × 48 MB."""
    rows, cols = 6000, 2000
    for i, m in enumerate(("base", "a", "b", "c")):
        (tmp_path / m).mkdir()
        with SafetensorsWriter(tmp_path / m / "model.safetensors", [("w", (rows, cols), torch.float32)]) as w:
            for start in range(0, rows, 1000):  # written in blocks: the test itself stays small
                g = torch.Generator().manual_seed(i * 100 + start)
                w.write("w", torch.randn(1000, cols, generator=g))
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": m, "parameters": {"density": 0.2, "weight": 1.0}} for m in "abc"]}  # fmt: skip
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    code = textwrap.dedent(f"""
        import sys
        from deltaplane.merging import merge_files
        def peak_mb():  # VmHWM: ru_maxrss would carry the (bigger) pytest parent's peak across exec
            return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        before = peak_mb()
        merge_files({str(tmp_path / "merge.yaml")!r}, {str(tmp_path / "out")!r})
        heavy = sorted(m for m in ("transformers", "mergekit", "safetensors", "scipy") if m in sys.modules)
        print(before, peak_mb(), ",".join(heavy) or "-")
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    before_mb, peak_mb = int(out[0]), int(out[1])
    assert peak_mb - before_mb < 64, (before_mb, peak_mb)
    assert out[2] == "-", f"the merge path imported {out[2]}"
    assert Checkpoint(tmp_path / "out").infos["w"].shape == (rows, cols)


def test_fisher_of_another_shape_is_refused_before_chunking(tmp_path: Path) -> None:
    """A row slice of a too-long Fisher would fit every chunk; the whole shapes are compared first."""
    ms = [{"w": torch.randn(6, 4)} for _ in range(2)]
    fishers = [{"w": torch.rand(6, 4)}, {"w": torch.rand(8, 4)}]
    with pytest.raises(dp.ShapeMismatch, match=r"tensor 'w': fisher of model 1 has shape \(8, 4\)"):
        merge("fisher", None, ms, fishers=fishers)
    for i, (m, f) in enumerate(zip(ms, fishers, strict=True)):
        (tmp_path / f"m{i}").mkdir()
        save_file(m, tmp_path / f"m{i}" / "model.safetensors")
        save_file(f, tmp_path / f"f{i}.safetensors")
    cfg = {"merge_method": "fisher",
           "models": [{"model": f"m{i}", "parameters": {"fisher": f"f{i}.safetensors"}} for i in range(2)]}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(dp.ShapeMismatch, match=r"tensor 'w': shape \(8, 4\) in fisher '.*f1.safetensors'"):
        merge_files(tmp_path / "c.yaml", tmp_path / "out", chunk_elements=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_selection_matches_a_sort(dtype: torch.dtype) -> None:
    for trial in range(10):
        g = torch.Generator().manual_seed(trial)
        x = torch.randn(1000, generator=g, dtype=dtype) * torch.randint(-3, 3, (1000,), generator=g).to(dtype)
        x[:5] = -0.0  # negative zeros and many exact ties (the zeros)
        ks = [1, 7, 250, 500, 999, 1000]
        got = select_largest(lambda x=x: iter([(0, x[:300]), (0, x[300:])]), [ks], signed=True)[0]
        want = x.sort(descending=True).values
        assert [float(t.value) for t in got] == [float(want[k - 1]) for k in ks]


@pytest.mark.parametrize("n", [4_000, 4_096, 4_097, 30_001])  # selected directly up to 4,096; by radix above
def test_select_largest_with_ties_keeps_what_a_stable_sort_keeps(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    a = torch.randint(0, 50, (n,), generator=g).float() / 8  # ~n/50 entries tie at every threshold
    chunks = list(a.split(997))
    ks = [1, n // 5, n // 2, n]
    found = select_largest(lambda: ((0, c) for c in chunks), [ks])[0]
    order = torch.sort(a, descending=True, stable=True).indices  # ties: lowest index first
    for k, sel in zip(ks, found, strict=True):
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        rule = sel.fresh()
        assert torch.equal(torch.cat([rule.mask(c) for c in chunks]), want), k
        assert (sel.n_greater, sel.n_equal) == (int((a > sel.value).sum()), int((a == sel.value).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shrink_zeroes_what_the_mask_drops(dtype: torch.dtype) -> None:
    """TopK.shrink_ (one hardshrink, ties put back) == tau × mask(|tau|), chunk by chunk, ties included."""
    g = torch.Generator().manual_seed(5)
    tau = (torch.randint(-20, 21, (300, 7), generator=g) / 4).to(dtype)
    for k in (1, 150, 1000, 2099, 2100):
        sel = select_largest(lambda: ((0, c.abs()) for c in tau.split(40)), [[k]])[0][0]
        assert sel.n_equal > 1  # the threshold value is tied
        want = tau * sel.fresh().mask(tau.abs())  # whole tensor: one chunk
        rule = sel.fresh()
        got = torch.cat([rule.shrink_(c.clone()) for c in tau.split(40)])
        assert torch.equal(got, want), k
        assert int((got != 0).sum()) == min(k, int((tau != 0).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_della_ranks_equal_mergekits_two_argsorts(dtype: torch.dtype) -> None:
    """DELLA's probabilities rank with one argsort (of the int32 bit patterns, for float32) and a scatter, not
    mergekit's ``argsort(argsort(a))``: the same ranks bit for bit, ties (many, after rounding) by index, zeros,
    ``-0.0`` (whose bit pattern would sort first as int32, so such an input keeps the float sort) and one row."""
    from deltaplane.merging.task_arithmetic import della_probabilities

    g = torch.Generator().manual_seed(5)
    a = (torch.randn(7, 300, generator=g) * 4).round().abs().to(dtype)  # integers: ties in every row
    a[0, :5] = 0.0
    for x in (a, a.reshape(1, -1), torch.where(a == 0, -0.0, a), a.reshape(3, 7, 100)):  # 3-D: along dim 1
        ranks = torch.argsort(torch.argsort(x, dim=1, stable=True), dim=1, stable=True).to(x.dtype)
        want = (0.5 - 0.2) + ranks / (x.shape[1] - 1) * (2 * 0.2)
        assert torch.equal(della_probabilities(x, 0.5, 0.2), want)
