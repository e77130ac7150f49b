"""UDiT: the text-to-latent diffusion transformer (official ``models.dit.mask_dit.UDiT``).

A U-shaped DiT over a 1-D latent ``[B, C, T]``: ``depth // 2`` in-blocks whose outputs are
pushed on a stack, one mid-block, ``depth // 2`` out-blocks that each pop one (LIFO) and fuse
it through ``skip_linear(skip_norm(cat([h, skip])))``. Each block: self-attention and MLP
under adaptive LayerNorm modulated by time (residual gates are ``1 - gate``), plus a
cross-attention to the text without modulation or gate.

State-dict keys equal the official module's, so official checkpoints load unchanged.
Numerics follow the official code, including its surprises (see docs/official-behaviour.md):
0-dim timesteps are truncated to integers; the final layer's modulation is ``(shift, scale)``;
RoPE uses half-split rotation on positions ``0..L-1`` and is computed in float32.

Besides ``forward`` the module exposes the pieces the exporter reuses so that what depends
only on text or time is computed once per request: ``time_conditioning``, ``embed_context``,
``cross_kv`` and ``forward_prepared``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semvoc.kernels.attention import attention
from semvoc.kernels.norms import RMSNorm

# --------------------------------------------------------------------------- building blocks


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)  # eps 1e-5, as the official code
    if kind == "rmsnorm":
        return RMSNorm(dim)  # eps 1e-6
    raise ValueError(f"unknown norm_layer {kind!r}: expected 'layernorm' or 'rmsnorm'")


def film(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sinusoidal_time_features(timesteps: torch.Tensor, dim: int = 256,
                             max_period: float = 10000.0) -> torch.Tensor:
    """``[B]`` -> ``[B, dim]`` = ``[cos(t f), sin(t f)]``, ``f_i = max_period^(-i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_time_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SinusoidalPositions(nn.Module):
    """Fixed interleaved sin/cos table; the buffer ``pe`` is persistent, as in the official code."""

    def __init__(self, dim: int, length: int):
        super().__init__()
        position = torch.arange(length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
        pe = torch.zeros(length, dim)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class PositionalConv(nn.Module):
    """F5-TTS style convolutional position embedding (``pe_method='conv'``)."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.conv1d = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2), nn.Mish(),
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(x.transpose(1, 2)).transpose(1, 2)


class PositionEmbedding(nn.Module):
    """The official ``PE_wrapper``: 'none' | 'abs' (learned) | 'sinu' (fixed) | 'conv'."""

    def __init__(self, dim: int, method: str, length: int | None):
        super().__init__()
        self.method = method
        if method == "abs":
            self.abs_pe = nn.Parameter(torch.zeros(1, length, dim))
        elif method == "sinu":
            self.sinu_pe = SinusoidalPositions(dim, length)
        elif method == "conv":
            self.conv_pe = PositionalConv(dim)
        elif method != "none":
            raise ValueError(f"unknown position embedding {method!r}: expected none/abs/sinu/conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "abs":
            return x + self.abs_pe[:, : x.shape[1]]
        if self.method == "sinu":
            return self.sinu_pe(x)
        if self.method == "conv":
            return x + self.conv_pe(x)
        return x


class Rotary(nn.Module):
    """RoPE with a persistent ``inv_freq`` buffer; half-split rotation, float32 math."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``[B, H, L, hd]`` by positions ``0..L-1``."""
        length = x.shape[-2]
        t = torch.arange(length, device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x32 * emb.cos() + rotated * emb.sin()).to(x.dtype)


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention with optional qk-norm and RoPE (official ``dit.attention.Attention``).

    ``qk_scale`` is accepted and ignored, as in the official code (which always calls
    ``scaled_dot_product_attention`` with its default ``head_dim ** -0.5``).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None,
                 qkv_bias: bool = False, qk_norm: str | None = None, rope_mode: str = "none"):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        if qk_norm is None:
            self.norm_q, self.norm_k = nn.Identity(), nn.Identity()
        elif qk_norm == "layernorm":
            self.norm_q, self.norm_k = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        elif qk_norm == "rmsnorm":
            self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        else:
            raise ValueError(f"unknown qk_norm {qk_norm!r}: expected None, 'layernorm' or 'rmsnorm'")
        self.proj = nn.Linear(dim, dim)
        if context_dim is not None and rope_mode != "none":
            raise ValueError("cross-attention takes no RoPE (rope_mode must be 'none')")
        self.rope_mode = rope_mode
        if rope_mode in ("shared", "x_only"):
            self.rotary = Rotary(head_dim)
        elif rope_mode == "dual":
            self.rotary_x = Rotary(head_dim)
            self.rotary_c = Rotary(head_dim)
        elif rope_mode != "none":
            raise ValueError(f"unknown rope_mode {rope_mode!r}: expected none/shared/x_only/dual")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H*hd] -> [B, H, L, hd]
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, -1).transpose(1, 2)

    def _rope(self, q: torch.Tensor, k: torch.Tensor, extras: int):
        if self.rope_mode == "shared":
            return self.rotary(q), self.rotary(k)
        if self.rope_mode == "x_only":
            rot = self.rotary
            return (torch.cat([q[:, :, :extras], rot(q[:, :, extras:])], dim=2),
                    torch.cat([k[:, :, :extras], rot(k[:, :, extras:])], dim=2))
        if self.rope_mode == "dual":
            rx, rc = self.rotary_x, self.rotary_c
            return (torch.cat([rc(q[:, :, :extras]), rx(q[:, :, extras:])], dim=2),
                    torch.cat([rc(k[:, :, :extras]), rx(k[:, :, extras:])], dim=2))
        return q, k

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V ``[B, H, Lk, hd]`` (normed keys): depends on the text only."""
        return self.norm_k(self._heads(self.to_k(context))), self._heads(self.to_v(context))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        q = self.norm_q(self._heads(self.to_q(x)))
        return self.proj(attention(q, k, v, key_mask))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, extras: int = 0) -> torch.Tensor:
        kv_input = x if context is None else context
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(kv_input)))
        v = self._heads(self.to_v(kv_input))
        q, k = self._rope(q, k, extras)
        return self.proj(attention(q, k, v, key_mask))


# ---------------------------------------------------------------------------- feed-forward


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """``[a, g] = proj(x).chunk(2)``, ``a * gelu(g)``: first half is the value, second the gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class SigmoidGELU(nn.Module):
    """The official 'geglu-approximate': ``x * sigmoid(1.702 x)`` (not gated)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


class Snake(nn.Module):
    """``x + beta * sin(alpha x)^2``; ``gated`` is the official 'gesnake'."""

    def __init__(self, dim_in: int, dim_out: int, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.proj = nn.Linear(dim_in, dim_out * (2 if gated else 1))
        self.alpha = nn.Parameter(torch.ones(1, 1, dim_out))
        self.beta = nn.Parameter(torch.ones(1, 1, dim_out))

    def forward(self, x):
        x = self.proj(x)
        if not self.gated:
            return x + self.beta * torch.sin(x * self.alpha).pow(2)
        value, gate = x.chunk(2, dim=-1)
        return value * (gate + self.beta * torch.sin(gate * self.alpha).pow(2))


ACTIVATIONS = {
    "gelu": lambda i, o: GELUProj(i, o),
    "gelu-approximate": lambda i, o: GELUProj(i, o, approximate="tanh"),
    "geglu": GEGLU,
    "geglu-approximate": SigmoidGELU,
    "snake": lambda i, o: Snake(i, o),
    "gesnake": lambda i, o: Snake(i, o, gated=True),
}


class FeedForward(nn.Module):
    """Keys ``net.0.*`` (activation with input projection) and ``net.2.*`` (output Linear)."""

    def __init__(self, dim: int, mult: float, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown act_layer {activation!r}: expected one of {sorted(ACTIVATIONS)}")
        inner = int(dim * mult)
        self.net = nn.ModuleList([ACTIVATIONS[activation](dim, inner), nn.Dropout(0.0),
                                  nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


# ----------------------------------------------------------------------------- DiT blocks


class AdaLN(nn.Module):
    """Per-block modulation ``[B, 6, D]`` = shift/scale/gate for attention, then for the MLP."""

    def __init__(self, dim: int, mode: str, rank: int | None = None, alpha: float | None = None):
        super().__init__()
        self.mode = mode
        if mode == "ada":
            self.time_ada = nn.Linear(dim, 6 * dim)
        elif mode == "ada_single":
            self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        elif mode in ("ada_sola", "ada_sola_bias"):
            if not rank:
                raise ValueError(f"time_fusion {mode!r} needs ada_sola_rank")
            self.lora_a = nn.Linear(dim, rank * 6, bias=False)
            self.lora_b = nn.Linear(rank * 6, dim * 6, bias=False)
            self.scaling = alpha / rank
            if mode == "ada_sola_bias":
                self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        else:
            raise ValueError(f"unknown time_fusion {mode!r}")

    def forward(self, time_token: torch.Tensor, time_ada: torch.Tensor | None) -> torch.Tensor:
        batch = time_token.shape[0]
        if self.mode == "ada":
            return self.time_ada(time_token).reshape(batch, 6, -1)
        if self.mode == "ada_single":
            return self.scale_shift_table[None] + time_ada.reshape(batch, 6, -1)
        mod = (time_ada + self.lora_b(self.lora_a(time_token)) * self.scaling).reshape(batch, 6, -1)
        if self.mode == "ada_sola_bias":
            mod = self.scale_shift_table[None] + mod
        return mod


@dataclass(frozen=True)
class UDiTConfig:
    """Constructor arguments of the official UDiT (same names, same defaults)."""

    img_size: int | tuple = 224
    patch_size: int = 16
    in_chans: int = 3
    input_type: str = "2d"
    out_chans: int | None = None
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    qk_norm: str | None = None
    act_layer: str = "gelu"
    norm_layer: str = "layernorm"
    context_norm: bool = False
    use_checkpoint: bool = False
    time_fusion: str = "token"
    ada_sola_rank: int | None = None
    ada_sola_alpha: float | None = None
    cls_dim: int | None = None
    context_dim: int | None = 768
    context_fusion: str = "concat"
    context_max_length: int | None = 128
    context_pe_method: str = "sinu"
    pe_method: str = "abs"
    rope_mode: str = "none"
    use_conv: bool = True
    skip: bool = True
    skip_norm: bool = True


class DiTBlock(nn.Module):
    def __init__(self, cfg: UDiTConfig, cross_dim: int | None, skip: bool):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = make_norm(cfg.norm_layer, dim)
        self.attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                              rope_mode=cfg.rope_mode)
        self.use_context = cross_dim is not None
        if self.use_context:
            self.cross_attn = Attention(dim, cfg.num_heads, context_dim=cross_dim,
                                        qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm)
            self.norm2 = make_norm(cfg.norm_layer, dim)
            self.norm_context = make_norm(cfg.norm_layer, cross_dim) if cfg.context_norm else nn.Identity()
        self.norm3 = make_norm(cfg.norm_layer, dim)
        self.mlp = FeedForward(dim, cfg.mlp_ratio, cfg.act_layer)
        self.use_adanorm = cfg.time_fusion != "token"
        if self.use_adanorm:
            self.adaln = AdaLN(dim, cfg.time_fusion, cfg.ada_sola_rank, cfg.ada_sola_alpha)
        self.has_skip = skip
        if skip:
            self.skip_norm = make_norm(cfg.norm_layer, 2 * dim) if cfg.skip_norm else nn.Identity()
            self.skip_linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor | None, skip: torch.Tensor | None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None, context_mask: torch.Tensor | None,
                x_mask: torch.Tensor | None, extras: int) -> torch.Tensor:
        """x ``[B, L, D]``; modulation ``[B, 6, D]`` (adaLN modes) or None; cross_kv from
        ``cross_attn.keys_values(norm_context(context))``."""
        if self.has_skip:
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))
        if self.use_adanorm:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
            x = x + (1 - gate_msa) * self.attn(film(self.norm1(x), shift_msa, scale_msa),
                                               key_mask=x_mask, extras=extras)
        else:
            x = x + self.attn(self.norm1(x), key_mask=x_mask, extras=extras)
        if self.use_context:
            k, v = cross_kv
            x = x + self.cross_attn.attend(self.norm2(x), k, v, context_mask)
        if self.use_adanorm:
            x = x + (1 - gate_mlp) * self.mlp(film(self.norm3(x), shift_mlp, scale_mlp))
        else:
            x = x + self.mlp(self.norm3(x))
        return x


class FinalBlock(nn.Module):
    def __init__(self, cfg: UDiTConfig, out_chans: int, use_adanorm: bool):
        super().__init__()
        self.norm = make_norm(cfg.norm_layer, cfg.embed_dim)
        self.use_adanorm = use_adanorm
        self.out_chans = out_chans
        self.patch_size = cfg.patch_size
        self.linear = nn.Linear(cfg.embed_dim, cfg.patch_size * out_chans)
        self.final_layer = nn.Conv1d(out_chans, out_chans, 3, padding=1) if cfg.use_conv else nn.Identity()

    def forward(self, x: torch.Tensor, final_mod: torch.Tensor | None, extras: int) -> torch.Tensor:
        batch = x.shape[0]
        x = x[:, extras:, :]
        if self.use_adanorm:
            shift, scale = final_mod.reshape(batch, 2, -1).chunk(2, dim=1)  # shift first
            x = film(self.norm(x), shift, scale)
        else:
            x = self.norm(x)
        x = self.linear(x)  # [B, N, p*C]
        n = x.shape[1]
        # unpatchify 'B h (p C) -> B C (h p)'
        x = x.reshape(batch, n, self.patch_size, self.out_chans).permute(0, 3, 1, 2)
        return self.final_layer(x.reshape(batch, self.out_chans, n * self.patch_size))


# ---------------------------------------------------------------------------------- UDiT


@dataclass
class TimeConditioning:
    """What the blocks need from the timestep; depends on the time only (one row per batch item).

    adaLN modes: ``block_mods`` ``[B, n_blocks, 6, D]`` and ``final_mod`` ``[B, 2D]``;
    'token' mode: ``time_tokens`` ``[B, n_tok, D]`` prepended to the sequence.
    """

    block_mods: torch.Tensor | None = None
    final_mod: torch.Tensor | None = None
    time_tokens: torch.Tensor | None = None


class UDiT(nn.Module):
    def __init__(self, cfg: UDiTConfig):
        super().__init__()
        if cfg.input_type != "1d":
            raise ValueError(f"input_type {cfg.input_type!r} is not supported: SemanticVocoder "
                             "latents are 1-D (input_type='1d')")
        self.cfg = cfg
        dim = cfg.embed_dim
        self.in_chans = cfg.in_chans
        self.out_chans = cfg.out_chans if cfg.out_chans is not None else cfg.in_chans
        num_patches = cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv1d(cfg.in_chans, dim, cfg.patch_size, stride=cfg.patch_size)
        self.x_pe = PositionEmbedding(dim, cfg.pe_method, num_patches)
        self.time_embed = TimestepEmbedder(dim)
        self.cls_embed = (nn.Sequential(nn.Linear(cfg.cls_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
                          if cfg.cls_dim is not None else None)

        self.use_adanorm = cfg.time_fusion != "token"
        if cfg.time_fusion == "token":
            self.extras = 2 if self.cls_embed is not None else 1
            self.time_pe = PositionEmbedding(dim, "abs", self.extras)
        elif cfg.time_fusion in ("ada", "ada_single", "ada_sola", "ada_sola_bias"):
            self.extras = 0
            self.time_act = nn.SiLU()
            self.time_ada_final = nn.Linear(dim, 2 * dim)
            self.time_ada = nn.Linear(dim, 6 * dim) if cfg.time_fusion != "ada" else None
        else:
            raise ValueError(f"unknown time_fusion {cfg.time_fusion!r}: expected token, ada, "
                             "ada_single, ada_sola or ada_sola_bias")

        self.context_fusion = "none"
        cross_dim = None
        if cfg.context_dim is not None:
            self.context_embed = nn.Sequential(nn.Linear(cfg.context_dim, dim), nn.SiLU(),
                                               nn.Linear(dim, dim))
            self.context_fusion = cfg.context_fusion
            self.context_pe = PositionEmbedding(dim, cfg.context_pe_method, cfg.context_max_length)
            if cfg.context_fusion in ("concat", "joint"):
                if cfg.context_fusion == "joint":
                    raise ValueError("context_fusion 'joint' has no DiT block in the official UDiT")
                self.extras += cfg.context_max_length
            elif cfg.context_fusion == "cross":
                cross_dim = dim
            else:
                raise ValueError(f"unknown context_fusion {cfg.context_fusion!r}: expected cross or concat")

        half = cfg.depth // 2
        self.in_blocks = nn.ModuleList([DiTBlock(cfg, cross_dim, skip=False) for _ in range(half)])
        self.mid_block = DiTBlock(cfg, cross_dim, skip=False)
        self.out_blocks = nn.ModuleList([DiTBlock(cfg, cross_dim, skip=cfg.skip) for _ in range(half)])
        self.final_block = FinalBlock(cfg, self.out_chans, self.use_adanorm)

    # ---------------------------------------------------------------- pieces (reused by export)

    @property
    def blocks(self) -> list[DiTBlock]:
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def time_conditioning(self, timesteps: torch.Tensor,
                          cls_token: torch.Tensor | None = None) -> TimeConditioning:
        """``timesteps`` ``[B]`` float (already truncated where the official code truncates)."""
        time_token = self.time_embed(timesteps)
        if self.cls_embed is not None:
            if cls_token is None:
                raise ValueError("this UDiT has cls_dim set and needs cls_token")
            cls_token = self.cls_embed(cls_token)
        if not self.use_adanorm:
            tokens = time_token[:, None]
            if self.cls_embed is not None:
                tokens = torch.cat([tokens, cls_token[:, None]], dim=1)
            return TimeConditioning(time_tokens=self.time_pe(tokens))
        if self.cls_embed is not None:
            time_token = time_token + cls_token
        time_token = self.time_act(time_token)
        time_ada = self.time_ada(time_token) if self.time_ada is not None else None
        mods = torch.stack([blk.adaln(time_token, time_ada) for blk in self.blocks], dim=1)
        return TimeConditioning(block_mods=mods, final_mod=self.time_ada_final(time_token))

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, S, Dc]`` -> ``[B, S, D]`` context tokens."""
        return self.context_pe(self.context_embed(context))

    def cross_kv(self, context_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block cross-attention K/V from the context tokens (cross fusion only)."""
        return [blk.cross_attn.keys_values(blk.norm_context(context_tokens)) for blk in self.blocks]

    def forward_prepared(self, x: torch.Tensor, time: TimeConditioning,
                         cross_kv: list | None, context_mask: torch.Tensor | None,
                         context_tokens: torch.Tensor | None = None,
                         x_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The network given precomputed time conditioning and context (K/V or tokens)."""
        h = self.x_pe(self.patch_embed.proj(x).transpose(1, 2))  # [B, N, D]
        batch = h.shape[0]
        if self.context_fusion == "concat":
            if context_tokens.shape[1] != self.cfg.context_max_length:
                raise ValueError(f"concat fusion needs exactly {self.cfg.context_max_length} "
                                 f"context tokens, got {context_tokens.shape[1]}")
            if x_mask is None:
                x_mask = torch.ones(batch, h.shape[1], dtype=torch.bool, device=h.device)
            if context_mask is None:
                context_mask = torch.ones(batch, context_tokens.shape[1], dtype=torch.bool, device=h.device)
            x_mask = torch.cat([context_mask, x_mask], dim=1)
            h = torch.cat([context_tokens, h], dim=1)
            context_mask = None
        if time.time_tokens is not None:
            h = torch.cat([time.time_tokens.to(h.dtype), h], dim=1)
            if x_mask is not None:
                ones = torch.ones(batch, time.time_tokens.shape[1], dtype=torch.bool, device=h.device)
                x_mask = torch.cat([ones, x_mask], dim=1)

        blocks = self.blocks
        kv = cross_kv if cross_kv is not None else [None] * len(blocks)
        mods = time.block_mods
        half = len(self.in_blocks)
        skips = []
        for i, blk in enumerate(blocks):
            mod = mods[:, i] if mods is not None else None
            skip = skips.pop() if (i > half and blk.has_skip) else None
            h = blk(h, mod, skip, kv[i], context_mask, x_mask, self.extras)
            if i < half and self.cfg.skip:
                skips.append(h)
        return self.final_block(h, time.final_mod, self.extras)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                x_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cls_token: torch.Tensor | None = None) -> torch.Tensor:
        """Official signature. x ``[B, C, T]``; timesteps 0-dim (truncated to int, as the
        official code does) or ``[B]`` (used as given); context ``[B, S, Dc]``."""
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0]).to(x.device, dtype=torch.long)
        time = self.time_conditioning(timesteps, cls_token)
        cross_kv, tokens = None, None
        if self.context_fusion != "none":
            tokens = self.embed_context(context)
            if self.context_fusion == "cross":
                cross_kv = self.cross_kv(tokens)
        else:
            context_mask = None
        return self.forward_prepared(x, time, cross_kv, context_mask, tokens, x_mask)
