"""Where semvoc's ``LtGemm`` op keeps its cuBLASLt algorithm choices for an engine.

The op times cuBLASLt's candidate algorithms the first time it meets a GEMM plan and keeps the
fastest (``kernels/cuda/ltgemm_choices.h``). The choice is recorded in the file that
``SEMVOC_LTGEMM_ALGORITHMS`` names, so that every later process runs the same algorithms (the
same seed gives the same bits) without timing them again. The runtime points it at the engine's
``gemm_algorithms.txt``, or at one file in the user's cache (``SEMVOC_CACHE_DIR``) where the
engine directory is read-only; with neither, choices are timed once per process. Entries are keyed
by GPU, cuBLASLt version and GEMM plan: a file moved to another card only gains entries.
``SEMVOC_LTGEMM_TUNE=0`` turns the timing off (cuBLASLt's first guess).
"""

from __future__ import annotations

import os
from pathlib import Path

from semvoc.runtime.manifest import user_cache_dir

ALGORITHMS_ENV = "SEMVOC_LTGEMM_ALGORITHMS"
FILE_NAME = "gemm_algorithms.txt"


def algorithms_file(engine_root: Path) -> Path | None:
    """The engine's record where its directory is writable, else one in the user's cache
    (:func:`~semvoc.runtime.manifest.user_cache_dir`, created if missing); None where that is off."""
    engine_root = Path(engine_root)
    if os.access(engine_root, os.W_OK):
        return engine_root / FILE_NAME
    cache = user_cache_dir()
    if cache is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    return cache / FILE_NAME


def use_algorithms_file(engine_root: Path) -> Path | None:
    """Point ``SEMVOC_LTGEMM_ALGORITHMS`` at :func:`algorithms_file` unless the user set it; returns
    the file in use (None: choices kept in memory). Call before the engine's first session: the op
    reads the variable on its first call of each plan."""
    chosen = os.environ.get(ALGORITHMS_ENV)
    if chosen:
        return Path(chosen)
    path = algorithms_file(engine_root)
    if path is not None:
        os.environ[ALGORITHMS_ENV] = str(path)
    return path
