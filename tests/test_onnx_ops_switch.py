"""The export's per-fusion switch (SEMVOC_EXPORT_WITHOUT) used for A/B exports."""

from semvoc.kernels.onnx_ops import WITHOUT_ENV, fusion_enabled


def test_fusion_enabled_reads_the_comma_list(monkeypatch):
    monkeypatch.delenv(WITHOUT_ENV, raising=False)
    assert fusion_enabled("BiasNorm")
    monkeypatch.setenv(WITHOUT_ENV, "CrossAttention, BiasNorm")
    assert not fusion_enabled("BiasNorm")
    assert not fusion_enabled("CrossAttention")
    assert fusion_enabled("ConvNeXtMix")
