// BiasPRelu: out = prelu(y + bias[c], slope[c]) over channels-last [..., C]: the ConvNeXt block's
// 1x1 expansion runs as a bias-free GEMM, and its bias rides along with the activation.
// 16-byte vectors when C allows (a memory-bound pass). Inputs: y [..., C], bias [C], slope [C].
// Reference: semvoc/kernels/bias_prelu.py.
#include "ort_op.h"

namespace semvoc {

template <typename T, int V>
__global__ void BiasPReluKernel(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ slope,
                                T* __restrict__ out, int vectors, int channels) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += gridDim.x * blockDim.x) {
    const Vec<T, V> in = reinterpret_cast<const Vec<T, V>*>(y)[i];
    const int c0 = (i * V) % channels;
    Vec<T, V> result;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float v = ToFloat(in.v[k]) + ToFloat(bias[c0 + k]);
      result.v[k] = FromFloat<T>(v > 0.f ? v : v * ToFloat(slope[c0 + k]));
    }
    reinterpret_cast<Vec<T, V>*>(out)[i] = result;
  }
}

template <typename T, int V>
static void Launch(const Tensor& y, const Tensor& bias, const Tensor& slope, Tensor& out, cudaStream_t stream) {
  const int vectors = static_cast<int>(y.numel() / V);
  BiasPReluKernel<T, V><<<GridFor(vectors, 256), 256, 0, stream>>>(
      static_cast<const T*>(y.data), static_cast<const T*>(bias.data), static_cast<const T*>(slope.data),
      static_cast<T*>(out.data), vectors, static_cast<int>(y.dim(-1)));
}

void BiasPReluCompute(OrtKernelContext* ctx, const KernelState&) {
  const Tensor y = Input(ctx, 0), bias = Input(ctx, 1), slope = Input(ctx, 2);
  Require(!y.shape.empty(), "BiasPRelu: y must be [..., C]");
  const int64_t channels = y.dim(-1), n = y.numel();
  Require(bias.numel() == channels && slope.numel() == channels, "BiasPRelu: bias and slope must be [C]");
  Require(n < (int64_t{1} << 31), "BiasPRelu: at most 2^31 elements");
  Tensor out = Output(ctx, 0, y.shape);
  if (n == 0) return;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(y.type, "BiasPRelu",
      if (Vectorizable<T>(channels, {y.data, out.data})) Launch<T, WideVector<T>()>(y, bias, slope, out, stream);
      else Launch<T, 1>(y, bias, slope, out, stream));
  CheckCuda(cudaGetLastError(), "BiasPRelu launch");
}

}  // namespace semvoc
