"""The semantic vocoder generator (official Flow2GAN-style ``MaeAudioGenerator``).

Flow matching on the raw waveform, conditioned on semantic latents ``[B, latent_dim, F]``
(25 Hz): a ConvNeXt condition encoder, then parallel branches (one per STFT resolution), each
STFT -> ConvNeXt decoder (BiasNorm, condition via 1x1 conv, time FiLM ``y * (1 + proj(t))``,
PReLU) -> iSTFT, averaged (or summed). ``infer`` is the official Euler loop with
x1-prediction: ``v = (x1_hat - x) / (1 - t)``.

State-dict keys equal the official generator's (``cond_encoder.*``,
``estimators.{i}.{fft,ifft}.window``, ``estimators.{i}.decoder.*``; with
``spec_scaling_loss=True`` also the loss-only ``loss_spec.*`` buffers, kept for loading).

``spectral_impl`` selects ``torch.stft``/``torch.istft`` ("torch", the reference) or their
convolution lowering from ``semvoc.kernels.stft`` ("conv", what export uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from semvoc.kernels.audio_frames import NAME as AUDIO_FRAMES
from semvoc.kernels.audio_frames import audio_frames
from semvoc.kernels.bias_norm import bias_norm_op
from semvoc.kernels.bias_prelu import bias_prelu
from semvoc.kernels.bias_residual import bias_residual
from semvoc.kernels.convnext_mix import convnext_mix
from semvoc.kernels.ltgemm import NAME as LT_GEMM
from semvoc.kernels.ltgemm import linear as lt_linear
from semvoc.kernels.norms import BiasNorm, bias_norm
from semvoc.kernels.onnx_ops import fusion_enabled
from semvoc.kernels.prelu_split import NAME as PRELU_SPLIT
from semvoc.kernels.prelu_split import gains_fit, output_bounds, residual_gains, split_mlp, split_weights
from semvoc.kernels.split_mlp import NAME as SPLIT_MLP
from semvoc.kernels.split_mlp import split_mlp_op
from semvoc.kernels.stft import (
    ConvISTFT,
    ConvSTFT,
    fold_projections,
    foldable,
    frame_halves,
    istft_reference,
    overlap_add_halves,
    stft_reference,
)


@dataclass(frozen=True)
class VocoderConfig:
    """Constructor arguments of the official ``MaeAudioGenerator`` (same names and defaults)."""

    latent_dim: int = 768
    hop_length: int = 960
    sampling_rate: int = 24000
    n_ffts: tuple[int, ...] = (512, 256, 128)
    hop_lengths: tuple[int, ...] = (256, 128, 64)
    channels: tuple[int, ...] = (768, 512, 384)
    time_embed_channels: int = 512
    hidden_factor: int = 3
    conv_kernel_sizes: tuple[int, ...] = (7, 7, 7)
    num_layers: tuple[int, ...] = (8, 8, 8)
    use_cond_encoder: bool = True
    cond_enc_channels: int = 512
    cond_enc_hidden_factor: int = 3
    cond_enc_conv_kernel_size: int = 7
    cond_enc_num_layers: int = 4
    residual_scale: float | None = 1.0
    init_noise_scale: float = 0.1
    pred_x1: bool = True
    branch_reduction: str = "mean"
    spec_scaling_loss: bool = True
    loss_n_filters: int = 256
    loss_n_fft: int = 1024
    loss_hop_length: int = 256
    # training-only arguments the official constructor accepts (ignored at inference)
    extra: dict = field(default_factory=dict, compare=False)


def sinusoidal_flow_time(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """``[B]`` -> ``[B, dim]`` = ``[sin(s t e), cos(s t e)]``, ``e_j = exp(-j ln(1e4) / (dim/2 - 1))``.

    Differs from the DiT's embedding: sine first, x1000, and a ``half - 1`` denominator.
    """
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
    args = scale * t[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ChannelScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1))

    def forward(self, x):
        return x * self.scale


class ConvNeXtBlock(nn.Module):
    """``y = pw2(PReLU(pw1(((BiasNorm(dw(x)) + cond) * time_scale)))) + x * channel_scale``."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, cond_channels: int | None = None,
                 time_channels: int | None = None, residual_scale: float | None = 1.0):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv kernel size must be odd, got {kernel_size}")
        self.dwconv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = BiasNorm(channels)
        self.pwconv1 = nn.Conv1d(channels, hidden, 1)
        self.act = nn.PReLU(hidden)
        self.pwconv2 = nn.Conv1d(hidden, channels, 1)
        if cond_channels is not None:
            self.cond_proj = nn.Conv1d(cond_channels, channels, 1)
        if time_channels is not None:
            self.time_embed_proj = nn.Linear(time_channels, channels)
        if residual_scale is not None:
            self.residual_scale = ChannelScale(channels)

    def forward_prepared(self, x: torch.Tensor, cond_bias: torch.Tensor | None,
                         time_scale: torch.Tensor | None) -> torch.Tensor:
        """cond_bias = ``cond_proj(cond)`` ``[B, C, T]``; time_scale = ``1 + proj(temb)`` ``[B, C]``."""
        y = self.norm(self.dwconv(x))
        if cond_bias is not None:
            y = y + cond_bias
        if time_scale is not None:
            y = y * time_scale[:, :, None]
        y = self.pwconv2(self.act(self.pwconv1(y)))
        residual = self.residual_scale(x) if hasattr(self, "residual_scale") else x
        return y + residual

    def use_split(self, gain_in: torch.Tensor, gain_out: torch.Tensor) -> None:
        """Run ``forward_channels_last`` in the split form (``semvoc.kernels.prelu_split``) on
        activations stored divided by ``gain_in`` (input) and ``gain_out`` (output); export only.
        Where the export may use ``SplitMlp``, the relu and linear parts' weights are kept stacked
        (``[C, H + C]``, what that op reads), else apart (three LtGemm calls)."""
        w = split_weights(self.dwconv.weight, self.pwconv1.weight[:, :, 0], self.pwconv1.bias, self.act.weight,
                          self.pwconv2.weight[:, :, 0], self.pwconv2.bias, gain_in, gain_out)
        buffers = {"dw_weight": w.dw_weight, "linear_bias": w.linear_bias}
        if fusion_enabled(SPLIT_MLP):
            buffers["stacked_weight"] = torch.cat([w.relu_weight, w.linear_weight], dim=1)
        else:
            buffers.update(relu_weight=w.relu_weight, linear_weight=w.linear_weight)
        for name, value in buffers.items():
            self.register_buffer(f"split_{name}", value, persistent=False)

    def drop_split(self) -> None:
        """Back to the unsplit form (undoes ``use_split``)."""
        for name in [n for n in self._buffers if n.startswith("split_")]:
            delattr(self, name)

    def forward_channels_last(self, x: torch.Tensor, cond_bias: torch.Tensor, time_scale: torch.Tensor,
                              layer: int = 0) -> torch.Tensor:
        """``forward_prepared`` on ``[B, L, C]`` as semvoc's CUDA ops: ConvNeXtMix, a GEMM,
        BiasPRelu, then the down-projection, its bias and the residual: one LtGemm (cuBLASLt's
        epilogue) for an unscaled residual, else a GEMM and BiasResidual. After ``use_split``:
        ConvNeXtMix and SplitMlp (two GEMMs over ConvNeXtMix's widened output), or three LtGemm
        calls (``split_mlp``), on the gain-divided activations. cond_bias ``[B, L, C]``,
        time_scale ``[B|1, C]``, or the decoder's tables ``[N, B, L, C]`` and ``[1, N, C]`` of
        which this block reads entry ``layer``."""
        dw = self.dwconv
        w1 = self.pwconv1.weight[:, :, 0]  # [H, C]
        if hasattr(self, "split_stacked_weight"):
            wide = convnext_mix(x, self.split_dw_weight, dw.bias, self.norm.bias, self.norm.log_scale, cond_bias,
                                time_scale, layer, lead=w1.shape[0])  # [B, L, H + C]
            return split_mlp_op(wide, w1.t(), self.pwconv1.bias, self.split_stacked_weight.t(),
                                self.split_linear_bias, x)
        if hasattr(self, "split_relu_weight"):
            y = convnext_mix(x, self.split_dw_weight, dw.bias, self.norm.bias, self.norm.log_scale, cond_bias,
                             time_scale, layer)
            return split_mlp(y, x, w1, self.pwconv1.bias, self.split_linear_weight, self.split_linear_bias,
                             self.split_relu_weight)
        y = convnext_mix(x, dw.weight, dw.bias, self.norm.bias, self.norm.log_scale, cond_bias, time_scale, layer)
        h = bias_prelu(F.linear(y, w1), self.pwconv1.bias, self.act.weight)
        scaled = hasattr(self, "residual_scale")
        if not scaled and fusion_enabled(LT_GEMM):  # the residual is cuBLASLt's C with beta = 1
            return lt_linear(h, self.pwconv2.weight[:, :, 0], self.pwconv2.bias, x)
        # a per-channel residual scale needs cuBLASLt's beta vector, which it refuses in fp16 on an
        # H200: LtGemm then adds it in a kernel after the GEMM, the same passes as BiasResidual,
        # and measured no faster (vocoder step 8.18 against 8.09 ms at batch 16)
        scale = self.residual_scale.scale.reshape(-1) if scaled else torch.ones_like(dw.bias)
        return bias_residual(F.linear(h, self.pwconv2.weight[:, :, 0]), self.pwconv2.bias, x, scale)

    def forward(self, x, cond=None, time_embed=None):
        cond_bias = self.cond_proj(cond) if cond is not None else None
        time_scale = 1.0 + self.time_embed_proj(time_embed) if time_embed is not None else None
        return self.forward_prepared(x, cond_bias, time_scale)


class CondEncoder(nn.Module):
    def __init__(self, cond_dim: int, channels: int, hidden_factor: int, kernel_size: int,
                 num_layers: int, residual_scale: float | None):
        super().__init__()
        self.in_proj = nn.Conv1d(cond_dim, channels, 3, padding=1)
        self.in_norm = BiasNorm(channels)
        self.blocks = nn.ModuleList([
            ConvNeXtBlock(channels, int(channels * hidden_factor), kernel_size,
                          residual_scale=residual_scale) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(self.in_proj(x))
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXtDecoder(nn.Module):
    def __init__(self, io_channels: int, channels: int, cond_channels: int, time_channels: int,
                 hidden_factor: int, kernel_size: int, num_layers: int, residual_scale: float | None):
        super().__init__()
        self.in_proj = nn.Conv1d(io_channels, channels, 1)
        self.in_norm = BiasNorm(channels)
        self.time_channels = time_channels
        time_hidden = int(time_channels * hidden_factor)
        self.time_mlp = nn.Sequential(nn.Linear(time_channels, time_hidden), nn.SiLU(),
                                      nn.Linear(time_hidden, time_channels))
        cond_hidden = int(cond_channels * hidden_factor)
        self.cond_mlp = nn.Sequential(nn.Conv1d(cond_channels, cond_hidden, 1), nn.PReLU(cond_hidden),
                                      nn.Conv1d(cond_hidden, cond_channels, 1))
        self.blocks = nn.ModuleList([
            ConvNeXtBlock(channels, int(channels * hidden_factor), kernel_size, cond_channels,
                          time_channels, residual_scale) for _ in range(num_layers)])
        self.out_proj = nn.Conv1d(channels, io_channels, 1)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_flow_time(t, self.time_channels)
        return self.time_mlp(features.to(self.time_mlp[0].weight.dtype))

    def forward_prepared(self, x: torch.Tensor, cond_biases: list[torch.Tensor],
                         time_scales: list[torch.Tensor]) -> torch.Tensor:
        x = self.in_norm(self.in_proj(x))
        for block, cond_bias, time_scale in zip(self.blocks, cond_biases, time_scales, strict=True):
            x = block.forward_prepared(x, cond_bias, time_scale)
        return self.out_proj(x)

    def use_split(self, float16: bool = True, bounds: list[float] | None = None) -> torch.Tensor | None:
        """Every block in the split form (``ConvNeXtBlock.use_split``), where LtGemm and the split
        are exported and, for ``float16``, the stored activations stay in range (``gains_fit``
        with the calibrated ``bounds`` of the blocks' outputs, see ``output_bounds``): returns the
        last gain ``g_L`` ``[C]`` (float64), which the caller folds into the output projection's
        columns; else None (and the blocks unsplit, whatever an earlier call did)."""
        for block in self.blocks:
            block.drop_split()
        if not (fusion_enabled(LT_GEMM) and fusion_enabled(PRELU_SPLIT)):
            return None
        scales = [b.residual_scale.scale if hasattr(b, "residual_scale") else None for b in self.blocks]
        gains = residual_gains(scales, self.in_proj.out_channels)
        if gains is None or (float16 and not gains_fit(gains[1:], bounds)):
            return None
        for block, gain_in, gain_out in zip(self.blocks, gains, gains[1:], strict=False):
            block.use_split(gain_in, gain_out)
        return gains[-1]

    def forward_channels_last(self, x: torch.Tensor, cond_biases: list[torch.Tensor],
                              time_scales: list[torch.Tensor]) -> torch.Tensor:
        """``forward_prepared`` with ``[B, L, C]`` activations (the ``--cuda-kernels`` export form):
        the 1x1 convolutions become GEMMs with the frame count as M (aligned whatever L is).
        x ``[B, F, L]`` -> ``[B, F, L]``; cond_biases ``[B, L, C]`` each."""
        h = F.linear(x.transpose(1, 2), self.in_proj.weight[:, :, 0], self.in_proj.bias)  # [B, L, C]
        h = bias_norm(h, self.in_norm.bias, self.in_norm.log_scale, channels_last=True)
        for block, cond_bias, time_scale in zip(self.blocks, cond_biases, time_scales, strict=True):
            h = block.forward_channels_last(h, cond_bias, time_scale)
        return F.linear(h, self.out_proj.weight[:, :, 0], self.out_proj.bias).transpose(1, 2)


class SpectralTransform(nn.Module):
    """Holds the official ``window`` buffer; runs the torch reference or the conv lowering."""

    def __init__(self, n_fft: int, hop_length: int, inverse: bool):
        super().__init__()
        self.n_fft, self.hop_length, self.inverse = n_fft, hop_length, inverse
        self.register_buffer("window", torch.hann_window(n_fft))
        self.impl = "torch"
        self._conv: nn.Module | None = None

    def use_conv(self) -> None:
        """Switch to the Conv1d lowering (built from the loaded window)."""
        cls = ConvISTFT if self.inverse else ConvSTFT
        self._conv = cls(self.window.detach().clone(), self.hop_length)
        self.impl = "conv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "conv":
            # An fp32 island in fp16 engines (its bases stay fp32): the spectrum goes back to the
            # network's dtype, the waveform stays fp32 (fp16 would quantise audio at -66 dB).
            y = self._conv(x.to(self._conv.basis.dtype))
            return y if self.inverse else y.to(x.dtype)
        if self.inverse:
            return istft_reference(x, self.window, self.hop_length)
        return stft_reference(x, self.window, self.hop_length)


def fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Truncate or right-pad with zeros the last axis to ``length`` (official convert_length)."""
    if length <= x.shape[-1]:
        return x[..., :length]
    pad = x.new_zeros(*x.shape[:-1], length - x.shape[-1])
    return torch.cat([x, pad], dim=-1)


class AudioConvNeXt(nn.Module):
    """One branch: STFT -> ConvNeXt decoder -> iSTFT at one resolution."""

    def __init__(self, n_fft: int, hop_length: int, cond_hop_length: int, channels: int,
                 cond_channels: int, time_channels: int, hidden_factor: int, kernel_size: int,
                 num_layers: int, residual_scale: float | None):
        super().__init__()
        if cond_hop_length % hop_length:
            raise ValueError(f"branch hop {hop_length} must divide the conditioning hop {cond_hop_length}")
        self.fft = SpectralTransform(n_fft, hop_length, inverse=False)
        self.ifft = SpectralTransform(n_fft, hop_length, inverse=True)
        self.upsample_factor = cond_hop_length // hop_length
        self.decoder = ConvNeXtDecoder(n_fft + 2, channels, cond_channels, time_channels,
                                       hidden_factor, kernel_size, num_layers, residual_scale)

    def frames(self, audio_length: int) -> int:
        return 1 + audio_length // self.fft.hop_length

    def upsample_cond(self, cond: torch.Tensor, frames: int) -> torch.Tensor:
        """Repeat each condition frame ``factor`` times, then fit to ``frames`` (zero tail)."""
        return fit_length(torch.repeat_interleave(cond, self.upsample_factor, dim=-1), frames)

    def cond_biases(self, cond: torch.Tensor, audio_length: int) -> list[torch.Tensor]:
        """Every block's ``cond_proj(cond_mlp(upsampled cond))``: depends on the latents only."""
        cm = self.decoder.cond_mlp(self.upsample_cond(cond, self.frames(audio_length)))
        return [block.cond_proj(cm) for block in self.decoder.blocks]

    def time_scales(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every block's ``1 + time_embed_proj(time_mlp(pe(t)))`` ``[B, C]``: depends on t only."""
        temb = self.decoder.time_embedding(t)
        return [1.0 + block.time_embed_proj(temb) for block in self.decoder.blocks]

    def forward_prepared(self, audio: torch.Tensor, cond_biases: list[torch.Tensor],
                         time_scales: list[torch.Tensor]) -> torch.Tensor:
        length = audio.shape[-1]
        spec = self.decoder.forward_prepared(self.fft(audio), cond_biases, time_scales)
        return fit_length(self.ifft(spec), length)

    def forward(self, audio: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.forward_prepared(audio, self.cond_biases(cond, audio.shape[-1]), self.time_scales(t))

    def fold_spectral(self, scale: float, float16: bool = True, bounds: list[float] | None = None) -> None:
        """Export form of ``--cuda-kernels``: the STFT folded into ``in_proj`` and the iSTFT (its
        envelope and ``scale``, the branch reduction, too) into ``out_proj`` (``fold_projections``),
        the blocks split where they can be (``ConvNeXtDecoder.use_split(float16, bounds)``);
        call after loading weights. Needs ``foldable(n_fft, hop)``."""
        dec, dtype = self.decoder, self.decoder.in_proj.weight.dtype
        with torch.no_grad():
            folded = fold_projections(self.fft.window, self.fft.hop_length, dec.in_proj.weight[:, :, 0],
                                      dec.in_proj.bias, dec.out_proj.weight[:, :, 0], dec.out_proj.bias, scale)
        gain = dec.use_split(float16, bounds)  # the blocks' activations divided by their gains, if split
        if gain is not None:  # the decoder's output x_L = g_L v_L: g_L into the columns
            folded = (*folded[:2], folded[2] * gain, folded[3])  # (float64 both)
        for name, value in zip(("fold_in_weight", "fold_in_bias", "fold_out_weight", "fold_out_bias"), folded,
                               strict=True):
            self.register_buffer(name, value.to(dtype), persistent=False)

    def folded_pieces(self, audio: torch.Tensor, cond_table: torch.Tensor, time_row: torch.Tensor) -> torch.Tensor:
        """This branch's iSTFT frame pieces ``[B, F, n_fft]`` (scaled, the decoder's dtype), on semvoc's
        CUDA ops: frames -> one GEMM -> BiasNorm -> blocks -> one GEMM. audio ``[B, L]`` in the
        decoder's dtype; cond_table ``[N, B, F, C]``; time_row ``[1, N, C]``."""
        dec, hop = self.decoder, self.fft.hop_length
        frames = audio_frames(audio, hop) if fusion_enabled(AUDIO_FRAMES) else frame_halves(audio, hop)
        h = F.linear(frames, self.fold_in_weight)  # [B, F, C]
        h = bias_norm_op(h, self.fold_in_bias, dec.in_norm.bias, dec.in_norm.log_scale)
        for layer, block in enumerate(dec.blocks):
            h = block.forward_channels_last(h, cond_table, time_row, layer)
        return lt_linear(h, self.fold_out_weight, self.fold_out_bias)  # [B, F, n_fft]

    def forward_folded(self, audio: torch.Tensor, cond_table: torch.Tensor, time_row: torch.Tensor) -> torch.Tensor:
        """This branch's share of the prediction, ``scale * istft(decoder(stft(audio)))`` ``[B, L]``
        fp32: ``folded_pieces`` overlap-added."""
        return overlap_add_halves(self.folded_pieces(audio, cond_table, time_row).float())


class _LossSpectrogramBuffers(nn.Module):
    """Loss-only buffers of ``spec_scaling_loss=True`` checkpoints; unused at inference."""

    def __init__(self, n_fft: int, n_filters: int):
        super().__init__()
        self.spectrogram = nn.Module()
        self.spectrogram.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer("fb", torch.zeros(n_fft // 2 + 1, n_filters))


class Vocoder(nn.Module):
    """``MaeAudioGenerator``: latents ``[B, latent_dim, F]`` -> waveform ``[B, F * hop_length]``."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        n = len(cfg.n_ffts)
        for name in ("hop_lengths", "channels", "conv_kernel_sizes", "num_layers"):
            if len(getattr(cfg, name)) != n:
                raise ValueError(f"vocoder config: {name} has {len(getattr(cfg, name))} entries, "
                                 f"n_ffts has {n}; give one per branch")
        if cfg.branch_reduction not in ("mean", "sum"):
            raise ValueError(f"branch_reduction must be 'mean' or 'sum', got {cfg.branch_reduction!r}")
        self.cfg = cfg
        if cfg.spec_scaling_loss:
            self.loss_spec = _LossSpectrogramBuffers(cfg.loss_n_fft, cfg.loss_n_filters)
        if cfg.use_cond_encoder:
            self.cond_encoder = CondEncoder(cfg.latent_dim, cfg.cond_enc_channels,
                                            cfg.cond_enc_hidden_factor, cfg.cond_enc_conv_kernel_size,
                                            cfg.cond_enc_num_layers, cfg.residual_scale)
        cond_channels = cfg.cond_enc_channels if cfg.use_cond_encoder else cfg.latent_dim
        self.estimators = nn.ModuleList([
            AudioConvNeXt(cfg.n_ffts[i], cfg.hop_lengths[i], cfg.hop_length, cfg.channels[i],
                          cond_channels, cfg.time_embed_channels, cfg.hidden_factor,
                          cfg.conv_kernel_sizes[i], cfg.num_layers[i], cfg.residual_scale)
            for i in range(n)])

    def use_conv_spectral(self) -> None:
        """Lower every STFT/iSTFT to convolutions (export); call after loading weights."""
        for est in self.estimators:
            est.fft.use_conv()
            est.ifft.use_conv()

    #: the step graph runs the decoders channels-last on semvoc's CUDA ops (``use_export_kernels``)
    cuda_ops: bool = False
    #: with ``cuda_ops``: each branch's STFT/iSTFT folded into its projections (``forward_folded``)
    folded: bool = False

    def use_export_kernels(self, cuda_ops: bool = False, float16: bool = True,
                           activation_maxima: dict[str, float] | None = None) -> None:
        """The export form, same function: conv STFT/iSTFT and BiasNorm channel means as GEMVs;
        ``cuda_ops``: the decoders run ``ConvNeXtDecoder.forward_channels_last`` (semvoc's CUDA ops),
        their blocks split where ``float16`` activations stay in range (``activation_maxima``: the
        export's calibration, keys of the whole model's ``named_modules``, ``vocoder.`` first).

        (Without them the 1x1 convolutions stay convolutions: written as ``W @ x`` MatMuls they
        ran 3x slower on an H100, cuBLAS picking 2-byte-aligned kernels for the odd frame counts.)"""
        self.cuda_ops = cuda_ops
        self.folded = cuda_ops and all(foldable(e.fft.n_fft, e.fft.hop_length) for e in self.estimators)
        if self.folded:
            scale = 1.0 / len(self.estimators) if self.cfg.branch_reduction == "mean" else 1.0
            for i, est in enumerate(self.estimators):
                bounds = None if activation_maxima is None else output_bounds(
                    activation_maxima, f"vocoder.estimators.{i}.decoder.", len(est.decoder.blocks),
                    scaled=self.cfg.residual_scale is not None)
                est.fold_spectral(scale, float16, bounds)
        self.use_conv_spectral()
        for module in self.modules():
            if isinstance(module, BiasNorm):
                module.mean_by_matmul = True

    def encode_cond(self, latents: torch.Tensor) -> torch.Tensor:
        return self.cond_encoder(latents) if self.cfg.use_cond_encoder else latents

    def reduce_branches(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(outputs, dim=1)
        return stacked.mean(dim=1) if self.cfg.branch_reduction == "mean" else stacked.sum(dim=1)

    def process_model(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Official ``process_model``: x ``[B, L]``, encoded cond, t ``[B, 1]`` or ``[B]``."""
        t = t.flatten()
        return self.reduce_branches([est(x, cond, t) for est in self.estimators])

    def euler_update(self, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor,
                     dt: torch.Tensor) -> torch.Tensor:
        velocity = (pred - x) / (1 - t) if self.cfg.pred_x1 else pred
        return x + velocity * dt

    @torch.no_grad()
    def infer(self, latents: torch.Tensor, noise_std: torch.Tensor, n_timesteps: int,
              clamp_pred: bool = True, trace: dict | None = None) -> torch.Tensor:
        """Official ``MelAudioGenerator.infer`` with the ``torch.randn`` draw injected.

        ``trace`` (optional dict) receives ``cond``, ``t_span`` and per-step lists ``t``,
        ``x`` (state before the step) and ``pred``, plus ``unclamped``.
        """
        cond = self.encode_cond(latents)
        x = noise_std * self.cfg.init_noise_scale
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=x.device)
        t, dt = t_span[0], t_span[1] - t_span[0]
        if trace is not None:
            trace.update(cond=cond, t_span=t_span, t=[], x=[], pred=[])
        for step in range(1, len(t_span)):
            t_batch = t[None, None].expand(x.shape[0], 1)
            pred = self.process_model(x, cond, t_batch)
            if trace is not None:
                trace["t"].append(t_batch[:, 0])
                trace["x"].append(x)
                trace["pred"].append(pred)
            x = self.euler_update(x, pred, t, dt)
            t = t_span[step]
        if trace is not None:
            trace["unclamped"] = x
        return x.clamp(-1.0, 1.0) if clamp_pred else x


def peak_normalise(waveform: torch.Tensor) -> torch.Tensor:
    """``SemanticVocoder.decode``: ``w / max(max|w|, 1)`` per row (a no-op after the clamp)."""
    return waveform / waveform.abs().max(dim=-1, keepdim=True)[0].clamp(min=1.0)
