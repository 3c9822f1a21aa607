"""`deploy model.onnx`: any ONNX graph in, pruned + quantized artifact out, measured against the original."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from deltaplane.deploy import export_onnx, parse_prune
from deltaplane.deploy.onnx_input import onnx_feeds, prune_onnx
from deltaplane.errors import UnsupportedLayer


def test_prune_onnx_2_4_groups_run_along_the_input_dimension(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    m = onnx.load(str(export_onnx(net, torch.randn(1, 16), tmp_path / "m.onnx").path))
    sparsity, skipped = prune_onnx(m, parse_prune("2:4"))
    assert sparsity == pytest.approx(0.5) and skipped == {}
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:  # exported Gemm weights are (out, in): every 4 consecutive inputs keep exactly 2
            nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert (nz == 2).all(), init.name
            orig = dict(net.named_parameters())[init.name].detach().numpy()
            kept = np.abs(orig).reshape(orig.shape[0], -1, 4)
            thresh = np.sort(kept, -1)[..., 1:2]  # the two largest of each group survive
            assert ((np.abs(w.reshape(kept.shape)) > 0) == (kept > thresh)).all()
    with pytest.raises(UnsupportedLayer, match="PyTorch module"):
        prune_onnx(m, parse_prune("wanda:2:4"))


def test_cli_deploys_an_onnx_file(app, tmp_path, trained_cnn, digits):
    path = export_onnx(trained_cnn.eval(), torch.from_numpy(digits[2][:1]), tmp_path / "cnn.onnx").path
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(path), "--prune", "0.5", "--quant", "int8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "onnx" and m["sizes"]["compression_ratio"] > 4
    assert m["fidelity"]["accuracy"] > 0.9 and m["fidelity"]["inputs"] > 300
    assert 0.45 < m["weight_sparsity"] < 0.55 and m["gates"]["passed"]
    assert "accuracy" in r.output and "peak activations" in r.output and "MACs / inference" in r.output
    # MACs read off the graphs: the digits CNN's layer arithmetic (conv 8×64×9, conv 16×64×72, fc 256·64, 64·10),
    # the same in the int8 graph (ConvInteger / MatMulInteger), with half the weights' MACs skippable after pruning
    cost = m["device_cost"]
    assert cost["fp32"]["macs"] == cost["compressed"]["macs"] == 8 * 64 * 9 + 16 * 64 * 72 + 256 * 64 + 640
    assert cost["compressed"]["nonzero_macs"] < 0.7 * cost["fp32"]["nonzero_macs"]
    assert "## Device cost" in (out / "MODEL_CARD.md").read_text()
    # a graph whose input is not an image: random feeds, and the card says so
    lin = torch.nn.Sequential(torch.nn.Linear(10, 3)).eval()
    p2 = export_onnx(lin, torch.randn(1, 10), tmp_path / "lin.onnx").path
    r = CliRunner().invoke(app, ["deploy", str(p2), "--quant", "int8", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
    assert "random inputs" in (tmp_path / "o2" / "MODEL_CARD.md").read_text()
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    r = CliRunner().invoke(app, ["deploy", str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "o3")])
    assert r.exit_code == 1 and "error:" in r.output and not (tmp_path / "o3").exists()  # unreadable input


def test_onnx_feeds_follow_the_signature(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(10, 3)).eval()
    m = onnx.load(str(export_onnx(lin, torch.randn(1, 10), tmp_path / "l.onnx").path))
    f = onnx_feeds(m, 3, seed=0)
    assert len(f) == 3 and f[0]["input"].shape == (1, 10) and f[0]["input"].dtype == np.float32
    assert np.array_equal(onnx_feeds(m, 1, seed=0)[0]["input"], f[0]["input"])


def test_pruning_an_fp16_onnx_model_keeps_its_weights_fp16(tmp_path):
    # prune_onnx wrote every pruned weight back as float32: an fp16 graph then failed to load in ONNX Runtime
    # ("Type parameter (T) of Optype (Gemm) bound to different types") with a raw ORT traceback
    import onnxruntime as ort

    from deltaplane.deploy.onnx_input import deploy_onnx_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).half().eval()
    src = tmp_path / "fp16.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.randn(1, 16).half(),), str(src), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False,
        )  # fmt: skip
    feeds = onnx_feeds(onnx.load(str(src)), 8, seed=0)
    res = deploy_onnx_model(src, tmp_path / "out", eval_feeds=feeds, prune="0.5", quant="none", gates=None)
    shipped = onnx.load(str(tmp_path / "out" / "model.onnx"))
    weights = [numpy_helper.to_array(i) for i in shipped.graph.initializer if len(i.dims) == 2]
    assert weights and all(w.dtype == np.float16 for w in weights)
    assert res.manifest["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    sess = ort.InferenceSession(shipped.SerializeToString(), providers=["CPUExecutionProvider"])
    x = feeds[0]["x"]
    pruned = {n: numpy_helper.to_array(i) for n, i in ((i.name, i) for i in shipped.graph.initializer)}
    with torch.no_grad():  # an independent forward pass with the shipped weights in PyTorch
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(pruned[name]))
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, atol=2e-2)


class _Emb(torch.nn.Module):
    """Token ids → a ``rows``-row embedding table (looked up at ``ids + offset``) → mean → linear."""

    def __init__(self, rows: int, offset: int = 0) -> None:
        super().__init__()
        self.e, self.lin, self.offset = torch.nn.Embedding(rows, 8), torch.nn.Linear(8, 4), offset

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.e(ids + self.offset if self.offset else ids).mean(1))


def _export_emb(path, rows: int, offset: int = 0):
    torch.manual_seed(0)
    return export_onnx(
        _Emb(rows, offset).eval(), torch.full((1, 5), -offset, dtype=torch.long), path, input_names=["ids"],
        dynamic_axes={"ids": {0: "b", 1: "t"}, "output": {0: "b"}},
    ).path  # fmt: skip


def test_the_cli_feeds_a_token_model_ids_its_embedding_table_has(app, tmp_path):
    # the CLI's random integers went up to 100, so an ONNX token model with a vocabulary under 100 could not
    # be deployed at all (ConfigError, exit 2): ids are now capped at the rows of the table the input indexes
    import onnxruntime as ort

    src = _export_emb(tmp_path / "emb.onnx", rows=7)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(src), "--quant", "int8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    ids = m["eval_inputs"]["integer_ranges"]["ids"]
    assert (ids["low"], ids["high"]) == (0, 7) and "7-row table" in ids["why"]
    assert m["eval_inputs"]["source"] == "random" and m["fidelity"]["inputs"] == 32
    assert "'ids' integers in [0, 7)" in " ".join((out / "MODEL_CARD.md").read_text().split())
    # independently: ONNX Runtime refuses id 7 on the source graph, and the feeds used all run on it
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="out of bounds|indices"):
        sess.run(None, {"ids": np.full((1, 4), 7, np.int64)})
    feeds = onnx_feeds(onnx.load(str(src)), 32, seed=1)
    assert max(int(f["ids"].max()) for f in feeds) == 6


def test_random_ids_reach_every_row_of_a_large_embedding_table(tmp_path):
    # ids were capped at 100 whatever the table's size, so the rows beyond 100 of a vocabulary (in BERT-style
    # vocabularies, every real token: ids below 100 are [PAD] and [unused]) were never fed: what int8 did to
    # them went unmeasured. The feeds now draw from every row the input indexes.
    import onnxruntime as ort

    from deltaplane.deploy.onnx_input import integer_input_ranges

    src = _export_emb(tmp_path / "big.onnx", rows=500)
    big = onnx.load(str(src))
    r = integer_input_ranges(big)["ids"]
    assert (r["low"], r["high"]) == (0, 500) and "every row" in r["why"]
    feeds = onnx_feeds(big, 32, seed=1)
    ids = np.concatenate([f["ids"].ravel() for f in feeds])
    assert int(ids.max()) >= 400 and int(ids.min()) >= 0 and (ids >= 100).mean() > 0.7
    # independently: ONNX Runtime runs the source graph on all of them (none beyond the table)
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    for f in feeds:
        sess.run(None, f)


def test_onnx_inputs_the_model_cannot_run_are_a_usage_error(app, tmp_path):
    # a model the CLI cannot feed (its ids are shifted by 60 before a 50-row lookup: no range of random ids is
    # traced to fit it), and feeds under the wrong input name: both ended in a raw onnxruntime traceback
    from deltaplane.deploy.onnx_input import deploy_onnx_model
    from deltaplane.errors import ConfigError

    src = _export_emb(tmp_path / "emb.onnx", rows=50, offset=60)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["deploy", str(src), "--quant", "int8", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "does not run on its evaluation inputs" in r.output and "Traceback" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    src = _export_emb(tmp_path / "emb50.onnx", rows=50)
    ok = [{"ids": np.zeros((1, 4), np.int64)}]
    with pytest.raises(ConfigError, match="the model takes"):
        deploy_onnx_model(src, out, eval_feeds=[{"input_ids": ok[0]["ids"]}], quant="none")
    assert deploy_onnx_model(src, out, eval_feeds=ok, quant="none").manifest["fidelity"]["inputs"] == 1


def _nm_holds(rows: np.ndarray, n: int = 2, m: int = 4) -> bool:
    """At most ``n`` nonzeros in every group of ``m`` along the last (input) dimension of ``(out, in)`` rows."""
    return bool(((rows.reshape(rows.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_a_weight_shared_by_nodes_of_different_orientations_is_not_nm_pruned_along_one_of_them():
    # prune_onnx kept one orientation per initializer, the last node's: a weight read as (in, out) by a MatMul
    # and as (out, in) by a Gemm(transB=1) was pruned 2:4 along the Gemm's input only, and the MatMul shipped
    # a pattern that is not 2:4 along its own input dimension
    from onnx import TensorProto, helper

    g = np.random.default_rng(0)
    shared, other = g.standard_normal((8, 8)).astype(np.float32), g.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Gemm", ["x", "W"], ["b"], transB=1),
        helper.make_node("MatMul", ["a", "V"], ["c"]),
        helper.make_node("Add", ["b", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(shared, "W"), numpy_helper.from_array(other, "V")],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sparsity, skipped = prune_onnx(m, parse_prune("2:4"))
    w = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    # every node's own view of its weight as (out, in) rows, read off the graph: 2:4 or left dense
    for node in m.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            rows = w[node.input[1]] if node.op_type == "Gemm" else w[node.input[1]].T
            dense = np.array_equal(w[node.input[1]], {"W": shared, "V": other}[node.input[1]])
            assert _nm_holds(rows) or dense, node.op_type
    assert "different orientations" in skipped["W"] and "MatMul" in skipped["W"]
    assert _nm_holds(w["V"].T) and sparsity == pytest.approx(0.5)
    # unstructured magnitude pruning does not depend on the orientation: the shared weight is pruned
    m2 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prune_onnx(m2, parse_prune("0.5"))
    assert (numpy_helper.to_array(m2.graph.initializer[0]) == 0).mean() == pytest.approx(0.5)
    # a graph whose only weight is such a shared one: refused, saying why
    only = helper.make_graph(
        [*nodes[:2], helper.make_node("Add", ["a", "b"], ["y"])], "g", list(graph.input), list(graph.output),
        [numpy_helper.from_array(shared, "W")],
    )  # fmt: skip
    with pytest.raises(UnsupportedLayer, match="different orientations"):
        prune_onnx(helper.make_model(only, opset_imports=[helper.make_opsetid("", 17)]), parse_prune("2:4"))


def test_an_onnx_model_lists_the_robustness_gates_it_does_not_evaluate(tmp_path, trained_cnn, digits):
    # an ONNX digits classifier was never checked for OOD or adversarial drops, yet unlike a PyTorch classifier
    # its manifest did not list those gates under gates.not_evaluated: whatever its inputs, it now does, with
    # why, in the manifest, the card's gate table and its limitations (a refusal's manifest too)
    from deltaplane.deploy import Gates
    from deltaplane.deploy.onnx_input import deploy_onnx_model, digits_feeds
    from deltaplane.errors import QualityGateFailed

    _, _, xte, yte = digits
    cnn = export_onnx(trained_cnn.eval(), torch.from_numpy(xte[:1]), tmp_path / "cnn.onnx").path
    lin = export_onnx(torch.nn.Linear(10, 3).eval(), torch.randn(1, 10), tmp_path / "lin.onnx").path
    kinds = {
        "digits": (cnn, digits_feeds(onnx.load(str(cnn)), xte[:64]), yte[:64]),
        "random": (lin, onnx_feeds(onnx.load(str(lin)), 16, seed=0), None),
    }
    for kind, (src, feeds, labels) in kinds.items():
        out = tmp_path / kind
        res = deploy_onnx_model(src, out, eval_feeds=feeds, labels=labels, quant="none", gates=Gates())
        listed = {g["gate"]: g["why"] for g in res.manifest["gates"]["not_evaluated"]}
        assert set(listed) == {"max-ood-drop", "max-adv-drop"}, kind
        assert "No OOD evaluation" in listed["max-ood-drop"] and "gradients" in listed["max-adv-drop"]
        on_disk = json.loads((out / "manifest.json").read_text())["gates"]["not_evaluated"]
        assert on_disk == res.manifest["gates"]["not_evaluated"]
        card = (out / "MODEL_CARD.md").read_text()
        assert "| max-adv-drop | — | 10 pts | **not evaluated**" in card and listed["max-ood-drop"] in card
    # refused by min-above-chance (labels it gets all wrong): what was not evaluated is still said
    wrong = (yte[:64] + 1) % 10
    with pytest.raises(QualityGateFailed, match="min-above-chance") as e:
        deploy_onnx_model(cnn, tmp_path / "r", eval_feeds=kinds["digits"][1], labels=wrong, quant="none",
                          gates=Gates())  # fmt: skip
    assert {g["gate"] for g in e.value.manifest["gates"]["not_evaluated"]} == {"max-ood-drop", "max-adv-drop"}
    # gates off: nothing is listed as not evaluated, the card says the gates were off
    res = deploy_onnx_model(lin, tmp_path / "off", eval_feeds=kinds["random"][1], quant="none", gates=None)
    assert "not_evaluated" not in res.manifest["gates"] and res.manifest["gates"]["off"]
