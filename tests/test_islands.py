"""fp32 islands per node (export.islands): the rewrite, the search on a tiny graph, and an export
of the demo model with one DiT block scaled to overflow fp16 (CPU, about a minute)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from semvoc.export.islands import find_fp32_islands, with_fp32_islands
from semvoc.runtime.backends.ort_common import make_session
from tests.conftest import assert_weight_index_matches


def _overflowing_graph() -> onnx.ModelProto:
    """y = (x @ W) * 1e-3 (a Constant) with |x @ W| ~ 1e5 (past fp16's 65504); z = x + 1 on the side."""
    w = np.full((4, 4), 3e4, np.float16)
    nodes = [helper.make_node("Constant", [], ["s"], name="scale", value=numpy_helper.from_array(
                 np.array(1e-3, np.float16))),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="big_matmul"),
             helper.make_node("Mul", ["h", "s"], ["y"], name="scale_down"),
             helper.make_node("Add", ["x", "one"], ["z"], name="side_add")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2, 4])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1.0, np.float16), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_islands_rewrite_is_a_valid_graph_with_fp32_inside(tmp_path):
    model = _overflowing_graph()
    dtypes = {name: np.dtype(np.float16) for name in ("x", "h", "y", "z")}
    rewritten = with_fp32_islands(model, {"big_matmul", "scale_down"}, dtypes)
    onnx.checker.check_model(rewritten, full_check=True)
    nodes = {n.name: n for n in rewritten.graph.node}
    assert list(nodes["big_matmul"].input) == ["x__fp32", "w__fp32"]  # input cast up, weight stored fp32
    assert list(nodes["scale_down"].input) == ["h", "s__fp32"]  # island-internal h is fp32; constant cast up
    assert nodes["scale_down"].output[0] == "y__fp32" and nodes["side_add"].input[0] == "x"  # side stays fp16
    path = tmp_path / "islands.onnx"
    onnx.save(rewritten, str(path))
    x = np.ones((2, 4), np.float16)
    y, z = make_session(path).run(None, {"x": x})
    assert y.dtype == np.float16 and np.allclose(y.astype(np.float32), 120.0, rtol=1e-3)  # 4 * 3e4 * 1e-3
    assert np.all(z == 2)


def test_search_finds_the_overflowing_node_and_no_other():
    x = np.ones((2, 4), np.float16)
    search = find_fp32_islands(_overflowing_graph(), {"x": x}, lambda p: make_session(p))
    assert search.converged and "big_matmul" in search.nodes and "side_add" not in search.nodes
    assert search.rounds[0]["added"] == ["big_matmul"] and search.rounds[0]["worst_error"] == "inf"
    assert search.where["big_matmul"] == "MatMul in the graph"


def test_nothing_to_do_on_a_graph_that_fits_fp16():
    model = _overflowing_graph()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 4), 0.5, np.float16), "w"))
    search = find_fp32_islands(model, {"x": np.ones((2, 4), np.float16)}, lambda p: make_session(p))
    assert search.converged and search.nodes == [] and search.rounds == []


@pytest.fixture(scope="module")
def overflowing_engine(tmp_path_factory):
    """The demo model with block 1's GEGLU value half scaled by 3e4 (and its down projection by
    1/3e4: the same function in fp32, activations up to ~5e5 in fp16), exported --fp16."""
    from semvoc.export.engine import ExportOptions, ModelSource, export_engine
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    torch.set_grad_enabled(False)
    model = build_model(preset("demo"), seed=0)
    block = model.dit.blocks[1]
    proj, down = block.mlp.net[0].proj, block.mlp.net[2]
    half = proj.weight.shape[0] // 2
    proj.weight[:half] *= 3e4
    proj.bias[:half] *= 3e4
    down.weight /= 3e4
    out = tmp_path_factory.mktemp("engines") / "overflow"
    export_engine(ModelSource(model, "demo, block 1 scaled to overflow fp16 (UNTRAINED)", untrained=True),
                  ExportOptions(out=out, dtype="float16", components=("dit",), durations=(1.0,), batch_sizes=(1,),
                                max_text_tokens=24, max_dit_steps=40, max_vocoder_steps=40, parity_steps=1))
    return out


def test_overflowing_block_gets_fp32_islands_and_the_rest_stays_fp16(overflowing_engine):
    manifest = json.loads((overflowing_engine / "manifest.json").read_text())
    parity = json.loads((overflowing_engine / "parity.json").read_text())
    assert manifest["precision"]["components"]["dit"] == "float16"  # not fp32 whole
    assert parity["all_passed"]
    step = parity["graphs"]["dit_step"]
    islands = step["fp32_islands"]
    assert islands["converged"] and islands["rounds"][0]["worst_error"] == "inf"  # it did overflow
    assert 1 <= len(islands["nodes"]) <= 8
    assert all("blocks.1" in where for where in islands["where"].values()), islands["where"]
    assert parity["fp32_islands"]["dit_step"] == islands["nodes"] == manifest["precision"]["fp32_islands"]["dit_step"]
    assert manifest["graphs"]["dit_step"]["fp32_islands"] == islands["nodes"]

    graph = onnx.load(str(overflowing_engine / "dit_step.onnx")).graph
    nodes = {n.name: n for n in graph.node}
    fp32_weights = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    fp16_weights = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert any(x in fp32_weights for name in islands["nodes"] for x in nodes[name].input)
    # every other block's weights stay fp16
    assert sum(len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64 for t in fp16_weights) >= 10
    from semvoc.runtime.manifest import load_manifest

    assert load_manifest(overflowing_engine).graphs["dit_step"]  # hashes match the rewritten files
    # the weight index describes the rewritten file, the island's fp32 weights included (onnxruntime's
    # CPU provider computes fp16 nodes in fp32: it folds most fp16 weights into fp32 copies, which
    # leaves them out of the index of an fp16 engine exported on the CPU)
    assert_weight_index_matches(overflowing_engine, "dit_step", min_share=0.0)
    index = {w["name"]: w["dtype"] for w in manifest["graphs"]["dit_step"]["weights"]}
    assert any(name.endswith("__fp32") and dtype == "float32" for name, dtype in index.items()), index


def test_fp16_only_ops_are_never_made_fp32():
    """QkvAttention has an fp16 kernel only: the search leaves it out of the all-fp32 reference run and
    never adds it to an island; every other node may go fp32."""
    from semvoc.export.islands import _can_run_fp32

    assert not _can_run_fp32(helper.make_node("QkvAttention", ["qkv"], ["y"], domain="semvoc.cuda"))
    assert _can_run_fp32(helper.make_node("CrossAttention", ["q"], ["y"], domain="semvoc.cuda"))
    assert _can_run_fp32(helper.make_node("QkvAttention", ["qkv"], ["y"], domain="other"))
    assert _can_run_fp32(helper.make_node("Attention", ["q"], ["y"]))
