"""The modules that become the engine's graphs: one per file, each a pure function of its inputs.

"One step, one graph": a step graph holds the network, the CFG combine and the solver update;
the schedule is data (tables gathered by a step counter that the graph also advances), so a
runtime can ping-pong two buffer sets and replay the whole loop from a CUDA graph without
touching the host. What depends only on the text, the latents or the schedule is computed once
per request (``*_prepare``) or once per schedule (``*_time``).

Loop state (the DiT latent and the vocoder waveform) stays float32 in every precision: the
Euler updates accumulate over 100-200 steps. Tables and networks run in the engine's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semvoc.export.conv_as_gemm import conv1d_channels_last, depthwise_conv1d_channels_last, prelu_channels_last
from semvoc.export.fused_dit import FusedDiT, fused_cross_kv, fused_time_table
from semvoc.kernels.euler_overlap_add import MAX_BRANCHES as EULER_MAX_BRANCHES
from semvoc.kernels.euler_overlap_add import NAME as EULER_OVERLAP_ADD
from semvoc.kernels.euler_overlap_add import euler_overlap_add
from semvoc.kernels.norms import bias_norm
from semvoc.kernels.onnx_ops import fusion_enabled
from semvoc.models.model import SemanticVocoderModel
from semvoc.models.udit import TimeConditioning, UDiT
from semvoc.models.vocoder import CondEncoder, Vocoder


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def at_step(table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``table[step]`` for a step counter ``[1]`` int64: ``[1, ...]``, exported as ONNX ``Gather``.

    ``table[step]`` exports as ``GatherND``, whose CUDA kernel copies its index arithmetic from
    host to device on every run; a captured loop would replay that copy (and semvoc's whole-loop
    CUDA graphs refuse it). ``Gather`` launches one kernel and copies nothing.
    """
    return table.index_select(0, step)


# ------------------------------------------------------------------------------ text


class TextEncoderGraph(nn.Module):
    """(input_ids [B,S] int64, attention_mask [B,S] int64) -> context [B,S,Dc] float32."""

    def __init__(self, model: SemanticVocoderModel):
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, input_ids, attention_mask):
        return self.text_encoder(input_ids, attention_mask).float()


# ------------------------------------------------------------------------------- DiT


def check_dit_exportable(dit: UDiT) -> None:
    if dit.context_fusion != "cross":
        raise NotImplementedError(
            f"export supports context_fusion='cross' (the release); this UDiT uses "
            f"{dit.context_fusion!r}. The PyTorch model runs it; the step graphs do not yet.")
    if dit.cls_embed is not None:
        raise NotImplementedError("export does not support cls_dim (class conditioning)")


def time_rows(dit: UDiT) -> int:
    """Rows of one step's time conditioning: 6 per block + 2 final (adaLN), or time tokens."""
    if dit.use_adanorm:
        return 6 * len(dit.blocks) + 2
    return dit.extras


class DitPrepare(nn.Module):
    """(context [B,S,Dc] f32) -> cross_kv [n_blocks, 2, 2B, H, S, hd]: K/V of every block's
    cross-attention for the CFG batch ``[uncond (zero context); cond]``."""

    def __init__(self, dit: UDiT):
        super().__init__()
        check_dit_exportable(dit)
        self.dit = dit

    def forward(self, context):
        context = context.to(_dtype(self.dit))
        cfg_context = torch.cat([torch.zeros_like(context), context])
        tokens = self.dit.embed_context(cfg_context)
        kv = self.dit.cross_kv(tokens)
        return torch.stack([torch.stack(pair) for pair in kv])


class DitTime(nn.Module):
    """(embedded timesteps [K] f32, already truncated) -> time table [K, R, D]."""

    def __init__(self, dit: UDiT):
        super().__init__()
        check_dit_exportable(dit)
        self.dit = dit

    def forward(self, timesteps):
        time = self.dit.time_conditioning(timesteps)
        if time.time_tokens is not None:
            return time.time_tokens
        k = timesteps.shape[0]
        dim = self.dit.cfg.embed_dim
        blocks = time.block_mods.reshape(k, -1, dim)
        return torch.cat([blocks, time.final_mod.reshape(k, 2, dim)], dim=1)


def _unpack_time(dit: UDiT, row: torch.Tensor, batch: int) -> TimeConditioning:
    """One table row [1, R, D] -> the blocks' time conditioning for ``batch`` rows."""
    dim = dit.cfg.embed_dim
    if not dit.use_adanorm:
        return TimeConditioning(time_tokens=row.expand(batch, -1, -1))
    n = len(dit.blocks)
    mods = row[:, : 6 * n].reshape(1, n, 6, dim).expand(batch, -1, -1, -1)
    final = row[:, 6 * n :].reshape(1, 2 * dim).expand(batch, -1)
    return TimeConditioning(block_mods=mods, final_mod=final)


class DitStep(nn.Module):
    """One CFG Euler step of the flow-matching sampler.

    inputs: latent [B,C,T] f32, step [1] int64, time_table [Kmax,R,D], sigmas [Kmax+1] f32,
    cross_kv [n_blocks,2,2B,H,S,hd], context_mask [B,S] bool, guidance [1] f32
    outputs: latent_next [B,C,T] f32 = latent + (sigma[k+1] - sigma[k]) * (u + w (c - u)),
    step_next [1] int64 = step + 1.
    """

    def __init__(self, dit: UDiT):
        super().__init__()
        check_dit_exportable(dit)
        self.dit = dit

    def forward(self, latent, step, time_table, sigmas, cross_kv, context_mask, guidance):
        dtype = _dtype(self.dit)
        batch = latent.shape[0]
        x = torch.cat([latent, latent]).to(dtype)
        time = _unpack_time(self.dit, at_step(time_table, step), 2 * batch)
        kv = [(cross_kv[i, 0], cross_kv[i, 1]) for i in range(cross_kv.shape[0])]
        mask = torch.cat([context_mask, context_mask])
        out = self.dit.forward_prepared(x, time, kv, mask).float()
        uncond, cond = out[:batch], out[batch:]  # (slices, not chunk: keeps batch dynamic)
        guided = uncond + guidance * (cond - uncond)
        dt = at_step(sigmas, step + 1) - at_step(sigmas, step)
        return latent + dt * guided, step + 1


class FusedDitPrepare(nn.Module):
    """The fused form's ``dit_prepare``: every block's K and V ``[2B, S, D]`` (``fused_cross_kv``)."""

    def __init__(self, dit: UDiT):
        super().__init__()
        self.dit = dit

    def forward(self, context):
        context = context.to(_dtype(self.dit))
        return fused_cross_kv(self.dit, self.dit.embed_context(torch.cat([torch.zeros_like(context), context])))


class FusedDitTime(nn.Module):
    """The fused form's ``dit_time``: ``[K, 8 n_blocks + 2, D]`` (see ``fused_time_table``)."""

    def __init__(self, dit: UDiT):
        super().__init__()
        self.dit = dit

    def forward(self, timesteps):
        return fused_time_table(self.dit, timesteps)


class FusedDitStep(nn.Module):
    """``DitStep`` on the fused form (same inputs and outputs; tables in the fused layouts)."""

    def __init__(self, dit: UDiT, cuda_ops: bool = False):
        super().__init__()
        self.fused = FusedDiT(dit, cuda_ops)

    def forward(self, latent, step, time_table, sigmas, *rest):
        *cross_kv, context_mask, guidance = rest  # k_0, v_0, ..., then the mask and the scale
        batch = latent.shape[0]
        x = torch.cat([latent, latent]).to(_dtype(self.fused.dit))
        mask = torch.cat([context_mask, context_mask])
        out = self.fused(x, at_step(time_table, step)[0], cross_kv, mask).float()
        uncond, cond = out[:batch], out[batch:]
        guided = uncond + guidance * (cond - uncond)
        dt = at_step(sigmas, step + 1) - at_step(sigmas, step)
        return latent + dt * guided, step + 1


# ---------------------------------------------------------------------------- vocoder


class VocoderPrepare(nn.Module):
    """(latents [B,Cl,F] f32) -> per branch i: cond_bias_i [n_layers_i, B, C_i, F*r_i + 1]
    (``channels_last``: [n_layers_i, B, F*r_i + 1, C_i]): every decoder block's
    ``cond_proj(cond_mlp(upsample(cond_encoder(latents))))``.

    The waveform has ``F * hop_length`` samples, so each branch's STFT has ``F * r_i + 1``
    frames and the last frame gets a zero condition (as in the official code).
    """

    def __init__(self, vocoder: Vocoder, channels_last: bool = False):
        super().__init__()
        self.vocoder = vocoder
        self.channels_last = channels_last

    def forward(self, latents):
        latents = latents.to(_dtype(self.vocoder)).transpose(1, 2)  # [B, F, Cl]
        vocoder = self.vocoder
        # channels-last GEMMs, no convolution: see semvoc.export.conv_as_gemm
        cond = _cond_encoder(vocoder.cond_encoder, latents) if vocoder.cfg.use_cond_encoder else latents
        batch, frames, _ = cond.shape
        # cond_mlp and cond_proj act on each frame alone (1x1 convolutions, PReLU), so they commute
        # with the upsampling: run them on the F latent frames (plus the zero frame the last STFT
        # frame gets), every block's cond_proj as ONE GEMM, then repeat each frame r times. The
        # upsampled form ran 3 convolutions per block on r times the frames (r = 4-16).
        cond = torch.cat([cond, torch.zeros_like(cond[:, :1])], dim=1)  # [B, F + 1, Cc]
        outputs = []
        for est in vocoder.estimators:
            blocks, mlp = est.decoder.blocks, est.decoder.cond_mlp
            cm = conv1d_channels_last(prelu_channels_last(conv1d_channels_last(cond, mlp[0]), mlp[1]), mlp[2])
            weight = torch.cat([block.cond_proj.weight[..., 0] for block in blocks])  # [n C, Cc]
            bias = torch.cat([block.cond_proj.bias for block in blocks])
            y = F.linear(cm, weight, bias).reshape(batch, frames + 1, len(blocks), -1)  # [B, F + 1, n, C]
            # frame p of the branch reads latent frame p // r (the last, p = F r, the zero frame):
            # ONE gather writes the table, no upsampled intermediate
            source = torch.arange(frames * est.upsample_factor + 1, device=y.device) // est.upsample_factor
            if self.channels_last:
                outputs.append(y.permute(2, 0, 1, 3).index_select(2, source))  # [n, B, L, C]
            else:
                outputs.append(y.permute(2, 0, 3, 1).index_select(3, source))  # [n, B, C, L]
        return tuple(outputs)


def _cond_encoder(encoder: CondEncoder, x: torch.Tensor) -> torch.Tensor:
    """``CondEncoder`` on channels-last x ``[B, F, C_latent]`` -> ``[B, F, C]``, as GEMMs."""
    x = bias_norm(conv1d_channels_last(x, encoder.in_proj), encoder.in_norm.bias, encoder.in_norm.log_scale,
                  channels_last=True)
    for block in encoder.blocks:
        y = bias_norm(depthwise_conv1d_channels_last(x, block.dwconv), block.norm.bias, block.norm.log_scale,
                      channels_last=True)
        y = conv1d_channels_last(prelu_channels_last(conv1d_channels_last(y, block.pwconv1), block.act),
                                 block.pwconv2)
        x = y + (x * block.residual_scale.scale[:, 0] if hasattr(block, "residual_scale") else x)
    return x


class VocoderTime(nn.Module):
    """(t [N] f32) -> per branch i: time_scale_i [N, n_layers_i, C_i] = 1 + proj(time_mlp(pe(t)))."""

    def __init__(self, vocoder: Vocoder):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, t):
        return tuple(torch.stack(est.time_scales(t), dim=1) for est in self.vocoder.estimators)


class VocoderStep(nn.Module):
    """One Euler step with x1-prediction: v = (x1_hat - x) / (1 - t), x += v * dt.

    inputs: audio [B,L] f32, step [1] int64, t_span [Nmax+1] f32, then per branch
    cond_bias_i and time_scale_i (see ``VocoderPrepare``/``VocoderTime``)
    outputs: audio_next [B,L] f32, step_next [1] int64. ``t = t_span[step]``,
    ``dt = t_span[1] - t_span[0]`` (the official loop's constant step).
    """

    def __init__(self, vocoder: Vocoder, channels_last: bool = False):
        super().__init__()
        self.vocoder = vocoder
        self.branches = len(vocoder.estimators)
        self.channels_last = channels_last  # cond_bias tables [n, B, L, C] (see VocoderPrepare)

    def forward(self, audio, step, t_span, *tables):
        dtype = _dtype(self.vocoder)
        cond_biases, time_scales = tables[: self.branches], tables[self.branches :]
        x = audio.to(dtype)
        if self.vocoder.folded:  # --cuda-kernels: tables passed whole, spectral transforms folded
            branches = zip(self.vocoder.estimators, cond_biases, time_scales, strict=True)
            if fusion_enabled(EULER_OVERLAP_ADD) and self.branches <= EULER_MAX_BRANCHES:  # the step's end: one op
                pieces = [est.folded_pieces(x, bias, at_step(scales, step)) for est, bias, scales in branches]
                return euler_overlap_add(audio, step, t_span, pieces, self.vocoder.cfg.pred_x1), step + 1
            pred = sum(est.forward_folded(x, bias, at_step(scales, step)) for est, bias, scales in branches)
            t, dt = at_step(t_span, step), t_span[1] - t_span[0]
            return self.vocoder.euler_update(audio, pred, t, dt), step + 1
        outputs = []
        for est, bias, scales in zip(self.vocoder.estimators, cond_biases, time_scales, strict=True):
            n = bias.shape[0]
            # chunk: one Split kernel per table, not one Gather per block
            biases = [b.squeeze(0) for b in bias.chunk(n)]
            rows = [r.squeeze(1) for r in at_step(scales, step).chunk(n, dim=1)]  # [1, C] each
            if self.vocoder.cuda_ops:  # the export form of --cuda-kernels (channels-last tables)
                spec = est.decoder.forward_channels_last(est.fft(x), biases, rows)
            else:
                if self.channels_last:  # the PyTorch reference of that form
                    biases = [b.transpose(1, 2) for b in biases]
                spec = est.decoder.forward_prepared(est.fft(x), biases, rows)
            outputs.append(est.ifft(spec))
        pred = self.vocoder.reduce_branches(outputs).float()
        t = at_step(t_span, step)
        dt = t_span[1] - t_span[0]
        return self.vocoder.euler_update(audio, pred, t, dt), step + 1


# -------------------------------------------------------------------------- semantic


class SemanticEncoderGraph(nn.Module):
    """(waveform [B, N] at 16 kHz) -> latents [B, D, T'] f32 (Dasheng frames, transposed)."""

    def __init__(self, model: SemanticVocoderModel):
        super().__init__()
        self.dasheng = model.semantic_encoder.dasheng_model

    def forward(self, waveform):
        return self.dasheng(waveform).transpose(1, 2).float()
