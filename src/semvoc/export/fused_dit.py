"""The DiT as the step graph runs it: same function as ``UDiT.forward_prepared``, fewer kernels.

onnxruntime runs one kernel per ONNX node, and at the release shapes (CFG batch 2 x 250 frames)
most of a step's time went to ~80 small kernels per block, not to its GEMMs (H100 kernel
profile: ``benchmarks/results/h100-2026-11-25b.md``). This form keeps every weight and every
rounding-relevant order of the official block, and rewrites the rest:

- packed heads end to end: q/k/v stay ``[B, L, H*hd]``; the fused ``Attention`` splits heads
  (no transposes); cross-attention K/V are prepared packed, ``[n_blocks, 2, 2B, S, D]``;
- q and k come from one GEMM; their qk-LayerNorms run as ONE LayerNormalization over the
  ``2H`` heads (affine applied after, per half), then ONE ``RotaryEmbedding`` over both;
- residual adds merge into the next LayerNorm (``SkipLayerNormalization``), the projection
  biases ride along as its bias input (the gated ones premultiplied by the gate);
- the adaLN modulation is folded into the norms' affine: ``LN(x) * w + b`` then ``* (1 + scale)
  + shift`` is ``LN(x) * (w (1 + scale)) + (b (1 + scale) + shift)``, so the time table holds, per
  block, ``w1 (1+scale_msa), b1 (1+scale_msa) + shift_msa, 1-gate_msa, (1-gate_msa)*b_proj`` and
  the same four for the MLP (norm3), 8 rows, and ``wf (1+scale), bf (1+scale) + shift`` for the
  final layer: no modulation kernels in the step. The timestep is shared by the batch (one row
  per step, broadcast);
- the cross-attention key mask becomes an additive bias once per step, not per block;
- GEGLU as two GEMMs, ``BiasGelu`` on the gate: no Split copy;
- the step's table rows come out of two levels of Splits (``table_rows``), not one Split per block;
  the table is padded with zero rows to a multiple of 32 so that every Split has equal parts
  (onnxruntime's Split of unequal parts copies four index tables from the host on every run).

With ``cuda_ops`` (``semvoc-export --cuda-kernels``) semvoc's CUDA ops take over what
onnxruntime's stock ops need several kernels for: ``QkvAttention`` (fp16, head size 64: the
self-attention straight from ONE GEMM of the q, k and v projections, its qk-norms, RoPE and the
attention in one kernel), else ``HeadNormRopeQkv`` (the qk-norms, RoPE and the q/k/v split before
onnxruntime's Attention; ``HeadNormRope`` with q|k and v as two GEMMs when it is left out),
``HeadNorm`` (the cross-attention q-norm), ``GatedSkipNorm`` (gate, residual and the next norm),
``BiasGeglu`` (GEGLU after one GEMM of both halves),
``CrossAttention`` (the masked cross-attention, reading the bool text mask itself: no mask bias,
and the padded keys past the text's last token are skipped), and on the U-Net skip path
``GatedConcatNorm`` (pending MLP output, concatenation and skip_norm), ``BiasAddNorm``
(skip_linear's bias and norm1) and ``LayerNorm`` for the first block's norm1, and ``LtGemm``
for every linear layer (a bias in cuBLASLt's epilogue; the fastest of cuBLASLt's candidate
algorithms for each shape, timed once and recorded: ``kernels/cuda/ltgemm_choices.h``).
``SEMVOC_EXPORT_WITHOUT=<op>`` leaves one out of an export.

Covered: the adaLN time fusions, cross-attention, LayerNorm, qk_norm None/layernorm, RoPE
none/shared, GEGLU/GELU feed-forwards. Other configurations export through the generic form
(``supports_fused`` says which). ``tests/test_fused_dit.py`` checks both forms agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semvoc.export.conv_as_gemm import conv1d_channels_last
from semvoc.kernels.attention import attention_packed, key_mask_bias
from semvoc.kernels.bias_geglu import bias_geglu
from semvoc.kernels.bias_gelu import bias_gelu
from semvoc.kernels.cross_attention import FUSED_NORM as CROSS_Q_NORM
from semvoc.kernels.cross_attention import cross_attention
from semvoc.kernels.gated_skip_norm import gated_skip_norm
from semvoc.kernels.head_norm import QKV_NORM_ROPE, head_norm, head_norm_rope, head_norm_rope_qkv
from semvoc.kernels.ltgemm import linear as lt_linear
from semvoc.kernels.onnx_ops import fusion_enabled
from semvoc.kernels.qkv_attention import FUSION as QKV_ATTENTION
from semvoc.kernels.qkv_attention import HEAD_SIZE as QKV_ATTENTION_HEAD_SIZE
from semvoc.kernels.qkv_attention import qkv_attention
from semvoc.kernels.rotary import rope_tables, rotary
from semvoc.kernels.skip_layernorm import skip_layer_norm
from semvoc.kernels.skip_norm import bias_add_norm, gated_concat_norm, layer_norm
from semvoc.models.udit import GEGLU, DiTBlock, GELUProj, UDiT

ROWS_PER_BLOCK = 8
FINAL_ROWS = 2
# onnxruntime's CUDA Split writes at most this many EQUAL parts from one kernel's own arguments;
# more parts, or parts of unequal sizes, go through index tables copied from the host on every run
# (which a captured loop would replay: semvoc's whole-loop CUDA graphs refuse it)
SPLIT_OUTPUTS = 32


def supports_fused(dit: UDiT) -> bool:
    cfg = dit.cfg
    acts = all(isinstance(b.mlp.net[0], (GEGLU, GELUProj)) for b in dit.blocks)
    return (dit.use_adanorm and dit.context_fusion == "cross" and cfg.norm_layer == "layernorm"
            and cfg.qk_norm in (None, "layernorm") and cfg.rope_mode in ("none", "shared")
            and dit.cls_embed is None and dit.extras == 0 and acts)


def fused_time_rows(dit: UDiT) -> int:
    """Rows of the fused time table: 8 per block, 2 for the final layer, then zero rows up to a
    multiple of ``SPLIT_OUTPUTS`` (see ``table_rows``)."""
    rows = ROWS_PER_BLOCK * len(dit.blocks) + FINAL_ROWS
    return rows if rows <= SPLIT_OUTPUTS else -(-rows // SPLIT_OUTPUTS) * SPLIT_OUTPUTS


def _zeros_like_bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _modulated_affine(norm: nn.LayerNorm, shift: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """``film(norm(x), shift, scale)`` as one affine of ``LN(x)``: ``[weight, bias]``, ``[K, D]`` each."""
    return [norm.weight * (1 + scale), norm.bias * (1 + scale) + shift]


def fused_time_table(dit: UDiT, timesteps: torch.Tensor) -> torch.Tensor:
    """``[K]`` (already truncated) -> ``[K, fused_time_rows, D]``: the rows listed above, then zeros."""
    time = dit.time_conditioning(timesteps)
    mods = time.block_mods  # [K, n, 6, D]: shift, scale, gate (attention), then (MLP)
    rows = []
    for j, blk in enumerate(dit.blocks):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:, j].unbind(1)
        gate_a, gate_m = 1 - gate_a, 1 - gate_m
        rows += [*_modulated_affine(blk.norm1, shift_a, scale_a), gate_a, gate_a * _zeros_like_bias(blk.attn.proj),
                 *_modulated_affine(blk.norm3, shift_m, scale_m), gate_m, gate_m * _zeros_like_bias(blk.mlp.net[2])]
    shift, scale = time.final_mod.reshape(-1, 2, mods.shape[-1]).unbind(1)
    rows += _modulated_affine(dit.final_block.norm, shift, scale)
    rows += [torch.zeros_like(shift)] * (fused_time_rows(dit) - len(rows))
    return torch.stack(rows, dim=1)


def fused_cross_kv(dit: UDiT, context_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, S, D]`` -> every block's K and V ``[B, S, D]``: ``(k_0, v_0, k_1, v_1, ...)`` (keys
    qk-normed). Separate tensors, not one table: onnxruntime's Split and Slice copy, and slicing
    a table in the step graph copied all of it twice per step (0.8 ms of Split kernels per step at
    batch 16 in the kernel profiles)."""
    heads = dit.cfg.num_heads
    out = []
    for blk in dit.blocks:
        cross = blk.cross_attn
        ctx = blk.norm_context(context_tokens)
        k, v = cross.to_k(ctx), cross.to_v(ctx)
        if isinstance(cross.norm_k, nn.LayerNorm):
            k = cross.norm_k(k.reshape(*k.shape[:2], heads, -1)).reshape(k.shape)
        out += [k, v]
    return tuple(out)


def table_rows(table: torch.Tensor) -> list[torch.Tensor]:
    """``[R, D]`` -> its R rows, ``[D]`` each, in two levels of Splits of at most ``SPLIT_OUTPUTS``
    (R = 224 for the reference DiT, 202 rows padded: 8 Split kernels per step, where one Split per
    block took 27; with R a multiple of ``SPLIT_OUTPUTS`` every Split has equal parts).
    chunk/split export as Split (one kernel per call); unbind or indexing would be one Slice per row."""
    total = table.shape[0]
    groups = [table] if total <= SPLIT_OUTPUTS else table.split(SPLIT_OUTPUTS)
    return [row.reshape(-1) for group in groups for row in group.chunk(group.shape[0])]


def dit_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cuda_ops: bool) -> torch.Tensor:
    """``F.linear``; with ``cuda_ops`` one semvoc ``LtGemm``: a bias rides in the GEMM's epilogue
    (not a MatMul and an Add), and the op runs the fastest of cuBLASLt's candidate algorithms for
    the shape, timed once and recorded (onnxruntime's MatMul runs cuBLAS's first guess)."""
    if cuda_ops:
        return lt_linear(h, weight, bias)
    return F.linear(h, weight, bias)


def gated_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
               beta: torch.Tensor, eps: float, cuda_ops: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum = x + y * gate + bias``, ``LN(sum) * weight + beta`` -> (normed, sum): one semvoc
    ``GatedSkipNorm`` with ``cuda_ops``, else a Mul and onnxruntime's ``SkipLayerNormalization``."""
    if cuda_ops:
        return gated_skip_norm(x, y, gate, bias, weight, beta, eps)
    return skip_layer_norm(x, y * gate, weight, beta, bias, eps)


class FusedBlock(nn.Module):
    """One ``DiTBlock`` (shares its parameters; only the q|k weights are concatenated).
    ``cross_attention_op``: the cross-attention is semvoc's ``CrossAttention`` op, and ``forward``'s
    mask is the bool key mask ``[B, S]`` (else the additive ``key_mask_bias``)."""

    def __init__(self, blk: DiTBlock, num_heads: int, cuda_ops: bool = False, cross_attention_op: bool = False):
        super().__init__()
        self.blk = blk
        self.heads = num_heads
        self.cuda_ops = cuda_ops
        self.cross_attention_op = cross_attention_op
        attn = blk.attn
        self.qk_norm = isinstance(attn.norm_q, nn.LayerNorm)
        self.rope = attn.rope_mode == "shared"
        # q|k|v as one GEMM where HeadNormRopeQkv takes it apart; else q|k as one GEMM and v
        self.fuse_qkv = cuda_ops and self.qk_norm and self.rope and fusion_enabled(QKV_NORM_ROPE)
        # ... and the norms, RoPE and the attention as one kernel (fp16, hd 64: checked in forward)
        self.qkv_attention_op = (self.fuse_qkv and fusion_enabled(QKV_ATTENTION)
                                 and attn.to_q.out_features == num_heads * QKV_ATTENTION_HEAD_SIZE)
        projections = [attn.to_q, attn.to_k] + ([attn.to_v] if self.fuse_qkv else [])
        self.w_qk = nn.Parameter(torch.cat([p.weight for p in projections]).detach().clone(), requires_grad=False)
        biased = any(p.bias is not None for p in projections)
        self.b_qk = None if not biased else nn.Parameter(
            torch.cat([_zeros_like_bias(p) for p in projections]).detach().clone(), requires_grad=False)
        if self.qk_norm:  # per-head affine of the joint qk-LayerNorm: [2H, hd]
            gamma = torch.stack([attn.norm_q.weight, attn.norm_k.weight]).repeat_interleave(num_heads, 0)
            beta = torch.stack([attn.norm_q.bias, attn.norm_k.bias]).repeat_interleave(num_heads, 0)
            self.qk_gamma = nn.Parameter(gamma.detach().clone(), requires_grad=False)
            self.qk_beta = nn.Parameter(beta.detach().clone(), requires_grad=False)
        ff = blk.mlp.net[0]
        self.gated = isinstance(ff, GEGLU)
        if self.gated:  # [value; gate] halves of one projection -> two GEMMs
            # views of the block's own projection (no copy)
            w_value, w_gate = ff.proj.weight.detach().chunk(2, dim=0)
            b_value, b_gate = ff.proj.bias.detach().chunk(2, dim=0)
            self.w_value = nn.Parameter(w_value, requires_grad=False)
            self.b_value = nn.Parameter(b_value, requires_grad=False)
            self.w_gate = nn.Parameter(w_gate, requires_grad=False)
            self.b_gate = nn.Parameter(b_gate, requires_grad=False)
        self.exact_gelu = not self.gated and ff.approximate == "none"
        # the skip path's and the first norm's semvoc ops, each switchable off for A/B exports
        self.fuse_concat_norm = cuda_ops and fusion_enabled("GatedConcatNorm")
        self.fuse_bias_norm = cuda_ops and fusion_enabled("BiasAddNorm")
        self.fuse_layer_norm = cuda_ops and fusion_enabled("LayerNorm")

    # ------------------------------------------------------------------ pieces

    def _linear(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return dit_linear(h, weight, bias, self.cuda_ops)

    def _self_attention(self, h: torch.Tensor, rope: tuple | None) -> torch.Tensor:
        attn = self.blk.attn
        batch, length, dim = h.shape
        qk = self._linear(h, self.w_qk, self.b_qk)  # [B, L, 2D], or [B, L, 3D] with v
        if self.qkv_attention_op and qk.dtype == torch.float16:  # one semvoc.cuda op: norms, RoPE, attention
            out = qkv_attention(qk, self.qk_gamma, self.qk_beta, rope[0], rope[1], attn.norm_q.eps, self.heads)
            return self._linear(out, attn.proj.weight)
        if self.fuse_qkv:  # one semvoc.cuda op: norms, RoPE, the q/k/v split
            q, k, v = head_norm_rope_qkv(qk, self.qk_gamma, self.qk_beta, rope[0], rope[1], attn.norm_q.eps)
            return self._linear(attention_packed(q, k, v, None, self.heads), attn.proj.weight)
        v = self._linear(h, attn.to_v.weight, attn.to_v.bias)
        if self.qk_norm and self.cuda_ops and self.rope:  # one semvoc.cuda op: norms, RoPE, q/k split
            q, k = head_norm_rope(qk, self.qk_gamma, self.qk_beta, rope[0], rope[1], attn.norm_q.eps)
        else:
            if self.qk_norm and self.cuda_ops:
                qk = head_norm(qk, self.qk_gamma, self.qk_beta, attn.norm_q.eps)
            elif self.qk_norm:
                heads = qk.reshape(batch, length, 2 * self.heads, -1)
                heads = F.layer_norm(heads, heads.shape[-1:], eps=attn.norm_q.eps)
                qk = (heads * self.qk_gamma + self.qk_beta).reshape(batch, length, 2 * dim)
            if self.rope:
                cos, sin, positions = rope
                qk = rotary(qk, cos, sin, positions, 2 * self.heads)
            q, k = qk.split(dim, dim=-1)
        return self._linear(attention_packed(q, k, v, None, self.heads), attn.proj.weight)

    def _cross_attention(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        cross = self.blk.cross_attn
        batch, length, dim = h.shape
        q = self._linear(h, cross.to_q.weight, cross.to_q.bias)
        if self.cross_attention_op and mask is not None and self.qk_norm and fusion_enabled(CROSS_Q_NORM):
            # the q-norm inside the attention op (its kernels norm q as they load it)
            norm = cross.norm_q
            return self._linear(cross_attention(q, k, v, mask, self.heads, norm.weight, norm.bias, norm.eps),
                                cross.proj.weight)
        if self.qk_norm and self.cuda_ops:
            q = head_norm(q, cross.norm_q.weight, cross.norm_q.bias, cross.norm_q.eps)
        elif self.qk_norm:
            q = cross.norm_q(q.reshape(batch, length, self.heads, -1)).reshape(batch, length, dim)
        if self.cross_attention_op and mask is not None:
            return self._linear(cross_attention(q, k, v, mask, self.heads), cross.proj.weight)
        return self._linear(attention_packed(q, k, v, mask, self.heads), cross.proj.weight)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        net = self.blk.mlp.net
        if self.gated and self.cuda_ops:  # one GEMM of both halves (the projection as it is), then one op
            hidden = bias_geglu(self._linear(h, net[0].proj.weight), net[0].proj.bias)
        elif self.gated:
            hidden = F.linear(h, self.w_value, self.b_value) * bias_gelu(F.linear(h, self.w_gate), self.b_gate)
        elif self.exact_gelu:
            hidden = bias_gelu(self._linear(h, net[0].proj.weight), net[0].proj.bias)
        else:
            hidden = net[0](h)
        return self._linear(hidden, net[2].weight)

    def _skip_input(self, x: torch.Tensor, pending: tuple | None, skip: torch.Tensor, norm1_w: torch.Tensor,
                    norm1_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A U-Net skip block's input: finish x with the pending MLP output, ``skip_linear(skip_norm(
        cat([x, skip])))``, then norm1 -> (h, x). With ``cuda_ops``: GatedConcatNorm, the GEMM,
        BiasAddNorm."""
        blk = self.blk
        skip_norm = blk.skip_norm if isinstance(blk.skip_norm, nn.LayerNorm) else None
        if self.fuse_concat_norm and pending is not None and skip_norm is not None:
            joined = gated_concat_norm(x, *pending, skip, skip_norm.weight, skip_norm.bias, skip_norm.eps)
        else:
            if pending is not None:
                out, gate, gbias = pending
                x = x + out * gate + gbias
            joined = blk.skip_norm(torch.cat([x, skip], dim=-1))
        if self.fuse_bias_norm:
            y = self._linear(joined, blk.skip_linear.weight)
            return bias_add_norm(y, _zeros_like_bias(blk.skip_linear), norm1_w, norm1_b, blk.norm1.eps)
        x = self._linear(joined, blk.skip_linear.weight, blk.skip_linear.bias)
        return F.layer_norm(x, x.shape[-1:], norm1_w, norm1_b, blk.norm1.eps), x

    # ------------------------------------------------------------------ block

    def forward(self, x: torch.Tensor, pending: tuple | None, rows: list[torch.Tensor], kv: tuple,
                mask: torch.Tensor | None, rope: tuple | None, skip: torch.Tensor | None):
        """x: the residual stream, still missing ``pending = (out, gate, gated_bias)`` of the
        previous block's MLP (None for the first). Returns ``(x, pending, x_complete)`` where
        ``x_complete`` is the previous block's finished output (for the U-Net skips)."""
        blk = self.blk
        norm1_w, norm1_b, gate_msa, gbias_msa, norm3_w, norm3_b, gate_mlp, gbias_mlp = rows
        completed = None
        if skip is not None:
            h, x = self._skip_input(x, pending, skip, norm1_w, norm1_b)
        elif pending is not None:
            h, x = gated_norm(x, *pending, norm1_w, norm1_b, blk.norm1.eps, self.cuda_ops)
            completed = x
        elif self.fuse_layer_norm:
            h = layer_norm(x, norm1_w, norm1_b, blk.norm1.eps)
        else:
            h = F.layer_norm(x, x.shape[-1:], norm1_w, norm1_b, blk.norm1.eps)
        attn_out = self._self_attention(h, rope)  # h is already modulated (folded into norm1's affine)
        if blk.use_context:
            h, x = gated_norm(x, attn_out, gate_msa, gbias_msa, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps,
                              self.cuda_ops)
            cross_out = self._cross_attention(h, kv[0], kv[1], mask)
            h, x = skip_layer_norm(x, cross_out, norm3_w, norm3_b, _zeros_like_bias(blk.cross_attn.proj),
                                   blk.norm3.eps)
        else:
            h, x = gated_norm(x, attn_out, gate_msa, gbias_msa, norm3_w, norm3_b, blk.norm3.eps, self.cuda_ops)
        return x, (self._feed_forward(h), gate_mlp, gbias_mlp), completed


class FusedDiT(nn.Module):
    """``UDiT`` in the fused form (see the module docstring); uses its weights in place (only the
    q|k projections are concatenated copies)."""

    def __init__(self, dit: UDiT, cuda_ops: bool = False):
        super().__init__()
        if not supports_fused(dit):
            raise ValueError("this UDiT configuration has no fused form; export uses the generic one")
        self.dit = dit
        self.heads = dit.cfg.num_heads
        self.cuda_ops = cuda_ops
        # read when the module is built (the export builds it): SEMVOC_EXPORT_WITHOUT=CrossAttention
        self.cross_attention_op = cuda_ops and fusion_enabled("CrossAttention")
        self.blocks = nn.ModuleList([FusedBlock(b, self.heads, cuda_ops, self.cross_attention_op)
                                     for b in dit.blocks])

    def _linear(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dit_linear(h, weight, bias, self.cuda_ops)

    def forward(self, x: torch.Tensor, step_rows: torch.Tensor, cross_kv: Sequence[torch.Tensor],
                context_mask: torch.Tensor | None) -> torch.Tensor:
        """x ``[B, C, T]``, step_rows ``[8 n + 2, D]`` (one row of ``time_table``), cross_kv
        ``(k_0, v_0, ..., k_n-1, v_n-1)`` ``[B, S, D]`` each (``fused_cross_kv``), context_mask
        ``[B, S]`` bool -> ``[B, C, T]``."""
        dit = self.dit
        h = dit.x_pe(conv1d_channels_last(x.transpose(1, 2), dit.patch_embed.proj, self._linear))  # [B, N, D]
        batch, length, _ = h.shape
        rope = None
        if any(b.rope for b in self.blocks):
            cos, sin = rope_tables(dit.blocks[0].attn.rotary.inv_freq, length, h.dtype)
            positions = torch.arange(length, device=h.device)[None].expand(batch, length)
            rope = (cos, sin, positions)
        if context_mask is None or self.cross_attention_op:
            mask = context_mask  # CrossAttention reads the bool mask itself
        else:
            mask = key_mask_bias(context_mask, length, h.dtype)
        n = len(self.blocks)
        rows = table_rows(step_rows)
        half, skips, pending = len(dit.in_blocks), [], None
        for i, blk in enumerate(self.blocks):
            skip = skips.pop() if (i > half and blk.blk.has_skip) else None
            block_rows = rows[ROWS_PER_BLOCK * i : ROWS_PER_BLOCK * (i + 1)]
            h, pending, completed = blk(h, pending, block_rows, tuple(cross_kv[2 * i : 2 * i + 2]), mask, rope, skip)
            if completed is not None and i - 1 < half and dit.cfg.skip:
                skips.append(completed)  # the previous block's output, finished by this block's norm
        final = dit.final_block
        weight, beta = rows[ROWS_PER_BLOCK * n : ROWS_PER_BLOCK * n + FINAL_ROWS]  # (zero rows follow)
        h, _ = gated_norm(h, *pending, weight, beta, final.norm.eps, self.cuda_ops)  # modulation folded in
        h = self._linear(h, final.linear.weight, final.linear.bias)  # [B, N, p*C]
        h = h.reshape(batch, length * final.patch_size, final.out_chans)  # [B, N p, C]
        if isinstance(final.final_layer, nn.Conv1d):
            h = conv1d_channels_last(h, final.final_layer, self._linear)
        return h.transpose(1, 2)
