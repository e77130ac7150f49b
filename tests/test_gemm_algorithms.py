"""Where LtGemm's algorithm choices are recorded (semvoc.runtime.gemm_algorithms). What the op
itself times, records and reads back is checked on a GPU by tests/test_cuda_kernels.py."""

from __future__ import annotations

import os

import pytest

from semvoc.runtime import gemm_algorithms
from semvoc.runtime.gemm_algorithms import ALGORITHMS_ENV, FILE_NAME, algorithms_file, use_algorithms_file
from semvoc.runtime.manifest import Manifest


def test_a_writable_engine_keeps_its_own_record(tmp_path, monkeypatch):
    monkeypatch.delenv(ALGORITHMS_ENV, raising=False)
    assert algorithms_file(tmp_path) == tmp_path / FILE_NAME
    assert use_algorithms_file(tmp_path) == tmp_path / FILE_NAME
    assert os.environ[ALGORITHMS_ENV] == str(tmp_path / FILE_NAME)


def test_a_read_only_engine_records_in_the_users_cache(tmp_path, monkeypatch):
    engine, cache = tmp_path / "engine", tmp_path / "cache"
    engine.mkdir()
    writable = os.access
    monkeypatch.setattr(gemm_algorithms.os, "access", lambda p, mode: False if p == engine else writable(p, mode))
    monkeypatch.delenv("SEMVOC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert algorithms_file(engine) == cache / "semvoc" / FILE_NAME
    assert (cache / "semvoc").is_dir() and not (engine / FILE_NAME).exists()
    monkeypatch.setenv("SEMVOC_CACHE_DIR", str(tmp_path / "own"))  # semvoc's cache folder, as for verified files
    assert algorithms_file(engine) == tmp_path / "own" / FILE_NAME
    monkeypatch.setenv("SEMVOC_CACHE_DIR", "")  # caching off: choices stay in the process
    monkeypatch.delenv(ALGORITHMS_ENV, raising=False)
    assert algorithms_file(engine) is None and use_algorithms_file(engine) is None
    assert ALGORITHMS_ENV not in os.environ


def test_the_users_choice_of_file_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(ALGORITHMS_ENV, str(tmp_path / "mine.txt"))
    assert use_algorithms_file(tmp_path / "engine") == tmp_path / "mine.txt"
    assert os.environ[ALGORITHMS_ENV] == str(tmp_path / "mine.txt")


@pytest.mark.parametrize("custom_ops", [True, False])
def test_the_cuda_backend_points_the_op_at_its_engine(tmp_path, monkeypatch, custom_ops):
    from semvoc.runtime.backends.ort_cuda import OrtCudaBackend

    monkeypatch.delenv(ALGORITHMS_ENV, raising=False)
    monkeypatch.setenv("SEMVOC_CUDA_GRAPHS", "onnxruntime")  # no stream of its own: no GPU needed
    data = {"graphs": {}, **({"custom_ops": {"library": "kernels/libsemvoc_cuda.so"}} if custom_ops else {})}
    backend = OrtCudaBackend(Manifest(tmp_path, data))
    if custom_ops:
        assert backend.gemm_algorithms == tmp_path / FILE_NAME
        assert os.environ[ALGORITHMS_ENV] == str(tmp_path / FILE_NAME)
        assert f"GEMM algorithm choices in {tmp_path / FILE_NAME}" in backend.describe()
    else:  # no semvoc ops: nothing to record, the environment is left alone
        assert backend.gemm_algorithms is None and ALGORITHMS_ENV not in os.environ
        assert "GEMM algorithm" not in backend.describe()
