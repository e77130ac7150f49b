// QkvAttention: the DiT's self-attention from its q|k|v GEMM output as one kernel: the q and k
// heads' LayerNorms, the rotation (RoPE) and the attention, without writing q, k and v out first.
// Inputs: qkv [R, L, 3*H*hd] float16 (q heads, k heads, v heads), gamma and beta [2H, hd] or [hd],
// cos and sin [>= L, hd/2]. Attributes num_heads, epsilon. Output [R, L, H*hd]; scale hd^-0.5.
// fp16 with hd 64 only (the export uses it only there, else HeadNormRopeQkv and onnxruntime's
// Attention). The stock form ran HeadNormRopeQkv (one pass writing q, k and v) and onnxruntime's
// flash attention kernel.
// Kernel: qkv_attention_kernel.cuh (shared with benchmarks/device/kernel_bench/qkv_attention_bench.cu).
// Reference: semvoc/kernels/qkv_attention.py (qkv_attention_reference).
#include "qkv_attention_kernel.cuh"

namespace semvoc {

void QkvAttentionCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor qkv = Input(ctx, 0), gamma = Input(ctx, 1), beta = Input(ctx, 2), cos = Input(ctx, 3),
               sin = Input(ctx, 4);
  Require(qkv.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "QkvAttention: float16 only");
  Require(qkv.shape.size() == 3, "QkvAttention: qkv must be [R, L, 3*H*hd]");
  const int64_t heads = state.num_heads;
  Require(heads > 0 && qkv.dim(2) % (3 * heads) == 0, "QkvAttention: num_heads must divide a third of qkv's width");
  const int64_t hd = qkv.dim(2) / (3 * heads), rows = qkv.dim(0), length = qkv.dim(1);
  Require(hd == kQkvHd, "QkvAttention: head size " + std::to_string(hd) + " (the kernel is built for 64)");
  Require(gamma.numel() == beta.numel() && (gamma.numel() == hd || gamma.numel() == 2 * heads * hd),
          "QkvAttention: gamma and beta must both be [2H, hd] or [hd]");
  Require(cos.shape.size() == 2 && cos.shape == sin.shape && cos.dim(1) == hd / 2 && cos.dim(0) >= length,
          "QkvAttention: cos and sin must be [>= L, hd/2]");
  for (const Tensor* t : {&gamma, &beta, &cos, &sin})
    Require(t->type == qkv.type, "QkvAttention: gamma, beta, cos and sin must have qkv's type");
  Require(rows < 65536 && heads < 65536 && rows * length * heads < (int64_t{1} << 31),
          "QkvAttention: too many rows, queries or heads");
  std::vector<int64_t> out_shape = qkv.shape;
  out_shape.back() = heads * hd;
  Tensor out = Output(ctx, 0, out_shape);
  if (out.numel() == 0) return;
  Require(QkvAttentionEligible(hd, {qkv.data, gamma.data, beta.data, cos.data, sin.data, out.data}),
          "QkvAttention: buffers must be 16-byte aligned");
  NormRopeTables tables;
  tables.gamma = static_cast<const __half*>(gamma.data);
  tables.beta = static_cast<const __half*>(beta.data);
  tables.affine_stride = gamma.numel() == hd ? 0 : static_cast<int>(hd);
  tables.eps = state.epsilon;
  tables.cos = static_cast<const __half*>(cos.data);
  tables.sin = static_cast<const __half*>(sin.data);
  LaunchQkvAttention(static_cast<const __half*>(qkv.data), static_cast<__half*>(out.data), static_cast<int>(rows),
                     static_cast<int>(length), static_cast<int>(heads), tables, Stream(ctx));
  CheckCuda(cudaGetLastError(), "QkvAttention");
}

}  // namespace semvoc
