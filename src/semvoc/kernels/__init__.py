"""Export-friendly building blocks, one per file, each with its reference implementation.

Every module here computes exactly what an official PyTorch op computes, in a form that
exports to a small, fast ONNX pattern:

- ``attention``: masked multi-head attention -> one ONNX ``Attention`` node (opset 23); also on
  packed heads (``attention_packed``), where the op splits the heads itself.
- ``skip_layernorm``, ``rotary``, ``bias_gelu``: fused ops of the DiT's export form, PyTorch
  custom ops that export to one node each (``onnx_ops`` holds their translations).
- ``stft``: ``torch.stft`` / ``torch.istft`` as Conv1d / ConvTranspose1d with DFT bases.
- ``norms``: BiasNorm and RMSNorm with fp32 statistics (BiasNorm's channel mean as a GEMV in
  the export form).
- ``resample``: torchaudio's sinc (Hann) resampler as one strided Conv1d.
"""
