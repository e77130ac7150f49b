"""The vocoder step cut into its branches and a tail (export/step_parts.py), on the CPU.

The CUDA backend runs the parts as a fork/join on streams (tests/test_cuda_graphs.py with fakes,
tests/test_gpu.py on a GPU); here: which node goes where, that the parts run one after another
compute exactly what the whole graph does, and what the manifest says about them.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from semvoc.export.step_parts import BRANCH, TAIL, plan_parts, write_parts
from semvoc.runtime.backends.base import bucket_symbols, tensor_shape
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES
from semvoc.runtime.manifest import EngineError, load_manifest


def _graph(nodes, inputs, outputs, initializers=()):
    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4])

    inner = {out for node in nodes for out in node.output} - set(outputs)
    return helper.make_graph(nodes, "g", [info(n) for n in inputs], [info(n) for n in outputs],
                             initializer=list(initializers), value_info=[info(n) for n in sorted(inner)])


def _two_branches():
    """x -> cast-like Relu shared by both branches; branch b: Mul by its input a_b, then Add of w_b;
    the tail adds the branches and the shared value; y2 depends on no branch."""
    weights = [helper.make_tensor(f"w{b}", TensorProto.FLOAT, [4], np.full(4, b + 1.0, np.float32).tobytes(), raw=True)
               for b in range(2)]
    nodes = [
        helper.make_node("Relu", ["x"], ["shared"]),
        helper.make_node("Mul", ["shared", "a0"], ["m0"]),
        helper.make_node("Add", ["m0", "w0"], ["r0"]),
        helper.make_node("Mul", ["shared", "a1"], ["m1"]),
        helper.make_node("Add", ["m1", "w1"], ["r1"]),
        helper.make_node("Sum", ["r0", "r1", "shared"], ["y"]),
        helper.make_node("Neg", ["x"], ["y2"]),
    ]
    return _graph(nodes, ["x", "a0", "a1"], ["y", "y2"], weights)


def test_each_node_goes_to_the_branch_it_depends_on_and_shared_ones_to_every_reader():
    graph = _two_branches()
    parts = plan_parts(graph, [["a0"], ["a1"]])
    assert [p.role for p in parts] == [BRANCH, BRANCH, TAIL]
    names = [[graph.node[i].output[0] for i in p.nodes] for p in parts]
    # the shared Relu runs in both branches and in the tail, which reads it too: nothing but the
    # branches' results crosses between parts
    assert names == [["shared", "m0", "r0"], ["shared", "m1", "r1"], ["shared", "y", "y2"]]
    assert [p.inputs for p in parts] == [["x", "a0"], ["x", "a1"], ["x", "r0", "r1"]]
    assert [p.outputs for p in parts] == [["r0"], ["r1"], ["y", "y2"]]
    assert [p.initializers for p in parts] == [["w0"], ["w1"], []]


def test_graphs_that_cannot_be_cut_say_why():
    graph = _two_branches()
    assert plan_parts(graph, [["a0"], ["nothing"]]) == "fewer than two branches have nodes of their own"
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then))
    assert plan_parts(graph, [["a0"], ["a1"]]) == "a node has a subgraph"


def test_parts_written_beside_the_graph_compute_what_it_does(tmp_path):
    graph = _two_branches()
    # IR 10: what onnxruntime >= 1.20 reads (newer onnx writes newer IR versions by default)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "step.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="step.onnx.data", size_threshold=0)
    entries, why = write_parts(path, [["a0"], ["a1"]], {"batch": "batch"})
    assert why == "" and [e["file"] for e in entries] == ["step.branch0.onnx", "step.branch1.onnx", "step.tail.onnx"]
    assert entries[0]["outputs"] == [{"name": "r0", "dtype": "float32", "shape": ["batch", 4]}]
    # the parts keep the graph's data file: no weights of their own on disk
    part = onnx.load(str(tmp_path / "step.branch1.onnx"), load_external_data=False)
    assert {e.key: e.value for e in part.graph.initializer[0].external_data}["location"] == "step.onnx.data"
    assert not (tmp_path / "step.branch1.onnx.data").exists()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((3, 4)).astype(np.float32) for n in ("x", "a0", "a1")}
    expected = ort.InferenceSession(str(path)).run(None, feeds)
    values = dict(feeds)
    for entry in entries:
        names = [t["name"] for t in entry["outputs"]]
        session = ort.InferenceSession(str(tmp_path / entry["file"]))
        values.update(zip(names, session.run(names, {n: values[n] for n in entry["inputs"]}), strict=True))
    assert np.array_equal(values["y"], expected[0]) and np.array_equal(values["y2"], expected[1])
    # a value passed between parts whose dims no input names, or without a recorded type: not cut
    assert write_parts(path, [["a0"], ["a1"]], {})[1] == (
        "the value 'x' passed between parts has dims ['batch'] that no input names")
    del model.graph.value_info[:]
    onnx.save_model(model, str(path), save_as_external_data=True, location="step.onnx.data", size_threshold=0)
    assert write_parts(path, [["a0"], ["a1"]], {"batch": "batch"}) == (
        [], "the value 'r0' passed between parts has no recorded type and shape")


@pytest.mark.parametrize("batch", [1, 2])
def test_the_exported_vocoder_step_runs_the_same_as_its_parts(demo_engine, batch):
    manifest = load_manifest(demo_engine, verify=False)
    graph = manifest.graph("vocoder_step")
    assert [p.role for p in graph.parts] == ["branch"] * 3 + ["tail"]
    files = json.loads((demo_engine / "manifest.json").read_text())["files"]
    assert all(p.file in files for p in graph.parts)  # hashed and verified like every engine file
    indexed = {w.name for w in graph.weights}
    taken = [set(p.weights) for p in graph.parts]
    assert all(t <= indexed for t in taken) and not set.intersection(*taken[:3])  # branches own their weights
    symbols = bucket_symbols(manifest, batch, manifest.frames(manifest.buckets["durations_s"][0]))
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.uniform(-1, 1, tensor_shape(t, symbols)).astype(NUMPY_DTYPES[t.dtype])
             for t in graph.inputs}
    feeds["step"] = np.array([2], np.int64)
    feeds["t_span"] = np.linspace(0, 0.9, len(feeds["t_span"]), dtype=np.float32)
    whole = ort.InferenceSession(str(demo_engine / graph.file))
    parts = [ort.InferenceSession(str(demo_engine / p.file)) for p in graph.parts]
    ours, theirs = dict(feeds), dict(feeds)
    for _ in range(2):  # two steps, each side feeding its own state back
        expected = dict(zip(["audio_next", "step_next"], whole.run(None, theirs), strict=True))
        for part, session in zip(graph.parts, parts, strict=True):
            names = [t.name for t in part.outputs]
            out = session.run(names, {n: ours[n] for n in part.inputs})
            assert [o.shape for o in out] == [tuple(tensor_shape(t, symbols)) for t in part.outputs]
            ours.update(zip(names, out, strict=True))
        assert np.array_equal(ours["audio_next"], expected["audio_next"])
        assert np.array_equal(ours["step_next"], expected["step_next"])
        ours["audio"], ours["step"] = ours["audio_next"], ours["step_next"]
        theirs["audio"], theirs["step"] = expected["audio_next"], expected["step_next"]


@pytest.mark.parametrize("damage", ["no tail", "one branch", "unknown input"])
def test_a_manifest_whose_parts_do_not_fit_is_refused(engine_copy, damage):
    path = engine_copy / "manifest.json"
    data = json.loads(path.read_text())
    parts = data["graphs"]["vocoder_step"]["parts"]
    if damage == "no tail":
        parts.pop()
    elif damage == "one branch":
        del parts[1:3]
    else:
        parts[0]["inputs"].append("val_999")
    path.write_text(json.dumps(data))
    with pytest.raises(EngineError, match="its parts must be two branches or more"):
        load_manifest(engine_copy, verify=False)
