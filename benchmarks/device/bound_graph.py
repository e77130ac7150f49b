"""One engine graph bound to random GPU-resident inputs and outputs (the shared set-up of the
device scripts): sessions with the runtime's own options and its bucket dims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class BoundGraph:
    session: Any
    binding: Any
    run_options: Any

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding, self.run_options)


def random_inputs(graph, symbols: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the declared dtype and shape: never zeros; step counters at 0, masks all true."""
    from semvoc.runtime.backends.ort_common import NUMPY_DTYPES
    from semvoc.runtime.manifest import eval_dim

    arrays = {}
    for t in graph.inputs:
        shape = [eval_dim(s, symbols) for s in t.shape]
        if t.name == "step":
            array = np.zeros(shape, np.int64)
        elif t.dtype == "bool" or t.name == "attention_mask":
            array = np.ones(shape, NUMPY_DTYPES[t.dtype])
        elif t.dtype == "int64":
            array = rng.integers(3, 500, shape).astype(np.int64)
        else:
            array = (rng.standard_normal(shape) * 0.1).astype(NUMPY_DTYPES[t.dtype])
        arrays[t.name] = array
    return arrays


def bind_graph(manifest, name: str, batch: int, *, cuda_graph: bool = False, seed: int = 0) -> BoundGraph:
    import onnxruntime as ort

    from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, make_session
    from semvoc.runtime.backends.ort_cuda import OrtCudaBackend
    from semvoc.runtime.manifest import eval_dim

    graph = manifest.graphs[name]
    helper = OrtCudaBackend(manifest, cuda_graphs=False)  # only its shape helpers
    duration = graph.duration_s or manifest.buckets["durations_s"][0]
    symbols = helper._symbols(batch, manifest.frames(duration))
    session = make_session(manifest.root / graph.file, "cuda", dim_overrides=helper._overrides(graph, symbols),
                           cuda_graph=cuda_graph, custom_ops=manifest.custom_ops_library)
    binding = session.io_binding()
    keep = []
    for input_name, array in random_inputs(graph, symbols, np.random.default_rng(seed)).items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        binding.bind_ortvalue_input(input_name, keep[-1])
    for t in graph.outputs:
        shape = [eval_dim(s, symbols) for s in t.shape]
        keep.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, NUMPY_DTYPES[t.dtype], "cuda", 0))
        binding.bind_ortvalue_output(t.name, keep[-1])
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "1" if cuda_graph else "-1")
    bound = BoundGraph(session, binding, options)
    bound._keep = keep  # the OrtValues must outlive the binding
    return bound
