"""semvoc's CUDA ops (``--cuda-kernels``): the fused ConvNeXt form against the model's own block,
what the export emits, the errors a user meets without nvcc or onnxruntime headers, and (on a
GPU with nvcc) each CUDA kernel against its PyTorch reference. ``SEMVOC_TEST_CUDA_LIBRARY`` names
a library built beforehand (``python -m semvoc.kernels.cuda_build --out DIR``, on any machine) to
test instead of building one here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from semvoc.kernels import cuda_build
from semvoc.kernels.bias_geglu import bias_geglu_reference
from semvoc.kernels.bias_norm import bias_norm_reference
from semvoc.kernels.bias_prelu import bias_prelu_reference
from semvoc.kernels.bias_residual import bias_residual_reference
from semvoc.kernels.convnext_mix import convnext_mix_reference
from semvoc.kernels.cross_attention import cross_attention_reference
from semvoc.kernels.gated_skip_norm import gated_skip_norm_reference
from semvoc.kernels.head_norm import head_norm_reference, head_norm_rope_qkv, head_norm_rope_reference
from semvoc.kernels.onnx_ops import CUDA_DOMAIN, WITHOUT_ENV, translation_table
from semvoc.kernels.skip_norm import bias_add_norm_reference, gated_concat_norm_reference, layer_norm_reference
from semvoc.kernels.split_mlp import split_mlp_reference
from semvoc.models.vocoder import ConvNeXtBlock


def _block(channels=12, hidden=20, kernel=7, residual_scale=1.0, seed=0) -> ConvNeXtBlock:
    torch.manual_seed(seed)
    block = ConvNeXtBlock(channels, hidden, kernel, cond_channels=8, time_channels=6,
                          residual_scale=residual_scale).eval()
    with torch.no_grad():  # non-trivial norm and scale parameters (checkpoints are not at init)
        block.norm.bias.normal_()
        block.norm.log_scale.fill_(0.3)
        block.act.weight.uniform_(-0.5, 0.5)
        if residual_scale is not None:
            block.residual_scale.scale.uniform_(0.5, 1.5)
    return block


def _inputs(block: ConvNeXtBlock, batch=2, length=37, seed=1):
    gen = torch.Generator().manual_seed(seed)
    channels = block.dwconv.in_channels
    return (torch.randn(batch, channels, length, generator=gen), torch.randn(batch, channels, length, generator=gen),
            1 + 0.1 * torch.randn(1, channels, generator=gen))


@pytest.mark.parametrize("without", ["", "LtGemm"])
@pytest.mark.parametrize("residual_scale", [1.0, None])
def test_channels_last_block_is_the_block(residual_scale, without, monkeypatch):
    monkeypatch.setenv(WITHOUT_ENV, without)
    block = _block(residual_scale=residual_scale)
    x, cond, scale = _inputs(block)
    with torch.no_grad():
        expected = block.forward_prepared(x, cond, scale)
        fused = block.forward_channels_last(x.transpose(1, 2), cond.transpose(1, 2), scale).transpose(1, 2)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_channels_last_vocoder_step_is_the_step():
    """The --cuda-kernels step graph's module (channels-last tables) against the plain one."""
    from semvoc.export import wrappers as W
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    vocoder = build_model(preset("demo"), seed=0).vocoder.eval()
    vocoder.use_export_kernels()
    frames = 5
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, vocoder.cfg.latent_dim, frames, generator=gen)
    t = torch.linspace(0, 1, 9)[:8]
    times = W.VocoderTime(vocoder)(t)
    audio = 0.1 * torch.randn(1, frames * vocoder.cfg.hop_length, generator=gen)
    step, t_span = torch.tensor([3]), torch.linspace(0, 1, 9)
    with torch.no_grad():
        plain = W.VocoderStep(vocoder)(audio, step, t_span, *W.VocoderPrepare(vocoder)(latents), *times)
        tables = W.VocoderPrepare(vocoder, channels_last=True)(latents)
        reference = W.VocoderStep(vocoder, channels_last=True)(audio, step, t_span, *tables, *times)
        vocoder.use_export_kernels(cuda_ops=True)
        fused = W.VocoderStep(vocoder, channels_last=True)(audio, step, t_span, *tables, *times)
    torch.testing.assert_close(reference[0], plain[0])
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)


def test_references_are_what_the_kernels_document():
    gen = torch.Generator().manual_seed(3)
    y, x = torch.randn(2, 9, 5, generator=gen), torch.randn(2, 9, 5, generator=gen)  # [B, L, C]
    bias, slope, scale = (torch.randn(5, generator=gen) for _ in range(3))
    v = y + bias
    torch.testing.assert_close(bias_prelu_reference(y, bias, slope), torch.where(v > 0, v, v * slope))
    torch.testing.assert_close(bias_residual_reference(y, bias, x, scale), y + bias + x * scale)
    # ConvNeXtMix's BiasNorm: over channels, no centring of the output, no epsilon
    weight, dw_bias, norm_bias = torch.randn(5, 1, 3, generator=gen), torch.randn(5, generator=gen), torch.randn(5)
    cond, ts = torch.randn(2, 9, 5, generator=gen), torch.randn(2, 5, generator=gen)
    conv = torch.nn.functional.conv1d(x.transpose(1, 2), weight, dw_bias, padding=1, groups=5).transpose(1, 2)
    normed = conv / ((conv - norm_bias) ** 2).mean(-1, keepdim=True).sqrt() * np.exp(0.2)
    torch.testing.assert_close(convnext_mix_reference(x, weight, dw_bias, norm_bias, torch.tensor(0.2), cond, ts),
                               (normed + cond) * ts[:, None, :], rtol=1e-5, atol=1e-5)


def _block_graph(tmp_path: Path, residual_scale: float | None = 1.0, dtype=torch.float32):
    """A vocoder block's channels-last export form, exported alone -> (its graph, the block)."""
    block = _block(residual_scale=residual_scale).to(dtype)
    x, cond, scale = ((t.transpose(1, 2) if t.dim() == 3 else t).to(dtype) for t in _inputs(block))

    class Step(torch.nn.Module):
        def forward(self, x, cond, scale):
            return block.forward_channels_last(x, cond, scale)

    path = tmp_path / "block.onnx"
    torch.onnx.export(Step().eval(), (x, cond, scale), dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    return onnx.load(str(path)).graph, block


def test_export_emits_one_cuda_op_each_and_plain_gemms(tmp_path, monkeypatch):
    monkeypatch.delenv("SEMVOC_EXPORT_WITHOUT", raising=False)
    graph, _ = _block_graph(tmp_path)
    ours = sorted(n.op_type for n in graph.node if n.domain == CUDA_DOMAIN)
    # the block's residual is scaled per channel: BiasResidual (cuBLASLt has no fp16 beta vector)
    assert ours == ["BiasPRelu", "BiasResidual", "ConvNeXtMix"]
    assert [n.op_type for n in graph.node if n.domain != CUDA_DOMAIN] == ["MatMul", "MatMul"]


def test_vocoder_step_with_cuda_ops_exports_folded_branches(tmp_path, monkeypatch):
    """Each branch: one GEMM from the frames, BiasNorm, the blocks reading the whole tables (no
    Split), one GEMM to frame pieces, overlap-add; no STFT basis, envelope or branch stack left."""
    monkeypatch.delenv("SEMVOC_EXPORT_WITHOUT", raising=False)
    step, args = _demo_folded_step_args(frames=4, step=2)
    vocoder = step.vocoder
    assert vocoder.folded
    path = tmp_path / "vocoder_step.onnx"
    torch.onnx.export(step, args, dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    nodes = onnx.load(str(path)).graph.node
    ops = [n.op_type for n in nodes]
    branches, layers = len(vocoder.estimators), sum(vocoder.cfg.num_layers)
    assert ops.count("BiasNorm") == branches and ops.count("ConvNeXtMix") == layers
    assert {"Split", "ReduceMean", "Pow", "Expand"}.isdisjoint(ops)
    # the frames of each branch and the step's end (overlap-add, branch sum, update): one op each
    assert ops.count("AudioFrames") == branches and ops.count("EulerOverlapAdd") == 1
    assert sorted(a.i for n in nodes if n.op_type == "AudioFrames" for a in n.attribute) == sorted(
        vocoder.cfg.hop_lengths)
    assert {"Pad", "Concat", "Slice", "Div", "Sub"}.isdisjoint(ops)
    # per branch a GEMM from the frames and one to the pieces (LtGemm, its bias inside); per block
    # the PReLU split's MLP as one SplitMlp after the widened ConvNeXtMix, nothing between them
    # (tests/test_prelu_split.py; an fp32 export always splits)
    assert ops.count("MatMul") == branches and ops.count("LtGemm") == branches
    assert ops.count("SplitMlp") == layers
    assert ops.count("BiasResidual") == ops.count("BiasPRelu") == 0
    mix_layers = sorted(a.i for n in nodes if n.op_type == "ConvNeXtMix" for a in n.attribute if a.name == "layer")
    assert mix_layers == sorted(i for n in vocoder.cfg.num_layers for i in range(n))


def _demo_folded_step_args(frames: int = 5, step: int = 3):
    from semvoc.export import wrappers as W
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    vocoder = build_model(preset("demo"), seed=0).vocoder.eval()
    vocoder.use_export_kernels(cuda_ops=True)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, vocoder.cfg.latent_dim, frames, generator=gen)
    tables = (*W.VocoderPrepare(vocoder, channels_last=True)(latents),
              *W.VocoderTime(vocoder)(torch.linspace(0, 1, 9)[:8]))
    args = (0.1 * torch.randn(1, frames * vocoder.cfg.hop_length, generator=gen), torch.tensor([step]),
            torch.linspace(0, 1, 9), *tables)
    return W.VocoderStep(vocoder, channels_last=True).eval(), args


@pytest.mark.parametrize("pred_x1", [True, False])
def test_vocoder_step_ends_are_the_stock_ops_to_the_bit(pred_x1, monkeypatch):
    """AudioFrames and EulerOverlapAdd (their PyTorch references) compute what the stock form
    computes, in the same order: the folded step is the same to the bit with and without them."""
    import dataclasses

    step, args = _demo_folded_step_args()
    step.vocoder.cfg = dataclasses.replace(step.vocoder.cfg, pred_x1=pred_x1)
    with torch.no_grad():
        monkeypatch.setenv(WITHOUT_ENV, "AudioFrames,EulerOverlapAdd")
        stock = step(*args)[0]
        monkeypatch.setenv(WITHOUT_ENV, "")
        fused = step(*args)[0]
    assert fused.dtype == torch.float32 and torch.equal(fused, stock)


def test_vocoder_step_without_its_end_ops_exports_the_stock_form(tmp_path, monkeypatch):
    monkeypatch.setenv(WITHOUT_ENV, "AudioFrames,EulerOverlapAdd")
    step, args = _demo_folded_step_args()
    path = tmp_path / "vocoder_step.onnx"
    torch.onnx.export(step, args, dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "AudioFrames" not in ops and "EulerOverlapAdd" not in ops
    assert ops.count("Pad") == len(step.vocoder.estimators) and "Div" in ops


def test_vocoder_step_end_references_are_what_the_kernels_document():
    """The index arithmetic of cuda/audio_frames.cu and cuda/euler_overlap_add.cu, written out
    sample by sample, against the references."""
    from semvoc.kernels.audio_frames import audio_frames_reference
    from semvoc.kernels.euler_overlap_add import euler_overlap_add_reference

    gen = torch.Generator().manual_seed(5)
    batch, hop, length = 2, 3, 12
    x = torch.randn(batch, length, generator=gen)
    frames = audio_frames_reference(x, hop)
    assert frames.shape == (batch, length // hop + 1, 2 * hop)
    for f in range(frames.shape[1]):
        for j in range(2 * hop):
            a = f * hop + j - hop
            a = -a if a < 0 else a
            a = 2 * (length - 1) - a if a >= length else a
            assert torch.equal(frames[:, f, j], x[:, a])
    hops = (3, 6)
    pieces = [torch.randn(batch, length // h + 1, 2 * h, generator=gen) for h in hops]
    t_span, step = torch.linspace(0, 1, 5), torch.tensor([2])
    audio = torch.randn(batch, length, generator=gen)
    out = euler_overlap_add_reference(audio, step, t_span, pieces, pred_x1=True)
    t, dt = t_span[2], t_span[1] - t_span[0]
    for s in range(length):
        pred = sum(p[:, s // h + 1, s % h] + p[:, s // h, h + s % h] for p, h in zip(pieces, hops, strict=True))
        torch.testing.assert_close(out[:, s], audio[:, s] + (pred - audio[:, s]) / (1 - t) * dt)


def _export_demo_dit_step(path: Path):
    """The demo DiT's step graph with --cuda-kernels -> (its nodes, its graph inputs, the DiT's blocks)."""
    from semvoc.export import wrappers as W
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    dit = build_model(preset("demo"), seed=0).dit.eval()
    assert dit.cfg.qk_norm == "layernorm" and dit.cfg.rope_mode == "shared" and dit.cfg.act_layer == "geglu"
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 6, dit.cfg.context_dim, generator=gen)
    args = (torch.randn(1, dit.cfg.in_chans, 10, generator=gen), torch.tensor([1]),
            W.FusedDitTime(dit)(torch.tensor([900.0, 400.0])), torch.tensor([1.0, 0.5, 0.0]),
            *W.FusedDitPrepare(dit)(context), torch.ones(1, 6, dtype=torch.bool), torch.tensor([3.5]))
    torch.onnx.export(W.FusedDitStep(dit, cuda_ops=True).eval(), args, dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    graph = onnx.load(str(path)).graph
    return graph.node, graph.input, dit.blocks


def test_dit_step_with_cuda_ops_exports_semvoc_ops(tmp_path, monkeypatch):
    from semvoc.kernels.onnx_ops import WITHOUT_ENV

    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    nodes, inputs, blocks = _export_demo_dit_step(tmp_path / "dit_step.onnx")
    ops = [n.op_type for n in nodes]
    # the U-Net skip path: GatedConcatNorm, skip_linear's GEMM, BiasAddNorm (bias + norm1); the
    # first block's norm1 is semvoc's LayerNorm: no Concat into a norm, no stock LayerNormalization
    skips = sum(1 for b in blocks if b.has_skip)
    assert skips > 0
    assert ops.count("GatedConcatNorm") == ops.count("BiasAddNorm") == skips and ops.count("LayerNorm") == 1
    assert "LayerNormalization" not in ops
    produced = {n.output[0]: n.op_type for n in nodes}
    assert "MatMul" not in ops  # every linear layer is an LtGemm (its algorithm timed once, recorded)
    assert {produced.get(n.input[0]) for n in nodes if n.op_type == "BiasAddNorm"} == {"LtGemm"}
    concat_readers = [n.op_type for n in nodes if n.input and produced.get(n.input[0]) == "Concat"]
    assert "LayerNormalization" not in concat_readers
    assert concat_readers.count("LtGemm") == 1  # the final 3-tap conv (conv_as_gemm)
    # self q|k|v from one GEMM, its q|k norms and RoPE: HeadNormRopeQkv; the cross-attention q-norm
    # is inside CrossAttention
    assert ops.count("HeadNormRopeQkv") == len(blocks) and "HeadNormRope" not in ops and "HeadNorm" not in ops
    produced = {o: n.op_type for n in nodes for o in n.output}
    assert {produced[n.input[0]] for n in nodes if n.op_type == "HeadNormRopeQkv"} == {"LtGemm"}
    assert all(set(n.input[:3]) <= {o for m in nodes if m.op_type == "HeadNormRopeQkv" for o in m.output}
               for n in nodes if n.op_type == "Attention")  # q, k and v of every self-attention
    # cross-attention: one CrossAttention per block on the bool text mask (no additive bias built),
    # onnxruntime's Attention for the self-attention only
    assert ops.count("CrossAttention") == len(blocks) and ops.count("Attention") == len(blocks)
    assert "Where" not in ops and "Not" not in ops
    cross = [n for n in nodes if n.op_type == "CrossAttention"]
    norm_q = blocks[0].cross_attn.norm_q
    assert {a.name: a.i for a in cross[0].attribute if a.name == "num_heads"} == {"num_heads": blocks[0].attn.num_heads}
    assert [a.f for a in cross[0].attribute if a.name == "epsilon"] == [pytest.approx(norm_q.eps)]
    assert len(cross[0].input) == 6  # q, k, v, key_mask, q_gamma, q_beta
    masks = {n.input[3] for n in cross}
    assert len(masks) == 1  # every block reads one mask: the [uncond; cond] concatenation of the input
    (concat,) = [n for n in nodes if masks & set(n.output)]
    (mask_input,) = [i for i in inputs if i.type.tensor_type.elem_type == onnx.TensorProto.BOOL]
    assert concat.op_type == "Concat" and list(concat.input) == [mask_input.name] * 2
    # the export's structure check (full ONNX check, fused attention count) accepts the graph
    from semvoc.export.graphs import GraphSpec
    from semvoc.export.onnx_export import check_structure

    spec = GraphSpec("dit_step", "dit", lambda m: m, (), (), attention_checked=True)
    assert check_structure(spec, tmp_path / "dit_step.onnx", 2 * len(blocks))["attention"] == 2 * len(blocks)
    with pytest.raises(RuntimeError, match="fused attention ops, expected"):
        check_structure(spec, tmp_path / "dit_step.onnx", 3 * len(blocks))
    assert ops.count("BiasGeglu") == len(blocks) and "BiasGelu" not in ops
    # gated residual + norm: each block's attention output, each MLP output the next norm reads
    # directly (not a U-Net skip block's, which first concatenates), and the final layer's
    later_plain = sum(1 for i, b in enumerate(blocks) if i > 0 and not b.has_skip)
    assert ops.count("GatedSkipNorm") == len(blocks) + later_plain + 1
    assert "RotaryEmbedding" not in ops
    # the step's table rows: two levels of Splits of at most 32 outputs (onnxruntime's one-kernel
    # Split), not one Split per block
    from semvoc.export.fused_dit import ROWS_PER_BLOCK, SPLIT_OUTPUTS
    from semvoc.export.onnx_export import host_copying_nodes

    table_rows = ROWS_PER_BLOCK * len(blocks) + 2
    splits = [n for n in nodes if n.op_type == "Split"]
    assert len(splits) == 1 + -(-table_rows // SPLIT_OUTPUTS) < len(blocks)
    assert all(len(n.output) <= SPLIT_OUTPUTS for n in splits)
    assert host_copying_nodes(tmp_path / "dit_step.onnx") == []  # equal parts: nothing copied per run

    def readers(op: str, output: int) -> set[str]:
        produced = {n.output[output] for n in nodes if n.op_type == op}
        return {n.op_type for n in nodes if produced & set(n.input)}

    assert readers("HeadNormRopeQkv", 0) == readers("HeadNormRopeQkv", 1) == readers("HeadNormRopeQkv", 2) == {
        "Attention"}  # no Split between
    # the adaLN modulation is in the norm's affine: GEMMs read it directly
    assert readers("GatedSkipNorm", 0) == {"LtGemm"}
    assert readers("CrossAttention", 0) == {"LtGemm"}  # straight into the out-projection


def test_dit_step_without_the_qkv_op_keeps_two_gemms_and_head_norm_rope(tmp_path, monkeypatch):
    """SEMVOC_EXPORT_WITHOUT=HeadNormRopeQkv: q|k and v as two GEMMs again, and HeadNormRope."""
    from semvoc.kernels.onnx_ops import WITHOUT_ENV

    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    fused_ops = [n.op_type for n in _export_demo_dit_step(tmp_path / "fused.onnx")[0]]
    monkeypatch.setenv(WITHOUT_ENV, "HeadNormRopeQkv")
    nodes, _, blocks = _export_demo_dit_step(tmp_path / "dit_step.onnx")
    ops = [n.op_type for n in nodes]
    assert "HeadNormRopeQkv" not in ops and ops.count("HeadNormRope") == len(blocks)
    assert ops.count("LtGemm") == fused_ops.count("LtGemm") + len(blocks)  # each block's v projection


def test_dit_step_without_the_fused_q_norm_keeps_head_norm(tmp_path, monkeypatch):
    monkeypatch.setenv(WITHOUT_ENV, "CrossAttentionQNorm")
    nodes, _, blocks = _export_demo_dit_step(tmp_path / "dit_step.onnx")
    cross = [n for n in nodes if n.op_type == "CrossAttention"]
    assert [n.op_type for n in nodes].count("HeadNorm") == len(blocks) == len(cross)
    assert all(len(n.input) == 4 for n in cross)


def test_dit_step_without_the_cross_attention_op_keeps_the_stock_attention(tmp_path, monkeypatch):
    """SEMVOC_EXPORT_WITHOUT=CrossAttention: the previous graph (Attention on an additive mask bias)."""
    from semvoc.kernels.onnx_ops import WITHOUT_ENV

    monkeypatch.setenv(WITHOUT_ENV, "CrossAttention")
    nodes, _, blocks = _export_demo_dit_step(tmp_path / "dit_step.onnx")
    ops = [n.op_type for n in nodes]
    assert "CrossAttention" not in ops and ops.count("Attention") == 2 * len(blocks)
    assert ops.count("HeadNorm") == len(blocks) and ops.count("HeadNormRopeQkv") == len(blocks)  # the others stay
    attentions = [n for n in nodes if n.op_type == "Attention"]
    assert sum(len(n.input) == 4 for n in attentions) == len(blocks)  # the cross ones carry the mask bias


def _cross_case(rows: int, mask_rows: int, length: int, keys: int, heads: int, hd: int, valid, seed: int = 5):
    """q [rows, length, heads*hd], k, v [rows, keys, heads*hd] and a bool mask [mask_rows, keys]; ``valid``
    per mask row: a count (the text's tokens, a prefix), or a list of the true keys."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(rows, n, heads * hd, generator=g) for n in (length, keys, keys))
    mask = torch.zeros(mask_rows, keys, dtype=torch.bool)
    for r, which in enumerate(valid):
        if isinstance(which, int):
            mask[r, :which] = True
        else:
            mask[r, which] = True
    return [q, k, v, mask]


def test_cross_attention_reference_is_the_unfused_attention():
    """fp32 against the two forms the DiT uses today: onnxruntime's Attention on the additive bias
    (``attention_packed`` + ``key_mask_bias``) and the model's own SDPA with the bool mask; odd
    sizes, mask rows read as r % R' (the CFG batch), one true key, non-prefix masks."""
    from semvoc.kernels.attention import attention, attention_packed_reference, key_mask_bias

    heads, hd = 3, 24
    q, k, v, mask = _cross_case(6, 3, 37, 13, heads, hd, [1, [0, 4, 5, 12], 13])
    out = cross_attention_reference(q, k, v, mask, heads)
    rows_mask = torch.cat([mask, mask])  # what the wrappers build: [uncond; cond]
    bias = key_mask_bias(rows_mask, 37, torch.float32)
    torch.testing.assert_close(out, attention_packed_reference(q, k, v, bias, heads), rtol=1e-6, atol=1e-6)

    def split(x):
        return x.reshape(6, x.shape[1], heads, hd).transpose(1, 2)

    torch.testing.assert_close(out, attention(split(q), split(k), split(v), rows_mask), rtol=1e-6, atol=1e-6)
    # a single true key: that key's v, exactly
    torch.testing.assert_close(out[0], v[0, :1].expand(37, -1))
    # a [2 batch, S] mask (the concatenation itself) gives the same
    torch.testing.assert_close(cross_attention_reference(q, k, v, rows_mask, heads), out)
    # fp16 inputs: the fp32 result, rounded once
    half = cross_attention_reference(*(t.half() for t in (q, k, v)), mask, heads)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, cross_attention_reference(*(t.half().float() for t in (q, k, v)), mask,
                                                               heads).half(), rtol=0, atol=0)


def test_cross_attention_reference_edges():
    q, k, v, mask = _cross_case(2, 2, 5, 7, 2, 8, [0, 7])
    out = cross_attention_reference(q, k, v, mask, 2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no true key: zeros (as SDPA's bool mask gives)
    assert torch.isfinite(out).all() and out[1].abs().max() > 0
    with pytest.raises(ValueError, match=r"R' dividing the 2 rows"):
        cross_attention_reference(q, k, v, torch.ones(3, 7, dtype=torch.bool), 2)


def test_fused_dit_uses_the_cross_attention_op_unless_switched_off(monkeypatch):
    from semvoc.export.fused_dit import FusedDiT
    from semvoc.kernels.onnx_ops import WITHOUT_ENV
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    dit = build_model(preset("demo"), seed=0).dit.eval()
    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    assert FusedDiT(dit, cuda_ops=True).cross_attention_op and not FusedDiT(dit).cross_attention_op
    monkeypatch.setenv(WITHOUT_ENV, "CrossAttention")
    fused = FusedDiT(dit, cuda_ops=True)
    assert not fused.cross_attention_op and not any(b.cross_attention_op for b in fused.blocks)


def test_cross_attention_with_its_q_norm_is_the_separate_norm(monkeypatch):
    """The fused DiT's cross-attention with the q-norm inside the op (its reference) against the
    q-norm as its own op, in fp32: the same function."""
    from semvoc.export.fused_dit import FusedDiT
    from semvoc.kernels.onnx_ops import WITHOUT_ENV
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    dit = build_model(preset("demo"), seed=0).dit.eval()
    block = FusedDiT(dit, cuda_ops=True).blocks[0]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        block.blk.cross_attn.norm_q.weight.uniform_(0.5, 1.5)
        block.blk.cross_attn.norm_q.bias.normal_(0, 0.2)
        h = torch.randn(2, 10, dit.cfg.embed_dim, generator=gen)
        k, v = (torch.randn(2, 6, dit.cfg.embed_dim, generator=gen) for _ in range(2))
        mask = torch.tensor([[True] * 4 + [False] * 2])
        monkeypatch.delenv(WITHOUT_ENV, raising=False)
        fused = block._cross_attention(h, k, v, mask)
        monkeypatch.setenv(WITHOUT_ENV, "CrossAttentionQNorm")
        separate = block._cross_attention(h, k, v, mask)
    torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("without", ["GatedConcatNorm", "BiasAddNorm,LayerNorm"])
def test_dit_step_export_without_the_skip_path_ops(without, tmp_path, monkeypatch):
    """SEMVOC_EXPORT_WITHOUT gives back the stock form of the switched-off ops only (for A/B runs)."""
    monkeypatch.setenv(WITHOUT_ENV, without)
    nodes, _, blocks = _export_demo_dit_step(tmp_path / "dit_step.onnx")
    ops = [n.op_type for n in nodes]
    skips = sum(1 for b in blocks if b.has_skip)
    produced = {o: n.op_type for n in nodes for o in n.output}
    concat_norms = sum(1 for n in nodes if n.op_type == "LayerNormalization" and produced.get(n.input[0]) == "Concat")
    if without == "GatedConcatNorm":
        assert "GatedConcatNorm" not in ops and concat_norms == skips
        assert ops.count("BiasAddNorm") == skips and ops.count("LayerNorm") == 1
        assert ops.count("LayerNormalization") == skips
    else:
        assert ops.count("GatedConcatNorm") == skips and concat_norms == 0
        assert "BiasAddNorm" not in ops and "LayerNorm" not in ops
        assert ops.count("LayerNormalization") == skips + 1  # norm1 after each skip_linear, the first block's
    assert ops.count("GatedSkipNorm") == len(blocks) + sum(
        1 for i, b in enumerate(blocks) if i > 0 and not b.has_skip) + 1


@pytest.mark.parametrize("shape", [(3, 7, 13), (1, 5, 64), (2, 33)])
def test_skip_path_references_are_the_unfused_math(shape):
    """fp32, odd widths: GatedConcatNorm is the gated residual, the concatenation and skip_norm;
    BiasAddNorm is skip_linear's bias and norm1; LayerNorm is nn.LayerNorm's function."""
    gen = torch.Generator().manual_seed(6)
    dim = shape[-1]
    # a residual stream far from zero mean (where one-pass statistics would lose digits)
    x = 30 + 4 * torch.randn(shape, generator=gen)
    out, skip = torch.randn(shape, generator=gen), 2 * torch.randn(shape, generator=gen) - 1
    gate, gbias = 1 + 0.1 * torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    skip_norm = torch.nn.LayerNorm(2 * dim)
    linear = torch.nn.Linear(2 * dim, dim)
    with torch.no_grad():
        skip_norm.weight.uniform_(0.5, 1.5)
        skip_norm.bias.normal_()
        joined = skip_norm(torch.cat([x + out * gate + gbias, skip], dim=-1))
        fused = gated_concat_norm_reference(x, out, gate, gbias, skip, skip_norm.weight, skip_norm.bias,
                                            skip_norm.eps)
        torch.testing.assert_close(fused, joined, rtol=1e-5, atol=1e-5)
        gamma, beta = 1 + torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
        h, total = bias_add_norm_reference(torch.nn.functional.linear(joined, linear.weight), linear.bias, gamma,
                                           beta, 1e-5)
        stream = linear(joined)
        torch.testing.assert_close(total, stream, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h, torch.nn.functional.layer_norm(stream, (dim,), gamma, beta, 1e-5),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer_norm_reference(x, gamma, beta, 1e-6),
                                   torch.nn.functional.layer_norm(x, (dim,), gamma, beta, 1e-6), rtol=1e-5, atol=1e-5)


def test_skip_path_references_round_like_the_graph_in_fp16():
    """fp16: the gated sum is rounded once to fp16 (the value the stock graph held), the statistics
    and the affine stay in fp32, and the output is rounded once."""
    gen = torch.Generator().manual_seed(8)
    x, out, skip = (torch.randn(4, 96, generator=gen) * 3 for _ in range(3))
    gate, gbias, gamma, beta = (torch.randn(96, generator=gen) for _ in range(4))
    gamma2, beta2 = torch.randn(192, generator=gen), torch.randn(192, generator=gen)
    half = [t.half() for t in (x, out, gate, gbias, skip, gamma2, beta2)]
    got = gated_concat_norm_reference(*half, 1e-5)
    assert got.dtype == torch.float16
    total = (half[0].float() + half[1].float() * half[2].float() + half[3].float()).half().float()
    want = torch.nn.functional.layer_norm(torch.cat([total, half[4].float()], -1), (192,), half[5].float(),
                                          half[6].float(), 1e-5).half()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    h, total = bias_add_norm_reference(x.half(), gbias.half(), gamma.half(), beta.half(), 1e-5)
    assert h.dtype == total.dtype == torch.float16
    torch.testing.assert_close(total, (x.half().float() + gbias.half().float()).half(), rtol=0, atol=0)


def test_semvoc_dit_op_references():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    gate, bias, gamma, beta = (torch.randn(16, generator=gen) for _ in range(4))
    h, total = gated_skip_norm_reference(x, y, gate, bias, gamma, beta, 1e-5)
    torch.testing.assert_close(total, x + y * gate + bias)
    torch.testing.assert_close(h, torch.nn.functional.layer_norm(x + y * gate + bias, (16,), gamma, beta, 1e-5),
                               rtol=1e-5, atol=1e-5)
    from semvoc.models.udit import GEGLU

    geglu = GEGLU(16, 24)
    torch.testing.assert_close(bias_geglu_reference(torch.nn.functional.linear(x, geglu.proj.weight), geglu.proj.bias),
                               geglu(x), rtol=1e-5, atol=1e-5)


def test_head_norm_references():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3 * 64, generator=gen)
    gamma, beta = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    heads = x.reshape(2, 7, 3, 64)
    expected = (heads - heads.mean(-1, keepdim=True)) / torch.sqrt(heads.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(head_norm_reference(x, gamma, beta, 1e-5), expected * gamma + beta, rtol=1e-5,
                               atol=1e-5)
    from semvoc.kernels.rotary import rope_tables, rotary_reference

    cos, sin = rope_tables(1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)), 9, torch.float32)
    normed = head_norm_reference(x, gamma, beta, 1e-5).reshape(x.shape)
    positions = torch.arange(7)[None].expand(2, 7)
    torch.testing.assert_close(head_norm_rope_reference(x, gamma, beta, cos, sin, 1e-5),
                               rotary_reference(normed, cos, sin, positions, 3), rtol=1e-5, atol=1e-5)


def test_build_explains_a_bad_header_folder_and_missing_nvcc(tmp_path, monkeypatch):
    monkeypatch.delenv(cuda_build.ORT_INCLUDE_ENV, raising=False)
    assert cuda_build.find_ort_include() is None  # semvoc's own cuda/ort_api.h
    with pytest.raises(cuda_build.KernelBuildError, match=r"has no onnxruntime_c_api\.h"):
        cuda_build.build_library(tmp_path / "out", ort_include=tmp_path)
    monkeypatch.setenv(cuda_build.ORT_INCLUDE_ENV, str(tmp_path))
    with pytest.raises(cuda_build.KernelBuildError, match=r"SEMVOC_ORT_INCLUDE .* has no onnxruntime_c_api\.h"):
        cuda_build.build_library(tmp_path / "out")
    monkeypatch.delenv(cuda_build.ORT_INCLUDE_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cuda_build, "DEFAULT_CUDA_ROOT", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(cuda_build, "_wheel_nvcc", list)
    with pytest.raises(cuda_build.KernelBuildError, match=r"nvcc .*semvoc\[cuda-kernels\]"):
        cuda_build.build_library(tmp_path / "out")
    assert not (tmp_path / "out" / cuda_build.LIBRARY_NAME).exists()


def test_unsupported_vocoders_are_named():
    assert cuda_build.unsupported_reason((768, 512, 384), (7, 7, 7)) is None
    assert "2048 channels" in cuda_build.unsupported_reason((2048,), (7,))
    assert "[11]" in cuda_build.unsupported_reason((512,), (11,))
    assert cuda_build.dit_unsupported_reason(1024, 16) is None
    assert "heads of 32" in cuda_build.dit_unsupported_reason(512, 16)
    assert "width of 2048" in cuda_build.dit_unsupported_reason(2048, 16)


def test_cuda_kernels_cover_the_dit_where_they_can(capsys):
    from semvoc.export.engine import ExportError, ExportOptions, _dit_cuda_ops
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    demo = build_model(preset("demo"), seed=0)  # head size 16: not covered
    assert not _dit_cuda_ops(demo, ExportOptions(out="x", cuda_kernels=True), fused=True)
    assert "the DiT keeps onnxruntime's ops (attention heads of 16" in capsys.readouterr().err
    with pytest.raises(ExportError, match="heads of 16"):
        _dit_cuda_ops(demo, ExportOptions(out="x", cuda_kernels=True, cuda_dit_kernels=True), fused=True)
    small = build_model(preset("small"), seed=0)  # 384 wide, 6 heads of 64
    assert _dit_cuda_ops(small, ExportOptions(out="x", cuda_kernels=True), fused=True)
    assert not _dit_cuda_ops(small, ExportOptions(out="x", cuda_kernels=True), fused=False)
    assert not _dit_cuda_ops(small, ExportOptions(out="x", cuda_kernels=True, cuda_dit_kernels=False), fused=True)
    assert not _dit_cuda_ops(small, ExportOptions(out="x"), fused=True)


def test_cuda_kernel_engines_refuse_other_backends(tmp_path):
    from semvoc.runtime.backends.base import BackendUnavailable
    from semvoc.runtime.manifest import Manifest
    from semvoc.runtime.select import make_backend

    manifest = Manifest(tmp_path, {"graphs": {}, "custom_ops": {"library": "kernels/libsemvoc_cuda.so"}})
    assert manifest.custom_ops_library == tmp_path / "kernels" / "libsemvoc_cuda.so"
    for backend in ("onnxruntime-cpu", "tensorrt"):
        with pytest.raises(BackendUnavailable, match="--cuda-kernels"):
            make_backend(backend, manifest)


def test_export_with_cuda_kernels_needs_a_gpu(tmp_path):
    from semvoc.export.cli import main

    # parity of the custom ops can only be checked on onnxruntime's CUDA EP: refused, nothing written
    assert main(["--preset", "demo", "--components", "vocoder", "--durations", "1", "--batch-sizes", "1",
                 "--cuda-kernels", "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory) -> Path:
    from semvoc.runtime.backends.ort_common import cuda_available

    if not cuda_available():
        pytest.skip("needs a CUDA GPU with onnxruntime-gpu")
    prebuilt = os.environ.get("SEMVOC_TEST_CUDA_LIBRARY")
    if prebuilt:  # a library built elsewhere, e.g. on a CPU-only machine with pip's nvcc
        return Path(prebuilt).resolve()
    try:
        cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        pytest.skip(str(err))  # says how to get nvcc
    return cuda_build.build_library(tmp_path_factory.mktemp("cuda_ops"), arch="native")


def _one_node_model(op: str, inputs: list[np.ndarray], path: Path, attributes: dict | None = None,
                    outputs: int = 1) -> None:
    from onnx import TensorProto, helper

    def elem_type(a: np.ndarray) -> int:
        return {np.float16: TensorProto.FLOAT16, np.bool_: TensorProto.BOOL,
                np.int64: TensorProto.INT64}.get(a.dtype.type, TensorProto.FLOAT)

    elem = elem_type(inputs[0])
    names = [f"in{i}" for i in range(len(inputs))]
    out_names = [f"out{i}" for i in range(outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, out_names, domain=CUDA_DOMAIN, **(attributes or {}))], op,
        [helper.make_tensor_value_info(n, elem_type(a), list(a.shape)) for n, a in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info(n, elem, None) for n in out_names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(CUDA_DOMAIN, 1)])
    model.ir_version = 10  # what onnxruntime >= 1.20 reads (newer onnx writes newer IR versions)
    onnx.save(model, str(path))


def _run_cuda(path: Path, library: Path, inputs: list[np.ndarray], out_shapes: list[tuple],
              cuda_graph: bool = False) -> list[np.ndarray]:
    from semvoc.runtime.backends.ort_common import make_session

    session = make_session(path, "cuda", custom_ops=library, cuda_graph=cuda_graph)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    feeds = {f"in{i}": a for i, a in enumerate(inputs)}
    if not cuda_graph:
        return session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    device_inputs = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in inputs]
    outs = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, inputs[0].dtype), "cuda", 0) for shape in out_shapes]
    for i, v in enumerate(device_inputs):
        binding.bind_ortvalue_input(f"in{i}", v)
    for i, v in enumerate(outs):
        binding.bind_ortvalue_output(f"out{i}", v)
    for _ in range(3):  # warm-up, capture, replay
        session.run_with_iobinding(binding)
    return [o.numpy() for o in outs]


CASES = {  # channels-last [B, L, C]
    "ConvNeXtMix": lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(c, 1, 7, generator=g),
                                       torch.randn(c, generator=g), torch.randn(c, generator=g), torch.tensor([0.3]),
                                       torch.randn(b, L, c, generator=g), 1 + 0.1 * torch.randn(1, c, generator=g)],
    "BiasPRelu": lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(c, generator=g),
                                     torch.rand(c, generator=g)],
    "BiasResidual": lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(c, generator=g),
                                        torch.randn(b, L, c, generator=g), torch.rand(c, generator=g)],
}

def _rope_case(g, b, c, L):
    from semvoc.kernels.rotary import rope_tables

    cos, sin = rope_tables(1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)), L + 3, torch.float32)
    return [torch.randn(b, L, 4 * 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g),
            cos, sin]


CASES["HeadNormRope"] = _rope_case  # [B, L, 4 heads x 64]; tables longer than L
CASES["HeadNorm"] = lambda g, b, c, L: [torch.randn(b, L, 3 * 128, generator=g), torch.randn(128, generator=g),
                                        torch.randn(128, generator=g)]  # one affine shared by 3 heads of 128
CASES["GatedSkipNorm"] = lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(b, L, c, generator=g),
                                             *(torch.randn(c, generator=g) for _ in range(4))]
CASES["BiasGeglu"] = lambda g, b, c, L: [torch.randn(b, L, 2 * c, generator=g), torch.randn(2 * c, generator=g)]
CASES["BiasNorm"] = lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(c, generator=g),
                                        torch.randn(c, generator=g), torch.tensor([0.3])]
CASES["GatedConcatNorm"] = lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(b, L, c, generator=g),
                                               torch.randn(c, generator=g), torch.randn(c, generator=g),
                                               torch.randn(b, L, c, generator=g), torch.randn(2 * c, generator=g),
                                               torch.randn(2 * c, generator=g)]
CASES["BiasAddNorm"] = lambda g, b, c, L: [torch.randn(b, L, c, generator=g),
                                           *(torch.randn(c, generator=g) for _ in range(3))]
CASES["LayerNorm"] = lambda g, b, c, L: [torch.randn(b, L, c, generator=g), torch.randn(c, generator=g),
                                         torch.randn(c, generator=g)]
# ConvNeXtMix reading entry 2 of whole tables: cond_bias [N, B, L, C], time_scale [1, N, C]
CASES["ConvNeXtMix:table"] = lambda g, b, c, L: [*CASES["ConvNeXtMix"](g, b, c, L)[:5],
                                                 torch.randn(3, b, L, c, generator=g),
                                                 1 + 0.1 * torch.randn(1, 3, c, generator=g)]
ATTRIBUTES = {"HeadNorm": {"epsilon": 1e-5}, "HeadNormRope": {"epsilon": 1e-6},
              "HeadNormRopeQkv": {"epsilon": 1e-6}, "GatedSkipNorm": {"epsilon": 1e-5},
              "GatedConcatNorm": {"epsilon": 1e-5}, "BiasAddNorm": {"epsilon": 1e-5}, "LayerNorm": {"epsilon": 1e-6},
              "ConvNeXtMix:table": {"layer": 2}, "ConvNeXtMix:rows": {"layer": 1}}
REFERENCES = {"ConvNeXtMix": lambda a: convnext_mix_reference(a[0], a[1], a[2], a[3], a[4][0], a[5], a[6]),
              "ConvNeXtMix:table": lambda a: convnext_mix_reference(a[0], a[1], a[2], a[3], a[4][0], a[5], a[6], 2),
              "ConvNeXtMix:rows": lambda a: convnext_mix_reference(a[0], a[1], a[2], a[3], a[4][0], a[5], a[6], 1),
              "BiasNorm": lambda a: bias_norm_reference(a[0], a[1], a[2], a[3][0]),
              "BiasPRelu": lambda a: bias_prelu_reference(*a), "BiasResidual": lambda a: bias_residual_reference(*a),
              "HeadNorm": lambda a: head_norm_reference(*a, 1e-5).reshape(a[0].shape),
              "HeadNormRope": lambda a: head_norm_rope_reference(*a, 1e-6).chunk(2, dim=-1),  # q, k
              "HeadNormRopeQkv": lambda a: head_norm_rope_qkv(*a, 1e-6),  # q, k (normed, rotated), v (copied)
              "GatedSkipNorm": lambda a: gated_skip_norm_reference(*a, 1e-5),  # h, sum
              "BiasGeglu": lambda a: bias_geglu_reference(*a),
              "GatedConcatNorm": lambda a: gated_concat_norm_reference(*a, 1e-5),
              "BiasAddNorm": lambda a: bias_add_norm_reference(*a, 1e-5),  # h, sum
              "LayerNorm": lambda a: layer_norm_reference(*a, 1e-6)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op", sorted(CASES))
def test_cuda_op_matches_its_reference(op, dtype, cuda_library, tmp_path):
    gen = torch.Generator().manual_seed(7)
    # odd lengths, and channel counts that are not multiples of the kernels' tiles (up to the
    # 1024-channel limit of ConvNeXtMix)
    for batch, channels, length in ((3, 77, 1001), (1, 1000, 37)):
        _check_op(op, dtype, CASES[op](gen, batch, channels, length), cuda_library, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_convnext_mix_at_the_vocoder_widths(dtype, cuda_library, tmp_path):
    """The reference vocoder's branch widths (runs of 96, 128 and 192 threads of 4 channels, two
    runs per block at 384 and 512), lengths that end inside a block's frames or before its second
    run, one cond_bias row for the whole batch beside per-row time scales, kernel sizes 3 and 9."""
    gen = torch.Generator().manual_seed(11)
    for batch, channels, length, taps, cond_rows in ((2, 384, 203, 7, 1), (3, 512, 45, 7, 3), (2, 768, 11, 7, 1),
                                                     (1, 64, 19, 3, 1), (2, 96, 23, 9, 2)):
        args = [torch.randn(batch, length, channels, generator=gen),
                torch.randn(channels, 1, taps, generator=gen) / taps ** 0.5, torch.randn(channels, generator=gen),
                torch.randn(channels, generator=gen), torch.tensor([0.3]),
                torch.randn(4, cond_rows, length, channels, generator=gen),
                1 + 0.1 * torch.randn(batch, 4, channels, generator=gen)]
        _check_op("ConvNeXtMix:rows", dtype, args, cuda_library, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gated_skip_norm_at_the_dit_width(dtype, cuda_library, tmp_path):
    """GatedSkipNorm where fp16 rows take a block each (D = 1024: 128 vectors, every thread busy;
    D = 64: 8 vectors in a block of 128) and fp32 rows of 1024 a warp each, at the DiT's batch-1
    and batch-16 row counts."""
    gen = torch.Generator().manual_seed(17)
    for batch, channels, length in ((2, 1024, 250), (16, 1024, 500), (3, 64, 41)):
        _check_op("GatedSkipNorm", dtype, CASES["GatedSkipNorm"](gen, batch, channels, length), cuda_library, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_convnext_mix_widened_into_split_mlp(dtype, cuda_library, tmp_path):
    """ConvNeXtMix with lead = H feeding SplitMlp, the block's input as the residual: the two nodes
    of a split vocoder block. SplitMlp writes its hidden rows into the H columns that ConvNeXtMix
    leaves unwritten, then reads the whole rows (K = H + C); plain runs and CUDA-graph replay. The
    reference rounds where the kernels store: ConvNeXtMix's output, then the hidden rows."""
    from onnx import TensorProto, helper

    gen = torch.Generator().manual_seed(13)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
    # a small odd case, then the reference vocoder's widths (H = 3C) at 10-s frame counts
    for batch, channels, hidden, length in ((2, 12, 36, 37), (1, 768, 2304, 1001), (2, 384, 1152, 203)):
        mix = [torch.randn(batch, length, channels, generator=gen),
               torch.randn(channels, 1, 7, generator=gen) / 7 ** 0.5, torch.randn(channels, generator=gen),
               torch.randn(channels, generator=gen), torch.tensor([0.3]),
               torch.randn(batch, length, channels, generator=gen), 1 + 0.1 * torch.randn(1, channels, generator=gen)]
        mlp = [torch.randn(channels, hidden, generator=gen) / channels ** 0.5, torch.randn(hidden, generator=gen),
               torch.randn(hidden + channels, channels, generator=gen) / (hidden + channels) ** 0.5,
               torch.randn(channels, generator=gen)]
        args = [a.to(torch_dtype).float() for a in mix + mlp]  # the values the kernels see
        wide = convnext_mix_reference(*args[:4], args[4][0], args[5], args[6], lead=hidden).to(torch_dtype)
        want = split_mlp_reference(wide, *(a.to(torch_dtype) for a in args[7:]), args[0].to(torch_dtype))
        want = want.float().numpy()
        inputs = [a.numpy().astype(dtype) for a in args]
        names = [f"in{i}" for i in range(len(inputs))]
        graph = helper.make_graph(
            [helper.make_node("ConvNeXtMix", names[:7], ["wide"], domain=CUDA_DOMAIN, lead=hidden),
             helper.make_node("SplitMlp", ["wide", *names[7:], "in0"], ["out0"], domain=CUDA_DOMAIN)], "block",
            [helper.make_tensor_value_info(n, elem, list(a.shape)) for n, a in zip(names, inputs, strict=True)],
            [helper.make_tensor_value_info("out0", elem, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                        helper.make_opsetid(CUDA_DOMAIN, 1)])
        model.ir_version = 10
        onnx.save(model, str(tmp_path / "block.onnx"))
        for cuda_graph in (False, True):
            (out,) = _run_cuda(tmp_path / "block.onnx", cuda_library, inputs, [want.shape], cuda_graph)
            assert out.shape == want.shape
            bound = 1e-4 if dtype == np.float32 else 4e-3
            error = np.abs(out.astype(np.float32) - want).max()
            assert error <= bound * np.abs(want).max(), (batch, channels, dtype, cuda_graph, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hop, length", [(240, 4800), (60, 4800), (6, 54)], ids=["hop240", "hop60", "hop6-scalar"])
def test_audio_frames_matches_its_reference(hop, length, dtype, cuda_library, tmp_path):
    """The reference vocoder's hops (16-byte stores) and a hop whose frames are not (scalar
    stores); the reflected edges included. A copy: equal to the bit."""
    from semvoc.kernels.audio_frames import audio_frames_reference

    x = torch.randn(3, length, generator=torch.Generator().manual_seed(4)).numpy().astype(dtype)
    want = audio_frames_reference(torch.from_numpy(x), hop).numpy()
    _one_node_model("AudioFrames", [x], tmp_path / "op.onnx", {"hop": hop})
    for cuda_graph in (False, True):
        (out,) = _run_cuda(tmp_path / "op.onnx", cuda_library, [x], [want.shape], cuda_graph)
        assert out.dtype == want.dtype and np.array_equal(out, want), (hop, dtype, cuda_graph)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hops, pred_x1", [((240, 120, 60), 1), ((240, 120, 60), 0), ((6,), 1), ((8, 2), 1)],
                         ids=["reference", "velocity", "one-branch-scalar", "hop2-scalar"])
def test_euler_overlap_add_matches_its_reference(hops, pred_x1, dtype, cuda_library, tmp_path):
    """The reference vocoder's three branches (4 samples per thread) and hops that are not
    multiples of 4 (one sample per thread), at a step read from the device: fp32 arithmetic in
    the reference's order, so equal to the bit; and replayed from a CUDA graph."""
    from semvoc.kernels.euler_overlap_add import euler_overlap_add_reference

    gen = torch.Generator().manual_seed(6)
    batch, length = 2, 4800 if hops[0] == 240 else 48
    audio = torch.randn(batch, length, generator=gen)
    pieces = [torch.randn(batch, length // h + 1, 2 * h, generator=gen).to(torch.float16 if dtype == np.float16
                                                                           else torch.float32) for h in hops]
    step, t_span = torch.tensor([3]), torch.linspace(0, 1, 9)
    want = euler_overlap_add_reference(audio, step, t_span, pieces, bool(pred_x1)).numpy()
    inputs = [audio.numpy(), step.numpy(), t_span.numpy(), *(p.numpy() for p in pieces)]
    _one_node_model("EulerOverlapAdd", inputs, tmp_path / "op.onnx", {"pred_x1": pred_x1})
    for cuda_graph in (False, True):
        (out,) = _run_cuda(tmp_path / "op.onnx", cuda_library, inputs, [want.shape], cuda_graph)
        assert out.dtype == np.float32 and np.array_equal(out, want), (hops, dtype, cuda_graph,
                                                                       np.abs(out - want).max())


def _check_op(op, dtype, args, cuda_library, tmp_path):
    expected = REFERENCES[op](args)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    inputs = [a.numpy().astype(dtype) for a in args]
    _one_node_model(op.split(":")[0], inputs, tmp_path / "op.onnx", ATTRIBUTES.get(op), outputs=len(expected))
    for cuda_graph in (False, True):
        outs = _run_cuda(tmp_path / "op.onnx", cuda_library, inputs, [e.shape for e in expected], cuda_graph)
        assert len(outs) == len(expected)
        for index, (out, want) in enumerate(zip(outs, expected, strict=True)):
            assert out.shape == want.shape, (op, index)
            bound = 1e-5 if dtype == np.float32 else 4e-3
            error = np.abs(out.astype(np.float32) - want).max()
            assert error <= bound * np.abs(want).max(), (op, index, dtype, cuda_graph, error)


def _head_case(batch: int, length: int, heads: int, hd: int, rope: bool, per_head: bool, seed: int = 11):
    """x [batch, length, heads*hd] with per-head offsets (the mean matters), gamma/beta [heads, hd] or
    [hd], and for rope cos/sin tables longer than length."""
    from semvoc.kernels.rotary import rope_tables

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, hd, generator=g) * 2 + torch.randn(batch, length, heads, 1, generator=g)
    affine = (heads, hd) if per_head else (hd,)
    args = [x.reshape(batch, length, heads * hd), 1 + 0.5 * torch.randn(*affine, generator=g),
            0.2 * torch.randn(*affine, generator=g)]
    if rope:
        args += rope_tables(1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)), length + 5, torch.float32)[:2]
    return args


# The DiT's shapes and the kernel's edges (HeadNormVecKernel: a thread owns two 16-byte vectors of
# one head; blocks of 256 threads span a row's heads (x) and several rows (y)):
HEAD_CASES = {
    # self-attention q|k of the reference DiT at batch 1 with CFG: 32 heads of 64, per-head affine
    "rope-dit-R2": (2, 250, 32, 64, True, True),
    # an odd row count: the last block's second row of threads (fp16) has no row to do
    "rope-odd-rows": (3, 83, 32, 64, True, True),
    # 6 heads of 128 (48 or 96 threads per row: idle lanes in the last warp), one affine for all heads
    "rope-hd128-shared": (1, 37, 6, 128, True, False),
    # the cross-attention q-norm: 16 heads of 64 sharing one affine
    "norm-cross-R2": (2, 250, 16, 64, False, False),
    # 5 heads of 64 with per-head affine (20 or 40 threads per row), batch rows 3
    "norm-5heads": (3, 101, 5, 64, False, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_norm_ops_at_the_dits_shapes(case, dtype, cuda_library, tmp_path):
    batch, length, heads, hd, rope, per_head = HEAD_CASES[case]
    op = "HeadNormRope" if rope else "HeadNorm"
    _check_op(op, dtype, _head_case(batch, length, heads, hd, rope, per_head), cuda_library, tmp_path)


# HeadNormRopeQkv: (batch, length, H (q heads), hd, per-head affine); x holds 3H heads, q|k|v
QKV_CASES = {
    # the reference DiT at batch 1 with CFG: q|k|v of 16 heads of 64 each, per-head affine
    "dit-R2": (2, 250, 16, 64, True),
    # an odd row count, 3 heads of 128 each for q, k and v sharing one affine (v's lanes: the last 3 of 9 heads)
    "hd128-shared-odd": (3, 37, 3, 128, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", sorted(QKV_CASES))
def test_head_norm_rope_qkv_normalises_q_and_k_and_copies_v(case, dtype, cuda_library, tmp_path):
    batch, length, heads, hd, per_head = QKV_CASES[case]
    args = _head_case(batch, length, 3 * heads, hd, True, False)
    if per_head:  # the q and k heads' own affine, [2H, hd]
        g = torch.Generator().manual_seed(3)
        args[1:3] = [1 + 0.5 * torch.randn(2 * heads, hd, generator=g), 0.2 * torch.randn(2 * heads, hd, generator=g)]
    _check_op("HeadNormRopeQkv", dtype, args, cuda_library, tmp_path)


def _skip_path_case(op: str, rows: int, length: int, dim: int, seed: int = 13) -> list[torch.Tensor]:
    """The DiT's skip path as it meets it: a residual stream of large mean and spread (x, and the
    GEMM output y), a gated MLP output near zero, a skip of its own scale, the modulated affine."""
    g = torch.Generator().manual_seed(seed)

    def stream():
        return 8 * torch.randn(rows, length, 1, generator=g) + 20 * torch.randn(rows, length, dim, generator=g)

    if op == "GatedConcatNorm":
        return [stream(), 0.5 * torch.randn(rows, length, dim, generator=g), 1 + 0.1 * torch.randn(dim, generator=g),
                0.1 * torch.randn(dim, generator=g), stream(), 1 + 0.3 * torch.randn(2 * dim, generator=g),
                0.1 * torch.randn(2 * dim, generator=g)]
    affine = [1 + 0.3 * torch.randn(dim, generator=g), 0.1 * torch.randn(dim, generator=g)]
    if op == "BiasAddNorm":
        return [stream(), 0.5 * torch.randn(dim, generator=g), *affine]
    return [stream(), *affine]


# The reference DiT's rows (R = 2 at batch 1: 500 rows of D = 1024; fp32 rows fill the widest
# register tile, 8 vectors per lane), a row count that leaves the last block of 4 warps partly idle,
# the small preset's D = 384 (fp16: 48 vectors, half the lanes idle in the second tile), and
# D = 1020 (fp16: no multiple of 8 values, the scalar path; fp32: 255 vectors, one lane idle).
SKIP_CASES = {"dit-R2": (2, 250, 1024), "odd-rows": (3, 83, 1024), "small-384": (1, 45, 384),
              "width-1020": (1, 9, 1020)}
# CrossAttention (rows, mask rows, L, S, heads, hd, true keys per mask row: a count = a prefix, or a
# list). The tensor-core kernel (fp16, hd 64, S <= 128): a block per 64 queries of one (row, head),
# key tiles of 16 up to the last true key; the general kernel for the rest (and every fp32 case).
CROSS_CASES = {
    # the reference DiT at batch 1 with CFG: R = 2 rows reading one [1, S] mask, 8 true keys of 128
    "dit-R2-8keys": (2, 1, 250, 128, 16, 64, [8]),
    # batch 2 with CFG: a full text and one that ends inside a key tile
    "dit-R4-128-and-31": (4, 2, 250, 128, 16, 64, [128, 31]),
    # one true key (that key's v), and scattered keys up to the last slot (masked keys inside tiles)
    "one-key-and-gaps": (2, 2, 37, 128, 2, 64, [1, [3, 17, 64, 127]]),
    # a row without a true key (zeros), a row of exactly one key tile; 70 queries: a partial warp tile
    "no-key-and-one-tile": (2, 2, 70, 128, 2, 64, [0, 16]),
    # S not a multiple of 16 (the last tile's rows past S are zeros in shared memory); L = 65
    "S77-L65": (2, 1, 65, 77, 4, 64, [77]),
    # the general kernel: head size 128, and S > 128
    "hd128-general": (2, 1, 33, 40, 2, 128, [[0, 39]]),
    "S200-general": (2, 1, 20, 200, 2, 64, [150]),
}


def _cross_expected(inputs: list[np.ndarray], heads: int) -> np.ndarray:
    """The reference on the inputs as the kernel sees them (rounded to the test's dtype)."""
    q, k, v = (torch.from_numpy(a.astype(np.float32)) for a in inputs[:3])
    return cross_attention_reference(q, k, v, torch.from_numpy(inputs[3]), heads).numpy()


def _cross_close(out: np.ndarray, want: np.ndarray, v: np.ndarray, dtype, what) -> None:
    # fp16: P is rounded to fp16 (2^-11 relative) before PV and the output once more; fp32: the
    # general kernel's arithmetic
    scale = 2.0**-10 if dtype == np.float16 else 1e-5
    error = np.abs(out.astype(np.float32) - want)
    bound = scale * (np.abs(v.astype(np.float32)).max() + np.abs(want))
    assert np.isfinite(out).all() and (error <= bound).all(), (what, dtype, float(error.max()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", sorted(SKIP_CASES))
@pytest.mark.parametrize("op", ["GatedConcatNorm", "BiasAddNorm", "LayerNorm"])
def test_skip_path_ops_at_the_dits_shapes(op, case, dtype, cuda_library, tmp_path):
    _check_op(op, dtype, _skip_path_case(op, *SKIP_CASES[case]), cuda_library, tmp_path)


@pytest.mark.gpu
def test_skip_path_op_refuses_rows_too_wide(cuda_library, tmp_path):
    """A row wider than the registers hold (1025 fp32 values per half: not a multiple of the
    vector) is refused with a message naming the limit, not computed wrong."""
    from semvoc.runtime.backends.ort_common import make_session

    args = [a.numpy() for a in CASES["LayerNorm"](torch.Generator().manual_seed(1), 1, 1025, 3)]
    _one_node_model("LayerNorm", args, tmp_path / "op.onnx", ATTRIBUTES["LayerNorm"])
    session = make_session(tmp_path / "op.onnx", "cuda", custom_ops=cuda_library)
    with pytest.raises(Exception, match="LayerNorm: rows of 1025 elements"):
        session.run(None, {f"in{i}": a for i, a in enumerate(args)})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", sorted(CROSS_CASES))
def test_cross_attention_at_the_dits_shapes(case, dtype, cuda_library, tmp_path):
    rows, mask_rows, length, keys, heads, hd, valid = CROSS_CASES[case]
    args = _cross_case(rows, mask_rows, length, keys, heads, hd, valid)
    inputs = [a.numpy().astype(dtype) for a in args[:3]] + [args[3].numpy()]
    want = _cross_expected(inputs, heads)
    _one_node_model("CrossAttention", inputs, tmp_path / "op.onnx", {"num_heads": heads})
    for cuda_graph in (False, True):
        (out,) = _run_cuda(tmp_path / "op.onnx", cuda_library, inputs, [want.shape], cuda_graph)
        _cross_close(out, want, inputs[2], dtype, (case, cuda_graph))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case, per_head", [("dit-R2-8keys", False), ("no-key-and-one-tile", True),
                                            ("S77-L65", False), ("hd128-general", True)])
def test_cross_attention_norms_the_query_it_loads(case, per_head, dtype, cuda_library, tmp_path):
    """q_gamma/q_beta: the query's LayerNorm inside the op ([hd] shared by the heads, as the DiT's,
    or [H, hd]), against the reference on the normed query rounded to the test's dtype (what the
    separate HeadNorm op would have written); the tensor-core and the general kernel."""
    from semvoc.kernels.head_norm import head_norm_reference

    rows, mask_rows, length, keys, heads, hd, valid = CROSS_CASES[case]
    q, k, v, mask = _cross_case(rows, mask_rows, length, keys, heads, hd, valid)
    gen = torch.Generator().manual_seed(9)
    affine = (heads, hd) if per_head else (hd,)
    q = 3 * q + torch.randn(rows, length, heads * hd, generator=gen)  # a mean and a scale to remove
    gamma, beta = 1 + 0.3 * torch.randn(*affine, generator=gen), 0.2 * torch.randn(*affine, generator=gen)
    inputs = [a.numpy().astype(dtype) for a in (q, k, v)] + [mask.numpy()] + [
        a.numpy().astype(dtype) for a in (gamma, beta)]
    q_t, gamma_t, beta_t = (torch.from_numpy(inputs[i].astype(np.float32)) for i in (0, 4, 5))
    normed = head_norm_reference(q_t, gamma_t, beta_t, 1e-6).reshape(q.shape).numpy().astype(dtype)
    want = _cross_expected([normed, *inputs[1:4]], heads)
    _one_node_model("CrossAttention", inputs, tmp_path / "op.onnx", {"num_heads": heads, "epsilon": 1e-6})
    for cuda_graph in (False, True):
        (out,) = _run_cuda(tmp_path / "op.onnx", cuda_library, inputs, [want.shape], cuda_graph)
        _cross_close(out, want, inputs[2], dtype, (case, per_head, cuda_graph))


@pytest.mark.gpu
def test_cross_attention_graph_replay_follows_the_mask(cuda_library, tmp_path):
    """One CUDA graph captured with a short text, replayed after the mask (another prompt's) and q
    change in place: the kernel reads the mask at every replay, so the output follows it."""
    import onnxruntime as ort

    from semvoc.runtime.backends.ort_common import make_session

    args = _cross_case(2, 1, 250, 128, 16, 64, [5])
    inputs = [a.numpy().astype(np.float16) for a in args[:3]] + [args[3].numpy()]
    _one_node_model("CrossAttention", inputs, tmp_path / "op.onnx", {"num_heads": 16})
    session = make_session(tmp_path / "op.onnx", "cuda", custom_ops=cuda_library, cuda_graph=True)
    binding = session.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in inputs]
    out = ort.OrtValue.ortvalue_from_numpy(np.zeros(inputs[0].shape, np.float16), "cuda", 0)
    for i, value in enumerate(values):
        binding.bind_ortvalue_input(f"in{i}", value)
    binding.bind_ortvalue_output("out0", out)
    for _ in range(3):  # warm-up, capture, replay
        session.run_with_iobinding(binding)
    _cross_close(out.numpy(), _cross_expected(inputs, 16), inputs[2], np.float16, "captured")
    for seed, valid in enumerate(([100], [[2, 50, 127]], [0]), start=10):
        new = _cross_case(2, 1, 250, 128, 16, 64, valid, seed=seed)
        inputs = [new[0].numpy().astype(np.float16), inputs[1], inputs[2], new[3].numpy()]
        values[0].update_inplace(inputs[0])
        values[3].update_inplace(inputs[3])
        session.run_with_iobinding(binding)
        _cross_close(out.numpy(), _cross_expected(inputs, 16), inputs[2], np.float16, ("replayed", valid))


# LtGemm: a [..., K] @ w [K, N] with the optional inputs named by `inputs` (b: bias, r: residual,
# s: residual_scale, float32) and u: the attribute relu = 1. The step graphs' shapes and the op's edges:
LT_CASES = {
    # the PReLU split's ReLU GEMM (branch 2 of the reference vocoder at batch 1): bias and relu
    "vocoder-split-relu": ((1, 3751, 384), 1152, "bu"),
    # its linear part: bias and an unscaled residual (C x C)
    "vocoder-split-linear": ((1, 3751, 384), 384, "br"),
    # relu with a residual and no bias: cuBLASLt's relu comes after the residual, or the tail does it all
    "relu-residual": ((2, 37, 64), 48, "ru"),
    # the vocoder's down-projection (branch 2 of the reference vocoder at batch 1): bias, scaled residual
    "vocoder-down": ((1, 4001, 1152), 384, "brs"),
    # the DiT's U-Net skip projection at batch 1 with CFG: bias only
    "dit-skip": ((2, 250, 2048), 1024, "b"),
    # a residual without scale (cuBLASLt's C with beta 1) and no bias (an empty input name)
    "residual-only": ((2, 37, 64), 48, "r"),
    # rows of 21 and 37 values: no 16-byte vectors, cuBLASLt's unaligned kernels, the tail's scalar path
    "odd-sizes": ((3, 29, 37), 21, "brs"),
    # M = 1, no epilogue
    "one-row-plain": ((1, 1, 64), 40, ""),
}


def _lt_gemm_model(inputs: list[np.ndarray], present: str, path: Path) -> None:
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if inputs[0].dtype == np.float16 else TensorProto.FLOAT
    names, node_inputs, index = [], ["in0", "in1"], 2
    for flag in "brs":  # bias?, residual?, residual_scale?: "" where left out
        node_inputs.append(f"in{index}" if flag in present else "")
        index += flag in present
    while node_inputs[-1] == "":
        node_inputs.pop()
    names = [n for n in node_inputs if n]
    types = [TensorProto.FLOAT if (n == names[-1] and "s" in present) else elem for n in names]
    relu = {"relu": 1} if "u" in present else {}
    graph = helper.make_graph(
        [helper.make_node("LtGemm", node_inputs, ["out0"], domain=CUDA_DOMAIN, **relu)], "LtGemm",
        [helper.make_tensor_value_info(n, t, list(a.shape)) for n, t, a in zip(names, types, inputs, strict=True)],
        [helper.make_tensor_value_info("out0", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(CUDA_DOMAIN, 1)])
    model.ir_version = 10
    onnx.save(model, str(path))


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", ["1", "2", "3"], ids=["all-in-gemm", "bias-in-gemm", "tail-kernel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", sorted(LT_CASES))
def test_lt_gemm_matches_its_reference(case, dtype, fusion, cuda_library, tmp_path, monkeypatch):
    """Each epilogue level ($SEMVOC_LTGEMM_FUSION starts the list there; 1 falls back by itself
    where cuBLASLt has no algorithm), plain and replayed from a CUDA graph."""
    from semvoc.kernels.ltgemm import lt_gemm_reference

    monkeypatch.setenv("SEMVOC_LTGEMM_FUSION", fusion)
    shape, n, present = LT_CASES[case]
    g = torch.Generator().manual_seed(13)
    k = shape[-1]
    a, w = torch.randn(*shape, generator=g), torch.randn(k, n, generator=g) / k ** 0.5
    extra = {"b": torch.randn(n, generator=g), "r": torch.randn(*shape[:-1], n, generator=g),
             "s": torch.rand(n, generator=g) + 0.5}
    inputs = [a.numpy().astype(dtype), w.numpy().astype(dtype)]
    inputs += [extra[f].numpy().astype(np.float32 if f == "s" else dtype) for f in "brs" if f in present]
    rounded = [torch.from_numpy(x.astype(np.float32)) for x in inputs]
    args = dict(zip([f for f in "brs" if f in present], rounded[2:], strict=True))
    want = lt_gemm_reference(rounded[0], rounded[1], args.get("b"), args.get("r"), args.get("s"),
                             relu="u" in present).numpy()
    assert ("u" not in present) or (want == 0).mean() > 0.2  # the relu cases do clip
    path = tmp_path / "lt_gemm.onnx"
    _lt_gemm_model(inputs, present, path)
    for cuda_graph in (False, True):
        (out,) = _run_cuda(path, cuda_library, inputs, [want.shape], cuda_graph)
        assert out.shape == want.shape and out.dtype == dtype
        bound = 1e-5 if dtype == np.float32 else 4e-3
        error = np.abs(out.astype(np.float32) - want).max()
        assert error <= bound * np.abs(want).max(), (case, dtype, fusion, cuda_graph, error)


# a fresh process runs one LtGemm model: argv = inputs.npz, model, library, output .npy
_LT_GEMM_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from tests.test_cuda_kernels import _run_cuda
saved = np.load(sys.argv[1])
(out,) = _run_cuda(Path(sys.argv[2]), Path(sys.argv[3]), [saved[f"arr_{i}"] for i in range(len(saved.files))], [])
np.save(sys.argv[4], out)
"""


@pytest.mark.gpu
def test_lt_gemm_records_its_algorithm_choice_and_a_later_process_takes_it(cuda_library, tmp_path):
    """The first call of a plan times cuBLASLt's candidates and records the choice in
    $SEMVOC_LTGEMM_ALGORITHMS; a later process finds it there (it times and writes nothing) and
    computes the same bits; with SEMVOC_LTGEMM_TUNE=0 nothing is timed or recorded."""
    import subprocess
    import sys

    from semvoc.kernels.ltgemm import lt_gemm_reference
    from semvoc.runtime.gemm_algorithms import ALGORITHMS_ENV

    shape, n, present = LT_CASES["dit-skip"]  # M = 500: cuBLASLt offers several candidates
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(*shape, generator=g).half().numpy(),
              (torch.randn(shape[-1], n, generator=g) / shape[-1] ** 0.5).half().numpy(),
              torch.randn(n, generator=g).half().numpy()]
    model = tmp_path / "lt_gemm.onnx"
    _lt_gemm_model(inputs, present, model)
    np.savez(tmp_path / "inputs.npz", *inputs)
    want = lt_gemm_reference(*(torch.from_numpy(x.astype(np.float32)) for x in inputs)).numpy()

    def run(name: str, **env: str) -> np.ndarray:
        subprocess.run([sys.executable, "-c", _LT_GEMM_PROCESS, str(tmp_path / "inputs.npz"), str(model),
                        str(cuda_library), str(tmp_path / name)], check=True, cwd=Path(__file__).parents[1],
                       env={**os.environ, **env})
        out = np.load(tmp_path / name)
        assert np.abs(out.astype(np.float32) - want).max() <= 4e-3 * np.abs(want).max()
        return out

    record = tmp_path / "gemm_algorithms.txt"
    first = run("first.npy", **{ALGORITHMS_ENV: str(record), "SEMVOC_LTGEMM_TUNE": "1"})
    (line,) = [x for x in record.read_text().splitlines() if not x.startswith("#")]  # one plan
    key, rank = line.rsplit("\t", 1)
    assert f" f16 m500 n{n} k{shape[-1]} " in key and " bias" in key and 0 <= int(rank) < 8
    written = record.stat().st_mtime_ns
    again = run("again.npy", **{ALGORITHMS_ENV: str(record), "SEMVOC_LTGEMM_TUNE": "1"})
    assert np.array_equal(first, again) and record.stat().st_mtime_ns == written
    untimed = tmp_path / "untimed.txt"
    run("untimed.npy", **{ALGORITHMS_ENV: str(untimed), "SEMVOC_LTGEMM_TUNE": "0"})
    assert not untimed.exists()


@pytest.mark.gpu
def test_cuda_kernel_engine_matches_the_plain_engine(demo_engine, tmp_path):
    """A default --device cuda export uses semvoc's CUDA ops (--cuda-kernels auto) and sounds the same."""
    from semvoc.export.cli import main
    from semvoc.runtime import Pipeline
    from semvoc.runtime.backends.ort_common import cuda_available
    from tests.conftest import DEMO_EXPORT_ARGS

    if not cuda_available():
        pytest.skip("needs a CUDA GPU with onnxruntime-gpu")
    try:
        cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        pytest.skip(str(err))
    out = tmp_path / "demo_cuda_ops"
    assert main([*DEMO_EXPORT_ARGS, "--device", "cuda", "--out", str(out)]) == 0
    entry = json.loads((out / "manifest.json").read_text())["custom_ops"]
    assert entry["library"] == "kernels/libsemvoc_cuda.so" and entry["archs"] == list(cuda_build.DEFAULT_ARCHS)
    prompts = ["a dog barks while rain falls", "church bells ring"]
    plain = Pipeline(demo_engine, "onnxruntime-cuda").generate(prompts, seed=2, steps=8, vocoder_steps=6)
    with pytest.warns(RuntimeWarning, match="serve it from a new process"):  # this process exported it
        pipe = Pipeline(out, "onnxruntime-cuda")
    fused = pipe.generate(prompts, seed=2, steps=8, vocoder_steps=6)
    assert np.abs(fused.audio - plain.audio).max() <= 1e-3
    assert not pipe.backend.capture_failures
