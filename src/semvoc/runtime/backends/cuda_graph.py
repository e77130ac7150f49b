"""CUDA-graph helpers shared by the backends that capture whole ODE loops (onnxruntime CUDA,
TensorRT) through cuda-python: the runtime module, the launch plan of a loop, and a check of a
captured graph for nodes that cannot be replayed safely."""

from __future__ import annotations

from collections import Counter
from typing import Any


def import_cudart():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` since 12.6.2, ``cuda.cudart`` before."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def launch_plan(calls: int) -> tuple[int, int]:
    """How a loop of ``calls`` ping-pong steps runs from captured graphs: (launches of the
    two-step A->B, B->A graph, launches of the one-step A->B graph). After the pairs the state
    is back in buffer A, so an odd count ends with one A step and its result in buffer B."""
    if calls < 0:
        raise ValueError(f"a loop cannot run {calls} steps")
    return calls // 2, calls % 2


class CudaCallError(RuntimeError):
    """A cuda-python call returned an error."""


def check(cudart, result) -> Any:
    """Unpack a cuda-python ``(error, *values)`` tuple, raising on an error."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaCallError(f"CUDA error {cudart.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


# Node types a captured onnxruntime run may hold and still replay as it ran. A host-function node
# is what onnxruntime enqueues to free the pinned staging buffers of a run (a replay would free
# them again); a host<->device copy reads a staging buffer that a replay no longer owns. Memory
# nodes come from stream-ordered allocation during the capture (cuBLAS's workspace for some
# algorithms): an allocation the same graph frees is safe (each launch allocates at the same
# address and frees before the graph ends, so back-to-back launches never overlap), one it does not
# free is not (a second launch would find it still allocated), nor is freeing what it did not allocate.
_SAFE_NODE_TYPES = ("cudaGraphNodeTypeKernel", "cudaGraphNodeTypeMemset", "cudaGraphNodeTypeEmpty",
                    "cudaGraphNodeTypeEventRecord", "cudaGraphNodeTypeWaitEvent")


def _device_pointer(cudart, pointer: int) -> bool:
    err, attributes = cudart.cudaPointerGetAttributes(pointer)
    if err != cudart.cudaError_t.cudaSuccess:
        cudart.cudaGetLastError()  # an unregistered host pointer reports an error on old runtimes
        return False
    return attributes.type in (cudart.cudaMemoryType.cudaMemoryTypeDevice, cudart.cudaMemoryType.cudaMemoryTypeManaged)


def _memcpy_on_device(cudart, node) -> bool:
    err, params = cudart.cudaGraphMemcpyNodeGetParams(node)
    if err != cudart.cudaError_t.cudaSuccess:
        return False  # a copy whose ends cannot be checked is not trusted
    kinds = cudart.cudaMemcpyKind
    if params.kind == kinds.cudaMemcpyDeviceToDevice:
        return True
    if params.kind != kinds.cudaMemcpyDefault:
        return False
    return all(_device_pointer(cudart, int(p.ptr)) for p in (params.srcPtr, params.dstPtr))


def _allocated_address(cudart, node) -> int | None:
    """The address a MemAlloc node allocates; None where it cannot be read (then not trusted)."""
    try:
        err, params = cudart.cudaGraphMemAllocNodeGetParams(node)
        return int(params.dptr) if err == cudart.cudaError_t.cudaSuccess and int(params.dptr) else None
    except (AttributeError, TypeError, ValueError):  # a cuda-python whose binding differs
        return None


def _freed_address(cudart, node) -> int | None:
    """The address a MemFree node frees; None where it cannot be read."""
    try:
        err, pointer = cudart.cudaGraphMemFreeNodeGetParams(node)
        return int(pointer) if err == cudart.cudaError_t.cudaSuccess and int(pointer) else None
    except (AttributeError, TypeError, ValueError):
        return None


def graph_hazards(cudart, graph) -> list[str]:
    """Names of the nodes of a captured (not yet instantiated) graph that make replaying it unsafe;
    empty when every node is a kernel, a memset, a device-to-device copy, an event, empty, or an
    allocation that the graph itself frees."""
    count = check(cudart, cudart.cudaGraphGetNodes(graph, 0))[1]
    nodes = check(cudart, cudart.cudaGraphGetNodes(graph, count))[0] if count else []
    hazards = []
    allocated: list[int | None] = []
    freed: list[int | None] = []
    for node in nodes:
        kind = check(cudart, cudart.cudaGraphNodeGetType(node))
        name = getattr(kind, "name", str(kind))
        if name in _SAFE_NODE_TYPES:
            continue
        if name == "cudaGraphNodeTypeMemAlloc":
            allocated.append(_allocated_address(cudart, node))
        elif name == "cudaGraphNodeTypeMemFree":
            freed.append(_freed_address(cudart, node))
        elif name == "cudaGraphNodeTypeMemcpy":
            if not _memcpy_on_device(cudart, node):
                hazards.append("a host<->device copy")
        elif name == "cudaGraphNodeTypeGraph":
            hazards += graph_hazards(cudart, check(cudart, cudart.cudaGraphChildGraphNodeGetGraph(node)))
        elif name == "cudaGraphNodeTypeHost":
            hazards.append("a host function")
        else:
            hazards.append(name.removeprefix("cudaGraphNodeType"))
    if None in allocated or None in freed:  # an address that could not be read: not trusted
        hazards.append("a MemAlloc or MemFree whose address could not be read")
    else:
        if Counter(allocated) - Counter(freed):
            hazards.append("a MemAlloc that the graph does not free")
        if Counter(freed) - Counter(allocated):
            hazards.append("a MemFree of memory that the graph did not allocate")
    return hazards
