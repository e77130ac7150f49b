"""Semantic encoder: Dasheng (``dasheng.pretrained.pretrained.Dasheng``), our own code.

Why our own code rather than the ``dasheng`` package: the package needs torchaudio (pinned to
one torch version each) and computes its front end with ``torch.stft``; here the log-mel front
end is written with the convolution STFT of ``semvoc.kernels.stft``, so the whole encoder
exports to one ONNX graph (ONNX Runtime and TensorRT), and we depend on torch alone. The
state-dict keys are the package's, so dasheng checkpoints load unchanged (the mel filterbank
and window are buffers in the checkpoint and are loaded, not recomputed).

waveform 16 kHz ``[B, N]`` -> power mel spectrogram (n_fft 512, hop 160, 64 HTK mels,
0..8 kHz) -> dB with ``top_db`` floor (the max is taken over the WHOLE batch, as torchaudio does
for a ``[B, 64, T]`` input, so rows are coupled) -> eval BatchNorm over mel bins -> patch
Conv2d ``(64, 4)`` -> chunks of ``target_length // 4`` patches, each with time/freq position
embeddings and ``depth`` pre-norm ViT blocks -> final LayerNorm -> ``[B, T', D]``.
``SemanticEncoder.encode`` is the official ``DashengEncoderWrapper``: resample to 16 kHz,
channel mean, transpose to ``[B, D, T']``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semvoc.kernels.attention import attention
from semvoc.kernels.resample import SincResample
from semvoc.kernels.stft import ConvSTFT


@dataclass(frozen=True)
class SemanticEncoderConfig:
    """Constructor arguments of ``AudioTransformerMAE_Encoder`` that inference depends on."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    target_length: int = 1008
    pooling: str = "mean"
    patch_size: tuple[int, int] = (64, 4)
    patch_stride: tuple[int, int] = (64, 4)
    n_fft: int = 512
    n_mels: int = 64
    hop_size: int = 160
    win_size: int = 512
    f_min: float = 0.0
    f_max: float = 8000.0
    center: bool = True
    top_db: float = 120.0
    sample_rate: int = 16000


def htk_mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int,
                       sample_rate: int) -> torch.Tensor:
    """torchaudio ``melscale_fbanks(norm=None, mel_scale='htk')`` ``[n_freqs, n_mels]``.

    Only used to initialise presets: checkpoints carry the filterbank as a buffer.
    """
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_min = 2595.0 * math.log10(1.0 + f_min / 700.0)
    m_max = 2595.0 * math.log10(1.0 + f_max / 700.0)
    f_pts = 700.0 * (10.0 ** (torch.linspace(m_min, m_max, n_mels + 2) / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.min(down, up), min=0.0)


class LogMelFrontEnd(nn.Module):
    """Keys ``0.spectrogram.window`` and ``0.mel_scale.fb`` (torchaudio's MelSpectrogram)."""

    def __init__(self, cfg: SemanticEncoderConfig):
        super().__init__()
        if cfg.win_size != cfg.n_fft or not cfg.center:
            raise ValueError("the Dasheng front end is supported with win_size == n_fft and center=True")
        mel = nn.Module()
        mel.spectrogram = nn.Module()
        mel.spectrogram.register_buffer("window", torch.hann_window(cfg.win_size))
        mel.mel_scale = nn.Module()
        mel.mel_scale.register_buffer(
            "fb", htk_mel_filterbank(cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate))
        self.add_module("0", mel)
        self.hop = cfg.hop_size
        self.top_db = cfg.top_db
        self.stft = ConvSTFT(mel.spectrogram.window, self.hop)
        # The DFT bases are derived from the window buffer: rebuild them from a loaded window.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._rebuild_stft())

    def _mel(self) -> nn.Module:
        return getattr(self, "0")

    def _rebuild_stft(self) -> None:
        window = self._mel().spectrogram.window
        self.stft = ConvSTFT(window.detach().clone(), self.hop).to(window.device)

    def power_spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = self.stft(waveform)  # [B, n_fft + 2, T]: real parts, then imaginary
        bins = spec.shape[1] // 2
        return spec[:, :bins].pow(2) + spec[:, bins:].pow(2)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` -> dB mel ``[B, n_mels, T]`` with the batch-global ``top_db`` floor."""
        power = self.power_spectrogram(waveform)
        mel = torch.matmul(power.transpose(1, 2), self._mel().mel_scale.fb).transpose(1, 2)
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        return torch.maximum(db, db.amax(dim=(0, 1, 2)) - self.top_db)  # whole batch


class ViTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attention(q, k, v))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class ViTBlock(nn.Module):
    def __init__(self, cfg: SemanticEncoderConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Dasheng(nn.Module):
    """The Dasheng encoder: 16 kHz waveform ``[B, N]`` -> frame embeddings ``[B, T', D]``."""

    def __init__(self, cfg: SemanticEncoderConfig):
        super().__init__()
        if cfg.pooling not in ("mean", "token"):
            raise ValueError(f"unknown Dasheng pooling {cfg.pooling!r}")
        self.cfg = cfg
        dim = cfg.embed_dim
        self.front_end = LogMelFrontEnd(cfg)
        self.init_bn = nn.Sequential(nn.Identity(), nn.BatchNorm2d(cfg.n_mels, momentum=0.01), nn.Identity())
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, tuple(cfg.patch_size), stride=tuple(cfg.patch_stride))
        grid = (cfg.n_mels // cfg.patch_stride[0], cfg.target_length // cfg.patch_stride[1])
        self.time_pos_embed = nn.Parameter(torch.randn(1, dim, 1, grid[1]) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, dim, grid[0], 1) * 0.02)
        if cfg.pooling == "token":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.token_pos_embed = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def num_frames(self, num_samples: int) -> int:
        """Output frames for a 16 kHz input of ``num_samples`` (25 Hz for the release)."""
        spec_frames = 1 + num_samples // self.cfg.hop_size
        return (spec_frames - self.cfg.patch_size[1]) // self.cfg.patch_stride[1] + 1

    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` -> normalised log-mel ``[B, 1, n_mels, T]``."""
        x = self.front_end(waveform.float())[:, None]  # [B, 1, F, T]
        bn = self.init_bn[1]  # BatchNorm over the mel axis: move mels to channels
        x = F.batch_norm(x.transpose(1, 2), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         training=False, eps=bn.eps)
        return x.transpose(1, 2)

    def _chunk_features(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-1]
        x = x + self.time_pos_embed[:, :, :, :t] + self.freq_pos_embed
        x = x.flatten(2).transpose(1, 2)  # 'b c f t -> b (f t) c'
        if self.cfg.pooling == "token":
            cls = self.cls_token.expand(x.shape[0], -1, -1) + self.token_pos_embed
            x = torch.cat([cls, x], dim=1)
        return self.norm(self.blocks(x))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = self.spectrogram(waveform)  # fp32 (the front end is an fp32 island)
        x = self.patch_embed.proj(spec.to(self.patch_embed.proj.weight.dtype))  # [B, D, f, T']
        chunk = self.cfg.target_length // self.cfg.patch_stride[1]
        return torch.cat([self._chunk_features(c) for c in x.split(chunk, dim=-1)], dim=1)


class SemanticEncoder(nn.Module):
    """The official ``DashengEncoderWrapper``: audio at ``sampling_rate`` -> latents ``[B, D, T']``.

    Keys are the Dasheng keys under ``dasheng_model.``; no ``proj_out`` (the released model
    passes no ``latent_dim``).
    """

    def __init__(self, cfg: SemanticEncoderConfig, sampling_rate: int = 24000):
        super().__init__()
        self.dasheng_model = Dasheng(cfg)
        self.sampling_rate = sampling_rate
        self.resample = SincResample(sampling_rate, cfg.sample_rate)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio ``[B, C, N]`` or ``[B, N]`` at ``sampling_rate`` -> ``[B, D, T']``."""
        x = self.resample(audio)
        if x.dim() == 3:
            x = x.mean(dim=1)
        return self.dasheng_model(x).transpose(1, 2)
