"""semvoc.cuda::QkvAttention (the DiT's self-attention from its q|k|v GEMM output: qk-norms, RoPE and
attention in one kernel): the reference against the separate ops it replaces, the fp16 export that
uses it and the switch that leaves it out, the FLOP counter, and on a GPU the kernel against the
reference."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from semvoc.kernels.attention import attention_packed_reference
from semvoc.kernels.head_norm import head_norm_rope_qkv
from semvoc.kernels.onnx_ops import WITHOUT_ENV, translation_table
from semvoc.kernels.qkv_attention import FUSION, HEAD_SIZE, qkv_attention_reference
from semvoc.kernels.rotary import rope_tables
from tests.test_cuda_kernels import _one_node_model, _run_cuda
from tests.test_cuda_kernels import cuda_library as cuda_library  # the GPU tests' fixture


def _qkv_case(rows: int, length: int, heads: int, per_head: bool, seed: int = 7) -> list[torch.Tensor]:
    """qkv [rows, length, 3*heads*64] with per-head offsets (the norm's mean matters), the q and k
    heads' affine ([2H, 64] or [64]), rope tables longer than length."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(rows, length, 3 * heads, HEAD_SIZE, generator=g) + torch.randn(rows, length, 3 * heads, 1,
                                                                                        generator=g)
    affine = (2 * heads, HEAD_SIZE) if per_head else (HEAD_SIZE,)
    gamma, beta = 1 + 0.3 * torch.randn(*affine, generator=g), 0.2 * torch.randn(*affine, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_SIZE, 2).float() / HEAD_SIZE))
    cos, sin = rope_tables(inv_freq, length + 5, torch.float32)[:2]
    return [x.reshape(rows, length, 3 * heads * HEAD_SIZE), gamma, beta, cos, sin]


@pytest.mark.parametrize("per_head", [True, False])
def test_reference_is_the_separate_ops(per_head):
    """HeadNormRopeQkv (q, k normed and rotated, v copied) then the packed attention: the same
    function, to fp32 rounding."""
    heads = 3
    qkv, gamma, beta, cos, sin = _qkv_case(2, 37, heads, per_head)
    q, k, v = head_norm_rope_qkv(qkv, gamma, beta, cos, sin, 1e-6)
    expected = attention_packed_reference(q, k, v, None, heads)
    torch.testing.assert_close(qkv_attention_reference(qkv, gamma, beta, cos, sin, 1e-6, heads), expected,
                               rtol=1e-5, atol=1e-5)


def _fp16_dit_step(path: Path):
    """The demo DiT with one head of 64 (the kernel's head size), in fp16, exported with
    --cuda-kernels -> (its nodes, its blocks)."""
    from semvoc.export import wrappers as W
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    cfg = preset("demo")
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_heads=cfg.dit.embed_dim // HEAD_SIZE))
    dit = build_model(cfg, seed=0).dit.eval().half()
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 6, dit.cfg.context_dim, generator=gen).half()
    args = (torch.randn(1, dit.cfg.in_chans, 10, generator=gen), torch.tensor([1]),
            W.FusedDitTime(dit)(torch.tensor([900.0, 400.0])), torch.tensor([1.0, 0.5, 0.0]),
            *W.FusedDitPrepare(dit)(context), torch.ones(1, 6, dtype=torch.bool), torch.tensor([3.5]))
    torch.onnx.export(W.FusedDitStep(dit, cuda_ops=True).eval(), args, dynamo=True, opset_version=23,
                      custom_translation_table=translation_table()).save(str(path))
    return onnx.load(str(path)).graph.node, dit.blocks


def test_fp16_dit_step_runs_its_self_attention_as_qkv_attention(tmp_path, monkeypatch):
    """One QkvAttention per block, reading the q|k|v GEMM and feeding the out-projection; no
    HeadNormRopeQkv and no stock Attention left. SEMVOC_EXPORT_WITHOUT=QkvAttention gives the
    separate form back. Both count the same FLOPs, and the export's structure check accepts both."""
    from benchmarks.flops import count_model_flops

    from semvoc.export.graphs import GraphSpec
    from semvoc.export.onnx_export import check_structure

    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    nodes, blocks = _fp16_dit_step(tmp_path / "fused.onnx")
    ops = [n.op_type for n in nodes]
    assert ops.count("QkvAttention") == ops.count("CrossAttention") == len(blocks)
    assert "HeadNormRopeQkv" not in ops and "Attention" not in ops
    produced = {o: n.op_type for n in nodes for o in n.output}
    fused = [n for n in nodes if n.op_type == "QkvAttention"]
    assert {produced[n.input[0]] for n in fused} == {"LtGemm"}
    assert {n.op_type for n in nodes if set(n.input) & {m.output[0] for m in fused}} == {"LtGemm"}
    assert {a.name: a.i for a in fused[0].attribute if a.name == "num_heads"} == {
        "num_heads": blocks[0].attn.num_heads}
    spec = GraphSpec("dit_step", "dit", lambda m: m, (), (), attention_checked=True)
    assert check_structure(spec, tmp_path / "fused.onnx", 2 * len(blocks))["attention"] == 2 * len(blocks)

    monkeypatch.setenv(WITHOUT_ENV, FUSION)
    separate, _ = _fp16_dit_step(tmp_path / "separate.onnx")
    separate_ops = [n.op_type for n in separate]
    assert "QkvAttention" not in separate_ops
    assert separate_ops.count("HeadNormRopeQkv") == separate_ops.count("Attention") == len(blocks)
    counts = []
    for name in ("fused", "separate"):
        model = onnx.load(str(tmp_path / f"{name}.onnx"))
        del model.graph.value_info[:]  # shapes past the semvoc ops from the counter's stand-ins
        counts.append(count_model_flops(model, {}))
        assert counts[-1].unresolved == []
    assert counts[0].total == counts[1].total > 0
    assert counts[0].by_op["Attention"] == counts[1].by_op["Attention"] > 0


def test_fp32_dit_step_keeps_the_separate_form(tmp_path, monkeypatch):
    """The kernel is fp16 only: an fp32 export with --cuda-kernels keeps HeadNormRopeQkv and Attention."""
    from tests.test_cuda_kernels import _export_demo_dit_step

    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    nodes, _, blocks = _export_demo_dit_step(tmp_path / "dit_step.onnx")
    ops = [n.op_type for n in nodes]
    assert "QkvAttention" not in ops and ops.count("HeadNormRopeQkv") == len(blocks)


# ----------------------------------------------------------------------------- on a GPU

# (rows, L, heads, per-head affine). The kernel: a block per 64 queries of one (row, head), every key
# tile of 64 resident where L <= 256 (the cases below up to L256), as split keys where those blocks
# fit one per SM (all of them on an H200: 8 warps, two per 16 queries, each over half the tiles,
# merged; the second half empty where L <= 64), else and with $SEMVOC_QKV_SPLIT_KEYS=0 4 warps; else
# two tile buffers in turn (L750); 128 queries and two buffers when that grid still fills the GPU
# twice (8 warps: dit-R32-wide, either way). Keys past L are zeros in shared memory and masked in
# the logits.
GPU_CASES = {
    # the reference DiT at batch 1 with CFG: 2 rows of 250 frames, 16 heads, per-head affine
    "dit-R2": (2, 250, 16, True),
    # batch 16 with CFG: 32 rows, blocks of 8 warps (1,024 blocks), the last one's queries partly past L
    "dit-R32-wide": (32, 250, 16, True),
    # one partial tile (L < 64), one affine shared by the q and k heads, an odd row count
    "L37-shared": (3, 37, 2, False),
    # L = 64: one full tile, no padding; L = 129: three tiles, the last holding one key
    "L64": (1, 64, 3, True),
    "L129": (2, 129, 2, True),
    # split keys: a tile per half, the second partial; halves of 128 keys and of 64 + 1; 2 x 128, no padding
    "L100": (2, 100, 2, True),
    "L193": (2, 193, 2, True),
    "L256": (2, 256, 3, True),
    # a long clip's frames: 12 tiles, queries of several blocks
    "L750": (1, 750, 2, True),
}


SPLIT_KEYS_ENV = "SEMVOC_QKV_SPLIT_KEYS"  # "0": 4-warp blocks where L <= 256 (read once per process)

# a fresh process runs the one-node model without and with a CUDA graph: argv = inputs.npz, model,
# library, output .npz, the output's shape
_QKV_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from tests.test_cuda_kernels import _run_cuda
saved = np.load(sys.argv[1])
inputs = [saved[f"arr_{i}"] for i in range(len(saved.files))]
shape = tuple(int(n) for n in sys.argv[5].split(","))
np.savez(sys.argv[4], *(_run_cuda(Path(sys.argv[2]), Path(sys.argv[3]), inputs, [shape], graph)[0]
                        for graph in (False, True)))
"""


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "split_keys"), [(c, "default") for c in sorted(GPU_CASES)]
                         + [(c, "0") for c in sorted(GPU_CASES) if GPU_CASES[c][1] <= 256])
def test_kernel_matches_the_reference(case, split_keys, cuda_library, tmp_path, monkeypatch):
    """The library's choice (split keys where L <= 256 and its blocks fit one per SM), and with
    $SEMVOC_QKV_SPLIT_KEYS=0 the 4-warp blocks there: the library reads it once per process, so
    that form runs in a fresh one."""
    rows, length, heads, per_head = GPU_CASES[case]
    args = _qkv_case(rows, length, heads, per_head)
    inputs = [a.numpy().astype(np.float16) for a in args]
    qkv, gamma, beta, cos, sin = (torch.from_numpy(a.astype(np.float32)) for a in inputs)
    # q and k rounded to fp16 after their norm and rotation, as the kernel holds them
    q, k, v = (t.half().float() for t in head_norm_rope_qkv(qkv.half(), gamma.half(), beta.half(), cos.half(),
                                                             sin.half(), 1e-6))
    want = attention_packed_reference(q, k, v, None, heads).numpy()
    _one_node_model("QkvAttention", inputs, tmp_path / "op.onnx", {"num_heads": heads, "epsilon": 1e-6})
    if split_keys == "default":
        monkeypatch.delenv(SPLIT_KEYS_ENV, raising=False)
        outs = [_run_cuda(tmp_path / "op.onnx", cuda_library, inputs, [want.shape], graph)[0]
                for graph in (False, True)]
    else:
        np.savez(tmp_path / "inputs.npz", *inputs)
        subprocess.run([sys.executable, "-c", _QKV_PROCESS, str(tmp_path / "inputs.npz"), str(tmp_path / "op.onnx"),
                        str(cuda_library), str(tmp_path / "out.npz"), ",".join(map(str, want.shape))],
                       check=True, cwd=Path(__file__).parents[1], env={**os.environ, SPLIT_KEYS_ENV: split_keys})
        saved = np.load(tmp_path / "out.npz")
        outs = [saved["arr_0"], saved["arr_1"]]
    for cuda_graph, out in zip((False, True), outs, strict=True):
        assert out.shape == want.shape, (case, cuda_graph, out.shape)
        # P is rounded to fp16 (2^-11 relative) before PV and the output once more; a q or k element
        # whose fp32 norm rounds the other way moves the logits by about as much
        error = np.abs(out.astype(np.float32) - want)
        bound = 2.0**-9 * (np.abs(v.numpy()).max() + np.abs(want))
        assert np.isfinite(out).all() and (error <= bound).all(), (case, split_keys, cuda_graph, float(error.max()))


@pytest.mark.gpu
def test_kernel_refuses_another_head_size(cuda_library, tmp_path):
    """Head size 128 (num_heads that makes it so) is refused with the limit named, not computed wrong."""
    from semvoc.runtime.backends.ort_common import make_session

    args = [a.numpy().astype(np.float16) for a in _qkv_case(1, 16, 2, False)]
    _one_node_model("QkvAttention", args, tmp_path / "op.onnx", {"num_heads": 1, "epsilon": 1e-6})
    session = make_session(tmp_path / "op.onnx", "cuda", custom_ops=cuda_library)
    with pytest.raises(Exception, match="QkvAttention: head size 128"):
        session.run(None, {f"in{i}": a for i, a in enumerate(args)})
