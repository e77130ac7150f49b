"""Shared fixtures: one `demo` engine exported once per test session (about a minute on 2 cores)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def pytest_configure(config):
    import os
    import tempfile

    # the runtime remembers verified engine files (semvoc.runtime.manifest.verify_files): keep the
    # tests' memory out of the user's cache
    os.environ.setdefault("SEMVOC_CACHE_DIR", tempfile.mkdtemp(prefix="semvoc-test-cache-"))

DEMO_EXPORT_ARGS = ["--preset", "demo", "--durations", "1", "--max-text-tokens", "24",
                    "--max-steps", "40", "--max-vocoder-steps", "40", "--batch-sizes", "1,2"]


def pytest_addoption(parser):
    parser.addoption("--ort-include", default=None, metavar="DIR",
                     help="folder of an official onnxruntime_c_api.h to check semvoc's CUDA ops against")


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory) -> Path:
    """An fp32 `demo` engine (all components, 1-second bucket), exported through the CLI."""
    from semvoc.export.cli import main

    out = tmp_path_factory.mktemp("engines") / "demo"
    assert main([*DEMO_EXPORT_ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture()
def engine_copy(demo_engine, tmp_path) -> Path:
    """A private copy of the demo engine that a test may damage."""
    import shutil

    target = tmp_path / "engine"
    shutil.copytree(demo_engine, target)
    return target


def run_without(packages: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
    """Run the Python ``body`` in a fresh interpreter where ``packages`` cannot be imported."""

    prelude = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(packages)!r}:
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=300)


def assert_weight_index_matches(engine: Path, graph: str, min_share: float = 0.9) -> None:
    """The manifest's weight index of ``graph`` describes its ONNX file: its entries are tensors stored
    in the graph's .data file (all but those onnxruntime folds or rewrites when it optimizes the
    graph: at least ``min_share`` of the bytes), with their dtype and shape, and the bytes at each
    offset are the tensor's values."""
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper

    entry = json.loads((engine / "manifest.json").read_text())["graphs"][graph]
    index = {w["name"]: w for w in entry["weights"]}
    model = onnx.load(str(engine / entry["file"]))  # loads the external data through onnx
    external = onnx.load(str(engine / entry["file"]), load_external_data=False).graph.initializer
    stored = {t.name for t in external if t.data_location == onnx.TensorProto.EXTERNAL}
    assert index and set(index) <= stored
    data = (engine / entry["data_file"]).read_bytes()
    total = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in external if t.name in stored)
    assert sum(w["length"] for w in index.values()) >= min_share * total
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if tensor.name not in index:
            assert tensor.name in stored or array.nbytes < 1024, f"{tensor.name} ({array.nbytes} B) is in the .onnx"
            continue
        w = index[tensor.name]
        assert (w["dtype"], w["shape"]) == (array.dtype.name, list(array.shape)), tensor.name
        stored_bytes = data[w["offset"]:w["offset"] + w["length"]]
        assert np.array_equal(np.frombuffer(stored_bytes, array.dtype).reshape(array.shape), array), tensor.name
