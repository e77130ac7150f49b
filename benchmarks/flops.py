"""The compute floor: FLOPs of the benchmark workload, counted from the engine's ONNX graphs.

Each graph is loaded without its weights (``onnx.load(..., load_external_data=False)``), its
symbolic input dimensions are fixed to the bucket's values (the ``dim_param`` identifiers
the exporter writes: ``batch``, ``frames``, ``2xbatch``, ``960xframes``, ``4xframes_p1``,
``dit_rows``, ``dit_rows_p1``...; the manifest keeps the expression each stands for), and
``onnx.shape_inference.infer_shapes`` (with data propagation) gives every tensor's shape.
Counted, as multiply-adds x 2:

- ``MatMul``: ``2 * numel(output) * K`` (batched and broadcast matmuls included);
- ``Gemm``: ``2 * M * N * K``;
- ``Conv``: ``2 * numel(output) * Cin/groups * prod(kernel)``
  (= ``2 * N * Cout * Cin/groups * K * output positions``);
- ``ConvTranspose``: ``2 * numel(input) * Cout/groups * prod(kernel)`` -- every *input*
  position is scattered through the kernel; counting output positions would multiply the
  iSTFT's cost by its stride;
- ``Attention`` (opset 23): ``2 * B * Hq * Lq * Lk * (hd_qk + hd_v)`` (= ``4 B H Lq Lk hd``).
- semvoc's ``LtGemm`` as the MatMul of its first two inputs, except the C x C GEMM of the
  vocoder's PReLU split (``semvoc.kernels.prelu_split``): work the engine adds, not the model's,
  so it is noted and left out. ``SplitMlp`` (the split's MLP as one op) as the same three GEMMs:
  ``y w1``, ``r R`` counted and ``y M`` noted.

Everything else (norms, activations, the CFG combine, Euler updates) is left out: the floor is
the matrix work at the card's measured matmul rate. A request of batch ``B`` runs
``text_encoder``, ``dit_prepare`` and ``vocoder_prepare`` once, the schedule-table graphs
``dit_time``/``vocoder_time`` once for the rows the workload reads (the runtime computes them
once per step count and caches them across requests), ``dit_step`` ``calls`` times (the DiT steps: the
sway schedule's last call has dt = 0 and is skipped) and ``vocoder_step`` once per vocoder step.

    python -m benchmarks.flops ENGINE_DIR [--batch-sizes 1,4,16] [--duration 10] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# DESIGN.md's figures for the reference preset, printed next to the counts as a cross-check.
DESIGN_DIT_STEP_BATCH2_GFLOP = 520.0
DESIGN_VOCODER_STEP_GFLOP = 217.0

COUNTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention")
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


@dataclass
class GraphFlops:
    """FLOPs of one run of one graph at fixed dimensions."""

    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # counted nodes per op type
    unresolved: list[str] = field(default_factory=list)  # counted op types whose shapes stayed unknown
    notes: list[str] = field(default_factory=list)

    def add(self, op: str, flops: int) -> None:
        self.total += int(flops)
        self.by_op[op] = self.by_op.get(op, 0) + int(flops)
        self.nodes[op] = self.nodes.get(op, 0) + 1

    def as_dict(self) -> dict:
        return {"flop": self.total, "gflop": self.total / 1e9, "by_op": dict(self.by_op),
                "nodes": dict(self.nodes), "unresolved": list(self.unresolved), "notes": list(self.notes)}


# ------------------------------------------------------------------------------ dimensions


def eval_dim_param(name: str, symbols: dict[str, int]) -> int:
    """Value of an exported ``dim_param`` identifier: ``4xframes_p1`` -> ``4 * frames + 1``.

    The identifiers are ``semvoc.runtime.manifest.dim_name`` of the exporter's expressions:
    ``*`` written ``x`` (or ``_x``: ``frames_x4_p1``), ``+`` written ``_p``, ``-`` written ``_m``;
    factors are integers or symbol names.
    """
    if name in symbols:
        return int(symbols[name])
    total = 0
    for sign, term in re.findall(r"(^|_p|_m)((?:(?!_p|_m).)+)", name):
        value = 1
        for factor in re.split(r"_x|x", term):
            if factor.isdigit():
                value *= int(factor)
            elif factor in symbols:
                value *= int(symbols[factor])
            else:
                raise ValueError(f"cannot evaluate dimension {name!r}: unknown factor {factor!r} "
                                 f"(known symbols: {sorted(symbols)})")
        total += -value if sign == "_m" else value
    return total


def dim_values(model, symbols: dict[str, int], graph_inputs: list | None = None) -> dict[str, int]:
    """``dim_param`` identifier -> value for every symbolic input dimension of ``model``.

    Identifiers the manifest names (its ``onnx_dims`` axis by axis where recorded, else
    ``dim_name`` of its shape expressions) are evaluated from the manifest's expressions; the
    rest are parsed (``eval_dim_param``).
    """
    from semvoc.runtime.manifest import dim_name, eval_dim

    known: dict[str, int] = {}
    for tensor in graph_inputs or []:
        shape = tensor.shape if hasattr(tensor, "shape") else tensor["shape"]
        onnx_dims = getattr(tensor, "onnx_dims", None) if hasattr(tensor, "shape") else tensor.get("onnx_dims")
        for axis, expr in enumerate(shape):
            if not isinstance(expr, str):
                continue
            value = eval_dim(expr, symbols)
            known[dim_name(expr)] = value
            if onnx_dims and axis < len(onnx_dims) and isinstance(onnx_dims[axis], str):
                known[onnx_dims[axis]] = value
    values: dict[str, int] = {}
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                name = dim.dim_param
                values[name] = known[name] if name in known else eval_dim_param(name, symbols)
    return values


def fix_input_dims(model, dims: dict[str, int]) -> None:
    """Replace every symbolic input dimension of ``model`` (in place) by its value in ``dims``."""
    missing = set()
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                name = dim.dim_param
                if name not in dims:
                    missing.add(name)
                    continue
                dim.Clear()
                dim.dim_value = int(dims[name])
    if missing:
        raise ValueError(f"no value for the symbolic input dimension(s) {sorted(missing)} of graph "
                         f"{model.graph.name!r}; give them in dims")


# ------------------------------------------------------------------------------ shape folding
#
# With the inputs' dimensions fixed, the exporter's shape arithmetic (Shape -> Gather/Squeeze ->
# Mul -> Concat -> Reshape/Expand) is constant, but ONNX's data propagation does not follow all
# of it. ``fold_shape_constants`` evaluates such small integer subgraphs with numpy and replaces
# them by initializers, so that shape inference resolves every tensor.

FOLDABLE_OPS = ("Shape", "Size", "Constant", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Slice",
                "Add", "Sub", "Mul", "Div", "Cast", "Max", "Min", "Equal", "Less", "Greater", "Where",
                "Not", "And", "Or", "Range", "ConstantOfShape", "Expand", "Identity", "Neg", "Abs")


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _eval_node(node, args: list, shapes: dict):
    """numpy value(s) of a foldable node's output(s), or None when it cannot be evaluated."""
    import numpy as np
    import onnx

    op, a = node.op_type, _attrs(node)
    x = args[0] if args else None
    if op == "Shape":
        shape = shapes.get(node.input[0])
        if not _known(shape):
            return None
        return np.array(shape[a.get("start", 0):a.get("end", len(shape))] if "end" in a  # type: ignore[index]
                        else shape[a.get("start", 0):], dtype=np.int64)  # type: ignore[index]
    if op == "Size":
        shape = shapes.get(node.input[0])
        return np.array(math.prod(shape), dtype=np.int64) if _known(shape) else None  # type: ignore[arg-type]
    if op == "Constant":
        if "value" in a:
            return onnx.numpy_helper.to_array(a["value"])
        for key, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                           ("value_floats", np.float32)):
            if key in a:
                return np.array(a[key], dtype=dtype)
        return None
    if any(v is None for v in args):
        return None
    if op == "Identity":
        return x
    if op == "Gather":
        return np.take(x, args[1], axis=a.get("axis", 0))
    if op == "Squeeze":
        axes = args[1] if len(args) > 1 else a.get("axes")
        return np.squeeze(x, axis=tuple(int(i) for i in axes)) if axes is not None else np.squeeze(x)
    if op == "Unsqueeze":
        axes = args[1] if len(args) > 1 else a.get("axes")
        rank = x.ndim + len(axes)
        out = x
        for axis in sorted(int(i) % rank for i in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Reshape":
        target = [int(d) for d in args[1]]
        if not a.get("allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return np.reshape(x, target)
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in args], axis=a.get("axis", 0))
    if op == "Slice":
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 else range(len(starts))
        steps = args[4] if len(args) > 4 else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return x[tuple(index)]
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum,
              "Equal": np.equal, "Less": np.less, "Greater": np.greater, "And": np.logical_and,
              "Or": np.logical_or}
    if op in binary:
        out = args[0]
        for v in args[1:]:
            out = binary[op](out, v)
        return out.astype(args[0].dtype) if op in ("Add", "Sub", "Mul", "Max", "Min") else out
    if op == "Div":
        if np.issubdtype(x.dtype, np.integer):
            return np.trunc(x / args[1]).astype(x.dtype)  # ONNX integer Div truncates
        return (x / args[1]).astype(x.dtype)
    if op == "Neg":
        return -x
    if op == "Abs":
        return np.abs(x)
    if op == "Not":
        return np.logical_not(x)
    if op == "Where":
        return np.where(args[0], args[1], args[2])
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
    if op == "Range":
        return np.arange(args[0], args[1], args[2]).astype(args[0].dtype)
    if op == "ConstantOfShape":
        fill = onnx.numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return np.full([int(d) for d in x], fill.reshape(-1)[0], dtype=fill.dtype)
    if op == "Expand":
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in args[1]))).copy()
    return None


def fold_shape_constants(model, max_elements: int = 1 << 16, max_rounds: int = 16):
    """Shape-infer ``model`` after folding its constant shape arithmetic; returns the inferred model."""
    import onnx
    from onnx import numpy_helper

    for _ in range(max_rounds):
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        shapes = _shape_table(inferred)
        values = {}
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL and math.prod(init.dims) <= max_elements:
                values[init.name] = numpy_helper.to_array(init)
        folded = []
        for node in model.graph.node:
            if node.op_type not in FOLDABLE_OPS or len(node.output) != 1:
                continue
            if node.op_type not in ("Shape", "Size", "Constant") and not all(i in values for i in node.input if i):
                continue
            try:
                out = _eval_node(node, [values.get(i) if i else None for i in node.input], shapes)
            except Exception:  # an op variant the evaluator does not know: leave it to onnx
                out = None
            if out is None or out.size > max_elements:
                continue
            values[node.output[0]] = out
            if node.op_type != "Constant":
                folded.append(node)
        if not folded:
            return inferred
        names = {n.output[0] for n in folded}
        keep = [n for n in model.graph.node if n.output[0] not in names or n.op_type == "Constant"]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        del model.graph.value_info[:]  # stale: shapes inferred before folding
        model.graph.initializer.extend(numpy_helper.from_array(values[n], n) for n in sorted(names))
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


def _shape_table(model) -> dict[str, list[int | None]]:
    """Every known tensor shape after inference: initializers, inputs, outputs, value_info."""
    shapes: dict[str, list[int | None]] = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    for init in model.graph.initializer:  # authoritative
        shapes[init.name] = [int(d) for d in init.dims]
    for node in model.graph.node:  # Constant nodes: their value's shape
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    shapes[node.output[0]] = [int(d) for d in attr.t.dims]
    return shapes


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _attr(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            import onnx

            return onnx.helper.get_attribute_value(attr)
    return default


# ------------------------------------------------------------------------------ per op


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        out.append(max(x, y))
    return out[::-1]


def matmul_flops(a: list[int], b: list[int]) -> int:
    """``2 * numel(out) * K`` for numpy-style matmul of shapes ``a`` and ``b``."""
    k = a[-1]
    if len(a) == 1 and len(b) == 1:
        return 2 * k
    if len(a) == 1:
        out = [*b[:-2], b[-1]]
    elif len(b) == 1:
        out = a[:-1]
    else:
        out = [*_broadcast(a[:-2], b[:-2]), a[-2], b[-1]]
    return 2 * math.prod(out) * k


def _node_flops(node, shapes: dict[str, list[int | None]]) -> int | None:
    """FLOPs of one counted node, or None when a needed shape is unknown."""
    def shape(i: int) -> list[int] | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        s = shapes.get(node.input[i])
        return s if _known(s) else None  # type: ignore[return-value]

    op = node.op_type
    if op == "MatMul":
        a, b = shape(0), shape(1)
        return None if a is None or b is None else matmul_flops(a, b)
    if op == "Gemm":
        a, b = shape(0), shape(1)
        if a is None or b is None:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * m * n * k
    if op == "Conv":
        w = shape(1)
        out = shapes.get(node.output[0])
        if w is None or not _known(out):
            return None
        return 2 * math.prod(out) * math.prod(w[1:])  # type: ignore[arg-type]
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None:
            return None
        return 2 * math.prod(x) * math.prod(w[1:])
    if op == "Attention":
        q, k, v = shape(0), shape(1), shape(2)
        if q is None or k is None or v is None:
            return None
        past = shape(4)
        if len(q) == 4:
            batch, heads, lq, hd = q
            lk, hd_v = k[2], v[3]
        else:  # 3-D: [B, L, heads * head_dim], heads given as attributes
            heads = int(_attr(node, "q_num_heads", 0))
            kv_heads = int(_attr(node, "kv_num_heads", 0))
            if not heads or not kv_heads:
                return None
            batch, lq, hd = q[0], q[1], q[2] // heads
            lk, hd_v = k[1], v[2] // kv_heads
        if past is not None:
            lk += past[-2]
        return 2 * batch * heads * lq * lk * (hd + hd_v)
    return 0


# onnxruntime contrib ops that keep their first input's shape (onnx's shape inference does not
# know them): counted as Identity, so that shapes flow on to the GEMMs after them
SHAPE_PRESERVING_CONTRIB_OPS = {"SkipLayerNormalization": (0, 3), "BiasGelu": (0,), "FastGelu": (0,),
                                "SkipSimplifiedLayerNormalization": (0, 3)}
# semvoc's own CUDA ops (--cuda-kernels): outputs with the shape of input 0; of their work only
# ConvNeXtMix's depthwise conv (2*B*L*C*K, what the plain graph's depthwise Conv counts) is counted
SHAPE_PRESERVING_CUDA_OPS = {"ConvNeXtMix": (0,), "BiasPRelu": (0,), "BiasResidual": (0,), "HeadNorm": (0,),
                             "GatedSkipNorm": (0, 1), "BiasNorm": (0,), "BiasAddNorm": (0, 1), "LayerNorm": (0,),
                             "EulerOverlapAdd": (0,)}
# semvoc's CUDA ops whose output is inputs i and j joined on the last axis (GatedConcatNorm: the
# finished residual stream and the skip, normed)
CONCATENATING_CUDA_OPS = {"GatedConcatNorm": (0, 4)}
# semvoc's CUDA ops whose outputs are equal parts of input 0's last axis, by op: the number of parts
# (HeadNormRope: q|k -> q, k; HeadNormRopeQkv: q|k|v -> q, k, v; BiasGeglu: [value, gate] -> one
# output of the value's shape)
SPLITTING_CUDA_OPS = {"HeadNormRope": 2, "HeadNormRopeQkv": 3, "BiasGeglu": 2}
# semvoc's CrossAttention is counted as the ONNX Attention it replaces (q, k, v; the mask changes no
# FLOPs of the dense function, whatever padded keys the kernel skips)
ATTENTION_CUDA_OPS = {"CrossAttention"}
# semvoc's QkvAttention is counted as what it replaces: q|k|v split into three, and an ONNX Attention
# (the norms and the rotation are not counted, as HeadNormRopeQkv's are not)
QKV_ATTENTION_CUDA_OPS = {"QkvAttention"}

# semvoc's CUDA ops that are a MatMul of inputs 0 and 1 (LtGemm: + bias and residual in the epilogue)
GEMM_CUDA_OPS = {"LtGemm"}
# The vocoder's PReLU split (semvoc.kernels.prelu_split) runs a C x C GEMM the model does not have
# (the linear part of PReLU, next to the ReLU GEMM, both reading the same activation): executed
# work, left out of the model's FLOPs (the floor), noted with its size.
SPLIT_LINEAR_PREFIX = "prelu_split_linear/"


def _split_linear_gemms(nodes) -> set[str]:
    """Outputs of the LtGemm nodes that are a PReLU split's linear part: a non-relu LtGemm whose
    input 0 an LtGemm with relu = 1 also reads."""
    gemms = [n for n in nodes if n.domain == "semvoc.cuda" and n.op_type in GEMM_CUDA_OPS]
    relu_inputs = {n.input[0] for n in gemms if _attr(n, "relu", 0)}
    return {n.output[0] for n in gemms if not _attr(n, "relu", 0) and n.input[0] in relu_inputs}


def _stock_frames(model, node) -> list:
    """semvoc's AudioFrames as the stock ops it replaces (``semvoc.kernels.stft.frame_halves``):
    reflect Pad by hop, Reshape to blocks of hop, two Slices, Concat -> [B, L / hop + 1, 2 hop]."""
    import numpy as np
    from onnx import helper, numpy_helper

    hop, out = _attr(node, "hop", 0), node.output[0]
    constants = {"pads": [0, hop, 0, hop], "blocks": [0, -1, hop], "zero": [0], "one": [1], "minus_one": [-1],
                 "end": [np.iinfo(np.int64).max], "axis": [1]}
    names = {key: f"{out}__{key}" for key in constants}
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), names[k])
                                   for k, v in constants.items())
    padded, blocks, head, tail = (f"{out}__{s}" for s in ("padded", "blocks_out", "head", "tail"))
    return [helper.make_node("Pad", [node.input[0], names["pads"]], [padded], mode="reflect"),
            helper.make_node("Reshape", [padded, names["blocks"]], [blocks]),
            helper.make_node("Slice", [blocks, names["zero"], names["minus_one"], names["axis"]], [head]),
            helper.make_node("Slice", [blocks, names["one"], names["end"], names["axis"]], [tail]),
            helper.make_node("Concat", [head, tail], [out], axis=-1)]


def _split_mlp_gemms(model, node) -> list:
    """semvoc's SplitMlp as the three GEMMs of the PReLU split (``semvoc.kernels.split_mlp``):
    ``r = y w1``, ``r R`` and the linear part ``y M`` (named with SPLIT_LINEAR_PREFIX), R and M the
    row blocks of the stacked weight ``w2 = [R; M]``, y the last C columns of input 0 (the
    widened ConvNeXtMix output, see ``_widened_mix``)."""
    import numpy as np
    from onnx import helper, numpy_helper

    wide, w1, b1, w2 = node.input[:4]
    out = node.output[0]
    # H: b1's length (an initializer), else the lead of the ConvNeXtMix that widened y (w1 may be
    # computed in the graph, e.g. a Transpose of a conv weight's slice)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    leads = [_attr(n, "lead", 0) for n in model.graph.node if n.op_type == "ConvNeXtMix" and wide in n.output]
    hidden = dims[b1][0] if len(dims.get(b1, [])) == 1 else (leads[0] if leads and leads[0] > 0 else None)
    if hidden is None:
        return [node]  # left as it is: counted as unresolved
    names = {key: f"{out}__{key}" for key in ("zero", "hidden", "end", "axis", "last")}
    constants = {"zero": [0], "hidden": [hidden], "end": [np.iinfo(np.int64).max], "axis": [0], "last": [-1]}
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), names[k])
                                   for k, v in constants.items())
    y, r, relu_part, linear_part, relu_out, linear_out = (f"{out}__{p}" for p in ("y", "r", "R", "M", "rR", "yM"))
    return [helper.make_node("Slice", [wide, names["hidden"], names["end"], names["last"]], [y]),
            helper.make_node("MatMul", [y, w1], [r], name=f"{node.name}/up"),
            helper.make_node("Slice", [w2, names["zero"], names["hidden"], names["axis"]], [relu_part]),
            helper.make_node("Slice", [w2, names["hidden"], names["end"], names["axis"]], [linear_part]),
            helper.make_node("MatMul", [r, relu_part], [relu_out], name=f"{node.name}/down"),
            helper.make_node("MatMul", [y, linear_part], [linear_out], name=SPLIT_LINEAR_PREFIX + out),
            helper.make_node("Add", [relu_out, linear_out], [out])]


def _widened_mix(model, node) -> list:
    """semvoc's ConvNeXtMix with ``lead`` > 0: an Identity of its input, padded by ``lead``
    columns in front (its output's shape, ``[B, L, lead + C]``)."""
    import numpy as np
    from onnx import helper, numpy_helper

    out = node.output[0]
    pads, axes, y = f"{out}__pads", f"{out}__axes", f"{out}__y"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([_attr(node, "lead", 0), 0], np.int64), pads),
                                    numpy_helper.from_array(np.array([-1], np.int64), axes)])
    return [helper.make_node("Identity", [node.input[0]], [y]),
            helper.make_node("Pad", [y, pads, "", axes], [out])]


def replace_contrib_ops(model) -> None:
    """Each contrib node or semvoc CUDA node -> Identity (or Split, or MatMul) nodes that give its
    outputs' shapes (in place)."""
    from onnx import helper

    nodes = []
    split_linear = _split_linear_gemms(model.graph.node)
    for node in model.graph.node:
        if node.domain == "semvoc.cuda" and node.op_type == "SplitMlp":
            nodes.extend(_split_mlp_gemms(model, node))
            continue
        if node.domain == "semvoc.cuda" and node.op_type == "ConvNeXtMix" and _attr(node, "lead", 0) > 0:
            nodes.extend(_widened_mix(model, node))
            continue
        if node.domain == "semvoc.cuda" and node.op_type in GEMM_CUDA_OPS:  # its GEMM; the epilogue is not counted
            name = SPLIT_LINEAR_PREFIX + node.output[0] if node.output[0] in split_linear else node.name
            nodes.append(helper.make_node("MatMul", list(node.input[:2]), [node.output[0]], name=name))
            continue
        if node.domain == "semvoc.cuda" and node.op_type in SPLITTING_CUDA_OPS:
            parts = SPLITTING_CUDA_OPS[node.op_type]
            outputs = list(node.output) + [f"{node.output[0]}__unused_part{i}" for i in range(len(node.output), parts)]
            nodes.append(helper.make_node("Split", [node.input[0]], outputs, axis=-1, num_outputs=parts))
            continue
        if node.domain == "semvoc.cuda" and node.op_type in ATTENTION_CUDA_OPS:
            heads = _attr(node, "num_heads", 0)
            nodes.append(helper.make_node("Attention", list(node.input[:3]), [node.output[0]], name=node.name,
                                          q_num_heads=heads, kv_num_heads=heads))
            continue
        if node.domain == "semvoc.cuda" and node.op_type in QKV_ATTENTION_CUDA_OPS:
            heads = _attr(node, "num_heads", 0)
            parts = [f"{node.output[0]}__{p}" for p in "qkv"]
            nodes.append(helper.make_node("Split", [node.input[0]], parts, axis=-1, num_outputs=3))
            nodes.append(helper.make_node("Attention", parts, [node.output[0]], name=node.name,
                                          q_num_heads=heads, kv_num_heads=heads))
            continue
        if node.domain == "semvoc.cuda" and node.op_type == "AudioFrames":
            nodes.extend(_stock_frames(model, node))
            continue
        if node.domain == "semvoc.cuda" and node.op_type in CONCATENATING_CUDA_OPS:
            joined = [node.input[i] for i in CONCATENATING_CUDA_OPS[node.op_type]]
            nodes.append(helper.make_node("Concat", joined, [node.output[0]], axis=-1))
            continue
        table = {"com.microsoft": SHAPE_PRESERVING_CONTRIB_OPS, "semvoc.cuda": SHAPE_PRESERVING_CUDA_OPS}
        outputs = table.get(node.domain, {}).get(node.op_type)
        if outputs is None:
            nodes.append(node)
            continue
        for index in outputs:
            if index < len(node.output) and node.output[index]:
                nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[index]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def count_model_flops(model, dims: dict[str, int]) -> GraphFlops:
    """FLOPs of one run of ``model`` (a ModelProto, modified in place) with the given input dims."""
    # the conv's output has its input's shape [B, L, C] (the op's output may be widened: lead)
    depthwise = [(n.input[0], n.input[1]) for n in model.graph.node
                 if n.domain == "semvoc.cuda" and n.op_type == "ConvNeXtMix"]
    replace_contrib_ops(model)
    fix_input_dims(model, dims)
    inferred = fold_shape_constants(model)
    shapes = _shape_table(inferred)
    result = GraphFlops()
    split_linear = 0
    for out, weight in depthwise:  # [B, L, C] input, [C, 1, K] weight
        if _known(shapes.get(out)) and _known(shapes.get(weight)):
            result.add("ConvNeXtMix", 2 * math.prod(shapes[out]) * shapes[weight][-1])
        else:
            result.unresolved.append(f"ConvNeXtMix {out}")
    for node in inferred.graph.node:
        if node.op_type in CONTROL_FLOW_OPS:
            result.notes.append(f"{node.op_type} node {node.name!r}: its subgraphs are not counted")
        if node.op_type not in COUNTED_OPS:
            continue
        flops = _node_flops(node, shapes)
        if flops is None:
            result.unresolved.append(f"{node.op_type} {node.name}")
            result.nodes[node.op_type] = result.nodes.get(node.op_type, 0) + 1
            continue
        if node.name.startswith(SPLIT_LINEAR_PREFIX):
            split_linear += flops
            continue
        result.add(node.op_type, flops)
    if split_linear:
        result.notes.append(f"PReLU split: {split_linear / 1e9:.3f} GFLOP of linear-part GEMMs run, not counted "
                            "(not the model's work)")
    return result


def count_file_flops(path: str | Path, dims: dict[str, int]) -> GraphFlops:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return count_model_flops(model, dims)


# ------------------------------------------------------------------------------ workload


def engine_symbols(manifest, batch: int, duration_s: float, dit_rows: int | None = None,
                   vocoder_rows: int | None = None) -> dict[str, int]:
    """Values of the manifest's shape symbols; table rows default to the engine's table sizes."""
    b = manifest.buckets
    return {"batch": int(batch), "frames": manifest.frames(duration_s),
            "dit_rows": int(dit_rows or b["dit_rows"]), "vocoder_rows": int(vocoder_rows or b["vocoder_rows"])}


def dit_calls(steps: int, sway: float | None) -> int:
    """Backbone calls the runtime makes: the schedule's calls less trailing dt == 0 calls."""
    from semvoc.runtime.schedules import dit_schedule

    schedule = dit_schedule(steps, sway)
    calls = schedule.num_calls
    while calls > 0 and schedule.dts[calls - 1] == 0.0:
        calls -= 1
    return calls


GRAPH_KINDS = ("text_encoder", "dit_prepare", "dit_time", "dit_step", "vocoder_prepare", "vocoder_time",
               "vocoder_step")


def graph_flops(manifest, kind: str, batch: int, duration_s: float, dit_rows: int | None = None,
                vocoder_rows: int | None = None) -> GraphFlops:
    import onnx

    graph = manifest.graph(kind)
    model = onnx.load(str(manifest.root / graph.file), load_external_data=False)
    symbols = engine_symbols(manifest, batch, duration_s, dit_rows, vocoder_rows)
    dims = dim_values(model, symbols, graph.inputs)
    return count_model_flops(model, dims)


def workload_flops(engine: str | Path, batch_sizes: list[int], duration_s: float, steps: int,
                   vocoder_steps: int, verify: bool = False) -> dict:
    """FLOPs per request and per clip for each batch size, with the per-graph counts."""
    from semvoc.runtime.manifest import load_manifest

    manifest = load_manifest(engine, verify=verify)
    calls = dit_calls(steps, manifest.defaults.get("sway"))
    repeats = {"text_encoder": 1, "dit_prepare": 1, "dit_time": 1, "dit_step": calls,
               "vocoder_prepare": 1, "vocoder_time": 1, "vocoder_step": vocoder_steps}
    per_batch = {}
    for batch in batch_sizes:
        graphs = {}
        total = 0
        unresolved: list[str] = []
        missing: list[str] = []
        for kind in GRAPH_KINDS:
            if not any(g.kind == kind for g in manifest.graphs.values()):
                missing.append(kind)  # an engine exported without that component
                continue
            # the time tables: only the rows this workload reads (the runtime pads them to the
            # engine's table size once per step count, and caches them across requests)
            counted = graph_flops(manifest, kind, batch, duration_s, dit_rows=calls + 1,
                                  vocoder_rows=vocoder_steps + 1)
            graphs[kind] = {**counted.as_dict(), "calls": repeats[kind]}
            total += counted.total * repeats[kind]
            unresolved += [f"{kind}: {u}" for u in counted.unresolved]
        per_batch[str(batch)] = {"flop_per_request": total, "flop_per_clip": total / batch,
                                 "tflop_per_clip": total / batch / 1e12, "graphs": graphs,
                                 "unresolved": unresolved, "missing_graphs": missing}
    one = per_batch[str(batch_sizes[0])]["graphs"] if batch_sizes else {}
    b0 = batch_sizes[0] if batch_sizes else 1
    cross = cross_check(manifest, duration_s, one, b0)
    return {"engine": str(Path(engine)), "duration_s": duration_s, "steps": steps, "dit_calls": calls,
            "vocoder_steps": vocoder_steps, "preset": manifest.data["model"].get("preset"),
            "counted_ops": list(COUNTED_OPS), "per_batch": per_batch, "cross_check": cross}


def cross_check(manifest, duration_s: float, graphs_at_b: dict, batch: int) -> dict:
    """Per-clip step counts next to DESIGN.md's figures (which are for the reference preset, 10 s)."""
    if not all(k in graphs_at_b for k in ("dit_step", "vocoder_step", "vocoder_prepare")):
        return {}
    dit = graphs_at_b["dit_step"]["flop"] / batch  # the DiT graph runs [uncond; cond]: batch 2 per clip
    voc = graphs_at_b["vocoder_step"]["flop"] / batch
    voc_prep = graphs_at_b["vocoder_prepare"]["flop"] / batch
    return {
        "preset": manifest.data["model"].get("preset"),
        "duration_s": duration_s,
        "dit_step_batch2_gflop": dit / 1e9,
        "dit_step_batch2_gflop_design": DESIGN_DIT_STEP_BATCH2_GFLOP,
        "vocoder_step_gflop": voc / 1e9,
        "vocoder_step_plus_prepare_gflop": (voc + voc_prep) / 1e9,
        "vocoder_step_gflop_design": DESIGN_VOCODER_STEP_GFLOP,
        "comparable": manifest.data["model"].get("preset") == "reference" and abs(duration_s - 10.0) < 1e-6,
        "note": ("DESIGN.md counts one whole official step; the engine moves step-invariant work "
                 "(DiT cross-attention K/V, the vocoder's cond_mlp and cond_proj, adaLN and time "
                 "FiLM tables) into prepare/time graphs run once per request, so its step graphs "
                 "count less; 'vocoder step + prepare' adds the vocoder's prepare graph back."),
    }


def format_cross_check(cross: dict) -> str:
    if not cross:
        return "no FLOP counts"
    lines = [f"FLOP cross-check ({cross['preset']} preset, {cross['duration_s']:g} s clip"
             + ("" if cross["comparable"] else "; DESIGN.md's figures are for the reference preset, 10 s")
             + "):",
             f"  DiT step (batch 2):        {cross['dit_step_batch2_gflop']:10.2f} GFLOP   "
             f"(DESIGN.md: ~{cross['dit_step_batch2_gflop_design']:g})",
             f"  vocoder step:              {cross['vocoder_step_gflop']:10.2f} GFLOP   "
             f"(DESIGN.md: ~{cross['vocoder_step_gflop_design']:g})",
             f"  vocoder step + prepare:    {cross['vocoder_step_plus_prepare_gflop']:10.2f} GFLOP"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("engine", type=Path)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--vocoder-steps", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print the whole count as JSON")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    counts = workload_flops(args.engine, sizes, args.duration, args.steps, args.vocoder_steps)
    if args.json:
        print(json.dumps(counts, indent=1))
        return 0
    for batch, entry in counts["per_batch"].items():
        print(f"batch {batch}: {entry['flop_per_request'] / 1e12:.3f} TFLOP per request, "
              f"{entry['tflop_per_clip']:.3f} TFLOP per clip")
        for kind, g in entry["graphs"].items():
            print(f"  {kind:16s} {g['gflop']:12.3f} GFLOP x {g['calls']}")
        if entry["unresolved"]:
            print(f"  unresolved shapes (not counted): {entry['unresolved']}")
        if entry["missing_graphs"]:
            print(f"  not in this engine (not counted): {', '.join(entry['missing_graphs'])}")
    print(format_cross_check(counts["cross_check"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
