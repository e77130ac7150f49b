// BiasNorm: the vocoder decoder's input norm, channels-last, with the bias of the GEMM before it:
//   y   = x + input_bias[c]
//   out = y * mean_c((y - norm_bias)^2) ** -0.5 * exp(log_scale)
// Inputs: x [..., C], input_bias [C], norm_bias [C], log_scale [1]. Output [..., C]. One warp per
// row, the row in registers (16-byte vectors where C and the buffers allow), statistics in fp32.
// onnxruntime's stock ops need a bias Add, two Casts and the fp32 chain Sub, Mul, ReduceMean,
// Pow, Mul, Mul for this: 9 kernels per branch and step.
// Reference: semvoc/kernels/bias_norm.py (bias_norm_reference).
#include "ort_op.h"

namespace semvoc {

constexpr int kNormRowsPerBlock = 4;  // warps per block

template <typename T, int V, int kMaxVec>
__global__ void BiasNormKernel(const T* __restrict__ x, const T* __restrict__ input_bias,
                               const T* __restrict__ norm_bias, const T* __restrict__ log_scale,
                               T* __restrict__ out, int64_t rows, int width) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int vectors = width / V;
  using Vector = Vec<T, V>;
  const Vector* xr = reinterpret_cast<const Vector*>(x + row * width);
  float y[kMaxVec][V];
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
    if (j < vectors) {
      const Vector a = xr[j], ib = reinterpret_cast<const Vector*>(input_bias)[j],
                   nb = reinterpret_cast<const Vector*>(norm_bias)[j];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        y[i][k] = ToFloat(a.v[k]) + ToFloat(ib.v[k]);
        const float d = y[i][k] - ToFloat(nb.v[k]);
        squares += d * d;
      }
    }
  }
  squares = WarpSum(squares);
  const float scale = rsqrtf(squares / width) * expf(ToFloat(log_scale[0]));
  Vector* orow = reinterpret_cast<Vector*>(out + row * width);
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
    if (j < vectors) {
      Vector o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = FromFloat<T>(y[i][k] * scale);
      orow[j] = o;
    }
  }
}

// Widest row each path holds in registers: 16-byte vectors x 8 per lane (1024 fp32 or 2048 fp16
// channels), or 32 scalars per lane.
constexpr int kNormVectorsPerLane = 8;
constexpr int kNormScalarsPerLane = 32;

void BiasNormCompute(OrtKernelContext* ctx, const KernelState&) {
  const Tensor x = Input(ctx, 0), input_bias = Input(ctx, 1), norm_bias = Input(ctx, 2), log_scale = Input(ctx, 3);
  Require(!x.shape.empty(), "BiasNorm: x must be [..., C]");
  const int64_t width = x.dim(-1);
  Require(input_bias.numel() == width && norm_bias.numel() == width && log_scale.numel() == 1,
          "BiasNorm: input_bias and norm_bias must be [C], log_scale one value");
  Tensor out = Output(ctx, 0, x.shape);
  const int64_t rows = width == 0 ? 0 : x.numel() / width;
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock);
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(x.type, "BiasNorm",
    auto launch = [&](auto kernel) {
      kernel<<<blocks, 32 * kNormRowsPerBlock, 0, stream>>>(
          static_cast<const T*>(x.data), static_cast<const T*>(input_bias.data), static_cast<const T*>(norm_bias.data),
          static_cast<const T*>(log_scale.data), static_cast<T*>(out.data), rows, static_cast<int>(width));
    };
    constexpr int V = WideVector<T>();
    if (Vectorizable<T>(width, {x.data, out.data, input_bias.data, norm_bias.data})) {
      Require(width <= 32 * V * kNormVectorsPerLane, "BiasNorm: rows of at most " +
              std::to_string(32 * V * kNormVectorsPerLane) + " elements");
      launch(BiasNormKernel<T, V, kNormVectorsPerLane>);
    } else {
      Require(width <= 32 * kNormScalarsPerLane, "BiasNorm: rows whose width is not a multiple of " +
              std::to_string(V) + " hold at most " + std::to_string(32 * kNormScalarsPerLane) + " elements");
      launch(BiasNormKernel<T, 1, kNormScalarsPerLane>);
    });
  CheckCuda(cudaGetLastError(), "BiasNorm launch");
}

}  // namespace semvoc
