"""The optimized-graph cache (semvoc.runtime.backends.optimized_graphs): a session saves the graph
onnxruntime optimized, the next one loads that copy, a damaged copy is never used, and the audio
does not change. Run on the CPU provider (``SEMVOC_OPTIMIZED_GRAPHS=1``); the CUDA backend uses the
same code with the GPU's name in the key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semvoc.runtime.backends import optimized_graphs
from semvoc.runtime.backends.ort_common import GraphSource, make_session


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMVOC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SEMVOC_OPTIMIZED_GRAPHS", "1")
    return tmp_path / "cache" / "optimized-graphs"


def _source(engine, kind="dit_step"):
    manifest = json.loads((engine / "manifest.json").read_text())
    name, entry = next((n, g) for n, g in manifest["graphs"].items() if g["kind"] == kind)
    entry = {**entry, "name": name}
    return GraphSource(engine, manifest["files"], entry["file"], entry.get("data_file")), entry


def _feeds(engine, entry, seed=0):
    """Random inputs at the engine's first bucket (step 0, masks of ones)."""
    from semvoc.runtime.backends.base import bucket_symbols, tensor_shape
    from semvoc.runtime.manifest import load_manifest

    manifest = load_manifest(engine, verify=False)
    symbols = bucket_symbols(manifest, 1, manifest.buckets["frames"][0])
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in manifest.graphs[entry["name"]].inputs:
        shape = tensor_shape(t, symbols)
        if t.dtype == "bool":
            feeds[t.name] = np.ones(shape, bool)
        elif t.dtype == "int64":
            feeds[t.name] = np.zeros(shape, np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def test_first_session_saves_the_optimized_graph_and_the_next_loads_it(demo_engine, cache):
    source, entry = _source(demo_engine)
    feeds = _feeds(demo_engine, entry)
    first = make_session(demo_engine / entry["file"], "cpu", source=source)
    assert first.semvoc_optimized.saved and not first.semvoc_optimized.loaded_from_cache
    folder = first.semvoc_optimized.folder
    assert folder.parent == cache and (folder / optimized_graphs.MODEL).is_file()
    meta = json.loads((folder / optimized_graphs.META).read_text())
    assert meta["key"]["graph"] == source.files[entry["file"]]
    assert not list(cache.glob(".*")), "the temporary folder was left behind"

    second = make_session(demo_engine / entry["file"], "cpu", source=source)
    assert second.semvoc_optimized.loaded_from_cache and second.semvoc_optimized.folder == folder
    expected = first.run(None, feeds)
    for a, b in zip(expected, second.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_key_changes_with_the_graph_and_the_fixed_dimensions(demo_engine, cache):
    source, entry = _source(demo_engine)
    a = make_session(demo_engine / entry["file"], "cpu", source=source).semvoc_optimized
    changed = GraphSource(source.root, {**source.files, entry["file"]: "0" * 64}, source.graph_file, source.data_file)
    b = make_session(demo_engine / entry["file"], "cpu", source=changed).semvoc_optimized
    assert a.folder != b.folder and b.saved and not b.loaded_from_cache


def test_damaged_copy_is_refused_once_and_never_used_again(demo_engine, cache):
    source, entry = _source(demo_engine)
    feeds = _feeds(demo_engine, entry, seed=1)
    first = make_session(demo_engine / entry["file"], "cpu", source=source)
    expected = first.run(None, feeds)
    model = first.semvoc_optimized.folder / optimized_graphs.MODEL
    model.write_bytes(b"\x00" * model.stat().st_size)  # same size: only loading it can tell

    second = make_session(demo_engine / entry["file"], "cpu", source=source)
    assert not second.semvoc_optimized.loaded_from_cache
    assert any("refused" in note for note in second.semvoc_optimized.notes)
    for a, b in zip(expected, second.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    third = make_session(demo_engine / entry["file"], "cpu", source=source).semvoc_optimized
    assert third.refused() and not third.loaded_from_cache and not third.saved


def test_truncated_copy_is_replaced(demo_engine, cache):
    source, entry = _source(demo_engine)
    first = make_session(demo_engine / entry["file"], "cpu", source=source).semvoc_optimized
    model = first.folder / optimized_graphs.MODEL
    model.write_bytes(model.read_bytes()[:100])
    second = make_session(demo_engine / entry["file"], "cpu", source=source).semvoc_optimized
    assert second.saved and not second.loaded_from_cache and second.ready()


def test_read_only_cache_only_costs_the_saving(demo_engine, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SEMVOC_CACHE_DIR", str(blocker))
    monkeypatch.setenv("SEMVOC_OPTIMIZED_GRAPHS", "1")
    source, entry = _source(demo_engine)
    session = make_session(demo_engine / entry["file"], "cpu", source=source)
    assert not session.semvoc_optimized.saved and session.semvoc_optimized.notes
    assert session.run(None, _feeds(demo_engine, entry))


def test_cache_off_switches(demo_engine, tmp_path, monkeypatch):
    source, entry = _source(demo_engine)
    monkeypatch.setenv("SEMVOC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SEMVOC_OPTIMIZED_GRAPHS", "0")
    assert make_session(demo_engine / entry["file"], "cpu", source=source).semvoc_optimized is None
    monkeypatch.setenv("SEMVOC_OPTIMIZED_GRAPHS", "auto")
    assert optimized_graphs.enabled("cuda") and not optimized_graphs.enabled("cpu")
    monkeypatch.setenv("SEMVOC_OPTIMIZED_GRAPHS", "1")
    monkeypatch.setenv("SEMVOC_CACHE_DIR", "")
    assert make_session(demo_engine / entry["file"], "cpu", source=source).semvoc_optimized is None


def test_pipeline_audio_is_the_same_from_cached_graphs(demo_engine, cache):
    from semvoc.runtime.pipeline import Pipeline

    def clip():
        pipe = Pipeline(demo_engine, backend="onnxruntime-cpu")
        return pipe.generate(["a dog barks"], duration=1.0, steps=4, vocoder_steps=4, seed=3).audio

    reference = clip()  # saves every graph
    saved = sorted(p.name for p in cache.iterdir())
    assert len(saved) >= 7
    again = clip()  # loads them
    assert sorted(p.name for p in cache.iterdir()) == saved
    np.testing.assert_array_equal(reference, again)
