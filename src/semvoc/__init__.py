"""semvoc: fast, torch-free inference for SemanticVocoder text-to-audio models.

Layout (each subpackage is one layer of the stack):

- ``semvoc.models``  PyTorch definitions that load official checkpoints unchanged.
- ``semvoc.kernels`` export-friendly building blocks, each with its reference.
- ``semvoc.export``  torch -> ONNX (-> TensorRT): graphs, precision, parity, engine dir.
- ``semvoc.runtime`` NO torch: engine loading, backends, samplers, audio, ``semvoc-run``.
"""

__version__ = "0.1.0"
