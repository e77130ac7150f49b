"""The PReLU split of the vocoder's ConvNeXt MLP (semvoc.kernels.prelu_split): the rewrite against
the block it replaces, its range guard, and the step graph it exports. The LtGemm calls it makes
run on the GPU in tests/test_cuda_kernels.py."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F

from semvoc.kernels.onnx_ops import WITHOUT_ENV, translation_table
from semvoc.kernels.prelu_split import (
    FP16_STORED_LIMIT,
    GAIN_RANGE,
    NAME,
    gains_fit,
    output_bounds,
    residual_gains,
    split_mlp,
    split_weights,
)
from semvoc.kernels.split_mlp import NAME as SPLIT_MLP
from semvoc.kernels.split_mlp import split_mlp_reference


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


def test_residual_gains_are_running_products_and_refuse_zero_or_non_finite():
    scales = [torch.full((3, 1), 0.5), None, torch.tensor([[2.0], [1.0], [-1.0]])]
    gains = residual_gains(scales, 3)
    assert [g.tolist() for g in gains] == [[1, 1, 1], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [1.0, 0.5, -0.5]]
    assert residual_gains([torch.full((3, 1), 0.5)] * 12, 3) is not None  # small, but not zero
    assert residual_gains([torch.tensor([[1.0], [0.0], [1.0]])], 3) is None
    assert residual_gains([torch.tensor([[1.0], [float("nan")], [1.0]])], 3) is None


def test_gains_fit_fp16_by_calibrated_bounds_or_else_a_static_range():
    low, high = GAIN_RANGE
    small = [torch.full((3,), low / 4)]
    assert not gains_fit(small, None) and not gains_fit([torch.full((3,), high * 2)], None)
    assert gains_fit([torch.full((3,), low), torch.tensor([high, 1.0, -1.0])], None)
    # with calibration: |x_l| <= bound, stored |x_l / g_l| <= bound / min |g_l|
    assert gains_fit(small, [FP16_STORED_LIMIT * low / 4])
    assert not gains_fit(small, [FP16_STORED_LIMIT * low / 2])


def test_output_bounds_add_the_scaled_residual_and_the_mlp_output():
    maxima = {"d.in_norm": 3.0, "d.blocks.0.residual_scale": 2.0, "d.blocks.0.pwconv2": 1.0,
              "d.blocks.1.residual_scale": 4.0, "d.blocks.1.pwconv2": 0.5}
    assert output_bounds(maxima, "d.", 2, scaled=True) == [3.0, 4.5]
    assert output_bounds(maxima, "d.", 2, scaled=False) == [4.0, 4.5]  # from the input norm on
    assert output_bounds(maxima, "d.", 3, scaled=True) is None  # a block the calibration did not see


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


@pytest.mark.parametrize("mlp", ["SplitMlp", "LtGemm"], ids=["split-mlp-op", "three-lt-gemms"])
@pytest.mark.parametrize("case", ["in-range", "small-gains-fp16", "small-gains-fp32", "small-gains-calibrated"])
def test_split_vocoder_step_is_the_step(case, mlp, monkeypatch):
    """The --cuda-kernels step module against the plain step, with trained-like slopes and
    residual scales. Gains far below 1 keep the unsplit blocks in fp16 without calibration, and
    split in fp32 or where the calibration says the stored activations fit: the same result,
    with the split's MLP as SplitMlp (the default) or as three LtGemm calls."""
    from semvoc.export import wrappers as W

    if mlp == "SplitMlp":
        monkeypatch.delenv(WITHOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(WITHOUT_ENV, SPLIT_MLP)
    vocoder = _demo_vocoder((0.7, 1.3) if case == "in-range" else (0.02, 0.05))
    vocoder.use_export_kernels()
    args = _step_inputs(vocoder)
    maxima = None
    if case == "small-gains-calibrated":  # outputs at most 0.1: stored at most 0.2 / 0.02^2 = 500
        maxima = {n: 0.1 for n, _ in vocoder.named_modules(prefix="vocoder")}
    with torch.no_grad():
        plain = W.VocoderStep(vocoder, channels_last=True)(*args)
        vocoder.use_export_kernels(cuda_ops=True, float16=case != "small-gains-fp32", activation_maxima=maxima)
        fused = W.VocoderStep(vocoder, channels_last=True)(*args)
    blocks = [b for est in vocoder.estimators for b in est.decoder.blocks]
    split = [hasattr(b, "split_dw_weight") for b in blocks]
    assert all(split) if case != "small-gains-fp16" else not any(split)
    stacked = [hasattr(b, "split_stacked_weight") for b in blocks]
    assert stacked == split if mlp == "SplitMlp" else not any(stacked)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)
    if case == "in-range":  # exporting again without the split leaves no split block behind
        monkeypatch.setenv(WITHOUT_ENV, NAME)
        with torch.no_grad():
            vocoder.use_export_kernels(cuda_ops=True)
            unsplit = W.VocoderStep(vocoder, channels_last=True)(*args)
        assert not any(hasattr(b, "split_dw_weight") for b in blocks)
        torch.testing.assert_close(unsplit[0], plain[0], rtol=1e-4, atol=1e-5)


def _export_step_ops(vocoder, path) -> list:
    from semvoc.export import wrappers as W

    torch.onnx.export(W.VocoderStep(vocoder, channels_last=True).eval(), _step_inputs(vocoder), dynamo=True,
                      opset_version=23, custom_translation_table=translation_table()).save(str(path))
    return list(onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("without", ["", SPLIT_MLP, NAME], ids=["default", "three-lt-gemms", "left-out"])
def test_split_blocks_export_conv_next_mix_and_their_gemms(without, tmp_path, monkeypatch):
    """By default: per block ConvNeXtMix (its output widened by H) and SplitMlp, no BiasPRelu,
    BiasResidual, MatMul or LtGemm left in the blocks. With SEMVOC_EXPORT_WITHOUT=SplitMlp,
    ConvNeXtMix and three LtGemm (one with relu = 1). With SEMVOC_EXPORT_WITHOUT=PReLUSplit,
    the unsplit blocks."""
    monkeypatch.setenv(WITHOUT_ENV, without)
    vocoder = _demo_vocoder()
    vocoder.use_export_kernels(cuda_ops=True)
    nodes = _export_step_ops(vocoder, tmp_path / "vocoder_step.onnx")
    ops = [n.op_type for n in nodes]
    branches, layers = len(vocoder.estimators), sum(vocoder.cfg.num_layers)
    relu = [n for n in nodes if n.op_type == "LtGemm" and any(a.name == "relu" and a.i == 1 for a in n.attribute)]
    leads = [a.i for n in nodes if n.op_type == "ConvNeXtMix" for a in n.attribute if a.name == "lead"]
    assert ops.count("ConvNeXtMix") == layers
    if without == NAME:
        assert ops.count("BiasPRelu") == ops.count("BiasResidual") == layers and not relu
        assert ops.count("LtGemm") == branches and ops.count("MatMul") == branches + 2 * layers
    elif without == SPLIT_MLP:
        assert ops.count("BiasPRelu") == ops.count("BiasResidual") == ops.count("SplitMlp") == 0 and not any(leads)
        assert len(relu) == layers
        assert ops.count("LtGemm") == branches + 3 * layers and ops.count("MatMul") == branches
    else:
        assert ops.count("BiasPRelu") == ops.count("BiasResidual") == 0 and not relu
        assert ops.count("SplitMlp") == layers and ops.count("LtGemm") == branches and ops.count("MatMul") == branches
        hidden = [b.pwconv1.out_channels for est in vocoder.estimators for b in est.decoder.blocks]
        assert sorted(leads) == sorted(hidden)
        mixes = {n.output[0] for n in nodes if n.op_type == "ConvNeXtMix"}
        assert {n.input[0] for n in nodes if n.op_type == "SplitMlp"} == mixes  # each reads a widened mix
        # ... and is its only reader: SplitMlp writes its hidden rows into that tensor's lead columns
        readers = [i for n in nodes for i in n.input if i in mixes]
        assert sorted(readers) == sorted(mixes)


def test_split_mlp_op_is_the_three_gemms():
    """SplitMlp's reference (one GEMM over [r | y] with the stacked weight) against split_mlp's
    three GEMMs; the widened input's first H columns (scratch) are never read."""
    gen = torch.Generator().manual_seed(3)
    c, h = 12, 36
    y, v = torch.randn(2, 9, c, generator=gen), torch.randn(2, 9, c, generator=gen)
    w1, b1 = torch.randn(h, c, generator=gen), torch.randn(h, generator=gen)
    linear_weight, linear_bias = torch.randn(c, c, generator=gen), torch.randn(c, generator=gen)
    relu_weight = torch.randn(c, h, generator=gen)
    want = split_mlp(y, v, w1, b1, linear_weight, linear_bias, relu_weight, linear=_linear64)
    wide = torch.cat([torch.full((2, 9, h), float("nan")), y], dim=-1)
    got = split_mlp_reference(wide, w1.t(), b1, torch.cat([relu_weight, linear_weight], dim=1).t(), linear_bias, v)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
