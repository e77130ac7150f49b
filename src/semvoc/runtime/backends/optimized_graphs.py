"""Graphs as onnxruntime optimized them, kept between processes (the cold start's critical path).

Creating a session spends most of its time in onnxruntime's graph optimizer: on an H200 the
reference text encoder took 1.19 s from the engine's graph and 0.50 s from a copy onnxruntime had
already optimized for the same provider, loaded with optimizations off
(``benchmarks/device/session_load.py``). The first session of a graph therefore asks onnxruntime
to save its optimized graph (``optimized_model_filepath``, weights in a ``.data`` file beside it)
and every later process loads that copy.

The copies live in the semvoc cache (``SEMVOC_CACHE_DIR``, else ``$XDG_CACHE_HOME/semvoc`` or
``~/.cache/semvoc``; ``SEMVOC_CACHE_DIR=`` empty turns it off), one folder per key. CUDA sessions
use it by default; ``SEMVOC_OPTIMIZED_GRAPHS=1`` adds CPU sessions, ``=0`` turns it off. The key
is the graph's and its weights' sha256 from the engine's manifest (so a moved or copied engine finds its entries and a
re-exported one never finds stale ones), the custom-op library's sha256, the onnxruntime
version, the provider and its options, the fixed input dimensions and the device. An entry is
written to a temporary folder and renamed into place, so a reader sees all of it or nothing. An
entry onnxruntime cannot load back is marked refused and never tried again; the session is then
created from the engine's graph, as without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MODEL, DATA, META, REFUSED = "graph.onnx", "graph.onnx.data", "meta.json", "refused.json"


def enabled(provider: str) -> bool:
    """``SEMVOC_OPTIMIZED_GRAPHS``: "auto" (the default: CUDA sessions only, where session creation
    is the cold start's critical path), "1" (CPU sessions too) or "0" (off)."""
    mode = os.environ.get("SEMVOC_OPTIMIZED_GRAPHS", "auto")
    return mode == "1" or (mode == "auto" and provider == "cuda")


def cache_root() -> Path | None:
    """The folder for optimized graphs, or None when caching is off."""
    if os.environ.get("SEMVOC_OPTIMIZED_GRAPHS") == "0":
        return None
    folder = os.environ.get("SEMVOC_CACHE_DIR")
    if folder == "":
        return None
    base = Path(folder) if folder else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semvoc"
    return base / "optimized-graphs"


def cuda_device_signature(device_id: int) -> str:
    """The GPU's name and compute capability (cuda-python), or "" where it cannot be read: the
    optimized graph may hold provider kernels chosen for this device."""
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(device_id)
        if int(err) != 0:
            return ""
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return f"{name} sm_{props.major}{props.minor}"
    except Exception:  # no cuda-python, or no device: the key then holds the provider only
        return ""


def cpu_signature() -> str:
    """The CPU's architecture and feature flags: onnxruntime's CPU layouts (NCHWc) depend on them."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = hashlib.sha256(line.encode()).hexdigest()[:16]
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


@dataclass
class OptimizedGraph:
    """One cache entry: where the optimized copy of a graph is, or will be written."""

    folder: Path
    key: dict
    loaded_from_cache: bool = False
    saved: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> Path:
        return self.folder / MODEL

    def ready(self) -> bool:
        """A complete entry that onnxruntime has not refused."""
        if (self.folder / REFUSED).exists():
            return False
        try:
            meta = json.loads((self.folder / META).read_text())
        except (OSError, ValueError):
            return False
        sizes = meta.get("sizes", {})
        return bool(sizes) and all((self.folder / name).is_file() and (self.folder / name).stat().st_size == size
                                   for name, size in sizes.items())

    def refused(self) -> bool:
        return (self.folder / REFUSED).exists()

    def staging(self) -> Path | None:
        """A new temporary folder beside the entry for onnxruntime to save into, or None when the
        cache cannot be written (a read-only cache is the same as no cache)."""
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))
        except OSError as err:
            self.notes.append(f"optimized graph not saved ({err.strerror or err})")
            return None

    def commit(self, staging: Path) -> None:
        """Move what onnxruntime saved in ``staging`` into place (atomically, by rename)."""
        try:
            sizes = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
            if MODEL not in sizes:
                raise OSError(f"onnxruntime wrote no {MODEL}")
            (staging / META).write_text(json.dumps({"key": self.key, "sizes": sizes}, indent=1))
            if self.folder.exists() and not self.ready() and not self.refused():
                shutil.rmtree(self.folder, ignore_errors=True)  # an entry damaged since: replace it
            try:
                staging.rename(self.folder)
                self.saved = True
            except OSError:  # another process committed the same entry first: keep theirs
                pass
        except OSError as err:
            self.notes.append(f"optimized graph not saved ({err})")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def refuse(self, reason: str) -> None:
        """onnxruntime could not load this entry back: remember it, so no process tries again."""
        self.notes.append(f"optimized copy refused ({reason}); the engine's graph is used")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{REFUSED}.tmp"
            tmp.write_text(json.dumps({"key": self.key, "reason": reason}, indent=1))
            tmp.replace(self.folder / REFUSED)
            for name in (MODEL, DATA, META):
                (self.folder / name).unlink(missing_ok=True)
        except OSError:
            pass


def optimized_graph(root: Path, files: dict[str, str], graph_file: str, data_file: str | None,
                    custom_ops: Path | None, provider: str, provider_options: dict[str, str],
                    dim_overrides: dict[str, int] | None, device: str, extra: dict | None = None
                    ) -> OptimizedGraph | None:
    """The cache entry for a graph of an engine (``files``: the manifest's sha256 list), or None
    when caching is off or the manifest lacks the graph's hashes."""
    base = cache_root()
    if base is None or graph_file not in files:
        return None
    import onnxruntime as ort

    ops = None
    if custom_ops is not None:
        rel = os.path.relpath(custom_ops, root)
        ops = files.get(rel)
        if ops is None:  # a library the manifest does not vouch for: nothing to key on
            return None
    key = {"graph": files[graph_file], "data": files.get(data_file) if data_file else None, "custom_ops": ops,
           "onnxruntime": ort.__version__, "provider": provider, "options": dict(sorted(provider_options.items())),
           "dims": dict(sorted((dim_overrides or {}).items())), "device": device, **(extra or {})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return OptimizedGraph(folder=base / f"{Path(graph_file).stem}-{digest}", key=key)
