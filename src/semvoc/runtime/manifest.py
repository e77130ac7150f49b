"""The engine directory contract: ``manifest.json`` and how the runtime decides to trust it.

An engine directory holds ``manifest.json``, ``tokenizer.json``, ``parity.json`` and one ONNX
file per graph (plus ``<graph>.onnx.data``: the step graphs' weights, and any graph's past 64 MiB;
and ``.plan`` TensorRT engines where built). The manifest records: the schema version; producer
versions; the model (its config, source and whether it is an untrained preset); precision per
component and the fp32 islands; the opset; the buckets (batch sizes, durations, text length,
table sizes); the sampling defaults; each graph's file, inputs and outputs, and for the step
graphs ``weights``: an index of the tensors in their ``.data`` file (name, dtype, shape, offset,
length), which lets the CUDA backend load them once for all batch buckets without parsing ONNX
(engines without it still load; each session then reads its own copy); the sha256 of every file; the parity summary;
and, for engines exported with ``--cuda-kernels``, ``custom_ops``: semvoc's CUDA op library in
the engine (``kernels/libsemvoc_cuda.so``), its domain and ops (onnxruntime CUDA only).

``load_manifest`` refuses what it cannot trust (missing or unknown schema, missing or modified
files) with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class EngineError(RuntimeError):
    """An engine directory the runtime cannot use; the message says how to fix it."""


def dim_name(expression: str) -> str:
    """The ONNX ``dim_param`` for a shape expression: ``"4*frames + 1"`` -> ``"frames_x4_p1"``.

    Exported graphs carry these identifiers so that onnxruntime can override every symbolic
    dimension by name (``add_free_dimension_override_by_name``).
    """
    text = expression.replace(" ", "")
    match = re.fullmatch(r"(\d+)\*([A-Za-z_]\w*)(.*)|([A-Za-z_]\w*)\*(\d+)(.*)", text)
    if match:
        factor, symbol, rest = (match.group(1), match.group(2), match.group(3)) if match.group(1) else (
            match.group(5), match.group(4), match.group(6))
        text = f"{symbol}_x{factor}{rest}"
    return text.replace("+", "_p").replace("-", "_m")


def eval_dim(expression, symbols: dict[str, int]) -> int:
    """Evaluate a manifest shape entry (an int or an expression of the symbols)."""
    if isinstance(expression, int):
        return expression
    return int(eval(str(expression), {"__builtins__": {}}, dict(symbols)))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list  # ints or expressions of the symbols batch, frames, dit_rows, vocoder_rows
    onnx_dims: list | None = None  # the ONNX file's dim_param names (or ints), axis by axis

    @classmethod
    def of(cls, d: dict) -> TensorInfo:
        return cls(d["name"], d["dtype"], list(d["shape"]), d.get("onnx_dims"))


#: element types a weight index may name, with their sizes in bytes (numpy's names)
WEIGHT_DTYPES = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
                 "uint8": 1, "bool": 1}


@dataclass(frozen=True)
class WeightInfo:
    """One initializer of a graph stored in its ``.data`` file: ``length`` bytes at ``offset``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class PartInfo:
    """One part of a step graph cut for side-by-side branches (``export/step_parts.py``): a
    ``branch`` (the branches run at once, each on a CUDA stream of its own) or the ``tail`` (after
    them). ``inputs``: names of the graph's inputs and of the branches' outputs; ``weights``: the
    graph's indexed weights that this part's sessions take from the shared copy."""

    role: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[TensorInfo, ...]
    weights: tuple[str, ...] = ()


def _parts(graph: str, entry: dict) -> tuple[PartInfo, ...]:
    """A graph's ``parts``: two branches or more, then a tail that writes the graph's outputs and
    reads only the graph's inputs and the branches' outputs."""
    infos = tuple(PartInfo(p["role"], p["file"], tuple(p["inputs"]), tuple(TensorInfo.of(t) for t in p["outputs"]),
                           tuple(p.get("weights", ()))) for p in entry.get("parts") or [])
    if not infos:
        return ()
    roles = [p.role for p in infos]
    outputs = {t["name"] for t in entry["outputs"]}
    graph_inputs = {t["name"] for t in entry["inputs"]}
    available = graph_inputs | {t.name for p in infos[:-1] for t in p.outputs}
    if (len(roles) < 3 or roles[-1] != "tail" or set(roles[:-1]) != {"branch"}
            or outputs - {t.name for t in infos[-1].outputs} or set(infos[-1].inputs) - available
            or any(set(p.inputs) - graph_inputs for p in infos[:-1])):
        raise ValueError(f"graph {graph!r}: its parts must be two branches or more reading the graph's inputs, "
                         f"then a tail that writes {sorted(outputs)}")
    return infos


@dataclass(frozen=True)
class GraphInfo:
    name: str
    kind: str  # the GraphSpec name, e.g. "dit_step" (several durations share a kind)
    component: str
    file: str
    data_file: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    duration_s: float | None
    plan_file: str | None = None
    weights: tuple[WeightInfo, ...] = ()  # the index of data_file (step graphs of newer engines)
    parts: tuple[PartInfo, ...] = ()  # the vocoder step cut into branches and a tail (CUDA exports)

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)


class Manifest:
    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data
        self.graphs = {
            name: GraphInfo(name=name, kind=g["kind"], component=g["component"], file=g["file"],
                            data_file=g.get("data_file"), inputs=[TensorInfo.of(t) for t in g["inputs"]],
                            outputs=[TensorInfo.of(t) for t in g["outputs"]],
                            duration_s=g.get("duration_s"), plan_file=g.get("plan_file"),
                            weights=_weight_index(root, name, g), parts=_parts(name, g))
            for name, g in data["graphs"].items()}

    # --------------------------------------------------------------------- conveniences
    @property
    def defaults(self) -> dict:
        return self.data["defaults"]

    @property
    def buckets(self) -> dict:
        return self.data["buckets"]

    @property
    def shapes(self) -> dict:
        return self.data["shapes"]

    @property
    def untrained(self) -> bool:
        return bool(self.data["model"].get("untrained"))

    @property
    def custom_ops_library(self) -> Path | None:
        """semvoc's CUDA op library of an engine exported with ``--cuda-kernels`` (else None)."""
        entry = self.data.get("custom_ops")
        return self.root / entry["library"] if entry else None

    @property
    def components(self) -> set[str]:
        return {g.component for g in self.graphs.values()}

    def graph(self, kind: str, duration_s: float | None = None) -> GraphInfo:
        for g in self.graphs.values():
            if g.kind == kind and (g.duration_s is None or duration_s is None or
                                   abs(g.duration_s - duration_s) < 1e-6):
                return g
        have = sorted(self.graphs)
        raise EngineError(f"this engine has no {kind!r} graph"
                          + (f" for {duration_s:g} s" if duration_s else "")
                          + f" (it has {have}); re-export with the component/duration you need")

    def frames(self, duration_s: float) -> int:
        return round(duration_s * self.shapes["frames_per_second"])


def _weight_index(root: Path, graph: str, entry: dict) -> tuple[WeightInfo, ...]:
    """A graph's ``weights`` index, checked against its data file: every entry must name a known
    dtype and a shape whose bytes are its length, and lie inside the file (a bad entry would make
    the CUDA backend hand onnxruntime the wrong bytes as a weight)."""
    index = entry.get("weights")
    if not index:
        return ()

    def bad(why: str) -> EngineError:
        return EngineError(f"the weight index of graph {graph!r} in {root / MANIFEST} is invalid ({why}); "
                           "re-export the engine with this semvoc; do not edit engine files by hand")

    data_file = entry.get("data_file")
    if not isinstance(data_file, str) or not isinstance(index, list):
        raise bad("a weight index needs the graph's data_file and a list of entries")
    try:
        size = (root / data_file).stat().st_size
    except OSError as err:
        raise bad(f"cannot read {data_file}: {err.strerror}") from err
    weights, names = [], set()
    for i, w in enumerate(index):
        if not isinstance(w, dict) or not isinstance(w.get("name"), str):
            raise bad(f"entry {i} is not a named tensor")
        name, dtype, shape, offset, length = (w.get(k) for k in ("name", "dtype", "shape", "offset", "length"))
        where = f"entry {i} ({name!r})"
        if name in names:
            raise bad(f"{where} appears twice")
        if dtype not in WEIGHT_DTYPES:
            raise bad(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape):
            raise bad(f"{where} has shape {shape!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise bad(f"{where} has offset {offset!r}, length {length!r}")
        if math.prod(shape) * WEIGHT_DTYPES[dtype] != length:
            raise bad(f"{where}: shape {shape} of {dtype} is {math.prod(shape) * WEIGHT_DTYPES[dtype]} bytes, "
                      f"its length says {length}")
        if offset + length > size:
            raise bad(f"{where}: bytes {offset}..{offset + length} lie past the end of {data_file} ({size} bytes)")
        names.add(name)
        weights.append(WeightInfo(name, dtype, tuple(shape), offset, length))
    return tuple(weights)


_SETTLED_NS = 5_000_000_000  # files younger than this are hashed on every load


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def user_cache_dir() -> Path | None:
    """semvoc's folder in the user's cache: ``SEMVOC_CACHE_DIR``, else ``$XDG_CACHE_HOME/semvoc``
    (default ``~/.cache/semvoc``); None where ``SEMVOC_CACHE_DIR`` is set empty (caching off)."""
    folder = os.environ.get("SEMVOC_CACHE_DIR")
    if folder == "":
        return None
    return Path(folder) if folder else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semvoc"


def _verified_cache_path() -> Path | None:
    """Where verified files are remembered; None: off."""
    base = user_cache_dir()
    return None if base is None else base / "verified-files.json"


def _read_cache(cache_path: Path | None) -> dict:
    try:
        return json.loads(cache_path.read_text()) if cache_path else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache_path: Path | None, cache: dict) -> None:
    if not cache_path:
        return
    try:  # best effort: a read-only home only costs the next load its hashing
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        partial.write_text(json.dumps(cache))
        os.replace(partial, cache_path)
    except OSError:
        pass


def hash_and_stamp(path: Path) -> tuple[str, list[int] | None]:
    """A file's sha256 and its stat stamp as hashed (None if it changed while being hashed)."""
    before = _stamp(path)
    digest = sha256_file(path)
    return digest, (before if _stamp(path) == before else None)


def remember_verified(root: Path, files: dict[str, str], stamps: dict[str, list[int] | None]) -> list[str]:
    """Record files whose sha256 the caller computed (the exporter, writing the manifest) as
    verified, so that the first load does not hash them again; returns the names recorded. A file
    is recorded only if its stat is still the one taken when it was hashed (a rename keeps it) and
    it is settled (see ``verify_files``); the others are hashed on the first load as usual."""
    cache_path = _verified_cache_path()
    if not cache_path:
        return []
    cache, recorded = _read_cache(cache_path), []
    for rel, digest in files.items():
        file = Path(root) / rel
        stamp = stamps.get(rel)
        if stamp is None or not file.is_file() or _stamp(file) != stamp or time.time_ns() - stamp[1] <= _SETTLED_NS:
            continue
        cache[str(file.resolve())] = [digest, *stamp]
        recorded.append(rel)
    if recorded:
        _write_cache(cache_path, cache)
    return recorded


def verify_files(root: Path, files: dict[str, str]) -> list[str]:
    """Check every file's sha256 against the manifest; returns the problems found.

    Hashing a GB-sized engine takes seconds, so a file is hashed again only when its stat
    (size, mtime, inode, device) differs from the one recorded after it last matched its digest,
    the way git's index trusts unchanged files (``SEMVOC_CACHE_DIR=`` empty turns the memory off).
    As in git, a file modified in the last seconds is not remembered: a same-size rewrite within
    the file system's timestamp granularity would otherwise keep an old stamp.
    The files left are hashed in parallel threads (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    cache_path = _verified_cache_path()
    cache = _read_cache(cache_path)
    problems, todo = [], []
    for rel, digest in files.items():
        file = root / rel
        if not file.is_file():
            problems.append(f"missing: {rel}")
        elif cache.get(str(file.resolve())) != [digest, *_stamp(file)]:
            todo.append((rel, digest, file))
    with ThreadPoolExecutor(max_workers=min(8, len(todo) or 1)) as pool:
        hashes = list(pool.map(lambda item: sha256_file(item[2]), todo))
    changed = False
    for (rel, digest, file), actual in zip(todo, hashes, strict=True):
        stamp = _stamp(file)
        if actual != digest:
            problems.append(f"modified or corrupt (sha256 mismatch): {rel}")
        elif time.time_ns() - stamp[1] > _SETTLED_NS:
            cache[str(file.resolve())] = [digest, *stamp]
            changed = True
    if changed:
        _write_cache(cache_path, cache)
    return problems


#: entries the runtime reads, and what each must be (the manifest is not in its own sha256 list)
_NUMBERS = {"buckets": ("text_tokens", "max_dit_steps", "max_vocoder_steps", "dit_rows", "vocoder_rows"),
            "defaults": ("steps", "vocoder_steps", "guidance", "sway", "noise_scale", "sample_rate"),
            "shapes": ("latent_channels", "samples_per_frame", "frames_per_second", "semantic_sample_rate")}


def _check_entries(path: Path, data: dict) -> None:
    def bad(entry: str) -> EngineError:
        return EngineError(f"{path} is malformed ({entry}); re-export the engine; do not edit engine files by hand")

    for section, keys in _NUMBERS.items():
        if not isinstance(data[section], dict):
            raise bad(f"{section!r} is not a mapping")
        for key in keys:  # a missing one is reported where it is needed
            if key not in data[section]:
                continue
            value = data[section][key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{section}.{key} = {value!r}")
    for key in ("batch_sizes", "durations_s"):
        values = data["buckets"].get(key)
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise bad(f"buckets.{key} = {values!r}")


def load_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory; ``verify`` also checks every file's sha256."""
    root = Path(root)
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise EngineError(f"{root} is a file, not an engine directory: pass the directory that "
                          "semvoc-export wrote (the one holding manifest.json)")
    if not root.is_dir():
        raise EngineError(f"engine directory not found: {root}. Create one with "
                          "`semvoc-export --preset demo --out DIR` (or --checkpoint PATH).")
    if not path.is_file():
        raise EngineError(f"{root} has no {MANIFEST}: not an engine directory (or an interrupted "
                          "export). Re-run semvoc-export.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"{path} is not valid JSON ({err}); re-export the engine") from err
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not an engine manifest (a JSON object); re-export the engine")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EngineError(
            f"{path} has schema version {version!r}; this semvoc reads version {SCHEMA_VERSION}. "
            f"Re-export the engine with this semvoc (`semvoc-export ...`), or run the semvoc "
            f"version that wrote it ({data.get('producer', {}).get('semvoc', 'unknown')}).")
    for key in ("graphs", "files", "defaults", "buckets", "shapes", "model"):
        if key not in data:
            raise EngineError(f"{path} lacks {key!r}; re-export the engine")
    if not isinstance(data["files"], dict):
        raise EngineError(f"{path} is malformed ('files' is not a mapping); re-export the engine")
    _check_entries(path, data)
    if verify:
        problems = verify_files(root, data["files"])
        if problems:
            raise EngineError(f"engine {root} failed verification:\n  " + "\n  ".join(problems)
                              + "\nRe-export the engine; do not edit engine files by hand.")
    try:
        return Manifest(root, data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise EngineError(f"{path} is malformed ({type(err).__name__}: {err}); re-export the engine; do not "
                          "edit engine files by hand") from err
