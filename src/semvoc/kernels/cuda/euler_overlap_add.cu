// EulerOverlapAdd: the end of a vocoder step in one pass: each branch's frame pieces overlap-added
// (the folded iSTFT), summed over the branches into the prediction, and the Euler update of the
// fp32 waveform with x1-prediction:
//   pred[b, s]  = sum_i (p_i[b, k + 1, j] + p_i[b, k, hop_i + j]),  k = s / hop_i, j = s % hop_i
//   out[b, s]   = x + (pred - x) / (1 - t) * dt   (pred_x1; else x + pred * dt)
// with x = audio[b, s], t = t_span[step], dt = t_span[1] - t_span[0], all in fp32 and in the order
// of the unfused graph (no contraction into FMAs), so the result is the graph's to the bit.
// Inputs: audio [B, L] float32, step [1] int64, t_span [N + 1] float32, pieces_0..3 [B, L / hop_i + 1,
// 2 hop_i] of T (one per branch, at least one). Attribute pred_x1 (0 or 1). Output [B, L] float32.
// Replaces per branch a Cast, two Slices, two Gathers and an Add, the branch sums and the
// update's five ops. Reference: semvoc/kernels/euler_overlap_add.py.
#include "ort_op.h"

namespace semvoc {

constexpr int kMaxBranches = 4;

template <typename T>
struct Branches {
  const T* pieces[kMaxBranches];
  int hop[kMaxBranches];
  int frames[kMaxBranches];
  int count;
};

template <int V>
__device__ __forceinline__ void LoadFloats(float (&dst)[V], const float* src) {
  const Vec<float, V> v = *reinterpret_cast<const Vec<float, V>*>(src);
#pragma unroll
  for (int k = 0; k < V; ++k) dst[k] = v.v[k];
}

template <int V>
__device__ __forceinline__ void LoadFloats(float (&dst)[V], const __half* src) {
  const Vec<__half, V> v = *reinterpret_cast<const Vec<__half, V>*>(src);
#pragma unroll
  for (int k = 0; k < V; ++k) dst[k] = __half2float(v.v[k]);
}

// One thread per V consecutive samples (V divides every hop, so they lie in one half-frame).
template <typename T, int V>
__global__ void EulerOverlapAddKernel(const float* __restrict__ audio, const int64_t* __restrict__ step,
                                      const float* __restrict__ t_span, int steps, Branches<T> branches,
                                      float* __restrict__ out, int64_t vectors, int length, bool pred_x1) {
  // read on the device at every call: a captured CUDA graph follows the step counter
  const int64_t index = min(max(*step, int64_t{0}), static_cast<int64_t>(steps));
  const float t = t_span[index], dt = __fsub_rn(t_span[1], t_span[0]), remaining = __fsub_rn(1.f, t);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sample = i * V, b = sample / length;
    const int s = static_cast<int>(sample % length);
    float pred[V];
    for (int br = 0; br < branches.count; ++br) {
      const int hop = branches.hop[br], k = s / hop, j = s % hop;
      const T* frame = branches.pieces[br] + (b * branches.frames[br] + k) * 2 * hop;
      float first[V], second[V];
      LoadFloats<V>(first, frame + 2 * hop + j);  // frame k + 1, first half
      LoadFloats<V>(second, frame + hop + j);     // frame k, second half
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float branch = __fadd_rn(first[v], second[v]);
        pred[v] = br == 0 ? branch : __fadd_rn(pred[v], branch);
      }
    }
    float x[V];
    LoadFloats<V>(x, audio + sample);
    Vec<float, V> result;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float velocity = pred_x1 ? __fdiv_rn(__fsub_rn(pred[v], x[v]), remaining) : pred[v];
      result.v[v] = __fadd_rn(x[v], __fmul_rn(velocity, dt));
    }
    *reinterpret_cast<Vec<float, V>*>(out + sample) = result;
  }
}

template <typename T, int V>
static void Launch(const Tensor& audio, const Tensor& step, const Tensor& t_span, const Branches<T>& branches,
                   Tensor& out, bool pred_x1, cudaStream_t stream) {
  const int64_t vectors = out.numel() / V;
  EulerOverlapAddKernel<T, V><<<GridFor(vectors, 256), 256, 0, stream>>>(
      static_cast<const float*>(audio.data), static_cast<const int64_t*>(step.data),
      static_cast<const float*>(t_span.data), static_cast<int>(t_span.numel() - 1), branches,
      static_cast<float*>(out.data), vectors, static_cast<int>(audio.dim(1)), pred_x1);
}

template <typename T>
static void Run(const Tensor& audio, const Tensor& step, const Tensor& t_span,
                const std::vector<Tensor>& pieces, Tensor& out, bool pred_x1, cudaStream_t stream) {
  Branches<T> branches{};
  branches.count = static_cast<int>(pieces.size());
  bool aligned = reinterpret_cast<uintptr_t>(audio.data) % 16 == 0 && reinterpret_cast<uintptr_t>(out.data) % 16 == 0 &&
                 audio.dim(1) % 4 == 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    branches.pieces[i] = static_cast<const T*>(pieces[i].data);
    branches.hop[i] = static_cast<int>(pieces[i].dim(2) / 2);
    branches.frames[i] = static_cast<int>(pieces[i].dim(1));
    aligned = aligned && branches.hop[i] % 4 == 0 && reinterpret_cast<uintptr_t>(pieces[i].data) % (4 * sizeof(T)) == 0;
  }
  if (aligned) Launch<T, 4>(audio, step, t_span, branches, out, pred_x1, stream);
  else Launch<T, 1>(audio, step, t_span, branches, out, pred_x1, stream);
}

void EulerOverlapAddCompute(OrtKernelContext* ctx, const KernelState& state) {
  const Tensor audio = Input(ctx, 0), step = Input(ctx, 1), t_span = Input(ctx, 2);
  Require(audio.shape.size() == 2, "EulerOverlapAdd: audio must be [B, L]");
  Require(step.numel() == 1, "EulerOverlapAdd: step must hold one int64");
  Require(t_span.shape.size() == 1 && t_span.numel() >= 2, "EulerOverlapAdd: t_span must be [N + 1], N >= 1");
  const int64_t batch = audio.dim(0), length = audio.dim(1);
  std::vector<Tensor> pieces;
  for (size_t i = 3; i < 3 + kMaxBranches; ++i) {
    Tensor p = OptionalInput(ctx, i);
    if (p.data == nullptr && p.shape.empty()) continue;
    Require(p.shape.size() == 3 && p.dim(0) == batch && p.dim(2) % 2 == 0 && p.dim(2) > 0,
            "EulerOverlapAdd: pieces must be [B, L / hop + 1, 2 hop]");
    const int64_t hop = p.dim(2) / 2;
    Require(length % hop == 0 && p.dim(1) == length / hop + 1,
            "EulerOverlapAdd: a branch's pieces [B, F, 2 hop] need F = L / hop + 1 (L = " + std::to_string(length) +
                ", hop = " + std::to_string(hop) + ", F = " + std::to_string(p.dim(1)) + ")");
    Require(pieces.empty() || p.type == pieces[0].type, "EulerOverlapAdd: every branch's pieces of one type");
    pieces.push_back(p);
  }
  Require(!pieces.empty(), "EulerOverlapAdd: needs the pieces of at least one branch");
  Require(audio.numel() < (int64_t{1} << 31), "EulerOverlapAdd: at most 2^31 samples");
  Tensor out = Output(ctx, 0, audio.shape);
  if (out.numel() == 0) return;
  cudaStream_t stream = Stream(ctx);
  SEMVOC_DISPATCH_FLOAT(pieces[0].type, "EulerOverlapAdd",
                        Run<T>(audio, step, t_span, pieces, out, state.pred_x1, stream));
  CheckCuda(cudaGetLastError(), "EulerOverlapAdd launch");
}

}  // namespace semvoc
