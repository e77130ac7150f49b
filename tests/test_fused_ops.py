"""Each fused op: its PyTorch reference against onnxruntime running the ONE node it exports to."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from semvoc.kernels.attention import attention_packed, expand_key_mask
from semvoc.kernels.bias_gelu import bias_gelu
from semvoc.kernels.norms import BiasNorm
from semvoc.kernels.onnx_ops import translation_table
from semvoc.kernels.rotary import rope_tables, rotary, rotary_reference
from semvoc.kernels.skip_layernorm import skip_layer_norm


def _export_and_run(module: torch.nn.Module, args: tuple, path) -> tuple[list[str], list[np.ndarray]]:
    program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=23,
                                custom_translation_table=translation_table(), verbose=False)
    program.save(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return ops, session.run(None, feeds)


def test_skip_layer_norm(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, skip = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    weight, beta, bias = (torch.randn(16, generator=gen) for _ in range(3))

    class Block(torch.nn.Module):
        def forward(self, x, skip):
            return skip_layer_norm(x, skip, weight, beta, bias, 1e-5)

    out, total = Block()(x, skip)
    torch.testing.assert_close(total, x + skip + bias)
    torch.testing.assert_close(out, F.layer_norm(x + skip + bias, (16,), weight, beta, 1e-5))
    ops, (ort_out, ort_total) = _export_and_run(Block(), (x, skip), tmp_path / "skip.onnx")
    assert ops == ["SkipLayerNormalization"]
    np.testing.assert_allclose(ort_out, out.numpy(), atol=1e-5)
    np.testing.assert_allclose(ort_total, total.numpy(), atol=1e-6)


def test_bias_gelu(tmp_path):
    x, bias = torch.randn(3, 4, 8), torch.randn(8)

    class Block(torch.nn.Module):
        def forward(self, x):
            return bias_gelu(x, bias)

    torch.testing.assert_close(Block()(x), F.gelu(x + bias))
    ops, (ours,) = _export_and_run(Block(), (x,), tmp_path / "gelu.onnx")
    assert ops == ["BiasGelu"]
    np.testing.assert_allclose(ours, F.gelu(x + bias).numpy(), atol=1e-5)


def test_rotary_matches_the_official_half_split_rope(tmp_path):
    from semvoc.models.udit import Rotary

    heads, head_dim, length = 3, 8, 7
    official = Rotary(head_dim)
    x = torch.randn(2, length, heads * head_dim)
    cos, sin = rope_tables(official.inv_freq, length, torch.float32)
    positions = torch.arange(length)[None].expand(2, length)
    ours = rotary(x, cos, sin, positions, heads)
    ref = official(x.reshape(2, length, heads, head_dim).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours, x)  # it rotates

    class Block(torch.nn.Module):
        def forward(self, x, positions):
            return rotary(x, cos, sin, positions, heads)

    ops, (onnx_out,) = _export_and_run(Block(), (x, positions), tmp_path / "rope.onnx")
    assert ops == ["RotaryEmbedding"]
    np.testing.assert_allclose(onnx_out, rotary_reference(x, cos, sin, positions, heads).numpy(), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_on_packed_heads(tmp_path, masked):
    from semvoc.kernels.attention import attention

    heads, head_dim = 4, 8
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    key_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    mask = expand_key_mask(key_mask, 6) if masked else None

    def split(t):
        return t.reshape(2, t.shape[1], heads, head_dim).transpose(1, 2)

    ref = attention(split(q), split(k), split(v), key_mask if masked else None)
    torch.testing.assert_close(attention_packed(q, k, v, mask, heads), ref, atol=1e-5, rtol=1e-5)

    class Block(torch.nn.Module):
        def forward(self, q, k, v, *mask):
            return attention_packed(q, k, v, mask[0] if mask else None, heads)

    args = (q, k, v, mask) if masked else (q, k, v)
    ops, (ours,) = _export_and_run(Block(), args, tmp_path / "attn.onnx")
    assert ops.count("Attention") == 1 and "Transpose" not in ops and "Softmax" not in ops
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_biasnorm_channel_mean_as_matmul_is_the_same_function(tmp_path):
    norm = BiasNorm(12)
    with torch.no_grad():
        norm.bias.normal_()
        norm.log_scale.fill_(0.3)
    x = torch.randn(2, 12, 9) * 3
    ref = norm(x).detach()
    norm.mean_by_matmul = True
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-5)
    ops, (ours,) = _export_and_run(norm, (x,), tmp_path / "biasnorm.onnx")
    assert "ReduceMean" not in ops and "MatMul" in ops
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


@torch.no_grad()
def test_vocoder_export_form_is_the_same_function():
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    vocoder = build_model(preset("demo"), seed=0).vocoder.eval()
    gen = torch.Generator().manual_seed(3)
    audio = torch.randn(2, 4 * vocoder.cfg.hop_length, generator=gen) * 0.1
    cond = torch.randn(2, vocoder.cfg.latent_dim, 4, generator=gen)
    t = torch.tensor([0.3, 0.3])
    vocoder.use_conv_spectral()
    ref = vocoder.process_model(audio, cond, t)
    vocoder.use_export_kernels()
    block = vocoder.estimators[0].decoder.blocks[0]
    assert block.norm.mean_by_matmul
    torch.testing.assert_close(vocoder.process_model(audio, cond, t), ref, atol=1e-5, rtol=1e-5)
