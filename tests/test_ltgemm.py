"""semvoc.cuda::LtGemm (a GEMM with its bias and residual in cuBLASLt's epilogue): the reference
against the unfused math, the export forms that use it, and the switch that leaves it out. The
kernel itself runs in tests/test_cuda_kernels.py (GPU)."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F

from semvoc.kernels.ltgemm import NAME, lt_gemm_reference
from semvoc.kernels.ltgemm import linear as lt_linear
from semvoc.kernels.onnx_ops import CUDA_DOMAIN, WITHOUT_ENV, translation_table
from tests.test_cuda_kernels import _block_graph


@pytest.mark.parametrize("shape", [(3, 37, 19, 11), (1, 1, 5, 1), (2, 250, 64, 24)])
def test_reference_is_the_unfused_math(shape):
    batch, length, k, n = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(batch, length, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)  # nn.Linear's layout
    bias, scale = torch.randn(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    residual = torch.randn(batch, length, n, generator=gen, dtype=torch.float64)
    a32, w32 = a.float(), w.float()
    linear = F.linear(a, w)  # float64: the exact answer to fp32's rounding
    cases = {
        "plain": (lt_gemm_reference(a32, w32.t()), linear),
        "bias": (lt_gemm_reference(a32, w32.t(), bias.float()), linear + bias),
        "residual": (lt_gemm_reference(a32, w32.t(), None, residual.float()), linear + residual),
        "bias+residual*scale": (lt_gemm_reference(a32, w32.t(), bias.float(), residual.float(), scale.float()),
                                linear + bias + residual * scale),
        "relu(bias)": (lt_gemm_reference(a32, w32.t(), bias.float(), relu=True), F.relu(linear + bias)),
        "relu(residual)": (lt_gemm_reference(a32, w32.t(), None, residual.float(), relu=True),
                           F.relu(linear + residual)),
    }
    for name, (got, want) in cases.items():
        assert got.dtype == torch.float32 and got.shape == (batch, length, n), name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


def test_fp16_reference_rounds_once():
    gen = torch.Generator().manual_seed(2)
    a, w = torch.randn(4, 33, generator=gen).half(), torch.randn(33, 9, generator=gen).half()
    bias, residual = torch.randn(9, generator=gen).half(), torch.randn(4, 9, generator=gen).half()
    got = lt_gemm_reference(a, w, bias, residual, torch.full((9,), 0.5))
    want = (a.double() @ w.double() + bias.double() + residual.double() * 0.5).half()
    assert got.dtype == torch.float16
    assert (got.double() - want.double()).abs().max() <= 2 * torch.finfo(torch.float16).eps * want.abs().max()


@pytest.mark.parametrize("switch", ["", NAME])
def test_linear_is_f_linear_plus_the_residual_either_way(switch, monkeypatch):
    monkeypatch.setenv(WITHOUT_ENV, switch)
    gen = torch.Generator().manual_seed(3)
    h, w, b = torch.randn(2, 7, 12, generator=gen), torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    x, s = torch.randn(2, 7, 5, generator=gen), torch.rand(5, generator=gen)
    torch.testing.assert_close(lt_linear(h, w, b), F.linear(h, w, b))
    torch.testing.assert_close(lt_linear(h, w, b, x, s), F.linear(h, w, b) + x * s)
    torch.testing.assert_close(lt_linear(h, w, None, x), F.linear(h, w) + x)
    torch.testing.assert_close(lt_linear(h, w, b, relu=True), F.relu(F.linear(h, w, b)))
    torch.testing.assert_close(lt_linear(h, w, None, x, relu=True), F.relu(F.linear(h, w) + x))


def test_vocoder_block_exports_an_unscaled_down_projection_as_one_lt_gemm(tmp_path, monkeypatch):
    """Without a residual scale the down-projection, its bias and the residual are one LtGemm (the
    residual as cuBLASLt's C, beta = 1)."""
    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    graph, block = _block_graph(tmp_path, None)
    assert sorted(n.op_type for n in graph.node) == ["BiasPRelu", "ConvNeXtMix", "LtGemm", "MatMul"]
    node = next(n for n in graph.node if n.op_type == "LtGemm")
    assert node.domain == CUDA_DOMAIN
    init = {i.name: i for i in graph.initializer}
    channels, hidden = block.pwconv2.weight.shape[:2]
    assert list(init[node.input[1]].dims) == [hidden, channels]  # w [K, N]: the MatMul layout
    assert node.input[3] == "x" and len([i for i in node.input if i]) == 4  # the block's input, unscaled


def test_vocoder_block_with_a_residual_scale_keeps_bias_residual(tmp_path, monkeypatch):
    """A per-channel residual scale needs cuBLASLt's beta vector, which it refuses in fp16 on an
    H200 (LtGemm then adds the residual in a second kernel): the block keeps BiasResidual."""
    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    graph, _ = _block_graph(tmp_path, 1.0)
    assert sorted(n.op_type for n in graph.node) == ["BiasPRelu", "BiasResidual", "ConvNeXtMix", "MatMul", "MatMul"]


def test_vocoder_block_without_lt_gemm_keeps_bias_residual(tmp_path, monkeypatch):
    monkeypatch.setenv(WITHOUT_ENV, NAME)
    graph, _ = _block_graph(tmp_path)
    assert sorted(n.op_type for n in graph.node) == ["BiasPRelu", "BiasResidual", "ConvNeXtMix", "MatMul", "MatMul"]


def _dit_step_ops(tmp_path) -> tuple[list, object]:
    from semvoc.export import wrappers as W
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    dit = build_model(preset("demo"), seed=0).dit.eval()
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 6, dit.cfg.context_dim, generator=gen)
    args = (torch.randn(1, dit.cfg.in_chans, 10, generator=gen), torch.tensor([1]),
            W.FusedDitTime(dit)(torch.tensor([900.0, 400.0])), torch.tensor([1.0, 0.5, 0.0]),
            *W.FusedDitPrepare(dit)(context), torch.ones(1, 6, dtype=torch.bool), torch.tensor([3.5]))
    path = tmp_path / "dit_step.onnx"
    torch.onnx.export(W.FusedDitStep(dit, cuda_ops=True).eval(), args, dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    return list(onnx.load(str(path)).graph.node), dit


def _matmul_then_add(nodes) -> int:
    producer = {o: n.op_type for n in nodes for o in n.output}
    return sum(1 for n in nodes if n.op_type == "Add" and any(producer.get(i) == "MatMul" for i in n.input))


def test_every_dit_step_gemm_is_lt_gemm_and_the_switch_restores_them(tmp_path, monkeypatch):
    """Every GEMM of the fused DiT is an LtGemm node (its bias, where it has one, in the epilogue;
    its cuBLASLt algorithm timed once and recorded): no MatMul is left and no bias Add follows one.
    SEMVOC_EXPORT_WITHOUT=LtGemm gives them back as MatMul nodes, + Add where a bias followed: the
    patch embedding, the final linear and the final convolution (conv_as_gemm), and the U-Net skip
    projections when BiasAddNorm (which takes their bias into the next norm) is off."""
    monkeypatch.setenv(WITHOUT_ENV, NAME)
    plain, dit = _dit_step_ops(tmp_path)
    gemms = [n.op_type for n in plain].count("MatMul")
    assert "LtGemm" not in [n.op_type for n in plain] and _matmul_then_add(plain) == 3
    assert gemms > 6 * len(dit.blocks)  # the blocks' projections, plus the patch embedding and the final layer
    skips = sum(1 for b in dit.blocks if b.has_skip)
    monkeypatch.delenv(WITHOUT_ENV)
    ops = [n.op_type for n in _dit_step_ops(tmp_path)[0]]
    assert ops.count("LtGemm") == gemms and "MatMul" not in ops
    monkeypatch.setenv(WITHOUT_ENV, "BiasAddNorm")
    nodes, _ = _dit_step_ops(tmp_path)
    assert [n.op_type for n in nodes].count("LtGemm") == gemms and _matmul_then_add(nodes) == 0
    monkeypatch.setenv(WITHOUT_ENV, f"{NAME},BiasAddNorm")
    nodes, _ = _dit_step_ops(tmp_path)
    assert "LtGemm" not in [n.op_type for n in nodes] and _matmul_then_add(nodes) == skips + 3
