"""Each export-friendly kernel against its reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semvoc.kernels.attention import attention, attention_reference
from semvoc.kernels.norms import BiasNorm, RMSNorm
from semvoc.kernels.resample import SincResample
from semvoc.kernels.stft import (
    ConvISTFT,
    ConvSTFT,
    fold_projections,
    frame_halves,
    istft_reference,
    overlap_add_halves,
    stft_reference,
)
from semvoc.runtime.audio import resample


def test_attention_matches_softmax_reference_with_key_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 16, generator=gen) for _ in range(3))
    k, v = k[:, :, :5], v[:, :, :5]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    masked = attention(q, k, v, mask)[1]
    assert not torch.allclose(masked, attention(q, k, v)[1])  # the mask changes the result


def test_attention_exports_as_one_fused_op(tmp_path):
    import onnx
    import onnxruntime as ort

    class Block(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return attention(q, k, v, mask)

    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    path = tmp_path / "attn.onnx"
    torch.onnx.export(Block().eval(), (q, k, v, mask), str(path), dynamo=True, opset_version=23,
                      input_names=["q", "k", "v", "mask"])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops
    out = ort.InferenceSession(str(path)).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
                                                     "mask": mask.numpy()})[0]
    np.testing.assert_allclose(out, attention_reference(q, k, v, mask).numpy(), atol=1e-5)


@pytest.mark.parametrize("framed", [True, False])
@pytest.mark.parametrize("n_fft,hop", [(480, 240), (240, 120), (120, 60), (32, 16), (512, 128), (48, 12)])
def test_lowered_stft_matches_torch_stft(n_fft, hop, framed):
    window = torch.hann_window(n_fft)
    audio = torch.randn(2, 40 * hop, generator=torch.Generator().manual_seed(n_fft))
    ours = ConvSTFT(window, hop, framed=framed)(audio)
    ref = stft_reference(audio, window, hop)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


def test_conv_stft_for_hops_that_do_not_divide_n_fft():
    window = torch.hann_window(512)
    audio = torch.randn(1, 16000, generator=torch.Generator().manual_seed(1))
    lowered = ConvSTFT(window, 160)  # Dasheng's front end: 512 / 160 is not an integer
    assert not lowered.framed
    ref = stft_reference(audio, window, 160)
    assert (lowered(audio) - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("framed", [True, False])
@pytest.mark.parametrize("n_fft,hop", [(480, 240), (240, 120), (120, 60), (32, 16), (48, 12)])
def test_lowered_istft_matches_torch_istft(n_fft, hop, framed):
    window = torch.hann_window(n_fft)
    spec = torch.randn(2, n_fft + 2, 31, generator=torch.Generator().manual_seed(hop))
    ours = ConvISTFT(window, hop, framed=framed)(spec)
    ref = istft_reference(spec, window, hop)
    assert ours.shape == ref.shape == (2, hop * 30)
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


def test_stft_round_trip_reconstructs_audio():
    window = torch.hann_window(240)
    audio = torch.randn(1, 120 * 50)
    rebuilt = ConvISTFT(window, 120)(ConvSTFT(window, 120)(audio))
    assert (rebuilt - audio).abs().max() < 1e-4


@pytest.mark.parametrize("n_fft", [480, 120, 16])
def test_folded_projections_are_stft_linear_istft(n_fft):
    """istft(out(h)) with h = in(stft(x)), computed as frames @ w_in, h @ w_out and overlap-add."""
    hop, channels = n_fft // 2, 24
    gen = torch.Generator().manual_seed(n_fft)
    window = torch.hann_window(n_fft, dtype=torch.float64)
    audio = torch.randn(2, 37 * hop, generator=gen, dtype=torch.float64)
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    w_in, b_in, w_out, b_out = rand(channels, n_fft + 2), rand(channels), rand(n_fft + 2, channels), rand(n_fft + 2)
    h = stft_reference(audio, window, hop).transpose(1, 2) @ w_in.t() + b_in  # [B, F, C]
    fw_in, fb_in, fw_out, fb_out = fold_projections(window, hop, w_in, b_in, w_out, b_out, scale=1 / 3)
    torch.testing.assert_close(frame_halves(audio, hop) @ fw_in.t() + fb_in, h, rtol=1e-9, atol=1e-9)
    h = torch.tanh(h)  # anything between the two projections
    expected = istft_reference((h @ w_out.t() + b_out).transpose(1, 2), window, hop) / 3
    ours = overlap_add_halves(h @ fw_out.t() + fb_out)
    assert ours.shape == expected.shape == audio.shape
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="n_fft = 2 \\* hop"):
        fold_projections(torch.hann_window(512), 128, w_in, b_in, w_out, b_out)


def test_rmsnorm_and_biasnorm_keep_fp32_statistics_under_fp16():
    x = torch.randn(2, 8, 5) * 900  # squares overflow fp16 (> 65504)
    bias_norm = BiasNorm(8)
    ref = bias_norm(x)
    half = bias_norm.half()(x.half())
    assert torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    rms = RMSNorm(5)
    assert torch.isfinite(rms.half()(x.half())).all()


@pytest.mark.parametrize("orig,new", [(24000, 16000), (44100, 16000), (16000, 24000), (8000, 16000)])
def test_numpy_resample_matches_conv_resample(orig, new):
    wav = np.random.default_rng(orig).uniform(-1, 1, (2, 4000)).astype(np.float32)
    ours = resample(wav, orig, new)
    conv = SincResample(orig, new)(torch.from_numpy(wav)).numpy()
    assert ours.shape == conv.shape == (2, int(np.ceil(4000 * new / orig)))
    np.testing.assert_allclose(ours, conv, atol=2e-6)


def test_resample_preserves_a_low_tone():
    t = np.arange(24000) / 24000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 24000, 16000)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 2e-3
