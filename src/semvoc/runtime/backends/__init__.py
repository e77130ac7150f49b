"""Execution backends: onnxruntime CPU, onnxruntime CUDA (IOBinding + CUDA graphs), TensorRT."""
