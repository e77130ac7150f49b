// BiasGeglu: the DiT's GEGLU after ONE bias-free GEMM of both halves:
//   out[..., j] = (u[..., j] + bias[j]) * gelu(u[..., F + j] + bias[F + j])   (exact, erf GELU)
// Inputs: u [..., 2F] (value half, then gate half), bias [2F]. Output: [..., F].
// Replaces two GEMMs (one with a bias-broadcast kernel), BiasGelu and a Mul. 16-byte vectors
// when F and the buffers allow. Reference: semvoc/kernels/bias_geglu.py.
#include "ort_op.h"

namespace semvoc {

// One thread per output vector column, for kRows rows at a time: the bias vectors are read once per
// thread, and the 2 * kRows row loads are issued before any result is computed (bandwidth-bound).
constexpr int kGegluRows = 4, kGegluThreads = 128;

template <typename T, int V>
__global__ void BiasGegluKernel(const T* __restrict__ u, const T* __restrict__ bias, T* __restrict__ out,
                                int64_t rows, int half) {
  using Vector = Vec<T, V>;
  const int half_vectors = half / V;
  const int j = static_cast<int>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= half_vectors) return;
  const Vector value_bias = reinterpret_cast<const Vector*>(bias)[j];
  const Vector gate_bias = reinterpret_cast<const Vector*>(bias + half)[j];
  for (int64_t first = static_cast<int64_t>(blockIdx.y) * kGegluRows; first < rows;
       first += static_cast<int64_t>(gridDim.y) * kGegluRows) {
    Vector value[kGegluRows], gate[kGegluRows];
#pragma unroll
    for (int r = 0; r < kGegluRows; ++r) {
      if (first + r < rows) {
        const Vector* ur = reinterpret_cast<const Vector*>(u + (first + r) * 2 * half);
        value[r] = ur[j];
        gate[r] = ur[half_vectors + j];
      }
    }
#pragma unroll
    for (int r = 0; r < kGegluRows; ++r) {
      if (first + r >= rows) break;
      Vector result;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float g = ToFloat(gate[r].v[k]) + ToFloat(gate_bias.v[k]);
        const float gelu = 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
        result.v[k] = FromFloat<T>((ToFloat(value[r].v[k]) + ToFloat(value_bias.v[k])) * gelu);
      }
      reinterpret_cast<Vector*>(out + (first + r) * half)[j] = result;
    }
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
  const int64_t rows = u.numel() / width;
  SEMVOC_DISPATCH_FLOAT(u.type, "BiasGeglu",
    auto launch = [&](auto kernel, int v) {
      const dim3 grid(static_cast<unsigned>((half / v + kGegluThreads - 1) / kGegluThreads),
                      static_cast<unsigned>(std::min<int64_t>((rows + kGegluRows - 1) / kGegluRows, 65535)));
      kernel<<<grid, kGegluThreads, 0, stream>>>(static_cast<const T*>(u.data), static_cast<const T*>(bias.data),
                                                 static_cast<T*>(out.data), rows, static_cast<int>(half));
    };
    constexpr int V = WideVector<T>();
    if (Vectorizable<T>(half, {u.data, out.data, bias.data})) launch(BiasGegluKernel<T, V>, V);
    else launch(BiasGegluKernel<T, 1>, 1));
  CheckCuda(cudaGetLastError(), "BiasGeglu launch");
}

}  // namespace semvoc
