// GatedSkipNorm: the DiT's gated residual and the next LayerNorm in one pass over each row:
//   sum = x + y * gate[d] + bias[d]           (the residual stream, kept for the next block)
//   h   = (sum - mean) * rsqrt(var + eps) * gamma[d] + beta[d]
// Inputs: x, y [..., D]; gate, bias, gamma, beta [D]. Outputs: h, sum. Attribute epsilon.
// onnxruntime's stock ops need a Mul and a SkipLayerNormalization for this. One warp per row
// (a block per row where the row is at most 128 16-byte vectors): a thread keeps its share of the
// row in registers (16-byte vectors where D and the buffers allow), statistics in fp32 over the
// rounded sum (the value the next block reads).
// Reference: semvoc/kernels/gated_skip_norm.py.
#include "ort_op.h"

namespace semvoc {

constexpr int kRowsPerBlock = 4;  // warps per block

template <typename T, int V, int kMaxVec>
__global__ void GatedSkipNormKernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                                    const T* __restrict__ bias, const T* __restrict__ gamma,
                                    const T* __restrict__ beta, T* __restrict__ h, T* __restrict__ sum,
                                    int64_t rows, int width, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int vectors = width / V;
  using Vector = Vec<T, V>;
  const Vector* xr = reinterpret_cast<const Vector*>(x + row * width);
  const Vector* yr = reinterpret_cast<const Vector*>(y + row * width);
  Vector* sr = reinterpret_cast<Vector*>(sum + row * width);
  float s[kMaxVec][V];
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
    if (j < vectors) {
      // the per-channel parameters as vectors too: scalar loads of them outnumbered the data's
      const Vector a = xr[j], b = yr[j], g = reinterpret_cast<const Vector*>(gate)[j],
                   c = reinterpret_cast<const Vector*>(bias)[j];
      Vector out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        out.v[k] = FromFloat<T>(ToFloat(a.v[k]) + ToFloat(b.v[k]) * ToFloat(g.v[k]) + ToFloat(c.v[k]));
        s[i][k] = ToFloat(out.v[k]);
        total += s[i][k];
      }
      sr[j] = out;
    }
  }
  total = WarpSum(total);
  const float mean = total / width;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    if (lane + 32 * i < vectors) {
#pragma unroll
      for (int k = 0; k < V; ++k) squares += (s[i][k] - mean) * (s[i][k] - mean);
    }
  }
  squares = WarpSum(squares);
  const float rstd = rsqrtf(squares / width + eps);
  Vector* hr = reinterpret_cast<Vector*>(h + row * width);
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
    if (j < vectors) {
      const Vector g = reinterpret_cast<const Vector*>(gamma)[j], c = reinterpret_cast<const Vector*>(beta)[j];
      Vector out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = FromFloat<T>((s[i][k] - mean) * rstd * ToFloat(g.v[k]) + ToFloat(c.v[k]));
      hr[j] = out;
    }
  }
}

// The same with a block of kThreads threads per row, one vector each (rows of at most kThreads
// vectors: the DiT's D = 1024 in fp16 is 128 vectors of 8). A warp per row ran 8 vectors per lane
// one after another; here the row's loads are all in flight at once, over 4 warps, at the cost
// of two block-wide reductions through shared memory.
template <typename T, int V, int kThreads>
__global__ void __launch_bounds__(kThreads)
GatedSkipNormRowBlockKernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                            const T* __restrict__ bias, const T* __restrict__ gamma, const T* __restrict__ beta,
                            T* __restrict__ h, T* __restrict__ sum, int width, float eps) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float partial[2][kWarps];
  using Vector = Vec<T, V>;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * width;
  const int j = threadIdx.x;
  const bool active = j < width / V;
  float s[V];
  float total = 0.f;
  if (active) {
    const Vector a = reinterpret_cast<const Vector*>(x + offset)[j], b = reinterpret_cast<const Vector*>(y + offset)[j],
                 g = reinterpret_cast<const Vector*>(gate)[j], c = reinterpret_cast<const Vector*>(bias)[j];
    Vector out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out.v[k] = FromFloat<T>(ToFloat(a.v[k]) + ToFloat(b.v[k]) * ToFloat(g.v[k]) + ToFloat(c.v[k]));
      s[k] = ToFloat(out.v[k]);
      total += s[k];
    }
    reinterpret_cast<Vector*>(sum + offset)[j] = out;
  }
  const float mean = RowSum<kWarps>(total, j, partial[0]) / width;
  float squares = 0.f;
  if (active) {
#pragma unroll
    for (int k = 0; k < V; ++k) squares += (s[k] - mean) * (s[k] - mean);
  }
  squares = RowSum<kWarps>(squares, j, partial[1]);
  if (!active) return;
  const float rstd = rsqrtf(squares / width + eps);
  const Vector g = reinterpret_cast<const Vector*>(gamma)[j], c = reinterpret_cast<const Vector*>(beta)[j];
  Vector out;
#pragma unroll
  for (int k = 0; k < V; ++k) out.v[k] = FromFloat<T>((s[k] - mean) * rstd * ToFloat(g.v[k]) + ToFloat(c.v[k]));
  reinterpret_cast<Vector*>(h + offset)[j] = out;
}

// Widest row each path holds in registers: 16-byte vectors x 8 per lane, or 32 scalars per lane.
// Rows of at most kRowBlockThreads vectors take a block each instead of a warp, unless
// $SEMVOC_NORM_ROWS=warp (ort_op.h's NormRowBlocks: for A/B measurements of the two).
constexpr int kRowBlockThreads = 128;
constexpr int kMaxVectorsPerLane = 8;
constexpr int kMaxScalarsPerLane = 32;

void GatedSkipNormCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor x = Input(ctx, 0), y = Input(ctx, 1), gate = Input(ctx, 2), bias = Input(ctx, 3),
               gamma = Input(ctx, 4), beta = Input(ctx, 5);
  Require(!x.shape.empty() && x.shape == y.shape, "GatedSkipNorm: x and y must have the same shape [..., D]");
  const int64_t width = x.dim(-1);
  for (const Tensor* t : {&gate, &bias, &gamma, &beta}) {
    Require(t->numel() == width, "GatedSkipNorm: gate, bias, gamma and beta must be [D]");
  }
  Tensor h = Output(ctx, 0, x.shape), sum = Output(ctx, 1, x.shape);
  const int64_t rows = width == 0 ? 0 : x.numel() / width;
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(x.type, "GatedSkipNorm",
    const T* in[6] = {static_cast<const T*>(x.data), static_cast<const T*>(y.data), static_cast<const T*>(gate.data),
                      static_cast<const T*>(bias.data), static_cast<const T*>(gamma.data),
                      static_cast<const T*>(beta.data)};
    auto launch = [&](auto kernel) {
      kernel<<<blocks, 32 * kRowsPerBlock, 0, stream>>>(in[0], in[1], in[2], in[3], in[4], in[5],
                                                         static_cast<T*>(h.data), static_cast<T*>(sum.data), rows,
                                                         static_cast<int>(width), state.epsilon);
    };
    constexpr int V = WideVector<T>();
    const bool vectorizable =
        Vectorizable<T>(width, {x.data, y.data, h.data, sum.data, gate.data, bias.data, gamma.data, beta.data});
    if (vectorizable && width / V <= kRowBlockThreads && NormRowBlocks()) {
      GatedSkipNormRowBlockKernel<T, V, kRowBlockThreads><<<static_cast<unsigned>(rows), kRowBlockThreads, 0, stream>>>(
          in[0], in[1], in[2], in[3], in[4], in[5], static_cast<T*>(h.data), static_cast<T*>(sum.data),
          static_cast<int>(width), state.epsilon);
    } else if (vectorizable) {
      Require(width <= 32 * V * kMaxVectorsPerLane, "GatedSkipNorm: rows of at most " +
              std::to_string(32 * V * kMaxVectorsPerLane) + " elements");
      launch(GatedSkipNormKernel<T, V, kMaxVectorsPerLane>);
    } else {
      Require(width <= 32 * kMaxScalarsPerLane, "GatedSkipNorm: rows whose width is not a multiple of " +
              std::to_string(V) + " hold at most " + std::to_string(32 * kMaxScalarsPerLane) + " elements");
      launch(GatedSkipNormKernel<T, 1, kMaxScalarsPerLane>);
    });
  CheckCuda(cudaGetLastError(), "GatedSkipNorm launch");
}

}  // namespace semvoc
