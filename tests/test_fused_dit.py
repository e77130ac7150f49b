"""The fused DiT form (what the step graph runs) against the model's own forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from semvoc.export import wrappers as W
from semvoc.export.fused_dit import FusedDiT, fused_time_rows, supports_fused
from semvoc.kernels.onnx_ops import WITHOUT_ENV
from semvoc.models.config import preset
from semvoc.models.model import build_model
from semvoc.models.udit import UDiT

VARIANTS = {
    "demo (release structure)": {},
    "gelu, no qk-norm, no rope, qkv bias": dict(act_layer="gelu", qk_norm=None, rope_mode="none", qkv_bias=True),
    "ada time fusion, no skips": dict(time_fusion="ada", skip=False),
    "ada_single, tanh gelu, depth 6": dict(time_fusion="ada_single", act_layer="gelu-approximate", depth=6),
    "skips without skip_norm": dict(skip_norm=False),  # the skip path keeps its Concat, no GatedConcatNorm
}


def _dit(overrides: dict) -> UDiT:
    cfg = preset("demo")
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, **overrides))
    return build_model(cfg, seed=0).dit.eval()


@pytest.mark.parametrize("cuda_ops", [False, True], ids=["onnxruntime-ops", "semvoc-cuda-ops"])
@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_fused_step_equals_the_generic_step(name, cuda_ops, monkeypatch):
    """``cuda_ops``: the qk-norms, the gated norms, GEGLU and the cross-attention as semvoc's CUDA
    ops (their PyTorch references here)."""
    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    dit = _dit(VARIANTS[name])
    assert supports_fused(dit)
    if dit.cfg.time_fusion == "ada_single":  # zero-initialised table: give it values
        for blk in dit.blocks:
            blk.adaln.scale_shift_table.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(2, 12, dit.cfg.context_dim, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 5:] = False
    mask[1, 2] = False  # a padded key before the last token
    timesteps = torch.tensor([999.0, 500.0, 3.0])
    sigmas = torch.tensor([1.0, 0.5, 0.1, 0.0])
    latent = torch.randn(2, dit.cfg.in_chans, 25, generator=gen)
    guidance = torch.tensor([3.5])
    generic = (W.DitPrepare(dit)(context), W.DitTime(dit)(timesteps))
    fused = (W.FusedDitPrepare(dit)(context), W.FusedDitTime(dit)(timesteps))
    rows = 8 * len(dit.blocks) + 2  # then zero rows to a multiple of 32: Splits of equal parts
    assert fused[1].shape[1] == fused_time_rows(dit) == -(-rows // 32) * 32
    assert torch.count_nonzero(fused[1][:, rows:]) == 0
    fused_step = W.FusedDitStep(dit, cuda_ops)
    assert fused_step.fused.cross_attention_op == cuda_ops
    for step in range(3):
        s = torch.tensor([step])
        a, _ = W.DitStep(dit)(latent, s, generic[1], sigmas, generic[0], mask, guidance)
        b, _ = fused_step(latent, s, fused[1], sigmas, *fused[0], mask, guidance)
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(a, latent)


def test_unsupported_configurations_keep_the_generic_form():
    dit = _dit(dict(norm_layer="rmsnorm"))
    assert not supports_fused(dit)
    with pytest.raises(ValueError, match="no fused form"):
        FusedDiT(dit)
    assert not supports_fused(_dit(dict(time_fusion="token")))


@pytest.mark.parametrize("total", [1, 9, 32, 33, 202])
def test_table_rows_are_the_rows_in_order(total):
    from semvoc.export.fused_dit import table_rows

    table = torch.arange(total * 3, dtype=torch.float32).reshape(total, 3)
    rows = table_rows(table)
    assert len(rows) == total and all(r.shape == (3,) for r in rows)
    torch.testing.assert_close(torch.stack(rows), table, rtol=0, atol=0)
