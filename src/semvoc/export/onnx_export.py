"""torch -> ONNX for one ``GraphSpec``: dynamo export at opset 23, checked structure.

``torch.onnx.export(dynamo=True, opset_version=23)`` lowers ``scaled_dot_product_attention``
to one ONNX ``Attention`` node; the exporter's optimizer folds constants. The fused ops of
``semvoc.kernels`` (custom PyTorch ops) export through their registered translations. Weights go to an
external data file next to the graph (``<graph>.onnx.data``) when they pass 64 MiB (onnxruntime
then reads them from that file instead of parsing them out of the protobuf: on an H200 the DiT
step graph's session was created in 0.64 s that way, 1.46 s with its weights inside the ``.onnx``;
past ~1.8 GB protobuf's 2 GB limit leaves no choice), and always for the step graphs
(``GraphSpec.loop``): the manifest indexes their
tensors in that file (``weight_index``) so that the runtime can load them once for every batch
bucket's session without parsing ONNX (``semvoc.runtime.backends.shared_weights``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from semvoc.export.graphs import GraphSpec, export_dynamic_shapes
from semvoc.kernels.onnx_ops import translation_table

OPSET = 23
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's limit: the exporter must write the weights outside
SEPARATE_WEIGHTS_BYTES = 64 * 2**20  # past this, a graph's weights go to <graph>.onnx.data (faster loads)
# tensors of at least this many bytes go to the .data file of a graph saved with external data
# (onnx's default); smaller ones (shapes, scalars, small biases) stay embedded in the .onnx
EXTERNAL_TENSOR_MIN_BYTES = 1024


class _Positional(torch.nn.Module):
    """Gives the wrapper a fixed positional signature (names come from the spec)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*args)
        return out if isinstance(out, tuple) else (out,)


def export_graph(spec: GraphSpec, module: torch.nn.Module, feeds: dict[str, torch.Tensor],
                 path: Path, verbose: bool = False) -> list[Path]:
    """Export ``module`` (the spec's wrapper) to ``path``; returns the files written."""
    args = tuple(feeds[t.name] for t in spec.inputs)
    dynamic = export_dynamic_shapes(spec)
    dynamic_shapes = tuple(dynamic[t.name] for t in spec.inputs)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    logging.getLogger("torch.onnx").setLevel(logging.WARNING if verbose else logging.ERROR)
    with quiet, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Positional(module).eval(), args, dynamo=True, opset_version=OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes={"args": dynamic_shapes}, verbose=False,
            custom_translation_table=translation_table())
    external = size > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    name_symbolic_dims(path)
    if spec.loop or size > SEPARATE_WEIGHTS_BYTES:  # weights to <graph>.onnx.data (indexed for step graphs)
        save_model(onnx.load(str(path)), path, external=True)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


def name_symbolic_dims(path: Path) -> None:
    """Rewrite expression dims (``2*batch``) as identifiers (``2xbatch``), in place."""
    from semvoc.runtime.manifest import dim_name

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and dim_name(dim.dim_param) != dim.dim_param:
                dim.dim_param = dim_name(dim.dim_param)
                changed = True
    if changed:
        onnx.save_model(model, str(path))


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write ``model`` to ``path``; with ``external``, its tensors of ``EXTERNAL_TENSOR_MIN_BYTES``
    or more go to ``<path>.data`` (rewritten whole: onnx appends to an existing file). ``model``
    must hold its weights in memory (``onnx.load`` loads a graph's external data)."""
    data = path.with_name(path.name + ".data")
    partial = path.with_name(path.name + ".partial")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(partial), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name if external else None, size_threshold=EXTERNAL_TENSOR_MIN_BYTES)
    if data.exists():  # onnx creates it owner-only (0600): readable as the .onnx is, for other users of the engine
        shutil.copymode(partial, data)
    os.replace(partial, path)


def weight_index(path: Path) -> list[dict]:
    """The manifest's ``weights`` of a graph saved with external data: name, dtype, shape, offset
    and length of each tensor in its ``.data`` file, read from the initializers' ``external_data``
    fields. Tensors of an element type numpy lacks (bfloat16) are left out: onnxruntime loads
    those itself, in every session."""
    from semvoc.runtime.manifest import WEIGHT_DTYPES

    model = onnx.load(str(path), load_external_data=False)
    data = path.name + ".data"
    index = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        fields = {entry.key: entry.value for entry in tensor.external_data}
        if fields.get("location") != data:
            raise RuntimeError(f"{path.name}: initializer {tensor.name} is stored in {fields.get('location')!r}, "
                               f"not in {data}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if dtype.name not in WEIGHT_DTYPES:
            continue
        shape = [int(d) for d in tensor.dims]
        length = int(fields["length"])
        size = dtype.itemsize
        for d in shape:
            size *= d
        if size != length:
            raise RuntimeError(f"{path.name}: initializer {tensor.name} ({dtype.name} {shape}) has {length} bytes "
                               f"in {data}, expected {size}")
        index.append({"name": tensor.name, "dtype": dtype.name, "shape": shape,
                      "offset": int(fields.get("offset", 0)), "length": length})
    return index


def weights_used_as_stored(path: Path, index: list[dict], make_session: Callable[[Path, Path], object],
                          data: str | None = None) -> list[dict]:
    """The entries of ``index`` that onnxruntime's optimized graph still reads as stored.

    A session given a weight by name (``add_initializer``) uses it in place of whatever its graph
    optimizations left under that name, unchecked: a weight they rewrite in place (the transpose
    optimizer transposes an initializer with one consumer and keeps its name) would be read in
    the wrong layout, and one they fold away would be uploaded for nothing. So the graph is
    optimized once (``make_session(path, optimized_path)``: a session of the export's provider
    that saves its optimized graph) and only weights it still references at their offset in the
    data file (``data``: ``<file>.data`` unless given), with their shape, stay in the index."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / path.name
        make_session(path, optimized)
        model = onnx.load(str(optimized), load_external_data=False)
    stored = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            fields = {entry.key: entry.value for entry in tensor.external_data}
            stored[tensor.name] = (fields.get("location"), int(fields.get("offset", 0)), int(fields.get("length", -1)),
                                   [int(d) for d in tensor.dims])
    data = data or path.name + ".data"
    return [w for w in index if stored.get(w["name"]) == (data, w["offset"], w["length"], w["shape"])]


def op_counts(path: Path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter = Counter(n.op_type for n in model.graph.node)
    for fn in model.functions:  # nodes inside local functions, if any
        counts.update(n.op_type for n in fn.node)
    return counts


# fused attention nodes: ONNX's Attention and semvoc.cuda's CrossAttention (--cuda-kernels)
FUSED_ATTENTION_OPS = ("Attention", "CrossAttention", "QkvAttention")


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The graph's inline constants (initializers stored in the file, Constant nodes) by name."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if not t.external_data}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def host_copying_nodes(path: Path) -> list[str]:
    """Nodes of a graph whose onnxruntime CUDA kernels copy index tables from the host on every
    run (a captured loop replays those copies; semvoc's whole-loop CUDA graphs refuse them):
    GatherND, and a Split into unequal parts or into more than 32."""
    model = onnx.load(str(path), load_external_data=False)
    values = _constant_values(model)
    found = []
    for node in model.graph.node:
        if node.op_type == "GatherND":
            found.append(node.name)
        elif node.op_type == "Split":
            sizes = values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            unknown = sizes is None and not any(a.name == "num_outputs" for a in node.attribute)
            if unknown or len(node.output) > 32 or (sizes is not None and len(set(sizes.tolist())) > 1):
                found.append(node.name)
    return found


def check_structure(spec: GraphSpec, path: Path, expected_attention: int | None) -> dict:
    """The graph is valid ONNX; attention graphs hold fused attention ops (``Attention``, or
    semvoc's ``CrossAttention``) and no Softmax."""
    onnx.checker.check_model(str(path), full_check=True)
    counts = op_counts(path)
    fused = sum(counts.get(op, 0) for op in FUSED_ATTENTION_OPS)
    report = {"ops": sum(counts.values()), "attention": fused, "softmax": counts.get("Softmax", 0)}
    if spec.attention_checked:
        if counts.get("Softmax", 0):
            raise RuntimeError(f"{spec.name}: {counts['Softmax']} Softmax node(s) left on an attention "
                               "path; attention must export as one fused Attention op (opset 23)")
        if expected_attention is not None and fused != expected_attention:
            raise RuntimeError(f"{spec.name}: {fused} fused attention ops, expected {expected_attention}")
    return report
