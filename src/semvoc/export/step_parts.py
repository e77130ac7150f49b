"""A step graph cut into parts that can run side by side: the vocoder's branches on CUDA streams.

The vocoder step runs three independent branches (one per STFT resolution) and sums their
predictions. onnxruntime runs a session's nodes one after another on one stream, so at batch 1
the GPU runs one branch's small GEMMs and passes at a time. This module cuts the exported step
graph into ONNX files that the CUDA backend runs as one fork/join per step (``ort_cuda``, in its
whole-loop CUDA graphs):

- one ``branch`` per group of branch inputs (``cond_bias_i``, ``time_scale_i``): every node that
  depends on that group alone;
- ``tail``: every node that depends on two groups or more (the branch sum or ``EulerOverlapAdd``,
  the Euler update);
- a node that depends on no group (the waveform cast to the compute dtype, shape arithmetic, the
  step counter) goes into every part that reads it: the parts exchange only the branches' results.

The parts keep the step graph's nodes, attributes and value types unchanged; their weights stay
in the step graph's data file (the same external-data references), so they add no weights on
disk. A graph is not cut (``plan_parts`` returns the reason) when it holds nodes with
subgraphs, when fewer than two branches have nodes of their own, or when a value passed between parts
lacks a type or has a symbolic dimension that the step graph's inputs do not name (the runtime
fixes every dimension by name when it creates a session, so that the run can be captured).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

BRANCH, TAIL = "branch", "tail"
#: ``SEMVOC_EXPORT_WITHOUT=BranchParts`` writes no parts (the CUDA backend then runs the whole step)
FUSION = "BranchParts"


@dataclass
class Part:
    role: str  # "branch" or "tail"
    nodes: list[int]  # indices into the step graph's nodes, in its (topological) order
    inputs: list[str] = field(default_factory=list)  # step-graph inputs and the branches' outputs (tail)
    outputs: list[str] = field(default_factory=list)  # what the tail reads, and step-graph outputs
    initializers: list[str] = field(default_factory=list)


def _subgraph_free(node: onnx.NodeProto) -> bool:
    return all(a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def plan_parts(graph: onnx.GraphProto, branch_inputs: Sequence[Sequence[str]]) -> list[Part] | str:
    """The branches (in the order of ``branch_inputs``, whose group ``b`` names the graph inputs
    that only branch ``b`` reads) and the tail of ``graph``; or the reason why it is not cut."""
    if not all(_subgraph_free(n) for n in graph.node):
        return "a node has a subgraph"
    nodes = graph.node
    group_of = {name: b for b, names in enumerate(branch_inputs) for name in names}
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)
    # the branch groups each node depends on, through any path
    depends: list[frozenset[int]] = []
    for node in nodes:
        groups: set[int] = set()
        for name in node.input:
            if name in group_of:
                groups.add(group_of[name])
            elif name in producer:
                groups |= depends[producer[name]]
        depends.append(frozenset(groups))
    # the parts that run each node: the tail where it depends on two groups or more, branch b where
    # on b alone; a node that depends on no group (a cast of the waveform, shape arithmetic, the
    # step counter) runs in every part that reads it, so parts exchange nothing but the branches'
    # results and each part's shapes fold when its session is created
    runs_in: list[set] = [set() for _ in nodes]
    for i in range(len(nodes) - 1, -1, -1):
        if depends[i]:
            runs_in[i] = {TAIL} if len(depends[i]) >= 2 else {next(iter(depends[i]))}
            continue
        for out in nodes[i].output:
            for j in consumers.get(out, []):
                runs_in[i] |= runs_in[j]
            if out in graph_outputs:
                runs_in[i].add(TAIL)
    # (a branch runs a node only where some node depends on that branch alone)
    branches = sorted({b for r in runs_in for b in r if b != TAIL})
    if len(branches) < 2:
        return "fewer than two branches have nodes of their own"

    parts = {key: Part(TAIL if key == TAIL else BRANCH, []) for key in [*branches, TAIL]}
    for i, keys in enumerate(runs_in):
        for key in keys:
            parts[key].nodes.append(i)
    for key, part in parts.items():
        produced = {out for i in part.nodes for out in nodes[i].output if out}
        seen: set[str] = set()
        for i in part.nodes:
            for name in nodes[i].input:
                if name and name not in produced and name not in seen:
                    seen.add(name)
                    (part.initializers if name in initializers else part.inputs).append(name)
        for i in part.nodes:
            # what the part computes for others: a value another part reads (only ever a branch's:
            # every reader of a node that depends on no branch runs it too), and the graph's outputs
            # (of such a node, the tail's copy)
            for out in nodes[i].output:
                read_elsewhere = any(key not in runs_in[j] for j in consumers.get(out, []))
                if out and ((depends[i] and read_elsewhere) or (out in graph_outputs and (depends[i] or key == TAIL))):
                    part.outputs.append(out)
    return [parts[key] for key in [*branches, TAIL]]


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {vi.name: vi for vi in [*graph.value_info, *graph.input, *graph.output]}


def _dim_params(vi: onnx.ValueInfoProto) -> set[str]:
    return {d.dim_param for d in vi.type.tensor_type.shape.dim if d.dim_param}


def check_boundaries(graph: onnx.GraphProto, parts: list[Part], dims: dict[str, object]) -> str:
    """Why the parts' boundary values cannot be bound by the runtime ("" when they can): each needs
    a tensor type, and dims that are numbers or named in ``dims`` (the step graph's input dims)."""
    types = _value_types(graph)
    for part in parts:
        for name in part.inputs + part.outputs:
            vi = types.get(name)
            if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                return f"the value {name!r} passed between parts has no recorded type and shape"
            unknown = _dim_params(vi) - set(dims)
            if unknown:
                return f"the value {name!r} passed between parts has dims {sorted(unknown)} that no input names"
    return ""


def tensor_spec(vi: onnx.ValueInfoProto, dims: dict[str, object]) -> dict:
    """The manifest's description of a value: name, numpy dtype name and shape, each dim a number
    or the expression ``dims`` gives for its name."""
    tensor = vi.type.tensor_type
    shape = [dims[d.dim_param] if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
    return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}


def part_model(model: onnx.ModelProto, part: Part, name: str) -> onnx.ModelProto:
    """The ONNX model of one part: the step graph's nodes, initializers (external references
    unchanged) and value types, with the part's boundary values as its inputs and outputs."""
    graph = model.graph
    types = _value_types(graph)
    tensors = {t.name: t for t in graph.initializer}
    nodes = [graph.node[i] for i in part.nodes]
    inside = {out for n in nodes for out in n.output} | {name for n in nodes for name in n.input}
    boundary = set(part.inputs) | set(part.outputs)
    value_info = [vi for vi in graph.value_info if vi.name in inside and vi.name not in boundary]
    new_graph = onnx.helper.make_graph(
        nodes, name, [types[n] for n in part.inputs], [types[n] for n in part.outputs],
        initializer=[tensors[n] for n in part.initializers], value_info=value_info)
    out = onnx.helper.make_model(new_graph, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version, producer_name=model.producer_name,
                                 producer_version=model.producer_version)
    out.functions.extend(model.functions)
    return out


def write_parts(path: Path, branch_inputs: Sequence[Sequence[str]], dims: dict[str, object]) -> tuple[list[dict], str]:
    """Cut the step graph at ``path`` (its weights in an external data file beside it) into parts
    written beside it as ``<stem>.<part>.onnx``. ``dims`` maps the dim names of the graph's inputs
    to their manifest expressions. Returns the parts' manifest entries (``role``, ``file``,
    ``inputs`` by name, ``outputs`` as name, dtype and shape, ``initializers``), or ``[]`` and the
    reason why the graph is not cut."""
    model = onnx.load(str(path), load_external_data=False)
    parts = plan_parts(model.graph, branch_inputs)
    if isinstance(parts, str):
        return [], parts
    reason = check_boundaries(model.graph, parts, dims)
    if reason:
        return [], reason
    types = _value_types(model.graph)
    entries = []
    branch = 0
    for part in parts:
        label = part.role if part.role != BRANCH else f"branch{branch}"
        branch += part.role == BRANCH
        file = path.with_name(f"{path.stem}.{label}.onnx")
        onnx.save_model(part_model(model, part, f"{model.graph.name}_{label}"), str(file))
        entries.append({"role": part.role, "file": file.name, "inputs": part.inputs,
                        "outputs": [tensor_spec(types[name], dims) for name in part.outputs],
                        "initializers": part.initializers})
    return entries, ""
