// HeadNorm / HeadNormRope: LayerNorm over each head of packed heads [B, L, n*hd], a per-head
// (or shared) affine, and for HeadNormRope the half-split rotation at positions 0..L-1.
// Inputs: x [B, L, n*hd], gamma and beta [n, hd] or [hd], (cos, sin [>= L, hd/2]). Attribute epsilon.
// HeadNorm writes one output [B, L, n*hd]; HeadNormRope takes q|k (n = 2H heads from one GEMM)
// and writes q and k as two outputs [B, L, H*hd] each, so no Split follows it. HeadNormRopeQkv
// takes q|k|v [B, L, 3H*hd] (one GEMM of the three projections) and also writes v [B, L, H*hd],
// copied: three outputs, no Split either.
// hd = 64 or 128. Statistics and arithmetic in fp32. The kernels are in head_norm_kernel.cuh
// (shared with benchmarks/device/kernel_bench/head_norm_bench.cu).
// Reference: semvoc/kernels/head_norm.py.
#include "head_norm_kernel.cuh"

namespace semvoc {

template <bool kRope, bool kQkv = false>
static void HeadNormRun(OrtKernelContext* ctx, const KernelState& state, const char* name) {
  const Tensor x = Input(ctx, 0), gamma = Input(ctx, 1), beta = Input(ctx, 2);
  Tensor cos, sin;
  if (kRope) {
    cos = Input(ctx, 3);
    sin = Input(ctx, 4);
  }
  Require(x.shape.size() == 3, std::string(name) + ": x must be [B, L, n*hd]");
  const int64_t width = gamma.dim(-1), length = x.dim(1);
  Require(width == 64 || width == 128, std::string(name) + ": head size 64 or 128 (gamma's last dim)");
  Require(x.dim(2) % width == 0, std::string(name) + ": x's last dim must be a multiple of the head size");
  int64_t heads = x.dim(2) / width, v_heads = 0;
  if (kQkv) {
    Require(heads % 3 == 0, std::string(name) + ": x must hold q|k|v (a multiple of 3 heads)");
    v_heads = heads / 3;
    heads -= v_heads;
  }
  Require(gamma.numel() == beta.numel() && (gamma.numel() == width || gamma.numel() == heads * width),
          std::string(name) + ": gamma and beta must be [n, hd] or [hd]");
  if (kRope) {
    Require(cos.shape.size() == 2 && cos.dim(0) >= length && cos.dim(1) == width / 2 && sin.shape == cos.shape,
            std::string(name) + ": cos and sin must be [>= L, hd/2]");
  }
  std::vector<int64_t> out_shape = x.shape;
  if (kRope) {
    Require(heads % 2 == 0, std::string(name) + ": x must hold q|k (an even number of heads)");
    out_shape.back() = heads / 2 * width;
  }
  Tensor out = Output(ctx, 0, out_shape);
  Tensor out_k = kRope ? Output(ctx, 1, out_shape) : Tensor{};
  Tensor out_v = kQkv ? Output(ctx, 2, out_shape) : Tensor{};
  if (x.numel() == 0) return;
  const int64_t rows = x.dim(0) * length;
  Require(rows < (int64_t{1} << 31), std::string(name) + ": at most 2^31 - 1 rows (B * L)");
  const int affine_stride = gamma.numel() == width ? 0 : static_cast<int>(width);
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(x.type, name,
    LaunchHeadNorm<T, kRope>(static_cast<int>(width), static_cast<const T*>(x.data),
                             static_cast<const T*>(gamma.data), static_cast<const T*>(beta.data),
                             kRope ? static_cast<const T*>(cos.data) : nullptr,
                             kRope ? static_cast<const T*>(sin.data) : nullptr, static_cast<T*>(out.data),
                             static_cast<T*>(out_k.data), rows, static_cast<int>(heads), static_cast<int>(length),
                             affine_stride, state.epsilon, stream, static_cast<int>(v_heads),
                             static_cast<T*>(out_v.data)));
  CheckCuda(cudaGetLastError(), name);
}

void HeadNormCompute(OrtKernelContext* ctx, const KernelState& state) { HeadNormRun<false>(ctx, state, "HeadNorm"); }

void HeadNormRopeCompute(OrtKernelContext* ctx, const KernelState& state) {
  HeadNormRun<true>(ctx, state, "HeadNormRope");
}

void HeadNormRopeQkvCompute(OrtKernelContext* ctx, const KernelState& state) {
  HeadNormRun<true, true>(ctx, state, "HeadNormRopeQkv");
}

}  // namespace semvoc
