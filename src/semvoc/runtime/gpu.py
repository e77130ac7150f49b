"""The GPU's compute capability without torch (the CUDA driver API through ctypes), and whether
an engine's CUDA op library carries code that runs on it."""

from __future__ import annotations

import ctypes

# cuDeviceGetAttribute: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
_CC_MAJOR, _CC_MINOR = 75, 76


def compute_capability(device_id: int = 0) -> tuple[int, int] | None:
    """(major, minor) of CUDA device ``device_id``, or None when no driver or device answers."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), device_id) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) != 0):
        return None
    return major.value, minor.value


def runs_on(capability: tuple[int, int], archs: list[int], ptx: int | None) -> bool:
    """Machine code for sm_XY runs on X.Z for Z >= Y (same major); PTX for compute_XY is compiled
    by the driver for any capability >= X.Y."""
    cc = capability[0] * 10 + capability[1]
    if any(a // 10 == capability[0] and a <= cc for a in archs):
        return True
    return ptx is not None and ptx <= cc


def reexport_command(manifest_data: dict, capability: tuple[int, int]) -> str:
    """The semvoc-export command that rebuilds this engine's CUDA ops for ``capability``."""
    model = manifest_data.get("model", {})
    if "preset" in model:
        source = f"--preset {model['preset']} --seed {model.get('seed', 0)}"
    else:
        source = f"--checkpoint {model.get('source', 'CHECKPOINT')}"
    precision = {"float16": " --fp16", "bfloat16": " --bf16"}.get(manifest_data.get("precision", {}).get("dtype"), "")
    return (f"semvoc-export {source}{precision} --device cuda --cuda-arch {capability[0]}{capability[1]} "
            "--out NEW_ENGINE_DIR")


def kernel_arch_problem(manifest_data: dict, device_id: int = 0) -> str | None:
    """Why the engine's CUDA op library cannot run on device ``device_id`` (None when it can, when
    the engine has none, or when the capability cannot be read: onnxruntime then reports)."""
    entry = manifest_data.get("custom_ops")
    if not entry or entry.get("archs") is None:  # no library, or built for the export machine's GPU
        return None
    capability = compute_capability(device_id)
    if capability is None or runs_on(capability, entry["archs"], entry.get("ptx")):
        return None
    built = ", ".join(f"sm_{a}" for a in entry["archs"])
    ptx = f" and PTX for compute_{entry['ptx']}" if entry.get("ptx") else ""
    return (f"this engine's CUDA ops ({entry['library']}) carry code for {built}{ptx}, which does not run on this "
            f"GPU (compute capability {capability[0]}.{capability[1]}): re-export the engine for it, e.g. "
            f"`{reexport_command(manifest_data, capability)}`")
