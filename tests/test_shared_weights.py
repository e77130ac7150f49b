"""The step graphs' weights: indexed in the manifest at export, loaded once and shared by every
session of a graph (``semvoc.runtime.backends.shared_weights``), refused when the index is bad,
and engines without an index still run."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, cuda_available, make_session
from semvoc.runtime.backends.shared_weights import load_shared_weights
from semvoc.runtime.manifest import EngineError, eval_dim, load_manifest
from semvoc.runtime.pipeline import Pipeline
from tests.conftest import assert_weight_index_matches

STEP_GRAPHS = ("dit_step", "vocoder_step")


@pytest.mark.parametrize("graph", STEP_GRAPHS)
def test_weight_index_describes_the_onnx_file(demo_engine, graph):
    assert_weight_index_matches(demo_engine, graph)
    manifest = load_manifest(demo_engine)
    info = manifest.graphs[graph]
    assert info.data_file == f"{graph}.onnx.data" and info.data_file in manifest.data["files"]
    assert len(info.weights) >= 20 and sum(w.length for w in info.weights) > 1e6
    mode = stat.S_IMODE((demo_engine / info.data_file).stat().st_mode)
    assert mode == stat.S_IMODE((demo_engine / info.file).stat().st_mode)  # as readable as the graph
    others = [g for g in manifest.graphs.values() if g.kind not in STEP_GRAPHS]
    assert others and all(not g.weights and g.data_file is None for g in others)


def _feeds(manifest, graph, batch=1) -> dict[str, np.ndarray]:
    symbols = {"batch": batch, "frames": manifest.frames(1.0), "dit_rows": manifest.buckets["dit_rows"],
               "vocoder_rows": manifest.buckets["vocoder_rows"]}
    rng = np.random.default_rng(0)
    feeds = {}
    for t in graph.inputs:
        shape = [eval_dim(s, symbols) for s in t.shape]
        dtype = NUMPY_DTYPES[t.dtype]
        if t.name == "step":
            feeds[t.name] = np.array([3], np.int64)
        elif dtype == np.bool_:
            feeds[t.name] = np.ones(shape, bool)
        else:
            feeds[t.name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
    return feeds


def test_sessions_given_the_shared_weights_read_one_copy(demo_engine):
    """Two sessions built with the same shared weights (CPU values, through the code path the CUDA
    backend uses) compute what a plain session computes; after the shared buffers are overwritten,
    both change, identically, and the plain session does not: they read the one copy."""
    manifest = load_manifest(demo_engine)
    graph = manifest.graph("dit_step")
    weights = load_shared_weights(demo_engine, graph, "cpu")
    assert len(weights) == len(graph.weights) and weights.nbytes == sum(w.length for w in graph.weights)
    path = demo_engine / graph.file
    plain, first, second = (make_session(path), make_session(path, initializers=weights.initializers),
                            make_session(path, initializers=weights.initializers))
    feeds = _feeds(manifest, graph)
    before = [s.run(None, feeds)[0] for s in (plain, first, second)]
    assert np.array_equal(before[0], before[1]) and np.array_equal(before[1], before[2])

    for w in graph.weights:
        weights.initializers[w.name].update_inplace(np.zeros(w.shape, w.dtype))
    after = [s.run(None, feeds)[0] for s in (plain, first, second)]
    assert np.array_equal(after[0], before[0])
    assert np.isfinite(after[1]).all() and not np.allclose(after[1], before[1])
    assert np.array_equal(after[1], after[2])


def test_packed_weights_are_aligned_views_of_the_data_file(demo_engine):
    """Every indexed weight is a view into one buffer, at an aligned offset, holding the bytes the
    data file stores for it; the buffer is the weights' size plus alignment padding only."""
    from semvoc.runtime.backends.shared_weights import ALIGNMENT, packed_offsets

    manifest = load_manifest(demo_engine)
    graph = manifest.graph("vocoder_step")
    lengths = [w.length for w in graph.weights]
    offsets, total = packed_offsets(lengths)
    assert all(o % ALIGNMENT == 0 for o in offsets) and offsets == sorted(offsets)
    assert all(b - a >= n for a, b, n in zip(offsets, [*offsets[1:], total], lengths, strict=True))
    assert sum(lengths) <= total < sum(lengths) + ALIGNMENT * len(lengths)
    weights = load_shared_weights(demo_engine, graph, "cpu")
    assert weights.packed
    data = (demo_engine / graph.data_file).read_bytes()
    for w in graph.weights:
        view = weights.initializers[w.name]
        stored = np.frombuffer(data[w.offset:w.offset + w.length], np.dtype(w.dtype)).reshape(w.shape)
        assert view.shape() == list(w.shape) and np.array_equal(view.numpy(), stored)
    assert packed_offsets([1, ALIGNMENT, ALIGNMENT + 1]) == ([0, ALIGNMENT, 2 * ALIGNMENT], 4 * ALIGNMENT)
    weights.close()
    assert len(weights) == 0


def test_the_cuda_runtime_already_in_the_process_is_the_one_used():
    """Packed weights are allocated through the libcudart onnxruntime's CUDA provider loaded, found
    in the process's mappings (not a second runtime picked by name)."""
    import subprocess
    import sys
    from pathlib import Path

    from semvoc.runtime.backends.shared_weights import loaded_cudart

    wheel = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    candidates = sorted(wheel.glob("nvidia/*/lib/libcudart.so.*"))
    if not candidates:
        pytest.skip("no libcudart here (pip install nvidia-cuda-runtime)")
    assert loaded_cudart("/nonexistent/maps") is None
    script = ("import ctypes, sys; ctypes.CDLL(sys.argv[1]); "
              "from semvoc.runtime.backends.shared_weights import loaded_cudart; print(loaded_cudart())")
    out = subprocess.run([sys.executable, "-c", script, str(candidates[0])], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == candidates[0].resolve()


@pytest.mark.parametrize("damage, message", [
    (lambda w, size: w.update(offset=size), r"past the end of dit_step\.onnx\.data"),
    (lambda w, size: w.update(length=w["length"] + 4), r"its length says"),
    (lambda w, size: w.update(dtype="complex64"), r"unknown dtype 'complex64'"),
    (lambda w, size: w.update(shape=[-1]), r"has shape \[-1\]"),
])
def test_a_damaged_weight_index_is_refused(engine_copy, damage, message):
    path = engine_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["graphs"]["dit_step"]
    damage(entry["weights"][3], (engine_copy / entry["data_file"]).stat().st_size)
    path.write_text(json.dumps(manifest))  # the manifest is not in its own sha256 list
    with pytest.raises(EngineError, match=message) as err:
        load_manifest(engine_copy)
    text = str(err.value)
    assert "'dit_step'" in text and "re-export the engine" in text and "\n" not in text


def test_an_engine_without_a_weight_index_still_runs(demo_engine, engine_copy):
    """Engines exported before the index: the CPU runs them as before, the CUDA backend gives their
    sessions no shared weights (each loads its own copy)."""
    path = engine_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["graphs"].values():
        entry.pop("weights", None)
    path.write_text(json.dumps(manifest))
    old = load_manifest(engine_copy)
    assert not any(g.weights for g in old.graphs.values())
    assert load_shared_weights(engine_copy, old.graph("dit_step"), "cpu") is None
    request = {"seed": 3, "steps": 4, "vocoder_steps": 3}
    audio = Pipeline(engine_copy, "onnxruntime-cpu").generate(["rain on a roof"], **request).audio
    expected = Pipeline(demo_engine, "onnxruntime-cpu").generate(["rain on a roof"], **request).audio
    assert audio.shape == expected.shape and np.isfinite(audio).all() and np.array_equal(audio, expected)


def _recording_backend(manifest, monkeypatch):
    """An ``OrtCudaBackend`` whose onnxruntime sessions are recorded instead of created, and whose
    weights are placed on the CPU: the sharing logic runs on any machine. Its loops would use
    onnxruntime's graphs, so every step graph is one session, on a GPU machine too (where whole-loop
    graphs would run the vocoder step as its parts: ``test_the_vocoder_steps_parts_*`` below)."""
    from semvoc.runtime.backends import ort_cuda

    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, "onnxruntime")
    calls, loads = [], []

    def fake_session(path, provider, **kwargs):
        calls.append((Path(path).name, kwargs))
        return object()

    def load_on_cpu(root, graph, device, device_id):
        loads.append((graph.name, device))
        return load_shared_weights(root, graph, "cpu")

    monkeypatch.setattr(ort_cuda, "make_session", fake_session)
    monkeypatch.setattr(ort_cuda, "load_shared_weights", load_on_cpu)
    backend = ort_cuda.OrtCudaBackend(manifest)
    backend.warm_up = False  # the recorded sessions cannot run (prepare's warm-up runs: test_runtime.py)
    return backend, calls, loads


def test_cuda_backend_loads_each_step_graph_once_for_all_buckets(demo_engine, monkeypatch):
    manifest = load_manifest(demo_engine, verify=False)
    backend, calls, loads = _recording_backend(manifest, monkeypatch)
    backend.prepare(1, 25)
    backend.prepare(2, 25)  # another bucket: new sessions, the same weights
    backend._session(manifest.graph("dit_step"))  # the uncaptured one that names a NaN's step
    assert sorted(loads) == [("dit_step", "cuda"), ("vocoder_step", "cuda")]
    given = {}
    for name, kwargs in calls:
        given.setdefault(name, []).append(kwargs["initializers"])
    for kind in STEP_GRAPHS:
        sessions = given[f"{kind}.onnx"]
        assert len(sessions) == (3 if kind == "dit_step" else 2)
        assert all(s is sessions[0] for s in sessions)  # the same values, not copies
        assert set(sessions[0]) == {w.name for w in manifest.graph(kind).weights}
    # the demo engine's other graphs hold too little for a data file, so no index: each loads its own
    # (the text encoder once per bucket: its sessions are captured at the bucket's dims)
    assert all(set(v) == {None} for name, v in given.items() if name[:-5] not in STEP_GRAPHS)
    assert len(given["text_encoder.onnx"]) == 2 and all(len(v) == 1 for name, v in given.items()
                                                         if name[:-5] not in (*STEP_GRAPHS, "text_encoder"))
    assert re.search(r"weights shared by all buckets: dit_step \d+ MiB, vocoder_step \d+ MiB", backend.describe())
    backend.close()


def test_the_vocoder_steps_parts_read_the_one_copy_of_its_weights(demo_engine, monkeypatch):
    """Each part of the vocoder step (its branches and tail, run side by side in whole-loop graphs)
    is given the shared device values of the weights it reads, the very objects the whole step's
    sessions get; together the parts read every weight of the step."""
    manifest = load_manifest(demo_engine, verify=False)
    backend, calls, loads = _recording_backend(manifest, monkeypatch)
    graph = manifest.graph("vocoder_step")
    assert [p.role for p in graph.parts] == ["branch"] * 3 + ["tail"]
    symbols = backend._symbols(1, manifest.frames(1.0))
    for part in graph.parts:
        backend._create_part_session(graph, part, symbols, stream=0)
    whole = backend._session(graph, symbols)
    assert whole is not None and loads == [("vocoder_step", "cuda")]  # uploaded once, for parts and whole
    given = {name: kwargs["initializers"] for name, kwargs in calls}
    shared = given["vocoder_step.onnx"]
    for part in graph.parts:
        values = given[part.file] or {}  # None: a part that reads no indexed weight
        assert set(values) == set(part.weights)
        assert all(values[name] is shared[name] for name in values)  # the same values, not copies
    assert sum(bool(p.weights) for p in graph.parts) >= 3
    assert set().union(*(p.weights for p in graph.parts)) == set(shared)
    backend.close()


@pytest.mark.parametrize("case", ["no index", "sharing off"])
def test_cuda_backend_without_index_or_with_sharing_off_loads_per_session(engine_copy, monkeypatch, case):
    if case == "no index":
        path = engine_copy / "manifest.json"
        data = json.loads(path.read_text())
        for entry in data["graphs"].values():
            entry.pop("weights", None)
        path.write_text(json.dumps(data))
    else:
        monkeypatch.setenv("SEMVOC_SHARED_WEIGHTS", "0")
    backend, calls, loads = _recording_backend(load_manifest(engine_copy, verify=False), monkeypatch)
    backend.prepare(1, 25)
    assert loads == [] and len(calls) == 7 and all(kwargs["initializers"] is None for _, kwargs in calls)
    assert "shared" not in backend.describe()


@pytest.mark.skipif(cuda_available(), reason="checks a CPU-only onnxruntime's fallback; on a GPU the weights "
                    "are shared (tests/test_gpu.py)")
def test_cuda_backend_falls_back_to_a_copy_per_session_when_onnxruntime_cannot_share(demo_engine, monkeypatch):
    """This machine's onnxruntime cannot allocate CUDA memory: the weights cannot be placed on the
    device, so each session loads its own (as before the index), and describe() says why."""
    from semvoc.runtime.backends import ort_cuda

    calls = []
    monkeypatch.setattr(ort_cuda, "make_session", lambda path, provider, **kw: calls.append(kw) or object())
    backend = ort_cuda.OrtCudaBackend(load_manifest(demo_engine, verify=False))
    backend.warm_up = False  # the recorded sessions cannot run
    backend.prepare(1, 25)
    assert calls and all(kwargs["initializers"] is None for kwargs in calls)
    text = backend.describe()
    assert "weights not shared (one copy per session): " in text and "dit_step: " in text and "vocoder_step: " in text


def test_weights_that_onnxruntime_rewrites_in_place_are_not_indexed(tmp_path):
    """onnxruntime's transpose optimizer transposes a weight with one consumer in place, under its
    name; a session given the stored weight by that name reads it in the wrong layout (here it
    fails; a square weight would silently compute wrong values). Such weights stay out of the index."""
    from onnx import TensorProto, helper, numpy_helper

    from semvoc.export.onnx_export import save_model, weight_index, weights_used_as_stored

    shape = (2, 16, 32)  # tensors of 4 KB: stored in the .data file
    rewritten = np.arange(1024, dtype=np.float32).reshape(shape[::-1])  # pushed through by the transposes
    kept = np.arange(1024, dtype=np.float32).reshape(shape)  # read as stored
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 1, 0]), helper.make_node("Add", ["t", "w"], ["a"]),
         helper.make_node("Transpose", ["a"], ["b"], perm=[2, 1, 0]), helper.make_node("Mul", ["b", "k"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(rewritten, "w"), numpy_helper.from_array(kept, "k")])
    path = tmp_path / "g.onnx"
    # IR 10: what onnxruntime >= 1.20 reads (a newer onnx writes a newer IR version by default)
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path,
               external=True)
    index = weight_index(path)
    assert [w["name"] for w in index] == ["w", "k"]

    shared = {w["name"]: np.frombuffer((tmp_path / "g.onnx.data").read_bytes(), w["dtype"], np.prod(w["shape"]),
                                       w["offset"]).reshape(w["shape"]) for w in index}
    values = {name: ort_value(a) for name, a in shared.items()}
    x = np.random.default_rng(0).random(shape, np.float32)
    expected = make_session(path).run(None, {"x": x})[0]
    with pytest.raises(Exception, match="broadcast"):  # the hazard the filter avoids
        make_session(path, initializers={"w": values["w"][1]}).run(None, {"x": x})

    safe = weights_used_as_stored(path, index, lambda p, optimized: make_session(p, optimized_model=optimized))
    assert [w["name"] for w in safe] == ["k"]
    session = make_session(path, initializers={w["name"]: values[w["name"]][1] for w in safe})
    assert np.array_equal(session.run(None, {"x": x})[0], expected)


def ort_value(array: np.ndarray) -> tuple:
    """An owned CPU OrtValue of a copy of ``array`` and its non-owning view (keep both alive)."""
    import onnxruntime as ort

    from semvoc.runtime.backends.shared_weights import non_owning_view

    owned = ort.OrtValue.ortvalue_from_numpy(np.array(array))
    return owned, non_owning_view(owned)
