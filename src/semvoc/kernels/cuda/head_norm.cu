// HeadNorm / HeadNormRope: LayerNorm over each head of packed heads [B, L, n*hd], a per-head
// (or shared) affine, and for HeadNormRope the half-split rotation at positions 0..L-1:
//   y = (x - mean) * rsqrt(var + eps) * gamma[h] + beta[h]
//   out[j] = y[j] cos[l, j] - y[j + hd/2] sin[l, j];  out[j + hd/2] = y[j + hd/2] cos[l, j] + y[j] sin[l, j]
// Inputs: x [B, L, n*hd], gamma and beta [n, hd] or [hd], (cos, sin [>= L, hd/2]). Attribute epsilon.
// HeadNorm writes one output [B, L, n*hd]; HeadNormRope takes q|k (n = 2H heads from one GEMM)
// and writes q and k as two outputs [B, L, H*hd] each, so no Split follows it.
// One warp per (row, head); lane i owns elements i + 32 m, so the rotation's pairs (j, j + hd/2)
// stay in one lane. hd = 64 or 128. Statistics and arithmetic in fp32.
// Reference: semvoc/kernels/head_norm.py.
#include "ort_op.h"

namespace semvoc {

template <typename T, int kPerLane, bool kRope>
__global__ void HeadNormKernel(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                               const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ out,
                               T* __restrict__ out_k, int64_t warps, int heads, int length, int affine_stride,
                               float eps) {
  constexpr int kWidth = 32 * kPerLane;
  constexpr int kHalf = kWidth / 2;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= warps) return;
  const int head = static_cast<int>(warp % heads);
  const T* xr = x + warp * kWidth;
  float v[kPerLane];
  float sum = 0.f;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    v[m] = ToFloat(xr[lane + 32 * m]);
    sum += v[m];
  }
  sum = WarpSum(sum);
  const float mean = sum / kWidth;
  float squares = 0.f;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const float d = v[m] - mean;
    squares += d * d;
  }
  squares = WarpSum(squares);
  const float rstd = rsqrtf(squares / kWidth + eps);
  const T* g = gamma + head * affine_stride;
  const T* b = beta + head * affine_stride;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const int e = lane + 32 * m;
    v[m] = (v[m] - mean) * rstd * ToFloat(g[e]) + ToFloat(b[e]);
  }
  if (kRope) {
    const int position = static_cast<int>((warp / heads) % length);
#pragma unroll
    for (int m = 0; m < kPerLane / 2; ++m) {
      const int j = lane + 32 * m;
      const float c = ToFloat(cos[position * kHalf + j]), s = ToFloat(sin[position * kHalf + j]);
      const float first = v[m], second = v[m + kPerLane / 2];
      v[m] = first * c - second * s;
      v[m + kPerLane / 2] = second * c + first * s;
    }
  }
  // HeadNormRope: heads [0, n/2) go to out (q), the rest to out_k, each [B, L, n/2 * hd]
  const int64_t row = warp / heads;
  const int half = heads / 2;
  T* o = !kRope ? out + warp * kWidth
       : head < half ? out + (row * half + head) * kWidth : out_k + (row * half + head - half) * kWidth;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) o[lane + 32 * m] = FromFloat<T>(v[m]);
}

template <bool kRope>
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
  const int64_t heads = x.dim(2) / width;
  Require(gamma.numel() == beta.numel() && (gamma.numel() == width || gamma.numel() == heads * width),
          std::string(name) + ": gamma and beta must be [n, hd] or [hd]");
  if (kRope) {
    Require(cos.shape.size() == 2 && cos.dim(0) >= length && cos.dim(1) == width / 2 && sin.shape == cos.shape,
            std::string(name) + ": cos and sin must be [>= L, hd/2]");
  }
  std::vector<int64_t> out_shape = x.shape;
  if (kRope) {
    Require(heads % 2 == 0, std::string(name) + ": x must hold q|k (an even number of heads)");
    out_shape.back() /= 2;
  }
  Tensor out = Output(ctx, 0, out_shape);
  Tensor out_k = kRope ? Output(ctx, 1, out_shape) : Tensor{};
  const int64_t warps = x.numel() / width;
  if (warps == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((warps * 32 + threads - 1) / threads);
  const int affine_stride = gamma.numel() == width ? 0 : static_cast<int>(width);
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(x.type, name,
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, stream>>>(
          static_cast<const T*>(x.data), static_cast<const T*>(gamma.data), static_cast<const T*>(beta.data),
          kRope ? static_cast<const T*>(cos.data) : nullptr, kRope ? static_cast<const T*>(sin.data) : nullptr,
          static_cast<T*>(out.data), static_cast<T*>(out_k.data), warps, static_cast<int>(heads),
          static_cast<int>(length), affine_stride, state.epsilon);
    };
    if (width == 64) launch(HeadNormKernel<T, 2, kRope>);
    else launch(HeadNormKernel<T, 4, kRope>));
  CheckCuda(cudaGetLastError(), name);
}

void HeadNormCompute(OrtKernelContext* ctx, const KernelState& state) { HeadNormRun<false>(ctx, state, "HeadNorm"); }

void HeadNormRopeCompute(OrtKernelContext* ctx, const KernelState& state) {
  HeadNormRun<true>(ctx, state, "HeadNormRope");
}

}  // namespace semvoc
