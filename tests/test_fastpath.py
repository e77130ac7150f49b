"""The default fast path: --cuda-kernels auto's choice and its one log line, the GPU-architecture
check of an engine's CUDA ops, and onnxruntime's log kept quiet unless --verbose."""

from __future__ import annotations

from pathlib import Path

import pytest

from semvoc.export.engine import ExportError, ExportOptions, _cuda_kernels
from semvoc.kernels import cuda_build
from semvoc.models.config import preset
from semvoc.runtime import gpu


def _choice(capsys, tmp_path, provider="cuda", **options):
    result = _cuda_kernels(tmp_path, ExportOptions(out=tmp_path / "e", **options), provider, preset("demo"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "semvoc's CUDA ops" in line]
    assert len(lines) == 1, lines  # one line says what was chosen and why
    return result, lines[0]


def test_auto_says_why_the_cuda_ops_are_off(capsys, tmp_path, monkeypatch):
    result, line = _choice(capsys, tmp_path, provider="cpu", cuda_kernels_auto=True)
    assert result is None and "off" in line and "--device cuda" in line
    result, line = _choice(capsys, tmp_path, cuda_kernels_auto=True, trt=True)
    assert result is None and "off (--trt" in line
    result, line = _choice(capsys, tmp_path, cuda_kernels_auto=True, dtype="bfloat16")
    assert result is None and "--bf16" in line

    def no_nvcc():
        raise cuda_build.KernelBuildError("nvcc (the CUDA compiler) was not found: pip install 'semvoc[cuda-kernels]'")

    monkeypatch.setattr(cuda_build, "find_nvcc", no_nvcc)
    result, line = _choice(capsys, tmp_path, cuda_kernels_auto=True)
    assert result is None and "off (nvcc" in line and "semvoc[cuda-kernels]" in line
    result, line = _choice(capsys, tmp_path)
    assert result is None and "off (not asked for: --no-cuda-kernels)" in line
    with pytest.raises(ExportError, match=r"--cuda-kernels: nvcc .*cuda-kernels\]"):  # asked for: an error
        _cuda_kernels(tmp_path, ExportOptions(out=tmp_path / "e", cuda_kernels=True), "cuda", preset("demo"))


def test_auto_falls_back_when_the_build_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: "/bin/false")

    def fails(*args, **kwargs):
        (tmp_path / "kernels").mkdir()
        raise cuda_build.KernelBuildError("nvcc failed (exit 1):\nsome error")

    monkeypatch.setattr(cuda_build, "build", fails)
    result, line = _choice(capsys, tmp_path, cuda_kernels_auto=True)
    assert result is None and line.endswith("off (nvcc failed (exit 1): some error)")
    assert not (tmp_path / "kernels").exists()


def test_export_cli_defaults_to_auto():
    from semvoc.export.cli import build_parser

    base = ["--preset", "demo", "--out", "x"]
    assert build_parser().parse_args(base).cuda_kernels == "auto"
    assert build_parser().parse_args([*base, "--no-cuda-kernels"]).cuda_kernels == "off"
    assert build_parser().parse_args([*base, "--cuda-kernels"]).cuda_kernels == "all"
    assert build_parser().parse_args([*base, "--cuda-kernels", "vocoder"]).cuda_kernels == "vocoder"
    assert build_parser().parse_args(base).cuda_arch == cuda_build.DEFAULT_ARCH == "80,86,89,90,100,120"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--cuda-kernels", "--no-cuda-kernels"])


def test_machine_code_and_ptx_rules():
    archs = list(cuda_build.DEFAULT_ARCHS)
    assert gpu.runs_on((8, 0), archs, 120) and gpu.runs_on((8, 7), archs, 120)  # sm_86 code on 8.7
    assert gpu.runs_on((12, 1), archs, 120) and gpu.runs_on((13, 0), archs, 120)  # PTX 12.0 JIT on newer
    assert gpu.runs_on((10, 3), archs, 120)
    assert not gpu.runs_on((7, 5), archs, 120)  # Turing: older than every build
    assert not gpu.runs_on((13, 0), archs, None) and not gpu.runs_on((9, 0), [80, 86], None)


def test_runtime_refuses_an_engine_built_for_other_gpus(monkeypatch):
    data = {"model": {"preset": "small", "seed": 3}, "precision": {"dtype": "float16"},
            "custom_ops": {"library": "kernels/libsemvoc_cuda.so", "archs": [80, 86, 89, 90, 100, 120], "ptx": 120}}
    monkeypatch.setattr(gpu, "compute_capability", lambda device_id=0: (7, 5))
    problem = gpu.kernel_arch_problem(data)
    assert "compute capability 7.5" in problem and "sm_80" in problem and "PTX for compute_120" in problem
    assert "semvoc-export --preset small --seed 3 --fp16 --device cuda --cuda-arch 75" in problem
    monkeypatch.setattr(gpu, "compute_capability", lambda device_id=0: (9, 0))
    assert gpu.kernel_arch_problem(data) is None
    assert gpu.kernel_arch_problem({"custom_ops": None}) is None
    assert gpu.kernel_arch_problem({"custom_ops": {"library": "x", "arch": "native"}}) is None  # older engines


def _graph_with_an_unused_initializer(path: Path) -> None:
    """onnxruntime warns while loading it ("Removing initializer ... It is not used by any node")."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              initializer=[numpy_helper.from_array(np.ones(2, np.float32), "unused_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def test_onnxruntime_log_is_quiet_unless_verbose(tmp_path, capfd):
    from semvoc.runtime.backends import ort_common

    path = tmp_path / "g.onnx"
    _graph_with_an_unused_initializer(path)
    try:
        ort_common.set_ort_verbose(True)
        session = ort_common.make_session(path)
        assert session.get_session_options().log_severity_level == ort_common.VERBOSE
        loud = capfd.readouterr().err
        ort_common.set_ort_verbose(False)
        session = ort_common.make_session(path)
        assert session.get_session_options().log_severity_level == ort_common.QUIET
        quiet = capfd.readouterr().err
    finally:
        ort_common.set_ort_verbose(False)
    assert "unused_w" in loud and "unused_w" not in quiet
