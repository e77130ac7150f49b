// CrossAttention kernels, shared by the library (cross_attention.cu) and the micro-benchmark
// (benchmarks/device/kernel_bench/cross_attention_bench.cu), so that what the bench times is what ships.
//   out[r, l, h*hd + d] = sum_j p[j] v[r, j, h*hd + d] / sum_j p[j],
//   p[j] = exp(s[j] - max s) over the keys j with key_mask[r % mask_rows, j] true, 0 for the others,
//   s[j] = q[r, l, h*hd : (h+1)*hd] . k[r, j, h*hd : (h+1)*hd] * hd^-0.5.
// q, out [R, L, H*hd]; k, v [R, S, H*hd] (packed heads); key_mask [mask_rows, S] bool (1 byte, nonzero
// = attend), R a multiple of mask_rows: the DiT's CFG batch [uncond; cond] reads its [batch, S] mask
// twice. A row whose mask has no true key gets zeros (as ONNX's Attention and PyTorch's SDPA give).
#pragma once

#include "mma_sync.cuh"
#include "ort_op.h"

namespace semvoc {

// ---------------------------------------------------------------------------- tensor-core path
// fp16, hd = 64, S <= 128. One block of kWarps warps per (tile of 16 kWarps queries, head, row);
// a warp owns 16 queries (one m16 tile of mma.sync.m16n8k16, fp16 in, fp32 accumulate).
//  - the mask row is read first (one byte per thread, a ballot per warp): the key tiles of 16
//    past the row's last true key are neither loaded nor computed. Read on the device at every
//    call, so a captured CUDA graph serves any prompt.
//  - Q (per warp) and the first key tile of K and V are requested before the mask (every text
//    has a token); the other tiles after it. The logits start when Q and K have landed, while
//    the rest of V is still in flight.
//  - all of a query's (up to 128) logits stay in registers (the C fragments of QK^T), so the
//    softmax is one pass: max, exp2, sum, no online rescaling. P is rounded to fp16 once, in
//    the register layout of PV's A operand (the C fragment of m16n8 is the A fragment of m16k16).
//  - the output is divided by the row sum in fp32, rounded once, staged through the warp's Q
//    buffer and written in 16-byte vectors.
// Shared rows are padded to 72 halves (144 bytes): ldmatrix's 8 row addresses then hit 8
// different 16-byte bank groups.
constexpr int kXattnHd = 64;
constexpr int kXattnMaxKeys = 128;
constexpr int kXattnStride = kXattnHd + 8;  // halves per shared row

// The query's per-head LayerNorm (the DiT's cross-attention q-norm), done by the attention kernels
// on the query they load: y = (x - mean) / sqrt(var + eps) * gamma + beta over a head's hd values,
// statistics in fp32 (two passes), one rounding to T, as the separate HeadNorm op gives it.
// gamma/beta [hd] (shared by the heads, affine_stride 0) or [H, hd] (affine_stride hd); null: none.
template <typename T>
struct QueryNorm {
  const T* gamma = nullptr;
  const T* beta = nullptr;
  int affine_stride = 0;
  float eps = 0.f;
};

// The warp's 16 query rows of 64 halves in shared memory, normed in place: two lanes per row.
template <int kStride>
__device__ __forceinline__ void NormQueryRows(__half (*rows)[kStride], int lane, const QueryNorm<__half>& norm,
                                              int head) {
  constexpr int kHd = 64, kPart = kHd / 2;
  __half* part = &rows[lane / 2][(lane % 2) * kPart];
  float x[kPart];
#pragma unroll
  for (int i = 0; i < kPart / 8; ++i) {
    const Vec<__half, 8> raw = *reinterpret_cast<const Vec<__half, 8>*>(part + 8 * i);
#pragma unroll
    for (int e = 0; e < 8; ++e) x[8 * i + e] = __half2float(raw.v[e]);
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPart; ++i) sum += x[i];
  const float mean = (sum + __shfl_xor_sync(0xffffffffu, sum, 1)) / kHd;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < kPart; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const float rstd = rsqrtf((squares + __shfl_xor_sync(0xffffffffu, squares, 1)) / kHd + norm.eps);
  const int offset = head * norm.affine_stride + (lane % 2) * kPart;
#pragma unroll
  for (int i = 0; i < kPart / 8; ++i) {
    const Vec<__half, 8> g = *reinterpret_cast<const Vec<__half, 8>*>(norm.gamma + offset + 8 * i);
    const Vec<__half, 8> b = *reinterpret_cast<const Vec<__half, 8>*>(norm.beta + offset + 8 * i);
    Vec<__half, 8> y;
#pragma unroll
    for (int e = 0; e < 8; ++e)
      y.v[e] = __float2half_rn((x[8 * i + e] - mean) * rstd * __half2float(g.v[e]) + __half2float(b.v[e]));
    *reinterpret_cast<Vec<__half, 8>*>(part + 8 * i) = y;
  }
  __syncwarp();
}

template <int kWarps>
struct XattnShared {
  __half k[kXattnMaxKeys][kXattnStride];
  __half v[kXattnMaxKeys][kXattnStride];
  __half q[kWarps * 16][kXattnStride];  // per warp: its 16 queries, then its 16 output rows
  uint32_t mask_bits[kXattnMaxKeys / 32];
};

template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32) CrossAttentionMmaKernel(
    const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    const bool* __restrict__ key_mask, __half* __restrict__ out, int length, int keys, int heads, int mask_rows,
    float scale_log2, QueryNorm<__half> norm) {
  static_assert(sizeof(XattnShared<kWarps>) <= 48 * 1024, "static shared memory: at most 4 warps");
  constexpr int kTiles = kXattnMaxKeys / 16;  // key tiles of 16
  __shared__ __align__(16) XattnShared<kWarps> sm;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int head = blockIdx.y, row = blockIdx.z;
  const int q0 = blockIdx.x * (kWarps * 16) + warp * 16;  // this warp's first query
  const int64_t width = static_cast<int64_t>(heads) * kXattnHd;
  const __half* kv_base_k = k + static_cast<int64_t>(row) * keys * width + head * kXattnHd;
  const __half* kv_base_v = v + static_cast<int64_t>(row) * keys * width + head * kXattnHd;

  // rows [first, last) of K or V to shared memory: cp.async below S, zeros from S on (a padded
  // tile's rows then give 0 * 0 in PV, never 0 * NaN)
  auto stage_rows = [&](__half(*dst)[kXattnStride], const __half* src, int first, int last) {
    for (int chunk = first * 8 + tid; chunk < last * 8; chunk += kWarps * 32) {
      const int r = chunk / 8, c = (chunk % 8) * 8;
      if (r < keys) CpAsync16(&dst[r][c], src + static_cast<int64_t>(r) * width + c, 16);
      else *reinterpret_cast<uint4*>(&dst[r][c]) = make_uint4(0, 0, 0, 0);
    }
  };

  // Q: the warp's 16 rows x 128 bytes, 16 bytes per lane and step (rows past L read zeros), and
  // the first key tile of K and V before the mask is known (a text has at least one token), so
  // that a short text's K/V copies do not wait for the mask's round trip
  __half(*qs)[kXattnStride] = sm.q + warp * 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int chunk = lane + 32 * i, r = chunk / 8, c = (chunk % 8) * 8;
    const int query = q0 + r;
    const __half* src = q + (static_cast<int64_t>(row) * length + min(query, length - 1)) * width + head * kXattnHd + c;
    CpAsync16(&qs[r][c], src, query < length ? 16 : 0);
  }
  stage_rows(sm.k, kv_base_k, 0, 16);
  CpAsyncCommit();  // group 1: Q, K tile 0
  stage_rows(sm.v, kv_base_v, 0, 16);
  CpAsyncCommit();  // group 2: V tile 0

  // the mask row: one bit per key, and the last true key
  const bool* mrow = key_mask + static_cast<int64_t>(row % mask_rows) * keys;
  for (int w = warp; w < kXattnMaxKeys / 32; w += kWarps) {
    const int key = 32 * w + lane;
    const uint32_t bits = __ballot_sync(0xffffffffu, key < keys && mrow[key]);
    if (lane == 0) sm.mask_bits[w] = bits;
  }
  __syncthreads();
  int last = -1;
#pragma unroll
  for (int w = 0; w < kXattnMaxKeys / 32; ++w)
    if (sm.mask_bits[w]) last = 32 * w + 31 - __clz(static_cast<int>(sm.mask_bits[w]));
  const int tiles = (last + 16) / 16;  // key tiles holding a true key (0 when none)

  // the other tiles up to the last true key
  stage_rows(sm.k, kv_base_k, 16, tiles * 16);
  CpAsyncCommit();  // group 3: K tiles 1..
  stage_rows(sm.v, kv_base_v, 16, tiles * 16);
  CpAsyncCommit();  // group 4: V tiles 1..
  CpAsyncWait<1>();  // this thread's groups 1-3: Q and K (and V tile 0)
  __syncthreads();   // everyone's
  if (norm.gamma != nullptr) NormQueryRows(qs, lane, norm, head);

  const int g = lane / 4, t = lane % 4;  // fragment coordinates: row g (and g + 8), columns 2t, 2t + 1
  // Q as A fragments for the 4 k-steps of 16 dims
  uint32_t qa[4][4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) LdMatrixX4(qa[ks], &qs[lane % 16][ks * 16 + (lane / 16) * 8]);

  // logits: s[j] is the C fragment of keys 8j .. 8j + 7
  float s[2 * kTiles][4];
#pragma unroll
  for (int j = 0; j < 2 * kTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
  for (int kt = 0; kt < kTiles; ++kt) {
    if (kt >= tiles) break;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      // matrices: keys +0..7 / dims +0..7, keys +0..7 / dims +8..15, keys +8..15 / dims +0..7, +8..15 / +8..15
      const int m = lane / 8;
      uint32_t b[4];
      LdMatrixX4(b, &sm.k[kt * 16 + (m / 2) * 8 + lane % 8][ks * 16 + (m % 2) * 8]);
      MmaF16(s[2 * kt], qa[ks], b[0], b[1]);
      MmaF16(s[2 * kt + 1], qa[ks], b[2], b[3]);
    }
  }

  // softmax over the true keys (rows g and g + 8 of the warp's tile; a quad of lanes shares a row)
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 2 * kTiles; ++j) {
    if (j >= 2 * tiles) break;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int key = 8 * j + 2 * t + (c & 1);
      const bool on = (sm.mask_bits[key / 32] >> (key % 32)) & 1u;
      s[j][c] = on ? s[j][c] * scale_log2 : -INFINITY;
      row_max[c / 2] = fmaxf(row_max[c / 2], s[j][c]);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 1));
    row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 2));
    if (row_max[h] == -INFINITY) row_max[h] = 0.f;  // no true key: p = 0 everywhere (not NaN)
  }
  float row_sum[2] = {0.f, 0.f};
  uint32_t pa[kTiles][4];  // P as A fragments, one per key tile of 16
#pragma unroll
  for (int kt = 0; kt < kTiles; ++kt) {
    if (kt >= tiles) break;
    float p[2][4];
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        p[half][c] = exp2f(s[2 * kt + half][c] - row_max[c / 2]);
        row_sum[c / 2] += p[half][c];
      }
    pa[kt][0] = PackHalf2(p[0][0], p[0][1]);  // row g, keys 2t, 2t + 1
    pa[kt][1] = PackHalf2(p[0][2], p[0][3]);  // row g + 8
    pa[kt][2] = PackHalf2(p[1][0], p[1][1]);  // row g, keys 8 + 2t, 8 + 2t + 1
    pa[kt][3] = PackHalf2(p[1][2], p[1][3]);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }

  CpAsyncWait<0>();  // V
  __syncthreads();

  // O = P V: o[n] is the C fragment of dims 8n .. 8n + 7
  float o[kXattnHd / 8][4];
#pragma unroll
  for (int n = 0; n < kXattnHd / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
#pragma unroll
  for (int kt = 0; kt < kTiles; ++kt) {
    if (kt >= tiles) break;
#pragma unroll
    for (int np = 0; np < kXattnHd / 16; ++np) {
      // transposed matrices: keys +0..7 / dims +0..7, keys +8..15 / dims +0..7, +0..7 / +8..15, +8..15 / +8..15
      const int m = lane / 8;
      uint32_t b[4];
      LdMatrixX4Trans(b, &sm.v[kt * 16 + (m % 2) * 8 + lane % 8][np * 16 + (m / 2) * 8]);
      MmaF16(o[2 * np], pa[kt], b[0], b[1]);
      MmaF16(o[2 * np + 1], pa[kt], b[2], b[3]);
    }
  }

  // normalise (a row without a true key has sum 0 and o 0: zeros), stage, store 16-byte vectors
  const float inv[2] = {row_sum[0] > 0.f ? 1.f / row_sum[0] : 0.f, row_sum[1] > 0.f ? 1.f / row_sum[1] : 0.f};
#pragma unroll
  for (int n = 0; n < kXattnHd / 8; ++n) {
    *reinterpret_cast<uint32_t*>(&qs[g][8 * n + 2 * t]) = PackHalf2(o[n][0] * inv[0], o[n][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(&qs[g + 8][8 * n + 2 * t]) = PackHalf2(o[n][2] * inv[1], o[n][3] * inv[1]);
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int chunk = lane + 32 * i, r = chunk / 8, c = (chunk % 8) * 8;
    const int query = q0 + r;
    if (query < length)
      *reinterpret_cast<uint4*>(out + (static_cast<int64_t>(row) * length + query) * width + head * kXattnHd + c) =
          *reinterpret_cast<const uint4*>(&qs[r][c]);
  }
}

// ---------------------------------------------------------------------------- general path
// Any float type, any hd <= 32 kDims, any S: one warp per (row, query, head), keys one at a time
// with an online softmax (masked keys skipped), lane i holding dims i + 32 m. Correct everywhere
// the tensor-core path is not built for (fp32 engines, other head sizes, longer texts); slow.
template <typename T, int kDims>
__global__ void __launch_bounds__(256) CrossAttentionWarpKernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const bool* __restrict__ key_mask,
    T* __restrict__ out, int64_t warps, int length, int keys, int heads, int hd, int mask_rows, float scale,
    QueryNorm<T> norm) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= warps) return;
  const int head = static_cast<int>(warp % heads);
  const int64_t token = warp / heads;  // row * length + query
  const int row = static_cast<int>(token / length);
  const int64_t width = static_cast<int64_t>(heads) * hd;
  const T* qh = q + token * width + head * hd;
  const T* kh = k + static_cast<int64_t>(row) * keys * width + head * hd;
  const T* vh = v + static_cast<int64_t>(row) * keys * width + head * hd;
  const bool* mrow = key_mask + static_cast<int64_t>(row % mask_rows) * keys;
  float qv[kDims], acc[kDims];
#pragma unroll
  for (int m = 0; m < kDims; ++m) {
    const int d = lane + 32 * m;
    qv[m] = d < hd ? ToFloat(qh[d]) : 0.f;
    acc[m] = 0.f;
  }
  if (norm.gamma != nullptr) {  // the query's LayerNorm (QueryNorm), rounded to T as the separate op's
    float sum = 0.f, squares = 0.f;
#pragma unroll
    for (int m = 0; m < kDims; ++m) sum += qv[m];
    const float mean = WarpSum(sum) / hd;
#pragma unroll
    for (int m = 0; m < kDims; ++m) squares += lane + 32 * m < hd ? (qv[m] - mean) * (qv[m] - mean) : 0.f;
    const float rstd = rsqrtf(WarpSum(squares) / hd + norm.eps);
#pragma unroll
    for (int m = 0; m < kDims; ++m) {
      const int d = lane + 32 * m;
      const int a = head * norm.affine_stride + d;
      if (d < hd) qv[m] = ToFloat(FromFloat<T>((qv[m] - mean) * rstd * ToFloat(norm.gamma[a]) + ToFloat(norm.beta[a])));
    }
  }
#pragma unroll
  for (int m = 0; m < kDims; ++m) qv[m] *= scale;
  float run_max = -INFINITY, run_sum = 0.f;
  for (int j0 = 0; j0 < keys; j0 += 32) {
    uint32_t bits = __ballot_sync(0xffffffffu, j0 + lane < keys && mrow[j0 + lane]);
    while (bits) {
      const int j = j0 + __ffs(bits) - 1;
      bits &= bits - 1;
      const T* kj = kh + static_cast<int64_t>(j) * width;
      float dot = 0.f;
#pragma unroll
      for (int m = 0; m < kDims; ++m) {
        const int d = lane + 32 * m;
        if (d < hd) dot += qv[m] * ToFloat(kj[d]);
      }
      dot = WarpSum(dot);
      const float new_max = fmaxf(run_max, dot);
      const float correction = expf(run_max - new_max), p = expf(dot - new_max);
      run_sum = run_sum * correction + p;
      const T* vj = vh + static_cast<int64_t>(j) * width;
#pragma unroll
      for (int m = 0; m < kDims; ++m) {
        const int d = lane + 32 * m;
        acc[m] = acc[m] * correction + (d < hd ? p * ToFloat(vj[d]) : 0.f);
      }
      run_max = new_max;
    }
  }
  const float inv = run_sum > 0.f ? 1.f / run_sum : 0.f;  // no true key: zeros
  T* o = out + token * width + head * hd;
#pragma unroll
  for (int m = 0; m < kDims; ++m) {
    const int d = lane + 32 * m;
    if (d < hd) o[d] = FromFloat<T>(acc[m] * inv);
  }
}

constexpr int kXattnMaxHd = 256;  // the general path's limit (8 dims per lane)

// Whether CrossAttention handles these shapes at all (the general path's limits).
inline bool CrossAttentionSupported(int64_t hd) { return hd >= 1 && hd <= kXattnMaxHd; }

// The tensor-core path's conditions: fp16, hd 64, S <= 128, 16-byte aligned buffers (null ones aside).
template <typename T>
inline bool CrossAttentionMmaEligible(int hd, int keys, std::initializer_list<const void*> buffers) {
  return sizeof(T) == 2 && hd == kXattnHd && keys <= kXattnMaxKeys && Vectorizable<T>(hd, buffers);
}

template <int kWarps>
void LaunchCrossAttentionMma(const __half* q, const __half* k, const __half* v, const bool* key_mask, __half* out,
                             int rows, int length, int keys, int heads, int mask_rows, cudaStream_t stream,
                             QueryNorm<__half> norm = {}) {
  const dim3 grid(static_cast<unsigned>((length + kWarps * 16 - 1) / (kWarps * 16)), static_cast<unsigned>(heads),
                  static_cast<unsigned>(rows));
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(kXattnHd));
  CrossAttentionMmaKernel<kWarps><<<grid, kWarps * 32, 0, stream>>>(q, k, v, key_mask, out, length, keys, heads,
                                                                    mask_rows, scale_log2, norm);
}

template <typename T>
void LaunchCrossAttentionWarp(const T* q, const T* k, const T* v, const bool* key_mask, T* out, int rows, int length,
                              int keys, int heads, int hd, int mask_rows, cudaStream_t stream,
                              QueryNorm<T> norm = {}) {
  const int64_t warps = static_cast<int64_t>(rows) * length * heads;
  const unsigned blocks = static_cast<unsigned>((warps * 32 + 255) / 256);
  const float scale = 1.f / sqrtf(static_cast<float>(hd));
  auto kernel = hd <= 32 ? CrossAttentionWarpKernel<T, 1>
              : hd <= 64 ? CrossAttentionWarpKernel<T, 2>
              : hd <= 128 ? CrossAttentionWarpKernel<T, 4> : CrossAttentionWarpKernel<T, 8>;
  kernel<<<blocks, 256, 0, stream>>>(q, k, v, key_mask, out, warps, length, keys, heads, hd, mask_rows, scale, norm);
}

// What the library launches (cross_attention.cu): the tensor-core kernel with 4 warps (64
// queries per block) where it applies, else the general one.
template <typename T>
void LaunchCrossAttention(const T* q, const T* k, const T* v, const bool* key_mask, T* out, int rows, int length,
                          int keys, int heads, int hd, int mask_rows, cudaStream_t stream, QueryNorm<T> norm = {}) {
  if constexpr (sizeof(T) == 2) {
    if (CrossAttentionMmaEligible<T>(hd, keys, {q, k, v, out, norm.gamma, norm.beta})) {
      LaunchCrossAttentionMma<4>(q, k, v, key_mask, out, rows, length, keys, heads, mask_rows, stream, norm);
      return;
    }
  }
  LaunchCrossAttentionWarp<T>(q, k, v, key_mask, out, rows, length, keys, heads, hd, mask_rows, stream, norm);
}

}  // namespace semvoc
