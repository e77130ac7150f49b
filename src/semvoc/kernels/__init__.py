"""Export-friendly building blocks, one per file, each with its reference implementation.

Every module here computes exactly what an official PyTorch op computes, in a form that
exports to a small, fast ONNX pattern:

- ``attention``: masked multi-head attention -> one ONNX ``Attention`` node (opset 23).
- ``stft``: ``torch.stft`` / ``torch.istft`` as Conv1d / ConvTranspose1d with DFT bases.
- ``norms``: BiasNorm and RMSNorm with fp32 statistics.
- ``resample``: torchaudio's sinc (Hann) resampler as one strided Conv1d.
"""
