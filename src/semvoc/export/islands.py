"""fp32 islands per node: where an fp16 graph diverges, only the nodes that diverge run in fp32.

When an fp16 graph misses its parity bound (an activation overflows, or loses too much), the
graph is run twice with every intermediate tensor marked as an output (polygraphy's
``ModifyOutputs(outputs=MARK_ALL)`` and ``OnnxrtRunner``): as exported, and with every node
in fp32 (the same graph, the same fp16-rounded weights, so tensor names match one to one).
polygraphy's ``Comparator`` compares the two tensor by tensor; the *first* diverging nodes
(a tensor past ``DIVERGENCE``, whose inputs are not) become fp32: their fp16 inputs are cast
up, their fp16 weights stored in fp32, and their outputs cast back down where fp16 nodes read
them. That is repeated until nothing diverges: a node whose fp32 result overflows when cast
back to fp16 shows up as a diverging input of its readers, which then join the island, so an
island grows just until the values fit fp16 again (e.g. through the down-projection after a
GEGLU whose hidden activations overflow). The caller re-checks parity on the result.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# a tensor diverges when max |fp16 - fp32| exceeds this fraction of max |fp32| (or is not finite);
# fp16 rounding alone stays near 1e-3 (parity's fp16 bound on outputs is 3e-2)
DIVERGENCE = 1e-2
MAX_ROUNDS = 12
UP, DOWN = "__fp32", "__fp16"  # suffixes of the tensors the rewrite adds

SessionFactory = Callable[[Path], object]  # ONNX file -> onnxruntime InferenceSession
# semvoc.cuda ops with an fp16 kernel only: they stay fp16 in the all-fp32 reference run and are
# never made an island
FP16_ONLY_OPS = {"QkvAttention"}


def _can_run_fp32(node: onnx.NodeProto) -> bool:
    return not (node.domain == "semvoc.cuda" and node.op_type in FP16_ONLY_OPS)


@dataclass
class IslandSearch:
    model: onnx.ModelProto  # the graph with its fp32 islands
    nodes: list[str]  # the nodes that run in fp32, in graph order
    where: dict[str, str] = field(default_factory=dict)  # node -> "<op> in <module path>" (from the exporter)
    rounds: list[dict] = field(default_factory=list)  # per round: diverging tensors, nodes added
    converged: bool = False  # nothing diverges any more

    def report(self) -> dict:
        return {"nodes": self.nodes, "where": self.where, "converged": self.converged, "rounds": self.rounds,
                "divergence": DIVERGENCE}


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node was exported from (torch.onnx records its name scopes)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            modules = [s for s in scopes[:-1] if s]
            return modules[-1] if modules else "the graph"
    return "the graph"


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (islands are named by node)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def with_fp32_islands(model: onnx.ModelProto, islands: set[str], dtypes: dict[str, np.dtype]) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes named in ``islands`` compute in fp32. ``dtypes``: the element
    type of every tensor of the original graph (from a run with all tensors marked)."""
    model = copy.deepcopy(model)
    graph = model.graph
    half = {name for name, dt in dtypes.items() if dt == np.float16}
    initializers = {t.name: t for t in graph.initializer}
    half |= {n for n, t in initializers.items() if t.data_type == TensorProto.FLOAT16}
    half |= {v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    half |= {n.output[0] for n in graph.node if n.op_type == "Constant"  # constants are not marked outputs
             and any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16
                     for a in n.attribute)}
    graph_outputs = {v.name for v in graph.output}
    island_nodes = [n for n in graph.node if n.name in islands]
    produced_in_island = {out for n in island_nodes for out in n.output if out}
    added: list[onnx.NodeProto] = []
    made: set[str] = set()

    def cast(src: str, dst: str, to: int) -> str:
        if dst not in made:
            added.append(helper.make_node("Cast", [src], [dst], to=to, name=f"{dst}_cast"))
            made.add(dst)
        return dst

    for node in island_nodes:
        for i, x in enumerate(node.input):
            if not x or x not in half:
                continue
            if x in produced_in_island:  # already fp32 (renamed where it is a graph output)
                node.input[i] = x + UP if x in graph_outputs else x
            elif x in initializers:
                if x + UP not in made:
                    array = numpy_helper.to_array(initializers[x]).astype(np.float32)
                    graph.initializer.append(numpy_helper.from_array(array, x + UP))
                    made.add(x + UP)
                node.input[i] = x + UP
            else:
                node.input[i] = cast(x, x + UP, TensorProto.FLOAT)
        for attr in node.attribute:  # dtypes the node itself decides
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32),
                                                        attr.t.name))
        for i, y in enumerate(node.output):
            if y in half and y in graph_outputs:
                node.output[i] = y + UP
                cast(y + UP, y, TensorProto.FLOAT16)
    for node in graph.node:  # fp16 readers of an island's outputs read them cast back down
        if node.name in islands:
            continue
        for i, x in enumerate(node.input):
            if x in produced_in_island and x in half and x not in graph_outputs:
                node.input[i] = cast(x, x + DOWN, TensorProto.FLOAT16)
    for value in graph.value_info:  # the island's own tensors are fp32 now
        if value.name in produced_in_island and value.name in half:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = [*graph.node, *added]
    del graph.node[:]
    graph.node.extend(_topological(nodes, graph))
    return model


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before it is read (original order kept
    where it already is)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        progressed, rest = False, []
        for node in pending:
            if all(x in available for x in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:  # inputs from an outer scope or a cycle: keep the remaining order
            ordered += rest
            break
        pending = rest
    return ordered


def _run_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray], make_session: SessionFactory,
             workdir: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` on ``feeds`` (polygraphy marks them all and runs onnxruntime)."""
    from polygraphy import constants
    from polygraphy.backend.onnx import modify_outputs
    from polygraphy.backend.onnxrt import OnnxrtRunner

    marked = modify_outputs(copy.deepcopy(model), outputs=constants.MARK_ALL)
    path = workdir / "marked.onnx"
    large = marked.ByteSize() > 1_800_000_000
    onnx.save_model(marked, str(path), save_as_external_data=large, location="marked.onnx.data")
    with OnnxrtRunner(make_session(path)) as runner:
        outputs = runner.infer(feeds)
    return {name: np.asarray(value) for name, value in outputs.items()}


def _diverging(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Tensors (by name) whose values diverge, with their error (max |diff| / max |reference|),
    compared by polygraphy on scaled copies (so one absolute tolerance fits every tensor)."""
    from polygraphy import comparator
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult

    ours, theirs = {}, {}
    for name, ref in reference.items():
        out = candidate.get(name)
        if out is None or ref.dtype.kind != "f" or out.dtype.kind != "f" or out.shape != ref.shape or not ref.size:
            continue
        ref32 = ref.astype(np.float32)
        if not np.all(np.isfinite(ref32)):  # not finite in fp32 either: nothing fp32 islands could fix
            continue
        scale = float(np.abs(ref32).max()) or 1.0
        # (at least 1-D: polygraphy indexes its arrays)
        ours[name] = np.atleast_1d(out.astype(np.float32) / scale)
        theirs[name] = np.atleast_1d(ref32 / scale)
    results = RunResults([("fp16", [IterationResult(ours, runner_name="fp16")]),
                          ("fp32", [IterationResult(theirs, runner_name="fp32")])])
    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple  # newer name first
    compare = simple(atol=DIVERGENCE, rtol=0.0, check_error_stat="max")
    with np.errstate(all="ignore"), warnings.catch_warnings():  # inf - inf in the statistics: failing anyway
        warnings.simplefilter("ignore")
        accuracy = Comparator.compare_accuracy(results, compare_func=compare, fail_fast=False)
    if not hasattr(accuracy, "values"):  # polygraphy >= 0.50: one AccuracyResult per compare function
        accuracy = accuracy[0]
    verdicts = next(iter(accuracy.values()))[0]  # (fp16, fp32) pair, first iteration
    return {name: float(r.max_absdiff) for name, r in verdicts.items() if not bool(r)}


def find_fp32_islands(model: onnx.ModelProto, feeds: dict[str, np.ndarray], make_session: SessionFactory,
                      max_rounds: int = MAX_ROUNDS) -> IslandSearch:
    """Grow fp32 islands in the fp16 graph ``model`` until its tensors follow the all-fp32 run."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # its per-tensor report is for debugging, not the export log
    model = copy.deepcopy(model)
    name_nodes(model)
    with tempfile.TemporaryDirectory(prefix="semvoc-islands-") as tmp:
        work = Path(tmp)
        baseline = _run_all(model, feeds, make_session, work)
        dtypes = {name: value.dtype for name, value in baseline.items()}
        every_half = {n.name for n in model.graph.node if _can_run_fp32(n)
                      and any(dtypes.get(x) == np.float16 for x in [*n.input, *n.output])}
        reference = _run_all(with_fp32_islands(model, every_half, dtypes), feeds, make_session, work)
        outputs = [v.name for v in model.graph.output]
        islands: set[str] = set()
        search = IslandSearch(model, [])
        current = baseline
        for _ in range(max_rounds + 1):
            failing = _diverging(current, reference)
            overflow = {name for name, error in failing.items() if not math.isfinite(error)}
            if not overflow and not any(name in failing for name in outputs):  # results follow fp32 again
                search.converged = True
                break
            if len(search.rounds) == max_rounds:
                break
            # first diverging nodes: a diverging output from inputs that do not diverge (an island's
            # output that overflows when cast back down diverges only in its readers' outputs)
            first = [node for node in model.graph.node if node.name not in islands and _can_run_fp32(node)
                     and any(out in failing for out in node.output)
                     and not any(x in failing for x in node.input)]
            # overflow (inf/nan) first: fp16 rounding elsewhere may be within parity anyway
            broken = [n for n in first if any(out in overflow for out in n.output)]
            added = [n.name for n in (broken or first)]
            if not added:
                break
            worst = max(failing, key=failing.get)
            search.rounds.append({"diverging_tensors": len(failing), "worst": worst,
                                  "worst_error": _json_number(failing[worst]), "added": added})
            islands.update(added)
            current = _run_all(with_fp32_islands(model, islands, dtypes), feeds, make_session, work)
        search.nodes = [n.name for n in model.graph.node if n.name in islands]
        search.where = {n.name: f"{n.op_type} in {_module_path(n)}" for n in model.graph.node if n.name in islands}
        search.model = with_fp32_islands(model, islands, dtypes)
    return search
