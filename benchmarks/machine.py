"""What ran the benchmark (GPU, driver, CPU, package versions) and GPU memory through NVML.

Nothing here imports torch: the parent process of an isolated run (``benchmarks.run``) and the
semvoc workers stay torch-free. NVML comes from ``pynvml`` (the ``nvidia-ml-py`` package) when
importable, else ``nvidia-smi`` is asked for names and versions; memory readings then are null,
with the reason recorded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from typing import Any


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: str) -> str | None:
    """``module.__version__`` for a package importable but not installed (a source checkout)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def nvml_index(device_id: int) -> int:
    """The NVML index of CUDA device ``device_id`` (follows a numeric CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [v.strip() for v in visible.split(",")]
        if device_id < len(entries) and entries[device_id].isdigit():
            return int(entries[device_id])
    return device_id


def _nvml():
    """The initialised ``pynvml`` module, or a string saying why it is unavailable."""
    if importlib.util.find_spec("pynvml") is None:
        return "pynvml not importable (pip install nvidia-ml-py)"
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as err:  # no driver, no device
        return f"NVML failed to initialise: {err}"


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_info(device_id: int = 0) -> dict:
    """``{name, driver, memory_total_mib, cuda_driver, source}``; empty values when no GPU answers."""
    nvml = _nvml()
    if not isinstance(nvml, str):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index(device_id))
            info = {"name": _as_str(nvml.nvmlDeviceGetName(handle)),
                    "driver": _as_str(nvml.nvmlSystemGetDriverVersion()),
                    "memory_total_mib": nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20,
                    "source": "nvml"}
            try:
                version = nvml.nvmlSystemGetCudaDriverVersion()
                info["cuda_driver"] = f"{version // 1000}.{version % 1000 // 10}"
            except Exception:
                pass
            return info
        except Exception as err:
            nvml = f"NVML query failed: {err}"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits",
                 f"--id={nvml_index(device_id)}"], capture_output=True, text=True, timeout=30, check=True).stdout
            name, driver, total = (v.strip() for v in out.strip().splitlines()[0].split(","))
            return {"name": name, "driver": driver, "memory_total_mib": float(total), "source": "nvidia-smi",
                    "nvml": nvml}
        except Exception as err:
            return {"name": None, "driver": None, "source": f"nvidia-smi failed: {err}", "nvml": nvml}
    return {"name": None, "driver": None, "source": "no NVML and no nvidia-smi", "nvml": nvml}


def machine_info(device: str, device_id: int = 0) -> dict:
    """The machine section of a results file (no torch import)."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "semvoc": package_version("semvoc") or _module_version("semvoc"),
            "torch": package_version("torch"),
            "onnxruntime": package_version("onnxruntime-gpu", "onnxruntime"),
            "onnxruntime_dist": ("onnxruntime-gpu" if package_version("onnxruntime-gpu") else
                                 "onnxruntime" if package_version("onnxruntime") else None),
            "onnx": package_version("onnx"),
            "numpy": package_version("numpy"),
            "tensorrt": package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
            "nvidia-ml-py": package_version("nvidia-ml-py", "pynvml"),
            "matplotlib": package_version("matplotlib"),
        },
    }
    info["gpu"] = gpu_info(device_id) if device == "cuda" else None
    return info


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def card_slug(machine: dict, device: str) -> str:
    """``nvidia-h100-80gb-hbm3`` for a GPU run, ``cpu-<model>`` for a CPU run."""
    if device == "cuda" and machine.get("gpu") and machine["gpu"].get("name"):
        return slugify(machine["gpu"]["name"])
    return "cpu-" + slugify(machine.get("cpu", "unknown"))[:48].strip("-")


class NvmlMemorySampler:
    """Device-wide used memory through NVML: a baseline, then the peak polled by a thread.

    NVML reports the whole device's used memory (every process, every CUDA context), so the
    delta is meaningful only while nothing else allocates on the card.
    """

    def __init__(self, device_id: int = 0, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.reason: str | None = None
        self._handle = None
        self._nvml = None
        nvml = _nvml()
        if isinstance(nvml, str):
            self.reason = nvml
            return
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index(device_id))
            self._nvml = nvml
        except Exception as err:
            self.reason = f"NVML device query failed: {err}"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def used(self) -> int | None:
        if not self.available:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)  # type: ignore[union-attr]

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = self.used() or 0
            self._peak = max(self._peak, used)
            time.sleep(self.interval_s)

    def start(self) -> None:
        if not self.available:
            return
        self._peak = self.used() or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> int | None:
        """Peak used bytes since ``start`` (None without NVML)."""
        if not self.available or self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._peak = max(self._peak, self.used() or 0)
        return self._peak
