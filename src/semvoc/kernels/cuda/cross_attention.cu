// CrossAttention: the DiT's masked cross-attention on packed heads as one kernel.
// Inputs: q [R, L, H*hd], k and v [R, S, H*hd] (float or float16), key_mask [R', S] bool with R a
// multiple of R' (row r reads mask row r % R': the CFG batch [uncond; cond] passes its [batch, S]
// text mask, or the [2 batch, S] concatenation). Attribute num_heads. Output [R, L, H*hd]; scale
// hd^-0.5; a row with no true key gets zeros. fp16 with hd 64 and S <= 128 runs the tensor-core
// kernel (masked key tiles past the last true key skipped), everything else a general one.
// Optional inputs q_gamma, q_beta ([hd] or [H, hd]) with attribute epsilon: the query's per-head
// LayerNorm (the DiT's cross-attention q-norm), applied to q as the kernels load it, instead of a
// separate HeadNorm pass over q.
// onnxruntime runs the same function as its Attention op (a memory-efficient CUTLASS kernel over
// all S keys, plus a kernel that zeroes fully masked rows) with an additive mask bias built per step.
// Kernels: cross_attention_kernel.cuh (shared with benchmarks/device/kernel_bench/cross_attention_bench.cu).
// Reference: semvoc/kernels/cross_attention.py (cross_attention_reference).
#include "cross_attention_kernel.cuh"

namespace semvoc {

void CrossAttentionCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor q = Input(ctx, 0), k = Input(ctx, 1), v = Input(ctx, 2), mask = Input(ctx, 3);
  Require(q.shape.size() == 3 && k.shape.size() == 3 && v.shape == k.shape,
          "CrossAttention: q must be [R, L, H*hd], k and v the same [R, S, H*hd]");
  Require(k.dim(0) == q.dim(0) && k.dim(2) == q.dim(2), "CrossAttention: k and v must have q's rows and width");
  Require(k.type == q.type && v.type == q.type, "CrossAttention: q, k and v must have one element type");
  const int64_t heads = state.num_heads;
  Require(heads > 0 && q.dim(2) % heads == 0, "CrossAttention: num_heads must divide the width of q");
  const int64_t hd = q.dim(2) / heads, rows = q.dim(0), length = q.dim(1), keys = k.dim(1);
  Require(CrossAttentionSupported(hd), "CrossAttention: head size " + std::to_string(hd) + " (at most " +
                                           std::to_string(kXattnMaxHd) + ")");
  Require(mask.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL && mask.shape.size() == 2 && mask.dim(1) == keys &&
              mask.dim(0) > 0 && rows % mask.dim(0) == 0,
          "CrossAttention: key_mask must be bool [R', S] with R a multiple of R'");
  Require(rows < 65536 && heads < 65536 && rows * length * heads < (int64_t{1} << 31),
          "CrossAttention: too many rows, queries or heads");
  const Tensor gamma = OptionalInput(ctx, 4), beta = OptionalInput(ctx, 5);
  const bool normed = !gamma.shape.empty() || !beta.shape.empty();
  if (normed) {
    Require(gamma.numel() == beta.numel() && (gamma.numel() == hd || gamma.numel() == heads * hd),
            "CrossAttention: q_gamma and q_beta must both be [hd] or [H, hd]");
    Require(gamma.type == q.type && beta.type == q.type, "CrossAttention: q_gamma and q_beta must have q's type");
  }
  Tensor out = Output(ctx, 0, q.shape);
  if (q.numel() == 0) return;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(q.type, "CrossAttention",
    QueryNorm<T> norm;
    if (normed) {
      norm.gamma = static_cast<const T*>(gamma.data);
      norm.beta = static_cast<const T*>(beta.data);
      norm.affine_stride = gamma.numel() == hd ? 0 : static_cast<int>(hd);
      norm.eps = state.epsilon;
    }
    LaunchCrossAttention<T>(static_cast<const T*>(q.data), static_cast<const T*>(k.data),
                            static_cast<const T*>(v.data), static_cast<const bool*>(mask.data),
                            static_cast<T*>(out.data), static_cast<int>(rows), static_cast<int>(length),
                            static_cast<int>(keys), static_cast<int>(heads), static_cast<int>(hd),
                            static_cast<int>(mask.dim(0)), stream, norm));
  CheckCuda(cudaGetLastError(), "CrossAttention");
}

}  // namespace semvoc
