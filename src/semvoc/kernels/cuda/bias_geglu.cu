// BiasGeglu: the DiT's GEGLU after ONE bias-free GEMM of both halves:
//   out[..., j] = (u[..., j] + bias[j]) * gelu(u[..., F + j] + bias[F + j])   (exact, erf GELU)
// Inputs: u [..., 2F] (value half, then gate half), bias [2F]. Output: [..., F].
// Replaces two GEMMs (one with a bias-broadcast kernel), BiasGelu and a Mul. 16-byte vectors
// when F and the buffers allow. Reference: semvoc/kernels/bias_geglu.py.
#include "ort_op.h"

namespace semvoc {

template <typename T, int V>
__global__ void BiasGegluKernel(const T* __restrict__ u, const T* __restrict__ bias, T* __restrict__ out,
                                int64_t vectors, int half) {
  using Vector = Vec<T, V>;
  const int half_vectors = half / V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / half_vectors;
    const int j = static_cast<int>(i % half_vectors);
    const Vector* ur = reinterpret_cast<const Vector*>(u + row * 2 * half);
    const Vector value = ur[j], gate = ur[half_vectors + j];
    Vector result;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = j * V + k;
      const float g = ToFloat(gate.v[k]) + ToFloat(bias[half + c]);
      const float gelu = 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
      result.v[k] = FromFloat<T>((ToFloat(value.v[k]) + ToFloat(bias[c])) * gelu);
    }
    reinterpret_cast<Vector*>(out)[i] = result;
  }
}

void BiasGegluCompute(OrtKernelContext* ctx, const KernelState&) {
  const Tensor u = Input(ctx, 0), bias = Input(ctx, 1);
  Require(!u.shape.empty() && u.dim(-1) % 2 == 0, "BiasGeglu: u must be [..., 2F] (value half, gate half)");
  const int64_t width = u.dim(-1), half = width / 2;
  Require(bias.numel() == width, "BiasGeglu: bias must be [2F], like u's last dim");
  std::vector<int64_t> shape = u.shape;
  shape.back() = half;
  Tensor out = Output(ctx, 0, shape);
  if (u.numel() == 0) return;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(u.type, "BiasGeglu",
    auto launch = [&](auto kernel, int v) {
      const int64_t vectors = u.numel() / 2 / v;
      kernel<<<GridFor(vectors, 256), 256, 0, stream>>>(static_cast<const T*>(u.data), static_cast<const T*>(bias.data),
                                                        static_cast<T*>(out.data), vectors, static_cast<int>(half));
    };
    constexpr int V = WideVector<T>();
    if (Vectorizable<T>(half, {u.data, out.data})) launch(BiasGegluKernel<T, V>, V);
    else launch(BiasGegluKernel<T, 1>, 1));
  CheckCuda(cudaGetLastError(), "BiasGeglu launch");
}

}  // namespace semvoc
