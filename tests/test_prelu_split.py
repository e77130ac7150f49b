"""The PReLU split of the vocoder's ConvNeXt MLP (semvoc.kernels.prelu_split): the rewrite against
the block it replaces, its range guard, and the step graph it exports. The LtGemm calls it makes
run on the GPU in tests/test_cuda_kernels.py."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F

from semvoc.kernels.onnx_ops import WITHOUT_ENV, translation_table
from semvoc.kernels.prelu_split import GAIN_RANGE, NAME, residual_gains, split_mlp, split_weights


def _linear64(h, weight, bias=None, residual=None, relu=False):
    y = F.linear(h, weight, bias)
    y = y if residual is None else y + residual
    return F.relu(y) if relu else y


@pytest.mark.parametrize("slopes", ["per-channel", "one"])
def test_split_mlp_is_the_block_mlp_and_its_scaled_residual(slopes):
    gen = torch.Generator().manual_seed(5)
    c, h, k = 12, 36, 7
    dw = torch.randn(c, 1, k, generator=gen, dtype=torch.float64)
    w1, b1 = torch.randn(h, c, generator=gen, dtype=torch.float64), torch.randn(h, generator=gen, dtype=torch.float64)
    w2, b2 = torch.randn(c, h, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen, dtype=torch.float64)
    # slopes beyond [0, 1] and negative: the identity holds for any a
    a = (3 * torch.rand(h if slopes == "per-channel" else 1, generator=gen, dtype=torch.float64) - 1)
    scale = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    gain_in = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    gain_out = gain_in * scale
    x = torch.randn(2, 9, c, generator=gen, dtype=torch.float64)  # the block's input, [B, L, C]
    y = torch.randn(2, 9, c, generator=gen, dtype=torch.float64)  # ConvNeXtMix's output
    want = F.linear(F.prelu(F.linear(y, w1, b1).transpose(1, 2), a).transpose(1, 2), w2, b2) + x * scale

    split = split_weights(dw, w1, b1, a, w2, b2, gain_in, gain_out)
    got = split_mlp(y, x / gain_in, w1, b1, split.linear_weight, split.linear_bias, split.relu_weight,
                    linear=_linear64)
    torch.testing.assert_close(got * gain_out, want, rtol=1e-12, atol=1e-12)
    # the depthwise weights take the input gain: dw(x) = (w * g) applied to x / g
    conv = F.conv1d(x.transpose(1, 2), dw, padding=k // 2, groups=c)
    conv_split = F.conv1d((x / gain_in).transpose(1, 2), split.dw_weight, padding=k // 2, groups=c)
    torch.testing.assert_close(conv_split, conv, rtol=1e-12, atol=1e-12)


def test_split_weights_keep_the_weights_dtype():
    gen = torch.Generator().manual_seed(1)
    c, h = 4, 12
    args = (torch.randn(c, 1, 3, generator=gen), torch.randn(h, c, generator=gen), torch.randn(h, generator=gen),
            torch.full((h,), 0.25), torch.randn(c, h, generator=gen), torch.randn(c, generator=gen))
    split = split_weights(*(t.half() for t in args), torch.ones(c, dtype=torch.float64),
                          torch.ones(c, dtype=torch.float64))
    assert all(t.dtype == torch.float16 for t in vars(split).values())
    assert split.linear_weight.shape == (c, c) and split.relu_weight.shape == (c, h)


def test_residual_gains_are_running_products_and_refuse_what_fp16_cannot_hold():
    scales = [torch.full((3, 1), 0.5), None, torch.tensor([[2.0], [1.0], [-1.0]])]
    gains = residual_gains(scales, 3)
    assert [g.tolist() for g in gains] == [[1, 1, 1], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [1.0, 0.5, -0.5]]
    low, high = GAIN_RANGE
    assert residual_gains([torch.full((3, 1), low / 2)], 3) is None
    assert residual_gains([torch.full((3, 1), 0.5)] * 5, 3) is None  # 1/32: the running product leaves it
    assert residual_gains([torch.tensor([[1.0], [0.0], [1.0]])], 3) is None
    assert residual_gains([torch.full((3, 1), high * 2)], 3) is None
    assert residual_gains([torch.tensor([[1.0], [float("nan")], [1.0]])], 3) is None


def _demo_vocoder(scale_range: tuple[float, float] = (0.7, 1.3)):
    """The demo vocoder with residual scales and PReLU slopes away from their initial 1 and 0.25."""
    from semvoc.models.config import preset
    from semvoc.models.model import build_model
    from semvoc.models.vocoder import ConvNeXtBlock

    vocoder = build_model(preset("demo"), seed=0).vocoder.eval()
    gen = torch.Generator().manual_seed(11)
    low, high = scale_range
    with torch.no_grad():
        for module in vocoder.modules():
            if isinstance(module, ConvNeXtBlock):
                module.act.weight.copy_(torch.rand(module.act.weight.shape, generator=gen) * 1.5 - 0.25)
                scale = module.residual_scale.scale
                scale.copy_(low + (high - low) * torch.rand(scale.shape, generator=gen))
    return vocoder


def _step_inputs(vocoder, frames: int = 5):
    from semvoc.export import wrappers as W

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, vocoder.cfg.latent_dim, frames, generator=gen)
    tables = W.VocoderPrepare(vocoder, channels_last=True)(latents)
    times = W.VocoderTime(vocoder)(torch.linspace(0, 1, 9)[:8])
    audio = 0.1 * torch.randn(1, frames * vocoder.cfg.hop_length, generator=gen)
    return audio, torch.tensor([3]), torch.linspace(0, 1, 9), *tables, *times


@pytest.mark.parametrize("scale_range", [(0.7, 1.3), (0.02, 0.05)], ids=["split", "gains-out-of-range"])
def test_split_vocoder_step_is_the_step(scale_range, monkeypatch):
    """The --cuda-kernels step module with split blocks (trained-like slopes and residual scales)
    against the plain step; residual scales whose running product leaves the range keep the
    unsplit blocks, with the same result."""
    from semvoc.export import wrappers as W

    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    vocoder = _demo_vocoder(scale_range)
    vocoder.use_export_kernels()
    args = _step_inputs(vocoder)
    with torch.no_grad():
        plain = W.VocoderStep(vocoder, channels_last=True)(*args)
        vocoder.use_export_kernels(cuda_ops=True)
        fused = W.VocoderStep(vocoder, channels_last=True)(*args)
    blocks = [b for est in vocoder.estimators for b in est.decoder.blocks]
    split = [hasattr(b, "split_relu_weight") for b in blocks]
    assert all(split) if scale_range == (0.7, 1.3) else not any(split)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)


def _export_step_ops(vocoder, path) -> list:
    from semvoc.export import wrappers as W

    torch.onnx.export(W.VocoderStep(vocoder, channels_last=True).eval(), _step_inputs(vocoder), dynamo=True,
                      opset_version=23, custom_translation_table=translation_table()).save(str(path))
    return list(onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("without", ["", NAME])
def test_split_blocks_export_conv_next_mix_and_three_lt_gemms(without, tmp_path, monkeypatch):
    """Split: per block ConvNeXtMix and three LtGemm (one with relu = 1), no BiasPRelu, BiasResidual
    or MatMul left; SEMVOC_EXPORT_WITHOUT=PReLUSplit gives the unsplit blocks back."""
    monkeypatch.setenv(WITHOUT_ENV, without)
    vocoder = _demo_vocoder()
    vocoder.use_export_kernels(cuda_ops=True)
    nodes = _export_step_ops(vocoder, tmp_path / "vocoder_step.onnx")
    ops = [n.op_type for n in nodes]
    branches, layers = len(vocoder.estimators), sum(vocoder.cfg.num_layers)
    relu = [n for n in nodes if n.op_type == "LtGemm" and any(a.name == "relu" and a.i == 1 for a in n.attribute)]
    assert ops.count("ConvNeXtMix") == layers
    if without:
        assert ops.count("BiasPRelu") == ops.count("BiasResidual") == layers and not relu
        assert ops.count("LtGemm") == branches and ops.count("MatMul") == branches + 2 * layers
    else:
        assert ops.count("BiasPRelu") == ops.count("BiasResidual") == 0 and len(relu) == layers
        assert ops.count("LtGemm") == branches + 3 * layers and ops.count("MatMul") == branches
