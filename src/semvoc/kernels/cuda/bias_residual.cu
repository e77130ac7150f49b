// BiasResidual: out = y + bias[c] + x * scale[c] over channels-last [..., C]: the ConvNeXt block's
// output (its bias-free 1x1 projection y) plus the scaled residual, one pass instead of a bias
// kernel, a Mul and an Add; 16-byte vectors when C allows.
// Inputs: y [..., C], bias [C], x (y's shape), scale [C]. Reference: semvoc/kernels/bias_residual.py.
#include "ort_op.h"

namespace semvoc {

template <typename T, int V>
__global__ void BiasResidualKernel(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ x,
                                   const T* __restrict__ scale, T* __restrict__ out, int vectors, int channels) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += gridDim.x * blockDim.x) {
    const Vec<T, V> a = reinterpret_cast<const Vec<T, V>*>(y)[i];
    const Vec<T, V> r = reinterpret_cast<const Vec<T, V>*>(x)[i];
    const int c0 = (i * V) % channels;
    Vec<T, V> result;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      result.v[k] = FromFloat<T>(ToFloat(a.v[k]) + ToFloat(bias[c0 + k]) + ToFloat(r.v[k]) * ToFloat(scale[c0 + k]));
    }
    reinterpret_cast<Vec<T, V>*>(out)[i] = result;
  }
}

template <typename T, int V>
static void Launch(const Tensor& y, const Tensor& bias, const Tensor& x, const Tensor& scale, Tensor& out,
                   cudaStream_t stream) {
  const int vectors = static_cast<int>(y.numel() / V);
  BiasResidualKernel<T, V><<<GridFor(vectors, 256), 256, 0, stream>>>(
      static_cast<const T*>(y.data), static_cast<const T*>(bias.data), static_cast<const T*>(x.data),
      static_cast<const T*>(scale.data), static_cast<T*>(out.data), vectors, static_cast<int>(y.dim(-1)));
}

void BiasResidualCompute(OrtKernelContext* ctx, const KernelState&) {
  const Tensor y = Input(ctx, 0), bias = Input(ctx, 1), x = Input(ctx, 2), scale = Input(ctx, 3);
  Require(!y.shape.empty() && y.shape == x.shape, "BiasResidual: y and x must have the same shape [..., C]");
  const int64_t channels = y.dim(-1), n = y.numel();
  Require(bias.numel() == channels && scale.numel() == channels, "BiasResidual: bias and scale must be [C]");
  Require(n < (int64_t{1} << 31), "BiasResidual: at most 2^31 elements");
  Tensor out = Output(ctx, 0, y.shape);
  if (n == 0) return;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(y.type, "BiasResidual",
      if (Vectorizable<T>(channels, {y.data, x.data, out.data})) Launch<T, WideVector<T>()>(y, bias, x, scale, out, stream);
      else Launch<T, 1>(y, bias, x, scale, out, stream));
  CheckCuda(cudaGetLastError(), "BiasResidual launch");
}

}  // namespace semvoc
