// LtGemm: out = a @ w (+ bias) (+ residual (* residual_scale)), then max(., 0) where the node's
// int attribute relu is 1, as ONE cuBLASLt call with the bias, the residual and the relu in its
// epilogue (onnxruntime's MatMul calls cublasGemmEx, which has none in fp16, so a bias Add or one of
// semvoc's passes used to follow it).
// Inputs: a [..., K], w [K, N], bias [N] (optional), residual [..., N] (optional),
// residual_scale [N] float32 (optional, needs residual). Output [..., N]. a, w, bias, residual and
// the output are float32 or float16 (fp32 accumulation). The code path is in ltgemm_kernel.cuh
// (shared with benchmarks/device/kernel_bench/ltgemm_bench.cu). Reference: semvoc/kernels/ltgemm.py.
#include "ltgemm_kernel.cuh"

namespace semvoc {

struct LtGemmState {
  LtGemmInstance<float> f32;
  LtGemmInstance<__half> f16;
};

void* LtGemmCreate() { return new LtGemmState; }
void LtGemmDestroy(void* state) { delete static_cast<LtGemmState*>(state); }

void LtGemmCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor a = Input(ctx, 0), w = Input(ctx, 1);
  const Tensor bias = OptionalInput(ctx, 2), residual = OptionalInput(ctx, 3), scale = OptionalInput(ctx, 4);
  Require(!a.shape.empty() && w.shape.size() == 2, "LtGemm: a must be [..., K] and w [K, N]");
  const int64_t k = w.dim(0), n = w.dim(1);
  Require(k > 0, "LtGemm: K (w's first dim) must be at least 1");
  Require(a.dim(-1) == k, "LtGemm: a's last dim (" + std::to_string(a.dim(-1)) + ") must equal w's first (" +
                              std::to_string(k) + ")");
  std::vector<int64_t> out_shape = a.shape;
  out_shape.back() = n;
  Require(bias.data == nullptr || bias.numel() == n, "LtGemm: bias must be [N]");
  Require(residual.data == nullptr || residual.shape == out_shape, "LtGemm: residual must be [..., N], the output's shape");
  Require(scale.data == nullptr || (residual.data != nullptr && scale.numel() == n &&
                                     scale.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
          "LtGemm: residual_scale must be float32 [N], with a residual");
  Tensor out = Output(ctx, 0, out_shape);
  LtGemmArgs args;
  args.a = a.data;
  args.w = w.data;
  args.bias = bias.data;
  args.residual = residual.data;
  args.scale = static_cast<const float*>(scale.data);
  args.out = out.data;
  args.m = a.numel() / k;
  args.n = n;
  args.k = k;
  args.relu = state.relu;
  if (out.numel() == 0) return;
  LtGemmState* s = static_cast<LtGemmState*>(state.data);
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(a.type, "LtGemm",
      if constexpr (sizeof(T) == 4) s->f32.Run(args, stream);
      else s->f16.Run(args, stream));
}

}  // namespace semvoc
